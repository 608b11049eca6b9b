"""IBA: the per-sample Information Bottleneck for Attribution (Schulz et al. 2020).

A bottleneck is put on the output of one layer: its activations ``x`` are replaced by
``z = lambda * x + (1 - lambda) * eps`` with ``eps ~ N(mu, sigma^2)`` drawn from the layer's
feature distribution over training slices (a :class:`FeatureEstimator`), and
``lambda = smooth(sigmoid(alpha))``. ``alpha`` is optimized with Adam to keep the target class
(cross-entropy) while letting as little information through as possible (``beta`` times the mean
KL divergence between ``p(z|x)`` and ``q(z) = N(mu, sigma^2)``). The heatmap is the KL divergence
(the "capacity") summed over channels, in bits per input pixel. Demir et al. used it to localize
COVID-19 lesions in CT slices from a slice classifier trained on study-level labels.

This implementation follows the reference code (``IBA`` package by Schulz and Sixt,
``per_sample_bottleneck``): same defaults, same KL, same Gaussian smoothing of ``lambda`` (kernel
``2 * round(2 * sigma) + 1``, reflection padding), same handling of inactive neurons, and, as there,
the map is the capacity of the last optimization step's forward pass (i.e. after ``steps - 1``
Adam updates; the reference's last update never reaches its output, so it is not computed here).
It differs in how the work is organized, not in the result:

* all slices of a batch are optimized together, each with its own ``alpha``; the loss is a *sum*
  over slices, so Adam (element-wise) updates each slice's ``alpha`` exactly as if it ran alone;
* the noise of each step is drawn once, for one slice, from a generator seeded with ``seed`` at
  the start of every call, and shared by all slices: a slice's map does not depend on which batch
  (or chunk) it came in;
* the part of the network before the bottleneck runs once per call; each step runs only the part
  after it, on all ``B * n_samples`` noisy activations in one batch. For MONAI DenseNet, ResNet
  and SENet and for ``nn.Sequential`` models, that tail is assembled from the module tree. Other
  models fall back to running the whole model with a hook that replaces the layer output (the
  head then runs on the B clean slices every step, which costs time but not correctness);
* in MONAI DenseNets the tail runs with its batch norms folded into the 1x1 convolutions
  (:func:`split_model`), and on channels-last tensors: the same function up to float rounding,
  in about two thirds of the time.

The heatmap, as in the reference's ``to_saliency_map``: the capacity (nats) of each feature is
converted to bits, summed over channels, multiplied by ``(h * w) / (H * W)`` (the share of an
input pixel in a feature-map position) and resized bilinearly to the input size, so that the map
sums (approximately, after resizing) to the total information in bits that passes the
bottleneck. NaN capacities count as 0 (``nansum``); only an exact ``lambda == 1`` is moved off 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from monai_ext.attribution.base import Attributor, resolve_layer, select_target
from monai_ext.attribution.base import autocast_dtype as _autocast_dtype
from monai_ext.attribution.folding import split_model
from monai_ext.io.atomic import atomic_path
from monai_ext.networks.factory import default_iba_layer

__all__ = ["IBA", "FeatureEstimator"]

_FORMAT = "ct-severity/iba-feature-estimator"


# ------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def _head_by_hook(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` up to the output of ``layer`` (generic fallback: stops the forward pass there)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        store["out"] = out
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "out" not in store:
        raise RuntimeError("the bottleneck layer was not reached in the forward pass")
    if not isinstance(store["out"], torch.Tensor) or store["out"].ndim != 4:
        raise RuntimeError("the bottleneck layer must output a (B, C, h, w) tensor")
    return store["out"]


def _tail_by_hook(model: nn.Module, layer: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``x`` with the output of ``layer`` replaced by ``z`` (generic fallback)."""
    handle = layer.register_forward_hook(lambda _m, _i, _o: z)
    try:
        out = model(x)
    finally:
        handle.remove()
    if out.shape[0] != z.shape[0]:
        raise RuntimeError(f"{type(model).__name__} ties its output to the input batch size; IBA cannot "
                           "batch noise samples for it (use an nn.Sequential or a MONAI classifier)")
    return out


