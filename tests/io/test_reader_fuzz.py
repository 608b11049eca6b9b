"""Fuzzing the readers (hypothesis): NIfTI, NRRD and DICOM copies of a small real chest CT (43 x 43 x 12, graded
CT-1) with mutated headers, flipped bytes and truncations are read by :func:`monai_ext.io.read_ct`, the
pipeline's entry point. Each must give a clean refusal (a :class:`~monai_ext.errors.CTSeverityError`, which the
CLI prints as one line) or a usable volume (3D, finite HU, positive finite voxel size) graded as the intact
study by the density rule of ``ctseverity run --method density --lung-mask threshold`` (or with a warning in
the result: a repair), never another exception, a hang or another grade in silence. The examples are
derandomized (the same every run) and counted.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monai_ext.errors import CTSeverityError
from monai_ext.io import read_ct
from pipelines.discovery import Study
from pipelines.severity import severity
from pipelines.study import PipelineConfig, compute_evidence, lesion_mask, resolve_calibration

sys.path.insert(0, str(Path(__file__).parent))
import dicom_corpus as dc  # noqa: E402

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BUDGET = 256 << 20  # bytes: a header declaring more is refused before reading

#: NIfTI-1 header fields: (offset, struct format)
NIFTI_FIELDS = {"sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
                "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
                "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f"),
                "magic": (344, "<4s")}

ints = st.one_of(st.integers(-5, 5), st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 32, 64, 255, 256, 512, 4096, 32767,
                                                      -32768, -1, 2**31 - 1, -(2**31)]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -1.0, 1e-30, 1e30, 0.5, 3.9, 6.0, float("nan"), float("inf")]))


#: the density grading of ``ctseverity run --method density --lung-mask threshold`` (no model)
GRADING = PipelineConfig(method="density", lung_mask="threshold", overview=False, max_memory=BUDGET)
#: file name -> (the intact copy as read, its grade), set by the ``originals`` fixture
INTACT: dict[str, tuple] = {}
#: how many examples were read, and how many of those were graded (their volume or grid differed from the intact)
COUNTS = {"read": 0, "graded": 0}
#: (voxels, affine, reader warnings) -> (grade, warnings of the result)
GRADES: dict[tuple, tuple[str, list[str]]] = {}


def _grade(path: Path, loaded: tuple) -> tuple[str, list[str]]:
    """The grade ``ctseverity run`` gives a study read as ``loaded``, and the warnings of its result."""
    cal = resolve_calibration(GRADING, None)
    ev = compute_evidence(Study("fuzz", str(path)), GRADING, None, cal["slice_gate"], cal["density_delta_hu"],
                          cal["study_call"], loaded=loaded)
    return severity(lesion_mask(ev, "density", cal), ev.lung, ev.spacing).grade, ev.warnings


def _check(path: Path) -> None:
    """A clean refusal, or a usable volume graded as the intact study (or with a warning in the result).

    A volume equal to the intact one, voxel for voxel on the same grid and without a warning, has the intact
    grade (the pipeline is deterministic); any other is graded."""
    try:
        ct, report = read_ct(path, max_bytes=BUDGET)
        assert ct.ndim == 4 and ct.shape[0] == 1 and min(ct.shape[1:]) >= 3
        assert bool(torch.isfinite(ct).all())
        pixdim = np.asarray(ct.pixdim, dtype=np.float64)
        assert np.all(np.isfinite(pixdim)) and np.all(pixdim > 0), pixdim
        COUNTS["read"] += 1
        intact = INTACT[path.name]
        if (not report.warnings and ct.shape == intact[0].shape and torch.equal(ct, intact[0])
                and np.allclose(ct.affine, intact[0].affine, atol=1e-4)):
            return
        key = (ct.numpy().tobytes(), np.round(np.asarray(ct.affine), 4).tobytes(), tuple(report.warnings))
        if key not in GRADES:  # many mutations give one volume: graded once
            COUNTS["graded"] += 1
            GRADES[key] = _grade(path, (ct, report))
        grade, warnings = GRADES[key]
    except CTSeverityError as exc:
        assert exc.reason and "\n" not in exc.reason.strip(), exc.reason
        return
    assert grade == intact[1] or warnings, f"graded {grade} without a warning; the intact study is {intact[1]}"


@pytest.fixture(scope="module")
def small(small_real_ct):
    """The real CT every 12th pixel and slice (43 x 43 x 12, 11.7 x 11.7 x 24 mm): the whole chest, graded
    CT-1 by the density rule, int16 HU, with its affine."""
    vol, affine = small_real_ct
    return np.ascontiguousarray(vol[::3, ::3, ::4]), affine @ np.diag([3.0, 3.0, 4.0, 1.0])


@pytest.fixture(scope="module")
def originals(small, tmp_path_factory):
    vol, affine = small
    root = tmp_path_factory.mktemp("fuzz_originals")
    nib.save(nib.Nifti1Image(vol, affine), str(root / "ct.nii"))
    nib.save(nib.Nifti1Image(vol, affine), str(root / "ct.nii.gz"))
    spacing = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    img = sitk.GetImageFromArray(vol.T)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(root / "ct.nrrd"), useCompression=False)
    dc.write(dc.axial_series(vol, pixel_mm=spacing[0], step_mm=spacing[2]), root / "dicom")
    for name in ("ct.nii", "ct.nii.gz", "ct.nrrd", "dicom"):  # the intact copies read and grade alike
        loaded = read_ct(root / name, max_bytes=BUDGET)
        grade, warnings = _grade(root / name, loaded)
        assert grade == "CT-1" and not warnings, (name, grade, warnings)
        INTACT[name] = (loaded[0], grade)
    yield root
    print(f"\nfuzz: {COUNTS['read']} examples read, {COUNTS['graded']} volumes graded (the others: the intact volume "
          "or one graded before)")


def _fresh(tmp_path: Path, src: Path) -> Path:
    dst = tmp_path / "case" / src.name
    shutil.rmtree(dst.parent, ignore_errors=True)
    dst.parent.mkdir(parents=True)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


mutation = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(sorted(NIFTI_FIELDS)), st.data()),
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1,
                                         max_size=8), st.none()),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.none()),
)


@FUZZ
@given(m=mutation)
def test_fuzzed_nifti(originals, tmp_path, m):
    path = _fresh(tmp_path, originals / "ct.nii")
    raw = bytearray(path.read_bytes())
    kind, what, data = m
    if kind == "field":
        offset, fmt = NIFTI_FIELDS[what]
        n = struct.calcsize(fmt) // (1 if fmt.endswith("s") else struct.calcsize("<" + fmt[-1]))
        if fmt.endswith("s"):
            values = [data.draw(st.binary(min_size=4, max_size=4))]
        elif fmt[-1] in "hi":
            values = data.draw(st.lists(ints, min_size=n, max_size=n))
            lo, hi = (-(2**15), 2**15 - 1) if fmt[-1] == "h" else (-(2**31), 2**31 - 1)
            values = [min(max(v, lo), hi) for v in values]
        else:
            values = data.draw(st.lists(floats, min_size=n, max_size=n))
        struct.pack_into(fmt, raw, offset, *values)
    elif kind == "bytes":
        for pos, value in what:
            raw[pos] = value
    else:
        raw = raw[: int(len(raw) * what)]
    path.write_bytes(bytes(raw))
    _check(path)


@FUZZ
@given(cut=st.floats(0.0, 0.999), flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 255)), max_size=3))
def test_fuzzed_nifti_gz(originals, tmp_path, cut, flips):
    path = _fresh(tmp_path, originals / "ct.nii.gz")
    raw = bytearray(path.read_bytes())
    for where, value in flips:
        raw[int(len(raw) * where)] = value
    if not flips or cut > 0.5:
        raw = raw[: max(1, int(len(raw) * cut))]
    path.write_bytes(bytes(raw))
    _check(path)


NRRD_VALUES = {
    "sizes": st.sampled_from(["43 43 12", "43 43", "43 43 12 3", "0 43 12", "-4 43 12", "43 43 99999", "a b c",
                              "43 43 12000000", "4800000 4800000 1200000"]),
    "type": st.sampled_from(["short", "int16", "float", "double", "uchar", "unknown", "", "block"]),
    "encoding": st.sampled_from(["raw", "gzip", "ascii", "bzip2", "hex", "nonsense"]),
    "dimension": st.sampled_from(["3", "2", "4", "0", "-1", "x"]),
    "space directions": st.sampled_from(["(11.72,0,0) (0,11.72,0) (0,0,24)", "(0,0,0) (0,11.7,0) (0,0,24)",
                                         "(nan,0,0) (0,11.7,0) (0,0,24)", "none (0,11.7,0) (0,0,24)", "(1,2) (3,4)",
                                         "(11.7,0,0) (11.7,0,0) (0,0,24)"]),
    "space origin": st.sampled_from(["(0,0,0)", "(nan,0,0)", "(1e300,0,0)", "()", "(0,0)"]),
    "endian": st.sampled_from(["little", "big", "middle"]),
}


@FUZZ
@given(key=st.sampled_from(sorted(NRRD_VALUES)), data=st.data(), cut=st.one_of(st.none(), st.floats(0.0, 0.999)))
def test_fuzzed_nrrd(originals, tmp_path, key, data, cut):
    path = _fresh(tmp_path, originals / "ct.nrrd")
    raw = path.read_bytes()
    head, sep, body = raw.partition(b"\n\n")
    lines = head.decode("latin-1").split("\n")
    value = data.draw(NRRD_VALUES[key])
    lines = [ln for ln in lines if not ln.startswith(f"{key}:")] + [f"{key}: {value}"]
    raw = "\n".join(lines).encode("latin-1") + sep + body
    if cut is not None:
        raw = raw[: int(len(raw) * cut)]
    path.write_bytes(raw)
    _check(path)


DICOM_VALUES = {
    "Rows": st.sampled_from([0, 1, 42, 44, 86, 65535]),
    "Columns": st.sampled_from([0, 1, 42, 44, 86, 65535]),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 32, 64]),
    "BitsStored": st.sampled_from([0, 1, 8, 12, 17, 32]),
    "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "SamplesPerPixel": st.sampled_from([0, 2, 3]),
    "PhotometricInterpretation": st.sampled_from(["RGB", "PALETTE COLOR", "YBR_FULL", "", "MONOCHROME1"]),
    "ImagePositionPatient": st.sampled_from([[0, 0, 0], [0, 0, 1e9], [0, 0], ["nan", 0, 0], [0, 0, 6.0]]),
    "ImageOrientationPatient": st.sampled_from([[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0], [0, 1, 0, 1, 0, 0],
                                                ["nan", 0, 0, 0, 1, 0]]),
    "PixelSpacing": st.sampled_from([[0, 0], [-1, 1], [1e-9, 1e-9], [3.9], ["nan", 3.9], [1e6, 1e6]]),
    "RescaleSlope": st.sampled_from([0, -1, 1e9, "nan", "inf"]),
    "RescaleIntercept": st.sampled_from([-1e9, 1e9, "nan", 0]),
    "SliceThickness": st.sampled_from([0, -5, 1e9, "nan"]),
    "SeriesInstanceUID": st.sampled_from(["", "1.2.3", "../../x", "é" * 10]),
    "Modality": st.sampled_from(["MR", "", "SR", "CT"]),
    "NumberOfFrames": st.sampled_from([0, 2, 1000]),
}


@FUZZ
@given(which=st.integers(0, 11), key=st.sampled_from(sorted(DICOM_VALUES)), data=st.data(),
       cut=st.one_of(st.none(), st.floats(0.0, 0.999)), all_files=st.booleans())
def test_fuzzed_dicom_series(originals, tmp_path, which, key, data, cut, all_files):
    folder = _fresh(tmp_path, originals / "dicom")
    files = sorted(folder.glob("*.dcm"))
    value = data.draw(DICOM_VALUES[key])
    for f in files if all_files else [files[which]]:
        ds = pydicom.dcmread(f)
        try:
            setattr(ds, key, value)
        except (ValueError, TypeError, OverflowError):
            continue  # pydicom refuses to hold the value: not a file a scanner can write this way
        ds.save_as(f, enforce_file_format=False)
    if cut is not None:
        raw = files[which].read_bytes()
        files[which].write_bytes(raw[: int(len(raw) * cut)])
    _check(folder)


@pytest.fixture(autouse=True)
def _quiet():
    """Refusals and repairs log warnings; the fuzz examples would flood the output."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_truncated_gzip_is_not_read_as_zeros(originals, tmp_path):
    """One case by hand: half a gzip stream is refused (SimpleITK fills the rest with zeros)."""
    path = _fresh(tmp_path, originals / "ct.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CTSeverityError, match="truncated"):
        read_ct(path, max_bytes=BUDGET)
    assert gzip.decompress(raw)[:4] == struct.pack("<i", 348)
