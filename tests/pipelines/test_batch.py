"""The batch layer: failures recorded while the others finish, resume, outputs on the input grid, dask."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import pipelines.batch as batch
from monai_ext.data.synthetic import synthetic_chest_ct
from monai_ext.errors import CTSeverityError
from pipelines.batch import RESULT_COLUMNS, run_batch
from pipelines.cli import main
from pipelines.study import PipelineConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def copy_studies(src, dst, names=None):
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.nii.gz")):
        if names is None or p.name.split(".")[0] in names:
            shutil.copy(p, dst / p.name)
    return dst


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the studies :func:`pipelines.study.process_study` runs in this process."""
    calls = []
    real = batch.process_study

    def counting(study, *args, **kwargs):
        calls.append(study.study)
        return real(study, *args, **kwargs)

    monkeypatch.setattr(batch, "process_study", counting)
    return calls


def test_corrupt_study_is_reported_while_the_others_finish(tiny_studies, tmp_path, capsys):
    inputs = copy_studies(tiny_studies, tmp_path / "in")
    good = inputs / "synth_000_f00.nii.gz"
    (inputs / "broken.nii.gz").write_bytes(good.read_bytes()[:4000])  # a truncated download
    out = tmp_path / "out"
    rc = main(["-q", "run", str(inputs), "--out", str(out), "--method", "density"])
    assert rc == 1
    rows = read_csv(out / "results.csv")
    assert [r["study"] for r in rows] == ["broken", "synth_000_f00", "synth_001_f20", "synth_002_f45"]
    broken = rows[0]
    assert broken["status"] == "failed" and "truncated" in broken["error"] and broken["input"].endswith("broken.nii.gz")
    assert broken["grade"] == "" and broken["lesion_percent"] == ""
    assert all(r["status"] == "ok" and r["grade"].startswith("CT-") and r["error"] == "" for r in rows[1:])
    assert not (out / "broken" / "result.json").exists()
    printed = capsys.readouterr().out
    assert "failed" in printed and "truncated" in printed and str(out / "report.html") in printed


def test_unexpected_error_recorded_with_type_and_traceback(tiny_studies, tmp_path, monkeypatch):
    inputs = copy_studies(tiny_studies, tmp_path / "in", names={"synth_000_f00", "synth_001_f20"})
    out = tmp_path / "out"
    real = batch.process_study

    def flaky(study, *args, **kwargs):
        if study.study == "synth_001_f20":
            raise RuntimeError("out of cheese\nsecond line")
        return real(study, *args, **kwargs)

    monkeypatch.setattr(batch, "process_study", flaky)
    config = PipelineConfig(method="density", overview=False)
    summary = run_batch(inputs, out, config, progress=False, report=False)
    assert summary.failed == ["synth_001_f20"] and summary.processed == ["synth_000_f00"] and not summary.ok
    row = {r["study"]: r for r in read_csv(out / "results.csv")}["synth_001_f20"]
    assert row["status"] == "failed" and row["error"] == "RuntimeError: out of cheese second line"
    text = (out / "synth_001_f20" / "error.txt").read_text()
    assert "Traceback" in text and "out of cheese" in text

    monkeypatch.setattr(batch, "process_study", real)  # fixed: the next run redoes only that study
    summary = run_batch(inputs, out, config, progress=False, report=False)
    assert summary.processed == ["synth_001_f20"] and summary.skipped == ["synth_000_f00"] and summary.ok
    assert not (out / "synth_001_f20" / "error.txt").exists()
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["ok", "ok"]


def test_interrupted_run_resumes_to_the_same_results(tiny_studies, tiny_bundle_ungated, tmp_path, count_calls):
    config = PipelineConfig(method="hirescam", bundle=str(tiny_bundle_ungated), overview=False)
    out = tmp_path / "out"
    first = run_batch(tiny_studies, out, config, progress=False, report=False)
    assert first.processed == ["synth_000_f00", "synth_001_f20", "synth_002_f45"] and count_calls == first.processed
    uninterrupted = read_csv(out / "results.csv")
    assert any(float(r["lesion_percent"]) > 0 for r in uninterrupted)  # non-trivial heatmaps
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synth_001_f20" / "heatmap.nii.gz")))
    kept = {s: (out / s / "result.json").stat().st_mtime_ns for s in ("synth_000_f00", "synth_002_f45")}

    # as if killed while writing synth_001_f20: no result.json, a truncated heatmap, a temporary file
    victim = out / "synth_001_f20"
    (victim / "result.json").unlink()
    (victim / "heatmap.nii.gz").write_bytes((victim / "heatmap.nii.gz").read_bytes()[:100])
    (victim / ".lesion_mask.abc123.nii.gz").write_bytes(b"partial")
    (out / "results.csv").unlink()
    count_calls.clear()
    resumed = run_batch(tiny_studies, out, config, progress=False, report=False)
    assert count_calls == ["synth_001_f20"]
    assert resumed.processed == ["synth_001_f20"] and resumed.skipped == ["synth_000_f00", "synth_002_f45"]
    assert {s: (out / s / "result.json").stat().st_mtime_ns for s in kept} == kept
    assert without_seconds(read_csv(out / "results.csv")) == without_seconds(uninterrupted)
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(victim / "heatmap.nii.gz")))
    np.testing.assert_allclose(again, heat, atol=1e-6)
    assert not list(victim.glob(".*"))


