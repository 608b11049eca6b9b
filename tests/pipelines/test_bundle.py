"""The MONAI bundle: training through `python -m monai.bundle run` and `ctseverity train`, evaluation,
the checksum checked at load, and `ctseverity predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monai_ext.data.studies import write_studies
from monai_ext.errors import ModelChecksumError
from pipelines.bundle import EMBEDDED_BUNDLE, load_model
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = {"size": "64", "batch_size": "16"}


@pytest.fixture(scope="module")
def tiny_studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    write_studies(root, [0, 25, 0, 55, 10, 0], seed=11, shape=(96, 96, 32), spacing=(3.5, 3.5, 9.0), masks=True,
                  progress=False)
    return root


@pytest.fixture(scope="module")
def cli_bundle(tiny_studies, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    code = main(["train", str(tiny_studies), "--out", str(out), "--epochs", "1", "--size", "64",
                 "--batch-size", "16", "--device", "cpu"])
    assert code == 0
    return out


def test_monai_bundle_run_trains_offline(tiny_studies, tmp_path):
    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(EMBEDDED_BUNDLE / "configs" / "train.json"), "--dataset_dir", str(tiny_studies),
           "--output_dir", str(out), "--epochs", "1", "--device", "$torch.device('cpu')",
           *[a for k, v in TINY.items() for a in (f"--{k}", v)]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "model.json").read_text())
    assert (out / "model.pt").exists() and (out / "iba_estimator.pt").exists()
    assert info["input"]["size"] == 64 and info["network_def"]["_target_"] == "monai.networks.nets.DenseNet"
    assert 0.0 <= info["metrics"]["slice_auc"] <= 1.0
    assert info["metrics"]["n_studies"] == 2  # 30 % of six studies, stratified: one healthy, one with lesions


def test_cli_train_writes_a_complete_bundle(cli_bundle, tiny_studies):
    for f in ("configs/train.json", "configs/inference.json", "configs/evaluate.json", "configs/metadata.json",
              "docs/README.md", "models/model.pt", "models/model.json", "models/iba_estimator.pt"):
        assert (cli_bundle / f).exists(), f
    model = load_model(cli_bundle)
    assert model.size == 64 and model.iba_estimator is not None
    for key in ("slice_auc", "study_accuracy", "sensitivity", "specificity"):
        assert key in model.info["metrics"]


def test_evaluate_config_runs(cli_bundle, tiny_studies, tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cli_bundle / "configs" / "evaluate.json"),
           "--bundle_root", str(cli_bundle), "--dataset_dir", str(tiny_studies), "--output_dir", str(tmp_path / "eval"),
           "--device", "$torch.device('cpu')"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_studies"] == 6 and 0.0 <= metrics["slice_auc"] <= 1.0
    lines = (tmp_path / "eval" / "slice_predictions.csv").read_text().splitlines()
    assert lines[0] == "study,slice,label,lesion_probability" and len(lines) - 1 == metrics["n_slices"]


def test_checksum_is_checked_at_load(cli_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(cli_bundle, copy)
    with open(copy / "models" / "model.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelChecksumError, match="checksum mismatch"):
        load_model(copy)


def test_predict_prints_one_row_per_study(cli_bundle, tiny_studies, capsys):
    code = main(["predict", str(tiny_studies / "synth_000_f00.nii.gz"), str(tiny_studies / "synth_001_f25.nii.gz"),
                 "--bundle", str(cli_bundle), "--slices", "--lung-mask", "threshold"])
    out = capsys.readouterr().out
    assert code == 0
    head, *rest = out.split("\n\n")
    rows = head.strip().splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["synth_000_f00", "synth_001_f25"]
    assert all(0.0 <= float(r.split()[1]) <= 1.0 for r in rows)
    assert rest and "slice" in rest[0]  # per-slice rows below
