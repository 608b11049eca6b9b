"""Statistics of COVID-19 lesion masks, to compare real annotations with generated lesions.

Every statistic here is computed the same way on real masks (MosMedData 3D masks, MedSeg 2D
slices) and on the lesions of :func:`~monai_ext.data.lesions.insert_lesions`, so that the
generator can be fitted to the numbers (never to the masks themselves).

3D, per study (:func:`study_statistics`):

- lesion volume, lesion share of the lung (with a lung mask);
- connected components (:func:`component_sizes`): full connectivity by default (26 neighbours in
  3D, 8 in 2D). The count depends on the slice spacing: MosMedData kept every 10th 0.8 mm slice
  (8 mm apart), so lesions that a thin-slice CT shows as one blob may fall apart, and small ones
  may be missed. Measure a thin-slice mask at the same spacing with :func:`resample_slices` first;
- subpleural share (:func:`subpleural_share`): share of lesion voxels within 10 mm of the lung
  boundary, measured in-plane (slice by slice) because ``z`` is coarse;
- lower and posterior lean (:func:`half_share`): share of lesion voxels in the lower (posterior)
  half of the lung's extent along the body axis, 0.5 meaning no lean. Without a lung mask the
  lower lean is measured over the lesion's own ``z`` extent (``lower_share_lesion_range``);
- sides (:func:`side_shares`): share of the lesion in the right and left lung (lung labels 1/2,
  else the mid-plane of the lung box, else the image centre); bilateral when each side holds at
  least 1 % of the lesion.

2D, per slice (:func:`slice_statistics`): the same lesion shape statistics in the slice plane,
plus, with the GGO (1) / consolidation (2) labels and an image in HU, the consolidation share of
the lesion area, the HU distribution under each label (:func:`hu_by_label`) and a crazy-paving
texture statistic (:func:`ggo_texture`).

Orientation is given by axis codes as nibabel writes them (``("L", "A", "S")``: the first index
runs towards the patient's left, the second anterior, the third superior), or by a RAS affine.

Example:
    >>> import numpy as np
    >>> m = np.zeros((20, 20, 10), np.uint8)
    >>> m[2:5, 2:5, 2:5] = 1; m[10:14, 10:14, 2:4] = 1
    >>> component_sizes(m, (1.0, 1.0, 1.0)).tolist()
    [32.0, 27.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "SUBPLEURAL_MM",
    "BILATERAL_MIN_SHARE",
    "axis_codes",
    "resample_slices",
    "component_sizes",
    "in_plane_boundary_distance",
    "subpleural_share",
    "half_share",
    "side_shares",
    "hu_by_label",
    "ggo_texture",
    "study_statistics",
    "slice_statistics",
]

#: distance to the lung boundary (mm, in-plane) within which a lesion voxel counts as subpleural
SUBPLEURAL_MM = 10.0
#: a lesion is bilateral when each lung holds at least this share of it
BILATERAL_MIN_SHARE = 0.01

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def axis_codes(
    affine: np.ndarray | None = None, axcodes: Sequence[str] | None = None, ndim: int = 3
) -> tuple[str, ...]:
    """Axis codes (towards which body direction each array index runs) from codes or a RAS affine.

    Args:
        affine: 4x4 RAS affine (nibabel / MONAI convention); used when ``axcodes`` is ``None``.
        axcodes: codes such as ``("L", "P", "S")`` (3D) or ``("L", "P")`` (an axial slice).
        ndim: number of array dimensions the codes must cover.

    Returns:
        The codes, upper case, one per axis.

    Raises:
        ValueError: neither given, wrong length, unknown or repeated directions.

    Example:
        >>> axis_codes(np.diag([-1.0, -1.0, 1.0, 1.0]))
        ('L', 'P', 'S')
    """
    if axcodes is None:
        if affine is None:
            raise ValueError("orientation: give axcodes (e.g. ('L', 'P', 'S')) or a RAS affine")
        import nibabel as nib

        axcodes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    codes = tuple(str(c).upper() for c in axcodes)
    if len(codes) != ndim:
        raise ValueError(f"axcodes: expected {ndim} codes, got {axcodes!r}")
    if any(c not in _OPPOSITE for c in codes):
        raise ValueError(f"axcodes: each code must be one of L, R, A, P, S, I; got {axcodes!r}")
    groups = [{c, _OPPOSITE[c]} for c in codes]
    if any(groups[i] == groups[j] for i in range(ndim) for j in range(i + 1, ndim)):
        raise ValueError(f"axcodes: a body direction is repeated in {axcodes!r}")
    return codes


def _find_axis(codes: Sequence[str], direction: str) -> tuple[int, bool] | None:
    """(axis, True if the index grows towards ``direction``) or None when no axis has it."""
    for a, c in enumerate(codes):
        if c == direction:
            return a, True
        if c == _OPPOSITE[direction]:
            return a, False
    return None


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        spc = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing: expected {ndim} sizes in mm, got {spacing!r}") from None
    if len(spc) != ndim or not all(math.isfinite(s) and s > 0 for s in spc):
        raise ValueError(f"spacing: expected {ndim} positive sizes in mm, got {spacing!r}")
    return spc


def resample_slices(
    volume: np.ndarray, spacing: Sequence[float], step_mm: float = 8.0, axis: int = 2
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Keep the slice nearest to every ``step_mm`` along ``axis``, as MosMedData kept every 10th slice.

    MosMedData published every 10th slice of 0.8 mm reconstructions (8 mm apart): a thin-slice
    mask measured that way has comparable component counts and sizes. Slice ``k`` of the result is
    the input slice nearest to ``k * step_mm`` from the first one; with a spacing that does not
    divide ``step_mm`` the true steps alternate (2.5 mm input, 8 mm step: 7.5 and 10 mm), and the
    returned spacing is the nominal ``step_mm``.

    Args:
        volume: array (mask, lung mask or image) of any dtype.
        spacing: its voxel size in mm.
        step_mm: distance between kept slices.
        axis: the slice axis.

    Returns:
        ``(kept_slices, spacing)`` with ``spacing[axis] = step_mm``; unchanged (a view) when the
        input spacing is already at least ``step_mm``.

    Raises:
        ValueError: bad spacing, step or axis.

    Example:
        >>> v = np.arange(10)[None, None, :].repeat(2, 0).repeat(2, 1)
        >>> out, spc = resample_slices(v, (1.0, 1.0, 2.5), 8.0)
        >>> out[0, 0].tolist(), spc
        ([0, 3, 6], (1.0, 1.0, 8.0))
    """
    volume = np.asarray(volume)
    spc = _check_spacing(spacing, volume.ndim)
    if not (0 <= axis < volume.ndim):
        raise ValueError(f"axis: expected 0..{volume.ndim - 1}, got {axis}")
    if not (math.isfinite(step_mm) and step_mm > 0):
        raise ValueError(f"step_mm: expected a positive distance in mm, got {step_mm!r}")
    if spc[axis] >= step_mm - 1e-6:
        return volume, spc
    n = volume.shape[axis]
    targets = np.arange(0.0, (n - 1) * spc[axis] + 1e-6, step_mm)
    idx = np.unique(np.clip(np.rint(targets / spc[axis]).astype(int), 0, n - 1))
    out_spc = list(spc)
    out_spc[axis] = float(step_mm)
    return np.take(volume, idx, axis=axis), tuple(out_spc)


