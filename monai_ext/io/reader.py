"""A MONAI :class:`~monai.data.ImageReader` backed by SimpleITK.

It reads NIfTI (``.nii``, ``.nii.gz``), NRRD/MHA/MHD files and DICOM: a single file, or a folder
holding a DICOM series (slices sorted by position by GDCM). A folder with several series gives
the one with the most slices (and logs which) unless a series UID is asked for.

The array layout and metadata follow MONAI's ``ITKReader``: the array is indexed in ITK order
(x, y, z), ``affine``/``original_affine`` map voxel indices to RAS world coordinates and
``spatial_shape`` is the grid size. On top of that the exact SimpleITK geometry (origin, spacing,
direction in LPS) is kept under ``sitk_origin``, ``sitk_spacing`` and ``sitk_direction`` so that
:func:`monai_ext.io.write_like` can write results back on exactly the input grid.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from monai_ext.errors import CorruptImageError, InputNotFoundError, NoDicomSeriesError, NotAnImageError
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
    """The DICOM series in ``folder``: series UID -> its files sorted by slice position."""
    folder = str(folder)
    reader = sitk.ImageSeriesReader
    uids = reader.GetGDCMSeriesIDs(folder) or ()
    return {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in uids}


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
    series = dicom_series(folder)
    if not series:
        raise NoDicomSeriesError("the folder holds no DICOM series", folder)
    if series_uid is not None:
        if series_uid not in series:
            raise NoDicomSeriesError(f"no series {series_uid!r}; found {', '.join(sorted(series))}", folder)
        uid = series_uid
    else:
        uid = max(series, key=lambda k: len(series[k]))
        if len(series) > 1:
            log.warning(
                "%s holds %d DICOM series; reading %s (%d slices), the one with the most slices "
                "(pass a series UID to choose another)", folder, len(series), uid, len(series[uid]),
            )
    files = series[uid]
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
    img = _even_slices(img, reader, files, folder)
    for key in reader.GetMetaDataKeys(0):
        if key in _DICOM_TAGS:
            img.SetMetaData(key, reader.GetMetaData(0, key))
    img.SetMetaData("ctseverity|series_uid", uid)
    img.SetMetaData("ctseverity|n_series", str(len(series)))
    img.SetMetaData("ctseverity|n_files", str(len(files)))
    return img


def _even_slices(img: sitk.Image, reader: sitk.ImageSeriesReader, files: Sequence[str], folder: Path) -> sitk.Image:
    """The series on an even slice grid (:func:`regularize_slices`), with its warnings under :data:`WARNINGS_KEY`."""
    n = len(files)
    keys = ("0020|0032", "0020|0037")
    if n < 2 or img.GetDimension() != 3 or not all(reader.HasMetaDataKey(i, k) for i in range(n) for k in keys):
        return img
    try:
        ipp = np.array([[float(v) for v in reader.GetMetaData(i, keys[0]).split("\\")] for i in range(n)])
        iop = np.array([float(v) for v in reader.GetMetaData(0, keys[1]).split("\\")])
    except ValueError:
        return img
    if ipp.shape != (n, 3) or iop.shape != (6,):
        return img
    normal = np.cross(iop[:3], iop[3:])
    pos = ipp @ normal
    report = InputReport(path=str(folder))
    if reader.HasMetaDataKey(0, "0018|0088"):
        try:
            message = spacing_tag_warning(float(reader.GetMetaData(0, "0018|0088")), pos)
        except ValueError:
            message = None
        if message:
            report.warn(message)
    n_header, out = len(report.warnings), img
    if not slices_even(pos):  # the usual case is even: GDCM's order and spacing are right, no copy of the pixels
        stack, _, step = regularize_slices(sitk.GetArrayFromImage(img), pos, report, list(files), folder)
        if len(report.warnings) > n_header:  # repaired
            out = sitk.GetImageFromArray(stack)
            spacing = img.GetSpacing()
            out.SetSpacing((spacing[0], spacing[1], step))
            out.SetOrigin(tuple(float(v) for v in ipp[int(np.argmin(pos))]))
            out.SetDirection(tuple(float(v) for v in np.stack([iop[:3], iop[3:], normal], axis=1).ravel()))
    if report.warnings:
        out.SetMetaData(WARNINGS_KEY, "\n".join(report.warnings))
    return out


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
