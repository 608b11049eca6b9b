"""From a CT volume to classifier-ready axial slices, and from per-slice maps back to a volume.

The slice classifier sees axial slices that hold lung, HU-windowed to [0, 1], cropped to the
study's lung box (one square box in millimetres for all slices of the study, so that the maps of
one study stay on one common grid), and resized to a fixed size. Optional 2.5D input stacks the
neighbouring slices as channels. :func:`paste_slices` inverts the geometry: maps of the selected
slices are resized back to the box and placed into a zero volume on the CT grid.

Volumes are channel-first or plain (X, Y, Z) tensors in ITK/MONAI index order, axial slices
along the last axis (reorient to RAS first, as :func:`monai_ext.io.load_ct` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SliceStack",
    "extract_slices",
    "paste_slices",
    "lung_slice_indices",
    "lung_box",
    "window_hu",
    "DEFAULT_WINDOW",
    "SOFT_TISSUE_HU",
    "lung_surroundings",
    "flatten_surroundings",
    "surroundings_to_flatten",
]

#: HU window mapped to [0, 1]: lung parenchyma, ground glass, consolidation and soft tissue
DEFAULT_WINDOW = (-1350.0, 150.0)
#: soft tissue (HU), written where the lung's surroundings are flattened
SOFT_TISSUE_HU = 40.0


@dataclass
class SliceStack:
    """Slices of one study ready for the classifier, with the geometry to paste maps back.

    Attributes:
        images: (N, C, S, S) float tensor in [0, 1]; C = 1 + 2 * context.
        indices: (N,) long tensor, the axial index of each slice in the volume.
        box: (x0, x1, y0, y1) in-plane crop on the volume grid, end exclusive; it may reach
            outside the volume (padded with air).
        volume_shape: (X, Y, Z) of the volume.
        lung_area: (N,) lung pixels of each slice on the volume grid.
    """

    images: torch.Tensor
    indices: torch.Tensor
    box: tuple[int, int, int, int]
    volume_shape: tuple[int, int, int]
    lung_area: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _plain(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(t)
    t = t.as_tensor() if hasattr(t, "as_tensor") else t
    return t[0] if t.ndim == 4 else t


def window_hu(x: torch.Tensor, window: Sequence[float] = DEFAULT_WINDOW) -> torch.Tensor:
    """Map HU linearly from ``window`` to [0, 1], clipped."""
    lo, hi = float(window[0]), float(window[1])
    return ((x.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def lung_slice_indices(lung: torch.Tensor | np.ndarray, min_fraction: float = 0.02) -> torch.Tensor:
    """Axial indices whose lung area is at least ``min_fraction`` of the largest slice's."""
    area = (_plain(lung) > 0).sum(dim=(0, 1))
    if int(area.max()) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(area >= max(1.0, min_fraction * float(area.max()))).flatten()


def lung_box(
    lung: torch.Tensor | np.ndarray, spacing: Sequence[float], margin_mm: float = 10.0
) -> tuple[int, int, int, int]:
    """Square (in mm) in-plane box around all lung voxels, with a margin: (x0, x1, y0, y1)."""
    m = _plain(lung) > 0
    xs = torch.nonzero(m.any(dim=(1, 2))).flatten()
    ys = torch.nonzero(m.any(dim=(0, 2))).flatten()
    if xs.numel() == 0:
        raise ValueError("the lung mask is empty")
    sx, sy = float(spacing[0]), float(spacing[1])
    cx, cy = (float(xs[0]) + float(xs[-1])) / 2 * sx, (float(ys[0]) + float(ys[-1])) / 2 * sy
    half = max((float(xs[-1]) - float(xs[0]) + 1) * sx, (float(ys[-1]) - float(ys[0]) + 1) * sy) / 2 + margin_mm
    x0, x1 = int(np.floor((cx - half) / sx)), int(np.ceil((cx + half) / sx)) + 1
    y0, y1 = int(np.floor((cy - half) / sy)), int(np.ceil((cy + half) / sy)) + 1
    return x0, x1, y0, y1


