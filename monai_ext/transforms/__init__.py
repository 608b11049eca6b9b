"""monai_ext.transforms: channel-first MONAI-style transforms (array classes and dictionary wrappers)."""

from __future__ import annotations

from monai_ext.transforms.array import LungMask
from monai_ext.transforms.dictionary import LungMaskD, LungMaskd, LungMaskDict
from monai_ext.transforms.lung import (
    BACKENDS,
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
from monai_ext.transforms.lung_net import (
    LUNG_NET_ENV,
    LungNetWeightsError,
    load_lung_net,
    net_lung_mask,
    register_default_lung_net,
)
from monai_ext.transforms.organs import organ_intrusion
from monai_ext.transforms.slices import (
    DEFAULT_WINDOW,
    SliceStack,
    extract_slices,
    lung_box,
    lung_slice_indices,
    paste_slices,
    window_hu,
)

__all__ = [
    "SliceStack",
    "extract_slices",
    "paste_slices",
    "lung_slice_indices",
    "lung_box",
    "window_hu",
    "DEFAULT_WINDOW",
    "LungMask",
    "LungMaskd",
    "LungMaskD",
    "LungMaskDict",
    "LungMaskWeightsError",
    "LungNetWeightsError",
    "LUNG_NET_ENV",
    "BACKENDS",
    "load_lung_net",
    "net_lung_mask",
    "register_default_lung_net",
    "organ_intrusion",
    "lung_mask",
    "threshold_lung_mask",
    "unet_lung_mask",
    "find_lungmask_weights",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "LUNGMASK_WEIGHTS_ENV",
    "LUNGMASK_R231_FILENAME",
]
