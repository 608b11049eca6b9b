"""Regenerate ``docs/evaluation.md``: ``ctseverity evaluate`` with the default model on (a) semi-synthetic
studies made from the real chest CT and (b) the real MedSeg COVID-19 slices with expert masks, compared
with the claims of the papers behind the methods.

Rerun it whenever the default model changes: it writes the studies (once), runs both evaluations
into a work folder outside the repository (the figures of real data must not enter it), and
rewrites the page from the new tables, including which claims hold. With ``--skip-run`` it only
rewrites the page from the outputs of an earlier run.

Usage::

    python scripts/make_evaluation_doc.py [--work DIR] [--max-slices 8] [--max-images 24] [--threads 1]
    python scripts/make_evaluation_doc.py --skip-run

Real data comes from ``$CTSEVERITY_SHARED_DATA`` or ``../shared/data`` beside the repository.

Example:
    >>> from scripts.make_evaluation_doc import main
    >>> main(["--skip-run"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "CLAIMS", "paired_difference", "render", "auc_difference"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEFAULT_WORK = Path(tempfile.gettempdir()) / "ctseverity_evaluation"
DEFAULT_METHODS = "iba,hirescam,gradcam,igospp,lrp,igos"
#: I-GOS and iGOS++ with fewer iterations and integration steps than the papers (15 and 20): at the
#: papers' settings iGOS++ takes about 1-2 min per 192 x 192 slice on this CPU
DEFAULT_PARAMS = ("igospp.iterations=5", "igospp.ig_steps=10", "igos.iterations=5", "igos.ig_steps=10")

#: (claim, reference, method a, method b, metric, kind): kind "better" needs a - b better than 0 with
#: its 95 % interval; "match" holds unless a is worse than b with its whole interval
CLAIMS = (
    ("IBA localizes lesions more tightly than Grad-CAM", "Schulz et al. 2020; Demir et al. 2021 (COVID-19 CT)",
     "iba", "gradcam", "energy_pointing_game", "better"),
    ("IBA localizes lesions more tightly than Grad-CAM", "Schulz et al. 2020; Demir et al. 2021 (COVID-19 CT)",
     "iba", "gradcam", "best_iou", "better"),
    ("HiResCAM at least matches Grad-CAM on AOPC", "Draelos and Carin 2020", "hirescam", "gradcam", "aopc",
     "match"),
    ("iGOS++ beats I-GOS on insertion", "Khorram et al. 2021", "igospp", "igos", "insertion", "better"),
)
_HIGHER = {"aopc": True, "insertion": True, "deletion": False, "average_drop": False, "average_increase": True,
           "max_sensitivity": False, "haas": True, "pointing_game": True, "energy_pointing_game": True, "iou": True,
           "best_iou": True, "box_accuracy": True}


def _rel(p: Path | str) -> str:
    """A path as written in the page: relative to the repository when beside it, else absolute."""
    p = Path(p).resolve()
    try:
        return os.path.relpath(p, REPO_ROOT) if p.is_relative_to(REPO_ROOT.parent) else str(p)
    except ValueError:
        return str(p)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _fmt(v: object, digits: int) -> str:
    f = _num(v)
    return f"{f:.{digits}f}" if math.isfinite(f) else "-"


def _num(v: object) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def paired_difference(per_slice: Sequence[dict], a: str, b: str, metric: str, n: int = 1000,
                      seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of ``metric(a) - metric(b)`` over the slices where both are finite, with a 95 % bootstrap
    interval (paired: the slices are resampled), and the number of slices."""
    from monai_ext.metrics import bootstrap_ci

    val = {(r["method"], r["source"], r["slice"]): _num(r.get(metric)) for r in per_slice}
    keys = sorted({(r["source"], r["slice"]) for r in per_slice})
    diffs = [val[(a, *k)] - val[(b, *k)] for k in keys
             if math.isfinite(val.get((a, *k), math.nan)) and math.isfinite(val.get((b, *k), math.nan))]
    if not diffs:
        return math.nan, math.nan, math.nan, 0
    est, lo, hi = bootstrap_ci(diffs, n=n, seed=seed)
    return est, lo, hi, len(diffs)


