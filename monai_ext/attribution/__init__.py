"""Attribution methods: one :class:`Attributor` subclass per method."""

from __future__ import annotations

from monai_ext.attribution.base import Attributor, frozen_parameters, gather_scores, resolve_layer, select_target
from monai_ext.attribution.folding import fold_model, split_model
from monai_ext.attribution.gradcam import GradCAM
from monai_ext.attribution.hirescam import HiResCAM
from monai_ext.attribution.iba import IBA, FeatureEstimator
from monai_ext.attribution.igos import IGOS, IGOSPP
from monai_ext.attribution.lrp import LRP, LRP_RULES
from monai_ext.attribution.normalize import (
    MaskMap,
    MaskMapD,
    MaskMapd,
    MaskMapDict,
    NormalizeStudy,
    NormalizeStudyD,
    NormalizeStudyd,
    NormalizeStudyDict,
    normalize_study,
)

__all__ = [
    "Attributor",
    "resolve_layer",
    "select_target",
    "gather_scores",
    "frozen_parameters",
    "GradCAM",
    "HiResCAM",
    "IBA",
    "FeatureEstimator",
    "split_model",
    "fold_model",
    "IGOS",
    "IGOSPP",
    "LRP",
    "LRP_RULES",
    "normalize_study",
    "MaskMap",
    "MaskMapd",
    "MaskMapD",
    "MaskMapDict",
    "NormalizeStudy",
    "NormalizeStudyd",
    "NormalizeStudyD",
    "NormalizeStudyDict",
]
