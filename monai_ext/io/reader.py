"""A MONAI :class:`~monai.data.ImageReader` backed by SimpleITK.

It reads NIfTI (``.nii``, ``.nii.gz``), NRRD/MHA/MHD files and DICOM: a single file, or a folder
holding a DICOM series (slices sorted by position). A folder with several series gives the axial CT
series fit for the lungs (:mod:`monai_ext.io.dicom_select`: thin slices, lung kernel, most slices; the
choice and the series left out are logged and kept as a warning) unless a series UID is asked for;
localizers, dose reports, structured reports and other files that are not CT slices are left out.
Single-frame slices are decoded by GDCM (uncompressed, deflate, RLE, JPEG lossless, JPEG-LS, JPEG
2000); an enhanced (or legacy converted enhanced) multi-frame CT image by pydicom. A series acquired
with a gantry tilt is resampled onto a grid perpendicular to its slices (each slice shifted in its
plane by linear interpolation), with a warning.

The array layout and metadata follow MONAI's ``ITKReader``: the array is indexed in ITK order
(x, y, z), ``affine``/``original_affine`` map voxel indices to RAS world coordinates and
``spatial_shape`` is the grid size. On top of that the exact SimpleITK geometry (origin, spacing,
direction in LPS) is kept under ``sitk_origin``, ``sitk_spacing`` and ``sitk_direction`` so that
:func:`monai_ext.io.write_like` can write results back on exactly the input grid.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from monai_ext.errors import (
    CorruptImageError,
    DamagedImageError,
    InputNotFoundError,
    NoDicomSeriesError,
    NotAnImageError,
)
from monai_ext.io.checks import (
    InputReport,
    attached_data_offset,
    check_declared_size,
    nifti_header_guard,
    regularize_slices,
    slices_even,
    spacing_tag_warning,
)

__all__ = ["SITKReader", "SUPPORTED_SUFFIXES", "WARNINGS_KEY", "read_sitk_image", "dicom_series"]

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".ima")
#: image metadata key holding the reader's warnings (repairs made), one per line
WARNINGS_KEY = "ctseverity|warnings"

#: DICOM tags copied into the metadata when present
_DICOM_TAGS = {
    "0008|0060": "Modality",
    "0020|000e": "SeriesInstanceUID",
    "0008|103e": "SeriesDescription",
    "0018|0050": "SliceThickness",
    "0018|1210": "ConvolutionKernel",
    "0008|0070": "Manufacturer",
}


def _lower_name(path: Path) -> str:
    return path.name.lower()


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The CT series in ``folder``: series UID -> its image files sorted by slice position (along the
    slice normal); localizers and files that are not CT images are left out."""
    from monai_ext.io.dicom_select import scan_dicom_folder

    series, _ = scan_dicom_folder(folder)
    return {uid: _sorted_files(info) for uid, info in series.items()}


