"""``ctseverity synth``: studies, masks and truth.csv on disk; grades; bad input."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from monai_ext.data import grade_from_percent, synthetic_chest_ct
from monai_ext.data.studies import TRUTH_COLUMNS, study_name
from pipelines.cli import main

SMALL = ["--shape", "64,64,24", "--spacing", "6,6,12"]


def read_truth(folder):
    with open(folder / "truth.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(
    ("percent", "grade"),
    [
        (0, "CT-0"),
        (0.01, "CT-1"),
        (25, "CT-1"),
        (25.001, "CT-2"),
        (50, "CT-2"),
        (50.5, "CT-3"),
        (74.99, "CT-3"),
        (75, "CT-4"),
        (100, "CT-4"),
    ],
)
def test_grade_from_percent(percent, grade):
    assert grade_from_percent(percent) == grade


@pytest.mark.parametrize("bad", [-1, 100.5, float("nan"), "abc", None])
def test_grade_from_percent_rejects(bad):
    with pytest.raises(ValueError, match="lesion percent"):
        grade_from_percent(bad)


def test_synth_writes_studies_masks_and_truth(tmp_path):
    out = tmp_path / "synth"
    rc = main(["-q", "synth", "--out", str(out), "--fractions", "0,5,40", "--seed", "2", "--masks", *SMALL])
    assert rc == 0
    rows = read_truth(out)
    assert list(rows[0]) == list(TRUTH_COLUMNS)
    assert [r["study"] for r in rows] == ["synth_000_f00", "synth_001_f05", "synth_002_f40"]
    assert [r["grade"] for r in rows] == ["CT-0", "CT-1", "CT-2"]
    for row, asked in zip(rows, (0, 5, 40)):
        pct = float(row["lesion_percent"])
        assert abs(pct - asked) <= 1.0 and row["grade"] == grade_from_percent(pct)
        img = nib.load(str(out / f"{row['study']}.nii.gz"))
        assert img.shape == (64, 64, 24)
        assert img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.header.get_zooms(), (6.0, 6.0, 12.0))
        np.testing.assert_allclose(np.diag(img.affine)[:3], (-6.0, -6.0, 12.0))  # LPS grid, RAS affine
        data = np.asarray(img.dataobj)
        assert data.min() >= -1024 and data.max() > 300
        lesion = np.asarray(nib.load(str(out / f"{row['study']}_lesion.nii.gz")).dataobj)
        lung = np.asarray(nib.load(str(out / f"{row['study']}_lung.nii.gz")).dataobj)
        assert set(np.unique(lung).tolist()) == {0, 1, 2}
        assert not np.any((lesion > 0) & (lung == 0))
        assert abs(100.0 * (lesion > 0).sum() / (lung > 0).sum() - pct) < 1e-3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # same seed, same studies
    again = tmp_path / "again"
    assert main(["-q", "synth", "--out", str(again), "--fractions", "5", "--seed", "3", *SMALL]) == 0
    a = np.asarray(nib.load(str(again / "synth_000_f05.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(out / "synth_001_f05.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)


def test_synth_into_a_base_ct(tmp_path):
    ct = synthetic_chest_ct((96, 96, 40), (4.0, 4.0, 8.0), seed=7)
    # store the base in RAS voxel order, so the insertion has to reorient it and come back
    data = np.rint(ct.image[::-1, ::-1, :]).astype(np.int16)
    affine = ct.affine.copy()
    affine[:3, :2] *= -1
    affine[:3, 3] = ct.affine[:3, :3] @ [95, 95, 0] + ct.affine[:3, 3]
    base = tmp_path / "base.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(base))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    out = tmp_path / "semi"
    rc = main(["-q", "synth", "--out", str(out), "--fractions", "0,30", "--base", str(base), "--masks"])
    assert rc == 0
    rows = read_truth(out)
    assert [r["grade"] for r in rows] == ["CT-0", "CT-2"]
    assert abs(float(rows[1]["lesion_percent"]) - 30) <= 1.0 and rows[1]["source"] == str(base)
    img = nib.load(str(out / "synth_001_f30.nii.gz"))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert img.shape == data.shape
    unchanged = np.asarray(nib.load(str(out / "synth_000_f00.nii.gz")).dataobj)
    np.testing.assert_array_equal(unchanged, data)
    lesion = np.asarray(nib.load(str(out / "synth_001_f30_lesion.nii.gz")).dataobj)
    # the lesions lean posterior: in RAS voxel order, posterior is the low y index
    ys = np.nonzero(lesion)[1]
    lung_ys = np.nonzero(np.asarray(nib.load(str(out / "synth_001_f30_lung.nii.gz")).dataobj))[1]
    assert ys.mean() < lung_ys.mean()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--fractions", "0,120"], ["--fractions", "120", "0..100"]),
        (["--fractions", "5,abc"], ["--fractions", "abc"]),
        (["--shape", "64,64"], ["--shape"]),
        (["--shape", "64,64,2"], ["--shape", "8"]),
        (["--spacing", "1,0,2"], ["--spacing"]),
        (["--base", "no/such/ct.nii.gz"], ["no/such/ct.nii.gz"]),
        (["--base", "x.nii.gz", "--shape", "64,64,24"], ["--base"]),
    ],
)
def test_synth_bad_input(tmp_path, capsys, args, words):
    rc = main(["synth", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("ctseverity synth: error:") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err
    assert not (tmp_path / "o" / "truth.csv").exists()


def test_study_names():
    assert study_name(0, 5) == "synth_000_f05"
    assert study_name(12, 100) == "synth_012_f100"
    assert study_name(1, 2.5) == "synth_001_f02p5"
