"""Insertion of COVID-19-like lesions into a chest CT with a lung mask.

:func:`insert_lesions` grows ground-glass opacities (GGO) and consolidations inside the lung mask
until they fill a requested share of the lung volume, and returns the new image with the lesion
mask. It works the same on the procedural phantom of :mod:`monai_ext.data.synthetic` and on real
CT: shapes and textures are defined in millimetres and Hounsfield units, and the host image's own
noise and fine structure are kept.

Shape. A propensity field is computed over the lung: smooth random fields at two scales plus
biases towards the pleura (mostly the costal pleura), the lower and the posterior lung, the
pattern reported for COVID-19 pneumonia (peripheral, subpleural, bilateral, multifocal, lower-lobe
and posterior predominance; Bernheim et al., Radiology 295 (2020); Chung et al., Radiology 295
(2020)). In each lung, the voxels with the highest propensity become lesion, so the lesion share
is met to the voxel: lesions are unions of smooth blobs restricted to the lung mask.

Appearance. The image is split into a low-pass part ``B`` (anatomy) and the rest ``N`` (noise and
fine detail). In a lesion ``B`` is raised to the lesion density with a soft maximum, and ``N`` is
added back: GGO (-750..-300 HU, textured, denser in the core, sometimes with a crazy-paving
reticulation) leaves the vessels visible, consolidation (-200..+20 HU) hides most of them. Margins
are blurred over a few millimetres; the lesion mask is where the lesion reaches at least half of
its density (the faint rim outside it is not counted).

Fitted parameters (``_FIT``). The per-study draws were fitted to statistics of real annotations,
measured with :mod:`monai_ext.data.lesion_stats` by ``scripts/lesion_stats.py`` (numbers only;
no mask or image was copied): the 50 MosMedData CT-1 lesion masks (Morozov et al.,
arXiv:2005.06465; 8 mm slices; the generator is measured at the same slice spacing, on volumes
matched to theirs) and the 98 MedSeg slices with GGO/consolidation labels (Fan et al., Inf-Net,
IEEE TMI 2020; HU read from 8-bit JPEGs with the assumed window -1100..250 HU; generator slices
paired by slice lesion load). Old values in brackets; real figures are medians [IQR]:

- ``cell_mm`` 18..28 [9..14] and ``w_fine`` 0.7 [0.5]: fewer, larger lesions. MosMed has 11.5
  [5, 18] components of at least 0.1 ml per study and the largest holds 0.55 [0.35, 0.81] of the
  lesion; the old generator gave 25.5 and 0.28 at the same volumes, the fitted one about 10 and
  0.45-0.5. Its lesions are still more even in size (components >= 0.1 ml: 1.9 ml median against
  0.57) and reach more 8 mm slices (about 22 against 15.5).
- ``w_pleura`` 0.4..0.8 [0.5..0.9], ``w_periph`` 0..0.3 [0.3..0.7]: a milder peripheral lean.
  MedSeg has 0.43 of the lesion area within 10 mm of the lung boundary where the lung itself has
  0.41 (MosMed study 0255, the one with a lung mask: 0.25 against 0.39); the old generator put
  0.6-0.7 there at loads under 10 %, the fitted one 0.4 (0.5-0.6 in 3D at 1-3 % load).
- ``w_low`` 0.6..1.4 [0.4..1.0]: keeps the lower-lung lean with the larger cells (MosMed: 0.62 of
  the lesion in the lower half of its own slice range; the generator 0.63). ``w_post`` unchanged
  (MedSeg posterior-half share 0.64 per slice; the generator 0.58-0.64, but 0.83 under 10 % slice
  load where MedSeg has 0.55).
- ``side_sd`` 0.8 [0.3], ``unilateral_p`` 0.1 [0.35]: MosMed's less affected lung holds 0.23
  [0.04, 0.35] of the lesion and 90 % of the studies are bilateral (old: 0.31 and 72 %).
- ``ggo_hu`` -760..-500 [-640..-420], ``ggo_core_hu`` 40..200 [40..140]: MedSeg GGO pixels are at
  -798 / -571 / -285 HU (10th / 50th / 90th percentile; old generator -627 / -466 / -320).
- ``cons_hu`` -200..20 [-50..20]: MedSeg consolidation labels are at -205 HU median (-602..128);
  the generator keeps consolidation denser (about -90 HU median), the labels' low tail being
  partly GGO and air inside the labelled areas.
- ``cons_share``: a Beta draw with mean ``0.2 + 0.15 * fraction`` and concentration 6, clipped to
  0..0.9 [``0.05 + 0.4 * fraction`` + N(0, 0.05), 0.02..0.6]: MedSeg slices have 0.24 [0.02, 0.48]
  of their lesion area consolidated, 0.11 under 10 % slice load and 0.25-0.30 above (the
  generator: 0.21 [0.10, 0.46]).
- ``paving_p`` 0.15 [0.4], ``paving_hu`` 40..120 [60..160]: 4-7 % of the MedSeg slices have more
  than 5 % of their GGO core with a fine reticulation (local high-pass amplitude over twice that of
  clear lung, :func:`~monai_ext.data.lesion_stats.ggo_texture`); in the generator that measure is
  dominated by the host CT's own vessels, so this one is set from the share, not fitted.

Array convention: volumes indexed ``[x, y, z]`` with ``x`` towards the patient's left, ``y``
towards posterior and ``z`` towards superior (MONAI / ITK order for an image with identity
direction, nibabel axis codes ``L, P, S``). Other orientations must be reoriented first;
:func:`monai_ext.data.studies.insert_lesions_oriented` does it from a RAS affine.

Speed: the cost follows the number of lung voxels, not the grid: about 2-3 s of CPU for a
512x512x141 chest CT at any lesion share.

Example:
    >>> from monai_ext.data import insert_lesions, synthetic_chest_ct
    >>> ct = synthetic_chest_ct((96, 96, 40), (4.0, 4.0, 8.0), seed=0)
    >>> img, mask = insert_lesions(ct.image, ct.lung, ct.spacing, fraction=0.2, seed=1)
    >>> round(float(mask.sum() / ct.lung_mask.sum()), 3)
    0.2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from monai_ext.data.synthetic import _smoothstep
from monai_ext.errors import NoLungFoundError

__all__ = ["insert_lesions", "LESION_KINDS", "GGO_HU", "CONSOLIDATION_HU"]

#: lesion kinds accepted by :func:`insert_lesions`
LESION_KINDS: tuple[str, ...] = ("mixed", "ggo", "consolidation")
#: range of the mean density of ground-glass opacities (HU)
GGO_HU: tuple[float, float] = (-750.0, -300.0)
#: range of the mean density of consolidations (HU)
CONSOLIDATION_HU: tuple[float, float] = (-200.0, 20.0)


def insert_lesions(
    image: np.ndarray,
    lung_mask: np.ndarray,
    spacing: Sequence[float],
    fraction: float,
    seed: int = 0,
    kind: str = "mixed",
    *,
    consolidation_share: float | None = None,
    return_info: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Insert COVID-19-like lesions covering ``fraction`` of the lung volume.

    Args:
        image: CT volume in HU indexed ``[x, y, z]`` (x to the patient's left, y posterior,
            z superior); any integer or float dtype.
        lung_mask: lung mask on the same grid (non-zero = lung). Labels 1 and 2 are used as
            right and left lung if present; otherwise the lungs are told apart by the mid-plane
            of the mask's bounding box.
        spacing: voxel size ``(sx, sy, sz)`` in mm.
        fraction: requested lesion share of the lung volume, 0..1 (``0.2`` = 20 %). The result
            has exactly ``round(fraction * lung voxels)`` lesion voxels; ``0`` returns an
            unchanged copy of the image and an empty mask.
        seed: random seed (same inputs and seed give the same output).
        kind: ``"mixed"`` (GGO with consolidated cores, more consolidation in severe cases),
            ``"ggo"`` (ground glass only) or ``"consolidation"``.
        consolidation_share: for ``"mixed"``, the share of lesion voxels that are consolidated
            (default drawn from the seed: a Beta draw with mean ``0.2 + 0.15 * fraction``, wide:
            from none to most of the lesion, as in the MedSeg slices).
        return_info: also return a dict with the lesion voxel counts, the drawn parameters and
            ``consolidation_mask``: a uint8 mask on the grid of ``image`` of the lesion voxels
            rendered as consolidation (consolidation weight at least 0.5; the rest is GGO).

    Returns:
        ``(image_with_lesions, lesion_mask)``: the image in the input dtype (integers are rounded
        and clipped) and a uint8 mask (1 = lesion) inside the lung mask; with ``return_info``,
        a third item, the info dict.

    Raises:
        ValueError: bad shapes, spacing, fraction outside 0..1, unknown kind.
        NoLungFoundError: the lung mask is empty.

    Example:
        >>> import numpy as np
        >>> img = np.full((40, 40, 20), -850, np.int16)
        >>> lung = np.zeros(img.shape, np.uint8); lung[5:35, 5:35, 3:17] = 1
        >>> out, mask = insert_lesions(img, lung, (2.0, 2.0, 4.0), 0.1, seed=0)
        >>> int(mask.sum()), int(round(0.1 * lung.sum()))
        (1260, 1260)
    """
    image = np.asarray(image)
    lung_mask = np.asarray(lung_mask)
    if image.ndim != 3:
        raise ValueError(f"image: expected a 3D volume, got shape {image.shape}")
    if lung_mask.shape != image.shape:
        raise ValueError(f"lung_mask: shape {lung_mask.shape} differs from the image shape {image.shape}")
    try:
        spc = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing: expected three sizes in mm, got {spacing!r}") from None
    if len(spc) != 3 or not all(math.isfinite(s) and s > 0 for s in spc):
        raise ValueError(f"spacing: expected three positive sizes in mm, got {spacing!r}")
    try:
        frac = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction: expected a number in 0..1, got {fraction!r}") from None
    if not (math.isfinite(frac) and 0.0 <= frac <= 1.0):
        raise ValueError(f"fraction: expected a share of the lung volume in 0..1 (0.2 = 20 %), got {fraction!r}")
    if kind not in LESION_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(LESION_KINDS)}, got {kind!r}")
    if consolidation_share is not None and not (0.0 <= float(consolidation_share) <= 1.0):
        raise ValueError(f"consolidation_share: expected a share in 0..1, got {consolidation_share!r}")
    lung = lung_mask > 0
    n_lung = int(np.count_nonzero(lung))
    if n_lung == 0:
        raise NoLungFoundError("the lung mask is empty: no lung to insert lesions into")

    out = image.copy()
    lesion = np.zeros(image.shape, np.uint8)
    info: dict[str, Any] = {"lung_voxels": n_lung, "requested_fraction": frac}
    n_target = int(round(frac * n_lung))
    if n_target == 0:
        info.update(lesion_voxels=0, fraction=0.0)
        return (out, lesion, info) if return_info else (out, lesion)

    rng = np.random.default_rng(seed)
    # ---- crop to the lung box (with a margin for the low-pass filter and the distance map)
    idx = (
        np.nonzero(lung.any(axis=(1, 2)))[0],
        np.nonzero(lung.any(axis=(0, 2)))[0],
        np.nonzero(lung.any(axis=(0, 1)))[0],
    )
    box = tuple(slice(max(int(i[0]) - 3, 0), min(int(i[-1]) + 4, n)) for i, n in zip(idx, image.shape))
    lung_c = lung[box]
    labels_c = lung_mask[box]
    crop_shape = lung_c.shape
    flat_lung = np.flatnonzero(lung_c)
    ijk = np.unravel_index(flat_lung, crop_shape)
    pts = tuple(i.astype(np.float32) * np.float32(s) for i, s in zip(ijk, spc))  # mm in the crop
    fields = _PointFields(rng)

    # ---- propensity of each lung voxel
    params = _draw_params(rng, frac, kind, consolidation_share)
    info["params"] = params
    prop = params["w_coarse"] * fields(pts, params["cell_mm"])
    prop += params["w_fine"] * fields(pts, params["fine_ratio"] * params["cell_mm"])
    dist = _pleura_distance(lung_c, spc, pts)
    lo = [float(p.min()) for p in pts]
    hi = [float(p.max()) for p in pts]
    half = [max(0.5 * (b - a), 1.0) for a, b in zip(lo, hi)]
    xn = (pts[0] - 0.5 * (lo[0] + hi[0])) / half[0]  # -1 right .. 1 left
    yn = (pts[1] - 0.5 * (lo[1] + hi[1])) / half[1]  # -1 front .. 1 back
    zn = (pts[2] - lo[2]) / (2.0 * half[2])  # 0 bottom .. 1 top
    radial = np.clip(np.sqrt(xn**2 + (0.8 * yn) ** 2), 0.0, 1.0)
    prop += params["w_pleura"] * np.exp(-dist / params["pleura_mm"]) * (0.15 + 0.85 * radial**2)
    prop += params["w_low"] * (1.0 - zn)
    prop += params["w_post"] * 0.5 * (yn + 1.0)
    prop += params["w_periph"] * radial
    del dist

    # ---- per-lung targets, then the highest-propensity voxels of each lung
    side = _sides(labels_c.ravel()[flat_lung], xn)
    counts = [int(np.count_nonzero(side == s)) for s in (0, 1)]
    targets = _split_targets(rng, n_target, counts, frac, params)
    chosen = []
    thresholds = np.zeros(2, np.float32)
    for s in (0, 1):
        members = np.flatnonzero(side == s)
        t = targets[s]
        if t <= 0:
            thresholds[s] = np.inf
            continue
        vals = prop[members]
        if t >= len(members):
            sel = members
            thresholds[s] = -np.inf
        else:
            cut = len(vals) - t
            part = np.argpartition(vals, cut)
            sel = members[part[cut:]]
            thresholds[s] = 0.5 * (vals[part[cut]] + vals[part[:cut]].max())
        chosen.append(sel)
    sel = np.concatenate(chosen) if chosen else np.zeros(0, np.intp)
    les_c = lesion[box]  # a view
    les_c[tuple(i[sel] for i in ijk)] = 1

    # ---- appearance, on the lung voxels the lesions touch (fuzzy margins reach a little outside)
    thr = thresholds[side]
    margin = np.where(np.isfinite(thr), prop - thr, np.where(thr == -np.inf, 10.0, -10.0)).astype(np.float32)
    alpha = _smoothstep(margin, -0.3, 0.3)
    touched = np.flatnonzero(alpha > 0.002)
    alpha, margin = alpha[touched], margin[touched]
    pts = tuple(p[touched] for p in pts)
    ijk = tuple(i[touched] for i in ijk)
    yn = yn[touched]
    del prop
    depth = np.clip(margin / 1.2, 0.0, 1.0)
    # low-pass (anatomy) and residual (noise, fine detail) of the image around the touched voxels
    sub = tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in ijk)
    img_s = image[box][sub].astype(np.float32)
    loc = tuple(i - s.start for i, s in zip(ijk, sub))
    base = _lowpass(img_s, spc)[loc]
    resid = img_s[loc] - base
    del img_s

    f14, f5, f3 = fields(pts, 14.0), fields(pts, 5.0), fields(pts, 3.0)
    t14, t5, t3 = _FIT["ggo_texture_hu"]
    ggo = params["ggo_hu"] + t14 * f14 + t5 * f5 + t3 * f3
    ggo += params["ggo_core_hu"] * depth
    if params["paving"] > 0:  # crazy paving: a reticulation of thickened septa over part of the GGO
        ridge = np.exp(-((f5 / 0.13) ** 2))
        zone = _smoothstep(fields(pts, 20.0), 0.0, 0.6)
        ggo += params["paving"] * ridge * zone
    np.clip(ggo, GGO_HU[0] - 60.0, GGO_HU[1] + 80.0, out=ggo)
    cons = params["cons_hu"] + 25.0 * fields(pts, 8.0) + 12.0 * f3
    if kind == "ggo":
        level = ggo
        cmix = np.zeros_like(ggo)
    elif kind == "consolidation":
        cmix = _smoothstep(depth, 0.0, 0.25)
        level = ggo + (cons - ggo) * cmix
    else:
        # consolidation where the lesion is deep, in dependent (posterior) lung, in patches of ~2 cm
        score = 0.6 * depth + 0.7 * f14 - 0.3 * f5 + 0.3 * (yn + 1.0)
        share = params["consolidation_share"]
        inside = margin > 0
        if share > 0 and inside.any():
            cut = float(np.quantile(score[inside], 1.0 - share))
            cmix = _smoothstep(score, cut - 0.15, cut + 0.15)
        else:
            cmix = np.zeros_like(score)
        level = ggo + (cons - ggo) * cmix
    k = 35.0  # softness of the maximum (HU)
    raised = level + k * np.logaddexp(0.0, (base - level) / k)
    new = base + alpha * (raised - base) + resid
    if np.issubdtype(image.dtype, np.integer):
        lim = np.iinfo(image.dtype)
        new = np.clip(np.rint(new), lim.min, lim.max)
    out[box][ijk] = new.astype(image.dtype)
    if return_info:
        cons_mask = np.zeros(image.shape, np.uint8)
        solid = (cmix >= 0.5) & (les_c[ijk] > 0)
        cons_mask[box][tuple(i[solid] for i in ijk)] = 1
        info["consolidation_mask"] = cons_mask
    n_les = int(sel.size)
    info.update(lesion_voxels=n_les, fraction=n_les / n_lung, per_lung_voxels=targets, lung_per_side=counts)
    return (out, lesion, info) if return_info else (out, lesion)