def _sorted_files(info) -> list[str]:
    """The files of a :class:`~monai_ext.io.dicom_select.SeriesInfo` by position along the slice normal."""
    files = info.files
    if len(files) > 1 and all(f.position and f.orientation and len(f.orientation) == 6 for f in files):
        iop = np.asarray(files[0].orientation, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        return [f.path for f in sorted(files, key=lambda f: float(np.dot(f.position, normal)))]
    return [f.path for f in files]


def read_sitk_image(path: str | os.PathLike, series_uid: str | None = None, max_bytes: int | None = None
                    ) -> sitk.Image:
    """Read one image (file or DICOM series folder) into a SimpleITK image.

    The size the header declares is checked against the file and the memory budget before any voxel
    is read (:func:`monai_ext.io.checks.check_declared_size`). A DICOM series whose slices are
    duplicated, unevenly spaced or missing is put on an even grid or refused
    (:func:`monai_ext.io.checks.regularize_slices`); what was repaired is under :data:`WARNINGS_KEY`.

    Args:
        path: a NIfTI, NRRD, MHA/MHD or DICOM file, or a folder holding a DICOM series.
        series_uid: for a folder with several series, the one to read; by default the series
            with the most slices.
        max_bytes: memory budget of one study (``None``: no budget).

    Returns:
        The SimpleITK image; DICOM series carry their metadata dictionary of the first slice and
        the series UID under the key ``ctseverity|series_uid``.

    Raises:
        InputNotFoundError: the path does not exist.
        NoDicomSeriesError: a folder without a DICOM series, or without the series asked for.
        NotAnImageError: a file in a format that no reader understands.
        CorruptImageError: a file that looks like an image but cannot be decoded.
        InputTooLargeError: the declared image does not fit the file or the budget.
        DamagedImageError: a DICOM series whose slices cannot be put on an even grid.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or folder", p)
    if p.is_dir():
        return _read_series(p, series_uid, max_bytes)
    is_nifti = _lower_name(p).endswith((".nii", ".nii.gz"))
    if is_nifti:
        nifti_header_guard(p, max_bytes)
    if _lower_name(p).endswith(".gz"):
        _check_gzip(p)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.LoadPrivateTagsOff()
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _classify(exc, p) from None
    if not is_nifti:
        _check_budget(p, reader.GetSize(), reader.GetPixelID(), reader.GetNumberOfComponents(), max_bytes)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise CorruptImageError(f"cannot decode the image data ({_first_line(exc)})", p) from None


def _check_budget(path: Path, size: Sequence[int], pixel_id: int, components: int, max_bytes: int | None) -> None:
    """:func:`check_declared_size` from what SimpleITK read of a header; the file size too for uncompressed
    MHA and NRRD files with their data attached."""
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype
    shape = (*size, components) if components > 1 else tuple(size)
    offset = attached_data_offset(path) if path.is_file() else None
    check_declared_size(path, shape, dtype.itemsize, str(dtype), max_bytes, data_offset=offset,
                        file_bytes=None if offset is None else path.stat().st_size)


def _read_series(folder: Path, series_uid: str | None, max_bytes: int | None = None) -> sitk.Image:
    from monai_ext.io.dicom_select import choose_series, scan_dicom_folder

    series, ignored = scan_dicom_folder(folder)
    dicom = [(f, why) for f, why in ignored if not why.startswith("not readable as DICOM")]
    if not series and dicom:
        kinds = sorted({why for _, why in dicom})
        raise NoDicomSeriesError(f"no CT image series: {len(dicom)} DICOM file(s) left out ({', '.join(kinds)})",
                                 folder)
    chosen, why = choose_series(series, folder, series_uid)
    if why:
        log.info("%s: %s", folder, why)
    uid = chosen.uid
    if chosen.files[0].multiframe:
        img = _read_multiframe(chosen.files[0].path, folder, max_bytes)
        files = [chosen.files[0].path]
    else:
        files = _sorted_files(chosen)
        img = _read_slices(files, uid, folder, max_bytes)
    if why:
        previous = img.GetMetaData(WARNINGS_KEY) if img.HasMetaDataKey(WARNINGS_KEY) else ""
        img.SetMetaData(WARNINGS_KEY, "\n".join(filter(None, [why, previous])))
    img.SetMetaData("ctseverity|series_uid", _text(uid))
    img.SetMetaData("ctseverity|n_series", str(len(series)))
    img.SetMetaData("ctseverity|n_files", str(len(files)))
    return img


def _text(value: object) -> str:
    """A header value as metadata text (undecodable bytes of a damaged header replaced)."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _read_slices(files: list[str], uid: str, folder: Path, max_bytes: int | None) -> sitk.Image:
    """Single-frame slices (sorted by position) read by GDCM, on an even grid perpendicular to them."""
    try:
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        first.ReadImageInformation()
    except RuntimeError as exc:
        raise CorruptImageError(f"cannot read DICOM series {uid} ({_first_line(exc)})", folder) from None
    size = first.GetSize()
    _check_budget(folder, (size[0], size[1], len(files)), first.GetPixelID(), first.GetNumberOfComponents(), max_bytes)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # uneven slices are reported (and repaired) below
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise CorruptImageError(f"cannot read DICOM series {uid} ({_first_line(exc)})", folder) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    n = len(files)
    keys = ("0020|0032", "0020|0037")
    geometry = None
    if n >= 2 and img.GetDimension() == 3 and all(reader.HasMetaDataKey(i, k) for i in range(n) for k in keys):
        try:
            ipp = np.array([[float(v) for v in reader.GetMetaData(i, keys[0]).split("\\")] for i in range(n)])
            iop = np.array([float(v) for v in reader.GetMetaData(0, keys[1]).split("\\")])
            tag = float(reader.GetMetaData(0, "0018|0088")) if reader.HasMetaDataKey(0, "0018|0088") else None
            geometry = (ipp, iop, tag)
        except ValueError:
            geometry = None
    out = img if geometry is None else _even_slices(img, *geometry, files, folder)
    for key in reader.GetMetaDataKeys(0):
        if key in _DICOM_TAGS:
            out.SetMetaData(key, _text(reader.GetMetaData(0, key)))
    return out


def _read_multiframe(path: str, folder: Path, max_bytes: int | None) -> sitk.Image:
    """An enhanced (or legacy converted enhanced) multi-frame CT image, decoded by pydicom: frames in HU
    (per-frame or shared rescale), positions and orientation from the functional groups."""
    import pydicom

    from monai_ext.io.dicom_select import _shared_or_frame

    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.NumberOfFrames)
        rows, cols = int(ds.Rows), int(ds.Columns)
        check_declared_size(folder, (cols, rows, frames), int(ds.BitsAllocated) // 8, f"int{ds.BitsAllocated}",
                            max_bytes)
        iop = np.array(_shared_or_frame(ds, "PlaneOrientationSequence", "ImageOrientationPatient"), dtype=np.float64)
        spacing = [float(v) for v in _shared_or_frame(ds, "PixelMeasuresSequence", "PixelSpacing")]
        ipp = np.array([[float(v) for v in _shared_or_frame(ds, "PlanePositionSequence", "ImagePositionPatient", i)]
                        for i in range(frames)])
        arr = ds.pixel_array.reshape(frames, rows, cols).astype(np.float32)
        for i in range(frames):
            slope = _shared_or_frame(ds, "PixelValueTransformationSequence", "RescaleSlope", i)
            intercept = _shared_or_frame(ds, "PixelValueTransformationSequence", "RescaleIntercept", i)
            arr[i] = arr[i] * float(1.0 if slope is None else slope) + float(0.0 if intercept is None else intercept)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError, OSError) as exc:
        raise CorruptImageError(f"cannot read the multi-frame CT image {Path(path).name} ({type(exc).__name__}: "
                                f"{str(exc)[:150]})", folder) from None
    if np.all(np.round(arr) == arr) and arr.min() >= -32768 and arr.max() <= 32767:
        arr = arr.astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing[1], spacing[0], 1.0))
    names = [f"{Path(path).name}#frame{i + 1}" for i in range(frames)]
    out = _even_slices(img, ipp, iop, None, names, folder)
    if out is img:  # a single position step of 1 mm was a guess: set the grid from the frames
        normal = np.cross(iop[:3], iop[3:])
        pos = ipp @ normal
        order = np.argsort(pos)
        out = sitk.GetImageFromArray(arr[order])
        out.SetSpacing((spacing[1], spacing[0], float(np.median(np.diff(pos[order]))) if frames > 1 else 1.0))
        out.SetOrigin(tuple(float(v) for v in ipp[order[0]]))
        out.SetDirection(tuple(float(v) for v in np.stack([iop[:3], iop[3:], normal], axis=1).ravel()))
    for tag, key in (("0008|0060", "Modality"), ("0020|000e", "SeriesInstanceUID"),
                     ("0008|103e", "SeriesDescription"), ("0008|0070", "Manufacturer")):
        if key in ds:
            out.SetMetaData(tag, _text(ds.get(key)))
    return out


