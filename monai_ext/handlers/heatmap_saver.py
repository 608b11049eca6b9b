"""An ignite handler that stacks per-slice heatmaps into a volume and writes it on the input grid."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from monai_ext.handlers.attribution import lookup, per_sample
from monai_ext.io import atomic_path, write_like

__all__ = ["HeatmapSaver"]

log = logging.getLogger(__name__)

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.as_tensor() if hasattr(value, "as_tensor") else value
        return value.numpy()
    return np.asarray(value)


def _scalar(value: Any) -> Any:
    arr = _numpy(value) if isinstance(value, (torch.Tensor, np.ndarray)) else value
    if isinstance(arr, np.ndarray):
        if arr.size != 1:
            raise ValueError(f"expected a single value, got shape {arr.shape}")
        return arr.reshape(-1)[0].item()
    return arr


def _stem(study: Any) -> str:
    name = Path(str(study)).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


class _Study:
    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray | None, reference: Any,
                 expected: int | None) -> None:
        self.shape, self.affine, self.reference, self.expected = shape, affine, reference, expected
        self.slices: dict[int, np.ndarray] = {}


class HeatmapSaver:
    """Collect the per-slice maps of each study and write them as one volume on the input grid.

    Each sample (a per-sample dict of ``engine.state.output`` / ``engine.state.batch``, or the
    metadata of its image) must say which study and which slice it is, and describe the volume
    its slices were cut from (the processing grid, usually the RAS-oriented input):

    * ``study_key``: study identifier (default falls back to the image's ``filename_or_obj``);
      the output file is ``<output_dir>/<study name>_<output_postfix><output_ext>``;
    * ``slice_key``: index of the slice along the last axis of the volume;
    * ``shape_key``: the volume's spatial shape (X, Y, Z); a map of another in-plane size is
      refused unless ``resize=True`` (then resized bilinearly; crops must be inverted before);
    * ``affine_key`` (optional): the volume's 4x4 voxel-to-RAS affine; without it the volume is
      taken to be on the reference grid already;
    * ``reference_key`` (optional): the input image the study came from (its path or its MONAI
      metadata). With it the volume is written with :func:`monai_ext.io.write_like`, i.e.
      voxel-exactly on the input's own grid (axis order, flips, origin, spacing, direction);
      without it a NIfTI with the volume's affine is written;
    * ``num_slices_key`` (optional): how many slices of the study will come; the study is
      written as soon as they have all arrived. Studies still incomplete at ``EPOCH_COMPLETED``
      are written then (slices never seen are 0).

    Args:
        output_dir: folder of the written volumes.
        heatmap_key: key of the maps (as written by :class:`AttributionHandler`).
        study_key, slice_key, shape_key, affine_key, reference_key, num_slices_key: see above.
        output_postfix: appended to the study name.
        output_ext: file extension (format): ``.nii.gz`` by default.
        resize: resize maps whose size differs from the volume's in-plane size.
        dtype: pixel type written.

    Attributes:
        written: study identifier -> path of the file written for it.

    Raises:
        ValueError (during a run): if a sample lacks its study, slice or volume shape, or a map's
            size does not fit the volume.

    Example::

        HeatmapSaver("out", reference_key="reference").attach(evaluator)
    """

    def __init__(self, output_dir: str | os.PathLike, heatmap_key: str = "heatmap", study_key: str = "study_id",
                 slice_key: str = "slice_index", shape_key: str = "volume_shape",
                 affine_key: str = "volume_affine", reference_key: str = "reference",
                 num_slices_key: str = "num_slices", output_postfix: str = "heatmap", output_ext: str = ".nii.gz",
                 resize: bool = False, dtype: str | np.dtype = "float32") -> None:
        self.output_dir = Path(output_dir)
        self.heatmap_key, self.study_key, self.slice_key = heatmap_key, study_key, slice_key
        self.shape_key, self.affine_key, self.reference_key = shape_key, affine_key, reference_key
        self.num_slices_key = num_slices_key
        self.output_postfix, self.output_ext = output_postfix, output_ext
        self.resize, self.dtype = resize, np.dtype(dtype)
        self.written: dict[str, Path] = {}
        self._pending: dict[str, _Study] = {}

    def attach(self, engine: Engine) -> None:
        """Collect at every ``ITERATION_COMPLETED``; write what is left at ``EPOCH_COMPLETED``."""
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if not engine.has_event_handler(self.flush, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.flush)

    # --------------------------------------------------------------------------------------------
    def __call__(self, engine: Engine) -> None:
        """Add the maps of the engine's current batch; write the studies that became complete."""
        outputs = per_sample(engine.state.output)
        batches = per_sample(engine.state.batch) if isinstance(engine.state.batch, (list, dict)) else []
        batches = batches if len(batches) == len(outputs) else [{}] * len(outputs)
        for out, batch in zip(outputs, batches):
            self.add(out, batch)

    def add(self, *items: dict) -> None:
        """Add one sample, described by its dicts (output first, then batch)."""
        heat = lookup(self.heatmap_key, *items)
        if heat is None:
            raise ValueError(f"HeatmapSaver: no {self.heatmap_key!r} in the sample (attach AttributionHandler first)")
        study = lookup(self.study_key, *items)
        if study is None:
            study = lookup("filename_or_obj", *items)
        index = lookup(self.slice_key, *items)
        shape = lookup(self.shape_key, *items)
        if study is None or index is None or shape is None:
            missing = [k for k, v in ((self.study_key, study), (self.slice_key, index), (self.shape_key, shape))
                       if v is None]
            raise ValueError(f"HeatmapSaver: the sample lacks {', '.join(map(repr, missing))}")
        study = str(_scalar(study))
        index = int(_scalar(index))
        shape = tuple(int(s) for s in _numpy(shape).reshape(-1))
        if len(shape) != 3:
            raise ValueError(f"HeatmapSaver: volume shape must be (X, Y, Z), got {shape}")
        if not 0 <= index < shape[2]:
            raise ValueError(f"HeatmapSaver: slice {index} is outside a volume of {shape[2]} slices ({study})")
        if study in self.written:
            warnings.warn(f"HeatmapSaver: more slices of {study} after it was written; writing it again",
                          stacklevel=2)
            del self.written[study]
        entry = self._pending.get(study)
        if entry is None:
            affine = lookup(self.affine_key, *items)
            expected = lookup(self.num_slices_key, *items)
            entry = _Study(shape, None if affine is None else _numpy(affine).astype(np.float64).reshape(4, 4),
                           lookup(self.reference_key, *items), None if expected is None else int(_scalar(expected)))
            self._pending[study] = entry
        entry.slices[index] = self._plane(heat, shape)
        if entry.expected is not None and len(entry.slices) >= entry.expected:
            self.write(study)

    def _plane(self, heat: Any, shape: tuple[int, int, int]) -> np.ndarray:
        t = heat.as_tensor() if hasattr(heat, "as_tensor") else torch.as_tensor(heat)
        t = t.detach().float().cpu()
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise ValueError(f"HeatmapSaver: expected a (1, H, W) map, got shape {tuple(heat.shape)}")
        if tuple(t.shape) != shape[:2]:
            if not self.resize:
                raise ValueError(f"HeatmapSaver: map of size {tuple(t.shape)} on a volume of in-plane size "
                                 f"{shape[:2]} (invert crops first, or set resize=True)")
            t = F.interpolate(t[None, None], size=shape[:2], mode="bilinear", align_corners=False)[0, 0]
        return t.numpy()

    # --------------------------------------------------------------------------------------------
    def path_for(self, study: str) -> Path:
        """Where the volume of ``study`` is written."""
        return self.output_dir / f"{_stem(study)}_{self.output_postfix}{self.output_ext}"

    def write(self, study: str) -> Path:
        """Stack the collected slices of ``study`` (missing slices are 0) and write the volume."""
        entry = self._pending.pop(study)
        volume = np.zeros(entry.shape, dtype=self.dtype)
        for index, plane in entry.slices.items():
            volume[:, :, index] = plane
        path = self.path_for(study)
        if entry.reference is not None:
            write_like(volume, entry.reference, path, affine=entry.affine, dtype=self.dtype)
        else:
            affine = entry.affine if entry.affine is not None else np.eye(4)
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(volume, affine), str(tmp))
        log.info("wrote %s (%d of %d slices)", path, len(entry.slices), entry.shape[2])
        self.written[study] = path
        return path

    def flush(self, engine: Engine | None = None) -> None:
        """Write every study still collecting (those whose slice count was not reached)."""
        for study in list(self._pending):
            entry = self._pending[study]
            if entry.expected is not None and len(entry.slices) < entry.expected:
                warnings.warn(f"HeatmapSaver: {study} got {len(entry.slices)} of {entry.expected} slices",
                              stacklevel=2)
            self.write(study)
