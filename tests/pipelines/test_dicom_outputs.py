"""DICOM outputs (pipelines.dicom): a SEG, a TID 1500 SR and the overview capture of a real CT, read back and
validated.

A real DICOM series (24 slices of the RICORD COVID-19 CT, JPEG Lossless, with a patient name, ID and birth
date in its headers) goes through ``ctseverity run``. The SEG read back equals the NIfTI lung and lesion masks
voxel for voxel on the source slices, and the SR holds the result's measurements. SEG, SR and capture pass
``dciodvfy`` (dicom3tools) without errors, and no output but the DICOM ones holds a patient identifier. A NIfTI
input with ``--dicom-out`` gets a CT series with generated UIDs that the SEG and SR refer to. The remaining
tests cover a missing slice, headers the SEG cannot use, a study without lesions, ``--no-dicom-out`` and
resuming.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.sr.codedict import codes

from monai_ext.errors import CTSeverityError
from monai_ext.io.reader import dicom_series
from monai_ext.io.writer import ReferenceGrid
from pipelines.cli import main
from pipelines.dicom import grade_code, measurement_report, source_headers
from pipelines.dicom.source import OffGridError
from pipelines.discovery import find_studies


def _mask(path: Path) -> np.ndarray:
    """A NIfTI mask as (z, y, x): frames of the input grid."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)


def _seg_volume(seg: hd.seg.Segmentation, source_uids: list[str], segment: int) -> np.ndarray:
    """A segment of ``seg`` on the source slices (in their order), (slices, rows, columns)."""
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[segment])
    return pixels[..., 0].astype(bool)


def _text_values(ds) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _text_values(item)
    return out


