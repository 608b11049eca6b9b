"""``ctseverity calibrate --rules``: the lesion rules the fit may choose from."""

from __future__ import annotations

import json

from monai_ext.data.studies import write_studies
from pipelines.cli import main


def test_calibrate_tries_only_the_given_rules(tmp_path, capsys):
    studies = tmp_path / "studies"
    write_studies(studies, [0, 30], seed=5, shape=(128, 128, 32), spacing=(2.5, 2.5, 6.0), progress=False)
    out = tmp_path / "bundle"
    code = main(["calibrate", str(studies), "--method", "hirescam", "--rules", "heatmap", "--lung-mask", "threshold",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    cal = json.loads((out / "models" / "model.json").read_text())["calibration"]["methods"]["hirescam"]
    assert cal["lesion_rule"] == "heatmap" and set(cal["fit"]["per_rule"]) == {"heatmap"}
    assert "heatmap-density" not in printed and "heatmap-relative" not in printed


def test_calibrate_refuses_an_unknown_rule_in_one_line(tmp_path, capsys):
    studies = tmp_path / "studies"
    studies.mkdir()
    assert main(["calibrate", str(studies), "--method", "hirescam", "--rules", "heatmap,blobs", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "blobs" in err and "heatmap-relative" in err and "Traceback" not in err
