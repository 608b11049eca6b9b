"""Checks that damaged input never changes a result silently: each kind of damage is refused with
its reason or repaired with a warning.

The rules (``docs/input_rules.md`` lists each with its message):

- **resource guard** (:func:`check_declared_size`): the image a header declares must fit the file
  that holds it and, in memory, a budget (:func:`default_max_memory`); both are checked from the
  header, before anything is allocated.
- **lost slices** (:func:`repair_lost_slices`): slices blank or without a finite value between slices
  with content are missing slices, under the rule of missing DICOM slices below.
- **non-finite voxels** (:func:`repair_nonfinite`): NaN or infinite voxels are filled by linear
  interpolation along the slice axis (air where nothing is left to fill from); more than
  :data:`MAX_NONFINITE_FRACTION` of the body voxels is refused, and, after the lung mask, more than
  :data:`MAX_NONFINITE_FRACTION` of the lung (:meth:`InputReport.check_lung`).
- **DICOM slice geometry** (:func:`regularize_slices`): duplicated slice positions (identical pixels:
  one is dropped; different pixels: refused), uneven spacing (resampled to the median spacing) and
  missing slices (at most :data:`MAX_MISSING_RUN` in a row and :data:`MAX_MISSING_FRACTION` of the
  series interpolated; more is refused).
- **headers that disagree** (:func:`nifti_form_warnings`): a NIfTI qform and sform that give other
  geometries are warned about.
- **lung at the volume's edge** (:func:`lung_extent_warnings`): a lung that reaches the first or last
  slice or the side of the field of view, or whose volume is implausible for a chest, is warned about.

Example::

    report = InputReport()
    volume = repair_nonfinite(volume, report, path="study.nii.gz")   # raises DamagedImageError
    report.warnings                                                   # what was repaired
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monai_ext.errors import CorruptImageError, DamagedImageError, InputTooLargeError, NotCTError

__all__ = [
    "InputReport",
    "MAX_NONFINITE_FRACTION",
    "MAX_MISSING_RUN",
    "MAX_MISSING_FRACTION",
    "SPACING_TOLERANCE",
    "BYTES_PER_VOXEL",
    "default_max_memory",
    "parse_memory",
    "format_bytes",
    "check_declared_size",
    "attached_data_offset",
    "nifti_nonfinite_mask",
    "nifti_form_warnings",
    "repair_nonfinite",
    "lost_slices",
    "repair_lost_slices",
    "tissue_levels",
    "check_hu_scale",
    "TISSUE_BAND_HU",
    "MAX_SLICE_SCALE_HU",
    "MAX_SLICE_AIR_HU",
    "MIN_AIR_LEVEL_HU",
    "regularize_slices",
    "slices_even",
    "spacing_tag_warning",
    "lung_extent_warnings",
]

#: largest share of the body (and of the lung) whose voxels may be repaired from NaN/inf
MAX_NONFINITE_FRACTION = 0.01
#: most consecutive missing slices of a DICOM series that are interpolated
MAX_MISSING_RUN = 2
#: largest share of a DICOM series' slices that may be interpolated
MAX_MISSING_FRACTION = 0.05
#: slice steps within this share of the median step count as even
SPACING_TOLERANCE = 0.05
#: peak working memory of one study per voxel of its volume, in bytes (a study of N voxels needs about
#: N x BYTES_PER_VOXEL; measured: a 512x512x141 CT, 37 M voxels, through hirescam peaked at 1.7 GB, about
#: 35 bytes per voxel above the interpreter and the model)
BYTES_PER_VOXEL = 48
#: air, for non-finite voxels outside the body
AIR_HU = -1000.0
#: body: voxels above this (HU)
BODY_HU = -500.0
#: the deflate format cannot compress more than this (1032:1)
_MAX_DEFLATE_RATIO = 1032

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40}


@dataclass
class InputReport:
    """What the checks found in one input: warnings (repairs made) and the voxels repaired.

    Attributes:
        warnings: one sentence per repair or suspicion, in the order found.
        repaired: boolean mask of the voxels filled in (on the loaded grid), or ``None`` when none was.
        path: the input, named in refusals.
    """

    warnings: list[str] = field(default_factory=list)
    repaired: np.ndarray | None = None
    path: str | None = None

    def warn(self, message: str) -> None:
        """Record a warning (once)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def check_lung(self, lung: np.ndarray) -> None:
        """Refuse when more than :data:`MAX_NONFINITE_FRACTION` of the lung was repaired from NaN/inf voxels.

        Raises:
            DamagedImageError: with the share of the lung that was repaired.
        """
        if self.repaired is None or self.repaired.shape != lung.shape:
            return
        n_lung = int(np.count_nonzero(lung))
        n_bad = int(np.count_nonzero(self.repaired & lung))
        if n_lung and n_bad > MAX_NONFINITE_FRACTION * n_lung:
            raise DamagedImageError(
                f"{100 * n_bad / n_lung:.1f} % of the lung voxels were NaN or infinite ({n_bad} voxels); more than "
                f"{100 * MAX_NONFINITE_FRACTION:g} % cannot be repaired without changing the lesion share", self.path)
        if n_bad:
            self.warn(f"{100 * n_bad / n_lung:.2f} % of the lung was repaired from NaN/infinite voxels "
                      f"(at most {100 * MAX_NONFINITE_FRACTION:g} % is accepted)")


