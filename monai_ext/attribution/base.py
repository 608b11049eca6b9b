"""The common contract of every attribution method.

A method is one subclass of :class:`Attributor` that overrides :meth:`Attributor.attribute` and
returns the raw map of a batch. The base class owns the rest: resolving the target layer by
name, choosing the target class, registering hooks and always releasing them, putting the model
in eval mode for the call (and restoring its mode), freezing its parameters for the call (gradients
are only ever taken with respect to inputs, activations or masks), enabling autograd even when
called from a ``torch.no_grad()`` block (as MONAI evaluators do), splitting large batches into
chunks of ``batch_size`` slices, and upsampling the raw map to the input size.

Maps are returned as float tensors of shape (B, 1, H, W) on the input's device and are never
min-max normalized per slice: the maps of one study must stay comparable across its slices.
Normalization is a separate, explicit step (:func:`monai_ext.attribution.normalize_study`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attributor", "resolve_layer", "select_target", "gather_scores", "frozen_parameters", "autocast_dtype"]


_AUTOCAST = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autocast_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """The autocast dtype of an ``autocast_dtype`` argument: ``None``, ``torch.bfloat16`` /
    ``torch.float16``, or their names (``"bfloat16"``, ``"bf16"``, ``"float16"``, ``"fp16"``, as
    given on the command line or in a bundle config).

    Raises:
        ValueError: for any other value.
    """
    if value is None or value in (torch.bfloat16, torch.float16):
        return value  # type: ignore[return-value]
    if isinstance(value, str) and value.lower().removeprefix("torch.") in _AUTOCAST:
        return _AUTOCAST[value.lower().removeprefix("torch.")]
    raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16 (or 'bfloat16', 'float16'), "
                     f"got {value!r}")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module of ``model`` called ``name`` (as in ``model.named_modules()``).

    Raises:
        ValueError: if no module has that name; the message lists a few valid names.
    """
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = [n for n in names if name.split(".")[-1] in n][:8] or names[-8:]
    raise ValueError(f"model has no module named {name!r}; for example: {', '.join(close)}")


def select_target(logits: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """Turn a target specification into one class index per sample.

    Args:
        logits: (B, K) model outputs.
        target: ``None`` for the predicted class of each sample, an ``int`` for the same class for
            all samples, or a sequence / tensor of B class indices.

    Returns:
        A long tensor of shape (B,) on the logits' device.

    Raises:
        ValueError: if the target has the wrong length or names a class the model does not have.
    """
    b, k = logits.shape[0], logits.shape[-1]
    if target is None:
        idx = logits.detach().argmax(dim=-1)
    elif isinstance(target, int):
        idx = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    else:
        idx = torch.as_tensor(target, dtype=torch.long, device=logits.device).flatten()
        if idx.numel() == 1 and b > 1:
            idx = idx.expand(b)
        if idx.numel() != b:
            raise ValueError(f"target has {idx.numel()} entries for a batch of {b}")
    if bool(((idx < 0) | (idx >= k)).any()):
        raise ValueError(f"target class out of range for a model with {k} outputs: {idx.tolist()}")
    return idx.long()


def gather_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The score of each sample's target class: shape (B,)."""
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``model`` for the block, then restore.

    Autograd then skips the parameter gradients (about a third of a backward pass) and never
    builds a graph for the part of the network that only depends on parameters and a constant
    input. Parameter ``.grad`` attributes are left untouched.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _split_target(target: int | Sequence[int] | torch.Tensor | None, start: int, stop: int,
                  batch: int) -> int | Sequence[int] | torch.Tensor | None:
    """The part of a target specification that concerns samples ``start:stop`` of a batch."""
    if target is None or isinstance(target, int):
        return target
    idx = torch.as_tensor(target).flatten()
    if idx.numel() == 1:
        return idx
    if idx.numel() != batch:
        raise ValueError(f"target has {idx.numel()} entries for a batch of {batch}")
    return idx[start:stop]


def _split_kwargs(kwargs: dict[str, object], start: int, stop: int, batch: int) -> dict[str, object]:
    """Per-sample tensors of ``kwargs`` (first dimension ``batch``) cut to samples ``start:stop``."""
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch else v
            for k, v in kwargs.items()}