#: The generator's fitted parameters: ``(low, high)`` of a uniform draw per study, or a constant.
#: The module docstring says where each number comes from (old values in brackets there).
_FIT: dict[str, Any] = {
    "cell_mm": (18.0, 28.0),  # scale (mm) of the coarse propensity field
    "w_coarse": 0.85,  # weight of the coarse field
    "w_fine": 0.7,  # weight of the finer field ...
    "fine_ratio": 0.45,  # ... whose scale is this share of cell_mm
    "w_pleura": (0.4, 0.8),  # pleural bias: weight ...
    "pleura_mm": (8.0, 16.0),  # ... and decay length (mm)
    "w_low": (0.6, 1.4),  # lower-lung bias (over the lung height)
    "w_post": (0.4, 1.0),  # posterior bias (over the lung depth)
    "w_periph": (0.0, 0.3),  # radial (peripheral) bias
    "side_sd": 0.8,  # sd of the log-odds of the right/left split
    "unilateral_below": 0.02,  # below this load ...
    "unilateral_p": 0.1,  # ... a study is unilateral with this probability
    "ggo_hu": (-760.0, -500.0),  # GGO density at the lesion margin (HU) ...
    "ggo_core_hu": (40.0, 200.0),  # ... raised by up to this much in the lesion core
    "ggo_texture_hu": (55.0, 45.0, 40.0),  # GGO texture amplitude (HU) at 14, 5 and 3 mm
    "paving_p": 0.15,  # share of studies with crazy paving ...
    "paving_hu": (40.0, 120.0),  # ... and the amplitude of its septa (HU)
    "cons_hu": (-200.0, 20.0),  # mean consolidation density (HU)
    "cons_share": (0.2, 0.15, 6.0),  # consolidation share of the lesion: Beta, mean a + b * load, concentration c
    "cons_share_range": (0.0, 0.9),  # ... clipped to this range
}


