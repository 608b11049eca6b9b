"""Every attributor on CPU, on a 2D MONAI DenseNet121 and ResNet18: the common contract."""

from __future__ import annotations

import pytest
import torch

from monai_ext.attribution import IBA, IGOS, IGOSPP, LRP, GradCAM, HiResCAM
from monai_ext.networks import build_classifier, default_cam_layer, default_iba_layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    out = {}
    for name in ("densenet121", "resnet18"):
        net = build_classifier(name, in_channels=1, num_classes=2)
        slices = torch.randn(6, 1, 64, 64, generator=torch.Generator().manual_seed(1))
        out[name] = (net, IBA.fit_estimator(net, slices))
    return out


FACTORIES = {
    "HiResCAM": lambda net, est: HiResCAM(net),
    "GradCAM": lambda net, est: GradCAM(net),
    "IBA": lambda net, est: IBA(net, estimator=est, steps=2, n_samples=3),
    "LRP": lambda net, est: LRP(net, rule="epsilon"),
    "IGOS": lambda net, est: IGOS(net, iterations=1, ig_steps=2),
    "IGOSPP": lambda net, est: IGOSPP(net, iterations=1, ig_steps=2),
}


def state(net: torch.nn.Module) -> dict:
    return {name: (m.training, sorted(vars(m)), dict(m._forward_hooks), dict(m._forward_pre_hooks),
                   dict(m._backward_hooks), getattr(m, "inplace", None)) for name, m in net.named_modules()}


@pytest.mark.parametrize("net_name", ["densenet121", "resnet18"])
@pytest.mark.parametrize("method", list(FACTORIES))
def test_attributor_contract(nets, net_name, method):
    net, est = nets[net_name]
    net.train()  # the call must use eval mode and give the mode back
    attributor = FACTORIES[method](net, est)
    if method in ("HiResCAM", "GradCAM"):
        assert attributor.target_layer == default_cam_layer(net)
    if method == "IBA":
        assert attributor.target_layer == default_iba_layer(net)
    before = state(net)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    maps = attributor(x)
    assert maps.shape == (2, 1, 64, 64)
    assert maps.device == x.device and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    if attributor.non_negative:
        assert maps.min() >= 0
    assert state(net) == before  # modes, hooks, attributes, ReLU flags
    assert [p.requires_grad for p in net.parameters()] == grads
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())  # BN statistics untouched
    explicit = attributor(x, target=torch.tensor([1, 0]))
    assert explicit.shape == (2, 1, 64, 64)
