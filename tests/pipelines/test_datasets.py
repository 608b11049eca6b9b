"""Labelled study discovery (grade folders, CSV manifest, truth.csv), the split and slice labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_ext.errors import CTSeverityError, InputNotFoundError
from pipelines.datasets import discover_labeled, label_from_grade, slice_labels_from_mask, split_studies


def _touch_nifti(path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(path))


def test_grade_folders_with_masks_beside(tmp_path):
    for grade, names in {"CT-0": ["a", "b"], "CT-1": ["c"], "CT-3": ["d"]}.items():
        (tmp_path / grade).mkdir()
        for n in names:
            _touch_nifti(tmp_path / grade / f"study_{n}.nii.gz")
    _touch_nifti(tmp_path / "CT-1" / "study_c_mask.nii.gz")
    recs = discover_labeled(tmp_path)
    assert [(r.study, r.label, r.grade) for r in recs] == [
        ("study_a", 0, "CT-0"), ("study_b", 0, "CT-0"), ("study_c", 1, "CT-1"), ("study_d", 1, "CT-3")]
    assert recs[2].mask.endswith("study_c_mask.nii.gz") and recs[0].mask is None


def test_csv_manifest_and_truth_csv(tmp_path):
    _touch_nifti(tmp_path / "x.nii.gz")
    _touch_nifti(tmp_path / "y.nii.gz")
    (tmp_path / "list.csv").write_text("path,grade\nx.nii.gz,CT-0\ny.nii.gz,CT-2\n")
    recs = discover_labeled(tmp_path / "list.csv")
    assert [(r.study, r.label) for r in recs] == [("x", 0), ("y", 1)]
    (tmp_path / "truth.csv").write_text("study,lesion_percent,grade\nx,0.0,CT-0\ny,31.5,CT-2\n")
    _touch_nifti(tmp_path / "y_lesion.nii.gz")
    recs = discover_labeled(tmp_path)
    assert [(r.study, r.label, r.lesion_percent) for r in recs] == [("x", 0, 0.0), ("y", 1, 31.5)]
    assert recs[1].mask.endswith("y_lesion.nii.gz")


def test_bad_datasets_are_clear_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        discover_labeled(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTSeverityError, match="no labelled studies"):
        discover_labeled(tmp_path / "empty")
    (tmp_path / "bad.csv").write_text("path\nx.nii.gz\n")
    with pytest.raises(CTSeverityError, match="label"):
        discover_labeled(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("path,label\nnot_there.nii.gz,1\n")
    with pytest.raises(InputNotFoundError, match="not_there"):
        discover_labeled(tmp_path / "gone.csv")
    with pytest.raises(ValueError, match="grade"):
        label_from_grade("severe")


def test_split_is_stratified_disjoint_and_seeded():
    from pipelines.datasets import StudyRecord

    recs = [StudyRecord(f"s{i:02d}", f"/x/s{i}.nii.gz", int(i % 3 != 0)) for i in range(30)]
    tr, va = split_studies(recs, 0.3, seed=0)
    assert {r.study for r in tr}.isdisjoint({r.study for r in va})
    assert len(tr) + len(va) == 30 and len(va) == 9
    assert sum(r.label for r in va) == 6 and sum(1 - r.label for r in va) == 3  # 30 % of each class
    tr2, va2 = split_studies(list(reversed(recs)), 0.3, seed=0)
    assert [r.study for r in va2] == [r.study for r in va]  # order of the input does not matter
    _, va3 = split_studies(recs, 0.3, seed=1)
    assert [r.study for r in va3] != [r.study for r in va]


def test_slice_labels_from_lesion_mask():
    lung = torch.zeros(10, 10, 4, dtype=torch.uint8)
    lung[:, :, :] = 1  # 100 lung pixels per slice
    mask = torch.zeros_like(lung)
    mask[0:3, 0:3, 1] = 1  # 9 % of slice 1
    mask[0, 0, 2] = 1  # 1 pixel = 1 %: positive at min_fraction 0.01
    labels = slice_labels_from_mask(mask, lung, torch.arange(4), min_fraction=0.02)
    assert labels.tolist() == [0, 1, -1, 0]  # slice 2 is ambiguous at 2 %
