"""From evidence to severity: lesion masks, lesion share of the lung, CT-0..CT-4, lesion components.

Two kinds of evidence turn into a lesion mask:

- a heatmap from an attribution method, normalized jointly over the study and thresholded
  (rule ``heatmap``, as in the IBA paper), optionally intersected with abnormal attenuation:
  absolute (rule ``heatmap-density``: -750..+100 HU; rule ``heatmap-dependent``: the same with the lower
  bound raised by the study's own gravity-dependent density, :func:`dependent_shift`, so that the dense
  posterior lung of a shallow-breathing supine scan stays out) or relative to the study's own normal lung
  (rule ``heatmap-relative``: at least ``density_delta_hu`` above the level of the study's aerated
  lung, the lowest prominent peak of its histogram, on the CT smoothed over 1 mm, so that neither the
  scanner's HU calibration, the breathing level, a dense normal lung nor the kernel's noise moves the
  boundary);
  with either, the heatmap region may be grown through the abnormal attenuation it lies in by up to
  ``grow_mm`` (a geodesic dilation inside the opacity): the heatmap says which opacities are lesions,
  the attenuation how far they reach. A map more compact than the lesion (IBA keeps only the
  evidence the prediction needs: at 50-75 % loads its thresholded map covered two thirds of the
  lesions) no longer caps the lesion's extent, while opacities far from any heat (dependent density
  at the other end of the lung) stay out;
- abnormal attenuation alone (method ``density``), the classical quantitative-CT baseline, with
  the relative rule: lung voxels ``density_delta_hu`` above the study's normal lung level, vessels
  removed by a morphological opening (vessels are thin tubes; ground-glass opacities and
  consolidations are blobs).

In every case components smaller than a minimum volume are removed; the lesion share is lesion
voxels over lung voxels, and the grade follows the MosMedData table (see ../shared/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage import measure

from monai_ext.data.scanner import posterior_height
from monai_ext.data.studies import grade_from_percent

__all__ = [
    "LESION_RULES",
    "ATTENUATION_RULES",
    "geodesic_steps",
    "grow_within",
    "grow_levels",
    "DENSITY_HU",
    "DEFAULT_DELTA_HU",
    "abnormal_attenuation",
    "normal_lung_level",
    "dependent_shift",
    "DEPENDENT_BANDS_MM",
    "relative_attenuation",
    "lesion_mask_from_heatmap",
    "remove_small_components",
    "lesion_components",
    "SeverityResult",
    "severity",
    "grade_from_percent",
]

LESION_RULES = ("heatmap", "heatmap-density", "heatmap-dependent", "heatmap-relative")
#: the rules that intersect the map with abnormal attenuation (and may grow through it)
ATTENUATION_RULES = ("heatmap-density", "heatmap-dependent", "heatmap-relative")
#: attenuation of ground glass (about -750..-300 HU) up to consolidation (about -100..+60 HU)
DENSITY_HU = (-750.0, 100.0)
#: default rise above the study's normal lung level that counts as abnormal (relative rule)
DEFAULT_DELTA_HU = 200.0
#: height bands (mm above the posterior lung edge) of :func:`dependent_shift`; lung above the last is the reference
DEPENDENT_BANDS_MM = (0.0, 5.0, 10.0, 20.0, 30.0, 45.0)


def _np(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.as_tensor() if hasattr(a, "as_tensor") else a
        a = a.numpy()
    a = np.asarray(a)
    return a[0] if a.ndim == 4 else a


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    r = [max(0, int(round(radius_mm / float(s)))) for s in spacing]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g / max(radius_mm / float(s), 1e-6)) ** 2 for g, s in zip(grids, spacing)) <= 1.0


def abnormal_attenuation(ct: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, spacing: Sequence[float],
                         hu_range: Sequence[float] = DENSITY_HU, vessel_radius_mm: float = 2.0,
                         smooth_mm: float = 1.0, dependent: bool = False) -> np.ndarray:
    """Lung voxels of abnormal attenuation with vessels removed (boolean, same grid).

    Args:
        ct: CT in HU, (X, Y, Z) or (1, X, Y, Z).
        lung: lung mask on the same grid.
        spacing: voxel size in mm.
        hu_range: attenuation counted as abnormal.
        vessel_radius_mm: structures thinner than about twice this radius (vessels, fissures,
            airway walls) are removed by a morphological opening in the axial plane.
        smooth_mm: Gaussian sigma of the smoothing before the threshold, as in
            :func:`relative_attenuation`: a sharp lung kernel's noise (tens of HU, voxel to voxel)
            scatters ground glass out of the band, and the opening then erases what is left (20 %
            inserted ground glass and consolidation under a B70f-like kernel: 3.5 % of the lung read
            raw, 22.5 % after 1 mm; 16.4 and 23.5 % under a smooth kernel). 0: the raw CT.
        dependent: raise the lower bound by the study's own dependent density (:func:`dependent_shift`,
            RAS axes), so that the normal posterior lung of a dense-lung scan stays out of the band.

    Returns:
        Boolean mask of abnormal lung parenchyma.
    """
    img, m = _np(ct), _np(lung) > 0
    out = np.zeros(m.shape, dtype=bool)
    if not m.any():
        return out
    box = _lung_box(m)
    sm = _smoothed(img[box], spacing, smooth_mm)
    lower = np.float32(hu_range[0])
    if dependent:
        lower = lower + _box_shift(sm, m[box], spacing)
    dense = m[box] & (sm >= lower) & (sm <= hu_range[1])
    if vessel_radius_mm > 0:
        # open slice by slice with an in-plane disc: thin tubes vanish, blobs stay
        disc = _ball(vessel_radius_mm, spacing[:2])[:, :, None]
        dense = ndi.binary_opening(dense, structure=disc)
    out[box] = dense & m[box]
    return out


def _lung_box(m: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    idx = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    return tuple(slice(max(0, int(i[0]) - margin), min(n, int(i[-1]) + 1 + margin)) for i, n in zip(idx, m.shape))


def _smoothed(img: np.ndarray, spacing: Sequence[float], smooth_mm: float) -> np.ndarray:
    img = img.astype(np.float32)
    if smooth_mm <= 0:
        return img
    sigma = [smooth_mm / float(s) for s in spacing[:2]] + [min(smooth_mm / float(spacing[2]), 0.5)]
    return ndi.gaussian_filter(img, sigma, mode="nearest")


def _histogram_level(values: np.ndarray, fallback_hu: float, min_peak: float) -> float:
    """The lowest prominent peak of smoothed-CT values below -600 HU (:func:`normal_lung_level`)."""
    low = values[(values < -600.0) & (values > -1100.0)]
    if low.size < max(50, 0.02 * values.size):
        return float(fallback_hu)
    hist, edges = np.histogram(low, bins=np.arange(-1100.0, -595.0, 5.0))
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), 2.0)
    peak = (hist >= np.maximum(np.r_[-1.0, hist[:-1]], np.r_[hist[1:], -1.0])) & (hist >= min_peak * hist.max())
    k = int(np.flatnonzero(peak)[0])
    return float(0.5 * (edges[k] + edges[k + 1]))


def normal_lung_level(ct: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, spacing: Sequence[float],
                      smooth_mm: float = 1.0, fallback_hu: float = -850.0, min_peak: float = 0.25) -> float:
    """The study's normal aerated lung level: the lowest prominent peak of the lung's HU histogram below
    -600 HU, on the CT smoothed over ``smooth_mm``.

    Normal aerated lung is the least dense parenchyma of a study; ground glass, dependent density and vessels
    only add mass above it. So the level is the lowest local maximum of the smoothed histogram (5 HU bins)
    that reaches ``min_peak`` of the highest one, not the highest one itself: once most of the lung is
    ground glass the highest peak is the lesion's (70 % of a smooth-kernel CT as inserted lesions: highest
    peak at -602 HU, lowest prominent peak at -858 HU, the clean CT's -828). The level follows the bulk of
    aerated lung whatever the scanner's calibration, the breathing level or the kernel, while some
    aerated lung is left (at least 2 % of the lung below -600 HU, else ``fallback_hu``).

    Returns:
        The level in HU.
    """
    img, m = _np(ct), _np(lung) > 0
    if not m.any():
        return float(fallback_hu)
    box = _lung_box(m)
    sm = _smoothed(img[box], spacing, smooth_mm)[m[box]]
    return _histogram_level(sm, fallback_hu, min_peak)


def dependent_shift(ct: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, spacing: Sequence[float],
                    smooth_mm: float = 1.0, bands_mm: Sequence[float] = DEPENDENT_BANDS_MM,
                    max_shift_hu: float = 120.0, posterior_axis: int = 1, posterior_low: bool = True
                    ) -> np.ndarray:
    """How much denser than the rest of the lung the study's own normal lung is near the posterior pleura
    (gravity-dependent density of a supine patient), per voxel, in HU (float32, 0 outside the lung).

    Each lung voxel's height is its distance above the most posterior lung voxel of its column. The normal
    lung level (:func:`normal_lung_level`'s lowest prominent histogram peak) is measured in each height band
    of ``bands_mm`` and in the lung above the last band (the reference); a band's shift is its level minus
    the reference, at least 0, and interpolated linearly between band centres. A lung without a dependent
    gradient (prone, or a deep inspiration) gets 0 everywhere. Lesions in the dependent lung raise a band's
    level only once they outnumber its aerated lung (the lowest peak is the aerated lung's); a band more
    than ``max_shift_hu`` above the reference is taken for disease, not gravity, and gets 0 (85 % of a
    smooth-kernel CT as ground glass: every band under 45 mm 190-240 HU above the lung over it; the clean
    CT: 34-94 HU).

    Args:
        ct: CT in HU, (X, Y, Z) or (1, X, Y, Z), axes as ``posterior_axis`` says (RAS: y grows anterior).
        lung: lung mask on the same grid.
        spacing: voxel size in mm.
        smooth_mm: Gaussian sigma of the smoothing before the histograms.
        bands_mm: height band edges above the posterior lung edge.
        max_shift_hu: the largest shift taken for gravity (dependent density is 30-120 HU; more is disease).
        posterior_axis: the array axis from posterior to anterior.
        posterior_low: the posterior side is at low indices of that axis (RAS).

    Returns:
        The shift map.
    """
    img, m = _np(ct), _np(lung) > 0
    out = np.zeros(m.shape, dtype=np.float32)
    if not m.any():
        return out
    box = _lung_box(m)
    out[box] = _box_shift(_smoothed(img[box], spacing, smooth_mm), m[box], spacing, bands_mm, max_shift_hu,
                          posterior_axis, posterior_low)
    return out


def _box_shift(sm: np.ndarray, mb: np.ndarray, spacing: Sequence[float], bands_mm: Sequence[float] = DEPENDENT_BANDS_MM,
               max_shift_hu: float = 120.0, posterior_axis: int = 1, posterior_low: bool = True) -> np.ndarray:
    """:func:`dependent_shift` on the smoothed CT and the lung of the lung's box."""
    sub = np.zeros(mb.shape, np.float32)
    height = posterior_height(mb, spacing, posterior_axis, posterior_low)
    edges = [float(b) for b in bands_mm]
    reference = _histogram_level(sm[mb & (height >= edges[-1])], np.nan, 0.25)
    if not np.isfinite(reference):
        return sub
    centres, shifts = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        level = _histogram_level(sm[mb & (height >= lo) & (height < hi)], np.nan, 0.25)
        centres.append(0.5 * (lo + hi))
        rise = level - reference if np.isfinite(level) else 0.0
        shifts.append(float(rise) if 0.0 < rise <= max_shift_hu else 0.0)
    centres.append(edges[-1])
    shifts.append(0.0)
    shift = np.interp(height[mb], centres, shifts).astype(np.float32)
    sub[mb] = shift
    return sub


def relative_attenuation(ct: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, spacing: Sequence[float],
                         delta_hu: float = DEFAULT_DELTA_HU, max_hu: float = DENSITY_HU[1], smooth_mm: float = 1.0,
                         vessel_radius_mm: float = 2.0, level: float | None = None) -> np.ndarray:
    """Lung voxels at least ``delta_hu`` above the study's normal lung level (boolean, same grid).

    Args:
        ct: CT in HU, (X, Y, Z) or (1, X, Y, Z).
        lung: lung mask on the same grid.
        spacing: voxel size in mm.
        delta_hu: rise above the normal lung level that counts as abnormal (ground glass lies about
            200-500 HU above aerated lung, consolidation 800 and more).
        max_hu: voxels above this (bone, contrast-filled vessels, calcium) never count.
        smooth_mm: Gaussian sigma of the smoothing before the threshold (in-plane; at most half a
            slice in z): it takes the kernel's noise out.
        vessel_radius_mm: as in :func:`abnormal_attenuation`.
        level: the normal lung level, if already known (:func:`normal_lung_level`).

    Returns:
        Boolean mask of abnormal lung parenchyma.
    """
    img, m = _np(ct), _np(lung) > 0
    out = np.zeros(m.shape, dtype=bool)
    if not m.any():
        return out
    lvl = normal_lung_level(img, m, spacing, smooth_mm) if level is None else float(level)
    box = _lung_box(m)
    sm = _smoothed(img[box], spacing, smooth_mm)
    dense = m[box] & (sm >= lvl + float(delta_hu)) & (sm <= max_hu)
    if vessel_radius_mm > 0:
        disc = _ball(vessel_radius_mm, spacing[:2])[:, :, None]
        dense = ndi.binary_opening(dense, structure=disc)
    out[box] = dense & m[box]
    return out


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_volume_ml: float) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_volume_ml``."""
    mask = np.asarray(mask, dtype=bool)
    if min_volume_ml <= 0 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml
    keep = sizes >= min_volume_ml
    keep[0] = False
    return keep[labels]


def geodesic_steps(spacing: Sequence[float], grow_mm: float) -> list[np.ndarray]:
    """The structuring elements of a geodesic dilation by ``grow_mm``: one in-plane cross per in-plane voxel
    and a 3D cross whenever the steps have covered another slice, so that the growth is about
    ``grow_mm`` in every direction on an anisotropic grid."""
    if grow_mm <= 0:
        return []
    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    full = ndi.generate_binary_structure(3, 1)
    step_xy = float(min(spacing[:2]))
    n = int(round(grow_mm / step_xy))
    steps, covered = [], 0.0
    for _ in range(n):
        covered += step_xy
        if covered >= float(spacing[2]):
            covered -= float(spacing[2])
            steps.append(full)
        else:
            steps.append(plane)
    return steps


def grow_within(seed: np.ndarray, mask: np.ndarray, spacing: Sequence[float], grow_mm: float) -> np.ndarray:
    """``seed`` grown inside ``mask`` by up to ``grow_mm`` along paths that stay in ``mask`` (geodesic dilation)."""
    mask = np.asarray(mask, dtype=bool)
    out = np.asarray(seed, dtype=bool) & mask
    for st in geodesic_steps(spacing, grow_mm):
        out = ndi.binary_dilation(out, structure=st, mask=mask)
    return out


def _max_step(g: np.ndarray, z_too: bool) -> np.ndarray:
    """Grey dilation of ``g`` with the in-plane cross (and the z neighbours when ``z_too``), as shifted maxima:
    several times faster than ``ndimage.grey_dilation`` with a footprint."""
    out = g.copy()
    for axis in (0, 1, 2) if z_too else (0, 1):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        np.maximum(out[tuple(lo)], g[tuple(hi)], out=out[tuple(lo)])
        np.maximum(out[tuple(hi)], g[tuple(lo)], out=out[tuple(hi)])
    return out


def grow_levels(heat: np.ndarray, mask: np.ndarray, spacing: Sequence[float], radii: Sequence[float]
                ) -> dict[float, np.ndarray]:
    """For each radius ``r``, the highest heat reachable inside ``mask`` within ``r`` (grey geodesic dilation):
    ``grow_levels(...)[r] >= t`` equals ``grow_within(heat >= t, mask, spacing, r)`` for every ``t > 0``, so a
    grid of thresholds costs one dilation per radius (used by calibration)."""
    mask = np.asarray(mask, dtype=bool)
    g = np.where(mask, np.asarray(heat, dtype=np.float32), 0.0).astype(np.float32)
    out, done = {}, 0
    radii = sorted(float(r) for r in radii)
    steps = geodesic_steps(spacing, radii[-1]) if radii else []
    for r in radii:
        k = len(geodesic_steps(spacing, r))
        for st in steps[done:k]:
            g = _max_step(g, bool(st[1, 1, 0]))
            g[~mask] = 0.0
        done = k
        out[r] = g.copy()
    return out


def lesion_mask_from_heatmap(heat: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, threshold: float,
                             rule: str = "heatmap", ct: np.ndarray | torch.Tensor | None = None,
                             spacing: Sequence[float] = (1.0, 1.0, 1.0), min_volume_ml: float = 0.0,
                             density_hu: Sequence[float] = DENSITY_HU,
                             density_delta_hu: float = DEFAULT_DELTA_HU, grow_mm: float = 0.0) -> np.ndarray:
    """Lesion mask from a study-normalized heatmap in [0, 1].

    Args:
        heat: heatmap on the CT grid, normalized jointly over the study (``normalize_study``).
        lung: lung mask.
        threshold: heatmap level above which a lung voxel is lesion.
        rule: ``"heatmap"`` (the heatmap region alone), ``"heatmap-density"`` (intersected with
            absolute abnormal attenuation; needs ``ct``), ``"heatmap-dependent"`` (the same with the band's
            lower bound raised by the study's dependent density; ``ct`` in RAS axes) or ``"heatmap-relative"``
            (intersected with attenuation ``density_delta_hu`` above the study's normal lung; needs ``ct``).
        ct: CT in HU, for the density rules.
        spacing: voxel size in mm.
        min_volume_ml: components below this volume are removed.
        density_hu: the absolute range of ``heatmap-density``.
        density_delta_hu: the rise of ``heatmap-relative``.
        grow_mm: density rules: the lesion grows from the heatmap region through the abnormal attenuation
            by up to this distance (0: the intersection only).

    Raises:
        ValueError: unknown rule, or a density rule without the CT.
    """
    if rule not in LESION_RULES:
        raise ValueError(f"lesion rule must be one of {', '.join(LESION_RULES)}, got {rule!r}")
    h, m = _np(heat), _np(lung) > 0
    lesion = (h >= threshold) & m & (h > 0)
    if rule in ATTENUATION_RULES:
        if ct is None:
            raise ValueError(f"the {rule} rule needs the CT")
        if rule == "heatmap-relative":
            opacity = relative_attenuation(ct, m, spacing, density_delta_hu)
        else:
            opacity = abnormal_attenuation(ct, m, spacing, density_hu, dependent=rule == "heatmap-dependent")
        if grow_mm > 0 and m.any():  # the growth stays in the opacity, hence in the lung: work in the lung's box
            box = _lung_box(m)
            lesion[box] = grow_within(lesion[box], opacity[box], spacing, grow_mm)
        else:
            lesion &= opacity
    return remove_small_components(lesion, spacing, min_volume_ml)


def lesion_components(lesion: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None,
                      max_listed: int = 50) -> list[dict]:
    """Connected lesion components (26-connectivity), largest first.

    Returns:
        One dict per component: ``volume_ml``, ``voxels``, ``centroid_voxel`` (on the grid of
        ``lesion``) and ``centroid_mm`` (world coordinates through ``affine``, RAS for MONAI
        affines), at most ``max_listed`` components.
    """
    lab = measure.label(np.asarray(lesion, dtype=bool), connectivity=3)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    props = sorted(measure.regionprops(lab), key=lambda p: -p.area)
    out = []
    for p in props[:max_listed]:
        c = np.asarray(p.centroid, dtype=float)
        item = {"voxels": int(p.area), "volume_ml": round(float(p.area) * voxel_ml, 3),
                "centroid_voxel": [round(float(v), 2) for v in c]}
        if affine is not None:
            aff = np.asarray(affine, dtype=float)
            item["centroid_mm"] = [round(float(v), 2) for v in aff[:3, :3] @ c + aff[:3, 3]]
        out.append(item)
    return out


@dataclass
class SeverityResult:
    """Lesion share, grade, volumes and components of one study."""

    lesion_percent: float
    grade: str
    lung_volume_ml: float
    lesion_volume_ml: float
    n_lesions: int
    lesions: list[dict]

    def to_dict(self) -> dict:
        return {"lesion_percent": round(self.lesion_percent, 3), "grade": self.grade,
                "lung_volume_ml": round(self.lung_volume_ml, 2), "lesion_volume_ml": round(self.lesion_volume_ml, 2),
                "n_lesions": self.n_lesions, "lesions": self.lesions}


def severity(lesion: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, spacing: Sequence[float],
             affine: np.ndarray | None = None) -> SeverityResult:
    """Lesion percent of lung volume, grade CT-0..CT-4, volumes and components.

    Lesion voxels outside the lung do not count.
    """
    m = _np(lung) > 0
    les = (_np(lesion) > 0) & m
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_lung = int(m.sum())
    if n_lung == 0:
        raise ValueError("the lung mask is empty")
    n_les = int(les.sum())
    pct = 100.0 * n_les / n_lung
    comps = lesion_components(les, spacing, affine) if n_les else []
    n_comp = int(measure.label(les, connectivity=3).max()) if n_les else 0
    return SeverityResult(pct, grade_from_percent(pct), n_lung * voxel_ml, n_les * voxel_ml, n_comp, comps)
