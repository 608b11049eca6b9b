"""The source slices DICOM outputs refer to: the input's own DICOM series, or one made from another input.

A DICOM Segmentation frame and an SR measurement must point at the exact image they were computed on. For
a DICOM series input that is the series SimpleITK read (:func:`monai_ext.io.reader.dicom_series`, slices
sorted by position by GDCM): slice ``k`` of the input grid is the file at that slice's position.
:func:`source_headers` reads those headers (no pixel data) and finds each one's slice on the grid the
pipeline worked on.

For a NIfTI, NRRD or MHA input (``--dicom-out``) :func:`ct_series_from_grid` makes a CT image series of the
input grid with generated UIDs, written beside the SEG and SR so that they have images to refer to.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from monai_ext.errors import CTSeverityError, NoDicomSeriesError
from monai_ext.io.reader import dicom_series
from monai_ext.io.writer import ReferenceGrid
from pipelines import __version__

__all__ = ["source_headers", "OffGridError", "ct_series_from_grid", "write_series", "frames", "new_series",
           "MANUFACTURER"]

#: Manufacturer of every DICOM object ct-severity writes
MANUFACTURER = "ct-severity"

#: largest distance (mm) between a file's Image Position (Patient) and the grid's slice position
_POSITION_TOL_MM = 0.05


def new_series(series_number: int, description: str) -> dict:
    """The keyword arguments that make a highdicom object the one instance of a new ct-severity series (new
    UIDs, manufacturer, software version, research content)."""
    return {"series_instance_uid": hd.UID(), "series_number": series_number, "sop_instance_uid": hd.UID(),
            "instance_number": 1, "manufacturer": MANUFACTURER, "series_description": description[:64],
            "software_versions": __version__, "content_qualification": hd.ContentQualificationValues.RESEARCH}


def frames(volume: np.ndarray) -> np.ndarray:
    """A volume on the input grid, indexed (x, y, z) as SimpleITK and MONAI's readers index it, as DICOM
    frames (z, rows, columns): frame ``k`` is slice ``k``, row ``j`` is ``y = j``, column ``i`` is ``x = i``."""
    return np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0))


def _slice_position(grid: ReferenceGrid, k: int) -> np.ndarray:
    direction = grid.direction.reshape(3, 3)
    return grid.origin + k * grid.spacing[2] * direction[:, 2]


class OffGridError(CTSeverityError):
    """The source images do not lie on the grid the pipeline worked on (the reader resampled the series: a
    gantry tilt corrected, slices put on an even step, two images on one slice), so a DICOM Segmentation
    cannot refer to them exactly. ``headers`` holds the source headers read (slice order), which an SR that
    refers to the series as a whole can still list."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None, headers: Sequence[Dataset] = ()) -> None:
        super().__init__(reason, path)
        self.headers = list(headers)


def _frame_positions(ds: Dataset) -> list[np.ndarray]:
    """Image Position (Patient) of each frame of a multi-frame image (per-frame functional groups, else shared)."""
    from monai_ext.io.dicom_select import _shared_or_frame

    out = []
    for i in range(int(ds.NumberOfFrames)):
        value = _shared_or_frame(ds, "PlanePositionSequence", "ImagePositionPatient", i)
        if value is None:
            raise CTSeverityError(f"frame {i + 1} of the multi-frame image has no Image Position (Patient)")
        out.append(np.asarray([float(v) for v in value]))
    return out


