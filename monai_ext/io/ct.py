"""Loading a chest CT study with its geometry, and checking that it is one.

:func:`load_ct` reads a study (NIfTI, NRRD/MHA or a DICOM series folder) into a channel-first
MONAI ``MetaTensor`` in Hounsfield units, keeping everything needed to write results back on the
input grid, and refuses inputs that cannot be a chest CT with one clear
:class:`~monai_ext.errors.CTSeverityError` naming the input and the reason. Damaged voxels are
repaired or refused by the rules of :mod:`monai_ext.io.checks`; :func:`read_ct` also returns what
was repaired (:class:`~monai_ext.io.checks.InputReport`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

from monai_ext.errors import CorruptImageError, NotAVolumeError, NotCTError
from monai_ext.io.checks import (
    InputReport,
    check_hu_scale,
    default_max_memory,
    nifti_form_warnings,
    nifti_nonfinite_mask,
    repair_lost_slices,
    repair_nonfinite,
)
from monai_ext.io.isolate import call_in_child
from monai_ext.io.reader import WARNINGS_KEY, SITKReader

__all__ = ["load_ct", "read_ct", "validate_ct", "MIN_SLICES", "MIN_INPLANE"]

log = logging.getLogger(__name__)

#: fewest slices a study may have
MIN_SLICES = 3
#: fewest pixels along each in-plane axis
MIN_INPLANE = 32


def validate_ct(image: np.ndarray | torch.Tensor, path: str | os.PathLike | None = None) -> None:
    """Check that ``image`` (channel-first or not) can be a CT volume in Hounsfield units.

    NaN and infinite voxels are left out of the intensity check (:func:`read_ct` repairs or refuses
    them).

    Args:
        image: (X, Y, Z) or (1, X, Y, Z) array.
        path: the input, named in the error message.

    Raises:
        NotAVolumeError: a 2D image, a single slice, a 4D image, or a tiny grid.
        NotCTError: intensities without the air and tissue a CT in HU shows (windowed 8-bit
            images, MR, probability maps, constant volumes), or no finite value at all.
    """
    shape = tuple(image.shape)
    if len(shape) == 4:
        if shape[0] != 1:
            dims = "x".join(str(s) for s in shape)
            raise NotAVolumeError(
                f"is a 4D image ({dims}: several volumes, e.g. a time series); one 3D CT volume is needed", path)
        shape = shape[1:]
    if len(shape) != 3 or min(shape[:2]) < MIN_INPLANE or shape[2] < MIN_SLICES:
        dims = "x".join(str(s) for s in shape)
        raise NotAVolumeError(
            f"is a {dims} image, not a 3D CT volume (at least {MIN_INPLANE}x{MIN_INPLANE}x{MIN_SLICES} needed)", path)
    t = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)
    flat = t.reshape(-1)
    if flat.numel() > 2_000_000:  # percentiles of a strided subsample are plenty
        flat = flat[:: flat.numel() // 2_000_000 + 1]
    flat = flat.float()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        raise NotCTError("contains no finite value (every voxel is NaN or infinite)", path)
    lo, hi = torch.quantile(flat, torch.tensor([0.01, 0.99])).tolist()
    if lo > -500 or hi < -200 or hi - lo < 300:
        raise NotCTError(
            f"values do not look like Hounsfield units of a CT (1st-99th percentile {lo:.0f}..{hi:.0f}; "
            "air near -1000 and soft tissue near 0 are expected)", path)


def _read_file(path: str | os.PathLike, series_uid: str | None, max_bytes: int) -> tuple:
    """The part of reading a study that touches the input (and may hang on it): the image (SimpleITK, pydicom)
    and, for NIfTI, the qform/sform check and the non-finite voxels (nibabel). An error of the NIfTI checks is
    returned, not raised, so that :func:`read_ct` raises it where it always did (after :func:`validate_ct`)."""
    image = SITKReader(series_uid=series_uid, max_bytes=max_bytes).read(str(path))
    nifti: tuple | Exception | None = None
    if str(path).lower().endswith((".nii", ".nii.gz")):
        try:
            nifti = (nifti_form_warnings(path, image.GetSpacing()), nifti_nonfinite_mask(path))
        except Exception as exc:  # noqa: BLE001 - raised later, in order
            nifti = exc
    return image, nifti


def read_ct(path: str | os.PathLike, series_uid: str | None = None, orientation: str | None = "RAS",
            dtype: torch.dtype = torch.float32, max_bytes: int | None = None, timeout: float | None = None
            ) -> tuple[MetaTensor, InputReport]:
    """:func:`load_ct`, and what was repaired on the way.

    Args:
        timeout: with a time limit (seconds), the input is read in a child process that is stopped when the
            limit passes (:func:`monai_ext.io.isolate.call_in_child`): a decoder that hangs, or a named pipe
            that never delivers data, then raises :class:`TimeoutError` instead of blocking the caller
            (a thread blocked in a C library cannot be interrupted). ``None``: read in this process.
        path, series_uid, orientation, dtype, max_bytes: as for :func:`load_ct`.

    Returns:
        ``(ct, report)``: the volume and its :class:`~monai_ext.io.checks.InputReport` (warnings, and
        the mask of the voxels repaired from NaN/inf on the returned grid).

    Raises:
        The errors of :func:`load_ct`; TimeoutError: no image within ``timeout``; CorruptImageError: the reader
        crashed on the input (in the child process).
    """
    report = InputReport(path=str(path))
    budget = default_max_memory() if max_bytes is None else max_bytes
    if timeout is None:
        image, nifti = _read_file(path, series_uid, budget)
    else:
        try:
            image, nifti = call_in_child(_read_file, timeout, path, series_uid, budget)
        except ChildProcessError as exc:
            raise CorruptImageError(f"the reader crashed on this input ({exc})", path) from None
    array, meta = SITKReader().get_data(image)
    del image
    if not np.isnan(meta.get("original_channel_dim", float("nan"))):
        raise NotAVolumeError("has several components per voxel (a colour image?); a CT volume is needed", path)
    for line in str(meta.pop(WARNINGS_KEY, "")).splitlines():
        report.warn(line)
    validate_ct(array, path)
    if isinstance(nifti, Exception):
        raise nifti
    if nifti is not None:
        form, nifti_bad = nifti
        for line in form:
            report.warn(line)
        if nifti_bad is not None and nifti_bad.shape == array.shape:  # SimpleITK read them as 0
            array = array.astype(np.float32, copy=False)
            array[nifti_bad] = np.nan
    off_scale = check_hu_scale(array, path)  # a wrong rescale: refused, or its slices lost
    array = repair_lost_slices(array, report, path, off_scale)  # whole slices lost: the rule of missing DICOM slices
    meta["filename_or_obj"] = str(Path(path))
    img = MetaTensor(torch.from_numpy(array).to(dtype)[None], meta=meta)
    if orientation is not None:
        img = Orientation(axcodes=orientation, labels=None)(img)
    if dtype.is_floating_point and not bool(torch.isfinite(img).all()):
        img[0] = torch.as_tensor(repair_nonfinite(img.as_tensor()[0].numpy().copy(), report, path=path), dtype=dtype)
    for w in report.warnings:
        log.warning("%s: %s", path, w)
    return img, report


def load_ct(path: str | os.PathLike, series_uid: str | None = None, orientation: str | None = "RAS",
            dtype: torch.dtype = torch.float32, max_bytes: int | None = None) -> MetaTensor:
    """Load a CT study as a channel-first ``MetaTensor`` (1, X, Y, Z) in HU.

    Damage is repaired or refused by the rules of :mod:`monai_ext.io.checks` (NaN/inf voxels, uneven
    or missing DICOM slices, a header declaring more than the file or the memory budget holds);
    repairs are logged as warnings (:func:`read_ct` returns them).

    Args:
        path: a NIfTI/NRRD/MHA file or a folder with a DICOM series.
        series_uid: which DICOM series to read from a folder holding several.
        orientation: axis codes to reorient to (``"RAS"``), or ``None`` to keep the input grid.
            The metadata keeps the original grid, so :func:`monai_ext.io.write_like` writes
            results back on it voxel-exactly.
        dtype: output dtype.
        max_bytes: memory budget of the study, checked from the header before reading (``None``:
            :func:`~monai_ext.io.checks.default_max_memory`, three quarters of the machine's memory).

    Returns:
        The volume with ``affine``, ``original_affine``, ``spatial_shape`` and the SimpleITK
        geometry in ``.meta``.

    Raises:
        InputNotFoundError, NotAnImageError, CorruptImageError, NoDicomSeriesError,
        NotAVolumeError, NotCTError, DamagedImageError, InputTooLargeError: with the input named and the reason.

    Example::

        ct = load_ct("study_0001.nii.gz")
        ct.shape, ct.pixdim   # (1, 512, 512, 141), tensor([0.98, 0.98, 2.0])
    """
    return read_ct(path, series_uid, orientation, dtype, max_bytes)[0]
