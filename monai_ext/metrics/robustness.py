"""Robustness and sanity metrics of attribution maps.

- :class:`MaxSensitivity`: the largest relative change of the map under small input
  perturbations (Yeh et al. 2019), through captum's ``sensitivity_max``;
- :class:`ModelRandomization`: the model parameter randomization test (Adebayo et al. 2018), the
  Spearman rank correlation of the maps of the trained and of a re-initialized model;
- :func:`spearman_correlation`: per-sample Spearman correlation with average ranks for ties.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from monai_ext.attribution.base import resolve_layer
from monai_ext.metrics.base import AttributionMetric, MetricBatch, MetricResult, warn_empty

__all__ = ["MaxSensitivity", "ModelRandomization", "spearman_correlation", "randomizable_layers"]


def _as_map(m: torch.Tensor, b: int) -> torch.Tensor:
    m = m.as_tensor() if hasattr(m, "as_tensor") else m
    if not isinstance(m, torch.Tensor) or m.shape[0] != b:
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"the attributor must return a (B, 1, H, W) tensor for a batch of {b}, got {got}")
    return m.detach().float()


class MaxSensitivity(AttributionMetric):
    """Max-Sensitivity of an explanation function (Yeh et al. 2019), via captum.

    For each sample, ``n_perturb_samples`` inputs are drawn uniformly from the L-infinity ball of
    radius ``perturb_radius`` around ``x`` and the score is
    ``max ||Phi(x + eps) - Phi(x)|| / ||Phi(x)||`` (captum's ``sensitivity_max``, which divides by
    the norm of the unperturbed map when it is not zero). Lower is better. The explained class is
    fixed to the one of the unperturbed input (the given target, or the predicted class when the
    model is given). With a lung mask only lung pixels are perturbed and the maps compared inside
    the lung. The attributor is called with gradients enabled (captum runs it under no_grad).

    Reference: C.-K. Yeh, C.-Y. Hsieh, A. S. Suggala, D. I. Inouye, P. Ravikumar, "On the
    (in)fidelity and sensitivity of explanations", NeurIPS 2019.

    Args:
        perturb_radius: radius of the L-infinity ball, in input units.
        n_perturb_samples: perturbations per sample.
        norm_ord: norm of the map difference (``"fro"``, ``"nuc"`` or a number), as in captum.
        max_examples_per_batch: most perturbed inputs per explanation call (captum's setting);
            ``None`` explains all ``B * n_perturb_samples`` at once.
        seed: seed of the perturbations (the metric is deterministic).

    Returns:
        (from a call) scores (B,).

    Raises:
        ValueError: for a non-positive radius or sample count.

    Example::

        cam = HiResCAM(net)
        sens = MaxSensitivity(perturb_radius=0.02, n_perturb_samples=10)
        result = sens(x, model=net, attributor=lambda x, target: cam(x, target))
    """

    name = "max_sensitivity"
    higher_is_better = False
    needs_maps = False
    needs_attributor = True

    def __init__(self, perturb_radius: float = 0.02, n_perturb_samples: int = 10, norm_ord: str | float = "fro",
                 max_examples_per_batch: int | None = None, seed: int = 0) -> None:
        if not perturb_radius > 0:
            raise ValueError(f"perturb_radius must be > 0, got {perturb_radius}")
        if n_perturb_samples < 1:
            raise ValueError(f"n_perturb_samples must be >= 1, got {n_perturb_samples}")
        self.perturb_radius = float(perturb_radius)
        self.n_perturb_samples = int(n_perturb_samples)
        self.norm_ord = norm_ord
        self.max_examples_per_batch = max_examples_per_batch
        self.seed = int(seed)

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        from captum.metrics import sensitivity_max

        x, lung, attributor = batch.x, batch.lung_mask, batch.attributor
        gen = torch.Generator().manual_seed(self.seed)

        def explain(inputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor]:
            # captum passes the inputs as a tuple and iterates over the returned explanations:
            # a tuple is required (a bare tensor would be iterated over its batch dimension)
            parts = inputs if isinstance(inputs, tuple) else (inputs,)
            with torch.enable_grad():
                m = _as_map(attributor(parts[0], target), parts[0].shape[0])
            return (m * parts[1] if len(parts) > 1 else m,)

        def perturb(inputs: torch.Tensor | tuple[torch.Tensor, ...], radius: float) -> tuple[torch.Tensor, ...]:
            parts = inputs if isinstance(inputs, tuple) else (inputs,)
            noise = (torch.rand(parts[0].shape, generator=gen) * 2.0 - 1.0) * radius
            noise = noise.to(device=parts[0].device, dtype=parts[0].dtype)
            if len(parts) > 1:
                noise = noise * parts[1]
            return (parts[0] + noise, *parts[1:])

        inputs: torch.Tensor | tuple[torch.Tensor, ...] = x if lung is None else (x, lung.to(x.dtype))
        kwargs = {} if batch.target is None else {"target": batch.target}
        scores = sensitivity_max(explain, inputs, perturb_func=perturb, perturb_radius=self.perturb_radius,
                                 n_perturb_samples=self.n_perturb_samples, norm_ord=self.norm_ord,
                                 max_examples_per_batch=self.max_examples_per_batch, **kwargs)
        scores = scores.flatten().float()
        if lung is not None:
            empty = ~lung.flatten(1).any(dim=1)
            if bool(empty.any()):
                warn_empty(self.name, "empty lung mask", empty)
                scores = torch.where(empty, torch.full_like(scores, math.nan), scores)
        return MetricResult(scores=scores)


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) of each row of ``v`` (B, N); ties get the average of their ranks."""
    b, n = v.shape
    sorted_v, order = torch.sort(v, dim=1, stable=True)
    new = torch.ones_like(sorted_v, dtype=torch.bool)
    new[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    gid = torch.cumsum(new.flatten(), 0) - 1
    pos = torch.arange(n, device=v.device, dtype=torch.float64).repeat(b)
    avg = torch.zeros(int(gid[-1]) + 1, device=v.device, dtype=torch.float64)
    avg = avg.scatter_reduce(0, gid, pos, reduce="mean", include_self=False)
    ranks = torch.empty(b, n, device=v.device, dtype=torch.float64)
    ranks.scatter_(1, order, avg[gid].view(b, n))
    return ranks


def spearman_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
                         absolute: bool = False) -> torch.Tensor:
    """Spearman rank correlation of each sample's two maps, with average ranks for ties.

    Args:
        a: (B, ...) maps.
        b: (B, ...) maps of the same shape.
        mask: optional bool (B, ...) (broadcastable): only these pixels are ranked and correlated.
        absolute: correlate absolute values (the "absolute value" variant of Adebayo et al.).

    Returns:
        float tensor (B,); NaN where a map is constant (or the mask empty) over the pixels used.

    Raises:
        ValueError: if the shapes differ.

    Example::

        rho = spearman_correlation(maps_trained, maps_random, absolute=True)
    """
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    bsz = a.shape[0]
    a = a.reshape(bsz, -1).double()
    b = b.reshape(bsz, -1).double()
    if absolute:
        a, b = a.abs(), b.abs()
    m = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.expand(bsz, *mask.shape[1:]).reshape(bsz, -1)
    inf = torch.full_like(a, math.inf)
    ra = _average_ranks(torch.where(m, a, inf))
    rb = _average_ranks(torch.where(m, b, inf))
    w = m.double()
    count = w.sum(dim=1, keepdim=True).clamp(min=1.0)
    da = (ra - (ra * w).sum(dim=1, keepdim=True) / count) * w
    db = (rb - (rb * w).sum(dim=1, keepdim=True) / count) * w
    va, vb = (da * da).sum(dim=1), (db * db).sum(dim=1)
    ok = (va > 0) & (vb > 0)
    rho = (da * db).sum(dim=1) / torch.sqrt(torch.where(ok, va * vb, torch.ones_like(va)))
    return torch.where(ok, rho, torch.full_like(rho, math.nan)).float()


def randomizable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in ``named_modules`` order (input to output)."""
    return [name for name, mod in model.named_modules() if name and any(True for _ in mod.parameters(recurse=False))]


def _default_init(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for p in module.parameters(recurse=False):
        nn.init.normal_(p, mean=0.0, std=0.02)


class ModelRandomization(AttributionMetric):
    """Model parameter randomization sanity check (Adebayo et al. 2018).

    The model is copied (the original is left untouched), the copy's layers are re-initialized,
    and the maps of the trained and of the randomized model, both computed with
    ``make_attributor(model)(x, target)`` for the same target, are compared with the Spearman rank
    correlation per sample (:func:`spearman_correlation`, over the lung when a lung mask is given).
    A method that passes the check gives maps that change: lower is better.

    ``mode="full"`` re-initializes all layers at once; ``mode="cascade"`` re-initializes them one
    at a time from the top (output) layer down, keeping earlier ones randomized, and records the
    correlation after each step in ``curves`` (``steps`` = the number of layers randomized). Both
    modes draw the new weights top-down. The score is the correlation with every layer
    randomized. The given ``maps`` are not used: both maps come from the factory so that they are
    computed alike.

    Reference: J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim, "Sanity checks
    for saliency maps", NeurIPS 2018.

    Args:
        mode: ``"full"`` or ``"cascade"``.
        layers: names of the modules to re-initialize (as in ``model.named_modules()``); default
            every module that owns parameters (:func:`randomizable_layers`).
        absolute: correlate absolute values of the maps (as in the paper's main figures).
        init_fn: ``init_fn(module)`` re-initializes one module; default ``reset_parameters()``
            (the layer's own initialization), else a normal(0, 0.02) draw.
        seed: seed of the re-initialization (the global RNG state is restored afterwards). A layer
            left unchanged (e.g. a model built after ``torch.manual_seed(seed)``) is warned about.

    Returns:
        (from a call) scores (B,); with ``"cascade"``, curves (B, n_layers).

    Raises:
        ValueError: for an unknown mode, an unknown layer name or a model that is not an nn.Module.

    Example::

        check = ModelRandomization(mode="cascade")
        result = check(x, model=net, target=1, make_attributor=lambda m: HiResCAM(m))
    """

    name = "randomization"
    higher_is_better = False
    needs_maps = False
    needs_model = True
    needs_factory = True

    def __init__(self, mode: str = "full", layers: Sequence[str] | None = None, absolute: bool = True,
                 init_fn: Callable[[nn.Module], None] | None = None, seed: int = 0) -> None:
        if mode not in ("full", "cascade"):
            raise ValueError(f"mode must be 'full' or 'cascade', got {mode!r}")
        self.mode = mode
        self.layers = None if layers is None else list(layers)
        self.absolute = bool(absolute)
        self.init_fn = init_fn
        self.seed = int(seed)

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        model = batch.model
        if not isinstance(model, nn.Module):
            raise ValueError(f"{self.name} needs an nn.Module model, got {type(model).__name__}")
        x, target, lung = batch.x, batch.target, batch.lung_mask
        names = randomizable_layers(model) if self.layers is None else self.layers
        for n in names:
            resolve_layer(model, n)
        if not names:
            raise ValueError(f"{self.name}: the model has no layer with parameters to randomize")
        init = self.init_fn or _default_init
        top_down = list(reversed(names))

        def maps_of(net: nn.Module) -> torch.Tensor:
            with torch.enable_grad():
                return _as_map(batch.make_attributor(net)(x, target), x.shape[0])

        original = maps_of(model)
        mask = None if lung is None else lung.expand_as(original)
        randomized = copy.deepcopy(model)
        randomized.eval()
        groups = [top_down] if self.mode == "full" else [[n] for n in top_down]
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        curves = []
        unchanged = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for group in groups:
                with torch.no_grad():
                    for n in group:
                        layer = resolve_layer(randomized, n)
                        init(layer)
                        old = dict(resolve_layer(model, n).named_parameters(recurse=False))
                        if all(torch.equal(p, old[k]) for k, p in layer.named_parameters(recurse=False)):
                            unchanged.append(n)
                curves.append(spearman_correlation(original, maps_of(randomized), mask, self.absolute))
        if unchanged:
            warnings.warn(f"{self.name}: re-initialization left layer(s) {unchanged} unchanged (a model built "
                          f"with the same seed as seed={self.seed}?); use another seed", UserWarning, stacklevel=3)
        curve = torch.stack(curves, dim=1)
        scores = curve[:, -1]
        if lung is not None:
            empty = ~lung.flatten(1).any(dim=1)
            if bool(empty.any()):
                warn_empty(self.name, "empty lung mask", empty)
        const = torch.isnan(scores)
        if lung is not None:
            const = const & lung.flatten(1).any(dim=1)
        if bool(const.any()):
            warn_empty(self.name, "constant map", const)
        if self.mode == "full":
            return MetricResult(scores=scores)
        steps = torch.arange(1, len(groups) + 1, dtype=torch.float32)
        return MetricResult(scores=scores, curves=curve, steps=steps)
