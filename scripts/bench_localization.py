"""Localization benchmark on real lesions: how much of each method's heatmap falls on the lesions.

    python scripts/bench_localization.py [--methods iba,hirescam,gradcam,lrp[,igospp,density]] [--igospp-slices 4]
        [--datasets medseg,semi] [--max-slices 32] [--loads 10,30] [--ct CT [CT ...]] [--work DIR | --studies DIR]
        [--bundle PATH] [--lung-mask auto] [--param METHOD.KEY=VALUE] [--seed 0] [--json OUT]

Two data sets, one table each (rows: method and unit; columns: n, lesion share of the lung, energy
inside lesions with a 95 % percentile bootstrap interval, pointing game, IoU and Dice of the lesion
mask at the bundle's calibrated threshold, seconds of attribution per slice):

(a) **MedSeg** (``../shared/data/medseg_slices_infnet``, measure only): the axial COVID-19 slices
    with their expert infection masks, loaded by :func:`pipelines.eval_slices.load_eval_slices`.
    They are windowed 8-bit JPEGs without Hounsfield units: gray ``g`` is read as
    ``HU = -1100 + 1350 * g / 255`` (gray 0 = -1100 HU, 255 = +250 HU,
    :data:`pipelines.eval_slices.DEFAULT_IMAGE_WINDOW`), the lung is estimated from the image
    (:func:`pipelines.eval_slices.lung_mask_2d`), and the pixel size is taken from a 360 mm field of
    view (1.875 mm on the 192-pixel classifier grid). Each slice is a 1-slice study: the map of the
    lesion class times the lung, normalized as the pipeline normalizes a study
    (:func:`monai_ext.attribution.normalize_study`); energy and pointing game on that map (every
    slice, no slice gate); the lesion mask is the pipeline's rule
    (:func:`pipelines.severity.lesion_mask_from_heatmap`) on the 1-slice volume, with the HU of the
    classifier input (the assumed window), the bundle's threshold and rule for the method, slices
    the classifier scores below the slice gate predicting nothing (as in the pipeline); the minimum
    lesion volume is a 3D notion and is not applied unless ``--slice-thickness-mm`` gives the slices
    a thickness. A rule measuring density relative to the normal lung takes the slice's own level.

(b) **Semi-synthetic** studies on the two evaluation CT (``chest_ct_itkelastix_00``: Philips, 2 mm,
    smooth kernel; ``tcia_cptac_luad_C3N-00247``: Siemens B70f, 3 mm, sharp kernel; evaluation
    only) with the project's lesions at ``--loads`` percent of the lung, built by
    ``scripts/make_semisynthetic.py`` (native style) into ``--work`` (outside the repository; made
    once, reused) or read from ``--studies``. Each study goes through the per-study pipeline
    (:func:`pipelines.study.compute_evidence`, :func:`pipelines.study.lesion_mask`, the bundle's
    calibration): the study-normalized, lung-masked heatmap on the CT grid (slices the classifier
    scores below the gate are zero) and the lesion mask exactly as ``ctseverity run`` makes them.
    Two rows per method: *slice*: each axial slice with lesion inside the pipeline's lung (energy,
    pointing game and the 2D overlap of the 3D lesion mask on that slice); *study*: pooled over the
    whole study (energy over all lung voxels, the study's hottest voxel, 3D IoU / Dice).

Every column is over the units where the map has positive energy in the lung (``n``; "k of m"
when m - k units had none: slices the pipeline's slice gate left at zero, or maps without
evidence). Lesion share (chance): lesion pixels in the lung the map lives in / lung pixels (mean
over the units), what a map uniform over the lung would put inside the lesions (energy) and the
hit rate of a random point (pointing game). Energy: share of the map's positive energy inside the
lesion mask (:class:`monai_ext.metrics.EnergyPointingGame`); pointing game
(:class:`monai_ext.metrics.PointingGame`, tolerance 0): the map's maximum in the lung lies on a
lesion. IoU / Dice: against the whole lesion mask. Slice intervals treat slices as independent
(slices of one study are not). ``--methods density`` adds the pipeline's attenuation baseline
(no classifier: the abnormal-attenuation mask is the map; no pointing game, a 0/1 map has no maximum).

iGOS++ is slow: it runs on ``--igospp-slices`` slices per data set only, with fewer iterations
(printed; change them with ``--param igospp.iterations=N``). In (b) these are seeded slices with
lesion in the lung that the classifier scores above the slice gate, spread over the lesion-bearing
studies; each study goes through the pipeline's steps with only them attributed (and normalized
over their lung): slice rows only.

Example::

    OMP_NUM_THREADS=1 python scripts/bench_localization.py --methods hirescam,iba --max-slices 8 --loads 20
    OMP_NUM_THREADS=1 python scripts/bench_localization.py --methods iba,hirescam,gradcam,lrp,igospp \
        --max-slices 16 --loads 10,30 --json localization.json    # about 15 min on one core
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_ext.errors import CTSeverityError  # noqa: E402
from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS  # noqa: E402
from pipelines.methods import METHODS  # noqa: E402

__all__ = ["main", "run", "parse_args", "DEFAULT_METHODS", "EVAL_CTS", "MEDSEG", "IGOSPP_REDUCED", "COLUMNS", "Unit",
           "MethodRows", "format_table", "map_scores", "lesion_masks_2d", "build_studies", "evaluate_study",
           "evaluate_slices", "summarize"]

DEFAULT_METHODS = ("iba", "hirescam", "gradcam", "lrp")
#: what --methods takes: the attribution methods and ``density`` (the pipeline's attenuation baseline, no classifier)
ALL_METHODS = (*METHODS, "density")
#: the two evaluation CT (evaluation only, see ../shared/DESIGN.md), relative to the shared data folder
EVAL_CTS = ("chest_ct_itkelastix_00/chest_ct_00.nii.gz", "chest_ct_more/tcia_cptac_luad_C3N-00247/C3N-00247_ct.nii.gz")
MEDSEG = "medseg_slices_infnet"
#: iGOS++ settings of this benchmark (the class defaults are 15 iterations, 20 integrated-gradient steps)
IGOSPP_REDUCED = {"iterations": 5, "ig_steps": 10}
#: columns of the printed tables
COLUMNS = ("method", "unit", "n", "lesion share (chance)", "energy in lesions [95 % CI]", "pointing game", "IoU",
           "Dice", "s/slice")
DATASETS = ("medseg", "semi")


def shared_dir() -> Path:
    """The shared data folder (``$CTSEVERITY_SHARED_DATA`` or ``../shared/data`` beside the repository)."""
    return Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def machine_line(device: str) -> str:
    """CPU, cores, torch threads and versions, for the top of the tables."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f", GPU {torch.cuda.get_device_name(torch.device(device))}" if device.startswith("cuda") else ""
    return (f"machine: {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), device {device}{gpu}, python {platform.python_version()}")


