"""Semi-synthetic studies from real chest CT: lesions inserted at given loads, under a scanner style.

    python scripts/make_semisynthetic.py --out /tmp/semi --ct CT [CT ...] --loads 0,3,8,15,20,35,45,60,70,85 \\
        [--style native|random|random-dependent|smooth|sharp] [--seed 2024]

For each CT and each load, one study (:func:`monai_ext.data.variants.render_variant`): the CT's
threshold lung label, lesions of the project's generator (mixed ground glass and consolidation)
inside it at that share of the lung, then the scanner style: ``native`` keeps the CT as acquired,
``random`` draws a style per study (kernel, noise, slice thickness, HU calibration, inspiration;
:func:`monai_ext.data.scanner.draw_style`), ``random-dependent`` the same with gravity-dependent density
added to the normal lung of every study, ``smooth`` / ``sharp`` re-render with a soft-tissue or a
sharp lung kernel. Writes ``<study>.nii.gz`` with ``<study>_lesion`` and ``<study>_lung`` masks,
and ``truth.csv`` (``study, lesion_percent, grade, requested_percent, kind, seed, lung_ml,
lesion_ml, source``) for ``ctseverity run --truth``, ``calibrate`` and ``evaluate``.

Which CT may be used for what is set by ../shared/DESIGN.md: calibrate only on studies from the
CT that may train the model; the evaluation CT give held-out figures only.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

STYLES = ("native", "random", "random-dependent", "smooth", "sharp")


def _style(name: str, rng: np.random.Generator, spacing):
    from monai_ext.data.scanner import SHARP_KERNEL, SMOOTH_KERNEL, ScannerStyle, draw_style

    if name == "random-dependent":
        return draw_style(rng, spacing, dependent_share=1.0)
    return {"native": ScannerStyle(f50=0.9, noise_hu=0.0), "smooth": SMOOTH_KERNEL, "sharp": SHARP_KERNEL}.get(
        name) or draw_style(rng, spacing)


def make_studies(out: Path, cts: list[Path], loads: list[float], style: str = "native", seed: int = 2024,
                 kind: str = "mixed", prefix: str | None = None) -> Path:
    """Write the studies and ``truth.csv``; return the ``truth.csv`` path."""
    from monai_ext.data.studies import TRUTH_COLUMNS, grade_from_percent
    from monai_ext.data.variants import load_clean_ct, render_variant, save_variant

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = [(c, i, load) for c in range(len(cts)) for i, load in enumerate(loads)]
    base = None
    for c, i, load in tqdm(jobs, desc="semi-synthetic studies", unit="study"):
        if base is None or base[0] != c:
            base = (c, load_clean_ct(cts[c]))
        ct = base[1]
        rng = np.random.default_rng([seed, c, i])
        v = render_variant(ct, rng, fraction=load / 100.0, kind=kind, style=_style(style, rng, ct.spacing))
        name = f"{prefix or ct.name}_{style}_{i:02d}_f{int(round(load)):02d}"
        save_variant(v, out, name, compress=True)
        voxel_ml = float(np.prod(v.spacing)) / 1000.0
        rows.append({"study": name, "lesion_percent": f"{v.lesion_percent:.4f}",
                     "grade": grade_from_percent(v.lesion_percent), "requested_percent": f"{load:g}", "kind": kind,
                     "seed": v.seed, "lung_ml": f"{np.count_nonzero(v.lung) * voxel_ml:.1f}",
                     "lesion_ml": f"{np.count_nonzero(v.lesion & (v.lung > 0)) * voxel_ml:.1f}",
                     "source": f"{cts[c]} ({style})"})
    truth = out / "truth.csv"
    old = []
    if truth.exists():
        with open(truth, newline="") as fh:
            old = [r for r in csv.DictReader(fh) if r["study"] not in {x["study"] for x in rows}]
    with open(truth, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(TRUTH_COLUMNS))
        w.writeheader()
        w.writerows(old + rows)
    return truth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (truth.csv is merged when it exists)")
    p.add_argument("--ct", nargs="+", required=True, help="clean chest CT files or DICOM folders")
    p.add_argument("--loads", default="0,3,8,15,20,35,45,60,70,85", help="lesion percents, comma-separated")
    p.add_argument("--style", default="native", choices=STYLES)
    p.add_argument("--kind", default="mixed", choices=("mixed", "ggo", "consolidation"))
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--prefix", help="study name prefix (default: the CT's name)")
    args = p.parse_args(argv)
    loads = [float(v) for v in args.loads.split(",") if v.strip()]
    truth = make_studies(Path(args.out), [Path(c) for c in args.ct], loads, args.style, args.seed, args.kind,
                         args.prefix)
    print(f"truth: {truth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