@pytest.fixture(scope="module")
def dicom_run(dicom_crop_series, tmp_path_factory):
    series, identifiers = dicom_crop_series
    out = tmp_path_factory.mktemp("dicom_run") / "out"
    capture = out.parent / "console.txt"
    exe = Path(sys.executable).parent / "ctseverity"  # a process of its own: its log lines are output too
    proc = subprocess.run([str(exe), "run", str(series), "--out", str(out), "--method", "hirescam", "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    capture.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = out / series.name
    result = json.loads((study / "result.json").read_text())
    return series, identifiers, out, study, result, capture


def test_seg_read_back_equals_the_nifti_masks_on_the_source_slices(dicom_run):
    series, _, _, study, result, _ = dicom_run
    assert result["outputs"]["dicom_seg"] == "dicom/seg.dcm" and result["outputs"]["dicom_sr"] == "dicom/sr.dcm"
    (files,) = dicom_series(series).values()
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    seg = hd.seg.segread(study / "dicom" / "seg.dcm")
    uids = [ds.SOPInstanceUID for ds in source]
    lung, lesion = _mask(study / "lung_mask.nii.gz"), _mask(study / "lesion_mask.nii.gz")
    assert lung.shape == (len(files), int(source[0].Rows), int(source[0].Columns))
    assert lesion.sum() > 1000 and lung.sum() > lesion.sum(), "the test needs lesions to compare"
    assert np.array_equal(_seg_volume(seg, uids, 1), lung)
    assert np.array_equal(_seg_volume(seg, uids, 2), lesion)
    # every frame lies exactly on the slice it refers to
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, positions[ref], atol=1e-4)
    # the SEG joins the source study and refers to the source series
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    with pytest.raises(CTSeverityError, match="no CT study found"):  # the SEG and SR are not studies
        find_studies([study.parent])


def test_seg_segments_name_method_and_threshold(dicom_run):
    _, identifiers, _, study, result, _ = dicom_run
    seg = pydicom.dcmread(study / "dicom" / "seg.dcm")
    lung, lesion = seg.SegmentSequence
    assert (lung.SegmentLabel, lung.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Lung", "39607008")
    assert (lesion.SegmentLabel, lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Lesion", "52988006")
    assert "hirescam" in lesion.SegmentDescription
    assert f"threshold {result['threshold']}" in lesion.SegmentDescription
    params = lesion.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"model_sha256={result['model']['sha256']}" in params and "method=hirescam" in params
    assert seg.ContentQualification == "RESEARCH"
    # DICOM outputs keep their source study's patient (a PACS files them under it)
    assert str(seg.PatientName) == identifiers["PatientName"] and seg.PatientID == identifiers["PatientID"]


def test_sr_is_a_tid1500_report_of_the_result(dicom_run):
    series, _, _, study, result, _ = dicom_run
    sr = hd.sr.srread(study / "dicom" / "sr.dcm")
    seg = pydicom.dcmread(study / "dicom" / "seg.dcm")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"lung", "lesion"}
    for name, number in (("lung", 1), ("lesion", 2)):
        ref = groups[name].referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [number]

    def values(group):
        return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}

    assert values(groups["lung"]) == {"Volume": (pytest.approx(result["lung_volume_ml"]), "ml")}
    lesion = values(groups["lesion"])
    assert lesion["Volume"] == (pytest.approx(result["lesion_volume_ml"]), "ml")
    assert lesion["Lesion volume as percent of lung volume"] == (pytest.approx(result["lesion_percent"]), "%")
    assert lesion["Number of lesion components"] == (result["n_lesions"], "{lesions}")
    (grade,) = groups["lesion"].get_qualitative_evaluations()
    assert grade.value == grade_code(result["grade"]) and result["grade"] != "CT-0"
    texts = _text_values(sr)
    assert "method=hirescam" in texts and f"model_sha256={result['model']['sha256']}" in texts
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and len(evidence) == 25  # the SEG and the 24 source slices
    # the observing device keeps its UID from report to report; each report is a new instance
    (device,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series(series).popitem()[1]]
    buffer = io.BytesIO()
    measurement_report(source, seg, result, {}).save_as(buffer, enforce_file_format=True)
    again = hd.sr.srread(io.BytesIO(buffer.getvalue()))
    (device_again,) = again.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert device_again.observer_identifying_attributes.uid == device.observer_identifying_attributes.uid
    assert again.SOPInstanceUID != sr.SOPInstanceUID


def test_seg_sr_and_overview_capture_pass_dciodvfy(dicom_run, dciodvfy):
    study = dicom_run[3]
    for name in ("seg.dcm", "sr.dcm", "overview.dcm"):
        assert dciodvfy(study / "dicom" / name) == [], name


def test_overview_capture_is_the_overview_in_the_source_study(dicom_run):
    series, _, _, study, result, _ = dicom_run
    assert result["outputs"]["dicom_overview"] == "dicom/overview.dcm"
    capture = pydicom.dcmread(study / "dicom" / "overview.dcm")
    png = np.asarray(Image.open(study / "overview.png").convert("RGB"))
    assert capture.PhotometricInterpretation == "RGB" and np.array_equal(capture.pixel_array, png)
    source = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert capture.StudyInstanceUID == source.StudyInstanceUID and capture.SeriesInstanceUID != source.SeriesInstanceUID


def test_no_patient_identifier_outside_the_dicom_outputs(dicom_run, find_identifiers):
    _, identifiers, out, study, _, capture = dicom_run
    found, checked = find_identifiers([*out.rglob("*"), capture], identifiers)
    assert found == []
    assert checked >= 8  # results.csv, report.html, result.json, overview.png, three NIfTI, the console
    seg = (study / "dicom" / "seg.dcm").read_bytes()
    assert identifiers["PatientID"].encode() in seg  # the check above would see them


@pytest.fixture(scope="module")
def crop_nifti(dicom_crop_series, tmp_path_factory) -> Path:
    """The DICOM crop as a NIfTI file (SimpleITK, voxels and grid unchanged)."""
    series, _ = dicom_crop_series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series(series).popitem()[1])
    path = tmp_path_factory.mktemp("crop_nifti") / "chest.nii.gz"
    sitk.WriteImage(reader.Execute(), str(path), useCompression=True)
    return path


