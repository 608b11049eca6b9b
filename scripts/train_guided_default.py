"""Fine-tune the embedded default model with IB saliency guidance, on procedural data only.

    python scripts/train_guided_default.py --out /tmp/ctsev_guided/bundle --work /tmp/ctsev_guided

1. writes seeded synthetic chest CT studies with lesion masks under ``--work`` (the generator and
   grid groups of ``scripts/train_default_model.py``, another seed by default, so the phantoms are
   not the default model's training studies);
2. runs the bundle's ``train.json`` + ``train_guided.json`` on them, starting from the embedded
   model (information-bottleneck saliency guidance, Zhou et al., BMVC 2022; see
   :mod:`monai_ext.training.guided`), and writes a complete bundle to ``--out``;
3. prints the validation metrics of the source and the guided model on the same held-out studies.

Nothing outside the procedural generator goes into the training, and nothing is written into the
repository: ``--out`` must lie outside it. Calibrate the result (``ctseverity calibrate``) before
grading with it, and compare it with ``ctseverity evaluate``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _make_dataset():
    """``make_dataset`` of ``scripts/train_default_model.py`` (the same studies generator)."""
    spec = importlib.util.spec_from_file_location("train_default_model", Path(__file__).with_name(
        "train_default_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_dataset


def _same_split_metrics(manifest: Path, cache: Path, seed: int, source, guided, device: str) -> dict:
    """Validation metrics of both models on the held-out studies of the guided training."""
    from pipelines.bundle import evaluate_dataset
    from pipelines.datasets import SliceDataset, discover_labeled, split_studies

    _, val = split_studies(discover_labeled(manifest), 0.3, seed)
    ds = SliceDataset(val, cache_dir=cache, size=source.size, context=source.context, window=source.window,
                      progress=False)
    return {name: evaluate_dataset(m.network, ds, val, device) for name, m in (("source", source), ("guided", guided))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="bundle folder to write (outside the repository)")
    p.add_argument("--work", default="/tmp/ctsev_guided", help="folder for the generated studies and cache")
    p.add_argument("--studies", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=1, help="studies, split and training seed (the default model: 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slice-stride", type=int, default=2, help="keep every n-th training slice of a study")
    p.add_argument("--batch-size", type=int, help="default: the config's")
    p.add_argument("--learning-rate", type=float, help="default: train_guided.json's")
    p.add_argument("--trainable", default=None,
                   help="comma-separated parameter name prefixes to update (e.g. features.denseblock4,class_layers), "
                        "or 'all'; default: the guided layer's block and everything after it (train_guided.json)")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    if out == REPO or REPO in out.parents:
        p.error(f"--out {args.out} is inside the repository; write the guided bundle elsewhere")

    from pipelines.bundle import EMBEDDED_BUNDLE, load_model
    from pipelines.train import GUIDED_CONFIGS, train_bundle

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    manifest = _make_dataset()(work, args.studies, args.seed)
    print(f"dataset: {manifest} ({time.time() - t0:.0f} s)")
    overrides: dict = {"from_bundle": str(EMBEDDED_BUNDLE), "seed": args.seed, "cache_dir": str(work / "cache"),
                       "slice_stride": args.slice_stride}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.learning_rate:
        overrides["learning_rate"] = args.learning_rate
    if args.trainable == "all":
        overrides["guide_train_from"] = None
    elif args.trainable:
        overrides["guide_trainable"] = [v.strip() for v in args.trainable.split(",") if v.strip()]
    t0 = time.time()
    info = train_bundle(manifest, out, epochs=args.epochs, device=args.device, overrides=overrides,
                        config=GUIDED_CONFIGS)
    print(f"guided fine-tuning: {time.time() - t0:.0f} s, bundle {out}")
    print(json.dumps(info["training"]["guided"], indent=2))
    metrics = _same_split_metrics(manifest, work / "cache", args.seed, load_model(EMBEDDED_BUNDLE, args.device),
                                  load_model(out, args.device), args.device)
    keys = ("slice_auc", "study_accuracy", "sensitivity", "specificity", "study_auc")
    print(f"{'model':8s} " + " ".join(f"{k:>14s}" for k in keys))
    for name, m in metrics.items():
        print(f"{name:8s} " + " ".join(f"{m.get(k, float('nan')):14.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
