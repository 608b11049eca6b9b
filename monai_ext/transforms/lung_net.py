"""The project's own lung U-Net: a small 2.5D MONAI ``UNet`` that keeps dense disease in the lung
and leaves the organs under the diaphragm out, CPU-fast, from a local weights file.

The classical threshold mask (:func:`monai_ext.transforms.lung.threshold_lung_mask`) finds
aerated lung reliably, but dense consolidation that lies against the chest wall, the heart or the
diaphragm looks like them to a threshold, and slice-wise hole filling takes in the domes of the
liver and the spleen. This network is trained (``scripts/train_lung_net.py``) on chest CT whose
terms allow it, with labels from the threshold mask of the clean CT (domes removed with
:func:`monai_ext.transforms.organs.organ_intrusion`, checked by eye) and inputs with ground glass
and consolidation inserted inside those labels at 0-90 % of the lung (:mod:`monai_ext.data.lesions`),
under scanner-like augmentation: it learns where the lung is from the anatomy around it, not
from the lung's density.

Input: each axial slice with its neighbours ``context_mm`` above and below (three channels),
resampled onto a square canvas of ``size`` pixels of ``pixel_mm`` centred on the body
(patient orientation: left, posterior, superior axes), HU window mapped to [0, 1]. Output: a
lung probability per canvas pixel, resampled back onto the input grid (bilinear) and thresholded
at 0.5; the largest components are kept and split into right and left lung.

Files: ``lung_net.pt`` (state dict) and ``lung_net.json`` beside it (the network as a MONAI config
``_target_`` dict, the input settings, the SHA-256 of the weights, checked at every load, and
the training record). Weights are loaded with ``torch.load(weights_only=True)``; the network is
built only from ``monai.networks.nets`` targets.

Example:
    >>> from monai_ext.transforms.lung_net import net_lung_mask
    >>> mask = net_lung_mask(ct_xyz, (0.7, 0.7, 1.25), affine=affine, weights_path="lung_net.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation
from scipy import ndimage

from monai_ext.errors import CTSeverityError, NoLungFoundError
from monai_ext.transforms.organs import canonical_view

__all__ = [
    "LUNG_NET_ENV",
    "LungNetWeightsError",
    "LungNet",
    "LungNetInput",
    "body_centre",
    "canvas_grid",
    "sample_canvas",
    "paste_canvas",
    "load_lung_net",
    "lung_probability",
    "net_lung_mask",
    "combine_with_threshold",
    "register_default_lung_net",
    "find_lung_net",
]

LUNG_NET_ENV = "CTSEVERITY_LUNG_NET"
_ALLOWED_TARGET_PREFIX = "monai.networks.nets."
_default_path: Path | None = None


class LungNetWeightsError(CTSeverityError, FileNotFoundError):
    """The lung U-Net weights are missing, damaged or not a lung U-Net."""


@dataclass(frozen=True)
class LungNetInput:
    """How a slice becomes the network's input.

    Attributes:
        size: canvas size in pixels (square).
        pixel_mm: canvas pixel size in mm.
        context_mm: distance of the neighbouring slices given as the first and third channel.
        window: HU window mapped to [0, 1].
    """

    size: int = 256
    pixel_mm: float = 2.0
    context_mm: float = 5.0
    window: tuple[float, float] = (-1000.0, 300.0)

    @classmethod
    def from_dict(cls, d: dict) -> LungNetInput:
        return cls(int(d["size"]), float(d["pixel_mm"]), float(d["context_mm"]), tuple(float(v) for v in d["window"]))

    def to_dict(self) -> dict:
        return {"size": self.size, "pixel_mm": self.pixel_mm, "context_mm": self.context_mm,
                "window": list(self.window)}


@dataclass
class LungNet:
    """A loaded lung U-Net."""

    network: torch.nn.Module
    input: LungNetInput
    info: dict
    path: Path


def register_default_lung_net(path: str | os.PathLike | None) -> None:
    """Set the weights file used when none is given and ``$CTSEVERITY_LUNG_NET`` is unset (the
    ``pipelines`` package registers the one of its embedded bundle)."""
    global _default_path
    _default_path = None if path is None else Path(path)


def find_lung_net(weights_path: str | os.PathLike | None = None) -> Path | None:
    """The lung U-Net weights: ``weights_path`` (must exist), else ``$CTSEVERITY_LUNG_NET``, else the
    registered default; ``None`` when neither of the last two is a file.

    Raises:
        LungNetWeightsError: ``weights_path`` is given and is not a file.
    """
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise LungNetWeightsError("lung U-Net weights not found", p)
        return p
    for cand in (os.environ.get(LUNG_NET_ENV), _default_path):
        if cand and Path(cand).expanduser().is_file():
            return Path(cand).expanduser()
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_lung_network(network_def: dict) -> torch.nn.Module:
    """Build the network of a ``lung_net.json`` (only ``monai.networks.nets`` classes are allowed).

    Raises:
        LungNetWeightsError: another ``_target_``.
    """
    from monai.bundle import ConfigParser

    target = str(network_def.get("_target_", ""))
    if not target.startswith(_ALLOWED_TARGET_PREFIX) or any(str(v).startswith(("$", "@", "%"))
                                                             for v in network_def.values()):
        raise LungNetWeightsError(f"lung_net.json: network {target!r} is not a plain MONAI network definition")
    return ConfigParser({"net": dict(network_def)}).get_parsed_content("net")


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, device: str) -> LungNet:  # noqa: ARG001 (mtime keys the cache)
    p = Path(path)
    meta_path = p.with_suffix(".json")
    if not meta_path.is_file():
        raise LungNetWeightsError(f"{meta_path.name} (network definition and checksum) is missing beside it", p)
    try:
        info = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LungNetWeightsError(f"cannot read {meta_path.name}: {exc}", p) from exc
    digest = _sha256(p)
    if digest != info.get("sha256"):
        raise LungNetWeightsError(f"checksum mismatch (expected {info.get('sha256')}, file has {digest}); the file is "
                                  "damaged or was replaced", p)
    net = build_lung_network(info["network_def"])
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # torch.load / load_state_dict errors: not this network's weights
        raise LungNetWeightsError(f"cannot load the lung U-Net weights: {exc}", p) from exc
    return LungNet(net.to(torch.device(device)).eval(), LungNetInput.from_dict(info["input"]), info, p)


def load_lung_net(weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LungNet:
    """Load (once per process, per file and device) the lung U-Net.

    Raises:
        LungNetWeightsError: no weights found, a checksum mismatch, or weights of another network.
    """
    p = find_lung_net(weights_path)
    if p is None:
        raise LungNetWeightsError(f"no lung U-Net weights (pass weights, set {LUNG_NET_ENV}, or use the bundle's "
                                  "models/lung_net.pt)")
    return _load_cached(str(p.resolve()), p.stat().st_mtime_ns, str(torch.device(device)))


# ------------------------------------------------------------------------------------------------
# geometry: canonical volume (x left, y posterior, z superior) <-> canvas
def body_centre(volume: np.ndarray, spacing: Sequence[float], body_hu: float = -500.0) -> tuple[float, float]:
    """In-plane centre (mm, from voxel 0) of the body's bounding box over all slices: voxels above
    ``body_hu`` in the largest connected component of a coarse grid (drops the table edge and
    stray objects)."""
    step = [max(1, int(round(4.0 / s))) for s in spacing[:2]] + [max(1, int(round(8.0 / spacing[2])))]
    coarse = volume[:: step[0], :: step[1], :: step[2]] > body_hu
    comp, n = ndimage.label(coarse)
    if n == 0:
        return (volume.shape[0] - 1) * spacing[0] / 2.0, (volume.shape[1] - 1) * spacing[1] / 2.0
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    body = comp == int(np.argmax(sizes))
    xs = np.flatnonzero(body.any(axis=(1, 2))) * step[0]
    ys = np.flatnonzero(body.any(axis=(0, 2))) * step[1]
    return 0.5 * (xs[0] + xs[-1]) * spacing[0], 0.5 * (ys[0] + ys[-1]) * spacing[1]


def canvas_grid(shape_xy: Sequence[int], spacing: Sequence[float], centre_mm: Sequence[float], cfg: LungNetInput,
                scale: float = 1.0, angle: float = 0.0, shift_mm: Sequence[float] = (0.0, 0.0)) -> torch.Tensor:
    """``grid_sample`` grid (1, S, S, 2) that reads an (X, Y) slice onto the canvas.

    Canvas pixel ``(i, j)`` (rows along x, columns along y) sits at ``centre + R(angle) *
    ((i, j) - S/2) * pixel_mm * scale + shift`` in mm; the grid gives its normalized input
    coordinates. ``scale``, ``angle`` (radians) and ``shift_mm`` are for augmentation.
    """
    s = cfg.size
    c = (torch.arange(s, dtype=torch.float64) - (s - 1) / 2.0) * cfg.pixel_mm * scale
    u, v = torch.meshgrid(c, c, indexing="ij")
    ca, sa = np.cos(angle), np.sin(angle)
    x_mm = centre_mm[0] + shift_mm[0] + ca * u - sa * v
    y_mm = centre_mm[1] + shift_mm[1] + sa * u + ca * v
    nx, ny = int(shape_xy[0]), int(shape_xy[1])
    # normalized coordinates with align_corners=True: -1 at voxel 0, +1 at the last voxel
    gx = 2.0 * (x_mm / spacing[0]) / max(nx - 1, 1) - 1.0
    gy = 2.0 * (y_mm / spacing[1]) / max(ny - 1, 1) - 1.0
    # grid_sample reads (N, C, H=X, W=Y) with grid[..., 0] along W (y) and grid[..., 1] along H (x)
    return torch.stack([gy, gx], dim=-1).float()[None]


def _context_planes(z: np.ndarray, n_slices: int, spacing_z: float, context_mm: float) -> np.ndarray:
    k = int(round(context_mm / spacing_z))
    return np.stack([np.clip(z - k, 0, n_slices - 1), z, np.clip(z + k, 0, n_slices - 1)], axis=1)


def sample_canvas(volume: np.ndarray | torch.Tensor, z: Sequence[int], spacing: Sequence[float],
                  centre_mm: Sequence[float], cfg: LungNetInput, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Network input (N, 3, S, S) for slices ``z`` of a canonical (X, Y, Z) volume in HU.

    Args:
        volume: canonical CT volume in HU.
        z: axial indices.
        spacing: voxel size in mm.
        centre_mm: in-plane centre of the canvas (:func:`body_centre`).
        cfg: input settings.
        grid: a grid from :func:`canvas_grid` (default: no augmentation).
    """
    vol = torch.as_tensor(np.asarray(volume)) if not isinstance(volume, torch.Tensor) else volume
    zz = np.asarray(z, dtype=np.int64)
    planes = _context_planes(zz, vol.shape[2], float(spacing[2]), cfg.context_mm)
    uniq, inverse = np.unique(planes.ravel(), return_inverse=True)
    lo, hi = cfg.window
    sl = vol[:, :, torch.as_tensor(uniq)].permute(2, 0, 1)[:, None].float()  # (U, 1, X, Y)
    sl = ((sl - lo) / (hi - lo)).clamp_(0.0, 1.0)
    if grid is None:
        grid = canvas_grid(vol.shape[:2], spacing, centre_mm, cfg)
    out = F.grid_sample(sl, grid.expand(sl.shape[0], -1, -1, -1), mode="bilinear", padding_mode="zeros",
                        align_corners=True)[:, 0]
    return out[torch.as_tensor(inverse)].reshape(len(zz), 3, cfg.size, cfg.size)


