"""Per-study slice classification: load, lung mask, lung slices, slice probabilities."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from monai.data import MetaTensor

from monai_ext.io import load_ct
from monai_ext.transforms import LungMask
from monai_ext.transforms.slices import SliceStack, extract_slices
from pipelines.bundle import LoadedModel, predict_slices, study_probability

__all__ = ["StudyClassification", "classify_study"]


@dataclass
class StudyClassification:
    """What classifying one study gives: the CT (RAS), its lung mask, the slices and their probabilities."""

    ct: MetaTensor
    lung: MetaTensor
    stack: SliceStack
    slice_probs: torch.Tensor
    probability: float
    timings: dict[str, float] = field(default_factory=dict)


def classify_study(path: str | os.PathLike, model: LoadedModel, lung_backend: str = "auto",
                   lung_weights: str | os.PathLike | None = None, batch_size: int = 32) -> StudyClassification:
    """Lesion probability of each lung slice of a study and of the study.

    Raises:
        CTSeverityError subclasses: the input cannot be read, is not a CT, or shows no lung.
    """
    t = {}
    t0 = time.perf_counter()
    ct = load_ct(path)
    t["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lung = LungMask(backend=lung_backend, weights_path=lung_weights)(ct)
    t["lung_mask"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stack = extract_slices(ct, lung, ct.pixdim.tolist(), **model.slice_kwargs)
    t["slices"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = predict_slices(model.network, stack.images, batch_size=batch_size, device=model.device)
    t["classify"] = time.perf_counter() - t0
    return StudyClassification(ct, lung, stack, probs, study_probability(probs), t)
