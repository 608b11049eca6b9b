"""The metric contract: input checks, results, registry, bootstrap intervals, baselines."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from monai_ext.metrics import (
    AOPC,
    METRICS,
    AttributionMetric,
    EmptyMaskWarning,
    MaskIoU,
    MetricResult,
    PointingGame,
    bootstrap_ci,
    class_score,
    make_baseline,
)


class Linear(nn.Module):
    """logit = sum(w * x), one output."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(dim=(1, 2, 3)).unsqueeze(1)


def test_registry_and_metadata():
    expected = {"aopc", "insertion", "deletion", "average_drop", "average_increase", "haas", "max_sensitivity",
                "randomization", "pointing_game", "energy_pointing_game", "iou", "best_iou", "box_accuracy"}
    assert expected <= set(METRICS)
    for name, cls in METRICS.items():
        assert issubclass(cls, AttributionMetric) and cls.name == name
        assert isinstance(cls.higher_is_better, bool) and isinstance(cls.needs_model, bool)
        assert isinstance(cls.needs_mask, bool)
    assert METRICS["deletion"].higher_is_better is False and METRICS["insertion"].higher_is_better is True
    assert METRICS["pointing_game"].needs_mask and not METRICS["pointing_game"].needs_model


def test_input_checks():
    x = torch.ones(2, 1, 4, 4)
    maps = torch.ones(2, 1, 4, 4)
    with pytest.raises(ValueError, match="needs the model"):
        AOPC()(x, maps)
    with pytest.raises(ValueError, match="lesion_mask"):
        PointingGame()(maps=maps)
    with pytest.raises(ValueError, match="maps"):
        AOPC()(x, torch.ones(2, 1, 3, 4), model=Linear(torch.ones(1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        MaskIoU()(maps=torch.full((2, 1, 4, 4), math.nan), lesion_mask=maps > 0)
    with pytest.raises(ValueError, match="lung_mask"):
        MaskIoU()(maps=maps, lesion_mask=maps > 0, lung_mask=torch.ones(2, 1, 4, 5))
    with pytest.raises(ValueError, match="region_size"):
        AOPC(region_size=0)
    with pytest.raises(ValueError, match="baseline"):
        AOPC(baseline="zeros")


def test_model_mode_restored_and_target_defaults_to_prediction():
    model = Linear(torch.ones(1, 4, 4)).train()
    x = torch.rand(2, 1, 4, 4)
    result = AOPC(region_size=2, n_steps=2, baseline="constant")(x, x, model=model)
    assert model.training
    assert result.scores.shape == (2,)


def test_result_cat():
    a = MetricResult(torch.tensor([1.0, 2.0]), torch.zeros(2, 3), torch.arange(3.0), {"t": torch.ones(2)})
    b = MetricResult(torch.tensor([3.0]), torch.ones(1, 3), torch.arange(3.0), {"t": torch.zeros(1)})
    c = MetricResult.cat([a, b])
    assert c.scores.tolist() == [1.0, 2.0, 3.0] and c.curves.shape == (3, 3) and c.extras["t"].tolist() == [1, 1, 0]
    assert len(c) == 3
    with pytest.raises(ValueError):
        MetricResult.cat([a, MetricResult(torch.tensor([3.0]))])


def test_class_score():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])
    t = torch.tensor([1, 1])
    assert torch.allclose(class_score(logits, t, "prob"), torch.tensor([0.75, 1 / (1 + math.e ** 2)]))
    assert torch.allclose(class_score(logits, t, "logit"), torch.tensor([math.log(3.0), 0.0]))
    assert torch.allclose(class_score(torch.tensor([[0.0]]), torch.tensor([0]), "prob"), torch.tensor([0.5]))
    with pytest.raises(ValueError):
        class_score(logits, t, "softmax")


def test_make_baseline():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(make_baseline(x, "constant", value=0.3), torch.full_like(x, 0.3))
    u = make_baseline(x, "uniform", seed=1)
    assert torch.equal(u, make_baseline(x, "uniform", seed=1))
    assert bool((u.flatten(1).min(1).values >= x.flatten(1).min(1).values).all())
    assert bool((u.flatten(1).max(1).values <= x.flatten(1).max(1).values).all())
    flat = torch.full((1, 1, 8, 8), 0.7)
    assert torch.allclose(make_baseline(flat, "blur", sigma=2.0), flat, atol=1e-5)  # replicate padding
    blurred = make_baseline(x, "blur", sigma=2.0)
    assert blurred.std() < x.std()


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = torch.tensor([0.1, 0.4, 0.35, 0.8, math.nan, 0.5, 0.45, 0.6])
    mean, low, high = bootstrap_ci(values, n=500, alpha=0.05, seed=0)
    finite = values[~torch.isnan(values)]
    assert mean == pytest.approx(float(finite.double().mean()))
    assert low <= mean <= high and low >= float(finite.min()) and high <= float(finite.max())
    assert (mean, low, high) == bootstrap_ci(values, n=500, alpha=0.05, seed=0)
    assert bootstrap_ci(values, n=500, seed=1) != (mean, low, high)
    narrow = bootstrap_ci(values, n=500, alpha=0.5, seed=0)
    assert low <= narrow[1] <= narrow[2] <= high
    assert bootstrap_ci([2.0], n=10) == (2.0, 2.0, 2.0)


def test_bootstrap_ci_all_nan_and_bad_args():
    with pytest.warns(EmptyMaskWarning):
        out = bootstrap_ci([math.nan, math.nan])
    assert all(math.isnan(v) for v in out)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], n=0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], alpha=1.0)


def test_summarize_uses_bootstrap():
    metric = MaskIoU()
    result = MetricResult(torch.tensor([0.0, 1.0, math.nan, 0.5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, low, high = metric.summarize(result, n=200)
    assert value == pytest.approx(0.5) and metric.aggregate(result) == pytest.approx(0.5)
    assert low <= value <= high


class _Saliency:
    """A stand-in attribution method built on the project's Attributor contract."""

    @staticmethod
    def make(model: nn.Module):
        from monai_ext.attribution import Attributor, gather_scores, select_target

        class Saliency(Attributor):
            def attribute(self, x, target):
                x = x.detach().clone().requires_grad_(True)
                logits = self.model(x)
                score = gather_scores(logits, select_target(logits, target)).sum()
                (grad,) = torch.autograd.grad(score, x)
                return grad.abs().amax(dim=1, keepdim=True)

        return Saliency(model)


def test_every_metric_runs_with_one_uniform_call():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 2))
    x = torch.rand(3, 1, 16, 16)
    attributor = _Saliency.make(net)
    maps = attributor(x)
    lung = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    lung[..., 2:14, 2:14] = True
    lesion = torch.zeros_like(lung)
    lesion[..., 4:8, 4:8] = True
    labels = torch.tensor([0, 1, 1])
    for name, cls in sorted(METRICS.items()):
        metric = cls()
        result = metric(x, maps, model=net, target=None, labels=labels, lung_mask=lung, lesion_mask=lesion,
                        attributor=attributor, make_attributor=_Saliency.make)
        assert result.scores.shape == (3,), name
        value, low, high = metric.summarize(MetricResult.cat([result, result]), n=50)
        assert math.isnan(value) or low <= value <= high, name
