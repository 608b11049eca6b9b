"""``ctseverity train``: train the slice classifier with the bundle's ``train.json``, or fine-tune a trained
one with saliency guidance (``train.json`` + ``train_guided.json``, ``--guided``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.bundle import bundle_path
from pipelines.train import GUIDED_CONFIGS, train_bundle

__all__ = ["register", "run_train"]


def _guided_overrides(args: argparse.Namespace) -> dict:
    """Check the options of ``train --guided`` and return its config overrides.

    Raises:
        ValueError: ``--from`` without ``--guided``, ``--size``/``--context`` with it, or ``--out``
            naming the source bundle.
        InputNotFoundError: the source bundle does not exist or holds no trained model.
    """
    source = getattr(args, "from_bundle", None)
    if not args.guided:
        if source is not None:
            raise ValueError("--from is only used with --guided")
        return {}
    for key in ("size", "context"):
        if getattr(args, key, None) is not None:
            raise ValueError(f"--{key} cannot be set with --guided: it is the source model's")
    src = bundle_path(source)
    if Path(args.out).resolve() == src.resolve():
        raise ValueError(f"--out {args.out} is the source bundle; write the guided model to another folder")
    return {"from_bundle": str(src)}


def run_train(args: argparse.Namespace) -> int:
    from pipelines.datasets import discover_labeled

    guided = _guided_overrides(args)
    records = discover_labeled(args.data)  # fail early, with a clear message, on a bad dataset
    n_pos = sum(r.label for r in records)
    print(f"{len(records)} studies ({n_pos} with lesions, {len(records) - n_pos} without) in {args.data}")
    if guided:
        print(f"guided fine-tuning (IB saliency guidance) of the model in {guided['from_bundle']}")
    overrides = dict(guided)
    for key in ("size", "context", "seed", "batch_size", "learning_rate"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    info = train_bundle(args.data, args.out, epochs=args.epochs, device=args.device, overrides=overrides,
                        config=GUIDED_CONFIGS if guided else "train.json", trust=args.trust_bundle)
    m = info.get("metrics", {})
    print(f"model written to {Path(args.out) / 'models' / 'model.pt'} (sha256 {info['sha256'][:12]}...)")
    if m:
        print("validation: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    if guided:
        print("the heatmaps of a guided model differ from its source's: calibrate the bundle before grading "
              "(ctseverity calibrate)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the slice classifier on labelled studies",
                       description="Train the slice classifier with the bundle's train.json on studies labelled "
                                   "by grade folders (CT-0..CT-4), a CSV manifest, or a folder with truth.csv. "
                                   "With --guided, fine-tune a trained classifier instead (train_guided.json: "
                                   "information-bottleneck saliency guidance, Zhou et al., BMVC 2022).")
    p.add_argument("data", help="dataset folder or CSV manifest")
    p.add_argument("--out", required=True, help="bundle folder to write (configs, docs, models/)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    p.add_argument("--size", type=int, help="slice size in pixels")
    p.add_argument("--context", type=int, help="neighbouring slices on each side as channels (2.5D)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--learning-rate", dest="learning_rate", type=float)
    p.add_argument("--guided", action="store_true",
                   help="fine-tune a trained classifier with IB saliency guidance (train_guided.json)")
    p.add_argument("--from", dest="from_bundle", metavar="BUNDLE",
                   help="with --guided: the bundle whose model is fine-tuned (default: the embedded bundle)")
    p.add_argument("--trust-bundle", dest="trust_bundle", action="store_true",
                   help="run configs already in --out that differ from the embedded bundle's, and build the --from "
                        "bundle's network as its model.json says: both are MONAI config code that can run anything. "
                        "Without it only the embedded configs run and --from is read for its weights and a plain "
                        "MONAI network")
    p.set_defaults(func=run_train)
