"""``ctseverity train``: train the slice classifier with the bundle's ``train.json``, or fine-tune a trained
one with saliency guidance (``train.json`` + ``train_guided.json``, ``--guided``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from monai_ext.errors import UntrustedBundleError
from pipelines.bundle import EMBEDDED_BUNDLE, TRUST_ENV, bundle_path, copy_bundle

__all__ = ["register", "run_train", "train_bundle", "GUIDED_CONFIGS"]

log = logging.getLogger(__name__)


def train_bundle(data: str | Path, out: str | Path, epochs: int | None = None, device: str | None = None,
                 overrides: dict | None = None, config: str | Sequence[str] = "train.json",
                 trust: bool = False) -> dict:
    """Run a bundle training config on ``data`` and write the trained bundle to ``out``.

    The embedded bundle's configs and model card are copied to ``out`` (unless it already has
    configs), so the result is a complete bundle usable with ``--bundle out``.

    Args:
        data: dataset folder or CSV manifest.
        out: bundle folder to write.
        epochs: training epochs (default: the config's).
        device: torch device name (default: the config's).
        overrides: config values by id.
        config: config file name under ``configs/``, or several merged in order (MONAI's
            multi-file configs: later files override ids of earlier ones), e.g.
            ``("train.json", "train_guided.json")``.
        trust: run configs already in ``out`` that differ from the embedded bundle's (a MONAI config
            runs code), and build a ``--from`` bundle's network as its config says.

    Returns:
        The written ``models/model.json``.

    Raises:
        UntrustedBundleError: ``out`` holds configs other than the embedded bundle's and ``trust`` is not set.
    """
    from monai.bundle import run

    out = Path(out)
    names = [config] if isinstance(config, str) else list(config)
    if not all((out / "configs" / name).exists() for name in names):
        copy_bundle(out, EMBEDDED_BUNDLE)
    elif not trust:
        _check_own_configs(out, names)
    args: dict = {"bundle_root": str(out), "dataset_dir": str(data), "output_dir": str(out / "models")}
    if epochs is not None:
        args["epochs"] = int(epochs)
    if device is not None:
        args["device"] = f"$torch.device({device!r})"
    args.update(overrides or {})
    previous = os.environ.get(TRUST_ENV)
    if trust:  # the guided config loads its --from bundle with load_model, which reads this
        os.environ[TRUST_ENV] = "1"
    try:
        _run_configs(run, out, names, args)
    finally:
        if trust:
            if previous is None:
                os.environ.pop(TRUST_ENV, None)
            else:
                os.environ[TRUST_ENV] = previous
    return json.loads((out / "models" / "model.json").read_text())


def _run_configs(run, out: Path, names: list[str], args: dict) -> None:
    run(run_id="run", init_id="initialize", final_id="finalize",
        config_file=[str(out / "configs" / name) for name in names],
        logging_file=str(out / "configs" / "logging.conf") if (out / "configs" / "logging.conf").exists() else None,
        **args)


def _check_own_configs(out: Path, names: Sequence[str]) -> None:
    """Refuse to run configs in ``out`` that are not the embedded bundle's (they could run any code)."""
    for name in (*names, "logging.conf"):
        mine, embedded = out / "configs" / name, EMBEDDED_BUNDLE / "configs" / name
        if mine.exists() and (not embedded.exists() or mine.read_bytes() != embedded.read_bytes()):
            raise UntrustedBundleError(f"configs/{name} is not the embedded bundle's and a MONAI config runs code; "
                                       "pass --trust-bundle only if you wrote it or trust its author", out)


#: the configs of the guided stage: train.json with train_guided.json's overrides
GUIDED_CONFIGS = ("train.json", "train_guided.json")


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
