"""Damaged studies through ``ctseverity run``: refused with the reason or graded as the intact study with
warnings in results.csv, result.json and report.html; memory budget and study time limit.

Studies are copies of the real chest CT (every 4th pixel, 3rd slice) graded with ``--method density`` and
the threshold lung mask (no model needed).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_ext.io import load_ct
from monai_ext.transforms import LungMask
from pipelines.cli import main

RUN = ["run", "--method", "density", "--lung-mask", "threshold"]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return {r["study"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def damaged(small_real_ct, tmp_path_factory) -> Path:
    """The intact study, copies with every third slice NaN, with a blank slice and with a few NaN voxels in the
    lungs."""
    vol, affine = small_real_ct
    folder = tmp_path_factory.mktemp("damaged")
    nib.save(nib.Nifti1Image(vol, affine), str(folder / "intact.nii.gz"))
    slices = vol.astype(np.float32)
    slices[:, :, ::3] = np.nan
    nib.save(nib.Nifti1Image(slices, affine), str(folder / "nan_slices.nii.gz"))
    few = vol.astype(np.float32)
    lung = np.asarray(LungMask(backend="threshold")(load_ct(folder / "intact.nii.gz", orientation=None))[0]) > 0
    xs, ys, zs = np.nonzero(lung)
    pick = np.random.default_rng(1).choice(xs.size, 200, replace=False)
    few[xs[pick], ys[pick], zs[pick]] = np.nan
    nib.save(nib.Nifti1Image(few, affine), str(folder / "nan_voxels.nii.gz"))
    blank = vol.copy()
    blank[:, :, 20] = 0  # a slice lost in conversion
    nib.save(nib.Nifti1Image(blank, affine), str(folder / "blank_slice.nii.gz"))
    return folder


def test_damaged_studies_are_refused_or_graded_as_the_intact_one_with_warnings(damaged, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([*RUN, str(damaged), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1  # one study failed
    rows = _rows(out)
    assert rows["nan_slices"]["status"] == "failed"
    assert rows["nan_slices"]["error"] == ("15 of 47 slices lost (31.9 %: blank or no finite value); at most 5 % are "
                                           "interpolated")
    assert not (out / "nan_slices" / "result.json").exists()
    intact = rows["intact"]
    assert intact["status"] == "ok" and intact["warnings"] == ""
    for name, warning in (("nan_voxels", "NaN/infinite voxels inside the body"), ("blank_slice", "1 lost slice")):
        repaired = rows[name]
        assert repaired["status"] == "ok" and repaired["grade"] == intact["grade"]
        assert abs(float(repaired["lesion_percent"]) - float(intact["lesion_percent"])) < 1.0
        assert abs(float(repaired["lung_volume_ml"]) / float(intact["lung_volume_ml"]) - 1) < 0.01
        assert warning in repaired["warnings"]
    result = json.loads((out / "nan_voxels" / "result.json").read_text())
    assert result["warnings"] and "; ".join(result["warnings"]) == rows["nan_voxels"]["warnings"]
    assert result["warnings"][0] == "200 NaN/infinite voxels inside the body (0.07 % of it, on 34 slices) filled by " \
                                    "interpolation between slices"
    assert json.loads((out / "intact" / "result.json").read_text())["warnings"] == []
    report = (out / "report.html").read_text()
    assert report.count("<tr class='warned'>") == 2 and "ok, with warnings" in report
    assert "graded with warnings" in report
    assert "warning: nan_voxels: " in printed


def test_memory_budget_refuses_the_study_before_reading(damaged, tmp_path):
    out = tmp_path / "out"
    code = main([*RUN, str(damaged / "intact.nii.gz"), "--out", str(out), "--max-memory", "10M"])
    assert code == 1
    error = _rows(out)["intact"]["error"]
    assert "declares a 128x128x47 int16 image" in error and "memory budget of 10.0 MB (--max-memory)" in error


def test_study_timeout_fails_the_study_and_the_batch_goes_on(damaged, tmp_path):
    out = tmp_path / "out"
    code = main([*RUN, str(damaged / "intact.nii.gz"), str(damaged / "nan_voxels.nii.gz"), "--out", str(out),
                 "--study-timeout", "0.001"])
    assert code == 1
    rows = _rows(out)
    assert set(rows) == {"intact", "nan_voxels"}
    for name, row in rows.items():
        assert row["status"] == "failed"
        assert row["error"].startswith("took longer than the time limit of 0.001 s per study (--study-timeout)")
        assert not (out / name / "result.json").exists()
    code = main([*RUN, str(damaged / "intact.nii.gz"), "--out", str(out), "--study-timeout", "600"])
    assert code == 0 and _rows(out)["intact"]["status"] == "ok"


def test_study_timeout_stops_a_reader_that_hangs(tmp_path):
    """A named pipe that never delivers data, listed in a manifest: reading it blocks in open(), which no check
    between stages could stop. Under --study-timeout the read runs in a child process, killed at the limit."""
    fifo = tmp_path / "hang.nii.gz"
    os.mkfifo(fifo)
    manifest = tmp_path / "studies.csv"
    manifest.write_text(f"path,study\n{fifo},hang\n")
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert main([*RUN, str(manifest), "--out", str(out), "--study-timeout", "2"]) == 1
    assert time.monotonic() - t0 < 60
    row = _rows(out)["hang"]
    assert row["status"] == "failed" and row["error"] == (
        "took longer than the time limit of 2 s per study (--study-timeout); stopped at reading the input (the "
        "reader was stopped)")
    assert not (out / "hang" / "result.json").exists()


def test_bad_limits_are_usage_errors(damaged, tmp_path, capsys):
    assert main([*RUN, str(damaged / "intact.nii.gz"), "--out", str(tmp_path), "--max-memory", "lots"]) == 2
    assert "not a memory size: 'lots'" in capsys.readouterr().err
    assert main([*RUN, str(damaged / "intact.nii.gz"), "--out", str(tmp_path), "--study-timeout", "0"]) == 2
    assert "time limit must be positive" in capsys.readouterr().err


def test_huge_header_is_one_line_before_any_allocation(tmp_path, capsys):
    import SimpleITK as sitk

    path = tmp_path / "huge.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 64, 64), -1000, np.int16)), str(path), True)  # compressed
    path.write_bytes(path.read_bytes().replace(b"DimSize = 64 64 20", b"DimSize = 30000 30000 3000"))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "allocate" not in err
    assert err.startswith(f"ctseverity inspect: error: {path}: the header declares a 30000x30000x3000 int16 image: "
                          "processing it needs about 117.9 TB, more than the memory budget of")
    assert err.endswith("(--max-memory); the file is 1.0 kB")


def test_inspect_lists_what_was_repaired(damaged, capsys):
    assert main(["inspect", "--lung", "--lung-mask", "threshold", str(damaged / "blank_slice.nii.gz"),
                 str(damaged / "intact.nii.gz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln for ln in lines if ln.startswith("warning:")] == [
        "warning: blank_slice: 1 lost slice (blank or no finite value) at index 20 filled by interpolation between "
        "their neighbours"]
