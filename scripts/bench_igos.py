"""Benchmark I-GOS and iGOS++: batched over the slices of a study vs a loop over the slices.

Runs :class:`monai_ext.attribution.IGOS` and :class:`monai_ext.attribution.IGOSPP` on ``N`` axial
slices of a real chest CT (lung window mapped to [0, 1], resized to ``--size``) with a MONAI
DenseNet121 2D classifier, once with all slices in one call ("batched") and once slice by slice
("loop"), and prints a table: method, mode, device, slices, seconds per slice (wall and CPU),
slices per second, peak memory, objective evaluations and backward passes per slice (each over
``terms * S`` path images), and the mean final objective (the batched and loop objectives must agree: a slice's
result does not depend on the rest of the batch).

The classifier is loaded from ``--weights``, or has random (seeded) weights with the output layer
rescaled so that its softmax responds to the input (see :func:`build_model`; ``--train-steps``
trains it briefly on synthetic lesions instead). The predicted class of each slice is explained.
The objective values only serve to compare runs.

Example::

    python scripts/bench_igos.py --slices 64 --size 256
    python scripts/bench_igos.py --slices 4 --size 128 --iterations 3 --loop-slices 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from monai_ext.attribution.igos import IGOS, IGOSPP, blur_baseline  # noqa: E402

__all__ = ["main", "load_ct_slices", "add_lesions", "build_model", "run"]

DEFAULT_CT = Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / \
    "chest_ct_itkelastix_00" / "chest_ct_00.nii.gz"
LUNG_WINDOW = (-1350.0, 150.0)  # HU: level -600, width 1500


def load_ct_slices(path: Path | None, n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` axial slices (n, 1, size, size) in [0, 1] and a description of where they came from.

    Real CT: slices evenly spaced over the middle 60 % of the volume (where the lungs are), lung
    window [-1350, 150] HU mapped to [0, 1], resized bilinearly. Without a file: smooth random
    images (a fallback for machines without the shared data; timings are the same).

    Raises:
        FileNotFoundError: if ``path`` is given and does not exist.
    """
    if path is None:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 1, max(size // 8, 1), max(size // 8, 1), generator=g)
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1), "synthetic"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such CT file")
    import nibabel as nib

    vol = torch.from_numpy(nib.load(str(path)).get_fdata(dtype="float32"))  # (X, Y, Z) HU
    z = vol.shape[-1]
    idx = torch.linspace(0.2 * (z - 1), 0.8 * (z - 1), n).round().long()
    sl = vol[:, :, idx].permute(2, 1, 0).unsqueeze(1)  # (n, 1, Y, X)
    lo, hi = LUNG_WINDOW
    sl = ((sl - lo) / (hi - lo)).clamp(0, 1)
    return F.interpolate(sl, size=(size, size), mode="bilinear", align_corners=False, antialias=True), str(path)


def add_lesions(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Copies of ``x`` with 1-3 bright Gaussian blobs (synthetic lesions) where the image is dark."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    out = x.clone()
    for i in range(b):
        dark = torch.nonzero(x[i, 0] < 0.35)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = (dark[torch.randint(len(dark), (1,), generator=g)][0].float() if len(dark)
                      else torch.tensor([h / 2, w / 2]))
            r = float(h) * (0.03 + 0.05 * float(torch.rand(1, generator=g)))
            blob = 0.5 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            out[i, 0] = torch.maximum(out[i, 0], (x[i, 0] + blob).clamp(max=1.0))
    return out


def build_model(x: torch.Tensor, weights: Path | None = None, train_steps: int = 0, seed: int = 0
                ) -> torch.nn.Module:
    """MONAI DenseNet121, 2D, 1 input channel, 2 classes: loaded, trained briefly, or calibrated.

    Without ``weights``: random (seeded) weights, then ``train_steps`` Adam steps (batch 8) on the
    slices (class 0), copies with synthetic lesions (class 1) and blurred copies of those (class 0),
    with label smoothing. With ``train_steps=0`` (default) the output layer is only rescaled so
    that the logit difference spreads over about +-4 on the slices and their blurred copies: an
    untrained DenseNet's softmax is flat (about 0.5 whatever the input), so I-GOS/iGOS++ would find
    no descent step and stop after one iteration, which would make the timings meaningless.
    """
    from monai.networks.nets import DenseNet121

    torch.manual_seed(seed)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).to(x.device)
    if weights is not None:
        net.load_state_dict(torch.load(str(weights), map_location=x.device))
        return net.eval()
    if train_steps > 0:
        net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        net.train()
        for step in range(train_steps):
            idx = torch.randint(x.shape[0], (3,), generator=g)
            clean = x[idx]
            lesion = add_lesions(clean.cpu(), seed + step).to(x.device)
            batch = torch.cat([clean, lesion, blur_baseline(lesion[:2])])  # blurred: the lesions are gone
            labels = torch.tensor([0] * 3 + [1] * 3 + [0] * 2, device=x.device)
            logits = net(batch.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, labels, label_smoothing=0.2)  # keep the softmax off saturation
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net.to(memory_format=torch.contiguous_format).eval()
    net.eval()
    with torch.no_grad():
        logits = net(torch.cat([x, blur_baseline(x)]))
        d = logits[:, 1] - logits[:, 0]
        scale = 4.0 / float(d.std().clamp_min(1e-12))
        out = net.class_layers.out
        out.weight.mul_(scale)
        out.bias.mul_(scale)
        out.bias[1] -= scale * float(d.mean())
    return net


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(method: type, model: torch.nn.Module, x: torch.Tensor, mode: str, loop_slices: int,
        **kwargs: object) -> dict[str, object]:
    """Time one method in one mode; returns a row of the table."""
    att = method(model, **kwargs)
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    objectives = []
    evaluations = []
    grad_passes = []
    t0 = time.perf_counter()
    c0 = time.process_time()
    if mode == "batched":
        att(x)
        objectives.append(att.objective_)
        evaluations.append(att.evaluations_)
        grad_passes.append(att.grad_passes_)
        n = x.shape[0]
    else:
        n = min(loop_slices, x.shape[0])
        for i in range(n):
            att(x[i:i + 1])
            objectives.append(att.objective_)
            evaluations.append(att.evaluations_)
            grad_passes.append(att.grad_passes_)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    obj = torch.cat(objectives)
    return {"method": method.__name__, "mode": mode, "device": str(device), "slices": n,
            "s_per_slice": seconds / n, "slices_per_s": n / seconds, "cpu_s_per_slice": cpu_seconds / n,
            "peak_mb": _peak_mb(device), "objective": float(obj.mean()), "objectives": obj,
            "evals": float(torch.cat(evaluations).float().mean()),
            "grads": float(torch.cat(grad_passes).float().mean())}