def test_nifti_input_with_dicom_out_gets_a_generated_ct_series(dicom_crop_series, crop_nifti, tmp_path, capsys,
                                                               dciodvfy):
    series, _ = dicom_crop_series
    ct = sitk.ReadImage(str(crop_nifti))
    out = tmp_path / "out"
    assert main(["-q", "run", str(crop_nifti), "--out", str(out), "--method", "hirescam", "--dicom-out"]) == 0, \
        capsys.readouterr()
    study = out / "chest"
    result = json.loads((study / "result.json").read_text())
    assert result["outputs"]["dicom_ct"] == "dicom/ct" and result["grade"] != "CT-0"
    files = sorted((study / "dicom" / "ct").glob("*.dcm"))
    assert len(files) == ct.GetSize()[2]
    # the generated series is the input, voxel for voxel, on the same grid
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series(study / "dicom" / "ct").popitem()[1])
    back = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ct))
    np.testing.assert_allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    seg = hd.seg.segread(study / "dicom" / "seg.dcm")
    uids = [ds.SOPInstanceUID for ds in source]
    assert np.array_equal(_seg_volume(seg, uids, 1), _mask(study / "lung_mask.nii.gz"))
    assert np.array_equal(_seg_volume(seg, uids, 2), _mask(study / "lesion_mask.nii.gz"))
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID != pydicom.dcmread(
        dicom_series(series).popitem()[1][0], stop_before_pixels=True).StudyInstanceUID
    for path in (files[0], study / "dicom" / "seg.dcm", study / "dicom" / "sr.dcm"):
        assert dciodvfy(path) == [], path
    with pytest.raises(CTSeverityError, match="no CT study found"):  # the outputs are not studies
        find_studies([out])


def test_source_slices_are_found_on_the_grid_or_refused(dicom_crop_series):
    series, _ = dicom_crop_series
    (uid, files), = dicom_series(series).items()
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    origin = np.asarray([float(v) for v in first.ImagePositionPatient])
    spacing = np.asarray([float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), 1.25])
    shape = (int(first.Columns), int(first.Rows))
    assert len(files) == 24

    def grid(n=24, step=1.0, shift=0.0):
        return ReferenceGrid((*shape, n), np.eye(4), origin + [0, 0, shift], spacing * [1, 1, step], np.eye(3))

    headers, indices = source_headers(series, uid, grid())
    assert indices == list(range(len(files))) and [h.SOPInstanceUID for h in headers] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    # a grid one slice longer (a slice the reader filled in): that slice has no source image
    assert source_headers(series, uid, grid(n=25, shift=-1.25))[1] == list(range(1, 25))
    with pytest.raises(OffGridError, match="off the nearest slice"):
        source_headers(series, uid, grid(step=1.1))
    with pytest.raises(OffGridError, match="off the nearest slice"):
        source_headers(series, uid, grid(shift=0.6))


def test_a_missing_slice_has_no_frame_and_the_others_map_exactly(dicom_crop_series, tmp_path, capsys, dciodvfy):
    """The reader fills a missing slice in by interpolation; the SEG refers to the 23 real slices only."""
    series, _ = dicom_crop_series
    gap = tmp_path / "gap"
    shutil.copytree(series, gap)
    (gap / "slice_012.dcm").unlink()
    out = tmp_path / "out"
    assert main(["-q", "run", str(gap), "--out", str(out), "--method", "hirescam"]) == 0, capsys.readouterr()
    result = json.loads((out / "gap" / "result.json").read_text())
    assert any("missing slice" in w for w in result["warnings"]), result["warnings"]
    assert any("have no source image" in w for w in result["warnings"]), result["warnings"]
    assert not any("; " in w for w in result["warnings"])  # results.csv joins warnings with '; '
    (files,) = dicom_series(gap).values()
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    seg = hd.seg.segread(out / "gap" / "dicom" / "seg.dcm")
    real = [k for k in range(24) if k != 12]
    for number, name in ((1, "lung_mask.nii.gz"), (2, "lesion_mask.nii.gz")):
        mask = _mask(out / "gap" / name)
        assert mask.shape[0] == 24 and mask[12].any()
        assert np.array_equal(_seg_volume(seg, uids, number), mask[real])
    assert dciodvfy(out / "gap" / "dicom" / "seg.dcm") == []