#: a gantry tilt below this (degrees) is a rounding of the positions, not a tilt
MIN_TILT_DEG = 0.5


def _even_slices(img: sitk.Image, ipp: np.ndarray, iop: np.ndarray, spacing_tag: float | None,
                 files: Sequence[str], folder: Path) -> sitk.Image:
    """The slices on an even grid perpendicular to them (:func:`regularize_slices`), a gantry tilt
    corrected, with the warnings under :data:`WARNINGS_KEY`.

    Args:
        img: the stacked slices (in the order of ``ipp``).
        ipp: Image Position (Patient) of each slice, (N, 3).
        iop: Image Orientation (Patient), (6,).
        spacing_tag: Spacing Between Slices, if given.
        files: the file (or frame) of each slice, for messages.
        folder: the series folder, named in messages.
    """
    n = len(files)
    if ipp.shape != (n, 3) or iop.shape != (6,) or n < 2:
        return img
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = ipp @ normal
    report = InputReport(path=str(folder))
    if spacing_tag:
        message = spacing_tag_warning(spacing_tag, pos)
        if message:
            report.warn(message)
    n_header, out = len(report.warnings), img
    offsets = (ipp - ipp[int(np.argmin(pos))]) - np.outer(pos - pos.min(), normal)  # in-plane shift of each slice
    stack = None
    if np.abs(offsets).max() > 0.05 * min(img.GetSpacing()[:2]):
        stack = _untilt(sitk.GetArrayFromImage(img), offsets @ row, offsets @ col, img.GetSpacing(), pos, folder,
                        report)
    if stack is not None or not slices_even(pos):  # the usual case is even: no copy of the pixels
        arr = sitk.GetArrayFromImage(img) if stack is None else stack
        stack, _, step = regularize_slices(arr, pos, report, list(files), folder)
        if len(report.warnings) > n_header:  # repaired
            out = sitk.GetImageFromArray(stack)
            spacing = img.GetSpacing()
            out.SetSpacing((spacing[0], spacing[1], step))
            out.SetOrigin(tuple(float(v) for v in ipp[int(np.argmin(pos))]))
            out.SetDirection(tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    if report.warnings:
        out.SetMetaData(WARNINGS_KEY, "\n".join(report.warnings))
    return out


def _untilt(arr: np.ndarray, along_row: np.ndarray, along_col: np.ndarray, spacing: Sequence[float],
            pos: np.ndarray, folder: Path, report: InputReport) -> np.ndarray:
    """Shift each slice in its plane so that the stack lies perpendicular to the slices (gantry tilt).

    Slice ``k``'s pixel ``(i, j)`` lies at its position plus the in-plane shift of its position from the
    first slice's; sampling it at ``(i - shift_x, j - shift_y)`` puts every slice on the first slice's
    in-plane grid. Pixels shifted in from outside the field of view take the slice's lowest value (air
    or padding).

    Raises:
        DamagedImageError: a tilt of more than 30 degrees (not a gantry tilt).
    """
    from scipy import ndimage

    dz = float(np.ptp(pos))
    shift = float(np.hypot(np.ptp(along_row), np.ptp(along_col)))
    angle = math.degrees(math.atan2(shift, dz)) if dz > 0 else 90.0
    if angle < MIN_TILT_DEG:
        return None  # type: ignore[return-value]
    if angle > 30.0:
        raise DamagedImageError(f"the slices are stacked {angle:.1f} degrees off their normal (a gantry tilt is at "
                                "most 30 degrees): the series geometry cannot be trusted", folder)
    out = np.empty(arr.shape, dtype=np.float32)
    for k in range(arr.shape[0]):
        sl = arr[k].astype(np.float32)
        out[k] = ndimage.shift(sl, (along_col[k] / spacing[1], along_row[k] / spacing[0]), order=1, mode="constant",
                               cval=float(sl.min()))
    report.warn(f"gantry tilt of {angle:.1f} degrees: the slices were shifted in their plane by up to {shift:.0f} mm "
                "onto a grid perpendicular to them (linear interpolation)")
    return np.round(out).astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else out.astype(arr.dtype)


def _check_gzip(path: Path, chunk: int = 1 << 22) -> None:
    """Decompress a .gz file once to check it is complete.

    SimpleITK's NIfTI reader fills a truncated gzip stream with zeros instead of failing, which
    would silently lose data; a complete stream ends with its end-of-stream marker.
    """
    decomp = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                decomp.decompress(block, 0)
                while decomp.unconsumed_tail:
                    decomp.decompress(decomp.unconsumed_tail, 0)
                if decomp.eof:
                    break
    except zlib.error as exc:
        raise CorruptImageError(f"damaged gzip data ({exc})", path) from None
    if not decomp.eof:
        raise CorruptImageError("the gzip stream ends early: the file is truncated", path)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # SimpleITK messages start with the C++ location; the reason is on a later line
    useful = [ln for ln in lines if not ln.startswith(("/", "sitk::ERROR", "Exception thrown"))]
    return (useful or lines or [type(exc).__name__])[-1][:200]


def _classify(exc: RuntimeError, path: Path) -> Exception:
    msg = str(exc)
    known = _lower_name(path).endswith(SUPPORTED_SUFFIXES)
    if "Unable to determine ImageIO reader" in msg or not known:
        return NotAnImageError("not a readable medical image (NIfTI, NRRD, MHA or DICOM expected)", path)
    return CorruptImageError(f"cannot read the image ({_first_line(exc)})", path)


class SITKReader(ImageReader):
    """Load medical images with SimpleITK, for MONAI's ``LoadImage``/``LoadImaged``.

    Args:
        series_uid: DICOM series to read from a folder with several; default the largest.
        affine_lps_to_ras: express ``affine`` in RAS (MONAI's default, as NibabelReader does).
        max_bytes: memory budget of one image, checked from its header before reading.

    Example::

        from monai.transforms import LoadImage
        load = LoadImage(reader=SITKReader(), image_only=True, ensure_channel_first=True)
        ct = load("study.nii.gz")    # MetaTensor (1, X, Y, Z), HU, RAS affine
        ct = load("dicom_folder/")   # the series with the most slices
    """

    def __init__(self, series_uid: str | None = None, affine_lps_to_ras: bool = True, max_bytes: int | None = None,
                 **kwargs: object) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.max_bytes = max_bytes
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for supported file suffixes and for folders (DICOM series)."""
        for name in ensure_tuple(filename):
            p = Path(name)
            if not (p.is_dir() or _lower_name(p).endswith(SUPPORTED_SUFFIXES)):
                return False
        return True

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: object) -> sitk.Image | list[sitk.Image]:
        """Read one image or a list of images (stacked as channels by :meth:`get_data`)."""
        names = ensure_tuple(data)
        series_uid = kwargs.get("series_uid", self.series_uid)
        imgs = [read_sitk_image(n, series_uid=series_uid, max_bytes=self.max_bytes)  # type: ignore[arg-type]
                for n in names]
        return imgs if len(names) > 1 else imgs[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Array in (x, y, z) index order plus MONAI metadata (affine, spatial_shape, ...)."""
        arrays, meta = [], None
        for im in [img] if isinstance(img, sitk.Image) else list(img):
            arrays.append(self._array(im))
            if meta is None:
                meta = self._meta(im)
        if meta is None:
            raise ValueError("no image to read")
        data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=0)
        if len(arrays) > 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return data, meta

    @staticmethod
    def _array(im: sitk.Image) -> np.ndarray:
        arr = sitk.GetArrayFromImage(im)  # (z, y, x) or (z, y, x, c)
        if im.GetNumberOfComponentsPerPixel() > 1:  # (c, x, y, z) -> channel last, as ITKReader
            return np.ascontiguousarray(np.moveaxis(arr.T, 0, -1))
        return np.ascontiguousarray(arr.T)

    def _meta(self, im: sitk.Image) -> dict:
        dim = im.GetDimension()
        spacing = np.asarray(im.GetSpacing(), dtype=np.float64)
        origin = np.asarray(im.GetOrigin(), dtype=np.float64)
        direction = np.asarray(im.GetDirection(), dtype=np.float64).reshape(dim, dim)
        affine = np.eye(dim + 1)
        affine[:dim, :dim] = direction @ np.diag(spacing)
        affine[:dim, -1] = origin
        if self.affine_lps_to_ras:
            affine = orientation_ras_lps(affine)
        meta: dict = {key: im.GetMetaData(key) for key in im.GetMetaDataKeys() if not key.startswith("ITK_")}
        for tag, name in _DICOM_TAGS.items():
            if tag in meta:
                meta[name] = meta.pop(tag).strip()
        meta.update({
            "spacing": spacing,
            "sitk_origin": origin,
            "sitk_spacing": spacing,
            "sitk_direction": direction.ravel(),
            "sitk_pixel_type": im.GetPixelIDTypeAsString(),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(im.GetSize(), dtype=np.int64),
            MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if im.GetNumberOfComponentsPerPixel() > 1 else float("nan"),
        })
        return meta
