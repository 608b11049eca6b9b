"""The staged batch (:mod:`pipelines.stages`): the per-study path's outputs bit for bit (on a real dask
LocalCluster, IBA), a failing study alone, resume, and never more studies in flight than the limit."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import pipelines.batch as batch
import pipelines.stages as stages
from pipelines.batch import run_batch
from pipelines.cli import main
from pipelines.stages import InFlight
from pipelines.study import PipelineConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["synth_000_f00", "synth_001_f20", "synth_002_f45"]


def _rows(out):
    with open(out / "results.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _assert_same_outputs(a, b, studies):
    """Every output file of each study folder equal (volumes voxel for voxel, figures byte for byte), and
    result.json but for its timings."""
    assert _rows(a) == _rows(b)
    for study in studies:
        files = sorted(p.name for p in (a / study).iterdir())
        assert files == sorted(p.name for p in (b / study).iterdir()), study
        for name in files:
            fa, fb = a / study / name, b / study / name
            if name.endswith(".nii.gz"):
                ia, ib = nib.load(str(fa)), nib.load(str(fb))
                va, vb = np.asarray(ia.dataobj), np.asarray(ib.dataobj)
                assert va.dtype == vb.dtype and va.tobytes() == vb.tobytes(), (study, name)
                assert np.array_equal(ia.affine, ib.affine), (study, name)
            elif name == "result.json":
                ra, rb = (json.loads(f.read_text()) for f in (fa, fb))
                for r in (ra, rb):
                    r.pop("timings_s")
                assert ra == rb, study
            else:
                assert fa.read_bytes() == fb.read_bytes(), (study, name)


@pytest.fixture
def inputs(tiny_studies, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(tiny_studies.glob("*.nii.gz")):
        shutil.copy(p, folder / p.name)
    return folder


def test_staged_on_a_local_cluster_equals_per_study(tiny_bundle_ungated, inputs, tmp_path, monkeypatch):
    good = inputs / "synth_000_f00.nii.gz"
    (inputs / "broken.nii.gz").write_bytes(good.read_bytes()[:4000])  # fails in the prepare stage, alone
    real_start = batch._start_client

    def one_thread_workers(*args, **kwargs):  # as this process (one torch thread) whatever the machine's cores
        client, cluster, _threads, device = real_start(*args, **kwargs)
        return client, cluster, 1, device

    monkeypatch.setattr(batch, "_start_client", one_thread_workers)
    config = PipelineConfig(method="iba", bundle=str(tiny_bundle_ungated), lung_mask="threshold",
                            method_params={"steps": 2, "n_samples": 2}, batch_size=4)
    per_study = run_batch(inputs, tmp_path / "per_study", config, progress=False, report=False)
    staged = run_batch(inputs, tmp_path / "staged", config, workers=2, progress=False, report=False,
                       pipeline="staged", max_in_flight=3)
    assert staged.pipeline == "staged" and staged.processed == per_study.processed == NAMES
    assert staged.failed == per_study.failed == ["broken"]
    assert 1 <= staged.peak_in_flight <= 3
    row = {r["study"]: r for r in _rows(tmp_path / "staged")}["broken"]
    assert row["status"] == "failed" and "truncated" in row["error"]
    assert any(np.asarray(nib.load(str(tmp_path / "staged" / s / "lesion_mask.nii.gz")).dataobj).any()
               for s in NAMES)  # non-trivial maps to compare
    _assert_same_outputs(tmp_path / "per_study", tmp_path / "staged", NAMES)


def test_staged_in_process_equals_per_study_and_resumes(tiny_bundle_ungated, inputs, tmp_path, capsys):
    base = ["-q", "run", str(inputs), "--bundle", str(tiny_bundle_ungated), "--method", "hirescam",
            "--lung-mask", "threshold", "--batch-size", "3"]
    assert main([*base, "--out", str(tmp_path / "per_study"), "--pipeline", "per-study"]) == 0
    assert main([*base, "--out", str(tmp_path / "staged"), "--pipeline", "staged"]) == 0
    _assert_same_outputs(tmp_path / "per_study", tmp_path / "staged", NAMES)

    out = tmp_path / "staged"  # a run stopped while writing its last study
    kept = {s: (out / s / "result.json").stat().st_mtime_ns for s in NAMES[:2]}
    (out / NAMES[2] / "result.json").unlink()
    (out / NAMES[2] / "heatmap.nii.gz").write_bytes(b"partial")
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--pipeline", "staged"]) == 0
    assert "2 already complete (skipped)" in capsys.readouterr().out
    assert {s: (out / s / "result.json").stat().st_mtime_ns for s in kept} == kept
    _assert_same_outputs(tmp_path / "per_study", out, NAMES)


def test_a_study_failing_in_the_device_stage_fails_alone(tiny_bundle_ungated, inputs, tmp_path, monkeypatch):
    real, calls = stages.infer_slices, []

    def flaky(*args):  # the second study of the device task (the studies are taken in order)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost\nsecond line")
        return real(*args)

    monkeypatch.setattr(stages, "infer_slices", flaky)
    config = PipelineConfig(method="hirescam", bundle=str(tiny_bundle_ungated), lung_mask="threshold",
                            overview=False)
    out = tmp_path / "out"
    summary = run_batch(inputs, out, config, progress=False, report=False, pipeline="staged", max_in_flight=3)
    assert len(calls) == 3 and summary.failed == [NAMES[1]] and summary.processed == [NAMES[0], NAMES[2]]
    row = {r["study"]: r for r in _rows(out)}[NAMES[1]]
    assert row["status"] == "failed" and row["error"] == "RuntimeError: device lost second line"
    assert "Traceback" in (out / NAMES[1] / "error.txt").read_text()
    assert not (out / NAMES[1] / "result.json").exists()


class CountingInFlight(InFlight):
    """The in-flight counter, recording the count after every change."""

    def __init__(self, limit):
        super().__init__(limit)
        self.history = []

    def enter(self):
        super().enter()
        self.history.append(self.count)

    def leave(self):
        super().leave()
        self.history.append(self.count)


@pytest.mark.parametrize("limit", [1, 2])
def test_never_more_studies_in_flight_than_the_limit(tiny_bundle_ungated, inputs, tmp_path, monkeypatch, limit):
    for i in range(3):  # six studies
        shutil.copy(inputs / f"{NAMES[i]}.nii.gz", inputs / f"copy_{i}.nii.gz")
    made = []

    def counting(limit):
        made.append(CountingInFlight(limit))
        return made[-1]

    monkeypatch.setattr("pipelines.batch.InFlight", counting)
    config = PipelineConfig(method="hirescam", bundle=str(tiny_bundle_ungated), lung_mask="threshold",
                            overview=False)
    summary = run_batch(inputs, tmp_path / "out", config, progress=False, report=False, pipeline="staged",
                        max_in_flight=limit)
    assert summary.n_ok == 6
    (window,) = made
    assert max(window.history) == limit == summary.peak_in_flight and window.entered == 6 and window.count == 0
    assert len(window.history) == 12 and min(window.history) == 0


def test_in_flight_counter_refuses_past_its_limit():
    window = InFlight(2)
    window.enter()
    window.enter()
    assert window.full
    with pytest.raises(RuntimeError, match="more than 2 studies"):
        window.enter()
    window.leave()
    assert not window.full and window.peak == 2
    with pytest.raises(ValueError):
        InFlight(0)
