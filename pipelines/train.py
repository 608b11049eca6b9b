"""``ctseverity train``: train the slice classifier with the bundle's ``train.json``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines.bundle import EMBEDDED_BUNDLE, copy_bundle

__all__ = ["register", "run_train", "train_bundle"]

log = logging.getLogger(__name__)


def train_bundle(data: str | Path, out: str | Path, epochs: int | None = None, device: str | None = None,
                 overrides: dict | None = None, config: str = "train.json") -> dict:
    """Run a bundle training config on ``data`` and write the trained bundle to ``out``.

    The embedded bundle's configs and model card are copied to ``out`` (unless it already has
    configs), so the result is a complete bundle usable with ``--bundle out``.

    Returns:
        The written ``models/model.json``.
    """
    from monai.bundle import run

    out = Path(out)
    if not (out / "configs" / config).exists():
        copy_bundle(out, EMBEDDED_BUNDLE)
    args: dict = {"bundle_root": str(out), "dataset_dir": str(data), "output_dir": str(out / "models")}
    if epochs is not None:
        args["epochs"] = int(epochs)
    if device is not None:
        args["device"] = f"$torch.device({device!r})"
    args.update(overrides or {})
    run(run_id="run", init_id="initialize", final_id="finalize", config_file=str(out / "configs" / config),
        logging_file=str(out / "configs" / "logging.conf") if (out / "configs" / "logging.conf").exists() else None,
        **args)
    return json.loads((out / "models" / "model.json").read_text())


def run_train(args: argparse.Namespace) -> int:
    from pipelines.datasets import discover_labeled

    records = discover_labeled(args.data)  # fail early, with a clear message, on a bad dataset
    n_pos = sum(r.label for r in records)
    print(f"{len(records)} studies ({n_pos} with lesions, {len(records) - n_pos} without) in {args.data}")
    overrides = {}
    for key in ("size", "context", "seed", "batch_size", "learning_rate"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    info = train_bundle(args.data, args.out, epochs=args.epochs, device=args.device, overrides=overrides)
    m = info.get("metrics", {})
    print(f"model written to {Path(args.out) / 'models' / 'model.pt'} (sha256 {info['sha256'][:12]}...)")
    if m:
        print("validation: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the slice classifier on labelled studies",
                       description="Train the slice classifier with the bundle's train.json on studies labelled "
                                   "by grade folders (CT-0..CT-4), a CSV manifest, or a folder with truth.csv.")
    p.add_argument("data", help="dataset folder or CSV manifest")
    p.add_argument("--out", required=True, help="bundle folder to write (configs, docs, models/)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    p.add_argument("--size", type=int, help="slice size in pixels")
    p.add_argument("--context", type=int, help="neighbouring slices on each side as channels (2.5D)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--learning-rate", dest="learning_rate", type=float)
    p.set_defaults(func=run_train)