def test_changed_settings_redo_complete_studies(tiny_studies, tmp_path, count_calls):
    out = tmp_path / "out"
    config = PipelineConfig(method="density", overview=False)
    run_batch(tiny_studies, out, config, progress=False, report=False)
    assert len(count_calls) == 3
    count_calls.clear()
    summary = run_batch(tiny_studies, out, config, progress=False, report=False)
    assert count_calls == [] and summary.n_skipped == 3 and summary.n_ok == 0 and len(summary.rows) == 3
    summary = run_batch(tiny_studies, out, PipelineConfig(method="density", overview=False, min_lesion_ml=50.0),
                        progress=False, report=False)
    assert len(count_calls) == 3 and summary.n_ok == 3


def _oblique_study(path):
    """A phantom written with a rotated, flipped direction, an odd origin and anisotropic spacing."""
    ct = synthetic_chest_ct((64, 56, 20), (5.5, 6.0, 11.0), seed=3)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.rint(ct.image).astype(np.int16).transpose(2, 1, 0)))
    a = np.deg2rad(12.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, -1.0]])
    img.SetDirection(direction.ravel().tolist())
    img.SetSpacing((5.5, 6.0, 11.0))
    img.SetOrigin((-171.25, 23.5, 402.0))
    sitk.WriteImage(img, str(path))
    return img


def test_outputs_are_on_the_input_grid(tiny_bundle_ungated, tmp_path):
    (tmp_path / "in").mkdir()
    ref = _oblique_study(tmp_path / "in" / "oblique.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "in" / "oblique.nii.gz"))  # as stored (float32 header)
    config = PipelineConfig(method="hirescam", bundle=str(tiny_bundle_ungated), overview=False)
    summary = run_batch(tmp_path / "in", tmp_path / "out", config, progress=False, report=False)
    assert summary.processed == ["oblique"]
    for name in ("heatmap", "lesion_mask", "lung_mask"):
        img = sitk.ReadImage(str(tmp_path / "out" / "oblique" / f"{name}.nii.gz"))
        assert img.GetSize() == ref.GetSize(), name
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-5, err_msg=name)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "oblique" / "lung_mask.nii.gz")))
    hu = sitk.GetArrayFromImage(ref)
    assert lung.any() and np.median(hu[lung > 0]) < -500  # the mask lies on the lung of the input voxels


def test_local_cluster_with_two_workers(tiny_studies, tmp_path):
    inputs = copy_studies(tiny_studies, tmp_path / "in", names={"synth_000_f00", "synth_002_f45"})
    config = PipelineConfig(method="density", overview=False)
    sequential = run_batch(inputs, tmp_path / "seq", config, progress=False, report=False)
    on_dask = run_batch(inputs, tmp_path / "dask", config, workers=2, progress=False, report=False)
    assert on_dask.processed == ["synth_000_f00", "synth_002_f45"] and on_dask.ok
    assert without_seconds(on_dask.rows) == without_seconds(sequential.rows)
    assert list(read_csv(tmp_path / "dask" / "results.csv")[0]) == list(RESULT_COLUMNS)
    res = json.loads((tmp_path / "dask" / "synth_002_f45" / "result.json").read_text())
    assert res["status"] == "ok" and res["method"] == "density"


def test_each_process_loads_the_model_once(tiny_bundle, monkeypatch):
    loads = []
    real = batch.load_model

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "load_model", counting)
    monkeypatch.setattr(batch, "_MODELS", {})
    config = PipelineConfig(method="hirescam", bundle=str(tiny_bundle))
    first = batch._get_model(config)
    assert batch._get_model(config) is first and len(loads) == 1
    assert batch._get_model(PipelineConfig(method="density")) is None


def test_gpu_workers_without_dask_cuda_fail_clearly(tiny_studies, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "_gpu_count", lambda device: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed
    config = PipelineConfig(method="density", device="cuda", overview=False)
    with pytest.raises(CTSeverityError, match=r"dask-cuda.*ct-severity\[gpu\]"):
        run_batch(tiny_studies, tmp_path / "out", config, workers=2, progress=False, report=False)
