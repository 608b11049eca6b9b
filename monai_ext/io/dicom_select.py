"""Sorting out a DICOM folder: which files are CT slices, which series to read, and why.

Real folders hold more than one CT series: scouts (localizers), thick and thin reconstructions in soft
tissue and lung kernels, reformats, dose reports, structured reports, secondary captures. Every file's
header is read (no pixel data) with pydicom; files that are not CT images (structured reports, dose
reports, presentation states, secondary captures, any modality but CT) and localizers are left out with
a debug log line each. Of the series left, the one to read is chosen by :data:`RULE`:

1. eligible: at least :data:`MIN_SLICES` slices (unless no series has that many) of one size and
   orientation, with positions, axial (the slice normal within :data:`MAX_AXIAL_DEG` of the head-foot
   axis; a gantry tilt is allowed and corrected by the reader);
2. of those, the series covering at least :data:`MIN_COVERAGE` of the longest z extent;
3. of those, thin slices (at most :data:`THIN_MM`) first, then a lung kernel when the Convolution Kernel
   is known (:func:`kernel_class`), then the thinnest slices, then the most slices, then the lowest series
   number.

A multi-frame (enhanced or legacy-converted enhanced) CT image is one series of its frames.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_ext.errors import NoDicomSeriesError

__all__ = ["SliceFile", "SeriesInfo", "scan_dicom_folder", "choose_series", "kernel_class", "RULE",
           "MIN_SLICES", "THIN_MM", "MULTIFRAME_CT_CLASSES", "scan_headers"]

log = logging.getLogger(__name__)

#: fewest slices of a series that can be graded
MIN_SLICES = 10
#: share of the longest z extent a series must cover to be chosen
MIN_COVERAGE = 0.8
#: slices at most this thick are thin
THIN_MM = 3.0
#: largest angle (degrees) between the slice normal and the head-foot axis of an axial series
MAX_AXIAL_DEG = 35.0

#: CT Image Storage (single-frame slices)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Enhanced CT Image Storage and Legacy Converted Enhanced CT Image Storage (multi-frame)
MULTIFRAME_CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")

RULE = (f"axial CT images, at least {MIN_SLICES} slices, no localizers; of those covering at least "
        f"{MIN_COVERAGE:.0%} of the longest z extent: slices at most {THIN_MM:g} mm first, then a lung kernel, "
        "then the thinnest slices, then the most slices, then the lowest series number")

_LUNG_KERNELS = re.compile(r"LUNG|PULM|^B[6-9]\d|^BR?[5-9]\d|^BL\d|^I[5-9]\d|^HR[5-9]\d|^FC(5\d|8[0-6])$|^Y[ABC]$"
                           r"|^L$|^BONEPLUS$|^SHARP|^DETAIL")
_SOFT_KERNELS = re.compile(r"SOFT|STANDARD|^STND|^B[1-4]\d|^BR[1-4]\d|^I[1-4]\d|^FC(0\d|1\d)$|^[ABC]$|^BODY|^MEDIASTIN")


def kernel_class(kernel: str | Sequence[str] | None) -> str:
    """``lung`` (sharp kernels for lung: LUNG, Siemens B60f-B80f/Br59+/Bl, Toshiba FC5x, Philips YA/YB/L ...),
    ``soft`` (soft tissue: STANDARD, SOFT, B30f, FC08 ...) or ``unknown``."""
    values = [kernel] if isinstance(kernel, str) else list(kernel or [])
    text = " ".join(str(v) for v in values).strip().upper()
    if not text:
        return "unknown"
    if any(_LUNG_KERNELS.search(v.strip().upper()) for v in map(str, values)):
        return "lung"
    if any(_SOFT_KERNELS.search(v.strip().upper()) for v in map(str, values)):
        return "soft"
    return "unknown"


@dataclass
class SliceFile:
    """One DICOM image file of a series (header values the choice and the reader need)."""

    path: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    size: tuple[int, int]
    multiframe: bool = False
    frames: int = 1
    frame_positions: list[tuple[float, ...] | None] = field(default_factory=list)


@dataclass
class SeriesInfo:
    """A series of a folder: its slice files and what the rule looks at.

    Attributes:
        uid: Series Instance UID.
        number: Series Number (``None`` when absent).
        description: Series Description.
        kernel: Convolution Kernel ('' when absent).
        files: the image files (localizers and non-images left out).
        thickness_mm: Slice Thickness, else the median slice step (``nan`` when neither is known).
        extent_mm: z extent of the slice positions plus one step.
        n_slices: slices (frames of a multi-frame image).
        reason: why the series cannot be read (``""`` when it can).
    """

    uid: str
    number: int | None = None
    description: str = ""
    kernel: str = ""
    files: list[SliceFile] = field(default_factory=list)
    thickness_mm: float = math.nan
    extent_mm: float = 0.0
    n_slices: int = 0
    reason: str = ""

    def label(self) -> str:
        """``series 3 'Lung 1.25 mm' (1.2.3...)``, for messages."""
        text = f"series {'?' if self.number is None else self.number}"
        if self.description:
            text += f" {self.description!r}"
        return f"{text} ({self.uid})"

    def summary(self) -> str:
        """What the rule saw: ``1.25 mm slices, lung kernel 'B70f', 240 slices``."""
        parts = [f"{self.thickness_mm:g} mm slices" if math.isfinite(self.thickness_mm) else "slice thickness unknown"]
        k = kernel_class(self.kernel)
        parts.append(f"{k} kernel {self.kernel!r}" if self.kernel else "kernel unknown")
        parts.append(f"{self.n_slices} slices")
        return ", ".join(parts)


def _floats(value: object) -> tuple[float, ...] | None:
    """The finite numbers of a multi-valued element; ``None`` when absent or any is not a finite number."""
    try:
        out = tuple(float(v) for v in value) if value is not None else None  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if out is not None and all(math.isfinite(v) for v in out) else None


def _why_not_an_image(ds) -> str:
    """Why a file is not a CT slice to read ('' when it is one)."""
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if sop.startswith("1.2.840.10008.5.1.4.1.1.88"):
        return "a structured report (dose report or SR)"
    if sop.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "a secondary capture"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return f"no pixel data (modality {modality or '?'})"
    if modality and modality != "CT":
        return f"modality {modality}, not CT"
    if sop and sop != CT_IMAGE and sop not in MULTIFRAME_CT_CLASSES:
        return f"SOP class {sop}, not a CT image"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "a localizer (scout)"
    return ""


def _shared_or_frame(ds, seq: str, item: str, frame: int = 0):
    """A functional group attribute of a multi-frame image: per-frame where given, else shared."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        g = groups[frame] if groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        if seq in g and len(g[seq].value) and item in g[seq].value[0]:
            return g[seq].value[0].get(item)
    return None


