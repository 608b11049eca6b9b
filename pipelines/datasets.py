"""Labelled study collections for training and evaluation, and slice datasets built from them.

Three layouts are understood:

- MosMedData-style folders: ``DATA/CT-0/*.nii.gz ... DATA/CT-4/*.nii.gz``; an optional lesion mask
  beside a study is named ``<study>_mask.nii.gz`` (MosMedData) or ``<study>_lesion.nii.gz``.
- A CSV manifest with a ``path`` column (relative to the CSV's folder or absolute), a label
  column (``label`` 0/1, ``grade`` CT-0..CT-4, or ``lesion_percent``) and optionally ``mask``.
- A folder written by ``ctseverity synth``: ``truth.csv`` (study, lesion_percent, grade) beside
  ``<study>.nii.gz`` and optional ``<study>_lesion.nii.gz``/``<study>_lung.nii.gz``.

The study label is weak: 0 for CT-0, 1 for CT-1..CT-4. Slices inherit their study's label, or,
where a lesion mask exists, are labelled by whether they hold lesion.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, PersistentDataset
from monai.transforms import Orientation, Transform
from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError, InputNotFoundError
from monai_ext.io import SITKReader, load_ct
from monai_ext.io.reader import SUPPORTED_SUFFIXES
from monai_ext.transforms import LungMask
from monai_ext.transforms.slices import DEFAULT_WINDOW, extract_slices

__all__ = [
    "StudyRecord",
    "discover_labeled",
    "split_studies",
    "prepare_study",
    "SliceDataset",
    "slice_labels_from_mask",
    "study_id",
    "label_from_grade",
    "load_ct_mask",
]

log = logging.getLogger(__name__)

_GRADE_RE = re.compile(r"^CT-?([0-4])$", re.I)
_MASK_SUFFIXES = ("_mask", "_lesion", "_lesions")
_NON_STUDY_SUFFIXES = (*_MASK_SUFFIXES, "_lung", "_heatmap", "_lesion_mask", "_lung_mask")


@dataclass
class StudyRecord:
    """One labelled study.

    Attributes:
        study: identifier (file name without suffix).
        path: the image (file or DICOM folder).
        label: 0 healthy (CT-0), 1 lesion-bearing (CT-1..CT-4).
        grade: CT-0..CT-4 when known.
        lesion_percent: known lesion share of lung volume, when known.
        mask: lesion mask on the image grid, when available.
        lung: lung mask on the image grid, when available.
    """

    study: str
    path: str
    label: int
    grade: str | None = None
    lesion_percent: float | None = None
    mask: str | None = None
    lung: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def study_id(path: str | os.PathLike) -> str:
    """The study name of an image path: the file name without image suffixes."""
    name = Path(path).name
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def label_from_grade(grade: str) -> int:
    """0 for CT-0, 1 for CT-1..CT-4."""
    m = _GRADE_RE.match(str(grade).strip())
    if not m:
        raise ValueError(f"not a MosMedData grade: {grade!r} (CT-0..CT-4 expected)")
    return int(int(m.group(1)) > 0)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES) and not p.name.startswith(".")


def _beside(image: Path, suffixes: Sequence[str]) -> str | None:
    sid = study_id(image)
    for suf in suffixes:
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            cand = image.parent / f"{sid}{suf}{ext}"
            if cand.exists():
                return str(cand)
    return None


def _from_grade_folders(root: Path) -> list[StudyRecord]:
    records = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _GRADE_RE.match(p.name)):
        grade = f"CT-{_GRADE_RE.match(sub.name).group(1)}"  # type: ignore[union-attr]
        for img in sorted(sub.iterdir()):
            if _is_image(img) and not study_id(img).endswith(_NON_STUDY_SUFFIXES):
                records.append(StudyRecord(study_id(img), str(img), label_from_grade(grade), grade,
                                           mask=_beside(img, _MASK_SUFFIXES), lung=_beside(img, ("_lung",))))
    return records


def _from_csv(path: Path) -> list[StudyRecord]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise CTSeverityError("the manifest has no rows", path)
    cols = set(rows[0])
    if not ({"path", "study"} & cols):
        raise CTSeverityError("the manifest needs a 'path' (or 'study') column", path)
    if not ({"label", "grade", "lesion_percent"} & cols):
        raise CTSeverityError("the manifest needs a 'label', 'grade' or 'lesion_percent' column", path)
    base = path.parent
    records = []
    for i, row in enumerate(rows, start=2):
        img = row.get("path") or ""
        if not img:
            sid = row["study"]
            found = [base / f"{sid}{ext}" for ext in (".nii.gz", ".nii", ".nrrd", ".mha")
                     if (base / f"{sid}{ext}").exists()]
            if not found and (base / sid).is_dir():
                found = [base / sid]
            if not found:
                raise InputNotFoundError(f"line {i}: no image for study {sid!r} beside the manifest", path)
            img_path = found[0]
        else:
            img_path = Path(img) if Path(img).is_absolute() else base / img
        grade = (row.get("grade") or "").strip() or None
        pct = row.get("lesion_percent")
        pct_f = float(pct) if pct not in (None, "") else None
        if row.get("label") not in (None, ""):
            label = int(float(row["label"]) > 0)
        elif grade:
            label = label_from_grade(grade)
        elif pct_f is not None:
            label = int(pct_f > 0)
        else:
            raise CTSeverityError(f"line {i}: no label, grade or lesion_percent", path)
        mask = row.get("mask") or None
        if mask and not Path(mask).is_absolute():
            mask = str(base / mask)
        records.append(StudyRecord(row.get("study") or study_id(img_path), str(img_path), label, grade, pct_f,
                                   mask or _beside(img_path, _MASK_SUFFIXES), _beside(img_path, ("_lung",))))
    return records


def discover_labeled(data: str | os.PathLike) -> list[StudyRecord]:
    """Find the labelled studies of ``data`` (grade folders, a CSV manifest, or a synth folder).

    Raises:
        InputNotFoundError: ``data`` or a listed image does not exist.
        CTSeverityError: no labelled study found, or a malformed manifest.
    """
    root = Path(data)
    if not root.exists():
        raise InputNotFoundError("no such file or folder", root)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise CTSeverityError("expected a folder of CT-0..CT-4 subfolders or a CSV manifest", root)
        records = _from_csv(root)
    elif (root / "truth.csv").exists():
        records = _from_csv(root / "truth.csv")
    else:
        records = _from_grade_folders(root)
    if not records:
        raise CTSeverityError("no labelled studies found (expected CT-0..CT-4 subfolders, truth.csv or a "
                              "CSV manifest)", root)
    for r in records:
        if not Path(r.path).exists():
            raise InputNotFoundError(f"study {r.study}: image not found", r.path)
    return records


def split_studies(records: Sequence[StudyRecord], val_fraction: float = 0.3, seed: int = 0
                  ) -> tuple[list[StudyRecord], list[StudyRecord]]:
    """Study-level split stratified by label (and by grade when known), with a fixed seed.

    No study lands in both sets; each stratum with at least two studies has at least one in each.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    strata: dict[str, list[StudyRecord]] = {}
    for r in sorted(records, key=lambda r: r.study):
        strata.setdefault(f"{r.label}", []).append(r)
    train, val = [], []
    for key in sorted(strata):
        group = strata[key]
        order = rng.permutation(len(group))
        n_val = int(round(val_fraction * len(group)))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        for j, i in enumerate(order):
            (val if j < n_val else train).append(group[i])
    return train, val


