"""Finding the studies in what a user points ct-severity at.

An input is a study file (NIfTI, NRRD, MHA), a DICOM series folder, a folder of studies (searched
recursively: every image file and every folder holding DICOM files is one study), or a CSV
manifest with a ``path`` column. Masks and outputs written by ct-severity beside the studies
(``*_lesion``, ``*_lung``, ``*_mask``, ``heatmap``..., the DICOM outputs in ``<study>/dicom/``) are not studies.

A manifest may name its studies in a ``study`` column. Study names become folder names under the
output folder, so every name (from a manifest, a file or a folder) is made safe first
(:func:`safe_study_name`): path separators, ``..``, a leading dot, control and shell-special
characters, names Windows reserves and over-long names are replaced, so that no study can write
outside ``--out``; :class:`Study` refuses a name that is not safe.

Symbolic links are followed, as ``find -L`` does (a folder of links to DICOM series folders is a
folder of studies); a link back to a folder already searched is not searched again, so link loops
end.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from monai_ext.errors import CTSeverityError, InputNotFoundError
from monai_ext.io.reader import SUPPORTED_SUFFIXES

__all__ = ["Study", "find_studies", "study_name", "safe_study_name", "is_safe_study_name"]

_NOT_STUDIES = ("_lesion", "_lesions", "_lung", "_mask", "_heatmap", "_lesion_mask", "_lung_mask")
_OUTPUT_NAMES = ("heatmap", "lesion_mask", "lung_mask")
_DICOM_SUFFIXES = (".dcm", ".ima", "")


#: longest study name in characters (a folder name; with the longest output file name well within 255 bytes)
MAX_NAME_CHARS = 100
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f-\x9f/\\:*?"<>|\u2028\u2029\ufeff\u200b-\u200f\u202a-\u202e]+')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def safe_study_name(name: object) -> str:
    """A study name that is one plain folder name inside the output folder.

    Unicode is normalized (NFC); path separators, whitespace other than plain spaces, control,
    bidirectional and invisible characters and those Windows forbids (``:*?"<>|``) become ``_``;
    leading dots and trailing dots or spaces are dropped (no ``..``, no hidden folder); names Windows
    reserves (``CON``, ``NUL``, ``COM1`` ...) get a leading ``_``; an empty result is ``study``; a name longer than
    :data:`MAX_NAME_CHARS` is cut and ends with a hash of the full name, so different long names stay
    different. Letters of any script are kept.

    Example::

        safe_study_name("../../etc/passwd")   # 'etc_passwd'
        safe_study_name("Müller, Anna")      # 'Müller,_Anna'
    """
    raw = unicodedata.normalize("NFC", str(name))
    text, before = _UNSAFE_CHARS.sub("_", re.sub(r"[^\S ]+", "_", raw)), None
    while text != before:  # '../..' -> '.._..' -> '_..' -> '..' -> ''
        before, text = text, text.strip("_ ").lstrip(".").rstrip(". ")
    text = text or "study"
    if text.split(".")[0].lower() in _WINDOWS_RESERVED:
        text = "_" + text
    if len(text) > MAX_NAME_CHARS:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        text = text[: MAX_NAME_CHARS - 11].rstrip(". ") + "_" + digest
    return text


def is_safe_study_name(name: object) -> bool:
    """Whether ``name`` is its own :func:`safe_study_name` (one plain folder name)."""
    return isinstance(name, str) and name == safe_study_name(name)


@dataclass(frozen=True)
class Study:
    """One study to process: a unique identifier and its image (file or DICOM folder).

    Raises:
        ValueError: a study name that is not safe as a folder name (:func:`safe_study_name`).
    """

    study: str
    path: str

    def __post_init__(self) -> None:
        if not is_safe_study_name(self.study):
            raise ValueError(f"unsafe study name {self.study!r} "
                             f"(it would be written as {safe_study_name(self.study)!r})")


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


def _from_manifest(path: Path) -> list[tuple[Path, str | None]]:
    """The ``(image, study name or None)`` rows of a manifest (``path`` column, optional ``study``)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CTSeverityError(f"not a readable CSV manifest ({exc})", path) from exc
    if not rows or "path" not in rows[0]:
        raise CTSeverityError("a manifest needs a 'path' column", path)
    out = []
    for i, r in enumerate(rows, start=2):
        if not r.get("path"):
            raise CTSeverityError(f"line {i}: no path", path)
        p = Path(r["path"])
        out.append((p if p.is_absolute() else path.parent / p, (r.get("study") or "").strip() or None))
    return out


def find_studies(inputs: Sequence[str | os.PathLike]) -> list[Study]:
    """The studies named by ``inputs``, each once, with unique names.

    Raises:
        InputNotFoundError: an input does not exist.
        CTSeverityError: an input holds no study.
    """
    paths: list[tuple[Path, str | None]] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputNotFoundError("no such file or folder", p)
        if p.is_file() and p.suffix.lower() == ".csv":
            found = _from_manifest(p)
            for f, _ in found:
                if not f.exists():
                    raise InputNotFoundError(f"listed in {p.name} but not found", f)
        elif p.is_file():
            found = [(p, None)]
        else:
            found = [(f, None) for f in sorted(_walk(p), key=str)]
            if not found:
                raise CTSeverityError("no CT study found (NIfTI, NRRD, MHA files or DICOM series)", p)
        paths.extend(found)
    studies: list[Study] = []
    seen_paths: set[str] = set()
    used: set[str] = set()  # case-folded: two names must not share a folder on a case-insensitive disk
    for p, given in paths:
        key = str(p.resolve())
        if key in seen_paths:
            continue
        seen_paths.add(key)
        base = safe_study_name(given if given is not None else study_name(p.absolute() if p.name in ("", ".", "..")
                                                                          else p))
        name, n = base, 0
        while name.casefold() in used:
            n += 1
            name = safe_study_name(f"{base}_{n}")
        used.add(name.casefold())
        studies.append(Study(name, str(p)))
    return studies