# ------------------------------------------------------------------------------------------------
# per-unit scores


@dataclass
class Unit:
    """Scores of one unit (a slice or a study) for one method."""

    name: str
    chance: float
    energy: float
    pointing: float
    iou: float
    dice: float
    extra: dict = field(default_factory=dict)


@dataclass
class MethodRows:
    """The units of one method at one level, and the attribution time they took."""

    method: str
    unit: str
    units: list[Unit] = field(default_factory=list)
    seconds: float = 0.0
    slices_attributed: int = 0
    note: str = ""


def _dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(p.sum()) + int(t.sum())
    return float("nan") if total == 0 else 2.0 * int((p & t).sum()) / total


def _iou(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    union = int((p | t).sum())
    return float("nan") if union == 0 else int((p & t).sum()) / union


def map_scores(heat: torch.Tensor, lung: torch.Tensor, lesion: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(chance, energy, pointing) per sample of (B, 1, H, W) maps, lung and lesion masks.

    Chance: lesion pixels in the lung / lung pixels; energy: :class:`EnergyPointingGame` (NaN where
    the map has no positive energy in the lung); pointing: :class:`PointingGame` (tolerance 0).
    """
    from monai_ext.metrics import EmptyMaskWarning, EnergyPointingGame, PointingGame

    lung, lesion = lung.bool(), lesion.bool()
    chance = (lesion & lung).flatten(1).sum(1).double() / lung.flatten(1).sum(1).clamp(min=1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyMaskWarning)
        energy = EnergyPointingGame()(maps=heat.float(), lesion_mask=lesion, lung_mask=lung).scores
        pointing = PointingGame(tolerance=0)(maps=heat.float(), lesion_mask=lesion, lung_mask=lung).scores
    return chance.float(), energy.float(), pointing.float()


# ------------------------------------------------------------------------------------------------
# (a) 2D slices


def _slice_hu(images: torch.Tensor, model) -> np.ndarray:
    """(N, S, S) HU of the classifier input's centre channel (inverse of the model's window)."""
    lo, hi = model.window
    return (lo + images[:, model.context].double() * (hi - lo)).float().numpy()


def lesion_masks_2d(heat: torch.Tensor, lung: torch.Tensor, hu: np.ndarray, probs: torch.Tensor, cal: dict,
                    pixel_mm: float, thickness_mm: float | None) -> torch.Tensor:
    """The pipeline's lesion rule on each slice as a 1-slice volume: (N, 1, S, S) bool.

    Slices scored below the slice gate predict no lesion; the minimum lesion volume applies only
    with a slice thickness.
    """
    from pipelines.severity import lesion_mask_from_heatmap

    out = torch.zeros_like(lung, dtype=torch.bool)
    spacing = (pixel_mm, pixel_mm, thickness_mm or pixel_mm)
    min_ml = float(cal["min_lesion_ml"]) if thickness_mm else 0.0
    for i in range(heat.shape[0]):
        if float(probs[i]) < float(cal["slice_gate"]):
            continue
        m = lesion_mask_from_heatmap(heat[i, 0].numpy()[..., None], lung[i, 0].numpy()[..., None], cal["threshold"],
                                     cal["lesion_rule"], ct=hu[i][..., None], spacing=spacing, min_volume_ml=min_ml,
                                     density_delta_hu=cal["density_delta_hu"], grow_mm=float(cal.get("grow_mm") or 0.0))
        out[i, 0] = torch.from_numpy(np.ascontiguousarray(m[..., 0]))
    return out


def evaluate_slices(method: str, data, model, cal: dict, params: dict, pick: torch.Tensor, seed: int,
                    pixel_mm: float, thickness_mm: float | None, batch_size: int = 8) -> MethodRows:
    """Maps, study normalization per slice, scores and lesion masks of one method on 2D slices."""
    from monai_ext.attribution import normalize_study
    from pipelines.bundle import predict_slices
    from pipelines.evaluate import build_attributor
    from pipelines.severity import relative_attenuation, remove_small_components

    images, lung, lesion = data.images[pick], data.lung[pick], data.lesion[pick]
    hu = _slice_hu(images, model)
    if method == "density":  # the classical baseline of the pipeline: abnormal attenuation, no classifier
        spacing = (pixel_mm, pixel_mm, thickness_mm or pixel_mm)
        t0 = time.perf_counter()
        heat = torch.stack([torch.from_numpy(relative_attenuation(
            hu[i][..., None], lung[i, 0].numpy()[..., None], spacing, cal["density_delta_hu"])[..., 0])
            for i in range(images.shape[0])])[:, None].float()
        seconds = time.perf_counter() - t0
        probs = torch.ones(images.shape[0])
        min_ml = float(cal["min_lesion_ml"]) if thickness_mm else 0.0
        pred = torch.stack([torch.from_numpy(remove_small_components(h[0].numpy()[..., None] > 0, spacing,
                                                                     min_ml)[..., 0]) for h in heat])[:, None]
    else:
        attributor = build_attributor(method, model, params)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        maps = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(model.device, dtype=torch.float32)
            maps.append(attributor(x, target=1).detach().float().cpu())
        seconds = time.perf_counter() - t0
        raw = torch.nan_to_num(torch.cat(maps)) * lung
        heat = torch.stack([normalize_study(r, m) if bool((r > 0).any()) else torch.zeros_like(r)
                            for r, m in zip(raw, lung)]).float()
        probs = predict_slices(model.network, images, device=model.device)
        pred = lesion_masks_2d(heat, lung, hu, probs, cal, pixel_mm, thickness_mm)
    chance, energy, pointing = map_scores(heat, lung, lesion)
    if method == "density":  # a 0/1 map has no maximum to point with
        pointing = torch.full_like(pointing, math.nan)
    rows = MethodRows(method, "slice", seconds=seconds, slices_attributed=int(images.shape[0]))
    for k, i in enumerate(pick.tolist()):
        rows.units.append(Unit(data.source[i], float(chance[k]), float(energy[k]), float(pointing[k]),
                               _iou(pred[k], lesion[k]), _dice(pred[k], lesion[k]),
                               {"probability": round(float(probs[k]), 5), "gated": float(probs[k]) < cal["slice_gate"],
                                "predicted_share": float((pred[k] & lung[k]).sum() / lung[k].sum().clamp(min=1))}))
    return rows


# ------------------------------------------------------------------------------------------------
# (b) semi-synthetic studies


def _load_make_semisynthetic():
    spec = importlib.util.spec_from_file_location("make_semisynthetic", REPO_ROOT / "scripts" / "make_semisynthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _ct_prefix(path: Path) -> str:
    from pipelines.discovery import study_name

    return study_name(path)


def build_studies(work: Path, cts: Sequence[Path], loads: Sequence[float], seed: int) -> tuple[Path, list[str]]:
    """The semi-synthetic studies of ``cts`` at ``loads`` in ``work/semisynthetic_seed<seed>``, made
    by ``scripts/make_semisynthetic.py`` (native style) where missing; returns the folder and the
    study names. A study's name fixes its content (CT, load, position in the load list, seed)."""
    out = work / f"semisynthetic_seed{seed}"
    truth = out / "truth.csv"
    names: list[str] = []
    for ct in cts:
        prefix = _ct_prefix(ct)
        wanted = [f"{prefix}_native_{i:02d}_f{int(round(load)):02d}" for i, load in enumerate(loads)]
        have = set()
        if truth.exists():
            with open(truth, newline="") as fh:
                have = {r["study"] for r in csv.DictReader(fh)}
        complete = all(w in have and (out / f"{w}.nii.gz").exists() and (out / f"{w}_lesion.nii.gz").exists()
                       for w in wanted)
        if not complete:
            _load_make_semisynthetic().make_studies(out, [ct], list(loads), style="native", seed=seed, kind="mixed",
                                                    prefix=prefix)
        names += wanted
    return out, names


def _records(folder: Path, names: Sequence[str] | None) -> list:
    from pipelines.eval_slices import find_eval_studies

    records = [r for r in find_eval_studies(folder) if r.mask]
    if names is not None:
        by_name = {r.study: r for r in records}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise CTSeverityError(f"studies missing after building: {', '.join(missing)}", folder)
        records = [by_name[n] for n in names]
    if not records:
        raise CTSeverityError("no study with a lesion mask (<study>_lesion.nii.gz) found", folder)
    return records


def _slice_units(study: str, method: str, heat: np.ndarray, lung: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                 zs: Sequence[int]) -> list[Unit]:
    """Per-axial-slice units of a study's heatmap and lesion mask on the CT grid (X, Y, Z)."""
    if not zs:
        return []

    def stack(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a[:, :, list(zs)], 2, 0)))[:, None]

    chance, energy, pointing = map_scores(stack(heat), stack(lung), stack(truth))
    if method == "density":  # a 0/1 map has no maximum to point with
        pointing = torch.full_like(pointing, math.nan)
    return [Unit(f"{study}:{z}", float(chance[k]), float(energy[k]), float(pointing[k]),
                 _iou(pred[:, :, z], truth[:, :, z]), _dice(pred[:, :, z], truth[:, :, z])) for k, z in enumerate(zs)]


