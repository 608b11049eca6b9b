"""The batch report: ``report.html`` (self-contained) and agreement with known truth.

:func:`write_report` writes one HTML file with every image embedded (base64 PNG): a summary of the
run, the grade distribution, one table row per study with a thumbnail of its ``overview.png``,
and, when truth is given (:func:`read_truth`), the agreement with it: a 5x5 grade confusion
matrix, a scatter of predicted against true lesion percentages, grade accuracy, within-one-grade
rate, lesion-% mean absolute error and Pearson r (:func:`agreement`).

The page works offline: no script, font, stylesheet or image is fetched (a Content-Security-Policy
allows only the embedded images and the inline style), the system's sans-serif font is used, and a
study's thumbnail and name are relative links to its full ``overview.png``. It prints on A4
(``@page { size: A4 }``): the study table starts on a new page and fits its width without shrinking,
its header repeats on every page and no row is split between pages.

Example:
    >>> from pipelines.report import agreement
    >>> a = agreement([(10.0, "CT-1", 12.0, "CT-1"), (40.0, "CT-2", 60.0, "CT-3")])
    >>> a["grade_accuracy"], a["within_one"], a["mae"]
    (0.5, 1.0, 11.0)
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monai_ext.data.studies import GRADES, grade_from_percent
from monai_ext.errors import CTSeverityError, InputNotFoundError
from monai_ext.io import atomic_write_text

__all__ = ["read_truth", "agreement", "write_report", "THUMBNAIL_WIDTH"]

#: width in pixels of the study thumbnails in the report
THUMBNAIL_WIDTH = 360

_GRADE_RANGES = {"CT-0": "none", "CT-1": "> 0 - 25 %", "CT-2": "> 25 - 50 %", "CT-3": "> 50 - < 75 %",
                 "CT-4": ">= 75 %"}


def read_truth(path: str | os.PathLike) -> dict[str, dict[str, object]]:
    """Known lesion percentages and/or grades per study, from a CSV file.

    The file needs a ``study`` column and ``lesion_percent`` and/or ``grade`` (as the ``truth.csv``
    written by ``ctseverity synth``). A missing grade is derived from the lesion percentage.

    Returns:
        ``{study: {"lesion_percent": float | None, "grade": str | None}}``.

    Raises:
        InputNotFoundError: no such file.
        CTSeverityError: missing columns, a bad value (naming the line), or no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError("truth file not found", p)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "study" not in fields or not ({"lesion_percent", "grade"} & set(fields)):
            raise CTSeverityError("a truth file needs a 'study' column and 'lesion_percent' and/or 'grade'", p)
        raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    truth: dict[str, dict[str, object]] = {}
    for line, r in enumerate(raw_rows, start=2):
        study = r.get("study", "")
        if not study:
            continue
        pct: float | None = None
        grade: str | None = None
        if r.get("lesion_percent", ""):
            try:
                pct = float(r["lesion_percent"])
                grade = grade_from_percent(pct)
            except ValueError:
                raise CTSeverityError(f"line {line}: lesion_percent {r['lesion_percent']!r} is not a number "
                                      "in 0..100", p) from None
        if r.get("grade", ""):
            g = r["grade"].upper().replace("CT", "CT-").replace("CT--", "CT-")
            if g not in GRADES:
                raise CTSeverityError(f"line {line}: grade {r['grade']!r} is not one of {', '.join(GRADES)}", p)
            grade = g
        truth[study] = {"lesion_percent": pct, "grade": grade}
    if not truth:
        raise CTSeverityError("the truth file has no rows", p)
    return truth


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def agreement(pairs: Sequence[tuple[float | None, str | None, float | None, str | None]]) -> dict[str, object]:
    """Agreement of predictions with truth.

    Args:
        pairs: ``(predicted_percent, predicted_grade, true_percent, true_grade)`` per study; ``None``
            where a value is unknown.

    Returns:
        ``n_grade`` (studies with both grades), ``grade_accuracy``, ``within_one`` (share off by at
        most one grade), ``confusion`` (5x5 counts, rows true grade, columns predicted, CT-0..CT-4),
        ``n_percent`` (studies with both percentages), ``mae`` (lesion-% mean absolute error, in
        percentage points) and ``pearson_r``; NaN where there is nothing to compute.

    Example:
        >>> agreement([(0.0, "CT-0", 0.0, "CT-0"), (30.0, "CT-2", 20.0, "CT-1")])["confusion"][1][2]
        1
    """
    conf = [[0] * len(GRADES) for _ in GRADES]
    gp, gt, pp, pt = [], [], [], []
    for p_pct, p_grade, t_pct, t_grade in pairs:
        if p_grade in GRADES and t_grade in GRADES:
            i, j = GRADES.index(t_grade), GRADES.index(p_grade)
            conf[i][j] += 1
            gt.append(i)
            gp.append(j)
        if p_pct is not None and t_pct is not None and math.isfinite(p_pct) and math.isfinite(t_pct):
            pp.append(float(p_pct))
            pt.append(float(t_pct))
    g_pred, g_true = np.array(gp), np.array(gt)
    x, y = np.array(pt), np.array(pp)
    nan = float("nan")
    return {
        "n_grade": len(gp),
        "grade_accuracy": float(np.mean(g_pred == g_true)) if gp else nan,
        "within_one": float(np.mean(np.abs(g_pred - g_true) <= 1)) if gp else nan,
        "confusion": conf,
        "n_percent": len(pp),
        "mae": float(np.mean(np.abs(y - x))) if pp else nan,
        "pearson_r": _pearson(x, y),
    }


