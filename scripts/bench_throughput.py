"""Benchmark: batch throughput on MosMed-sized studies, per method (studies per hour, seconds per stage,
CPU and device utilisation, peak memory).

The studies are semi-synthetic and shaped like MosMedData's (512 x 512 x ~45 at 8 mm): a real chest CT
(default: LIDC-IDRI-0003 of the shared data, 512 x 512 x 140 at 2.5 mm) with lesions inserted at the
given loads (:func:`monai_ext.data.variants.render_variant`), then resampled to 8 mm slices (a box
average over 8 mm, :class:`~monai_ext.data.scanner.ScannerStyle` with ``thickness_mm=8``) and written
as gzipped NIfTI into a work folder outside the repository (kept and reused by later runs with the same
settings).

With ``--phantoms`` the studies are small synthetic phantoms instead (64 x 64 x 24 at 6 x 6 x 12 mm,
:func:`monai_ext.data.studies.write_studies`), for measuring the batch machinery over many studies (memory
from 20 to 200 studies).

Each method runs in its own subprocess (a fresh interpreter, as a batch would), once per ``--pipeline``
(``per-study``, ``staged`` or both, side by side: :mod:`pipelines.stages`): ``run_batch`` (what
``ctseverity run`` does: results.csv and report.html included) over the N studies, in that process
(``--workers 1``) or on a local dask cluster (``--workers N``). Measured over the batch, imports
excluded, model loading included:

- ``studies/h``: N / batch wall time;
- seconds per stage: the mean of the studies' ``result.json`` ``timings_s``;
- ``CPU %``: CPU time of the batch's process tree / (wall time x logical CPUs); ``machine CPU %``: the
  whole machine's CPU use over the batch (other jobs included);
- ``peak RSS``: the largest resident memory of the process tree (sampled every 0.2 s); the JSON records also
  hold it before ``report.html`` is written (``peak_rss_before_report_mb``: the report embeds every study's
  thumbnail, so it grows with the number of studies);
- ``device %`` and ``device MB``: mean GPU utilisation and peak GPU memory from NVML (``pynvml``) on a
  cuda device, else ``n/a``.

Usage::

    python scripts/bench_throughput.py [--n 4] [--methods hirescam,iba] [--workers 1] [--device auto]
                                       [--pipeline per-study,staged] [--phantoms]
                                       [--base CT] [--loads 0,10,20,35] [--work DIR] [--json FILE]

Example:
    >>> from scripts.bench_throughput import main
    >>> main(["--n", "2", "--methods", "hirescam"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "make_studies", "make_phantoms", "Sampler", "run_method", "default_base", "STAGES"]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: per-study stages of ``result.json`` ``timings_s``, in pipeline order
STAGES = ("load", "lung_mask", "slices", "classify", "attribution", "normalize", "lesion_mask", "severity", "write",
          "overview")
METHODS = ("hirescam", "gradcam", "iba", "igospp", "lrp", "density")


def default_base() -> Path:
    """LIDC-IDRI-0003 (512 x 512 x 140 at 2.5 mm: 44 slices at 8 mm) in ``$CTSEVERITY_SHARED_DATA`` or
    ``../shared/data``."""
    shared = Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return shared / "lidc_idri" / "LIDC-IDRI-0003_ct.nii.gz"


def make_studies(work: Path, base: Path, n: int, loads: Sequence[float], thickness_mm: float = 8.0,
                 seed: int = 2026) -> Path:
    """Write ``n`` semi-synthetic studies from ``base`` at ``thickness_mm`` into a folder of ``work``
    (reused when it already holds them); study ``i`` has ``loads[i % len(loads)]`` percent of its lung in
    lesions. Returns the folder."""
    import numpy as np

    from monai_ext.data.scanner import ScannerStyle
    from monai_ext.data.variants import load_clean_ct, render_variant, save_variant

    key = json.dumps({"base": str(Path(base).resolve()), "n": n, "loads": list(loads), "mm": thickness_mm,
                      "seed": seed}, sort_keys=True)
    folder = work / f"studies_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    done = folder / "settings.json"
    if done.exists() and done.read_text() == key:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "masks").mkdir(parents=True)
    clean = load_clean_ct(base)
    style = ScannerStyle(f50=0.9, noise_hu=0.0, thickness_mm=thickness_mm)  # the CT's own kernel, thick slices
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        variant = render_variant(clean, rng, fraction=float(loads[i % len(loads)]) / 100.0, kind="mixed", style=style)
        paths = save_variant(variant, folder / "masks", f"mosmedlike_{i:03d}", compress=True)
        paths["image"].rename(folder / paths["image"].name)  # the masks stay out of the batch's input folder
        print(f"  study {i + 1}/{n}: {variant.image.shape}, {variant.lesion_percent:.1f} % lesion", file=sys.stderr,
              flush=True)
    done.write_text(key)
    return folder


def make_phantoms(work: Path, n: int, loads: Sequence[float], seed: int = 2026) -> Path:
    """Write ``n`` small phantom studies (64 x 64 x 24 at 6 x 6 x 12 mm) into a folder of ``work`` (reused when
    it already holds them); study ``i`` has ``loads[i % len(loads)]`` percent of its lung in lesions."""
    from monai_ext.data.studies import write_studies

    key = json.dumps({"phantoms": [64, 64, 24], "n": n, "loads": list(loads), "seed": seed}, sort_keys=True)
    folder = work / f"phantoms_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    done = folder / "settings.json"
    if done.exists() and done.read_text() == key:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    write_studies(folder, [float(loads[i % len(loads)]) for i in range(n)], seed=seed, shape=(64, 64, 24),
                  spacing=(6.0, 6.0, 12.0), progress=False)
    done.write_text(key)
    return folder


class Sampler:
    """Samples a process tree (CPU time, resident memory) and the GPU (NVML) in a thread.

    Use as a context manager around the measured work; then read :meth:`summary`.
    """

    def __init__(self, interval: float = 0.2, gpu: bool = False):
        import psutil

        self.interval = interval
        self.root = psutil.Process()
        self.cpu: dict[int, tuple[float, float]] = {}  # pid -> (CPU seconds when first seen, last)
        self.peak_rss = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds, RSS of the tree)
        self.gpu_util: list[float] = []
        self.gpu_peak = 0
        self._nvml = self._open_nvml() if gpu else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _open_nvml():
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError:
            return None

    def _sample(self, first: bool = False) -> None:
        import psutil

        rss = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = [self.root]
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    used = t.user + t.system
                    rss += p.memory_info().rss
            except psutil.Error:
                continue
            start = self.cpu.get(p.pid, (used if first else 0.0, 0.0))[0]
            self.cpu[p.pid] = (start, used)
        self.peak_rss = max(self.peak_rss, rss)
        self.timeline.append((time.perf_counter(), rss))
        if self._nvml is not None:
            nv, handles = self._nvml
            self.gpu_util.append(sum(nv.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles))
            self.gpu_peak = max(self.gpu_peak, sum(nv.nvmlDeviceGetMemoryInfo(h).used for h in handles))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Sampler:
        import psutil

        psutil.cpu_percent(None)  # starts the machine-wide measurement
        self._sample(first=True)
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0
        self.machine_cpu = psutil.cpu_percent(None)

    def peaks_by_tenth(self) -> list[float]:
        """The peak RSS (MB) of the process tree in each tenth of the measured wall time: flat memory has flat
        tenths after the first."""
        if not self.timeline:
            return []
        t0, t1 = self.timeline[0][0], self.timeline[-1][0]
        peaks = [0] * 10
        for t, rss in self.timeline:
            i = min(9, int(10 * (t - t0) / max(t1 - t0, 1e-9)))
            peaks[i] = max(peaks[i], rss)
        return [round(v / 2**20) for v in peaks]

    def summary(self) -> dict:
        """``wall_s``, ``cpu_percent`` (of all logical CPUs), ``machine_cpu_percent``, ``peak_rss_mb``,
        ``device_percent`` and ``device_mb`` (``None`` without NVML)."""
        cpu_s = sum(last - start for start, last in self.cpu.values())
        return {
            "wall_s": self.wall,
            "cpu_s": cpu_s,
            "cpu_percent": 100.0 * cpu_s / max(self.wall, 1e-9) / (os.cpu_count() or 1),
            "machine_cpu_percent": self.machine_cpu,
            "peak_rss_mb": self.peak_rss / 2**20,
            "peak_rss_by_tenth_mb": self.peaks_by_tenth(),
            "device_percent": sum(self.gpu_util) / len(self.gpu_util) if self.gpu_util else None,
            "device_mb": self.gpu_peak / 2**20 if self._nvml is not None else None,
        }


def _child(args: argparse.Namespace) -> int:
    """In the subprocess: one method's batch over the studies; prints ``BENCH {json}``."""
    import torch

    from pipelines.batch import run_batch
    from pipelines.devices import resolve_device
    from pipelines.report import write_report
    from pipelines.study import PipelineConfig

    device = resolve_device(args.device)
    config = PipelineConfig(method=args.child, bundle=args.bundle, device=device, lung_mask=args.lung_mask,
                            batch_size=args.batch_size)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh batch: nothing skipped as already complete
    with Sampler(gpu=device.startswith("cuda")) as sampler:
        summary = run_batch(args.studies, out, config, workers=args.workers, progress=False, pipeline=args.pipeline,
                            report=False)
        peak_before_report = sampler.peak_rss  # the report embeds every study's thumbnail: it grows with N
        t0 = time.perf_counter()
        write_report(out, summary.rows)
        summary.seconds += time.perf_counter() - t0
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    stages = {s: sum(r["timings_s"].get(s, 0.0) for r in results) / len(results)
              for s in (*STAGES, "total") if any(s in r["timings_s"] for r in results)} if results else {}
    print("BENCH " + json.dumps({
        "method": args.child, "device": device, "workers": args.workers, "pipeline": args.pipeline,
        "peak_in_flight": summary.peak_in_flight, "n": len(summary.rows),
        "ok": summary.n_ok, "failed": summary.n_failed, "batch_s": summary.seconds, "stages": stages,
        "peak_rss_before_report_mb": peak_before_report / 2**20,
        "slices": sum(r["shape"][2] for r in results) / max(len(results), 1),
        "lung_slices": sum(len(r["slices"]) for r in results) / max(len(results), 1),
        "grades": [r["grade"] for r in results], "torch_threads": torch.get_num_threads(), **sampler.summary()}))
    return 0