def evaluate_study(method: str, record, model, params: dict, lung_backend: str, seed: int
                   ) -> tuple[list[Unit], Unit | None, float, int]:
    """One study through the per-study pipeline (:func:`pipelines.study.compute_evidence`,
    :func:`pipelines.study.lesion_mask`, the bundle's calibration): per-slice units (slices with
    lesion inside the pipeline's lung), the pooled study unit (``None`` without lesion in the lung),
    attribution seconds and the number of slices attributed."""
    from pipelines.datasets import load_ct_mask
    from pipelines.discovery import Study
    from pipelines.study import PipelineConfig, compute_evidence, lesion_mask, resolve_calibration

    config = PipelineConfig(method=method, lung_mask=lung_backend, seed=seed, method_params=dict(params))
    cal = resolve_calibration(config, model)
    ev = compute_evidence(Study(record.study, str(record.path)), config, model, cal["slice_gate"],
                          cal["density_delta_hu"])
    pred = lesion_mask(ev, method, cal)
    truth = np.asarray(load_ct_mask(record.mask, ev.ct)[0]) > 0
    lung = ev.lung
    if method == "density":  # no classifier: every lung slice counts as attributed
        n_attributed = int(lung.any(axis=(0, 1)).sum())
    else:
        n_attributed = sum(s["probability"] >= cal["slice_gate"] for s in ev.slice_info)
    inside = truth & lung
    zs = [int(z) for z in np.flatnonzero(inside.any(axis=(0, 1)))]
    units = _slice_units(record.study, method, ev.heat, lung, truth, pred, zs)
    study_unit = None
    if inside.any():
        def flat(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).reshape(1, 1, -1, 1)

        chance, energy, pointing = map_scores(flat(ev.heat), flat(lung), flat(truth))
        if method == "density":
            pointing = torch.full_like(pointing, math.nan)
        n_lung = max(int(lung.sum()), 1)
        study_unit = Unit(record.study, float(chance[0]), float(energy[0]), float(pointing[0]), _iou(pred, truth),
                          _dice(pred, truth),
                          {"lesion_percent_pipeline_lung": round(100.0 * int(inside.sum()) / n_lung, 3),
                           "lesion_share_inside_pipeline_lung": round(int(inside.sum()) / max(int(truth.sum()), 1), 4),
                           "predicted_percent": round(100.0 * int((pred & lung).sum()) / n_lung, 3),
                           "study_probability": None if method == "density" else round(float(ev.study_probability), 5)})
    return units, study_unit, float(ev.timings.get("attribution", 0.0)), int(n_attributed)


