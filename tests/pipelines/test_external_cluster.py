"""``ctseverity run --scheduler`` on a real dask cluster (a scheduler and two workers on 127.0.0.1) that
loses a worker to SIGKILL in the middle of the batch: dask reschedules its study and every study gets
the results of a sequential run in this process. A scheduler that cannot be reached is one line."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from monai_ext.data.studies import write_studies
from pipelines.batch import run_batch
from pipelines.study import PipelineConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
#: phantom studies of the batch: a few seconds each on one thread with the tiny bundle
SHAPE, SPACING = (96, 96, 36), (4.0, 4.0, 8.0)
PERCENTS = [0, 10, 20, 30, 40, 50]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def _wait_for(what: str, check, timeout: float, procs: dict[str, subprocess.Popen], logs: Path):
    """Poll ``check()`` until it returns something true; fail naming ``what`` (with the logs) if a process
    exits first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        for name, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{_tails(logs)}")
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout:.0f} s:\n{_tails(logs)}")


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in sorted(logs.glob("*.log")))


def _start(name: str, cmd: list[str], logs: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in its own process group (so that a worker dies with its nanny), output to ``logs/<name>.log``."""
    with open(logs / f"{name}.log", "wb") as fh:
        return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def dask_cluster(tmp: Path, env: dict[str, str], n_workers: int = 2) -> Iterator[tuple[str, dict, Path]]:
    """``dask scheduler`` and ``n_workers`` ``dask worker`` processes (one thread each, no dashboard) on
    127.0.0.1 with free ports; yields the scheduler address, the processes by name and the log folder.
    Every process is killed on the way out, also when the test fails."""
    logs = tmp / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    try:
        sched_file = tmp / "scheduler.json"
        procs["scheduler"] = _start("scheduler", [BIN / "dask", "scheduler", "--host", HOST, "--port", "0",
                                                  "--no-dashboard", "--scheduler-file", sched_file], logs, env)
        address = _wait_for("scheduler file", lambda: sched_file.exists() and json.loads(
            sched_file.read_text() or "{}").get("address"), 60, procs, logs)
        assert address.startswith(f"tcp://{HOST}:")
        for i in range(n_workers):
            procs[f"w{i}"] = _start(f"w{i}", [BIN / "dask", "worker", address, "--host", HOST, "--nthreads", "1",
                                              "--nworkers", "1", "--no-dashboard", "--name", f"w{i}",
                                              "--local-directory", tmp / f"w{i}"], logs, env)
        yield address, procs, logs
    finally:
        for proc in procs.values():
            _kill(proc)


@pytest.mark.parametrize("pipeline", ["per-study", "staged"])
def test_batch_on_an_external_scheduler_survives_a_killed_worker(tiny_bundle_ungated, tmp_path, pipeline):
    """Either batch pipeline; with ``staged`` the killed worker may hold prepared studies (their volumes stay
    on the worker that read them), which dask recomputes, so only finished studies must not run again."""
    from distributed import Client

    inputs = tmp_path / "in"
    write_studies(inputs, PERCENTS, shape=SHAPE, spacing=SPACING, seed=40, progress=False)
    (inputs / "truth.csv").unlink()
    good = inputs / "synth_000_f00.nii.gz"
    (inputs / "broken.nii.gz").write_bytes(good.read_bytes()[:4000])  # fails alone, at once, never retried
    names = sorted(p.name.split(".")[0] for p in inputs.glob("*.nii.gz"))

    config = PipelineConfig(method="hirescam", bundle=str(tiny_bundle_ungated))
    local = run_batch(inputs, tmp_path / "local", config, progress=False, report=False)
    assert local.failed == ["broken"] and len(local.processed) == len(PERCENTS)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "cluster"
    with dask_cluster(tmp_path, env) as (address, procs, logs):
        with Client(address, timeout=60) as observer:
            observer.wait_for_workers(2, timeout=90)
            run = _start("run", [BIN / "ctseverity", "-q", "run", inputs, "--out", out, "--method", "hirescam",
                                 "--bundle", tiny_bundle_ungated, "--scheduler", address, "--pipeline", pipeline],
                         logs, env)
            try:
                _wait_for("two study results", lambda: len(list(out.glob("*/result.json"))) >= 2, 120,
                          {"run": run}, logs)
                seen: dict[str, float] = {}

                def busy_worker():  # a worker half a second into a study: (its name, the study's task key)
                    names_by_addr = {a: w["name"] for a, w in observer.scheduler_info()["workers"].items()}
                    running = observer.run(lambda dask_worker: [str(ts.key) for ts in dask_worker.state.executing])
                    now = time.monotonic()
                    for addr, keys in running.items():
                        for key in keys:
                            if now - seen.setdefault(key, now) > 0.5:
                                return names_by_addr[addr], key
                    return None

                victim, lost_key = _wait_for("busy worker", busy_worker, 60, {"run": run}, logs)
                os.killpg(procs[victim].pid, signal.SIGKILL)  # the worker and its nanny, no goodbye
                assert procs[victim].wait(timeout=30) == -signal.SIGKILL
                lost = [n for n in names if f"-{n}-" in lost_key or f"-{n}+" in lost_key or f"+{n}" in lost_key]
                assert lost and not any((out / n / "result.json").exists() for n in lost)  # not done
                rc = run.wait(timeout=120)
            finally:
                _kill(run)
            survivors = [w["name"] for w in observer.scheduler_info()["workers"].values()]
        log_text = (logs / "scheduler.log").read_text(errors="replace")
    assert rc == 1, _tails(logs)  # 1: the broken study failed, the others were graded
    assert survivors == [n for n in ("w0", "w1") if n != victim]
    assert f"name: {victim}" in log_text and "Remove worker" in log_text, log_text[-2000:]
    if pipeline == "per-study":  # a task is a whole study: nothing computed is lost with a worker
        assert "lose already computed" not in log_text, log_text[-2000:]

    rows, expected = _read_csv(out / "results.csv"), _read_csv(tmp_path / "local" / "results.csv")
    assert [r["study"] for r in rows] == names
    assert rows == expected  # grade, lesion %, volumes, lesion count, status and errors
    broken = next(r for r in rows if r["study"] == "broken")
    assert broken["status"] == "failed" and "truncated" in broken["error"]
    assert any(r["grade"] not in ("", "CT-0") for r in rows)  # lesion masks that are not empty to compare
    for study in names:
        if study == "broken":
            assert not (out / study / "result.json").exists()
            continue
        got = json.loads((out / study / "result.json").read_text())
        want = json.loads((tmp_path / "local" / study / "result.json").read_text())
        assert got["slices"] == want["slices"], study  # per-slice probabilities
        for name in ("lesion_mask", "lung_mask", "heatmap"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / study / f"{name}.nii.gz")))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local" / study / f"{name}.nii.gz")))
            np.testing.assert_array_equal(a, b, err_msg=f"{study} {name}")
        assert not list((out / study).glob(".*")), study  # no temporary file left by the killed worker


def test_a_scheduler_that_cannot_be_reached_is_one_line(tmp_path, capsys):
    import socket

    import dask

    from pipelines.cli import main

    with socket.socket() as sock:  # a port on 127.0.0.1 that nothing listens on
        sock.bind((HOST, 0))
        address = f"tcp://{HOST}:{sock.getsockname()[1]}"
    write_studies(tmp_path / "in", [0], shape=(32, 32, 12), spacing=(8.0, 8.0, 16.0), progress=False)
    (tmp_path / "in" / "truth.csv").unlink()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        rc = main(["-q", "run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--method", "density",
                   "--scheduler", address])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"ctseverity run: error: {address}: cannot reach the dask scheduler: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