# ------------------------------------------------------------------------------------------------
class FeatureEstimator:
    """Per channel and position mean and standard deviation of a layer's activations.

    Accumulates batches with Welford's algorithm in its batched form (Chan et al.), in float64,
    and counts how often each feature is non-zero (features that almost never are, such as
    positions a ReLU always clips, are left out of the bottleneck, as in the reference code).

    Args:
        layer: name of the layer the statistics describe (checked by :class:`IBA`).

    Example::

        est = IBA.fit_estimator(net, train_loader)      # or FeatureEstimator() + update()
        est.save("iba_estimator.pt")
        iba = IBA(net, estimator="iba_estimator.pt")
    """

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer
        self.n_samples = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._nonzero: torch.Tensor | None = None
        self._cache: dict = {}

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Feature shape (C, h, w), or ``None`` before the first update."""
        return None if self._mean is None else tuple(self._mean.shape)

    def update(self, features: torch.Tensor) -> FeatureEstimator:
        """Add a batch of activations (B, C, h, w) to the statistics; returns ``self``.

        Raises:
            ValueError: if the feature shape differs from earlier batches.
        """
        a = features.detach().to(device="cpu", dtype=torch.float64)
        if a.ndim < 2 or a.shape[0] == 0:
            raise ValueError(f"expected a batch of feature maps, got shape {tuple(features.shape)}")
        nb = a.shape[0]
        mean_b = a.mean(dim=0)
        m2_b = ((a - mean_b) ** 2).sum(dim=0)
        nz_b = (a != 0).sum(dim=0).to(torch.float64)
        if self._mean is None:
            self._mean, self._m2, self._nonzero = mean_b, m2_b, nz_b
        else:
            if tuple(mean_b.shape) != self.shape:
                raise ValueError(f"feature shape {tuple(mean_b.shape)} differs from the estimator's {self.shape}")
            n = self.n_samples + nb
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (nb / n)
            self._m2 = self._m2 + m2_b + delta**2 * (self.n_samples * nb / n)
            self._nonzero = self._nonzero + nz_b
        self.n_samples += nb
        self._cache.clear()
        return self

    def _require(self) -> None:
        if self._mean is None or self.n_samples < 2:
            raise ValueError("the feature estimator needs at least two samples")

    def mean(self) -> torch.Tensor:
        """Mean activation (C, h, w), float32."""
        self._require()
        return self._mean.float()

    def std(self) -> torch.Tensor:
        """Unbiased standard deviation (C, h, w), float32."""
        self._require()
        return (self._m2 / (self.n_samples - 1)).clamp_min(0).sqrt().float()

    def active_neurons(self, threshold: float = 0.01) -> torch.Tensor:
        """Mask (C, h, w) of the features that are non-zero in more than ``threshold`` of samples."""
        self._require()
        return self._nonzero / self.n_samples > threshold

    def stats(self, device: torch.device, dtype: torch.dtype, min_std: float,
              threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, std clamped to min_std, active mask as 0/1)`` on ``device`` (cached)."""
        key = (str(device), dtype, float(min_std), float(threshold))
        if key not in self._cache:
            self._cache[key] = (self.mean().to(device, dtype), self.std().clamp_min(min_std).to(device, dtype),
                                self.active_neurons(threshold).to(device, dtype))
        return self._cache[key]

    def state_dict(self) -> dict:
        """The statistics as a dict of tensors and plain values."""
        self._require()
        return {"format": _FORMAT, "version": 1, "layer": self.layer or "", "n_samples": int(self.n_samples),
                "mean": self._mean, "m2": self._m2, "nonzero": self._nonzero}

    def load_state_dict(self, state: dict) -> FeatureEstimator:
        """Restore the statistics from :meth:`state_dict`; returns ``self``.

        Raises:
            ValueError: if ``state`` is not an estimator state.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not an IBA feature estimator state")
        self.layer = state.get("layer") or None
        self.n_samples = int(state["n_samples"])
        self._mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        self._m2 = torch.as_tensor(state["m2"], dtype=torch.float64)
        self._nonzero = torch.as_tensor(state["nonzero"], dtype=torch.float64)
        self._cache.clear()
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the estimator to ``path`` (a small ``.pt`` file), atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureEstimator:
        """Read an estimator written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not an estimator.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"IBA feature estimator not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem means "not an estimator"
            raise ValueError(f"{path}: not an IBA feature estimator ({exc})") from exc
        try:
            return cls().load_state_dict(state)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not an IBA feature estimator") from exc

    def __repr__(self) -> str:
        return f"FeatureEstimator(layer={self.layer!r}, shape={self.shape}, n_samples={self.n_samples})"


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    """Image batches from a tensor (N, C, H, W), or from a loader of tensors, dicts or tuples."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"expected slices of shape (N, C, H, W), got {tuple(data.shape)}")
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size]
        return
    for item in data:
        if isinstance(item, dict):
            if "image" not in item:
                raise ValueError("batches given as dicts need an 'image' key")
            item = item["image"]
        elif isinstance(item, (list, tuple)):
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.ndim != 4:
            raise ValueError("each batch must be (or hold under 'image' / first) a (B, C, H, W) tensor")
        yield item


def _smoothing_matrix(n: int, sigma: float, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix of a 1D Gaussian smoothing with ``reflect`` or ``replicate`` borders.

    The reference smooths with a 2D Gaussian kernel of side ``2 * round(2 * sigma) + 1`` (about 2
    standard deviations each way), normalized to sum 1: it is the outer product of the normalized
    1D kernel with itself, so the 2D smoothing of a map ``M`` is ``S_h @ M @ S_w.T``.
    """
    size = int(round(2 * sigma)) * 2 + 1
    pad = size // 2
    coords = torch.arange(size, dtype=torch.float64) - pad
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for t in range(size):
            j = i + t - pad
            if mode == "reflect":
                j = -j if j < 0 else (2 * (n - 1) - j if j > n - 1 else j)
            else:
                j = min(max(j, 0), n - 1)
            m[i, j] += g[t]
    return m.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
