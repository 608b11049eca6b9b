"""The staged batch: each study's CPU work and its network work as separate tasks, a bounded number in flight.

:func:`~pipelines.batch.run_batch` with ``pipeline="staged"`` runs a study in three tasks instead of one:

1. **prepare** (CPU): read, lung mask, the classifier's slices (:func:`pipelines.study.prepare_study`);
2. **device** (the network's device): classifier and attribution (:func:`pipelines.study.infer_slices`)
   for the slices of *several* prepared studies in one task, gathered until they hold ``device_slices``
   slices or no other study is being prepared;
3. **finish** (CPU): maps back on the CT grid, lesion mask, severity, outputs and figures, ``result.json``
   last (:func:`pipelines.study.assemble_evidence`, :func:`pipelines.study.write_study`).

On dask.distributed the device tasks ask for the worker resource ``GPU`` (:data:`DEVICE_RESOURCE`) when a
worker of the cluster has it (``dask worker --resources GPU=1``; the local clusters that ``ctseverity run``
starts give it to every worker: one per GPU with dask-cuda, and on a CPU machine each CPU worker stands in),
and the CPU tasks prefer the workers without it. The graph is the same either way. Without a cluster
(``workers <= 1``) the same three functions run one after the other in this process.

Memory stays flat over any number of studies: at most ``max_in_flight`` studies are between the start
of their prepare task and the end of their finish task (:class:`InFlight` counts them); the next study
is only submitted when one has finished. A CT volume stays on the worker that prepared it; only its
slices travel to the device stage and only its maps come back.

What does not change with the pipeline: the outputs (bit for bit: each study's slices go through the
network in the batches of the per-study path, see below), ``results.csv``, resuming (complete studies
are skipped before any task), failure isolation (a study that raises in any stage fails alone with its
reason, ``error.txt`` with the traceback for unexpected errors; the other studies of its device task go
on) and the study time limit (one limit over the three stages, counted from the start of the prepare
task, queueing included). Tasks are retried by dask as in the per-study path
(:data:`~pipelines.batch.TASK_RETRIES`, ``allowed-failures`` for killed workers).

Why a device task does not merge the slices of its studies into shared network batches: a network's
output for a slice is the same function of that slice whatever batch it is in, but not bit for bit
(oneDNN and cuDNN choose their kernels, hence the rounding, by batch size: on the 2-core development
machine, the same slices split into batches of other sizes gave IBA maps differing by up to 3e-5 and
probabilities by up to 6e-8). The
device task therefore runs each study's slices in the per-study path's batches (``max(batch_size, 32)``
for the classifier, ``batch_size`` for the attribution), which keeps the outputs identical to the
per-study path; raise ``--batch-size`` for larger device batches.

Example:
    >>> from pipelines.batch import run_batch
    >>> from pipelines.study import PipelineConfig
    >>> run_batch(["studies/"], "out", PipelineConfig(method="iba"), workers=4, pipeline="staged")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipelines.discovery import Study
from pipelines.study import (
    Inferred,
    PipelineConfig,
    Prepared,
    assemble_evidence,
    check_time,
    infer_slices,
    prepare_study,
    resolve_calibration,
    study_time_limit,
    write_study,
)

__all__ = ["PIPELINES", "DEVICE_RESOURCE", "InFlight", "prepare_task", "device_task", "finish_task",
           "run_staged", "run_staged_dask", "default_max_in_flight"]

log = logging.getLogger(__name__)

#: the batch pipelines (``ctseverity run --pipeline``)
PIPELINES = ("per-study", "staged")
#: the dask worker resource the device tasks ask for
DEVICE_RESOURCE = "GPU"


def default_max_in_flight(workers: int) -> int:
    """Studies in flight by default: two per worker and two more (at least 4)."""
    return max(4, 2 * max(1, int(workers)) + 2)


class InFlight:
    """Counts the studies in flight (first stage started, last not finished) and refuses more than ``limit``.

    Attributes:
        limit: the most studies in flight.
        count: studies in flight now.
        peak: the most there ever were.
        entered: studies that entered so far.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the studies in flight must be at least 1, got {limit}")
        self.limit, self.count, self.peak, self.entered = int(limit), 0, 0, 0

    @property
    def full(self) -> bool:
        """Whether no other study may start now."""
        return self.count >= self.limit

    def enter(self) -> None:
        """A study starts.

        Raises:
            RuntimeError: the limit is reached.
        """
        if self.full:
            raise RuntimeError(f"more than {self.limit} studies in flight")
        self.count += 1
        self.entered += 1
        self.peak = max(self.peak, self.count)

    def leave(self) -> None:
        """A study has finished (or failed)."""
        self.count -= 1


