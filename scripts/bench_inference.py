"""Inference speed of a bundle's slice classifier: slices per second and peak memory.

    python scripts/bench_inference.py [--ct PATH] [--bundle B] [--device cpu] [--batch-size 32]

Slices come from the real chest CT (lung slices, cropped and resized exactly as the pipeline does)
when ``--ct`` is given, else random slices of the model's input size.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct", help="CT study to take the lung slices from")
    p.add_argument("--bundle", help="bundle folder (default: the embedded bundle)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--slices", type=int, default=128, help="random slices when no --ct is given")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from pipelines.bundle import load_model, predict_slices

    model = load_model(args.bundle, device=args.device)
    if args.ct:
        from monai_ext.io import load_ct
        from monai_ext.transforms import LungMask
        from monai_ext.transforms.slices import extract_slices

        ct = load_ct(args.ct)
        lung = LungMask(backend="auto")(ct)
        images = extract_slices(ct, lung, ct.pixdim.tolist(), **model.slice_kwargs).images
        source = f"lung slices of {args.ct}"
    else:
        images = torch.rand(args.slices, 1 + 2 * model.context, model.size, model.size)
        source = "random slices"
    predict_slices(model.network, images[: args.batch_size], batch_size=args.batch_size, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predict_slices(model.network, images, batch_size=args.batch_size, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if args.device.startswith("cuda") else "-"
    print(f"model: {model.bundle} ({model.info['network_def']['_target_']}, {model.size}x{model.size}, "
          f"sha256 {model.checksum[:12]})")
    print(f"input: {len(images)} {source}; machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| device | batch | slices | seconds | slices/s | peak RSS MB | peak GPU MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.device} | {args.batch_size} | {len(images)} | {best:.2f} | {len(images) / best:.1f} | "
          f"{rss:.0f} | {gpu} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