def scan_dicom_folder(folder: str | os.PathLike) -> tuple[dict[str, SeriesInfo], list[tuple[str, str]]]:
    """The CT series of a folder (its files directly inside), and the files left out with the reason.

    Returns:
        ``(series by UID, [(file, reason), ...])``; each series has its :class:`SeriesInfo` filled
        (thickness, extent, reason it cannot be read).
    """
    import pydicom

    unreadable: list[tuple[str, str]] = []

    def headers():
        for entry in sorted(Path(folder).iterdir()):
            if not entry.is_file() or entry.name.startswith("."):
                continue
            try:
                ds = pydicom.dcmread(entry, defer_size=1024)  # pixel data stays on disk
            except Exception as exc:  # noqa: BLE001 - any unreadable file is not a slice
                unreadable.append((str(entry), f"not readable as DICOM ({type(exc).__name__})"))
                continue
            yield str(entry), ds

    series, ignored = scan_headers(headers())
    for f, why in unreadable:
        log.debug("%s: left out (%s)", f, why)
    return series, unreadable + ignored


def scan_headers(headers: Iterable[tuple[str, Any]]) -> tuple[dict[str, SeriesInfo], list[tuple[str, str]]]:
    """The CT series of DICOM headers, and the headers left out with the reason: :func:`scan_dicom_folder` for
    headers from anywhere (files, or a DICOMweb server's metadata, where a ``PixelData`` element of any value
    stands for the pixel data).

    Args:
        headers: ``(name, pydicom dataset)`` pairs; the name (a file path) goes into :class:`SliceFile`.

    Returns:
        ``(series by UID, [(name, reason), ...])``.
    """
    import pydicom

    series: dict[str, SeriesInfo] = {}
    ignored: list[tuple[str, str]] = []
    for name, ds in headers:
        why = _why_not_an_image(ds)
        if why:
            ignored.append((name, why))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "no-series-uid")
        info = series.get(uid)
        if info is None:
            number = ds.get("SeriesNumber")
            try:
                number = int(number) if number not in (None, "") else None
            except (TypeError, ValueError):
                number = None
            kernel = (ds.get("ConvolutionKernel")
                      or _shared_or_frame(ds, "CTReconstructionSequence", "ConvolutionKernel"))
            if isinstance(kernel, (list, tuple, pydicom.multival.MultiValue)):
                kernel = "\\".join(str(k) for k in kernel)
            info = series[uid] = SeriesInfo(uid=uid, number=number, kernel=str(kernel or ""),
                                            description=str(ds.get("SeriesDescription", "") or ""))
            thickness = _floats([ds.get("SliceThickness")]) if ds.get("SliceThickness") not in (None, "") else None
            if thickness is None:
                t = _shared_or_frame(ds, "PixelMeasuresSequence", "SliceThickness")
                thickness = _floats([t]) if t not in (None, "") else None
            info.thickness_mm = thickness[0] if thickness and thickness[0] > 0 else math.nan
        multiframe = str(ds.get("SOPClassUID", "")) in MULTIFRAME_CT_CLASSES
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame_positions: list[tuple[float, ...] | None] = []
        if multiframe:
            frame_positions = [_floats(_shared_or_frame(ds, "PlanePositionSequence", "ImagePositionPatient", i))
                               for i in range(frames)]
            position = frame_positions[0] if frame_positions else None
            orientation = _floats(_shared_or_frame(ds, "PlaneOrientationSequence", "ImageOrientationPatient"))
        else:
            position, orientation = _floats(ds.get("ImagePositionPatient")), _floats(ds.get("ImageOrientationPatient"))
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        info.files.append(SliceFile(name, position, orientation, size, multiframe, frames, frame_positions))
    for f, why in ignored:
        log.debug("%s: left out (%s)", f, why)
    for info in series.values():
        _describe(info)
    return series, ignored


