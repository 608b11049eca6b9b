"""Loading CT with its geometry (NIfTI, NRRD, DICOM) and writing results back on the input grid."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, EnsureTyped, LoadImage, LoadImaged, Orientationd, ScaleIntensityRanged

from monai_ext.errors import (
    CorruptImageError,
    InputNotFoundError,
    NoDicomSeriesError,
    NotAnImageError,
    NotAVolumeError,
    NotCTError,
)
from monai_ext.io import SITKReader, load_ct, reference_grid, to_reference_grid, write_like


def _ct_volume(shape=(40, 36, 12), seed=0) -> np.ndarray:
    """A small CT-like volume in HU (air, soft tissue, lung-like ellipses), (x, y, z)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    vol = np.full(shape, -1000.0)
    vol[(x**2 / 0.8 + y**2 / 0.6) < 1] = 40.0
    vol[((x - 0.35) ** 2 / 0.07 + y**2 / 0.2 + z**2 / 1.5) < 1] = -850.0
    vol[((x + 0.35) ** 2 / 0.07 + y**2 / 0.2 + z**2 / 1.5) < 1] = -850.0
    return (vol + rng.normal(0, 10, shape)).astype(np.int16)


def _write_dicom_series(vol_xyz: np.ndarray, folder: Path, spacing=(0.8, 0.8, 2.5), origin=(-20.0, -15.0, 30.0),
                        series_uid="1.2.826.0.1.3680043.2.1125.1", shuffle=True) -> list[Path]:
    """Write a real DICOM series, one file per slice, with geometry tags (SimpleITK's GDCM writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = vol_xyz.shape[2]
    order = np.random.default_rng(1).permutation(n) if shuffle else np.arange(n)
    paths = []
    for k, i in enumerate(order):  # file names deliberately not in slice order
        sl = sitk.GetImageFromArray(vol_xyz[:, :, i].T[None].astype(np.int16))
        sl.SetSpacing(spacing)
        pos = (origin[0], origin[1], origin[2] + i * spacing[2])
        sl.SetOrigin(pos)
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing[2]),
            "0028|1052": "0",
            "0028|1053": "1",
            "0008|0018": f"{series_uid}.{i + 1}",
        }.items():
            sl.SetMetaData(tag, value)
        path = folder / f"img{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# real data


def test_real_nifti_loads_with_geometry(real_ct_path):
    ct = load_ct(real_ct_path, orientation=None)
    assert tuple(ct.shape) == (1, 512, 512, 141)
    np.testing.assert_allclose(ct.pixdim.numpy(), [0.9765625, 0.9765625, 2.0], atol=1e-6)
    ref = nib.load(str(real_ct_path))
    np.testing.assert_allclose(ct.affine.numpy(), ref.affine, atol=1e-4)  # same RAS affine as nibabel
    assert float(ct.min()) == -1024.0
    # the reader works inside MONAI's LoadImage and gives the same array as the nibabel reader
    via_monai = LoadImage(reader=SITKReader(), image_only=True, ensure_channel_first=True)(str(real_ct_path))
    assert torch.equal(via_monai.as_tensor().float(), ct.as_tensor())


def test_real_nifti_round_trip_through_ras_is_voxel_exact(real_ct_path, tmp_path):
    ct = load_ct(real_ct_path)  # reoriented to RAS: the input is LPS, so x and y are flipped
    assert nib.aff2axcodes(ct.affine.numpy()) == ("R", "A", "S")
    mask = (ct > -320).to(torch.uint8)
    out = write_like(mask, ct.meta, tmp_path / "mask.nii.gz")
    src, res = sitk.ReadImage(str(real_ct_path)), sitk.ReadImage(str(out))
    assert res.GetSize() == src.GetSize()
    assert res.GetSpacing() == src.GetSpacing()
    assert res.GetOrigin() == src.GetOrigin()
    assert res.GetDirection() == src.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res).astype(bool), sitk.GetArrayFromImage(src) > -320)
    # a float heatmap too, in nibabel terms: identical affine and voxels
    heat = (ct.clamp(-1000, 0) + 1000) / 1000.0
    out = write_like(heat, ct.meta, tmp_path / "heat.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, nib.load(str(real_ct_path)).affine, atol=1e-4)
    expected = (np.clip(np.asanyarray(nib.load(str(real_ct_path)).dataobj), -1000, 0) + 1000) / 1000.0
    np.testing.assert_allclose(np.asanyarray(back.dataobj), expected, atol=1e-6)


def test_real_dicom_slice_loads_and_writes_back(lidc_dicom_path, tmp_path):
    img = LoadImage(reader=SITKReader(), image_only=True)(str(lidc_dicom_path))
    assert img.shape[:2] == (512, 512)
    arr = np.asarray(img).squeeze()
    assert arr.min() == -2048  # outside the field of view
    assert -1100 < np.percentile(arr[arr > -2048], 1) < -900  # HU, rescale applied
    src = sitk.ReadImage(str(lidc_dicom_path))
    np.testing.assert_allclose(np.asarray(img.meta["spacing"])[:2], src.GetSpacing()[:2])
    out = write_like(img, img.meta, tmp_path / "slice.nii.gz")
    res = sitk.ReadImage(str(out))
    assert res.GetSize() == src.GetSize()
    np.testing.assert_allclose(res.GetOrigin(), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(res.GetSpacing(), src.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(res.GetDirection(), src.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res), sitk.GetArrayFromImage(src))
    # a single slice is not a study
    with pytest.raises(NotAVolumeError, match="not a 3D CT volume"):
        load_ct(lidc_dicom_path)


# ----------------------------------------------------------------------------------------------
# DICOM series


def test_dicom_series_sorted_by_position_and_written_back(tmp_path):
    vol = _ct_volume()
    _write_dicom_series(vol, tmp_path / "series")
    ct = load_ct(tmp_path / "series", orientation=None)
    np.testing.assert_array_equal(ct[0].numpy().astype(np.int16), vol)  # slices in position order
    np.testing.assert_allclose(ct.pixdim.numpy(), [0.8, 0.8, 2.5], atol=1e-4)
    assert ct.meta["Modality"] == "CT"
    # DICOM in, NIfTI out on the same geometry, through RAS processing
    ras = load_ct(tmp_path / "series")
    out = write_like((ras > -500).to(torch.uint8), ras.meta, tmp_path / "mask.nii.gz")
    res = sitk.ReadImage(str(out))
    np.testing.assert_allclose(res.GetOrigin(), (-20.0, -15.0, 30.0), atol=1e-4)
    np.testing.assert_allclose(res.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res).T.astype(bool), vol > -500)


def test_folder_with_two_series_picks_largest_or_asked(tmp_path, caplog):
    big, small = _ct_volume(seed=1), _ct_volume(shape=(40, 36, 5), seed=2)
    _write_dicom_series(big, tmp_path / "mixed", series_uid="1.2.3.4.100")
    for p in _write_dicom_series(small, tmp_path / "other", series_uid="1.2.3.4.200", origin=(0.0, 0.0, 0.0)):
        p.rename(tmp_path / "mixed" / f"b_{p.name}")
    with caplog.at_level(logging.WARNING, logger="monai_ext.io"):
        ct = load_ct(tmp_path / "mixed", orientation=None)
    assert ct.shape[-1] == 12 and ct.meta["SeriesInstanceUID"] == "1.2.3.4.100"
    assert "2 CT series in the folder: read series ? (1.2.3.4.100)" in caplog.text
    assert "(1.2.3.4.200): 5 slice position(s), fewer than 10" in caplog.text
    ct = load_ct(tmp_path / "mixed", series_uid="1.2.3.4.200", orientation=None)
    np.testing.assert_array_equal(ct[0].numpy().astype(np.int16), small)
    with pytest.raises(NoDicomSeriesError, match="no series '9.9'"):
        load_ct(tmp_path / "mixed", series_uid="9.9")


# ----------------------------------------------------------------------------------------------
# other formats, transform chains, resampling


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_other_formats_round_trip(tmp_path, suffix):
    vol = _ct_volume()
    img = sitk.GetImageFromArray(vol.T)
    img.SetSpacing((0.7, 0.9, 3.0))
    img.SetOrigin((10.0, -5.0, 2.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated in-plane
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(path))
    ct = load_ct(path)
    out = write_like(ct.to(torch.int16), ct.meta, tmp_path / f"back{suffix}")
    res = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res), sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(res.GetDirection(), img.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(res.GetOrigin(), img.GetOrigin(), atol=1e-5)


def test_reader_in_dictionary_transform_chain(tmp_path):
    vol = _ct_volume()
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([-0.8, -0.8, 2.5, 1.0])), str(path))
    chain = Compose([
        LoadImaged("image", reader=SITKReader(), ensure_channel_first=True, image_only=True),
        Orientationd("image", axcodes="RAS", labels=None),
        ScaleIntensityRanged("image", a_min=-1350, a_max=150, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped("image"),
    ])
    out = chain({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 40, 36, 12) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    back = to_reference_grid(out, out.meta)
    np.testing.assert_allclose(back[0] if back.ndim == 4 else back, np.clip((vol + 1350) / 1500, 0, 1), atol=1e-6)


def test_resampled_grid_goes_back_by_interpolation(tmp_path):
    vol = _ct_volume(shape=(40, 36, 12))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    ct = load_ct(path)
    from monai.transforms import Spacing

    coarse = Spacing(pixdim=(2.0, 2.0, 2.0), mode="nearest")((ct > -500).to(torch.uint8)).to(torch.uint8)
    assert tuple(coarse.shape[1:]) != (40, 36, 12)
    back = to_reference_grid(coarse, ct.meta)
    assert back.shape == (40, 36, 12) and back.dtype == np.uint8
    agree = (back.astype(bool) == (vol > -500)).mean()
    assert agree > 0.9  # nearest down- and upsampling of a 40x36x12 object: only its edges differ
    assert reference_grid(path).shape == (40, 36, 12)


# ----------------------------------------------------------------------------------------------
# bad input: one clear error naming the input


def test_missing_path(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file or folder") as info:
        load_ct(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(NotAnImageError, match="not a readable medical image") as info:
        load_ct(path)
    assert str(path) in str(info.value)


def test_corrupt_nifti(tmp_path, real_ct_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(Path(real_ct_path).read_bytes()[:200_000])  # truncated download
    with pytest.raises(CorruptImageError, match="truncated") as info:
        load_ct(path)
    assert "broken.nii.gz" in str(info.value)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 50))
    with pytest.raises((CorruptImageError, NotAnImageError), match="garbage.nii.gz"):
        load_ct(garbage)


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(_ct_volume()[:, :, 0], np.eye(4)), str(path))
    with pytest.raises(NotAVolumeError, match="40x36 image, not a 3D CT volume"):
        load_ct(path)


@pytest.mark.parametrize("kind", ["uint8", "probability", "constant"])
def test_not_ct_values(tmp_path, kind):
    vol = _ct_volume()
    data = {
        "uint8": np.clip((vol + 1000) / 4, 0, 255).astype(np.uint8),
        "probability": ((vol + 1000) / 1100.0).astype(np.float32),
        "constant": np.zeros_like(vol),
    }[kind]
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(NotCTError, match="Hounsfield"):
        load_ct(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(NoDicomSeriesError, match="no DICOM series"):
        load_ct(tmp_path / "empty")


def test_atomic_outputs_have_the_usual_permissions(tmp_path):
    import os
    import stat

    from monai_ext.io import atomic_write_text

    path = atomic_write_text(tmp_path / "result.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left