# ------------------------------------------------------------------------------------------------ tasks
@contextlib.contextmanager
def _limit(timeout: float | None, started: float) -> Iterator[None]:
    with study_time_limit(timeout, started=started):
        yield


def _cpu_config(config: PipelineConfig) -> PipelineConfig:
    """The settings the CPU stages load the model with (its calibration, slice geometry, method defaults)."""
    return replace(config, device="cpu")


def prepare_task(study: Study, out_dir: str, config: PipelineConfig, threads: int | None = None,
                 timeout: float | None = None, clear: bool = True) -> tuple[Prepared | None, torch.Tensor | None, dict]:
    """CPU stage 1 of a study: ``(prepared, slices, info)``.

    ``info`` is small: ``started`` (``time.time()`` of the start), ``seconds`` spent, ``n_slices``; for a study
    that failed, ``row`` (its failure row) and ``None`` for the other two. The slices leave ``prepared``
    (its ``stack.images`` is emptied) so that only they travel to the device stage. With ``clear`` the
    study folder is first marked incomplete; on a cluster the driver does that when it submits the study
    instead, because dask reruns a prepare task whose slices died with a worker while a device task of
    several studies still needs them, also for a study that has finished meanwhile: the rerun must leave
    that study's ``result.json`` alone.
    """
    from pipelines import batch

    batch._set_threads(threads)
    if clear:
        batch._clear_study_dir(Path(out_dir) / study.study)
    started, t0 = time.time(), time.perf_counter()
    try:
        model = batch._get_model(_cpu_config(config))
        cal = resolve_calibration(config, model)
        (Path(out_dir) / study.study).mkdir(parents=True, exist_ok=True)
        with _limit(timeout, started):
            prepared = prepare_study(study, config, None if model is None else model.slice_kwargs,
                                     cal["density_delta_hu"])
    except Exception as exc:  # noqa: BLE001 - a study must not stop the batch
        return None, None, {"row": batch.study_failure(study, out_dir, config, time.perf_counter() - t0, exc)}
    images = None
    if prepared.stack is not None:
        images = prepared.stack.images
        prepared.stack = replace(prepared.stack, images=torch.zeros((images.shape[0], 0)))  # its length only
    return prepared, images, {"started": started, "seconds": time.perf_counter() - t0,
                              "n_slices": 0 if images is None else int(images.shape[0])}


def device_task(studies: Sequence[Study], images: Sequence[torch.Tensor], started: Sequence[float],
                spent: Sequence[float], out_dir: str, config: PipelineConfig, threads: int | None = None,
                timeout: float | None = None) -> list[Inferred | dict]:
    """Device stage of several studies: per study its :class:`~pipelines.study.Inferred`, or its failure row.

    Each study's slices go through the network as in the per-study path (same batches, same seed), so
    its maps do not depend on the other studies of the task.
    """
    from pipelines import batch

    batch._set_threads(threads)
    out: list[Inferred | dict] = []
    model = cal = None
    for study, imgs, t_start, before in zip(studies, images, started, spent):
        t0 = time.perf_counter()
        try:
            if model is None:
                model = batch._get_model(config)
                cal = resolve_calibration(config, model)
            with _limit(timeout, t_start):
                check_time("slice classification")
                out.append(infer_slices(imgs, config, model, cal["slice_gate"], cal["study_call"]))
        except Exception as exc:  # noqa: BLE001 - one study's failure must not fail the others of the task
            out.append(batch.study_failure(study, out_dir, config, before + time.perf_counter() - t0, exc))
    return out


