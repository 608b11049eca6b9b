"""Training and test studies from real chest CT: lesions inserted under a drawn scanner style.

:func:`load_clean_ct` reads a chest CT without COVID-19 findings in the lesion model's axes (x
left, y posterior, z superior) with its lung label: the threshold lung mask
(:func:`~monai_ext.transforms.lung.threshold_lung_mask`, whose default takes out the organ domes
under the diaphragm). :func:`render_variant` turns it into one semi-synthetic study: the
inspiration level and dependent density of the style, then ground glass and consolidation inserted inside the lung
(:func:`~monai_ext.data.lesions.insert_lesions`), then the style's slice thickness, kernel, noise
and HU calibration (:class:`~monai_ext.data.scanner.ScannerStyle`); lesion and lung masks follow
the slices. :func:`save_variant` writes it as NIfTI with a RAS affine.

Example:
    >>> import numpy as np
    >>> from monai_ext.data.variants import load_clean_ct, render_variant
    >>> base = load_clean_ct("LIDC-IDRI-0001_ct.nii.gz")  # doctest: +SKIP
    >>> v = render_variant(base, np.random.default_rng(0), fraction=0.2)  # doctest: +SKIP
    >>> round(v.lesion_percent)  # doctest: +SKIP
    20
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monai_ext.data.lesions import insert_lesions
from monai_ext.data.scanner import ScannerStyle, add_dependent_density, adjust_inspiration, draw_style

__all__ = ["CleanCT", "Variant", "load_clean_ct", "render_variant", "save_variant", "draw_load"]


@dataclass
class CleanCT:
    """A chest CT without lesions in the lesion model's axes, with its lung label (1 right, 2 left)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class Variant:
    """One rendered study: image (float32 HU), masks (uint8) and what made it."""

    image: np.ndarray
    lesion: np.ndarray
    lung: np.ndarray
    spacing: tuple[float, float, float]
    fraction: float
    kind: str
    style: ScannerStyle
    seed: int

    @property
    def lesion_percent(self) -> float:
        n = int(np.count_nonzero(self.lung))
        return 100.0 * int(np.count_nonzero(self.lesion & (self.lung > 0))) / max(n, 1)


def load_clean_ct(path: str | os.PathLike, name: str | None = None, crop_mm: float | None = None) -> CleanCT:
    """Load a chest CT (any reader format) in the lesion model's axes, with its threshold lung label.

    Args:
        path: the CT file or DICOM folder.
        name: its name (default: the file name without suffix).
        crop_mm: crop in-plane to the lung's bounding box plus this margin (all slices kept), for
            training data that only the lung and its surroundings matter for.

    Raises:
        the reader's and the lung mask's errors (:mod:`monai_ext.errors`).
    """
    from monai_ext.io import load_ct
    from monai_ext.transforms.lung import threshold_lung_mask
    from monai_ext.transforms.organs import canonical_view

    ct = load_ct(path, orientation=None)
    arr = np.asarray(ct[0])
    aff = np.asarray(ct.affine, dtype=np.float64)
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    canon, cspacing, _, _ = canonical_view(arr, spacing, aff)
    canon = np.maximum(canon, -1024).astype(np.int16)
    label = threshold_lung_mask(canon, cspacing, split_lr=True, name=path)
    if crop_mm is not None:
        box = []
        for axis in (0, 1):
            idx = np.flatnonzero(label.any(axis=tuple(a for a in range(3) if a != axis)))
            m = int(np.ceil(crop_mm / cspacing[axis]))
            box.append(slice(max(0, int(idx[0]) - m), min(label.shape[axis], int(idx[-1]) + 1 + m)))
        canon, label = np.ascontiguousarray(canon[box[0], box[1]]), np.ascontiguousarray(label[box[0], box[1]])
    stem = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        stem = stem.removesuffix(suffix)
    return CleanCT(name or stem, canon, label, cspacing)


def draw_load(rng: np.random.Generator, clean_share: float = 0.3, low: float = 0.005, high: float = 0.85) -> float:
    """A lesion share of the lung: 0 with probability ``clean_share``, else log-uniform in [low, high]."""
    if rng.random() < clean_share:
        return 0.0
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def render_variant(base: CleanCT, rng: np.random.Generator, fraction: float | None = None, kind: str | None = None,
                   style: ScannerStyle | None = None, dependent_share: float = 0.0) -> Variant:
    """One semi-synthetic study from a clean CT.

    Args:
        base: the clean CT.
        rng: random generator (draws what is not given, and the seeds).
        fraction: lesion share of the lung, 0..1 (default :func:`draw_load`).
        kind: lesion kind (default: mixed 70 %, ground glass 20 %, consolidation 10 %).
        style: scanner style (default :func:`~monai_ext.data.scanner.draw_style`).
        dependent_share: probability that a drawn style adds dependent density (``draw_style``).

    Returns:
        The :class:`Variant`, on the style's grid.
    """
    frac = draw_load(rng) if fraction is None else float(fraction)
    kind = kind or str(rng.choice(["mixed"] * 7 + ["ggo"] * 2 + ["consolidation"]))
    style = style or draw_style(rng, base.spacing, dependent_share=dependent_share)
    seed = int(rng.integers(1 << 30))
    img = base.image.astype(np.float32)
    if style.lung_median_hu is not None:  # breathing changes the lung before any lesion is in it
        img = adjust_inspiration(img, base.label, style.lung_median_hu)
    if style.dependent_hu:  # so does gravity
        img = add_dependent_density(img, base.label, base.spacing, style.dependent_hu, style.dependent_mm)
    img, lesion = insert_lesions(img, base.label, base.spacing, frac, seed=seed, kind=kind)
    rest = dataclasses.replace(style, lung_median_hu=None, dependent_hu=0.0)
    img, spacing, (lesion, lung) = rest.apply(img, base.spacing, labels=[lesion, base.label], seed=seed + 1)
    return Variant(img, lesion.astype(np.uint8), lung.astype(np.uint8), spacing, frac, kind, style, seed)


def save_variant(variant: Variant, out_dir: str | os.PathLike, study: str, compress: bool = False
                 ) -> dict[str, Path]:
    """Write ``<study>.nii[.gz]`` (int16 HU), ``<study>_lesion`` and ``<study>_lung`` masks (uint8) with
    the RAS affine of the lesion model's axes.

    Returns:
        ``{"image": path, "lesion": path, "lung": path}``.
    """
    from monai_ext.data.studies import _save_nifti, _to_int16
    from monai_ext.data.synthetic import phantom_affine

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if compress else ".nii"
    affine = phantom_affine(variant.image.shape, variant.spacing)
    paths = {"image": out / f"{study}{ext}", "lesion": out / f"{study}_lesion{ext}", "lung": out / f"{study}_lung{ext}"}
    _save_nifti(_to_int16(variant.image), affine, paths["image"])
    _save_nifti(variant.lesion.astype(np.uint8), affine, paths["lesion"])
    _save_nifti(variant.lung.astype(np.uint8), affine, paths["lung"])
    return paths

