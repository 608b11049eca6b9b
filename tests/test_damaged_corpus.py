"""``scripts/damaged_corpus.py``: the damaged copies hold the damage they name, and the verdicts read a run's
rows as the issue's "Done when" does. The run itself (``ctseverity run --method hirescam`` on the whole series)
is the script's job, not a test's; its table is in docs/input_rules.md."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pydicom


def test_copies_hold_their_damage(script, dicom_crop_series, tmp_path):
    dc = script("damaged_corpus")
    series, _ = dicom_crop_series
    kinds = ["missing_slice", "rescale_slope_some", "truncated_slice_file", "nifti_nan_slices", "nifti_scale_slope",
             "nifti_swapped_spacing"]
    against = dc.build_corpus(series, tmp_path / "corpus", kinds)
    root = tmp_path / "corpus"
    assert against["missing_slice"] == "intact_dicom" and against["nifti_nan_slices"] == "intact_nifti"
    intact = sorted((root / "intact_dicom").iterdir())
    assert len(intact) == 24 and all(f.is_symlink() for f in intact)
    assert len(list((root / "missing_slice").iterdir())) == 23
    slopes = [float(pydicom.dcmread(f, stop_before_pixels=True).RescaleSlope)
              for f in sorted((root / "rescale_slope_some").iterdir())]
    assert slopes.count(2.0) == 10 and slopes.count(1.0) == 14
    cut = [f for f in (root / "truncated_slice_file").iterdir() if not f.is_symlink()]
    assert len(cut) == 1 and cut[0].stat().st_size < 0.6 * intact[0].resolve().stat().st_size
    ref = nib.load(str(root / "intact_nifti.nii.gz"))
    nan = np.asarray(nib.load(str(root / "nifti_nan_slices.nii.gz")).dataobj)
    assert np.isnan(nan[:, :, ::3]).all() and np.isfinite(nan[:, :, 1::3]).all()
    header = gzip.decompress((root / "nifti_scale_slope.nii.gz").read_bytes())[:348]
    assert struct.unpack_from("<ff", header, 112) == (2.0, 0.0)
    swapped = nib.load(str(root / "nifti_swapped_spacing.nii.gz")).header.get_zooms()
    assert swapped == ref.header.get_zooms()[::-1]


def test_verdict_rules(script):
    verdict = script("damaged_corpus").verdict
    intact = {"status": "ok", "grade": "CT-1", "warnings": ""}
    assert verdict({"status": "failed", "error": "31 of 96 slices lost"}, intact) == "ok: refused"
    assert verdict({"status": "ok", "grade": "CT-1", "warnings": "1 missing slice"}, intact) == "ok: same grade"
    assert verdict({"status": "ok", "grade": "CT-2", "warnings": "1 missing slice"}, intact) == "OTHER GRADE, warned"
    assert verdict({"status": "ok", "grade": "CT-0", "warnings": ""}, intact) == "SILENT WRONG GRADE"