def component_sizes(mask: np.ndarray, spacing: Sequence[float], connectivity: int | None = None) -> np.ndarray:
    """Sizes of the connected components of a mask, largest first.

    Args:
        mask: 2D or 3D mask (non-zero = lesion).
        spacing: voxel size in mm.
        connectivity: neighbours that connect, as in :func:`scipy.ndimage.generate_binary_structure`:
            1 = faces only (6 in 3D, 4 in 2D) .. ``ndim`` = faces, edges and corners (26 in 3D,
            8 in 2D, the default).

    Returns:
        float array of component sizes in mm^3 (3D) or mm^2 (2D); divide by 1000 for ml.

    Raises:
        ValueError: bad spacing or connectivity.

    Example:
        >>> m = np.zeros((6, 6), bool); m[0, 0] = m[1, 1] = True; m[4:6, 4:6] = True
        >>> component_sizes(m, (1.0, 1.0)).tolist(), component_sizes(m, (1.0, 1.0), 1).tolist()
        ([4.0, 2.0], [4.0, 1.0, 1.0])
    """
    mask = np.asarray(mask) > 0
    spc = _check_spacing(spacing, mask.ndim)
    conn = mask.ndim if connectivity is None else int(connectivity)
    if not (1 <= conn <= mask.ndim):
        raise ValueError(f"connectivity: expected 1..{mask.ndim}, got {connectivity!r}")
    labels, n = ndi.label(mask, ndi.generate_binary_structure(mask.ndim, conn))
    if n == 0:
        return np.zeros(0, np.float64)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64) * float(np.prod(spc))
    return np.sort(sizes)[::-1]


