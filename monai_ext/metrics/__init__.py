"""Attribution metrics: faithfulness, robustness and localization, one class per metric.

Every metric is an :class:`AttributionMetric` called the same way on a batch of slices and
returning a :class:`MetricResult` (per-sample scores, curves where relevant); see
:mod:`monai_ext.metrics.base`.
"""

from __future__ import annotations

from monai_ext.metrics.base import (
    METRICS,
    AttributionMetric,
    EmptyMaskWarning,
    MetricBatch,
    MetricResult,
    bootstrap_ci,
    class_score,
    make_baseline,
)
from monai_ext.metrics.faithfulness import (
    AOPC,
    HAAS,
    AverageDrop,
    AverageIncrease,
    Deletion,
    Insertion,
    heatmap_assisted_image,
    perturbation_curve,
)
from monai_ext.metrics.localization import BestMaskIoU, BoxAccuracy, EnergyPointingGame, MaskIoU, PointingGame, mask_iou
from monai_ext.metrics.robustness import MaxSensitivity, ModelRandomization, randomizable_layers, spearman_correlation

__all__ = [
    "AttributionMetric",
    "MetricBatch",
    "MetricResult",
    "EmptyMaskWarning",
    "METRICS",
    "bootstrap_ci",
    "class_score",
    "make_baseline",
    "AOPC",
    "Insertion",
    "Deletion",
    "AverageDrop",
    "AverageIncrease",
    "HAAS",
    "heatmap_assisted_image",
    "perturbation_curve",
    "MaxSensitivity",
    "ModelRandomization",
    "spearman_correlation",
    "randomizable_layers",
    "PointingGame",
    "EnergyPointingGame",
    "MaskIoU",
    "BestMaskIoU",
    "BoxAccuracy",
    "mask_iou",
]