# ----------------------------------------------------------------------------------------------
# resource guard


def default_max_memory() -> int:
    """The default memory budget of one study: three quarters of the machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        total = 16 << 30
    return int(0.75 * total)


def parse_memory(text: str | int | float) -> int:
    """Bytes of a memory size such as ``"8G"``, ``"512MB"`` or ``"1.5g"`` (binary units).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "").removesuffix("ib")
        num = s.rstrip("kmgtb")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise ValueError(f"not a memory size: {text!r} (e.g. 8G, 512M)")
        try:
            value = float(num) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"not a memory size: {text!r} (e.g. 8G, 512M)") from None
    if not value > 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``n`` bytes in words: ``"1.2 GB"`` (binary units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def _shape_text(shape: tuple[int, ...], what: str) -> str:
    return "x".join(str(int(s)) for s in shape) + f" {what}"


def check_declared_size(path: str | os.PathLike, shape: tuple[int, ...], bytes_per_voxel: int, what: str,
                        max_bytes: int | None, data_offset: int | None = None, file_bytes: int | None = None,
                        exact: bool = True) -> None:
    """Refuse an image whose declared size does not fit its file or the memory budget, before reading it.

    Args:
        path: the input (named in the message).
        shape: the declared grid (including components).
        bytes_per_voxel: bytes of one stored voxel.
        what: the stored voxel type in words (``"int16"``), for the message.
        max_bytes: memory budget of one study (``None``: no budget check).
        data_offset: where the voxel data starts in the file, when the whole file is the image's
            (uncompressed NIfTI); with ``file_bytes`` checks that the data fits the file.
        file_bytes: bytes of the (uncompressed) file content; ``None`` to skip the file check.
        exact: ``file_bytes`` is the content's size (else an upper bound of it).

    Raises:
        InputTooLargeError: the data cannot be in the file, or needs more than ``max_bytes``.
    """
    n_vox = int(np.prod([int(s) for s in shape], dtype=np.float64))
    declared = n_vox * int(bytes_per_voxel)
    dims = _shape_text(shape, what)
    size = Path(path).stat().st_size
    if file_bytes is not None and data_offset is not None and data_offset + declared > file_bytes:
        want, have = format_bytes(declared), format_bytes(max(0, file_bytes - data_offset))
        if want == have:  # a few bytes short: exact counts
            want, have = f"{declared} bytes", f"{max(0, file_bytes - data_offset)} bytes"
        raise InputTooLargeError(
            f"the header declares a {dims} image ({want} of voxel data) but the file holds "
            f"{'' if exact else 'at most '}{have} of data ({format_bytes(size)} on disk): "
            "truncated file or wrong header", path)
    if max_bytes is not None and n_vox * BYTES_PER_VOXEL > max_bytes:
        raise InputTooLargeError(
            f"the header declares a {dims} image: processing it needs about {format_bytes(n_vox * BYTES_PER_VOXEL)}, "
            f"more than the memory budget of {format_bytes(max_bytes)} (--max-memory); the file is "
            f"{format_bytes(size)}", path)


def attached_data_offset(path: str | os.PathLike) -> int | None:
    """Where the raw voxels of an uncompressed MHA (``ElementDataFile = LOCAL``) or NRRD (``encoding: raw``,
    data attached) file start; ``None`` for compressed or detached data and other formats."""
    name = str(path).lower()
    if not name.endswith((".mha", ".nrrd")):
        return None
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if name.endswith(".mha"):
        text = head.decode("latin-1")
        m = re.search(r"^ElementDataFile\s*=\s*(\S+)[^\n]*\n", text, re.M)
        if m is None or m.group(1).upper() != "LOCAL" or re.search(r"^CompressedData\s*=\s*True", text, re.M | re.I):
            return None
        return m.end()
    end = head.find(b"\n\n")
    if end < 0:
        return None
    text = head[:end].decode("latin-1").lower()
    if re.search(r"^data ?file:", text, re.M) or not re.search(r"^encoding:\s*raw\s*$", text, re.M):
        return None
    return end + 2


def gzip_content_bound(path: str | os.PathLike) -> int:
    """An upper bound of the uncompressed size of a gzip file, exact when it is below 4 GiB.

    The gzip trailer holds the uncompressed size modulo 2**32; deflate never compresses more than
    1032:1, which bounds the size when the trailer may have wrapped around.
    """
    size = Path(path).stat().st_size
    bound = size * _MAX_DEFLATE_RATIO
    if size < 18:
        return bound
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    return isize if bound < (1 << 32) else bound


def nifti_header_guard(path: str | os.PathLike, max_bytes: int | None) -> None:
    """:func:`check_declared_size` for a NIfTI file (``.nii``/``.nii.gz``), from its header alone.

    Raises:
        InputTooLargeError: the declared data does not fit the file or the budget.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # noqa: BLE001 - not readable by nibabel: SimpleITK gives the reason
        return
    shape = tuple(int(s) for s in img.header.get_data_shape())
    dtype = img.header.get_data_dtype()
    offset = int(getattr(img.dataobj, "offset", 0))
    size = Path(path).stat().st_size
    content = gzip_content_bound(path) if str(path).lower().endswith(".gz") else size
    exact = content != size * _MAX_DEFLATE_RATIO  # else only the deflate bound is known
    check_declared_size(path, shape, dtype.itemsize, str(dtype), max_bytes, data_offset=offset if exact else 0,
                        file_bytes=content, exact=exact)


def _nib_load(path: str | os.PathLike):
    """The NIfTI image as nibabel reads it; a header nibabel cannot read (a damaged magic string, sizes)
    is refused, since the two readers would not agree on the file.

    Raises:
        CorruptImageError: nibabel cannot read the header.
    """
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged headers
        detail = (str(exc).splitlines() or [""])[0].replace(str(path), "the file")[:120]
        raise CorruptImageError(f"damaged NIfTI header: nibabel cannot read it ({type(exc).__name__}: {detail})",
                                path) from None


def nifti_nonfinite_mask(path: str | os.PathLike) -> np.ndarray | None:
    """Where a floating-point NIfTI file holds NaN or infinite voxels, in voxel index order (i, j, k).

    SimpleITK's NIfTI reader turns NaN and infinite voxels into 0 (soft tissue in HU) without a
    word, so they are found in the file itself. ``None`` for integer data or when none is there.
    """
    img = _nib_load(path)
    if img.get_data_dtype().kind not in "fc":
        return None
    raw = np.asanyarray(img.dataobj.get_unscaled())
    bad = ~np.isfinite(raw)
    del raw
    while bad.ndim > 3 and bad.shape[-1] == 1:
        bad = bad[..., 0]
    return bad if bad.any() else None


def nifti_form_warnings(path: str | os.PathLike, spacing: Sequence[float]) -> list[str]:
    """A warning when a NIfTI header's two geometries (qform and sform, both set) disagree.

    Readers differ in which one they use (SimpleITK 2.5 may take the qform where nibabel takes the
    sform), so the voxel size, and with it every volume, depends on the reader; ``spacing`` (what was
    read) names the one used.
    """
    hdr = _nib_load(path).header
    q, s = hdr.get_qform(coded=True)[0], hdr.get_sform(coded=True)[0]
    if q is None or s is None or np.allclose(q, s, atol=1e-3):
        return []
    zq, zs = (np.sqrt((m[:3, :3] ** 2).sum(axis=0)) for m in (q, s))
    used = "sform" if np.allclose(zs, spacing, rtol=1e-3) else "qform" if np.allclose(zq, spacing, rtol=1e-3) else "?"

    def fmt(z: np.ndarray) -> str:
        return "x".join(f"{v:.3g}" for v in z)

    return [f"the NIfTI header's qform and sform disagree (voxel size {fmt(zq)} vs {fmt(zs)} mm, origin "
            f"{fmt(q[:3, 3])} vs {fmt(s[:3, 3])} mm): read with the {used} (check which is right)"]


# ----------------------------------------------------------------------------------------------
# non-finite voxels


def _fill_along_z(vol: np.ndarray, bad: np.ndarray) -> None:
    """Fill ``vol[bad]`` in place by linear interpolation along the last axis between the nearest finite
    voxels of the same column (the nearest one where there is one side only; air where none)."""
    xs, ys = np.nonzero(bad.any(axis=2))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    sub, b = vol[x0:x1, y0:y1], bad[x0:x1, y0:y1]
    nz = sub.shape[2]
    z = np.arange(nz, dtype=np.int32)
    prev = np.maximum.accumulate(np.where(b, -1, z), axis=2)
    nxt = np.minimum.accumulate(np.where(b, nz, z)[..., ::-1], axis=2)[..., ::-1]
    has_p, has_n = prev >= 0, nxt < nz
    vp = np.take_along_axis(sub, np.clip(prev, 0, nz - 1), axis=2)
    vn = np.take_along_axis(sub, np.clip(nxt, 0, nz - 1), axis=2)
    w = np.where(has_p & has_n, (z - prev) / np.maximum(nxt - prev, 1), 0.0)
    filled = np.where(has_p & has_n, vp * (1 - w) + vn * w, np.where(has_p, vp, np.where(has_n, vn, AIR_HU)))
    sub[b] = filled[b]


def _body(vol: np.ndarray) -> np.ndarray:
    """The body: the largest connected region above :data:`BODY_HU`, holes filled slice by slice."""
    from scipy import ndimage

    fg = vol > BODY_HU
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(body, structure=np.ones((3, 3, 1), bool))


def repair_nonfinite(volume: np.ndarray, report: InputReport, extra_bad: np.ndarray | None = None,
                     path: str | os.PathLike | None = None) -> np.ndarray:
    """Repair NaN and infinite voxels of a CT volume (X, Y, Z) in HU, or refuse it.

    Rule: the voxels are first filled by linear interpolation along the slice axis (Z) between the
    nearest finite voxels of their column (air where the column has none). A voxel that then lies
    inside the body (the largest region above -500 HU, holes filled) counts against the limit: more
    than :data:`MAX_NONFINITE_FRACTION` of the body is refused; fewer are kept filled, with a warning.
    Non-finite voxels outside the body (outside the scanner's field of view, the table) keep their
    fill, air where their column holds no finite value.

    Args:
        volume: float array (X, Y, Z); changed in place when writable.
        report: receives the warnings and the repaired mask.
        extra_bad: voxels known to be non-finite in the file although ``volume`` holds finite values
            there (:func:`nifti_nonfinite_mask`).
        path: the input, named in the refusal.

    Returns:
        The repaired volume.

    Raises:
        DamagedImageError: no finite voxel at all, or more than the limit inside the body.
    """
    bad = ~np.isfinite(volume)
    if extra_bad is not None and extra_bad.shape == volume.shape:
        bad |= extra_bad
    if not bad.any():
        return volume
    n_bad = int(bad.sum())
    if n_bad == bad.size:
        raise DamagedImageError("every voxel is NaN or infinite", path)
    vol = volume if volume.flags.writeable else volume.copy()
    if not np.issubdtype(vol.dtype, np.floating):
        vol = vol.astype(np.float32)
    vol[bad] = np.nan
    _fill_along_z(vol, bad)
    body = _body(vol)
    inside = bad & body
    n_in, n_body = int(inside.sum()), max(int(body.sum()), 1)
    slices = np.flatnonzero(inside.any(axis=(0, 1)))
    share = n_in / n_body
    if share > MAX_NONFINITE_FRACTION:
        raise DamagedImageError(
            f"{100 * share:.1f} % of the voxels inside the body are NaN or infinite ({n_in} voxels on "
            f"{len(slices)} of {vol.shape[2]} slices); more than {100 * MAX_NONFINITE_FRACTION:g} % cannot be "
            "repaired without changing the result", path)
    outside = bad & ~body
    if n_in:
        report.warn(f"{n_in} NaN/infinite voxels inside the body ({100 * share:.2f} % of it, on {len(slices)} "
                    "slices) filled by interpolation between slices")
    if outside.any():
        report.warn(f"{int(outside.sum())} NaN/infinite voxels outside the body filled (air, {AIR_HU:.0f} HU, "
                    "where their column holds no value)")
    report.repaired = inside
    return vol


def lost_slices(volume: np.ndarray) -> np.ndarray:
    """Slices (along the last axis) lost between the first and the last slice with content: a single value
    throughout (blank, as a failed transfer or conversion leaves them; never real in a chest) or no finite value.
    Such slices at either end are padding, not lost."""
    flat = volume.reshape(-1, volume.shape[-1])
    if np.issubdtype(flat.dtype, np.floating):  # fmin/fmax leave NaN out; an all-NaN slice gives NaN
        lo, hi = np.fmin.reduce(flat, axis=0), np.fmax.reduce(flat, axis=0)
        lost = (lo == hi) | ~np.isfinite(lo) | ~np.isfinite(hi)
    else:
        lost = flat.min(axis=0) == flat.max(axis=0)
    content = np.flatnonzero(~lost)
    if content.size == 0:
        return np.zeros(0, dtype=np.int64)
    k = np.arange(volume.shape[-1])
    return np.flatnonzero(lost & (k > content[0]) & (k < content[-1]))


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive indices as (first, last)."""
    if indices.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) > 1)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [indices.size - 1]])
    return [(int(indices[a]), int(indices[b])) for a, b in zip(starts, ends)]


