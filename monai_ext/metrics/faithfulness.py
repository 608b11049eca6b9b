"""Faithfulness metrics: does the model's output follow what the map says is relevant?

- :class:`AOPC`: area over the MoRF perturbation curve (Samek et al. 2017);
- :class:`Insertion` and :class:`Deletion`: AUC of the class probability as pixels are inserted
  into / deleted from a blurred image in map order (Petsiuk et al. 2018, as used by iGOS++);
- :class:`AverageDrop` and :class:`AverageIncrease` (Chattopadhay et al. 2018, Grad-CAM++);
- :class:`HAAS`, the heatmap assisted accuracy score (Stassin et al. 2023).

Perturbation metrics run one forward pass of the whole batch per step (or several steps per
forward with ``batch_size``); the model is in eval mode and no gradients are taken. With a lung
mask, only lung pixels are ranked, perturbed and counted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from monai_ext.metrics.base import (
    AttributionMetric,
    EmptyMaskWarning,
    MetricBatch,
    MetricResult,
    bootstrap_ci,
    class_score,
    make_baseline,
    minmax_per_sample,
    warn_empty,
)

__all__ = [
    "AOPC",
    "Insertion",
    "Deletion",
    "AverageDrop",
    "AverageIncrease",
    "HAAS",
    "heatmap_assisted_image",
    "perturbation_curve",
]

_SCORES = ("prob", "logit")
_BASELINES = ("uniform", "blur", "constant")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _ranks(key: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank (0 = most relevant) of each entry of ``key`` (B, N) among the eligible ones.

    Ties keep raster order; ineligible entries get rank N, so they are never reached.
    """
    n = key.shape[1]
    masked = torch.where(eligible, key, torch.full_like(key, -math.inf))
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=key.device).expand_as(order).contiguous())
    return torch.where(eligible, ranks, torch.full_like(ranks, n))


