"""Bad input through the command line: one line naming the input and the reason, exit code 2."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ctseverity")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _ct(shape=(48, 40, 12)):
    vol = np.full(shape, -1000, np.int16)
    vol[4:-4, 4:-4] = 40
    vol[8:22, 8:-8, 2:-2] = -850
    vol[26:-8, 8:-8, 2:-2] = -850
    return vol


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "ctseverity" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("synth", "train", "predict", "inspect", "calibrate"):
        assert cmd in out


def test_missing_path(capsys, tmp_path):
    code, _, err = _run(capsys, "inspect", str(tmp_path / "nope.nii.gz"))
    assert code == 2
    _assert_one_line_error(err, "nope.nii.gz", "no such file or folder")


def test_not_an_image(capsys, tmp_path):
    (tmp_path / "notes.nii.gz").write_bytes(gzip.compress(b"hello, not an image" * 20))
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    code, _, err = _run(capsys, "inspect", str(tmp_path / "notes.nii.gz"))
    assert code == 2
    _assert_one_line_error(err, "notes.nii.gz")
    code, _, err = _run(capsys, "inspect", str(tmp_path / "doc.pdf"))
    assert code == 2
    _assert_one_line_error(err, "doc.pdf", "not a readable medical image")


def test_corrupt_nifti(capsys, tmp_path, real_ct_path):
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(Path(real_ct_path).read_bytes()[:300_000])
    code, _, err = _run(capsys, "inspect", str(bad))
    assert code == 2
    _assert_one_line_error(err, "cut.nii.gz", "truncated")


def test_2d_image(capsys, tmp_path):
    nib.save(nib.Nifti1Image(_ct()[:, :, 5], np.eye(4)), str(tmp_path / "flat.nii.gz"))
    code, _, err = _run(capsys, "inspect", str(tmp_path / "flat.nii.gz"))
    assert code == 2
    _assert_one_line_error(err, "flat.nii.gz", "not a 3D CT volume")


def test_values_not_ct(capsys, tmp_path):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 255, (48, 40, 12)).astype(np.uint8), np.eye(4)),
             str(tmp_path / "mr.nii.gz"))
    code, _, err = _run(capsys, "inspect", str(tmp_path / "mr.nii.gz"))
    assert code == 2
    _assert_one_line_error(err, "mr.nii.gz", "Hounsfield")


def test_dicom_folder_without_series(capsys, tmp_path):
    folder = tmp_path / "dicoms"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # a DICOM preamble and nothing else
    code, _, err = _run(capsys, "inspect", str(folder))
    assert code == 2
    _assert_one_line_error(err, "dicoms")


def test_no_lung_found(capsys, tmp_path):
    vol = np.full((48, 40, 12), -1000, np.int16)
    vol[4:-4, 4:-4] = 40  # a body without any air inside
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 5.0, 1.0])), str(tmp_path / "solid.nii.gz"))
    code, _, err = _run(capsys, "inspect", "--lung", "--lung-mask", "threshold", str(tmp_path / "solid.nii.gz"))
    assert code == 2
    _assert_one_line_error(err, "solid.nii.gz", "lung")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "inspect", str(tmp_path / "nope.nii.gz")])


def test_inspect_real_ct(capsys, real_ct_path):
    code, out, _ = _run(capsys, "inspect", "--lung", "--lung-mask", "threshold", str(real_ct_path))
    assert code == 0
    assert "512x512x141" in out and "0.977x0.977x2" in out and "LPS" in out
    lung_ml = float(out.strip().splitlines()[-1].split()[-1])
    assert 3000 < lung_ml < 8000
