"""Finding the studies in what a user points ct-severity at.

An input is a study file (NIfTI, NRRD, MHA), a DICOM series folder, a folder of studies (searched
recursively: every image file and every folder holding DICOM files is one study), or a CSV
manifest with a ``path`` column. Masks and outputs written by ct-severity beside the studies
(``*_lesion``, ``*_lung``, ``*_mask``, ``heatmap``..., the DICOM outputs in ``<study>/dicom/``) are not studies.

Symbolic links are followed, as ``find -L`` does (a folder of links to DICOM series folders is a
folder of studies); a link back to a folder already searched is not searched again, so link loops
end.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from monai_ext.errors import CTSeverityError, InputNotFoundError
from monai_ext.io.reader import SUPPORTED_SUFFIXES

__all__ = ["Study", "find_studies", "study_name"]

_NOT_STUDIES = ("_lesion", "_lesions", "_lung", "_mask", "_heatmap", "_lesion_mask", "_lung_mask")
_OUTPUT_NAMES = ("heatmap", "lesion_mask", "lung_mask")
_DICOM_SUFFIXES = (".dcm", ".ima", "")


@dataclass(frozen=True)
class Study:
    """One study to process: a unique identifier and its image (file or DICOM folder)."""

    study: str
    path: str


def study_name(path: str | os.PathLike) -> str:
    """A study's name: file name without image suffixes, or the DICOM folder's name."""
    p = Path(path)
    name = p.name
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf) and not p.is_dir():
            return name[: -len(suf)]
    return name


def _is_study_file(p: Path) -> bool:
    low = p.name.lower()
    if p.name.startswith(".") or not low.endswith(SUPPORTED_SUFFIXES) or low.endswith((".dcm", ".ima")):
        return False
    name = study_name(p)
    return not (name.endswith(_NOT_STUDIES) or name in _OUTPUT_NAMES)


def _looks_like_dicom(p: Path) -> bool:
    if not p.is_file() or p.name.startswith("."):
        return False
    if p.suffix.lower() in (".dcm", ".ima"):
        return True
    if p.suffix:
        return False
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_output(folder: Path) -> bool:
    """Whether ``folder`` holds ct-severity's own DICOM outputs of a study (``<study>/dicom/`` beside its
    ``result.json``, with the generated CT series in ``dicom/ct/``): they are results, not studies."""
    return any(p.name == "dicom" and (p.parent / "result.json").is_file() for p in (folder, *folder.parents))


def _walk(root: Path) -> Iterable[Path]:
    """Study files and DICOM folders below ``root``, following symbolic links, each real folder once."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or a folder reached by two links
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(n for n in dirnames if os.path.realpath(os.path.join(dirpath, n)) not in seen)
        d = Path(dirpath)
        files = sorted(filenames)
        if any(_looks_like_dicom(d / f) for f in files) and not _is_dicom_output(d):
            yield d
        for f in files:
            if _is_study_file(d / f):
                yield d / f


def _from_manifest(path: Path) -> list[Path]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise CTSeverityError("a manifest needs a 'path' column", path)
    return [Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"] for r in rows]


def find_studies(inputs: Sequence[str | os.PathLike]) -> list[Study]:
    """The studies named by ``inputs``, each once, with unique names.

    Raises:
        InputNotFoundError: an input does not exist.
        CTSeverityError: an input holds no study.
    """
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputNotFoundError("no such file or folder", p)
        if p.is_file() and p.suffix.lower() == ".csv":
            found = _from_manifest(p)
            for f in found:
                if not f.exists():
                    raise InputNotFoundError(f"listed in {p.name} but not found", f)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(_walk(p), key=str)
            if not found:
                raise CTSeverityError("no CT study found (NIfTI, NRRD, MHA files or DICOM series)", p)
        paths.extend(found)
    studies: list[Study] = []
    seen_paths: set[str] = set()
    used: dict[str, int] = {}
    for p in paths:
        key = str(p.resolve())
        if key in seen_paths:
            continue
        seen_paths.add(key)
        name = study_name(p)
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        studies.append(Study(name, str(p)))
    return studies
