"""LRP through captum: relevance conservation on MONAI classifiers, rules, and clean-up."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from monai_ext.attribution import LRP, LRP_RULES
from monai_ext.networks import build_classifier


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(net: nn.Module) -> dict:
    return {name: (sorted(vars(m)), dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                   getattr(m, "inplace", None)) for name, m in net.named_modules()}


def test_z_rule_conserves_relevance_on_a_bias_free_net():
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 4, 3, padding=1, bias=False), relu1=nn.ReLU(inplace=True),
        pool=nn.MaxPool2d(2), conv2=nn.Conv2d(4, 4, 3, padding=1, bias=False), relu2=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, 2, bias=False)))
    x = torch.randn(3, 2, 8, 8)
    relevance = LRP(net, rule="z")(x, target=0)
    assert relevance.shape == (3, 1, 8, 8)
    with torch.no_grad():
        score = net(x)[:, 0]
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), score, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["densenet121", "resnet18"])
def test_z_rule_conserves_through_concatenations_and_shortcuts(name):
    """Freshly initialized MONAI nets have identity-like batch norms; with the remaining biases (the
    classifier's, the ResNet shortcut convolutions') zeroed, the z-rule conserves relevance: the
    input relevance sums to the logit. Without the concatenation / addition modules, shortcut
    relevance would be counted twice or dropped."""
    net = build_classifier(name).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    before = snapshot(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    relevance = LRP(net, rule="z")(x, target=1)
    with torch.no_grad():
        expected = net(x)[:, 1]
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), expected, rtol=2e-3, atol=1e-4)
    assert snapshot(net) == before
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_every_rule_runs_and_cleans_up():
    net = build_classifier("resnet18").eval()
    x = torch.randn(2, 1, 32, 32)
    before = snapshot(net)
    for rule in LRP_RULES:
        relevance = LRP(net, rule=rule)(x)
        assert relevance.shape == (2, 1, 32, 32) and torch.isfinite(relevance).all()
    assert snapshot(net) == before
    assert not LRP(net).non_negative


def test_errors():
    with pytest.raises(ValueError, match="unknown LRP rule"):
        LRP(nn.Linear(2, 2), rule="w2")
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
    before = snapshot(net)
    with pytest.raises(ValueError, match="Sigmoid"):
        LRP(net)(torch.randn(1, 1, 8, 8))
    assert snapshot(net) == before