def perturbation_curve(forward: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                       source: torch.Tensor, dest: torch.Tensor, ranks: torch.Tensor, thresholds: torch.Tensor,
                       score: str = "prob", batch_size: int | None = None) -> torch.Tensor:
    """Model scores along a perturbation path.

    Step ``s`` feeds ``where(ranks < thresholds[:, s], source, dest)`` to the model: the pixels
    ranked below the threshold come from ``source``, the others from ``dest``.

    Args:
        forward: the model (logits (B, K)); called without gradients.
        target: (B,) classes scored.
        source: (B, C, H, W) values of the pixels already switched.
        dest: (B, C, H, W) values of the other pixels.
        ranks: (B, 1, H, W) long, the step order of each pixel.
        thresholds: (B, S) long, how many ranks are switched at each step.
        score: ``"prob"`` or ``"logit"``, see :func:`monai_ext.metrics.class_score`.
        batch_size: most images per forward pass (several steps are stacked when it allows);
            ``None``: one step (B images) per forward.

    Returns:
        (B, S) float scores.
    """
    b, s = thresholds.shape
    per = 1 if batch_size is None else max(1, int(batch_size) // max(b, 1))
    out = []
    with torch.no_grad():
        for s0 in range(0, s, per):
            th = thresholds[:, s0:s0 + per]
            c = th.shape[1]
            switched = ranks.unsqueeze(0) < th.t().reshape(c, b, 1, 1, 1)
            xs = torch.where(switched, source.unsqueeze(0), dest.unsqueeze(0))
            logits = forward(xs.reshape(c * b, *source.shape[1:]))
            out.append(class_score(logits, target.repeat(c), score).view(c, b).t())
    return torch.cat(out, dim=1)


def _baseline(x: torch.Tensor, kind: str | float | torch.Tensor, value: float, sigma: float,
              seed: int) -> torch.Tensor:
    if isinstance(kind, torch.Tensor):
        if kind.shape != x.shape:
            raise ValueError(f"a baseline tensor must have the shape of x {tuple(x.shape)}, got {tuple(kind.shape)}")
        return kind.to(x)
    return make_baseline(x, str(kind), value=value, sigma=sigma, seed=seed)


class AOPC(AttributionMetric):
    """Area over the MoRF perturbation curve (Samek et al. 2017).

    The map is pooled into square regions (the sum of the map over each region); the regions are
    replaced by a baseline most relevant first, ``regions_per_step`` per step, for ``n_steps``
    steps, and ``AOPC = 1/(L+1) * sum_{k=0..L} (f(x) - f(x_k))`` with ``x_0 = x``. A faithful map
    makes the score drop fast: higher is better.

    Samek et al. use the classifier's score f; ``score="logit"`` reproduces that literally,
    ``score="prob"`` (the default) uses the softmax probability of the target class, bounded and
    comparable with insertion/deletion. With a lung mask only regions with lung pixels are ranked
    (by the map summed over their lung pixels) and only their lung pixels are replaced. A sample
    with fewer eligible regions than steps keeps its last image for the remaining steps.

    Reference: W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller, "Evaluating the
    visualization of what a deep neural network has learned", IEEE TNNLS 28(11), 2017.

    Args:
        region_size: side of the square regions in pixels (or ``(h, w)``); the last row/column of
            regions is smaller when the image size is not a multiple.
        n_steps: L, the number of removal steps (the curve has L + 1 points).
        regions_per_step: regions removed at each step.
        baseline: ``"uniform"`` (noise in each image's range, as in the paper), ``"blur"``,
            ``"constant"`` or a tensor shaped like ``x``.
        baseline_value: the value of the constant baseline.
        blur_sigma: the Gaussian std of the blurred baseline, in pixels.
        score: ``"prob"`` or ``"logit"``.
        seed: seed of the uniform noise.
        batch_size: most images per forward pass (None: one step of the batch per forward).

    Returns:
        (from a call) scores (B,) = AOPC; curves (B, L+1) = f(x_k); steps = k.

    Raises:
        ValueError: for invalid settings.

    Example::

        aopc = AOPC(region_size=8, n_steps=50, baseline="blur")
        result = aopc(x, maps, model=net, target=1, lung_mask=lung)
        result.scores, result.curves
    """

    name = "aopc"
    higher_is_better = True
    needs_model = True

    def __init__(self, region_size: int | tuple[int, int] = 8, n_steps: int = 100, regions_per_step: int = 1,
                 baseline: str | torch.Tensor = "uniform", baseline_value: float = 0.0, blur_sigma: float = 5.0,
                 score: str = "prob", seed: int = 0, batch_size: int | None = None) -> None:
        rs = (region_size, region_size) if isinstance(region_size, int) else tuple(region_size)
        if len(rs) != 2 or min(rs) < 1:
            raise ValueError(f"region_size must be a positive int or (h, w), got {region_size!r}")
        if n_steps < 1 or regions_per_step < 1:
            raise ValueError("n_steps and regions_per_step must be >= 1")
        if not isinstance(baseline, torch.Tensor):
            _check_choice("baseline", baseline, _BASELINES)
        _check_choice("score", score, _SCORES)
        self.region_size = (int(rs[0]), int(rs[1]))
        self.n_steps = int(n_steps)
        self.regions_per_step = int(regions_per_step)
        self.baseline = baseline
        self.baseline_value = float(baseline_value)
        self.blur_sigma = float(blur_sigma)
        self.score = score
        self.seed = int(seed)
        self.batch_size = batch_size

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        x, maps, target = batch.x, batch.maps, batch.target
        b, _, h, w = x.shape
        rh, rw = self.region_size
        nw = -(-w // rw)
        rows = torch.arange(h, device=x.device) // rh
        cols = torch.arange(w, device=x.device) // rw
        rid = (rows.view(-1, 1) * nw + cols.view(1, -1)).flatten()  # (H*W,)
        n_regions = int(rid.max()) + 1
        lung = batch.lung_mask
        pix_ok = torch.ones(b, h * w, dtype=torch.bool, device=x.device) if lung is None else lung.flatten(1)
        rel = torch.zeros(b, n_regions, device=x.device).scatter_add_(
            1, rid.expand(b, -1), torch.where(pix_ok, maps.flatten(1), torch.zeros_like(maps.flatten(1))))
        reg_ok = torch.zeros(b, n_regions, device=x.device).scatter_add_(1, rid.expand(b, -1), pix_ok.float()) > 0
        reg_rank = _ranks(rel, reg_ok)
        ranks = torch.where(pix_ok, reg_rank.gather(1, rid.expand(b, -1)), torch.full_like(pix_ok, n_regions,
                                                                                          dtype=torch.long))
        ranks = ranks.view(b, 1, h, w)
        ks = torch.arange(self.n_steps + 1, device=x.device)
        thresholds = (ks * self.regions_per_step).expand(b, -1)
        base = _baseline(x, self.baseline, self.baseline_value, self.blur_sigma, self.seed)
        curves = perturbation_curve(batch.forward, target, base, x, ranks, thresholds, self.score, self.batch_size)
        scores = (curves[:, :1] - curves).mean(dim=1)
        empty = ~reg_ok.any(dim=1)
        if bool(empty.any()):
            warn_empty(self.name, "empty lung mask", empty)
            scores = torch.where(empty, torch.full_like(scores, math.nan), scores)
        return MetricResult(scores=scores, curves=curves, steps=ks.float())


class _PixelPath(AttributionMetric):
    """Insertion / deletion: pixels switched in map order, AUC of the class score."""

    needs_model = True
    insertion: bool = True

    def __init__(self, n_steps: int = 100, baseline: str | torch.Tensor = "blur", baseline_value: float = 0.0,
                 blur_sigma: float = 5.0, score: str = "prob", seed: int = 0,
                 batch_size: int | None = None) -> None:
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not isinstance(baseline, torch.Tensor):
            _check_choice("baseline", baseline, _BASELINES)
        _check_choice("score", score, _SCORES)
        self.n_steps = int(n_steps)
        self.baseline = baseline
        self.baseline_value = float(baseline_value)
        self.blur_sigma = float(blur_sigma)
        self.score = score
        self.seed = int(seed)
        self.batch_size = batch_size

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        x, maps, target = batch.x, batch.maps, batch.target
        b, _, h, w = x.shape
        lung = batch.lung_mask
        ok = torch.ones(b, h * w, dtype=torch.bool, device=x.device) if lung is None else lung.flatten(1)
        ranks = _ranks(maps.flatten(1), ok).view(b, 1, h, w)
        count = ok.sum(dim=1).double()
        fractions = torch.linspace(0.0, 1.0, self.n_steps + 1, device=x.device, dtype=torch.float64)
        thresholds = torch.round(count.view(-1, 1) * fractions.view(1, -1)).long()
        base = _baseline(x, self.baseline, self.baseline_value, self.blur_sigma, self.seed)
        if self.insertion:
            dest = base if lung is None else torch.where(lung, base, x)
            curves = perturbation_curve(batch.forward, target, x, dest, ranks, thresholds, self.score,
                                        self.batch_size)
        else:
            curves = perturbation_curve(batch.forward, target, base, x, ranks, thresholds, self.score,
                                        self.batch_size)
        scores = torch.trapezoid(curves, dx=1.0 / self.n_steps, dim=1)
        empty = count == 0
        if bool(empty.any()):
            warn_empty(self.name, "empty lung mask", empty)
            scores = torch.where(empty, torch.full_like(scores, math.nan), scores)
        return MetricResult(scores=scores, curves=curves, steps=fractions.float())


class Insertion(_PixelPath):
    """Insertion AUC (Petsiuk et al. 2018, RISE; as used by iGOS++).

    Starting from a blurred image, the pixels are put back most relevant first (in the order of
    the map), in ``n_steps`` equal steps; the score is the area under the curve of the target
    class probability against the fraction of pixels inserted (trapezoid rule over [0, 1]).
    Higher is better. With a lung mask only lung pixels start blurred and are inserted; the rest
    of the image stays original.

    Reference: V. Petsiuk, A. Das, K. Saenko, "RISE: Randomized input sampling for explanation of
    black-box models", BMVC 2018; S. Khorram, T. Lawson, L. Fuxin, "iGOS++: Integrated gradient
    optimized saliency by bilateral perturbations", ACM CHIL 2021.

    Args:
        n_steps: number of steps (the curve has ``n_steps + 1`` points, fractions 0..1).
        baseline: ``"blur"`` (default, as in the papers), ``"constant"``, ``"uniform"`` or a tensor.
        baseline_value: the constant of the constant baseline.
        blur_sigma: Gaussian std of the blur in pixels (RISE blurs with sigma 5).
        score: ``"prob"`` (default) or ``"logit"``.
        seed: seed of the uniform baseline.
        batch_size: most images per forward pass (None: one step of the batch per forward).

    Returns:
        (from a call) scores (B,) = AUC; curves (B, n_steps + 1); steps = fractions.

    Raises:
        ValueError: for invalid settings.

    Example::

        result = Insertion(n_steps=50)(x, maps, model=net, target=1)
    """

    name = "insertion"
    higher_is_better = True
    insertion = True


class Deletion(_PixelPath):
    """Deletion AUC (Petsiuk et al. 2018, RISE; as used by iGOS++).

    The pixels are replaced by the blurred image most relevant first (map order), in ``n_steps``
    equal steps; the score is the area under the target class probability curve against the
    fraction of pixels deleted. Lower is better. With a lung mask only lung pixels are deleted.
    Arguments as :class:`Insertion`.

    Example::

        result = Deletion(n_steps=50)(x, maps, model=net, target=1, lung_mask=lung)
    """

    name = "deletion"
    higher_is_better = False
    insertion = False


def _drop_scores(metric: AttributionMetric, batch: MetricBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y (score on x), O (score on the explanation map E = x * normalized map) and the empty flags."""
    x, lung = batch.x, batch.lung_mask
    norm = minmax_per_sample(batch.maps, lung)
    explanation = x * norm if lung is None else torch.where(lung, x * norm, x)
    y = class_score(batch.logits, batch.target, "prob")
    o = class_score(batch.forward(explanation), batch.target, "prob")
    empty = torch.zeros_like(y, dtype=torch.bool) if lung is None else ~lung.flatten(1).any(dim=1)
    if bool(empty.any()):
        warn_empty(metric.name, "empty lung mask", empty)
    return y, o, empty


class AverageDrop(AttributionMetric):
    """Average Drop in % (Chattopadhay et al. 2018, Grad-CAM++).

    The explanation map is the image kept only where the map is: ``E = x * m`` with ``m`` the map
    min-max normalized per sample to [0, 1] (part of the metric's definition). With the target
    class probabilities ``Y`` on ``x`` and ``O`` on ``E``, each sample scores
    ``100 * max(0, Y - O) / Y``; the mean over samples is the Average Drop. Lower is better.
    With a lung mask, the map is normalized over the lung and only lung pixels are darkened.

    Reference: A. Chattopadhay, A. Sarkar, P. Howlader, V. N. Balasubramanian, "Grad-CAM++:
    Generalized gradient-based visual explanations for deep convolutional networks", WACV 2018.

    Example::

        drop = AverageDrop()(x, maps, model=net, target=1).scores.nanmean()
    """

    name = "average_drop"
    higher_is_better = False
    needs_model = True

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        y, o, empty = _drop_scores(self, batch)
        drop = 100.0 * torch.clamp(y - o, min=0.0) / y
        drop = torch.where(empty | (y <= 0), torch.full_like(drop, math.nan), drop)
        return MetricResult(scores=drop, extras={"score_original": y, "score_explanation": o})


class AverageIncrease(AttributionMetric):
    """Increase in Confidence in % (Chattopadhay et al. 2018, Grad-CAM++).

    Same explanation map as :class:`AverageDrop`; each sample scores 100 when ``O > Y`` and 0
    otherwise, so the mean over samples is the share of samples whose confidence increases, in %.
    Higher is better.

    Example::

        inc = AverageIncrease()(x, maps, model=net, target=1).scores.nanmean()
    """

    name = "average_increase"
    higher_is_better = True
    needs_model = True

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        y, o, empty = _drop_scores(self, batch)
        inc = 100.0 * (o > y).float()
        inc = torch.where(empty, torch.full_like(inc, math.nan), inc)
        return MetricResult(scores=inc, extras={"score_original": y, "score_explanation": o})


def heatmap_assisted_image(x: torch.Tensor, maps: torch.Tensor, input_range: tuple[float, float] | None = None,
                           lung_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The heatmap assisted (HA) image of HAAS: ``clip(x_norm * (1 + a_norm), -1, 1)``.

    ``x_norm`` is the image scaled linearly to [-1, 1]: from ``input_range = (lo, hi)`` when given,
    else from each sample's own minimum and maximum (over all channels). ``a_norm`` is the map
    min-max normalized per sample to [0, 1] (over the lung when a lung mask is given, 0 outside
    it). The HA image is scaled back to the input's range, so the model sees it as it sees ``x``.

    Reference: S. Stassin et al., "An experimental investigation into the evaluation of
    explainability methods", arXiv:2305.16361, 2023.

    Args:
        x: (B, C, H, W) images.
        maps: (B, 1, H, W) maps.
        input_range: ``(lo, hi)`` of the model's input scale, or ``None`` for per-sample min/max.
        lung_mask: optional (B, 1, H, W) bool: only lung pixels are changed.

    Returns:
        (B, C, H, W) HA images in the input's scale.

    Raises:
        ValueError: if ``input_range`` is not increasing.

    Example::

        # x_norm = 0.5, a_norm = 1 -> 1.0; x_norm = -0.8, a_norm = 0.5 -> -1.2, clipped to -1
        ha = heatmap_assisted_image(x, maps, input_range=(-1.0, 1.0))
    """
    b = x.shape[0]
    x = x.float()
    if input_range is None:
        lo = x.flatten(1).min(dim=1).values.view(b, 1, 1, 1)
        hi = x.flatten(1).max(dim=1).values.view(b, 1, 1, 1)
    else:
        if not float(input_range[1]) > float(input_range[0]):
            raise ValueError(f"input_range must be (lo, hi) with lo < hi, got {input_range!r}")
        lo = torch.full((b, 1, 1, 1), float(input_range[0]), device=x.device)
        hi = torch.full((b, 1, 1, 1), float(input_range[1]), device=x.device)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    x_norm = torch.where(span > 0, 2.0 * (x - lo) / safe - 1.0, torch.zeros_like(x))
    a_norm = minmax_per_sample(maps, lung_mask)
    ha = torch.clamp(x_norm * (1.0 + a_norm), -1.0, 1.0)
    out = lo + (ha + 1.0) / 2.0 * span
    return out if lung_mask is None else torch.where(lung_mask, out, x)


def _predict(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(dim=-1)


def _haas_ratio(rows: torch.Tensor) -> torch.Tensor:
    """(..., N, 2) rows of (correct on HA, correct on original) -> accuracy ratio (...)."""
    orig = rows[..., 1].sum(dim=-1)
    ratio = rows[..., 0].sum(dim=-1) / torch.where(orig > 0, orig, torch.ones_like(orig))
    return torch.where(orig > 0, ratio, torch.full_like(ratio, math.nan))


class HAAS(AttributionMetric):
    """Heatmap Assisted Accuracy Score (Stassin et al. 2023).

    Each image is replaced by its heatmap assisted image ``HA = clip(x_norm * (1 + a_norm), -1, 1)``
    (see :func:`heatmap_assisted_image` for the normalizations) and
    ``HAAS = accuracy on HA images / accuracy on the originals``, against the ground-truth
    ``labels``. Above 1, the map highlights what helps the model: higher is better.

    HAAS is a ratio over a data set, not a mean of per-sample values: per sample the result holds
    ``scores`` = 1.0 when the HA image is classified correctly (0.0 otherwise) and
    ``extras["correct_original"]``; :meth:`aggregate` gives the ratio and :meth:`summarize` a
    paired bootstrap interval of it. Predictions are the argmax of the logits (``logit > 0`` for a
    single output).

    Reference: S. Stassin, V. Englebert, G. Nanfack, J. Albert, N. Versbraegen, G. Peiffer,
    M. Doh, N. Riche, B. Frénay, C. De Vleeschouwer, "An experimental investigation into the
    evaluation of explainability methods", arXiv:2305.16361, 2023.

    Args:
        input_range: ``(lo, hi)`` of the model's input scale mapped to [-1, 1], or ``None`` to use
            each image's own minimum and maximum.

    Example::

        haas = HAAS(input_range=(0.0, 1.0))
        result = haas(x, maps, model=net, labels=y)
        haas.aggregate(result)     # accuracy(HA) / accuracy(x)
    """

    name = "haas"
    higher_is_better = True
    needs_model = True
    needs_labels = True

    def __init__(self, input_range: tuple[float, float] | None = None) -> None:
        if input_range is not None and not float(input_range[1]) > float(input_range[0]):
            raise ValueError(f"input_range must be (lo, hi) with lo < hi, got {input_range!r}")
        self.input_range = input_range

    def score_batch(self, batch: MetricBatch) -> MetricResult:
        ha = heatmap_assisted_image(batch.x, batch.maps, self.input_range, batch.lung_mask)
        correct_orig = (_predict(batch.logits) == batch.labels).float()
        correct_ha = (_predict(batch.forward(ha)) == batch.labels).float()
        if batch.lung_mask is not None:
            empty = ~batch.lung_mask.flatten(1).any(dim=1)
            if bool(empty.any()):
                warn_empty(self.name, "empty lung mask", empty)
                correct_ha = torch.where(empty, torch.full_like(correct_ha, math.nan), correct_ha)
                correct_orig = torch.where(empty, torch.full_like(correct_orig, math.nan), correct_orig)
        return MetricResult(scores=correct_ha, extras={"correct_original": correct_orig})

    def _rows(self, result: MetricResult) -> torch.Tensor:
        rows = torch.stack([result.scores.double(), result.extras["correct_original"].double()], dim=1)
        return rows[~torch.isnan(rows).any(dim=1)]

    def aggregate(self, result: MetricResult) -> float:
        """Accuracy on the HA images / accuracy on the originals (NaN with a warning if the latter is 0)."""
        value = float(_haas_ratio(self._rows(result)))
        if math.isnan(value):
            warnings.warn("haas: no original image is classified correctly; HAAS is NaN", EmptyMaskWarning,
                          stacklevel=2)
        return value

    def summarize(self, result: MetricResult, n: int = 1000, alpha: float = 0.05,
                  seed: int = 0) -> tuple[float, float, float]:
        """HAAS and its paired percentile bootstrap interval (samples resampled with both outcomes)."""
        return bootstrap_ci(self._rows(result), n=n, alpha=alpha, seed=seed, statistic=_haas_ratio)
