"""Layer-wise relevance propagation (Bach et al. 2015) through captum, set up for MONAI classifiers.

captum's :class:`captum.attr.LRP` propagates relevance with a rule attached to every leaf module,
and needs every operation that mixes tensors (additions, concatenations) to be a module with a
rule. MONAI's DenseNet concatenates with ``torch.cat`` and its ResNet blocks add the shortcut in
place, so for the duration of a call this module

* gives each ``_DenseLayer`` a concatenation module and each ``ResNetBlock`` /
  ``ResNetBottleneck`` an addition module (captum's ``Addition_Module``), through an
  instance-level ``forward`` that computes exactly what MONAI's does;
* attaches one rule instance to every leaf module (see :class:`LRP` for the assignment), turns
  in-place ReLUs into out-of-place ones;

and undoes all of it afterwards (rules, the per-module ``activations`` dicts captum leaves behind,
the extra modules, the forwards, the ReLU flags), even when the call fails.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence

import torch
from captum.attr import LRP as CaptumLRP
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule, PropagationRule
from monai.networks.nets import densenet, resnet
from torch import nn

from monai_ext.attribution.base import Attributor, select_target

__all__ = ["LRP", "LRP_RULES"]

#: the rule names :class:`LRP` accepts
LRP_RULES = ("z", "epsilon", "gamma", "alpha1beta0")

_Z_EPS = 1e-9  # captum's stabilizer: the z-rule


class _Concat(nn.Module):
    """Channel concatenation as a module, so that relevance is split back over its inputs."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return torch.cat([x1, x2], dim=1)


class _BatchNormPassRule(EpsilonRule):
    """Relevance passes a batch norm unchanged.

    captum's ``IdentityRule`` returns the stored output relevance instead of the gradient, which
    drops whatever reaches the norm's input by another path (DenseNet's concatenations). This rule
    instead turns the norm into the identity for the propagation pass (weight = running std, bias
    = running mean; captum restores the parameters afterwards), so the z-rule through it passes
    relevance unchanged and composes with the other paths.
    """

    def __init__(self) -> None:
        super().__init__(_Z_EPS)

    def _manipulate_weights(self, module: nn.Module, inputs: object, outputs: object) -> None:
        module.weight.data = (module.running_var + module.eps).sqrt().to(module.weight.dtype)
        module.bias.data = module.running_mean.to(module.bias.dtype).clone()


def _dense_layer_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self._lrp_cat(x, self.layers(x))


def _resnet_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(self._lrp_add(out, residual))


def _resnet_bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.act(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(self._lrp_add(out, residual))


_PATCHES: dict[type, tuple[str, Callable[[], nn.Module], Callable]] = {
    densenet._DenseLayer: ("_lrp_cat", _Concat, _dense_layer_forward),
    resnet.ResNetBlock: ("_lrp_add", Addition_Module, _resnet_block_forward),
    resnet.ResNetBottleneck: ("_lrp_add", Addition_Module, _resnet_bottleneck_forward),
}

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASSING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
            nn.Flatten, nn.Identity, Addition_Module, _Concat)
_NONLINEAR = (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Tanh)


