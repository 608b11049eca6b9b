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

__all__ = ["source_headers", "ct_series_from_grid", "write_series", "frames", "new_series", "MANUFACTURER"]

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


def source_headers(folder: str | os.PathLike, series_uid: str, grid: ReferenceGrid
                   ) -> tuple[list[Dataset], list[int]]:
    """The headers (without pixel data) of the DICOM series the pipeline read, and the slice of the grid each is.

    Every file must lie on a slice of ``grid``: its Image Position (Patient) within 0.05 mm of the slice's
    position, the same rows and columns, one frame. Slices without a file (missing slices the reader filled in
    by interpolation) have no source image.

    Args:
        folder: the study's DICOM folder.
        series_uid: the series read (``ctseverity|series_uid`` in the image metadata).
        grid: the input grid (:func:`monai_ext.io.writer.reference_grid` of the image metadata).

    Returns:
        The headers in slice order and, for each, its slice index ``k`` on ``grid``.

    Raises:
        NoDicomSeriesError: the series is no longer in the folder.
        CTSeverityError: a file that is not one slice of ``grid`` (multi-frame, another size, off the slice
            positions: a series the reader resampled to an even slice step), or two files on one slice.
    """
    series = dicom_series(folder)
    if series_uid not in series:
        raise NoDicomSeriesError(f"no series {series_uid!r} to refer the DICOM outputs to", folder)
    nx, ny, nz = grid.shape
    normal = grid.direction.reshape(3, 3)[:, 2]
    by_slice: dict[int, Dataset] = {}
    for name in series[series_uid]:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise CTSeverityError(f"{Path(name).name} is not a single {nx}x{ny} slice of the grid read", folder)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        k = int(round(float((position - grid.origin) @ normal) / grid.spacing[2]))
        if not 0 <= k < nz or np.linalg.norm(position - _slice_position(grid, k)) > _POSITION_TOL_MM:
            raise CTSeverityError(f"{Path(name).name} lies off the slices of the grid read (a series resampled to "
                                  "an even slice step), so DICOM outputs could not refer to it exactly", folder)
        if k in by_slice:
            raise CTSeverityError(f"{Path(name).name} and another file lie on slice {k}, but DICOM outputs need one "
                                  "image per slice", folder)
        by_slice[k] = ds
    indices = sorted(by_slice)
    return [by_slice[k] for k in indices], indices


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
