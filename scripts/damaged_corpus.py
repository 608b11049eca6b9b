"""Damaged copies of a real CT through ``ctseverity run``: is each refused with its reason or graded as the intact
study? (issue 17, "Done when").

    python scripts/damaged_corpus.py --out /tmp/damaged [--source DICOM_FOLDER] [--method hirescam]
                                     [--kinds missing_slice,nifti_nan_slices] [--list]

From one real DICOM CT series (default: the RICORD COVID-19 series of ``../shared/data``, a CT-1 study with
lesions, evaluation only) it writes into ``OUT/corpus/``: the series as it is (``intact_dicom``), the same
voxels as a NIfTI file (``intact_nifti``), and one damaged copy per kind (:data:`KINDS`: DICOM slices missing,
duplicated, unevenly spaced, cut, blank or corrupt, wrong rescale and spacing headers; NIfTI NaN and infinite
voxels, truncation, swapped spacing, disagreeing geometries, a wrong scale factor, a zeroed slab). Untouched
DICOM files are symbolic links to the source. Then it runs ``ctseverity run OUT/corpus --out OUT/run
--method METHOD --workers 1`` (one batch, a process of its own; DICOM inputs get their DICOM outputs as by
default) and prints one row per copy: kind, outcome (refused and the reason, or graded with its grade,
lesion share and warnings) and verdict:

- ``ok: refused``: the study failed with a reason (each row names its study);
- ``ok: same grade``: graded as the intact study of its format (with or without warnings);
- ``OTHER GRADE, warned``: another grade with a warning about the damage;
- ``SILENT WRONG GRADE``: another grade and no warning: the failure the rules must prevent.

Exit code 1 when a copy got another grade (warned or not), else 0. The corpus is written under ``--out``, never
into the repository.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["KINDS", "build_corpus", "verdict", "main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "ricord_1a_000082_covid" / "dicom"


# ----------------------------------------------------------------------------------------------
# DICOM helpers: the source files in position order, links, header and pixel rewrites


def _series_files(folder: Path) -> list[Path]:
    from monai_ext.io.reader import dicom_series

    series = dicom_series(folder)
    if len(series) != 1:
        raise SystemExit(f"{folder}: {len(series)} CT series; give a folder with one")
    return [Path(f) for f in next(iter(series.values()))]


def _copy_series(files: list[Path], dest: Path, skip: Sequence[int] = ()) -> None:
    """Link every file but those at ``skip`` (indices in position order) into ``dest``."""
    dest.mkdir(parents=True)
    for k, f in enumerate(files):
        if k not in skip:
            (dest / f"s{k:04d}.dcm").symlink_to(f.resolve())


def _rewrite(files: list[Path], dest: Path, k: int, change: Callable, name: str | None = None) -> None:
    """Replace slice ``k``'s link by a copy of its file with ``change(ds)`` applied to the header."""
    import pydicom

    target = dest / (name or f"s{k:04d}.dcm")
    target.unlink(missing_ok=True)
    ds = pydicom.dcmread(files[k])
    change(ds)
    ds.save_as(target, enforce_file_format=True)


