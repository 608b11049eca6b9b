"""A full disk while writing: ``ctseverity run`` under a file size limit (``ulimit -f``, the same error a
full disk gives: a write that finds no room) keeps nothing of a study it could not write, says so, and
leaves no temporary or partial file; once there is room, the same command grades the studies.
"""

from __future__ import annotations

import csv
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from pipelines.cli import main

CLI = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())"]


def _run(args: list[str], limit_bytes: int | None) -> subprocess.CompletedProcess:
    def preexec() -> None:
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], preexec_fn=preexec, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env=env, timeout=300)


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_no_room_for_a_study_keeps_nothing_of_it_and_says_so(tiny_studies, tmp_path, capsys):
    studies = tmp_path / "in"
    studies.mkdir()
    for p in sorted(tiny_studies.glob("*.nii.gz"))[:2]:
        (studies / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    run = ["run", str(studies), "--out", str(out), "--method", "density", "--lung-mask", "threshold"]

    # room for the masks and the batch files, not for a study's overview figure (about 200 KB)
    r = _run(run, 100_000)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert _files(out) == ["report.html", "results.csv"]  # no study folder, no temporary file
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "failed"
        assert row["error"].startswith("no room to write the outputs (File too large: the disk is full")
        assert row["error"].endswith("nothing of the study was kept")
    assert "no room to write the outputs" in r.stdout

    # no room even for the batch files: one line, no traceback, no partial file
    (out / "report.html").unlink()
    (out / "results.csv").unlink()
    r = _run(run, 1_000)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ctseverity run: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no room to write (File too large: the disk is full" in lines[0]
    assert not [f for f in _files(out) if f not in ("results.csv",)], _files(out)

    # room again: the same command grades both
    assert main(["-q", *run]) == 0
    capsys.readouterr()
    with open(out / "results.csv", newline="") as fh:
        assert [row["status"] for row in csv.DictReader(fh)] == ["ok", "ok"]
