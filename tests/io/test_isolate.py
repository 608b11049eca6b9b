"""Calls in a child process that can be stopped (:mod:`monai_ext.io.isolate`) and ``read_ct(timeout=...)``, which
reads through it: answers, errors, crashes, hangs and log records come back as if the call ran here."""

from __future__ import annotations

import logging
import os
import signal
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.errors import CorruptImageError, CTSeverityError
from monai_ext.io import read_ct
from monai_ext.io.isolate import call_in_child

log = logging.getLogger("monai_ext.io.test_isolate")


def _answer(x: int) -> dict:
    log.warning("working on %d", x)
    return {"x": x, "array": np.arange(x)}


def _refuse(path: str) -> None:
    raise CorruptImageError("cannot decode the image data", path)


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as a decoder crashing in C ends the process


def _hang() -> None:
    time.sleep(600)


def test_answers_errors_crashes_and_hangs(caplog):
    with caplog.at_level(logging.WARNING, logger="monai_ext.io.test_isolate"):
        out = call_in_child(_answer, 30, 5)
    assert out["x"] == 5 and np.array_equal(out["array"], np.arange(5))
    assert "working on 5" in caplog.text  # the child's log record, handled here
    with pytest.raises(CorruptImageError) as info:
        call_in_child(_refuse, 30, "/data/x.nii")
    assert (info.value.reason, info.value.path) == ("cannot decode the image data", "/data/x.nii")
    with pytest.raises(ChildProcessError, match="SIGKILL"):
        call_in_child(_crash, 30)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer within 0.5 s"):
        call_in_child(_hang, 0.5)
    assert time.monotonic() - t0 < 5


def test_read_ct_with_a_time_limit_reads_the_same(small_real_ct, tmp_path):
    vol, affine = small_real_ct
    path = tmp_path / "ct.nii.gz"
    bad = vol.astype(np.float32)
    bad[10:20, 50:60, 20] = np.nan  # the NIfTI checks run in the child too
    nib.save(nib.Nifti1Image(bad, affine), str(path))
    here, report = read_ct(path)
    there, report_there = read_ct(path, timeout=60)
    assert torch.equal(here, there) and np.array_equal(here.affine, there.affine)
    assert report.warnings == report_there.warnings and report.warnings
    with pytest.raises(CTSeverityError, match="not a readable medical image"):
        read_ct(_not_an_image(tmp_path), timeout=60)
    fifo = tmp_path / "hang.nii.gz"
    os.mkfifo(fifo)  # open() blocks until a writer comes: a reader that hangs
    with pytest.raises(TimeoutError):
        read_ct(fifo, timeout=1)


def _not_an_image(folder):
    path = folder / "notes.nrrd"
    path.write_text("not an image")
    return path