def in_plane_boundary_distance(region: np.ndarray, spacing: Sequence[float], slice_axis: int | None = 2) -> np.ndarray:
    """Distance (mm) of each voxel of ``region`` to the nearest voxel outside it, within its slice.

    The array border counts as outside. Voxels outside the region get 0.

    Args:
        region: 2D or 3D mask (the lung).
        spacing: voxel size in mm.
        slice_axis: for 3D, the axis across slices (the distance is measured in the other two);
            ``None`` for a full 3D (or 2D) distance.

    Returns:
        float32 array of the region's shape.

    Example:
        >>> r = np.ones((5, 5), bool)
        >>> in_plane_boundary_distance(r, (2.0, 2.0), None)[2].tolist()
        [2.0, 4.0, 6.0, 4.0, 2.0]
    """
    region = np.asarray(region) > 0
    spc = _check_spacing(spacing, region.ndim)
    if slice_axis is None or region.ndim == 2:
        padded = np.pad(region, 1)
        d = ndi.distance_transform_edt(padded, sampling=spc)
        return d[tuple(slice(1, -1) for _ in range(region.ndim))].astype(np.float32)
    moved = np.moveaxis(region, slice_axis, 0)
    plane_spc = [s for a, s in enumerate(spc) if a != slice_axis]
    out = np.zeros(moved.shape, np.float32)
    for k in range(moved.shape[0]):
        if moved[k].any():
            out[k] = ndi.distance_transform_edt(np.pad(moved[k], 1), sampling=plane_spc)[1:-1, 1:-1]
    return np.moveaxis(out, 0, slice_axis)


def subpleural_share(
    lesion: np.ndarray,
    lung: np.ndarray,
    spacing: Sequence[float],
    distance_mm: float = SUBPLEURAL_MM,
    slice_axis: int | None = 2,
) -> float:
    """Share of lesion voxels within ``distance_mm`` of the lung boundary (in-plane for 3D).

    The lung is taken as the lung mask joined with the lesion mask (dense lesions are often left
    out of threshold lung masks), and the boundary includes the mediastinal and diaphragmatic
    surfaces as they cut each slice.

    Args:
        lesion: lesion mask (non-zero = lesion).
        lung: lung mask on the same grid.
        spacing: voxel size in mm.
        distance_mm: the subpleural depth.
        slice_axis: see :func:`in_plane_boundary_distance` (ignored in 2D).

    Returns:
        The share in 0..1, NaN for an empty lesion.

    Raises:
        ValueError: shapes differ, bad spacing.

    Example:
        >>> lung = np.ones((30, 30), bool); les = np.zeros_like(lung); les[0:3, 10:20] = True
        >>> subpleural_share(les, lung, (1.0, 1.0))
        1.0
    """
    lesion = np.asarray(lesion) > 0
    lung = np.asarray(lung) > 0
    if lesion.shape != lung.shape:
        raise ValueError(f"lung: shape {lung.shape} differs from the lesion shape {lesion.shape}")
    if not lesion.any():
        return float("nan")
    dist = in_plane_boundary_distance(lung | lesion, spacing, slice_axis)
    return float(np.mean(dist[lesion] <= distance_mm))