def _num(v: object) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _png_b64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail_b64(path: Path, width: int = THUMBNAIL_WIDTH) -> str | None:
    """A downscaled copy of an image as base64 PNG, 128 colours (about 35 kB), ``None`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width > width:
                im = im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
            im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # a third of the bytes, looks the same
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grade_chart(pred: Sequence[str], true: Sequence[str] | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    xs = np.arange(len(GRADES))
    n_pred = [sum(g == k for g in pred) for k in GRADES]
    width = 0.38 if true is not None else 0.6
    bars = ax.bar(xs - (width / 2 if true is not None else 0), n_pred, width, color="#3b6ea8", label="predicted")
    ax.bar_label(bars, fontsize=8)
    if true is not None:
        n_true = [sum(g == k for g in true) for k in GRADES]
        bars_t = ax.bar(xs + width / 2, n_true, width, color="#bbbbbb", label="truth")
        ax.bar_label(bars_t, fontsize=8, color="#555555")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xticks(xs, [f"{g}\n{_GRADE_RANGES[g]}" for g in GRADES], fontsize=8)
    ax.set_ylabel("studies")
    ax.set_ylim(0, max([*n_pred, *(n_true if true is not None else []), 1]) * 1.2)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("grade distribution", fontsize=10)
    fig.tight_layout()
    return _png_b64(fig)


def _scatter(points: Sequence[tuple[str, float, float, bool]]) -> str:
    """Predicted against true lesion %, identity line, grade bands; green: grade right, red: wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    # the boxes where the predicted grade is the true one (CT-1..CT-4; CT-0 is the point 0, 0)
    for lo, hi in ((0, 25), (25, 50), (50, 75), (75, 100)):
        ax.add_patch(plt.Rectangle((lo, lo), hi - lo, hi - lo, color="#2a9d3f", alpha=0.08, lw=0))
    for b in (25, 50, 75):
        ax.axvline(b, color="#999999", lw=0.6, ls=":")
        ax.axhline(b, color="#999999", lw=0.6, ls=":")
    ax.plot([0, 100], [0, 100], color="#444444", lw=1, label="identity (predicted = truth)")
    if points:
        t = [p[1] for p in points]
        q = [p[2] for p in points]
        col = ["#2a9d3f" if p[3] else "#d62728" for p in points]
        ax.scatter(t, q, c=col, s=28, zorder=3, edgecolors="white", linewidths=0.5)
        if len(points) <= 15:  # names, alternately below and above the point so that neighbours do not collide
            for i, (name, x, y, _) in enumerate(sorted(points, key=lambda p: p[1])):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -10 if i % 2 == 0 else 5),
                            fontsize=6, color="#333333")
    ax.scatter([], [], c="#2a9d3f", s=28, label="grade right")
    ax.scatter([], [], c="#d62728", s=28, label="grade wrong")
    ax.set_xlim(-3, 100)
    ax.set_ylim(-3, 100)
    ax.set_aspect("equal")
    ax.set_xlabel("true lesion % of lung volume")
    ax.set_ylabel("predicted lesion % of lung volume")
    ax.set_title("lesion share: predicted vs truth\n(dotted: grade boundaries; green boxes: same grade)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    return _png_b64(fig)


def _fmt(v: object, digits: int = 1) -> str:
    f = _num(v)
    if f is None:
        return "&ndash;" if v in (None, "") else html.escape(str(v))
    return f"{f:.{digits}f}"


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f} %"