def slice_labels_from_mask(mask: torch.Tensor, lung: torch.Tensor, indices: torch.Tensor,
                           min_fraction: float = 0.01) -> torch.Tensor:
    """Per-slice labels from a lesion mask: 1 where lesion covers at least ``min_fraction`` of the
    slice's lung, 0 where there is none, -1 (ambiguous, left out of training) in between."""
    m = mask.reshape(mask.shape[-3:]) > 0
    lu = lung.reshape(lung.shape[-3:]) > 0
    les = (m & lu)[:, :, indices].sum(dim=(0, 1)).float()
    area = lu[:, :, indices].sum(dim=(0, 1)).float().clamp_min(1.0)
    frac = les / area
    labels = torch.full_like(frac, -1, dtype=torch.long)
    labels[les == 0] = 0
    labels[frac >= min_fraction] = 1
    return labels


def prepare_study(record: dict | StudyRecord, size: int = 192, context: int = 0,
                  window: Sequence[float] = DEFAULT_WINDOW, lung_backend: str = "auto",
                  use_mask_labels: bool = True, flatten_beyond_mm: float | None = None) -> dict:
    """Load a study and turn it into labelled classifier slices.

    The lung mask is the record's ``lung`` file when it has one, else computed with ``lung_backend``;
    ``flatten_beyond_mm`` flattens the body beyond that distance from the lung, as the model's input
    does at inference (:func:`~monai_ext.transforms.slices.extract_slices`).

    Returns:
        dict with ``images`` (N, C, S, S) float16, ``labels`` (N,), ``indices`` (N,), ``study``.
    """
    rec = record.to_dict() if isinstance(record, StudyRecord) else dict(record)
    ct = load_ct(rec["path"])
    if rec.get("lung"):
        lung = load_ct_mask(rec["lung"], ct)
    else:
        lung = LungMask(backend=lung_backend)(ct)
    stack = extract_slices(ct, lung, ct.pixdim.tolist(), size=size, context=context, window=window,
                           flatten_beyond_mm=flatten_beyond_mm)
    if use_mask_labels and rec.get("mask"):
        labels = slice_labels_from_mask(load_ct_mask(rec["mask"], ct), lung, stack.indices)
    else:
        labels = torch.full((len(stack),), int(rec["label"]), dtype=torch.long)
    return {"images": stack.images.half(), "labels": labels, "indices": stack.indices, "study": rec["study"]}


