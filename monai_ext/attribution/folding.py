"""Splitting a classifier at a layer, and computing its parts with folded batch norms.

IBA runs the part of a network after its bottleneck layer many times, Grad-CAM and HiResCAM the
part before their layer once per batch, I-GOS and iGOS++ the whole network on many perturbed
copies of each slice. For the networks this module knows (``nn.Sequential`` chains and MONAI
DenseNet, ResNet and SENet), it lays the forward pass out as a chain of modules, which can be cut
at any layer (:func:`split_model`), and computes eval-mode MONAI DenseNets in fewer passes over
memory (:func:`fold_model`): batch norms folded into the neighbouring convolutions, transitions
pooling before their convolution, and each dense block computed as one autograd node
(:class:`_DenseBlockPlan`). Each fold gives the same function up to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks import nets
from monai.networks.nets import densenet
from torch import nn

__all__ = ["split_model", "fold_model"]


# ------------------------------------------------------------------------------------------------
# splitting a model into the part before a layer and the part after it
def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


def _sequential_view(module: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """The modules that ``module.forward`` applies one after the other, or ``None`` if unknown."""
    kind = type(module)
    if isinstance(module, nn.Sequential) and kind.forward is nn.Sequential.forward:
        return list(module.named_children())
    if isinstance(module, nets.DenseNet) and kind.forward is nets.DenseNet.forward:
        return [("features", module.features), ("class_layers", module.class_layers)]
    if isinstance(module, nets.ResNet) and kind.forward is nets.ResNet.forward:
        view: list = [("conv1", module.conv1), ("bn1", module.bn1), ("act", module.act)]
        if not module.no_max_pool:
            view.append(("maxpool", module.maxpool))
        view += [(f"layer{i}", getattr(module, f"layer{i}")) for i in range(1, 5)]
        view += [("avgpool", module.avgpool), ("", _flatten)]
        if module.fc is not None:
            view.append(("fc", module.fc))
        return view
    if isinstance(module, nets.SENet) and kind.forward is nets.SENet.forward:
        view = [(f"layer{i}", getattr(module, f"layer{i}")) for i in range(5)]
        view.append(("adaptive_avg_pool", module.adaptive_avg_pool))
        if module.dropout is not None:
            view.append(("dropout", module.dropout))
        view += [("", _flatten), ("last_linear", module.last_linear)]
        return view
    return None


def _chain(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return run


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel (eval mode)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _is_eval_bn(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d and not m.training and m.running_var is not None


def _is_pointwise_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1)


def _is_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


class _BnReluPointwiseConv:
    """``conv(relu(bn(x)))`` for an eval-mode batch norm and a 1x1 convolution, in fewer passes.

    With the norm's per-channel scale ``s > 0``, ``relu(s * x + t) = s * relu(x + t / s)``: the scale
    moves into the convolution's weights, leaving an addition (whose backward pass is free) and a
    ReLU instead of a normalization and a ReLU. A batch norm right after the convolution
    (``post``) is folded into its weights and bias. Where a scale is not positive, the norm is kept
    as it is (only ``post`` is folded).
    """

    def __init__(self, bn: nn.Module, conv: nn.Module, post: nn.Module | None = None) -> None:
        with torch.no_grad():
            weight = conv.weight
            bias = conv.bias if conv.bias is not None else torch.zeros(weight.shape[0], device=weight.device,
                                                                          dtype=weight.dtype)
            scale, shift = _bn_affine(bn)
            self.shift: torch.Tensor | None = None
            self.bn: nn.Module | None = bn
            if bool((scale > 0).all()):
                self.bn = None
                self.shift = (shift / scale).view(1, -1, 1, 1).to(weight.dtype)
                weight = weight * scale.view(1, -1, 1, 1)
            if post is not None:
                post_scale, post_shift = _bn_affine(post)
                weight = weight * post_scale.view(-1, 1, 1, 1)
                bias = bias * post_scale + post_shift
            self.weight = weight.to(conv.weight.dtype).contiguous()
            self.bias = bias.to(conv.weight.dtype)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn(x))`` up to the per-channel scale moved into the weights."""
        return torch.relu_(self.bn(x) if self.bn is not None else x + self.shift)

    def conv(self, h: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, self.weight, self.bias)