def _describe(info: SeriesInfo) -> None:
    files = info.files
    if any(f.multiframe for f in files):
        if len(files) != 1:
            info.reason = f"{len(files)} multi-frame images in one series"
            return
        info.n_slices = files[0].frames
        positions, orientations = files[0].frame_positions, {files[0].orientation}
    else:
        info.n_slices = len(files)
        if len({f.size for f in files}) != 1:
            info.reason = "slices of several sizes"
            return
        positions = [f.position for f in files]
        orientations = {tuple(round(v, 3) for v in f.orientation) if f.orientation else None for f in files}
    if None in orientations or len(orientations) != 1 or len(next(iter(orientations))) != 6:  # type: ignore[arg-type]
        info.reason = "slices of several orientations (or none given)"
        return
    if any(p is None or len(p) != 3 for p in positions):
        info.reason = "slices without a position"
        return
    iop = np.asarray(next(iter(orientations)), dtype=np.float64)
    if not _axial(iop):
        info.reason = "not axial (a reformat)"
        return
    z = np.unique(np.round(np.asarray(positions)[:, 2], 2))
    if len(z) < MIN_SLICES:
        info.reason = f"{len(z)} slice position(s), fewer than {MIN_SLICES}"
        return
    step = float(np.median(np.diff(z)))
    info.extent_mm = float(z[-1] - z[0]) + step
    if not math.isfinite(info.thickness_mm):
        info.thickness_mm = step