def half_share(lesion: np.ndarray, reference: np.ndarray | None, axis: int, towards_high: bool) -> float:
    """Share of lesion voxels in one half of the reference's extent along ``axis``.

    The extent is that of ``reference`` (the lung; the lesion itself when ``None``) from its first
    to its last non-empty index along ``axis``; voxels on the mid-plane count half.

    Args:
        lesion: lesion mask.
        reference: mask giving the extent (lung), or ``None``.
        axis: the axis.
        towards_high: the half towards high indices (``True``) or low ones.

    Returns:
        The share in 0..1 (0.5 = no lean), NaN for an empty lesion.

    Example:
        >>> les = np.zeros((4, 10), bool); les[:, 7:9] = True
        >>> half_share(les, np.ones((4, 10), bool), axis=1, towards_high=True)
        1.0
    """
    lesion = np.asarray(lesion) > 0
    other = tuple(a for a in range(lesion.ndim) if a != axis)
    profile = lesion.sum(axis=other).astype(np.float64)
    total = profile.sum()
    if total == 0:
        return float("nan")
    ref = lesion if reference is None else np.asarray(reference) > 0
    if ref.shape != lesion.shape:
        raise ValueError(f"reference: shape {ref.shape} differs from the lesion shape {lesion.shape}")
    present = np.flatnonzero(ref.any(axis=other))
    if present.size == 0:
        return float("nan")
    mid = 0.5 * (present[0] + present[-1])
    idx = np.arange(profile.size)
    side = idx > mid if towards_high else idx < mid
    return float((profile[side].sum() + 0.5 * profile[idx == mid].sum()) / total)


def side_shares(
    lesion: np.ndarray,
    axcodes: Sequence[str],
    lung: np.ndarray | None = None,
    midline: float | None = None,
) -> tuple[float, float]:
    """Shares of the lesion in the right and in the left lung.

    Lung labels 1 (right) and 2 (left) decide where they are present; otherwise (and for lesion
    voxels outside the labelled lung) the split is at ``midline``: by default the mid-plane of the
    lung's bounding box, or the centre of the array without a lung mask (MosMedData: the patient is
    centred in the field of view).

    Args:
        lesion: 2D or 3D lesion mask.
        axcodes: axis codes (see :func:`axis_codes`); one axis must be L or R.
        lung: optional lung mask (1 right / 2 left, or binary).
        midline: index along the left-right axis of the mid-sagittal plane.

    Returns:
        ``(right_share, left_share)`` summing to 1; ``(nan, nan)`` for an empty lesion.

    Raises:
        ValueError: no left-right axis, shapes differ.

    Example:
        >>> les = np.zeros((10, 4), bool); les[1:3] = True; les[8] = True
        >>> side_shares(les, ("L", "P"))  # index 0 is the patient's right
        (0.6666666666666666, 0.3333333333333333)
    """
    lesion = np.asarray(lesion) > 0
    codes = axis_codes(axcodes=axcodes, ndim=lesion.ndim)
    found = _find_axis(codes, "L")
    if found is None:
        raise ValueError(f"axcodes: no left-right axis in {tuple(axcodes)!r}")
    axis, to_left = found
    total = int(np.count_nonzero(lesion))
    if total == 0:
        return float("nan"), float("nan")
    other = tuple(a for a in range(lesion.ndim) if a != axis)
    labelled = np.zeros(lesion.shape, bool)
    n_right = n_left = 0
    if lung is not None:
        lung = np.asarray(lung)
        if lung.shape != lesion.shape:
            raise ValueError(f"lung: shape {lung.shape} differs from the lesion shape {lesion.shape}")
        if {1, 2} <= set(np.unique(lung).tolist()):
            n_right = int(np.count_nonzero(lesion & (lung == 1)))
            n_left = int(np.count_nonzero(lesion & (lung == 2)))
            labelled = (lung == 1) | (lung == 2)
        if midline is None:
            present = np.flatnonzero((lung > 0).any(axis=other))
            if present.size:
                midline = 0.5 * (present[0] + present[-1])
    if midline is None:
        midline = 0.5 * (lesion.shape[axis] - 1)
    profile = (lesion & ~labelled).sum(axis=other).astype(np.float64)
    idx = np.arange(profile.size)
    high, low = profile[idx > midline].sum(), profile[idx < midline].sum()
    mid = 0.5 * profile[idx == midline].sum()
    left_rest, right_rest = (high + mid, low + mid) if to_left else (low + mid, high + mid)
    return float((n_right + right_rest) / total), float((n_left + left_rest) / total)