def _verdict(kind: str, higher: bool, est: float, lo: float, hi: float) -> str:
    if not math.isfinite(est):
        return "not tested (no data)"
    sign = 1.0 if higher else -1.0
    lo_s, hi_s = sorted((sign * lo, sign * hi))
    if kind == "better":
        if lo_s > 0:
            return "**holds** (better, interval above 0)"
        if hi_s < 0:
            return "**does not hold** (worse, interval below 0)"
        return "**not shown** (interval includes 0)"
    if hi_s < 0:
        return "**does not hold** (worse, interval below 0)"
    if sign * est >= 0:
        return "**holds** (not worse)"
    return "**holds within the noise** (slightly worse, interval includes 0)"


def _evaluate_args(data: Path, out: Path, args: argparse.Namespace, images: bool, truth: Path | None) -> list[str]:
    argv = [str(data), "--methods", args.methods, "--out", str(out), "--seed", str(args.seed),
            "--bootstrap", str(args.bootstrap), "--steps", str(args.steps),
            "--sensitivity-slices", str(args.sensitivity_slices), "--sensitivity-samples",
            str(args.sensitivity_samples)]
    argv += ["--max-images", str(args.max_images)] if images else ["--max-slices", str(args.max_slices)]
    for p in args.param:
        argv += ["--param", p]
    if args.bundle:
        argv += ["--bundle", str(args.bundle)]
    if truth is not None:
        argv += ["--truth", str(truth), "--severity-methods", args.severity_methods]
    return argv


def _command(argv: Sequence[str]) -> str:
    shown = [_rel(a) if (os.sep in a and Path(a).exists()) else a for a in argv]
    return "ctseverity evaluate " + " ".join(shlex.quote(a) for a in shown)


def _load(out: Path) -> dict:
    rows = []
    for r in _read_csv(out / "metrics.csv"):
        rows.append({"method": r["method"], "metric": r["metric"], "n": int(r["n"]), "mean": _num(r["mean"]),
                     "ci_low": _num(r["ci_low"]), "ci_high": _num(r["ci_high"]),
                     "higher_is_better": r["higher_is_better"] == "True"})
    severity = _read_csv(out / "severity.csv") if (out / "severity.csv").exists() else []
    classifier = _read_csv(out / "classifier_slices.csv") if (out / "classifier_slices.csv").exists() else []
    return {"rows": rows, "per_slice": _read_csv(out / "per_slice.csv"), "severity": severity,
            "classifier": classifier, "summary": json.loads((out / "summary.json").read_text(encoding="utf-8"))}


