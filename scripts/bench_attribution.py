"""Benchmark the attribution methods on one study: slices per second and peak memory per method.

Setting (the issue's reference setting by default): MONAI DenseNet121 2D, one input channel, two
classes, ``--slices`` slices of ``--size`` x ``--size``, CAM methods at ``features.denseblock4``,
IBA at the output of ``features.transition2`` with the reference defaults (10 steps, 10 noise
samples, beta 10, lr 1). The slices are the central axial slices of ``--ct`` (windowed from
[-1000, 400] HU to [0, 1] and resized), or random when no CT is given. The network is randomly
initialized unless ``--checkpoint`` names a state dict: the timings do not depend on the weights
(the same operations run whatever their values), only the maps do.

Each method runs in its own subprocess, so that its peak memory (the maximum resident set size,
``ru_maxrss``, on CPU; ``torch.cuda.max_memory_allocated`` on GPU) is its own; the table shows the
process peak and its increase over the process before the timed call (model, data and the torch
runtime loaded). The estimator IBA needs is fitted beforehand on the same slices (not timed).

Besides the batched methods, two loops over single slices are timed on ``--loop-slices`` slices
and reported per slice: ``iba-loop`` (this IBA called one slice at a time) and ``iba-reference``
(the reference algorithm of Schulz et al.'s code re-implemented: one slice at a time, the whole
network run on the 10 noisy copies at each of the 10 steps, parameters frozen). ``monai-gradcam``
times MONAI's own ``monai.visualize.GradCAM`` on the same slices, as a baseline for the CAMs.
``iba-bf16`` is the batched IBA with its tail under bfloat16 autocast (``autocast_dtype``), fast on
CPUs with bfloat16 matrix units (AMX).

The table gives wall-clock and process CPU time per slice; on a machine shared with other jobs
the CPU time is the steadier figure (with one thread it is the time the work needs on one core).

Example::

    python scripts/bench_attribution.py --ct ../shared/data/chest_ct_itkelastix_00/chest_ct_00.nii.gz
    python scripts/bench_attribution.py --slices 4 --size 64 --methods hirescam,iba --loop-slices 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from monai_ext.attribution import IBA, LRP, FeatureEstimator, GradCAM, HiResCAM, resolve_layer  # noqa: E402
from monai_ext.networks import build_classifier  # noqa: E402

METHODS = ("hirescam", "gradcam", "iba", "iba-bf16", "iba-loop", "iba-reference", "lrp", "monai-gradcam")
DEFAULT_METHODS = ("hirescam", "gradcam", "iba", "iba-loop", "iba-reference")
LOOPS = ("iba-loop", "iba-reference")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=64, help="slices in the study (default 64)")
    p.add_argument("--size", type=int, default=256, help="slice size in pixels (default 256)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all but lrp)")
    p.add_argument("--ct", type=Path, default=None, help="take the slices from this CT (NIfTI, HU)")
    p.add_argument("--checkpoint", type=Path, default=None, help="state dict of the DenseNet121 (default random)")
    p.add_argument("--loop-slices", type=int, default=4, help="slices timed for the per-slice loops (default 4)")
    p.add_argument("--iba-batch", type=int, default=2, help="slices IBA optimizes together (default 2)")
    p.add_argument("--cam-batch", type=int, default=8, help="slices per CAM forward/backward (default 8)")
    p.add_argument("--lrp-batch", type=int, default=2, help="slices per LRP propagation (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_files", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.slices < 1 or args.size < 32 or args.loop_slices < 1:
        p.error("--slices and --loop-slices must be >= 1 and --size >= 32")
    return args


# ------------------------------------------------------------------------------------------------
def study_slices(ct: Path | None, n: int, size: int) -> torch.Tensor:
    """``n`` slices (n, 1, size, size) in [0, 1]: the central axial slices of ``ct``, or random."""
    if ct is None:
        return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    from monai.transforms import ScaleIntensityRange

    from monai_ext.io import load_ct

    vol = load_ct(ct)  # (1, X, Y, Z), RAS, HU
    depth = vol.shape[-1]
    start = max(0, (depth - n) // 2)
    idx = [min(depth - 1, start + i) for i in range(n)]
    hu = vol.as_tensor()[0][:, :, idx]  # plain tensor (X, Y, n)
    windowed = ScaleIntensityRange(a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True)(hu)
    windowed = windowed.as_tensor() if hasattr(windowed, "as_tensor") else torch.as_tensor(windowed)
    slices = windowed.permute(2, 0, 1).unsqueeze(1).float()  # (n, 1, X, Y)
    return F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False).contiguous()


def reference_style_iba(model: torch.nn.Module, layer: str, estimator: FeatureEstimator, x1: torch.Tensor,
                        steps: int = 10, n_samples: int = 10, beta: float = 10.0, lr: float = 1.0) -> torch.Tensor:
    """The reference algorithm (Schulz et al.'s ``IBA.analyze``) for one slice, for timing: the whole
    model runs on ``n_samples`` copies at every step, a hook putting the bottleneck on ``layer``."""
    helper = IBA(model, layer, estimator=estimator)
    module = resolve_layer(model, layer)
    mean, std, active = estimator.stats(x1.device, x1.dtype, 0.01, 0.01)
    alpha = torch.full(mean.shape, 5.0, device=x1.device, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    buffer: dict[str, torch.Tensor] = {}

    def bottleneck(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        lam = helper._smooth(torch.sigmoid(alpha).expand(out.shape[0], -1, -1, -1))
        buffer["capacity"] = helper._capacity((out - mean) / std, lam, active)
        return (lam * out + (1 - lam) * (torch.randn_like(out) * std + mean)) * active

    with torch.no_grad():
        target = model(x1).argmax(1)
    handle = module.register_forward_hook(bottleneck)
    try:
        batch = x1.expand(n_samples, -1, -1, -1)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -F.log_softmax(model(batch), 1)[:, target].mean() + beta * buffer["capacity"].mean()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
    return buffer["capacity"].mean(0).sum(0).detach() / math.log(2)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def worker(args: argparse.Namespace) -> dict:
    """Time one method in this process and report it as a dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    files = json.loads(args._files)
    device = torch.device(args.device)
    model = build_classifier("densenet121", in_channels=1, num_classes=2)
    model.load_state_dict(torch.load(files["weights"], map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    slices = torch.load(files["slices"], weights_only=True).to(device)
    estimator = FeatureEstimator.load(files["estimator"])
    method = args._worker
    if method in LOOPS:
        slices = slices[: args.loop_slices]

    def make():
        if method == "hirescam":
            return HiResCAM(model, "features.denseblock4", batch_size=args.cam_batch)
        if method == "gradcam":
            return GradCAM(model, "features.denseblock4", batch_size=args.cam_batch)
        if method == "lrp":
            return LRP(model, rule="epsilon", batch_size=args.lrp_batch)
        if method == "monai-gradcam":
            from monai.visualize import GradCAM as MonaiGradCAM

            return MonaiGradCAM(nn_module=model, target_layers="features.denseblock4")
        if method == "iba-bf16":
            return IBA(model, "features.transition2", estimator=estimator, batch_size=args.iba_batch,
                       autocast_dtype=torch.bfloat16)
        return IBA(model, "features.transition2", estimator=estimator, batch_size=args.iba_batch)

    attributor = make()

    def run(x: torch.Tensor) -> None:
        if method == "iba-reference":
            for p in model.parameters():
                p.requires_grad_(False)
            for i in range(x.shape[0]):
                reference_style_iba(model, "features.transition2", estimator, x[i:i + 1])
        elif method == "iba-loop":
            for i in range(x.shape[0]):
                attributor(x[i:i + 1])
        elif method == "monai-gradcam":
            for i in range(0, x.shape[0], args.cam_batch):
                attributor(x[i:i + args.cam_batch])
        else:
            attributor(x)

    warm = slices[:1]
    if method == "iba-bf16":
        IBA(model, "features.transition2", estimator=estimator, steps=2, autocast_dtype=torch.bfloat16)(warm)
    elif method in ("iba", "iba-loop", "iba-reference"):
        IBA(model, "features.transition2", estimator=estimator, steps=2)(warm)  # kernel selection, not timed
    else:
        run(warm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    run(slices)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"method": method, "device": str(device), "slices": int(slices.shape[0]), "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_rss_mb": peak, "base_rss_mb": base, "gpu_peak_mb": gpu_peak, "threads": torch.get_num_threads()}


def prepare(args: argparse.Namespace, folder: Path) -> dict:
    """Slices, weights and the IBA estimator, written for the workers."""
    torch.manual_seed(0)
    model = build_classifier("densenet121", in_channels=1, num_classes=2)
    if args.checkpoint is not None:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    slices = study_slices(args.ct, args.slices, args.size)
    estimator = IBA.fit_estimator(model, slices, layer="features.transition2", batch_size=8)
    files = {"weights": str(folder / "weights.pt"), "slices": str(folder / "slices.pt"),
             "estimator": str(folder / "estimator.pt")}
    torch.save(model.state_dict(), files["weights"])
    torch.save(slices, files["slices"])
    estimator.save(files["estimator"])
    return files


def table(results: list[dict]) -> str:
    head = (f"{'method':<14} {'device':<7} {'slices':>6} {'slices/s':>9} {'s/slice':>8} {'cpu s/slice':>11} "
            f"{'peak MB':>8} {'+MB':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        per = r["seconds"] / r["slices"]
        cpu = r["cpu_seconds"] / r["slices"]
        peak = r["gpu_peak_mb"] if r["gpu_peak_mb"] is not None else r["peak_rss_mb"]
        extra = float("nan") if r["gpu_peak_mb"] is not None else r["peak_rss_mb"] - r["base_rss_mb"]
        lines.append(f"{r['method']:<14} {r['device']:<7} {r['slices']:>6} {1 / per:>9.3f} {per:>8.3f} {cpu:>11.3f} "
                     f"{peak:>8.0f} {extra:>7.0f}")
    by = {r["method"]: r["seconds"] / r["slices"] for r in results}
    for fast in ("iba", "iba-bf16"):
        for loop in LOOPS:
            if fast in by and loop in by:
                lines.append(f"{fast} batched vs {loop}: {by[loop] / by[fast]:.1f}x faster per slice")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table. Returns the exit code."""
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(worker(args)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_attr_") as tmp:
        files = prepare(args, Path(tmp))
        passthrough = ["--slices", str(args.slices), "--size", str(args.size), "--device", args.device,
                       "--loop-slices", str(args.loop_slices), "--iba-batch", str(args.iba_batch),
                       "--cam-batch", str(args.cam_batch), "--lrp-batch", str(args.lrp_batch)]
        if args.threads:
            passthrough += ["--threads", str(args.threads)]
        for method in args.methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--_worker", method,
                   "--_files", json.dumps(files)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method}: failed\n{proc.stderr.strip()}", file=sys.stderr)
                return 1
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{method}: {results[-1]['seconds'] / results[-1]['slices']:.3f} s/slice", file=sys.stderr,
                  flush=True)
    print(f"DenseNet121 2D, {args.slices} slices of {args.size}x{args.size}, "
          f"{'CT ' + args.ct.name if args.ct else 'random slices'}, torch {torch.__version__}, "
          f"{results[0]['threads'] if results else '?'} threads")
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
