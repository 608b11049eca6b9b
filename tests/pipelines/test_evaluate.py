"""``ctseverity evaluate``: metric tables, curves, overlays and per-slice values on CT studies and on
real 2D image/mask pairs (MedSeg COVID-19 slices), and one-line errors for bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.eval_slices import (
    DEFAULT_IMAGE_WINDOW,
    find_image_pairs,
    image_to_hu,
    load_eval_slices,
    lung_mask_2d,
    pick_slices,
)
from pipelines.evaluate import LOCALIZATION_METRICS, METRIC_ORDER

REPO_ROOT = Path(__file__).resolve().parents[2]

#: fast metric settings for the tests
FAST = ["--steps", "6", "--bootstrap", "100", "--sensitivity-slices", "2", "--sensitivity-samples", "2",
        "--examples", "2"]
#: plausible range of each metric's mean
RANGES = {"aopc": (-1, 1), "insertion": (0, 1), "deletion": (0, 1), "average_drop": (0, 100),
          "average_increase": (0, 100), "max_sensitivity": (0, math.inf), "haas": (0, math.inf),
          **{m: (0, 1) for m in LOCALIZATION_METRICS}}


@pytest.fixture(scope="module")
def eval_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny phantom studies (0 and 30 % lesion) with lesion and lung masks and truth.csv."""
    from monai_ext.data.studies import write_studies

    out = tmp_path_factory.mktemp("eval_studies")
    write_studies(out, [0, 30], shape=(64, 64, 16), spacing=(6.0, 6.0, 12.0), masks=True, seed=3, progress=False)
    return out


def _evaluate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", "evaluate", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _metrics_csv(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {(r["method"], r["metric"]): r for r in csv.DictReader(fh)}