def lung_surroundings(lung: torch.Tensor | np.ndarray, spacing: Sequence[float], margin_mm: float) -> torch.Tensor:
    """Per axial slice (last axis): the pixels within ``margin_mm`` (in-plane) of that slice's lung,
    the lung included; all False in a slice without lung."""
    from scipy import ndimage as ndi

    if not margin_mm >= 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
    m = _plain(lung).cpu().numpy() > 0
    out = np.zeros(m.shape, dtype=bool)
    for k in np.flatnonzero(m.any(axis=(0, 1))):
        out[:, :, k] = ndi.distance_transform_edt(~m[:, :, k], sampling=(float(spacing[0]), float(spacing[1]))) \
            <= margin_mm
    return torch.from_numpy(out)


def surroundings_to_flatten(volume: torch.Tensor | np.ndarray, lung: torch.Tensor | np.ndarray,
                            spacing: Sequence[float], margin_mm: float, keep_air: bool = True,
                            body_hu: float = -500.0) -> torch.Tensor:
    """Per axial slice: the pixels farther than ``margin_mm`` (in-plane) from that slice's lung,
    without the air around the body when ``keep_air`` (the body: pixels above ``body_hu`` with
    their enclosed holes, and the lung). All False in a slice without lung."""
    from scipy import ndimage as ndi

    far = ~lung_surroundings(lung, spacing, margin_mm).numpy()
    m = _plain(lung).cpu().numpy() > 0
    far[:, :, ~m.any(axis=(0, 1))] = False
    if keep_air:
        vol = _plain(volume).cpu().numpy()
        for k in np.flatnonzero(far.any(axis=(0, 1))):
            body = ndi.binary_fill_holes(vol[:, :, k] > body_hu) | m[:, :, k]
            far[:, :, k] &= body
    return torch.from_numpy(far)


def flatten_surroundings(volume: torch.Tensor | np.ndarray, lung: torch.Tensor | np.ndarray,
                         spacing: Sequence[float], margin_mm: float, value: float = SOFT_TISSUE_HU,
                         keep_air: bool = True) -> torch.Tensor:
    """A copy of an (X, Y, Z) HU volume whose body farther than ``margin_mm`` (in-plane) from the
    lung of its slice is set to ``value`` (default soft tissue, 40 HU); the air around the body stays
    (``keep_air=False``: flatten it too).

    The embedded model is trained on phantoms whose lungs are surrounded by nearly uniform organs;
    real lung bases and apices are surrounded by fat, bowel with gas and stool, kidneys and neck
    muscles, which it takes for lesion. Flattening the body around the lung at inference removes that
    difference while keeping the lung, its border and the body outline (``scripts/context_check.py``
    measures it).
    """
    vol = _plain(volume).float()
    far = surroundings_to_flatten(vol, lung, spacing, margin_mm, keep_air).to(vol.device)
    return torch.where(far, torch.tensor(float(value), device=vol.device), vol)


def _crop(vol: torch.Tensor, box: tuple[int, int, int, int], fill: float) -> torch.Tensor:
    """Crop (X, Y, ...) to the box, padding with ``fill`` where the box leaves the volume."""
    x0, x1, y0, y1 = box
    X, Y = vol.shape[0], vol.shape[1]
    pads = (max(0, -x0), max(0, x1 - X), max(0, -y0), max(0, y1 - Y))
    inner = vol[max(0, x0) : min(X, x1), max(0, y0) : min(Y, y1)]
    if any(pads):
        out = torch.full((x1 - x0, y1 - y0, *vol.shape[2:]), fill, dtype=vol.dtype, device=vol.device)
        out[pads[0] : pads[0] + inner.shape[0], pads[2] : pads[2] + inner.shape[1]] = inner
        return out
    return inner


