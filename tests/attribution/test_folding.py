"""Folded networks (monai_ext.attribution.folding): same function and input gradient as the model."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DenseNet
from torch import nn

from monai_ext.attribution import fold_model, split_model
from monai_ext.attribution.folding import _DenseBlockPlan, _FoldedTransition
from monai_ext.networks import build_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the CPU is shared


@pytest.fixture
def small_densenet(trained_like_batchnorm):
    def make(in_channels: int = 1, negative: bool = False) -> nn.Module:
        torch.manual_seed(0)
        net = DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=2, init_features=8, growth_rate=4,
                       block_config=(2, 3, 2), bn_size=2)
        trained_like_batchnorm(net, torch.Generator().manual_seed(0))
        if negative:  # a norm with a negative scale cannot move into the convolution
            with torch.no_grad():
                net.features.denseblock2.denselayer1.layers.norm1.weight[1] = -0.5
                net.features.transition1.norm.weight[0] = -0.5
        return net.eval()

    return make


def value_and_input_grad(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = f(x)
    (g,) = torch.autograd.grad((y * torch.tensor([0.3, -1.0], dtype=y.dtype)).sum(), x)
    return y.detach(), g


def parts(f) -> list:
    return list(f.__closure__[0].cell_contents)  # the callables of a _chain


@pytest.mark.parametrize("in_channels, size", [(1, (32, 32)), (1, (37, 29)), (3, (30, 34))])
@pytest.mark.parametrize("negative", [False, True])
def test_fold_model_matches_model_in_float64(small_densenet, in_channels, size, negative):
    net = small_densenet(in_channels, negative=negative).double()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(3, in_channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    folded = fold_model(net)
    kinds = [type(p).__name__ for p in parts(folded)]
    assert kinds.count("_DenseBlockPlan") == (2 if negative else 3)  # the block with the negative scale falls back
    assert kinds.count("_FoldedTransition") == 2 and kinds[0] == "_FoldedConvBN"
    y_ref, g_ref = value_and_input_grad(net, x)
    y, g = value_and_input_grad(folded, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), y_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mkldnn", [True, False])
def test_fold_model_float32_with_and_without_onednn(small_densenet, mkldnn):
    net = small_densenet(1)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(2))
    y64, g64 = value_and_input_grad(net.double(), x.double())
    net.float()
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = mkldnn
    try:
        y, g = value_and_input_grad(fold_model(net), x.contiguous(memory_format=torch.channels_last))
    finally:
        torch.backends.mkldnn.enabled = before
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-5)
    assert float((g.double() - g64).norm() / g64.norm()) < 1e-4


def test_dense_block_and_transition_nodes_on_densenet121(trained_like_batchnorm):
    net = build_classifier("densenet121", in_channels=1, num_classes=2)
    net = trained_like_batchnorm(net, torch.Generator().manual_seed(0)).eval().double()
    for p in net.parameters():
        p.requires_grad_(False)
    head, tail = split_model(net, "features.transition2", fold_batchnorm=True)
    kinds = [type(p) for p in parts(tail)]
    assert kinds[:3] == [_DenseBlockPlan, _FoldedTransition, _DenseBlockPlan]
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = head(x)
    torch.testing.assert_close(z, net.features[:8](x))  # transition2 output

    def module_tail(inp: torch.Tensor) -> torch.Tensor:
        return net.class_layers(net.features[8:](inp))

    y_ref, g_ref = value_and_input_grad(module_tail, z)
    y, g = value_and_input_grad(tail, z)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_fold_model_unknown_and_plain_chains():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    assert fold_model(Custom()) is None
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        seq[1].running_var.fill_(2.0)
        seq[1].running_mean.fill_(0.3)
    seq.eval()
    x = torch.rand(2, 1, 9, 9, dtype=torch.float64)
    seq.double()
    y_ref, g_ref = value_and_input_grad(seq, x)
    y, g = value_and_input_grad(fold_model(seq), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)


def test_fold_model_in_bfloat16_keeps_the_model_and_the_input_dtype(small_densenet):
    """``dtype=torch.bfloat16``: computed in bfloat16 from a float32 fold (scores and input gradients
    close to float32 ones at bfloat16 precision), float32 in and out, the model left unchanged."""
    net = small_densenet(1)
    for p in net.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(4))
    y32, g32 = value_and_input_grad(net, x)
    bf16 = fold_model(net, dtype=torch.bfloat16)
    inner = next(c.cell_contents for c in bf16.__closure__ if callable(c.cell_contents))  # the cast chain
    plans = [p for p in parts(inner) if isinstance(p, _DenseBlockPlan)]
    assert plans and all(layer.weight1.dtype == torch.bfloat16 for plan in plans for layer in plan.layers)
    y, g = value_and_input_grad(bf16, x)
    assert y.dtype == g.dtype == torch.float32
    assert float((y - y32).abs().max()) < 0.05 * float(y32.abs().max())
    cosine = float((g * g32).sum() / (g.norm() * g32.norm()))
    assert cosine > 0.98, cosine
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in net.state_dict().items())
    head, tail = split_model(net, "features.transition1", fold_batchnorm=True, tail_dtype=torch.bfloat16)
    with torch.no_grad():
        z = head(x)
        assert z.dtype == torch.float32 and tail(z).dtype == torch.float32
        assert float((tail(z) - y32).abs().max()) < 0.05 * float(y32.abs().max())
