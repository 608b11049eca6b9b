"""Sets of synthetic or semi-synthetic studies with ground truth, and the severity grade.

:func:`write_studies` writes one NIfTI study per requested lesion percentage (int16 HU, with its
affine so that the spacing is kept), optionally the lesion and lung masks beside each, and a
``truth.csv`` with the columns ``study, lesion_percent, grade`` (then ``requested_percent, kind,
seed, lung_ml, lesion_ml, source``). ``lesion_percent`` is the share reached, not the one asked
for. Studies are phantoms from :func:`~monai_ext.data.synthetic.synthetic_chest_ct`, or a given
base CT, with lesions from :func:`~monai_ext.data.lesions.insert_lesions`.

:func:`grade_from_percent` maps a lesion share of the lung volume to CT-0..CT-4:

===== ==========================
grade lesion share of lung volume
===== ==========================
CT-0  none
CT-1  > 0 and <= 25 %
CT-2  > 25 and <= 50 %
CT-3  > 50 and < 75 %
CT-4  >= 75 %
===== ==========================

Example:
    >>> from monai_ext.data.studies import grade_from_percent, write_studies
    >>> grade_from_percent(0.0), grade_from_percent(25.0), grade_from_percent(75.0)
    ('CT-0', 'CT-1', 'CT-4')
    >>> recs = write_studies("synth_out", [0, 20], shape=(64, 64, 24), spacing=(6, 6, 12))  # doctest: +SKIP
    >>> [r.grade for r in recs]  # doctest: +SKIP
    ['CT-0', 'CT-1']
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from tqdm.auto import tqdm

from monai_ext.data.lesions import LESION_KINDS, insert_lesions
from monai_ext.data.synthetic import _check_grid, synthetic_chest_ct
from monai_ext.errors import CTSeverityError
from monai_ext.io.atomic import atomic_path

__all__ = [
    "GRADES",
    "TRUTH_COLUMNS",
    "SynthStudy",
    "grade_from_percent",
    "study_name",
    "write_studies",
    "insert_lesions_oriented",
]

log = logging.getLogger(__name__)

#: severity grades, from none to the most severe
GRADES: tuple[str, ...] = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
#: columns of ``truth.csv``, in order
TRUTH_COLUMNS: tuple[str, ...] = (
    "study",
    "lesion_percent",
    "grade",
    "requested_percent",
    "kind",
    "seed",
    "lung_ml",
    "lesion_ml",
    "source",
)

_LPS = axcodes2ornt(("L", "P", "S"))


def grade_from_percent(percent: float) -> str:
    """Severity grade CT-0..CT-4 of a lesion share of the lung volume.

    Args:
        percent: lesion volume as a percentage of lung volume, 0..100.

    Returns:
        ``"CT-0"`` for 0, ``"CT-1"`` for > 0..25, ``"CT-2"`` for > 25..50, ``"CT-3"`` for > 50..< 75,
        ``"CT-4"`` for >= 75.

    Raises:
        ValueError: ``percent`` is not a number in 0..100.

    Example:
        >>> [grade_from_percent(p) for p in (0, 0.1, 25, 25.01, 50, 74.99, 75, 100)]
        ['CT-0', 'CT-1', 'CT-1', 'CT-2', 'CT-2', 'CT-3', 'CT-4', 'CT-4']
    """
    try:
        p = float(percent)
    except (TypeError, ValueError):
        raise ValueError(f"lesion percent: expected a number in 0..100, got {percent!r}") from None
    if not (math.isfinite(p) and 0.0 <= p <= 100.0):
        raise ValueError(f"lesion percent: expected a number in 0..100, got {percent!r}")
    if p <= 0.0:
        return "CT-0"
    if p <= 25.0:
        return "CT-1"
    if p <= 50.0:
        return "CT-2"
    if p < 75.0:
        return "CT-3"
    return "CT-4"


@dataclass
class SynthStudy:
    """One written study (a row of ``truth.csv`` plus the file paths).

    Attributes:
        study: study name, the image file name without ``.nii.gz``.
        lesion_percent: lesion share of the lung volume reached, in percent.
        grade: :func:`grade_from_percent` of ``lesion_percent``.
        requested_percent: the share asked for.
        kind: lesion kind (``mixed``, ``ggo``, ``consolidation``).
        seed: seed of the phantom and of the lesions.
        lung_ml: lung volume in ml.
        lesion_ml: lesion volume in ml.
        source: ``phantom`` or the base CT file.
        path: the image file.
        lesion_path: the lesion mask file, if written.
        lung_path: the lung mask file, if written.
    """

    study: str
    lesion_percent: float
    grade: str
    requested_percent: float
    kind: str
    seed: int
    lung_ml: float
    lesion_ml: float
    source: str
    path: Path
    lesion_path: Path | None = None
    lung_path: Path | None = None

    def truth_row(self) -> dict[str, object]:
        """The ``truth.csv`` row of this study."""
        row = asdict(self)
        row["lesion_percent"] = f"{self.lesion_percent:.4f}"
        row["requested_percent"] = f"{self.requested_percent:g}"
        row["lung_ml"] = f"{self.lung_ml:.1f}"
        row["lesion_ml"] = f"{self.lesion_ml:.1f}"
        return {k: row[k] for k in TRUTH_COLUMNS}


def study_name(index: int, percent: float, prefix: str = "synth") -> str:
    """File stem of a study: ``synth_000_f05`` for study 0 at 5 %, ``synth_001_f02p5`` at 2.5 %.

    Example:
        >>> study_name(3, 40), study_name(0, 2.5)
        ('synth_003_f40', 'synth_000_f02p5')
    """
    if float(percent).is_integer():
        label = f"{int(percent):02d}"
    else:
        label = f"{percent:05.2f}".rstrip("0").replace(".", "p")
    return f"{prefix}_{index:03d}_f{label}"


def _check_percents(percents: Sequence[float]) -> list[float]:
    values = []
    for p in percents:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"fractions: {p!r} is not a number (percent of lung volume, 0..100)") from None
        if not (math.isfinite(v) and 0.0 <= v <= 100.0):
            raise ValueError(f"fractions: {p!r} is outside 0..100 (percent of lung volume)")
        values.append(v)
    if not values:
        raise ValueError("fractions: no lesion percentage given")
    return values


def insert_lesions_oriented(
    image: np.ndarray,
    lung_mask: np.ndarray,
    affine: np.ndarray,
    fraction: float,
    seed: int = 0,
    kind: str = "mixed",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`~monai_ext.data.lesions.insert_lesions` on an array in any orientation.

    The array is reoriented to the lesion model's axes (``L, P, S`` axis codes) with the RAS
    ``affine``, the lesions are inserted, and both outputs are put back on the input grid.

    Args:
        image: CT volume in HU, in the voxel order of ``affine``.
        lung_mask: lung mask on the same grid (1 right / 2 left, or 0/1).
        affine: 4x4 RAS affine (nibabel / MONAI convention).
        fraction: lesion share of the lung volume, 0..1.
        seed: random seed.
        kind: lesion kind, one of :data:`~monai_ext.data.lesions.LESION_KINDS`.

    Returns:
        ``(image_with_lesions, lesion_mask, info)`` on the input grid.

    Raises:
        ValueError, NoLungFoundError: as :func:`~monai_ext.data.lesions.insert_lesions`.

    Example:
        >>> out, mask, info = insert_lesions_oriented(ct, lung, nii.affine, 0.3)  # doctest: +SKIP
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {affine.shape}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    current = io_orientation(affine)
    fwd = ornt_transform(current, _LPS)
    back = ornt_transform(_LPS, current)
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _) in enumerate(fwd):
        spacing[int(dst_axis)] = float(zooms[src_axis])
    img = apply_orientation(np.asarray(image), fwd)
    lung = apply_orientation(np.asarray(lung_mask), fwd)
    out, les, info = insert_lesions(img, lung, spacing, fraction, seed=seed, kind=kind, return_info=True)
    return (
        np.ascontiguousarray(apply_orientation(out, back)),
        np.ascontiguousarray(apply_orientation(les, back)),
        info,
    )


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``data`` as NIfTI with ``affine`` (qform and sform, mm), atomically."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _write_csv(rows: list[dict[str, object]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TRUTH_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _to_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


def _load_base(base: str | os.PathLike, lung_backend: str):
    """Load the base CT (array on its own grid, affine) and its lung mask (1 right, 2 left)."""
    from monai_ext.io import load_ct
    from monai_ext.transforms.lung import lung_mask

    path = Path(base)
    ct = load_ct(path, orientation=None)
    array = ct.array[0] if hasattr(ct, "array") else np.asarray(ct)[0]
    affine = np.asarray(ct.affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lung = lung_mask(array, spacing, affine=affine, backend=lung_backend, split_lr=True, name=path)
    return np.asarray(array), affine, lung


def write_studies(
    out_dir: str | os.PathLike,
    percents: Sequence[float],
    *,
    base: str | os.PathLike | None = None,
    seed: int = 0,
    shape: Sequence[int] = (256, 256, 96),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    kind: str = "mixed",
    masks: bool = False,
    lung_backend: str = "threshold",
    prefix: str = "synth",
    progress: bool = True,
) -> list[SynthStudy]:
    """Write one study per lesion percentage, and ``truth.csv``, into ``out_dir``.

    Study ``i`` uses seed ``seed + i`` for its phantom (each study is another anatomy) and for its
    lesions. With ``base``, every study is that CT with lesions inserted, written on its own grid
    and affine; its lung mask comes from :func:`monai_ext.transforms.lung.lung_mask`.

    Args:
        out_dir: output folder (created if missing).
        percents: lesion shares of the lung volume to ask for, in percent (0..100).
        base: a CT file (NIfTI, NRRD, MHA or a DICOM folder) to insert lesions into, instead of
            phantoms.
        seed: first seed.
        shape: phantom grid ``(X, Y, Z)`` (ignored with ``base``).
        spacing: phantom voxel size in mm (ignored with ``base``).
        kind: lesion kind, one of :data:`~monai_ext.data.lesions.LESION_KINDS`.
        masks: also write ``<study>_lesion.nii.gz`` (0/1) and ``<study>_lung.nii.gz`` (1 right,
            2 left).
        lung_backend: lung mask backend for ``base`` (``threshold``, ``lungmask`` or ``auto``).
        prefix: study name prefix.
        progress: show a progress bar over the studies.

    Returns:
        One :class:`SynthStudy` per study, in the order of ``percents``.

    Raises:
        ValueError: a percentage outside 0..100, a bad shape or spacing, an unknown kind.
        InputNotFoundError, NotAnImageError, NotCTError, NoLungFoundError: a bad ``base``.
        CTSeverityError: ``out_dir`` exists and is not a folder.

    Example:
        >>> recs = write_studies("out", [0, 5, 40], shape=(96, 96, 40), spacing=(4, 4, 8))  # doctest: +SKIP
        >>> Path("out/truth.csv").read_text().splitlines()[0]  # doctest: +SKIP
        'study,lesion_percent,grade,requested_percent,kind,seed,lung_ml,lesion_ml,source'
    """
    values = _check_percents(percents)
    if kind not in LESION_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(LESION_KINDS)}, got {kind!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CTSeverityError("exists and is not a folder", out)
    if base is None:
        _check_grid(shape, spacing)  # fail before writing anything
        base_data = None
    else:
        base_data = _load_base(base, lung_backend)
    out.mkdir(parents=True, exist_ok=True)

    records: list[SynthStudy] = []
    for i, pct in enumerate(tqdm(values, desc="synth", unit="study", disable=not progress)):
        study = study_name(i, pct, prefix)
        s = int(seed) + i
        if base_data is None:
            ct = synthetic_chest_ct(shape, spacing, seed=s)
            image, lesion, info = insert_lesions(
                ct.image, ct.lung, ct.spacing, pct / 100.0, seed=s, kind=kind, return_info=True
            )
            affine, lung, voxel_ml = ct.affine, ct.lung, float(np.prod(ct.spacing)) / 1000.0
            source = "phantom"
        else:
            array, affine, lung = base_data
            image, lesion, info = insert_lesions_oriented(array, lung, affine, pct / 100.0, seed=s, kind=kind)
            voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
            source = str(base)
        n_lung, n_les = int(info["lung_voxels"]), int(info["lesion_voxels"])
        achieved = 100.0 * n_les / n_lung
        path = out / f"{study}.nii.gz"
        _save_nifti(_to_int16(image), affine, path)
        rec = SynthStudy(
            study=study,
            lesion_percent=achieved,
            grade=grade_from_percent(achieved),
            requested_percent=pct,
            kind=kind,
            seed=s,
            lung_ml=n_lung * voxel_ml,
            lesion_ml=n_les * voxel_ml,
            source=source,
            path=path,
        )
        if masks:
            rec.lesion_path = out / f"{study}_lesion.nii.gz"
            rec.lung_path = out / f"{study}_lung.nii.gz"
            _save_nifti(lesion.astype(np.uint8), affine, rec.lesion_path)
            _save_nifti(np.asarray(lung).astype(np.uint8), affine, rec.lung_path)
        records.append(rec)
        log.debug("%s: %.2f %% lesion (asked %.2f %%), %s", study, achieved, pct, rec.grade)
    _write_csv([r.truth_row() for r in records], out / "truth.csv")
    return records
