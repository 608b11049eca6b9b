"""I-GOS and iGOS++: saliency masks optimized with integrated gradients, batched over slices.

Both methods explain the class score ``f`` of a classifier by optimizing low-resolution masks over
the input. A mask ``M`` (1 keeps a pixel, 0 replaces it by the baseline) acts through the
perturbation ``phi(I, I~, M) = I * M + I~ * (1 - M)`` with ``I~`` a strongly blurred copy of the
image. The descent direction is the *integrated gradient* of the mask objective: the gradient of the
score averaged over ``S`` points of the straight path from the baseline to the perturbed image,
which avoids the adversarial, noisy masks plain gradients produce. The step is chosen per sample
by a backtracking line search with the Armijo condition, evaluated on that same path average.

- :class:`IGOS` (Qi, Khorram, Fuxin, AAAI 2020) optimizes one deletion mask with an L1 and a
  total-variation penalty.
- :class:`IGOSPP` (Khorram, Lawson, Fuxin, ACM CHIL 2021) optimizes a deletion mask ``Mx`` and an
  insertion mask ``My`` together ("bilateral perturbations"), regularizes their product with L1 and
  a bilateral total variation that lets the mask follow image edges, and returns ``1 - Mx * My``.

Unlike the reference code (one image at a time, loops over samples for the gradients, one line
search for the whole batch), the implementation here evaluates all ``B * terms * S`` path images
of a batch of slices as a few large forward/backward passes (chunked to bound memory) and runs
one line search per slice, batched over the slices that are still searching. A slice's result does
not depend on the other slices of the batch: every reduction is per sample, the noise is drawn
with the shape of one sample from a generator seeded with ``seed`` (so every slice sees the same
noise whatever the batch), and each slice has its own step size.

Deviations from the reference implementation (github.com/khorrams/IGOS_pp), and why:

- *Noise*: the reference draws fresh noise for every evaluation, so its line search compares
  objective values under different noise and its Armijo test is a coin toss near convergence.
  Here the noise is drawn once per call (``S`` draws per noisy path, so every path still averages
  over ``S`` noisy images) and kept: the objective is a fixed function of the masks, the Armijo
  test is exact, the objective history is monotone, and a slice whose line search fails is
  converged and skipped from then on. Following the method description, noise is added to the
  images of the separate-mask terms only (``Mx`` and ``My``; I-GOS's single mask); the combined-
  mask terms of iGOS++ are noise-free (the reference adds noise to every term). The noise std is
  ``noise_std`` times the image's own intensity std: the reference's 0.2 is in units of
  ImageNet-normalized pixels (image std about 1); in absolute units it would drown a [0, 1]-windowed
  CT slice (std about 0.3).
- *Line search failure*: when no step down to ``step_min`` satisfies the Armijo condition the
  reference applies the last (tiny) step anyway; here the masks are left unchanged (step 0), so the
  objective never increases.
- *Line-search start* (``warm_start=True``, default): the first iteration starts at ``step_init``
  as the reference does at every iteration; later iterations start at the step accepted at the
  previous iteration (times ``1 / step_shrink`` after two consecutive first-try acceptances, capped
  at ``step_init``). That first candidate is evaluated with its descent direction (one
  forward/backward pass); when it is accepted, the common case, the pass also gives the next
  iteration's direction, so an iteration costs one forward/backward pass of ``terms * S`` images
  instead of one plus several forward passes. ``warm_start=False`` restores the reference's
  search (from ``step_init`` at every iteration, forward-only candidates).
- *Reused evaluations*: the objective at the current masks, the line search's reference value,
  comes from the scores of the gradient pass instead of another forward pass.
- *Blur baseline*: a separable Gaussian with reflect-101 borders (as OpenCV's ``GaussianBlur``),
  kernel side ``blur_ratio * size`` rounded to odd (51 px for a 224 input in the reference, 59 px
  for 256) and standard deviation ``kernel - 1`` as in the reference.
- *Bilateral weights*: ``exp(-|dI|^2 / sigma)`` with ``sigma = 0.01`` exactly as the reference
  code computes it (the paper writes ``sigma^2`` in the denominator), with ``|dI|^2`` averaged over
  the input channels.
- *Lung restriction* (new): with a ``lung_mask`` the baseline equals the image outside the lung,
  so the perturbation, hence the explanation, can only change lung pixels.

Reference: Z. Qi, S. Khorram, L. Fuxin, "Visualizing deep networks by optimizing with integrated
gradients", AAAI 2020; S. Khorram, T. Lawson, L. Fuxin, "iGOS++: Integrated gradient optimized
saliency by bilateral perturbations", ACM CHIL 2021.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from torch import nn

from monai_ext.attribution.base import Attributor, select_target
from monai_ext.attribution.base import autocast_dtype as _autocast_dtype
from monai_ext.attribution.folding import fold_model

__all__ = ["IGOS", "IGOSPP", "blur_baseline", "gaussian_blur_kernel_size"]

#: mask side for a 256-pixel input side (the default mask size is proportional to the input)
_MASK_PER_256 = 28
#: blur kernel side relative to the image side (51 px for 224 px in the reference code)
_BLUR_RATIO = 51 / 224


def gaussian_blur_kernel_size(size: int, ratio: float = _BLUR_RATIO) -> int:
    """Odd kernel side ``round(ratio * size)`` (at least 3, at most ``2 * size - 1``)."""
    k = max(3, int(round(ratio * size)))
    if k % 2 == 0:
        k += 1
    return min(k, 2 * size - 1) if size > 1 else 1


def _gaussian_kernel(k: int, sigma: float) -> torch.Tensor:
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return (w / w.sum()).float()


def blur_baseline(x: torch.Tensor, ratio: float = _BLUR_RATIO, sigma: float | None = None) -> torch.Tensor:
    """The blurred baseline of I-GOS / iGOS++: a strong Gaussian blur of each image.

    The kernel side is ``ratio * size`` (per spatial dimension, rounded to odd), its standard
    deviation ``kernel - 1`` unless ``sigma`` is given, borders reflected (reflect-101), as
    ``cv2.GaussianBlur(image, (51, 51), 50)`` for the reference's 224-pixel inputs.

    Args:
        x: (B, C, H, W) images.
        ratio: kernel side relative to the image side.
        sigma: standard deviation in pixels; ``None`` for ``kernel - 1``.

    Returns:
        the blurred images, shaped and placed like ``x``.

    Raises:
        ValueError: if ``x`` is not 4D or ``ratio`` / ``sigma`` is not positive.

    Example::

        base = blur_baseline(slices)  # 59x59 kernel, std 58 px for 256x256 slices
    """
    if x.ndim != 4:
        raise ValueError(f"blur_baseline expects (B, C, H, W), got {tuple(x.shape)}")
    if not ratio > 0 or (sigma is not None and not sigma > 0):
        raise ValueError(f"blur ratio and sigma must be > 0, got {ratio} and {sigma}")
    kernels = []
    for n in x.shape[-2:]:
        k = gaussian_blur_kernel_size(int(n), ratio)
        kernels.append(_gaussian_kernel(k, float(k - 1) if sigma is None else float(sigma)) if k > 1
                       else torch.ones(1))
    return separable_filtering(x.float(), [k.to(x.device) for k in kernels], mode="reflect").to(x.dtype)


@dataclass
class _Term:
    """One score term of the objective: ``sign * mean_k f(path image k)``."""

    masks: tuple[int, ...]  # indices of the masks whose (upsampled) product perturbs the image
    deletion: bool  # deletion path (baseline -> phi(M)) or insertion path (image -> phi(1 - M))
    noise: int  # index of its noise draw, -1 for none
    sign: float


@dataclass
class _Context:
    """Per-call constants (one row per sample)."""

    x: torch.Tensor  # (B, C, H, W) images
    start: torch.Tensor  # (B, 2, C, H, W): [deletion start = baseline, insertion start = image]
    delta: torch.Tensor  # (B, C, H, W): image - baseline (0 outside the lung)
    target: torch.Tensor  # (B,) classes
    edge_v: torch.Tensor | None  # (B, 1, H-1, W) bilateral weights, vertical neighbours
    edge_h: torch.Tensor | None  # (B, 1, H, W-1) bilateral weights, horizontal neighbours
    noise_scale: torch.Tensor  # (B,) noise std of each sample: noise_std * the image's std
    size: tuple[int, int]  # input (H, W)


class _IntegratedGradientMasks(Attributor):
    """Shared machinery of :class:`IGOS` and :class:`IGOSPP` (see the module docstring)."""

    #: number of masks optimized
    n_masks: int = 1
    #: score terms of the objective
    terms: tuple[_Term, ...] = ()
    #: factor on the score-term gradients in the descent direction
    score_grad_scale: float = 1.0

    def __init__(self, model: nn.Module, mask_size: int | Sequence[int] | None = None, iterations: int = 15,
                 ig_steps: int = 20, l1: float | None = None, l2: float = 20.0, step_init: float = 1000.0,
                 step_shrink: float = 0.2, step_min: float = 1e-5, armijo: float = 1e-4, warm_start: bool = True,
                 noise_std: float = 0.2, blur_ratio: float = _BLUR_RATIO, blur_sigma: float | None = None,
                 tv_beta: float = 2.0, bilateral_sigma: float = 0.01, seed: int = 0, chunk_size: int = 16,
                 channels_last: bool = True, autocast_dtype: torch.dtype | str | None = None,
                 batch_size: int | None = None, fold_batchnorm: bool = True) -> None:
        if mask_size is not None:
            try:
                ms = (int(mask_size),) * 2 if isinstance(mask_size, int) else tuple(int(v) for v in mask_size)
            except (TypeError, ValueError):
                ms = ()
            if len(ms) != 2 or min(ms) < 1 or isinstance(mask_size, bool):
                raise ValueError(f"mask_size must be a positive int or (h, w), got {mask_size!r}")
            mask_size = ms
        autocast_dtype = _autocast_dtype(autocast_dtype)
        settings = dict(mask_size=mask_size, iterations=int(iterations), ig_steps=int(ig_steps),
                        l1=None if l1 is None else float(l1), l2=float(l2), step_init=float(step_init),
                        step_shrink=float(step_shrink), step_min=float(step_min), armijo=float(armijo),
                        warm_start=bool(warm_start), noise_std=float(noise_std), blur_ratio=float(blur_ratio),
                        blur_sigma=None if blur_sigma is None else float(blur_sigma), tv_beta=float(tv_beta),
                        bilateral_sigma=float(bilateral_sigma), seed=int(seed), chunk_size=int(chunk_size),
                        channels_last=bool(channels_last), autocast_dtype=autocast_dtype,
                        fold_batchnorm=bool(fold_batchnorm))
        checks = {
            "iterations": iterations >= 0,
            "ig_steps": ig_steps >= 1,
            "l1": l1 is None or l1 >= 0,
            "l2": l2 >= 0,
            "step_init": step_init > 0,
            "step_shrink": 0 < step_shrink < 1,
            "step_min": 0 < step_min <= step_init,
            "armijo": 0 <= armijo < 1,
            "noise_std": noise_std >= 0,
            "blur_ratio": blur_ratio > 0,
            "blur_sigma": blur_sigma is None or blur_sigma > 0,
            "tv_beta": tv_beta >= 1,
            "bilateral_sigma": bilateral_sigma > 0,
            "chunk_size": chunk_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{type(self).__name__}: invalid " + ", ".join(f"{k}={settings[k]!r}" for k in bad))
        super().__init__(model, target_layer=None, upsample_mode="bilinear", batch_size=batch_size, **settings)
        self.mask_size: tuple[int, int] | None = mask_size
        self.iterations = settings["iterations"]
        self.ig_steps = settings["ig_steps"]
        self.l1 = settings["l1"]
        self.l2 = settings["l2"]
        self.step_init = settings["step_init"]
        self.step_shrink = settings["step_shrink"]
        self.step_min = settings["step_min"]
        self.armijo = settings["armijo"]
        self.warm_start = settings["warm_start"]
        self.noise_std = settings["noise_std"]
        self.blur_ratio = settings["blur_ratio"]
        self.blur_sigma = settings["blur_sigma"]
        self.tv_beta = settings["tv_beta"]
        self.bilateral_sigma = settings["bilateral_sigma"]
        self.seed = settings["seed"]
        self.chunk_size = settings["chunk_size"]
        self.channels_last = settings["channels_last"]
        self.autocast_dtype = autocast_dtype
        self.fold_batchnorm = settings["fold_batchnorm"]
        self._fast: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: after a call: (B, n_masks, h, w) optimized masks
        self.masks_: torch.Tensor | None = None
        #: after a call: (B, iterations, 2) objective before / after each iteration's step (same noise)
        self.history_: torch.Tensor | None = None
        #: after a call: (B, iterations) accepted step sizes (0 where the line search found none)
        self.steps_: torch.Tensor | None = None
        #: after a call: (B,) objective after the last step
        self.objective_: torch.Tensor | None = None
        #: after a call: (B,) objective evaluations per sample (each ``terms * S`` forward passes)
        self.evaluations_: torch.Tensor | None = None
        #: after a call: (B,) of those, the evaluations with a backward pass (descent directions)
        self.grad_passes_: torch.Tensor | None = None
        #: after a call: (B,) classes explained
        self.target_: torch.Tensor | None = None
        self._parts: list[dict[str, torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------------------
    # settings resolved against the input
    def resolved_mask_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The mask resolution for an input of spatial ``size`` (H, W).

        Raises:
            ValueError: if the configured mask is larger than the input.
        """
        if self.mask_size is None:
            return tuple(max(1, int(round(_MASK_PER_256 * s / 256))) for s in size)  # type: ignore[return-value]
        if self.mask_size[0] > size[0] or self.mask_size[1] > size[1]:
            raise ValueError(f"mask_size {self.mask_size} is larger than the input {size}")
        return self.mask_size

    def resolved_l1(self, size: tuple[int, int]) -> float:
        """L1 weight: the configured one, else 10 at full resolution and 1 otherwise."""
        if self.l1 is not None:
            return float(self.l1)
        return 10.0 if self.resolved_mask_size(size) == tuple(size) else 1.0

    # ----------------------------------------------------------------------------------------
    def attribute(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None,
                  lung_mask: torch.Tensor | None = None, baseline: torch.Tensor | None = None) -> torch.Tensor:
        """Optimize the masks of the batch ``x`` and return ``1 - (product of masks)`` at input size.

        Args:
            x: (B, C, H, W) images.
            target: class per sample, one class for all, or ``None`` for the predicted class.
            lung_mask: optional (B, 1, H, W), (B, H, W) or (1, 1, H, W) mask (bool or 0/1); the
                image is perturbed only inside it.
            baseline: optional (B, C, H, W) baseline replacing the blurred copy.

        Returns:
            (B, 1, H, W) float map in [0, 1], high where the evidence is.

        Raises:
            ValueError: for a lung mask or baseline of the wrong shape, or a too large mask size.
        """
        size = (int(x.shape[-2]), int(x.shape[-1]))
        msize = self.resolved_mask_size(size)
        l1 = self.resolved_l1(size)
        with self._memory_format():
            ctx = self._context(x, target, lung_mask, baseline)
            diag = self._optimize(ctx, msize, l1)
        if self._parts is not None:  # inside __call__: joined over the batch chunks at the end
            self._parts.append(diag)
        else:
            self._set_diagnostics([diag])
        with torch.no_grad():
            return (1.0 - self._upsample(self._combined(diag["masks"]), size)).clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
                 lung_mask: torch.Tensor | None = None, baseline: torch.Tensor | None = None) -> torch.Tensor:
        """Explain the batch ``x`` (B, C, H, W); see :meth:`attribute` for the arguments.

        Returns:
            (B, 1, H, W) float map in [0, 1] on ``x``'s device, high where the evidence is.
        """
        kwargs = {k: v for k, v in (("lung_mask", lung_mask), ("baseline", baseline)) if v is not None}
        self._parts = []
        try:
            maps = super().__call__(x, target, **kwargs)
            if self._parts:
                self._set_diagnostics(self._parts)
        finally:
            self._parts = None
        return maps

    def _set_diagnostics(self, parts: list[dict[str, torch.Tensor]]) -> None:
        def cat(key: str) -> torch.Tensor:
            return torch.cat([d[key] for d in parts], dim=0)

        self.masks_ = cat("masks")
        self.history_ = cat("history")
        self.steps_ = cat("steps")
        self.evaluations_ = cat("evaluations")
        self.grad_passes_ = cat("grad_passes")
        self.target_ = cat("target")
        self.objective_ = self.history_[:, -1, 1].clone() if self.iterations else \
            torch.full((self.history_.shape[0],), math.nan, dtype=torch.float64)

    # ----------------------------------------------------------------------------------------
    # building blocks
    @contextlib.contextmanager
    def _memory_format(self) -> Iterator[None]:
        """The model as the block runs it: with ``channels_last``, its 4D parameters in channels-last
        layout; with ``fold_batchnorm`` (and no autocast), computed by :func:`fold_model` from them.

        The original parameter tensors are put back afterwards, so the model is left exactly as
        it was (same storage, same values).
        """
        originals = [(p, p.data) for p in self.model.parameters() if p.ndim == 4] if self.channels_last else []
        try:
            for p, data in originals:
                p.data = data.contiguous(memory_format=torch.channels_last)
            if self.fold_batchnorm:
                # with autocast_dtype, the folded model computed in that dtype (no per-op casts)
                self._fast = fold_model(self.model, dtype=self.autocast_dtype)
            yield
        finally:
            self._fast = None
            for p, data in originals:
                p.data = data

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._fast is not None:
            return self._fast(x).float()
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                return self.model(x).float()
        return self.model(x).float()

    @staticmethod
    def _score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Softmax probability of the target class (sigmoid for a single-output model)."""
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1).gather(1, target.view(-1, 1)).squeeze(1)

    @staticmethod
    def _upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # bilinear with aligned corners, as torch.nn.UpsamplingBilinear2d in the reference code
        if tuple(m.shape[-2:]) == tuple(size):
            return m
        return F.interpolate(m, size=size, mode="bilinear", align_corners=True)

    @staticmethod
    def _combined(masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) product of the masks (``Mxy`` for iGOS++, ``M`` for I-GOS)."""
        return masks.prod(dim=1, keepdim=True)

    def _context(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None,
                 lung_mask: torch.Tensor | None, baseline: torch.Tensor | None) -> _Context:
        b, c, h, w = x.shape
        x = x.detach().float()
        if baseline is None:
            base = blur_baseline(x, self.blur_ratio, self.blur_sigma)
        else:
            if not isinstance(baseline, torch.Tensor) or tuple(baseline.shape) != tuple(x.shape):
                shape = tuple(baseline.shape) if isinstance(baseline, torch.Tensor) else type(baseline).__name__
                raise ValueError(f"baseline must have the shape of x {tuple(x.shape)}, got {shape}")
            base = baseline.detach().to(x)
        if lung_mask is not None:
            if not isinstance(lung_mask, torch.Tensor):
                raise ValueError(f"lung_mask must be a tensor, got {type(lung_mask).__name__}")
            lm = lung_mask.detach()
            if lm.ndim == 3:
                lm = lm.unsqueeze(1)
            if lm.ndim != 4 or lm.shape[1] != 1 or tuple(lm.shape[-2:]) != (h, w) or lm.shape[0] not in (1, b):
                raise ValueError(f"lung_mask must be (B, 1, H, W) = ({b}, 1, {h}, {w}) or (B, H, W), "
                                 f"got {tuple(lung_mask.shape)}")
            lm = lm.to(device=x.device, dtype=torch.float32).expand(b, 1, h, w)
            if bool(((lm < 0) | (lm > 1)).any()):
                raise ValueError("lung_mask values must be in [0, 1]")
            base = lm * base + (1 - lm) * x  # outside the lung the baseline is the image itself
        with torch.no_grad():
            logits = self._forward(x)
        tgt = select_target(logits, target)
        if logits.shape[-1] == 1 and bool((tgt != 0).any()):
            raise ValueError("a single-output model has only class 0")
        edge_v = edge_h = None
        if self.uses_bilateral:
            s = self.bilateral_sigma
            edge_v = torch.exp(-((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean(dim=1, keepdim=True) / s)
            edge_h = torch.exp(-((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean(dim=1, keepdim=True) / s)
        noise_scale = self.noise_std * x.reshape(b, -1).std(dim=1)
        return _Context(x=x, start=torch.stack([base, x], dim=1), delta=x - base, target=tgt, edge_v=edge_v,
                        edge_h=edge_h, noise_scale=noise_scale, size=(int(h), int(w)))

    #: whether the regularizer is the bilateral TV (iGOS++) or the plain TV (I-GOS)
    uses_bilateral: bool = False

    def _tv(self, m: torch.Tensor) -> torch.Tensor:
        """Per-sample total variation of (n, 1, h, w) masks: mean |dM|^beta over both directions."""
        beta = self.tv_beta
        n = m.shape[0]
        zero = m.new_zeros(n)
        a = (m[:, :, 1:, :] - m[:, :, :-1, :]).abs().pow(beta).reshape(n, -1).mean(1) if m.shape[2] > 1 else zero
        b = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta).reshape(n, -1).mean(1) if m.shape[3] > 1 else zero
        return a + b

    def _regularizer(self, ctx: _Context, masks: torch.Tensor, idx: torch.Tensor, l1: float) -> torch.Tensor:
        """Per-sample ``l1 * mean|1 - Mc| + l2 * (B)TV(Mc)`` of masks (n, n_masks, h, w) of samples ``idx``."""
        mc = self._combined(masks)
        n = mc.shape[0]
        reg = l1 * (1 - mc).abs().reshape(n, -1).mean(1)
        if self.l2 == 0:
            return reg
        tv = self._tv(mc)
        if self.uses_bilateral:
            beta = self.tv_beta
            up = self._upsample(mc, ctx.size)
            zero = up.new_zeros(n)
            ev, eh = ctx.edge_v[idx], ctx.edge_h[idx]  # type: ignore[index]
            bil_v = (ev * (up[:, :, 1:, :] - up[:, :, :-1, :]).abs().pow(beta)).reshape(n, -1).mean(1) \
                if up.shape[2] > 1 else zero
            bil_h = (eh * (up[:, :, :, 1:] - up[:, :, :, :-1]).abs().pow(beta)).reshape(n, -1).mean(1) \
                if up.shape[3] > 1 else zero
            tv = 0.5 * (tv + bil_v + bil_h)
        return reg + self.l2 * tv

    def _term_masks(self, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(n, T, 1, H, W) upsampled perturbation mask of each term (products of upsampled masks)."""
        ups = self._upsample(masks, size)  # (n, n_masks, H, W)
        out = []
        for term in self.terms:
            u = ups[:, term.masks[0]]
            for j in term.masks[1:]:
                u = u * ups[:, j]
            out.append(u)
        return torch.stack(out, dim=1).unsqueeze(2)

    def _paths(self, ctx: _Context, u: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor | None,
               grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score part of the objective for samples ``idx`` with term masks ``u`` (n, T, 1, H, W).

        The ``T * S`` path images of a group of samples are built at once (broadcasting) and fed
        to the model in chunks of at most ``chunk_size`` images (twice that without gradients).

        Returns:
            ``(scores, G)``: scores (n,) float64 = ``sum_terms sign * mean_k f(x_k)``; with ``grad``,
            G (n, T, 1, H, W) = the derivative of the scores with respect to ``u``, else ``None``.
        """
        n, t_count = u.shape[0], u.shape[1]
        s_count = self.ig_steps
        per_sample = t_count * s_count
        device = u.device
        alphas = torch.linspace(1.0 / s_count, 1.0, s_count, device=device).view(1, 1, -1, 1, 1, 1)
        dirs = torch.tensor([0 if t.deletion else 1 for t in self.terms], device=device)
        sdir = torch.tensor([1.0 if t.deletion else -1.0 for t in self.terms], device=device)
        # weight of image (term t, point k) in the score part: sign_t / S; in its derivative: * alpha_k * sdir_t
        w = torch.tensor([t.sign / s_count for t in self.terms], device=device, dtype=torch.float64)
        coef = (w.float().view(-1, 1) * sdir.view(-1, 1) * alphas.view(1, -1)).view(1, t_count, s_count, 1, 1, 1)
        chunk = self.chunk_size if grad else 2 * self.chunk_size
        group = max(1, math.ceil(8 * chunk / per_sample))  # samples whose path images are built together
        scores = torch.zeros(n, dtype=torch.float64, device=device)
        g_all = torch.zeros(n, t_count, 1, *u.shape[-2:], device=device) if grad else None
        for g0 in range(0, n, group):
            gi = idx[g0:g0 + group]
            ng = gi.shape[0]
            delta = ctx.delta[gi].unsqueeze(1).unsqueeze(1)  # (ng, 1, 1, C, H, W)
            starts = ctx.start[gi][:, dirs].unsqueeze(2)  # (ng, T, 1, C, H, W)
            move = (u[g0:g0 + ng] * sdir.view(1, -1, 1, 1, 1)).unsqueeze(2) * delta  # (ng, T, 1, C, H, W)
            xs = starts + alphas * move
            if noise is not None:
                xs = xs + noise.unsqueeze(0) * ctx.noise_scale[gi].view(-1, 1, 1, 1, 1, 1)
            xs = xs.reshape(ng * per_sample, *xs.shape[3:])
            targets = ctx.target[gi].repeat_interleave(per_sample)
            f = torch.empty(ng * per_sample, device=device)
            gx = torch.empty_like(xs) if grad else None
            for lo in range(0, xs.shape[0], chunk):
                xc = xs[lo:lo + chunk]
                tc = targets[lo:lo + chunk]
                if grad:
                    xc = xc.detach().requires_grad_(True)
                    with torch.enable_grad():
                        fc = self._score(self._forward(xc), tc)
                        (gc,) = torch.autograd.grad(fc.sum(), xc)
                    gx[lo:lo + chunk] = gc  # type: ignore[index]
                else:
                    with torch.no_grad():
                        fc = self._score(self._forward(xc), tc)
                f[lo:lo + chunk] = fc.detach()
            scores[g0:g0 + ng] = (f.double().view(ng, t_count, s_count) * w.view(1, -1, 1)).sum(dim=(1, 2))
            if grad:
                # d x_k / d u = alpha_k * sdir * delta: contract with the input gradient over channels and k
                gx = gx.view(ng, t_count, s_count, *xs.shape[1:])  # type: ignore[union-attr]
                g_all[g0:g0 + ng] = ((gx * delta).sum(dim=3, keepdim=True) * coef).sum(dim=2)  # type: ignore[index]
        return scores, g_all

    def _evaluate(self, ctx: _Context, masks: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor | None,
                  l1: float, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Objective (n,) float64 of masks (n, n_masks, h, w) of samples ``idx`` and, with ``grad``, the
        descent direction (n, n_masks, h, w): ``score_grad_scale`` times the integrated gradient of
        the score terms plus the gradient of the regularizer."""
        if not grad:
            with torch.no_grad():
                scores, _ = self._paths(ctx, self._term_masks(masks, ctx.size), idx, noise, grad=False)
                return scores + self._regularizer(ctx, masks, idx, l1).double(), None
        m = masks.detach().requires_grad_(True)
        with torch.enable_grad():
            u = self._term_masks(m, ctx.size)
            scores, g = self._paths(ctx, u.detach(), idx, noise, grad=True)
            reg = self._regularizer(ctx, m, idx, l1)
            surrogate = self.score_grad_scale * (u * g).sum() + reg.sum()
            (direction,) = torch.autograd.grad(surrogate, m)
        return scores + reg.detach().double(), direction.detach()

    def _noise(self, gen: torch.Generator, ctx: _Context) -> torch.Tensor | None:
        """Standard normal noise (T, S, C, H, W): one draw per noisy term, zeros for the others
        (scaled per sample by ``noise_scale`` when added).

        Drawn with the shape of one sample from ``gen`` and shared by every sample, so a sample's
        noise does not depend on the rest of the batch.
        """
        n_noise = 1 + max((t.noise for t in self.terms), default=-1)
        if n_noise == 0 or self.noise_std == 0:
            return None
        draws = torch.randn((n_noise, self.ig_steps, *ctx.x.shape[1:]), generator=gen)
        zero = torch.zeros_like(draws[0])
        per_term = torch.stack([draws[t.noise] if t.noise >= 0 else zero for t in self.terms])
        return per_term.to(ctx.x.device)

    def _optimize(self, ctx: _Context, msize: tuple[int, int], l1: float) -> dict[str, torch.Tensor]:
        """Projected descent with a per-sample backtracking (Armijo) line search.

        The noise is drawn once for the call, so the objective is a fixed function of the masks.
        With ``warm_start`` the first candidate of an iteration is evaluated together with its
        descent direction (one forward/backward pass): when it is accepted, which is the common
        case, that pass also provides the next iteration's direction.
        """
        b = ctx.x.shape[0]
        device = ctx.x.device
        masks = torch.ones(b, self.n_masks, *msize, device=device)
        noise = self._noise(torch.Generator().manual_seed(self.seed), ctx)
        history = torch.zeros(b, self.iterations, 2, dtype=torch.float64)
        steps = torch.zeros(b, self.iterations, dtype=torch.float64)
        evaluations = torch.zeros(b, dtype=torch.long)
        grad_passes = torch.zeros(b, dtype=torch.long)
        objective = torch.zeros(b, dtype=torch.float64, device=device)
        direction = torch.zeros_like(masks)
        have = torch.zeros(b, dtype=torch.bool, device=device)  # direction known at the current masks
        done = torch.zeros(b, dtype=torch.bool, device=device)  # no step decreases the objective
        last_step = torch.zeros(b, dtype=torch.float64, device=device)
        streak = torch.zeros(b, dtype=torch.long, device=device)  # iterations accepted at the first try
        for it in range(self.iterations):
            need = ~have & ~done
            if bool(need.any()):
                ni = torch.nonzero(need).flatten()
                objective[ni], direction[ni] = self._evaluate(ctx, masks[ni], ni, noise, l1, grad=True)
                grad_passes[ni.cpu()] += 1
                evaluations[ni.cpu()] += 1
                have[ni] = True
            history[:, it, 0] = objective.cpu()
            sq = direction.double().pow(2).reshape(b, -1).sum(1)
            done |= sq == 0
            # first step: step_init, or (warm start) the last accepted step, grown after two
            # consecutive first-try acceptances
            alpha = torch.full((b,), self.step_init, dtype=torch.float64, device=device)
            if self.warm_start:
                grown = torch.clamp(last_step / self.step_shrink, max=self.step_init)
                alpha = torch.where(last_step > 0, torch.where(streak >= 2, grown, last_step), alpha)
            accepted = torch.zeros(b, dtype=torch.float64, device=device)
            active = ~done
            first = True
            fused = self.warm_start and it < self.iterations - 1
            while bool(active.any()):
                ai = torch.nonzero(active).flatten()
                cand = torch.clamp(masks[ai] - alpha[ai].view(-1, 1, 1, 1).float() * direction[ai], 0.0, 1.0)
                with_grad = first and fused and bool((last_step[ai] > 0).any())
                obj, cdir = self._evaluate(ctx, cand, ai, noise, l1, grad=with_grad)
                evaluations[ai.cpu()] += 1
                if with_grad:
                    grad_passes[ai.cpu()] += 1
                ok = obj <= objective[ai] - self.armijo * alpha[ai] * sq[ai]
                if bool(ok.any()):
                    acc = ai[ok]
                    masks[acc] = cand[ok]
                    objective[acc] = obj[ok]
                    accepted[acc] = alpha[acc]
                    active[acc] = False
                    if cdir is not None:
                        direction[acc] = cdir[ok]
                    have[acc] = cdir is not None
                    streak[acc] = torch.where(alpha[acc] > last_step[acc], 0, streak[acc] + 1) if first \
                        else torch.zeros_like(streak[acc])
                rej = ai[~ok]
                alpha[rej] = alpha[rej] * self.step_shrink
                fail = rej[alpha[rej] < self.step_min]
                done[fail] = True  # the objective is fixed: later iterations would fail the same way
                active[fail] = False
                first = False
            last_step = torch.where(accepted > 0, accepted, last_step)
            history[:, it, 1] = objective.cpu()
            steps[:, it] = accepted.cpu()
        return {"masks": masks.detach(), "history": history, "steps": steps, "evaluations": evaluations,
                "grad_passes": grad_passes, "target": ctx.target.detach().cpu()}

    # ----------------------------------------------------------------------------------------
    def objective(self, x: torch.Tensor, masks: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
                  lung_mask: torch.Tensor | None = None, baseline: torch.Tensor | None = None) -> torch.Tensor:
        """The objective the optimization minimizes, for given masks (same noise as a call).

        Args:
            x: (B, C, H, W) images.
            masks: (B, n_masks, h, w) masks in [0, 1] (e.g. ``masks_`` after a call).
            target, lung_mask, baseline: as for a call.

        Returns:
            (B,) float64 objective values on the CPU.

        Raises:
            ValueError: if ``masks`` does not have the shape (B, n_masks, h, w).
        """
        if masks.ndim != 4 or masks.shape[0] != x.shape[0] or masks.shape[1] != self.n_masks:
            raise ValueError(f"masks must be (B, {self.n_masks}, h, w) for a batch of {x.shape[0]}, "
                             f"got {tuple(masks.shape)}")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        was_training = self.model.training
        self.model.eval()
        try:
            with self._memory_format():
                ctx = self._context(x.float(), target, lung_mask, baseline)
                noise = self._noise(torch.Generator().manual_seed(self.seed), ctx)
                idx = torch.arange(x.shape[0], device=x.device)
                obj, _ = self._evaluate(ctx, masks.to(x.device).float(), idx, noise, self.resolved_l1(size),
                                        grad=False)
        finally:
            self.model.train(was_training)
        return obj.cpu()


class IGOS(_IntegratedGradientMasks):
    """I-GOS: one deletion mask optimized with integrated gradients (Qi, Khorram, Fuxin 2020).

    Minimizes, per slice, ``mean_k f(phi(I, I~, t_k M) + noise) + L1 * mean|1 - M| + L2 * TV(M)``
    over a low-resolution mask ``M`` (``t_k = k / S``), with the integrated gradient as descent
    direction and a backtracking Armijo line search per slice. Returns ``1 - M`` upsampled to the
    input (high where deleting the pixels lowers the score). The deletion-only predecessor of
    :class:`IGOSPP`, kept for comparison; see the module docstring for the shared machinery and
    the deviations from the reference code.

    Reference: Z. Qi, S. Khorram, L. Fuxin, "Visualizing deep networks by optimizing with
    integrated gradients", AAAI 2020 (reference code: github.com/khorrams/IGOS_pp).

    Args:
        model: classifier returning logits (B, K); K == 1 is read as a sigmoid output.
        mask_size: mask resolution, int or (h, w), at most the input size; ``None`` for
            ``round(28 * side / 256)`` (28 x 28 for 256 x 256 inputs).
        iterations: optimization iterations.
        ig_steps: S, points on the integrated-gradient path.
        l1: weight of ``mean|1 - M|``; ``None`` for 1 (10 when the mask has the input's resolution).
        l2: weight of the total variation.
        step_init: first step size of the line search.
        step_shrink: factor applied to the step after each rejected candidate.
        step_min: smallest step tried; below it the iteration leaves the mask unchanged.
        armijo: sufficient-decrease constant of the Armijo condition.
        warm_start: start each line search (after the first) from the previous accepted step and
            evaluate that candidate with its descent direction (see the module docstring);
            ``False``: from ``step_init`` every time, as the reference.
        noise_std: std of the Gaussian noise added to the path images, relative to each image's
            intensity std (0.2 as the reference's 0.2 on ImageNet-normalized images).
        blur_ratio: blur kernel side relative to the image side; ``blur_sigma``: its std in pixels
            (``None``: kernel side - 1).
        tv_beta: exponent of the total variation.
        bilateral_sigma: not used by I-GOS (kept for a common signature).
        seed: seed of the noise; results are deterministic for a seed.
        chunk_size: most images per forward/backward pass (forward-only passes take twice that);
            bounds peak memory (DenseNet121, 256 x 256: about 3 GB at 16, 6 GB at 32 on CPU).
        channels_last: run the model in channels-last memory layout during the call (inputs and
            4D parameters; the parameters are restored afterwards): about 1.6x faster on CPU.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` (or their names) to compute the
            model in that dtype: the folded model cast to it (``fold_batchnorm``; about 2.2x faster
            than float32 for DenseNet121 on a CPU with AMX), else the model under autocast;
            ``None`` (default) for float32.
        batch_size: most slices optimized together; larger batches are split (see
            :class:`~monai_ext.attribution.base.Attributor`). ``None``: the whole batch.
        fold_batchnorm: run known models (MONAI DenseNet, ResNet, SENet, ``nn.Sequential``)
            through :func:`~monai_ext.attribution.fold_model`: batch norms folded, each DenseNet
            dense block and transition one autograd node; the same scores and gradients up to
            float rounding, about twice as fast for DenseNet121 on CPU.

    Returns:
        (from a call) (B, 1, H, W) float map in [0, 1]. After the call, ``masks_`` (B, 1, h, w),
        ``history_`` (B, iterations, 2) objective before/after each iteration's step, ``steps_``
        (accepted step sizes, 0: none), ``objective_`` (final), ``evaluations_`` and
        ``grad_passes_`` (objective evaluations and those with a backward pass, per slice) and
        ``target_`` describe the optimization; :meth:`objective` evaluates given masks.

    Raises:
        ValueError: for invalid settings, or at call time for a lung mask / baseline of the wrong
            shape or a mask larger than the input.

    Example::

        igos = IGOS(net, iterations=15)
        maps = igos(slices, target=1, lung_mask=lungs)   # (B, 1, H, W)
        igos.history_[..., 1]                             # objective after each iteration
    """

    n_masks = 1
    terms = (_Term(masks=(0,), deletion=True, noise=0, sign=1.0),)
    score_grad_scale = 1.0
    uses_bilateral = False


class IGOSPP(_IntegratedGradientMasks):
    """iGOS++: bilateral deletion and insertion masks (Khorram, Lawson, Fuxin, ACM CHIL 2021).

    Optimizes, per slice, a deletion mask ``Mx`` and an insertion mask ``My`` (low resolution,
    upsampled bilinearly) to minimize::

        f(phi(Mx)) - f(phi(1 - My)) + f(phi(Mxy)) - f(phi(1 - Mxy))
            + L1 * mean|1 - Mxy| + L2 * BTV(Mxy),          Mxy = Mx * My,

    with ``phi(M) = I * M + I~ * (1 - M)``, ``f`` the target's softmax probability and each score
    term averaged over the ``S`` points of its integrated-gradient path (deletion terms from the
    baseline towards ``phi(M)``, insertion terms along the reversed path, from the image towards
    ``phi(1 - M)``), Gaussian noise on the images of the ``Mx`` and ``My`` terms.
    ``BTV(M) = 0.5 * (TV(M) + mean exp(-|grad I|^2 / sigma) * |grad up(M)|^beta)``. The descent
    direction is half the integrated gradient of the score terms plus the gradient of the
    regularizer (as the reference code); the step is found per slice by backtracking with the
    Armijo condition; masks are clamped to [0, 1]. Returns ``1 - Mxy`` upsampled to the input:
    high where the evidence is. See the module docstring for the deviations from the reference.

    Reference: S. Khorram, T. Lawson, L. Fuxin, "iGOS++: Integrated gradient optimized saliency
    by bilateral perturbations", ACM CHIL 2021 (reference code: github.com/khorrams/IGOS_pp).

    Args:
        model: classifier returning logits (B, K); K == 1 is read as a sigmoid output.
        mask_size: mask resolution, int or (h, w), at most the input size; ``None`` for
            ``round(28 * side / 256)`` (28 x 28 for 256 x 256 inputs).
        iterations: optimization iterations.
        ig_steps: S, points on each integrated-gradient path.
        l1: weight of ``mean|1 - Mxy|``; ``None`` for 1 (10 when the mask has the input's
            resolution).
        l2: weight of the bilateral total variation.
        step_init: first step size of the line search.
        step_shrink: factor applied to the step after each rejected candidate.
        step_min: smallest step tried; below it the iteration leaves the masks unchanged.
        armijo: sufficient-decrease constant of the Armijo condition.
        warm_start: start each line search (after the first) from the previous accepted step and
            evaluate that candidate with its descent direction (see the module docstring);
            ``False``: from ``step_init`` every time, as the reference.
        noise_std: std of the Gaussian noise added to the ``Mx`` / ``My`` path images, relative to
            each image's intensity std (0.2 as the reference's 0.2 on ImageNet-normalized images).
        blur_ratio: blur kernel side relative to the image side; ``blur_sigma``: its std in pixels
            (``None``: kernel side - 1).
        tv_beta: exponent beta of the (bilateral) total variation.
        bilateral_sigma: sigma of the bilateral weights ``exp(-|grad I|^2 / sigma)``.
        seed: seed of the noise; results are deterministic for a seed.
        chunk_size: most images per forward/backward pass (forward-only passes take twice that);
            bounds peak memory (DenseNet121, 256 x 256: about 3 GB at 16, 6 GB at 32 on CPU).
        channels_last: run the model in channels-last memory layout during the call (inputs and
            4D parameters; the parameters are restored afterwards): about 1.6x faster on CPU.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` (or their names) to compute the
            model in that dtype: the folded model cast to it (``fold_batchnorm``; about 2.2x faster
            than float32 for DenseNet121 on a CPU with AMX), else the model under autocast;
            ``None`` (default) for float32.
        batch_size: most slices optimized together; larger batches are split (see
            :class:`~monai_ext.attribution.base.Attributor`). ``None``: the whole batch.
        fold_batchnorm: run known models (MONAI DenseNet, ResNet, SENet, ``nn.Sequential``)
            through :func:`~monai_ext.attribution.fold_model`: batch norms folded, each DenseNet
            dense block and transition one autograd node; the same scores and gradients up to
            float rounding, about twice as fast for DenseNet121 on CPU.

    Returns:
        (from a call) (B, 1, H, W) float map in [0, 1]. After the call, ``masks_`` (B, 2, h, w)
        holds ``Mx`` and ``My``; ``history_`` (B, iterations, 2) the objective before/after each
        iteration's step; ``steps_`` (accepted step sizes, 0: none), ``objective_`` (final),
        ``evaluations_`` and ``grad_passes_`` (objective evaluations and those with a backward
        pass, per slice) and ``target_`` describe the optimization; :meth:`objective` evaluates
        given masks.

    Raises:
        ValueError: for invalid settings, or at call time for a lung mask / baseline of the wrong
            shape or a mask larger than the input.

    Example::

        igos = IGOSPP(net)                                # 28 x 28 masks for 256 x 256 slices
        maps = igos(slices, lung_mask=lungs)              # (B, 1, H, W), predicted class
        assert (igos.history_[..., 1] <= igos.history_[..., 0]).all()
    """

    n_masks = 2
    terms = (
        _Term(masks=(0,), deletion=True, noise=0, sign=1.0),  # f(phi(Mx))
        _Term(masks=(1,), deletion=False, noise=1, sign=-1.0),  # -f(phi(1 - My))
        _Term(masks=(0, 1), deletion=True, noise=-1, sign=1.0),  # f(phi(Mxy))
        _Term(masks=(0, 1), deletion=False, noise=-1, sign=-1.0),  # -f(phi(1 - Mxy))
    )
    score_grad_scale = 0.5
    uses_bilateral = True