def evaluate_study_slices(method: str, record, model, params: dict, lung_backend: str, seed: int, k: int
                          ) -> tuple[list[Unit], float, int]:
    """A slow method on ``k`` slices of a study: the pipeline's steps (lung mask, slices, classifier,
    attribution, maps pasted on the CT grid times the lung, study normalization, lesion rule) with
    the attribution run only on ``k`` seeded slices among those with lesion in the lung that the
    classifier scores above the slice gate (as if they were its only positive slices). Returns their units,
    the attribution seconds and the slices attributed."""
    import zlib

    from monai_ext.attribution import normalize_study
    from monai_ext.io import load_ct
    from monai_ext.transforms import LungMask
    from monai_ext.transforms.slices import extract_slices, paste_slices
    from pipelines.bundle import predict_slices
    from pipelines.datasets import load_ct_mask
    from pipelines.evaluate import build_attributor
    from pipelines.study import Evidence, PipelineConfig, lesion_mask, resolve_calibration

    cal = resolve_calibration(PipelineConfig(method=method, lung_mask=lung_backend), model)
    ct = load_ct(record.path)
    spacing = [float(v) for v in ct.pixdim.tolist()]
    lung_t = LungMask(backend=lung_backend)(ct)
    lung = np.asarray(lung_t[0]) > 0
    truth = np.asarray(load_ct_mask(record.mask, ct)[0]) > 0
    stack = extract_slices(ct, lung_t, spacing, **model.slice_kwargs)
    probs = predict_slices(model.network, stack.images, device=model.device)
    inside = (truth & lung).any(axis=(0, 1))
    candidates = [j for j, z in enumerate(stack.indices.tolist()) if probs[j] >= cal["slice_gate"] and inside[z]]
    rng = np.random.default_rng([int(seed), zlib.crc32(record.study.encode())])
    chosen = sorted(int(j) for j in rng.permutation(candidates)[:k])
    if not chosen:
        return [], 0.0, 0
    maps = torch.zeros(len(stack), 1, stack.images.shape[-2], stack.images.shape[-1])
    attributor = build_attributor(method, model, params)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    maps[chosen] = attributor(stack.images[chosen].to(model.device, dtype=torch.float32), target=1).float().cpu()
    seconds = time.perf_counter() - t0
    raw = paste_slices(torch.nan_to_num(maps), stack).numpy() * lung
    zs = [int(stack.indices[j]) for j in chosen]
    # as the pipeline: one scale for the study, from the lung voxels with evidence
    heat = np.asarray(normalize_study(raw, lung), dtype=np.float32) if (raw > 0).any() else np.zeros_like(raw)
    ev = Evidence(ct, np.asarray(ct[0]), lung, heat, spacing, [], float("nan"), {})
    pred = lesion_mask(ev, method, cal)
    return _slice_units(record.study, method, heat, lung, truth, pred, zs), seconds, len(chosen)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)] if parts else []


