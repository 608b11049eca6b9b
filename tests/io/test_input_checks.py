"""Damaged input is repaired with a warning or refused with its reason, never read silently wrong.

Every case is built in a temporary folder from the real chest CT (every 4th pixel, 3rd slice: 128x128x47).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_ext.errors import DamagedImageError, InputTooLargeError, NotAVolumeError
from monai_ext.io import load_ct, read_ct
from monai_ext.io.checks import InputReport, lung_extent_warnings, parse_memory
from monai_ext.transforms import LungMask


def _nifti(vol: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


@pytest.fixture(scope="module")
def slab(small_real_ct):
    """40 slices of the real CT (6 mm apart) and their DICOM positions."""
    vol = small_real_ct[0][:, :, :40]
    return vol, [(i, 6.0 * i) for i in range(40)]


# ----------------------------------------------------------------------------------------------
# NaN and infinite voxels


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_every_third_slice_nan_is_refused(tmp_path, small_real_ct, suffix):
    vol, affine = small_real_ct
    bad = vol.astype(np.float32)
    bad[:, :, ::3] = np.nan
    path = tmp_path / f"nan_slices{suffix}"
    if suffix == ".nii.gz":  # SimpleITK's NIfTI reader turns these NaN into 0 HU: found in the file itself
        _nifti(bad, affine, path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(bad.T.copy()), str(path))
    with pytest.raises(DamagedImageError) as exc:
        load_ct(path)
    assert str(exc.value) == (f"{path}: 15 of 47 slices lost (31.9 %: blank or no finite value); at most 5 % are "
                              "interpolated")


def test_few_nan_voxels_in_the_body_are_interpolated(tmp_path, small_real_ct):
    vol, affine = small_real_ct
    damaged = vol.astype(np.float32)
    xs, ys = np.nonzero(vol[32:96, 32:96, 20] > -500)  # tissue in the middle of the chest on slice 20
    xs, ys = xs + 32, ys + 32
    pick = np.random.default_rng(0).choice(len(xs), 150, replace=False)
    damaged[xs[pick], ys[pick], 20] = np.nan
    damaged[xs[pick[:10]], ys[pick[:10]], 20] = np.inf
    ct, report = read_ct(_nifti(damaged, affine, tmp_path / "few_nan.nii.gz"), orientation=None)
    got = ct[0].numpy()[xs[pick], ys[pick], 20]
    expected = (vol[xs[pick], ys[pick], 19].astype(np.float32) + vol[xs[pick], ys[pick], 21]) / 2
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.isfinite(ct.numpy()).all()
    assert report.repaired is not None and int(report.repaired.sum()) == 150
    assert any("150 NaN/infinite voxels inside the body" in w and "interpolation" in w for w in report.warnings)
    untouched = np.ones(vol.shape, bool)
    untouched[xs[pick], ys[pick], 20] = False
    np.testing.assert_array_equal(ct[0].numpy()[untouched], vol[untouched])


def test_nan_outside_the_field_of_view_becomes_air(tmp_path, small_real_ct):
    vol, affine = small_real_ct
    damaged = vol.astype(np.float32)
    x, y = np.meshgrid(np.arange(128) - 63.5, np.arange(128) - 63.5, indexing="ij")
    outside = x**2 + y**2 > 63**2
    damaged[outside] = np.nan
    ct, report = read_ct(_nifti(damaged, affine, tmp_path / "fov.nii.gz"), orientation=None)
    assert (ct[0].numpy()[outside] == -1000).all()
    assert int(report.repaired.sum()) == 0
    assert report.warnings == [f"{int(outside.sum()) * 47} NaN/infinite voxels outside the body filled (air, -1000 HU, "
                               "where their column holds no value)"]


def test_repaired_share_of_the_lung_is_limited():
    lung = np.zeros((20, 20, 10), bool)
    lung[5:15, 5:15, 2:8] = True  # 600 voxels
    report = InputReport(path="study.nii.gz", repaired=np.zeros_like(lung))
    report.repaired[5, 5:8, 2] = True  # 3 voxels: 0.5 %
    report.check_lung(lung)
    assert report.warnings and "0.50 % of the lung" in report.warnings[0]
    report.repaired[6, 5:15, 2] = True  # 13 voxels: 2.2 %
    with pytest.raises(DamagedImageError, match=r"study.nii.gz: 2.2 % of the lung voxels were NaN"):
        report.check_lung(lung)


# ----------------------------------------------------------------------------------------------
# DICOM slices: missing, duplicated, uneven


def test_one_missing_slice_is_interpolated(tmp_path, slab, ct_series):
    vol, slices = slab
    intact = load_ct(ct_series(vol, tmp_path / "intact", slices))
    ct, report = read_ct(ct_series(vol, tmp_path / "gap", slices[:20] + slices[21:]))
    assert ct.shape == intact.shape and float(ct.pixdim[2]) == pytest.approx(6.0)
    np.testing.assert_allclose(ct.affine.numpy(), intact.affine.numpy(), atol=1e-4)
    a, b = ct[0].numpy(), intact[0].numpy()
    others = [k for k in range(40) if k != 20]
    np.testing.assert_allclose(a[:, :, others], b[:, :, others], atol=1e-3)
    np.testing.assert_allclose(a[:, :, 20], (b[:, :, 19] + b[:, :, 21]) / 2, atol=1e-3)
    assert report.warnings == ["1 missing slice (gaps after 114 mm) filled by interpolation between their "
                               "neighbours, the series resampled to an even 6 mm slice step"]


def test_too_many_missing_slices_are_refused(tmp_path, slab, ct_series):
    vol, slices = slab
    run = ct_series(vol, tmp_path / "run", slices[:20] + slices[23:])
    with pytest.raises(DamagedImageError, match=r"run: 3 slices missing in a row: a gap of 24 mm between 114 mm"):
        load_ct(run)
    scattered = ct_series(vol, tmp_path / "scattered", [s for i, s in enumerate(slices) if i not in (5, 12, 25)])
    with pytest.raises(DamagedImageError, match=r"3 of 40 slices missing \(7.5 %, in 3 gaps\); at most 5 %"):
        load_ct(scattered)


def test_duplicated_slices(tmp_path, slab, ct_series):
    vol, slices = slab
    ct, report = read_ct(ct_series(vol, tmp_path / "dup", [*slices, slices[10]]))
    assert ct.shape[-1] == 40 and float(ct.pixdim[2]) == pytest.approx(6.0)
    np.testing.assert_allclose(ct[0].numpy(), load_ct(ct_series(vol, tmp_path / "ok", slices))[0].numpy(), atol=1e-3)
    assert len(report.warnings) == 1 and "1 duplicated slice (same position and pixels) removed" in report.warnings[0]
    clash = ct_series(vol, tmp_path / "clash", [*slices, (30, 60.0)])  # other pixels at slice 10's position
    with pytest.raises(DamagedImageError, match=r"clash: two different slices at the same position 60 mm"):
        load_ct(clash)


def test_uneven_spacing_is_resampled_to_the_median_step(tmp_path, slab, ct_series):
    vol, _ = slab
    z = np.cumsum([0.0] + [5.0 if k % 2 == 0 else 7.0 for k in range(39)])  # 20 steps of 5 mm, 19 of 7 mm
    ct, report = read_ct(ct_series(vol, tmp_path / "uneven", [(i, float(z[i])) for i in range(40)]), orientation=None)
    assert float(ct.pixdim[2]) == pytest.approx(5.0)
    assert ct.shape[-1] == round(z[-1] / 5.0) + 1
    assert ct.meta["sitk_origin"][2] == pytest.approx(0.0)
    assert report.warnings == ["uneven slice spacing (5 mm to 7 mm): the series resampled to an even 5 mm slice "
                               "step by interpolation between slices"]
    np.testing.assert_allclose(ct[0].numpy()[:, :, 0], vol[:, :, 0], atol=1e-3)  # the first slice is kept
    np.testing.assert_allclose(ct[0].numpy()[:, :, 1], vol[:, :, 1], atol=1e-3)  # 5 mm: the second one


# ----------------------------------------------------------------------------------------------
# headers: 4D, sizes that do not fit the file or the memory budget


def test_4d_image_message_names_its_shape(tmp_path):
    vol = np.full((128, 128, 40, 3), -1000, np.int16)
    with pytest.raises(NotAVolumeError, match=r"is a 4D image \(128x128x40x3: several volumes"):
        load_ct(_nifti(vol, np.eye(4), tmp_path / "four.nii.gz"))


def _patched_header(tmp_path: Path, dims: tuple[int, int, int]) -> bytes:
    """A small int16 NIfTI whose header declares ``dims``."""
    path = _nifti(np.zeros((64, 64, 8), np.int16), np.eye(4), tmp_path / "small.nii")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
    return bytes(raw)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_declaring_more_than_the_file_holds_is_refused(tmp_path, suffix):
    raw = _patched_header(tmp_path, (30000, 30000, 3000))
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    with pytest.raises(InputTooLargeError) as exc:
        load_ct(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)) and "declares a 30000x30000x3000 int16 image (4.9 TB of voxel data)" in msg
    assert "the file holds 64.0 kB of data" in msg and "truncated file or wrong header" in msg


def test_truncated_file_is_refused(tmp_path):
    raw = _patched_header(tmp_path, (64, 64, 8))
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) // 2])  # SimpleITK would read it, the missing half as zeros
    with pytest.raises(InputTooLargeError, match=r"declares a 64x64x8 int16 image \(64.0 kB of voxel data\) but the "
                                                 r"file holds 31.8 kB of data \(32.2 kB on disk\)"):
        load_ct(path)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_truncated_mha_and_nrrd_are_refused(tmp_path, small_real_ct, suffix):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(small_real_ct[0].T.copy()), str(path), False)  # uncompressed
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(InputTooLargeError, match=r"declares a 128x128x47 int16 image \(1540096 bytes of voxel data\) "
                                                 r"but the file holds 1536000 bytes of data"):
        load_ct(path)


def test_memory_budget(tmp_path, small_real_ct, slab, ct_series):
    path = _nifti(*small_real_ct, tmp_path / "ct.nii.gz")
    with pytest.raises(InputTooLargeError, match=r"128x128x47 int16 image: processing it needs about 35.2 MB, more "
                                                 r"than the memory budget of 10.0 MB \(--max-memory\)"):
        load_ct(path, max_bytes=10 << 20)
    assert load_ct(path, max_bytes=40 << 20).shape == (1, 128, 128, 47)
    series = ct_series(slab[0], tmp_path / "series", slab[1])
    with pytest.raises(InputTooLargeError, match=r"series: the header declares a 128x128x40 int16 image"):
        load_ct(series, max_bytes=10 << 20)


def test_parse_memory():
    assert parse_memory("8G") == 8 << 30
    assert parse_memory("512MB") == 512 << 20
    assert parse_memory("1.5g") == int(1.5 * (1 << 30))
    assert parse_memory("2GiB") == 2 << 30
    for bad in ("lots", "-1G", "0", "G"):
        with pytest.raises(ValueError):
            parse_memory(bad)


# ----------------------------------------------------------------------------------------------
# lung at the volume's edge


def test_series_cut_short_through_the_lung_is_warned(tmp_path, small_real_ct):
    vol, affine = small_real_ct
    ct = load_ct(_nifti(vol, affine, tmp_path / "whole.nii.gz"))
    lung = np.asarray(LungMask(backend="threshold")(ct)[0]) > 0
    spacing = ct.pixdim.tolist()
    assert lung_extent_warnings(lung, spacing) == []  # the whole chest
    cut = lung[:, :, :20]  # ends in the middle of the lung
    warnings = lung_extent_warnings(cut, spacing)
    assert any(w.startswith("the lung reaches the last slice of the volume") for w in warnings), warnings
    tiny = lung_extent_warnings(lung, [s / 10 for s in spacing])  # a header with voxels 10 times too small
    assert any("lung volume 6 ml is implausible" in w for w in tiny), tiny


def test_nifti_qform_and_sform_that_disagree_are_warned(tmp_path, small_real_ct):
    vol, affine = small_real_ct
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine @ np.diag([1.0, 1.0, 0.5, 1.0]), code=1)  # 3 mm slices in the qform, 6 mm in the sform
    img.set_sform(affine, code=1)
    nib.save(img, str(tmp_path / "forms.nii.gz"))
    ct, report = read_ct(tmp_path / "forms.nii.gz")
    assert float(ct.pixdim[2]) == pytest.approx(3.0)  # SimpleITK takes the qform here, nibabel the sform
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("the NIfTI header's qform and sform disagree (voxel size 3.91x3.91x3 vs "
                                         "3.91x3.91x6 mm")
    assert report.warnings[0].endswith("read with the qform (check which is right)")
    assert read_ct(_nifti(vol, affine, tmp_path / "agree.nii.gz"))[1].warnings == []


def test_spacing_tag_that_disagrees_with_the_positions_is_warned(tmp_path, slab, ct_series):
    vol, slices = slab
    folder = ct_series(vol[:, :, :6], tmp_path / "tag", slices[:6])
    for f in sorted(folder.iterdir()):  # the header says 3 mm between slices, the positions 6 mm
        img = sitk.ReadImage(str(f))
        img.SetSpacing((*img.GetSpacing()[:2], 3.0))  # GDCM writes the tag from the third spacing
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(f))
        writer.Execute(img)
    ct, report = read_ct(folder)
    assert float(ct.pixdim[2]) == pytest.approx(6.0)
    assert report.warnings == ["the header's Spacing Between Slices (3 mm) disagrees with the slice positions "
                               "(6 mm apart): the positions are used"]


def test_lost_slices_are_missing_slices(tmp_path, small_real_ct):
    vol, affine = small_real_ct
    one = vol.copy()
    one[:, :, 20] = 0  # a slice lost in conversion: a single value
    ct, report = read_ct(_nifti(one, affine, tmp_path / "one.nii.gz"), orientation=None)
    expected = (vol[:, :, 19].astype(np.float32) + vol[:, :, 21]) / 2
    np.testing.assert_allclose(ct[0].numpy()[:, :, 20], expected, atol=1e-3)
    np.testing.assert_array_equal(ct[0].numpy()[:, :, 21:], vol[:, :, 21:])
    assert report.warnings == ["1 lost slice (blank or no finite value) at index 20 filled by interpolation between "
                               "their neighbours"]
    assert report.repaired is None  # not counted as repaired voxels of the lung
    nan = vol.astype(np.float32)
    nan[:, :, [10, 30]] = np.nan  # two slices without a finite value, as a float NIfTI
    ct, report = read_ct(_nifti(nan, affine, tmp_path / "nan.nii.gz"), orientation=None)
    assert np.isfinite(ct.numpy()).all() and report.warnings[0].startswith("2 lost slices (blank or no finite value) "
                                                                           "at index 10, 30 filled")
    run = vol.copy()
    run[:, :, 20:23] = -1024
    with pytest.raises(DamagedImageError, match=r"run.nii.gz: 3 slices lost in a row \(index 20 to 22: blank or no "
                                                r"finite value\); at most 2 in a row are interpolated"):
        load_ct(_nifti(run, affine, tmp_path / "run.nii.gz"))
    three = vol.copy()
    three[:, :, [10, 20, 30]] = 0
    lost = r"3 of 47 slices lost \(6.4 %: blank or no finite value\); at most 5 %"
    with pytest.raises(DamagedImageError, match=lost):
        load_ct(_nifti(three, affine, tmp_path / "three.nii.gz"))
    padded = vol.copy()
    padded[:, :, :3] = -1024  # blank slices at the ends are padding, not lost data
    assert read_ct(_nifti(padded, affine, tmp_path / "padded.nii.gz"))[1].warnings == []


def test_values_off_the_hounsfield_scale(tmp_path, small_real_ct, slab, ct_series):
    """A wrong rescale or scale factor (the damaged-corpus script found these graded silently): the whole volume
    off the scale is refused; slices on another scale are lost slices (interpolated or refused)."""
    import pydicom

    from monai_ext.errors import NotCTError

    vol, affine = small_real_ct
    hu = vol.astype(np.float32)
    with pytest.raises(NotCTError, match=r"most common value is -(19|20|21)\d0 HU, where air is -1000 HU: a wrong"):
        load_ct(_nifti(2 * hu, affine, tmp_path / "scl_slope_2.nii.gz"))  # scl_slope 2 on HU values
    # a sharp kernel's noise stored unclipped (60 HU: a tenth of the voxels below -1100 HU) is on the scale
    noisy = hu + np.random.default_rng(0).normal(0.0, 60.0, hu.shape).astype(np.float32) - 30.0
    assert (noisy < -1100).mean() > 0.05
    assert read_ct(_nifti(noisy, affine, tmp_path / "noisy.nii.gz"))[1].warnings == []
    with pytest.raises(NotCTError, match=r"the body's most common value is 8\d0 HU .*wrong rescale slope"):
        load_ct(_nifti(2 * hu + 1024, affine, tmp_path / "slope_2.nii.gz"))  # Rescale Slope 2 on HU + 1024
    one = hu.copy()
    one[:, :, 20] += 1024  # Rescale Intercept 0 instead of -1024 on one slice
    ct, report = read_ct(_nifti(one, affine, tmp_path / "one.nii.gz"), orientation=None)
    np.testing.assert_allclose(ct[0].numpy()[:, :, 20], (hu[:, :, 19] + hu[:, :, 21]) / 2, atol=1e-3)
    assert report.warnings == ["1 lost slice (on another intensity scale: a wrong rescale in their headers?) at index "
                               "20 filled by interpolation between their neighbours"]
    series = ct_series(slab[0], tmp_path / "dicom", slab[1])
    for f in sorted(series.iterdir())[18:21]:  # Rescale Intercept 1024 instead of 0 on three slices in a row
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = 1024
        ds.save_as(f)
    with pytest.raises(DamagedImageError, match=r"3 slices lost in a row \(index 18 to 20: on another intensity "
                                                r"scale: a wrong rescale in their headers\?\)"):
        load_ct(series)
    intact = read_ct(ct_series(slab[0], tmp_path / "intact", slab[1]))[1]
    assert intact.warnings == []
