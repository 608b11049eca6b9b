"""A small factory over MONAI's 2D classification networks, and their attribution layers.

The slice classifier of the pipeline is one of MONAI's classification networks built with
``spatial_dims=2``. :func:`build_classifier` builds one by name with the project's defaults
(one input channel, two classes: healthy vs. lesion-bearing). :func:`default_cam_layer` and
:func:`default_iba_layer` name the layers the attribution methods read by default: the last
convolutional stage for CAM methods (coarse but class-discriminative), and an intermediate stage
for IBA (finer resolution, as Schulz et al. 2020 and Demir et al. recommend for their bottleneck).
"""

from __future__ import annotations

from collections.abc import Callable

from monai.networks import nets
from torch import nn

__all__ = ["CLASSIFIERS", "build_classifier", "default_cam_layer", "default_iba_layer"]


def _densenet(cls: type) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, spatial_dims: int, **kw: object) -> nn.Module:
        return cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kw)

    return build


def _resnet(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, spatial_dims: int, **kw: object) -> nn.Module:
        return fn(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kw)

    return build


def _senet(cls: type) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, spatial_dims: int, **kw: object) -> nn.Module:
        return cls(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kw)

    return build


#: builders by name; each takes ``(in_channels, num_classes, spatial_dims, **kw)``
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": _densenet(nets.DenseNet121),
    "densenet169": _densenet(nets.DenseNet169),
    "densenet201": _densenet(nets.DenseNet201),
    "resnet18": _resnet(nets.resnet18),
    "resnet34": _resnet(nets.resnet34),
    "resnet50": _resnet(nets.resnet50),
    "seresnet50": _senet(nets.SEResNet50),
    "seresnext50": _senet(nets.SEResNext50),
}


def build_classifier(name: str = "densenet121", in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2,
                     **kw: object) -> nn.Module:
    """Build a MONAI classification network by name.

    Args:
        name: one of :data:`CLASSIFIERS` (case-insensitive): ``densenet121``, ``densenet169``,
            ``densenet201``, ``resnet18``, ``resnet34``, ``resnet50``, ``seresnet50``,
            ``seresnext50``.
        in_channels: input channels (1 for a CT slice, 3 for a 2.5D stack of neighbours).
        num_classes: number of output logits.
        spatial_dims: 2 for slice classifiers (the project's default), 3 for volumes.
        kw: passed on to the MONAI constructor (e.g. ``dropout_prob`` for DenseNet).

    Returns:
        The network (randomly initialized, train mode), returning logits of shape (B, num_classes).

    Raises:
        ValueError: if the name is unknown or a size is not a positive integer.

    Example::

        net = build_classifier("densenet121", in_channels=1, num_classes=2)
        logits = net(torch.zeros(4, 1, 256, 256))   # (4, 2)
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}")
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return CLASSIFIERS[key](in_channels, num_classes, spatial_dims, **kw)


def _names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules()}


def default_cam_layer(model: nn.Module) -> str:
    """The layer CAM methods (HiResCAM, Grad-CAM) read by default.

    The last dense block (``features.denseblock4`` for the DenseNet121 family, ``features.denseblock2``
    for a two-block DenseNet) for MONAI DenseNets, ``layer4`` for MONAI ResNets and SENets; for other
    models, the last ``Conv2d`` in ``named_modules()`` order. (For HiResCAM's exact score
    decomposition on a MONAI DenseNet, explain ``class_layers.relu``, the input of its global
    pooling: the ct-severity bundle records that layer as its ``cam_layer``.)

    Raises:
        ValueError: if the model has no 2D convolution.
    """
    names = _names(model)
    if isinstance(model, nets.DenseNet):
        blocks = sorted((n for n in names if n.startswith("features.denseblock") and n.count(".") == 1),
                        key=lambda n: int(n.removeprefix("features.denseblock")))
        if blocks:
            return blocks[-1]
    if isinstance(model, (nets.ResNet, nets.SENet)) and "layer4" in names:
        return "layer4"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass target_layer explicitly")
    return convs[-1]


def default_iba_layer(model: nn.Module) -> str:
    """The layer IBA puts its bottleneck on by default.

    ``features.transition2`` for MONAI DenseNets (the output of the second transition block,
    1/16 of the input size), ``features.transition1`` (1/8) for DenseNets with fewer blocks,
    ``layer2`` for MONAI ResNets and SENets (1/8 of the input size); for other models, the
    ``Conv2d`` halfway through the network.

    Raises:
        ValueError: if the model has no 2D convolution.
    """
    names = _names(model)
    if isinstance(model, nets.DenseNet):
        for name in ("features.transition2", "features.transition1"):
            if name in names:
                return name
    if isinstance(model, (nets.ResNet, nets.SENet)) and "layer2" in names:
        return "layer2"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass target_layer explicitly")
    return convs[len(convs) // 2]
