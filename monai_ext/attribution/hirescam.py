"""HiResCAM (Draelos and Carin 2020): element-wise gradient times activation, summed over channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai_ext.attribution.base import Attributor
from monai_ext.attribution.gradcam import activation_and_gradient
from monai_ext.networks.factory import default_cam_layer

__all__ = ["HiResCAM"]


class HiResCAM(Attributor):
    """HiResCAM: ``ReLU(sum_k dS/dA_k * A_k)``, the gradient kept at full feature-map resolution.

    Draelos and Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891 (2020). Unlike Grad-CAM, the gradient is not
    averaged over positions, so for a network whose score is a linear function of the layer's
    activations (convolutions followed by flatten and a linear layer) the map before the ReLU sums
    exactly to the class score minus the bias: it only highlights locations the model used.

    Args:
        model: classifier returning logits (B, K).
        target_layer: module whose output is explained; default :func:`default_cam_layer`
            (``features.denseblock4`` for MONAI DenseNets, ``layer4`` for MONAI ResNets).
        relu: apply the final ReLU (as in the paper); ``False`` returns the pre-ReLU map, whose
            sum at the layer resolution is the score decomposition above.
        fast: run the network with folded batch norms and channels-last tensors where the model
            is known (see :func:`~monai_ext.attribution.gradcam.activation_and_gradient`); same
            maps up to float rounding.
        upsample_mode: interpolation from the layer resolution to the input size.
        batch_size: slices per forward/backward pass (``None``: the whole batch). On CPU, chunks
            of 4-8 slices are faster than larger ones (they stay in cache); raise it on a GPU.

    Returns (when called):
        (B, 1, H, W) float maps on the input's device, not normalized per slice.

    Raises:
        ValueError: on an unknown layer name, a bad batch or target (see :class:`Attributor`).

    Example::

        cam = HiResCAM(net, target_layer="features.denseblock4")
        maps = cam(slices, target=1)      # explain the lesion class for every slice
    """

    default_layer = staticmethod(default_cam_layer)

    def __init__(self, model: nn.Module, target_layer: str | None = None, relu: bool = True, fast: bool = True,
                 upsample_mode: str = "bilinear", batch_size: int | None = 8) -> None:
        super().__init__(model, target_layer, upsample_mode=upsample_mode, batch_size=batch_size, relu=relu)
        self.relu = bool(relu)
        self.fast = bool(fast)
        self.non_negative = self.relu

    def attribute(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        act, grad = activation_and_gradient(self, x, target, fast=self.fast)
        cam = (grad * act).sum(dim=1)
        return cam.clamp_min(0) if self.relu else cam