def hu_by_label(
    hu: np.ndarray,
    labels: np.ndarray,
    names: Mapping[int, str] | None = None,
    percentiles: Sequence[float] = (5, 25, 50, 75, 95),
) -> dict[str, dict[str, float]]:
    """Percentiles of the HU under each label (GGO = 1, consolidation = 2 by default).

    Args:
        hu: image in HU.
        labels: label image on the same grid.
        names: label value -> name (default ``{1: "ggo", 2: "consolidation"}``).
        percentiles: which percentiles.

    Returns:
        ``{name: {"n": pixels, "mean": ..., "p5": ..., ...}}``; labels absent from the image are
        left out.

    Example:
        >>> hu = np.array([[-600.0, -500.0], [0.0, 20.0]]); lab = np.array([[1, 1], [2, 2]])
        >>> hu_by_label(hu, lab, percentiles=(50,))["ggo"]["p50"]
        -550.0
    """
    hu = np.asarray(hu, dtype=np.float64)
    labels = np.asarray(labels)
    if hu.shape != labels.shape:
        raise ValueError(f"labels: shape {labels.shape} differs from the image shape {hu.shape}")
    names = {1: "ggo", 2: "consolidation"} if names is None else dict(names)
    out: dict[str, dict[str, float]] = {}
    for value, name in names.items():
        vals = hu[labels == value]
        if vals.size == 0:
            continue
        row = {"n": float(vals.size), "mean": float(vals.mean())}
        row.update({f"p{p:g}": float(v) for p, v in zip(percentiles, np.percentile(vals, percentiles))})
        out[name] = row
    return out


