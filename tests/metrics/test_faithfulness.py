"""Faithfulness metrics against hand-computed values on tiny linear models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monai_ext.metrics import (
    AOPC,
    HAAS,
    AverageDrop,
    AverageIncrease,
    Deletion,
    EmptyMaskWarning,
    Insertion,
    heatmap_assisted_image,
)


class Linear(nn.Module):
    """logit = sum(w * x) + bias, one output (probability = sigmoid)."""

    def __init__(self, w: torch.Tensor, bias: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * self.w).sum(dim=(1, 2, 3)) + self.bias).unsqueeze(1)


class MeanProb(nn.Module):
    """Two classes with probabilities exactly (1 - s, s), s = mean(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(1, 2, 3))
        return torch.log(torch.stack([1 - s, s], dim=1))


class MeanSign(nn.Module):
    """Predicts class 1 when mean(x) > 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _aopc_case():
    # 4x4 input of ones; 2x2 regions with weights 1 (TL), 2 (TR), 0.5 (BL), -1 (BR):
    # region relevances of the oracle map w * x: TL 4, TR 8, BL 2, BR -4; f(x) = 10.
    w = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [0.5, 0.5, -1, -1], [0.5, 0.5, -1, -1]]).view(1, 1, 4, 4)
    x = torch.ones(1, 1, 4, 4)
    return Linear(w), x, w * x


def test_aopc_oracle_exact():
    model, x, oracle = _aopc_case()
    metric = AOPC(region_size=2, n_steps=4, baseline="constant", baseline_value=0.0, score="logit")
    result = metric(x, oracle, model=model, target=0)
    # MoRF order TR, TL, BL, BR: f(x_k) = 10, 2, -2, -4, 0
    assert result.curves[0].tolist() == pytest.approx([10.0, 2.0, -2.0, -4.0, 0.0])
    # AOPC = (0 + 8 + 12 + 14 + 10) / 5
    assert result.scores.item() == pytest.approx(8.8)
    assert result.steps.tolist() == [0, 1, 2, 3, 4]


def test_aopc_probability_and_lung_mask():
    model, x, oracle = _aopc_case()
    prob = AOPC(region_size=2, n_steps=4, baseline="constant")(x, oracle, model=model, target=0)
    sig = [1 / (1 + math.exp(-v)) for v in (10.0, 2.0, -2.0, -4.0, 0.0)]
    assert prob.curves[0].tolist() == pytest.approx(sig, abs=1e-6)
    assert prob.scores.item() == pytest.approx(sum(sig[0] - s for s in sig) / 5, abs=1e-6)
    # lung = left half: only TL and BL are ranked and removed, then the curve stays flat
    lung = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    lung[..., :2] = True
    res = AOPC(region_size=2, n_steps=4, baseline="constant", score="logit")(x, oracle, model=model, target=0,
                                                                             lung_mask=lung)
    assert res.curves[0].tolist() == pytest.approx([10.0, 6.0, 4.0, 4.0, 4.0])
    assert res.scores.item() == pytest.approx((0 + 4 + 6 + 6 + 6) / 5)


def test_aopc_oracle_beats_reversed_map_and_chunking_is_exact():
    model, x, oracle = _aopc_case()
    xs, maps = x.repeat(2, 1, 1, 1), torch.cat([oracle, -oracle])
    metric = AOPC(region_size=2, n_steps=3, regions_per_step=1, baseline="constant", score="logit")
    res = metric(xs, maps, model=model, target=0)
    assert res.scores[0] > res.scores[1]
    chunked = AOPC(region_size=2, n_steps=3, baseline="constant", score="logit", batch_size=5)(
        xs, maps, model=model, target=0)
    assert torch.allclose(res.curves, chunked.curves)
    # uneven image size: 5x5 with 2x2 regions gives 9 regions; the blur and uniform baselines run
    x5 = torch.rand(2, 1, 5, 5)
    for baseline in ("blur", "uniform"):
        out = AOPC(region_size=2, n_steps=9, baseline=baseline)(x5, x5, model=Linear(torch.ones(1, 5, 5)), target=0)
        assert out.curves.shape == (2, 10) and torch.isfinite(out.scores).all()


def test_aopc_empty_lung_is_nan_with_warning():
    model, x, oracle = _aopc_case()
    lung = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    lung[0] = True
    with pytest.warns(EmptyMaskWarning, match=r"\[1\]"):
        res = AOPC(region_size=2, n_steps=2, baseline="constant")(x.repeat(2, 1, 1, 1), oracle.repeat(2, 1, 1, 1),
                                                                  model=model, target=0, lung_mask=lung)
    assert math.isfinite(res.scores[0].item()) and math.isnan(res.scores[1].item())


def _tiny_linear():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    return Linear(torch.ones(1, 1, 2, 2)), x


def test_insertion_deletion_exact_curves():
    model, x = _tiny_linear()
    kw = dict(n_steps=4, baseline="constant", baseline_value=0.0, score="logit")
    ins = Insertion(**kw)(x, x, model=model, target=0)  # oracle map = w * x = x: order 4, 3, 2, 1
    assert ins.curves[0].tolist() == pytest.approx([0.0, 4.0, 7.0, 9.0, 10.0])
    assert ins.scores.item() == pytest.approx(0.25 * (2 + 5.5 + 8 + 9.5))
    assert ins.steps.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    dele = Deletion(**kw)(x, x, model=model, target=0)
    assert dele.curves[0].tolist() == pytest.approx([10.0, 6.0, 3.0, 1.0, 0.0])
    assert dele.scores.item() == pytest.approx(0.25 * (8 + 4.5 + 2 + 0.5))
    # two steps: half of the pixels per step
    two = Insertion(n_steps=2, baseline="constant", score="logit")(x, x, model=model, target=0)
    assert two.curves[0].tolist() == pytest.approx([0.0, 7.0, 10.0])
    # class probability (sigmoid of the single logit)
    prob = Insertion(n_steps=4, baseline="constant")(x, x, model=model, target=0)
    sig = [1 / (1 + math.exp(-v)) for v in (0.0, 4.0, 7.0, 9.0, 10.0)]
    assert prob.curves[0].tolist() == pytest.approx(sig, abs=1e-6)


def test_insertion_deletion_lung_mask():
    model, x = _tiny_linear()
    lung = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2)
    kw = dict(n_steps=3, baseline="constant", score="logit")
    ins = Insertion(**kw)(x, x, model=model, target=0, lung_mask=lung)
    # pixel 2 is outside the lung: kept; lung pixels 4, 3, 1 inserted in that order
    assert ins.curves[0].tolist() == pytest.approx([2.0, 6.0, 9.0, 10.0])
    dele = Deletion(**kw)(x, x, model=model, target=0, lung_mask=lung)
    assert dele.curves[0].tolist() == pytest.approx([10.0, 6.0, 3.0, 2.0])
    with pytest.warns(EmptyMaskWarning):
        out = Deletion(**kw)(x, x, model=model, target=0, lung_mask=torch.zeros_like(lung))
    assert math.isnan(out.scores.item())


def test_oracle_map_beats_random_map_on_insertion_and_deletion():
    torch.manual_seed(0)
    w = torch.zeros(1, 1, 16, 16)
    w[..., 4:9, 5:11] = 1.0
    x = torch.zeros(3, 1, 16, 16)
    x[:, :, 4:9, 5:11] = 1.0
    x = x + 0.05 * torch.rand(3, 1, 16, 16)
    model = Linear(w, bias=-23.0)  # logit about -7 on the blurred image, +7.7 on x
    oracle = w * x
    random = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ins, dele = Insertion(n_steps=16, blur_sigma=2.0), Deletion(n_steps=16, blur_sigma=2.0)
    assert bool((ins(x, oracle, model=model, target=0).scores > ins(x, random, model=model, target=0).scores).all())
    assert bool((dele(x, oracle, model=model, target=0).scores < dele(x, random, model=model, target=0).scores).all())


def test_average_drop_and_increase_hand_values():
    x = torch.stack([torch.full((1, 2, 2), 0.8), torch.tensor([[[0.9, 0.1], [0.1, 0.1]]])])
    maps = torch.stack([torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[5.0, 1.0], [1.0, 1.0]]])])
    target = torch.tensor([1, 0])
    # sample 0: Y = 0.8, E = [[0.8, 0], [0, 0]], O = 0.2 -> drop 75 %
    # sample 1: class 0, Y = 0.7, normalized map [[1, 0], [0, 0]], E mean 0.225, O = 0.775 > Y -> drop 0, increase
    drop = AverageDrop()(x, maps, model=MeanProb(), target=target)
    assert drop.scores.tolist() == pytest.approx([75.0, 0.0], abs=1e-4)
    assert drop.scores.mean().item() == pytest.approx(37.5, abs=1e-4)
    assert drop.extras["score_explanation"].tolist() == pytest.approx([0.2, 0.775], abs=1e-6)
    inc = AverageIncrease()(x, maps, model=MeanProb(), target=target)
    assert inc.scores.tolist() == [0.0, 100.0]
    # a lung mask keeps the pixels outside it
    lung = torch.tensor([[True, True], [False, False]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    res = AverageDrop()(x, maps, model=MeanProb(), target=target, lung_mask=lung)
    # sample 0: E = [[0.8, 0], [0.8, 0.8]], O = 0.6 -> drop 25 %
    assert res.scores[0].item() == pytest.approx(25.0, abs=1e-4)
    with pytest.warns(EmptyMaskWarning):
        out = AverageIncrease()(x, maps, model=MeanProb(), target=target, lung_mask=torch.zeros_like(lung))
    assert torch.isnan(out.scores).all()


def test_heatmap_assisted_image_worked_examples():
    x = torch.tensor([[0.5, -0.8], [0.2, 0.9]]).view(1, 1, 2, 2)
    maps = torch.tensor([[4.0, 2.0], [0.0, 4.0]]).view(1, 1, 2, 2)  # a_norm = [[1, .5], [0, 1]]
    ha = heatmap_assisted_image(x, maps, input_range=(-1.0, 1.0))
    # 0.5 * 2 = 1.0; -0.8 * 1.5 = -1.2 -> -1; 0.2 * 1 = 0.2; 0.9 * 2 = 1.8 -> 1
    assert ha.flatten().tolist() == pytest.approx([1.0, -1.0, 0.2, 1.0])
    # per-sample range: [0, 1] image -> x_norm [[-1, 1], [0.5, -0.5]]; a_norm [[0, 0], [1, 0]]
    x01 = torch.tensor([[0.0, 1.0], [0.75, 0.25]]).view(1, 1, 2, 2)
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert heatmap_assisted_image(x01, a).flatten().tolist() == pytest.approx([0.0, 1.0, 1.0, 0.25])
    # lung mask: pixels outside are untouched, a_norm is min-max over the lung: [[1, 0], [-, 1]]
    lung = torch.tensor([[True, True], [False, True]]).view(1, 1, 2, 2)
    out = heatmap_assisted_image(x, maps, input_range=(-1.0, 1.0), lung_mask=lung)
    assert out.flatten().tolist() == pytest.approx([1.0, -0.8, 0.2, 1.0])
    with pytest.raises(ValueError):
        heatmap_assisted_image(x, maps, input_range=(1.0, 0.0))


def _haas_batch():
    x = torch.tensor([
        [0.2, 0.2, -0.3, -0.3],  # mean -0.05: predicted 0 (label 1, wrong); HA mean 0.05 -> right
        [0.5, 0.5, 0.5, 0.5],  # right before and after
        [0.1, 0.1, -0.15, 0.0],  # mean 0.0125: right; HA mean -0.025 -> wrong
        [-0.5, -0.5, -0.5, -0.5],  # label 0, right before and after
    ]).view(4, 1, 2, 2)
    maps = torch.tensor([[1.0, 1, 0, 0], [0, 1, 2, 3], [0, 0, 1, 0], [1, 0, 0, 0]]).view(4, 1, 2, 2)
    labels = torch.tensor([1, 1, 1, 0])
    return x, maps, labels


def test_haas_ratio_of_accuracies():
    x, maps, labels = _haas_batch()
    metric = HAAS(input_range=(-1.0, 1.0))
    res = metric(x, maps, model=MeanSign(), labels=labels)
    assert res.scores.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert res.extras["correct_original"].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert metric.aggregate(res) == pytest.approx(1.0)  # (3/4) / (3/4)
    keep = torch.tensor([0, 1, 3])
    sub = metric(x[keep], maps[keep], model=MeanSign(), labels=labels[keep])
    assert metric.aggregate(sub) == pytest.approx(1.5)  # (3/3) / (2/3)
    value, low, high = metric.summarize(sub, n=200)
    assert value == pytest.approx(1.5) and low <= value <= high
    with pytest.raises(ValueError, match="labels"):
        metric(x, maps, model=MeanSign())
    wrong = metric(x[:1], maps[:1], model=MeanSign(), labels=labels[:1])
    with pytest.warns(EmptyMaskWarning):
        assert math.isnan(metric.aggregate(wrong))
