"""IB saliency-guided training: each term against a direct NumPy computation on a tiny network, and
guided steps through MONAI's SupervisedTrainer on synthetic slices."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import StatsHandler
from monai.networks.nets import DenseNet
from scipy.ndimage import gaussian_filter
from torch import nn

from monai_ext.attribution import IBA, HiResCAM
from monai_ext.training import (
    GUIDED_TERMS,
    GuidedIteration,
    IBSaliencyGuidedLoss,
    guided_terms,
    minmax_normalize,
    saliency_cross_entropy,
    saliency_suppression_loss,
    smooth_feature_maps,
    top_share_mask,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_net(seed: int = 0) -> nn.Module:
    """conv (the guided layer, 2 channels of 3x3) -> flatten -> linear (3 classes): dy^c/dA = W_c."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3, padding=1), flatten=nn.Flatten(),
                                     fc=nn.Linear(18, 3))).train()


# ------------------------------------------------------------------------------------------------
# NumPy reference of the whole step (float64)
def np_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    bsz, _, h, wd = x.shape
    pad = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((bsz, w.shape[0], h, wd))
    for k in range(w.shape[0]):
        for i in range(h):
            for j in range(wd):
                out[:, k, i, j] = (pad[:, i:i + 3, j:j + 3] * w[k, 0]).sum(axis=(1, 2)) + b[k]
    return out