class IBA(Attributor):
    """Per-sample Information Bottleneck for Attribution, batched over slices.

    Schulz, Sixt, Tombari and Landgraf, "Restricting the Flow: Information Bottlenecks for
    Attribution", ICLR 2020; used for COVID-19 CT by Demir et al. See the module docstring for
    how this implementation relates to the reference code.

    Args:
        model: classifier returning logits (B, K) with K >= 2.
        target_layer: the layer whose output gets the bottleneck; default
            :func:`default_iba_layer` (``features.transition2`` for MONAI DenseNets, ``layer2`` for
            MONAI ResNets).
        estimator: the feature statistics at that layer over training slices: a
            :class:`FeatureEstimator` or the path of one saved with :meth:`FeatureEstimator.save`
            (see :meth:`fit_estimator`). Required unless ``estimate_from_batch`` is set.
        beta: weight of the information loss (reference: 10).
        steps: optimization steps (reference: 10).
        lr: Adam learning rate (reference: 1).
        n_samples: noise samples per step and slice (reference: 10).
        sigma: standard deviation, in feature-map pixels, of the Gaussian smoothing of lambda
            (reference: 1; 0 or None: no smoothing).
        initial_alpha: initial value of alpha (reference: 5, i.e. lambda = 0.993).
        min_std: lower bound of the noise standard deviation (reference: 0.01).
        active_threshold: features non-zero in at most this fraction of the estimator's samples
            are zeroed and carry no capacity (reference: 0.01).
        seed: seed of the noise generator, reset at every call (maps are reproducible).
        estimate_from_batch: without an estimator, take the mean and std of the features of the
            batch being explained. Only for quick looks: the noise then depends on the batch, so a
            slice's map changes with the slices around it, and a batch of one slice has no spread.
        fold_batchnorm: run the tail of MONAI DenseNets with their batch norms folded into the
            1x1 convolutions (see :func:`split_model`): same maps up to float rounding, about a
            quarter less time.
        channels_last: feed the tail channels-last tensors (faster convolutions on CPU).
        autocast_dtype: ``torch.bfloat16`` (or ``"bfloat16"``) / ``torch.float16``: compute the
            tail in that dtype (folded and cast for known models, see :func:`split_model`, else
            under autocast), the bottleneck and the optimization of alpha staying in float32;
            ``None`` (default): float32 throughout. The maps agree with float32 ones to the
            precision of the dtype; whether it is faster depends on the hardware (see
            docs/benchmarks.md).
        upsample_mode: interpolation from the layer resolution to the input size.
        batch_size: slices optimized together (each step runs ``batch_size * n_samples`` noisy
            activations through the tail). About 0.45 GB per slice for DenseNet121 at 256 x 256
            with 10 samples; on CPU, chunks of 1-2 slices are also the fastest (they stay in cache).

    Returns (when called):
        (B, 1, H, W) float maps, in bits per input pixel (non-negative), on the input's device.

    Raises:
        ValueError: without an estimator (unless ``estimate_from_batch``), if the estimator was
            fitted at another layer or has another feature shape, or on bad parameters.

    Example::

        est = IBA.fit_estimator(net, train_slices)          # once, stored with the model
        iba = IBA(net, estimator=est)                        # features.transition2 for DenseNet
        maps = iba(slices, target=1)                         # (B, 1, H, W) bits per pixel
    """

    default_layer = staticmethod(default_iba_layer)

    def __init__(self, model: nn.Module, target_layer: str | None = None,
                 estimator: FeatureEstimator | str | os.PathLike | None = None, *, beta: float = 10.0,
                 steps: int = 10, lr: float = 1.0, n_samples: int = 10, sigma: float | None = 1.0,
                 initial_alpha: float = 5.0, min_std: float = 0.01, active_threshold: float = 0.01,
                 seed: int = 0, estimate_from_batch: bool = False, fold_batchnorm: bool = True,
                 channels_last: bool = True, autocast_dtype: torch.dtype | str | None = None,
                 upsample_mode: str = "bilinear", batch_size: int | None = 2) -> None:
        super().__init__(model, target_layer, upsample_mode=upsample_mode, batch_size=batch_size, beta=beta,
                         steps=steps, lr=lr, n_samples=n_samples, sigma=sigma, initial_alpha=initial_alpha,
                         min_std=min_std, active_threshold=active_threshold, seed=seed)
        if self.target_layer is None:
            raise ValueError("IBA needs a target_layer")
        for name, value in (("steps", steps), ("n_samples", n_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("beta", beta), ("min_std", min_std)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if isinstance(estimator, (str, os.PathLike)):
            estimator = FeatureEstimator.load(estimator)
        if estimator is None and not estimate_from_batch:
            raise ValueError("IBA needs a feature estimator for its noise: fit one on training slices with "
                             "IBA.fit_estimator(model, slices) (and save it with the model), or pass "
                             "estimate_from_batch=True to use the statistics of the explained batch")
        if estimator is not None and not isinstance(estimator, FeatureEstimator):
            raise ValueError(f"estimator must be a FeatureEstimator or a path, got {type(estimator).__name__}")
        if estimator is not None and estimator.layer and estimator.layer != self.target_layer:
            raise ValueError(f"the estimator was fitted at layer {estimator.layer!r}, "
                             f"not at the bottleneck layer {self.target_layer!r}")
        self.estimator = estimator
        self.beta, self.steps, self.lr, self.n_samples = float(beta), steps, float(lr), n_samples
        self.sigma = None if not sigma else float(sigma)
        self.initial_alpha, self.min_std = float(initial_alpha), float(min_std)
        self.active_threshold, self.seed = float(active_threshold), int(seed)
        self.estimate_from_batch = bool(estimate_from_batch)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.channels_last = bool(channels_last)
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self._smoothing: dict = {}

    # --------------------------------------------------------------------------------------------
    @classmethod
    def fit_estimator(cls, model: nn.Module, data: torch.Tensor | Iterable, layer: str | None = None,
                      batch_size: int = 32, device: torch.device | str | None = None,
                      max_samples: int | None = None) -> FeatureEstimator:
        """Fit the feature statistics at ``layer`` over training slices.

        The model runs in eval mode up to the layer only (its mode is restored afterwards).

        Args:
            model: the classifier.
            data: slices (N, C, H, W), or an iterable of batches: tensors, dicts with an ``image``
                key, or tuples whose first item is the image batch (a MONAI / torch DataLoader).
            layer: module name; default :func:`default_iba_layer`.
            batch_size: chunk size when ``data`` is a tensor.
            device: where to run the model (default: where its parameters are).
            max_samples: stop after this many slices.

        Returns:
            The fitted :class:`FeatureEstimator` (the reference recommends thousands of slices).

        Raises:
            ValueError: if the data is malformed or holds fewer than two slices.
        """
        layer = layer or default_iba_layer(model)
        module = resolve_layer(model, layer)
        split = split_model(model, layer)
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        est = FeatureEstimator(layer)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                for batch in _batches(data, batch_size):
                    if max_samples is not None and est.n_samples >= max_samples:
                        break
                    batch = batch.as_tensor() if hasattr(batch, "as_tensor") else batch
                    batch = batch.to(device=device, dtype=torch.float32)
                    if max_samples is not None:
                        batch = batch[: max_samples - est.n_samples]
                    feats = split[0](batch) if split is not None else _head_by_hook(model, module, batch)
                    est.update(feats)
        finally:
            for m, mode in modes:
                m.training = mode
        est._require()
        return est

    # --------------------------------------------------------------------------------------------
    def _parts(self, x: torch.Tensor) -> tuple[Callable, Callable]:
        """``(head(x), tail(z))`` for this call (split from the current weights); with
        ``autocast_dtype``, a tail computed in that dtype (folded and cast where the model is
        known, else under autocast)."""
        dtype = self.autocast_dtype
        if dtype is not None and self.fold_batchnorm:
            split = split_model(self.model, self.target_layer, fold_batchnorm=True, tail_dtype=dtype)
            if split is not None:
                return split[0], split[1]
        split = split_model(self.model, self.target_layer, fold_batchnorm=self.fold_batchnorm and dtype is None)
        if split is not None:
            head, tail = split
        else:
            layer = self.layer
            head, tail = (lambda inp: _head_by_hook(self.model, layer, inp)), \
                (lambda z: _tail_by_hook(self.model, layer, x, z))
        if dtype is None:
            return head, tail

        def autocast_tail(z: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=z.device.type, dtype=dtype):
                return tail(z).float()

        return head, autocast_tail

    def _smooth(self, lam: torch.Tensor) -> torch.Tensor:
        """Gaussian smoothing of each (h, w) map of ``lam`` (B, C, h, w), as two small matrix products."""
        if self.sigma is None:
            return lam
        h, w = lam.shape[-2:]
        pad = int(round(2 * self.sigma))
        # the reference pads by reflection; feature maps too small for it are padded by replication
        mode = "reflect" if pad < min(h, w) else "replicate"
        key = (h, w, mode, lam.device, lam.dtype)
        if key not in self._smoothing:
            self._smoothing[key] = (_smoothing_matrix(h, self.sigma, mode, lam.device, lam.dtype),
                                    _smoothing_matrix(w, self.sigma, mode, lam.device, lam.dtype).T)
        rows, cols = self._smoothing[key]
        return torch.matmul(torch.matmul(rows, lam), cols)

    @staticmethod
    def _capacity(x_norm: torch.Tensor, lam: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """KL[p(z|x) || q(z)] per feature, in nats (normalized coordinates, as the reference)."""
        one_minus = (1 - lam).clamp_min(torch.finfo(lam.dtype).eps / 2)  # only an exact lambda == 1 is changed
        var = one_minus**2
        mu = x_norm * lam
        return -0.5 * (1 + torch.log(var) - mu**2 - var) * active

    def attribute(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        head, tail = self._parts(x)
        with torch.no_grad():
            feat = head(x)
            if not isinstance(feat, torch.Tensor) or feat.ndim != 4:
                raise RuntimeError(f"layer {self.target_layer!r} must output a (B, C, h, w) tensor")
            logits = tail(feat)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise RuntimeError(f"IBA needs logits of shape (B, K >= 2), got {tuple(logits.shape)}")
        idx = select_target(logits, target)
        b, c, h, w = feat.shape
        if self.estimator is not None:
            if self.estimator.shape != (c, h, w):
                raise ValueError(f"the estimator's feature shape {self.estimator.shape} does not match the layer "
                                 f"output {(c, h, w)}: fit it on slices of the size being explained")
            mean, std, active = self.estimator.stats(feat.device, feat.dtype, self.min_std, self.active_threshold)
        else:
            est = FeatureEstimator(self.target_layer).update(feat if b > 1 else torch.cat([feat, feat]))
            mean, std, active = est.stats(feat.device, feat.dtype, self.min_std, self.active_threshold)

        s = self.n_samples
        x_norm = (feat - mean) / std
        alpha = torch.full_like(feat, self.initial_alpha).requires_grad_(True)
        optimizer = torch.optim.Adam([alpha], lr=self.lr)
        generator = torch.Generator(device=feat.device)
        generator.manual_seed(self.seed)
        target_rep = idx.repeat_interleave(s).view(-1, 1)
        feat_rep = feat.unsqueeze(1)
        # the capacity returned is the one of the last step's forward pass, i.e. after steps - 1
        # updates (as in the reference code, whose last update never reaches its output)
        for _ in range(self.steps - 1):
            lam = self._smooth(torch.sigmoid(alpha))
            info = self._capacity(x_norm, lam, active).mean(dim=(1, 2, 3)).sum()
            eps = torch.randn((s, c, h, w), generator=generator, device=feat.device, dtype=feat.dtype)
            noise = (eps * std + mean).unsqueeze(0)
            # the bottleneck output, outside the graph: its gradient with respect to lambda is
            # taken by hand, (feat - noise) * active times the gradient that reaches it
            with torch.no_grad():
                lam_rep = lam.unsqueeze(1)
                z = ((lam_rep * feat_rep + (1 - lam_rep) * noise) * active).reshape(b * s, c, h, w)
                if self.channels_last:
                    z = z.contiguous(memory_format=torch.channels_last)
            z.requires_grad_(True)
            out = tail(z)
            ce = -F.log_softmax(out, dim=1).gather(1, target_rep).view(b, s).mean(dim=1).sum()
            (grad_z,) = torch.autograd.grad(ce, z)
            with torch.no_grad():
                grad_lam = (grad_z.reshape(b, s, c, h, w) * (feat_rep - noise)).sum(dim=1) * active
            optimizer.zero_grad(set_to_none=True)
            (alpha.grad,) = torch.autograd.grad((lam * grad_lam).sum() + self.beta * info, alpha)
            optimizer.step()
        with torch.no_grad():
            cap = self._capacity(x_norm, self._smooth(torch.sigmoid(alpha)), active)
            bits = torch.nan_to_num(cap, nan=0.0).sum(dim=1) / math.log(2)
            scale = (h * w) / float(x.shape[-2] * x.shape[-1])
        return bits * scale
