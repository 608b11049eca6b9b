"""Procedural chest CT phantom with ground truth.

:func:`synthetic_chest_ct` builds a chest CT volume in Hounsfield units with its lung labels:
body with skin, fat and muscle layers (and breasts in some anatomies), ribs with costal cartilage,
sternum, scapulae and spine, a mediastinum with heart, great vessels, trachea and main bronchi,
two lungs with textured parenchyma (denser in the dependent lung), space-filling pulmonary artery
and vein trees with companion bronchi plus thousands of thin short vessels (the fine texture of
normal lung), a domed diaphragm with liver, stomach and spleen below it, a curved scanner table
under the body separated from it by air, then a mild blur and correlated noise. Everything is
vectorised numpy: 256x256x96 takes about 2 s of CPU.

Array convention (the same as MONAI's ITK-backed readers for an image with identity direction):
volumes are indexed ``[x, y, z]``; ``x`` runs towards the patient's left, ``y`` towards posterior,
``z`` towards superior. World coordinates are those of ITK (LPS); :attr:`SyntheticCT.affine` is the
RAS affine as nibabel and MONAI write it: ``diag(-sx, -sy, sz)`` plus the origin.

Sizes are in millimetres, so the anatomy is the same whatever the spacing for a given field of view.
A field of view smaller than the sampled adult chest shrinks the anatomy to fit (in-plane and
along ``z`` separately), which keeps small test volumes usable.

The vessel trees are grown with the volume-filling algorithm of Kitaoka et al., "A
three-dimensional model of the human airway tree", J Appl Physiol 87 (1999), and Tawhai et al.,
"Generation of an anatomically based three-dimensional model of the conducting airways",
Ann Biomed Eng 28 (2000): each branch points to the centroid of its territory, which is split in
two by a plane through the branch.

Example:
    >>> from monai_ext.data import synthetic_chest_ct
    >>> ct = synthetic_chest_ct(shape=(96, 96, 40), spacing=(4.0, 4.0, 8.0), seed=1)
    >>> ct.image.shape, ct.image.dtype.name, sorted(set(ct.lung.ravel().tolist()))
    ((96, 96, 40), 'float32', [0, 1, 2])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SyntheticCT", "synthetic_chest_ct", "phantom_affine", "ANATOMY_OPTIONS"]

AIR_HU = -1000.0
OUTSIDE_FOV_HU = -1024.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0

#: anatomy options accepted by :func:`synthetic_chest_ct` (each drawn from the seed when not given)
ANATOMY_OPTIONS: dict[str, str] = {
    "body_width_mm": "full left-right width of the chest (default: rib cage 250..300 mm plus the chest wall)",
    "body_depth_mm": "full antero-posterior depth of the chest (default: rib cage 160..205 mm plus the wall)",
    "fat_mm": "subcutaneous fat thickness (6..28 mm)",
    "lung_height_mm": "apex to lowest costophrenic recess (210..270 mm)",
    "diaphragm_mm": "height of the right diaphragm dome above the recesses (45..75 mm)",
    "heart_scale": "heart size factor (0.9..1.25)",
    "lung_hu": "mean density of normal parenchyma (-910..-830 HU)",
    "female": "breasts on the anterior chest wall (True in about 40 % of seeds)",
    "table": "draw the scanner table (default True)",
}


@dataclass
class SyntheticCT:
    """A synthetic chest CT volume and its ground truth.

    Attributes:
        image: float32 HU volume indexed ``[x, y, z]``.
        lung: uint8 lung labels (0 background, 1 right lung, 2 left lung); ``lung > 0`` is the lung
            mask. Intrapulmonary vessels and bronchi are inside the lung; trachea and main bronchi
            are not.
        spacing: voxel size ``(sx, sy, sz)`` in mm.
        affine: 4x4 RAS affine (nibabel / MONAI convention).
        masks: further uint8 masks on the same grid: ``body`` (patient, without table),
            ``table``, ``trachea`` (lumen of the trachea and main bronchi, outside the lungs),
            ``airway`` (all airway lumen, with the bronchi inside the lungs), ``vessel`` (pulmonary
            vessels covering more than half a voxel), ``bone``, ``heart``.
        meta: the anatomy parameters drawn for this seed, the fit scales and the noise level.
    """

    image: np.ndarray
    lung: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lung_mask(self) -> np.ndarray:
        """Boolean lung mask (both lungs)."""
        return self.lung > 0


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of a phantom grid whose centre is the world origin (LPS identity direction).

    Args:
        shape: ``(nx, ny, nz)``.
        spacing: ``(sx, sy, sz)`` in mm.

    Returns:
        4x4 float64 affine ``diag(-sx, -sy, sz)`` with the translation that puts the volume centre
        at the origin.

    Example:
        >>> phantom_affine((9, 9, 9), (1.0, 1.0, 2.0))[:3, 3].tolist()
        [4.0, 4.0, -8.0]
    """
    shape, spacing = _check_grid(shape, spacing)
    lps_origin = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-lps_origin[0], -lps_origin[1], lps_origin[2]]
    return affine


def _check_grid(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    try:
        shp = tuple(int(s) for s in shape)
        if len(shp) != 3 or any(float(a) != float(b) for a, b in zip(shape, shp)):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"shape: expected three integers (X, Y, Z), got {shape!r}") from None
    if min(shp) < 8:
        raise ValueError(f"shape: every size must be at least 8 voxels, got {shp}")
    try:
        spc = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing: expected three numbers in mm, got {spacing!r}") from None
    if len(spc) != 3 or not all(math.isfinite(s) and s > 0 for s in spc):
        raise ValueError(f"spacing: expected three positive sizes in mm, got {spacing!r}")
    return shp, spc


# ----------------------------------------------------------------------------------------------
# random fields and small helpers (also used by monai_ext.data.lesions)