# ------------------------------------------------------------------------------------------------
# tables


def summarize(rows: MethodRows, bootstrap: int, seed: int) -> dict:
    """n, chance, energy (mean, 95 % bootstrap interval), pointing game, IoU, Dice, seconds per slice.

    Every column is over the units whose map has positive energy in the lung (``n``); ``n_units``
    counts all units (slices the pipeline gated, or maps without evidence, are the difference).
    """
    from monai_ext.metrics import bootstrap_ci

    kept = [u for u in rows.units if math.isfinite(u.energy)]

    def mean(key: str) -> float:
        v = np.array([getattr(u, key) for u in kept], dtype=np.float64)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else float("nan")

    energy = torch.tensor([u.energy for u in kept], dtype=torch.float64)
    est, lo, hi = bootstrap_ci(energy, n=bootstrap, seed=seed) if kept else (math.nan,) * 3
    return {"method": rows.method, "unit": rows.unit, "n": len(kept), "n_units": len(rows.units),
            "chance": mean("chance"), "energy": float(est), "energy_ci": [float(lo), float(hi)],
            "pointing_game": mean("pointing"), "iou": mean("iou"), "dice": mean("dice"),
            "seconds_per_slice": rows.seconds / rows.slices_attributed if rows.slices_attributed else float("nan"),
            "note": rows.note}


