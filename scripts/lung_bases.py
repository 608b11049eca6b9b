"""Lung masks at the lung bases, before and after: organ domes, soft tissue per slab, Dice, dense
lesions kept. Prints tables, writes a JSON of the numbers and a figure of the lung bases.

    python scripts/lung_bases.py [--json docs/figures/lung_bases.json] [--figure docs/figures/lung_bases.png]

For every real chest CT of ``../shared/data`` (or ``--ct``), two lung masks: ``before``, the
threshold mask as it was (``fill_lesions`` on, no organ removal), and ``after``, the mask the
pipeline uses now (``--after``, default ``auto``: the lungmask U-Net when its weights are on disk,
else the bundle's lung U-Net). For each: the lung volume; the organ tissue rising from the abdomen
inside the mask (:func:`monai_ext.transforms.organs.organ_intrusion`: dense part, and with its
partial-volume rim); the volume of soft tissue (above -300 HU on the CT smoothed over 1 mm) in
each 10 mm slab from the lowest lung slice up; Dice against a reference lung mask where there is
one (CIP ``wholeLung-64``); seconds. Then, on the evaluation CT, the share of inserted lesion
voxels that stays inside each mask, for mixed lesions and pure consolidation at loads up to 85 %
(lesions inserted inside the clean CT's threshold lung, :func:`monai_ext.data.variants.render_variant`).

The figure shows, for each CT whose terms allow publishing an image derived from it, three axial
slices at 10, 25 and 45 mm above the lowest lung slice and a coronal slice, with the mask contours
(before: orange, after: cyan). ``chest_ct_00`` (terms unconfirmed) is measured but not drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: real chest CT: name -> (path under the shared data folder, may be drawn in a published figure)
REAL_CT = {
    "LIDC-IDRI-0001": ("lidc_idri/LIDC-IDRI-0001_ct.nii.gz", True),
    "LIDC-IDRI-0003": ("lidc_idri/LIDC-IDRI-0003_ct.nii.gz", True),
    "Lung_Dx-A0002": ("chest_ct_more/tcia_lung_pet_ct_dx_A0002/Lung_Dx-A0002_ct.nii.gz", True),
    "C3N-00247": ("chest_ct_more/tcia_cptac_luad_C3N-00247/C3N-00247_ct.nii.gz", True),
    "chest_ct_00": ("chest_ct_itkelastix_00/chest_ct_00.nii.gz", False),
    "CIP-10002K": ("chest_ct_more/cip_copdgene_10002K/ct-64.nrrd", True),
    "CIP-TestInput": ("chest_ct_more/cip_testinput/TestInput.nrrd", True),
    "RICORD-000082 (COVID-19)": ("ricord_1a_000082_covid/dicom", True),
}
REFERENCE = {"CIP-10002K": "chest_ct_more/cip_copdgene_10002K/wholeLung-64.nrrd"}
EVALUATION_CT = ("chest_ct_00", "C3N-00247")
LOADS = (15.0, 30.0, 60.0, 85.0)
SLABS = 6


def shared_data() -> Path:
    return Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO.parent / "shared" / "data"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def mask_of(ct, which: str) -> tuple[np.ndarray, float]:
    """(boolean mask on the CT grid, seconds) for ``before`` or a backend name."""
    from monai_ext.transforms import LungMask

    t0 = time.perf_counter()
    if which == "before":
        m = LungMask(backend="threshold", remove_organs=False)(ct)
    else:
        m = LungMask(backend=which)(ct)
    return np.asarray(m[0]) > 0, time.perf_counter() - t0


def base_figures(ct, lung: np.ndarray) -> dict:
    """Soft tissue per 10 mm slab from the lowest lung slice up, organ intrusion (ml)."""
    from scipy import ndimage as ndi

    from monai_ext.transforms.organs import organ_intrusion

    hu = np.asarray(ct[0], dtype=np.float32)
    sp = [float(s) for s in ct.pixdim]
    affine = np.asarray(ct.affine)
    voxel_ml = float(np.prod(sp)) / 1000.0
    dense = organ_intrusion(hu, lung, sp, affine=affine, rim_mm=0.0)
    with_rim = organ_intrusion(hu, lung, sp, affine=affine)
    zs = np.flatnonzero(lung.any(axis=(0, 1)))  # RAS after load_ct: z superior
    z0 = int(zs[0])
    sub = hu[:, :, z0: z0 + int(round(SLABS * 10.0 / sp[2])) + 1]
    sm = ndi.gaussian_filter(sub, [1.0 / sp[0], 1.0 / sp[1], min(1.0 / sp[2], 0.5)])
    soft = (sm > -300.0) & lung[:, :, z0: z0 + sub.shape[2]]
    slabs = []
    for k in range(SLABS):
        a, b = int(round(k * 10.0 / sp[2])), int(round((k + 1) * 10.0 / sp[2]))
        slabs.append(round(float(soft[:, :, a:b].sum()) * voxel_ml, 1))
    return {"lung_ml": round(float(lung.sum()) * voxel_ml, 1), "organ_ml": round(float(dense.sum()) * voxel_ml, 2),
            "organ_with_rim_ml": round(float(with_rim.sum()) * voxel_ml, 2), "soft_per_10mm_ml": slabs}


def retention(path: Path, after: str, seed: int = 11, before: str = "before") -> list[dict]:
    """Share of inserted lesion voxels inside the masks, per load and lesion kind."""
    import torch
    from monai.data import MetaTensor

    from monai_ext.data.scanner import ScannerStyle
    from monai_ext.data.synthetic import phantom_affine
    from monai_ext.data.variants import load_clean_ct, render_variant
    from monai_ext.transforms import LungMask

    base = load_clean_ct(path)
    rows = []
    for kind in ("mixed", "consolidation"):
        for load in LOADS:
            v = render_variant(base, np.random.default_rng([seed, int(load)]), fraction=load / 100.0, kind=kind,
                               style=ScannerStyle())
            image = MetaTensor(torch.from_numpy(np.rint(v.image).astype(np.float32))[None],
                               affine=torch.as_tensor(phantom_affine(v.image.shape, v.spacing)))
            les = v.lesion > 0
            row = {"kind": kind, "load_percent": load}
            for key, which in (("before", before), ("after", after)):
                m = np.asarray((LungMask(backend="threshold", remove_organs=False) if which == "before"
                                else LungMask(backend=which))(image)[0]) > 0
                row[key] = round(float(m[les].mean()), 4)
            rows.append(row)
    return rows


def figure(items: list[tuple[str, object, np.ndarray, np.ndarray]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(items), 4, figsize=(13, 3.3 * len(items)))
    axes = np.atleast_2d(axes)
    for r, (name, ct, before, after) in enumerate(items):
        hu = np.asarray(ct[0])
        sp = [float(s) for s in ct.pixdim]
        zs = np.flatnonzero(after.any(axis=(0, 1)))
        z0 = int(zs[0])
        for j, dz in enumerate((10.0, 25.0, 45.0)):
            z = min(int(zs[-1]), z0 + int(round(dz / sp[2])))
            ax = axes[r, j]
            ax.imshow(np.clip(hu[:, ::-1, z].T, -1100, 250), cmap="gray", vmin=-1100, vmax=250,
                      aspect=sp[1] / sp[0])
            ax.contour(before[:, ::-1, z].T, [0.5], colors="orange", linewidths=0.7)
            ax.contour(after[:, ::-1, z].T, [0.5], colors="cyan", linewidths=0.7)
            ax.set_title(f"{name}: {dz:.0f} mm above the base", fontsize=8)
            ax.axis("off")
        y = int(np.mean(np.nonzero(after)[1]))
        ax = axes[r, 3]
        ax.imshow(np.clip(hu[:, y, :].T, -1100, 250), cmap="gray", origin="lower", vmin=-1100, vmax=250,
                  aspect=sp[2] / sp[0])
        ax.contour(before[:, y, :].T, [0.5], colors="orange", linewidths=0.6)
        ax.contour(after[:, y, :].T, [0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"{name}: coronal", fontsize=8)
        ax.axis("off")
    fig.suptitle("Lung bases: threshold mask before (orange) and the pipeline's mask after (cyan)", fontsize=10)
    plt.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    plt.savefig(out, dpi=72)
    plt.close(fig)


def _table(header: list[str], rows: list[list]) -> str:
    from pipelines.predict import format_table

    return format_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct", nargs="*", help="names of REAL_CT to measure (default: all)")
    p.add_argument("--before", default="before",
                   help="backend of the 'before' mask (default: the threshold mask without the organ-dome removal)")
    p.add_argument("--after", default="auto", help="backend of the 'after' mask (default auto)")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--figure", help="write the lung-base figure here (PNG)")
    p.add_argument("--no-retention", action="store_true", help="skip the inserted-lesion retention table")
    args = p.parse_args(argv)

    from monai_ext.io import load_ct
    from pipelines.datasets import load_ct_mask

    names = args.ct or list(REAL_CT)
    results: dict = {"ct": {}, "retention": {}}
    drawn = []
    for name in names:
        rel, publish = REAL_CT[name]
        ct = load_ct(shared_data() / rel)
        before, t_before = mask_of(ct, args.before)
        after, t_after = mask_of(ct, args.after)
        entry = {"before": {**base_figures(ct, before), "seconds": round(t_before, 1)},
                 "after": {**base_figures(ct, after), "seconds": round(t_after, 1)},
                 "dice_after_vs_before": round(dice(after, before), 4)}
        if name in REFERENCE:
            ref = np.asarray(load_ct_mask(shared_data() / REFERENCE[name], ct)[0]) > 0
            entry["dice_reference"] = {"before": round(dice(before, ref), 4), "after": round(dice(after, ref), 4)}
        results["ct"][name] = entry
        print(f"{name}: lung {entry['before']['lung_ml']} -> {entry['after']['lung_ml']} ml, organ "
              f"{entry['before']['organ_with_rim_ml']} -> {entry['after']['organ_with_rim_ml']} ml", flush=True)
        if publish:
            drawn.append((name, ct, before, after))
    rows = []
    for name, e in results["ct"].items():
        ref = e.get("dice_reference", {})
        rows.append([name, e["before"]["lung_ml"], e["after"]["lung_ml"], e["before"]["organ_with_rim_ml"],
                     e["after"]["organ_with_rim_ml"], e["before"]["organ_ml"], e["after"]["organ_ml"],
                     " / ".join(f"{v:g}" for v in e["before"]["soft_per_10mm_ml"]),
                     " / ".join(f"{v:g}" for v in e["after"]["soft_per_10mm_ml"]),
                     ref.get("before", "-"), ref.get("after", "-"), e["before"]["seconds"], e["after"]["seconds"]])
    print()
    print(_table(["CT", "lung ml before", "after", "organ+rim ml before", "after", "organ ml before", "after",
                  "soft >-300 HU per 10 mm slab before", "after", "Dice ref before", "after", "s before", "s after"],
                 rows))
    if not args.no_retention:
        rrows = []
        for name in EVALUATION_CT:
            if name not in names:
                continue
            res = retention(shared_data() / REAL_CT[name][0], args.after, before=args.before)
            results["retention"][name] = res
            rrows += [[name, r["kind"], r["load_percent"], r["before"], r["after"]] for r in res]
        print()
        print(_table(["evaluation CT", "lesion kind", "load %", "kept before", "kept after"], rrows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.figure and drawn:
        figure(drawn, Path(args.figure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
