"""The common contract of every attribution metric, and helpers shared by the metrics.

A metric is one subclass of :class:`AttributionMetric`. It declares what it needs as class
attributes (``needs_model``, ``needs_mask``, ...), its score direction (``higher_is_better``) and
its ``name``, and overrides one method, :meth:`AttributionMetric.score_batch`, which receives a
validated :class:`MetricBatch` and returns a :class:`MetricResult`: one score per sample, and
curves where the metric has them. The base class owns input checking, the conversion of masks to
booleans, target selection, and putting the model in eval mode for the call.

Every metric is called the same way, so an evaluation loop can run all of them on the batches of
slices of several attribution methods::

    for metric in metrics:
        if metric.needs_mask and lesion_mask is None:
            continue
        result = metric(x, maps, model=model, target=target, labels=labels, lung_mask=lung,
                        lesion_mask=lesion, attributor=attributor, make_attributor=factory)
        per_sample = result.scores          # (B,), NaN where undefined

Results of several batches are joined with :meth:`MetricResult.cat` and summarised (mean and
bootstrap interval) with :meth:`AttributionMetric.summarize`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from monai_ext.attribution.base import gather_scores, select_target

__all__ = [
    "AttributionMetric",
    "MetricBatch",
    "MetricResult",
    "EmptyMaskWarning",
    "METRICS",
    "bootstrap_ci",
    "class_score",
    "make_baseline",
]

#: ``name -> metric class`` of every metric subclass that sets a ``name``
METRICS: dict[str, type[AttributionMetric]] = {}

Explainer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
ExplainerFactory = Callable[[nn.Module], Explainer]


class EmptyMaskWarning(UserWarning):
    """A sample's mask (lung, lesion) or map is empty, so its score is NaN."""


def warn_empty(metric: str, what: str, empty: torch.Tensor) -> None:
    """Warn that the samples flagged in ``empty`` (bool (B,)) get NaN, because of ``what``."""
    idx = torch.nonzero(empty.flatten()).flatten().tolist()
    if idx:
        warnings.warn(f"{metric}: {what} for sample(s) {idx}; their score is NaN", EmptyMaskWarning, stacklevel=4)


@dataclass
class MetricResult:
    """What a metric returns for a batch.

    Attributes:
        scores: float tensor (B,), one score per sample, NaN where it is undefined.
        curves: float tensor (B, S) of the curve each score summarises (model scores along a
            perturbation path, IoU along a threshold sweep, correlations along a randomization
            cascade), or ``None``.
        steps: the x-axis of the curves, (S,): fraction of pixels, step index, threshold.
        extras: further per-sample tensors with first dimension B (e.g. ``best_threshold``).
    """

    scores: torch.Tensor
    curves: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def cat(results: Sequence[MetricResult]) -> MetricResult:
        """Join the results of several batches of the same metric (on CPU).

        Raises:
            ValueError: if ``results`` is empty or the results do not have the same fields.
        """
        if not results:
            raise ValueError("no results to concatenate")
        first = results[0]
        scores = torch.cat([r.scores.detach().cpu() for r in results])
        curves = None
        if first.curves is not None:
            if any(r.curves is None or r.curves.shape[1:] != first.curves.shape[1:] for r in results):
                raise ValueError("results have curves of different lengths; use the same metric settings")
            curves = torch.cat([r.curves.detach().cpu() for r in results])  # type: ignore[union-attr]
        keys = set(first.extras)
        if any(set(r.extras) != keys for r in results):
            raise ValueError("results have different extras; use the same metric for every batch")
        extras = {k: torch.cat([r.extras[k].detach().cpu() for r in results]) for k in keys}
        steps = None if first.steps is None else first.steps.detach().cpu()
        return MetricResult(scores=scores, curves=curves, steps=steps, extras=extras)


