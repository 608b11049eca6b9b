"""Calibration: fit the heatmap threshold, minimum lesion volume, lesion rule and density delta.

Studies with known lesion percentages (or grades) are run once up to the study-normalized
heatmap; then every combination of lesion rule, threshold, minimum lesion volume and (for the
relative density rule and the density method) the rise above the study's normal lung level and (for the
density rules) how far a lesion grows from the heatmap through abnormal attenuation is scored by
how well it reproduces the known loads: mean absolute error of the lesion percent plus
:data:`GRADE_ERROR_POINTS` per wrong grade (a study with no lesion read as CT-1 by a few false voxels is
a wrong answer that the percent error alone barely sees), or the share of wrong grades where only
grades are known. The study call (the study probability below which a study has no lesion) is fitted
on the same grid. The best values are written into the bundle's
``models/model.json`` under ``calibration.methods.<method>``, which ``ctseverity run`` uses. The command
(``ctseverity calibrate``) is :mod:`pipelines.commands.calibrate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from monai_ext.data.studies import grade_from_percent
from monai_ext.io import atomic_write_text
from pipelines.severity import (
    ATTENUATION_RULES,
    LESION_RULES,
    abnormal_attenuation,
    grow_levels,
    normal_lung_level,
    relative_attenuation,
)

__all__ = ["CalibrationFit", "fit_calibration", "write_calibration",
           "THRESHOLDS", "MIN_VOLUMES", "DELTAS", "STUDY_CALLS", "GROW_MM", "GRADE_ERROR_POINTS"]

#: heatmap thresholds tried (the low ones: IBA, whose maps fall off steeply from their peaks, fits best there)
THRESHOLDS = (0.01, 0.02, 0.03) + tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2))
MIN_VOLUMES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
#: rises above the normal lung level tried for the relative density rule (HU)
DELTAS = (75.0, 100.0, 125.0, 150.0, 200.0, 250.0, 300.0)
#: lesion growth from the heatmap through abnormal attenuation tried for the density rules (mm)
GROW_MM = (0.0, 5.0, 10.0, 20.0)
#: study calls tried (0: every study may have lesions)
STUDY_CALLS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: lesion-% points added to the objective per wrong grade
GRADE_ERROR_POINTS = 10.0


@dataclass
class CalibrationFit:
    """The best calibration and how well it fits."""

    method: str
    threshold: float | None
    min_lesion_ml: float
    lesion_rule: str
    slice_gate: float
    density_delta_hu: float | None
    study_call: float
    mae_percent: float
    grade_accuracy: float
    n_studies: int
    per_rule: dict = field(default_factory=dict)
    per_study: list = field(default_factory=list)
    grow_mm: float = 0.0

    def values(self) -> dict:
        vals = {"min_lesion_ml": self.min_lesion_ml, "lesion_rule": self.lesion_rule, "slice_gate": self.slice_gate,
                "study_call": self.study_call}
        if self.threshold is not None:
            vals["threshold"] = self.threshold
        if self.density_delta_hu is not None:
            vals["density_delta_hu"] = self.density_delta_hu
        if self.lesion_rule in ATTENUATION_RULES and self.method != "density":
            vals["grow_mm"] = self.grow_mm
        return vals


def _component_sizes(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def _score(pred_pct: np.ndarray, truth: list[dict]) -> tuple[float, float, float]:
    """(objective, MAE of percents, grade accuracy); lower objective is better."""
    t_pct = np.array([np.nan if t["lesion_percent"] is None else t["lesion_percent"] for t in truth])
    grades = [grade_from_percent(float(min(100.0, max(0.0, p)))) for p in pred_pct]
    known = [(g, t["grade"]) for g, t in zip(grades, truth) if t.get("grade") is not None]
    acc = float(np.mean([g == tg for g, tg in known])) if known else float("nan")
    has_pct = ~np.isnan(t_pct)
    mae = float(np.mean(np.abs(pred_pct[has_pct] - t_pct[has_pct]))) if has_pct.any() else float("nan")
    if has_pct.any():
        objective = mae + (GRADE_ERROR_POINTS * (1.0 - acc) if known else 0.0)
    else:
        objective = 100.0 * (1.0 - acc)
    return objective, mae, (0.0 if np.isnan(acc) else acc)


def fit_calibration(evidence: Sequence, truth: Sequence[dict], method: str, slice_gate: float,
                    thresholds: Sequence[float] = THRESHOLDS, min_volumes: Sequence[float] = MIN_VOLUMES,
                    rules: Sequence[str] = LESION_RULES, deltas: Sequence[float] = DELTAS,
                    study_calls: Sequence[float] = STUDY_CALLS, grow_mm: Sequence[float] = GROW_MM) -> CalibrationFit:
    """Grid search over lesion rule x threshold x minimum lesion volume x study call (x density delta x growth).

    Args:
        evidence: per study, a :class:`pipelines.study.Evidence`.
        truth: per study, ``{"lesion_percent", "grade"}``.
        method: the attribution method (``density`` has no threshold, only the delta).
        slice_gate: the slice gate the evidence was computed with (recorded).
        thresholds, min_volumes, rules, deltas, study_calls, grow_mm: the grid (``density`` has no study call;
            growth applies to the density rules).

    Returns:
        The best :class:`CalibrationFit`, with the best fit of each rule in ``per_rule``.
    """
    if method == "density":
        rules, thresholds, study_calls = ("density",), (None,), (0.0,)
    n = len(evidence)
    probs = np.array([0.0 if np.isnan(ev.study_probability) else ev.study_probability for ev in evidence])
    lung_vox = np.array([float(ev.lung.sum()) for ev in evidence])
    voxel_ml = np.array([float(np.prod(ev.spacing)) / 1000.0 for ev in evidence])
    relative = ("density", "heatmap-relative")
    levels = [normal_lung_level(ev.hu, ev.lung, ev.spacing) for ev in evidence] \
        if any(r in relative for r in rules) else []
    # everything below looks at lung voxels only: work in each study's lung box (labelling the full
    # volume ~1600 times is what made the grid slow)
    boxes = [ndi.find_objects(ev.lung.astype(np.uint8))[0] if ev.lung.any() else (slice(0, 0),) * ev.lung.ndim
             for ev in evidence]
    lungs = [ev.lung[b] for ev, b in zip(evidence, boxes)]
    heats = [ev.heat[b] for ev, b in zip(evidence, boxes)]
    best_by_rule: dict[str, tuple] = {}
    grid = [(rule, delta) for rule in rules
            for delta in (deltas if rule in relative else (None,))]
    for rule, delta in tqdm(grid, desc=f"fit ({method})", unit="rule", leave=False):
        if rule in ("heatmap-density", "heatmap-dependent"):
            dens = [abnormal_attenuation(ev.hu, ev.lung, ev.spacing, dependent=rule == "heatmap-dependent")[b]
                    for ev, b in zip(evidence, boxes)]
        elif delta is not None:
            dens = [relative_attenuation(ev.hu, ev.lung, ev.spacing, delta, level=levels[i])[boxes[i]]
                    for i, ev in enumerate(evidence)]
        else:
            dens = [None] * n
        grows = tuple(grow_mm) if rule in ATTENUATION_RULES else (0.0,)
        # the highest heat reachable within each growth, once per study: a threshold is then one comparison
        levels_by_grow = [grow_levels(heats[i] * lungs[i], dens[i], evidence[i].spacing, grows)
                          if dens[i] is not None and rule != "density" else None for i in range(n)]
        for grow in grows:
            for thr in thresholds:
                sizes = []
                for i in range(n):
                    if rule == "density":
                        m = dens[i]
                    elif levels_by_grow[i] is not None:
                        m = levels_by_grow[i][float(grow)] >= thr
                        m &= levels_by_grow[i][float(grow)] > 0
                    else:
                        m = (heats[i] >= thr) & (heats[i] > 0) & lungs[i]
                    sizes.append(_component_sizes(m))
                for vmin in min_volumes:
                    pct_all = np.array([100.0 * s[s * voxel_ml[i] >= vmin].sum() / lung_vox[i]
                                        for i, s in enumerate(sizes)])
                    for call in study_calls:
                        pct = np.where(probs < call, 0.0, pct_all)
                        obj, mae, acc = _score(pct, list(truth))
                        cand = (obj, -acc, thr, vmin, mae, acc, pct, delta, call, float(grow))
                        if rule not in best_by_rule or cand[:2] < best_by_rule[rule][:2]:
                            best_by_rule[rule] = cand
        del levels_by_grow, dens
    best_rule = min(best_by_rule, key=lambda r: best_by_rule[r][:2])
    obj, _, thr, vmin, mae, acc, pct, delta, call, grow = best_by_rule[best_rule]
    per_rule = {r: {"threshold": v[2], "min_lesion_ml": v[3], "study_call": v[8], "mae_percent": round(v[4], 3),
                    "grade_accuracy": round(v[5], 3), **({"density_delta_hu": v[7]} if v[7] is not None else {}),
                    **({"grow_mm": v[9]} if r in ATTENUATION_RULES else {})}
                for r, v in best_by_rule.items()}
    per_study = [{"lesion_percent": round(float(p), 3), "grade": grade_from_percent(min(100.0, float(p))),
                  "truth_percent": t["lesion_percent"], "truth_grade": t["grade"],
                  "study_probability": round(float(q), 4)}
                 for p, t, q in zip(pct, truth, probs)]
    return CalibrationFit(method, None if thr is None else float(thr), float(vmin),
                          "heatmap-relative" if best_rule == "density" else best_rule, float(slice_gate),
                          None if delta is None else float(delta), float(call), float(mae), float(acc), n, per_rule,
                          per_study, float(grow))


def write_calibration(bundle: str | os.PathLike, fit: CalibrationFit, data_note: str = "") -> Path:
    """Store the fit in ``models/model.json`` of ``bundle`` (under ``calibration.methods.<method>``)."""
    path = Path(bundle) / "models" / "model.json"
    info = json.loads(path.read_text())
    cal = info.setdefault("calibration", {})
    cal.setdefault("methods", {})[fit.method] = {
        **fit.values(),
        "fit": {"mae_percent": round(fit.mae_percent, 3), "grade_accuracy": round(fit.grade_accuracy, 3),
                "n_studies": fit.n_studies, "per_rule": fit.per_rule, "data": data_note,
                "objective": f"MAE + {GRADE_ERROR_POINTS:g} points per wrong grade"},
    }
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True))
    return path
