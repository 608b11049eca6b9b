"""Real-world DICOM, built from the real chest CT (``tests/io/dicom_corpus.py``): every case is read right
(voxel for voxel against the volume it was made from, or against the world for a gantry tilt) and graded
as the same study in NIfTI by ``ctseverity run``, or refused with its reason; a folder with several series
grades the right one and says which.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from monai_ext.errors import NoDicomSeriesError
from monai_ext.io.dicom_select import kernel_class
from monai_ext.io.reader import WARNINGS_KEY, read_sitk_image
from pipelines.cli import main
from pipelines.dicom import grade_code

sys.path.insert(0, str(Path(__file__).parent))
import dicom_corpus as dc  # noqa: E402

RUN = ["run", "--method", "density", "--lung-mask", "threshold", "--no-dicom-out"]


@pytest.fixture(scope="module")
def corpus(small_real_ct, tmp_path_factory):
    """Every case as a study folder of one batch, the reference NIfTI beside them, and what each was made with."""
    vol, affine = small_real_ct
    root = tmp_path_factory.mktemp("dicom_corpus")
    nib.save(nib.Nifti1Image(vol, affine), str(root / "reference.nii.gz"))
    lung = dc.axial_series(vol, number=3, description="Lung 1.25 mm", kernel="B70f")
    soft = dc.axial_series(ndimage.uniform_filter(vol, 3), number=2, description="Body 1.25 mm", kernel="B30f")
    thick = dc.axial_series(vol, number=4, description="Lung 5 mm", kernel="B70f", thickness=5.0, step=2)
    coronal = [dc.ct_slice(vol[:, j, :].T[::-1], (0.0, j * dc.PIXEL_MM, 282.0), (1, 0, 0, 0, 0, -1), "1.2.3.99", 6,
                           "Coronal", j + 1) for j in range(0, vol.shape[1], 8)]
    multi = root / "several_series"
    for prefix, series in (("a", soft), ("b", thick), ("c", lung), ("d", coronal)):
        dc.write(series, multi, prefix)
    dc.write([dc.localizer(vol), dc.dose_report(), dc.dose_screen(vol)], multi, "x")
    for syntax in ("rle", "jpegls", "j2k", "deflate"):
        dc.write([dc.encode(ds, syntax) for ds in dc.axial_series(vol)], root / f"compressed_{syntax}")
    dc.write([dc.multiframe(vol)], root / "multiframe")
    dc.write([dc.enhanced_shuffled(vol)], root / "enhanced_shuffled")
    names = dc.axial_series(vol)
    for ds in names:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen=山田^太郎"
        ds.SeriesDescription = "Thorax – Lunge 1,25 mm (Übersicht) 肺"
        ds.InstitutionName = "Hôpital Saint-Éloi"
    dc.write(names, root / "non_ascii_utf8")
    latin = dc.axial_series(vol)
    for ds in latin:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Gonçalves^Zoë"
        ds.StudyDescription = "Thorax nativ, Lungenfenster, Müller-Lüdenscheidt"
    dc.write(latin, root / "non_ascii_latin1")
    tilted, geometry = dc.tilted_series(vol, 12.0)
    dc.write(tilted, root / "gantry_tilt")
    _world_oracle(root / "gantry_tilt", vol, root / "gantry_tilt_oracle.nii.gz")
    dc.write(dc.tilted_series(vol[:, :, ::4], 40.0)[0], root / "tilt_40_degrees")
    dc.write([dc.localizer(vol), dc.dose_report()], root / "scout_and_dose_only")
    return {"root": root, "vol": vol, "lung_uid": lung[0].SeriesInstanceUID, "soft_uid": soft[0].SeriesInstanceUID,
            "tilt_geometry": geometry}


def _world_oracle(series: Path, vol: np.ndarray, out: Path) -> None:
    """The chest sampled once (linear) at the world positions of the grid the reader puts a tilted series on,
    saved as NIfTI on that grid: what the tilted series must grade as, but for its second interpolation."""
    img = read_sitk_image(series)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    sp = np.asarray(img.GetSpacing())
    shape = img.GetSize()
    i, j, m = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), m.ravel()])
    world = np.asarray(img.GetOrigin())[:, None] + direction @ (index * sp[:, None])
    idx = world / np.array([dc.PIXEL_MM, dc.PIXEL_MM, dc.STEP_MM])[:, None]
    values = ndimage.map_coordinates(vol.astype(np.float32), idx, order=1, mode="constant", cval=-1024.0)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(sp)  # LPS -> RAS
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(img.GetOrigin())
    nib.save(nib.Nifti1Image(np.round(values).astype(np.int16).reshape(shape), affine), str(out))


@pytest.mark.parametrize("case", ["several_series", "compressed_rle", "compressed_jpegls", "compressed_j2k",
                                  "compressed_deflate", "multiframe", "enhanced_shuffled", "non_ascii_utf8",
                                  "non_ascii_latin1"])
def test_each_case_reads_the_volume_voxel_for_voxel(corpus, case):
    img = read_sitk_image(corpus["root"] / case)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    assert np.array_equal(arr, corpus["vol"])
    assert img.GetSpacing() == pytest.approx((dc.PIXEL_MM, dc.PIXEL_MM, dc.STEP_MM))
    assert img.GetOrigin() == pytest.approx((0.0, 0.0, 0.0))


def test_several_series_choose_the_thin_lung_kernel_series_and_say_why(corpus, caplog):
    with caplog.at_level(logging.DEBUG, logger="monai_ext.io"):
        img = read_sitk_image(corpus["root"] / "several_series")
    assert img.GetMetaData("ctseverity|series_uid") == corpus["lung_uid"]
    why = img.GetMetaData(WARNINGS_KEY)
    assert "read series 3 'Lung 1.25 mm'" in why and "lung kernel 'B70f'" in why and "; " not in why
    assert "series 2 'Body 1.25 mm'" in why and "soft kernel" in why
    assert "series 4 'Lung 5 mm'" in why and "thicker slices" in why
    assert "series 6 'Coronal'" in why and "not axial" in why
    log = caplog.text
    assert "a localizer (scout)" in log and "a structured report (dose report or SR)" in log
    assert "a secondary capture" in log and "read series 3" in log


def test_series_uid_reads_the_series_asked_for(corpus):
    img = read_sitk_image(corpus["root"] / "several_series", series_uid=corpus["soft_uid"])
    assert img.GetMetaData("ctseverity|series_uid") == corpus["soft_uid"]
    assert "as asked (--series)" in img.GetMetaData(WARNINGS_KEY)
    with pytest.raises(NoDicomSeriesError, match="no series '1.2.3.4.5'"):
        read_sitk_image(corpus["root"] / "several_series", series_uid="1.2.3.4.5")
    with pytest.raises(NoDicomSeriesError, match="cannot be read: not axial"):
        read_sitk_image(corpus["root"] / "several_series", series_uid="1.2.3.99")


def test_gantry_tilt_is_resampled_onto_the_world_not_misplaced(corpus):
    """Each voxel of the volume read lies where the chest is: the read volume matches the original sampled at
    the world positions of the read grid; the slices stacked as they come (the tilt ignored) do not."""
    img = read_sitk_image(corpus["root"] / "gantry_tilt")
    assert "gantry tilt of 12.0 degrees" in img.GetMetaData(WARNINGS_KEY)
    g = corpus["tilt_geometry"]
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    assert np.allclose(direction[:, 2], g["normal"], atol=1e-6)
    assert img.GetSpacing()[2] == pytest.approx(g["step"])
    read = sitk.GetArrayFromImage(img).astype(np.float32)  # (m, j, i)
    m, j, i = np.meshgrid(*(np.arange(n) for n in read.shape), indexing="ij")
    sp = img.GetSpacing()
    world = (np.asarray(img.GetOrigin())[:, None] + direction @ np.stack([i.ravel() * sp[0], j.ravel() * sp[1],
                                                                            m.ravel() * sp[2]]))
    idx = world / np.array([dc.PIXEL_MM, dc.PIXEL_MM, dc.STEP_MM])[:, None]
    vol = corpus["vol"].astype(np.float32)
    inside = np.all((idx > 1) & (idx < np.array(vol.shape)[:, None] - 2), axis=0)
    truth = ndimage.map_coordinates(vol, idx[:, inside], order=1)
    error = np.abs(read.ravel()[inside] - truth)
    raw = np.stack([np.asarray(ds.pixel_array, np.float32) + dc.INTERCEPT
                    for ds in map(dc.reread, sorted((corpus["root"] / "gantry_tilt").glob("*.dcm")))])
    naive_error = np.abs(raw.ravel()[inside] - truth)
    assert inside.sum() > 0.3 * inside.size
    assert np.median(error) < 5.0 and error.mean() < 25.0, (np.median(error), error.mean())
    assert naive_error.mean() > 4 * error.mean(), (naive_error.mean(), error.mean())


def test_refusals_name_the_reason(corpus):
    with pytest.raises(NoDicomSeriesError, match="not axial"):
        read_sitk_image(corpus["root"] / "tilt_40_degrees")
    with pytest.raises(NoDicomSeriesError, match=r"no CT image series: 2 DICOM file\(s\) left out \(a localizer "
                                                  r"\(scout\), a structured report \(dose report or SR\)\)"):
        read_sitk_image(corpus["root"] / "scout_and_dose_only")


def test_kernel_classes():
    assert [kernel_class(k) for k in ("B70f", "LUNG", "FC52", "YA", "Br64", "Bl57")] == ["lung"] * 6
    assert [kernel_class(k) for k in ("B30f", "STANDARD", "SOFT", "FC08", "Br40")] == ["soft"] * 5
    assert kernel_class("") == kernel_class(None) == kernel_class("XYZ") == "unknown"


def test_the_corpus_through_ctseverity_run(corpus, tmp_path, capsys):
    """One batch of every case: each graded as the reference NIfTI (the tilted series within its resampling)
    or refused with the reason; the folder with several series grades the lung series and says which."""
    out = tmp_path / "out"
    code = main([*RUN, str(corpus["root"]), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1, printed  # the two refusals
    with open(out / "results.csv", newline="") as fh:
        rows = {r["study"]: r for r in csv.DictReader(fh)}
    ref = rows["reference"]
    assert ref["status"] == "ok"
    exact = ["several_series", "compressed_rle", "compressed_jpegls", "compressed_j2k", "compressed_deflate",
             "multiframe", "enhanced_shuffled", "non_ascii_utf8", "non_ascii_latin1"]
    for name in exact:
        r = rows[name]
        assert r["status"] == "ok", (name, r["error"])
        assert (r["grade"], r["lesion_percent"], r["lung_volume_ml"]) == (
            ref["grade"], ref["lesion_percent"], ref["lung_volume_ml"]), name
    assert "read series 3 'Lung 1.25 mm'" in rows["several_series"]["warnings"]
    assert "read series 3 'Lung 1.25 mm'" in printed
    result = json.loads((out / "several_series" / "result.json").read_text())
    assert any("read series 3" in w for w in result["warnings"])
    tilt = rows["gantry_tilt"]
    assert tilt["status"] == "ok" and tilt["grade"] == ref["grade"], tilt
    oracle = rows["gantry_tilt_oracle"]
    assert float(tilt["lung_volume_ml"]) == pytest.approx(float(oracle["lung_volume_ml"]), rel=0.02)
    assert abs(float(tilt["lesion_percent"]) - float(oracle["lesion_percent"])) < 1.0
    assert "gantry tilt of 12.0 degrees" in tilt["warnings"]
    assert rows["tilt_40_degrees"]["status"] == "failed" and "not axial" in rows["tilt_40_degrees"]["error"]
    assert rows["scout_and_dose_only"]["status"] == "failed"
    assert "no CT image series" in rows["scout_and_dose_only"]["error"]


def test_run_series_option_grades_the_series_asked_for(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*RUN, str(corpus["root"] / "several_series"), "--out", str(out), "--series",
                 corpus["soft_uid"]]) == 0
    capsys.readouterr()
    result = json.loads((out / "several_series" / "result.json").read_text())
    assert any("read series 2 'Body 1.25 mm'" in w and "as asked (--series)" in w for w in result["warnings"])


def test_inspect_says_which_series_and_reads_the_one_asked_for(corpus, capsys):
    folder = str(corpus["root"] / "several_series")
    assert main(["inspect", folder]) == 0
    out = capsys.readouterr().out
    assert "128x128x47" in out and "warning: several_series: 4 CT series in the folder: read series 3" in out
    assert main(["inspect", folder, "--series", corpus["soft_uid"]]) == 0
    assert "read series 2 'Body 1.25 mm'" in capsys.readouterr().out


def test_multiframe_and_tilt_get_dicom_outputs_that_map_back(corpus, tmp_path, capsys, dciodvfy):
    """Enhanced multi-frame CT (frames sorted by highdicom's conversion, and shuffled) gets a SEG whose frames
    reference the source frames: each source frame's SEG pixels equal the NIfTI masks at that frame's position.
    The tilt-corrected series gets its SR and overview and no SEG, with the reason. All pass dciodvfy."""
    root, out = corpus["root"], tmp_path / "out"
    names = ("multiframe", "enhanced_shuffled", "gantry_tilt")
    assert main([*RUN[:-1], *(str(root / n) for n in names), "--out", str(out)]) == 0
    capsys.readouterr()
    for name in names[:2]:
        study = out / name
        result = json.loads((study / "result.json").read_text())
        assert result["outputs"]["dicom_seg"] == "dicom/seg.dcm" and not result["warnings"], result
        (source_file,) = (root / name).iterdir()
        source = pydicom.dcmread(source_file, stop_before_pixels=True)
        slices = [round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]) / dc.STEP_MM)
                  for f in source.PerFrameFunctionalGroupsSequence]  # the grid slice of each source frame
        assert sorted(slices) == list(range(int(source.NumberOfFrames)))
        seg = hd.seg.segread(study / "dicom" / "seg.dcm")
        for number, mask_name in ((1, "lung_mask.nii.gz"), (2, "lesion_mask.nii.gz")):
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(study / mask_name))).astype(bool)  # (z, y, x)
            back = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, len(slices) + 1)),
                                                  segment_numbers=[number])[..., 0].astype(bool)
            assert mask.sum() > 100 and np.array_equal(back, mask[slices]), (name, mask_name)
        for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on the source frame it references
            ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            src = source.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
            np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                       [float(v) for v in src.PlanePositionSequence[0].ImagePositionPatient],
                                       atol=1e-4)
        for file in ("seg.dcm", "sr.dcm", "overview.dcm"):
            assert dciodvfy(study / "dicom" / file) == [], (name, file)
    tilt = out / "gantry_tilt"
    result = json.loads((tilt / "result.json").read_text())
    assert "dicom_seg" not in result["outputs"] and not (tilt / "dicom" / "seg.dcm").exists()
    assert result["outputs"]["dicom_sr"] == "dicom/sr.dcm"
    (why,) = [w for w in result["warnings"] if w.startswith("no DICOM SEG")]
    assert "in its plane off the grid read (the reader corrected a gantry tilt" in why and "; " not in why
    sr = hd.sr.srread(tilt / "dicom" / "sr.dcm")
    lesion = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "lesion"]
    assert len(lesion) == 1 and lesion[0].get_qualitative_evaluations()[0].value == grade_code(result["grade"])
    values = {m.name.meaning: m.value for m in lesion[0].get_measurements()}
    assert values["Lesion volume as percent of lung volume"] == pytest.approx(result["lesion_percent"])
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert len(evidence) == len(list((root / "gantry_tilt").iterdir()))  # the source slices, no SEG
    for file in ("sr.dcm", "overview.dcm"):
        assert dciodvfy(tilt / "dicom" / file) == [], file


def test_a_study_without_seg_stores_its_sr_and_overview(corpus, tmp_path, capsys, monkeypatch):
    """--store sends what a tilt-corrected study has: its SR and overview capture (no SEG); none without an SR."""
    from monai_ext.errors import CTSeverityError
    from pipelines.dicom import dicomweb
    from pipelines.dicom.pacs import PacsStudy, store_study

    out = tmp_path / "out"
    assert main([*RUN[:-1], str(corpus["root"] / "gantry_tilt"), "--out", str(out)]) == 0
    capsys.readouterr()
    sent = []
    monkeypatch.setattr(dicomweb, "store_instances", lambda client, uid, datasets: sent.extend(datasets) or
                        [ds.SOPInstanceUID for ds in datasets])
    study_uid = str(pydicom.dcmread(next((corpus["root"] / "gantry_tilt").iterdir())).StudyInstanceUID)
    stored = store_study(None, PacsStudy(study_uid), out / "gantry_tilt")
    assert sorted(ds.Modality for ds in sent) == ["OT", "SR"] and len(stored) == 2
    result = out / "gantry_tilt" / "result.json"
    data = json.loads(result.read_text())
    del data["outputs"]["dicom_sr"]
    result.write_text(json.dumps(data))
    with pytest.raises(CTSeverityError, match="no DICOM SR to store"):
        store_study(None, PacsStudy(study_uid), out / "gantry_tilt")
