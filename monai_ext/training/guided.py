"""Information-bottleneck saliency-guided fine-tuning of a slice classifier.

Zhou, Cheng, Si and Yan, "Improving Interpretability by Information Bottleneck Saliency Guided
Localization", BMVC 2022 (authors' code: github.com/iamzhouh/IB-Saliency-Guided-Localization).
A trained classifier is fine-tuned so that its gradient saliency at the last convolutional layer
agrees with the IBA map at that layer and does not overlap the saliency of the competing class.
Per batch, at the activation ``A`` (B, K, h, w) of the last convolutional layer:

1. ``L^c = ReLU(sum_k dy^c/dA^k * A^k)`` for the ground-truth class ``c`` and ``L^p`` for the
   highest-scoring other class ``p`` (HiResCAM-style, full-resolution gradients);
2. ``L^ib``: the project's batched :class:`~monai_ext.attribution.IBA` with its bottleneck on the
   same layer (target ``c``, a :class:`~monai_ext.attribution.FeatureEstimator` fitted there);
3. the saliency suppression loss ``L_SS = sum(min(L^c, L^p) * Mask_r) / sum(L^c + L^p)``, with
   ``Mask_r`` the top ``r`` share of the positions of ``L^c``;
4. the guidance loss ``G = CE(L^c, L^ib) + beta * L_SS`` (the ``L_SS`` term only where the
   prediction is right), and the guided feature map ``A' = A - alpha * smooth_sigma(dG/dA)``;
5. the network update with ``CE(logits, y) + mu * KL(A || A')``.

Defaults: ``r = 0.35``, ``alpha = 1000``, ``sigma = 1``, ``beta = 1``, ``mu = 2``.

Where the paper's text leaves a choice open, this module follows the authors' code, and where it
departs from either, it says so here:

* **Normalization.** ``L^c`` and ``L^p`` are min-max normalized per slice (as the authors' code
  does before its saliency loss); ``L_SS`` and ``Mask_r`` use the normalized maps (``L_SS`` is
  invariant to a common scale, but ``L^p`` is often much weaker than ``L^c``, and the overlap of
  the shapes is what is meant). ``L^ib`` is min-max normalized (as the authors' IBA reader does)
  and then divided by its sum, a distribution over the ``h * w`` positions.
* **Cross-entropy.** ``CE(L^c, L^ib) = -sum_j q_j log softmax(L^c_norm)_j`` over all positions of
  a slice, with ``q`` the normalized ``L^ib``. The authors' code passes the two 2-D maps to
  ``torch.nn.CrossEntropyLoss``, which treats the rows of the map as a batch and each row as a
  distribution; over the whole map is what "cross-entropy between the maps" means.
* **Mask_r** is binary: the positions at or above the ``ceil(r * h * w)``-th highest value of
  ``L^c`` (ties included, positions where ``L^c`` is 0 left out: they add nothing to ``L_SS``).
  The authors' code uses a soft mask ``sigmoid(100 * (L^c - 0.55 * max L^ib))`` instead.
* **dG/dA** treats the gradients ``dy/dA`` as constants (as the authors' code, which stores them
  as arrays); for networks whose head after the layer is piecewise linear (batch norm in eval
  mode, ReLU, pooling, linear: MONAI DenseNet and ResNet) this is the exact derivative almost
  everywhere.
* **Step.** ``G`` is summed over the slices of a batch, so each slice's ``A'`` is the same
  whatever the batch size. ``smooth_sigma`` is a Gaussian of standard deviation ``sigma``
  feature-map pixels (radius ``2 sigma``, replicated border) applied to ``dG/dA`` per channel; the
  paper's "sigma 1" is read as this smoothing (the IBA smooths its own ``lambda`` with sigma 1 too).
* **KL(A || A').** Feature maps are not distributions; each channel of a slice is turned into one
  over the positions by a softmax, and the KL divergence is averaged over channels and slices. It
  only depends on *where* each feature fires, which is what the guidance changes.
* **Mode.** The network runs in eval mode during the guided step (batch norms use their running
  statistics), as in the authors' code (``model.eval()`` before fine-tuning): the saliency of a
  slice then does not depend on the other slices of the batch.
* **Which parameters move.** The paper fine-tunes the whole network. The bundle's
  ``train_guided.json`` updates only the guided layer's block and what follows it (for the
  default DenseNet: ``features.denseblock4``, ``features.norm5`` and the head;
  :func:`trainable_parameters`, config keys ``guide_train_from`` / ``guide_trainable``; ``null``
  trains everything). The classifier here is trained on procedural phantoms and applied to real
  CT: fine-tuning every layer on more phantoms raised the phantom validation AUC (0.947 -> 0.975)
  but lowered the slice AUC on real-CT studies by 0.011-0.014 (docs/evaluation.md), while the last
  block alone keeps the earlier, texture-level layers, and with them the real-CT AUC (+0.002).
* **IBA.** The project's IBA with its defaults except ``beta``: 1000, the value in the authors'
  copy of the IBA reader used for the guidance (the project's default of 10 is for heatmaps at an
  intermediate layer). The estimator is fitted once, before the stage, on training slices.
* Slices whose ``L^c`` is constant (e.g. zero) or whose IBA map is constant get no guidance
  (``A' = A``, so their KL term is 0); they still count in the classification loss.
* No mixed precision and no gradient accumulation in :class:`GuidedIteration`.

Example::

    est = IBA.fit_estimator(net, train_slices, layer=default_cam_layer(net))
    guide = IBSaliencyGuidedLoss(net, estimator=est)
    out = guide(images, labels)          # GuidedLossOutput
    out.loss.backward(); optimizer.step()
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from monai.utils import CommonKeys as Keys
from torch import nn

from monai_ext.attribution.base import gather_scores
from monai_ext.attribution.hirescam import HiResCAM
from monai_ext.attribution.iba import IBA, FeatureEstimator

__all__ = [
    "gradient_saliency",
    "minmax_normalize",
    "top_share_mask",
    "saliency_suppression_loss",
    "saliency_cross_entropy",
    "feature_kl",
    "smooth_feature_maps",
    "GuidedLossOutput",
    "IBSaliencyGuidedLoss",
    "GuidedIteration",
    "GUIDED_TERMS",
    "guided_terms",
]

#: the scalar terms a guided step logs (see :meth:`GuidedLossOutput.terms`)
GUIDED_TERMS = ("loss", "loss_classification", "loss_kl", "guidance", "guidance_ce", "guidance_ss",
                "guided_fraction")


# ------------------------------------------------------------------------------------------------
# the terms, each per slice
def gradient_saliency(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k gradient_k * activation_k)``: (B, K, h, w) -> (B, h, w)."""
    return (gradient * activation).sum(dim=1).clamp_min(0)


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """``(m - min) / (max - min)`` per slice of (B, h, w) maps; 0 for a constant map. Differentiable."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    scaled = (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny)
    return torch.where(span > 0, scaled, torch.zeros_like(scaled))


def top_share_mask(saliency: torch.Tensor, share: float) -> torch.Tensor:
    """Binary mask (B, h, w) of the top ``share`` of the positions of each map: the positions at or
    above its ``ceil(share * h * w)``-th highest value (ties included), positions of value 0 left out.

    Raises:
        ValueError: if ``share`` is not in (0, 1].
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"the mask share r must be in (0, 1], got {share!r}")
    flat = saliency.detach().flatten(1)
    k = min(flat.shape[1], max(1, math.ceil(share * flat.shape[1] - 1e-9)))
    kth = flat.topk(k, dim=1).values[:, -1:]
    return ((flat >= kth) & (flat > 0)).to(saliency.dtype).view_as(saliency)