def _axial(iop: Sequence[float]) -> bool:
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    return norm > 0 and abs(normal[2]) / norm >= math.cos(math.radians(MAX_AXIAL_DEG))


def choose_series(series: dict[str, SeriesInfo], folder: str | os.PathLike, series_uid: str | None = None,
                  where: str = "the folder") -> tuple[SeriesInfo, str]:
    """The series to read and, when the folder holds several, why (one line naming each one left out).

    Args:
        series: from :func:`scan_dicom_folder`.
        folder: the folder, named in errors.
        series_uid: read this series (``--series``) instead of the rule's choice.
        where: where the series are, in the message (``"the study"`` for a study on a server).

    Raises:
        NoDicomSeriesError: no series, the asked series is not there or cannot be read, or no series is
            fit (the message gives each one's reason).
    """
    if not series:
        raise NoDicomSeriesError("the folder holds no DICOM series", folder)
    if series_uid is not None:
        if series_uid not in series:
            raise NoDicomSeriesError(f"no series {series_uid!r}; found {', '.join(sorted(series))}", folder)
        chosen = series[series_uid]
        if chosen.reason and not chosen.reason.startswith(("covers", f"{chosen.n_slices} slice")):  # asked: few is fine
            raise NoDicomSeriesError(f"{chosen.label()} cannot be read: {chosen.reason}", folder)
        return chosen, (f"read {chosen.label()} as asked (--series): {chosen.summary()}" if len(series) > 1 else "")
    eligible = [s for s in series.values() if not s.reason]
    if not eligible:  # only short series: the longest is read (the volume checks judge whether it is enough)
        eligible = [s for s in series.values() if s.reason.startswith(f"{s.n_slices} slice")]
        for s in eligible:
            s.reason = ""
    if not eligible:
        reasons = "; ".join(f"{s.label()}: {s.reason}" for s in series.values())
        raise NoDicomSeriesError(f"no CT series fit for the lungs ({reasons})", folder)
    longest = max(s.extent_mm for s in eligible)
    for s in eligible:
        if s.extent_mm < MIN_COVERAGE * longest:
            s.reason = f"covers {s.extent_mm:.0f} mm of the {longest:.0f} mm the longest series covers"
    covering = [s for s in eligible if not s.reason]
    klass = {"lung": 0, "unknown": 1, "soft": 2}

    def key(s: SeriesInfo):
        thick = s.thickness_mm if math.isfinite(s.thickness_mm) else math.inf
        return (thick > THIN_MM, klass[kernel_class(s.kernel)], round(thick, 2), -s.n_slices,
                s.number if s.number is not None else math.inf)

    covering.sort(key=key)
    chosen = covering[0]
    if len(series) == 1:
        return chosen, ""
    others = []
    for s in series.values():
        if s is chosen:
            continue
        if not s.reason:
            a, b = key(chosen), key(s)
            s.reason = ("thicker slices" if a[0] != b[0] else
                        f"{kernel_class(s.kernel)} kernel" if a[1] != b[1] else
                        "thicker slices" if a[2] != b[2] else "fewer slices" if a[3] != b[3] else
                        "a higher series number")
        others.append(f"{s.label()}: {s.reason}")
    return chosen, (f"{len(series)} CT series in {where}: read {chosen.label()} ({chosen.summary()}) by the rule "
                    f"(thin slices, lung kernel, most slices), left out {' | '.join(others)}")
