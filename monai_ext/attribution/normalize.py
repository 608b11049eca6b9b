"""Lung masking and joint, per-study scaling of attribution maps.

Attributors return raw maps that are comparable across the slices of a study (no per-slice
min-max). Turning them into a heatmap that can be thresholded is an explicit step:

1. :class:`MaskMap` / :class:`MaskMapd` zero the map outside the lung (MONAI's
   ``MaskIntensity(d)`` does the same for a single-channel mask; this pair also accepts a bare
   (X, Y, Z) mask and checks the shapes);
2. :func:`normalize_study` (or :class:`NormalizeStudy` / :class:`NormalizeStudyd`) scales the whole
   study with one factor: the ``percentile``-th percentile of the map inside the lung, then clips
   to [0, 1]. One factor per study keeps the relative strength of slices: a slice with a faint
   map stays faint instead of being stretched to full range.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from monai_ext.errors import NoLungFoundError

__all__ = ["normalize_study", "MaskMap", "MaskMapd", "MaskMapD", "MaskMapDict", "NormalizeStudy",
           "NormalizeStudyd", "NormalizeStudyD", "NormalizeStudyDict"]

Array = np.ndarray | torch.Tensor


def _as_tensor(data: Array) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.as_tensor() if hasattr(data, "as_tensor") else data
    return torch.as_tensor(np.asarray(data))


def _broadcast_mask(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask as bool, broadcastable to ``maps`` (a channel axis is added or matched as needed)."""
    mask = mask.to(device=maps.device) != 0
    if mask.shape == maps.shape:
        return mask
    if mask.ndim == maps.ndim - 1 and tuple(mask.shape) == tuple(maps.shape[1:]):
        return mask.unsqueeze(0)
    if mask.ndim == maps.ndim and mask.shape[0] == 1 and tuple(mask.shape[1:]) == tuple(maps.shape[1:]):
        return mask
    if mask.ndim == maps.ndim + 1 and mask.shape[0] == 1 and tuple(mask.shape[1:]) == tuple(maps.shape):
        return mask[0]
    raise ValueError(f"lung mask of shape {tuple(mask.shape)} does not fit maps of shape {tuple(maps.shape)}")


def _restore_type(out: torch.Tensor, like: Array) -> Array:
    if isinstance(like, torch.Tensor):
        if isinstance(like, MetaTensor):  # keep its metadata
            return MetaTensor(out, meta=dict(like.meta), applied_operations=list(like.applied_operations))
        return out
    return out.cpu().numpy()