def _draw_params(rng: np.random.Generator, frac: float, kind: str, consolidation_share: float | None) -> dict:
    fit = _FIT

    def u(name: str) -> float:
        lo, hi = fit[name]
        return float(rng.uniform(lo, hi))

    p = {
        "cell_mm": u("cell_mm"),
        "w_pleura": u("w_pleura"),
        "pleura_mm": u("pleura_mm"),
        "w_low": u("w_low"),
        "w_post": u("w_post"),
        "w_periph": u("w_periph"),
        "ggo_hu": u("ggo_hu"),
        "ggo_core_hu": u("ggo_core_hu"),
        "paving": u("paving_hu") if rng.random() < fit["paving_p"] else 0.0,
        "cons_hu": u("cons_hu"),
        "w_coarse": float(fit["w_coarse"]),
        "w_fine": float(fit["w_fine"]),
        "fine_ratio": float(fit["fine_ratio"]),
    }
    if consolidation_share is None:
        a, b, c = fit["cons_share"]
        lo, hi = fit["cons_share_range"]
        m = float(np.clip(a + b * frac, 0.01, 0.99))
        consolidation_share = float(np.clip(rng.beta(m * c, (1.0 - m) * c), lo, hi))
    p["consolidation_share"] = (
        float(consolidation_share) if kind == "mixed" else (1.0 if kind == "consolidation" else 0.0)
    )
    return p


