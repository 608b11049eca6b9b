"""results.csv and report.html: columns, truth files, agreement figures, a self-contained report."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from monai_ext.errors import CTSeverityError, InputNotFoundError
from pipelines.batch import RESULT_COLUMNS, collect_rows, write_results_csv
from pipelines.report import THUMBNAIL_WIDTH, agreement, read_truth, write_report


def test_agreement_hand_checked():
    pairs = [
        (0.0, "CT-0", 0.0, "CT-0"),  # right
        (12.0, "CT-1", 10.0, "CT-1"),  # right, 2 points off
        (30.0, "CT-2", 20.0, "CT-1"),  # one grade off, 10 points off
        (80.0, "CT-4", 40.0, "CT-2"),  # two grades off, 40 points off
        (None, "CT-3", None, "CT-3"),  # grades only
    ]
    a = agreement(pairs)
    assert a["n_grade"] == 5 and a["grade_accuracy"] == pytest.approx(3 / 5)
    assert a["within_one"] == pytest.approx(4 / 5)
    assert a["n_percent"] == 4 and a["mae"] == pytest.approx((0 + 2 + 10 + 40) / 4)
    assert a["pearson_r"] == pytest.approx(np.corrcoef([0, 10, 20, 40], [0, 12, 30, 80])[0, 1])
    conf = np.array(a["confusion"])
    assert conf.sum() == 5 and conf.trace() == 3 and conf[1, 2] == 1 and conf[2, 4] == 1  # rows: truth
    empty = agreement([])
    assert empty["n_grade"] == 0 and math.isnan(empty["grade_accuracy"]) and math.isnan(empty["pearson_r"])


def test_read_truth_formats_and_errors(tmp_path):
    synth = tmp_path / "truth.csv"  # as written by ctseverity synth
    synth.write_text("study,lesion_percent,grade,requested_percent,kind\na,0.0000,CT-0,0,mixed\nb,31.5,CT-2,30,mixed\n")
    assert read_truth(synth) == {"a": {"lesion_percent": 0.0, "grade": "CT-0"},
                                 "b": {"lesion_percent": 31.5, "grade": "CT-2"}}
    pct = tmp_path / "pct.csv"
    pct.write_text("study,lesion_percent\nx,80\n")
    assert read_truth(pct)["x"] == {"lesion_percent": 80.0, "grade": "CT-4"}  # grade from the percent
    grades = tmp_path / "grades.csv"
    grades.write_text("study,grade\ny,ct3\n")
    assert read_truth(grades)["y"] == {"lesion_percent": None, "grade": "CT-3"}

    with pytest.raises(InputNotFoundError):
        read_truth(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,percent\nz,3\n")
    with pytest.raises(CTSeverityError, match="'study' column"):
        read_truth(bad)
    bad.write_text("study,grade\nz,severe\n")
    with pytest.raises(CTSeverityError, match="line 2: grade 'severe'"):
        read_truth(bad)
    bad.write_text("study,lesion_percent\nz,120\n")
    with pytest.raises(CTSeverityError, match="line 2: lesion_percent"):
        read_truth(bad)


def _fake_batch(out):
    """Three graded study folders (result.json, overview.png) and one failure row."""
    for name, pct, grade in (("s1", 0.0, "CT-0"), ("s2", 22.5, "CT-1"), ("s3", 61.0, "CT-3")):
        d = out / name
        d.mkdir(parents=True)
        Image.fromarray(np.full((400, 960, 3), 90, np.uint8)).save(d / "overview.png")
        res = {"study": name, "input": f"/data/{name}.nii.gz", "status": "ok", "method": "hirescam",
               "lesion_rule": "heatmap", "threshold": 0.4, "min_lesion_ml": 1.0, "lesion_percent": pct,
               "grade": grade, "lung_volume_ml": 4000.0, "lesion_volume_ml": 40 * pct, "n_lesions": 2,
               "model": {"bundle": "/b/ct_severity", "sha256": "abcdef0123456789"}, "timings_s": {"total": 3.5},
               "outputs": {}}
        (d / "result.json").write_text(json.dumps(res))
    failures = [{"study": "s0_broken", "input": "/data/s0_broken.nii.gz", "status": "failed", "method": "hirescam",
                 "seconds": 0.1, "error": "the gzip stream ends early: the file is truncated"}]
    return collect_rows(out, failures)


def test_results_csv_columns_and_rows(tmp_path):
    rows = _fake_batch(tmp_path)
    assert [r["study"] for r in rows] == ["s0_broken", "s1", "s2", "s3"]
    path = write_results_csv(tmp_path, rows)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(RESULT_COLUMNS)
    assert lines[3] == "s2,/data/s2.nii.gz,ok,22.5,CT-1,4000.0,900.0,2,hirescam,3.5,,"  # no error, no warnings
    assert lines[1].startswith("s0_broken,/data/s0_broken.nii.gz,failed,,,,,,hirescam,0.1,the gzip")
    # a failure of this run replaces an older result of the same study
    again = collect_rows(tmp_path, [dict(rows[0], study="s2")])
    assert [r["status"] for r in again if r["study"] == "s2"] == ["failed"]


def _images(text):
    return re.findall(r"<img[^>]*src='([^']*)'", text)


def test_report_with_truth_is_self_contained(tmp_path):
    rows = _fake_batch(tmp_path)
    truth = {"s1": {"lesion_percent": 0.0, "grade": "CT-0"}, "s2": {"lesion_percent": 28.0, "grade": "CT-2"},
             "s3": {"lesion_percent": 60.0, "grade": "CT-3"}}
    text = write_report(tmp_path, rows, truth=truth).read_text()
    assert "<b>s0_broken</b>" in text  # failed: no overview to open
    for study in ("s1", "s2", "s3"):  # the name opens the overview, as the thumbnail does
        assert f"<b><a href='{study}/overview.png'>{study}</a></b>" in text
    assert "the gzip stream ends early" in text
    srcs = _images(text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    thumbs = [s for s in srcs if "base64," in s]
    assert len(thumbs) == 3 + 2  # three thumbnails, the grade chart and the scatter
    widths = sorted(Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).width for s in thumbs)
    assert widths.count(THUMBNAIL_WIDTH) == 3  # the 960 px overviews, downscaled
    assert "alt='lesion percent scatter'" in text and "class='conf'" in text
    assert "Agreement with truth" in text and "67 % (2 of 3)" in text  # grade accuracy
    assert "Pearson r" in text and "hirescam" in text and "abcdef012345" in text


def test_report_without_truth_has_no_agreement(tmp_path):
    text = write_report(tmp_path, _fake_batch(tmp_path)).read_text()
    assert "class='conf'" not in text and "scatter" not in text and "Agreement" not in text
    assert len(_images(text)) == 3 + 1  # thumbnails and the grade chart


def test_report_links_each_study_to_its_own_overview(tmp_path):
    """The link is relative and URL-quoted: a study name with a space, '#' or a quote still opens its overview."""
    rows = [dict(r, study="case 2#b'") if r["study"] == "s2" else r for r in _fake_batch(tmp_path)]
    (tmp_path / "s2").rename(tmp_path / "case 2#b'")
    text = write_report(tmp_path, rows).read_text()
    hrefs = re.findall(r"href='([^']*)'", text)
    assert "case%202%23b%27/overview.png" in hrefs and "s1/overview.png" in hrefs
    for h in hrefs:
        if not h.startswith("data:"):
            assert (tmp_path / urllib.parse.unquote(h)).is_file(), h
    assert "s0_broken/overview.png" not in text  # a failed study has no overview