@dataclass
class MetricBatch:
    """Validated inputs of one metric call (what :meth:`AttributionMetric.score_batch` receives).

    Tensors are plain ``torch.Tensor`` on one device; masks are bool (B, 1, H, W).
    ``target`` is the class each sample is explained for, (B,) long, resolved to the predicted
    class when it was not given and a model is available. ``logits`` are the model's outputs on
    ``x`` when the metric needs the model.
    """

    x: torch.Tensor | None
    maps: torch.Tensor | None
    model: Callable[[torch.Tensor], torch.Tensor] | None
    target: torch.Tensor | None
    labels: torch.Tensor | None
    lung_mask: torch.Tensor | None
    lesion_mask: torch.Tensor | None
    attributor: Explainer | None
    make_attributor: ExplainerFactory | None
    logits: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        ref = self.x if self.x is not None else self.maps
        return int(ref.shape[0]) if ref is not None else 0

    @property
    def device(self) -> torch.device:
        ref = self.x if self.x is not None else self.maps
        return ref.device if ref is not None else torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model on ``x`` (no gradients)."""
        if self.model is None:
            raise ValueError("this metric needs a model")
        with torch.no_grad():
            return self.model(x)


def class_score(logits: torch.Tensor, target: torch.Tensor, score: str = "prob") -> torch.Tensor:
    """The score of each sample's target class, (B,).

    Args:
        logits: (B, K) model outputs.
        target: (B,) class indices.
        score: ``"prob"`` for the softmax probability (the sigmoid when K == 1), ``"logit"`` for
            the raw output.

    Raises:
        ValueError: for an unknown ``score``.
    """
    if score == "logit":
        return gather_scores(logits, target).float()
    if score == "prob":
        probs = torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits.float(), dim=-1)
        return gather_scores(probs, target).float()
    raise ValueError(f"score must be 'prob' or 'logit', got {score!r}")


def make_baseline(x: torch.Tensor, kind: str = "blur", value: float = 0.0, sigma: float = 5.0,
                  seed: int = 0) -> torch.Tensor:
    """The reference image that perturbed pixels are replaced with.

    Args:
        x: (B, C, H, W) images.
        kind: ``"blur"``: a Gaussian blur of ``x`` (std ``sigma`` pixels, replicate padding; the
            blurred baseline of RISE and iGOS++); ``"constant"``: ``value`` everywhere;
            ``"uniform"``: uniform noise between each sample's minimum and maximum (Samek et al.
            2017), drawn from a generator seeded with ``seed``.
        value: the constant of ``"constant"``.
        sigma: the Gaussian std of ``"blur"``, in pixels.
        seed: the seed of ``"uniform"``.

    Returns:
        a tensor shaped and placed like ``x``.

    Raises:
        ValueError: for an unknown ``kind`` or a non-positive ``sigma``.

    Example::

        base = make_baseline(x, "blur", sigma=5.0)
    """
    if kind == "constant":
        return torch.full_like(x, float(value))
    if kind == "blur":
        if not sigma > 0:
            raise ValueError(f"blur sigma must be > 0, got {sigma}")
        from monai.networks.layers.convutils import gaussian_1d
        from monai.networks.layers.simplelayers import separable_filtering

        kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0).to(x)
        kernel = kernel / kernel.sum()  # the truncated kernel sums to slightly less than 1
        return separable_filtering(x.float(), [kernel, kernel], mode="replicate").to(x.dtype)
    if kind == "uniform":
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.rand(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        flat = x.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
        return lo + noise * (hi - lo)
    raise ValueError(f"baseline must be 'blur', 'constant' or 'uniform', got {kind!r}")


def minmax_per_sample(maps: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalize each sample's map to [0, 1] over ``region`` (bool, broadcastable).

    Pixels outside the region get 0; a map that is constant over the region becomes all 0.
    """
    b = maps.shape[0]
    maps = maps.float()
    if region is None:
        region = torch.ones_like(maps, dtype=torch.bool)
    region = region.expand_as(maps)
    inf = torch.tensor(float("inf"), device=maps.device)
    lo = torch.where(region, maps, inf).view(b, -1).min(dim=1).values.view(b, *([1] * (maps.ndim - 1)))
    hi = torch.where(region, maps, -inf).view(b, -1).max(dim=1).values.view(b, *([1] * (maps.ndim - 1)))
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(maps))
    return torch.where(region, out, torch.zeros_like(out))


