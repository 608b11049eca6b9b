"""Faithfulness, robustness and localization of attribution methods on a data set.

The maps of the lesion class (or the predicted class) are computed on lung slices (a
:class:`pipelines.eval_slices.EvalSlices`) and scored with :mod:`monai_ext.metrics`, restricted to the
lung: AOPC (MoRF), insertion and deletion AUC, Average Drop and Increase, HAAS and Max-Sensitivity, and
where lesion masks exist the pointing game, the energy pointing game, IoU (fixed threshold and best over
a sweep) and box accuracy (:func:`evaluate_method`, :func:`summarize`). :func:`write_outputs` writes the
tables, curves and example figures; :func:`severity_agreement` grades CT studies with the severity
pipeline and compares them with the truth. The command, ``ctseverity evaluate``, is
:mod:`pipelines.commands.evaluate`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from monai_ext.io import atomic_path, atomic_write_text
from pipelines.eval_slices import EvalSlices
from pipelines.methods import METHODS, parse_params

__all__ = [
    "EVAL_METHODS",
    "METRIC_ORDER",
    "LOCALIZATION_METRICS",
    "EvalSettings",
    "MethodEvaluation",
    "build_attributor",
    "evaluate_method",
    "summarize",
    "metrics_table",
    "write_outputs",
    "severity_agreement",
    "parse_methods",
    "parse_params",
    "classifier_summary",
]

log = logging.getLogger(__name__)

#: methods ``evaluate`` knows: those of the pipeline plus I-GOS (for the iGOS++ comparison)
EVAL_METHODS: tuple[str, ...] = (*METHODS, "igos")
#: metric columns, in table order
METRIC_ORDER: tuple[str, ...] = ("aopc", "insertion", "deletion", "average_drop", "average_increase",
                                 "max_sensitivity", "haas", "pointing_game", "energy_pointing_game", "iou",
                                 "best_iou", "box_accuracy")
#: the metrics that need lesion masks
LOCALIZATION_METRICS: tuple[str, ...] = METRIC_ORDER[7:]
_CURVES = {"insertion": ("curves_insertion.png", "fraction of lung pixels inserted", "P(lesion)"),
           "deletion": ("curves_deletion.png", "fraction of lung pixels deleted", "P(lesion)"),
           "aopc": ("curves_morf.png", "regions removed (MoRF step)", "P(lesion)")}
#: HU of healthy lung parenchyma, the value of the ``lung`` baseline
_LUNG_PARENCHYMA_HU = -850.0


@dataclass
class EvalSettings:
    """Metric settings of an evaluation (the defaults of ``ctseverity evaluate``)."""

    steps: int = 50
    region_size: int = 12
    baseline: str = "paper"
    target: str = "lesion"
    batch_size: int = 8
    sensitivity_slices: int = 8
    sensitivity_samples: int = 5
    sensitivity_radius: float = 0.02
    iou_threshold: float = 0.5
    bootstrap: int = 1000
    seed: int = 0


@dataclass
class MethodEvaluation:
    """What one method gives on the evaluation slices.

    Attributes:
        method: its name.
        maps: (N, 1, S, S) raw maps on the CPU.
        results: metric name -> :class:`~monai_ext.metrics.MetricResult` over all N slices (NaN
            where the metric was not computed: no lesion, no label, outside the sensitivity subset).
        seconds_per_slice: attribution wall time per slice.
        constant_maps: slices whose map is constant inside the lung (no evidence: the metrics then
            see ties, broken in raster order).
    """

    method: str
    maps: torch.Tensor
    results: dict = field(default_factory=dict)
    seconds_per_slice: float = float("nan")
    constant_maps: int = 0


def parse_methods(text: str, allowed: Sequence[str] = EVAL_METHODS) -> list[str]:
    """``"iba,hirescam"`` -> ``["iba", "hirescam"]``, checked and without repeats.

    Raises:
        ValueError: an unknown method or an empty list.
    """
    methods = list(dict.fromkeys(m.strip().lower() for m in str(text).split(",") if m.strip()))
    if not methods:
        raise ValueError("no method given; choose from " + ", ".join(allowed))
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(allowed)}")
    return methods


def build_attributor(method: str, model, params: dict | None = None):
    """The attributor of ``method`` for a loaded bundle model (:func:`pipelines.methods.make_attributor`;
    ``igos`` builds :class:`~monai_ext.attribution.IGOS`).

    Raises:
        ValueError: unknown method or a parameter the method does not take.
    """
    from pipelines.methods import make_attributor

    try:
        if method == "igos":
            from monai_ext.attribution import IGOS

            return IGOS(model.network, **(params or {}))
        return make_attributor(method, model, **(params or {}))
    except TypeError as exc:
        raise ValueError(f"--param for {method}: {exc}") from None


def _metrics(settings: EvalSettings, model) -> dict:
    """The metric objects of an evaluation, by name."""
    from monai_ext.metrics import (
        AOPC,
        HAAS,
        AverageDrop,
        AverageIncrease,
        BestMaskIoU,
        BoxAccuracy,
        Deletion,
        EnergyPointingGame,
        Insertion,
        MaskIoU,
        MaxSensitivity,
        PointingGame,
    )
    from monai_ext.transforms.slices import window_hu

    if settings.baseline not in ("paper", "blur", "uniform", "lung"):
        raise ValueError(f"--baseline must be paper, blur, uniform or lung, got {settings.baseline!r}")
    lung_value = float(window_hu(torch.tensor(_LUNG_PARENCHYMA_HU), model.window))

    def base(paper: str) -> dict:
        kind = paper if settings.baseline == "paper" else settings.baseline
        return {"baseline": "constant", "baseline_value": lung_value} if kind == "lung" else {"baseline": kind}

    chunk = max(32, 4 * settings.batch_size)
    return {
        "aopc": AOPC(region_size=settings.region_size, n_steps=settings.steps, seed=settings.seed, batch_size=chunk,
                     **base("uniform")),
        "insertion": Insertion(n_steps=settings.steps, seed=settings.seed, batch_size=chunk, **base("blur")),
        "deletion": Deletion(n_steps=settings.steps, seed=settings.seed, batch_size=chunk, **base("blur")),
        "average_drop": AverageDrop(),
        "average_increase": AverageIncrease(),
        "max_sensitivity": MaxSensitivity(perturb_radius=settings.sensitivity_radius,
                                          n_perturb_samples=settings.sensitivity_samples, seed=settings.seed),
        "haas": HAAS(input_range=(0.0, 1.0)),
        "pointing_game": PointingGame(tolerance=0),
        "energy_pointing_game": EnergyPointingGame(),
        "iou": MaskIoU(threshold=settings.iou_threshold),
        "best_iou": BestMaskIoU(),
        "box_accuracy": BoxAccuracy(threshold=settings.iou_threshold),
    }


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [idx[i:i + size] for i in range(0, idx.numel(), size)]


def _spread(result, idx: torch.Tensor, n: int):
    """A result over the slices ``idx`` as a result over all ``n`` slices (NaN elsewhere)."""
    from monai_ext.metrics import MetricResult

    def full(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        out = torch.full((n, *t.shape[1:]), math.nan, dtype=torch.float32)
        out[idx] = t.float().cpu()
        return out

    return MetricResult(scores=full(result.scores), curves=full(result.curves), steps=result.steps,
                        extras={k: full(v) for k, v in result.extras.items()})


def _empty_result(n: int):
    from monai_ext.metrics import MetricResult

    return MetricResult(scores=torch.full((n,), math.nan))


def evaluate_method(method: str, data: EvalSlices, model, settings: EvalSettings, params: dict | None = None,
                    progress: bool = True) -> MethodEvaluation:
    """Maps of one method on the evaluation slices and every metric on them.

    Args:
        method: one of :data:`EVAL_METHODS`.
        data: the slices (:func:`pipelines.eval_slices.load_eval_slices`).
        model: the loaded bundle model.
        settings: metric settings.
        params: attributor parameters.
        progress: show progress bars.

    Returns:
        A :class:`MethodEvaluation`.
    """
    from monai_ext.metrics import EmptyMaskWarning, MetricResult

    n = len(data)
    dev = model.device
    net = model.network
    target = 1 if settings.target == "lesion" else None
    attributor = build_attributor(method, model, params)
    metrics = _metrics(settings, model)
    everything = torch.arange(n)
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    maps = []
    for idx in tqdm(_chunks(everything, settings.batch_size), desc=f"{method}: maps", unit="batch",
                    disable=not progress):
        maps.append(attributor(data.images[idx].to(dev, dtype=torch.float32), target=target).detach().float().cpu())
    maps_t = torch.cat(maps)
    seconds = (time.perf_counter() - t0) / max(n, 1)
    if not bool(torch.isfinite(maps_t).all()):
        log.warning("%s: %d non-finite map values set to 0", method, int((~torch.isfinite(maps_t)).sum()))
        maps_t = torch.nan_to_num(maps_t, nan=0.0, posinf=0.0, neginf=0.0)

    labelled = data.labels >= 0
    localizable = data.localizable
    rng = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(n, generator=rng)
    sens_idx = torch.sort(order[:max(0, settings.sensitivity_slices)]).values
    plan = {name: everything for name in ("aopc", "insertion", "deletion", "average_drop", "average_increase")}
    plan["haas"] = torch.nonzero(labelled).flatten()
    plan["max_sensitivity"] = sens_idx
    for name in LOCALIZATION_METRICS:
        plan[name] = torch.nonzero(localizable).flatten()

    def explain(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return attributor(x, target=t)

    results = {}
    work = [(name, idx) for name in METRIC_ORDER for idx in _chunks(plan[name], settings.batch_size)]
    parts: dict[str, list] = {name: [] for name in METRIC_ORDER}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyMaskWarning)
        for name, idx in tqdm(work, desc=f"{method}: metrics", unit="batch", disable=not progress):
            m = metrics[name]
            x = data.images[idx].to(dev, dtype=torch.float32)
            kwargs = dict(model=net, target=target, lung_mask=data.lung[idx].to(dev))
            if name == "haas":
                kwargs["labels"] = data.labels[idx].to(dev)
            if name == "max_sensitivity":
                kwargs["attributor"] = explain
                torch.manual_seed(settings.seed)
            if name in LOCALIZATION_METRICS:
                kwargs["lesion_mask"] = data.lesion[idx].to(dev)
            parts[name].append((idx, m(x, maps_t[idx].to(dev), **kwargs)))
    for name in METRIC_ORDER:
        if parts[name]:
            idx = torch.cat([i for i, _ in parts[name]])
            results[name] = _spread(MetricResult.cat([r for _, r in parts[name]]), idx, n)
        else:
            results[name] = _empty_result(n)
    inside = torch.where(data.lung, maps_t, torch.full_like(maps_t, math.nan)).flatten(1)
    span = torch.nan_to_num(inside.nan_to_num(-math.inf).amax(1) - inside.nan_to_num(math.inf).amin(1), nan=0.0)
    constant = int((span <= 0).sum())
    if constant:
        log.warning("%s: %d of %d maps are constant inside the lung", method, constant, n)
    return MethodEvaluation(method, maps_t, results, seconds, constant)


def summarize(evaluation: MethodEvaluation, settings: EvalSettings, model) -> list[dict]:
    """One row per metric: n, mean and 95 % percentile bootstrap interval (HAAS: the accuracy ratio
    with a paired bootstrap)."""
    from monai_ext.metrics import METRICS, EmptyMaskWarning, bootstrap_ci

    metrics = _metrics(settings, model)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyMaskWarning)
        for name in METRIC_ORDER:
            res = evaluation.results[name]
            finite = ~torch.isnan(res.scores)
            if name == "haas":
                finite &= ~torch.isnan(res.extras.get("correct_original", res.scores))
            count = int(finite.sum())
            if count == 0:
                est = lo = hi = math.nan
            elif name == "haas":
                est, lo, hi = metrics["haas"].summarize(res, n=settings.bootstrap, seed=settings.seed)
            else:
                est, lo, hi = bootstrap_ci(res.scores, n=settings.bootstrap, seed=settings.seed)
            rows.append({"method": evaluation.method, "metric": name, "n": count, "mean": est, "ci_low": lo,
                         "ci_high": hi, "higher_is_better": bool(METRICS[name].higher_is_better)})
    return rows


# ------------------------------------------------------------------------------------------------
# outputs


def classifier_summary(data: EvalSlices, probs: torch.Tensor) -> dict:
    """Slice AUC of the model: over every lung slice of the studies (``data.screen_*``), or over the
    evaluated 2D images; NaN unless both labels occur."""
    from pipelines.bundle import slice_auc

    if data.screen_probability is not None and data.screen_labels is not None:
        p, y, what = data.screen_probability, data.screen_labels, "lung slices of the studies"
    else:
        p, y, what = probs, data.labels, "evaluated images"
    known = y >= 0
    p, y = p[known], y[known]
    return {"slice_auc": slice_auc(p.numpy(), y.numpy()), "n_slices": int(y.numel()),
            "n_positive": int((y == 1).sum()), "slices": what}


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if isinstance(v, float) and not math.isfinite(v) else
                    (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def metrics_table(rows: Sequence[dict], methods: Sequence[str], metrics: Sequence[str], seconds: dict) -> str:
    """A Markdown table, one row per method: ``mean [ci_low, ci_high]`` of each metric (rows as from
    :func:`summarize` or read back from ``metrics.csv``), and the seconds per slice when given."""
    by = {(r["method"], r["metric"]): r for r in rows}
    arrows = {r["metric"]: "↑" if r["higher_is_better"] else "↓" for r in rows}
    head = ["method", *[f"{m} {arrows.get(m, '')}".strip() for m in metrics]]
    if seconds:
        head.append("s/slice")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for meth in methods:
        cells = [meth]
        for m in metrics:
            r = by.get((meth, m))
            if r is None or not math.isfinite(r["mean"]):
                cells.append("-")
            else:
                cells.append(f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        if seconds:
            cells.append(_fmt(seconds.get(meth, math.nan), 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curves(evals: Sequence[MethodEvaluation], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (fname, xlabel, ylabel) in _CURVES.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for ev in evals:
            res = ev.results[name]
            if res.curves is None or res.steps is None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(res.curves.numpy(), axis=0)
            if np.isfinite(mean).any():
                ax.plot(res.steps.numpy(), mean, label=ev.method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean {ylabel}")
        ax.set_title({"aopc": "MoRF (AOPC)", "insertion": "insertion", "deletion": "deletion"}[name])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(out / fname) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        written.append(out / fname)
    return written


def _example_slices(data: EvalSlices, k: int) -> list[int]:
    """Up to ``k`` slices spread over the lesion sizes (largest first), else the first slices."""
    loc = torch.nonzero(data.localizable).flatten()
    if loc.numel() == 0:
        return list(range(min(k, len(data))))
    frac = data.lesion_fraction[loc]
    ordered = loc[torch.argsort(frac, descending=True)]
    picks = np.unique(np.linspace(0, ordered.numel() - 1, min(k, ordered.numel())).round().astype(int))
    return [int(ordered[i]) for i in picks]


def _view(a: np.ndarray) -> np.ndarray:
    # slices are (x, y) on the RAS grid: anterior up, the patient's right on the viewer's left
    return a.T[::-1, ::-1]


def _plot_examples(ev: MethodEvaluation, data: EvalSlices, probs: torch.Tensor, slices: Sequence[int],
                   path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(slices))
    fig, axes = plt.subplots(rows, 2, figsize=(6, 3 * rows + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, i in enumerate(slices):
        img = data.images[i, data.images.shape[1] // 2].numpy()
        lung = data.lung[i, 0].numpy()
        les = data.lesion[i, 0].numpy()
        m = np.where(lung, ev.maps[i, 0].numpy(), 0.0)
        top = float(m.max()) if m.size else 0.0
        heat = m / top if top > 0 else np.zeros_like(m)
        for c, ax in enumerate(axes[r]):
            ax.imshow(_view(img), cmap="gray", vmin=0, vmax=1)
            if c == 1:
                ax.imshow(np.ma.masked_less_equal(_view(heat), 0.05), cmap="inferno", alpha=0.5, vmin=0, vmax=1)
            if lung.any():
                ax.contour(_view(lung).astype(float), levels=[0.5], colors="cyan", linewidths=0.5)
            if les.any():
                ax.contour(_view(les).astype(float), levels=[0.5], colors="red", linewidths=0.7)
        where = data.source[i] if data.kind == "images" else f"{data.source[i]} z={data.index[i]}"
        axes[r][0].set_title(f"{where}", fontsize=7)
        axes[r][1].set_title(f"{ev.method}, P(lesion)={float(probs[i]):.2f}", fontsize=7)
    fig.suptitle(f"{ev.method}: map (lung only, scaled to its maximum); red: lesion mask, cyan: lung", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def _per_slice_text(evals: Sequence[MethodEvaluation], data: EvalSlices, probs: torch.Tensor) -> str:
    header = ["method", "source", "slice", "label", "lesion_fraction", "probability",
              *[m for m in METRIC_ORDER if m != "haas"], "haas_correct_ha", "haas_correct_original"]
    frac = data.lesion_fraction
    rows = []
    for ev in evals:
        for i in range(len(data)):
            vals = [float(ev.results[m].scores[i]) for m in METRIC_ORDER if m != "haas"]
            haas = ev.results["haas"]
            orig = haas.extras.get("correct_original")
            rows.append([ev.method, data.source[i], data.index[i], int(data.labels[i]), float(frac[i]),
                         float(probs[i]), *vals, float(haas.scores[i]),
                         float(orig[i]) if orig is not None else math.nan])
    return _csv_text(header, rows)


def write_outputs(out: Path, evals: Sequence[MethodEvaluation], data: EvalSlices, probs: torch.Tensor,
                  rows: Sequence[dict], summary: dict, severity: Sequence[dict] = (), n_examples: int = 4) -> dict:
    """Write the tables, curves, example overlays, per-slice values and ``summary.json`` into ``out``.

    Returns:
        name -> path of what was written.
    """
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    header = ["method", "metric", "n", "mean", "ci_low", "ci_high", "higher_is_better"]
    written["metrics.csv"] = atomic_write_text(out / "metrics.csv", _csv_text(
        header, [[r[h] for h in header] for r in rows]))
    methods = [ev.method for ev in evals]
    seconds = {ev.method: ev.seconds_per_slice for ev in evals}
    md = [f"# Attribution evaluation: {summary['data']}", "",
          f"{summary['n_slices']} slices from {summary['n_sources']} "
          f"{'studies' if data.kind == 'studies' else 'images'} ({summary['n_localizable']} with lesion inside "
          f"the lung), model `{summary['model']['bundle']}` (sha256 {summary['model']['sha256'][:12]}), "
          f"target class: {summary['settings']['target']}, device {summary['device']}.", "",
          "Mean and 95 % percentile bootstrap interval over slices "
          f"({summary['settings']['bootstrap']} resamples); ↑ higher is better, ↓ lower is better; "
          "HAAS is the accuracy ratio on heatmap-assisted images (paired bootstrap). s/slice: attribution time.",
          ""]
    clf = summary.get("classifier") or {}
    if clf.get("n_slices"):
        md += [f"Classifier: slice AUC {_fmt(clf['slice_auc'])} over {clf['n_slices']} {clf['slices']} "
               f"({clf['n_positive']} with lesion).", ""]
    md += ["## Faithfulness and robustness", "",
           metrics_table(rows, methods, METRIC_ORDER[:7], seconds), ""]
    if summary["n_localizable"]:
        md += ["## Localization (slices with lesion inside the lung)", "",
               metrics_table(rows, methods, LOCALIZATION_METRICS, {}), ""]
    if severity:
        md += ["## Severity agreement (whole studies, `ctseverity run` pipeline)", "",
               "| method | studies | grade accuracy | within one grade | lesion-% MAE (pp) | Pearson r |",
               "|---|---|---|---|---|---|"]
        md += [f"| {s['method']} | {s['n_grade']} | {_fmt(s['grade_accuracy'], 2)} | {_fmt(s['within_one'], 2)} | "
               f"{_fmt(s['mae'], 1)} | {_fmt(s['pearson_r'], 3)} |" for s in severity]
        md.append("")
    if summary.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    written["metrics.md"] = atomic_write_text(out / "metrics.md", "\n".join(md))
    written["per_slice.csv"] = atomic_write_text(out / "per_slice.csv", _per_slice_text(evals, data, probs))
    if data.screen_probability is not None and data.screen_slices:
        written["classifier_slices.csv"] = atomic_write_text(out / "classifier_slices.csv", _csv_text(
            ["source", "slice", "label", "probability"],
            [[src, z, int(y), float(p)] for (src, z), y, p in
             zip(data.screen_slices, data.screen_labels.tolist(), data.screen_probability.tolist())]))
    for p in _plot_curves(evals, out):
        written[p.name] = p
    slices = _example_slices(data, n_examples)
    for ev in evals:
        p = _plot_examples(ev, data, probs, slices, out / "examples" / f"{ev.method}.png")
        written[f"examples/{p.name}"] = p
    if severity:
        keys = ["method", "n_grade", "grade_accuracy", "within_one", "n_percent", "mae", "pearson_r"]
        written["severity.csv"] = atomic_write_text(out / "severity.csv", _csv_text(
            keys, [[s[k] for k in keys] for s in severity]))
    summary = dict(summary, outputs=sorted(written))
    written["summary.json"] = atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return written


# ------------------------------------------------------------------------------------------------
# severity agreement through the study pipeline


def severity_agreement(study_paths: Sequence[str], truth: str | Path, methods: Sequence[str], out: Path,
                       bundle: str | None, device: str, lung_mask: str = "auto", batch_size: int = 16,
                       params: dict | None = None, progress: bool = True, trust_bundle: bool = False) -> list[dict]:
    """Grade the studies with each method through :func:`pipelines.batch.run_batch` (into
    ``out/severity/<method>/``, resumable) and compare with the truth (:func:`pipelines.report.agreement`).

    Returns:
        one dict per method: the agreement figures plus ``method`` and ``failed``.
    """
    from pipelines.batch import run_batch
    from pipelines.report import agreement, read_truth
    from pipelines.study import PipelineConfig

    table = read_truth(truth)
    results = []
    for method in methods:
        config = PipelineConfig(method=method, bundle=bundle, lung_mask=lung_mask, device=device,
                                batch_size=batch_size, method_params=dict((params or {}).get(method, {})),
                                trust_bundle=trust_bundle).validate()
        summary = run_batch(list(study_paths), out / "severity" / method, config, truth=truth, progress=progress)
        pairs = [(float(r["lesion_percent"]), str(r["grade"]), table[r["study"]]["lesion_percent"],
                  table[r["study"]]["grade"]) for r in summary.rows if r["status"] == "ok" and r["study"] in table]
        a = agreement(pairs)
        a.pop("confusion")
        results.append({"method": method, **a, "failed": summary.n_failed})
    return results
