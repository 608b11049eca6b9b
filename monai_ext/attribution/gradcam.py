"""Grad-CAM (Selvaraju et al. 2017): activations weighted by their spatially averaged gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai_ext.attribution.base import Attributor, gather_scores, select_target
from monai_ext.attribution.folding import split_model
from monai_ext.networks.factory import default_cam_layer

__all__ = ["GradCAM", "activation_and_gradient"]


def activation_and_gradient(attributor: Attributor, x: torch.Tensor,
                            target: int | Sequence[int] | torch.Tensor | None, fast: bool = True,
                            channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation at the attributor's layer and the gradient of the target score with respect to it.

    One forward and one backward pass for the whole batch: the target scores are summed over the
    batch, which gives each sample its own gradient because the samples do not interact in eval
    mode. The part of the network before the layer runs without an autograd graph. With ``fast``
    and a model :func:`~monai_ext.attribution.split_model` knows (MONAI DenseNet, ResNet, SENet,
    ``nn.Sequential``), that part runs with its batch norms folded (same values up to rounding,
    forward hooks of the folded modules do not run); otherwise a hook on the layer is used.

    Returns:
        ``(activation, gradient)``, both (B, K, h, w) and detached.

    Raises:
        RuntimeError: if the layer output is not a 4D tensor or the model does not return (B, K).
    """
    split = split_model(attributor.model, attributor.target_layer, fold_batchnorm=True) if fast else None
    if split is not None:
        head, tail = split
        with torch.no_grad():
            act = head(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        if not isinstance(act, torch.Tensor):
            raise RuntimeError(f"layer {attributor.target_layer!r} does not output a single tensor")
        act = act.detach().requires_grad_(True)
        logits = tail(act)
    else:
        logits, act = attributor.forward_with_activation_leaf(x)
    if logits.ndim != 2:
        raise RuntimeError(f"the model must return logits of shape (B, K), got {tuple(logits.shape)}")
    if act.ndim != 4:
        raise RuntimeError(f"layer {attributor.target_layer!r} output has shape {tuple(act.shape)}; "
                           "CAM methods need a (B, K, h, w) feature map")
    idx = select_target(logits, target)
    (grad,) = torch.autograd.grad(gather_scores(logits, idx).sum(), act)
    return act.detach(), grad.detach()


class GradCAM(Attributor):
    """Grad-CAM: ``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of ``d score / d A_k``.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017. For a network ending in global average pooling and a linear layer,
    the map equals CAM (Zhou et al. 2016) divided by the number of feature-map positions.

    Args:
        model: classifier returning logits (B, K).
        target_layer: module whose output is explained; default :func:`default_cam_layer`
            (``features.denseblock4`` for MONAI DenseNets, ``layer4`` for MONAI ResNets).
        relu: apply the final ReLU (as in the paper); ``False`` returns the signed map.
        fast: run the network with folded batch norms and channels-last tensors where the model
            is known (see :func:`activation_and_gradient`); same maps up to float rounding.
        upsample_mode: interpolation from the layer resolution to the input size.
        batch_size: slices per forward/backward pass (``None``: the whole batch). On CPU, chunks
            of 4-8 slices are faster than larger ones (they stay in cache); raise it on a GPU.

    Returns (when called):
        (B, 1, H, W) float maps on the input's device, not normalized per slice.

    Raises:
        ValueError: on an unknown layer name, a bad batch or target (see :class:`Attributor`).

    Example::

        cam = GradCAM(build_classifier("densenet121"))
        maps = cam(slices)                # (B, 1, H, W), predicted class
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
        cam = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1)
        return cam.clamp_min(0) if self.relu else cam
