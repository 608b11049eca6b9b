"""A real-world DICOM corpus made from the real chest CT (every 4th pixel, 3rd slice; ``small_real_ct``):
several series in one folder, scouts, dose reports, SR and secondary captures, compressed transfer
syntaxes, multi-frame CT, non-ASCII headers and gantry tilt. Written into temporary folders by the tests;
never committed.

World coordinates (DICOM LPS, mm): voxel ``(i, j, k)`` of the volume lies at ``(i * 3.90625, j * 3.90625, k * 6)``;
slice arrays are ``vol[:, :, k].T`` (rows are ``j``), so the reader's (x, y, z) array is the volume itself.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

PIXEL_MM = 3.90625  # the real CT's 0.9765625 mm pixels, every 4th
STEP_MM = 6.0
INTERCEPT = -2048.0  # stored values are HU + 2048, unsigned (as many scanners write them)
STUDY_UID = generate_uid()
FRAME_UID = generate_uid()
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def base_dataset(sop_class: str, series_uid: str, number: int, description: str, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Corpus^Test", "CORPUS-1", "19500101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, series_uid, FRAME_UID
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
    ds.SeriesNumber, ds.SeriesDescription = number, description
    ds.Manufacturer, ds.ReferringPhysicianName = "Corpus", ""
    return ds


def ct_slice(arr2d: np.ndarray, position, orientation, series_uid: str, number: int, description: str,
             instance: int, kernel: str = "B70f", thickness: float = 1.25, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
             pixel_mm: float = PIXEL_MM) -> Dataset:
    """A CT Image Storage slice of HU values ``arr2d`` (rows, columns)."""
    ds = base_dataset(CTImageStorage, series_uid, number, description)
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.SliceThickness = thickness
    ds.ConvolutionKernel = kernel
    ds.KVP, ds.AcquisitionNumber = 120, 1
    ds.Rows, ds.Columns = arr2d.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = INTERCEPT, 1.0, "HU"
    ds.PixelData = np.round(arr2d - INTERCEPT).astype(np.uint16).tobytes()
    return ds


def axial_series(vol: np.ndarray, series_uid: str | None = None, number: int = 3, description: str = "Lung 1.25 mm",
                 kernel: str = "B70f", thickness: float = 1.25, step: int = 1, pixel_mm: float = PIXEL_MM,
                 step_mm: float = STEP_MM) -> list[Dataset]:
    """The volume's axial slices (every ``step``-th) as a CT series (voxels ``pixel_mm`` wide, ``step_mm`` apart)."""
    uid = series_uid or generate_uid()
    return [ct_slice(vol[:, :, k].T, (0.0, 0.0, k * step_mm), (1, 0, 0, 0, 1, 0), uid, number, description, n + 1,
                     kernel, thickness, pixel_mm=pixel_mm) for n, k in enumerate(range(0, vol.shape[2], step))]


def encode(ds: Dataset, syntax: str) -> Dataset:
    """``ds`` with its pixel data in ``syntax`` (RLE and JPEG-LS by pydicom, JPEG 2000 by Pillow, deflate)."""
    if syntax == "rle":
        ds.compress(RLELossless)
    elif syntax == "jpegls":
        ds.compress(JPEGLSLossless)
    elif syntax == "j2k":
        from PIL import Image

        arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    elif syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    else:
        raise ValueError(syntax)
    return ds


