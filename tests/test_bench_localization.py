"""``scripts/bench_localization.py``: energy inside lesions, pointing game and IoU/Dice per method."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_localization.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_localization", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def small_ct(shared, tmp_path_factory) -> Path:
    """A slab of the real CT (24 slices through the mid lung, every second pixel): a small clean CT."""
    import nibabel as nib

    img = nib.load(str(shared("chest_ct_itkelastix_00/chest_ct_00.nii.gz")))
    out = tmp_path_factory.mktemp("small_ct") / "slab.nii.gz"
    nib.save(img.slicer[::2, ::2, 60:84], str(out))
    return out


def _table(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table printed after ``title``."""
    lines = text[text.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[start].strip("|").split("|")], rows


def test_bench_localization_small(script, shared, small_ct, tmp_path, capsys, one_torch_thread):
    from monai_ext.io import load_ct
    from monai_ext.transforms import LungMask
    from pipelines.bundle import load_model
    from pipelines.datasets import load_ct_mask
    from pipelines.eval_slices import load_eval_slices

    medseg = shared("medseg_slices_infnet")
    out = tmp_path / "loc.json"
    rc = script.main(["--methods", "hirescam", "--medseg", str(medseg), "--max-slices", "2", "--ct", str(small_ct),
                      "--work", str(tmp_path / "work"), "--loads", "30", "--lung-mask", "threshold",
                      "--bootstrap", "50", "--quiet", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("machine: ") and "torch" in text.splitlines()[0]
    assert "HU = -1100 + 1350 * gray / 255" in text
    res = json.loads(out.read_text())

    header, rows = _table(text, "(a) MedSeg")
    assert tuple(header) == script.COLUMNS
    assert [r[:2] for r in rows] == [["hirescam", "slice"]]
    header, rows_b = _table(text, "(b) semi-synthetic")
    assert tuple(header) == script.COLUMNS
    assert [r[:2] for r in rows_b] == [["hirescam", "slice"], ["hirescam", "study (pooled)"]]

    for name in ("medseg", "semi"):
        for row in res["datasets"][name]["rows"]:
            assert row["n"] >= 1
            assert 0.0 <= row["energy"] <= 1.0 and 0.0 <= row["chance"] <= 1.0
            assert 0.0 <= row["pointing_game"] <= 1.0 and 0.0 <= row["iou"] <= row["dice"] <= 1.0
            assert row["energy_ci"][0] <= row["energy"] <= row["energy_ci"][1]

    # (a) chance = mean lesion share of the lung of the evaluated slices, from the slices' masks
    data = load_eval_slices(medseg, load_model(), max_images=2, seed=0, progress=False)
    units = {u["name"]: u for u in res["datasets"]["medseg"]["units"]["hirescam"]}
    shares = [float((data.lesion[i] & data.lung[i]).sum()) / float(data.lung[i].sum()) for i in range(len(data))
              if data.source[i] in units and units[data.source[i]]["energy"] is not None]
    row = res["datasets"]["medseg"]["rows"][0]
    assert len(shares) == row["n"] >= 1
    assert row["chance"] == pytest.approx(float(np.mean(shares)), abs=1e-6)
    assert rows[0][3] == f"{np.mean(shares):.3f}"

    # (b) chance = lesion voxels in the pipeline's lung / its lung voxels, per study and per slice
    study = next(iter(res["datasets"]["semi"]["studies"]))
    folder = tmp_path / "work" / "semisynthetic_seed2024"
    ct = load_ct(folder / f"{study}.nii.gz")
    lung = np.asarray(LungMask(backend="threshold")(ct)[0]) > 0
    lesion = np.asarray(load_ct_mask(folder / f"{study}_lesion.nii.gz", ct)[0]) > 0
    by_study, by_slice = res["datasets"]["semi"]["rows"][1], res["datasets"]["semi"]["rows"][0]
    assert by_study["n"] == 1
    assert by_study["chance"] == pytest.approx((lesion & lung).sum() / lung.sum(), abs=1e-6)
    assert rows_b[1][3] == f"{(lesion & lung).sum() / lung.sum():.3f}"
    kept = [int(u["name"].rsplit(":", 1)[1]) for u in res["datasets"]["semi"]["units"]["hirescam"]["slice"]
            if u["energy"] is not None]
    assert len(kept) == by_slice["n"] >= 1
    per_slice = [(lesion[:, :, z] & lung[:, :, z]).sum() / lung[:, :, z].sum() for z in kept]
    assert by_slice["chance"] == pytest.approx(float(np.mean(per_slice)), abs=1e-6)
    assert all(math.isfinite(v) for v in per_slice)

    # the studies are reused on a second run (no rebuild), and bad input ends with one line
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    script.build_studies(tmp_path / "work", [small_ct], [30.0], 2024)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert script.main(["--datasets", "semi", "--studies", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "bench_localization: error:" in capsys.readouterr().err