def _smooth_field(
    rng: np.random.Generator,
    coords: Sequence[np.ndarray],
    cell_mm: float | Sequence[float],
    extent: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Gaussian random field, zero mean and unit variance, correlation length ``cell_mm``.

    White noise on a lattice of ``cell_mm`` is interpolated with Gaussian weights (sigma = one
    cell) by three separable matrix products, so it costs little more than writing the output.
    The lattice is laid on ``extent`` (default: the coordinate range), in mm, so that two grids
    covering the same extent get the same field.
    """
    cells = np.broadcast_to(np.asarray(cell_mm, dtype=np.float64), (3,))
    mats = []
    lat_shape = []
    for axis, c in enumerate(coords):
        c = np.asarray(c, dtype=np.float64)
        cell = float(cells[axis])
        lo, hi = extent[axis] if extent is not None else (float(c.min()), float(c.max()))
        k0 = math.floor(lo / cell) - 3
        k1 = math.ceil(hi / cell) + 3
        knots = cell * np.arange(k0, k1 + 1)
        w = np.exp(-0.5 * ((c[:, None] - knots[None, :]) / cell) ** 2)
        w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
        mats.append(w.astype(np.float32))
        lat_shape.append(len(knots))
    lattice = rng.standard_normal(lat_shape, dtype=np.float32)
    wx, wy, wz = mats
    nx, ny, nz = wx.shape[0], wy.shape[0], wz.shape[0]
    lx, _, lz = lat_shape
    out = np.ascontiguousarray(np.tensordot(lattice, wy, axes=([1], [1])).transpose(0, 2, 1))  # (Lx, ny, Lz)
    out = (out.reshape(-1, lz) @ wz.T).reshape(lx, ny, nz)
    out = (wx @ out.reshape(lx, -1)).reshape(nx, ny, nz)
    return out


def _blur3(a: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Separable 3-tap blur ``[w, 1 - 2w, w]`` per axis (``w <= 0.25``), edges replicated."""
    out = a
    for axis, w in enumerate(weights):
        w = float(min(max(w, 0.0), 0.25))
        if w <= 0.0 or a.shape[axis] < 2:
            continue
        src = out
        out = src * np.float32(1.0 - 2.0 * w)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        out[tuple(hi)] += np.float32(w) * src[tuple(lo)]
        out[tuple(lo)] += np.float32(w) * src[tuple(hi)]
        first = [slice(None)] * 3
        last = [slice(None)] * 3
        first[axis] = slice(0, 1)
        last[axis] = slice(-1, None)
        out[tuple(first)] += np.float32(w) * src[tuple(first)]
        out[tuple(last)] += np.float32(w) * src[tuple(last)]
    return out


def _blur_weights(sigma_mm: Sequence[float], spacing: Sequence[float]) -> list[float]:
    """3-tap weights whose variance matches ``sigma_mm`` (capped at 0.25, i.e. sigma 0.7 voxel)."""
    return [min(0.25, 0.5 * (s / d) ** 2) for s, d in zip(sigma_mm, spacing)]


def _smoothstep(x: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
    t = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ----------------------------------------------------------------------------------------------
# anatomy parameters


def _draw_anatomy(rng: np.random.Generator, options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(ANATOMY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown anatomy option(s) {sorted(unknown)}; known: {sorted(ANATOMY_OPTIONS)}")
    u = rng.uniform
    p: dict[str, Any] = {
        "body_width_mm": None,  # derived from the rib cage and the chest wall below
        "body_depth_mm": None,
        "fat_mm": u(6, 28),
        "lung_height_mm": u(210, 270),
        "diaphragm_mm": u(45, 75),
        "heart_scale": u(0.9, 1.25),
        "lung_hu": u(-910, -830),
        "female": bool(rng.random() < 0.4),
        "table": True,
    }
    # secondary parameters, always drawn (so the options do not change the random stream)
    p.update(
        ant_share=u(0.47, 0.55),
        p_ant=u(1.9, 2.3),
        p_post=u(2.7, 3.5),
        body_harmonics=(rng.normal(0, 0.018, 4), rng.uniform(0, 2 * np.pi, 4)),
        muscle_mm=u(8, 16),
        left_dome_drop=u(5, 20),
        heart_dx=u(18, 34),
        heart_angle=u(np.deg2rad(25), np.deg2rad(45)),
        carina_below_apex=u(80, 100),
        mediastinum_mm=u(22, 32),
        vertebra_r=u(14, 17),
        dependent_hu=u(30, 140),
        breast_mm=u(15, 45),
        table_gap=u(6, 16),
        table_sag=u(10, 25),
        z_shift=u(0.3, 0.7),
        stomach_gas=bool(rng.random() < 0.7),
        noise_hu=u(8, 30),
        vessel_points=int(rng.integers(2600, 3400)),
        micro_per_ml=u(1.5, 4.0),
        cavity_width=u(250, 300),
        cavity_depth=u(160, 205),
        p_cav_ant=u(2.1, 2.5),
        p_cav_post=u(2.5, 3.1),
        vessel_exponent=u(0.36, 0.45),
        micro_radius_mm=u(0.35, 0.55),
    )
    for key, value in options.items():
        if value is not None:
            p[key] = value
    if p["body_width_mm"] is None:
        p["body_width_mm"] = p["cavity_width"] + 2 * (1.35 * p["fat_mm"] + 1.3 * p["muscle_mm"] + 9.5)
    if p["body_depth_mm"] is None:
        p["body_depth_mm"] = p["cavity_depth"] + 0.8 * p["fat_mm"] + p["muscle_mm"] + 9.5 + 44.0
    for key in ("body_width_mm", "body_depth_mm", "fat_mm", "lung_height_mm", "diaphragm_mm", "heart_scale", "lung_hu"):
        try:
            p[key] = float(p[key])
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {p[key]!r}") from None
        if not math.isfinite(p[key]) or (key != "lung_hu" and p[key] <= 0):
            raise ValueError(f"{key}: expected a positive number, got {p[key]!r}")
    if not (-1000 <= p["lung_hu"] <= -500):
        raise ValueError(f"lung_hu: expected a parenchyma density in -1000..-500 HU, got {p['lung_hu']!r}")
    p["female"], p["table"] = bool(p["female"]), bool(p["table"])
    return p


# ----------------------------------------------------------------------------------------------
# tubes: exact rendering of thick segments, splatting of thin ones


def _segment_occupancy(
    out: np.ndarray,
    origin: np.ndarray,
    spacing: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    r0: float,
    r1: float,
    zsub: int,
    restrict: np.ndarray | None = None,
) -> None:
    """Max-composite the partial-volume occupancy of a tapered tube into ``out`` (in place)."""
    rmax = max(r0, r1)
    lo = np.minimum(p0, p1) - rmax - spacing
    hi = np.maximum(p0, p1) + rmax + spacing
    ilo = np.maximum(np.floor((lo - origin) / spacing).astype(int), 0)
    ihi = np.minimum(np.ceil((hi - origin) / spacing).astype(int) + 1, out.shape)
    if np.any(ihi <= ilo):
        return
    v = p1 - p0
    length = float(np.sqrt(v @ v))
    u = v / length if length > 1e-6 else np.array([0.0, 0.0, 1.0])
    gx = (origin[0] + spacing[0] * np.arange(ilo[0], ihi[0]) - p0[0]).astype(np.float32)[:, None, None]
    gy = (origin[1] + spacing[1] * np.arange(ilo[1], ihi[1]) - p0[1]).astype(np.float32)[None, :, None]
    aa = float(min(spacing[0], spacing[1]))
    acc = None
    for k in range(zsub):
        off = (k + 0.5) / zsub - 0.5
        gz = (origin[2] + spacing[2] * (np.arange(ilo[2], ihi[2]) + off) - p0[2]).astype(np.float32)[None, None, :]
        proj = gx * u[0] + gy * u[1] + gz * u[2]
        t = np.clip(proj / max(length, 1e-6), 0.0, 1.0) if length > 1e-6 else np.zeros_like(proj)
        tl = t * length
        d2 = (gx - tl * u[0]) ** 2 + (gy - tl * u[1]) ** 2 + (gz - tl * u[2]) ** 2
        r = r0 + t * (r1 - r0)
        occ = np.clip((r - np.sqrt(d2)) / aa + 0.5, 0.0, 1.0)
        acc = occ if acc is None else acc + occ
    acc *= np.float32(1.0 / zsub)
    box = tuple(slice(a, b) for a, b in zip(ilo, ihi))
    if restrict is not None:
        acc *= restrict[box]
    np.maximum(out[box], acc, out=out[box])


def _splat_segments(
    shape: tuple[int, int, int],
    origin: np.ndarray,
    spacing: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
) -> np.ndarray:
    """Partial-volume occupancy of many thin tubes by trilinear splatting of centreline samples."""
    occ = np.zeros(int(np.prod(shape)), dtype=np.float64)
    if len(p0) == 0:
        return occ.reshape(shape).astype(np.float32)
    step = 0.5 * float(spacing.min())
    v = p1 - p0
    lengths = np.sqrt((v**2).sum(axis=1))
    n = np.maximum(1, np.ceil(lengths / step).astype(int))
    seg = np.repeat(np.arange(len(p0)), n)
    starts = np.cumsum(n) - n
    t = (np.arange(seg.size) - starts[seg] + 0.5) / n[seg]
    pts = p0[seg] + v[seg] * t[:, None]
    rad = r0[seg] + (r1[seg] - r0[seg]) * t
    weight = np.pi * rad**2 * (lengths[seg] / n[seg]) / float(np.prod(spacing))
    g = (pts - origin) / spacing
    base = np.floor(g).astype(int)
    frac = g - base
    nx, ny, nz = shape
    for dx in (0, 1):
        wx = frac[:, 0] if dx else 1 - frac[:, 0]
        ix = base[:, 0] + dx
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1 - frac[:, 1]
            iy = base[:, 1] + dy
            for dz in (0, 1):
                wz = frac[:, 2] if dz else 1 - frac[:, 2]
                iz = base[:, 2] + dz
                ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < nz)
                flat = (ix[ok] * ny + iy[ok]) * nz + iz[ok]
                occ += np.bincount(flat, weights=(weight * wx * wy * wz)[ok], minlength=occ.size)
    return occ.reshape(shape).astype(np.float32)


def _grow_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    points: np.ndarray,
    r_root: float,
    r_leaf: float = 0.5,
    exponent: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Volume-filling branching tree from ``root`` into the territory ``points`` (mm).

    A branch of territory ``n`` points has radius ``r_leaf + (r_root - r_leaf) * (n / N) ** exponent``
    (``exponent`` 1/3 is Murray's law for a flow proportional to the territory).
    Returns segment starts, ends, start radii and end radii.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    radii: list[float] = []
    n_total = len(points)
    stack = [(root, points, r_root)]
    while stack:
        start, pts, r = stack.pop()
        centroid = pts.mean(axis=0)
        v = centroid - start
        dist = float(np.sqrt(v @ v))
        if len(pts) <= 2 or dist < 1.0:
            end = centroid if len(pts) > 1 else pts[0]
            starts.append(start)
            ends.append(end)
            radii.append(r)
            continue
        u = v / dist
        frac = 0.4 if len(pts) > 0.02 * n_total else 0.55
        end = start + u * dist * frac * rng.uniform(0.85, 1.15)
        starts.append(start)
        ends.append(end)
        radii.append(r)
        q = pts - centroid
        q = q - np.outer(q @ u, u)
        cov = q.T @ q
        _, vecs = np.linalg.eigh(cov)
        axis = vecs[:, -1]
        side = q @ axis > 0
        n1 = int(side.sum())
        if n1 == 0 or n1 == len(pts):
            side = np.arange(len(pts)) < len(pts) // 2
            n1 = int(side.sum())
        for sel, cnt in ((side, n1), (~side, len(pts) - n1)):
            rc = r_leaf + (r_root - r_leaf) * (cnt / n_total) ** exponent
            stack.append((end, pts[sel], rc))
    s = np.array(starts)
    e = np.array(ends)
    r0 = np.array(radii)
    return s, e, r0, r0 * 0.92


# ----------------------------------------------------------------------------------------------
# the phantom


def synthetic_chest_ct(
    shape: Sequence[int] = (256, 256, 96),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    *,
    noise_hu: float | None = None,
    blur_mm: float | Sequence[float] | None = None,
    fov_circle: bool = True,
    **anatomy: Any,
) -> SyntheticCT:
    """Build a procedural chest CT in HU with lung labels.

    Args:
        shape: ``(nx, ny, nz)`` voxels, each at least 8.
        spacing: ``(sx, sy, sz)`` voxel size in mm.
        seed: random seed; the same seed, shape and spacing give an identical volume, another seed
            gives another anatomy (body shape, lung size, diaphragm height, heart size, fat, vessels).
        noise_hu: standard deviation of the (slightly correlated) noise; default drawn from the seed
            in 15..30 HU. ``0`` gives a noise-free volume.
        blur_mm: Gaussian sigma of the scanner blur in mm, one value or per axis; default
            ``(0.6, 0.6, 0.35 * sz)``. Values above 0.7 voxel are capped.
        fov_circle: set voxels outside the reconstruction circle to -1024 HU.
        **anatomy: any of :data:`ANATOMY_OPTIONS` to fix a parameter instead of drawing it.

    Returns:
        A :class:`SyntheticCT` (image float32 HU, lung labels 1 right / 2 left, spacing, RAS
        affine, extra masks, meta with the drawn parameters).

    Raises:
        ValueError: for a bad shape, spacing, noise level or anatomy option.

    Example:
        >>> ct = synthetic_chest_ct((64, 64, 24), (6.0, 6.0, 12.0), seed=3, noise_hu=0)
        >>> bool(ct.lung_mask.any())
        True
    """
    shape, spc = _check_grid(shape, spacing)
    rng = np.random.default_rng(seed)
    p = _draw_anatomy(rng, anatomy)
    if noise_hu is not None:
        try:
            sigma = float(noise_hu)
        except (TypeError, ValueError):
            sigma = float("nan")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_hu: expected a non-negative number, got {noise_hu!r}")
        p["noise_hu"] = sigma
    builder = _Builder(shape, spc, rng, p)
    image, lung, masks = builder.build(blur_mm=blur_mm, fov_circle=fov_circle)
    meta = {k: (v if not isinstance(v, tuple) else None) for k, v in p.items() if k != "body_harmonics"}
    meta.update(builder.frame, seed=int(seed))
    meta = {k: v for k, v in meta.items() if v is not None}
    return SyntheticCT(image=image, lung=lung, spacing=spc, affine=phantom_affine(shape, spc), masks=masks, meta=meta)


class _Builder:
    """Evaluates the anatomy on the grid, in anatomical mm in a body-centred frame.

    ``X`` runs to the patient's left, ``Y`` to posterior (both 0 at the centre of the field of view),
    ``Z`` up, 0 at the lowest point of the lungs (costophrenic recesses).
    """

    def __init__(
        self, shape: tuple[int, int, int], spacing: tuple[float, ...], rng: np.random.Generator, p: dict[str, Any]
    ) -> None:
        self.shape = shape
        self.spacing = spacing
        self.rng = rng
        self.p = p
        nx, ny, nz = shape
        sx, sy, sz = spacing
        self.a = p["body_width_mm"] / 2.0
        depth = p["body_depth_mm"]
        self.b_ant = depth * p["ant_share"]
        self.b_post = depth - self.b_ant
        table_t = 45.0 if p["table"] else 0.0
        gap = p["table_gap"] if p["table"] else 0.0
        fov_x, fov_y, fov_z = nx * sx, ny * sy, nz * sz
        s_xy = min(1.0, fov_x / (2 * self.a + 16.0), fov_y / (depth + gap + table_t + 16.0))
        H = p["lung_height_mm"]
        need_z = H + 45.0
        s_z = min(1.0, fov_z / need_z)
        self.es = np.array([sx / s_xy, sy / s_xy, sz / s_z])  # effective spacing, anatomical mm
        # the layout [front of the body, bottom of the table] is centred in the field of view
        self.y_bc = -(self.b_post - self.b_ant + gap + table_t) / 2.0
        z_lo = -25.0 - max(fov_z / s_z - need_z, 0.0) * p["z_shift"]
        self.x = ((np.arange(nx) - (nx - 1) / 2.0) * self.es[0]).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2.0) * self.es[1]).astype(np.float32)
        self.z = (z_lo + (np.arange(nz) + 0.5) * self.es[2]).astype(np.float32)
        self.origin = np.array([self.x[0], self.y[0], self.z[0]], dtype=np.float64)
        hx, hy = fov_x / s_xy / 2.0, fov_y / s_xy / 2.0
        self.extent = [(-hx, hx), (-hy, hy), (z_lo, z_lo + fov_z / s_z)]
        self.zsub = int(min(4, max(1, math.ceil(self.es[2] / min(self.es[0], self.es[1]) - 0.2))))
        self.frame = {"scale_xy": s_xy, "scale_z": s_z, "noise_hu": p["noise_hu"]}
        self.X2 = self.x[:, None]
        self.Y2 = self.y[None, :]
        self.Z3 = self.z[None, None, :]

    def field(self, cell: float | Sequence[float]) -> np.ndarray:
        return _smooth_field(self.rng, (self.x, self.y, self.z), cell, self.extent)

    def seg(self, out: np.ndarray, p0: Sequence[float], p1: Sequence[float], r0: float, r1: float, zsub: int = 0):
        _segment_occupancy(
            out, self.origin, self.es, np.asarray(p0, float), np.asarray(p1, float), r0, r1, zsub or self.zsub
        )

    # ------------------------------------------------------------------------------------------
    def build(self, blur_mm: float | Sequence[float] | None, fov_circle: bool):
        self._layout()
        self._body()
        self._mediastinum()
        self._lungs()
        img = self._paint_soft()
        img = self._paint_bones(img)
        img = self._paint_lungs(img)
        img = self._paint_airways_table(img)
        img = self._diaphragm_partial_volume(img)
        img = self._finish(img, blur_mm, fov_circle)
        masks = {
            "body": self.body.astype(np.uint8),
            "table": self.table.astype(np.uint8),
            "trachea": (self.aw_lumen > 0.5).astype(np.uint8),
            "airway": ((self.aw_lumen > 0.5) | (self.br_lumen > 0.5)).astype(np.uint8),
            "vessel": (self.vessel_occ > 0.5).astype(np.uint8),
            "bone": self.bone.astype(np.uint8),
            "heart": self.heart.astype(np.uint8),
        }
        return img, self.lung_lab, masks

    def _layout(self) -> None:
        """Landmarks (mm) shared by the parts."""
        p = self.p
        H = p["lung_height_mm"]
        self.H = H
        self.y_vb = self.y_bc + self.b_post - 72.0
        self.r_vb = float(p["vertebra_r"])
        self.z_car = H - p["carina_below_apex"]
        self.y_car = self.y_vb - self.r_vb - 24.0
        hs = p["heart_scale"]
        self.h_ax, self.h_ay, self.h_az = 64.0 * hs, 46.0 * hs, 50.0 * hs
        self.H_r = p["diaphragm_mm"]
        self.H_l = max(self.H_r - p["left_dome_drop"], 20.0)
        self.z_h = 0.5 * self.H_l + 0.78 * self.h_az
        self.x_h = p["heart_dx"]
        self.y_h = self.y_car - 22.0
        p = self.p
        self.a_c = self.a - (1.35 * p["fat_mm"] + 1.3 * p["muscle_mm"] + 9.5)  # half-width of the rib cage
        self.x_med = 2.0

    # ------------------------------------------------------------------------------------------
    def _body(self) -> None:
        p, X2, Y2, Z = self.p, self.X2, self.Y2, self.z
        H, a, b_ant, b_post, y_bc = self.H, self.a, self.b_ant, self.b_post, self.y_bc
        Yc = Y2 - y_bc
        r2 = np.sqrt(X2**2 + Yc**2).astype(np.float32)
        theta = np.arctan2(X2, Yc).astype(np.float32)  # 0 posterior, +-pi anterior, > 0 patient left
        ant = Yc < 0
        pe = np.where(ant, p["p_ant"], p["p_post"]).astype(np.float32)
        bb = np.where(ant, b_ant, b_post).astype(np.float32)
        rho = (np.abs(X2 / a) ** pe + np.abs(Yc / bb) ** pe) ** (1.0 / pe)
        R2 = (r2 / np.maximum(rho, 1e-6)).astype(np.float32)
        R2[rho < 1e-6] = b_post
        amp, ph = p["body_harmonics"]
        mod = np.ones_like(theta)
        for k in range(4):
            mod += amp[k] * np.cos((k + 2) * theta + ph[k])
        R2 *= mod
        # z profile: shoulders a little wider, then the neck
        s_body = (1.0 + 0.05 * np.exp(-(((Z - (H - 20)) / 35.0) ** 2)) - 0.48 * _smoothstep(Z, H + 25, H + 80)).astype(
            np.float32
        )
        abs_t = np.abs(theta)
        self.abs_t = abs_t
        self.theta = theta
        lat = np.exp(-(((abs_t - 1.6) / 0.8) ** 2)).astype(np.float32)
        antw = _smoothstep(abs_t, 1.9, 2.6)
        postw = 1.0 - _smoothstep(abs_t, 0.5, 1.2)
        d_edge = R2[:, :, None] * s_body[None, None, :] - r2[:, :, None]
        self.breast = None
        if p["female"]:
            zprof = np.exp(-(((Z - 0.42 * H) / 45.0) ** 2)).astype(np.float32)
            ang = np.exp(-(((abs_t - 2.45) / 0.33) ** 2)).astype(np.float32)
            self.breast = (p["breast_mm"] * ang)[:, :, None] * zprof[None, None, :]
            d_edge += self.breast
        self.d_edge = d_edge
        self.body = d_edge > 0
        upper = _smoothstep(Z, 0.45 * H, 0.8 * H)
        shoulder = _smoothstep(Z, 0.72 * H, H + 5)
        neck = _smoothstep(Z, H + 25, H + 80)
        fat2 = p["fat_mm"] * (0.55 + 0.8 * lat + 0.25 * antw)
        fat_t = fat2[:, :, None] * (1.0 - 0.4 * neck)[None, None, :]
        if self.breast is not None:
            fat_t = fat_t + 0.85 * self.breast
        mus2 = p["muscle_mm"] * (1.0 + 0.3 * lat) + 10.0 * postw
        mus_t = (
            mus2[:, :, None]
            + (12.0 * antw)[:, :, None] * upper[None, None, :]
            + (16.0 * (1 - antw) + 6.0)[:, :, None] * shoulder[None, None, :]
        )
        self.fat_t = fat_t
        self.mus_t = mus_t
        self.rib_t = 8.0
        # rib cage: its own rounder outline (the lungs follow it), the wall between it and the skin
        w_ant = 0.8 * p["fat_mm"] + p["muscle_mm"] + 9.5
        y_ca = y_bc - b_ant + w_ant  # front of the cavity, behind the sternum
        y_cp = self.y_vb + 28.0  # back of the cavity: the paravertebral gutters
        self.b_ca, self.b_cp = 0.48 * (y_cp - y_ca), 0.52 * (y_cp - y_ca)
        self.y_cc = y_ca + self.b_ca
        Ycc = Y2 - self.y_cc
        rc = np.sqrt(X2**2 + Ycc**2).astype(np.float32)
        self.abs_tc = np.abs(np.arctan2(X2, Ycc)).astype(np.float32)
        pc = np.where(Ycc < 0, p["p_cav_ant"], p["p_cav_post"]).astype(np.float32)
        bc = np.where(Ycc < 0, self.b_ca, self.b_cp).astype(np.float32)
        rho_c = (np.abs(X2 / self.a_c) ** pc + np.abs(Ycc / bc) ** pc) ** (1.0 / pc)
        Rc = (rc / np.maximum(rho_c, 1e-6)).astype(np.float32)
        Rc[rho_c < 1e-6] = self.b_cp
        s_cav = (1.0 - 0.12 * _smoothstep(Z, 0.55 * H, H + 15.0)).astype(np.float32)
        d_cav = Rc[:, :, None] * s_cav[None, None, :] - rc[:, :, None]
        np.minimum(d_cav, d_edge - (fat_t + 6.0 + self.rib_t + 1.5), out=d_cav)  # a wall everywhere
        self.d_cav = d_cav
        self.cavity = d_cav > 0

    # ------------------------------------------------------------------------------------------
    def _mediastinum(self) -> None:
        p, X2, Y2, Z = self.p, self.X2, self.Y2, self.z
        H, y_bc, b_ant = self.H, self.y_bc, self.b_ant
        y_vb, r_vb, z_car, y_car = self.y_vb, self.r_vb, self.z_car, self.y_car
        x_h, y_h, z_h, h_ax, h_ay, h_az = self.x_h, self.y_h, self.z_h, self.h_ax, self.h_ay, self.h_az
        z_top = float(Z[-1]) + 30.0
        z_bot = float(Z[0]) - 30.0
        self.hil_r = np.array([-44.0, y_car + 4.0, z_car - 20.0])
        self.hil_l = np.array([46.0, y_car + 8.0, z_car - 30.0])
        self.pa_r = np.array([-40.0, y_car - 6.0, z_car - 28.0])
        self.pa_l = np.array([42.0, y_car - 2.0, z_car - 20.0])
        self.pv_r = np.array([-40.0, y_car + 6.0, z_car - 55.0])
        self.pv_l = np.array([40.0, y_car + 10.0, z_car - 60.0])
        x_d = r_vb + 10.0
        y_d = y_vb - 8.0
        arch = z_car + 38.0
        la = (x_h - 10.0, y_h + 0.55 * h_ay, z_h + 0.2 * h_az)  # left atrium
        # (p0, p1, r0, r1)
        vessels = [
            ((-10.0, y_h + 5.0, z_h + 0.5 * h_az), (-8.0, y_car - 28.0, z_car + 22.0), 15.0, 15.0),
            ((-8.0, y_car - 28.0, z_car + 22.0), (4.0, y_car - 18.0, arch), 15.0, 13.5),
            ((4.0, y_car - 18.0, arch), (x_d, y_d - 10.0, z_car + 26.0), 13.5, 12.5),
            ((x_d, y_d - 10.0, z_car + 26.0), (x_d, y_d, z_car - 10.0), 12.5, 12.0),
            ((x_d, y_d, z_car - 10.0), (x_d - 4.0, y_d + 2.0, z_bot), 12.0, 11.0),
            ((-2.0, y_car - 22.0, arch), (-18.0, y_car - 25.0, z_top), 7.0, 6.0),
            ((8.0, y_car - 18.0, arch), (14.0, y_car - 20.0, z_top), 5.5, 5.0),
            ((16.0, y_car - 12.0, arch - 3.0), (30.0, y_car - 6.0, z_top), 6.0, 5.5),
            ((-30.0, y_car - 22.0, z_top), (-26.0, y_h + 6.0, z_h + 0.6 * h_az), 9.0, 10.0),
            ((x_h - 6.0, y_h - 0.55 * h_ay, z_h + 0.5 * h_az), (6.0, y_car - 14.0, z_car - 14.0), 13.0, 13.0),
            ((6.0, y_car - 14.0, z_car - 14.0), tuple(self.pa_l), 11.0, 9.0),
            ((6.0, y_car - 14.0, z_car - 14.0), tuple(self.pa_r), 11.0, 9.0),
            (la, tuple(self.pv_r), 8.0, 7.0),
            (la, tuple(self.pv_l), 8.0, 7.0),
        ]
        esophagus = [
            ((4.0, y_car + 14.0, z_top), (8.0, y_vb - r_vb - 9.0, z_car), 8.0, 8.0),
            ((8.0, y_vb - r_vb - 9.0, z_car), (16.0, y_vb - r_vb - 14.0, z_bot), 8.0, 9.0),
        ]
        airways = [
            ((0.0, y_car - 12.0, z_top), (0.0, y_car, z_car), 9.0, 8.5),
            ((0.0, y_car, z_car), tuple(self.hil_r), 7.0, 6.0),
            ((0.0, y_car, z_car), tuple(self.hil_l), 6.2, 5.5),
        ]
        shape = self.shape
        self.med_occ = np.zeros(shape, np.float32)
        self.eso_occ = np.zeros(shape, np.float32)
        self.med_excl = np.zeros(shape, np.float32)
        self.aw_wall = np.zeros(shape, np.float32)
        self.aw_lumen = np.zeros(shape, np.float32)
        for p0, p1, r0, r1 in vessels:
            self.seg(self.med_occ, p0, p1, r0, r1)
            self.seg(self.med_excl, p0, p1, r0 + 4.0, r1 + 4.0, 1)
        for p0, p1, r0, r1 in esophagus:
            self.seg(self.eso_occ, p0, p1, r0, r1)
            self.seg(self.med_excl, p0, p1, r0 + 3.0, r1 + 3.0, 1)
        for p0, p1, r0, r1 in airways:
            self.seg(self.aw_wall, p0, p1, r0 + 2.0, r1 + 1.8)
            self.seg(self.aw_lumen, p0, p1, r0, r1)
            self.seg(self.med_excl, p0, p1, r0 + 8.0, r1 + 7.0, 1)  # hilar tissue around the bronchi
        # heart (rotated ellipsoid) and pericardial fat, restricted to its slab
        ca, sa = math.cos(p["heart_angle"]), math.sin(p["heart_angle"])
        hx = (X2 - x_h) * ca - (Y2 - y_h) * sa  # long axis towards the left and anterior
        hy = (X2 - x_h) * sa + (Y2 - y_h) * ca
        q2 = ((hx / h_ax) ** 2 + (hy / h_ay) ** 2).astype(np.float32)
        qz = ((Z - z_h) / h_az) ** 2
        peri_s = (1.0 + 6.0 / h_ay) ** 2
        self.heart = np.zeros(shape, bool)
        self.peri = np.zeros(shape, bool)
        ks = np.flatnonzero(qz < peri_s)
        if len(ks):
            sl = slice(ks[0], ks[-1] + 1)
            hq = q2[:, :, None] + qz[None, None, sl]
            self.heart[:, :, sl] = hq <= 1.0
            self.peri[:, :, sl] = hq <= peri_s
        # mediastinal band between the lungs (narrow behind the sternum)
        y_front = self.y_cc - self.b_ca + 6.0
        wm = 5.0 + 0.4 * p["mediastinum_mm"] * _smoothstep(Y2 - y_bc, -b_ant * 0.85, -b_ant * 0.3)
        core = ((X2 - self.x_med) / p["mediastinum_mm"]) ** 2 + (
            (Y2 - (y_front + y_vb) / 2) / ((y_vb - y_front) / 2)
        ) ** 2
        self.band = (np.abs(X2 - self.x_med) < wm) | (core < 1.0)  # 2D
        # spine region (vertebral body, posterior elements, paraspinal muscles)
        self.dvb = np.sqrt(X2**2 + (Y2 - y_vb) ** 2).astype(np.float32)
        para = (X2 / 36.0) ** 2 + ((Y2 - y_vb - 30.0) / 42.0) ** 2 < 1.0  # paraspinal muscles, laminae
        self.spine2 = para | (self.dvb < r_vb + 3.0)
        # clavicles (top of the chest, anterior)
        self.clav = np.zeros(shape, np.float32)
        for sgn in (-1.0, 1.0):
            p0 = (sgn * 22.0, y_bc - b_ant + 30.0, H - 12.0)
            p1 = (sgn * 0.8 * self.a, y_bc - 0.2 * b_ant, H + 8.0)
            self.seg(self.clav, p0, p1, 7.0, 8.0)

    # ------------------------------------------------------------------------------------------
    def _lungs(self) -> None:
        X2, Y2, Z, Z3 = self.X2, self.Y2, self.z, self.Z3
        H, a_c = self.H, self.a_c
        # diaphragm: two domes (right higher), a lower saddle under the heart
        yd = self.y_cc - 0.12 * self.b_ca
        ry = 1.05 * (self.b_ca + self.b_cp) / 2.0

        def dome(xc: float, h: float) -> np.ndarray:
            q = 1.0 - ((X2 - xc) / (0.7 * a_c)) ** 2 - ((Y2 - yd) / ry) ** 2
            return h * np.clip(q, 0, None) ** 0.85

        z_d = np.maximum(dome(-0.45 * a_c, self.H_r), dome(0.45 * a_c, self.H_l))
        z_d = np.maximum(z_d, 0.45 * self.H_l * np.exp(-((X2 / 40.0) ** 2)) * (Y2 < self.y_vb)).astype(np.float32)
        self.below = Z3 < z_d[:, :, None]
        self.z_dome = z_d
        # apices: each lung ends in a rounded cone
        h_cap = 130.0
        z0 = H - h_cap
        s_ap = np.where(Z > z0, np.clip(1.0 - (Z - z0) / h_cap, 0, None) ** 0.6, 10.0).astype(np.float32)
        x_ap = 0.5 * a_c
        y_ap = self.y_cc + 0.2 * self.b_cp
        ra, rb = 0.5 * a_c, 0.55 * (self.b_ca + self.b_cp)
        rap = np.minimum(
            np.sqrt(((X2 + x_ap) / ra) ** 2 + ((Y2 - y_ap) / rb) ** 2),
            np.sqrt(((X2 - x_ap) / ra) ** 2 + ((Y2 - y_ap) / rb) ** 2),
        ).astype(np.float32)
        under_cap = rap[:, :, None] < s_ap[None, None, :]
        excl2 = self.band | self.spine2
        dom = self.cavity & ~excl2[:, :, None] & ~self.peri & (self.med_excl < 0.05) & ~self.below & under_cap
        dom &= self.clav < 0.05
        dom &= Z3 > 0
        self.lung_dom = dom
        self.lung_lab = np.where(X2 < self.x_med, np.uint8(1), np.uint8(2))[:, :, None] * dom.view(np.uint8)

    # ------------------------------------------------------------------------------------------
    def _paint_soft(self) -> np.ndarray:
        p, X2, Y2, Z3 = self.p, self.X2, self.Y2, self.Z3
        H, y_bc, b_ant = self.H, self.y_bc, self.b_ant
        self.tex = self.field(7.0)
        tex = self.tex
        planes = np.abs(self.field((16.0, 16.0, 30.0))) > 0.07  # fat planes between muscles
        body, d_edge = self.body, self.d_edge
        img = np.where(body, np.float32(FAT_HU), np.float32(AIR_HU))
        muscle = body & (d_edge > self.fat_t) & ~self.cavity
        muscle &= planes
        img[muscle] = MUSCLE_HU
        img[body & (d_edge < 1.6)] = 30.0  # skin
        if self.breast is not None:
            gland = (self.breast > 6.0) & (d_edge < self.breast) & (tex > 0.3) & body
            img[gland] = 20.0
        cav = self.cavity | (self.spine2[:, :, None] & body)
        self.cav = cav
        img[cav] = FAT_HU + 10.0
        # neck and shoulder girdle above the apices: muscles with fat planes
        top = cav & (Z3 > H - 8.0) & planes & ~self.band[:, :, None]
        img[top] = MUSCLE_HU
        img[cav & self.spine2[:, :, None] & (self.dvb >= self.r_vb)[:, :, None]] = MUSCLE_HU
        # abdomen below the diaphragm
        ab = cav & self.below
        liver = ab & (X2 < 25.0 + 0.25 * (y_bc - Y2))[:, :, None]
        spleen = ab & ((X2 > 45.0) & (Y2 > y_bc - 10.0))[:, :, None]
        stomach = ab & ~liver & ~spleen & (Y2 < self.y_vb - 20.0)[:, :, None]
        img[liver] = 58.0
        img[spleen] = 48.0
        img[stomach] = 30.0
        if p["stomach_gas"]:
            xg, yg = 0.45 * self.a_c, y_bc - 0.3 * b_ant
            gq = (((X2 - xg) / 32.0) ** 2 + ((Y2 - yg) / 26.0) ** 2)[:, :, None] + (
                (Z3 - (self.H_l - 28.0)) / 20.0
            ) ** 2
            img[ab & (gq < 1.0) & (Y2 < yg + 6.0)[:, :, None]] = AIR_HU
        above = cav & ~self.below
        img[self.peri & above] = FAT_HU
        self.heart &= above
        img[self.heart] = BLOOD_HU
        med = self.med_occ * cav
        eso = self.eso_occ * cav
        img += med * (BLOOD_HU - img)
        img += eso * (MUSCLE_HU - 5.0 - img)
        return img

    # ------------------------------------------------------------------------------------------
    def _paint_bones(self, img: np.ndarray) -> np.ndarray:
        X2, Y2, Z, Z3 = self.X2, self.Y2, self.z, self.Z3
        H, body, d_edge, abs_t = self.H, self.body, self.d_edge, self.abs_t
        shape = self.shape
        bone = np.zeros(shape, bool)
        # vertebral bodies with cortical rim, discs between
        pitch_v = H / 10.5
        disc = ((Z - 7.0) / pitch_v) % 1.0 > 0.78
        vr = self.dvb / self.r_vb
        vb2 = vr < 1.0
        vb_val = (280.0 + 450.0 * _smoothstep(vr, 0.78, 0.95)).astype(np.float32)
        for k in range(shape[2]):  # per slice: a 2D assignment, cheaper than 3D masks
            if disc[k]:
                img[:, :, k][vb2] = 90.0
            else:
                img[:, :, k][vb2] = vb_val[vb2]
        bone |= vb2[:, :, None] & ~disc[None, None, :]
        # canal, laminae, spinous and transverse processes (2D shapes, on vertebral levels)
        y_canal = self.y_vb + self.r_vb + 8.0
        dcan = np.sqrt(X2**2 + (Y2 - y_canal) ** 2)
        post = (
            ((dcan > 8.0) & (dcan < 13.5) & (Y2 > y_canal - 2.0))
            | ((np.abs(X2) < 4.0) & (Y2 > y_canal) & (Y2 < y_canal + 38.0))
            | ((np.abs(np.abs(X2) - 20.0) < 12.0) & (np.abs(Y2 - y_canal + 2.0) < 4.5))
        )
        post_lv = ((Z - 7.0 - 0.35 * pitch_v) / pitch_v) % 1.0 < 0.55
        canal = dcan < 8.0
        for k in np.flatnonzero(post_lv):
            pk = post & body[:, :, k]
            img[:, :, k][pk] = 550.0
            bone[:, :, k] |= pk
        img[canal[:, :, None] & body] = 25.0
        # ribs: bands in (angle, z) on the inner chest wall, descending laterally and anteriorly
        n_ribs = 12
        top = H + 12.0
        pitch_r = top / 10.6
        th_min = 0.3
        abs_t = self.abs_tc  # angles around the rib cage centre
        g = np.clip((abs_t - th_min) / (np.pi - th_min), 0, 1) ** 0.8
        zr = Z3 + (5.0 * pitch_r * g)[:, :, None]
        kf = (top - zr) / pitch_r
        k = np.round(kf)
        dz = (kf - k) * pitch_r
        dr = self.d_cav + (1.5 + self.rib_t / 2.0)
        kc = np.clip(k, 0, n_ribs - 1).astype(np.intp)
        u_end = np.array([2.95] * 7 + [2.65, 2.5, 2.35, 1.9, 1.5], np.float32)[kc]
        u_cc = np.array([2.65] * 7 + [2.2, 2.1, 2.0, 9.0, 9.0], np.float32)[kc]
        rq = (dz / 5.0) ** 2 + (dr / 3.8) ** 2
        absT = abs_t[:, :, None]
        in_rib = (k >= 0) & (k < n_ribs) & (rq < 1.0) & (absT > th_min) & (absT < u_end) & body
        in_rib &= d_edge > self.fat_t
        cart = in_rib & (absT > u_cc)
        rib = in_rib & ~cart
        img[rib] = 330.0 + 520.0 * _smoothstep(rq[rib], 0.3, 0.7)
        img[cart] = 130.0
        bone |= rib
        # sternum (manubrium to xiphoid)
        z_st_top, z_st_bot = H - 45.0, max(self.z_h - 0.7 * self.h_az, 0.25 * H)
        ks = np.flatnonzero((Z > z_st_bot) & (Z < z_st_top))
        if len(ks):
            sl = slice(ks[0], ks[-1] + 1)
            dd = np.abs(self.d_cav[:, :, sl] + 7.0)
            wx = 16.0 + 6.0 * _smoothstep(Z[sl], H - 80.0, H - 50.0)
            st = (np.abs(X2)[:, :, None] < wx) & (dd < 5.5) & (Y2 < self.y_cc)[:, :, None] & body[:, :, sl]
            edge = np.minimum(5.5 - dd, wx - np.abs(X2)[:, :, None])
            sub = img[:, :, sl]
            sub[st] = 300.0 + 450.0 * (edge[st] < 2.0)
            bone[:, :, sl] |= st
        # scapulae: plates in the posterior muscles of the upper chest
        zsc = _smoothstep(Z, H - 150.0, H - 60.0) * (Z < H + 15.0)
        ks = np.flatnonzero(zsc > 0.02)
        if len(ks):
            sl = slice(ks[0], ks[-1] + 1)
            half = 0.45 * zsc[sl] + 0.05
            depth = np.abs(self.d_cav[:, :, sl] + (self.rib_t + 13.0))
            sc = (np.abs(absT - 1.05) < half[None, None, :]) & (depth < 2.5) & body[:, :, sl]
            sc &= d_edge[:, :, sl] > self.fat_t[:, :, sl] + 3.0
            img[:, :, sl][sc] = 600.0
            bone[:, :, sl] |= sc
        # clavicles
        cl = self.clav > 0.5
        img[cl] = 450.0
        bone |= cl
        self.bone = bone
        return img

    # ------------------------------------------------------------------------------------------
    def _paint_lungs(self, img: np.ndarray) -> np.ndarray:
        p, Y2 = self.p, self.Y2
        dom = self.lung_dom
        dep = ((Y2 - (self.y_bc - self.b_ant)) / (self.b_ant + self.b_post)).astype(np.float32)  # 0 front, 1 back
        paren = p["lung_hu"] + p["dependent_hu"] * (dep - 0.5)[:, :, None] + 14.0 * self.tex
        img[dom] = paren[dom]
        # pulmonary trees grown into each lung
        pts_r, pts_l = self._territory_points()
        segs = []
        rng = self.rng
        for pts, root_a, root_v in ((pts_r, self.pa_r, self.pv_r), (pts_l, self.pa_l, self.pv_l)):
            if len(pts) < 20:
                continue
            half = len(pts) // 2
            s, e, r0, r1 = _grow_tree(rng, root_a, pts[:half], 6.0, r_leaf=0.35, exponent=p["vessel_exponent"])
            segs.append(("artery", s, e, r0, r1))
            v = e - s
            vert = np.abs(v[:, 2]) > 0.9 * np.linalg.norm(v, axis=1)
            ref = np.where(vert[:, None], [[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]])
            n = np.cross(v, ref)
            n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-6)
            big = r0 >= 1.3
            off = n[big] * (2.0 * r0[big, None] + 1.0)
            segs.append(("bronchus", s[big] + off, e[big] + off, 0.9 * r0[big], 0.9 * r1[big]))
            s, e, r0, r1 = _grow_tree(rng, root_v, pts[half:], 5.5, r_leaf=0.35, exponent=p["vessel_exponent"])
            segs.append(("vein", s, e, r0, r1))
        shape = self.shape
        self.vessel_occ = np.zeros(shape, np.float32)
        self.br_wall = np.zeros(shape, np.float32)
        self.br_lumen = np.zeros(shape, np.float32)
        r_thin = 0.55 * float(min(self.es[0], self.es[1]))
        thin = []
        for kind, s, e, r0, r1 in segs:
            if kind == "bronchus":
                for i in range(len(s)):
                    w = 0.25 * r0[i] + 0.35
                    self.seg(self.br_wall, s[i], e[i], r0[i] + w, r1[i] + w)
                    self.seg(self.br_lumen, s[i], e[i], r0[i], r1[i])
                continue
            thick = r0 >= r_thin
            for i in np.flatnonzero(thick):
                self.seg(self.vessel_occ, s[i], e[i], r0[i], r1[i])
            thin.append((s[~thick], e[~thick], r0[~thick], r1[~thick]))
        thin.append(self._micro_vessels())
        if thin:
            ts, te, tr0, tr1 = (np.concatenate(c) for c in zip(*thin))
            self.vessel_occ += _splat_segments(shape, self.origin, self.es, ts, te, tr0, tr1)
        allowed = dom | (self.cav & ~self.below & ~self.heart & self.band[:, :, None])
        occ = self.vessel_occ
        np.clip(occ, 0, 1, out=occ)
        occ *= allowed
        self.br_wall *= dom
        self.br_lumen *= dom
        img += occ * (BLOOD_HU - img)
        img += self.br_wall * (10.0 - img)
        img += self.br_lumen * (AIR_HU + 20.0 - img)
        return img

    def _lung_points(self, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """Uniform random points (mm) of the field of view that fall in a lung, and their labels.

        Drawn in mm, so that they barely depend on the grid.
        """
        lo = np.array([e[0] for e in self.extent])
        hi = np.array([e[1] for e in self.extent])
        cand = lo + (hi - lo) * self.rng.uniform(size=(n_candidates, 3))
        idx = np.rint((cand - self.origin) / self.es).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(self.shape)), axis=1)
        lab = np.zeros(len(cand), np.uint8)
        ii = idx[inside]
        lab[inside] = self.lung_lab[ii[:, 0], ii[:, 1], ii[:, 2]]
        keep = lab > 0
        return cand[keep], lab[keep]

    def _territory_points(self) -> tuple[np.ndarray, np.ndarray]:
        """Points (mm) spread in each lung: the territories of the vessel trees."""
        n_want = int(self.p["vessel_points"])
        pts, lab = self._lung_points(30 * n_want)
        return pts[lab == 1][: 2 * n_want], pts[lab == 2][: 2 * n_want]

    def _micro_vessels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Many thin, short, slightly bent vessels pointing away from the hila (the fine texture of
        normal parenchyma), as segment starts, ends and radii."""
        rng = self.rng
        lung_ml = float(np.count_nonzero(self.lung_dom)) * float(np.prod(self.es)) / 1000.0
        n = int(self.p["micro_per_ml"] * lung_ml)
        if n == 0:
            z = np.zeros((0, 3))
            return z, z, np.zeros(0), np.zeros(0)
        share = max(np.count_nonzero(self.lung_dom) / self.lung_dom.size, 1e-3)
        pts, lab = self._lung_points(int(1.3 * n / share) + 100)
        pts, lab = pts[:n], lab[:n]
        hilum = np.where((lab == 1)[:, None], self.pa_r[None, :], self.pa_l[None, :])
        d = pts - hilum
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        d += 0.7 * rng.standard_normal(d.shape)
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        length = rng.uniform(3.0, 8.0, (len(pts), 1))
        p0 = pts - 0.5 * length * d
        p1 = pts + 0.5 * length * d
        d2 = d + 0.6 * rng.standard_normal(d.shape)
        d2 /= np.maximum(np.linalg.norm(d2, axis=1, keepdims=True), 1e-6)
        p2 = p1 + rng.uniform(2.0, 6.0, (len(pts), 1)) * d2
        r = self.p["micro_radius_mm"] * rng.uniform(0.8, 1.25, len(pts))
        return (
            np.concatenate([p0, p1]),
            np.concatenate([p1, p2]),
            np.concatenate([r, 0.9 * r]),
            np.concatenate([0.9 * r, 0.8 * r]),
        )

    # ------------------------------------------------------------------------------------------
    def _paint_airways_table(self, img: np.ndarray) -> np.ndarray:
        p, X2, Y2 = self.p, self.X2, self.Y2
        self.aw_wall *= self.body
        self.aw_lumen *= self.body
        img += self.aw_wall * (25.0 - img)
        img += self.aw_lumen * (AIR_HU - img)
        self.lung_lab[(self.aw_wall > 0.5) | (self.aw_lumen > 0.5)] = 0
        self.table = np.zeros(self.shape, bool)
        if p["table"]:
            sag = p["table_sag"] / 230.0**2 * X2[:, 0] ** 2
            rows = self.body.any(axis=2)  # (x, y)
            back = np.where(rows.any(axis=1), np.max(np.where(rows, Y2, -np.inf), axis=1), -np.inf)
            y_top = float(np.max(back + sag)) + p["table_gap"]  # the gap holds across the table
            yt = y_top - sag[:, None]  # concave towards the patient
            dy = Y2 - yt
            wide = np.abs(X2) < 235.0
            shell = ((dy >= 0) & (dy < 2.5) | (dy >= 40.0) & (dy < 43.0)) & wide
            core = (dy >= 2.5) & (dy < 40.0) & wide
            tab2 = shell | core
            val = np.where(shell, np.float32(250.0), np.float32(-880.0))
            for k in range(self.shape[2]):
                img[:, :, k][tab2] = val[tab2]
            self.table = np.broadcast_to(tab2[:, :, None], self.shape).copy()
        return img

    # ------------------------------------------------------------------------------------------
    def _diaphragm_partial_volume(self, img: np.ndarray) -> np.ndarray:
        """Mix lung and abdomen in the slice that the diaphragm passes through, by the share of the
        slice thickness above the dome. Where the dome is nearly flat (its top, cut by a thick axial
        slice), this gives the wide grey zones of partial volume that real lung bases show and that
        are not lesions."""
        dz = float(self.es[2])
        z_d = self.z_dome
        k0 = np.floor((z_d - (self.z[0] - dz / 2.0)) / dz).astype(int)  # slice holding the dome surface
        inside = (k0 >= 1) & (k0 < self.shape[2] - 1) & (z_d > 0)
        xs, ys = np.nonzero(inside)
        k = k0[xs, ys]
        lung_here = self.lung_dom[xs, ys, k]
        lung_above = self.lung_dom[xs, ys, k + 1]
        organ_below = self.cav[xs, ys, k - 1] & self.below[xs, ys, k - 1] & ~self.heart[xs, ys, k - 1]
        ok = (lung_here | lung_above) & organ_below
        xs, ys, k, lung_here = xs[ok], ys[ok], k[ok], lung_here[ok]
        share = np.clip((self.z[k] + dz / 2.0 - z_d[xs, ys]) / dz, 0.0, 1.0).astype(np.float32)
        lung_val = np.where(lung_here, img[xs, ys, k], img[xs, ys, k + 1])
        organ_val = np.where(lung_here, img[xs, ys, k - 1], img[xs, ys, k])
        img[xs, ys, k] = share * lung_val + (1.0 - share) * organ_val
        return img

    # ------------------------------------------------------------------------------------------
    def _finish(self, img: np.ndarray, blur_mm: float | Sequence[float] | None, fov_circle: bool) -> np.ndarray:
        soft = (img > -200.0) & (img < 120.0)
        img[soft] += 7.0 * self.tex[soft]
        spc = self.spacing
        blur = (
            (0.6, 0.6, 0.35 * spc[2]) if blur_mm is None else tuple(np.broadcast_to(np.asarray(blur_mm, float), (3,)))
        )
        img = _blur3(img, _blur_weights(blur, spc))
        sigma = float(self.p["noise_hu"])
        if sigma > 0:
            w = [0.18, 0.18, 0.08]
            noise = _blur3(self.rng.standard_normal(self.shape, dtype=np.float32), w)
            gain = 1.0 / math.sqrt(float(np.prod([(1 - 2 * x) ** 2 + 2 * x * x for x in w])))
            noise *= np.float32(sigma * gain)
            img += noise
        if fov_circle:
            nx, ny, _ = self.shape
            xx = (np.arange(nx) - (nx - 1) / 2.0) * spc[0]
            yy = (np.arange(ny) - (ny - 1) / 2.0) * spc[1]
            outside = (xx[:, None] ** 2 + yy[None, :] ** 2) > (nx * spc[0] / 2.0) ** 2
            img[outside] = OUTSIDE_FOV_HU
        np.clip(img, -1024.0, 3071.0, out=img)
        return img