def ggo_texture(
    hu: np.ndarray,
    ggo: np.ndarray,
    lung: np.ndarray,
    pixel_mm: float,
    lesion: np.ndarray | None = None,
    *,
    highpass_mm: float = 1.5,
    window_mm: float = 3.0,
    core_mm: float = 3.0,
    factor: float = 2.0,
) -> dict[str, float]:
    """Fine texture of ground glass in a 2D slice: a measurable stand-in for crazy paving.

    Crazy paving is ground glass with superimposed thickened interlobular septa and intralobular
    lines (a reticulation of 1-2 mm lines, 5-20 mm apart; Hansell et al., "Fleischner Society:
    glossary of terms for thoracic imaging", Radiology 246 (2008)). It raises the high-frequency
    content of the GGO. The image minus its Gaussian low-pass (sigma ``highpass_mm``) is the
    high-frequency part; its local RMS over a Gaussian window (sigma ``window_mm``) is the local
    amplitude. The reference is the median amplitude of lesion-free lung on the same slice (image
    noise, reconstruction kernel and JPEG compression cancel in the ratio). Only the GGO core,
    at least ``core_mm`` from any non-GGO pixel, is scored, so lesion margins do not count.

    Args:
        hu: 2D image in HU.
        ggo: GGO mask.
        lung: lung mask.
        pixel_mm: pixel size in mm.
        lesion: the whole lesion mask (GGO and consolidation), excluded from the reference; ``ggo``
            when ``None``.
        highpass_mm: sigma of the low-pass removed.
        window_mm: sigma of the window of the local RMS.
        core_mm: depth of the GGO core.
        factor: a core pixel is reticular when its amplitude exceeds ``factor`` times the reference.

    Returns:
        ``{"texture_ratio": median core amplitude / reference, "reticular_fraction": share of core
        pixels above factor x reference, "core_pixels": n, "reference_hu": reference}``; NaN
        values when the GGO core or the lesion-free lung is empty.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> hu = -850 + 20 * rng.standard_normal((80, 80)); ggo = np.zeros((80, 80), bool)
        >>> ggo[20:60, 40:75] = True; hu[ggo] += 300; hu[20:60:6, 40:75] += 150  # septa
        >>> ggo_texture(hu, ggo, np.ones_like(ggo), 1.0)["texture_ratio"] > 2
        True
    """
    hu = np.asarray(hu, dtype=np.float32)
    ggo = np.asarray(ggo) > 0
    lung = np.asarray(lung) > 0
    if hu.ndim != 2 or ggo.shape != hu.shape or lung.shape != hu.shape:
        raise ValueError(f"ggo_texture: expected 2D image and masks of one shape, got {hu.shape}, {ggo.shape}, "
                         f"{lung.shape}")
    if not (math.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel_mm: expected a positive size in mm, got {pixel_mm!r}")
    lesion = ggo if lesion is None else (np.asarray(lesion) > 0) | ggo
    hp = hu - ndi.gaussian_filter(hu, highpass_mm / pixel_mm, mode="nearest")
    amp = np.sqrt(ndi.gaussian_filter(hp * hp, window_mm / pixel_mm, mode="nearest"))
    core = ndi.distance_transform_edt(ggo) * pixel_mm >= core_mm
    clear = lung & ~lesion
    healthy = clear & (ndi.distance_transform_edt(np.pad(clear, 1))[1:-1, 1:-1] * pixel_mm >= core_mm)
    nan = float("nan")
    if not core.any() or not healthy.any():
        return {"texture_ratio": nan, "reticular_fraction": nan, "core_pixels": float(core.sum()), "reference_hu": nan}
    ref = float(np.median(amp[healthy]))
    vals = amp[core]
    return {
        "texture_ratio": float(np.median(vals) / ref) if ref > 0 else nan,
        "reticular_fraction": float(np.mean(vals > factor * ref)) if ref > 0 else nan,
        "core_pixels": float(core.sum()),
        "reference_hu": ref,
    }


def study_statistics(
    lesion: np.ndarray,
    spacing: Sequence[float],
    *,
    lung: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    axcodes: Sequence[str] | None = None,
    connectivity: int | None = None,
    min_component_ml: float = 0.1,
    subpleural_mm: float = SUBPLEURAL_MM,
    midline: float | None = None,
) -> dict[str, Any]:
    """Shape statistics of one 3D lesion mask (a study).

    Args:
        lesion: 3D lesion mask (non-zero = lesion).
        spacing: voxel size in mm.
        lung: optional lung mask (1 right / 2 left, or binary) on the same grid.
        affine: RAS affine giving the orientation (or ``axcodes``).
        axcodes: axis codes such as ``("L", "A", "S")`` (MosMedData) or ``("L", "P", "S")``.
        connectivity: component connectivity (see :func:`component_sizes`; default 26 neighbours).
        min_component_ml: components at least this large are counted in ``n_components_min``.
        subpleural_mm: subpleural depth (in-plane).
        midline: left-right split index without lung labels (see :func:`side_shares`).

    Returns:
        A JSON-ready dict: ``lesion_ml``, ``n_components``, ``n_components_min``,
        ``component_ml`` (sizes, largest first), ``largest_share`` (largest component / lesion),
        ``slices_with_lesion``, ``components_per_slice`` (median, over the slices with at least
        100 mm2 of lesion, of the in-plane components of at least 10 mm2),
        ``lower_share_lesion_range``, ``right_share``, ``left_share``, ``bilateral``; with a lung
        mask also ``lung_ml``, ``load_percent``, ``lower_share``, ``posterior_share``,
        ``subpleural_share``, and the same three shares for the lung itself (``lung_lower_share``,
        ``lung_posterior_share``, ``lung_subpleural_share``: what a lesion without any lean would
        give). Shares are NaN for an empty lesion.

    Raises:
        ValueError: bad shapes, spacing or orientation.

    Example:
        >>> m = np.zeros((40, 40, 10), np.uint8); m[2:6, 5:9, 2:4] = 1; m[30:34, 5:9, 2:4] = 1
        >>> s = study_statistics(m, (1.0, 1.0, 8.0), axcodes=("L", "A", "S"), min_component_ml=0.1)
        >>> s["n_components"], s["component_ml"], s["bilateral"]
        (2, [0.256, 0.256], True)
    """
    lesion = np.asarray(lesion) > 0
    if lesion.ndim != 3:
        raise ValueError(f"lesion: expected a 3D mask, got shape {lesion.shape}")
    spc = _check_spacing(spacing, 3)
    codes = axis_codes(affine, axcodes, 3)
    z_axis, z_up = _find_axis(codes, "S")
    lr_axis = _find_axis(codes, "L")[0]
    lung_arr = None if lung is None else np.asarray(lung)
    if lung_arr is not None and lung_arr.shape != lesion.shape:
        raise ValueError(f"lung: shape {lung_arr.shape} differs from the lesion shape {lesion.shape}")
    if midline is None and lung_arr is None:
        midline = 0.5 * (lesion.shape[lr_axis] - 1)  # the image centre
    # crop to the lesion and lung (one voxel of margin): every statistic is unchanged, and faster
    region = lesion if lung_arr is None else lesion | (lung_arr > 0)
    if region.any():
        box = []
        for a in range(3):
            idx = np.flatnonzero(region.any(axis=tuple(b for b in range(3) if b != a)))
            box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
        lesion = lesion[tuple(box)]
        lung_arr = None if lung_arr is None else lung_arr[tuple(box)]
        if midline is not None:
            midline = float(midline) - box[lr_axis].start
    lung = lung_arr
    sizes = component_sizes(lesion, spc, connectivity) / 1000.0
    voxel_ml = float(np.prod(spc)) / 1000.0
    n_les = int(np.count_nonzero(lesion))
    other = tuple(a for a in range(3) if a != z_axis)
    right, left = side_shares(lesion, codes, lung, midline)
    plane_spc = tuple(sp for a, sp in enumerate(spc) if a != z_axis)
    planes = np.moveaxis(lesion, z_axis, 0)
    per_slice = []
    for k in np.flatnonzero(lesion.sum(axis=other) * float(np.prod(plane_spc)) >= 100.0):
        per_slice.append(int(np.count_nonzero(component_sizes(planes[k], plane_spc) >= 10.0)))
    out: dict[str, Any] = {
        "lesion_ml": n_les * voxel_ml,
        "n_components": int(sizes.size),
        "n_components_min": int(np.count_nonzero(sizes >= min_component_ml)),
        "component_ml": [round(float(s), 4) for s in sizes],
        "largest_share": float(sizes[0] / sizes.sum()) if sizes.size else float("nan"),
        "slices_with_lesion": int(np.count_nonzero(lesion.any(axis=other))),
        "components_per_slice": float(np.median(per_slice)) if per_slice else float("nan"),
        "lower_share_lesion_range": half_share(lesion, None, z_axis, towards_high=not z_up),
        "right_share": right,
        "left_share": left,
        "bilateral": bool(n_les and min(right, left) >= BILATERAL_MIN_SHARE),
    }
    if lung_arr is not None:
        lung_b = lung_arr > 0
        post_axis, post_up = _find_axis(codes, "P")
        n_lung = int(np.count_nonzero(lung_b | lesion))
        dist = in_plane_boundary_distance(lung_b | lesion, spc, z_axis)
        out.update(
            lung_ml=n_lung * voxel_ml,
            load_percent=100.0 * n_les / n_lung if n_lung else float("nan"),
            lower_share=half_share(lesion, lung_b, z_axis, towards_high=not z_up),
            posterior_share=half_share(lesion, lung_b, post_axis, towards_high=post_up),
            subpleural_share=float(np.mean(dist[lesion] <= subpleural_mm)) if n_les else float("nan"),
            lung_subpleural_share=float(np.mean(dist[lung_b | lesion] <= subpleural_mm)),
            lung_lower_share=half_share(lung_b, lung_b, z_axis, towards_high=not z_up),
            lung_posterior_share=half_share(lung_b, lung_b, post_axis, towards_high=post_up),
        )
    return out


def slice_statistics(
    lesion: np.ndarray,
    lung: np.ndarray,
    pixel_mm: float,
    *,
    axcodes: Sequence[str] = ("L", "P"),
    hu: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    subpleural_mm: float = SUBPLEURAL_MM,
    min_component_mm2: float = 10.0,
) -> dict[str, Any]:
    """Shape, density and texture statistics of one 2D axial slice.

    Args:
        lesion: 2D lesion mask.
        lung: 2D lung mask (1 right / 2 left, or binary); joined with the lesion.
        pixel_mm: pixel size in mm (square pixels).
        axcodes: in-plane axis codes; MedSeg / Inf-Net JPEGs are ``("L", "P")`` (rows towards the
            patient's left, columns towards the back), as is an ``[x, y]`` slice of an LPS volume.
        hu: optional image in HU (for the HU and texture statistics).
        labels: optional GGO (1) / consolidation (2) labels; without them the whole lesion is GGO.
        subpleural_mm: subpleural depth.
        min_component_mm2: components at least this large are counted in ``n_components_min``.

    Returns:
        A dict: ``load_percent`` (lesion / lung area), ``n_components``, ``n_components_min``,
        ``subpleural_share``, ``posterior_share``, ``right_share``, ``left_share``, ``bilateral``,
        and the same two shares for the whole lung (``lung_subpleural_share``,
        ``lung_posterior_share``: what a lesion without any lean would give);
        with ``labels``: ``consolidation_share``; with ``hu``: ``hu`` (see :func:`hu_by_label`)
        and the :func:`ggo_texture` values.

    Raises:
        ValueError: shapes differ, bad pixel size or orientation.

    Example:
        >>> lung = np.zeros((60, 40), np.uint8); lung[5:28, 5:35] = 1; lung[32:55, 5:35] = 2
        >>> les = np.zeros(lung.shape, bool); les[6:10, 28:34] = True
        >>> s = slice_statistics(les, lung, 1.0)
        >>> s["subpleural_share"], s["posterior_share"], s["bilateral"]
        (1.0, 1.0, False)
    """
    lesion = np.asarray(lesion) > 0
    lung = np.asarray(lung)
    if lesion.ndim != 2 or lung.shape != lesion.shape:
        raise ValueError(f"slice_statistics: expected 2D lesion and lung masks of one shape, got {lesion.shape}, "
                         f"{lung.shape}")
    if not (math.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel_mm: expected a positive size in mm, got {pixel_mm!r}")
    codes = axis_codes(axcodes=axcodes, ndim=2)
    found = _find_axis(codes, "P")
    if found is None:
        raise ValueError(f"axcodes: no anterior-posterior axis in {tuple(axcodes)!r}")
    post_axis, post_up = found
    lung_b = (lung > 0) | lesion
    sizes = component_sizes(lesion, (pixel_mm, pixel_mm))
    right, left = side_shares(lesion, codes, lung)
    n_les = int(np.count_nonzero(lesion))
    dist = in_plane_boundary_distance(lung_b, (pixel_mm, pixel_mm))
    out: dict[str, Any] = {
        "load_percent": 100.0 * n_les / max(int(np.count_nonzero(lung_b)), 1),
        "n_components": int(sizes.size),
        "n_components_min": int(np.count_nonzero(sizes >= min_component_mm2)),
        "subpleural_share": float(np.mean(dist[lesion] <= subpleural_mm)) if n_les else float("nan"),
        "posterior_share": half_share(lesion, lung_b, post_axis, towards_high=post_up),
        "lung_subpleural_share": float(np.mean(dist[lung_b] <= subpleural_mm)),
        "lung_posterior_share": half_share(lung_b, lung_b, post_axis, towards_high=post_up),
        "right_share": right,
        "left_share": left,
        "bilateral": bool(n_les and min(right, left) >= BILATERAL_MIN_SHARE),
    }
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != lesion.shape:
            raise ValueError(f"labels: shape {lab.shape} differs from the lesion shape {lesion.shape}")
        lab = np.where(lesion, np.where(lab == 2, 2, 1), 0)
        out["consolidation_share"] = float(np.count_nonzero(lab == 2) / n_les) if n_les else float("nan")
    if hu is not None:
        hu = np.asarray(hu, dtype=np.float32)
        if hu.shape != lesion.shape:
            raise ValueError(f"hu: shape {hu.shape} differs from the lesion shape {lesion.shape}")
        lab = lesion.astype(np.uint8) if lab is None else lab
        out["hu"] = hu_by_label(hu, lab)
        out.update(ggo_texture(hu, lab == 1, lung_b, pixel_mm, lesion))
    return out