def finish_task(study: Study, out_dir: str, config: PipelineConfig, prepared: Prepared,
                inferred: Inferred | dict | None, started: float, spent: float, threads: int | None = None,
                timeout: float | None = None) -> dict[str, object]:
    """CPU stage 2 of a study: evidence, lesion mask, severity, outputs; its ``results.csv`` row.

    ``inferred`` is ``None`` for ``method="density"`` and a failure row when the device stage failed.
    """
    from pipelines import batch

    if isinstance(inferred, dict):
        return inferred
    batch._set_threads(threads)
    for tmp in (Path(out_dir) / study.study).glob(".*"):  # left by a finish task whose worker died mid-write
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    if isinstance(inferred, Inferred):
        spent += sum(inferred.timings.values())
    try:
        model = batch._get_model(_cpu_config(config))
        cal = resolve_calibration(config, model)
        with _limit(timeout, started):
            evidence = assemble_evidence(prepared, inferred)
            result = write_study(study, out_dir, config, model, cal, evidence, spent)
    except Exception as exc:  # noqa: BLE001 - a study must not stop the batch
        return batch.study_failure(study, out_dir, config, spent + time.perf_counter() - t0, exc)
    return batch._row_from_result(result)


# ------------------------------------------------------------------------------------------------ in process
def run_staged(todo: Sequence[Study], out_dir: Path, config: PipelineConfig, on_row: Callable[[dict], None],
               timeout: float | None = None, max_in_flight: int = 4, device_slices: int | None = None,
               window: InFlight | None = None) -> list[dict[str, object]]:
    """The staged pipeline in this process: prepare studies until their slices fill a device task (or
    ``max_in_flight`` are prepared), run it, finish them; repeat. Returns the rows (``on_row`` gets each)."""
    window = window or InFlight(max_in_flight)
    target = device_slices or 4 * config.batch_size
    pending = deque(todo)
    rows: list[dict[str, object]] = []

    def done(row: dict) -> None:
        window.leave()
        rows.append(row)
        on_row(row)

    while pending:
        group: list[tuple[Study, Prepared, torch.Tensor, dict]] = []
        while pending and not window.full and sum(g[3]["n_slices"] for g in group) < target:
            study = pending.popleft()
            window.enter()
            prepared, images, info = prepare_task(study, str(out_dir), config, timeout=timeout)
            if "row" in info:
                done(info["row"])
            elif images is None:  # density: no device stage
                done(finish_task(study, str(out_dir), config, prepared, None, info["started"], info["seconds"],
                                 timeout=timeout))
            else:
                group.append((study, prepared, images, info))
        if not group:
            continue
        inferred = device_task([g[0] for g in group], [g[2] for g in group], [g[3]["started"] for g in group],
                               [g[3]["seconds"] for g in group], str(out_dir), config, timeout=timeout)
        for (study, prepared, _images, info), inf in zip(group, inferred):
            done(finish_task(study, str(out_dir), config, prepared, inf, info["started"], info["seconds"],
                             timeout=timeout))
    return rows


# ------------------------------------------------------------------------------------------------ dask
@dataclass
class _Study:
    study: Study
    prepared: object = None  # future of the Prepared
    images: object = None  # future of the slices
    started: float = 0.0
    seconds: float = 0.0
    n_slices: int = 0


def _placement(client) -> tuple[dict, dict]:
    """Submit options of the device tasks (the ``GPU`` resource where a worker has it) and of the CPU tasks
    (the workers without it, where there are such workers)."""
    workers = client.scheduler_info().get("workers", {})
    gpu = [a for a, w in workers.items() if (w.get("resources") or {}).get(DEVICE_RESOURCE)]
    cpu = [a for a in workers if a not in gpu]
    device_kw = {"resources": {DEVICE_RESOURCE: 1}} if gpu else {}
    cpu_kw = {"workers": cpu, "allow_other_workers": True} if gpu and cpu else {}
    log.debug("staged batch: %d device workers, %d CPU workers", len(gpu), len(cpu))
    return device_kw, cpu_kw