def localizer(vol: np.ndarray) -> Dataset:
    """A coronal scout (one projection image)."""
    proj = vol.astype(np.float32).mean(axis=1).T[::-1]  # (z, x)
    ds = ct_slice(np.ascontiguousarray(proj), (0.0, 200.0, 282.0), (1, 0, 0, 0, 0, -1), generate_uid(), 1,
                  "Topogram", 1, kernel="T20f", thickness=0.6, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    return ds


def dose_report() -> Dataset:
    """An X-Ray Radiation Dose SR (no pixel data)."""
    ds = base_dataset(DOSE_SR, generate_uid(), 997, "Dose Report", modality="SR")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [item]
    return ds


def dose_screen(vol: np.ndarray) -> Dataset:
    """A secondary capture of the dose screen (pixel data, modality OT)."""
    ds = base_dataset(SECONDARY_CAPTURE, generate_uid(), 999, "Dose Info", modality="OT")
    img = np.zeros((64, 64), np.uint8)
    img[10:20, 10:50] = 255
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = img.tobytes()
    return ds


def multiframe(vol: np.ndarray) -> Dataset:
    """A Legacy Converted Enhanced CT image (one multi-frame file) of the volume's slices (highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    slices = axial_series(vol, number=5, description="Lung 1.25 mm enhanced")
    for ds in slices:  # as a scanner writes them
        ds.ContentDate = ds.AcquisitionDate = "20240101"
        ds.ContentTime = ds.AcquisitionTime = "120000"
        ds.PatientOrientation, ds.PositionReferenceIndicator = "", ""
        ds.SpacingBetweenSlices = STEP_MM
    return LegacyConvertedEnhancedCTImage(slices, series_instance_uid=generate_uid(), series_number=5,
                                          sop_instance_uid=generate_uid(), instance_number=1)


def enhanced_shuffled(vol: np.ndarray, seed: int = 7) -> Dataset:
    """An Enhanced CT image (SOP class Enhanced CT Image Storage) of the volume's slices with its frames in a
    shuffled order (each frame's per-frame position says which slice it is): nothing may assume sorted frames."""
    ds = multiframe(vol)
    n, rows, cols = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(n, rows, cols)
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    perm = np.random.default_rng(seed).permutation(n)
    ds.PerFrameFunctionalGroupsSequence = [groups[i] for i in perm]
    ds.PixelData = np.ascontiguousarray(pixels[perm]).tobytes()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.SeriesDescription = "Lung 1.25 mm enhanced, frames shuffled"
    return ds


def tilted_series(vol: np.ndarray, degrees: float) -> tuple[list[Dataset], dict]:
    """The chest as a scanner with its gantry tilted by ``degrees`` acquires it: slice planes tilted about the
    left-right axis, their positions advancing along z by the table step (so not along the slice normal).

    Each slice is sampled from the volume (linear interpolation; air outside it) at its plane. Slices start
    low enough that every point of the volume is covered.

    Returns:
        the slices and the geometry (``origin``, ``row``, ``col``, ``normal``, ``step`` along the normal).
    """
    from scipy import ndimage

    t = np.radians(degrees)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row, col)
    nx, ny, nz = vol.shape
    z0 = -(ny - 1) * PIXEL_MM * np.sin(t)
    count = int(np.ceil(((nz - 1) * STEP_MM - z0) / STEP_MM)) + 1
    uid = generate_uid()
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy")  # (rows j, columns i)
    out = []
    for k in range(count):
        ipp = np.array([0.0, 0.0, z0 + k * STEP_MM])
        world = ipp[:, None, None] + row[:, None, None] * ii * PIXEL_MM + col[:, None, None] * jj * PIXEL_MM
        idx = world / np.array([PIXEL_MM, PIXEL_MM, STEP_MM])[:, None, None]
        plane = ndimage.map_coordinates(vol.astype(np.float32), idx, order=1, mode="constant", cval=-1024.0)
        ds = ct_slice(plane, ipp, (*row, *col), uid, 7, f"Lung tilted {degrees:g} deg", k + 1)
        ds.GantryDetectorTilt = float(degrees)
        out.append(ds)
    geometry = {"origin": np.array([0.0, 0.0, z0]), "row": row, "col": col, "normal": normal,
                "step": STEP_MM * float(np.cos(t))}
    return out, geometry


def write(datasets: list[Dataset], folder: Path, prefix: str = "im") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"{prefix}{n:04d}.dcm", enforce_file_format=True)
    return folder


def reread(path: Path) -> Dataset:
    return pydicom.dcmread(path)