def _f(v: float, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def format_table(summaries: Sequence[dict]) -> str:
    """A markdown table with :data:`COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summaries:
        n = f"{s['n']}" if s["n_units"] == s["n"] else f"{s['n']} of {s['n_units']}"
        energy = f"{_f(s['energy'])} [{_f(s['energy_ci'][0])}, {_f(s['energy_ci'][1])}]"
        secs = _f(s["seconds_per_slice"], 3 if s["seconds_per_slice"] < 1 else 2)
        lines.append(f"| {s['method']} | {s['unit']} | {n} | {_f(s['chance'])} | {energy} | {_f(s['pointing_game'])} "
                     f"| {_f(s['iou'])} | {_f(s['dice'])} | {secs} |")
    return "\n".join(lines)


def _calibration_note(model, methods: Sequence[str]) -> str:
    from pipelines.study import PipelineConfig, resolve_calibration

    known = model.calibration.get("methods", {})
    parts = []
    for m in methods:
        cal = resolve_calibration(PipelineConfig(method=m), model)
        if m == "density":
            parts.append(f"density: {cal['density_delta_hu']:g} HU above the normal lung level, min "
                         f"{cal['min_lesion_ml']:g} ml")
            continue
        tag = "" if m in known else ", not calibrated in the bundle: pipeline defaults"
        parts.append(f"{m}: threshold {cal['threshold']:g}, rule {cal['lesion_rule']}, min "
                     f"{cal['min_lesion_ml']:g} ml, slice gate {cal['slice_gate']:g}{tag}")
    return "calibration: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# the two data sets


def run_medseg(args: argparse.Namespace, model, methods: Sequence[str], params: dict) -> dict:
    from pipelines.eval_slices import DEFAULT_IMAGE_WINDOW, load_eval_slices
    from pipelines.study import PipelineConfig, resolve_calibration

    data = load_eval_slices(args.medseg, model, max_images=args.max_slices, seed=args.seed,
                            progress=not args.quiet)
    local = torch.nonzero(data.localizable).flatten()
    if local.numel() == 0:
        raise CTSeverityError("no slice with a lesion inside the lung", args.medseg)
    lo, hi = DEFAULT_IMAGE_WINDOW
    pixel_mm = 360.0 / model.size
    notes = [f"{len(data)} images loaded, {local.numel()} with lesion inside the lung evaluated",
             f"HU assumed: HU = {lo:g} + {hi - lo:g} * gray / 255 (gray 0 = {lo:g} HU, 255 = {hi:+g} HU); "
             f"lung estimated from the image; pixel {pixel_mm:.3f} mm (360 mm field of view)",
             "per slice: map x lung, normalized per slice (normalize_study); energy and pointing game on every "
             "slice; lesion mask = the pipeline's rule on the 1-slice volume, slices below the slice gate predict "
             "nothing; " + (f"minimum lesion volume with {args.slice_thickness_mm:g} mm slices"
                             if args.slice_thickness_mm else "minimum lesion volume not applied (2D)"),
             *data.notes]
    gen = torch.Generator().manual_seed(args.seed)
    igos_pick = torch.sort(local[torch.randperm(local.numel(), generator=gen)[:args.igospp_slices]]).values
    summaries, per_unit = [], {}
    for m in methods:
        cal = resolve_calibration(PipelineConfig(method=m), model)
        pick = igos_pick if m == "igospp" else local
        rows = evaluate_slices(m, data, model, cal, params.get(m, {}), pick, args.seed, pixel_mm,
                               args.slice_thickness_mm)
        if m == "igospp":
            rows.note = f"{pick.numel()} slices, " + ", ".join(f"{k}={v}" for k, v in params.get(m, {}).items())
        gated = sum(bool(u.extra.get("gated")) for u in rows.units)
        if gated:
            rows.note = (rows.note + "; " if rows.note else "") + f"{gated} slice(s) below the slice gate"
        summaries.append(summarize(rows, args.bootstrap, args.seed))
        per_unit[m] = [u.__dict__ for u in rows.units]
    return {"title": f"(a) MedSeg COVID-19 slices with expert masks ({args.medseg})", "notes": notes,
            "rows": summaries, "units": per_unit}


def run_semi(args: argparse.Namespace, model, methods: Sequence[str], params: dict) -> dict:
    from tqdm.auto import tqdm

    if args.studies:
        folder, names = Path(args.studies), None
        origin = f"studies from {folder}"
    else:
        work = Path(args.work).resolve()
        if work == REPO_ROOT or REPO_ROOT in work.parents:
            raise ValueError(f"--work must lie outside the repository, got {work}")
        cts = [Path(c) for c in args.ct]
        for c in cts:
            if not c.exists():
                raise CTSeverityError("no such CT", c)
        folder, names = build_studies(work, cts, args.loads, args.synth_seed)
        origin = (f"built from {', '.join(c.name for c in cts)} at loads {', '.join(f'{v:g}' for v in args.loads)} % "
                  f"(native style, seed {args.synth_seed}) in {folder}")
    records = _records(folder, names)
    notes = [origin, f"studies: {len(records)}; lung: the pipeline's ({args.lung_mask} backend); heatmap: the "
             "study-normalized, lung-masked map of the pipeline (slices below the slice gate are zero)",
             "slice: axial slices with lesion inside the pipeline's lung; study: pooled over the study (energy over "
             "all lung voxels, hottest voxel, 3D IoU/Dice); IoU/Dice against the whole lesion mask"]
    summaries, per_unit, studies_info = [], {}, {}
    for m in methods:
        p = params.get(m, {})
        if m == "igospp":
            lesion_recs = [r for r in records if r.label != 0]
            rows = MethodRows(m, "slice", note=f"{args.igospp_slices} slices (seeded, lesion in the lung, above the "
                              "slice gate; normalized over their lung), "
                              + ", ".join(f"{k}={v}" for k, v in p.items()))
            for rec, k in zip(lesion_recs, _split(args.igospp_slices, len(lesion_recs))):
                if k:
                    units, secs, n_att = evaluate_study_slices(m, rec, model, p, args.lung_mask, args.seed, k)
                    rows.units += units
                    rows.seconds += secs
                    rows.slices_attributed += n_att
            summaries.append(summarize(rows, args.bootstrap, args.seed))
            per_unit[m] = {"slice": [u.__dict__ for u in rows.units]}
            continue
        slice_rows, study_rows = MethodRows(m, "slice"), MethodRows(m, "study (pooled)")
        for rec in tqdm(records, desc=f"{m}: studies", unit="study", disable=args.quiet):
            units, su, secs, n_att = evaluate_study(m, rec, model, p, args.lung_mask, args.seed)
            slice_rows.units += units
            for r in (slice_rows, study_rows):
                r.seconds += secs
                r.slices_attributed += n_att
            if su is not None:
                study_rows.units.append(su)
                studies_info.setdefault(rec.study, {"truth_lesion_percent": rec.lesion_percent,
                                                    **{k: v for k, v in su.extra.items() if k != "predicted_percent"}})
                studies_info[rec.study][f"predicted_percent_{m}"] = su.extra["predicted_percent"]
        summaries += [summarize(r, args.bootstrap, args.seed) for r in (slice_rows, study_rows)]
        per_unit[m] = {"slice": [u.__dict__ for u in slice_rows.units], "study": [u.__dict__ for u in study_rows.units]}
    return {"title": "(b) semi-synthetic studies", "notes": notes, "rows": summaries,
            "units": per_unit, "studies": studies_info}


# ------------------------------------------------------------------------------------------------


def _loads(text: str) -> list[float]:
    try:
        loads = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--loads must be comma-separated percents, got {text!r}") from None
    if not loads or any(not 0.0 < v < 100.0 for v in loads):
        raise ValueError(f"--loads must be percents in (0, 100), got {text!r}")
    return loads


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    shared = shared_dir()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(ALL_METHODS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--igospp-slices", type=int, default=4, metavar="N",
                   help="slices iGOS++ runs on, per data set (default 4)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="medseg, semi or both (default both)")
    p.add_argument("--medseg", default=str(shared / MEDSEG), help="MedSeg slices folder (default the shared copy)")
    p.add_argument("--max-slices", type=int, default=32, metavar="N",
                   help="MedSeg images to load (seeded, lesion slices first; default 32)")
    p.add_argument("--slice-thickness-mm", type=float, default=None,
                   help="give the MedSeg slices this thickness so that the minimum lesion volume applies (default: "
                        "not applied)")
    p.add_argument("--loads", default="10,30", help="lesion percents of the semi-synthetic studies (default 10,30)")
    p.add_argument("--ct", nargs="+", default=[str(shared / c) for c in EVAL_CTS],
                   help="clean CT for the semi-synthetic studies (default the two evaluation CT)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ct-severity-bench-localization"),
                   help="where the semi-synthetic studies are built and reused (outside the repository)")
    p.add_argument("--studies", default=None,
                   help="use these studies (truth.csv or studies with <study>_lesion.nii.gz) instead of building")
    p.add_argument("--synth-seed", type=int, default=2024, help="seed of the semi-synthetic studies (default 2024)")
    p.add_argument("--bundle", default=None, help="bundle folder (default the embedded bundle)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lung-mask", default="auto", choices=LUNG_BACKENDS, help="lung mask backend for (b) (as run)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="attributor option (repeatable); iGOS++ defaults here: "
                        + ", ".join(f"{k}={v}" for k, v in IGOSPP_REDUCED.items()))
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling, attribution and bootstrap seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the numbers here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        from pipelines.evaluate import parse_methods

        args.methods = parse_methods(args.methods, ALL_METHODS)
        args.datasets = parse_methods(args.datasets, DATASETS)
        args.loads = _loads(args.loads)
        for name, value in (("--igospp-slices", args.igospp_slices), ("--max-slices", args.max_slices),
                            ("--bootstrap", args.bootstrap)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if args.slice_thickness_mm is not None and args.slice_thickness_mm <= 0:
            raise ValueError(f"--slice-thickness-mm must be positive, got {args.slice_thickness_mm}")
    except ValueError as exc:
        p.error(str(exc))
    return args


def method_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """``--param`` values per method, iGOS++ starting from :data:`IGOSPP_REDUCED`; checked."""
    from pipelines.methods import check_params, parse_params

    params = parse_params(items, tuple(METHODS))
    if "igospp" in methods:
        params["igospp"] = {**IGOSPP_REDUCED, **params.get("igospp", {})}
    for m, p in params.items():
        check_params(m, p)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; errors in the input end it with one line and exit status 2."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    except (CTSeverityError, ValueError, FileNotFoundError) as exc:
        print(f"bench_localization: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """The benchmark for parsed arguments (see :func:`parse_args`)."""
    from pipelines.bundle import load_model

    params = method_params(args.param, args.methods)
    model = load_model(args.bundle, device=args.device)
    print(machine_line(args.device))
    print(f"model: {model.bundle} ({model.info['network_def']['_target_']}, {model.size}x{model.size}, sha256 "
          f"{model.checksum[:12]}); {_calibration_note(model, args.methods)}")
    if "igospp" in args.methods:
        from pipelines.methods import CLASSES

        defaults = {k: v.default for k, v in inspect.signature(CLASSES["igospp"].__init__).parameters.items()
                    if k in params["igospp"]}
        print("iGOS++ on " + f"{args.igospp_slices} slices per data set with "
              + ", ".join(f"{k}={v} (default {defaults.get(k, '?')})" for k, v in params["igospp"].items()))
    result = {"machine": machine_line(args.device), "model": {"bundle": str(model.bundle), "sha256": model.checksum},
              "settings": {k: v for k, v in vars(args).items() if k not in ("quiet",)}, "params": params,
              "datasets": {}}
    runners = {"medseg": run_medseg, "semi": run_semi}
    t0 = time.perf_counter()
    for name in args.datasets:
        res = runners[name](args, model, args.methods, params)
        result["datasets"][name] = res
        print(f"\n{res['title']}")
        for note in res["notes"]:
            print(f"  - {note}")
        for s in res["rows"]:
            if s["note"]:
                print(f"  - {s['method']} ({s['unit']}): {s['note']}")
        print()
        print(format_table(res["rows"]))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        from monai_ext.io import atomic_write_text

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(_plain(result), indent=1, allow_nan=False))
        print(f"\nwrote {out}")
    return 0


def _plain(o: object) -> object:
    """JSON-ready: NaN and infinities as null, paths and numpy scalars as plain values."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