def run_staged_dask(client, todo: Sequence[Study], out_dir: Path, config: PipelineConfig,
                    on_row: Callable[[dict], None], threads: int | None = None, timeout: float | None = None,
                    max_in_flight: int = 4, device_slices: int | None = None, window: InFlight | None = None,
                    retries: int = 2) -> list[dict[str, object]]:
    """The staged pipeline on a dask cluster (see the module notes); returns the rows (``on_row`` gets each)."""
    from distributed import as_completed

    from pipelines import batch
    from pipelines.batch import _failure_row, _one_line

    window = window or InFlight(max_in_flight)
    target = device_slices or 4 * config.batch_size
    device_kw, cpu_kw = _placement(client)
    out = str(out_dir)
    pending = deque(todo)
    ready: list[_Study] = []
    tags: dict = {}  # future -> ("info" | "finish", _Study)
    preparing = 0
    rows: list[dict[str, object]] = []
    ac = as_completed()

    def key(kind: str, name: str) -> str:
        return f"ctseverity-{kind}-{name}-{time.time_ns()}"

    def submit(fn, *args, kind: str, name: str, priority: int, **kw):
        return client.submit(fn, *args, key=key(kind, name), pure=False, priority=priority, **kw)

    def done(st: _Study, row: dict) -> None:
        st.prepared = st.images = None  # the driver's references: the cluster may forget the study's data
        window.leave()
        rows.append(row)
        on_row(row)

    def failed(st: _Study, exc: BaseException) -> dict:  # KilledWorker (past allowed-failures), retries spent
        return _failure_row(st.study, config, 0.0, _one_line(f"{type(exc).__name__}: {exc}"))

    def finish(st: _Study, inferred) -> None:
        fut = submit(finish_task, st.study, out, config, st.prepared, inferred, st.started, st.seconds, threads,
                     timeout, kind="finish", name=st.study.study, priority=3, retries=retries, **cpu_kw)
        tags[fut] = ("finish", st)
        ac.add(fut)

    def flush() -> None:
        nonlocal ready
        group, ready = ready, []
        names = "+".join(g.study.study for g in group)[:80]
        dev = submit(device_task, [g.study for g in group], [g.images for g in group], [g.started for g in group],
                     [g.seconds for g in group], out, config, threads, timeout, kind="device", name=names,
                     priority=2, retries=retries, **device_kw)
        for i, st in enumerate(group):
            st.images = None
            finish(st, submit(operator.getitem, dev, i, kind="inferred", name=st.study.study, priority=3))

    while pending or window.count:
        while pending and not window.full:
            st = _Study(pending.popleft())
            window.enter()
            batch._clear_study_dir(Path(out) / st.study.study)  # here, not in a task dask may run again
            prep = submit(prepare_task, st.study, out, config, threads, timeout, False, kind="prepare",
                          name=st.study.study, priority=1, retries=retries, **cpu_kw)
            st.prepared = submit(operator.getitem, prep, 0, kind="prepared", name=st.study.study, priority=1)
            st.images = submit(operator.getitem, prep, 1, kind="slices", name=st.study.study, priority=1)
            info = submit(operator.getitem, prep, 2, kind="info", name=st.study.study, priority=1)
            del prep
            tags[info] = ("info", st)
            ac.add(info)
            preparing += 1
        if ready and (sum(g.n_slices for g in ready) >= target or preparing == 0):
            flush()
        fut = next(ac)
        kind, st = tags.pop(fut)
        try:
            result = fut.result()
        except Exception as exc:  # noqa: BLE001 - recorded as the study's failure
            result = {"row": failed(st, exc)} if kind == "info" else failed(st, exc)
        fut.release()  # a row held on a worker that dies later would make dask run its study again
        if kind == "finish":
            done(st, result)
            continue
        preparing -= 1
        if "row" in result:
            done(st, result["row"])
        elif config.method == "density":
            st.images = None
            finish(st, None)
        else:
            st.started, st.seconds, st.n_slices = result["started"], result["seconds"], result["n_slices"]
            ready.append(st)
        if ready and (sum(g.n_slices for g in ready) >= target or preparing == 0):
            flush()
    return rows
