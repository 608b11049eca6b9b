"""Train the embedded default model of the ct-severity bundle, reproducibly, on procedural data only.

    python scripts/train_default_model.py --work /tmp/ctsev_default

1. writes seeded synthetic chest CT studies (several anatomies and grids, lesion loads 0..80 %,
   lesion masks) with :func:`monai_ext.data.studies.write_studies` under ``--work``;
2. trains the bundle's ``configs/train.json`` on them (slice labels from the lesion masks),
   writing ``models/model.pt``, ``models/model.json`` (checksum, validation metrics) and
   ``models/iba_estimator.pt`` into the bundle.

Nothing outside the procedural generator goes into the training.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

#: (shape, spacing) of the study groups: different grids, so the model sees several resolutions
GROUPS = (
    ((224, 224, 60), (1.6, 1.6, 5.0)),
    ((256, 256, 72), (1.4, 1.4, 4.0)),
    ((192, 192, 54), (1.9, 1.9, 5.5)),
)


def make_dataset(work: Path, n_studies: int, seed: int) -> Path:
    """Write the synthetic studies and a combined manifest; return the manifest path."""
    from monai_ext.data.studies import write_studies

    rng = np.random.default_rng(seed)
    rows = []
    per_group = int(np.ceil(n_studies / len(GROUPS)))
    for g, (shape, spacing) in enumerate(GROUPS):
        n = min(per_group, n_studies - g * per_group)
        if n <= 0:
            break
        n_zero = n // 3
        percents = [0.0] * n_zero + list(np.round(rng.uniform(1.0, 80.0, n - n_zero), 1))
        folder = work / f"group{g}"
        if not (folder / "truth.csv").exists():
            write_studies(folder, percents, seed=seed + 1000 * g, shape=shape, spacing=spacing, masks=True,
                          prefix=f"g{g}")
        with open(folder / "truth.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                rows.append({"study": r["study"], "path": str(folder / f"{r['study']}.nii.gz"),
                             "lesion_percent": r["lesion_percent"], "grade": r["grade"],
                             "mask": str(folder / f"{r['study']}_lesion.nii.gz")})
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/ctsev_default", help="folder for the generated studies and cache")
    p.add_argument("--bundle", default=str(Path(__file__).resolve().parents[1] / "bundles" / "ct_severity"))
    p.add_argument("--studies", type=int, default=60)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--slice-stride", type=int, default=2, help="keep every n-th training slice of a study")
    args = p.parse_args(argv)

    from pipelines.train import train_bundle

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    manifest = make_dataset(work, args.studies, args.seed)
    print(f"dataset: {manifest} ({time.time() - t0:.0f} s)")
    t0 = time.time()
    info = train_bundle(manifest, args.bundle, epochs=args.epochs, device=args.device,
                        overrides={"seed": args.seed, "cache_dir": str(work / "cache"),
                                                                         "slice_stride": args.slice_stride})
    print(f"trained in {time.time() - t0:.0f} s")
    print(json.dumps(info["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
