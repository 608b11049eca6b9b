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


def test_folder_of_links_to_dicom_series_with_a_loop(tmp_path, small_real_ct, ct_series, capsys):
    from pipelines.cli import main

    slices = [(i, 6.0 * i) for i in range(0, 47, 4)]  # 12 slices of the real CT
    archive = tmp_path / "archive"
    ct_series(small_real_ct[0], archive / "series_a", slices)
    ct_series(small_real_ct[0], archive / "series_b", slices, uid="1.2.826.0.1.3680043.2.1125.78")
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "patient1").symlink_to(archive / "series_a", target_is_directory=True)
    (studies / "patient2").symlink_to(archive / "series_b", target_is_directory=True)
    (studies / "again").symlink_to(archive / "series_a", target_is_directory=True)  # the same series twice
    (studies / "patient2" / "loop").symlink_to(studies, target_is_directory=True)  # back to the top: a loop
    found = find_studies([studies])
    assert [(s.study, s.path) for s in found] == [("again", str(studies / "again")),
                                                  ("patient2", str(studies / "patient2"))]
    assert main(["inspect", str(studies)]) == 0
    table = capsys.readouterr().out
    assert "again" in table and "patient2" in table and "128x128x12" in table


def test_link_to_a_folder_of_studies(tmp_path):
    (tmp_path / "real").mkdir()
    _img(tmp_path / "real" / "one.nii.gz")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "top" / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    assert [s.study for s in find_studies([tmp_path / "top"])] == ["one"]
