"""Choosing the series of a study to grade: the thin-slice axial CT series that covers the lungs.

A CT study in a PACS often holds several series: scouts (localizers), thick and thin reconstructions, soft
tissue and lung kernels, coronal and sagittal reformats, dose reports. The rule (:data:`RULE`), applied to the
headers of each series (no pixel data):

1. eligible: modality CT, single-frame CT images, no localizer, axial slices (the slice normal within 10
   degrees of the patient's head-foot axis, the same orientation throughout), at least :data:`MIN_SLICES`
   slices of one size;
2. of those, the series whose z extent is at least 80 % of the longest extent in the study (a thin series
   of a few centimetres does not cover the lungs);
3. of those, the thinnest slices (Slice Thickness, else the slice spacing); ties go to ORIGINAL images
   before DERIVED ones, then to more slices, then to the lower series number.

Each series left out is logged with its reason, and the series chosen with the rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage

from monai_ext.errors import CTSeverityError

__all__ = ["SeriesCandidate", "describe_series", "choose_series", "RULE", "MIN_SLICES", "THIN_MM"]

#: fewest slices of a series that can be graded
MIN_SLICES = 10

#: share of the longest z extent a series must cover to be chosen
MIN_COVERAGE = 0.8

#: largest angle (degrees) between the slice normal and the patient's head-foot axis of an axial series
MAX_TILT_DEG = 10.0

#: slices thicker than this are graded with a warning (partial volume blurs ground glass)
THIN_MM = 3.0

#: the rule in one line, as logged
RULE = (f"axial CT images (no localizers, no multi-frame), at least {MIN_SLICES} slices; of those covering at "
        f"least {MIN_COVERAGE:.0%} of the longest z extent, the thinnest slices; ties: ORIGINAL before DERIVED, "
        "more slices, lower series number")


@dataclass
class SeriesCandidate:
    """What the rule needs to know of one series (from its headers).

    Attributes:
        uid: Series Instance UID.
        number: Series Number (``None`` when absent).
        description: Series Description.
        n_images: number of instances.
        thickness_mm: Slice Thickness, else the median slice spacing (``nan`` when neither is known).
        extent_mm: z extent from the first to the last slice position plus one slice step.
        original: Image Type says ORIGINAL.
        reason: why the series cannot be graded (``""`` when it can).
    """

    uid: str
    number: int | None
    description: str
    n_images: int
    thickness_mm: float
    extent_mm: float
    original: bool
    reason: str = ""

    def label(self) -> str:
        """``series 3 'Lung 1.25 mm' (1.2.3...)``, for the log."""
        number = "?" if self.number is None else self.number
        text = f"series {number}"
        if self.description:
            text += f" {self.description!r}"
        return f"{text} ({self.uid})"


def _values(value) -> list:
    """The values of a header element: one value or a multi-valued one, as a list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return value.split("\\")
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _floats(value) -> list[float]:
    try:
        return [float(v) for v in _values(value)]
    except (TypeError, ValueError):
        return []


def _upper(value) -> list[str]:
    return [str(v).upper() for v in _values(value)]


def describe_series(uid: str, headers: Sequence[Dataset]) -> SeriesCandidate:
    """A :class:`SeriesCandidate` of a series from the headers of its instances (pixel data not needed).

    Args:
        uid: the Series Instance UID.
        headers: one header per instance (e.g. WADO-RS metadata as pydicom datasets).
    """
    first = headers[0] if headers else Dataset()
    number = first.get("SeriesNumber")
    cand = SeriesCandidate(uid=uid, number=int(number) if number not in (None, "") else None,
                           description=str(first.get("SeriesDescription", "") or ""), n_images=len(headers),
                           thickness_mm=math.nan, extent_mm=0.0,
                           original="ORIGINAL" in _upper(first.get("ImageType")))
    modalities = {str(h.get("Modality", "")) for h in headers}
    if modalities != {"CT"}:
        cand.reason = f"modality {', '.join(sorted(modalities - {'CT'}) or ['?'])}, not CT"
        return cand
    if any(str(h.get("SOPClassUID", "")) != CTImageStorage for h in headers):
        cand.reason = "not single-frame CT images (e.g. enhanced multi-frame CT or a dose report)"
        return cand
    if any("LOCALIZER" in _upper(h.get("ImageType")) for h in headers):
        cand.reason = "a localizer (scout)"
        return cand
    orientations = {tuple(round(v, 3) for v in _floats(h.get("ImageOrientationPatient"))) for h in headers}
    if len(orientations) != 1 or len(next(iter(orientations))) != 6:
        cand.reason = "slices of several orientations (or none given)"
        return cand
    iop = np.asarray(next(iter(orientations)))
    normal = np.cross(iop[:3], iop[3:])
    if abs(normal[2]) / (np.linalg.norm(normal) or 1.0) < math.cos(math.radians(MAX_TILT_DEG)):
        cand.reason = "not axial"
        return cand
    if len({(h.get("Rows"), h.get("Columns")) for h in headers}) != 1:
        cand.reason = "slices of several sizes"
        return cand
    positions = [_floats(h.get("ImagePositionPatient")) for h in headers]
    if any(len(p) != 3 for p in positions):
        cand.reason = "slices without a position"
        return cand
    z = np.unique(np.round(np.asarray(positions) @ (normal / np.linalg.norm(normal)), 3))
    if len(z) < MIN_SLICES:
        cand.reason = f"{len(z)} slice position(s), fewer than {MIN_SLICES}"
        return cand
    step = float(np.median(np.diff(z)))
    cand.extent_mm = float(z[-1] - z[0]) + step
    thickness = _floats(first.get("SliceThickness"))
    cand.thickness_mm = thickness[0] if thickness and thickness[0] > 0 else step
    return cand


def choose_series(candidates: Sequence[SeriesCandidate]) -> tuple[SeriesCandidate, list[SeriesCandidate]]:
    """The series to grade by :data:`RULE`, and the others (each with the reason it was left out).

    Raises:
        CTSeverityError: no series of the study can be graded (the message lists each one's reason).
    """
    eligible = [c for c in candidates if not c.reason]
    if not eligible:
        reasons = ", ".join(f"{c.label()}: {c.reason}" for c in candidates) or "no CT series"
        raise CTSeverityError(f"no series fit for lung grading ({reasons})")
    longest = max(c.extent_mm for c in eligible)
    for c in eligible:
        if c.extent_mm < MIN_COVERAGE * longest:
            c.reason = f"covers {c.extent_mm:.0f} mm of the {longest:.0f} mm the longest series covers"
    covering = [c for c in eligible if not c.reason]
    covering.sort(key=lambda c: (c.thickness_mm, not c.original, -c.n_images,
                                 c.number if c.number is not None else math.inf))
    chosen, rest = covering[0], covering[1:]
    for c in rest:
        c.reason = (f"{c.thickness_mm:g} mm slices" if c.thickness_mm != chosen.thickness_mm
                    else "a tie lost to the chosen series")
    return chosen, [c for c in candidates if c is not chosen]