def np_minmax(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def np_log_softmax(v: np.ndarray, axis: int = -1) -> np.ndarray:
    v = v - v.max(axis=axis, keepdims=True)
    return v - np.log(np.exp(v).sum(axis=axis, keepdims=True))


def np_guidance(a: np.ndarray, gc: np.ndarray, gp: np.ndarray, q: np.ndarray, mask: np.ndarray, correct: bool,
                beta: float = 1.0) -> tuple[float, float, float]:
    """G, CE and L_SS of one slice from its activation (K, h, w), the (constant) gradients, the IBA
    distribution and Mask_r."""
    lc = np_minmax(np.maximum((gc * a).sum(0), 0))
    lp = np_minmax(np.maximum((gp * a).sum(0), 0))
    ce = -(q.ravel() * np_log_softmax(lc.ravel())).sum()
    ss = (np.minimum(lc, lp) * mask).sum() / (lc + lp).sum()
    return ce + beta * correct * ss, ce, ss


def test_terms_match_a_direct_numpy_computation():
    net = tiny_net()
    est = IBA.fit_estimator(net, torch.randn(64, 1, 3, 3, generator=torch.Generator().manual_seed(1)), layer="conv")
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred = net(x).argmax(1)
    y = torch.stack([pred[0], (pred[1] + 1) % 3, pred[2], (pred[3] + 2) % 3])  # right, wrong, right, wrong
    guide = IBSaliencyGuidedLoss(net, estimator=est)
    assert guide.target_layer == "conv"  # the last convolution
    out = guide(x, y)
    assert net.training  # mode restored

    w = net.conv.weight.detach().double().numpy()
    b = net.conv.bias.detach().double().numpy()
    fw, fb = net.fc.weight.detach().double().numpy(), net.fc.bias.detach().double().numpy()
    xn = x.double().numpy()
    a = np_conv(xn, w, b)
    logits = a.reshape(4, -1) @ fw.T + fb
    np.testing.assert_allclose(out.activation.numpy(), a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits.detach().numpy(), logits, rtol=1e-5, atol=1e-5)

    # c = label, p = highest-scoring other class
    masked = logits.copy()
    masked[np.arange(4), y.numpy()] = -np.inf
    p = masked.argmax(1)
    assert out.other.tolist() == p.tolist()
    correct = logits.argmax(1) == y.numpy()
    assert out.correct.tolist() == correct.tolist()
    assert correct.tolist() == [True, False, True, False]  # both branches of "beta * L_SS when right"

    # L^ib is the project's IBA at the same layer, target c
    ib = IBA(net, "conv", est, beta=1000.0, batch_size=None).raw_maps(x, target=y)[:, 0]
    torch.testing.assert_close(out.ib_map, ib)
    q = np.stack([np_minmax(m) for m in ib.double().numpy()])
    q = q / q.sum(axis=(1, 2), keepdims=True)

    a_target = np.empty_like(a)
    kl = np.empty(4)
    for i in range(4):
        gc, gp = fw[y[i]].reshape(2, 3, 3), fw[p[i]].reshape(2, 3, 3)
        lc = np.maximum((gc * a[i]).sum(0), 0)
        lp = np.maximum((gp * a[i]).sum(0), 0)
        np.testing.assert_allclose(out.saliency[i].numpy(), lc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.other_saliency[i].numpy(), lp, rtol=1e-5, atol=1e-6)
        # Mask_r: the positions at or above the ceil(0.35 * 9) = 4th highest value of L^c, if not 0
        mask = ((lc >= np.sort(lc.ravel())[::-1][3]) & (lc > 0)).astype(float)
        np.testing.assert_array_equal(out.mask[i].numpy(), mask)
        g, ce, ss = np_guidance(a[i], gc, gp, q[i], mask, bool(correct[i]))
        assert out.guided[i]
        assert out.cross_entropy[i].item() == pytest.approx(ce, rel=1e-5)
        assert out.suppression[i].item() == pytest.approx(ss, rel=1e-5, abs=1e-7)
        assert out.guidance[i].item() == pytest.approx(g, rel=1e-5)
        # dG/dA by central differences, then A' = A - alpha * smooth_1(dG/dA)
        grad = np.zeros_like(a[i])
        h = 1e-6
        for idx in np.ndindex(*a[i].shape):
            up, down = a[i].copy(), a[i].copy()
            up[idx] += h
            down[idx] -= h
            grad[idx] = (np_guidance(up, gc, gp, q[i], mask, bool(correct[i]))[0]
                         - np_guidance(down, gc, gp, q[i], mask, bool(correct[i]))[0]) / (2 * h)
        smooth = np.stack([gaussian_filter(g_k, sigma=1.0, mode="nearest", truncate=2.0) for g_k in grad])
        a_target[i] = a[i] - 1000.0 * smooth
        # KL(A || A'): softmax over the positions of each channel, mean over channels
        lp_a = np_log_softmax(a[i].reshape(2, -1))
        lp_t = np_log_softmax(a_target[i].reshape(2, -1))
        kl[i] = (np.exp(lp_a) * (lp_a - lp_t)).sum(1).mean()
    assert np.abs(grad).max() > 0
    np.testing.assert_allclose((out.activation_target - out.activation).numpy(), a_target - a, rtol=2e-3, atol=1e-6)
    assert out.kl.item() == pytest.approx(kl.mean(), rel=2e-3)
    assert out.kl.item() > 0
    cls = -np_log_softmax(logits)[np.arange(4), y.numpy()].mean()
    assert out.classification.item() == pytest.approx(cls, rel=1e-5)
    assert out.loss.item() == pytest.approx(cls + 2.0 * kl.mean(), rel=1e-4)
    terms = out.terms()
    assert set(terms) == set(GUIDED_TERMS) and terms["guided_fraction"] == 1.0


def test_terms_by_hand():
    sal = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    assert top_share_mask(sal, 0.35).tolist() == [[[1.0, 1.0], [0.0, 0.0]]]  # ceil(1.4) = 2 positions
    assert top_share_mask(sal, 0.25).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert top_share_mask(sal, 1.0).sum() == 4
    ties = torch.tensor([[[2.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    assert top_share_mask(ties, 0.25).tolist() == [[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]
    with pytest.raises(ValueError, match="r must be in"):
        top_share_mask(sal, 0.0)
    lc = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    lp = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert saliency_suppression_loss(lc, lp, mask).item() == pytest.approx(1.0 / 3.0)  # (0.5 + 0.5) / 3
    assert saliency_suppression_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), mask).item() == 0.0
    # a flat saliency is uniform after the softmax: CE = log(4) whatever the target
    assert saliency_cross_entropy(torch.zeros(1, 2, 2), torch.rand(1, 2, 2)).item() == pytest.approx(math.log(4))
    # all mass of the target on one position: CE = -log softmax there
    ce = saliency_cross_entropy(lc, torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])).item()
    assert ce == pytest.approx(-math.log(1.0 / (math.e + math.exp(0.5) + 2.0)))
    assert minmax_normalize(torch.full((1, 2, 2), 3.0)).abs().sum() == 0
    assert minmax_normalize(torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])).tolist() == [[[0.0, 0.5], [0.25, 1.0]]]
    const = torch.full((1, 3, 4, 4), 2.0)
    torch.testing.assert_close(smooth_feature_maps(const, 1.0), const)


def test_slices_without_saliency_get_no_guidance():
    net = tiny_net(1)
    with torch.no_grad():
        net.fc.weight[0] = 0.0  # class 0 does not depend on the layer: L^c == 0
    est = IBA.fit_estimator(net, torch.randn(32, 1, 3, 3), layer="conv")
    out = IBSaliencyGuidedLoss(net, estimator=est)(torch.randn(2, 1, 3, 3), torch.tensor([0, 1]))
    assert out.guided.tolist() == [False, True]
    assert out.guidance[0] == 0
    torch.testing.assert_close(out.activation_target[0], out.activation[0])
    assert not torch.equal(out.activation_target[1], out.activation[1])


