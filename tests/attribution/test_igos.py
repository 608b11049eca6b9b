"""I-GOS and iGOS++ (monai_ext.attribution.igos).

The localization tests use a toy classifier with hand-set weights whose class depends only on a
known region, the ROI (rows 32-56, columns 8-56 of a 64 x 64 image): a centre-surround filter
(bright spots on a darker surround) with ReLU thresholds, average-pooled to an 8 x 8 feature map,
scored only on the two halves of the ROI: part A (left) and part K (right). The class-1 logit is
``8 / 0.9 * min(zA, zK) - 5`` with zA, zK the normalized pooled responses (zK = 0.9 at the
images): both parts are needed (deleting either one kills the score) and K is the "critical" part
(the minimum). The images hold a small spot in A, a larger one in K, and four distractor spots
outside the ROI that the model ignores.

This separates the methods the way the iGOS++ paper argues: a deletion-only mask (I-GOS) is
satisfied by removing the critical part K, and its gradients reach A only through the minimum,
so its map misses A and inserting pixels in its order restores the score late; iGOS++'s
insertion mask has to keep both parts. Grad-CAM, read at the coarse pooled layer, weights the
channels by their spatially averaged gradient and so highlights the distractors as much as the
ROI.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_ext.attribution import IGOS, IGOSPP, GradCAM
from monai_ext.attribution.igos import blur_baseline, gaussian_blur_kernel_size
from monai_ext.metrics import Insertion

SIZE = 64
ROI = (slice(32, 56), slice(8, 56))  # pixels the logits depend on (pooled cells rows 4-6, cols 1-6)
PART_A = (slice(32, 56), slice(8, 32))
PART_K = (slice(32, 56), slice(32, 56))
MASK = 16  # iGOS mask side for these 64-pixel images (4-pixel cells)


class ToyNet(nn.Module):
    """See the module docstring; ``norm_a``, ``norm_k`` scale the part responses."""

    def __init__(self, norm_a: float = 1.0, norm_k: float = 1.0, weight: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 4, 15, padding=7, padding_mode="replicate")
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(1, 2)
        wa = torch.zeros(1, 1, 8, 8)
        wa[..., 4:7, 1:4] = 1
        wk = torch.zeros(1, 1, 8, 8)
        wk[..., 4:7, 4:7] = 1
        self.register_buffer("wa", wa / norm_a)
        self.register_buffer("wk", wk / norm_k)
        with torch.no_grad():
            self.features.weight.fill_(-1 / 225)  # minus the 15 x 15 mean ...
            self.features.weight[:, :, 6:9, 6:9] += 1 / 9  # ... plus the 3 x 3 centre mean
            self.features.bias.copy_(-torch.tensor([0.1, 0.2, 0.3, 0.4]))
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[1, 0] = weight
            self.fc.bias[1] = -bias

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pool(self.act(self.features(x)))
        return (p * self.wa).sum((1, 2, 3)), (p * self.wk).sum((1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        za, zk = self.parts(x)
        return self.fc(torch.minimum(za, zk).unsqueeze(1))


def _blob(img: torch.Tensor, cy: int, cx: int, r: int = 5) -> None:
    yy, xx = torch.meshgrid(torch.arange(img.shape[-2]), torch.arange(img.shape[-1]), indexing="ij")
    img[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0


def toy_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 64, 64): textured background, a spot in A (r 3), one in K (r 5), four distractors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = 0.1 + 0.05 * torch.rand(1, SIZE, SIZE, generator=g)
        cy, cx = torch.randint(40, 49, (2,), generator=g).tolist()
        _blob(img, cy, cx - 24, 3)
        cy, cx = torch.randint(40, 49, (2,), generator=g).tolist()
        _blob(img, cy, cx, 5)
        for c in (8, 24, 40, 56):
            _blob(img, int(torch.randint(10, 19, (1,), generator=g)), c + int(torch.randint(-2, 3, (1,), generator=g)))
        out.append(img)
    return torch.stack(out)


def make_toy() -> ToyNet:
    """The toy with its part responses normalized on ``toy_images(4)``: zA = 1, zK = 0.9."""
    with torch.no_grad():
        za, zk = ToyNet().parts(toy_images(4))
    return ToyNet(float(za.mean()), float(zk.mean()) / 0.9, 8 / 0.9, 5.0).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """These small models run faster (and far more steadily on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    return make_toy()


@pytest.fixture(scope="module")
def toy_x():
    return toy_images(3)


@pytest.fixture(scope="module")
def igospp_run(toy, toy_x):
    torch.set_num_threads(1)
    att = IGOSPP(toy, mask_size=MASK)
    maps = att(toy_x, target=1)
    return att, maps


def _roi_mask() -> torch.Tensor:
    roi = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    roi[ROI] = True
    return roi


# ------------------------------------------------------------------------------------------
def test_toy_model_depends_on_roi_only(toy, toy_x):
    def p1(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(toy(x), 1)[:, 1]

    p = p1(toy_x)
    assert (p > 0.9).all()
    outside = toy_x.clone()
    outside[..., :28, :] = 0.12  # remove the distractors
    torch.testing.assert_close(p1(outside), p)
    for part in (PART_A, PART_K):  # both parts are needed
        x = toy_x.clone()
        x[..., part[0], part[1]] = 0.12
        assert (p1(x) < 0.05).all()
    assert (p1(blur_baseline(toy_x)) < 0.05).all()


def test_igospp_localizes_the_evidence(igospp_run):
    att, maps = igospp_run
    assert maps.shape == (3, 1, SIZE, SIZE)
    k = int(0.05 * SIZE * SIZE)
    top = maps.flatten(1).topk(k, dim=1).indices
    share = _roi_mask().flatten()[top].float().mean(dim=1)
    assert float(share.mean()) >= 0.8, share
    assert float(share.min()) >= 0.6, share


def test_igospp_insertion_beats_igos_and_gradcam(toy, toy_x, igospp_run):
    _, maps_pp = igospp_run
    maps_igos = IGOS(toy, mask_size=MASK)(toy_x, target=1)
    maps_cam = GradCAM(toy, target_layer="pool")(toy_x, target=1)
    insertion = Insertion(n_steps=32, baseline=blur_baseline(toy_x))  # the baseline the iGOS methods perturb with
    auc = {name: insertion(toy_x, m, model=toy, target=1).scores
           for name, m in (("igospp", maps_pp), ("igos", maps_igos), ("gradcam", maps_cam))}
    assert float(auc["igospp"].mean()) > float(auc["igos"].mean()) + 0.1, auc
    assert float(auc["igospp"].mean()) > float(auc["gradcam"].mean()) + 0.05, auc
    assert (auc["igospp"] > auc["igos"]).all() and (auc["igospp"] > auc["gradcam"]).all(), auc
    # the project's default insertion (RISE blur, sigma 5) agrees
    default = Insertion(n_steps=32)
    pp, cam = (default(toy_x, m, model=toy, target=1).scores.mean() for m in (maps_pp, maps_cam))
    assert float(pp) > float(cam), (pp, cam)


def test_line_search_never_increases_the_objective_and_masks_stay_in_range(igospp_run):
    att, maps = igospp_run
    h = att.history_
    assert h.shape == (3, att.iterations, 2)
    assert (h[..., 1] <= h[..., 0] + 1e-9).all()
    assert (h[:, -1, 1] < h[:, 0, 0]).all()  # and it does decrease over the run
    assert torch.equal(att.objective_, h[:, -1, 1])
    assert (att.steps_ >= 0).all() and (att.steps_ > 0).any()
    assert att.masks_.shape == (3, 2, MASK, MASK)
    assert att.masks_.min() >= 0 and att.masks_.max() <= 1
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.equal(att.target_, torch.ones(3, dtype=torch.long))


def test_igos_line_search_and_range(toy, toy_x):
    att = IGOS(toy, iterations=4, ig_steps=8)
    maps = att(toy_x[:2], target=1)
    assert (att.history_[..., 1] <= att.history_[..., 0] + 1e-9).all()
    assert att.masks_.shape == (2, 1, 7, 7)
    assert att.masks_.min() >= 0 and att.masks_.max() <= 1
    assert maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("cls", [IGOS, IGOSPP])
def test_deterministic_for_a_seed(toy, toy_x, cls):
    kwargs = dict(iterations=3, ig_steps=6)
    a = cls(toy, seed=3, **kwargs)(toy_x[:2], target=1)
    b = cls(toy, seed=3, **kwargs)(toy_x[:2], target=1)
    c = cls(toy, seed=4, **kwargs)(toy_x[:2], target=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("cls", [IGOS, IGOSPP])
def test_batch_of_8_equals_8_single_runs(toy, cls):
    x = toy_images(8, seed=1)
    att = cls(toy, iterations=3, ig_steps=6, chunk_size=20)
    batched = att(x, target=1)
    hist = att.history_.clone()
    singles = []
    for i in range(8):
        singles.append(att(x[i:i + 1], target=1))
        assert torch.allclose(att.history_, hist[i:i + 1], atol=1e-6)
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-4, rtol=0)
    if cls is IGOS:  # the base class's batch_size splits the call; the diagnostics cover the whole batch
        split = cls(toy, iterations=3, ig_steps=6, chunk_size=20, batch_size=3)
        torch.testing.assert_close(split(x, target=1), batched, atol=1e-4, rtol=0)
        assert split.history_.shape == hist.shape
        torch.testing.assert_close(split.history_, hist, atol=1e-6, rtol=0)


def test_integrated_gradient_is_the_gradient_of_the_path_objective(toy, toy_x):
    """Without noise, I-GOS's direction is the exact gradient of the objective the line search uses."""
    att = IGOS(toy, noise_std=0.0, ig_steps=5)
    x = toy_x[:1]
    ctx = att._context(x, 1, None, None)
    idx = torch.arange(1)
    masks = torch.full((1, 1, 7, 7), 0.6) + 0.3 * torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    obj, direction = att._evaluate(ctx, masks, idx, None, 1.0, grad=True)
    assert torch.allclose(obj, att._evaluate(ctx, masks, idx, None, 1.0, grad=False)[0])
    eps = 1e-2
    for cell in [(2, 2), (3, 3), (1, 2), (5, 5)]:
        plus, minus = masks.clone(), masks.clone()
        plus[0, 0, cell[0], cell[1]] += eps
        minus[0, 0, cell[0], cell[1]] -= eps
        fd = (att._evaluate(ctx, plus, idx, None, 1.0, grad=False)[0]
              - att._evaluate(ctx, minus, idx, None, 1.0, grad=False)[0]) / (2 * eps)
        assert abs(float(fd) - float(direction[0, 0, cell[0], cell[1]])) < 2e-3 + 0.02 * abs(float(fd))


def test_lung_mask_keeps_the_image_outside_the_lung(toy, toy_x):
    seen = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = toy

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return self.net(x)

    lung = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    lung[..., :40, :40] = True
    x = toy_x[:2]
    maps = IGOSPP(Spy(), iterations=2, ig_steps=4, noise_std=0.0)(x, target=1, lung_mask=lung)
    assert maps.shape == (2, 1, SIZE, SIZE)
    outside = ~lung[0, 0]
    images = torch.cat(seen)  # every image the model saw: the input, path points, candidates
    assert images.shape[0] > 2
    ref = x[0, 0][outside]
    assert any(torch.equal(img[0][outside], ref) for img in images)
    for img in images:
        assert torch.equal(img[0][outside], x[0, 0][outside]) or torch.equal(img[0][outside], x[1, 0][outside])


def test_lung_mask_is_split_with_the_batch(toy, toy_x):
    """Per-sample call arguments follow the base class's batch_size chunks."""
    lung = torch.zeros(3, 1, SIZE, SIZE, dtype=torch.bool)
    lung[0, :, 30:, :] = True
    lung[1, :, :, :40] = True
    lung[2] = True
    kwargs = dict(iterations=2, ig_steps=4)
    whole = IGOS(toy, **kwargs)(toy_x, target=1, lung_mask=lung)
    split = IGOS(toy, batch_size=1, **kwargs)(toy_x, target=1, lung_mask=lung)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    shared = IGOS(toy, batch_size=2, **kwargs)(toy_x, target=1, lung_mask=lung[2:])  # one mask for all
    torch.testing.assert_close(shared, IGOS(toy, **kwargs)(toy_x, target=1), atol=1e-5, rtol=0)


def test_runs_on_monai_densenet121():
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    net.train()  # the call must use eval mode and give the mode back
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    storage = [p.data_ptr() for p in net.parameters()]
    x = torch.rand(2, 1, 64, 64)
    for cls in (IGOS, IGOSPP):
        att = cls(net, iterations=2, ig_steps=4)  # channels_last by default
        maps = att(x, target=torch.tensor([1, 0]))
        assert maps.shape == (2, 1, 64, 64) and maps.dtype == torch.float32
        assert torch.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1
        assert (att.history_[..., 1] <= att.history_[..., 0] + 1e-9).all()
    assert net.training
    assert all(p.requires_grad and p.grad is None for p in net.parameters())  # frozen only during the call
    assert [p.data_ptr() for p in net.parameters()] == storage  # the channels-last copies are gone
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())  # BN statistics untouched


def test_bfloat16_runs_the_folded_model_in_bfloat16():
    """``autocast_dtype="bfloat16"``: the folded DenseNet computed in bfloat16; objectives close to the
    float32 ones for the same masks, the model left as it was."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    fp32 = IGOSPP(net, iterations=2, ig_steps=4)
    bf16 = IGOSPP(net, iterations=2, ig_steps=4, autocast_dtype="bfloat16")
    assert bf16.autocast_dtype is torch.bfloat16
    maps = bf16(x, target=1)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1
    assert (bf16.history_[..., 1] <= bf16.history_[..., 0] + 1e-9).all()  # bfloat16 objective, monotone
    masks = bf16.masks_
    torch.testing.assert_close(bf16.objective(x, masks, target=1), fp32.objective(x, masks, target=1),
                               atol=0.03, rtol=0)
    assert all(torch.equal(v, weights[k]) and v.dtype == weights[k].dtype for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------------
def test_defaults_relative_to_input_size(toy):
    att = IGOSPP(toy)
    assert att.resolved_mask_size((256, 256)) == (28, 28)
    assert att.resolved_mask_size((512, 384)) == (56, 42)
    assert att.resolved_l1((256, 256)) == 1.0
    full = IGOSPP(toy, mask_size=64)
    assert full.resolved_l1((64, 64)) == 10.0
    assert (att.iterations, att.ig_steps, att.l2) == (15, 20, 20.0)


def test_blur_baseline():
    assert gaussian_blur_kernel_size(224) == 51
    assert gaussian_blur_kernel_size(256) == 59
    flat = torch.full((1, 2, 32, 32), 0.3)
    torch.testing.assert_close(blur_baseline(flat), flat)
    x = torch.full((1, 1, 64, 64), 0.1)
    _blob(x[0], 32, 32)
    b = blur_baseline(x)
    assert b.shape == x.shape
    # kernel 15 px (0.23 * 64, odd), std 14 px: by hand at the centre, away from the borders
    k = torch.exp(-((torch.arange(15) - 7.0) ** 2) / (2 * 14.0**2))
    k = k / k.sum()
    expected = (k.view(-1, 1) * k.view(1, -1) * x[0, 0, 25:40, 25:40]).sum()
    torch.testing.assert_close(b[0, 0, 32, 32], expected)
    assert float(b[0, 0, 32, 32]) < 0.5  # the blob is smeared out
    torch.testing.assert_close(b.mean(), x.mean(), atol=0.01, rtol=0)


def test_invalid_settings_and_inputs(toy, toy_x):
    for kwargs in (dict(iterations=-1), dict(ig_steps=0), dict(step_shrink=1.0), dict(step_min=0.0),
                   dict(mask_size=0), dict(mask_size=(4, 4, 4)), dict(mask_size=2.5), dict(chunk_size=0), dict(l1=-1.0),
                   dict(autocast_dtype=torch.float64)):
        with pytest.raises(ValueError):
            IGOSPP(toy, **kwargs)
    att = IGOSPP(toy, iterations=1, ig_steps=2)
    with pytest.raises(ValueError, match="larger than the input"):
        IGOSPP(toy, mask_size=128)(toy_x[:1])
    with pytest.raises(ValueError, match="lung_mask"):
        att(toy_x[:2], lung_mask=torch.ones(2, 1, 32, 32))
    with pytest.raises(ValueError, match="baseline"):
        att(toy_x[:2], baseline=torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError):
        att(toy_x[0])
