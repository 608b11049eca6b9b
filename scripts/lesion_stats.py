"""Real COVID-19 lesion statistics next to those of the procedural lesion generator.

    python scripts/lesion_stats.py [--data ../shared/data] [--out bundles/ct_severity/docs/figures]
                                   [--seeds 3] [--loads 1 3 10 20 35 45 60 70 80 85] [--no-figures]

Real sets (measured only; nothing derived from them but statistics is written):

- MosMedData: the 50 CT-1 lesion masks (8 mm slices, no images, LAS). Per study: lesion volume,
  3D components (26-connected) and their volumes, largest component share, the lower lean over
  the lesion's own slice range, left/right of the image centre (minority-side share, bilateral).
  Study 0255 has a lung mask (IMICS); it covers slices 0-24 of 38 only (the upper lung is
  missing), so it gives subpleural and posterior shares on those slices and no lower lean.
- MedSeg (Inf-Net split): 98 axial slices, 8-bit windowed JPEGs read as HU with the assumed window
  of :data:`pipelines.eval_slices.DEFAULT_IMAGE_WINDOW` (-1100..250 HU), lung from
  :func:`pipelines.eval_slices.lung_mask_2d`. No pixel size is given: it is estimated per slice as
  ``W / (left-right lung extent in pixels)``, W being the median left-right lung extent (mm) of the
  base CTs' slices through the body of the lungs, and the generator's slices are measured with the
  same estimate.

Generator: lesions from :func:`monai_ext.data.studies.insert_lesions_oriented` in the two LIDC-IDRI
CTs (threshold lung mask, split into right/left). Two sets: *matched*, one study per MosMed study
with the same lesion volume (CT and seed alternate), and a *sweep* over lesion loads spanning
CT-1..CT-4 with several seeds. 3D statistics are measured after keeping one slice every 8 mm
(:func:`monai_ext.data.lesion_stats.resample_slices`), as MosMed did; 2D statistics on axial slices
with lesion through the body of the lungs (lung area at least 40 % of the largest slice's; 3 per
sweep study), each MedSeg slice paired with the generator slice of the nearest slice load.

Prints a side-by-side table, and writes the figures (PNG, statistics only) and
``lesion_statistics.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from monai_ext.data.lesion_stats import (  # noqa: E402
    resample_slices,
    slice_statistics,
    study_statistics,
)

LIDC_CTS = ("lidc_idri/LIDC-IDRI-0001_ct.nii.gz", "lidc_idri/LIDC-IDRI-0003_ct.nii.gz")
SWEEP_LOADS = (1.0, 3.0, 10.0, 20.0, 35.0, 45.0, 60.0, 70.0, 80.0, 85.0)
Z_STEP_MM = 8.0
SLICES_PER_STUDY = 3
#: the IMICS lung mask of MosMed study 0255 covers these slices only
MOSMED_0255_LUNG_SLICES = slice(0, 25)


def _default_data() -> Path:
    return Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# --------------------------------------------------------------------------------------------- real
def measure_mosmed(data: Path) -> tuple[list[dict], dict]:
    """Per-study statistics of the 50 MosMed masks, and those of study 0255 with its partial lung mask."""
    import nibabel as nib
    import SimpleITK as sitk

    rows = []
    files = sorted((data / "mosmed_masks").glob("study_*_mask.nii.gz"))
    if not files:
        raise FileNotFoundError(f"no MosMed masks under {data / 'mosmed_masks'}")
    partial: dict = {}
    for f in files:
        nii = nib.load(str(f))
        mask = np.asarray(nii.dataobj) > 0
        spacing = tuple(float(z) for z in nii.header.get_zooms()[:3])
        s = study_statistics(mask, spacing, affine=nii.affine)
        s["study"] = f.name.replace("_mask.nii.gz", "")
        rows.append(s)
        if s["study"] == "study_0255":
            seg = sitk.ReadImage(str(data / "mosmed_masks/imics_lung/study_0255_Segmentation.seg.nrrd"))
            lung = sitk.GetArrayFromImage(seg).transpose(2, 1, 0) > 0  # same grid as the mask (checked)
            zs = MOSMED_0255_LUNG_SLICES
            p = study_statistics(mask[:, :, zs], spacing, affine=nii.affine, lung=lung[:, :, zs])
            partial = {k: p[k] for k in ("subpleural_share", "posterior_share", "load_percent",
                                         "lung_subpleural_share", "lung_posterior_share")}
            partial["lung_ml_partial"] = p["lung_ml"]
    return rows, partial


def medseg_slices(data: Path) -> list[dict]:
    """The MedSeg slices as HU image, lesion, GGO/consolidation labels and lung (cached arrays)."""
    from PIL import Image

    from pipelines.eval_slices import image_to_hu, lung_mask_2d

    out = []
    root = data / "medseg_slices_infnet"
    for split in ("train", "test"):
        for img_path in sorted((root / split / "images").glob("*.jpg"), key=lambda p: int(p.stem)):
            gray = np.asarray(Image.open(img_path).convert("L"))
            hu = image_to_hu(gray)
            lesion = np.asarray(Image.open(root / split / "infection_mask" / f"{img_path.stem}.png").convert("L")) > 127
            labels = np.asarray(Image.open(root / split / "ggo1_consolidation2_mask" / f"{img_path.stem}.png"))
            lung = lung_mask_2d(hu, lesion)
            out.append({"name": f"{split}/{img_path.stem}", "hu": hu, "lesion": lesion, "labels": labels,
                        "lung": lung})
    if not out:
        raise FileNotFoundError(f"no MedSeg slices under {root}")
    return out


def lr_extent_px(lung: np.ndarray) -> int:
    """Left-right extent (pixels) of a 2D lung mask in ``("L", "P")`` order (rows run left)."""
    rows = np.flatnonzero(np.asarray(lung).any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


# ---------------------------------------------------------------------------------------- generator
def load_base(path: Path):
    """A base CT: HU array on its own grid, RAS affine, spacing, lung mask (1 right, 2 left)."""
    from monai_ext.io import load_ct
    from monai_ext.transforms.lung import lung_mask

    ct = load_ct(path, orientation=None)
    array = np.asarray(ct.array[0] if hasattr(ct, "array") else np.asarray(ct)[0])
    affine = np.asarray(ct.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    lung = lung_mask(array, spacing, affine=affine, backend="threshold", split_lr=True, name=path)
    return {"name": path.name.replace("_ct.nii.gz", ""), "image": array, "affine": affine, "spacing": spacing,
            "lung": np.asarray(lung).astype(np.uint8)}


def lung_width_mm(base: dict) -> np.ndarray:
    """Left-right lung extent (mm) of each axial slice through the body of the lungs (lung area at
    least 40 % of the largest slice's) of a base CT: what fixes the MedSeg pixel size."""
    (lung,) = _lps_slices([base["lung"] > 0], base["affine"])
    area = lung.sum(axis=(0, 1))
    spacing_x = base["spacing"][[i for i, c in enumerate(_axcodes(base["affine"])) if c in ("L", "R")][0]]
    return np.array([lr_extent_px(lung[:, :, k]) * spacing_x for k in np.flatnonzero(area >= 0.4 * area.max())])


def _axcodes(affine: np.ndarray) -> tuple[str, ...]:
    import nibabel as nib

    return tuple(nib.aff2axcodes(affine))


def _to_input_grid(mask_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An array on insert_lesions' L,P,S grid back onto the grid of ``affine``."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    back = ornt_transform(axcodes2ornt(("L", "P", "S")), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(mask_lps, back))


def generate(base: dict, fraction: float, seed: int):
    """Generator lesions in a base CT: (image, lesion mask, consolidation mask, info) on its grid."""
    from monai_ext.data.studies import insert_lesions_oriented

    out, lesion, info = insert_lesions_oriented(base["image"], base["lung"], base["affine"], fraction, seed=seed)
    cons = _to_input_grid(info.pop("consolidation_mask"), base["affine"])
    return out, lesion, cons, info


def _lps_slices(arrays: Sequence[np.ndarray], affine: np.ndarray) -> list[np.ndarray]:
    """Arrays put in L,P,S order (for axial ``[x, y]`` slices in ``("L", "P")`` order)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    fwd = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
    return [np.ascontiguousarray(apply_orientation(a, fwd)) for a in arrays]


def measure_generator_study(base: dict, fraction: float, seed: int, rng: np.random.Generator | None,
                            n_slices: int = SLICES_PER_STUDY) -> tuple[dict, list[dict]]:
    """3D statistics at 8 mm slices of one generated study, and up to ``n_slices`` 2D slices (cropped)."""
    image, lesion, cons, info = generate(base, fraction, seed)
    import nibabel as nib

    codes = nib.aff2axcodes(base["affine"])
    z_axis = [i for i, c in enumerate(codes) if c in ("S", "I")][0]
    les8, spc8 = resample_slices(lesion, base["spacing"], Z_STEP_MM, axis=z_axis)
    lung8, _ = resample_slices(base["lung"], base["spacing"], Z_STEP_MM, axis=z_axis)
    s = study_statistics(les8, spc8, lung=lung8, affine=base["affine"])
    s.update(ct=base["name"], seed=seed, requested_percent=100.0 * fraction,
             load_percent_native=100.0 * info["fraction"])
    slices: list[dict] = []
    if rng is not None and n_slices > 0:
        img_l, les_l, cons_l, lung_l = _lps_slices([image, lesion, cons, base["lung"]], base["affine"])
        area_les = les_l.sum(axis=(0, 1))
        area_lung = (lung_l > 0).sum(axis=(0, 1))
        # slices through the body of the lungs (not the apices or the costophrenic recesses), as the
        # MedSeg slices are, with at least 1 % of their lung area lesion
        cand = np.flatnonzero((area_les >= 0.01 * np.maximum(area_lung, 1)) & (area_lung >= 0.4 * area_lung.max()))
        for k in sorted(rng.choice(cand, size=min(n_slices, cand.size), replace=False).tolist()):
            lung2 = lung_l[:, :, k]
            xs = np.flatnonzero(lung2.any(axis=1))
            ys = np.flatnonzero(lung2.any(axis=0))
            box = (slice(max(xs[0] - 5, 0), xs[-1] + 6), slice(max(ys[0] - 5, 0), ys[-1] + 6))
            slices.append({
                "name": f"{base['name']}_{100 * fraction:g}_{seed}_z{k}",
                "hu": np.clip(img_l[box + (k,)].astype(np.float32), -1100.0, 250.0),  # the MedSeg window
                "lesion": les_l[box + (k,)] > 0,
                "labels": np.where(les_l[box + (k,)] > 0, 1 + (cons_l[box + (k,)] > 0), 0).astype(np.uint8),
                "lung": lung2[box],
                "true_pixel_mm": float(base["spacing"][0]),
                "study_load_percent": 100.0 * info["fraction"],
            })
    return s, slices


def slice_rows(slices: list[dict], width_mm: float) -> list[dict]:
    """:func:`slice_statistics` of cached slices, pixel size estimated from the lung's left-right extent."""
    rows = []
    for sl in slices:
        px = lr_extent_px(sl["lung"])
        pixel_mm = width_mm / max(px, 1)
        r = slice_statistics(sl["lesion"], sl["lung"], pixel_mm, axcodes=("L", "P"), hu=sl["hu"], labels=sl["labels"])
        r.update(name=sl["name"], pixel_mm=pixel_mm, lr_px=px)
        if "true_pixel_mm" in sl:
            r["true_pixel_mm"] = sl["true_pixel_mm"]
        rows.append(r)
    return rows


def match_by_load(real: list[dict], gen: list[dict], key: str = "load_percent") -> list[dict]:
    """For each real row, the generator row of the nearest ``key`` (with replacement)."""
    g = np.array([r[key] for r in gen], dtype=np.float64)
    return [gen[int(np.argmin(np.abs(g - r[key])))] for r in real]


# ------------------------------------------------------------------------------------------ summary
def _vals(rows: list[dict], key: str) -> np.ndarray:
    out = []
    for r in rows:
        v = r
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out.append(np.nan if v is None else float(v))
    return np.asarray(out, dtype=np.float64)


def describe(values: np.ndarray) -> dict:
    """Median, quartiles, mean and count of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(med), "q1": float(q1), "q3": float(q3), "mean": float(v.mean())}


STUDY_KEYS = (
    ("lesion_ml", "lesion volume (ml)"),
    ("n_components", "components per study (26-conn., 8 mm slices)"),
    ("n_components_min", "components >= 0.1 ml"),
    ("small_component_share", "share of components < 0.1 ml"),
    ("largest_share", "largest component / lesion volume"),
    ("slices_with_lesion", "8 mm slices with lesion"),
    ("components_per_slice", "components >= 10 mm2 per 8 mm slice"),
    ("lower_share_lesion_range", "lesion share in the lower half of its z range"),
    ("minority_share", "share in the less affected lung"),
    ("bilateral", "bilateral (each lung >= 1 %)"),
)
SLICE_KEYS = (
    ("load_percent", "slice lesion load (% of lung area)"),
    ("n_components_min", "components per slice (>= 10 mm2)"),
    ("subpleural_share", "subpleural share (<= 10 mm)"),
    ("posterior_share", "posterior-half share"),
    ("bilateral", "bilateral slices"),
    ("consolidation_share", "consolidation share of lesion area"),
    ("hu.ggo.p50", "GGO median HU"),
    ("hu.consolidation.p50", "consolidation median HU"),
    ("texture_ratio", "GGO fine-texture ratio (crazy paving)"),
    ("reticular_fraction", "GGO core share with reticulation"),
)


def _add_derived(rows: list[dict]) -> None:
    for r in rows:
        sizes = np.asarray(r.get("component_ml", []), dtype=np.float64)
        r["small_component_share"] = float(np.mean(sizes < 0.1)) if sizes.size else float("nan")
        r["minority_share"] = min(r["right_share"], r["left_share"])


def summarize(mosmed: list[dict], gen_matched: list[dict], medseg: list[dict], gen_slices: list[dict]) -> dict:
    """Side-by-side summaries (median [IQR] per statistic)."""
    out: dict = {"study": {}, "slice": {}}
    for key, label in STUDY_KEYS:
        out["study"][key] = {"label": label, "real": describe(_vals(mosmed, key)),
                             "generator": describe(_vals(gen_matched, key))}
    for key, label in SLICE_KEYS:
        out["slice"][key] = {"label": label, "real": describe(_vals(medseg, key)),
                             "generator": describe(_vals(gen_slices, key))}
    return out


def hu_pool(rows_slices: list[dict], label: int, n_max: int = 200_000, seed: int = 0) -> np.ndarray:
    """HU values under a label, pooled over cached slices (subsampled)."""
    vals = np.concatenate([sl["hu"][(sl["labels"] == label) & sl["lesion"]] for sl in rows_slices] or [np.zeros(0)])
    if vals.size > n_max:
        vals = np.random.default_rng(seed).choice(vals, n_max, replace=False)
    return vals


def _fmt(d: dict, pct: bool = False) -> str:
    if not d.get("n"):
        return "-"
    f = (lambda x: f"{100 * x:.0f} %") if pct else (lambda x: f"{x:.3g}")
    if pct:
        return f"{100 * d['mean']:.0f} %"
    return f"{f(d['median'])} [{f(d['q1'])}, {f(d['q3'])}]"


def pooled_label(summary: dict) -> str:
    """One line: the pooled volumes of the components >= 0.1 ml, real and generator."""
    item = summary["pooled_component_ml_min"]
    return f"{item['label']}: MosMed {_fmt(item['real'])} (n {item['real']['n']}), generator " \
           f"{_fmt(item['generator'])} (n {item['generator']['n']})"


def table_rows(summary: dict) -> list[list[str]]:
    """Rows ``statistic, real, generator`` for printing and for the model card."""
    rows = []
    for level, src in (("study", "MosMed / gen. matched"), ("slice", "MedSeg / gen. load-matched")):
        for key, item in summary[level].items():
            pct = key == "bilateral"
            rows.append([f"{item['label']} ({src})", _fmt(item["real"], pct), _fmt(item["generator"], pct)])
    return rows


# ------------------------------------------------------------------------------------------ figures
def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)


def make_figures(out: Path, mosmed: list[dict], gen_matched: list[dict], gen_sweep: list[dict],
                 medseg: list[dict], gen_slices_all: list[dict], hu: dict, partial: dict) -> list[Path]:
    """Four PNG figures of statistics, real next to generator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_c, gen_c = "tab:blue", "tab:orange"
    paths = []

    # 1. counts and sizes per study
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    for rows, c, lab in ((mosmed, real_c, "MosMed CT-1 (50)"), (gen_matched, gen_c, "generator, same volumes")):
        ax[0].scatter(_vals(rows, "lesion_ml"), _vals(rows, "n_components_min"), s=14, c=c, label=lab, alpha=0.8)
        ax[1].scatter(_vals(rows, "lesion_ml"), _vals(rows, "largest_share"), s=14, c=c, alpha=0.8)
        sizes = np.concatenate([np.asarray(r["component_ml"]) for r in rows])
        sizes = sizes[sizes >= 0.1]
        ax[2].hist(np.log10(sizes), bins=np.linspace(-1, 3, 25), histtype="step", color=c, density=True, lw=1.6)
    small = np.median(_vals(mosmed, "n_components") - _vals(mosmed, "n_components_min"))
    ax[0].set(xscale="log", xlabel="lesion volume (ml)", ylabel="components >= 0.1 ml", title="lesion count per study")
    ax[1].set(xscale="log", xlabel="lesion volume (ml)", ylabel="largest / total", title="largest component share")
    ax[2].set(xlabel="log10 component volume (ml)", ylabel="density",
              title=f"components >= 0.1 ml\n(MosMed: + {small:.0f} smaller per study)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "lesion_counts_sizes.png")
    _save(fig, paths[-1])
    plt.close(fig)

    # 2. location
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.6))
    for rows, c, lab in ((mosmed, real_c, "MosMed"), (gen_matched, gen_c, "generator")):
        ax[0].scatter(_vals(rows, "lesion_ml"), _vals(rows, "lower_share_lesion_range"), s=14, c=c, label=lab)
        ax[1].scatter(_vals(rows, "lesion_ml"), _vals(rows, "minority_share"), s=14, c=c)
    ax[0].axhline(0.5, color="gray", lw=0.8)
    ax[0].set(xscale="log", xlabel="lesion volume (ml)", ylabel="share", title="lower half of the lesion z range")
    ax[1].set(xscale="log", xlabel="lesion volume (ml)", ylabel="share", title="share in the less affected lung")
    ax[0].legend(fontsize=8)
    for k, key, title in ((2, "subpleural_share", "subpleural share (10 mm)"),
                          (3, "posterior_share", "posterior-half share")):
        for rows, c, lab in ((medseg, real_c, "MedSeg slices"), (gen_slices_all, gen_c, "generator slices")):
            ax[k].scatter(_vals(rows, "load_percent"), _vals(rows, key), s=10, c=c, alpha=0.7, label=lab)
        ax[k].set(xlabel="slice lesion load (% of lung area)", ylabel="share", title=title, ylim=(0, 1.02))
    if partial:
        ax[2].axhline(partial["subpleural_share"], color=real_c, ls="--", lw=1, label="MosMed 0255 (3D)")
        ax[3].axhline(partial["posterior_share"], color=real_c, ls="--", lw=1)
    ax[3].axhline(0.5, color="gray", lw=0.8)
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "lesion_location.png")
    _save(fig, paths[-1])
    plt.close(fig)

    # 3. density and texture
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    bins = np.linspace(-1100, 250, 55)
    for name, ls in (("ggo", "-"), ("consolidation", "--")):
        for src, c in (("real", real_c), ("generator", gen_c)):
            v = hu[src][name]
            if v.size:
                ax[0].hist(v, bins=bins, histtype="step", density=True, color=c, ls=ls, lw=1.5,
                           label=f"{'MedSeg' if src == 'real' else 'generator'} {name}")
    ax[0].set(xlabel="HU (MedSeg: assumed window -1100..250)", ylabel="density", title="HU under GGO / consolidation")
    ax[0].legend(fontsize=7)
    for rows, c, lab in ((medseg, real_c, "MedSeg"), (gen_slices_all, gen_c, "generator")):
        ax[1].scatter(_vals(rows, "load_percent"), _vals(rows, "consolidation_share"), s=10, c=c, alpha=0.7, label=lab)
    ax[1].set(xlabel="slice lesion load (% of lung area)", ylabel="share", title="consolidation share of lesion area")
    ax[1].legend(fontsize=8)
    data = [_vals(medseg, "texture_ratio"), _vals(gen_slices_all, "texture_ratio")]
    ax[2].boxplot([d[np.isfinite(d)] for d in data])
    ax[2].set_xticks([1, 2], ["MedSeg", "generator"])
    ax[2].set(ylabel="GGO / clear-lung fine-texture amplitude", title="GGO fine texture (crazy paving)")
    fig.tight_layout()
    paths.append(out / "lesion_density_texture.png")
    _save(fig, paths[-1])
    plt.close(fig)

    # 4. generator statistics across the load range, with the real values where they exist
    loads = sorted({round(r["requested_percent"], 3) for r in gen_sweep})
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = (("n_components_min", None, "components >= 0.1 ml (8 mm slices)"),
              ("subpleural_share", "lung_subpleural_share", "subpleural share (3D, in-plane 10 mm)"),
              ("posterior_share", "lung_posterior_share", "posterior-half share (3D)"),
              ("lower_share", "lung_lower_share", "lower-half share (3D, lung z range)"))
    for k, (key, lung_key, title) in enumerate(panels):
        per = [[r for r in gen_sweep if round(r["requested_percent"], 3) == f] for f in loads]
        vals = [_vals(p, key) for p in per]
        ax[k].plot(loads, [np.nanmedian(v) for v in vals], "o-", color=gen_c, label="generator (median, range)")
        ax[k].fill_between(loads, [np.nanmin(v) for v in vals], [np.nanmax(v) for v in vals], color=gen_c, alpha=0.2)
        if lung_key:
            ax[k].plot(loads, [np.nanmedian(_vals(p, lung_key)) for p in per], "--", color="gray", lw=1,
                       label="the lung itself (no lean)")
            ax[k].set_ylim(0, 1.02)
        ax[k].set(xlabel="lesion load (% of lung volume)", title=title)
        for x in (25, 50, 75):
            ax[k].axvline(x, color="gray", lw=0.5, ls=":")
    q = np.nanpercentile(_vals(mosmed, "n_components_min"), [25, 50, 75])
    ax[0].axhspan(q[0], q[2], color=real_c, alpha=0.15, label="MosMed CT-1 IQR (median 1.5 % load)")
    ax[0].axhline(q[1], color=real_c, lw=1)
    if partial:
        for k, key in ((1, "subpleural_share"), (2, "posterior_share")):
            ax[k].plot([partial["load_percent"]], [partial[key]], "s", color=real_c, label="MosMed study 0255")
            ax[k].plot([partial["load_percent"]], [partial["lung_" + key]], "x", color=real_c,
                       label="its lung itself")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "lesion_vs_load.png")
    _save(fig, paths[-1])
    plt.close(fig)
    return paths


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else round(float(obj), 5)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=_default_data(), help="shared data folder")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bundles/ct_severity/docs/figures",
                   help="folder for the figures and lesion_statistics.json")
    p.add_argument("--seeds", type=int, default=3, help="studies per CT and load in the sweep")
    p.add_argument("--loads", type=float, nargs="+", default=list(SWEEP_LOADS), help="sweep loads, percent")
    p.add_argument("--matched", type=int, default=50, help="generator studies matched to MosMed volumes (0..50)")
    p.add_argument("--no-figures", action="store_true", help="print the tables only")
    args = p.parse_args(argv)

    from tqdm.auto import tqdm

    from pipelines.predict import format_table

    t0 = time.time()
    mosmed, partial = measure_mosmed(args.data)
    _add_derived(mosmed)
    medseg_cache = medseg_slices(args.data)
    bases = [load_base(args.data / rel) for rel in LIDC_CTS]
    for b in bases:
        b["lung_ml"] = float(np.count_nonzero(b["lung"]) * np.prod(b["spacing"]) / 1000.0)

    gen_matched = []
    for i, real in enumerate(tqdm(mosmed[: args.matched], desc="generator, matched to MosMed")):
        base = bases[i % len(bases)]
        frac = min(real["lesion_ml"] / base["lung_ml"], 1.0)
        s, _ = measure_generator_study(base, frac, seed=1000 + i, rng=None)
        s["matched_to"] = real["study"]
        gen_matched.append(s)
    _add_derived(gen_matched)

    gen_sweep, gen_cache = [], []
    rng = np.random.default_rng(0)
    jobs = [(b, f, s) for f in args.loads for b in bases for s in range(args.seeds)]
    for k, (base, load, _) in enumerate(tqdm(jobs, desc="generator, load sweep")):
        s, sl = measure_generator_study(base, load / 100.0, seed=k, rng=rng)  # a new seed for every study
        gen_sweep.append(s)
        gen_cache.extend(sl)
    _add_derived(gen_sweep)

    # pixel size of the 2D slices: the median left-right lung extent (mm) of the base CTs
    width_mm = float(np.median(np.concatenate([lung_width_mm(b) for b in bases])))
    medseg = slice_rows(medseg_cache, width_mm)
    gen_slices_all = slice_rows(gen_cache, width_mm)
    gen_slices = match_by_load(medseg, gen_slices_all)
    matched_names = {r["name"] for r in gen_slices}
    hu = {"real": {"ggo": hu_pool(medseg_cache, 1), "consolidation": hu_pool(medseg_cache, 2)},
          "generator": {"ggo": hu_pool([s for s in gen_cache if s["name"] in matched_names], 1),
                        "consolidation": hu_pool([s for s in gen_cache if s["name"] in matched_names], 2)}}

    summary = summarize(mosmed, gen_matched, medseg, gen_slices)
    pooled = {}
    for src, rows in (("real", mosmed), ("generator", gen_matched)):
        sizes = np.concatenate([np.asarray(r["component_ml"], dtype=np.float64) for r in rows])
        pooled[src] = describe(sizes[sizes >= 0.1])
    summary["pooled_component_ml_min"] = {"label": "volume of components >= 0.1 ml, pooled (ml)", **pooled}
    print(f"\nMosMed CT-1 masks: {len(mosmed)} studies; generator matched by lesion volume: {len(gen_matched)}; "
          f"MedSeg slices: {len(medseg)}; generator slices: {len(gen_slices_all)} (load-matched {len(gen_slices)}); "
          f"slice pixel size from a {width_mm:.0f} mm left-right lung extent\n")
    print(format_table(["statistic (median [IQR])", "real", "generator"], table_rows(summary)))
    print(f"\n{pooled_label(summary)}")
    if partial:
        sweep_low = [r for r in gen_sweep if r["requested_percent"] <= 10]
        print(f"\nMosMed study_0255 ({partial['load_percent']:.1f} % of the lung mask's slices 0-24): subpleural "
              f"{partial['subpleural_share']:.2f} (its lung {partial['lung_subpleural_share']:.2f}), posterior "
              f"{partial['posterior_share']:.2f} (lung {partial['lung_posterior_share']:.2f}); generator 3D at "
              f"<= 10 %: subpleural {np.nanmedian(_vals(sweep_low, 'subpleural_share')):.2f} (lung "
              f"{np.nanmedian(_vals(sweep_low, 'lung_subpleural_share')):.2f}), posterior "
              f"{np.nanmedian(_vals(sweep_low, 'posterior_share')):.2f} (lung "
              f"{np.nanmedian(_vals(sweep_low, 'lung_posterior_share')):.2f})")
    hu_rows = []
    for name in ("ggo", "consolidation"):
        for src in ("real", "generator"):
            v = hu[src][name]
            if v.size:
                q = np.percentile(v, [10, 25, 50, 75, 90])
                hu_rows.append([name, "MedSeg" if src == "real" else "generator"] + [f"{x:.0f}" for x in q])
    print()
    print(format_table(["HU (pooled pixels)", "source", "p10", "p25", "p50", "p75", "p90"], hu_rows))
    bins = ((0.0, 10.0), (10.0, 25.0), (25.0, 50.0), (50.0, 101.0))
    bin_rows = []
    for key in ("subpleural_share", "lung_subpleural_share", "posterior_share", "consolidation_share",
                "n_components_min"):
        for src, rows in (("MedSeg", medseg), ("generator", gen_slices_all)):
            load = _vals(rows, "load_percent")
            vals = _vals(rows, key)
            bin_rows.append([key, src] + [f"{np.nanmedian(vals[(load >= a) & (load < b)]):.3g}" for a, b in bins])
    summary["slice_by_load"] = {"bins_percent": [list(b) for b in bins], "rows": bin_rows}
    print("\nslices by slice lesion load (medians; generator: all its slices)")
    print(format_table(["statistic", "source", "< 10 %", "10-25 %", "25-50 %", ">= 50 %"], bin_rows))
    loads = sorted({round(r["requested_percent"], 3) for r in gen_sweep})
    sweep_rows = []
    for f in loads:
        rs = [r for r in gen_sweep if round(r["requested_percent"], 3) == f]
        row = [f"{f:g}"] + [f"{np.nanmedian(_vals(rs, k)):.3g}" for k in ("n_components_min", "largest_share")]
        row += [f"{np.nanmedian(_vals(rs, k)):.2f} ({np.nanmedian(_vals(rs, 'lung_' + k)):.2f})"
                for k in ("subpleural_share", "posterior_share", "lower_share")]
        row.append(f"{np.nanmedian(_vals(rs, 'minority_share')):.2f}")
        sweep_rows.append(row)
    print("\ngenerator across the load range (3D at 8 mm slices, medians; the lung itself in brackets)")
    print(format_table(["load %", "comp >= 0.1 ml", "largest share", "subpleural", "posterior", "lower",
                        "minority lung"], sweep_rows))

    result = {
        "generated_by": "scripts/lesion_stats.py",
        "real_sources": {"study": "MosMedData CT-1 lesion masks study_0255..0304 (CC BY-NC-ND 3.0, measured only)",
                         "slice": "MedSeg COVID-19 slices, Inf-Net split (non-commercial, measured only); HU from "
                                  "8-bit JPEG with the assumed window -1100..250"},
        "generator": {"base_cts": [b["name"] for b in bases], "sweep_loads_percent": list(args.loads),
                      "seeds": args.seeds, "z_step_mm": Z_STEP_MM, "matched_studies": len(gen_matched)},
        "slice_width_mm": width_mm,
        "summary": summary,
        "mosmed_0255_partial_lung": partial,
        "hu_percentiles": {src: {name: dict(zip(("p10", "p25", "p50", "p75", "p90"),
                                                np.percentile(v, [10, 25, 50, 75, 90]).tolist()))
                                 for name, v in d.items() if v.size} for src, d in hu.items()},
        "generator_sweep": [{k: r[k] for k in ("ct", "seed", "requested_percent", "lesion_ml", "n_components",
                                                "n_components_min", "largest_share", "subpleural_share",
                                                "lung_subpleural_share", "posterior_share", "lung_posterior_share",
                                                "lower_share", "lung_lower_share", "lower_share_lesion_range",
                                                "minority_share", "bilateral")} for r in gen_sweep],
    }
    if not args.no_figures:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = make_figures(args.out, mosmed, gen_matched, gen_sweep, medseg, gen_slices_all, hu, partial)
        result["figures"] = [p.name for p in paths]
        target = args.out / "lesion_statistics.json"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(_json_ready(result), indent=1), encoding="utf-8")
        os.replace(tmp, target)
        print("\nwrote " + ", ".join(str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p)
                                      for p in [*paths, target]))
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