def test_dicom_out_reruns_a_study_done_without_and_then_resumes(crop_nifti, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-q", "run", str(crop_nifti), "--out", str(out), "--method", "density"]
    assert main(args) == 0
    assert not (out / "chest" / "dicom").exists()
    first = json.loads((out / "chest" / "result.json").read_text())
    assert main([*args, "--dicom-out"]) == 0
    second = json.loads((out / "chest" / "result.json").read_text())
    assert second["fingerprint"] != first["fingerprint"] and (out / "chest" / second["outputs"]["dicom_seg"]).exists()
    capsys.readouterr()
    assert main([*args, "--dicom-out"]) == 0
    assert "1 already complete" in capsys.readouterr().out


def test_no_dicom_out_on_a_dicom_series(dicom_crop_series, tmp_path):
    series, _ = dicom_crop_series
    out = tmp_path / "out"
    assert main(["-q", "run", str(series), "--out", str(out), "--method", "density", "--no-dicom-out"]) == 0
    result = json.loads((out / series.name / "result.json").read_text())
    assert result["status"] == "ok" and not any(k.startswith("dicom") for k in result["outputs"])
    assert not (out / series.name / "dicom").exists()


def test_headers_the_seg_cannot_use_leave_the_other_results_standing(dicom_crop_series, tmp_path, capsys):
    """A series without a frame of reference: no DICOM outputs and a warning by default; with --dicom-out the
    study fails with the reason in one line."""
    series, _ = dicom_crop_series
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in sorted(series.iterdir()):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(bare / path.name)
    out = tmp_path / "out"
    args = ["-q", "run", str(bare), "--out", str(out), "--method", "density"]
    assert main(args) == 0
    result = json.loads((out / "bare" / "result.json").read_text())
    assert result["status"] == "ok" and not (out / "bare" / "dicom").exists()
    assert any(w.startswith("no DICOM outputs") and "Frame Of Reference" in w for w in result["warnings"])
    capsys.readouterr()
    assert main([*args, "--dicom-out"]) == 1
    assert "cannot write the DICOM outputs" in capsys.readouterr().out


def test_a_study_without_lesions_has_an_empty_lesion_segment(shared, tmp_path, capsys, dciodvfy):
    """24 slices of a clean real CT (LIDC-IDRI-0001): CT-0, the lesion segment has no frame, the SR says CT-0
    with no lesion volume, and both still pass dciodvfy."""
    ct = sitk.ReadImage(str(shared("lidc_idri/LIDC-IDRI-0001_ct.nii.gz")))[:, :, 60:84]
    nifti = tmp_path / "clean.nii.gz"
    sitk.WriteImage(ct, str(nifti), useCompression=True)
    out = tmp_path / "out"
    assert main(["-q", "run", str(nifti), "--out", str(out), "--method", "hirescam", "--dicom-out"]) == 0, \
        capsys.readouterr()
    study = out / "clean"
    result = json.loads((study / "result.json").read_text())
    assert result["grade"] == "CT-0" and result["lesion_volume_ml"] == 0
    files = sorted((study / "dicom" / "ct").glob("*.dcm"))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    seg = hd.seg.segread(study / "dicom" / "seg.dcm")
    frame_segments = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                      for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_segments == {1} and len(seg.SegmentSequence) == 2
    assert np.array_equal(_seg_volume(seg, uids, 1), _mask(study / "lung_mask.nii.gz"))
    assert not _seg_volume(seg, uids, 2).any()
    sr = hd.sr.srread(study / "dicom" / "sr.dcm")
    (lesion,) = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.tracking_identifier == "lesion"]
    assert {m.name.meaning: m.value for m in lesion.get_measurements()}["Volume"] == 0
    assert lesion.get_qualitative_evaluations()[0].value == grade_code("CT-0")
    for name in ("seg.dcm", "sr.dcm"):
        assert dciodvfy(study / "dicom" / name) == [], name