def saliency_suppression_loss(saliency: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(min(L^c, L^p) * Mask_r) / sum(L^c + L^p)`` per slice (0 where both maps are 0): (B,)."""
    num = (torch.minimum(saliency, other) * mask).sum(dim=(-2, -1))
    den = (saliency + other).sum(dim=(-2, -1))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def saliency_cross_entropy(saliency: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum_j q_j log softmax(saliency)_j`` over the positions of each slice, with ``q = target /
    sum(target)`` (0 where the target sums to 0): (B,)."""
    t = target.detach().flatten(1)
    total = t.sum(dim=1, keepdim=True)
    q = torch.where(total > 0, t / total.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))
    return -(q * F.log_softmax(saliency.flatten(1), dim=1)).sum(dim=1)


def feature_kl(activation: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(A) || softmax(A'))`` over the positions of each channel, averaged over the
    channels of each slice: (B,). Gradients flow into ``activation`` only."""
    log_p = F.log_softmax(activation.flatten(2), dim=2)
    log_q = F.log_softmax(target.detach().flatten(2), dim=2)
    return (log_p.exp() * (log_p - log_q)).sum(dim=2).mean(dim=1)


def smooth_feature_maps(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Gaussian smoothing of each channel of (B, K, h, w) maps: sampled, normalized kernel of radius
    ``2 sigma``, replicated border (``sigma`` 0 or ``None``: unchanged)."""
    if not sigma:
        return x
    kernel = gaussian_1d(float(sigma), truncated=2.0, approx="sampled", normalize=True)
    return separable_filtering(x, [kernel, kernel], mode="replicate")


# ------------------------------------------------------------------------------------------------
@dataclass
class GuidedLossOutput:
    """Everything one guided step computed. Maps are (B, h, w) at the guided layer, detached.

    Attributes:
        loss: ``classification + mu * kl`` (scalar, in the autograd graph of the network).
        logits: the network's output (B, K), in the graph.
        classification: the classification loss (scalar, in the graph).
        kl: the mean of ``KL(A || A')`` over the slices (scalar, in the graph).
        guidance: ``G`` per slice (0 where not guided).
        cross_entropy: ``CE(L^c, L^ib)`` per slice.
        suppression: ``L_SS`` per slice (counted in ``G`` only where ``correct``).
        saliency, other_saliency: ``L^c`` and ``L^p`` before normalization.
        ib_map: ``L^ib`` (bits per input pixel, as the IBA returns it).
        mask: ``Mask_r``.
        target, other: the classes ``c`` and ``p`` (B,).
        correct: whether the prediction is ``c``; guided: whether the slice got guidance.
        activation, activation_target: ``A`` and ``A'`` (B, K, h, w).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    classification: torch.Tensor
    kl: torch.Tensor
    guidance: torch.Tensor
    cross_entropy: torch.Tensor
    suppression: torch.Tensor
    saliency: torch.Tensor
    other_saliency: torch.Tensor
    ib_map: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    other: torch.Tensor
    correct: torch.Tensor
    guided: torch.Tensor
    activation: torch.Tensor
    activation_target: torch.Tensor

    def terms(self) -> dict[str, float]:
        """Scalar summary for logging: the losses, the mean guidance terms over guided slices, and
        the share of guided slices."""
        g = self.guided
        n = max(int(g.sum()), 1)
        return {  # keys: GUIDED_TERMS
            "loss": float(self.loss.detach()),
            "loss_classification": float(self.classification.detach()),
            "loss_kl": float(self.kl.detach()),
            "guidance": float(self.guidance.sum()) / n,
            "guidance_ce": float(self.cross_entropy[g].sum()) / n,
            "guidance_ss": float(self.suppression[g].sum()) / n,
            "guided_fraction": float(g.float().mean()) if g.numel() else 0.0,
        }


class IBSaliencyGuidedLoss:
    """Information-bottleneck saliency guidance (Zhou et al., BMVC 2022) for a classifier.

    See the module docstring for the method, its defaults and where this implementation departs
    from the paper and the authors' code.

    Args:
        model: classifier returning logits (B, K), K >= 2; the object keeps a reference to it and
            always reads its current weights.
        target_layer: the guided layer; default the last convolutional layer
            (:func:`~monai_ext.networks.default_cam_layer`: ``features.denseblock4`` for MONAI
            DenseNets, ``layer4`` for ResNets).
        estimator: the IBA feature statistics at that layer (:class:`FeatureEstimator` or its
            path; fit one with ``IBA.fit_estimator(model, slices, layer=...)``).
        r: share of the positions of ``L^c`` in ``Mask_r`` (paper: 0.35).
        alpha: step size of the update of the feature map (paper: 1000).
        sigma: standard deviation, in feature-map pixels, of the smoothing of the update (1).
        beta: weight of ``L_SS`` in the guidance loss (paper: 1).
        mu: weight of ``KL(A || A')`` in the network loss (paper: 2).
        classification_loss: ``callable(logits, labels) -> loss``; default mean cross-entropy.
        iba_params: arguments of :class:`~monai_ext.attribution.IBA` (default ``beta`` 1000,
            the rest the project's defaults).

    Returns (when called with images (B, C, H, W) and labels (B,)):
        A :class:`GuidedLossOutput`; back-propagate its ``loss``.

    Raises:
        ValueError: on bad hyperparameters, an estimator fitted at another layer, labels that do
            not match the batch or name classes the model does not have.

    Example::

        guide = IBSaliencyGuidedLoss(net, estimator=est)
        out = guide(images, labels)
        optimizer.zero_grad(); out.loss.backward(); optimizer.step()
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None,
                 estimator: FeatureEstimator | str | os.PathLike | None = None, *, r: float = 0.35,
                 alpha: float = 1000.0, sigma: float | None = 1.0, beta: float = 1.0, mu: float = 2.0,
                 classification_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 iba_params: Mapping[str, object] | None = None) -> None:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"r must be in (0, 1], got {r!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu), ("sigma", sigma or 0.0)):
            if not float(value) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.model = model
        self.saliency_method = HiResCAM(model, target_layer, fast=False)
        self.target_layer = self.saliency_method.target_layer
        params = {"beta": 1000.0, **dict(iba_params or {}), "batch_size": None}
        self.iba = IBA(model, self.target_layer, estimator, **params)
        self.r, self.alpha, self.beta, self.mu = float(r), float(alpha), float(beta), float(mu)
        self.sigma = float(sigma) if sigma else 0.0
        self.classification_loss = classification_loss or F.cross_entropy

    @property
    def hyperparameters(self) -> dict:
        """The settings, for recording with a trained model."""
        return {"method": "ib-saliency-guided (Zhou et al., BMVC 2022)", "layer": self.target_layer, "r": self.r,
                "alpha": self.alpha, "sigma": self.sigma, "beta": self.beta, "mu": self.mu,
                "iba": {k: v for k, v in self.iba.params.items()}}

    def _labels(self, y: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        y = y.as_tensor() if hasattr(y, "as_tensor") else torch.as_tensor(y)
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot
            y = y.argmax(dim=1)
        y = y.reshape(-1).to(device=device).long()
        if y.numel() != batch:
            raise ValueError(f"{y.numel()} labels for a batch of {batch} images")
        return y

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 classification_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> GuidedLossOutput:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        y = self._labels(y, x.shape[0], x.device)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.enable_grad():
                return self._step(x, y, classification_loss or self.classification_loss)
        finally:
            for m, mode in modes:
                m.training = mode

    def _step(self, x: torch.Tensor, y: torch.Tensor,
              classification_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> GuidedLossOutput:
        # first the IBA (it checks the labels against the classes; its parameters are frozen for the call)
        ib = self.iba.raw_maps(x, target=y)[:, 0]
        logits, act = self.saliency_method.forward_with_activation(x)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise RuntimeError(f"guidance needs logits of shape (B, K >= 2), got {tuple(logits.shape)}")
        if act.ndim != 4:
            raise RuntimeError(f"layer {self.target_layer!r} output has shape {tuple(act.shape)}, not (B, K, h, w)")
        other = logits.detach().scatter(1, y.view(-1, 1), -math.inf).argmax(dim=1)
        (grad_c,) = torch.autograd.grad(gather_scores(logits, y).sum(), act, retain_graph=True)
        (grad_p,) = torch.autograd.grad(gather_scores(logits, other).sum(), act, retain_graph=True)

        a = act.detach().requires_grad_(True)
        sal_c, sal_p = gradient_saliency(a, grad_c), gradient_saliency(a, grad_p)
        norm_c, norm_p = minmax_normalize(sal_c), minmax_normalize(sal_p)
        norm_ib = minmax_normalize(ib)
        mask = top_share_mask(norm_c, self.r)
        ce = saliency_cross_entropy(norm_c, norm_ib)
        ss = saliency_suppression_loss(norm_c, norm_p, mask)
        correct = logits.detach().argmax(dim=1) == y
        guided = (norm_c.detach().amax(dim=(1, 2)) > 0) & (norm_ib.amax(dim=(1, 2)) > 0)
        per_slice = torch.where(guided, ce + self.beta * correct.to(ss.dtype) * ss, torch.zeros_like(ce))
        if bool(guided.any()) and per_slice.requires_grad:
            (grad_a,) = torch.autograd.grad(per_slice.sum(), a)
        else:
            grad_a = torch.zeros_like(a)
        target = (a - self.alpha * smooth_feature_maps(grad_a, self.sigma)).detach()

        kl = feature_kl(act, target).mean()
        cls = classification_loss(logits, y).mean()
        return GuidedLossOutput(
            loss=cls + self.mu * kl, logits=logits, classification=cls, kl=kl, guidance=per_slice.detach(),
            cross_entropy=ce.detach(), suppression=ss.detach(), saliency=sal_c.detach(),
            other_saliency=sal_p.detach(), ib_map=ib, mask=mask, target=y, other=other, correct=correct,
            guided=guided, activation=a.detach(), activation_target=target)


class GuidedIteration:
    """``iteration_update`` of a MONAI ``SupervisedTrainer`` that runs one guided step per batch.

    It replaces the trainer's forward/loss/backward with :class:`IBSaliencyGuidedLoss`: the batch
    goes through ``engine.prepare_batch``, the classification loss is ``engine.loss_function``,
    the update is ``engine.optimizer``'s, and the trainer's iteration events (forward, loss,
    backward, model completed) fire as in ``SupervisedTrainer``, so the usual handlers (learning
    rate schedulers, validation, checkpoints, stats) work unchanged. ``engine.state.output``
    holds ``image``, ``label``, ``pred`` (the logits), ``loss`` and the scalar terms of
    :meth:`GuidedLossOutput.terms` (``loss_classification``, ``loss_kl``, ``guidance``, ...).

    Args:
        guidance: the guided loss, built on the trainer's network.

    Raises:
        ValueError: (when run) if the trainer uses mixed precision or gradient accumulation, or if
            the guided loss is not built on the trainer's network.

    Example (MONAI bundle config)::

        "guided_loss": {"_target_": "monai_ext.training.IBSaliencyGuidedLoss", "model": "@network",
                        "estimator": "@guide_estimator"},
        "trainer": {"_target_": "SupervisedTrainer", ...,
                    "iteration_update": {"_target_": "monai_ext.training.GuidedIteration",
                                         "guidance": "@guided_loss"}}
    """

    def __init__(self, guidance: IBSaliencyGuidedLoss) -> None:
        if not isinstance(guidance, IBSaliencyGuidedLoss):
            raise TypeError(f"guidance must be an IBSaliencyGuidedLoss, got {type(guidance).__name__}")
        self.guidance = guidance

    def __call__(self, engine, batchdata: object) -> dict:
        if batchdata is None:
            raise ValueError("no batch data for this iteration")
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("guided training supports neither mixed precision (amp) nor gradient accumulation")
        if engine.network is not self.guidance.model:
            raise ValueError("the guided loss must be built on the trainer's network")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        out = self.guidance(inputs, targets, classification_loss=engine.loss_function)
        engine.state.output[Keys.PRED] = out.logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = out.loss
        engine.state.output.update({k: v for k, v in out.terms().items() if k != "loss"})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        out.loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def trainable_parameters(network: torch.nn.Module, prefixes: Sequence[str] | str | None = None,
                         start: str | None = None) -> list:
    """The parameters an optimizer should update; the others keep their values.

    Args:
        network: the network.
        prefixes: parameter name prefixes to update (e.g. ``["features.denseblock4", "class_layers"]``).
        start: a module name: update its parameters and those of every module registered after it
            (for MONAI's sequential classifiers: that block, the following ones and the head). Used
            when ``prefixes`` is None.

    With neither, all parameters are returned.

    Raises:
        ValueError: a prefix or ``start`` matches no parameter of the network.
    """
    named = list(network.named_parameters())

    def hits(prefix: str) -> list[int]:
        found = [i for i, (n, _) in enumerate(named) if n == prefix or n.startswith(prefix + ".")]
        if not found:
            tops = sorted({n.rsplit(".", 2)[0] for n, _ in named})
            raise ValueError(f"no parameter of the network is named {prefix!r}...; some names: {tops[:12]}")
        return found

    if prefixes is not None:
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        chosen = sorted({i for prefix in prefixes for i in hits(prefix)})
        return [named[i][1] for i in chosen]
    if start is not None:
        return [p for _, p in named[hits(start)[0]:]]
    return [p for _, p in named]


def guided_terms(output: Mapping | list | None) -> dict[str, float]:
    """The scalar terms of a guided step from ``engine.state.output`` (a dict, or the list of
    per-sample dicts a decollating trainer leaves), for ``StatsHandler(output_transform=...)``."""
    if isinstance(output, list):
        output = output[0] if output else None
    if not isinstance(output, Mapping):
        return {}
    return {k: float(output[k]) for k in GUIDED_TERMS if k in output}