def extract_slices(
    volume: torch.Tensor | np.ndarray,
    lung: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    size: int = 192,
    context: int = 0,
    window: Sequence[float] = DEFAULT_WINDOW,
    margin_mm: float = 10.0,
    min_lung_fraction: float = 0.02,
    indices: torch.Tensor | Sequence[int] | None = None,
    flatten_beyond_mm: float | None = None,
    flatten_hu: float = SOFT_TISSUE_HU,
) -> SliceStack:
    """Classifier input for the lung slices of a study.

    Args:
        volume: (X, Y, Z) or (1, X, Y, Z) CT in HU.
        lung: lung mask on the same grid (non-zero = lung).
        spacing: voxel spacing in mm (x, y, z).
        size: output slice size S (S x S).
        context: neighbouring slices on each side stacked as channels (0: single slice; 1: 2.5D
            with three channels). Neighbours past the ends repeat the edge slice.
        window: HU window mapped to [0, 1].
        margin_mm: margin around the lung box.
        min_lung_fraction: slices with less lung than this share of the largest slice's lung
            area are skipped.
        indices: axial indices to extract instead of the lung slices.
        flatten_beyond_mm: if given, the body farther than this (in-plane) from the lung of its
            own slice is set to ``flatten_hu`` before windowing: the classifier then sees the lung,
            a rim around it and the body outline, and uniform soft tissue elsewhere in the body
            (see :func:`flatten_surroundings`).
        flatten_hu: the value written there.

    Returns:
        A :class:`SliceStack`.

    Raises:
        ValueError: if the lung mask is empty or does not match the volume.

    Example::

        ct = load_ct("study.nii.gz"); lung = LungMask()(ct)
        stack = extract_slices(ct, lung, ct.pixdim.tolist(), size=192)
        probs = model(stack.images).softmax(1)[:, 1]
    """
    vol, m = _plain(volume), _plain(lung)
    if tuple(vol.shape) != tuple(m.shape):
        raise ValueError(f"lung mask shape {tuple(m.shape)} differs from volume shape {tuple(vol.shape)}")
    box = lung_box(m, spacing, margin_mm)
    idx = lung_slice_indices(m, min_lung_fraction) if indices is None else torch.as_tensor(indices).long()
    Z = vol.shape[2]
    offsets = torch.arange(-context, context + 1)
    planes = (idx[:, None] + offsets[None, :]).clamp(0, Z - 1)  # (N, C)
    crop = _crop(vol, box, fill=-1024.0)  # (W, H, Z)
    sel = crop[:, :, planes.flatten()].float()  # (W, H, N*C)
    if flatten_beyond_mm is not None and len(idx):
        # once per distinct plane (with 2.5D context, neighbouring slices share planes)
        uniq, inverse = torch.unique(planes.flatten(), return_inverse=True)
        far = surroundings_to_flatten(crop[:, :, uniq], _crop(m, box, fill=0)[:, :, uniq], spacing, flatten_beyond_mm)
        sel = torch.where(far[:, :, inverse].to(sel.device), torch.tensor(float(flatten_hu), device=sel.device), sel)
    sel = window_hu(sel, window).permute(2, 0, 1).reshape(len(idx), planes.shape[1], crop.shape[0], crop.shape[1])
    images = (
        F.interpolate(sel, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if len(idx)
        else sel.new_zeros((0, planes.shape[1], size, size))
    )
    area = (m[:, :, idx] > 0).sum(dim=(0, 1)) if len(idx) else torch.zeros(0, dtype=torch.long)
    return SliceStack(images.clamp_(0.0, 1.0).contiguous(), idx, box, tuple(int(s) for s in vol.shape), area)


def paste_slices(maps: torch.Tensor, stack: SliceStack, fill: float = 0.0) -> torch.Tensor:
    """Put per-slice maps (N, 1, S, S) or (N, S, S) back into a (X, Y, Z) volume on the CT grid.

    Slices that were not extracted, and the parts of the volume outside the lung box, get ``fill``.
    """
    if maps.ndim == 4:
        maps = maps[:, 0]
    if maps.shape[0] != len(stack):
        raise ValueError(f"{maps.shape[0]} maps for a stack of {len(stack)} slices")
    X, Y, Z = stack.volume_shape
    x0, x1, y0, y1 = stack.box
    out = torch.full((X, Y, Z), float(fill), dtype=torch.float32)
    if len(stack) == 0:
        return out
    up = F.interpolate(maps[:, None].float().cpu(), size=(x1 - x0, y1 - y0), mode="bilinear", align_corners=False)[
        :, 0
    ]  # (N, W, H)
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(X, x1), min(Y, y1)
    out[cx0:cx1, cy0:cy1][:, :, stack.indices] = up[:, cx0 - x0 : cx1 - x0, cy0 - y0 : cy1 - y0].permute(1, 2, 0)
    return out