def paste_canvas(canvas: torch.Tensor, shape_xy: Sequence[int], spacing: Sequence[float], centre_mm: Sequence[float],
                 cfg: LungNetInput) -> torch.Tensor:
    """Inverse of :func:`sample_canvas` (no augmentation): (N, S, S) canvas maps back onto the (X, Y)
    grid, bilinear; 0 outside the canvas. Returns (N, X, Y)."""
    nx, ny = int(shape_xy[0]), int(shape_xy[1])
    s = cfg.size
    x_mm = torch.arange(nx, dtype=torch.float64) * spacing[0] - centre_mm[0]
    y_mm = torch.arange(ny, dtype=torch.float64) * spacing[1] - centre_mm[1]
    u = x_mm / cfg.pixel_mm / ((s - 1) / 2.0)
    v = y_mm / cfg.pixel_mm / ((s - 1) / 2.0)
    gu, gv = torch.meshgrid(u, v, indexing="ij")
    grid = torch.stack([gv, gu], dim=-1).float()[None]
    out = F.grid_sample(canvas[:, None].float(), grid.expand(canvas.shape[0], -1, -1, -1), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[:, 0]


# ------------------------------------------------------------------------------------------------
def lung_probability(canon: np.ndarray, spacing: Sequence[float], net: LungNet, batch_size: int = 16,
                     z: Sequence[int] | None = None) -> np.ndarray:
    """Lung probability (float32, canonical grid) of a canonical CT volume, slice by slice.

    Args:
        canon: (X, Y, Z) CT in HU, axes left, posterior, superior.
        spacing: voxel size in mm.
        net: the loaded network.
        batch_size: slices per forward pass.
        z: slices to compute (default: every slice); the others stay 0.
    """
    cfg = net.input
    centre = body_centre(canon, spacing)
    grid = canvas_grid(canon.shape[:2], spacing, centre, cfg)
    vol = torch.from_numpy(np.ascontiguousarray(canon))
    zs = np.arange(canon.shape[2]) if z is None else np.asarray(z, dtype=np.int64)
    prob = np.zeros(canon.shape, dtype=np.float32)
    device = next(net.network.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(zs), batch_size):
            zb = zs[i:i + batch_size]
            x = sample_canvas(vol, zb, spacing, centre, cfg, grid=grid).to(device)
            p = torch.sigmoid(net.network(x)[:, 0]).float().cpu()
            prob[:, :, zb] = paste_canvas(p, canon.shape[:2], spacing, centre, cfg).permute(1, 2, 0).numpy()
    return prob


def _keep_lungs(mask: np.ndarray, voxel_ml: float, min_component_ml: float = 20.0) -> np.ndarray:
    """The largest component, and others of at least ``min_component_ml`` and 10 % of it."""
    comp, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(comp.ravel()) * voxel_ml
    sizes[0] = 0
    keep = (sizes >= min_component_ml) & (sizes >= 0.1 * sizes.max())
    keep[int(np.argmax(sizes))] = True
    keep[0] = False
    return keep[comp]


def _ellipsoid(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    r = [int(np.floor(radius_mm / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing)) <= radius_mm**2 + 1e-6


def combine_with_threshold(canon: np.ndarray, spacing: Sequence[float], net_mask: np.ndarray,
                           core_mm: float = 2.5, name: object | None = None, prob: np.ndarray | None = None,
                           organ_confidence: float = 0.9, aerated_hu: float = -700.0) -> np.ndarray:
    """The network's lung where the threshold mask has none, on the threshold mask.

    The threshold mask (:func:`~monai_ext.transforms.lung.threshold_lung_mask`: aerated lung at
    full resolution, organ domes out) gives the boundary wherever the lung is aerated. What the
    network adds beyond it (dense lesions that a threshold cannot tell from the chest wall, the
    heart or the diaphragm) is kept where it is at least ``2 * core_mm`` thick: the added region
    is eroded by ``core_mm`` and grown back inside itself by ``core_mm + 1`` mm, so that the one or
    two coarse canvas pixels by which the network's boundary overshoots the lung along the
    diaphragm and the chest wall do not come in, while a consolidation keeps its whole extent; and
    only added regions that touch the threshold mask are kept (a lesion spreads from aerated lung,
    a stray blob of the network inside the liver does not touch it). Last, added tissue that rises
    from the abdomen through the diaphragm (the column criterion of
    :func:`~monai_ext.transforms.organs.organ_intrusion`, dense part) stays only where the network
    is at least ``organ_confidence`` sure of it: basal consolidation on the diaphragm is continuous
    with the liver by that criterion and the network tells it apart, while the liver and spleen
    domes it is unsure of go, with their partial-volume rims.

    Args:
        canon: canonical CT in HU (x left, y posterior, z superior).
        spacing: voxel size in mm.
        net_mask: the network's lung mask on the same grid.
        core_mm: half the thickness below which an added region is dropped.
        name: what to call the input in error messages.
        prob: the network's lung probability on the same grid (default: the organ rule is not applied).
        organ_confidence: probability below which added tissue rising from the abdomen is dropped.
        aerated_hu: the network adds no voxel below this (after a 1 mm Gaussian): aerated lung is the
            threshold mask's, and air it left out is airway, gas or outside air.

    Returns:
        Boolean lung mask.
    """
    from monai_ext.errors import NoLungFoundError as _NoLung
    from monai_ext.transforms.lung import threshold_lung_mask

    try:
        base = threshold_lung_mask(canon, spacing, name=name, min_lung_ml=0.0) > 0
    except _NoLung:  # no aerated lung at all: the network's mask alone
        base = np.zeros(net_mask.shape, dtype=bool)
    # the network adds only what a threshold cannot see, tissue denser than aerated lung: air it marks
    # beyond the threshold mask is airway, gas or air outside the lung, which that mask leaves out on purpose
    extra = net_mask & ~base
    if extra.any():  # smoothed in the additions' box only (a 1 mm Gaussian reaches 4 sigma = 4 mm)
        pad = [int(np.ceil(4.0 / s)) for s in spacing]
        nz = [np.flatnonzero(extra.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
        dbox = tuple(slice(max(0, int(i[0]) - p), min(n, int(i[-1]) + 1 + p)) for i, p, n in zip(nz, pad, extra.shape))
        extra[dbox] &= ndimage.gaussian_filter(canon[dbox].astype(np.float32), [1.0 / s for s in spacing]) > aerated_hu
    if extra.any():
        idx = [np.flatnonzero(extra.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
        pad = [int(np.ceil((core_mm + 1.0) / s)) + 1 for s in spacing]
        box = tuple(slice(max(0, int(i[0]) - p), min(n, int(i[-1]) + 1 + p)) for i, p, n in zip(idx, pad, extra.shape))
        sub = extra[box]
        core = ndimage.binary_erosion(sub, structure=_ellipsoid(core_mm, spacing))
        grown = ndimage.binary_dilation(core, structure=_ellipsoid(core_mm + 1.0, spacing)) & sub
        # only regions that touch the aerated lung: lesions spread from it, a stray blob in the liver does not
        comp, n = ndimage.label(grown)
        if n:
            touching = np.unique(comp[ndimage.binary_dilation(base[box]) & grown])
            added = np.isin(comp, touching[touching > 0]) & ~base[box]
            base[box] |= added
            if prob is not None and added.any():
                from monai_ext.transforms.organs import organ_intrusion_canonical

                organ = organ_intrusion_canonical(canon, base, spacing)  # with its partial-volume rim
                base[organ & (prob < organ_confidence) & np.pad(added, [(b.start, n - b.stop) for b, n in
                                                                        zip(box, base.shape)])] = False
    return base


def net_lung_mask(volume_xyz: np.ndarray, spacing: Sequence[float], *, affine: np.ndarray | None = None,
                  weights_path: str | os.PathLike | None = None, split_lr: bool = False, name: object | None = None,
                  device: str | None = None, batch_size: int = 16, min_lung_ml: float = 100.0) -> np.ndarray:
    """Lung mask by the project's lung U-Net.

    Args:
        volume_xyz: (X, Y, Z) CT in HU, ITK index order.
        spacing: voxel size of the array's axes in mm.
        affine: RAS affine of the array (``None``: ITK identity direction).
        weights_path: ``lung_net.pt`` (default: ``$CTSEVERITY_LUNG_NET``, else the registered default).
        split_lr: label the right lung 1 and the left lung 2 instead of both 1.
        name: what to call the input in error messages.
        device: torch device (default CPU).
        batch_size: slices per forward pass.
        min_lung_ml: less lung than this raises :class:`~monai_ext.errors.NoLungFoundError`.

    Returns:
        ``uint8`` array on the input grid: 0 background, 1 lung (or 1 right, 2 left).

    Raises:
        LungNetWeightsError: no usable weights.
        NoLungFoundError: less than ``min_lung_ml`` of lung found.
    """
    from monai_ext.transforms.lung import LEFT_LUNG, RIGHT_LUNG, _split_merged

    net = load_lung_net(weights_path, device or "cpu")
    canon, cspacing, forward, backward = canonical_view(np.asarray(volume_xyz), spacing, affine)
    prob = lung_probability(canon, cspacing, net, batch_size=batch_size)
    voxel_ml = float(np.prod(cspacing)) / 1000.0
    mask = combine_with_threshold(canon, cspacing, prob > 0.5, name=name, prob=prob)
    mask = _keep_lungs(mask, voxel_ml)
    total = float(np.count_nonzero(mask)) * voxel_ml
    if total < min_lung_ml:
        raise NoLungFoundError(f"the lung U-Net found {total:.0f} ml of lung, below the {min_lung_ml:.0f} ml minimum",
                               name)
    if split_lr:
        comp, n = ndimage.label(mask)
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        order = np.argsort(sizes)[::-1]
        labels = np.zeros(mask.shape, dtype=np.uint8)
        x_mid = body_centre(canon, cspacing)[0] / cspacing[0]
        if n >= 2 and sizes[order[1]] >= 0.2 * sizes[order[0]]:
            for k in order[:n]:
                if sizes[k] == 0:
                    break
                part = comp == k
                labels[part] = LEFT_LUNG if np.mean(np.nonzero(part)[0]) > x_mid else RIGHT_LUNG
        else:
            box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
            labels[box] = _split_merged(mask[box], x_mid - box[0].start)
    else:
        labels = mask.astype(np.uint8)
    return np.ascontiguousarray(apply_orientation(labels, backward)).astype(np.uint8, copy=False)