def _hu(path: Path) -> np.ndarray:
    """A slice's HU (rows, columns), decoded by GDCM (SimpleITK applies the rescale)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0].astype(np.float32)


def _set_pixels(ds, hu: np.ndarray) -> None:
    """Store ``hu`` uncompressed in ``ds`` with its own rescale (signed or unsigned 16 bit)."""
    from pydicom.uid import ExplicitVRLittleEndian

    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    stored = np.round((hu - intercept) / slope)
    dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16
    info = np.iinfo(dtype)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.clip(stored, info.min, info.max).astype(dtype).tobytes()
    ds["PixelData"].VR = "OW"
    ds["PixelData"].is_undefined_length = False
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15


def _rewrite_pixels(files: list[Path], dest: Path, k: int, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    hu = _hu(files[k])
    _rewrite(files, dest, k, lambda ds: _set_pixels(ds, fn(hu)))


# ----------------------------------------------------------------------------------------------
# the kinds: each writes its damaged copy at ``dest`` (a folder, or a file for NIfTI kinds)


class Source:
    """What the kinds are made from: the series files in position order, the intact NIfTI, and where the
    lesions lie (a slab in the middle of the series, where damage changes the answer if anything does)."""

    def __init__(self, folder: Path, nifti: Path) -> None:
        self.files = _series_files(folder)
        self.nifti = nifti
        n = len(self.files)
        self.mid = int(n * 0.59)  # the RICORD series' lesions lie in slices 116-195 of 256
        self.n = n


def _dicom(fn: Callable[[Source, Path], None]) -> Callable[[Source, Path], Path]:
    def make(src: Source, root: Path) -> Path:
        dest = root / fn.__name__.removeprefix("k_")
        fn(src, dest)
        return dest
    make.__doc__ = fn.__doc__
    make.__name__ = fn.__name__
    return make


def _nifti(fn: Callable[[nib.Nifti1Image], nib.Nifti1Image | None], suffix: str = ".nii.gz"
           ) -> Callable[[Source, Path], Path]:
    def make(src: Source, root: Path) -> Path:
        img = nib.load(str(src.nifti))
        out = fn(img)
        dest = root / f"{fn.__name__.removeprefix('k_')}{suffix}"
        nib.save(out, str(dest))
        return dest
    make.__doc__ = fn.__doc__
    make.__name__ = fn.__name__
    return make


@_dicom
def k_missing_slice(src: Source, dest: Path) -> None:
    """one DICOM slice in the lesions deleted"""
    _copy_series(src.files, dest, skip=[src.mid])


@_dicom
def k_missing_slices_scattered(src: Source, dest: Path) -> None:
    """every 12th DICOM slice deleted (8 %)"""
    _copy_series(src.files, dest, skip=range(5, src.n, 12))


@_dicom
def k_missing_slab(src: Source, dest: Path) -> None:
    """6 consecutive DICOM slices in the lesions deleted"""
    _copy_series(src.files, dest, skip=range(src.mid, src.mid + 6))


@_dicom
def k_duplicated_slices(src: Source, dest: Path) -> None:
    """5 DICOM slices duplicated (a second file at the same position, new SOP Instance UID)"""
    from pydicom.uid import generate_uid

    _copy_series(src.files, dest)
    for k in range(src.mid - 20, src.mid + 30, 10):
        def dup(ds):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        _rewrite(src.files, dest, k, dup, name=f"dup{k:04d}.dcm")


@_dicom
def k_uneven_spacing(src: Source, dest: Path) -> None:
    """every slice's position moved by up to 0.4 mm along z (uneven slice spacing)"""
    rng = np.random.default_rng(3)
    _copy_series(src.files, dest)
    for k in range(src.n):
        dz = float(rng.uniform(-0.4, 0.4))

        def move(ds, dz=dz):
            ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]),
                                       round(float(ds.ImagePositionPatient[2]) + dz, 3)]
        _rewrite(src.files, dest, k, move)


@_dicom
def k_spacing_header_wrong(src: Source, dest: Path) -> None:
    """Spacing Between Slices and Slice Thickness say 5 mm on every slice; the positions say 1.25 mm"""
    _copy_series(src.files, dest)
    for k in range(src.n):
        def wrong(ds):
            ds.SpacingBetweenSlices = 5.0
            ds.SliceThickness = 5.0
        _rewrite(src.files, dest, k, wrong)


@_dicom
def k_pixel_spacing_swapped(src: Source, dest: Path) -> None:
    """Pixel Spacing and slice step swapped in every header: 1.25 mm pixels, slices 0.703 mm apart"""
    import pydicom

    _copy_series(src.files, dest)
    first = float(pydicom.dcmread(src.files[0], stop_before_pixels=True).ImagePositionPatient[2])
    for k in range(src.n):
        def swap(ds):
            step = float(ds.PixelSpacing[0])
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.PixelSpacing = [1.25, 1.25]
            ds.SliceThickness = ds.SpacingBetweenSlices = round(step, 6)
            ds.ImagePositionPatient = [pos[0], pos[1], round(first + (pos[2] - first) * step / 1.25, 4)]
        _rewrite(src.files, dest, k, swap)