def _run_settings(out: Path, rows: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    """Method, lesion rule, threshold, minimum lesion volume and model of the ok studies."""
    seen: dict[str, set[str]] = {k: set() for k in ("method", "lesion rule", "threshold", "min lesion ml", "model")}
    for r in rows:
        if r.get("status") != "ok":
            continue
        try:
            res = json.loads((out / str(r["study"]) / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        seen["method"].add(str(res.get("method")))
        seen["lesion rule"].add(str(res.get("lesion_rule")))
        if res.get("threshold") is not None:
            seen["threshold"].add(f"{res['threshold']:g}")
        seen["min lesion ml"].add(f"{res.get('min_lesion_ml', 0):g}")
        model = res.get("model") or {}
        if model:
            seen["model"].add(f"{Path(str(model.get('bundle', ''))).name} (sha256 {str(model.get('sha256', ''))[:12]})")
    return [(k, ", ".join(sorted(v))) for k, v in seen.items() if v]


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px} .note{color:#555;font-size:12px;max-width:900px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} .card span{color:#666;font-size:12px}
.card.bad b{color:#c0392b} .card.good b{color:#2a7d3a}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
table.kv td:first-child{color:#666}
.studies td{vertical-align:middle} .studies img{display:block;width:%(tw)dpx;height:auto;border:0}
tr.failed td{background:#fdecea} .err{color:#c0392b;font-size:12px;max-width:420px;word-break:break-word}
tr.warned td{background:#fff4dc} .warn{color:#a15c00;font-weight:600}
.wrn{color:#a15c00;font-size:12px;max-width:420px;word-break:break-word}
.ok{color:#2a7d3a} .bad{color:#c0392b} .miss{color:#c0392b;font-weight:600}
.figs{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
table.conf td{width:46px;text-align:center} table.conf th{text-align:center}
table.conf td.diag{outline:2px solid #2a7d3a;outline-offset:-2px}
.studies td.name{overflow-wrap:anywhere;max-width:240px} .studies a{color:inherit}
.sub.path{overflow-wrap:anywhere}
@page{size:A4;margin:12mm 10mm}
@media print{
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}
body{margin:0;max-width:none;font-size:9pt}
h1{font-size:15pt} h2{font-size:12pt;margin:14px 0 6px;break-after:avoid}
.cards{margin:8px 0} .card{padding:4px 10px} .card b{font-size:14pt}
.figs img{max-width:100%%;height:auto} .figs{break-inside:avoid}
table.studies{width:100%%;font-size:8pt;table-layout:auto}
.studies th,.studies td{padding:2px 4px} .studies img{width:%(tw_print)s}
.studies td.name{max-width:none;min-width:30mm} .studies .sub{font-size:7pt} .err,.wrn{max-width:none;font-size:7.5pt}
.studies a{text-decoration:none}
thead{display:table-header-group} tr{break-inside:avoid} h2.studies{break-before:page}
}
"""

#: width of the study thumbnails on a printed A4 page (the table then fits the page with eleven columns)
_THUMBNAIL_PRINT_WIDTH = "32mm"

#: nothing but the embedded images and the inline style may load: the report stays complete offline, and a
#: browser refuses (and reports) anything else
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _confusion_html(conf: Sequence[Sequence[int]]) -> str:
    total = max(1, max(max(r) for r in conf))
    head = "".join(f"<th>{g}</th>" for g in GRADES)
    lines = [f"<table class='conf'><tr><th rowspan='2'>true grade</th><th colspan='{len(GRADES)}'>predicted grade"
             f"</th></tr><tr>{head}</tr>"]
    for i, g in enumerate(GRADES):
        cells = []
        for j in range(len(GRADES)):
            c = conf[i][j]
            alpha = 0.08 + 0.6 * c / total if c else 0
            color = "42,125,58" if i == j else "192,57,43"
            style = f" style='background:rgba({color},{alpha:.2f})'" if c else ""
            cls = " class='diag'" if i == j else ""
            cells.append(f"<td{cls}{style}>{c if c else '&middot;'}</td>")
        lines.append(f"<tr><th>{g}</th>{''.join(cells)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, object]],
                 truth: Mapping[str, Mapping[str, object]] | str | os.PathLike | None = None,
                 title: str = "ct-severity report") -> Path:
    """Write ``out_dir/report.html``, self-contained, atomically.

    Args:
        out_dir: the batch folder (study folders with ``overview.png`` and ``result.json``).
        rows: ``results.csv`` rows (see :data:`pipelines.batch.RESULT_COLUMNS`).
        truth: known values per study (:func:`read_truth` output or a CSV path); adds the
            agreement section.
        title: page title.

    Returns:
        The path of ``report.html``.
    """
    out = Path(out_dir)
    if truth is not None and not isinstance(truth, Mapping):
        truth = read_truth(truth)
    rows = sorted(rows, key=lambda r: str(r["study"]))
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    warned = [r for r in ok_rows if r.get("warnings")]
    pairs, points, true_grades = [], [], []
    if truth is not None:
        for r in ok_rows:
            t = truth.get(str(r["study"]))
            if t is None:
                continue
            p_pct, t_pct = _num(r.get("lesion_percent")), _num(t.get("lesion_percent"))
            t_grade = t.get("grade")
            pairs.append((p_pct, str(r.get("grade")), t_pct, t_grade))
            true_grades.append(str(t_grade) if t_grade else "")
            if p_pct is not None and t_pct is not None:
                points.append((str(r["study"]), t_pct, p_pct, r.get("grade") == t_grade))
    agree = agreement(pairs) if truth is not None else None

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    css = _CSS % {"tw": THUMBNAIL_WIDTH, "tw_print": _THUMBNAIL_PRINT_WIDTH}
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             "<link rel='icon' href='data:,'>",  # no favicon request
             f"<title>{html.escape(title)}</title>",
             f"<style>{css}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<div class='sub path'>{html.escape(str(out.resolve()))} &middot; written {now}</div>"]
    cards = [("studies", str(len(rows)), ""), ("graded", str(len(ok_rows)), "good" if ok_rows else ""),
             ("failed", str(len(failed)), "bad" if failed else "")]
    if warned:
        cards.append(("graded with warnings", str(len(warned)), "bad"))
    if agree is not None:
        cards += [("grade right", _pct(agree["grade_accuracy"]), ""),
                  ("within one grade", _pct(agree["within_one"]), ""),
                  ("lesion-% error (MAE)", "n/a" if math.isnan(agree["mae"]) else f"{agree['mae']:.1f} pp", "")]
    parts.append("<div class='cards'>" + "".join(
        f"<div class='card {c}'><b>{v}</b><span>{k}</span></div>" for k, v, c in cards) + "</div>")
    settings = _run_settings(out, rows)
    if settings:
        parts.append("<table class='kv'>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in settings) + "</table>")
    parts.append("<p class='note'>Grades follow the lesion share of the lung volume: CT-0 none, CT-1 up to 25 %, "
                 "CT-2 up to 50 %, CT-3 below 75 %, CT-4 75 % or more. Research use only, not for diagnosis.</p>")

    parts.append("<h2>Grades</h2><div class='figs'>")
    chart = _grade_chart([str(r.get("grade")) for r in ok_rows], true_grades if truth is not None else None)
    parts.append(f"<img alt='grade distribution' src='data:image/png;base64,{chart}'>")
    parts.append("</div>")

    if agree is not None:
        parts.append("<h2>Agreement with truth</h2>")
        if not pairs:
            parts.append("<p class='note'>No graded study has a row in the truth file (matched by study name).</p>")
        else:
            r_txt = "n/a" if math.isnan(agree["pearson_r"]) else f"{agree['pearson_r']:.3f}"
            mae_txt = "n/a" if math.isnan(agree["mae"]) else f"{agree['mae']:.2f} percentage points"
            n_g = agree["n_grade"]
            right = sum(agree["confusion"][i][i] for i in range(len(GRADES)))
            stats = [("studies compared", f"{len(pairs)} of {len(ok_rows)} graded"),
                     ("grade accuracy", f"{_pct(agree['grade_accuracy'])} ({right} of {n_g})"),
                     ("within one grade", _pct(agree["within_one"])),
                     ("lesion-% mean absolute error", mae_txt),
                     ("Pearson r (lesion %)", r_txt)]
            parts.append("<div class='figs'><div>")
            parts.append("<table class='kv'>" + "".join(
                f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in stats) + "</table>")
            parts.append("<p class='note'>Confusion matrix (rows: true grade, columns: predicted; "
                         "the diagonal is right):</p>")
            parts.append(_confusion_html(agree["confusion"]))
            parts.append("</div>")
            parts.append(f"<img alt='lesion percent scatter' src='data:image/png;base64,{_scatter(points)}'>")
            parts.append("</div>")

    parts.append("<h2 class='studies'>Studies</h2>")  # printed: the table starts on a page of its own
    note = ("Thumbnails: axial slices in the lung window (anterior up, patient's right on the left); cyan: lung "
            "contour, orange/yellow: heatmap, red: lesion contours. Click a thumbnail or a study's name for its full "
            "overview.png.")
    if truth is not None:
        note += " Grades in green match the truth, in red they differ."
    parts.append(f"<p class='note'>{note}</p>")
    head = ["overview", "study", "status", "grade"] + (["true grade"] if truth is not None else []) + \
        ["lesion %"] + (["true %"] if truth is not None else []) + \
        ["lung ml", "lesion ml", "lesions", "method", "seconds"]
    parts.append("<table class='studies'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>"
                 "<tbody>")
    for r in rows:
        study = str(r["study"])
        is_ok = r.get("status") == "ok"
        overview = out / study / "overview.png"
        thumb = _thumbnail_b64(overview) if is_ok else None
        # relative to report.html, so that the link works wherever the batch folder is copied
        href = html.escape(urllib.parse.quote(f"{study}/overview.png"))
        has_overview = is_ok and overview.is_file()
        img = (f"<a href='{href}' title='open the full overview'><img alt='{html.escape(study)}' "
               f"src='data:image/png;base64,{thumb}'></a>") if thumb and has_overview else ""
        t = (truth or {}).get(study) if truth is not None else None
        grade = html.escape(str(r.get("grade") or "")) if is_ok else "&ndash;"
        if t is not None and is_ok and t.get("grade"):
            grade = f"<span class='{'ok' if r.get('grade') == t.get('grade') else 'miss'}'>{grade}</span>"
        status = "<span class='ok'>ok</span>" if is_ok else (
            f"<span class='bad'>failed</span><div class='err'>{html.escape(str(r.get('error') or ''))}</div>")
        if is_ok and r.get("warnings"):  # repaired or suspicious input: the grade needs a look
            items = "".join(f"<div>{html.escape(w.strip())}</div>" for w in str(r["warnings"]).split("; "))
            status = f"<span class='warn'>ok, with warnings</span><div class='wrn'>{items}</div>"
        name = html.escape(Path(str(r.get("input"))).name)
        label = f"<a href='{href}'>{html.escape(study)}</a>" if has_overview else html.escape(study)
        cells = [img, f"<b>{label}</b><div class='sub'>{name}</div>", status, grade]
        if truth is not None:
            cells.append(html.escape(str(t.get("grade") or "")) if t else "&ndash;")
        cells.append(_fmt(r.get("lesion_percent")))
        if truth is not None:
            cells.append(_fmt(t.get("lesion_percent")) if t else "&ndash;")
        cells += [_fmt(r.get("lung_volume_ml"), 0), _fmt(r.get("lesion_volume_ml"), 1),
                  _fmt(r.get("n_lesions"), 0), html.escape(str(r.get("method") or "")), _fmt(r.get("seconds"), 1)]
        numeric = {"lesion %", "true %", "lung ml", "lesion ml", "lesions", "seconds"}
        tds = "".join(f"<td class='n'>{c}</td>" if h in numeric else f"<td class='name'>{c}</td>" if h == "study"
                      else f"<td>{c}</td>" for h, c in zip(head, cells))
        row_class = "failed" if not is_ok else "warned" if r.get("warnings") else "study-ok"
        parts.append(f"<tr class='{row_class}'>{tds}</tr>")
    parts.append("</tbody></table>")
    parts.append("<p class='note'>Per study: heatmap.nii.gz, lesion_mask.nii.gz and lung_mask.nii.gz on the input "
                 "grid, result.json (lesions, per-slice probabilities, timings); all rows in results.csv.</p>")
    parts.append("</body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts))
