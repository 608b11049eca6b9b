"""Train the embedded default model of the ct-severity bundle, reproducibly, on real anatomy under
scanner variety, plus procedural phantoms.

    python scripts/train_default_model.py --work /tmp/ctsev_default [--extra /path/LIDC-IDRI-0002_ct.nii.gz]

1. renders semi-synthetic studies under ``--work`` (:func:`monai_ext.data.variants.render_variant`):
   for each training CT, ``--variants`` studies, each with a drawn scanner style (kernel from soft
   to sharp with its noise texture, 5-60 HU of noise, slice thickness 0.6-8 mm with partial
   volume, HU gain and offset, inspiration level -900..-750 HU, and in ``--dependent-share`` of
   them a gravity-dependent density of 30-150 HU along the posterior lung) and a drawn lesion load
   (30 % clean, else 0.5-85 % of the lung, log-uniform; mixed ground glass and consolidation, ground
   glass only or consolidation only); plus ``--phantoms`` procedural phantoms rendered the same
   way;
2. trains the bundle's ``configs/train.json`` on them (slice labels from the lesion masks; the
   classifier input flattened beyond 4 mm of the lung, as at inference; flips, affine and elastic
   deformation, contrast, blur and noise per slice), writing ``models/model.pt``,
   ``models/model.json`` (checksum, validation metrics, layers) and ``models/iba_estimator.pt``;
   from scratch, or fine-tuning the weights of a trained bundle (``--init``).

Training CT (terms that allow training the shipped model, ../shared/DESIGN.md): LIDC-IDRI-0001 and
-0003 (CC BY 3.0), Lung-PET-CT-Dx A0002 (CC BY 4.0), the CIP COPDGene 10002K and TestInput volumes
(CIP research licence, shipped in the bundle) and any
``--extra`` CT of such terms (the model card lists LIDC-IDRI-0002, read from the commit named in
SOURCES.md §6). The evaluation CT (``chest_ct_00``, ``C3N-00247``, the RICORD COVID-19 series)
and the measure-only data (MosMed masks, MedSeg slices) are never read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]

#: training CT by name: path relative to the shared data folder
TRAINING_CT = {
    "LIDC-IDRI-0001": "lidc_idri/LIDC-IDRI-0001_ct.nii.gz",
    "LIDC-IDRI-0003": "lidc_idri/LIDC-IDRI-0003_ct.nii.gz",
    "Lung_Dx-A0002": "chest_ct_more/tcia_lung_pet_ct_dx_A0002/Lung_Dx-A0002_ct.nii.gz",
    "CIP-10002K": "chest_ct_more/cip_copdgene_10002K/ct-64.nrrd",
    "CIP-TestInput": "chest_ct_more/cip_testinput/TestInput.nrrd",
}
#: training studies keep the lung's bounding box plus this margin in-plane (the classifier sees the lung box
#: plus 10 mm, the body beyond 4 mm of the lung flattened)
CROP_MM = 30.0
#: phantom grids (shape, spacing) for the procedural studies
PHANTOM_GROUPS = (((224, 224, 60), (1.6, 1.6, 5.0)), ((256, 256, 96), (1.4, 1.4, 2.5)),
                  ((192, 192, 54), (1.9, 1.9, 5.5)))


def shared_data() -> Path:
    return Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO.parent / "shared" / "data"))


def _bases(extra: list[Path], names: list[str] | None = None):
    from monai_ext.data.variants import load_clean_ct

    for name, rel in TRAINING_CT.items():
        if names is None or name in names:
            yield lambda name=name, rel=rel: load_clean_ct(shared_data() / rel, name, crop_mm=CROP_MM)
    for path in extra:
        yield lambda path=path: load_clean_ct(path, crop_mm=CROP_MM)


def _phantom_base(i: int, seed: int):
    from monai_ext.data import synthetic_chest_ct
    from monai_ext.data.variants import CleanCT

    shape, spacing = PHANTOM_GROUPS[i % len(PHANTOM_GROUPS)]
    ct = synthetic_chest_ct(shape, spacing, seed=seed + 1000 + i)
    return CleanCT(f"phantom{i:03d}", np.maximum(ct.image, -1024).astype(np.int16), ct.lung, tuple(ct.spacing))


def make_dataset(work: Path, n_variants: int = 25, seed: int = 0, extra: list[Path] | None = None,
                 n_phantoms: int = 30, names: list[str] | None = None, dependent_share: float = 0.0) -> Path:
    """Render the training studies (skipping those already on disk) and write ``manifest.csv``.

    Args:
        work: output folder.
        n_variants: studies per training CT.
        seed: first seed; study ``k`` of a base uses ``seed + k`` mixed with the base's index.
        extra: more training CT files.
        n_phantoms: procedural phantoms, one study each.
        names: restrict the shared training CT to these names.
        dependent_share: share of the studies whose scanner style adds dependent density.

    Returns:
        The manifest (``study, path, lesion_percent, grade, mask``).
    """
    from monai_ext.data.studies import grade_from_percent
    from monai_ext.data.variants import render_variant, save_variant

    work = Path(work)
    studies = work / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[r["study"]] = r
    loaders = list(_bases(list(extra or []), names))
    jobs = [(b, k) for b in range(len(loaders)) for k in range(n_variants)]
    jobs += [(len(loaders) + i, 0) for i in range(n_phantoms)]
    cache: dict = {}
    with open(rows_path, "a") as fh:
        for b, k in tqdm(jobs, desc="rendering studies", unit="study"):
            base = cache.get(b)
            if base is None:
                cache.clear()  # one base in memory at a time
                base = loaders[b]() if b < len(loaders) else _phantom_base(b - len(loaders), seed)
                cache[b] = base
            study = f"{base.name}_v{k:03d}"
            if study in done:
                continue
            rng = np.random.default_rng([seed, b, k])
            v = render_variant(base, rng, dependent_share=dependent_share)
            paths = save_variant(v, studies, study)
            row = {"study": study, "path": str(paths["image"]), "lesion_percent": round(v.lesion_percent, 4),
                   "grade": grade_from_percent(v.lesion_percent), "mask": str(paths["lesion"]), "kind": v.kind,
                   "style": v.style.to_dict(), "base": base.name}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done[study] = row
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["study", "path", "lesion_percent", "grade", "mask"], extrasaction="ignore")
        w.writeheader()
        w.writerows(done.values())
    return manifest


def init_overrides(bundle: str | os.PathLike) -> dict:
    """``train.json`` overrides that start from a trained bundle's network and weights, with its input
    settings and explained layers (as ``train_guided.json`` does for guided fine-tuning)."""
    from pipelines.bundle import load_model

    source = load_model(bundle)
    return {"network_def": "$ctsev_bundle.load_model(" + repr(str(bundle)) + ").network",
            "network_target": source.info["network_def"]["_target_"],
            "network_args": {k: v for k, v in source.info["network_def"].items() if k != "_target_"},
            "size": source.size, "context": source.context, "window": list(source.window),
            "flatten_beyond_mm": source.flatten_beyond_mm,
            "iba_layer": source.info.get("iba_layer"), "cam_layer": source.info.get("cam_layer")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/ctsev_default", help="folder for the rendered studies and cache")
    p.add_argument("--bundle", default=str(REPO / "bundles" / "ct_severity"))
    p.add_argument("--extra", nargs="*", default=[], help="more training CT of allowed terms")
    p.add_argument("--variants", type=int, default=25, help="studies per training CT")
    p.add_argument("--phantoms", type=int, default=30, help="procedural phantom studies")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dependent-share", type=float, default=0.0,
                   help="share of the studies with gravity-dependent density added to their normal lung (default 0: "
                        "the shipped weights' data; the model card's fine-tuning trial used 0.6)")
    p.add_argument("--init", default=None, help="fine-tune the weights of this trained bundle instead of training "
                                                "from scratch (its network and input settings are kept)")
    p.add_argument("--learning-rate", type=float, default=None, help="default: the config's (1e-3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slice-stride", type=int, default=2, help="keep every n-th training slice of a study")
    p.add_argument("--render-only", action="store_true", help="render the studies and stop")
    args = p.parse_args(argv)

    from pipelines.train import train_bundle

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not 0.0 <= args.dependent_share <= 1.0:
        p.error("--dependent-share must be within 0..1")
    manifest = make_dataset(work, args.variants, args.seed, [Path(e) for e in args.extra], args.phantoms,
                            dependent_share=args.dependent_share)
    print(f"dataset: {manifest} ({time.time() - t0:.0f} s)")
    if args.render_only:
        return 0
    overrides = {"seed": args.seed, "cache_dir": str(work / "cache"), "slice_stride": args.slice_stride,
                 "lung_backend": "threshold"}
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    if args.init is not None:
        overrides.update(init_overrides(args.init))
    t0 = time.time()
    info = train_bundle(manifest, args.bundle, epochs=args.epochs, device=args.device, overrides=overrides)
    print(f"trained in {time.time() - t0:.0f} s")
    print(json.dumps(info["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
