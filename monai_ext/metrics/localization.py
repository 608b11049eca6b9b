"""Localization metrics: does the map point at the annotated lesions?

- :class:`PointingGame` (Zhang et al. 2016/2018), with a tolerance in pixels;
- :class:`EnergyPointingGame` (Wang et al. 2020, Score-CAM): share of the map's positive energy
  inside the lesion mask;
- :class:`MaskIoU` (fixed threshold) and :class:`BestMaskIoU` (best over a threshold sweep) of the
  thresholded map;
- :class:`BoxAccuracy`: IoU of the bounding box of the thresholded map's largest component with
  the lesion mask's bounding box, >= 0.5.

With a lung mask, both the map and the lesion mask are restricted to the lung: the maximum is
searched, the energy summed and the map normalized and thresholded inside the lung only. A sample
whose lesion mask (inside the lung) is empty scores NaN, with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_ext.metrics.base import AttributionMetric, MetricBatch, MetricResult, minmax_per_sample, warn_empty

__all__ = ["PointingGame", "EnergyPointingGame", "MaskIoU", "BestMaskIoU", "BoxAccuracy", "mask_iou"]


def _truth(metric: AttributionMetric, batch: MetricBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(region, ground truth, empty flags): region = lung or everything, truth = lesion inside region."""
    lesion = batch.lesion_mask
    region = torch.ones_like(lesion) if batch.lung_mask is None else batch.lung_mask
    truth = lesion & region
    empty = ~truth.flatten(1).any(dim=1)
    if bool(empty.any()):
        warn_empty(metric.name, "empty lesion mask" if batch.lung_mask is None else "empty lesion mask inside the lung",
                   empty)
    return region, truth, empty


def _nan_where(scores: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    return torch.where(flags, torch.full_like(scores, math.nan), scores)


def _check_threshold(t: float) -> float:
    t = float(t)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"thresholds apply to maps normalized to [0, 1] and must be in (0, 1], got {t}")
    return t


