"""Training objectives and MONAI engine steps beyond plain supervised training."""

from __future__ import annotations

from monai_ext.training.guided import (
    GUIDED_TERMS,
    GuidedIteration,
    GuidedLossOutput,
    IBSaliencyGuidedLoss,
    feature_kl,
    gradient_saliency,
    guided_terms,
    minmax_normalize,
    saliency_cross_entropy,
    saliency_suppression_loss,
    smooth_feature_maps,
    top_share_mask,
    trainable_parameters,
)

__all__ = [
    "IBSaliencyGuidedLoss",
    "GuidedLossOutput",
    "GuidedIteration",
    "GUIDED_TERMS",
    "guided_terms",
    "gradient_saliency",
    "minmax_normalize",
    "top_share_mask",
    "saliency_suppression_loss",
    "saliency_cross_entropy",
    "trainable_parameters",
    "feature_kl",
    "smooth_feature_maps",
]
