"""``scripts/context_check.py``: the classifier's scores with the lung's surroundings flattened."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from monai_ext.data import synthetic_chest_ct
from monai_ext.transforms.slices import SOFT_TISSUE_HU

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "context_check.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("context_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_variants_flatten_only_beyond_the_margin(script):
    ct = synthetic_chest_ct((96, 96, 24), (3.5, 3.5, 10.0), seed=4, noise_hu=0)
    hu, lung = ct.image, ct.lung_mask
    v = script.context_variants(hu, lung, ct.spacing, margin_mm=7.0)
    assert set(v) == set(script.VARIANTS) and v["as_is"] is hu
    # 2 voxels of 3.5 mm in-plane around the lung stay as they are, in every variant
    near = np.zeros_like(lung, dtype=bool)
    for k in np.flatnonzero(lung.any(axis=(0, 1))):  # slices without lung have nothing near it
        near[:, :, k] = ndi.distance_transform_edt(~lung[:, :, k], sampling=(3.5, 3.5)) <= 7.0
    for name in ("body_flattened", "all_flattened"):
        np.testing.assert_array_equal(v[name][near], hu[near])
    in_lung_slice = lung.any(axis=(0, 1))[None, None, :]  # slices without lung stay as they are
    np.testing.assert_array_equal(v["all_flattened"][:, :, ~in_lung_slice[0, 0]], hu[:, :, ~in_lung_slice[0, 0]])
    assert (v["all_flattened"][~near & in_lung_slice] == SOFT_TISSUE_HU).all()
    body = ct.masks["body"] > 0
    # (the phantom's body mask runs past the reconstruction circle: only the imaged body)
    far_body = body & ~near & (hu > -900) & in_lung_slice
    assert far_body.sum() > 1000 and (v["body_flattened"][far_body] == SOFT_TISSUE_HU).all()
    air = (hu < -900) & ~near & ~body & in_lung_slice  # the air around the body is kept
    assert air.sum() > 1000 and (v["body_flattened"][air] == hu[air]).all()


def test_cli_prints_the_three_study_probabilities(script, tmp_path, capsys):
    from monai_ext.data.studies import write_studies

    write_studies(tmp_path, [0.0], shape=(96, 96, 24), spacing=(3.5, 3.5, 10.0), seed=6, progress=False)
    assert script.main([str(tmp_path / "synth_000_f00.nii.gz"), "--show", "0"]) == 0
    out = capsys.readouterr().out
    study = [line for line in out.splitlines() if line.strip().startswith("study ")]
    assert len(study) == 1
    values = [float(x) for x in study[0].split()[1:]]
    assert len(values) == 3 and all(0.0 <= x <= 1.0 for x in values)
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows  # --show 0 lists every lung slice