def _sides(labels: np.ndarray, xn: np.ndarray) -> np.ndarray:
    """0 = right lung, 1 = left lung, for each lung voxel (labels 1/2, else the mid-plane)."""
    vals = np.unique(labels)
    if set(vals.tolist()) == {1, 2}:
        return (labels == 2).astype(np.int8)
    return (xn > 0).astype(np.int8)  # x increases towards the patient's left


def _split_targets(rng: np.random.Generator, n_target: int, counts: list[int], frac: float, params: dict) -> list[int]:
    """Share the lesion voxels between the lungs: bilateral, unequal, within each lung's size."""
    n_r, n_l = counts
    if n_l == 0:
        return [n_target, 0]
    if n_r == 0:
        return [0, n_target]
    eps = float(rng.normal(0.0, _FIT["side_sd"]))
    w_r = n_r * math.exp(eps) / (n_r * math.exp(eps) + n_l * math.exp(-eps))
    if frac < _FIT["unilateral_below"] and rng.random() < _FIT["unilateral_p"]:  # small disease may be unilateral
        w_r = 1.0 if rng.random() < 0.5 else 0.0
    t_r = int(round(n_target * w_r))
    t_r = min(max(t_r, n_target - n_l), n_r)
    params["right_share"] = t_r / n_target
    return [t_r, n_target - t_r]


