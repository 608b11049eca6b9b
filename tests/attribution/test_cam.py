"""HiResCAM and Grad-CAM: hand-checkable math, targets, chunking, and the base-class contract."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from monai_ext.attribution import Attributor, GradCAM, HiResCAM


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_flatten_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 4, 3, padding=1), relu=nn.ReLU(), conv2=nn.Conv2d(4, 3, 3, padding=1),
        flatten=nn.Flatten(), fc=nn.Linear(3 * 8 * 8, 3)))


def conv_gap_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 5, 3, padding=1), relu=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(), fc=nn.Linear(5, 2)))


def test_hirescam_pre_relu_sums_to_score_minus_bias():
    net = conv_flatten_linear()
    x = torch.randn(4, 2, 8, 8)
    for target in (0, 2):
        maps = HiResCAM(net, "conv2", relu=False)(x, target=target)  # feature size == input size
        assert maps.shape == (4, 1, 8, 8)
        with torch.no_grad():
            expected = net(x)[:, target] - net.fc.bias[target]
        torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)


def test_hirescam_relu_is_positive_part():
    net = conv_flatten_linear()
    x = torch.randn(3, 2, 8, 8)
    raw = HiResCAM(net, "conv2", relu=False)(x, target=1)
    pos = HiResCAM(net, "conv2")(x, target=1)
    torch.testing.assert_close(pos, raw.clamp_min(0))
    assert HiResCAM(net, "conv2").non_negative and not HiResCAM(net, "conv2", relu=False).non_negative


def test_gradcam_equals_cam_up_to_positive_factor():
    net = conv_gap_linear()
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        feats = net.relu(net.conv(x))
    for target in (0, 1):
        cam = torch.einsum("k,bkhw->bhw", net.fc.weight[target], feats).unsqueeze(1)  # Zhou et al. 2016
        grad_cam = GradCAM(net, "relu", relu=False)(x, target=target)
        factor = 1.0 / (6 * 6)  # the spatial mean of the gradient: w_k / (h * w)
        torch.testing.assert_close(grad_cam, cam * factor, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(GradCAM(net, "relu")(x, target=target), (cam * factor).clamp_min(0),
                                   atol=1e-6, rtol=1e-5)


def test_targets_predicted_int_and_per_sample():
    net = conv_flatten_linear()
    x = torch.randn(4, 2, 8, 8)
    cam = HiResCAM(net, "conv2", relu=False)
    with torch.no_grad():
        pred = net(x).argmax(1)
    torch.testing.assert_close(cam(x), cam(x, target=pred))
    per_sample = torch.tensor([0, 1, 2, 1])
    maps = cam(x, target=per_sample)
    for i, t in enumerate(per_sample.tolist()):
        torch.testing.assert_close(maps[i:i + 1], cam(x[i:i + 1], target=t))
    with pytest.raises(ValueError, match="out of range"):
        cam(x, target=3)
    with pytest.raises(ValueError, match="entries"):
        cam(x, target=[0, 1])


def test_chunked_batches_equal_whole_batch():
    net = conv_flatten_linear()
    x = torch.randn(5, 2, 8, 8)
    target = torch.tensor([0, 1, 2, 0, 1])
    whole = GradCAM(net, "conv2")(x, target=target)
    chunked = GradCAM(net, "conv2", batch_size=2)(x, target=target)
    torch.testing.assert_close(whole, chunked)
    assert GradCAM(net, "conv2", batch_size=2)(x[:0]).shape == (0, 1, 8, 8)


def test_upsampling_to_input_size_and_device_dtype():
    net = conv_gap_linear()
    net.conv.stride = (2, 2)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64).float()
    maps = HiResCAM(net, "relu")(x)
    assert maps.shape == (2, 1, 16, 16) and maps.dtype == torch.float32 and maps.device == x.device


def test_call_restores_model_state_and_releases_hooks():
    net = conv_flatten_linear()
    net.train()
    net.fc.weight.requires_grad_(False)
    cam = HiResCAM(net, "conv2")
    with torch.no_grad():  # as inside a MONAI evaluator: gradients are re-enabled for the call
        maps = cam(torch.randn(2, 2, 8, 8))
    assert torch.isfinite(maps).all()
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, True, False, True]
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())


def test_input_errors():
    net = conv_flatten_linear()
    with pytest.raises(ValueError, match="no module named"):
        HiResCAM(net, "conv9")
    cam = HiResCAM(net, "conv2")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cam(torch.randn(2, 8, 8))
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        cam(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        HiResCAM(net, "conv2", batch_size=0)
    with pytest.raises(TypeError):
        HiResCAM("not a model")  # type: ignore[arg-type]


def test_default_layer_for_plain_models_is_last_conv():
    assert HiResCAM(conv_flatten_linear()).target_layer == "conv2"
    assert isinstance(GradCAM(conv_gap_linear()), Attributor)


@pytest.mark.parametrize("cls", [HiResCAM, GradCAM])
def test_fast_path_matches_hooked_forward_on_monai_nets(cls, trained_like_batchnorm):
    """Folded batch norms and channels-last tensors change only the rounding."""
    from monai_ext.networks import build_classifier

    g = torch.Generator().manual_seed(0)
    for name in ("densenet121", "resnet18"):
        net = trained_like_batchnorm(build_classifier(name).eval(), g, bias=False)
        x = torch.randn(2, 1, 64, 64, generator=g)
        fast = cls(net, relu=False)(x, target=1)
        slow = cls(net, relu=False, fast=False)(x, target=1)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))