def auc_difference(before: Sequence[dict], after: Sequence[dict], n: int = 1000, seed: int = 0
                   ) -> tuple[float, float, float, int]:
    """Slice AUC of ``after`` minus that of ``before`` over the slices both scored (rows of
    ``classifier_slices.csv``), with a 95 % paired bootstrap interval over slices (resamples that
    lack a class are drawn again). Returns ``(difference, low, high, slices)``; NaN without both classes."""
    import numpy as np

    from pipelines.bundle import slice_auc

    b = {(r["source"], r["slice"]): r for r in before}
    pairs = [(int(b[k]["label"]), float(b[k]["probability"]), float(r["probability"]))
             for r in after for k in [(r["source"], r["slice"])] if k in b and int(r["label"]) >= 0]
    if not pairs:
        return math.nan, math.nan, math.nan, 0
    y, pb, pa = (np.array(v) for v in zip(*pairs))
    if y.min() == y.max():
        return math.nan, math.nan, math.nan, len(y)
    est = slice_auc(pa, y) - slice_auc(pb, y)
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < n:
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            diffs.append(slice_auc(pa[i], y[i]) - slice_auc(pb[i], y[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(est), float(lo), float(hi), len(y)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import monai
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}")


def _dataset_section(title: str, res: dict, run: dict, n_boot: int) -> list[str]:
    from pipelines.evaluate import LOCALIZATION_METRICS, METRIC_ORDER, metrics_table

    s = res["summary"]
    methods = s["methods"]
    secs = s["seconds_per_slice"]
    lines = [f"## {title}", "",
             f"{s['n_slices']} slices from {s['n_sources']} {'studies' if s['kind'] == 'studies' else 'images'}, "
             f"{s['n_localizable']} with lesion inside the lung. Run time {run.get('seconds', math.nan) / 60:.1f} min "
             f"(load average {run.get('load_start', '?')} at the start, {run.get('load_end', '?')} at the end). "
             f"Mean [95 % bootstrap interval over slices, {n_boot} resamples]; ↑ higher is better, ↓ lower is "
             "better; s/slice is the attribution time per slice.", ""]
    constant = {m: c for m, c in s.get("constant_maps", {}).items() if c}
    if constant:
        lines += ["Constant maps (no evidence inside the lung; the metrics then see ties, broken in raster order): "
                  + ", ".join(f"{m} {c} of {s['n_slices']}" for m, c in constant.items()) + ".", ""]
    lines += ["Faithfulness and robustness:", "", metrics_table(res["rows"], methods, METRIC_ORDER[:7], secs), ""]
    if s["n_localizable"]:
        lines += ["Localization against the lesion masks:", "",
                  metrics_table(res["rows"], methods, LOCALIZATION_METRICS, {}), ""]
    if res["severity"]:
        lines += ["Severity agreement of the whole pipeline (`ctseverity run`, every lung slice of each study, "
                  "the bundle's calibration) with the inserted lesion loads:", "",
                  "| method | studies | grade accuracy | within one grade | lesion-% MAE (pp) | Pearson r |",
                  "|---|---|---|---|---|---|"]
        for r in res["severity"]:
            lines.append(f"| {r['method']} | {r['n_grade']} | {_fmt(r['grade_accuracy'], 2)} | "
                         f"{_fmt(r['within_one'], 2)} | {_fmt(r['mae'], 1)} | {_fmt(r['pearson_r'], 3)} |")
        lines.append("")
    return lines


#: the metrics of the guided before/after table (Zhou et al. report localization and Average Drop / Increase)
GUIDED_METRICS = ("energy_pointing_game", "iou", "best_iou", "average_drop", "average_increase")
#: largest slice-AUC change the guided model may show (the issue's "within 0.01")
GUIDED_AUC_TOLERANCE = 0.01


def _guided_section(before: dict, after: dict, runs: dict, meta: dict) -> list[str]:
    """Before/after table of the saliency-guided fine-tuning: the source model and the guided one on
    the same semi-synthetic slices."""
    sb, sa = before["summary"], after["summary"]
    auc_b = _num((sb.get("classifier") or {}).get("slice_auc"))
    auc_a = _num((sa.get("classifier") or {}).get("slice_auc"))
    n_auc = (sa.get("classifier") or {}).get("n_slices", "?")
    info = meta.get("guided_info") or {}
    training = info.get("training", {}) if isinstance(info, dict) else {}
    lines = ["## Saliency-guided fine-tuning: before and after", "",
             "The default model (before) and the same model fine-tuned with information-bottleneck saliency "
             "guidance (after; Zhou et al., BMVC 2022; `configs/train_guided.json`, made by "
             "`python scripts/train_guided_default.py --out GUIDED` on procedural phantoms only, "
             f"sha256 `{sa['model']['sha256'][:16]}`"
             + (f", from source `{str(training.get('source_sha256', ''))[:16]}`" if training.get("source_sha256")
                else "")
             + "), evaluated by `ctseverity evaluate` with the settings of (a) on the same slices of semi-synthetic "
             f"studies made from the real chest CT with {meta.get('guided_percents', '?')} % lesion load (another "
             "seed than (a); the clean study gives the negative slices). Slice AUC: the classifier over every lung "
             "slice of these studies (a slice is positive when it holds inserted lesion). Localization and "
             "Average Drop / Increase: mean [95 % bootstrap interval over slices].", "",
             "```bash", *([meta["guided_prepare"]] if meta.get("guided_prepare") else []),
             *(runs[k]["command"] for k in ("guided_before", "guided_after") if k in runs), "```", "",
             "| model | slice AUC | method | energy pointing game ↑ | IoU ↑ | best IoU ↑ | Average Drop ↓ | "
             "Average Increase ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for label, res, auc in (("before (default)", before, auc_b), ("after (guided)", after, auc_a)):
        by = {(r["method"], r["metric"]): r for r in res["rows"]}
        for method in res["summary"]["methods"]:
            cells = []
            for metric in GUIDED_METRICS:
                r = by.get((method, metric))
                cells.append("-" if r is None or not math.isfinite(r["mean"]) else
                             f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            lines.append(f"| {label} | {_fmt(auc, 3)} | {method} | " + " | ".join(cells) + " |")
    delta = auc_a - auc_b
    if math.isfinite(delta):
        ok = abs(delta) <= GUIDED_AUC_TOLERANCE
        interval = ""
        if before.get("classifier") and after.get("classifier"):
            _, lo, hi, n_pairs = auc_difference(before["classifier"], after["classifier"])
            if math.isfinite(lo):
                interval = f", paired 95 % bootstrap interval [{lo:+.3f}, {hi:+.3f}] over {n_pairs} slices"
        lines += ["", f"Slice AUC over {n_auc} lung slices: {auc_b:.3f} before, {auc_a:.3f} after ({delta:+.3f}"
                      f"{interval}): "
                      + (f"**within {GUIDED_AUC_TOLERANCE}** of the source model, as required."
                         if ok else f"**not within {GUIDED_AUC_TOLERANCE}** of the source model.")]
    guided_cfg = training.get("guided", {}) if isinstance(training, dict) else {}
    if guided_cfg.get("trainable"):
        updated = "the parameters under " + ", ".join(f"`{v}`" for v in guided_cfg["trainable"])
    elif guided_cfg.get("train_from"):
        updated = (f"the layers from `{guided_cfg['train_from']}` on (the earlier layers keep the source model's "
                   "weights)")
    else:
        updated = "every layer"
    lines += ["", f"The fine-tuning updated {updated}. The variants tried and their slice-AUC changes are in the "
                  "model card (`bundles/ct_severity/docs/README.md`)."]
    for method in sa["methods"]:
        ra = {r["metric"]: r for r in after["rows"] if r["method"] == method}
        rb = {r["metric"]: r for r in before["rows"] if r["method"] == method}
        better = [m for m in GUIDED_METRICS if m in ra and m in rb and math.isfinite(ra[m]["mean"])
                  and math.isfinite(rb[m]["mean"])
                  and (ra[m]["mean"] > rb[m]["mean"]) == _HIGHER[m] and ra[m]["mean"] != rb[m]["mean"]]
        worse = [m for m in GUIDED_METRICS if m in ra and m in rb and m not in better
                 and math.isfinite(ra[m]["mean"]) and math.isfinite(rb[m]["mean"]) and ra[m]["mean"] != rb[m]["mean"]]
        lines.append(f"- {method}: better after fine-tuning on {', '.join(better) or 'none'}; worse on "
                     f"{', '.join(worse) or 'none'} (means; see the intervals).")
    lines.append("")
    return lines


def _claims_section(results: dict[str, dict], n_boot: int) -> tuple[list[str], dict]:
    lines = ["## The papers' claims", "",
             "Paired differences over the same slices (method a minus method b, mean and 95 % bootstrap interval). "
             "The verdicts are computed from these intervals each time the page is generated.", "",
             "| claim | source | data | metric | a - b | slices | verdict |", "|---|---|---|---|---|---|---|"]
    verdicts: dict = {}
    for claim, ref, a, b, metric, kind in CLAIMS:
        for label, res in results.items():
            if a not in res["summary"]["methods"] or b not in res["summary"]["methods"]:
                continue
            est, lo, hi, n = paired_difference(res["per_slice"], a, b, metric, n=n_boot)
            v = _verdict(kind, _HIGHER[metric], est, lo, hi)
            verdicts.setdefault(claim, {}).setdefault(label, []).append((metric, v))
            diff = "-" if not math.isfinite(est) else f"{est:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"| {claim} | {ref} | {label} | {metric} | {diff} | {n} | {v} |")
    lines.append("")
    words = {"holds": "holds", "holds within": "holds within the noise", "does not hold": "does not hold",
             "not shown": "is not shown", "not tested": "is not tested"}
    for claim, by_data in verdicts.items():
        parts = []
        for label, items in by_data.items():
            said: dict[str, list[str]] = {}
            for metric, v in items:
                key = next(k for k in ("does not hold", "holds within", "holds", "not shown", "not tested") if k in v)
                said.setdefault(words[key], []).append(metric)
            parts.append(f"on {label} it " + "; it ".join(f"{w} ({', '.join(ms)})" for w, ms in said.items()))
        lines.append(f"- *{claim}*: " + "; ".join(parts) + ".")
    lines.append("")
    return lines, verdicts


def _notes(results: dict[str, dict], params: Sequence[str]) -> list[str]:
    notes = [
        "The default model was trained on lesions of the project's generator inserted into a few real chest CT "
        "and on phantoms (see the model card), never on real lesions: the MedSeg slices in particular (other "
        "scanners, 8-bit JPEGs) are outside its training distribution. The figures describe the maps of this "
        "model, not the methods in general.",
        "The intervals resample slices; slices of one study are correlated, so for (a) the intervals are "
        "optimistic.",
        "Semi-synthetic lesions are procedural GGO/consolidation inserted into a healthy real CT; their masks are "
        "exact by construction, which is why (a) measures localization against a perfect reference.",
        "MedSeg slices are 8-bit JPEGs without Hounsfield units, each in its own display window. Placing lung "
        "parenchyma (-850 HU) and soft tissue (+40 HU) at the gray values where they peak in each image puts the "
        "lower window edge between about -1375 and -980 HU and the upper edge between 77 and 370 HU (10th to "
        "90th percentile over the 98 slices); one window, -1100 to 250 HU (about the median), is assumed for all, "
        "so the classifier sees some slices brighter or darker than CT would give. The lung masks are estimated "
        "from the image (`pipelines/eval_slices.py`). All MedSeg slices hold lesions, so HAAS there only counts "
        "label 1.",
        "Box accuracy compares the box of the largest thresholded component with the box around all lesion "
        "pixels; bilateral, multifocal COVID-19 lesions make this strict.",
    ]
    igos = [p for p in params if p.split(".")[0] in ("igos", "igospp")]
    if igos:
        notes.append(f"I-GOS and iGOS++ ran with {', '.join(f'`{p}`' for p in igos)} instead of the papers' 15 "
                     "iterations and 20 integration steps, to fit the CPU budget; both use the same reduced "
                     "settings.")
    first = next(iter(results.values()))["summary"]
    try:
        info = json.loads((Path(first["model"]["bundle"]) / "models" / "model.json").read_text(encoding="utf-8"))
        net = str(info["network_def"]["_target_"]).rsplit(".", 1)[-1]
        cam = str(info.get("cam_layer") or "features.denseblock4")
    except (OSError, KeyError, ValueError):
        net, cam = "", ""
    if net == "DenseNet":
        notes.append(f"The default network is a MONAI DenseNet whose CAM layer (`{cam}`) is followed by global "
                     "average pooling and one linear layer (a batch norm and a ReLU before it where the CAM layer is "
                     "the last dense block). For such a head the gradient "
                     "is the same at every pixel except where the ReLU is off, so Grad-CAM and HiResCAM differ only "
                     "there (Draelos and Carin show they coincide for global pooling followed by one linear "
                     "layer): their near-identical figures are expected and test the AOPC claim only weakly.")
    for label, res in results.items():
        s = res["summary"]
        flat = s.get("constant_maps", {}).get("igos", 0)
        if "igos" in s["methods"] and 2 * flat >= s["n_slices"]:
            notes.append(f"I-GOS found no evidence on {flat} of the {s['n_slices']} slices of {label} (constant "
                         "maps). Its objective, the "
                         "lesion probability averaged along noisy paths from the blurred image, starts near 1 with "
                         "this model (the path noise, 20 % of the image std as in the reference, reads as lesion in "
                         "aerated lung), where the softmax has almost no gradient, and the line search accepts only "
                         "negligible steps, so the mask never moves; iGOS++ still gets a direction from its "
                         "noise-free combined terms and its insertion mask. There, I-GOS's scores are those of an "
                         "uninformative map, and that decides the iGOS++ vs I-GOS comparison.")
        aopc = [r for r in res["rows"] if r["metric"] == "aopc" and math.isfinite(r["mean"])]
        if aopc and all(r["mean"] <= 0 for r in aopc):
            notes.append(f"AOPC is at or below 0 for every method on {label}: replacing lung regions with uniform "
                         "noise (Samek et al.'s baseline) raises the lesion probability of this model, since noise "
                         "is brighter than aerated lung, so AOPC mostly measures that artefact. Deletion and "
                         "insertion (blurred baseline) are the more telling faithfulness figures here.")
    return notes


#: a block of the page between these markers (the localization benchmark's tables, written from
#: ``scripts/bench_localization.py``) is carried over when the page is rewritten
KEEP_START, KEEP_END = "<!-- kept on regeneration: start -->", "<!-- kept on regeneration: end -->"


def kept_block(page: str) -> str:
    """The text between :data:`KEEP_START` and :data:`KEEP_END` of an existing page ('' if none)."""
    start, end = page.find(KEEP_START), page.find(KEEP_END)
    if start < 0 or end < start:
        return ""
    return page[start + len(KEEP_START):end].strip("\n")


def render(results: dict[str, dict], runs: dict[str, dict], meta: dict) -> str:
    """The Markdown page from the outputs of both evaluations (``results``: label -> outputs)."""
    n_boot = next(iter(results.values()))["summary"]["settings"]["bootstrap"]
    first = next(iter(results.values()))["summary"]
    meta = dict(meta, params=sorted({f"{m}.{k}={json.dumps(v)}" for res in results.values()
                                     for m, kv in res["summary"].get("params", {}).items() for k, v in kv.items()}))
    model = first["model"]
    st = first["settings"]
    used = sorted({res["summary"]["model"]["sha256"] for res in results.values()})
    stale = len(used) > 1 or bool(meta.get("current_sha") and meta["current_sha"] not in used)
    version = None if stale else meta.get("version")
    lines = [
        "# Evaluation of the attribution methods",
        "",
        f"Generated by `python scripts/make_evaluation_doc.py` on {meta['date']} with the default model"
        f"{f' {version}' if version else ''} (`{_rel(model['bundle'])}`, sha256 `{model['sha256'][:16]}`, input "
        f"{model['size']} px, window {model['window'][0]:g} to {model['window'][1]:g} HU"
        + (f", the body beyond {model['flatten_beyond_mm']:g} mm of the lung flattened"
           if model.get("flatten_beyond_mm") is not None else ", lung surroundings as they are")
        + "). When the default model "
        "is retrained, rerun the script: it reruns both evaluations and rewrites this page, verdicts included.",
        "",
    ]
    if stale:
        lines += [f"**Out of date:** the tables below come from model(s) {', '.join(u[:16] for u in used)}, but the "
                  f"bundle now holds {str(meta.get('current_sha'))[:16]}; rerun the script.", ""]
    if meta.get("kept"):
        lines += [KEEP_START, meta["kept"].strip("\n"), KEEP_END, ""]
    lines += [
        f"Machine: {meta['machine']}. The runs shared the two cores with a concurrent model training "
        "(load averages below) and ran with one torch thread under `nice`, so the seconds per slice are upper "
        "bounds.",
        "",
        "## Commands",
        "",
        "```bash",
        meta["prepare"],
        *[runs[k]["command"] for k in results],
        "```",
        "",
        f"Settings: maps and scores of the {'lesion' if st['target'] == 'lesion' else 'predicted'} class "
        "(as the severity pipeline uses them), restricted to the lung; "
        f"insertion/deletion and MoRF with {st['steps']} steps, AOPC regions of {st['region_size']} px "
        f"(uniform-noise baseline, Samek et al.), insertion/deletion with a blurred baseline (RISE, iGOS++); "
        f"Max-Sensitivity on {st['sensitivity_slices']} slices per method with {st['sensitivity_samples']} "
        f"perturbations of radius {st['sensitivity_radius']}; IoU and box accuracy at {st['iou_threshold']} of the "
        "lung-normalized map, best IoU over thresholds 0.05..0.95; pointing game without tolerance. Method "
        f"parameters: the bundle's, plus {', '.join(f'`{p}`' for p in meta['params']) or 'none'}. The figures "
        f"(curves, example overlays) and per-slice values are in the `--out` folders under `{meta['work']}`, "
        "outside the repository: the data terms do not allow shipping images derived from the real data.",
        "",
    ]
    titles = {"semisynthetic": "(a) Semi-synthetic studies from the real chest CT",
              "medseg": "(b) Real MedSeg COVID-19 slices with expert masks"}
    descr = {
        "semisynthetic": f"The real chest CT (`{_rel(meta['ct'])}`, 512 x 512 x 141, no COVID-19 findings) with "
                         f"COVID-19-like lesions inserted at {meta['percents']} % of the lung volume by "
                         "`monai_ext.data.studies.write_studies` (seed 2024, threshold lung mask), with exact lesion "
                         "and lung masks; at most "
                         f"{st.get('max_slices')} lung slices per study (three quarters with lesion, seeded).",
        "medseg": f"`{_rel(meta['medseg'])}`: 98 axial slices of the MedSeg COVID-19 set with expert infection "
                  "masks (Inf-Net split); a seeded sample of "
                  f"{results.get('medseg', {}).get('summary', {}).get('n_slices', '?')} images. Gray values "
                  "are read as HU in an assumed window of -1100 to 250 HU and rotated by 180 degrees into the "
                  "classifier's layout.",
    }
    for key, res in results.items():
        section = _dataset_section(titles.get(key, key), res, runs.get(key, {}), n_boot)
        lines += section[:2] + [descr.get(key, ""), ""] + section[2:]
    claims, _ = _claims_section({("(a) semi-synthetic" if k == "semisynthetic" else "(b) MedSeg"): v
                                 for k, v in results.items()}, n_boot)
    lines += claims
    guided = meta.get("guided_results") or {}
    if "guided_before" in guided and "guided_after" in guided:
        lines += _guided_section(guided["guided_before"], guided["guided_after"], runs, meta)
    lines += ["## Caveats", ""] + [f"- {n}" for n in _notes(
        {("(a)" if k == "semisynthetic" else "(b)"): v for k, v in results.items()}, meta["params"])] + [""]
    return "\n".join(lines)


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluations (unless ``--skip-run``) and write the page; returns an exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work folder outside the repo ({DEFAULT_WORK})")
    p.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "evaluation.md", help="the page to write")
    p.add_argument("--ct", type=Path, default=SHARED / "chest_ct_itkelastix_00" / "chest_ct_00.nii.gz")
    p.add_argument("--medseg", type=Path, default=SHARED / "medseg_slices_infnet")
    p.add_argument("--percents", default="10,30,60", help="lesion loads of the semi-synthetic studies")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--severity-methods", dest="severity_methods", default="hirescam,gradcam,iba,lrp",
                   help="methods graded through the whole pipeline for (a) (iGOS++ takes hours per study on CPU)")
    p.add_argument("--param", action="append", default=None, help="attributor parameters (METHOD.KEY=VALUE)")
    p.add_argument("--bundle", help="bundle (default: the embedded one)")
    p.add_argument("--max-slices", dest="max_slices", type=int, default=12)
    p.add_argument("--max-images", dest="max_images", type=int, default=24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sensitivity-slices", dest="sensitivity_slices", type=int, default=6)
    p.add_argument("--sensitivity-samples", dest="sensitivity_samples", type=int, default=3)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--only", choices=["semisynthetic", "medseg", "guided_before", "guided_after"],
                   help="run one of the evaluations")
    p.add_argument("--skip-run", dest="skip_run", action="store_true", help="only rewrite the page")
    p.add_argument("--guided", type=Path, default=None,
                   help="a saliency-guided bundle (scripts/train_guided_default.py): add the before/after table")
    p.add_argument("--guided-methods", dest="guided_methods", default="hirescam,gradcam",
                   help="methods of the before/after table (default: the gradient saliencies the guidance trains)")
    p.add_argument("--guided-percents", dest="guided_percents", default="0,10,30,60",
                   help="lesion loads of the before/after studies (with a clean one, for the slice AUC)")
    args = p.parse_args(None if argv is None else list(argv))
    args.param = list(DEFAULT_PARAMS if args.param is None else args.param)

    import torch

    torch.set_num_threads(max(1, args.threads))
    from monai_ext.io import atomic_write_text
    from pipelines.cli import main as cli_main

    work = args.work.resolve()
    studies = work / "semisynthetic_studies"
    percents = [float(v) for v in args.percents.split(",")]
    prepare = (f"python -c \"from monai_ext.data.studies import write_studies; write_studies('{studies}', "
               f"{percents}, base='{_rel(args.ct)}', seed=2024, masks=True, lung_backend='threshold', "
               "prefix='real')\"")
    plan = {
        "semisynthetic": _evaluate_args(studies, work / "eval_semisynthetic", args, False, studies / "truth.csv"),
        "medseg": _evaluate_args(args.medseg, work / "eval_medseg", args, True, None),
    }
    runs_path = work / "runs.json"
    runs = json.loads(runs_path.read_text(encoding="utf-8")) if runs_path.exists() else {}
    guided_plan: dict[str, list[str]] = {}
    guided_studies = work / "guided_studies"
    guided_percents = [float(v) for v in args.guided_percents.split(",")]
    if args.guided is not None:
        for key, bundle in (("guided_before", args.bundle), ("guided_after", str(args.guided))):
            keep = [p for p in args.param if p.split(".")[0] in args.guided_methods.split(",")]
            sub = argparse.Namespace(**dict(vars(args), methods=args.guided_methods, bundle=bundle, param=keep))
            guided_plan[key] = _evaluate_args(guided_studies, work / f"eval_{key}", sub, False, None)
    if not args.skip_run:
        work.mkdir(parents=True, exist_ok=True)
        for key, argv_k in {**plan, **guided_plan}.items():
            if args.only and key != args.only:
                continue
            if key == "semisynthetic" and not (studies / "truth.csv").exists():
                from monai_ext.data.studies import write_studies

                write_studies(studies, percents, base=args.ct, seed=2024, masks=True, lung_backend="threshold",
                              prefix="real")
            if key in guided_plan and not (guided_studies / "truth.csv").exists():
                from monai_ext.data.studies import write_studies

                write_studies(guided_studies, guided_percents, base=args.ct, seed=2025, masks=True,
                              lung_backend="threshold", prefix="real")
            run = {"command": _command(argv_k), "load_start": _load_average()}
            t0 = time.perf_counter()
            code = cli_main(["evaluate", *argv_k])
            run.update(seconds=time.perf_counter() - t0, load_end=_load_average(), exit_code=code)
            if code != 0:
                print(f"ctseverity evaluate failed for {key} (exit code {code})")
                return code
            runs[key] = run
            atomic_write_text(runs_path, json.dumps(runs, indent=2))
    results = {k: _load(work / f"eval_{k}") for k in plan if (work / f"eval_{k}" / "metrics.csv").exists()}
    if not results:
        print(f"no evaluation outputs under {work}; run without --skip-run first")
        return 1
    for k in results:
        runs.setdefault(k, {"command": _command(plan[k])})
    guided_results = {k: _load(work / f"eval_{k}") for k in guided_plan
                      if (work / f"eval_{k}" / "metrics.csv").exists()}
    for k in guided_results:
        runs.setdefault(k, {"command": _command(guided_plan[k])})
    guided_info = None
    if args.guided is not None and (args.guided / "models" / "model.json").exists():
        guided_info = json.loads((args.guided / "models" / "model.json").read_text(encoding="utf-8"))
    from pipelines.bundle import bundle_path

    root = bundle_path(args.bundle)
    current = json.loads((root / "models" / "model.json").read_text(encoding="utf-8")).get("sha256")
    try:
        version = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        version = None
    stale = sorted({r["summary"]["model"]["sha256"][:16] for r in results.values()} - {str(current)[:16]})
    if stale:
        print(f"warning: outputs of model(s) {', '.join(stale)}, the bundle holds {str(current)[:16]}: rerun")
    meta = {"date": _dt.date.today().isoformat(), "machine": _machine(), "prepare": prepare, "work": str(work),
            "ct": args.ct, "medseg": args.medseg, "percents": "/".join(f"{v:g}" for v in percents),
            "current_sha": current, "version": version, "guided_results": guided_results,
            "guided_info": guided_info, "guided_prepare": (
                f"python -c \"from monai_ext.data.studies import write_studies; write_studies('{guided_studies}', "
                f"{guided_percents}, base='{_rel(args.ct)}', seed=2025, masks=True, lung_backend='threshold', "
                "prefix='real')\""), "guided_percents": "/".join(f"{v:g}" for v in guided_percents)}
    meta["kept"] = kept_block(args.doc.read_text(encoding="utf-8")) if args.doc.exists() else ""
    atomic_write_text(args.doc, render(results, runs, meta))
    print(f"written {args.doc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