@_dicom
def k_cut_series(src: Source, dest: Path) -> None:
    """the series cut short: the last 40 % of the slices (lower lungs) missing"""
    _copy_series(src.files, dest, skip=range(int(src.n * 0.6), src.n))


@_dicom
def k_blank_slab(src: Source, dest: Path) -> None:
    """10 slices in the lesions blank (0 HU everywhere: lost in conversion)"""
    _copy_series(src.files, dest)
    for k in range(src.mid, src.mid + 10):
        _rewrite_pixels(src.files, dest, k, lambda hu: np.zeros_like(hu))


@_dicom
def k_zeroed_slab(src: Source, dest: Path) -> None:
    """10 slices in the lesions with stored value 0 (-1024 HU everywhere: air)"""
    _copy_series(src.files, dest)
    for k in range(src.mid, src.mid + 10):
        _rewrite_pixels(src.files, dest, k, lambda hu: np.full_like(hu, -1024.0))


@_dicom
def k_rescale_slope_all(src: Source, dest: Path) -> None:
    """Rescale Slope 2 instead of 1 on every slice (HU = 2 x stored - 1024)"""
    _copy_series(src.files, dest)
    for k in range(src.n):
        _rewrite(src.files, dest, k, lambda ds: setattr(ds, "RescaleSlope", 2))


@_dicom
def k_rescale_slope_some(src: Source, dest: Path) -> None:
    """Rescale Slope 2 instead of 1 on 10 slices in the lesions"""
    _copy_series(src.files, dest)
    for k in range(src.mid, src.mid + 10):
        _rewrite(src.files, dest, k, lambda ds: setattr(ds, "RescaleSlope", 2))


@_dicom
def k_rescale_intercept_some(src: Source, dest: Path) -> None:
    """Rescale Intercept 0 instead of -1024 on 10 slices in the lesions (1024 HU too bright)"""
    _copy_series(src.files, dest)
    for k in range(src.mid, src.mid + 10):
        _rewrite(src.files, dest, k, lambda ds: setattr(ds, "RescaleIntercept", 0))


