"""Classifier-ready slices with lung and lesion masks, for evaluating attribution maps.

Two kinds of data set are understood (:func:`load_eval_slices` picks the kind):

- **CT studies** (NIfTI, NRRD, MHA, DICOM series) with optional lesion masks, in any layout of
  :func:`pipelines.datasets.discover_labeled` (CT-0..CT-4 folders, a CSV manifest, a folder with
  ``truth.csv`` as written by ``ctseverity synth``) or any folder of studies
  (:func:`pipelines.discovery.find_studies`, no labels then). A lesion mask beside a study is
  ``<study>_lesion.nii.gz`` or ``<study>_mask.nii.gz``; a lung mask ``<study>_lung.nii.gz`` is used
  when present, otherwise the lung is segmented (:class:`~monai_ext.transforms.LungMask`). Slices
  are extracted exactly as the severity pipeline does (:func:`~monai_ext.transforms.slices.extract_slices`:
  lung box, HU window of the model, resize), and the masks go through the same geometry.
- **2D image/mask pairs** (PNG, JPEG, BMP, TIFF): images in a folder named ``images`` (or ``imgs``)
  with masks of the same file stem in a sibling folder (``infection_mask``, ``masks``, ``mask``,
  ``gt``, ``labels``, ``lesion``), or ``<name>_mask.png`` / ``<name>_lesion.png`` beside
  ``<name>.png``. Any non-zero mask value is lesion. This is the layout of the MedSeg COVID-19
  slices distributed with Inf-Net.

2D slices carry no Hounsfield units. Gray value ``g`` in 0..255 is read as
``HU = lo + g / 255 * (hi - lo)`` with an assumed display window ``(lo, hi)``
(:data:`DEFAULT_IMAGE_WINDOW`, about the median of what the MedSeg JPEGs show: lung parenchyma
(about -850 HU) at gray 27-60 and soft tissue (about +40 HU) at gray 195-230), and then mapped to
the classifier's input with the model's own window through
:func:`~monai_ext.transforms.slices.window_hu`, as CT slices are. The slice is padded with air to a
square and resized to the model's input size. Without a lung mask beside it (a sibling folder
``lung_mask``/``lungs``), the lung is the dark (< -500 HU under the window assumption) regions
that do not reach an image corner, joined with the lesion mask, closed and hole-filled.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError, InputNotFoundError
from monai_ext.transforms.slices import extract_slices, flatten_surroundings, lung_slice_indices, window_hu
from pipelines.bundle import LoadedModel

__all__ = [
    "EvalSlices",
    "ImagePair",
    "IMAGE_SUFFIXES",
    "DEFAULT_IMAGE_WINDOW",
    "DEFAULT_IMAGE_ROTATION",
    "find_image_pairs",
    "image_to_hu",
    "lung_mask_2d",
    "load_image_pairs",
    "find_eval_studies",
    "load_studies",
    "load_eval_slices",
    "pick_slices",
]

log = logging.getLogger(__name__)

#: suffixes of 2D image files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: assumed HU window of 8-bit 2D slices: gray 0 -> lo, 255 -> hi
DEFAULT_IMAGE_WINDOW = (-1100.0, 250.0)
#: counter-clockwise quarter turns (in degrees) that bring 2D slices to the classifier's layout; 180
#: for the MedSeg / Inf-Net JPEGs, whose rows run towards the patient's left and columns towards
#: the back (the classifier sees RAS slices: rows towards the patient's right, columns to the front)
DEFAULT_IMAGE_ROTATION = 180
_IMAGE_DIRS = ("images", "imgs", "image", "img")
_MASK_DIRS = ("infection_mask", "masks", "mask", "gt", "labels", "label", "lesion", "lesions", "lesion_mask")
_LUNG_DIRS = ("lung_mask", "lung_masks", "lungs", "lung")
_MASK_TAILS = ("_mask", "_lesion", "_gt")
#: HU of healthy lung parenchyma; darker pixels of a 2D slice are lung candidates below -500 HU
_LUNG_HU = -500.0


@dataclass
class EvalSlices:
    """Slices of a data set, ready for the classifier and the metrics.

    Attributes:
        images: (N, C, S, S) float in [0, 1], the classifier input.
        lung: (N, 1, S, S) bool lung masks.
        lesion: (N, 1, S, S) bool lesion masks (all False where ``has_mask`` is False).
        has_mask: (N,) bool, whether the slice has a lesion mask.
        labels: (N,) long: 1 lesion, 0 no lesion, -1 unknown or ambiguous.
        source: the study (or image) each slice comes from.
        index: the axial index of each slice in its study (0 for 2D images).
        kind: ``"studies"`` or ``"images"``.
        study_paths: the CT studies the slices come from (empty for 2D images).
        notes: what was assumed or skipped, for the report.
        screen_probability: (M,) the classifier's lesion probability of every lung slice of the
            studies (not only the evaluated ones), for the slice AUC; ``None`` for 2D images.
        screen_labels: (M,) long labels of those slices (as ``labels``).
        screen_slices: (study, axial index) of each of those slices.
    """

    images: torch.Tensor
    lung: torch.Tensor
    lesion: torch.Tensor
    has_mask: torch.Tensor
    labels: torch.Tensor
    source: list[str]
    index: list[int]
    kind: str
    study_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    screen_probability: torch.Tensor | None = None
    screen_labels: torch.Tensor | None = None
    screen_slices: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def lesion_fraction(self) -> torch.Tensor:
        """(N,) lesion pixels inside the lung / lung pixels (NaN without a mask)."""
        les = (self.lesion & self.lung).flatten(1).sum(1).double()
        lung = self.lung.flatten(1).sum(1).double().clamp(min=1)
        return torch.where(self.has_mask, les / lung, torch.full_like(les, float("nan")))

    @property
    def localizable(self) -> torch.Tensor:
        """(N,) bool: slices with lesion inside the lung (where localization metrics are defined)."""
        return self.has_mask & (self.lesion & self.lung).flatten(1).any(1)


def _seed_for(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def pick_slices(labels: Sequence[int], n: int | None, seed: int, name: str, positive_share: float = 0.75) -> list[int]:
    """Positions of at most ``n`` slices: lesion slices first (up to ``positive_share`` of ``n``), the
    rest negatives, topped up from either side when one runs out; the same for a given seed and name.

    Args:
        labels: per candidate slice 1 (lesion), 0 (none) or -1 (unknown).
        n: most slices (``None``: all).
        seed: sampling seed.
        name: study name (each study draws its own sample).
        positive_share: target share of lesion slices.
    """
    lab = np.asarray(labels)
    if n is None or n >= lab.size:
        return list(range(lab.size))
    rng = _seed_for(seed, name)
    pos = rng.permutation(np.flatnonzero(lab == 1))
    neg = rng.permutation(np.flatnonzero(lab == 0))
    unk = rng.permutation(np.flatnonzero(lab < 0))
    if pos.size == 0 and neg.size == 0:
        return sorted(unk[:n].tolist())
    n_pos = min(pos.size, int(np.ceil(positive_share * n)))
    n_neg = min(neg.size, n - n_pos)
    n_pos = min(pos.size, n - n_neg)
    return sorted(pos[:n_pos].tolist() + neg[:n_neg].tolist())


# ------------------------------------------------------------------------------------------------
# CT studies


def find_eval_studies(data: str | os.PathLike) -> list:
    """The studies of ``data`` as :class:`~pipelines.datasets.StudyRecord` (label -1 when unknown).

    Labelled layouts go through :func:`~pipelines.datasets.discover_labeled`; a plain folder of
    studies through :func:`~pipelines.discovery.find_studies`, with lesion and lung masks looked up
    beside each study.

    Raises:
        InputNotFoundError: ``data`` does not exist.
        CTSeverityError: no study found.
    """
    from pipelines.datasets import _MASK_SUFFIXES, StudyRecord, _beside, discover_labeled
    from pipelines.discovery import find_studies

    root = Path(data)
    if not root.exists():
        raise InputNotFoundError("no such file or folder", root)
    if (root.is_file() and root.suffix.lower() == ".csv") or (root / "truth.csv").exists():
        return discover_labeled(root)
    if root.is_dir():
        try:
            return discover_labeled(root)
        except CTSeverityError as exc:
            if "no labelled studies" not in exc.reason:
                raise
    records = []
    for st in find_studies([root]):
        p = Path(st.path)
        records.append(StudyRecord(st.study, st.path, -1, mask=_beside(p, _MASK_SUFFIXES) if p.is_file() else None,
                                   lung=_beside(p, ("_lung",)) if p.is_file() else None))
    return records


def _mask_slices(volume: torch.Tensor, lung: torch.Tensor, spacing: Sequence[float], size: int,
                 indices: torch.Tensor) -> torch.Tensor:
    """A 0/1 volume through the slice geometry of :func:`extract_slices`, as bool (N, 1, S, S)."""
    stack = extract_slices(volume.float(), lung, spacing, size=size, context=0, window=(0.0, 1.0), indices=indices)
    return stack.images >= 0.5


def load_studies(records: Sequence, model: LoadedModel, max_slices: int | None = None, seed: int = 0,
                 lung_backend: str = "auto", progress: bool = True) -> EvalSlices:
    """Lung slices of CT studies (at most ``max_slices`` per study, see :func:`pick_slices`).

    Slice labels come from the lesion mask where there is one
    (:func:`~pipelines.datasets.slice_labels_from_mask`), else from the study label (all slices of a
    CT-0 study are 0; of a lesion-bearing study 1, a weak label). Every lung slice is also scored
    by the classifier (``screen_probability``, ``screen_labels``: the slice AUC of the model). A
    study that cannot be read or shows no lung is skipped with a warning.

    Raises:
        CTSeverityError: no slice at all.
    """
    from monai_ext.io import load_ct
    from monai_ext.transforms import LungMask
    from pipelines.bundle import predict_slices
    from pipelines.datasets import load_ct_mask, slice_labels_from_mask

    parts: dict[str, list] = {k: [] for k in ("images", "lung", "lesion", "has_mask", "labels")}
    screen_p: list[torch.Tensor] = []
    screen_y: list[torch.Tensor] = []
    screen_slices: list[tuple[str, int]] = []
    source: list[str] = []
    index: list[int] = []
    paths: list[str] = []
    notes: list[str] = []
    for rec in tqdm(records, desc="loading studies", unit="study", disable=not progress or len(records) < 2):
        try:
            ct = load_ct(rec.path)
            lung = load_ct_mask(rec.lung, ct) if rec.lung else LungMask(backend=lung_backend)(ct)
            lung = (torch.as_tensor(np.asarray(lung)) > 0).to(torch.uint8)
            lesion = load_ct_mask(rec.mask, ct) if rec.mask else None
            spacing = [float(v) for v in ct.pixdim.tolist()]
            candidates = lung_slice_indices(lung)
            if candidates.numel() == 0:
                raise CTSeverityError("no lung found", rec.path)
            if lesion is not None:
                labels = slice_labels_from_mask(torch.as_tensor(np.asarray(lesion)), lung, candidates)
            else:
                labels = torch.full((candidates.numel(),), int(rec.label), dtype=torch.long)
            chosen = torch.as_tensor(pick_slices(labels.tolist(), max_slices, seed, rec.study), dtype=torch.long)
            idx = candidates[chosen]
            every = extract_slices(ct, lung, spacing, indices=candidates, **model.slice_kwargs)
            images = every.images[chosen]
        except CTSeverityError as exc:
            log.warning("skipping study %s: %s", rec.study, exc)
            notes.append(f"skipped {rec.study}: {exc.reason}")
            continue
        n = int(images.shape[0])
        screen_p.append(predict_slices(model.network, every.images, device=model.device))
        screen_y.append(labels)
        screen_slices += [(rec.study, int(z)) for z in candidates]
        parts["images"].append(images)
        parts["lung"].append(_mask_slices(lung, lung, spacing, model.size, idx))
        if lesion is not None:
            parts["lesion"].append(_mask_slices(torch.as_tensor(np.asarray(lesion)), lung, spacing, model.size, idx))
        else:
            parts["lesion"].append(torch.zeros(n, 1, model.size, model.size, dtype=torch.bool))
        parts["has_mask"].append(torch.full((n,), lesion is not None, dtype=torch.bool))
        parts["labels"].append(labels[chosen])
        source += [rec.study] * n
        index += [int(z) for z in idx]
        paths.append(str(rec.path))
    if not source:
        raise CTSeverityError("no slice to evaluate: no study could be read" + (f" ({notes[0]})" if notes else ""))
    return EvalSlices(**{k: torch.cat(v) for k, v in parts.items()}, source=source, index=index, kind="studies",
                      study_paths=paths, notes=notes, screen_probability=torch.cat(screen_p),
                      screen_labels=torch.cat(screen_y), screen_slices=screen_slices)


# ------------------------------------------------------------------------------------------------
# 2D image/mask pairs


@dataclass(frozen=True)
class ImagePair:
    """A 2D slice, its lesion mask and lung mask (``None`` where absent), and a unique name."""

    name: str
    image: str
    mask: str | None = None
    lung: str | None = None


def _is_2d(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _same_stem(folder: Path | None, stem: str) -> str | None:
    if folder is None:
        return None
    for suf in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suf}", folder / f"{stem}{suf.upper()}"):
            if cand.is_file():
                return str(cand)
    return None


def _sibling(folder: Path, names: Sequence[str]) -> Path | None:
    for sub in sorted(folder.parent.iterdir()) if folder.parent.is_dir() else []:
        if sub.is_dir() and sub.name.lower() in names and sub != folder:
            return sub
    return None


def find_image_pairs(data: str | os.PathLike) -> list[ImagePair]:
    """The 2D slices under ``data`` with their lesion (and lung) masks, sorted by name.

    Image folders (``images``, ``imgs``) anywhere under ``data`` (or ``data`` itself) take their
    masks from a sibling mask folder by file stem; other folders pair ``<name>.png`` with
    ``<name>_mask.png`` / ``<name>_lesion.png``. An image without a mask is kept (no localization).

    Raises:
        InputNotFoundError: ``data`` does not exist.
    """
    root = Path(data)
    if not root.exists():
        raise InputNotFoundError("no such file or folder", root)
    pairs: list[ImagePair] = []
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if _is_2d(p))
        if not files:
            continue
        rel = folder.relative_to(root).as_posix()
        if folder.name.lower() in _IMAGE_DIRS:
            masks, lungs = _sibling(folder, _MASK_DIRS), _sibling(folder, _LUNG_DIRS)
            prefix = folder.parent.relative_to(root).as_posix() if folder != root else ""
            for f in files:
                name = f"{prefix}/{f.stem}" if prefix and prefix != "." else f.stem
                pairs.append(ImagePair(name, str(f), _same_stem(masks, f.stem), _same_stem(lungs, f.stem)))
        elif folder.name.lower() not in (*_MASK_DIRS, *_LUNG_DIRS) and "mask" not in folder.name.lower():
            stems = {f.stem for f in files}
            for f in files:
                if f.stem.lower().endswith((*_MASK_TAILS, "_lung")):
                    continue
                mask = next((_same_stem(folder, f.stem + t) for t in _MASK_TAILS if f.stem + t in stems), None)
                lung = _same_stem(folder, f.stem + "_lung") if f.stem + "_lung" in stems else None
                name = f"{rel}/{f.stem}" if rel != "." else f.stem
                pairs.append(ImagePair(name, str(f), mask, lung))
    return sorted(pairs, key=lambda p: p.name)


def _read_gray(path: str | os.PathLike, rotation: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise CTSeverityError(f"not a readable 2D image ({type(exc).__name__})", path) from None
    return np.ascontiguousarray(np.rot90(arr, k=(int(rotation) // 90) % 4))


def image_to_hu(gray: np.ndarray, window: Sequence[float] = DEFAULT_IMAGE_WINDOW) -> np.ndarray:
    """8-bit gray values of a windowed slice back to HU: ``lo + g / 255 * (hi - lo)``.

    Example:
        >>> image_to_hu(np.array([0.0, 255.0]), (-1000.0, 400.0)).tolist()
        [-1000.0, 400.0]
    """
    lo, hi = float(window[0]), float(window[1])
    return lo + np.asarray(gray, dtype=np.float32) / 255.0 * (hi - lo)


def lung_mask_2d(hu: np.ndarray, lesion: np.ndarray | None = None, min_fraction: float = 0.01) -> np.ndarray:
    """A rough lung mask of a 2D slice cropped around the lungs.

    Pixels below -500 HU form the candidates; components that reach an image corner (air around
    the body) are dropped, the lesion mask is added, the result is closed (about 1 % of the image
    side) and hole-filled, components under ``min_fraction`` of the image are removed, and every
    lesion pixel is lung.
    """
    dark = hu < _LUNG_HU
    labels, _ = ndimage.label(dark)
    corners = {int(labels[0, 0]), int(labels[0, -1]), int(labels[-1, 0]), int(labels[-1, -1])} - {0}
    keep = dark & ~np.isin(labels, sorted(corners))
    if lesion is not None:
        keep |= lesion
    radius = max(1, round(0.01 * max(hu.shape)))
    keep = ndimage.binary_closing(keep, structure=ndimage.generate_binary_structure(2, 1), iterations=radius)
    keep = ndimage.binary_fill_holes(keep)
    labels, n = ndimage.label(keep)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.isin(labels, 1 + np.flatnonzero(sizes >= min_fraction * keep.size))
    return keep if lesion is None else keep | lesion


def _to_square(a: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """(C, H, W) padded centrally to a square with ``fill`` and resized (bilinear, antialiased, as
    :func:`extract_slices` does) to ``size`` x ``size``."""
    _, h, w = a.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    a = F.pad(a, (left, side - w - left, top, side - h - top), value=fill)
    return F.interpolate(a[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def load_image_pairs(pairs: Sequence[ImagePair], model: LoadedModel, window: Sequence[float] = DEFAULT_IMAGE_WINDOW,
                     rotation: int = DEFAULT_IMAGE_ROTATION, max_images: int | None = None, seed: int = 0,
                     progress: bool = True) -> EvalSlices:
    """2D slices as classifier input (see the module docstring for the HU assumption).

    Args:
        pairs: from :func:`find_image_pairs`.
        model: the classifier (input size, 2.5D context and HU window).
        window: assumed HU window of the 8-bit images.
        rotation: counter-clockwise rotation in degrees (multiple of 90) applied to image and masks.
        max_images: most images (a seeded sample, lesion slices first; ``None``: all).
        seed: sampling seed.

    Raises:
        ValueError: a window that is not increasing or a rotation that is not a multiple of 90.
        CTSeverityError: an unreadable image, or a mask of another size than its image.
    """
    if not float(window[1]) > float(window[0]):
        raise ValueError(f"--image-window must be LO,HI with LO < HI, got {tuple(window)}")
    if int(rotation) % 90:
        raise ValueError(f"--image-rotation must be a multiple of 90 degrees, got {rotation}")
    labels_guess = [1 if p.mask else -1 for p in pairs]
    chosen = [pairs[i] for i in pick_slices(labels_guess, max_images, seed, "images")]
    size, channels = model.size, 1 + 2 * model.context
    air = float(window_hu(torch.tensor(-1024.0), model.window))
    parts: dict[str, list] = {k: [] for k in ("images", "lung", "lesion", "has_mask", "labels")}
    for pair in tqdm(chosen, desc="loading images", unit="image", disable=not progress or len(chosen) < 8):
        gray = _read_gray(pair.image, rotation)
        lesion = None
        if pair.mask:
            lesion = _read_gray(pair.mask, rotation) > 0
            if lesion.shape != gray.shape:
                raise CTSeverityError(f"mask size {lesion.shape} differs from its image's {gray.shape}", pair.mask)
        hu = image_to_hu(gray, window)
        lung = (_read_gray(pair.lung, rotation) > 0) if pair.lung else lung_mask_2d(hu, lesion)
        hu_t = torch.from_numpy(hu)
        if model.flatten_beyond_mm is not None:  # pixel size unknown: a 360 mm field of view
            mm = 360.0 / max(hu.shape)
            hu_t = flatten_surroundings(hu_t[:, :, None], torch.from_numpy(lung)[:, :, None], (mm, mm),
                                        model.flatten_beyond_mm)[:, :, 0]
        x = window_hu(hu_t[None], model.window)
        parts["images"].append(_to_square(x, size, air).clamp(0, 1).expand(channels, -1, -1))
        masks = torch.from_numpy(np.stack([lung, lesion if lesion is not None else np.zeros_like(lung)])).float()
        sq = _to_square(masks, size, 0.0) >= 0.5
        parts["lung"].append(sq[0:1])
        parts["lesion"].append(sq[1:2])
        parts["has_mask"].append(torch.tensor(lesion is not None))
        parts["labels"].append(torch.tensor(-1 if lesion is None else int(bool((sq[0] & sq[1]).any()))))
    notes = [f"2D slices read as HU = {window[0]:g} + gray / 255 * {window[1] - window[0]:g} (window {window[0]:g} "
             f"to {window[1]:g} HU), rotated {int(rotation) % 360} degrees; lung masks "
             + ("from files" if all(p.lung for p in chosen) else "estimated from the image (lung_mask_2d)")
             + (f"; the lung's surroundings flattened beyond {model.flatten_beyond_mm:g} mm (pixel size taken as a "
                "360 mm field of view over the image)" if model.flatten_beyond_mm is not None else "")]
    return EvalSlices(images=torch.stack(parts["images"]).contiguous(), lung=torch.stack(parts["lung"]),
                      lesion=torch.stack(parts["lesion"]), has_mask=torch.stack(parts["has_mask"]),
                      labels=torch.stack(parts["labels"]).long(), source=[p.name for p in chosen],
                      index=[0] * len(chosen), kind="images", notes=notes)


def load_eval_slices(data: str | os.PathLike, model: LoadedModel, max_slices: int | None = None,
                     max_images: int | None = None, seed: int = 0, lung_backend: str = "auto",
                     image_window: Sequence[float] = DEFAULT_IMAGE_WINDOW, image_rotation: int = DEFAULT_IMAGE_ROTATION,
                     progress: bool = True) -> EvalSlices:
    """The evaluation slices of ``data``: CT studies when there are any, else 2D image/mask pairs.

    Raises:
        InputNotFoundError: ``data`` does not exist.
        CTSeverityError: neither CT studies nor 2D images found, or nothing readable.
    """
    root = Path(data)
    if not root.exists():
        raise InputNotFoundError("no such file or folder", root)
    if max_slices is not None and max_slices < 1:
        raise ValueError(f"--max-slices must be at least 1, got {max_slices}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {max_images}")
    try:
        records = find_eval_studies(root)
    except CTSeverityError as exc:
        if isinstance(exc, InputNotFoundError) or not root.is_dir():
            raise
        pairs = find_image_pairs(root)
        if not pairs:
            raise CTSeverityError("no CT studies (NIfTI, NRRD, MHA, DICOM) and no 2D image/mask pairs "
                                  "(PNG, JPEG) found", root) from None
        return load_image_pairs(pairs, model, image_window, image_rotation, max_images, seed, progress)
    return load_studies(records, model, max_slices, seed, lung_backend, progress)
