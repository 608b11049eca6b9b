"""Benchmark: the whole per-study pipeline on one CT, per method; per-stage seconds and peak memory.

Each method runs in its own subprocess (a fresh interpreter, as a batch worker): it loads the
model, runs :func:`pipelines.study.process_study` once and writes the study's outputs. The table
gives the per-stage seconds from its ``result.json`` (load, lung mask, slices, classify,
attribution, lesion mask, severity, write, overview, total), the model load time, the
subprocess's wall time (including imports) and its peak resident memory (``os.wait4`` rusage of
that child alone).

Usage::

    python scripts/bench_pipeline.py [CT_FILE] [--methods hirescam,iba,...] [--bundle PATH] [--device cpu]
                                     [--threads N] [--out DIR]

The default CT is the shared real chest CT (512x512x141), found in ``$CTSEVERITY_SHARED_DATA`` or
``../shared/data`` beside the repository.

Example:
    >>> from scripts.bench_pipeline import main
    >>> main(["--methods", "hirescam"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS

__all__ = ["main", "default_ct_path", "run_method", "ALL_METHODS"]

REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ("hirescam", "gradcam", "iba", "igospp", "lrp", "density")
_STAGE_ORDER = ("load", "lung_mask", "slices", "classify", "attribution", "normalize", "lesion_mask", "severity",
                "write", "overview")


def default_ct_path() -> Path:
    """The shared real chest CT (``$CTSEVERITY_SHARED_DATA`` or ``../shared/data``)."""
    shared = Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return shared / "chest_ct_itkelastix_00" / "chest_ct_00.nii.gz"


def _child(args: argparse.Namespace) -> int:
    """In the subprocess: load the model, run one study, print a JSON line with the result summary."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.bundle import load_model
    from pipelines.discovery import Study, study_name
    from pipelines.study import PipelineConfig, process_study

    config = PipelineConfig(method=args.child, bundle=args.bundle, device=args.device, lung_mask=args.lung_mask)
    t0 = time.perf_counter()
    model = None if args.child == "density" else load_model(args.bundle, device=args.device)
    load_s = time.perf_counter() - t0
    res = process_study(Study(study_name(args.ct), str(args.ct)), args.out, config, model)
    print("BENCH " + json.dumps({"timings": res["timings_s"], "model_load": load_s, "slices": len(res["slices"]),
                                 "grade": res["grade"], "lesion_percent": res["lesion_percent"],
                                 "shape": res["shape"], "threads": torch.get_num_threads()}))
    return 0


def run_method(method: str, ct: Path, out: Path, bundle: str | None, device: str, lung_mask: str,
               threads: int | None) -> dict:
    """Run one method in a subprocess; its summary plus ``wall_s`` and ``peak_mb`` (or ``error``)."""
    log = out / f"{method}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(ct), "--child", method, "--out", str(out / method),
           "--device", device, "--lung-mask", lung_mask]
    if bundle:
        cmd += ["--bundle", bundle]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    peak_mb = usage.ru_maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else usage.ru_maxrss / 1024.0
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        return {"method": method, "error": tail[0], "wall_s": wall, "peak_mb": peak_mb, "log": str(log)}
    return {"method": method, **json.loads(lines[-1][len("BENCH "):]), "wall_s": wall, "peak_mb": peak_mb}


def _table(results: list[dict], device: str) -> str:
    from pipelines.predict import format_table

    stages = [s for s in _STAGE_ORDER if any(s in r.get("timings", {}) for r in results)]
    stages += sorted({k for r in results for k in r.get("timings", {})} - set(stages) - {"total"})
    header = ["method", "device", "n_slices", *stages, "total_s", "model_load_s", "process_s", "peak_MB", "grade",
              "lesion_%"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], device, "-", *["-"] * len(stages), "-", "-", f"{r['wall_s']:.1f}",
                         f"{r['peak_mb']:.0f}", "failed", r["error"][:60]])
            continue
        t = r["timings"]
        rows.append([r["method"], device, r["slices"], *[f"{t[s]:.2f}" if s in t else "-" for s in stages],
                     f"{t['total']:.1f}", f"{r['model_load']:.2f}", f"{r['wall_s']:.1f}", f"{r['peak_mb']:.0f}",
                     r["grade"], f"{r['lesion_percent']:.1f}"])
    return format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; returns 0, or 1 if a method failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ct", nargs="?", default=None, help="CT file (default: the shared real chest CT)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated (default {','.join(ALL_METHODS)})")
    p.add_argument("--bundle", help="bundle folder (default: the embedded bundle)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS)
    p.add_argument("--threads", type=int, help="torch threads in each run (default: torch's default)")
    p.add_argument("--out", help="keep the outputs in this folder (default: a temporary folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(None if argv is None else list(argv))
    ct = Path(args.ct) if args.ct else default_ct_path()
    if not ct.exists():
        print(f"bench_pipeline: {ct}: no such file (set CTSEVERITY_SHARED_DATA or give the CT path)", file=sys.stderr)
        return 2
    if args.child:
        args.ct = ct
        return _child(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        print(f"bench_pipeline: unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for m in methods:
            print(f"running {m} ...", file=sys.stderr, flush=True)
            results.append(run_method(m, ct, out, args.bundle, args.device, args.lung_mask, args.threads))
        shape = "x".join(map(str, next((r["shape"] for r in results if "shape" in r), ["?"])))
        print(f"CT {ct} ({shape}), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}")
        print(_table(results, args.device))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