class PointingGame(AttributionMetric):
    """Pointing game (Zhang et al.): is the map's maximum on a lesion?

    A sample scores 1.0 (hit) when the pixel of the map's maximum lies within ``tolerance``
    pixels (Euclidean) of the lesion mask, else 0.0. Ties go to the first maximum in raster
    order; a map that is constant (inside the lung) points nowhere and scores 0. The mean over
    samples is the pointing accuracy. Higher is better.

    Reference: J. Zhang, S. A. Bargal, Z. Lin, J. Brandt, X. Shen, S. Sclaroff, "Top-down neural
    attention by excitation backprop", IJCV 126, 2018 (ECCV 2016); they use a 15-pixel tolerance.

    Args:
        tolerance: distance in pixels within which a maximum still counts as a hit (0: on the mask).

    Returns:
        (from a call) scores (B,) in {0, 1}, NaN where the lesion mask is empty;
        ``extras["point"]`` (B, 2) row and column of the maximum.

    Raises:
        ValueError: for a negative tolerance.

    Example::

        hits = PointingGame(tolerance=15)(maps=maps, lesion_mask=lesions).scores
    """

    name = "pointing_game"
    higher_is_better = True
    needs_input = False
    needs_mask = True

    def __init__(self, tolerance: int = 0) -> None:
        if int(tolerance) < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        self.tolerance = int(tolerance)

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        maps = batch.maps
        b, _, h, w = maps.shape
        region, truth, empty = _truth(self, batch)
        key = torch.where(region, maps, torch.full_like(maps, -math.inf)).flatten(1)
        idx = key.argmax(dim=1)
        low = torch.where(region, maps, torch.full_like(maps, math.inf)).flatten(1).min(dim=1).values
        constant = key.max(dim=1).values <= low
        hit_area = truth.float()
        t = self.tolerance
        if t > 0:
            r = torch.arange(-t, t + 1, device=maps.device, dtype=torch.float32)
            disk = ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= t * t).float().view(1, 1, 2 * t + 1, 2 * t + 1)
            hit_area = F.conv2d(hit_area, disk, padding=t)
        hits = (hit_area.flatten(1).gather(1, idx.view(-1, 1)).squeeze(1) > 0) & ~constant
        scores = _nan_where(hits.float(), empty)
        point = torch.stack([idx // w, idx % w], dim=1)
        return MetricResult(scores=scores, extras={"point": point})


class EnergyPointingGame(AttributionMetric):
    """Energy-based pointing game (Wang et al. 2020, Score-CAM).

    The share of the map's positive energy that falls inside the lesion mask:
    ``sum(max(map, 0) * lesion) / sum(max(map, 0))``, both sums over the lung when a lung mask is
    given. Score-CAM uses the object's bounding box; here the lesion mask itself is used. Higher
    is better. A map without positive values inside the counted region scores NaN (warning).

    Reference: H. Wang, Z. Wang, M. Du, F. Yang, Z. Zhang, S. Ding, P. Mardziel, X. Hu,
    "Score-CAM: Score-weighted visual explanations for convolutional neural networks", CVPR
    Workshops 2020.

    Returns:
        (from a call) scores (B,) in [0, 1].

    Example::

        share = EnergyPointingGame()(maps=maps, lesion_mask=lesions, lung_mask=lung).scores
    """

    name = "energy_pointing_game"
    higher_is_better = True
    needs_input = False
    needs_mask = True

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        region, truth, empty = _truth(self, batch)
        pos = torch.where(region, batch.maps.clamp(min=0.0), torch.zeros_like(batch.maps)).flatten(1).double()
        total = pos.sum(dim=1)
        inside = (pos * truth.flatten(1)).sum(dim=1)
        no_energy = (total <= 0) & ~empty
        if bool(no_energy.any()):
            warn_empty(self.name, "map without positive energy", no_energy)
        share = inside / torch.where(total > 0, total, torch.ones_like(total))
        return MetricResult(scores=_nan_where(share.float(), empty | no_energy))


def mask_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks (B, ...) per sample; NaN where both are empty."""
    p, t = pred.flatten(1), truth.flatten(1)
    inter = (p & t).sum(dim=1).double()
    union = (p | t).sum(dim=1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, math.nan)).float()


class MaskIoU(AttributionMetric):
    """IoU of the thresholded map with the lesion mask.

    The map is min-max normalized per sample to [0, 1] (over the lung when a lung mask is given;
    maps are not normalized by the attributors) and the pixels with ``normalized >= threshold``
    (inside the lung) form the predicted mask. A constant map predicts nothing. Higher is better.

    Args:
        threshold: in (0, 1], on the normalized map.

    Returns:
        (from a call) scores (B,) in [0, 1], NaN where the lesion mask is empty.

    Raises:
        ValueError: for a threshold outside (0, 1].

    Example::

        iou = MaskIoU(threshold=0.5)(maps=maps, lesion_mask=lesions).scores
    """

    name = "iou"
    higher_is_better = True
    needs_input = False
    needs_mask = True

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = _check_threshold(threshold)

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        region, truth, empty = _truth(self, batch)
        norm = minmax_per_sample(batch.maps, region)
        pred = (norm >= self.threshold) & region
        return MetricResult(scores=_nan_where(mask_iou(pred, truth), empty))


class BestMaskIoU(AttributionMetric):
    """IoU of the thresholded map, best over a sweep of thresholds (per sample).

    Normalization as :class:`MaskIoU`. ``scores`` is each sample's best IoU (an optimistic,
    oracle-threshold figure), ``extras["best_threshold"]`` the threshold that reached it (the
    lowest on ties) and ``curves`` the IoU at every threshold (``steps``), so the best single
    threshold of a data set is ``steps[nanmean(curves, 0).argmax()]``.

    Args:
        thresholds: thresholds in (0, 1]; default 0.05, 0.10, ..., 0.95.

    Returns:
        (from a call) scores (B,), curves (B, T), steps (T,), ``extras["best_threshold"]`` (B,).

    Raises:
        ValueError: for no threshold or one outside (0, 1].

    Example::

        result = BestMaskIoU()(maps=maps, lesion_mask=lesions)
        result.scores, result.extras["best_threshold"]
    """

    name = "best_iou"
    higher_is_better = True
    needs_input = False
    needs_mask = True

    def __init__(self, thresholds: Sequence[float] | torch.Tensor | None = None) -> None:
        if thresholds is None:
            thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
        values = [_check_threshold(float(t)) for t in torch.as_tensor(thresholds).flatten().tolist()]
        if not values:
            raise ValueError("thresholds must not be empty")
        self.thresholds = values

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        region, truth, empty = _truth(self, batch)
        norm = minmax_per_sample(batch.maps, region)
        curves = torch.stack([mask_iou((norm >= t) & region, truth) for t in self.thresholds], dim=1)
        curves = torch.where(empty.view(-1, 1), torch.full_like(curves, math.nan), curves)
        steps = torch.tensor(self.thresholds, dtype=torch.float32, device=curves.device)
        best, arg = torch.nan_to_num(curves, nan=-1.0).max(dim=1)
        scores = _nan_where(best, empty)
        best_t = _nan_where(steps[arg], empty)
        return MetricResult(scores=scores, curves=curves, steps=steps, extras={"best_threshold": best_t})


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of inclusive pixel boxes (r0, c0, r1, c1)."""
    ih = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iw = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(ih, 0) * max(iw, 0)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area - inter)


