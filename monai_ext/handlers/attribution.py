"""An ignite handler that runs an attributor on each evaluated batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch

from monai_ext.attribution.base import Attributor

__all__ = ["AttributionHandler", "per_sample", "lookup"]


def per_sample(data: Any) -> list:
    """The per-sample items of ``engine.state.output`` or ``engine.state.batch``.

    MONAI evaluators decollate both into lists of dicts by default (``decollate=True``); with
    ``decollate=False`` they stay batched dicts, which are decollated here (without copying
    ``engine.state``).
    """
    if data is None:
        return []
    if isinstance(data, list):
        return data
    if isinstance(data, (dict, tuple)):
        return decollate_batch(data, detach=True)
    raise TypeError(f"cannot split {type(data).__name__} into samples")


def lookup(key: str, *items: Any) -> Any:
    """The value of ``key`` in the first of ``items`` (dicts) that has it, else in the metadata of
    their ``image`` entry (a MetaTensor's ``meta`` or an ``image_meta_dict``); ``None`` if absent."""
    for item in items:
        if isinstance(item, dict) and key in item:
            return item[key]
    for item in items:
        if not isinstance(item, dict):
            continue
        image = item.get("image")
        if isinstance(image, MetaTensor) and key in image.meta:
            return image.meta[key]
        meta = item.get("image_meta_dict")
        if isinstance(meta, dict) and key in meta:
            return meta[key]
    return None


def _class_index(value: Any) -> int:
    t = torch.as_tensor(value.as_tensor() if hasattr(value, "as_tensor") else value)
    return int(t.argmax()) if t.numel() > 1 else int(t.reshape(-1)[0].round())


class AttributionHandler:
    """Attribute every batch an evaluator processes and put the maps into its output.

    Attach it to a MONAI ``SupervisedEvaluator`` (or any ignite engine whose ``state.output``
    holds the input images): at ``ITERATION_COMPLETED`` it runs ``attributor`` on the batch and
    stores the maps under ``output_key``: in each per-sample dict when the output is decollated (a
    (1, H, W) map, a MetaTensor carrying the image's metadata), or as a (B, 1, H, W) tensor in a
    batched dict output. Attach it before handlers that read the maps (e.g.
    :class:`~monai_ext.handlers.HeatmapSaver`): ignite runs handlers in the order they were added.

    Args:
        attributor: an :class:`~monai_ext.attribution.Attributor` (its model is usually the
            evaluator's network).
        output_key: where the maps go.
        image_key: key of the input images in the output (and batch) dicts.
        target: ``None`` for each slice's predicted class, an ``int`` for one class, a key whose
            per-sample value gives the class (a label index, or one-hot / logits: argmax), or
            ``callable(engine) -> targets``.
        batch_transform: ``callable(engine.state.batch) -> images (B, C, H, W)``, to take the
            images from the batch instead of the output.

    Raises:
        TypeError: if ``attributor`` is not an Attributor.

    Example::

        evaluator = SupervisedEvaluator(device, loader, net, postprocessing=post)
        AttributionHandler(IBA(net, estimator=est)).attach(evaluator)
        HeatmapSaver("out/heatmaps").attach(evaluator)
        evaluator.run()
    """

    def __init__(self, attributor: Attributor, output_key: str = "heatmap", image_key: str = "image",
                 target: int | str | Callable[[Engine], Any] | None = None,
                 batch_transform: Callable[[Any], torch.Tensor] | None = None) -> None:
        if not isinstance(attributor, Attributor):
            raise TypeError(f"attributor must be an Attributor, got {type(attributor).__name__}")
        self.attributor = attributor
        self.output_key = output_key
        self.image_key = image_key
        self.target = target
        self.batch_transform = batch_transform

    def attach(self, engine: Engine) -> None:
        """Run at every ``ITERATION_COMPLETED`` of ``engine``."""
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _images(self, engine: Engine, outputs: list, batches: list) -> torch.Tensor:
        output = engine.state.output
        if self.batch_transform is not None:
            images = self.batch_transform(engine.state.batch)
        elif isinstance(output, dict) and self.image_key in output:
            images = output[self.image_key]
        else:
            items = [lookup(self.image_key, o, b) for o, b in zip(outputs, batches or [{}] * len(outputs))]
            if not items or any(i is None for i in items):
                raise KeyError(f"AttributionHandler: no {self.image_key!r} in the engine output or batch")
            images = torch.stack([torch.as_tensor(i) for i in items])
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("AttributionHandler needs a (B, C, H, W) image batch")
        return images

    def _targets(self, engine: Engine, outputs: list, batches: list) -> Any:
        if self.target is None or isinstance(self.target, int):
            return self.target
        if callable(self.target):
            return self.target(engine)
        values = [lookup(self.target, o, b) for o, b in zip(outputs, batches or [{}] * len(outputs))]
        if not values or any(v is None for v in values):
            raise KeyError(f"AttributionHandler: no target {self.target!r} for every sample")
        return [_class_index(v) for v in values]

    def __call__(self, engine: Engine) -> None:
        """Attribute the engine's current batch and store the maps in ``engine.state.output``.

        Raises:
            KeyError: if the images (or the target key) cannot be found.
            TypeError: if the engine output is neither a list of dicts nor a dict.
        """
        output = engine.state.output
        if not isinstance(output, (list, dict)):
            raise TypeError(f"AttributionHandler cannot store maps in a {type(output).__name__} output")
        outputs = per_sample(output)
        batches = per_sample(engine.state.batch) if isinstance(engine.state.batch, (list, dict)) else []
        images = self._images(engine, outputs, batches)
        maps = self.attributor(images, target=self._targets(engine, outputs, batches))
        if isinstance(output, dict):
            output[self.output_key] = maps
            return
        for item, m in zip(output, maps):
            image = item.get(self.image_key)
            item[self.output_key] = MetaTensor(m, meta=dict(image.meta)) if isinstance(image, MetaTensor) else m
