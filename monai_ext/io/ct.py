"""Loading a chest CT study with its geometry, and checking that it is one.

:func:`load_ct` reads a study (NIfTI, NRRD/MHA or a DICOM series folder) into a channel-first
MONAI ``MetaTensor`` in Hounsfield units, keeping everything needed to write results back on the
input grid, and refuses inputs that cannot be a chest CT with one clear
:class:`~monai_ext.errors.CTSeverityError` naming the input and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

from monai_ext.errors import NotAVolumeError, NotCTError
from monai_ext.io.reader import SITKReader

__all__ = ["load_ct", "validate_ct", "MIN_SLICES", "MIN_INPLANE"]

#: fewest slices a study may have
MIN_SLICES = 3
#: fewest pixels along each in-plane axis
MIN_INPLANE = 32


def validate_ct(image: np.ndarray | torch.Tensor, path: str | os.PathLike | None = None) -> None:
    """Check that ``image`` (channel-first or not) can be a CT volume in Hounsfield units.

    Args:
        image: (X, Y, Z) or (1, X, Y, Z) array.
        path: the input, named in the error message.

    Raises:
        NotAVolumeError: a 2D image, a single slice, several channels, or a tiny grid.
        NotCTError: intensities without the air and tissue a CT in HU shows (windowed 8-bit
            images, MR, probability maps, constant volumes).
    """
    shape = tuple(image.shape)
    if len(shape) == 4:
        if shape[0] != 1:
            raise NotAVolumeError(f"has {shape[0]} channels; a single-channel CT volume is needed", path)
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
    if not bool(torch.isfinite(flat).all()):
        raise NotCTError("contains NaN or infinite values", path)
    lo, hi = torch.quantile(flat, torch.tensor([0.01, 0.99])).tolist()
    if lo > -500 or hi < -200 or hi - lo < 300:
        raise NotCTError(
            f"values do not look like Hounsfield units of a CT (1st-99th percentile {lo:.0f}..{hi:.0f}; "
            "air near -1000 and soft tissue near 0 are expected)", path)


def load_ct(path: str | os.PathLike, series_uid: str | None = None, orientation: str | None = "RAS",
            dtype: torch.dtype = torch.float32) -> MetaTensor:
    """Load a CT study as a channel-first ``MetaTensor`` (1, X, Y, Z) in HU.

    Args:
        path: a NIfTI/NRRD/MHA file or a folder with a DICOM series.
        series_uid: which DICOM series to read from a folder holding several.
        orientation: axis codes to reorient to (``"RAS"``), or ``None`` to keep the input grid.
            The metadata keeps the original grid, so :func:`monai_ext.io.write_like` writes
            results back on it voxel-exactly.
        dtype: output dtype.

    Returns:
        The volume with ``affine``, ``original_affine``, ``spatial_shape`` and the SimpleITK
        geometry in ``.meta``.

    Raises:
        InputNotFoundError, NotAnImageError, CorruptImageError, NoDicomSeriesError,
        NotAVolumeError, NotCTError: with the input named and the reason.

    Example::

        ct = load_ct("study_0001.nii.gz")
        ct.shape, ct.pixdim   # (1, 512, 512, 141), tensor([0.98, 0.98, 2.0])
    """
    reader = SITKReader(series_uid=series_uid)
    array, meta = reader.get_data(reader.read(str(path)))
    if not np.isnan(meta.get("original_channel_dim", float("nan"))):
        raise NotAVolumeError("has several components per voxel (a colour image?); a CT volume is needed", path)
    validate_ct(array, path)
    meta["filename_or_obj"] = str(Path(path))
    img = MetaTensor(torch.from_numpy(array).to(dtype)[None], meta=meta)
    if orientation is not None:
        img = Orientation(axcodes=orientation, labels=None)(img)
    return img
