"""Fixtures of the pipeline tests: a tiny trained bundle and tiny studies with truth.

The embedded model is not needed: :func:`tiny_bundle` trains a throwaway one (one epoch on four
64x64x24 phantoms, slices resized to 64) once per test session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

#: phantom grid and voxel size of the tiny studies
TINY_SHAPE = (64, 64, 24)
TINY_SPACING = (6.0, 6.0, 12.0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, torch_single_thread) -> Path:
    """A complete ct-severity bundle with a barely trained classifier (configs, models/model.pt,
    model.json, IBA estimator). Its predictions are meaningless but deterministic."""
    from monai_ext.data.studies import write_studies
    from pipelines.train import train_bundle

    data = tmp_path_factory.mktemp("tiny_train_data")
    write_studies(data, [0, 30, 0, 50], shape=TINY_SHAPE, spacing=TINY_SPACING, masks=True, progress=False)
    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    with torch_single_thread():
        train_bundle(data, out, epochs=1, overrides={"size": 64})
    return out


@pytest.fixture(scope="session")
def tiny_bundle_ungated(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_bundle` with a calibration that gates no slice (``slice_gate`` 0), so that the
    attribution runs on every lung slice and the heatmaps and lesion masks are not empty."""
    out = tmp_path_factory.mktemp("tiny_bundle_ungated") / "bundle"
    shutil.copytree(tiny_bundle, out)
    info_path = out / "models" / "model.json"
    info = json.loads(info_path.read_text())
    info["calibration"] = {"slice_gate": 0.0, "threshold": 0.5, "lesion_rule": "heatmap", "min_lesion_ml": 0.0}
    info_path.write_text(json.dumps(info, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with three tiny phantom studies (0, 20 and 45 % lesion) and their ``truth.csv``.

    Read only: tests that change inputs copy them first.
    """
    from monai_ext.data.studies import write_studies

    out = tmp_path_factory.mktemp("tiny_studies")
    write_studies(out, [0, 20, 45], shape=TINY_SHAPE, spacing=TINY_SPACING, seed=10, progress=False)
    return out