def normalize_study(maps: Array, lung_mask: Array | None = None, percentile: float = 99.0,
                    mask_output: bool = True) -> Array:
    """Scale the attribution maps of one study jointly to [0, 1].

    The scale is the ``percentile``-th percentile (a value the map takes: the lower neighbour of the
    rank) of the map's positive values inside the lung over the whole study (all slices together);
    maps are divided by it and clipped to [0, 1], so negative values (signed methods such as LRP)
    become 0 and the strongest 1 - percentile/100 of the evidence saturates at 1. Taking the
    percentile over the voxels with evidence, not over the whole lung, keeps the map of a study
    whose evidence covers little of its lung (a few lesion slices): over the whole lung, its
    percentile would be 0 and the map would vanish. A study whose maps are zero (or negative)
    everywhere in the lung stays zero.

    Args:
        maps: the study's maps, any shape, e.g. (1, X, Y, Z) or (Z, 1, H, W); numpy or torch.
        lung_mask: the lung mask: the shape of ``maps``, or that shape without (or with a single)
            channel axis; non-zero inside the lung. ``None``: the whole volume counts as lung.
        percentile: percentile (0, 100] that maps to 1.
        mask_output: also set the output to 0 outside the lung.

    Returns:
        float32 maps of the same shape and kind (numpy array, tensor or MetaTensor).

    Raises:
        ValueError: if ``percentile`` is out of range or the mask does not fit the maps.
        NoLungFoundError: if the lung mask is empty.

    Example::

        heat = normalize_study(maps, lung)     # one factor for the whole study
        lesion = heat > 0.5
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    m = _as_tensor(maps).float()
    if lung_mask is None:
        mask = torch.ones_like(m, dtype=torch.bool)
    else:
        mask = _broadcast_mask(m, _as_tensor(lung_mask)).expand_as(m)
    inside = m[mask]
    if inside.numel() == 0:
        raise NoLungFoundError("the lung mask is empty: nothing to normalize the heatmaps over")
    inside = torch.nan_to_num(inside, nan=0.0)
    positive = inside[inside > 0].double()
    if positive.numel() == 0:
        scale = 0.0
    elif positive.numel() <= 16_000_000:
        scale = float(torch.quantile(positive, percentile / 100.0, interpolation="lower"))
    else:
        scale = float(np.percentile(positive.cpu().numpy(), percentile, method="lower"))
    if not scale > 0:
        warnings.warn("the heatmap is zero (or negative) everywhere in the lung; the normalized map is zero",
                      stacklevel=2)
        out = torch.zeros_like(m)
    else:
        out = torch.nan_to_num(m / scale, nan=0.0).clamp_(0.0, 1.0)
    if mask_output and lung_mask is not None:
        out = out * mask
    return _restore_type(out, maps)


class MaskMap(Transform):
    """Zero a (channel-first) map outside a mask.

    Args:
        select_fn: turns the mask into booleans (default: non-zero).

    Example::

        masked = MaskMap()(heatmap, lung_mask)    # (1, X, Y, Z) with (X, Y, Z) or (1, X, Y, Z)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, select_fn: Callable[[Array], Array] | None = None) -> None:
        self.select_fn = select_fn

    def __call__(self, img: Array, mask: Array) -> Array:
        """Return ``img`` with values outside ``mask`` set to 0 (same type and shape).

        Raises:
            ValueError: if the mask shape does not fit the image.
        """
        m = _as_tensor(img)
        raw = _as_tensor(mask)
        if self.select_fn is not None:
            raw = _as_tensor(self.select_fn(raw))
        keep = _broadcast_mask(m, raw)
        return _restore_type(m * keep.to(m.dtype) if m.is_floating_point() else m * keep, img)


class MaskMapd(MapTransform):
    """Dictionary version of :class:`MaskMap`: zero ``keys`` outside ``data[mask_key]``.

    Args:
        keys: the maps to mask.
        mask_key: key of the mask (e.g. the lung mask).
        select_fn: see :class:`MaskMap`.
        allow_missing_keys: skip absent keys instead of raising.
    """

    backend = MaskMap.backend

    def __init__(self, keys: KeysCollection, mask_key: str = "lung", select_fn: Callable[[Array], Array] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.masker = MaskMap(select_fn)

    def __call__(self, data: Mapping[Hashable, Array]) -> dict[Hashable, Array]:
        d = dict(data)
        if self.mask_key not in d:
            raise KeyError(f"MaskMapd: no mask under {self.mask_key!r}")
        for key in self.key_iterator(d):
            d[key] = self.masker(d[key], d[self.mask_key])
        return d


class NormalizeStudy(Transform):
    """Transform form of :func:`normalize_study` for a whole-study map and its lung mask."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, percentile: float = 99.0, mask_output: bool = True) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        self.percentile, self.mask_output = percentile, mask_output

    def __call__(self, img: Array, lung_mask: Array | None = None) -> Array:
        return normalize_study(img, lung_mask, self.percentile, self.mask_output)


class NormalizeStudyd(MapTransform):
    """Dictionary version of :class:`NormalizeStudy`.

    Args:
        keys: the study maps to normalize.
        mask_key: key of the lung mask, or ``None`` for no mask.
        percentile, mask_output: see :func:`normalize_study`.
        allow_missing_keys: skip absent keys instead of raising.
    """

    backend = NormalizeStudy.backend

    def __init__(self, keys: KeysCollection, mask_key: str | None = "lung", percentile: float = 99.0,
                 mask_output: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.normalizer = NormalizeStudy(percentile, mask_output)

    def __call__(self, data: Mapping[Hashable, Array]) -> dict[Hashable, Array]:
        d = dict(data)
        if self.mask_key is not None and self.mask_key not in d:
            raise KeyError(f"NormalizeStudyd: no mask under {self.mask_key!r}")
        mask = None if self.mask_key is None else d[self.mask_key]
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], mask)
        return d


MaskMapD = MaskMapDict = MaskMapd
NormalizeStudyD = NormalizeStudyDict = NormalizeStudyd