class Attributor:
    """Base class of attribution methods.

    Subclasses override :meth:`attribute`, which receives the input batch and the target
    specification and returns the raw map, (B, h, w) or (B, 1, h, w), at any resolution. They set
    :attr:`default_layer` (a module name, or a callable that finds one in a model) when the method
    works at an inner layer.

    Args:
        model: a classifier returning logits of shape (B, K).
        target_layer: name of the module the method reads or perturbs, as in
            ``model.named_modules()``; ``None`` uses the method's default for the model.
        upsample_mode: interpolation used to bring the raw map to the input size.
        batch_size: largest number of slices given to :meth:`attribute` at once; larger batches
            are processed in chunks (bounding peak memory). ``None``: the whole batch at once.
        params: method parameters, stored on the instance.

    Example::

        cam = HiResCAM(net, target_layer="features.denseblock4")
        maps = cam(slices)            # (B, 1, H, W), target = predicted class
        maps = cam(slices, target=1)  # explain class 1 for every slice
    """

    #: module name or ``callable(model) -> name`` used when ``target_layer`` is None
    default_layer: str | Callable[[nn.Module], str] | None = None
    #: whether the method's maps are non-negative by definition
    non_negative: bool = True
    #: whether the model's parameters are frozen (``requires_grad=False``) during a call
    freeze_parameters: bool = True

    def __init__(self, model: nn.Module, target_layer: str | None = None, upsample_mode: str = "bilinear",
                 batch_size: int | None = None, **params: object) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.model = model
        self.upsample_mode = upsample_mode
        self.batch_size = batch_size
        self.params = dict(params)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if target_layer is None and self.default_layer is not None:
            target_layer = self.default_layer(model) if callable(self.default_layer) else self.default_layer
        self.target_layer = target_layer
        if target_layer is not None:
            resolve_layer(model, target_layer)  # fail early on a wrong name

    # ----------------------------------------------------------------------------------------
    # to override
    def attribute(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """Return the raw map of ``x`` for ``target``: (B, h, w) or (B, 1, h, w)."""
        raise NotImplementedError(f"{type(self).__name__} must override attribute()")

    # ----------------------------------------------------------------------------------------
    # helpers for subclasses
    @property
    def layer(self) -> nn.Module:
        """The resolved target layer module."""
        if self.target_layer is None:
            raise ValueError(f"{type(self).__name__} needs a target_layer")
        return resolve_layer(self.model, self.target_layer)

    def add_hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        """Register a hook handle to be removed when the current call ends."""
        self._handles.append(handle)

    def forward_with_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model and return ``(logits, activation at the target layer)``.

        The activation stays in the autograd graph, so gradients of the logits with respect to it
        can be taken with :func:`torch.autograd.grad` (which leaves parameter ``.grad`` untouched).
        """
        store: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, _inp: object, out: torch.Tensor) -> None:
            store["act"] = out

        handle = self.layer.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if "act" not in store:
            raise RuntimeError(f"layer {self.target_layer!r} was not reached in the forward pass")
        return logits, store["act"]

    def forward_with_activation_leaf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward_with_activation`, but the activation is a fresh autograd leaf.

        The target layer's output is replaced by a detached copy that requires grad, so autograd
        records only the part of the network after the layer: with frozen parameters (the default
        during a call) the part before it runs without building a graph. Gradients of the logits
        with respect to the returned activation are the usual ones.
        """
        store: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise RuntimeError(f"layer {self.target_layer!r} does not output a single tensor")
            leaf = out.detach().requires_grad_(True)
            store["act"] = leaf
            return leaf

        handle = self.layer.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if "act" not in store:
            raise RuntimeError(f"layer {self.target_layer!r} was not reached in the forward pass")
        return logits, store["act"]

    # ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call_context(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        frozen = frozen_parameters(self.model) if self.freeze_parameters else contextlib.nullcontext()
        try:
            with frozen, torch.enable_grad():
                yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            for m, mode in modes:
                m.training = mode

    def __call__(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        """Attribute the batch ``x`` of shape (B, C, H, W).

        ``kwargs`` are method-specific inputs forwarded to :meth:`attribute` (e.g. ``lung_mask``
        for iGOS++); tensors whose first dimension is the batch size are split with the batch.

        Returns:
            float tensor (B, 1, H, W) on ``x``'s device.

        Raises:
            ValueError: if ``x`` is not a 4D batch or the target is invalid.
            RuntimeError: if called inside ``torch.inference_mode()`` (attribution needs autograd).
        """
        return self._maps(x, target, kwargs, upsample=True)

    def raw_maps(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        """Like calling the attributor, but the maps stay at the resolution the method computes them
        (the target layer's for CAM methods and IBA): (B, 1, h, w), detached, on ``x``'s device.

        For training objectives that compare maps at a layer (e.g. saliency-guided training).
        """
        return self._maps(x, target, kwargs, upsample=False)

    def _maps(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None, kwargs: dict,
              upsample: bool) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a (B, C, H, W) tensor, got {shape}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{type(self).__name__} needs autograd: call it outside torch.inference_mode()")
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # plain tensor: no MetaTensor tracking
        x = x.float() if not x.is_floating_point() else x
        size = tuple(x.shape[-2:])
        b = x.shape[0]
        if b == 0:
            return x.new_zeros((0, 1, *size), dtype=torch.float32)
        step = b if self.batch_size is None else self.batch_size
        maps = []
        with self._call_context():
            for start in range(0, b, max(step, 1)):
                stop = min(start + step, b)
                sub_target = target if stop - start == b else _split_target(target, start, stop, b)
                sub_kwargs = kwargs if stop - start == b else _split_kwargs(kwargs, start, stop, b)
                raw = self.attribute(x[start:stop], sub_target, **sub_kwargs)
                raw = self.upsample(raw, size) if upsample else self._as_map(raw)
                maps.append(raw.to(device=x.device, dtype=torch.float32))
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=0)

    def _as_map(self, raw: torch.Tensor) -> torch.Tensor:
        """A raw map (B, h, w) or (B, 1, h, w) as a detached float (B, 1, h, w) tensor."""
        if raw.ndim == 3:
            raw = raw.unsqueeze(1)
        if raw.ndim != 4 or raw.shape[1] != 1:
            raise RuntimeError(f"{type(self).__name__}.attribute returned shape {tuple(raw.shape)}")
        return raw.detach().float()

    def upsample(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bring a raw map (B, h, w) or (B, 1, h, w) to (B, 1, *size)."""
        raw = self._as_map(raw)
        if tuple(raw.shape[-2:]) == tuple(size):
            return raw
        kwargs = {"align_corners": False} if self.upsample_mode in ("bilinear", "bicubic") else {}
        return F.interpolate(raw, size=size, mode=self.upsample_mode, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={self.target_layer!r}, params={self.params})"