def load_ct_mask(path: str | os.PathLike, like: torch.Tensor) -> torch.Tensor:
    """Load a mask on the grid of the loaded CT ``like`` (same reorientation)."""
    reader = SITKReader()
    arr, meta = reader.get_data(reader.read(str(path)))
    m = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr > 0).astype(np.uint8))[None], meta=meta)
    m = Orientation(axcodes="RAS", labels=None)(m)
    if tuple(m.shape) != tuple(like.shape):
        raise CTSeverityError(f"mask grid {tuple(m.shape[1:])} differs from the image grid {tuple(like.shape[1:])}",
                              path)
    return m


def _record_hash(record: dict) -> bytes:
    """Cache key of a study record (paths, labels, masks)."""
    return hashlib.md5(repr(sorted(record.items())).encode()).hexdigest().encode()


class _PrepareTransform(Transform):
    """Deterministic, picklable transform for :class:`~monai.data.PersistentDataset`: record dict ->
    prepared slices. (Being a MONAI ``Transform`` that is not random is what lets the dataset cache
    its output.)"""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs

    def __call__(self, record: dict) -> dict:
        return prepare_study(record, **self.kwargs)


class SliceDataset(torch.utils.data.Dataset):
    """Labelled slices of a list of studies, preprocessed once per study and cached on disk.

    The per-study preprocessing (load, lung mask, slice extraction, labels) runs through MONAI's
    :class:`~monai.data.PersistentDataset`, so a second epoch or a second run with the same
    ``cache_dir`` reads the prepared slices back. Ambiguous slices (label -1) are left out.

    Args:
        records: studies (``StudyRecord`` or dicts).
        cache_dir: folder of the persistent cache; ``None`` keeps everything in memory only.
        transform: slice-level transform (augmentation) applied to ``{"image", "label"}`` dicts.
        size, context, window, lung_backend, use_mask_labels, flatten_beyond_mm: see :func:`prepare_study`.
        progress: show a progress bar while preparing studies.
        slice_stride: keep every ``slice_stride``-th slice of each study (neighbouring slices are
            nearly the same image; a stride trades little information for training time).

    Items are dicts ``{"image": (C, S, S) float32, "label": long, "study": str, "z": int}``.
    """

    def __init__(self, records: Sequence[StudyRecord | dict], cache_dir: str | os.PathLike | None = None,
                 transform: Callable | None = None, size: int = 192, context: int = 0,
                 window: Sequence[float] = DEFAULT_WINDOW, lung_backend: str = "auto",
                 use_mask_labels: bool = True, progress: bool = True, slice_stride: int = 1,
                 flatten_beyond_mm: float | None = None) -> None:
        if slice_stride < 1:
            raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
        recs = [r.to_dict() if isinstance(r, StudyRecord) else dict(r) for r in records]
        prep = _PrepareTransform(size=size, context=context, window=tuple(window), lung_backend=lung_backend,
                                 use_mask_labels=use_mask_labels, flatten_beyond_mm=flatten_beyond_mm)
        if cache_dir is not None:
            key = hashlib.sha1(repr(sorted(prep.kwargs.items())).encode()).hexdigest()[:10]
            studies = PersistentDataset(recs, transform=prep, cache_dir=Path(cache_dir) / key, hash_func=_record_hash)
        else:
            studies = [prep(r) for r in recs]  # type: ignore[assignment]
        images, labels, study, z = [], [], [], []
        for i in tqdm(range(len(recs)), desc="preparing studies", unit="study", disable=not progress):
            item = studies[i]
            keep = item["labels"] >= 0
            if slice_stride > 1:
                keep &= torch.arange(len(keep)) % slice_stride == 0
            images.append(item["images"][keep])
            labels.append(item["labels"][keep])
            study += [item["study"]] * int(keep.sum())
            z.append(item["indices"][keep])
        self.images = torch.cat(images) if images else torch.zeros(0, 1, size, size, dtype=torch.float16)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        self.z = torch.cat(z) if z else torch.zeros(0, dtype=torch.long)
        self.study = study
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i].float(), "label": self.labels[i], "study": self.study[i], "z": int(self.z[i])}
        return self.transform(item) if self.transform is not None else item

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency class weights (mean 1) for a weighted loss."""
        counts = torch.bincount(self.labels, minlength=2).float().clamp_min(1.0)
        w = counts.sum() / (2.0 * counts)
        return w / w.mean()