def source_headers(folder: str | os.PathLike, series_uid: str, grid: ReferenceGrid
                   ) -> tuple[list[Dataset], list[int]]:
    """The headers (without pixel data) of the DICOM series the pipeline read, and the grid slice of each frame.

    A series of single-frame images: every file must lie on a slice of ``grid``: its Image Position (Patient)
    within 0.05 mm of the slice's position, the same rows and columns, one file per slice. Slices without a
    file (missing slices the reader filled in by interpolation) have no source image.

    An enhanced (or legacy converted enhanced) multi-frame CT image: every frame must lie on a slice of
    ``grid`` in the same way (frames may come in any order; the reader sorted them by position).

    Args:
        folder: the study's DICOM folder.
        series_uid: the series read (``ctseverity|series_uid`` in the image metadata).
        grid: the input grid (:func:`monai_ext.io.writer.reference_grid` of the image metadata).

    Returns:
        The headers (in slice order; the one multi-frame image) and the grid slice ``k`` of each source frame,
        in frame order (one per single-frame file; each frame of a multi-frame image in turn). A mask's frames
        ``frames(mask)[indices]`` are then the frames of the source images, one for one.

    Raises:
        NoDicomSeriesError: the series is no longer in the folder.
        OffGridError: frames off the slice positions (a series the reader resampled: gantry tilt, uneven
            slices) or two on one slice.
        CTSeverityError: a file that is not an image of the grid's rows and columns, or several multi-frame
            images in one series.
    """
    from monai_ext.io.dicom_select import MULTIFRAME_CT_CLASSES

    series = dicom_series(folder)
    if series_uid not in series:
        raise NoDicomSeriesError(f"no series {series_uid!r} to refer the DICOM outputs to", folder)
    nx, ny, nz = grid.shape
    normal = grid.direction.reshape(3, 3)[:, 2]
    headers = [pydicom.dcmread(name, stop_before_pixels=True) for name in series[series_uid]]
    positions: list[tuple[str, int, np.ndarray]] = []  # (name, header index, position) of each source frame
    for h, (name, ds) in enumerate(zip(series[series_uid], headers)):
        label = Path(name).name
        frames_n = int(ds.get("NumberOfFrames", 1) or 1)
        if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise CTSeverityError(f"{label} is not a {nx}x{ny} image of the grid read", folder)
        if str(ds.SOPClassUID) in MULTIFRAME_CT_CLASSES:
            if len(headers) != 1:
                raise CTSeverityError(f"{len(headers)} multi-frame images in one series", folder)
            try:
                positions += [(f"{label} frame {i + 1}", h, p) for i, p in enumerate(_frame_positions(ds))]
            except (CTSeverityError, ValueError, TypeError) as exc:
                raise CTSeverityError(f"{label}: {getattr(exc, 'reason', exc)}", folder) from None
        elif frames_n != 1:
            raise CTSeverityError(f"{label} holds {frames_n} frames but is no enhanced CT image", folder)
        else:
            positions.append((label, h, np.asarray([float(v) for v in ds.ImagePositionPatient])))
    indices: list[int] = []
    where: dict[int, str] = {}
    for label, _, position in positions:
        k = int(round(float((position - grid.origin) @ normal) / grid.spacing[2]))
        if not 0 <= k < nz or np.linalg.norm(position - _slice_position(grid, k)) > _POSITION_TOL_MM:
            delta = position - _slice_position(grid, min(max(k, 0), nz - 1))
            shift = float(np.linalg.norm(delta - (delta @ normal) * normal))
            how = (f"{label} lies {shift:.1f} mm in its plane off the grid read (the reader corrected a gantry tilt: "
                   "the masks lie between its pixels)" if shift > _POSITION_TOL_MM else
                   f"{label} lies {abs(float(delta @ normal)):.2f} mm off the nearest slice of the grid read (the "
                   "reader put the slices on an even step: the masks lie between its slices)")
            raise OffGridError(f"{how}, so a SEG on the source images would be a resampling of the masks, not them",
                               folder, _in_slice_order(headers, normal))
        if k in where:
            raise OffGridError(f"{label} and {where[k]} lie on slice {k}, but a DICOM SEG needs one image per "
                               "slice", folder, _in_slice_order(headers, normal))
        where[k] = label
        indices.append(k)
    if len(headers) == 1 and str(headers[0].SOPClassUID) in MULTIFRAME_CT_CLASSES:
        return headers, indices
    order = np.argsort(indices)
    return [headers[i] for i in order], [indices[i] for i in order]


def _in_slice_order(headers: list[Dataset], normal: np.ndarray) -> list[Dataset]:
    """Single-frame headers by position along ``normal`` (a multi-frame image as it is)."""
    if len(headers) == 1 or any("ImagePositionPatient" not in ds for ds in headers):
        return list(headers)
    return sorted(headers, key=lambda ds: float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal))


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def ct_series_from_grid(hu: np.ndarray, grid: ReferenceGrid, description: str = "",
                        series_number: int = 1) -> list[Dataset]:
    """A CT image series (generated study, series and frame-of-reference UIDs) of a volume in HU.

    Used for inputs that are not DICOM: the SEG and SR then refer to these slices. Voxel values are rounded
    to integers and stored as signed 16-bit HU (rescale slope 1, intercept 0). No patient data is known,
    so patient name and ID are empty.

    Args:
        hu: the CT on the input grid, indexed (x, y, z).
        grid: the input grid (origin, spacing, direction in LPS).
        description: Series Description.
        series_number: Series Number.

    Returns:
        One dataset per slice, slice ``k`` of the grid first to last.
    """
    if hu.shape != grid.shape:
        raise ValueError(f"volume shape {hu.shape} is not the grid's {grid.shape}")
    pixels = frames(np.clip(np.rint(hu), -32768, 32767).astype(np.int16))
    direction = grid.direction.reshape(3, 3)
    date, time = _now()
    study_uid, series_uid, frame_uid = hd.UID(), hd.UID(), hd.UID()
    out = []
    for k in range(pixels.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = hd.UID()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = description[:64]
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ""
        ds.SeriesNumber = series_number
        ds.PatientPosition = ""
        ds.BodyPartExamined = "CHEST"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in _slice_position(grid, k)]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[0])]  # between rows (y), between columns (x)
        ds.SliceThickness = _ds(grid.spacing[2])
        ds.KVP = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = pixels[k].tobytes()
        out.append(ds)
    return out


def _ds(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) of ``value``."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.8g}"


def write_series(datasets: Sequence[Dataset], folder: str | os.PathLike) -> list[Path]:
    """Write a series as ``folder/0001.dcm ...`` (the folder is expected to be new)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = out / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
