"""Finding studies in files, DICOM folders, folders of studies and manifests."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from monai_ext.errors import CTSeverityError, InputNotFoundError
from pipelines.discovery import find_studies


def _img(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 4), np.int16)), str(path))


def test_folder_of_studies_recursive_skips_masks_and_outputs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    _img(tmp_path / "one.nii.gz")
    _img(tmp_path / "one_lesion.nii.gz")
    _img(tmp_path / "one_lung.nii.gz")
    _img(tmp_path / "a" / "two.nrrd")
    _img(tmp_path / "a" / "deep" / "heatmap.nii.gz")
    dcm = tmp_path / "a" / "series"
    dcm.mkdir()
    for i in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.int16)), str(dcm / f"{i}.dcm"))
    studies = find_studies([tmp_path])
    assert [s.study for s in studies] == ["series", "two", "one"]  # sorted by path
    assert studies[0].path == str(dcm)


def test_files_manifest_duplicates_and_unique_names(tmp_path):
    (tmp_path / "x").mkdir()
    _img(tmp_path / "s.nii.gz")
    _img(tmp_path / "x" / "s.nii.gz")
    (tmp_path / "m.csv").write_text("path\ns.nii.gz\nx/s.nii.gz\n")
    studies = find_studies([tmp_path / "s.nii.gz", tmp_path / "m.csv"])
    assert [s.study for s in studies] == ["s", "s_1"]  # the same file twice counts once


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputNotFoundError, match="nope"):
        find_studies([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTSeverityError, match="no CT study found"):
        find_studies([tmp_path / "empty"])
