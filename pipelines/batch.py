"""Running the per-study pipeline over many studies: in-process, on a dask cluster, or one worker per GPU.

:func:`run_batch` finds the studies, skips those already complete with the same settings (so a
killed run resumes where it stopped), runs :func:`~pipelines.study.process_study` on the rest,
records failing studies with their reason while the others go on, and writes ``results.csv``
and ``report.html`` into the output folder.

Where the studies run:

- ``workers <= 1`` and no scheduler: sequentially in this process (no dask overhead);
- ``scheduler="tcp://host:8786"``: on an existing dask cluster (its workers need ct-severity
  installed and must see the input and output paths);
- ``workers > 1``: a ``distributed.LocalCluster`` of ``workers`` single-threaded processes, each
  with ``cores / workers`` torch threads;
- ``workers > 1`` with a ``cuda`` device on a machine with GPUs: dask-cuda's ``LocalCUDACluster``,
  one worker per GPU (the ``gpu`` extra: ``pip install 'ct-severity[gpu]'``).

Each worker process loads the model once (a cache keyed by bundle, checksum and device) and
reuses it for every study it gets.

``pipeline="staged"`` runs each study as three tasks instead of one (CPU stages before and after a device
stage that takes several studies at once, a bounded number of studies in flight): :mod:`pipelines.stages`.
The outputs, resume and failure isolation are the same.

Lost workers: each study is one dask task. When a worker dies (killed, out of memory, its node
gone), the scheduler reschedules the studies it was running on the other workers, up to
``distributed.scheduler.allowed-failures`` times per study (dask's default 3; set on the
scheduler); a study that kills every worker it lands on is then recorded as failed (``KilledWorker``)
and the batch goes on. A task that raises past :func:`run_study`'s own error handling (a worker that
cannot import ct-severity or read the shared folders) is re-run up to :data:`TASK_RETRIES` times,
possibly on another worker, then recorded as failed. A study whose input or pipeline raises is not
retried: :func:`run_study` records it as failed at once. A rerun study starts from a cleared folder
(outputs are written atomically), so a worker killed while writing leaves nothing that looks complete.
Each study's row is released on the cluster once received, so a worker lost later does not make dask
run finished studies again.

Example:
    >>> from pipelines.batch import run_batch
    >>> from pipelines.study import PipelineConfig
    >>> summary = run_batch(["studies/"], "out", PipelineConfig(method="hirescam"), workers=2)  # doctest: +SKIP
    >>> summary.n_ok, summary.n_failed, summary.results_csv  # doctest: +SKIP
    (5, 0, PosixPath('out/results.csv'))
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError
from monai_ext.io import atomic_write_text, is_disk_full
from pipelines.bundle import LoadedModel, bundle_path, load_model
from pipelines.discovery import Study, find_studies
from pipelines.stages import PIPELINES, InFlight, default_max_in_flight, run_staged, run_staged_dask
from pipelines.study import PipelineConfig, is_complete, process_study, study_time_limit

__all__ = [
    "RESULT_COLUMNS",
    "BatchSummary",
    "run_batch",
    "run_study",
    "collect_rows",
    "write_results_csv",
    "model_checksum",
    "inference_bundle",
    "TASK_RETRIES",
    "study_failure",
    "PIPELINES",
]

log = logging.getLogger(__name__)

#: columns of ``results.csv``, in order
RESULT_COLUMNS: tuple[str, ...] = (
    "study",
    "input",
    "status",
    "lesion_percent",
    "grade",
    "lung_volume_ml",
    "lesion_volume_ml",
    "n_lesions",
    "method",
    "seconds",
    "error",
    "warnings",
)

#: times dask re-runs a study task that raised past :func:`run_study`'s error handling (see the module notes)
TASK_RETRIES = 2

# worker-process state: models by (bundle, checksum, device), and whether torch threads were set
_MODELS: dict[tuple[str, str, str], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
_THREADS_SET: list[int] = []


@dataclass
class BatchSummary:
    """What a batch did.

    Attributes:
        out_dir: the output folder.
        rows: the rows of ``results.csv`` (every study folder of ``out_dir`` plus this run's failures).
        processed: studies run now that finished.
        failed: studies run now that failed.
        skipped: studies already complete with the same settings, not run again.
        results_csv: path of ``results.csv``.
        report: path of ``report.html`` (``None`` when not written).
        fingerprint: settings fingerprint of the run (see :meth:`PipelineConfig.fingerprint`).
        seconds: wall time of the batch.
        pipeline: ``per-study`` or ``staged``.
        peak_in_flight: ``staged``: the most studies in flight at once (:class:`pipelines.stages.InFlight`).
    """

    out_dir: Path
    rows: list[dict[str, object]]
    processed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results_csv: Path | None = None
    report: Path | None = None
    fingerprint: str = ""
    seconds: float = 0.0
    pipeline: str = "per-study"
    peak_in_flight: int = 0

    @property
    def n_ok(self) -> int:
        """Studies of this run that finished now."""
        return len(self.processed)

    @property
    def n_failed(self) -> int:
        """Studies of this run that failed."""
        return len(self.failed)

    @property
    def n_skipped(self) -> int:
        """Studies of this run that were already complete."""
        return len(self.skipped)

    @property
    def ok(self) -> bool:
        """Whether no study failed."""
        return not self.failed


def model_checksum(bundle: str | os.PathLike | None) -> str:
    """The SHA-256 recorded for a bundle's model (cheap: reads ``models/model.json`` only).

    Raises:
        InputNotFoundError: no trained bundle there.
    """
    info = json.loads((bundle_path(bundle) / "models" / "model.json").read_text())
    return str(info.get("sha256", ""))


def run_key(bundle: str | os.PathLike | None) -> str:
    """What of a bundle enters a run's fingerprint (:func:`pipelines.bundle.run_key`; reads ``model.json``
    only)."""
    from pipelines.bundle import run_key as _run_key

    return _run_key(json.loads((bundle_path(bundle) / "models" / "model.json").read_text()))


def inference_bundle(bundle_root: str | os.PathLike | None) -> str | None:
    """The bundle a MONAI ``inference.json`` run uses: ``bundle_root`` when it holds a trained model.

    ``"."`` (the config's default, i.e. the current folder) that is not a trained bundle means the
    default bundle (``$CTSEVERITY_BUNDLE`` or the embedded one), as ``ctseverity run`` without
    ``--bundle``; any other ``bundle_root`` must be a trained bundle.

    Raises:
        InputNotFoundError: ``bundle_root`` is given but holds no trained model.
    """
    if bundle_root is None:
        return None
    root = Path(bundle_root)
    if (root / "models" / "model.json").exists():
        return str(root.resolve())
    if str(bundle_root) in (".", ""):
        return None
    return str(bundle_path(root))  # raises with the reason


def _get_model(config: PipelineConfig) -> LoadedModel | None:
    """The model for ``config`` from this process's cache, loaded on first use."""
    if config.method == "density":
        return None
    key = (str(bundle_path(config.bundle).resolve()), run_key(config.bundle), str(config.device))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            log.debug("loading model %s on %s (pid %d)", key[0], key[2], os.getpid())
            model = load_model(config.bundle, device=config.device, trust=config.trust_bundle)
            _MODELS[key] = model
    return model


def _set_threads(threads: int | None) -> None:
    if threads is None or _THREADS_SET == [threads]:
        return
    import torch

    torch.set_num_threads(max(1, int(threads)))
    _THREADS_SET[:] = [threads]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _clear_study_dir(sdir: Path) -> None:
    """Mark a study folder incomplete before (re)running it: no result.json, no stale error or temp files."""
    if not sdir.is_dir():
        return
    for name in ("result.json", "error.txt"):
        (sdir / name).unlink(missing_ok=True)
    for tmp in sdir.glob(".*"):  # temporary files of interrupted atomic writes
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _row_from_result(res: dict) -> dict[str, object]:
    return {
        "study": res.get("study", ""),
        "input": res.get("input", ""),
        "status": res.get("status", "ok"),
        "lesion_percent": res.get("lesion_percent", ""),
        "grade": res.get("grade", ""),
        "lung_volume_ml": res.get("lung_volume_ml", ""),
        "lesion_volume_ml": res.get("lesion_volume_ml", ""),
        "n_lesions": res.get("n_lesions", ""),
        "method": res.get("method", ""),
        "seconds": res.get("timings_s", {}).get("total", ""),
        "error": "",
        "warnings": "; ".join(res.get("warnings", [])),
        **{f"patient_{k}": v for k, v in (res.get("patient") or {}).items()},  # only with --keep-identifiers
    }


def _failure_row(study: Study, config: PipelineConfig, seconds: float, error: str) -> dict[str, object]:
    row: dict[str, object] = {c: "" for c in RESULT_COLUMNS}
    row.update(study=study.study, input=str(study.path), status="failed", method=config.method,
               seconds=round(seconds, 3), error=error)
    return row


def run_study(study: Study, out_dir: str | os.PathLike, config: PipelineConfig, threads: int | None = None,
              timeout: float | None = None) -> dict[str, object]:
    """Run one study and return its ``results.csv`` row; never raises for a failing study.

    This is the task each dask worker runs. The model comes from the worker's cache (loaded once
    per process). A :class:`~monai_ext.errors.CTSeverityError` (unreadable or unsuitable input) is
    recorded with its reason; any other exception with its type name, and its traceback is written
    to ``out_dir/<study>/error.txt``.

    Args:
        study: the study.
        out_dir: batch output folder.
        config: run settings.
        threads: torch threads for this process (``None``: leave as is).
        timeout: time limit of the study in seconds (:func:`~pipelines.study.study_time_limit`); a study
            past it is recorded as failed with the reason.

    Returns:
        A row with the columns :data:`RESULT_COLUMNS`; ``status`` is ``ok`` or ``failed``.
    """
    _set_threads(threads)
    sdir = Path(out_dir) / study.study
    _clear_study_dir(sdir)
    t0 = time.perf_counter()
    try:
        model = _get_model(config)
        with study_time_limit(timeout):
            result = process_study(study, out_dir, config, model)
    except Exception as exc:  # noqa: BLE001 - a study must not stop the batch
        return study_failure(study, out_dir, config, time.perf_counter() - t0, exc)
    return _row_from_result(result)


def study_failure(study: Study, out_dir: str | os.PathLike, config: PipelineConfig, seconds: float,
                  exc: Exception) -> dict[str, object]:
    """The ``results.csv`` row of a study that raised ``exc``; call it in the ``except`` block.

    A :class:`~monai_ext.errors.CTSeverityError` is recorded with its reason; no room to write removes the
    study's folder (nothing of it looks complete); any other exception is recorded with its type name and
    its traceback written to ``out_dir/<study>/error.txt``.
    """
    sdir = Path(out_dir) / study.study
    if isinstance(exc, CTSeverityError):
        return _failure_row(study, config, seconds, _one_line(exc.reason))
    if is_disk_full(exc):  # no room for the outputs: none are kept, so none looks complete
        shutil.rmtree(sdir, ignore_errors=True)
        reason = (f"no room to write the outputs ({getattr(exc, 'strerror', None) or exc}: the disk is full or a "
                  "file size limit or quota was reached); nothing of the study was kept")
        log.error("%s: %s", study.study, reason)
        return _failure_row(study, config, seconds, reason)
    sdir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # the traceback is a help, not a result
        atomic_write_text(sdir / "error.txt", f"study: {study.study}\ninput: {study.path}\n\n"
                          + traceback.format_exc())
    reason = _one_line(f"{type(exc).__name__}: {exc}")
    log.debug("%s failed: %s", study.study, reason)
    return _failure_row(study, config, seconds, reason)


def collect_rows(out_dir: str | os.PathLike, failures: Sequence[dict[str, object]] = ()) -> list[dict[str, object]]:
    """``results.csv`` rows: every study folder of ``out_dir`` with a ``result.json``, plus ``failures``.

    A failure replaces the row of its study; rows are sorted by study.
    """
    rows: dict[str, dict[str, object]] = {}
    out = Path(out_dir)
    if out.is_dir():
        for res_path in sorted(out.glob("*/result.json")):
            try:
                res = json.loads(res_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if res.get("status") != "ok":
                continue
            row = _row_from_result(res)
            rows[str(row["study"] or res_path.parent.name)] = row
    for f in failures:
        rows[str(f["study"])] = dict(f)
    return [rows[k] for k in sorted(rows)]


def write_results_csv(out_dir: str | os.PathLike, rows: Sequence[dict[str, object]]) -> Path:
    """Write ``out_dir/results.csv`` (columns :data:`RESULT_COLUMNS`, and the patient columns where a row has
    them: ``--keep-identifiers``) atomically."""
    from pipelines.dicom.privacy import PATIENT_COLUMNS

    columns = [*RESULT_COLUMNS, *(c for c in PATIENT_COLUMNS if any(c in r for r in rows))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(Path(out_dir) / "results.csv", buf.getvalue())


def _gpu_count(device: str) -> int:
    if not str(device).startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _start_client(workers: int, scheduler: str | None, device: str, n_tasks: int, staged: bool = False):
    """A dask client (and the cluster it owns, if any), torch threads per worker, and the worker device.

    ``staged``: the workers of a cluster started here hold the device resource
    (:data:`pipelines.stages.DEVICE_RESOURCE`) that the staged pipeline's device tasks ask for.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        log.info("connecting to the dask scheduler at %s", scheduler)
        try:
            return Client(scheduler), None, None, device
        except OSError as exc:  # nothing listening there, or too slow to answer (TimeoutError is an OSError)
            raise CTSeverityError(f"cannot reach the dask scheduler: {_one_line(exc)}", scheduler) from None
    n_gpu = _gpu_count(device)
    n = max(1, min(workers, n_tasks))
    extra = {"resources": {"GPU": 1}} if staged else {}
    if not log.isEnabledFor(logging.DEBUG):  # the cluster we start is an implementation detail: no INFO chatter
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if n_gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise CTSeverityError("GPU workers need dask-cuda, which is not installed; install the gpu extra "
                                  "(pip install 'ct-severity[gpu]') or run with --workers 1") from None
        n = min(n, n_gpu)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info("starting a LocalCUDACluster with %d GPU workers", n)
        cluster = LocalCUDACluster(n_workers=n, threads_per_worker=1, dashboard_address=None,
                                   silence_logs=logging.ERROR, CUDA_VISIBLE_DEVICES=visible, **extra)
        # each worker sees its own GPU first
        return Client(cluster), cluster, max(1, (os.cpu_count() or 1) // n), "cuda"
    log.info("starting a dask LocalCluster with %d worker processes", n)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, **extra)
    return Client(cluster), cluster, max(1, (os.cpu_count() or 1) // n), device


def _on_row(bar: tqdm, rows: list[dict[str, object]]):
    """Progress for each row received: one study more, and the failures so far."""
    failures = [0]

    def update(row: dict[str, object]) -> None:
        bar.update(1)
        if row["status"] != "ok":
            failures[0] += 1
            bar.set_postfix(failed=failures[0])

    return update


def _run_dask(todo: Sequence[Study], out_dir: Path, config: PipelineConfig, workers: int, scheduler: str | None,
              bar: tqdm, timeout: float | None = None, staged: InFlight | None = None) -> list[dict[str, object]]:
    from distributed import as_completed

    client, cluster, threads, device = _start_client(workers, scheduler, config.device, len(todo),
                                                     staged=staged is not None)
    task_config = replace(config, device=device)
    rows: list[dict[str, object]] = []
    try:
        if staged is not None:
            return run_staged_dask(client, todo, out_dir, task_config, _on_row(bar, rows), threads, timeout,
                                   window=staged, retries=TASK_RETRIES)
        futures = {client.submit(run_study, st, str(out_dir), task_config, threads, timeout, pure=False,
                                 retries=TASK_RETRIES, key=f"ctseverity-{st.study}-{time.time_ns()}"): st
                   for st in todo}
        for fut in as_completed(futures):
            st = futures.pop(fut)
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker (past allowed-failures), retries spent
                row = _failure_row(st, config, 0.0, _one_line(f"{type(exc).__name__}: {exc}"))
            fut.release()  # a row held on a worker that dies later would make dask run its study again
            rows.append(row)
            bar.update(1)
            if row["status"] != "ok":
                bar.set_postfix(failed=sum(r["status"] != "ok" for r in rows))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return rows


def run_batch(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              config: PipelineConfig, workers: int = 1, scheduler: str | None = None,
              truth: str | os.PathLike | None = None, progress: bool = True, report: bool = True,
              study_timeout: float | None = None, pipeline: str = "per-study",
              max_in_flight: int | None = None) -> BatchSummary:
    """Run the severity pipeline on every study of ``inputs`` and write ``results.csv`` and ``report.html``.

    Studies whose folder in ``out_dir`` holds a complete result of the same settings, model and
    input are skipped; the others are (re)run. A failing study is recorded in ``results.csv``
    with status ``failed`` and its reason, and the batch goes on.

    Args:
        inputs: study files, DICOM series folders, folders of studies or CSV manifests.
        out_dir: output folder; per study ``out_dir/<study>/``, per batch ``results.csv`` and ``report.html``.
        config: run settings.
        workers: worker processes; ``<= 1`` runs in this process, sequentially.
        scheduler: address of an existing dask scheduler to run on instead.
        truth: CSV with ``study`` and ``lesion_percent`` and/or ``grade``, for the report's agreement figures.
        progress: show a progress bar over the studies.
        report: write ``report.html``.
        study_timeout: time limit of each study in seconds (``None``: none); a study past it is
            recorded as failed with the reason and the batch goes on.
        pipeline: ``per-study`` (one task per study, reading to writing) or ``staged`` (CPU and device
            stages as separate tasks, a device task takes the slices of several studies:
            :mod:`pipelines.stages`); the outputs are the same.
        max_in_flight: ``staged``: the most studies between their first and last stage at once (memory stays
            flat over any number of studies; default :func:`~pipelines.stages.default_max_in_flight`).

    Returns:
        A :class:`BatchSummary`.

    Raises:
        InputNotFoundError, CTSeverityError: an input or the bundle is missing, no study was found,
            a bad truth file, dask-cuda missing for GPU workers, a scheduler that cannot be reached.
        ValueError: bad settings.
    """
    t_start = time.perf_counter()
    config = replace(config).validate()
    if study_timeout is not None and not study_timeout > 0:
        raise ValueError(f"the study time limit must be positive, got {study_timeout}")
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    window = InFlight(max_in_flight or default_max_in_flight(workers)) if pipeline == "staged" else None
    if config.method == "density":
        checksum = ""
        config.bundle = None  # the attenuation baseline uses no model
    else:
        config.bundle = str(bundle_path(config.bundle).resolve())
        checksum = run_key(config.bundle)
    truth_table = None
    if truth is not None:
        from pipelines.report import read_truth

        truth_table = read_truth(truth)  # a bad truth file fails before any work
    studies = find_studies([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CTSeverityError("exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = config.fingerprint(checksum)

    todo: list[Study] = []
    skipped: list[str] = []
    for st in studies:
        if _complete_for(out / st.study, fingerprint, st):
            skipped.append(st.study)
        else:
            todo.append(st)
    log.info("%d studies: %d to run, %d already complete", len(studies), len(todo), len(skipped))

    rows: list[dict[str, object]] = []
    bar = tqdm(total=len(todo), desc=f"studies ({config.method})", unit="study", disable=not progress or not todo)
    try:
        if todo and workers <= 1 and not scheduler and window is not None:
            rows = run_staged(todo, out, config, _on_row(bar, rows), study_timeout, window=window)
        elif todo and workers <= 1 and not scheduler:
            for st in todo:
                bar.set_postfix_str(st.study)
                rows.append(run_study(st, out, config, timeout=study_timeout))
                bar.update(1)
        elif todo:
            rows = _run_dask(todo, out, config, workers, scheduler, bar, study_timeout, staged=window)
    finally:
        bar.close()
        failures = [r for r in rows if r["status"] != "ok"]
        all_rows = collect_rows(out, failures)
        csv_path = write_results_csv(out, all_rows)  # also when interrupted: what is done is listed
    summary = BatchSummary(
        out_dir=out,
        rows=all_rows,
        processed=sorted(str(r["study"]) for r in rows if r["status"] == "ok"),
        failed=sorted(str(r["study"]) for r in failures),
        skipped=sorted(skipped),
        results_csv=csv_path,
        fingerprint=fingerprint,
        pipeline=pipeline,
        peak_in_flight=window.peak if window is not None else 0,
    )
    if report:
        from pipelines.report import write_report

        summary.report = write_report(out, all_rows, truth=truth_table)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _complete_for(sdir: Path, fingerprint: str, study: Study) -> bool:
    """Complete with the same settings and of the same input."""
    if not is_complete(sdir, fingerprint):
        return False
    try:
        res = json.loads((sdir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return os.path.realpath(str(res.get("input", ""))) == os.path.realpath(str(study.path))