def test_bad_arguments():
    net = tiny_net()
    est = IBA.fit_estimator(net, torch.randn(8, 1, 3, 3), layer="conv")
    with pytest.raises(ValueError, match="r must be in"):
        IBSaliencyGuidedLoss(net, estimator=est, r=1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        IBSaliencyGuidedLoss(net, estimator=est, alpha=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        IBSaliencyGuidedLoss(net)
    guide = IBSaliencyGuidedLoss(net, estimator=est)
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        guide(torch.randn(2, 1, 3, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="class out of range"):
        guide(torch.randn(2, 1, 3, 3), torch.tensor([0, 5]))
    with pytest.raises(TypeError):
        GuidedIteration(object())


# ------------------------------------------------------------------------------------------------
def synthetic_slices(n: int = 32, size: int = 96, seed: int = 0) -> list[dict]:
    """Noisy slices; label 1 slices hold a bright disc at a random place."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for i in range(n):
        img = 0.1 * torch.randn(1, size, size, generator=g)
        label = i % 2
        if label:
            cy, cx = (torch.randint(16, size - 16, (2,), generator=g)).tolist()
            img[0][(yy - cy) ** 2 + (xx - cx) ** 2 < 100] += 1.0
        items.append({"image": img, "label": torch.tensor(label)})
    return items


def small_densenet_guide() -> tuple[nn.Module, list[dict], IBSaliencyGuidedLoss]:
    """A small seeded MONAI DenseNet, the synthetic slices and a guided loss at its last block."""
    torch.manual_seed(0)
    net = DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                   block_config=(2, 2, 2, 2))
    data = synthetic_slices()
    est = IBA.fit_estimator(net, torch.stack([d["image"] for d in data]), layer="features.denseblock4")
    return net, data, IBSaliencyGuidedLoss(net, estimator=est)


def test_guided_steps_in_the_monai_trainer_lower_the_loss():
    net, data, guide = small_densenet_guide()
    images = torch.stack([d["image"] for d in data])
    labels = torch.stack([d["label"] for d in data])
    assert guide.target_layer == "features.denseblock4"
    before_loss = guide(images, labels).loss.item()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=loader, network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=3e-3), loss_function=nn.CrossEntropyLoss(),
        iteration_update=GuidedIteration(guide), train_handlers=[StatsHandler(output_transform=guided_terms)])
    counts = dict.fromkeys(("forward", "loss", "backward", "model"), 0)
    for name, event in (("forward", IterationEvents.FORWARD_COMPLETED), ("loss", IterationEvents.LOSS_COMPLETED),
                        ("backward", IterationEvents.BACKWARD_COMPLETED), ("model", IterationEvents.MODEL_COMPLETED)):
        trainer.add_event_handler(event, lambda _e, n=name: counts.__setitem__(n, counts[n] + 1))
    trainer.run()

    assert counts == dict.fromkeys(counts, 12)  # 3 epochs x 4 batches
    terms = guided_terms(trainer.state.output)
    assert set(terms) == set(GUIDED_TERMS) and all(math.isfinite(v) for v in terms.values())
    assert terms["loss_kl"] > 0 and terms["guided_fraction"] > 0
    changed = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("features.denseblock4") for k in changed) and "class_layers.out.weight" in changed
    for k, v in net.state_dict().items():  # eval-mode steps: the batch norm statistics are not updated
        if "running_" in k:
            torch.testing.assert_close(v, before[k])
    after_loss = guide(images, labels).loss.item()
    assert after_loss < before_loss


def test_raw_maps_are_the_attributor_maps_before_upsampling():
    torch.manual_seed(0)
    net = DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                   block_config=(2, 2, 2, 2)).eval()
    x = torch.stack([d["image"] for d in synthetic_slices(4)])
    est = IBA.fit_estimator(net, x, layer="features.denseblock4")
    for method in (HiResCAM(net), IBA(net, "features.denseblock4", est)):
        raw = method.raw_maps(x, target=1)
        assert raw.shape == (4, 1, 3, 3)
        up = torch.nn.functional.interpolate(raw, size=(96, 96), mode="bilinear", align_corners=False)
        torch.testing.assert_close(up, method(x, target=1))


def test_guided_steps_update_only_the_trainable_parameters():
    """With ``trainable_parameters`` the guided steps move the last block and the head only."""
    net, data, guide = small_densenet_guide()
    prefixes = ["features.denseblock4", "class_layers"]
    params = trainable_parameters(net, prefixes)
    names = {id(p): n for n, p in net.named_parameters()}
    assert params and all(names[id(p)].split(".")[0] == "class_layers" or names[id(p)].startswith(prefixes[0])
                          for p in params)
    assert len(trainable_parameters(net)) == len(list(net.parameters()))
    # from a layer on: that block and everything registered after it (norm5, the head)
    tail = {names[id(p)] for p in trainable_parameters(net, start="features.denseblock4")}
    assert tail == {n for n, _ in net.named_parameters()
                    if n.startswith(("features.denseblock4.", "features.norm5.", "class_layers."))}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
                      optimizer=torch.optim.Adam(params, lr=3e-3), loss_function=nn.CrossEntropyLoss(),
                      iteration_update=GuidedIteration(guide)).run()
    changed = {k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert any(k.startswith("features.denseblock4.") for k in changed) and "class_layers.out.weight" in changed
    assert all(k.startswith(("features.denseblock4.", "class_layers.")) for k in changed), sorted(changed)
    with pytest.raises(ValueError, match="no parameter of the network is named 'features.block9'"):
        trainable_parameters(net, ["features.block9"])
    with pytest.raises(ValueError, match="no parameter of the network is named 'head'"):
        trainable_parameters(net, start="head")