def _leaves(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if next(m.children(), None) is None:
            yield m


class LRP(Attributor):
    """Layer-wise relevance propagation with the z, epsilon, gamma or alpha1-beta0 rule.

    Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
    Relevance Propagation", PLOS ONE 2015; rules as in Montavon et al., "Layer-Wise Relevance
    Propagation: An Overview" (2019). Propagation is captum's; this class sets the rules MONAI's
    DenseNet and ResNet classifiers need and cleans up after every call.

    Rule assignment: convolutions and linear layers get ``rule`` (the gamma rule stabilized by
    ``epsilon``); batch norms get the z / epsilon rule for ``"z"``/``"epsilon"`` (the exact
    decomposition of an affine map, the bias absorbing its share) and pass relevance unchanged
    for ``"gamma"``/``"alpha1beta0"`` (so that it keeps its sign); pooling, flatten,
    concatenation and the residual additions get the z-rule (relevance redistributed in
    proportion to the contributions; to the maximum for max pooling); ReLU and dropout pass
    relevance unchanged. Other layer types (e.g. the sigmoid gates of SE blocks) have no rule and
    are refused.

    Args:
        model: classifier returning logits (B, K).
        rule: ``"z"``, ``"epsilon"``, ``"gamma"`` or ``"alpha1beta0"``.
        epsilon: stabilizer of the epsilon rule (absorbs weak or contradictory relevance).
        gamma: weight of positive contributions in the gamma rule.
        upsample_mode: unused (relevance is computed at the input resolution).
        batch_size: slices per propagation (``None``: the whole batch); bounds the peak memory
            (captum keeps every layer's input: about 0.7 GB per DenseNet121 slice at 256 x 256).

    Returns (when called):
        (B, 1, H, W) relevance summed over input channels, signed (``non_negative`` is False),
        summing per slice to about the target logit (exactly for the z-rule on a bias-free model).

    Raises:
        ValueError: on an unknown rule or a model with a layer type no rule covers.

    Example::

        lrp = LRP(build_classifier("densenet121"), rule="epsilon")
        relevance = lrp(slices, target=1)
    """

    non_negative = False

    def __init__(self, model: nn.Module, rule: str = "epsilon", epsilon: float = 1e-2, gamma: float = 0.25,
                 upsample_mode: str = "bilinear", batch_size: int | None = 2) -> None:
        super().__init__(model, None, upsample_mode=upsample_mode, batch_size=batch_size, rule=rule,
                         epsilon=epsilon, gamma=gamma)
        if rule not in LRP_RULES:
            raise ValueError(f"unknown LRP rule {rule!r}; choose one of {', '.join(LRP_RULES)}")
        if not epsilon >= 0 or not gamma >= 0:
            raise ValueError("epsilon and gamma must be >= 0")
        self.rule, self.epsilon, self.gamma = rule, float(epsilon), float(gamma)

    def _rule_for(self, module: nn.Module) -> PropagationRule | None:
        if isinstance(module, _WEIGHTED):
            if self.rule == "z":
                return EpsilonRule(_Z_EPS)
            if self.rule == "epsilon":
                return EpsilonRule(self.epsilon)
            if self.rule == "gamma":
                rule = GammaRule(self.gamma)
                rule.STABILITY_FACTOR = max(self.epsilon, _Z_EPS)
                return rule
            return Alpha1_Beta0_Rule()
        if isinstance(module, _NORMS):
            passable = module.affine and module.track_running_stats and module.running_var is not None
            if self.rule in ("z", "epsilon") or not passable:
                return EpsilonRule(self.epsilon if self.rule == "epsilon" else _Z_EPS)
            return _BatchNormPassRule()
        if isinstance(module, _PASSING):
            return EpsilonRule(_Z_EPS)
        return None

    @contextlib.contextmanager
    def _prepared(self) -> Iterator[None]:
        patched: list[tuple[nn.Module, str]] = []
        inplace: list[nn.Module] = []
        ruled: list[nn.Module] = []
        try:
            for module in list(self.model.modules()):
                patch = _PATCHES.get(type(module))
                if patch is not None and "forward" not in vars(module):
                    name, factory, forward = patch
                    module.add_module(name, factory())
                    module.forward = types.MethodType(forward, module)
                    patched.append((module, name))
            unsupported = set()
            for leaf in _leaves(self.model):
                if isinstance(leaf, nn.ReLU) and leaf.inplace:
                    leaf.inplace = False
                    inplace.append(leaf)
                rule = self._rule_for(leaf)
                if rule is not None:
                    leaf.rule = rule
                    ruled.append(leaf)
                elif not isinstance(leaf, _NONLINEAR):
                    unsupported.add(type(leaf).__name__)
            if unsupported:
                raise ValueError(f"LRP has no propagation rule for layers of type {', '.join(sorted(unsupported))} "
                                 f"in {type(self.model).__name__}")
            yield
        finally:
            for leaf in _leaves(self.model):
                for attr in ("rule", "activations", "activation"):
                    if attr in vars(leaf):
                        delattr(leaf, attr)
            for leaf in inplace:
                leaf.inplace = True
            for module, name in patched:
                delattr(module, name)
                del module.forward

    def attribute(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(x)
        if logits.ndim != 2:
            raise RuntimeError(f"the model must return logits of shape (B, K), got {tuple(logits.shape)}")
        idx = select_target(logits, target)
        with self._prepared():
            relevance = CaptumLRP(self.model).attribute(x.detach().clone().requires_grad_(True), target=idx)
        return relevance.detach().sum(dim=1, keepdim=True)
