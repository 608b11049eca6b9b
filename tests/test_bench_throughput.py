"""``scripts/bench_throughput.py``: thick-slice studies from a real CT, one batch per method, the table."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest


def test_bench_throughput_small(script, shared, tmp_path, capsys):
    bench = script("bench_throughput")
    # the base: 48 slices of 2.5 mm through the lung of a real CT, every fourth pixel (128 x 128 x 15 at 8 mm)
    small_base = tmp_path / "slab.nii.gz"
    nib.save(nib.load(str(shared("lidc_idri/LIDC-IDRI-0003_ct.nii.gz"))).slicer[::4, ::4, 50:98], str(small_base))
    work, records = tmp_path / "work", tmp_path / "bench.json"
    argv = ["--n", "2", "--methods", "hirescam", "--base", str(small_base), "--loads", "0,30", "--work", str(work),
            "--lung-mask", "threshold", "--device", "cpu", "--json", str(records)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out

    folders = sorted(work.glob("studies_*"))
    assert len(folders) == 1
    studies = sorted(folders[0].glob("*.nii.gz"))
    assert [p.name for p in studies] == ["mosmedlike_000.nii.gz", "mosmedlike_001.nii.gz"]
    for p in studies:
        img = nib.load(str(p))
        assert img.shape == (128, 128, 15) and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.header.get_zooms()[2], 8.0)
    lesion = np.asanyarray(nib.load(str(folders[0] / "masks" / "mosmedlike_001_lesion.nii.gz")).dataobj)
    assert lesion.shape == (128, 128, 15) and lesion.any()

    data = json.loads(records.read_text())
    (rec,) = data["results"]
    assert rec["method"] == "hirescam" and rec["device"] == "cpu" and rec["ok"] == rec["n"] == 2
    assert rec["slices"] == 15 and 0 < rec["lung_slices"] <= 15
    assert {"load", "lung_mask", "classify", "attribution", "write", "total"} <= set(rec["stages"])
    assert sum(v for k, v in rec["stages"].items() if k != "total") == pytest.approx(rec["stages"]["total"], rel=0.1)
    assert 0 < rec["stages"]["total"] * 2 <= rec["batch_s"] <= rec["wall_s"] + 0.5
    assert 0 < rec["cpu_percent"] <= 101 and rec["peak_rss_mb"] > 200  # torch and a model at least
    assert rec["device_percent"] is None and rec["device_mb"] is None  # no NVML on a CPU device

    line = next(ln for ln in printed.splitlines() if ln.startswith("| hirescam | cpu | 1 | per-study | 2/2 | 15 ("))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[7]) == pytest.approx(3600 * 2 / rec["batch_s"], abs=1) and cells[-2:] == ["n/a", "n/a"]
    assert "2 studies from slab.nii.gz at 8 mm" in printed and "logical CPUs" in printed
    assert "| hirescam | per-study | " in printed.split("Seconds per study and stage")[1]

    mtime = studies[0].stat().st_mtime_ns  # the same settings reuse the studies
    assert bench.main([*argv, "--methods", "density", "--pipeline", "staged"]) == 0
    assert studies[0].stat().st_mtime_ns == mtime and sorted(work.glob("studies_*")) == folders
    assert "| density | cpu | 1 | staged | 2/2 | 15 (" in capsys.readouterr().out
    (rec,) = json.loads(records.read_text())["results"]
    assert rec["pipeline"] == "staged" and rec["peak_in_flight"] == 1  # density: no device stage to wait for


def test_bench_throughput_refuses_a_work_folder_in_the_repository(script, shared, capsys):
    bench = script("bench_throughput")
    base = shared("lidc_idri/LIDC-IDRI-0003_ct.nii.gz")
    assert bench.main(["--base", str(base), "--work", str(bench.REPO_ROOT / "bench_work")]) == 2
    assert "must be outside the repository" in capsys.readouterr().err
    assert not (bench.REPO_ROOT / "bench_work").exists()
