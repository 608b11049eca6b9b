"""Max-Sensitivity, the randomization sanity check and the Spearman correlation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from monai_ext.metrics import (
    EmptyMaskWarning,
    MaxSensitivity,
    ModelRandomization,
    randomizable_layers,
    spearman_correlation,
)


class Quadratic(nn.Module):
    """logit = sum(w * x**2): its gradient 2 w x changes with the input."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x**2).sum(dim=(1, 2, 3)).unsqueeze(1)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def saliency_factory(model: nn.Module):
    """Gradient of the target logit with respect to the input (Simonyan et al.)."""

    def explain(x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        t = logits.argmax(1) if target is None else torch.as_tensor(target).view(-1)
        (grad,) = torch.autograd.grad(logits.gather(1, t.view(-1, 1)).sum(), x)
        return grad.sum(dim=1, keepdim=True)

    return explain


def test_spearman_hand_values_ties_and_mask():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman_correlation(a, b).item() == pytest.approx(0.8)
    assert spearman_correlation(a, a).item() == pytest.approx(1.0)
    assert spearman_correlation(a, -a).item() == pytest.approx(-1.0)
    assert spearman_correlation(a, -a, absolute=True).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (3, 1, 5, 5), generator=g).float()  # many ties
    y = torch.randint(0, 4, (3, 1, 5, 5), generator=g).float()
    ours = spearman_correlation(x, y)
    ref = [spearmanr(x[i].flatten().numpy(), y[i].flatten().numpy())[0] for i in range(3)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-6)
    mask = torch.zeros(3, 1, 5, 5, dtype=torch.bool)
    mask[..., 1:4, :] = True
    ref = [spearmanr(x[i][mask[i]].numpy(), y[i][mask[i]].numpy())[0] for i in range(3)]
    assert spearman_correlation(x, y, mask).tolist() == pytest.approx(ref, abs=1e-6)
    assert math.isnan(spearman_correlation(torch.ones(1, 4), a).item())


def test_max_sensitivity_constant_explanation_is_zero():
    x = torch.rand(3, 1, 6, 6)

    def constant(inp: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(inp.shape[0], 1, 6, 6)

    res = MaxSensitivity(perturb_radius=0.1, n_perturb_samples=4)(x, attributor=constant, target=0)
    assert res.scores.shape == (3,) and res.scores.tolist() == [0.0, 0.0, 0.0]


def test_max_sensitivity_gradient_on_nonlinear_model_is_positive_and_deterministic():
    torch.manual_seed(0)
    model = Quadratic(torch.randn(1, 6, 6))
    x = torch.rand(3, 1, 6, 6) + 0.5
    metric = MaxSensitivity(perturb_radius=0.1, n_perturb_samples=5, max_examples_per_batch=6)
    res = metric(x, model=model, make_attributor=saliency_factory)  # target: the predicted class
    assert bool((res.scores > 0).all())
    # |grad(x + e) - grad(x)| = 2 |w e| <= 2 |w| r, relative to |2 w x| with x >= 0.5
    assert bool((res.scores <= 0.1 / 0.5 + 1e-5).all())
    again = metric(x, model=model, attributor=saliency_factory(model), target=0)
    assert torch.allclose(res.scores, again.scores)
    # a lung mask restricts the perturbation and the comparison; an empty one gives NaN
    lung = torch.zeros(3, 1, 6, 6, dtype=torch.bool)
    lung[:2, :, :3] = True
    with pytest.warns(EmptyMaskWarning):
        masked = metric(x, model=model, attributor=saliency_factory(model), target=0, lung_mask=lung)
    assert bool((masked.scores[:2] > 0).all()) and math.isnan(masked.scores[2].item())
    with pytest.raises(ValueError, match="attributor"):
        metric(x, model=model)


def test_randomization_identical_model_gives_one():
    model = tiny_cnn()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    check = ModelRandomization(init_fn=lambda module: None)
    with pytest.warns(UserWarning, match="unchanged"):
        res = check(x, model=model, target=1, make_attributor=saliency_factory)
    assert res.scores.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_randomization_full_and_cascade_lower_and_model_untouched():
    model = tiny_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    full = ModelRandomization(mode="full", seed=0)(x, model=model, target=1, make_attributor=saliency_factory)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG is left as it was
    assert bool((full.scores < 0.9).all()), full.scores
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = randomizable_layers(model)
    assert names == ["0", "2", "6"]
    cascade = ModelRandomization(mode="cascade", absolute=False)(x, model=model, target=1,
                                                                 make_attributor=saliency_factory)
    assert cascade.curves.shape == (4, 3) and cascade.steps.tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(cascade.scores, cascade.curves[:, -1])
    assert bool((cascade.scores < 0.9).all())
    with pytest.raises(ValueError, match="no module"):
        ModelRandomization(layers=["nope"])(x, model=model, make_attributor=saliency_factory)
    with pytest.raises(ValueError, match="mode"):
        ModelRandomization(mode="independent")


def test_randomization_warns_when_the_seed_reproduces_the_weights():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(2, 1, 4, 4)
    with pytest.warns(UserWarning, match="unchanged"):
        res = ModelRandomization(seed=5)(x, model=model, target=0, make_attributor=saliency_factory)
    assert res.scores.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
