"""``ctseverity run`` and ``ctseverity demo`` end to end, and the bundle's inference config agreeing with them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipelines.batch import RESULT_COLUMNS
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INFERENCE_CONFIG = Path(__file__).resolve().parents[3] / "bundles" / "ct_severity" / "configs" / "inference.json"


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_run_prints_table_agreement_and_report(tiny_studies, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "run", str(tiny_studies), "--out", str(out), "--method", "density",
               "--truth", str(tiny_studies / "truth.csv")])
    assert rc == 0
    printed = capsys.readouterr().out
    for study in ("synth_000_f00", "synth_001_f20", "synth_002_f45"):
        assert study in printed
    assert "3 studies: 3 processed, 0 failed" in printed
    assert f"agreement with {tiny_studies / 'truth.csv'}: grade right in" in printed
    assert f"report:  {out / 'report.html'}" in printed
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(RESULT_COLUMNS) and [r["status"] for r in rows] == ["ok"] * 3
    report = (out / "report.html").read_text()
    assert "class='conf'" in report and "lesion percent scatter" in report

    rc = main(["-q", "run", str(tiny_studies), "--out", str(out), "--method", "density"])  # again: all skipped
    assert rc == 0 and "3 already complete (skipped)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["--study-call", "-0.1"], "study call must be in [0, 1]"),
        (["--truth", "/no/such/truth.csv"], "truth file not found"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--method", "hirescam", "--bundle", "/no/such/bundle"], "bundle folder not found"),
        (["--param", "iba.steps"], "--param expects METHOD.KEY=VALUE"),
        (["--method", "hirescam", "--param", "iba.steps=2"], "--param for iba, but --method is hirescam"),
        (["--method", "iba", "--param", "iba.stepz=2"], "iba takes no parameter 'stepz'"),
        (["--method", "iba", "--param", "iba.estimator=x"], "iba takes no parameter 'estimator'"),
        (["--param", "density.x=1"], "the density method has no attributor parameters"),
    ],
)
def test_bad_arguments_exit_2(tiny_studies, tmp_path, capsys, extra, message):
    rc = main(["-q", "run", str(tiny_studies), "--out", str(tmp_path / "out"), "--method", "density", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.csv").exists()


def test_method_parameters_reach_the_attributor_and_the_results(tiny_studies, tiny_bundle_ungated, tmp_path, capsys):
    """``--param``: IBA with 2 steps, 2 samples and a bfloat16 tail; recorded in result.json, and a
    rerun with other parameters redoes the studies (they are part of the run's fingerprint)."""
    import json

    out = tmp_path / "out"
    args = ["-q", "run", str(tiny_studies), "--out", str(out), "--bundle", str(tiny_bundle_ungated),
            "--method", "iba", "--device", "cpu"]
    fast = ["--param", "iba.steps=2", "--param", "iba.n_samples=2"]
    assert main([*args, *fast, "--param", "iba.autocast_dtype=bfloat16"]) == 0
    res = json.loads((out / "synth_001_f20" / "result.json").read_text())
    assert res["method_params"] == {"steps": 2, "n_samples": 2, "autocast_dtype": "bfloat16"}
    assert res["lesion_volume_ml"] > 0  # the ungated bundle explains every slice
    capsys.readouterr()
    assert main([*args, *fast]) == 0  # other parameters: nothing skipped
    assert "already complete" not in capsys.readouterr().out
    assert json.loads((out / "synth_001_f20" / "result.json").read_text())["method_params"] == {
        "steps": 2, "n_samples": 2}


def test_study_call_grades_uncalled_studies_ct0(tiny_studies, tiny_bundle_ungated, tmp_path):
    """``--study-call``: a study whose probability is below the call has no lesion whatever its heatmap; the
    call is recorded in result.json and is part of the fingerprint."""
    import json

    args = ["-q", "run", str(tiny_studies), "--bundle", str(tiny_bundle_ungated), "--method", "hirescam",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "open"), "--study-call", "0"]) == 0
    assert main([*args, "--out", str(tmp_path / "called"), "--study-call", "1"]) == 0
    opened = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "open").glob("*/result.json")}
    called = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "called").glob("*/result.json")}
    assert set(opened) == set(called) and any(r["lesion_volume_ml"] > 0 for r in opened.values())
    for name, res in called.items():
        assert res["study_call"] == 1.0 and res["fingerprint"] != opened[name]["fingerprint"]
        assert res["study_probability"] == opened[name]["study_probability"]
        if res["study_probability"] < 1.0:
            assert res["lesion_volume_ml"] == 0 and res["grade"] == "CT-0", res
        else:
            assert res["lesion_volume_ml"] == opened[name]["lesion_volume_ml"]


