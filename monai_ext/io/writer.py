"""Write volumes (heatmaps, masks) on exactly the grid of the input they were computed from.

Processing usually happens on a reoriented copy of the input (RAS, channel first). To hand
results back to a user, they must land on the input's own grid: same shape, spacing, origin and
direction, so that they open aligned with the input in 3D Slicer or ITK-SNAP. When the processing
grid differs from the input grid only by axis permutations and flips (MONAI ``Orientation``),
the way back is exact: no interpolation, voxel for voxel. When the grid really differs (a
resampled spacing), the volume is resampled onto the input grid (nearest neighbour for integer
data, linear for floats).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys

from monai_ext.io.atomic import atomic_path
from monai_ext.io.reader import read_sitk_image

__all__ = ["ReferenceGrid", "to_reference_grid", "write_like", "reference_grid"]

log = logging.getLogger(__name__)


class ReferenceGrid:
    """The geometry of an input image: shape, RAS affine and the exact LPS origin/spacing/direction.

    Args:
        shape: grid size (x, y, z).
        affine: 4x4 voxel-to-RAS affine.
        origin, spacing, direction: LPS geometry as SimpleITK stores it; derived from ``affine``
            when not given.
    """

    def __init__(self, shape: tuple[int, ...], affine: np.ndarray, origin: np.ndarray | None = None,
                 spacing: np.ndarray | None = None, direction: np.ndarray | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        dim = len(self.shape)
        if origin is None or spacing is None or direction is None:
            lps = orientation_ras_lps(self.affine)
            spacing = np.linalg.norm(lps[:dim, :dim], axis=0)
            direction = (lps[:dim, :dim] / spacing).ravel()
            origin = lps[:dim, -1]
        self.origin = np.asarray(origin, dtype=np.float64)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.direction = np.asarray(direction, dtype=np.float64).ravel()

    def empty_image(self, pixel_id: int = sitk.sitkFloat32) -> sitk.Image:
        """A SimpleITK image on this grid."""
        img = sitk.Image([int(s) for s in self.shape], pixel_id)
        self._stamp(img)
        return img

    def _stamp(self, img: sitk.Image) -> None:
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetSpacing(tuple(float(v) for v in self.spacing))
        img.SetDirection(tuple(float(v) for v in self.direction))

    def __repr__(self) -> str:
        return f"ReferenceGrid(shape={self.shape}, spacing={tuple(np.round(self.spacing, 4))})"


def reference_grid(reference: Mapping | str | os.PathLike | sitk.Image | ReferenceGrid) -> ReferenceGrid:
    """The grid of ``reference``: a MONAI metadata dict (as the readers fill it), an image path,
    a SimpleITK image, or a :class:`ReferenceGrid`.

    Raises:
        ValueError: if a metadata dict lacks the original affine or the spatial shape.
    """
    if isinstance(reference, ReferenceGrid):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        reference = read_sitk_image(reference)
    if isinstance(reference, sitk.Image):
        dim = reference.GetDimension()
        spacing = np.asarray(reference.GetSpacing())
        direction = np.asarray(reference.GetDirection()).reshape(dim, dim)
        lps = np.eye(dim + 1)
        lps[:dim, :dim] = direction @ np.diag(spacing)
        lps[:dim, -1] = reference.GetOrigin()
        return ReferenceGrid(reference.GetSize(), orientation_ras_lps(lps), np.asarray(reference.GetOrigin()),
                             spacing, direction)
    meta = dict(reference)
    affine = meta.get(MetaKeys.ORIGINAL_AFFINE, meta.get(MetaKeys.AFFINE))
    shape = meta.get(MetaKeys.SPATIAL_SHAPE)
    if affine is None or shape is None:
        raise ValueError("reference metadata needs 'original_affine' (or 'affine') and 'spatial_shape'")
    affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    shape = tuple(int(s) for s in np.asarray(shape.cpu() if isinstance(shape, torch.Tensor) else shape).ravel())
    if all(k in meta for k in ("sitk_origin", "sitk_spacing", "sitk_direction")):
        return ReferenceGrid(shape, affine, *(np.asarray(meta[k]) for k in
                                              ("sitk_origin", "sitk_spacing", "sitk_direction")))
    return ReferenceGrid(shape, affine)


def _as_numpy(data: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        data = data.as_tensor() if hasattr(data, "as_tensor") else data
        return data.numpy()
    return np.asarray(data)


def to_reference_grid(data: np.ndarray | torch.Tensor, reference: Mapping | str | os.PathLike | sitk.Image |
                      ReferenceGrid, affine: np.ndarray | torch.Tensor | None = None,
                      interpolation: str = "auto") -> np.ndarray:
    """Bring a volume back onto the reference grid.

    Args:
        data: (X, Y, Z) or channel-first (1, X, Y, Z) volume; a MetaTensor carries its affine.
        reference: the input's grid (see :func:`reference_grid`).
        affine: the voxel-to-RAS affine of ``data``; default the MetaTensor's own, or, for plain
            arrays, the reference affine (the data is then already on the reference grid).
        interpolation: ``"nearest"``, ``"linear"`` or ``"auto"`` (nearest for integer and bool
            data, linear for floats); used only when the grids differ by more than a reorientation.

    Returns:
        A numpy array of the reference shape, same dtype as ``data``.

    Raises:
        ValueError: if ``data`` is not a 3D (or single-channel 4D) volume.
    """
    grid = reference_grid(reference)
    if affine is None and hasattr(data, "affine"):
        affine = data.affine  # MetaTensor
    arr = _as_numpy(data)
    if arr.ndim == len(grid.shape) + 1:
        if arr.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {arr.shape}")
        arr = arr[0]
    if arr.ndim != len(grid.shape):
        raise ValueError(f"expected a {len(grid.shape)}D volume, got shape {arr.shape}")
    cur = grid.affine if affine is None else np.asarray(_as_numpy(affine), dtype=np.float64)
    tol = 1e-3 * float(grid.spacing.min())
    if arr.shape == grid.shape and np.allclose(cur, grid.affine, atol=tol):
        return arr
    t = nib.orientations.ornt_transform(nib.orientations.io_orientation(cur),
                                        nib.orientations.io_orientation(grid.affine))
    re_arr = nib.orientations.apply_orientation(arr, t)
    re_aff = cur @ nib.orientations.inv_ornt_aff(t, arr.shape)
    if re_arr.shape == grid.shape and np.allclose(re_aff, grid.affine, atol=tol):
        return np.ascontiguousarray(re_arr)
    # the grids differ by more than axis flips and permutations: resample
    log.debug("resampling a %s volume onto %s", arr.shape, grid)
    src = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    ReferenceGrid(arr.shape, cur)._stamp(src)
    if interpolation == "auto":
        interpolation = "linear" if np.issubdtype(arr.dtype, np.floating) else "nearest"
    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}.get(interpolation)
    if interp is None:
        raise ValueError(f"interpolation must be 'nearest', 'linear' or 'auto', got {interpolation!r}")
    out = sitk.Resample(src, grid.empty_image(src.GetPixelID()), sitk.Transform(), interp, 0.0)
    return np.ascontiguousarray(sitk.GetArrayFromImage(out).T).astype(arr.dtype, copy=False)


def write_like(data: np.ndarray | torch.Tensor, reference: Mapping | str | os.PathLike | sitk.Image | ReferenceGrid,
               path: str | os.PathLike, affine: np.ndarray | torch.Tensor | None = None,
               dtype: np.dtype | type | str | None = None, interpolation: str = "auto",
               compress: bool = True) -> Path:
    """Write ``data`` on the reference grid to ``path`` (format from the suffix), atomically.

    Args:
        data: the volume, on the processing grid (a MetaTensor carries its affine) or on the
            reference grid.
        reference: the input's grid: its MONAI metadata (``img.meta``), its path, a SimpleITK image
            or a :class:`ReferenceGrid`.
        path: output file (``.nii.gz``, ``.nrrd``, ``.mha``, ...).
        affine: affine of ``data`` when it is a plain array on another grid.
        dtype: output pixel type (default: the data's; bool is written as uint8).
        interpolation: see :func:`to_reference_grid`.
        compress: compress the file where the format allows.

    Returns:
        The path written.

    Example::

        ct = LoadImage(reader=SITKReader(), image_only=True, ensure_channel_first=True)(path)
        ras = Orientation("RAS")(ct)
        mask = (ras > -320).to(torch.uint8)
        write_like(mask, ct.meta, "mask.nii.gz")   # voxel-exact on the input grid
    """
    grid = reference_grid(reference)
    arr = to_reference_grid(data, grid, affine=affine, interpolation=interpolation)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    grid._stamp(img)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return Path(path)