def _pleura_distance(lung: np.ndarray, spacing: tuple[float, ...], pts: Sequence[np.ndarray]) -> np.ndarray:
    """Distance (mm) from each point (mm in the crop) to the lung boundary, from a ~3 mm grid."""
    step = [max(1, int(round(3.0 / s))) for s in spacing]
    coarse = np.pad(lung[:: step[0], :: step[1], :: step[2]], 1)
    d = ndi.distance_transform_edt(coarse, sampling=[st * s for st, s in zip(step, spacing)]).astype(np.float32)
    coords = [pts[a] / np.float32(step[a] * spacing[a]) + 1.0 for a in range(3)]
    return ndi.map_coordinates(d, coords, order=1, mode="nearest", prefilter=False)


class _PointFields:
    """Smooth Gaussian random fields (zero mean, unit variance) evaluated at given points (mm).

    White noise on a lattice of spacing ``cell_mm / 1.5`` is smoothed by a Gaussian of 1.5 lattice
    cells (``cell_mm``), then read at the points by linear interpolation. The cost depends on the
    number of points and the extent they span, not on the image grid.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        taps = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)  # the kernel of gaussian_filter(1.5, truncate=3)
        taps /= taps.sum()
        self._gain = float((taps**2).sum()) ** -1.5  # unit variance after smoothing

    def __call__(self, pts: Sequence[np.ndarray], cell_mm: float) -> np.ndarray:
        h = cell_mm / 1.5
        lo = [float(p.min()) for p in pts]
        n = [int(math.ceil((float(p.max()) - a) / h)) + 7 for p, a in zip(pts, lo)]
        lattice = self.rng.standard_normal(tuple(n), dtype=np.float32)
        lattice = ndi.gaussian_filter(lattice, 1.5, mode="wrap", truncate=3.0)
        lattice *= np.float32(self._gain)
        coords = [(p - np.float32(a)) / np.float32(h) + np.float32(3.0) for p, a in zip(pts, lo)]
        return ndi.map_coordinates(lattice, coords, order=1, prefilter=False)


def _lowpass(img: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Anatomy part of the image: a Gaussian of about 1.2 mm in-plane (at most 0.8 voxel in z)."""
    sigma = [min(1.2 / s, 1.5) for s in spacing[:2]] + [min(1.2 / spacing[2], 0.8)]
    return ndi.gaussian_filter(img, sigma, mode="nearest", truncate=3.0)
