"""IBA: the feature estimator, batching invariance, the model split, and input checks."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from monai_ext.attribution import IBA, FeatureEstimator, split_model
from monai_ext.networks import build_classifier


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 6, 3, padding=1), relu1=nn.ReLU(), pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1), relu2=nn.ReLU(), conv3=nn.Conv2d(8, 8, 3, padding=1), relu3=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 3))).eval()


class Wrapped(nn.Module):
    """The same network behind a custom forward: IBA must use its generic fallback."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 1.0


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def test_estimator_matches_direct_statistics(tmp_path):
    feats = torch.randn(37, 3, 4, 5, dtype=torch.float64).relu()
    est = FeatureEstimator("layer")
    for chunk in feats.split(10):
        est.update(chunk)
    assert est.n_samples == 37 and est.shape == (3, 4, 5)
    torch.testing.assert_close(est.mean().double(), feats.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(est.std().double(), feats.std(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.active_neurons(0.3), (feats != 0).double().mean(0) > 0.3)
    path = est.save(tmp_path / "est.pt")
    back = FeatureEstimator.load(path)
    assert back.layer == "layer" and back.n_samples == 37
    torch.testing.assert_close(back.std(), est.std())
    with pytest.raises(ValueError, match="differs"):
        est.update(torch.randn(2, 3, 4, 4))


def test_estimator_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        FeatureEstimator.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not an IBA feature estimator"):
        FeatureEstimator.load(bad)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an IBA feature estimator"):
        FeatureEstimator.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="two samples"):
        FeatureEstimator().mean()


def test_fit_estimator_from_tensor_and_loader(data):
    net = small_net()
    net.train()
    est = IBA.fit_estimator(net, data, layer="relu2", batch_size=16)
    assert net.training  # mode restored
    with torch.no_grad():
        feats = net.eval().relu2(net.conv2(net.pool(net.relu1(net.conv1(data)))))
    torch.testing.assert_close(est.mean(), feats.mean(0), atol=1e-5, rtol=1e-5)
    loader = [{"image": data[i:i + 8], "label": torch.zeros(8)} for i in range(0, 64, 8)]
    est2 = IBA.fit_estimator(net, loader, layer="relu2", max_samples=20)
    assert est2.n_samples == 20 and est2.layer == "relu2"
    with pytest.raises(ValueError, match="image"):
        IBA.fit_estimator(net, [{"x": data}], layer="relu2")


def test_batched_equals_slice_by_slice_defaults(data):
    net = small_net()
    est = IBA.fit_estimator(net, data, layer="relu2")
    iba = IBA(net, "relu2", estimator=est, batch_size=None)  # reference defaults: 10 steps, 10 samples, ...
    x = data[:5]
    batched = iba(x)
    single = torch.cat([iba(x[i:i + 1]) for i in range(len(x))])
    assert (batched - single).abs().max() <= 1e-4
    chunked = IBA(net, "relu2", estimator=est, batch_size=2)(x)
    assert (batched - chunked).abs().max() <= 1e-4
    assert batched.min() >= 0 and torch.isfinite(batched).all()


def test_batched_equals_slice_by_slice_densenet():
    net = build_classifier("densenet121").eval()
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    est = IBA.fit_estimator(net, torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
    iba = IBA(net, estimator=est, steps=3, n_samples=4, batch_size=None)
    batched = iba(x, target=1)
    single = torch.cat([iba(x[i:i + 1], target=1) for i in range(3)])
    assert (batched - single).abs().max() <= 1e-4
    # the folded batch norms and the channels-last layout change only the rounding
    plain = IBA(net, estimator=est, steps=3, n_samples=4, batch_size=None, fold_batchnorm=False,
                channels_last=False)(x, target=1)
    assert (batched - plain).abs().max() <= 1e-3 * batched.abs().max()


@pytest.mark.parametrize("fold", [True, False])
def test_bfloat16_tail_gives_the_float32_map(trained_like_batchnorm, fold):
    """``autocast_dtype``: the tail in bfloat16 (folded and cast, or under autocast) gives the float32
    map up to bfloat16 rounding: same ranking of the positions, float32 output."""
    net = trained_like_batchnorm(build_classifier("densenet121"), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    est = IBA.fit_estimator(net, torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
    ref = IBA(net, estimator=est, steps=4, n_samples=4, fold_batchnorm=fold)(x, target=1)
    bf16 = IBA(net, estimator=est, steps=4, n_samples=4, fold_batchnorm=fold, autocast_dtype="bfloat16")
    assert bf16.autocast_dtype is torch.bfloat16
    maps = bf16(x, target=1)
    assert maps.dtype == torch.float32 and maps.shape == ref.shape
    for a, b in zip(maps.flatten(1), ref.flatten(1)):
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
        assert rho > 0.9, rho
    assert float((maps - ref).abs().max()) < 0.1 * float(ref.max())
    with pytest.raises(ValueError, match="autocast_dtype"):
        IBA(net, estimator=est, autocast_dtype="int8")


def test_fallback_for_unknown_forward_matches_split(data):
    net = small_net()
    wrapped = Wrapped(net)
    assert split_model(wrapped, "net.relu2") is None
    assert split_model(net, "relu2") is not None
    est = IBA.fit_estimator(net, data, layer="relu2")
    est_w = IBA.fit_estimator(wrapped, data, layer="net.relu2")
    torch.testing.assert_close(est_w.mean(), est.mean())
    x = data[:3]
    a = IBA(net, "relu2", estimator=est, steps=4)(x)
    b = IBA(wrapped, "net.relu2", estimator=est_w, steps=4)(x)
    assert (a - b).abs().max() <= 1e-4


def test_split_model_reproduces_monai_classifiers(trained_like_batchnorm):
    x = torch.randn(2, 1, 64, 64)
    g = torch.Generator().manual_seed(0)
    for name, layers in (("densenet121", ["features.transition2", "features.denseblock3.denselayer2"]),
                         ("resnet18", ["layer2", "layer3.1", "maxpool"]), ("seresnet50", ["layer2"])):
        net = trained_like_batchnorm(build_classifier(name).eval(), g)
        with torch.no_grad():  # and one norm with a negative scale
            if name == "densenet121":
                net.features.denseblock3.denselayer3.layers.norm1.weight[7] = -0.5
            ref = net(x)
            for layer in layers:
                head, tail = split_model(net, layer)
                torch.testing.assert_close(tail(head(x)), ref)
                head, tail = split_model(net, layer, fold_batchnorm=True)
                torch.testing.assert_close(tail(head(x)), ref, rtol=1e-4, atol=1e-5)


def test_map_is_capacity_in_bits_per_input_pixel(data):
    net = small_net()
    est = IBA.fit_estimator(net, data, layer="relu2")
    x = data[:2]
    iba = IBA(net, "relu2", estimator=est, steps=3, upsample_mode="nearest")
    raw = iba.attribute(x, None)  # (B, 8, 8): bits of each feature position spread over its 2 x 2 input pixels
    nearest = iba(x)
    torch.testing.assert_close(nearest.sum(dim=(1, 2, 3)), raw.sum(dim=(1, 2)) * 4, rtol=1e-5, atol=1e-3)
    bilinear = IBA(net, "relu2", estimator=est, steps=3)(x)  # the default resizing keeps the total (bits)
    torch.testing.assert_close(bilinear.sum(dim=(1, 2, 3)), nearest.sum(dim=(1, 2, 3)), rtol=0.05, atol=0)
    assert math.isfinite(float(bilinear.sum())) and bilinear.min() >= 0


def test_seed_reproducible_and_effective(data):
    net = small_net()
    est = IBA.fit_estimator(net, data, layer="relu2")
    x = data[:2]
    a = IBA(net, "relu2", estimator=est, seed=1)(x)
    b = IBA(net, "relu2", estimator=est, seed=1)(x)
    c = IBA(net, "relu2", estimator=est, seed=2)(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_input_checks(data, tmp_path):
    net = small_net()
    with pytest.raises(ValueError, match="fit_estimator"):
        IBA(net, "relu2")
    est = IBA.fit_estimator(net, data, layer="relu2")
    with pytest.raises(ValueError, match="fitted at layer"):
        IBA(net, "relu3", estimator=est)
    with pytest.raises(ValueError, match="steps"):
        IBA(net, "relu2", estimator=est, steps=0)
    with pytest.raises(ValueError, match="does not match"):
        IBA(net, "relu2", estimator=est)(torch.randn(1, 1, 32, 32))
    path = est.save(tmp_path / "e.pt")
    assert IBA(net, "relu2", estimator=str(path)).estimator.n_samples == 64
    quick = IBA(net, "relu2", estimate_from_batch=True, steps=2)(data[:3])
    assert quick.shape == (3, 1, 16, 16) and torch.isfinite(quick).all()