class _FoldedDenseLayer:
    """A MONAI ``_DenseLayer`` in eval mode (norm1, relu1, conv1, norm2, relu2, conv2[, dropout])
    computed with :class:`_BnReluPointwiseConv` for its first half. Built per call, from the
    current parameters."""

    def __init__(self, layer: nn.Module) -> None:
        seq = layer.layers
        self.first = _BnReluPointwiseConv(seq.norm1, seq.conv1, seq.norm2)
        self.conv2 = seq.conv2
        self.dropout = getattr(seq, "dropout", None)

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        seq = getattr(layer, "layers", None)
        if not isinstance(layer, densenet._DenseLayer) or not isinstance(seq, nn.Sequential):
            return False
        names = [n for n, _ in seq.named_children()]
        if names not in (["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"],
                         ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2", "dropout"]):
            return False
        return (_is_eval_bn(seq.norm1) and _is_relu(seq.relu1) and _is_pointwise_conv(seq.conv1)
                and _is_eval_bn(seq.norm2) and _is_relu(seq.relu2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.first.conv(self.first.activate(x)))
        h = self.conv2(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return torch.cat([x, h], 1)


class _FoldedTransition:
    """A MONAI ``_Transition`` in eval mode (norm, relu, 1x1 conv, 2x2 average pooling): the
    pooling, linear like the 1x1 convolution, runs first, so the convolution sees 4x fewer pixels.

    With a positive norm scale, ``relu(x + t) = max(x, -t) + t``: the ``+ t`` passes the pooling
    into the convolution's bias, so the activation takes one pass over the input, and with autograd
    the transition is one node (:class:`_TransitionFunction`)."""

    def __init__(self, transition: nn.Module) -> None:
        self.first = _BnReluPointwiseConv(transition.norm, transition.conv)
        if self.first.bn is None:
            with torch.no_grad():
                first = self.first
                self.shift = first.shift.reshape(-1)
                self.neg_shift = -first.shift
                self.matrix = first.weight.reshape(first.weight.shape[0], -1)  # (out, in)
                self.bias_max = (first.bias.double() + self.matrix.double() @ self.shift.double()).to(first.bias.dtype)

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        if not isinstance(module, densenet._Transition) or type(module).forward is not nn.Sequential.forward:
            return False
        if [n for n, _ in module.named_children()] != ["norm", "relu", "conv", "pool"]:
            return False
        pool = module.pool
        return (_is_eval_bn(module.norm) and _is_relu(module.relu) and _is_pointwise_conv(module.conv)
                and type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
                and pool.padding in (0, (0, 0)) and not pool.ceil_mode and pool.divisor_override is None)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass with the one-pass activation (positive norm scales only)."""
        pooled = F.avg_pool2d(torch.clamp(x, min=self.neg_shift), 2, 2)
        return _conv(pooled, self.first.weight, self.bias_max, 0, False, _use_mkldnn(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.first.bn is not None:
            return self.first.conv(F.avg_pool2d(self.first.activate(x), 2, 2))
        if torch.is_grad_enabled() and x.requires_grad:
            return _TransitionFunction.apply(x, self)
        return self.run(x)


class _FoldedConvBN:
    """``bn(conv(x))`` for an eval-mode batch norm: one convolution with scaled weights and a bias.

    The weights get channels-last strides, so that the output is channels-last even for a
    one-channel input (whose layout is ambiguous): the rest of the network then runs channels-last.
    The input gradient of a convolution with few input channels (the stem of a classifier of CT
    slices) is computed as one matrix product and a col2im (:class:`_FewChannelConvFunction`),
    much faster on CPU than the convolution's backward kernel there.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        with torch.no_grad():
            scale, shift = _bn_affine(bn)
            weight = (conv.weight * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
            o, i, kh, kw = weight.shape
            self.weight = torch.empty_strided(weight.shape, (i * kh * kw, 1, kw * i, i), dtype=weight.dtype,
                                              device=weight.device).copy_(weight)
            self.matrix = weight.reshape(o, -1).contiguous()
            bias = shift if conv.bias is None else conv.bias * scale + shift
            self.bias = bias.to(conv.weight.dtype)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = (kh, kw)

    @staticmethod
    def applies_to(conv: object, bn: object) -> bool:
        return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
                and _is_eval_bn(bn))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad and x.ndim == 4 and x.shape[1] <= 4 and self.groups == 1
                and self.dilation == (1, 1)):
            return _FewChannelConvFunction.apply(x, self)
        return self.run(x)


class _TransitionFunction(torch.autograd.Function):
    """Autograd node of a :class:`_FoldedTransition` (gradient with respect to its input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transition: _FoldedTransition) -> torch.Tensor:  # noqa: D102
        ctx.transition = transition
        ctx.save_for_backward(x)
        return transition.run(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        tr: _FoldedTransition = ctx.transition
        (x,) = ctx.saved_tensors
        n, c, h, w = x.shape
        h2, w2 = grad_out.shape[-2:]
        g_pooled = torch.mm(_rows(grad_out), tr.matrix)  # (n h2 w2, c)
        if h == 2 * h2 and w == 2 * w2:
            # each input pixel gets a quarter of its pooling window's gradient
            grad = x.new_empty((n, h, w, c))
            quarter = g_pooled.mul_(0.25).view(n, h2, 1, w2, 1, c)
            grad.view(n, h2, 2, w2, 2, c).copy_(quarter.expand(-1, -1, 2, -1, 2, -1))
            grad_rows = grad.view(-1, c)
        else:
            grad = torch.ops.aten.avg_pool2d_backward(_nchw(g_pooled, n, h2, w2), x, [2, 2], [2, 2], [0, 0], False,
                                                      True, None)
            grad_rows = _rows(grad).contiguous()
        x_rows = _rows(x)
        n_rows = x_rows.shape[0]
        step = _row_block(x, c, n_rows)
        scratch = x.new_empty(min(step, n_rows) * c)
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            a = torch.add(x_rows[r0:r1], tr.shift, out=scratch[: (r1 - r0) * c].view(-1, c)).relu_()
            torch.ops.aten.threshold_backward.grad_input(grad_rows[r0:r1], a, 0, grad_input=grad_rows[r0:r1])
        return _nchw(grad_rows, n, h, w), None


class _FewChannelConvFunction(torch.autograd.Function):
    """Autograd node of a :class:`_FoldedConvBN` whose input has few channels: the input gradient
    as ``col2im(grad_out_rows @ weight_matrix)`` (gradient with respect to the input only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: _FoldedConvBN) -> torch.Tensor:  # noqa: D102
        ctx.conv = conv
        ctx.in_shape = x.shape
        return conv.run(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        conv: _FoldedConvBN = ctx.conv
        n, _, h, w = ctx.in_shape
        cols = torch.mm(_rows(grad_out), conv.matrix)  # (n L, c kh kw)
        cols = cols.view(n, -1, cols.shape[1]).transpose(1, 2)
        return F.fold(cols, (h, w), conv.kernel_size, padding=conv.padding, stride=conv.stride), None


def _use_mkldnn(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution (``torch.ops.mkldnn._convolution_pointwise``) can run ``x``."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, relu: bool,
          mkldnn: bool) -> torch.Tensor:
    """Stride-1 convolution, optionally followed by a ReLU (fused into the convolution by oneDNN)."""
    if mkldnn:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [padding, padding], [1, 1], [1, 1], 1,
                                                       "relu" if relu else "none", [], "")
    y = F.conv2d(x, weight, bias, 1, padding)
    return torch.relu_(y) if relu else y


def _nchw(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(n * h * w, C) rows (channels last) as an (n, C, h, w) channels-last tensor, without a copy."""
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """An (n, C, h, w) tensor as (n * h * w, C) rows (a copy unless it is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _DenseBlockLayer:
    """The constants of one dense layer ``conv2(relu(conv1'(relu(x + shift))))`` of a
    :class:`_DenseBlockPlan`, ``conv1'`` being the 1x1 convolution with both batch norms folded in.

    The forward pass computes ``relu(x + shift)`` as ``max(x, -shift) + shift``, the ``+ shift``
    going into the convolution's bias (one pass over the input instead of two)."""

    def __init__(self, layer: nn.Module) -> None:
        seq = layer.layers
        first = _BnReluPointwiseConv(seq.norm1, seq.conv1, seq.norm2)
        conv2 = seq.conv2
        self.shift = first.shift.reshape(-1)
        self.neg_shift = -self.shift
        self.weight1 = first.weight  # (mid, c, 1, 1)
        self.matrix1 = first.weight.reshape(first.weight.shape[0], -1)  # (mid, c)
        self.bias1 = first.bias
        self.bias1_max = (first.bias.double() + self.matrix1.double() @ self.shift.double()).to(first.bias.dtype)
        self.weight2 = conv2.weight.detach().contiguous()  # (growth, mid, k, k)
        # the input gradient of a stride-1 "same" convolution is the convolution of the output
        # gradient with the kernel flipped and its in/out channels swapped
        self.weight2_t = self.weight2.flip(-1, -2).transpose(0, 1).contiguous()
        self.bias2 = None if conv2.bias is None else conv2.bias.detach()
        self.padding = conv2.kernel_size[0] // 2
        self.channels = self.matrix1.shape[1]
        self.growth = self.weight2.shape[0]

    @staticmethod
    def applies_to(layer: nn.Module) -> bool:
        if not _FoldedDenseLayer.applies_to(layer):
            return False
        seq = layer.layers
        conv2, dropout = seq.conv2, getattr(seq, "dropout", None)
        k = conv2.kernel_size
        scale, _ = _bn_affine(seq.norm1)
        return (type(conv2) is nn.Conv2d and k[0] == k[1] and k[0] % 2 == 1 and conv2.stride == (1, 1)
                and conv2.padding == (k[0] // 2, k[0] // 2) and conv2.dilation == (1, 1) and conv2.groups == 1
                and conv2.padding_mode == "zeros" and (dropout is None or not dropout.training)
                and bool((scale > 0).all()))


class _DenseBlockPlan:
    """A MONAI ``_DenseBlock`` in eval mode, computed in fewer passes over memory.

    The layers write their outputs into one preallocated channels-last buffer (no concatenation),
    each layer's input activation takes one pass, the ReLU after its 1x1 convolution is fused into
    the convolution (oneDNN on CPU). With autograd the block is one node
    (:class:`_DenseBlockFunction`) that keeps the buffer and the layers' middle activations only,
    and computes the gradient with respect to the block input (the parameters are constants). Built
    per call, from the current parameters.
    """

    def __init__(self, block: nn.Module) -> None:
        with torch.no_grad():
            self.layers = [_DenseBlockLayer(m) for m in block.children()]
        last = self.layers[-1]
        self.out_channels = last.channels + last.growth
        self.in_channels = self.layers[0].channels

    @staticmethod
    def applies_to(block: object) -> bool:
        if not isinstance(block, densenet._DenseBlock) or type(block).forward is not nn.Sequential.forward:
            return False
        layers = list(block.children())
        if not layers or not all(_DenseBlockLayer.applies_to(m) for m in layers):
            return False
        c = layers[0].layers.conv1.in_channels
        for m in layers:  # each layer sees the block input and all earlier outputs
            if m.layers.conv1.in_channels != c:
                return False
            c += m.layers.conv2.out_channels
        return True

    def run(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        """The block output as an (n, C, h, w) channels-last view of the buffer; with ``keep``, the
        buffer and the middle activations are appended to it (for the backward pass)."""
        n, c0, h, w = x.shape
        if c0 != self.in_channels:
            raise RuntimeError(f"dense block expects {self.in_channels} channels, got {c0}")
        mkldnn = _use_mkldnn(x)
        buf = x.new_empty((n, h, w, self.out_channels))
        buf[..., :c0].copy_(x.permute(0, 2, 3, 1))
        rows = buf.view(-1, self.out_channels)
        scratch = x.new_empty(rows.shape[0] * self.layers[-1].channels)
        mids = []
        for layer in self.layers:
            c, g = layer.channels, layer.growth
            a = torch.clamp(rows[:, :c], min=layer.neg_shift, out=scratch[: rows.shape[0] * c].view(-1, c))
            mid = _conv(_nchw(a, n, h, w), layer.weight1, layer.bias1_max, 0, True, mkldnn)
            out = _conv(mid, layer.weight2, layer.bias2, layer.padding, False, mkldnn)
            buf[..., c:c + g].copy_(out.permute(0, 2, 3, 1))
            mids.append(mid)
        if keep is not None:
            keep += [buf, *mids]
        return buf.permute(0, 3, 1, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DenseBlockFunction.apply(x, self)
        return self.run(x)


#: on CPU, the backward pass of a 1x1 convolution and the ReLU before it runs on row blocks of
#: about this many elements per thread (a block's gradient and activation then stay in L2 cache)
_ROW_BLOCK_ELEMENTS = 1 << 18


def _row_block(x: torch.Tensor, channels: int, n_rows: int) -> int:
    """Rows per block for the row-blocked backward passes (all rows off the CPU)."""
    if x.device.type != "cpu":
        return n_rows
    return max(256, _ROW_BLOCK_ELEMENTS * torch.get_num_threads() // channels)


class _DenseBlockFunction(torch.autograd.Function):
    """Autograd node of a :class:`_DenseBlockPlan` (gradient with respect to the block input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _DenseBlockPlan) -> torch.Tensor:  # noqa: D102
        keep: list = []
        out = plan.run(x, keep)
        ctx.plan = plan
        ctx.save_for_backward(*keep)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        plan: _DenseBlockPlan = ctx.plan
        buf, *mids = ctx.saved_tensors
        n, h, w, total = buf.shape
        rows = buf.view(-1, total)
        grad = torch.empty_like(buf)
        grad.copy_(grad_out.permute(0, 2, 3, 1))
        grad_rows = grad.view(-1, total)
        n_rows = rows.shape[0]
        mkldnn = _use_mkldnn(buf)
        widest = plan.layers[-1].channels
        step = _row_block(buf, widest, n_rows)
        scratch = buf.new_empty(2 * min(step, n_rows) * widest)
        for layer, mid in zip(reversed(plan.layers), reversed(mids)):
            c, g = layer.channels, layer.growth
            g_out = _nchw(grad_rows[:, c:c + g].contiguous(), n, h, w)
            if mkldnn:
                g_mid = _conv(g_out, layer.weight2_t, None, layer.padding, False, True)
            else:
                g_mid = torch.ops.aten.convolution_backward(
                    g_out, mid, layer.weight2, None, (1, 1), (layer.padding, layer.padding), (1, 1), False, (0, 0),
                    1, (True, False, False))[0]
            g_mid = _rows(torch.ops.aten.threshold_backward(g_mid, mid, 0))
            for r0 in range(0, n_rows, step):
                r1 = min(n_rows, r0 + step)
                size = (r1 - r0) * c
                g_in = torch.mm(g_mid[r0:r1], layer.matrix1, out=scratch[:size].view(-1, c))
                a = torch.add(rows[r0:r1, :c], layer.shift, out=scratch[size:2 * size].view(-1, c)).relu_()
                torch.ops.aten.threshold_backward.grad_input(g_in, a, 0, grad_input=g_in)
                grad_rows[r0:r1, :c].add_(g_in)
        return grad[..., :plan.in_channels].permute(0, 3, 1, 2), None


def _fold_chain(fns: list) -> list:
    """Fold the batch norms of a chain of modules where the structure is known."""
    out: list = []
    i = 0
    while i < len(fns):
        if i + 1 < len(fns) and _FoldedConvBN.applies_to(fns[i], fns[i + 1]):
            out.append(_FoldedConvBN(fns[i], fns[i + 1]))
            i += 2
            continue
        out.append(_fold(fns[i]))
        i += 1
    return out


def _fold(fn: Callable) -> Callable:
    """``fn`` computed with folded batch norms where it is a known MONAI DenseNet block."""
    if _DenseBlockPlan.applies_to(fn):
        return _DenseBlockPlan(fn)
    if isinstance(fn, densenet._DenseBlock) and type(fn).forward is nn.Sequential.forward:
        return _chain([_FoldedDenseLayer(m) if _FoldedDenseLayer.applies_to(m) else m for m in fn.children()])
    if _FoldedDenseLayer.applies_to(fn):
        return _FoldedDenseLayer(fn)
    if _FoldedTransition.applies_to(fn):
        return _FoldedTransition(fn)
    return fn


def split_model(model: nn.Module, layer: str, fold_batchnorm: bool = False, tail_dtype: torch.dtype | None = None
                ) -> tuple[Callable, Callable] | None:
    """Split ``model`` at the output of the module named ``layer``.

    Args:
        model: the network.
        layer: module name, as in ``model.named_modules()``.
        fold_batchnorm: compute MONAI DenseNet layers and transitions with their batch norms
            folded into the 1x1 convolutions (and the transitions' pooling before their
            convolution), and fold batch norms that directly follow a convolution in the chain.
            Eval mode only (running statistics). The result is the same up to float rounding,
            computed in fewer passes over the data; forward hooks on the folded modules do not run.
        tail_dtype: with ``fold_batchnorm``, compute the folded tail in this dtype (e.g.
            ``torch.bfloat16``; see :func:`fold_model`); its input is cast to it and its output
            back, so gradients with respect to the tail input keep the input's dtype.

    Returns:
        ``(head, tail)`` with ``tail(head(x)) == model(x)``, or ``None`` when the model's forward
        is not a known chain of modules (``nn.Sequential`` containers and MONAI DenseNet, ResNet
        and SENet are known).
    """
    head: list = []
    tail: list = []
    module = model
    for part in layer.split("."):
        view = _sequential_view(module)
        if view is None:
            return None
        names = [n for n, _ in view]
        if part not in names:
            return None
        i = names.index(part)
        head += [fn for _, fn in view[:i]]
        tail = [fn for _, fn in view[i + 1:]] + tail
        module = view[i][1]
    head.append(module)
    if fold_batchnorm:
        head, tail = _fold_chain(head), _fold_chain(tail)
        if tail_dtype is not None:
            cast = _cast(tail, tail_dtype, {})
            if cast is None:
                return None
            return _chain(head), _cast_io(_chain(cast), tail_dtype)  # type: ignore[arg-type]
    return _chain(head), _chain(tail)


def _cast_io(fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` computed in ``dtype``: its input cast to it, its output back to the input's dtype."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return fn(x.to(dtype)).to(x.dtype)

    return run




def _expand(fn: Callable) -> list:
    """The callables a known container applies one after the other, recursively; MONAI dense
    blocks and transitions stay whole (they fold as units)."""
    if isinstance(fn, nn.Module) and not isinstance(fn, (densenet._DenseBlock, densenet._Transition)):
        view = _sequential_view(fn)
        if view is not None:
            return [part for _, child in view for part in _expand(child)]
    return [fn]


def _cast(fn: object, dtype: torch.dtype, memo: dict) -> object:
    """A copy of a folded chain element whose floating-point tensors (and modules) are in ``dtype``;
    ``None`` for an element that cannot be cast (a closure)."""
    key = id(fn)
    if key in memo:
        return memo[key]
    if isinstance(fn, torch.Tensor):
        out: object = fn.to(dtype) if fn.is_floating_point() else fn
    elif isinstance(fn, nn.Module):
        out = copy.deepcopy(fn).to(dtype)
    elif isinstance(fn, list):
        out = [_cast(v, dtype, memo) for v in fn]
        if any(v is None for v in out):  # type: ignore[union-attr]
            out = None
    elif isinstance(fn, (_DenseBlockPlan, _DenseBlockLayer, _FoldedDenseLayer, _FoldedTransition, _FoldedConvBN,
                         _BnReluPointwiseConv)):
        out = copy.copy(fn)
        for name, value in vars(fn).items():
            if isinstance(value, (torch.Tensor, nn.Module, list, _DenseBlockLayer, _BnReluPointwiseConv)):
                cast = _cast(value, dtype, memo)
                if cast is None:
                    out = None
                    break
                setattr(out, name, cast)
    elif fn is _flatten:
        out = fn
    else:
        out = None
    memo[key] = out
    return out


def fold_model(model: nn.Module, dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The whole model as a chain of modules with its batch norms folded (eval mode).

    The same function as ``model`` up to float rounding (see :func:`split_model` with
    ``fold_batchnorm=True``), in fewer passes over memory: MONAI DenseNet dense blocks run as one
    autograd node each, which makes forward and input-gradient passes faster (the parameters get
    no gradients). Forward hooks on the folded modules do not run.

    Args:
        model: the network, in eval mode for its batch norms to fold.
        dtype: compute in this dtype (e.g. ``torch.bfloat16``): the folding is done in the model's
            precision and its result cast (the model is not changed); inputs are cast to it and
            the output back to the input's dtype, so input gradients keep the input's dtype.
            ``None``: the model's own dtype.

    Returns:
        A callable ``f(x) == model(x)``, or ``None`` when the model's forward is not a known chain of
        modules (``nn.Sequential`` containers and MONAI DenseNet, ResNet and SENet are known) or
        cannot be cast to ``dtype``.

    Example::

        fast = fold_model(net.eval()) or net
        logits = fast(x.contiguous(memory_format=torch.channels_last))
    """
    if _sequential_view(model) is None:
        return None
    fns = _fold_chain(_expand(model))
    if dtype is None:
        return _chain(fns)
    cast = _cast(fns, dtype, {})
    return None if cast is None else _cast_io(_chain(cast), dtype)  # type: ignore[arg-type]