def bootstrap_ci(values: torch.Tensor | Sequence[float], n: int = 1000, alpha: float = 0.05, seed: int = 0,
                 statistic: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap confidence interval, ignoring NaN.

    Args:
        values: (N,) per-sample values, or (N, D) rows resampled together (paired statistics).
            Rows with a NaN are dropped.
        n: number of bootstrap resamples.
        alpha: 1 - confidence level (0.05 for a 95 % interval).
        seed: seed of the resampling generator: the same inputs give the same interval.
        statistic: maps a (M, N) or (M, N, D) stack of resamples to (M,) values; default the mean
            over N of 1D values. Applied to the values themselves (with M = 1) for the estimate.

    Returns:
        ``(estimate, low, high)`` as floats; all NaN (with a warning) when no value is finite.

    Raises:
        ValueError: if ``n < 1`` or ``alpha`` is not in (0, 1), or 2D values without a statistic.

    Example::

        mean, low, high = bootstrap_ci(result.scores, n=1000, alpha=0.05)
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if v.ndim == 2 and statistic is None:
        raise ValueError("2D values need a statistic")
    if statistic is None:

        def statistic(s: torch.Tensor) -> torch.Tensor:
            return s.mean(dim=1)

    keep = ~torch.isnan(v) if v.ndim == 1 else ~torch.isnan(v).any(dim=1)
    v = v[keep]
    if v.shape[0] == 0:
        warnings.warn("bootstrap_ci: no finite value; returning NaN", EmptyMaskWarning, stacklevel=2)
        return (math.nan, math.nan, math.nan)
    estimate = float(statistic(v.unsqueeze(0))[0])
    gen = torch.Generator().manual_seed(int(seed))
    count = v.shape[0]
    stats = []
    chunk = max(1, 2_000_000 // max(count, 1))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        idx = torch.randint(0, count, (m, count), generator=gen)
        stats.append(statistic(v[idx]))
    boot = torch.cat(stats)
    boot = boot[~torch.isnan(boot)]
    if boot.numel() == 0:
        return (estimate, math.nan, math.nan)
    low, high = torch.quantile(boot, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return (estimate, float(low), float(high))


def _as_plain(t: Any) -> Any:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _mask(name: str, mask: Any, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Check a (B, 1, H, W) or (B, H, W) mask against (B, H, W) and return it as bool (B, 1, H, W)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}")
    mask = _as_plain(mask)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[0:1]) + tuple(mask.shape[2:]) != shape:
        raise ValueError(f"{name} must have shape (B, 1, H, W) = {(shape[0], 1, *shape[1:])}, "
                         f"got {tuple(mask.shape)}")
    return (mask > 0).to(device)


class AttributionMetric:
    """Base class of attribution metrics.

    Subclasses set the class attributes below and override :meth:`score_batch`. Call an instance
    with a batch (all arguments by keyword except ``x`` and ``maps``); arguments a metric does not
    need are ignored, so the same call works for every metric.

    Class attributes:
        name: short identifier (``"aopc"``, ``"insertion"``, ...), the key in :data:`METRICS`.
        higher_is_better: score direction.
        needs_input: needs the images ``x``.
        needs_maps: needs the attribution ``maps``.
        needs_model: needs the classifier ``model`` (logits (B, K)).
        needs_mask: needs the ``lesion_mask``.
        needs_labels: needs ground-truth ``labels``.
        needs_attributor: needs an explanation function ``attributor(x, target) -> (B, 1, H, W)``
            (or ``make_attributor`` and ``model`` to build one).
        needs_factory: needs ``make_attributor(model) -> attributor``.

    Example::

        metric = PointingGame(tolerance=2)
        result = metric(maps=maps, lesion_mask=lesions)
        mean, low, high = metric.summarize(result)
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_input: ClassVar[bool] = True
    needs_maps: ClassVar[bool] = True
    needs_model: ClassVar[bool] = False
    needs_mask: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    needs_attributor: ClassVar[bool] = False
    needs_factory: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            METRICS[cls.name] = cls

    # ----------------------------------------------------------------------------------------
    # to override
    def score_batch(self, batch: MetricBatch) -> MetricResult:
        """Score a validated batch; return one score per sample (and curves where relevant)."""
        raise NotImplementedError(f"{type(self).__name__} must override score_batch()")

    # ----------------------------------------------------------------------------------------
    def aggregate(self, result: MetricResult) -> float:
        """The dataset-level value of per-sample results: the mean, ignoring NaN."""
        s = result.scores.double()
        s = s[~torch.isnan(s)]
        return float(s.mean()) if s.numel() else math.nan

    def summarize(self, result: MetricResult, n: int = 1000, alpha: float = 0.05,
                  seed: int = 0) -> tuple[float, float, float]:
        """``(value, low, high)``: :meth:`aggregate` and its percentile bootstrap interval."""
        return bootstrap_ci(result.scores, n=n, alpha=alpha, seed=seed)

    @contextlib.contextmanager
    def _eval_mode(self, model: object) -> Iterator[None]:
        if not isinstance(model, nn.Module):
            yield
            return
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)

    def __call__(
        self,
        x: torch.Tensor | None = None,
        maps: torch.Tensor | None = None,
        *,
        model: Callable[[torch.Tensor], torch.Tensor] | None = None,
        target: int | Sequence[int] | torch.Tensor | None = None,
        labels: Sequence[int] | torch.Tensor | None = None,
        lung_mask: torch.Tensor | None = None,
        lesion_mask: torch.Tensor | None = None,
        attributor: Explainer | None = None,
        make_attributor: ExplainerFactory | None = None,
    ) -> MetricResult:
        """Score a batch.

        Args:
            x: (B, C, H, W) images.
            maps: (B, 1, H, W) attribution maps of any method: raw, possibly signed.
            model: classifier returning logits (B, K); put in eval mode for the call.
            target: the class the maps explain: int, (B,) indices, or ``None`` for the predicted
                class (needs the model).
            labels: (B,) ground-truth classes (HAAS).
            lung_mask: (B, 1, H, W) restricts what is perturbed and counted.
            lesion_mask: (B, 1, H, W) ground-truth lesions (localization metrics).
            attributor: ``attributor(x, target) -> (B, 1, H, W)`` (Max-Sensitivity).
            make_attributor: ``make_attributor(model) -> attributor`` (randomization check).

        Returns:
            a :class:`MetricResult` with ``scores`` of shape (B,).

        Raises:
            ValueError: if something the metric needs is missing or shapes do not match.
        """
        label = self.name or type(self).__name__
        x = _as_plain(x)
        maps = _as_plain(maps)
        if self.needs_input and x is None:
            raise ValueError(f"{label} needs the images x")
        if self.needs_maps and maps is None:
            raise ValueError(f"{label} needs the attribution maps")
        if x is not None:
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{label} expects x of shape (B, C, H, W), got {shape}")
            if not x.is_floating_point():
                x = x.float()
        if maps is not None:
            if not isinstance(maps, torch.Tensor):
                raise ValueError(f"{label}: maps must be a tensor, got {type(maps).__name__}")
            if maps.ndim == 3:
                maps = maps.unsqueeze(1)
            if maps.ndim != 4 or maps.shape[1] != 1:
                raise ValueError(f"{label} expects maps of shape (B, 1, H, W), got {tuple(maps.shape)}")
            if x is not None and (maps.shape[0] != x.shape[0] or maps.shape[-2:] != x.shape[-2:]):
                raise ValueError(f"{label}: maps {tuple(maps.shape)} do not match x {tuple(x.shape)}")
            if not bool(torch.isfinite(maps).all()):
                raise ValueError(f"{label}: maps contain NaN or infinite values")
            maps = maps.float()
            if x is not None:
                maps = maps.to(x.device)
        ref = x if x is not None else maps
        if ref is None:
            raise ValueError(f"{label} needs x or maps")
        shape = (int(ref.shape[0]), int(ref.shape[-2]), int(ref.shape[-1]))
        device = ref.device
        lung = None if lung_mask is None else _mask("lung_mask", lung_mask, shape, device)
        lesion = None if lesion_mask is None else _mask("lesion_mask", lesion_mask, shape, device)
        if self.needs_mask and lesion is None:
            raise ValueError(f"{label} needs a lesion_mask")
        if (self.needs_model or self.needs_factory) and model is None:
            raise ValueError(f"{label} needs the model")
        if self.needs_factory and make_attributor is None:
            raise ValueError(f"{label} needs make_attributor(model)")
        if self.needs_attributor and attributor is None:
            if make_attributor is None or model is None:
                raise ValueError(f"{label} needs an attributor (or make_attributor and the model)")
            attributor = make_attributor(model)  # type: ignore[arg-type]
        lab = None
        if self.needs_labels:
            if labels is None:
                raise ValueError(f"{label} needs ground-truth labels")
            lab = torch.as_tensor(_as_plain(labels), dtype=torch.long).flatten().to(device)
            if lab.numel() != shape[0]:
                raise ValueError(f"{label}: {lab.numel()} labels for a batch of {shape[0]}")

        with self._eval_mode(model):
            logits = None
            tgt = None
            uses_model = self.needs_model or self.needs_factory or self.needs_attributor
            if uses_model and model is not None and x is not None:
                with torch.no_grad():
                    logits = model(x)
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != shape[0]:
                    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ValueError(f"{label}: the model must return logits (B, K), got {got}")
                tgt = select_target(logits, _as_plain(target))
            elif target is not None:
                tgt = torch.as_tensor(_as_plain(target), dtype=torch.long, device=device).flatten()
                if tgt.numel() == 1 and shape[0] > 1:
                    tgt = tgt.expand(shape[0])
                if tgt.numel() != shape[0]:
                    raise ValueError(f"target has {tgt.numel()} entries for a batch of {shape[0]}")
            batch = MetricBatch(x=x, maps=maps, model=model, target=tgt, labels=lab, lung_mask=lung,
                                lesion_mask=lesion, attributor=attributor, make_attributor=make_attributor,
                                logits=logits)
            result = self.score_batch(batch)
        if result.scores.shape != (shape[0],):
            raise RuntimeError(f"{label}.score_batch returned scores of shape {tuple(result.scores.shape)}")
        return result

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
