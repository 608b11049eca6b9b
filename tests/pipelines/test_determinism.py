"""Determinism: the same input gives bit-identical masks and heatmaps and equal figures across runs, across
``--workers 1`` and ``--workers 2`` (a local dask cluster), and after a resume; result.json records the
versions, the seed, the model checksum and the settings.

IBA is used because it is stochastic (seeded noise in the bottleneck): an unseeded or order-dependent
run would show here.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from pipelines.bundle import load_model
from pipelines.cli import main

OUTPUTS = ("heatmap.nii.gz", "lesion_mask.nii.gz", "lung_mask.nii.gz")


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return {r["study"]: {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)}


def _volumes(out: Path, study: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    vols = {}
    for name in OUTPUTS:
        img = nib.load(str(out / study / name))
        vols[name] = (np.asarray(img.dataobj), img.affine)
    return vols


def _assert_identical(a: Path, b: Path, studies: list[str]) -> None:
    assert _rows(a) == _rows(b)
    for study in studies:
        va, vb = _volumes(a, study), _volumes(b, study)
        for name in OUTPUTS:
            assert va[name][0].dtype == vb[name][0].dtype, (study, name)
            assert va[name][0].tobytes() == vb[name][0].tobytes(), (study, name)  # bit for bit
            assert np.array_equal(va[name][1], vb[name][1]), (study, name)
        ra = json.loads((a / study / "result.json").read_text())
        rb = json.loads((b / study / "result.json").read_text())
        for key in ("lesion_percent", "lung_volume_ml", "lesion_volume_ml", "grade", "study_probability", "slices",
                    "fingerprint", "model", "seed", "versions"):
            assert ra[key] == rb[key], (study, key)
        ignore = ("max_memory",)  # the memory budget is shared by the workers
        assert ({k: v for k, v in ra["settings"].items() if k not in ignore}
                == {k: v for k, v in rb["settings"].items() if k not in ignore}), study


def test_runs_workers_and_resume_give_bit_identical_results(tiny_bundle_ungated, tiny_studies, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted(tiny_studies.glob("*.nii.gz"))[1:]:  # two studies with lesions
        shutil.copy(p, inputs / p.name)
    studies = sorted(p.name.removesuffix(".nii.gz") for p in inputs.glob("*.nii.gz"))
    base = ["-q", "run", str(inputs), "--bundle", str(tiny_bundle_ungated), "--method", "iba",
            "--lung-mask", "threshold", "--no-dicom-out", "--param", "iba.steps=2", "--param", "iba.n_samples=2"]
    first, parallel, resumed = (tmp_path / n for n in ("first", "parallel", "resumed"))
    assert main([*base, "--out", str(first)]) == 0
    assert main([*base, "--out", str(parallel), "--workers", "2"]) == 0
    shutil.copytree(first, resumed)  # a run stopped before its last study was written
    last = resumed / studies[-1]
    (last / "result.json").unlink()
    (last / "lesion_mask.nii.gz").write_bytes(b"partial")
    assert main([*base, "--out", str(resumed)]) == 0
    printed = capsys.readouterr().out
    assert "1 already complete (skipped)" in printed
    for other in (parallel, resumed):
        _assert_identical(first, other, studies)

    res = json.loads((first / studies[0] / "result.json").read_text())
    model = load_model(tiny_bundle_ungated)
    assert res["model"]["sha256"] == model.checksum
    assert res["seed"] == 0 and res["settings"]["seed"] == 0
    assert res["settings"]["method"] == "iba" and res["settings"]["lung_mask"] == "threshold"
    assert res["settings"]["bundle"] == str(Path(tiny_bundle_ungated).resolve())
    assert {"ct-severity", "monai", "torch", "numpy", "scipy", "SimpleITK", "python"} <= set(res["versions"])
    assert res["method_params"]["steps"] == 2
    assert any(np.asarray(_volumes(first, s)["lesion_mask.nii.gz"][0]).any() for s in studies)  # masks to compare
