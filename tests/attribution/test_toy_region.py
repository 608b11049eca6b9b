"""A model whose class depends on one known region: localization, and the randomization check.

The model is built, not trained: two fixed random 3x3 convolutions (with ReLUs) and a linear
layer whose weights are zero outside a 12 x 12 square of the last feature map. Its logits thus
depend only on the input pixels of that square grown by the 2-pixel receptive field of the two
convolutions (a 16 x 16 square, a quarter of the image). The bias centres the logits at the mean
feature map, so that "no information" (the noise IBA substitutes) means "no evidence".
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from monai_ext.attribution import IBA, LRP, GradCAM, HiResCAM

SIZE = 32
FEAT = (slice(10, 22), slice(10, 22))  # where the linear layer looks
DEPENDS = (slice(8, 24), slice(8, 24))  # the input pixels the logits depend on


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def region_model(estimator_data: torch.Tensor) -> tuple[nn.Module, object]:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(8, 8, 3, padding=1), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc=nn.Linear(8 * SIZE * SIZE, 2))).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1))
        w = torch.zeros(2, 8, SIZE, SIZE)
        w[:, :, FEAT[0], FEAT[1]] = torch.randn(2, 8, 12, 12, generator=g) * 0.5
        net.fc.weight.copy_(w.view(2, -1))
    est = IBA.fit_estimator(net, estimator_data, layer="relu2")
    with torch.no_grad():
        net.fc.bias.copy_(-(net.fc.weight @ est.mean().flatten()))
    return net, est


def randomized(net: nn.Module, estimator_data: torch.Tensor) -> tuple[nn.Module, object]:
    """Adebayo et al. 2018: the same architecture with every layer re-initialized."""
    rand = copy.deepcopy(net)
    torch.manual_seed(5)
    for m in rand.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return rand, IBA.fit_estimator(rand, estimator_data, layer="relu2")


METHODS = {
    "HiResCAM": lambda net, est: HiResCAM(net, "relu2"),
    "GradCAM": lambda net, est: GradCAM(net, "relu2"),
    "IBA": lambda net, est: IBA(net, "relu2", estimator=est),
    "LRP": lambda net, est: LRP(net, rule="epsilon"),
}


@pytest.fixture(scope="module")
def setting():
    data = torch.randn(200, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    x = torch.randn(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    net, est = region_model(data)
    rand, rand_est = randomized(net, data)
    return x, net, est, rand, rand_est


def mass_inside(maps: torch.Tensor) -> torch.Tensor:
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[DEPENDS] = True
    return (maps[:, 0] * inside).sum(dim=(1, 2)) / maps[:, 0].sum(dim=(1, 2))


@pytest.mark.parametrize("method", ["IBA", "HiResCAM"])
def test_mass_inside_the_region_the_class_depends_on(setting, method):
    x, net, est, _, _ = setting
    maps = METHODS[method](net, est)(x)
    assert maps.min() >= 0
    frac = mass_inside(maps)
    assert (frac >= 0.9).all(), frac


@pytest.mark.parametrize("method", list(METHODS))
def test_randomized_weights_change_the_maps(setting, method):
    x, net, est, rand, rand_est = setting
    trained = METHODS[method](net, est)(x)
    random = METHODS[method](rand, rand_est)(x)
    rhos = []
    for a, b in zip(trained, random):
        a, b = a.flatten().numpy(), b.flatten().numpy()
        if np.ptp(a) > 0 and np.ptp(b) > 0:  # a constant map (e.g. all clipped by the ReLU) has no ranks
            rhos.append(spearmanr(a, b).statistic)
    assert len(rhos) >= len(x) // 2
    assert max(rhos) < 0.5, rhos