def _table(rows: Sequence[dict[str, object]]) -> str:
    head = f"{'method':8} {'mode':8} {'device':7} {'slices':>6} {'s/slice':>9} {'slices/s':>9} {'cpu s/sl':>9} " \
           f"{'peak MB':>8} {'evals':>6} {'grads':>6} {'objective':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:8} {r['mode']:8} {r['device']:7} {r['slices']:>6} {r['s_per_slice']:>9.2f} "
                     f"{r['slices_per_s']:>9.4f} {r['cpu_s_per_slice']:>9.2f} {r['peak_mb']:>8.0f} "
                     f"{r['evals']:>6.1f} {r['grads']:>6.1f} {r['objective']:>10.5f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=64, help="slices of the study (default 64)")
    p.add_argument("--loop-slices", type=int, default=None,
                   help="slices timed in the loop mode (default: all; fewer to save time, s/slice is per slice)")
    p.add_argument("--size", type=int, default=256, help="slice side in pixels (default 256)")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--mask-size", type=int, default=None, help="mask side (default 28 * size / 256)")
    p.add_argument("--methods", default="IGOS,IGOSPP", help="comma-separated: IGOS, IGOSPP")
    p.add_argument("--modes", default="batched,loop", help="comma-separated: batched, loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--chunk-size", type=int, default=16, help="images per forward/backward pass (default 16)")
    p.add_argument("--no-warm-start", action="store_true", help="line search from step_init at every iteration")
    p.add_argument("--no-channels-last", action="store_true", help="keep the model in contiguous layout")
    p.add_argument("--no-fold", action="store_true", help="run the model as it is (no folded batch norms)")
    p.add_argument("--bf16", action="store_true",
                   help="compute the model in bfloat16 (the folded network cast to it; autocast with --no-fold)")
    p.add_argument("--ct", type=Path, default=DEFAULT_CT if DEFAULT_CT.exists() else None,
                   help=f"chest CT NIfTI (default {DEFAULT_CT} when present, else synthetic slices)")
    p.add_argument("--weights", type=Path, default=None, help="DenseNet121 state dict (default: trained briefly)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train this many steps without --weights (default 0: random weights, rescaled head)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.slices < 1 or args.size < 8 or args.iterations < 0:
        p.error("--slices must be >= 1, --size >= 8, --iterations >= 0")
    methods = {"IGOS": IGOS, "IGOSPP": IGOSPP}
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in methods for m in chosen) or any(m not in ("batched", "loop") for m in modes):
        p.error(f"--methods from {sorted(methods)}, --modes from batched, loop")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, source = load_ct_slices(args.ct, args.slices, args.size, args.seed)
    x = x.to(device)
    t0 = time.perf_counter()
    model = build_model(x, args.weights, args.train_steps, args.seed)
    with torch.no_grad():
        p_top = torch.softmax(model(x), dim=1).max(dim=1).values
    print(f"# model ready in {time.perf_counter() - t0:.0f} s; predicted-class probability on the slices: "
          f"mean {float(p_top.mean()):.3f}, min {float(p_top.min()):.3f}", flush=True)
    kwargs = dict(iterations=args.iterations, ig_steps=args.ig_steps, mask_size=args.mask_size,
                  chunk_size=args.chunk_size, warm_start=not args.no_warm_start,
                  channels_last=not args.no_channels_last, fold_batchnorm=not args.no_fold,
                  autocast_dtype=torch.bfloat16 if args.bf16 else None, seed=args.seed)
    loop_slices = args.loop_slices or args.slices
    print(f"# {args.slices} slices {args.size}x{args.size} from {source}; DenseNet121 2D; device {device}; "
          f"threads {torch.get_num_threads()}; iterations {args.iterations}, S {args.ig_steps}, "
          f"warm start {not args.no_warm_start}, channels_last {not args.no_channels_last}, "
          f"folded {not args.no_fold}, bf16 {args.bf16}",
          flush=True)
    rows = []
    for name in chosen:
        for mode in modes:
            rows.append(run(methods[name], model, x, mode, loop_slices, **kwargs))
            r = rows[-1]
            print(f"#   {name} {mode}: {r['s_per_slice']:.2f} s/slice", flush=True)
    print(_table(rows))
    for name in chosen:
        by_mode = {r["mode"]: r for r in rows if r["method"] == name}
        if "batched" in by_mode and "loop" in by_mode:
            b, lp = by_mode["batched"], by_mode["loop"]
            n = int(lp["slices"])
            diff = float((b["objectives"][:n] - lp["objectives"][:n]).abs().max())  # type: ignore[index]
            print(f"{name}: batched is {lp['s_per_slice'] / b['s_per_slice']:.2f}x the loop's speed; "
                  f"max |objective batched - loop| over {n} slices = {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
