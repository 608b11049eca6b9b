"""monai_ext.transforms: channel-first MONAI-style transforms (array classes and dictionary wrappers)."""

from __future__ import annotations

from monai_ext.transforms.array import LungMask
from monai_ext.transforms.dictionary import LungMaskD, LungMaskd, LungMaskDict
from monai_ext.transforms.lung import (
    LEFT_LUNG,
    LUNGMASK_R231_FILENAME,
    LUNGMASK_WEIGHTS_ENV,
    RIGHT_LUNG,
    LungMaskWeightsError,
    find_lungmask_weights,
    lung_mask,
    threshold_lung_mask,
    unet_lung_mask,
)

__all__ = [
    "LungMask",
    "LungMaskd",
    "LungMaskD",
    "LungMaskDict",
    "LungMaskWeightsError",
    "lung_mask",
    "threshold_lung_mask",
    "unet_lung_mask",
    "find_lungmask_weights",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "LUNGMASK_WEIGHTS_ENV",
    "LUNGMASK_R231_FILENAME",
]