#: the study's body tissue level (the most common value from -500 to 2500 HU: fat or soft tissue) lies in here
TISSUE_BAND_HU = (-300.0, 300.0)
#: a slice whose body tissue level lies further than this from the study's is on another intensity scale
MAX_SLICE_SCALE_HU = 400.0
#: ... or whose air level (2nd percentile above the padding) lies further than this from the study's
MAX_SLICE_AIR_HU = 300.0
#: in HU, the most common value of the voxels below -500 HU (outside air, or the lung where the field of view
#: holds no outside air) lies above this; noise spreads air below it (a sharp kernel: 60 HU and more), but not
#: its most common value
MIN_AIR_LEVEL_HU = -1100.0


def tissue_levels(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's (last axis) body tissue level and air level, from every second pixel.

    The tissue level is the most common value (20 HU bins) of the voxels from -500 to 2500 HU; the air level the
    2nd percentile of the values from -1100 HU up (below lie padding and fill values). NaN for a slice with less
    than 2 % of such voxels."""
    edges = np.arange(-500.0, 2520.0, 20.0)
    tissue, air = np.full(volume.shape[-1], np.nan), np.full(volume.shape[-1], np.nan)
    for k in range(volume.shape[-1]):
        sl = volume[::2, ::2, k].astype(np.float32, copy=False).ravel()
        body = sl[(sl >= -500) & (sl < 2500)]  # NaN fails both comparisons
        if body.size >= 0.02 * sl.size and body.size:
            counts, _ = np.histogram(body, bins=edges)
            tissue[k] = edges[int(np.argmax(counts))] + 10.0
        values = sl[sl >= -1100]
        if values.size >= 0.02 * sl.size and values.size:
            air[k] = float(np.percentile(values, 2))
    return tissue, air


def check_hu_scale(volume: np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
    """Whether a volume is on the Hounsfield scale, whole and slice by slice (a wrong rescale slope or intercept
    in a DICOM header, a wrong NIfTI scale factor).

    In HU, the most common value of the body (fat, -100 HU, or soft tissue, 20-60 HU) lies within
    :data:`TISSUE_BAND_HU`, from slice to slice within about 200 HU, the air level of each slice near -1000 HU,
    and the most common value of the voxels below -500 HU (air, or lung) above -1100 HU. Measured on the eight real
    CT of ``../shared/data``: study levels -110 to 10 HU, slices at most 180 HU from them, slice air levels at most
    44 HU from the study's, no voxel below -1100 HU but padding. A Rescale Slope of 2 puts the level at 810 HU;
    a slope of 2 on some slices puts their tissue level 900 HU off, an intercept of 0 instead of -1024 their air
    level 994 HU off; a NIfTI scale factor of 2 puts air at -2000 HU. The share of voxels below -1100 HU is no
    test: a sharp kernel's noise, stored unclipped, puts a tenth of a scan with outside air there.

    Args:
        volume: (X, Y, Z), slices along the last axis.
        path: the input, named in refusals.

    Returns:
        The slices on another intensity scale than the study (their tissue level more than
        :data:`MAX_SLICE_SCALE_HU` or their air level more than :data:`MAX_SLICE_AIR_HU` from the median of the
        slices'): :func:`repair_lost_slices` treats them as lost.

    Raises:
        NotCTError: the study's level outside :data:`TISSUE_BAND_HU`, or the most common value (20 HU bins) of the
            voxels below -500 HU below :data:`MIN_AIR_LEVEL_HU` (padding and fill values, each held by more than
            0.5 % of the voxels, left out).
    """
    levels, air = tissue_levels(volume)
    if np.isfinite(levels).any():
        level = float(np.nanmedian(levels))
        if not TISSUE_BAND_HU[0] <= level <= TISSUE_BAND_HU[1]:
            raise NotCTError(f"values are not on the Hounsfield scale: the body's most common value is {level:.0f} HU "
                             f"(fat and soft tissue lie near -100 to 60 HU): a wrong rescale slope or intercept in the "
                             "header?", path)
    sample = volume[::2, ::2, ::2]
    sample = sample[np.isfinite(sample)]
    if sample.size:
        low, counts = np.unique(sample[sample < -500], return_counts=True)
        low, counts = low[counts <= 0.005 * sample.size], counts[counts <= 0.005 * sample.size]  # padding, fill out
        if counts.sum() >= 0.01 * sample.size:
            bins = np.floor(low / 20.0)
            uniq, inv = np.unique(bins, return_inverse=True)
            air_level = float(20.0 * uniq[int(np.argmax(np.bincount(inv, weights=counts)))] + 10.0)
            if air_level < MIN_AIR_LEVEL_HU:
                raise NotCTError(f"values are not on the Hounsfield scale: the air and lung voxels' most common "
                                 f"value is {air_level:.0f} HU, where air is -1000 HU: a wrong scale factor in the "
                                 "header?", path)
    off = np.zeros(volume.shape[-1], dtype=bool)
    for values, limit in ((levels, MAX_SLICE_SCALE_HU), (air, MAX_SLICE_AIR_HU)):
        if np.isfinite(values).any():
            off |= np.abs(values - np.nanmedian(values)) > limit  # NaN compares False
    return np.flatnonzero(off)


def repair_lost_slices(volume: np.ndarray, report: InputReport, path: str | os.PathLike | None = None,
                       off_scale: np.ndarray | None = None) -> np.ndarray:
    """Fill the slices :func:`lost_slices` finds (and ``off_scale``: slices :func:`check_hu_scale` found on
    another intensity scale) by linear interpolation between their neighbours, or refuse.

    The rule of missing DICOM slices (:func:`regularize_slices`): at most :data:`MAX_MISSING_RUN` in a row and
    :data:`MAX_MISSING_FRACTION` of the slices in all are interpolated, with a warning; more is refused.

    Args:
        volume: (X, Y, Z); a float copy is made when slices are filled.
        report: receives the warning.
        path: the input, named in refusals.

    Returns:
        The volume with the lost slices filled (the same array when none is lost).

    Raises:
        DamagedImageError: too many slices lost, or too many in a row.
    """
    blank = lost_slices(volume)
    off = np.setdiff1d(np.asarray([] if off_scale is None else off_scale, dtype=np.int64), blank)
    lost = np.union1d(blank, off).astype(np.int64)
    if lost.size == 0:
        return volume
    how = " or ".join(filter(None, ["blank or no finite value" if blank.size else "",
                                    "on another intensity scale: a wrong rescale in their headers?" if off.size
                                    else ""]))
    n = volume.shape[-1]
    runs = _runs(lost)
    first, last = max(runs, key=lambda r: r[1] - r[0])
    if last - first + 1 > MAX_MISSING_RUN:
        raise DamagedImageError(
            f"{last - first + 1} slices lost in a row (index {first} to {last}: {how}); at most "
            f"{MAX_MISSING_RUN} in a row are interpolated", path)
    if lost.size > MAX_MISSING_FRACTION * n:
        raise DamagedImageError(
            f"{lost.size} of {n} slices lost ({100 * lost.size / n:.1f} %: {how}); at most "
            f"{100 * MAX_MISSING_FRACTION:g} % are interpolated", path)
    vol = volume.astype(np.float32, copy=True)
    bad = np.zeros(vol.shape, dtype=bool)
    bad[..., lost] = True
    _fill_along_z(vol, bad)
    where = ", ".join(str(int(k)) for k in lost[:5]) + (" ..." if lost.size > 5 else "")
    report.warn(f"{lost.size} lost slice{'s' if lost.size > 1 else ''} ({how}) at index {where} "
                "filled by interpolation between their neighbours")
    return vol


# ----------------------------------------------------------------------------------------------
# DICOM slice geometry


def _mm(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") + " mm"


def slices_even(positions: np.ndarray) -> bool:
    """Whether slice positions (along the normal, in file order) rise in steps within
    :data:`SPACING_TOLERANCE` of their median: nothing for :func:`regularize_slices` to do."""
    steps = np.diff(np.asarray(positions, dtype=np.float64))
    if steps.size == 0:
        return True
    med = float(np.median(steps))
    return med > 1e-3 and bool(np.all(np.abs(steps - med) <= SPACING_TOLERANCE * med))


def spacing_tag_warning(declared: float, positions: np.ndarray) -> str | None:
    """A warning when a series' Spacing Between Slices (0018,0088) is more than 10 % off the step of its
    slice positions (which are what the volume is built from); ``None`` when they agree."""
    steps = np.abs(np.diff(np.sort(np.asarray(positions, dtype=np.float64))))
    steps = steps[steps > 1e-3]
    if steps.size == 0 or not declared:
        return None
    measured = float(np.median(steps))
    if abs(abs(declared) - measured) <= 0.1 * measured:
        return None
    return (f"the header's Spacing Between Slices ({_mm(abs(declared))}) disagrees with the slice positions "
            f"({_mm(measured)} apart): the positions are used")


def regularize_slices(stack: np.ndarray, positions: np.ndarray, report: InputReport, names: list[str] | None = None,
                      path: str | os.PathLike | None = None) -> tuple[np.ndarray, float, float]:
    """Put the slices of a series on an even grid along their normal, or refuse.

    Rules, from the slice positions along the normal (``positions``):

    - two slices at the same position (within 1 % of the median step): the same pixels, one is
      dropped with a warning; different pixels, refused (two acquisitions in one series);
    - steps within :data:`SPACING_TOLERANCE` of the median step: nothing to do;
    - otherwise the stack is resampled to the median step by linear interpolation between the two
      nearest slices, with a warning; a gap (a step above 1.5 times the median) is
      ``round(step / median) - 1`` missing slices: more than :data:`MAX_MISSING_RUN` in one gap, or
      more than :data:`MAX_MISSING_FRACTION` of the resampled slices in all, are refused.

    Args:
        stack: slices (Z, Y, X) in the order of ``positions``.
        positions: position of each slice along the slice normal (mm).
        report: receives the warnings.
        names: file of each slice, for the messages.
        path: the series folder, named in refusals.

    Returns:
        ``(stack, first_position, step)``: the even stack (Z', Y, X), the position of its first slice and
        its slice step, in mm.

    Raises:
        DamagedImageError: conflicting duplicates, a gap too wide, too many missing slices.
    """
    pos = np.asarray(positions, dtype=np.float64)
    order = np.argsort(pos, kind="stable")
    pos, stack = pos[order], stack[order]
    names = [names[i] for i in order] if names is not None else [str(i) for i in range(len(pos))]
    if len(pos) < 2:
        return stack, float(pos[0]) if len(pos) else 0.0, 0.0
    steps = np.diff(pos)
    positive = steps[steps > 1e-3]
    if positive.size == 0:
        raise DamagedImageError(f"all {len(pos)} slices are at the same position ({_mm(pos[0])})", path)
    med = float(np.median(positive))
    dup = np.flatnonzero(steps <= max(1e-3, 0.01 * med))
    keep = np.ones(len(pos), bool)
    for i in dup:
        if not np.array_equal(stack[i], stack[i + 1]):
            raise DamagedImageError(
                f"two different slices at the same position {_mm(pos[i])} ({Path(names[i]).name}, "
                f"{Path(names[i + 1]).name}): the series mixes acquisitions; choose one series", path)
        keep[i + 1] = False
    if not keep.all():
        n_dup = int((~keep).sum())
        report.warn(f"{n_dup} duplicated slice{'s' if n_dup > 1 else ''} (same position and pixels) removed, e.g. "
                    f"{Path(names[int(dup[0]) + 1]).name} at {_mm(pos[int(dup[0])])}")
        pos, stack = pos[keep], stack[keep]
        steps = np.diff(pos)
        med = float(np.median(steps))
    if slices_even(pos):
        return stack, float(pos[0]), float((pos[-1] - pos[0]) / (len(pos) - 1))
    n_new = int(round((pos[-1] - pos[0]) / med)) + 1
    gaps = np.flatnonzero(steps > 1.5 * med)
    missing = [int(round(steps[i] / med)) - 1 for i in gaps]
    n_missing = int(sum(missing))
    if missing and max(missing) > MAX_MISSING_RUN:
        i = int(gaps[int(np.argmax(missing))])
        raise DamagedImageError(
            f"{max(missing)} slices missing in a row: a gap of {_mm(steps[i])} between {_mm(pos[i])} and "
            f"{_mm(pos[i + 1])} (slice step {_mm(med)}); at most {MAX_MISSING_RUN} in a row are interpolated", path)
    if n_missing > MAX_MISSING_FRACTION * n_new:
        raise DamagedImageError(
            f"{n_missing} of {n_new} slices missing ({100 * n_missing / n_new:.1f} %, in {len(gaps)} "
            f"gap{'s' if len(gaps) > 1 else ''}); at most "
            f"{100 * MAX_MISSING_FRACTION:g} % are interpolated", path)
    target = pos[0] + med * np.arange(n_new)
    hi = np.clip(np.searchsorted(pos, target, side="left"), 1, len(pos) - 1)
    lo = hi - 1
    w = np.clip((target - pos[lo]) / np.maximum(pos[hi] - pos[lo], 1e-6), 0.0, 1.0).astype(np.float32)
    out = np.empty((n_new, *stack.shape[1:]), dtype=np.float32)
    for k in range(n_new):
        out[k] = (1 - w[k]) * stack[lo[k]] + w[k] * stack[hi[k]]
    if n_missing:
        where = ", ".join(_mm(pos[i]) for i in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
        report.warn(f"{n_missing} missing slice{'s' if n_missing > 1 else ''} (gaps after {where}) filled by "
                    f"interpolation between their neighbours, the series resampled to an even {_mm(med)} slice step")
    else:
        report.warn(f"uneven slice spacing ({_mm(float(steps.min()))} to {_mm(float(steps.max()))}): the series "
                    f"resampled to an even {_mm(med)} slice step by interpolation between slices")
    return out, float(pos[0]), med


# ----------------------------------------------------------------------------------------------
# lung extent


def lung_extent_warnings(lung: np.ndarray, spacing: tuple[float, float, float] | list[float],
                         min_ml: float = 500.0, max_ml: float = 12000.0, edge_share: float = 0.1) -> list[str]:
    """Warnings about a lung mask (X, Y, Z) that a series cut short or a wrong header would give.

    - the lung on the first or last slice covers at least ``edge_share`` of its largest cross-section:
      the series ends inside the lung (cut short, or a partial scan), the lung beyond is not counted;
    - the lung touches the side of the field of view on more than ``edge_share`` of its slices;
    - the lung volume is outside ``min_ml``..``max_ml`` (an adult chest): check the voxel size in the
      header, missing slices, or whether the scan covers the chest.

    Returns:
        The warnings (empty for an unremarkable lung).
    """
    lung = np.asarray(lung) > 0
    if not lung.any():
        return []
    out: list[str] = []
    area = lung.sum(axis=(0, 1))
    top = float(area.max())
    for k, end in ((0, "first"), (lung.shape[2] - 1, "last")):
        if area[k] >= edge_share * top:
            out.append(f"the lung reaches the {end} slice of the volume ({100 * area[k] / top:.0f} % of its largest "
                       "cross-section): the series may be cut short and lung beyond it is not counted")
    on_side = (lung[0].any(axis=0) | lung[-1].any(axis=0) | lung[:, 0].any(axis=0) | lung[:, -1].any(axis=0))
    n_slices = int((area > 0).sum())
    if on_side.sum() > edge_share * n_slices:
        out.append(f"the lung touches the side of the field of view on {int(on_side.sum())} of {n_slices} slices: "
                   "lung outside it is not counted")
    ml = float(lung.sum()) * float(np.prod(spacing)) / 1000.0
    if not min_ml <= ml <= max_ml:
        out.append(f"lung volume {ml:.0f} ml is implausible for an adult chest ({min_ml:.0f}-{max_ml:.0f} ml): "
                   "check the voxel size in the header, missing slices, or whether the scan covers the chest")
    return out

