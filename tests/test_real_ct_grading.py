"""Grades on real chest CT with the embedded model and ``ctseverity run`` (issue: heatmaps that point at real
lesions on any scanner).

- every real chest CT of ``../shared/data`` without inserted lesions (lung-cancer, COPD and screening
  patients from Philips, Siemens and GE scanners) is graded CT-0 with HiResCAM: a tumour, a nodule,
  emphysema or dependent density is not a COVID-19 lesion;
- the real COVID-19 series (RICORD, DICOM with JPEG Lossless, evaluation only) is graded CT-1 or higher
  with HiResCAM and with IBA, read straight from its DICOM folder;
- the same semi-synthetic study rendered with a smooth soft-tissue kernel and with a sharp lung kernel
  (B70f-like noise, :data:`monai_ext.data.scanner.SHARP_KERNEL`) gets the same grade.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pipelines.cli import main

CLEAN_CT = (
    "lidc_idri/LIDC-IDRI-0001_ct.nii.gz",
    "lidc_idri/LIDC-IDRI-0003_ct.nii.gz",
    "chest_ct_more/tcia_lung_pet_ct_dx_A0002/Lung_Dx-A0002_ct.nii.gz",
    "chest_ct_more/tcia_cptac_luad_C3N-00247/C3N-00247_ct.nii.gz",
    "chest_ct_itkelastix_00/chest_ct_00.nii.gz",
    "chest_ct_more/cip_copdgene_10002K/ct-64.nrrd",
    "chest_ct_more/cip_testinput/TestInput.nrrd",
)


def _results(out) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as fh:
        return {r["study"]: r for r in csv.DictReader(fh)}


def test_every_clean_real_ct_is_graded_ct0(shared, tmp_path, capsys):
    paths = [str(shared(p)) for p in CLEAN_CT]
    out = tmp_path / "clean"
    code = main(["-q", "run", *paths, "--out", str(out), "--method", "hirescam"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = _results(out)
    assert len(rows) == len(CLEAN_CT)
    graded = {s: (r["grade"], r["lesion_percent"], r["lesion_volume_ml"]) for s, r in rows.items()}
    assert all(r["grade"] == "CT-0" for r in rows.values()), graded


@pytest.mark.parametrize("method", ["hirescam", "iba"])
def test_real_covid_ct_is_graded_ct1_or_higher(shared, tmp_path, capsys, method):
    out = tmp_path / method
    code = main(["-q", "run", str(shared("ricord_1a_000082_covid/dicom")), "--out", str(out), "--method", method])
    printed = capsys.readouterr().out
    assert code == 0, printed
    (row,) = _results(out).values()
    assert row["grade"] in ("CT-1", "CT-2", "CT-3", "CT-4"), row
    assert float(row["lesion_percent"]) > 0.5, row


def test_smooth_and_sharp_kernels_give_the_same_grade(shared, script, tmp_path, capsys):
    """One semi-synthetic study of the evaluation CT C3N-00247 (20 % lesions), rendered with a soft-tissue
    kernel and with a sharp lung kernel: the same grade, lesion % within 5 points."""
    make_studies = script("make_semisynthetic").make_studies
    ct = shared("chest_ct_more/tcia_cptac_luad_C3N-00247/C3N-00247_ct.nii.gz")
    studies = tmp_path / "studies"
    for style in ("smooth", "sharp"):
        make_studies(studies, [ct], [20.0], style=style, seed=31, prefix="c3n")
    out = tmp_path / "run"
    code = main(["-q", "run", str(studies), "--out", str(out), "--method", "hirescam",
                 "--truth", str(studies / "truth.csv")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = _results(out)
    smooth, sharp = rows["c3n_smooth_00_f20"], rows["c3n_sharp_00_f20"]
    assert smooth["grade"] == sharp["grade"] == "CT-1", (smooth, sharp)
    assert abs(float(smooth["lesion_percent"]) - float(sharp["lesion_percent"])) <= 5.0, (smooth, sharp)
    assert np.isclose(float(smooth["lung_volume_ml"]), float(sharp["lung_volume_ml"]), rtol=0.03)
