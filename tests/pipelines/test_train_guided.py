"""``ctseverity train --guided``: guided fine-tuning of the embedded model into a bundle that
``ctseverity run --bundle`` uses like any other, and the option checks."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from monai_ext.data.studies import write_studies
from pipelines.bundle import EMBEDDED_BUNDLE, load_model
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def guided_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided_studies")
    write_studies(root, [0, 35, 0, 50], seed=5, shape=(64, 64, 16), spacing=(6.0, 6.0, 16.0), masks=True,
                  progress=False)
    return root


def test_guided_training_writes_a_bundle_that_run_uses(guided_data, tmp_path, capsys):
    out = tmp_path / "guided"
    rc = main(["train", str(guided_data), "--out", str(out), "--guided", "--epochs", "1", "--batch-size", "16",
               "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "guided fine-tuning" in printed and "calibrate" in printed
    for f in ("configs/train.json", "configs/train_guided.json", "configs/inference.json", "models/model.pt",
              "models/model.json", "models/iba_estimator.pt"):
        assert (out / f).exists(), f

    source = load_model(EMBEDDED_BUNDLE)
    model = load_model(out)  # checksum verified
    assert model.info["format"] == source.info["format"] and model.info["weights"] == "model.pt"
    assert model.info["network_def"] == source.info["network_def"]
    assert model.info["input"] == source.info["input"]  # size, context and window of the source model
    assert model.info["iba_layer"] == source.info["iba_layer"] and model.iba_estimator is not None
    assert model.iba_estimator.layer == source.info["iba_layer"]
    training = model.info["training"]
    assert training["source_sha256"] == source.checksum
    guided = training["guided"]
    assert guided["layer"] == "features.denseblock2"
    assert (guided["r"], guided["alpha"], guided["sigma"], guided["beta"], guided["mu"]) == (0.35, 1000.0, 1.0,
                                                                                             1.0, 2.0)
    assert 0.0 <= model.info["metrics"]["slice_auc"] <= 1.0
    assert guided["train_from"] == "features.denseblock2" and guided["trainable"] is None
    changed = [k for k, v in model.network.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, source.network.state_dict()[k])]
    assert changed and all("running_" not in k for k in changed)  # fine-tuned in eval mode
    # only the guided layer's block and what follows it are updated
    assert all(k.startswith(("features.denseblock2.", "features.norm5.", "class_layers.")) for k in changed)

    run_out = tmp_path / "run"
    study = guided_data / "synth_001_f35.nii.gz"
    rc = main(["-q", "run", str(study), "--out", str(run_out), "--bundle", str(out), "--method", "iba",
               "--lung-mask", "threshold"])
    assert rc == 0, capsys.readouterr().err
    with open(run_out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["method"] == "iba"
    result = json.loads((run_out / "synth_001_f35" / "result.json").read_text())
    assert result["grade"] in ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--from", "BUNDLE"], "--from is only used with --guided"),
        (["--guided", "--size", "64"], "--size cannot be set with --guided"),
        (["--guided", "--from", "/no/such/bundle"], "bundle folder not found"),
        (["--guided", "--from", "OUT"], "is the source bundle"),
    ],
)
def test_bad_guided_options_exit_2(guided_data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.json").write_text("{}")  # looks like a bundle, for --from OUT
    extra = [str(EMBEDDED_BUNDLE) if a == "BUNDLE" else str(out) if a == "OUT" else a for a in extra]
    rc = main(["train", str(guided_data), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
