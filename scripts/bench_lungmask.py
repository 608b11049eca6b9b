"""Benchmark: load a chest CT and compute its lung mask; print a table of time and memory per step.

Steps: ``load`` (MONAI ``LoadImage`` with ``ensure_channel_first``, as the pipeline loads a study)
and ``lung mask (<backend>)`` (:class:`monai_ext.transforms.LungMask`), optionally repeated. For each
step the table gives the wall time, the process's peak resident memory so far
(``resource.getrusage``; it never goes down, so it is the high-water mark up to that step) and the
peak of the memory allocated during the step as traced by ``tracemalloc`` (numpy and Python
allocations; torch's own allocator is not traced).

Usage::

    python scripts/bench_lungmask.py [CT_FILE] [--backend threshold|auto|lungmask] [--repeat N]

The default CT is the shared real chest CT (512x512x141), found in ``$CTSEVERITY_SHARED_DATA`` or
``../shared/data`` beside the repository.

Example:
    >>> from scripts.bench_lungmask import main
    >>> main(["--repeat", "2"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "default_ct_path", "measure"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_ct_path() -> Path:
    """The shared real chest CT (``$CTSEVERITY_SHARED_DATA`` or ``../shared/data``)."""
    shared = Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return shared / "chest_ct_itkelastix_00" / "chest_ct_00.nii.gz"


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def measure(step: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """Run ``step()`` once.

    Args:
        step: the work to time.

    Returns:
        ``(result, seconds, peak RSS MB of the process so far, peak traced MB during the step)``.
    """
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        result = step()
        seconds = time.perf_counter() - start
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, seconds, _peak_rss_mb(), traced_peak / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        0 on success.

    Raises:
        FileNotFoundError: if the CT file does not exist.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct", nargs="?", type=Path, default=None, help="CT file (default: the shared real chest CT)")
    parser.add_argument("--backend", default="threshold", choices=("threshold", "auto", "lungmask"))
    parser.add_argument("--weights", default=None, help="lungmask R231 weights file (lungmask/auto)")
    parser.add_argument("--repeat", type=int, default=1, help="how many times to compute the mask")
    args = parser.parse_args(argv)
    path = args.ct or default_ct_path()
    if not path.exists():
        raise FileNotFoundError(f"{path}: CT file not found (set CTSEVERITY_SHARED_DATA or pass a path)")

    import numpy as np
    import torch
    from monai.transforms import LoadImage

    from monai_ext.transforms import LungMask

    rows = []
    image, seconds, rss, traced = measure(lambda: LoadImage(image_only=True, ensure_channel_first=True)(str(path)))
    rows.append(("load", seconds, rss, traced))
    masker = LungMask(backend=args.backend, weights_path=args.weights)
    mask = None
    for i in range(max(1, args.repeat)):
        mask, seconds, rss, traced = measure(lambda: masker(image))
        rows.append((f"lung mask ({args.backend})" + (f" #{i + 1}" if args.repeat > 1 else ""), seconds, rss, traced))

    spacing = np.sqrt((image.affine.numpy()[:3, :3] ** 2).sum(axis=0))
    lung_ml = float(mask.numpy().astype(bool).sum()) * float(np.prod(spacing)) / 1000.0
    print(f"input: {path} shape {tuple(image.shape[1:])} spacing {tuple(round(float(s), 4) for s in spacing)} mm")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, python {platform.python_version()}, load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    print(f"lung volume: {lung_ml:.0f} ml")
    print()
    header = f"{'step':<28} {'seconds':>8} {'peak RSS MB':>12} {'peak traced MB':>15}"
    print(header)
    print("-" * len(header))
    for step, seconds, rss, traced in rows:
        print(f"{step:<28} {seconds:>8.2f} {rss:>12.0f} {traced:>15.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