class BoxAccuracy(AttributionMetric):
    """Bounding-box localization accuracy.

    The map, normalized as in :class:`MaskIoU`, is thresholded; the bounding box of its largest
    8-connected component is compared with the bounding box of the whole lesion mask, and the
    sample scores 1.0 when their IoU is at least ``iou_threshold`` (0.5, as in the weakly
    supervised localization protocol of CAM, Zhou et al. 2016, and Grad-CAM, which threshold the
    map at 15-20 % of its maximum), else 0.0. Higher is better. Components are labelled with
    ``scipy.ndimage.label``, one sample at a time, on the CPU.

    Reference: B. Zhou, A. Khosla, A. Lapedriza, A. Oliva, A. Torralba, "Learning deep features for
    discriminative localization", CVPR 2016.

    Args:
        threshold: in (0, 1], on the normalized map.
        iou_threshold: box IoU needed for a hit.

    Returns:
        (from a call) scores (B,) in {0, 1}, ``extras["box_iou"]`` (B,).

    Raises:
        ValueError: for thresholds outside (0, 1].

    Example::

        acc = BoxAccuracy(threshold=0.2)(maps=maps, lesion_mask=lesions).scores.nanmean()
    """

    name = "box_accuracy"
    higher_is_better = True
    needs_input = False
    needs_mask = True

    def __init__(self, threshold: float = 0.5, iou_threshold: float = 0.5) -> None:
        self.threshold = _check_threshold(threshold)
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        from scipy import ndimage

        region, truth, empty = _truth(self, batch)
        norm = minmax_per_sample(batch.maps, region)
        pred = ((norm >= self.threshold) & region)[:, 0].cpu().numpy()
        gt = truth[:, 0].cpu().numpy()
        structure = np.ones((3, 3), dtype=bool)
        ious = []
        for p, t in zip(pred, gt):
            t_box = _bbox(t)
            labels, n = ndimage.label(p, structure=structure)
            if t_box is None:
                ious.append(math.nan)
                continue
            if n == 0:
                ious.append(0.0)
                continue
            sizes = np.bincount(labels.ravel())[1:]
            p_box = _bbox(labels == (int(np.argmax(sizes)) + 1))
            ious.append(_box_iou(p_box, t_box))  # type: ignore[arg-type]
        box_iou = torch.tensor(ious, dtype=torch.float32, device=batch.maps.device)
        hits = (box_iou >= self.iou_threshold).float()
        return MetricResult(scores=_nan_where(hits, empty), extras={"box_iou": box_iou})
