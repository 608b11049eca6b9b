"""Patient identifiers of DICOM inputs: kept out of every output but the DICOM ones, unless asked for.

``results.csv``, ``result.json``, ``report.html``, the figures and the log carry no patient name, ID or
birth date from the DICOM headers. ``ctseverity run --keep-identifiers`` adds them to ``result.json``
(``patient``) and ``results.csv`` (``patient_name``, ``patient_id``, ``patient_birth_date``) so that results
can be linked back to patients. DICOM outputs always keep their source study's identifiers: a PACS files
them under that patient and study (``docs/dicom_outputs.md``).

A run that reads studies from a PACS sees identifiers in the headers it retrieves; :class:`RedactIdentifiers`
replaces any of them that reaches a log line by ``[redacted]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pydicom

__all__ = ["IDENTIFIER_KEYWORDS", "PATIENT_COLUMNS", "patient_identifiers", "identifier_strings",
           "RedactIdentifiers", "redacting"]

#: the header attributes that identify a patient, and their keys in ``result.json``'s ``patient``
IDENTIFIER_KEYWORDS = {"PatientName": "name", "PatientID": "id", "PatientBirthDate": "birth_date"}

#: the ``results.csv`` columns ``--keep-identifiers`` adds
PATIENT_COLUMNS = tuple(f"patient_{key}" for key in IDENTIFIER_KEYWORDS.values())

#: what replaces an identifier in a log line
REDACTED = "[redacted]"


def _first_header(path: Path) -> pydicom.Dataset | None:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    for name in files:
        try:
            return pydicom.dcmread(name, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            continue
    return None


def patient_identifiers(source: str | os.PathLike | pydicom.Dataset) -> dict[str, str]:
    """The patient name, ID and birth date of a DICOM input (``{"name", "id", "birth_date"}``).

    Args:
        source: a DICOM series folder (its first readable header is used) or a header.

    Returns:
        The identifiers as written in the header (empty strings where absent); ``{}`` for an input that is
        not a DICOM folder.

    Example:
        >>> patient_identifiers("study_dicom/")  # doctest: +SKIP
        {'name': 'Doe^Jane', 'id': 'PID-1', 'birth_date': '19500101'}
    """
    ds = source if isinstance(source, pydicom.Dataset) else _first_header(Path(source))
    if ds is None:
        return {}
    return {key: str(ds.get(keyword, "") or "") for keyword, key in IDENTIFIER_KEYWORDS.items()}


def identifier_strings(identifiers: Mapping[str, str]) -> list[str]:
    """The strings that give an identifier away in text: the whole name and each of its parts (DICOM ``^``
    separated, two characters or more), the ID, and the birth date as ``YYYYMMDD`` and ``YYYY-MM-DD``.
    Longest first, so that a part never hides its whole."""
    out: set[str] = set()
    name = str(identifiers.get("name", "") or "").strip()
    if name:
        out.add(name)
        out.update(part.strip() for part in re.split(r"[\^=]", name) if len(part.strip()) >= 2)
    pid = str(identifiers.get("id", "") or "").strip()
    if pid:
        out.add(pid)
    birth = str(identifiers.get("birth_date", "") or "").strip()
    if birth:
        out.add(birth)
        if re.fullmatch(r"\d{8}", birth):
            out.add(f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
    return sorted(out, key=len, reverse=True)


class RedactIdentifiers(logging.Filter):
    """A logging filter that replaces patient identifiers in each record's message by ``[redacted]``.

    Args:
        strings: identifier strings (:func:`identifier_strings`); more can be added with :meth:`add`.
    """

    def __init__(self, strings: Iterable[str] = ()) -> None:
        super().__init__()
        self._strings: list[str] = []
        self.add(strings)

    def add(self, strings: Iterable[str]) -> None:
        """Redact these strings too."""
        self._strings = sorted({*self._strings, *(s for s in strings if s)}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every identifier replaced."""
        for s in self._strings:
            text = re.sub(re.escape(s), REDACTED, text, flags=re.IGNORECASE)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._strings:
            message = record.getMessage()
            redacted = self.redact(message)
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


@contextlib.contextmanager
def redacting(enabled: bool = True) -> Iterator[RedactIdentifiers]:
    """Install a :class:`RedactIdentifiers` filter on every handler of the root logger for the block (where
    every log line of the project and its libraries ends up); yields it, to :meth:`~RedactIdentifiers.add`
    identifiers as they become known. With ``enabled=False`` the filter is yielded but not installed."""
    flt = RedactIdentifiers()
    handlers = list(logging.getLogger().handlers) if enabled else []
    for h in handlers:
        h.addFilter(flt)
    try:
        yield flt
    finally:
        for h in handlers:
            h.removeFilter(flt)
