"""Tissue below the diaphragm, and the heart on top of it, that a lung mask must not hold.

On axial slices the domes of the liver and the spleen bulge up between lung tissue, and the heart
sits on the diaphragm between the lungs. A lung mask that fills holes slice by slice (as the
classical threshold method does to keep vessels) takes those domes in together with their
partial-volume rims, and everything downstream reads them as dense lung: the lung volume, the
lesion share and the grade.

:func:`organ_intrusion` finds them with a criterion that can be checked by hand, in each
``(x, y)`` column of the volume: starting in the slice just below the lowest lung slice (the
abdomen), it follows the column upwards while the tissue stays dense (smoothed HU above
``dense_hu``). Every lung-mask voxel reached that way, up to ``max_height_mm`` above the lowest
lung slice, is tissue continuous from the abdomen up, through the diaphragm, without lung air
below it: an organ dome, the heart or the diaphragm itself, not lung. Their partial-volume rims
(lung-mask voxels above ``rim_hu`` within ``rim_mm`` of such tissue) go with them. Consolidation
higher up always has aerated lung somewhere below it in its column and is never reached.

The criterion knows nothing about lesions: dense consolidation that lies directly on the
diaphragm with no aerated lung below it is reached as well. It is the measure of a clean CT's lung
mask (``scripts/lung_bases.py``, the lung-mask tests) and the rule that cleans the threshold
mask of a clean CT; the project's lung U-Net (:mod:`monai_ext.transforms.lung_net`), trained with
lesions inserted above the diaphragm, is what keeps basal consolidation.

Array convention: (X, Y, Z) in ITK index order; the patient orientation comes from a RAS affine
(MONAI convention) or, without one, ITK's identity direction (x left, y posterior, z superior).

Example:
    >>> import numpy as np
    >>> from monai_ext.transforms.organs import organ_intrusion
    >>> ct = np.full((20, 20, 20), -850.0); ct[:, :, :6] = 50.0      # abdomen below z = 6
    >>> ct[5:15, 5:15, 6:9] = 50.0                                     # a dome bulging up into the lung
    >>> lung = np.zeros(ct.shape, bool); lung[2:18, 2:18, 6:18] = True  # a mask that took the dome in
    >>> dome = organ_intrusion(ct, lung, (2.0, 2.0, 2.0), smooth_mm=0.0, rim_mm=0.0)
    >>> int(dome.sum()), int(dome[5:15, 5:15, 6:9].sum())
    (300, 300)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

__all__ = ["organ_intrusion", "organ_intrusion_canonical", "canonical_view"]

_CANONICAL = axcodes2ornt(("L", "P", "S"))


def canonical_view(volume: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None
                   ) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray]:
    """``volume`` reoriented to (left, posterior, superior) axes, with its spacing and the two
    orientation transforms (to the canonical axes and back, for ``nibabel.apply_orientation``).

    Args:
        volume: (X, Y, Z) array.
        spacing: voxel size of the array's axes in mm.
        affine: RAS affine of the array; ``None`` means ITK's identity direction.

    Returns:
        ``(canonical, canonical_spacing, forward, backward)``.
    """
    if affine is None:
        sx, sy, sz = (float(s) for s in spacing)
        affine = np.diag([-sx, -sy, sz, 1.0])
    start = io_orientation(np.asarray(affine, dtype=np.float64))
    forward, backward = ornt_transform(start, _CANONICAL), ornt_transform(_CANONICAL, start)
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(forward):
        out[int(target)] = float(spacing[axis])
    return apply_orientation(np.asarray(volume), forward), (out[0], out[1], out[2]), forward, backward


def _bbox(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d))) for d in range(mask.ndim)]
    return tuple(slice(max(0, int(i[0]) - m), min(n, int(i[-1]) + 1 + m)) for i, n, m in zip(idx, mask.shape, margin))


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Ellipsoid of ``radius_mm`` on an anisotropic grid (a single voxel along axes coarser than it)."""
    r = [int(np.floor(radius_mm / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing)) <= radius_mm**2 + 1e-6


def organ_intrusion_canonical(volume: np.ndarray, lung: np.ndarray, spacing: Sequence[float], *,
                              dense_hu: float = -300.0, rim_hu: float = -700.0, rim_mm: float = 3.0,
                              smooth_mm: float = 1.0, max_height_mm: float | None = 80.0) -> np.ndarray:
    """:func:`organ_intrusion` of arrays already in the canonical orientation (x left, y posterior,
    z superior), with the same arguments."""
    lung = np.asarray(lung) > 0
    spacing = tuple(float(s) for s in spacing)
    out = np.zeros(lung.shape, dtype=bool)
    if not lung.any():
        return out
    margin_xy = [int(np.ceil(max(rim_mm, 2.0 * smooth_mm) / s)) + 1 for s in spacing[:2]]
    box = _bbox(lung, (*margin_xy, 1))
    z_first = box[2].start if box[2].start > 0 else 0
    sub = volume[box].astype(np.float32)
    sub_lung = lung[box]
    if smooth_mm > 0:
        sigma = [smooth_mm / s for s in spacing[:2]] + [min(smooth_mm / spacing[2], 0.5)]
        sub = ndimage.gaussian_filter(sub, sigma, mode="nearest")
    dense = sub > dense_hu
    lung_z = np.flatnonzero(sub_lung.any(axis=(0, 1)))
    # the column starts one slice below the lowest lung slice (the abdomen); a lung that reaches
    # the bottom of the volume starts in its own lowest slice
    start = int(lung_z[0]) - 1 if int(lung_z[0]) + z_first > 0 else int(lung_z[0])
    start = max(start, 0)
    run = np.logical_and.accumulate(dense[:, :, start:], axis=2)
    organ = np.zeros(sub.shape, dtype=bool)
    organ[:, :, start:] = run
    organ &= sub_lung
    if max_height_mm is not None:  # only the lung bases: above them, a dense column is a mass on the heart
        organ[:, :, int(lung_z[0]) + int(np.floor(max_height_mm / spacing[2])) + 1:] = False
    if rim_mm > 0 and organ.any():
        # partial-volume rim: lung-mask voxels above rim_hu reached from the organ within rim_mm
        allowed = sub_lung & (sub > rim_hu)
        organ |= ndimage.binary_dilation(organ, structure=_ball(rim_mm, spacing)) & allowed
    out[box] = organ
    return out


def organ_intrusion(volume_xyz: np.ndarray, lung: np.ndarray, spacing: Sequence[float], *,
                    affine: np.ndarray | None = None, dense_hu: float = -300.0, rim_hu: float = -700.0,
                    rim_mm: float = 3.0, smooth_mm: float = 1.0, max_height_mm: float | None = 80.0) -> np.ndarray:
    """Voxels of a lung mask that are tissue rising from the abdomen: organ domes under the
    diaphragm, the diaphragm, the heart on top of it, with their partial-volume rims.

    Args:
        volume_xyz: (X, Y, Z) CT in HU, ITK index order.
        lung: lung mask on the same grid (non-zero = lung).
        spacing: voxel size of the array's axes in mm.
        affine: RAS affine giving the orientation of the axes (``None``: ITK identity direction).
        dense_hu: tissue above this (after smoothing) is dense: soft tissue, fat, organs.
        rim_hu: lung-mask voxels above this within ``rim_mm`` of the dense tissue are its
            partial-volume rim.
        rim_mm: reach of the rim.
        smooth_mm: Gaussian sigma (in-plane; at most half a slice in z) applied before the
            thresholds, so that noise does not break a column.
        max_height_mm: only voxels up to this height above the lowest lung slice count (the
            domes and the recesses around them); higher up, a dense column reaching the lung is a
            mass lying on the heart, which is lung. ``None``: the whole height.

    Returns:
        Boolean array on the input grid, a subset of ``lung``.

    Raises:
        ValueError: shapes that differ or are not 3D.

    Example:
        >>> dome = organ_intrusion(ct_xyz, lung, (0.7, 0.7, 1.25), affine=ct.affine)  # doctest: +SKIP
        >>> float(dome.sum()) * 0.7 * 0.7 * 1.25 / 1000  # ml of organ inside the lung mask  # doctest: +SKIP
    """
    vol = np.asarray(volume_xyz)
    m = np.asarray(lung) > 0
    if vol.ndim != 3 or vol.shape != m.shape:
        raise ValueError(f"expected a 3D volume and a lung mask of the same shape, got {vol.shape} and {m.shape}")
    canon, cspacing, forward, backward = canonical_view(vol, spacing, affine)
    cmask = apply_orientation(m, forward)
    organ = organ_intrusion_canonical(canon, cmask, cspacing, dense_hu=dense_hu, rim_hu=rim_hu, rim_mm=rim_mm,
                                      smooth_mm=smooth_mm, max_height_mm=max_height_mm)
    return np.ascontiguousarray(apply_orientation(organ, backward)).astype(bool, copy=False)