@_dicom
def k_truncated_slice_file(src: Source, dest: Path) -> None:
    """one DICOM file in the lesions cut to half its size"""
    _copy_series(src.files, dest)
    target = dest / f"s{src.mid:04d}.dcm"
    raw = src.files[src.mid].read_bytes()
    target.unlink()
    target.write_bytes(raw[: len(raw) // 2])


@_dicom
def k_corrupt_pixel_data(src: Source, dest: Path) -> None:
    """200 bytes of one slice's JPEG Lossless stream overwritten with noise"""
    _copy_series(src.files, dest)
    target = dest / f"s{src.mid:04d}.dcm"
    raw = bytearray(src.files[src.mid].read_bytes())
    start = len(raw) // 2
    raw[start:start + 200] = np.random.default_rng(4).integers(0, 256, 200, dtype=np.uint8).tobytes()
    target.unlink()
    target.write_bytes(bytes(raw))


def _float_image(data: np.ndarray, img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``data`` stored as float32 on ``img``'s grid (an integer header would turn NaN and inf into numbers)."""
    out = nib.Nifti1Image(data.astype(np.float32), img.affine)
    out.set_qform(img.affine, 1)
    out.set_sform(img.affine, 1)
    return out


@_nifti
def k_nifti_nan_slices(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI: every third slice NaN"""
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[:, :, ::3] = np.nan
    return _float_image(data, img)


@_nifti
def k_nifti_nan_voxels(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI: 2000 voxels NaN, scattered in the chest"""
    data = np.asarray(img.dataobj, dtype=np.float32)
    rng = np.random.default_rng(5)
    x, y, z = (rng.integers(s // 4, 3 * s // 4, 2000) for s in data.shape)
    data[x, y, z] = np.nan
    return _float_image(data, img)


@_nifti
def k_nifti_inf_slab(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI: 4 slices in the lesions +inf"""
    data = np.asarray(img.dataobj, dtype=np.float32)
    mid = int(data.shape[2] * 0.59)  # slice k of the NIfTI is slice k of the series in position order
    data[:, :, mid:mid + 4] = np.inf
    return _float_image(data, img)


@_nifti
def k_nifti_zeroed_slab(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI: 10 slices in the lesions 0 (0 HU)"""
    data = np.asarray(img.dataobj).copy()
    mid = int(data.shape[2] * 0.59)
    data[:, :, mid - 5:mid + 5] = 0
    return nib.Nifti1Image(data, img.affine, img.header)


@_nifti
def k_nifti_swapped_spacing(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI: voxel size x and z swapped in the header (qform and sform)"""
    affine = img.affine.copy()
    x, z = affine[:3, 0].copy(), affine[:3, 2].copy()
    affine[:3, 0] = x / np.linalg.norm(x) * np.linalg.norm(z)
    affine[:3, 2] = z / np.linalg.norm(z) * np.linalg.norm(x)
    out = nib.Nifti1Image(np.asarray(img.dataobj), affine)
    out.set_qform(affine, 1)
    out.set_sform(affine, 1)
    return out


@_nifti
def k_nifti_qform_sform_disagree(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """NIfTI: sform with twice the slice spacing, qform right"""
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    sform = img.affine.copy()
    sform[:3, 2] *= 2
    out.set_qform(img.affine, 1)
    out.set_sform(sform, 2)
    return out


def k_nifti_scale_slope(src: Source, root: Path) -> Path:
    """NIfTI: scl_slope 2 written into the header (the stored values are HU)"""
    import gzip
    import struct

    dest = root / "nifti_scale_slope.nii.gz"
    raw = bytearray(gzip.decompress(src.nifti.read_bytes()))
    struct.pack_into("<ff", raw, 112, 2.0, 0.0)  # scl_slope, scl_inter (nibabel would reset them on save)
    dest.write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    return dest


def k_nifti_truncated(src: Source, root: Path) -> Path:
    """NIfTI (.nii.gz): the file cut at 60 % of its bytes"""
    dest = root / "nifti_truncated.nii.gz"
    raw = src.nifti.read_bytes()
    dest.write_bytes(raw[: int(len(raw) * 0.6)])
    return dest


def k_nifti_truncated_raw(src: Source, root: Path) -> Path:
    """NIfTI (.nii, uncompressed): the file cut at 60 % of its bytes"""
    dest = root / "nifti_truncated_raw.nii"
    img = nib.load(str(src.nifti))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(dest))
    raw = dest.read_bytes()
    dest.write_bytes(raw[: int(len(raw) * 0.6)])
    return dest


#: kind -> builder(source, corpus folder) -> the copy's path
KINDS: dict[str, Callable[[Source, Path], Path]] = {
    f.__name__.removeprefix("k_"): f for f in (
        k_missing_slice, k_missing_slices_scattered, k_missing_slab, k_duplicated_slices, k_uneven_spacing,
        k_spacing_header_wrong, k_pixel_spacing_swapped, k_cut_series, k_blank_slab, k_zeroed_slab,
        k_rescale_slope_all, k_rescale_slope_some, k_rescale_intercept_some, k_truncated_slice_file,
        k_corrupt_pixel_data, k_nifti_nan_slices, k_nifti_nan_voxels, k_nifti_inf_slab, k_nifti_zeroed_slab,
        k_nifti_swapped_spacing, k_nifti_qform_sform_disagree, k_nifti_scale_slope, k_nifti_truncated,
        k_nifti_truncated_raw)
}


def build_corpus(source: Path, root: Path, kinds: Sequence[str]) -> dict[str, str]:
    """Write the intact series (linked), its NIfTI and the damaged copies into ``root``.

    Returns:
        study name -> the intact study it is compared with (``intact_dicom`` or ``intact_nifti``).
    """
    import SimpleITK as sitk

    root.mkdir(parents=True)
    files = _series_files(source)
    _copy_series(files, root / "intact_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    nifti = root / "intact_nifti.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nifti), useCompression=True)
    src = Source(source, nifti)
    against = {"intact_dicom": "intact_dicom", "intact_nifti": "intact_nifti"}
    for kind in kinds:
        path = KINDS[kind](src, root)
        name = path.name.removesuffix(".nii.gz").removesuffix(".nii")
        against[name] = "intact_nifti" if kind.startswith("nifti") else "intact_dicom"
    return against


def verdict(row: dict[str, str], intact: dict[str, str]) -> str:
    """The verdict of a copy's results.csv row against its intact study's row."""
    if row.get("status") != "ok":
        return "ok: refused" if row.get("error") else "REFUSED WITHOUT A REASON"
    if row["grade"] == intact["grade"]:
        return "ok: same grade"
    return "OTHER GRADE, warned" if row.get("warnings") else "SILENT WRONG GRADE"


def _outcome(row: dict[str, str]) -> str:
    if row.get("status") != "ok":
        return f"refused: {row.get('error', '')}"
    text = f"graded {row['grade']} ({float(row['lesion_percent']):.1f} %, lung {float(row['lung_volume_ml']):.0f} ml)"
    return text + (f"; warnings: {row['warnings']}" if row.get("warnings") else "")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="new folder for the corpus (OUT/corpus) and run (OUT/run)")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="a folder with one real CT series (DICOM)")
    p.add_argument("--method", default="hirescam", help="attribution method of the run (default hirescam)")
    p.add_argument("--kinds", default="", help="comma-separated kinds (default: all; --list shows them)")
    p.add_argument("--list", action="store_true", help="list the kinds and exit")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--reuse", action="store_true",
                   help="take the corpus already in OUT/corpus; a run in OUT/run resumes (studies complete with "
                        "the same settings are kept, as ctseverity run does)")
    args = p.parse_args(argv)
    if args.list:
        for name, f in KINDS.items():
            print(f"{name:28s} {f.__doc__}")
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] or list(KINDS)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kinds: {', '.join(unknown)}")
    if args.out.exists() and not (args.reuse and (args.out / "corpus").is_dir()):
        p.error(f"{args.out} exists; give a new folder (or --reuse with OUT/corpus)")
    t0 = time.perf_counter()
    if args.reuse:
        names = sorted(f.name.removesuffix(".nii.gz").removesuffix(".nii") for f in (args.out / "corpus").iterdir())
        against = {n: "intact_nifti" if n.startswith(("nifti", "intact_nifti")) else "intact_dicom"
                   for n in sorted(names, key=lambda n: (not n.startswith("intact"), n))}
    else:
        against = build_corpus(args.source, args.out / "corpus", kinds)
    built = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "pipelines", "-q", "run", str(args.out / "corpus"), "--out", str(args.out / "run"),
           "--method", args.method, "--workers", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    ran = time.perf_counter() - t0
    results = args.out / "run" / "results.csv"
    if not results.exists():
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return 2
    with open(results, newline="", encoding="utf-8") as fh:
        rows = {r["study"]: r for r in csv.DictReader(fh)}
    docs = {name.removeprefix("k_"): (f.__doc__ or "").strip() for name, f in
            ((f.__name__, f) for f in KINDS.values())}
    table = []
    for study in against:
        kind = study
        row = rows.get(study, {"status": "missing", "error": "no row in results.csv"})
        v = "(reference)" if study.startswith("intact") else verdict(row, rows[against[study]])
        table.append((kind, docs.get(kind, "the study as it is"), _outcome(row), v))
    if args.markdown:
        print("| kind | damage | outcome | verdict |\n|---|---|---|---|")
        for kind, what, outcome, v in table:
            print(f"| {kind} | {what} | {outcome.replace('|', '/')} | {v} |")
    else:
        for kind, _, outcome, v in table:
            print(f"{kind:28s} {v:22s} {outcome}")
    bad = [t for t in table if t[3].startswith(("OTHER", "SILENT", "REFUSED WITHOUT"))]
    made = "corpus reused" if args.reuse else f"corpus built in {built:.0f} s"
    print(f"\n{len(table) - 2} damaged copies of {args.source} ({len(rows)} studies): {made}, "
          f"`ctseverity run --method {args.method}` in {ran:.0f} s; {len(bad)} with another grade")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