def test_missing_input_exits_2(tmp_path, capsys):
    assert main(["-q", "run", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--method", "density"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_bundle_inference_config_agrees_with_the_cli(tiny_studies, tiny_bundle_ungated, tmp_path):
    from monai.bundle import run as bundle_run

    by_bundle, by_cli = tmp_path / "bundle_out", tmp_path / "cli_out"
    bundle_run(run_id="run", init_id="initialize", config_file=str(INFERENCE_CONFIG),
               bundle_root=str(tiny_bundle_ungated), dataset_dir=str(tiny_studies), output_dir=str(by_bundle),
               method="hirescam", device="$torch.device('cpu')")
    rc = main(["-q", "run", str(tiny_studies), "--out", str(by_cli), "--bundle", str(tiny_bundle_ungated),
               "--method", "hirescam", "--device", "cpu"])
    assert rc == 0
    rows = read_csv(by_bundle / "results.csv")
    assert [r["study"] for r in rows] == ["synth_000_f00", "synth_001_f20", "synth_002_f45"]
    assert all(r["status"] == "ok" and r["method"] == "hirescam" for r in rows)
    assert any(float(r["lesion_percent"]) > 0 for r in rows)
    assert without_seconds(rows) == without_seconds(read_csv(by_cli / "results.csv"))
    assert (by_bundle / "report.html").exists()


def test_demo_writes_studies_truth_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["-q", "demo", "--out", str(out), "--studies", "2", "--method", "density"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert (out / "studies" / "truth.csv").exists()
    assert [r["study"] for r in read_csv(out / "results.csv")] == ["synth_000_f00", "synth_001_f12"]
    assert "agreement with" in printed and f"report:  {out / 'report.html'}" in printed
    assert "lesion percent scatter" in (out / "report.html").read_text()


def test_bundle_method_parameters_and_recalibration_rerun_studies(tiny_studies, tiny_bundle_ungated, tmp_path):
    """``model.json`` ``method_params`` set the bundle's own attributor parameters (``--param`` overrides them)
    and go into result.json; changing them, or the calibration, changes the fingerprint, so that a rerun into
    the same folder redoes the studies instead of keeping results of the old settings."""
    import json
    import shutil

    from pipelines.bundle import load_model
    from pipelines.methods import make_attributor

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_ungated, bundle)
    info_path = bundle / "models" / "model.json"
    info = json.loads(info_path.read_text())
    info["method_params"] = {"iba": {"beta": 0.5, "steps": 2, "n_samples": 2}}
    info_path.write_text(json.dumps(info))
    model = load_model(bundle)
    assert make_attributor("iba", model).beta == 0.5
    assert make_attributor("iba", model, beta=3.0).beta == 3.0
    out = tmp_path / "out"
    args = ["-q", "run", str(tiny_studies), "--out", str(out), "--bundle", str(bundle), "--method", "iba"]
    assert main(args) == 0
    first = json.loads((out / "synth_001_f20" / "result.json").read_text())
    assert first["method_params"] == {"beta": 0.5, "steps": 2, "n_samples": 2}
    info["calibration"]["threshold"] = 0.6
    info_path.write_text(json.dumps(info))
    assert main(args) == 0
    second = json.loads((out / "synth_001_f20" / "result.json").read_text())
    assert second["threshold"] == 0.6 and second["fingerprint"] != first["fingerprint"]