def _check_table(out: Path, methods: list[str], localization: bool) -> dict[tuple[str, str], dict]:
    table = _metrics_csv(out / "metrics.csv")
    assert {m for m, _ in table} == set(methods)
    for method in methods:
        for metric in METRIC_ORDER:
            row = table[(method, metric)]
            if metric in LOCALIZATION_METRICS and not localization:
                continue
            mean, lo, hi = float(row["mean"]), float(row["ci_low"]), float(row["ci_high"])
            assert all(math.isfinite(v) for v in (mean, lo, hi)), row
            low, high = RANGES[metric]
            assert low - 1e-6 <= mean <= high + 1e-6, row
            assert lo - 1e-9 <= mean <= hi + 1e-9, row
            assert int(row["n"]) >= 1
    md = (out / "metrics.md").read_text(encoding="utf-8")
    for method in methods:
        assert sum(line.startswith(f"| {method} |") for line in md.splitlines()) >= (2 if localization else 1)
    for name in ("curves_insertion.png", "curves_deletion.png", "curves_morf.png",
                 *[f"examples/{m}.png" for m in methods]):
        with Image.open(out / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    return table


def test_evaluate_studies_cams(capsys, tmp_path, tiny_bundle, eval_studies, one_torch_thread):
    out = tmp_path / "eval"
    code, stdout, err = _evaluate(capsys, str(eval_studies), "--methods", "hirescam,gradcam", "--out", str(out),
                                  "--bundle", str(tiny_bundle), "--max-slices", "3", *FAST)
    assert code == 0, err
    assert "| hirescam |" in stdout
    table = _check_table(out, ["hirescam", "gradcam"], localization=True)
    # the 30 % study gives 3 lesion slices (3 of 3, lesion first), the healthy one 3 negatives
    assert int(table[("hirescam", "aopc")]["n"]) == 6
    assert int(table[("hirescam", "pointing_game")]["n"]) == 3
    assert int(table[("hirescam", "max_sensitivity")]["n"]) == 2
    with open(out / "per_slice.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {r["method"] for r in rows} == {"hirescam", "gradcam"}
    healthy = [r for r in rows if r["source"].endswith("f00")]
    sick = [r for r in rows if r["source"].endswith("f30")]
    assert len(healthy) == len(sick) == 6
    assert all(r["label"] == "0" and r["pointing_game"] == "" for r in healthy)
    assert all(r["label"] == "1" and 0 < float(r["lesion_fraction"]) <= 1 for r in sick)
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["kind"] == "studies" and summary["n_slices"] == 6 and summary["n_localizable"] == 3
    assert set(summary["constant_maps"]) == {"hirescam", "gradcam"}
    assert all(0 <= c <= 6 for c in summary["constant_maps"].values())
    # the classifier is scored on every lung slice of both studies, not only the 6 evaluated ones
    clf = summary["classifier"]
    assert clf["slices"] == "lung slices of the studies" and clf["n_slices"] > 6
    assert 3 <= clf["n_positive"] < clf["n_slices"] and 0 <= clf["slice_auc"] <= 1
    assert f"slice AUC {clf['slice_auc']:.3f} over {clf['n_slices']} lung slices" in (out / "metrics.md").read_text(
        encoding="utf-8")
    with open(out / "classifier_slices.csv", newline="", encoding="utf-8") as fh:
        scored = list(csv.DictReader(fh))
    assert len(scored) == clf["n_slices"] and sum(r["label"] == "1" for r in scored) == clf["n_positive"]
    assert {r["source"] for r in scored} == {r["source"] for r in rows}
    from pipelines.bundle import slice_auc

    auc = slice_auc([float(r["probability"]) for r in scored], [int(r["label"]) for r in scored])
    assert auc == pytest.approx(clf["slice_auc"])
    assert not (out / "severity.csv").exists()


def test_evaluate_iba_with_truth(capsys, tmp_path, tiny_bundle, eval_studies, one_torch_thread):
    """IBA with few steps (through --param), and the severity agreement of the study pipeline."""
    out = tmp_path / "eval"
    code, stdout, err = _evaluate(
        capsys, str(eval_studies), "--methods", "iba,hirescam", "--out", str(out), "--bundle", str(tiny_bundle),
        "--max-slices", "2", "--param", "iba.steps=2", "--param", "iba.n_samples=2",
        "--truth", str(eval_studies / "truth.csv"), "--severity-methods", "hirescam", *FAST)
    assert code == 0, err
    _check_table(out, ["iba", "hirescam"], localization=True)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["params"] == {"iba": {"steps": 2, "n_samples": 2}}
    with open(out / "severity.csv", newline="", encoding="utf-8") as fh:
        sev = list(csv.DictReader(fh))
    assert [r["method"] for r in sev] == ["hirescam"] and sev[0]["n_grade"] == "2"
    assert 0 <= float(sev[0]["grade_accuracy"]) <= 1 and float(sev[0]["mae"]) >= 0
    assert (out / "severity" / "hirescam" / "results.csv").exists()
    assert "Severity agreement" in (out / "metrics.md").read_text(encoding="utf-8")


def test_evaluate_every_method(capsys, tmp_path, tiny_bundle, eval_studies, one_torch_thread):
    """Every method ``evaluate`` offers (IBA, HiResCAM, Grad-CAM, iGOS++, I-GOS, LRP) in one run, with
    short optimizations, gives a full table, curves and overlays, and per-slice rows for each."""
    from pipelines.evaluate import EVAL_METHODS

    methods = list(EVAL_METHODS)
    assert set(methods) == {"iba", "hirescam", "gradcam", "igospp", "igos", "lrp"}
    out = tmp_path / "eval"
    code, stdout, err = _evaluate(
        capsys, str(eval_studies), "--methods", ",".join(methods), "--out", str(out), "--bundle", str(tiny_bundle),
        "--max-slices", "1", "--param", "iba.steps=2", "--param", "iba.n_samples=2",
        "--param", "igospp.iterations=2", "--param", "igospp.ig_steps=2",
        "--param", "igos.iterations=2", "--param", "igos.ig_steps=2", *FAST)
    assert code == 0, err
    table = _check_table(out, methods, localization=True)
    for method in methods:
        assert f"| {method} |" in stdout
        assert int(table[(method, "aopc")]["n"]) == 2  # one lesion slice and one healthy slice
        assert int(table[(method, "pointing_game")]["n"]) == 1
    with open(out / "per_slice.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["method"] for r in rows) == sorted(methods * 2)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["params"]["igospp"] == {"iterations": 2, "ig_steps": 2}
    assert set(summary["constant_maps"]) == set(methods)


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file or folder"),
    ("unknown_method", "unknown method 'gradcam++'"),
    ("empty", "no CT studies"),
    ("bad_param", "METHOD.KEY=VALUE"),
    ("truth_for_images", "--truth needs CT studies"),
])
def test_evaluate_bad_input(capsys, tmp_path, tiny_bundle, eval_studies, case, needle):
    data, extra = str(eval_studies), ["--methods", "hirescam"]
    if case == "missing":
        data = str(tmp_path / "nope")
    elif case == "unknown_method":
        extra = ["--methods", "hirescam,gradcam++"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("nothing to see")
        data = str(tmp_path / "empty")
    elif case == "bad_param":
        extra += ["--param", "iba-steps"]
    else:
        img = np.zeros((40, 40), np.uint8)
        Image.fromarray(img).save(tmp_path / "a.png")
        Image.fromarray(img).save(tmp_path / "a_mask.png")
        data, extra = str(tmp_path), extra + ["--truth", str(eval_studies / "truth.csv")]
    code, _, err = _evaluate(capsys, data, *extra, "--out", str(tmp_path / "out"), "--bundle", str(tiny_bundle))
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ctseverity")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_pick_slices_lesion_first_and_seeded():
    labels = [0, 1, 0, 1, 1, 0, 0, 0, -1]
    a = pick_slices(labels, 4, seed=1, name="s")
    assert a == pick_slices(labels, 4, seed=1, name="s") and a == sorted(a)
    assert sum(labels[i] == 1 for i in a) == 3 and sum(labels[i] == 0 for i in a) == 1
    assert pick_slices(labels, None, 0, "s") == list(range(len(labels)))
    few = [1, 0, 0, 0, 0]
    assert sum(few[i] == 0 for i in pick_slices(few, 3, 0, "s")) == 2  # few lesion slices: more negatives


def test_flat_2d_pairs_layout(tmp_path, tiny_bundle):
    """``<name>.png`` + ``<name>_mask.png``: a dark lung with a bright lesion inside, on soft tissue."""
    from pipelines.bundle import load_model

    img = np.full((90, 120), 200, np.uint8)  # soft tissue
    img[15:75, 10:55] = 30  # lung (about -940 HU under the default window)
    img[15:75, 65:110] = 30
    mask = np.zeros_like(img)
    mask[30:50, 20:40] = 255
    img[mask > 0] = 110  # ground glass
    Image.fromarray(img).save(tmp_path / "s1.png")
    Image.fromarray(mask).save(tmp_path / "s1_mask.png")
    Image.fromarray(img).save(tmp_path / "s2.png")  # no mask
    pairs = find_image_pairs(tmp_path)
    assert [(p.name, p.mask is not None) for p in pairs] == [("s1", True), ("s2", False)]
    data = load_eval_slices(tmp_path, load_model(tiny_bundle), progress=False)
    assert data.kind == "images" and len(data) == 2 and data.images.shape[1:] == (1, 64, 64)
    assert data.has_mask.tolist() == [True, False] and data.labels.tolist() == [1, -1]
    assert data.localizable.tolist() == [True, False]
    # both lungs and the lesion are in the lung mask; the soft tissue is not
    lung_share = float(data.lung[0].float().mean())
    assert 0.3 < lung_share < 0.6
    assert bool((data.lesion[0] <= data.lung[0]).all())


def test_medseg_pairs(shared):
    """Real MedSeg COVID-19 slices with expert masks: pairing, HU assumption, 2D lung masks."""
    images = shared("medseg_slices_infnet/test/images/18.jpg").parent
    pairs = find_image_pairs(images.parents[1])
    assert len(pairs) == 98 and all(p.mask for p in pairs) and len({p.name for p in pairs}) == 98
    p18 = next(p for p in pairs if p.name == "test/18")
    assert Path(p18.mask).parent.name == "infection_mask"
    assert image_to_hu(np.array([0.0, 255.0]), DEFAULT_IMAGE_WINDOW).tolist() == list(DEFAULT_IMAGE_WINDOW)
    for name in ("test/18", "test/59", "train/10"):
        pair = next(p for p in pairs if p.name == name)
        gray = np.asarray(Image.open(pair.image).convert("L"), dtype=np.float32)
        lesion = np.asarray(Image.open(pair.mask)) > 0
        lung = lung_mask_2d(image_to_hu(gray), lesion)
        # the lung holds every lesion pixel and the dark parenchyma, not the bright mediastinum
        assert bool(lung[lesion].all())
        assert 0.2 < lung.mean() < 0.8
        assert np.median(gray[lung]) < np.median(gray[~lung])


def _doc_script():
    path = REPO_ROOT / "scripts" / "make_evaluation_doc.py"
    spec = importlib.util.spec_from_file_location("make_evaluation_doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_medseg_cli(capsys, tmp_path, shared, one_torch_thread):
    """The CLI on 2 real MedSeg slices with the default (embedded) model, and the evaluation page
    rendered from its outputs (``scripts/make_evaluation_doc.py --skip-run``)."""
    root = shared("medseg_slices_infnet/SHA256SUMS").parent
    out = tmp_path / "work" / "eval_medseg"
    code, _, err = _evaluate(capsys, str(root), "--methods", "hirescam,gradcam", "--out", str(out),
                             "--max-images", "2", *FAST)
    assert code == 0, err
    _check_table(out, ["hirescam", "gradcam"], localization=True)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["kind"] == "images" and summary["n_slices"] == 2 and summary["n_localizable"] == 2
    assert "HU = -1100 + gray / 255" in summary["notes"][0]
    with open(out / "per_slice.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(r["source"].split("/")[0] in ("test", "train") for r in rows)
    assert all(0 < float(r["lesion_fraction"]) <= 1 and r["label"] == "1" for r in rows)
    assert all(torch.isfinite(torch.tensor(float(r["energy_pointing_game"]))) for r in rows)

    doc_script = _doc_script()
    doc = tmp_path / "evaluation.md"
    assert doc_script.main(["--skip-run", "--work", str(tmp_path / "work"), "--doc", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert "(b) Real MedSeg COVID-19 slices" in text and "(a) Semi-synthetic" not in text
    assert "| hirescam |" in text and "ctseverity evaluate" in text
    claim = [ln for ln in text.splitlines() if ln.startswith("| HiResCAM at least matches Grad-CAM on AOPC")]
    assert len(claim) == 1 and "| 2 |" in claim[0] and "**" in claim[0]
    assert "Out of date" not in text
    # a block between the markers (the localization benchmark's tables) survives the rewrite, once
    kept = "## Localization on real lesions\n\n| iba | 0.563 |"
    doc.write_text(f"old page\n{doc_script.KEEP_START}\n{kept}\n{doc_script.KEEP_END}\nold table\n", encoding="utf-8")
    assert doc_script.main(["--skip-run", "--work", str(tmp_path / "work"), "--doc", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.count(kept) == 1 and "old page" not in text and "old table" not in text
    assert text.index(kept) < text.index("(b) Real MedSeg COVID-19 slices")
    summary["model"]["sha256"] = "0" * 64  # outputs of another model than the bundle's: the page says so
    (out / "summary.json").write_text(json.dumps(summary))
    assert doc_script.main(["--skip-run", "--work", str(tmp_path / "work"), "--doc", str(doc)]) == 0
    assert "**Out of date:** the tables below come from model(s) 0000000000000000" in doc.read_text(encoding="utf-8")
    est, lo, hi, n = doc_script.paired_difference(rows, "hirescam", "gradcam", "aopc", n=100)
    assert n == 2 and lo <= est <= hi
    assert doc_script.paired_difference(rows, "hirescam", "hirescam", "aopc", n=100)[:3] == (0.0, 0.0, 0.0)


def _guided_result(sha: str, auc: float, epg: float, drop: float) -> dict:
    rows = [{"method": "hirescam", "metric": m, "n": 4, "mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1,
             "higher_is_better": m != "average_drop"}
            for m, v in (("energy_pointing_game", epg), ("iou", 0.2), ("best_iou", 0.3), ("average_drop", drop),
                         ("average_increase", 10.0))]
    return {"rows": rows, "summary": {"methods": ["hirescam"], "model": {"sha256": sha},
                                      "classifier": {"slice_auc": auc, "n_slices": 120}}}


def test_guided_before_after_section():
    """The before/after table of the guided fine-tuning: one row per model and method, the slice-AUC
    verdict against the 0.01 tolerance, and which metrics improved."""
    doc = _doc_script()
    runs = {"guided_before": {"command": "ctseverity evaluate A"}, "guided_after": {"command": "ctseverity evaluate B"}}
    meta = {"guided_info": {"training": {"source_sha256": "f" * 64}}}
    before = _guided_result("a" * 64, 0.950, 0.40, 30.0)
    lines = doc._guided_section(before, _guided_result("b" * 64, 0.955, 0.50, 35.0), runs, meta)
    text = "\n".join(lines)
    assert text.count("| before (default) | 0.950 | hirescam | 0.400 [0.300, 0.500]") == 1
    assert "| after (guided) | 0.955 | hirescam | 0.500 [0.400, 0.600]" in text
    assert "0.950 before, 0.955 after (+0.005): **within 0.01**" in text
    assert "better after fine-tuning on energy_pointing_game; worse on average_drop" in text
    assert "ctseverity evaluate B" in text and "from source `ffffffffffffffff`" in text
    assert "The fine-tuning updated every layer." in text
    far = "\n".join(doc._guided_section(before, _guided_result("b" * 64, 0.930, 0.40, 30.0), runs, meta))
    assert "(-0.020): **not within 0.01**" in far
    meta["guided_info"]["training"]["guided"] = {"train_from": "features.denseblock4", "trainable": None}
    tail = "\n".join(doc._guided_section(before, _guided_result("b" * 64, 0.955, 0.50, 35.0), runs, meta))
    assert "The fine-tuning updated the layers from `features.denseblock4` on" in tail


def test_auc_difference_paired_over_slices():
    doc = _doc_script()
    before = [{"source": "s", "slice": str(i), "label": str(y), "probability": str(p)}
              for i, (y, p) in enumerate(zip([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]))]
    after = [dict(r, probability=str(p)) for r, p in zip(before, [0.1, 0.8, 0.2, 0.9])]
    after.append({"source": "other", "slice": "0", "label": "1", "probability": "0.5"})  # not in before: ignored
    est, lo, hi, n = doc.auc_difference(before, after, n=200)
    assert n == 4 and est == pytest.approx(0.75 - 1.0)  # 3 of the 4 negative-positive pairs ranked right after
    assert lo <= est <= hi <= 0.0
    assert doc.auc_difference(before, before, n=50)[:3] == (0.0, 0.0, 0.0)
    assert math.isnan(doc.auc_difference(before[:2], before[:2])[0])  # one class only