def run_method(method: str, studies: Path, out: Path, args: argparse.Namespace,
               pipeline: str = "per-study") -> dict:
    """Run one method's batch in a subprocess; its ``BENCH`` record, or ``{"method", "error"}``."""
    log = out / f"{method}_{args.workers}_{pipeline}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--studies", str(studies), "--out",
           str(out / f"{method}_{args.workers}_{pipeline}"), "--workers", str(args.workers), "--device", args.device,
           "--lung-mask", args.lung_mask, "--batch-size", str(args.batch_size), "--pipeline", pipeline]
    if args.bundle:
        cmd += ["--bundle", args.bundle]
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("BENCH ")]
    if rc != 0 or not lines:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or [f"exit code {rc}"]
        return {"method": method, "pipeline": pipeline, "error": tail[0], "log": str(log)}
    return json.loads(lines[-1][len("BENCH "):])


def _md(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(results: Sequence[dict]) -> str:
    """The throughput table and the seconds-per-stage table (markdown)."""
    ok = [r for r in results if "error" not in r]
    head = ["method", "device", "workers", "pipeline", "studies", "slices (lung)", "batch s", "studies/h",
            "s/study", "CPU %", "machine CPU %", "peak RSS MB", "device %", "device MB"]
    rows = [[r["method"], r["device"], r["workers"], r.get("pipeline", "per-study"), f"{r['ok']}/{r['n']}",
             f"{r['slices']:.0f} ({r['lung_slices']:.0f})",
             _f(r["batch_s"]), _f(3600.0 * r["ok"] / r["batch_s"], 0), _f(r["batch_s"] / max(r["ok"], 1)),
             _f(r["cpu_percent"], 0), _f(r["machine_cpu_percent"], 0), _f(r["peak_rss_mb"], 0),
             _f(r["device_percent"], 0), _f(r["device_mb"], 0)] for r in ok]
    rows += [[r["method"], "-", "-", r.get("pipeline", "-"), "failed", r["error"][:80], *["-"] * 8]
             for r in results if "error" in r]
    stages = [s for s in (*STAGES, "total") if any(s in r["stages"] for r in ok)]
    stage_rows = [[r["method"], r.get("pipeline", "per-study"), *(_f(r["stages"].get(s), 2) for s in stages)]
                  for r in ok]
    return _md(head, rows) + "\n\nSeconds per study and stage (mean of result.json timings_s):\n\n" + _md(
        ["method", "pipeline", *stages], stage_rows)


def machine() -> str:
    """One line: CPU model (``lscpu``), logical CPUs, memory, GPU, torch and its threads."""
    import psutil
    import torch

    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    model = fields.get("Model name", platform.processor() or platform.machine()).strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the tables; returns 0, 1 if a method failed, 2 for bad arguments."""
    from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4, help="studies (default 4)")
    p.add_argument("--methods", default="hirescam,iba", help="comma-separated (default hirescam,iba)")
    p.add_argument("--workers", type=int, default=1, help="batch workers (default 1: in the batch's process)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda (default auto)")
    p.add_argument("--bundle", help="bundle folder (default: the embedded bundle)")
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="slices per attribution batch")
    p.add_argument("--pipeline", default="per-study",
                   help="batch pipeline(s), comma-separated: per-study, staged (default per-study)")
    p.add_argument("--phantoms", action="store_true",
                   help="small synthetic phantoms (64 x 64 x 24) instead of studies made from --base")
    p.add_argument("--base", help="clean chest CT the studies are made from (default: LIDC-IDRI-0003)")
    p.add_argument("--loads", default="0,10,20,35", help="lesion percent of the lung, cycled over the studies")
    p.add_argument("--thickness", type=float, default=8.0, help="slice thickness and spacing in mm (default 8)")
    p.add_argument("--work", help="work folder outside the repository (default: <tmp>/ctseverity_bench_throughput)")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--studies", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(None if argv is None else list(argv))
    if args.child:
        return _child(args)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    problems = [f"unknown method(s) {', '.join(sorted(set(methods) - set(METHODS)))}"] if set(methods) - set(
        METHODS) else []
    pipelines = [x.strip() for x in args.pipeline.split(",") if x.strip()]
    if not pipelines or set(pipelines) - {"per-study", "staged"}:
        problems.append(f"--pipeline: expected per-study and/or staged, got {args.pipeline!r}")
    base = Path(args.base) if args.base else default_base()
    work = Path(args.work or Path(tempfile.gettempdir()) / "ctseverity_bench_throughput").resolve()
    if not base.exists() and not args.phantoms:
        problems.append(f"{base}: no such file (set CTSEVERITY_SHARED_DATA or give --base)")
    if work == REPO_ROOT or REPO_ROOT in work.parents:
        problems.append(f"--work {work}: must be outside the repository")
    if args.n < 1 or args.workers < 1:
        problems.append("--n and --workers must be at least 1")
    try:
        loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        loads = []
    if not loads or not all(0 <= x <= 100 for x in loads):
        problems.append(f"--loads: expected percentages 0..100, got {args.loads!r}")
    if problems:
        for msg in problems:
            print(f"bench_throughput: {msg}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    if args.phantoms:
        print(f"phantom studies into {work} ...", file=sys.stderr, flush=True)
        studies = make_phantoms(work, args.n, loads)
        made = "64 x 64 x 24 phantoms at 6 x 6 x 12 mm"
    else:
        print(f"studies from {base} at {args.thickness:g} mm into {work} ...", file=sys.stderr, flush=True)
        studies = make_studies(work, base, args.n, loads, args.thickness)
        made = f"from {base.name} at {args.thickness:g} mm"
    results = []
    for m in methods:
        for pipeline in pipelines:
            print(f"running {m} ({pipeline}) on {args.n} studies ...", file=sys.stderr, flush=True)
            results.append(run_method(m, studies, work, args, pipeline))
    print(f"{args.n} studies {made}, loads {args.loads} %; {machine()}")
    print()
    print(tables(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
