"""End to end through the command line: ``ctseverity demo``, the README's first command, grades every
synthetic study as its truth with the embedded model."""

from __future__ import annotations

import csv

from pipelines.cli import main


def test_demo_grades_every_study_right(tmp_path, capsys):
    """``ctseverity demo`` (the README's first command): every synthetic study graded as its truth."""
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as fh:
        rows = {r["study"]: r for r in csv.DictReader(fh)}
    with open(out / "studies" / "truth.csv", newline="") as fh:
        truth = {r["study"]: r for r in csv.DictReader(fh)}
    assert len(rows) == len(truth) == 5
    graded = {s: (rows[s]["lesion_percent"], rows[s]["grade"], truth[s]["grade"]) for s in truth}
    assert all(rows[s]["grade"] == truth[s]["grade"] for s in truth), graded
    assert "grade right in 5 of 5" in capsys.readouterr().out
