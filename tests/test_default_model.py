"""The embedded default model: its figures in the model card hold on fresh data.

Slice AUC >= 0.95 on freshly generated synthetic studies (seeds never used in training) and >= 0.90 on
semi-synthetic studies made from the real chest CT (lesion-bearing slices vs. the same CT's slices
without lesions).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_ext.data.studies import write_studies
from pipelines.bundle import EMBEDDED_BUNDLE, load_model, predict_slices, sha256_file, slice_auc
from pipelines.datasets import load_ct_mask, slice_labels_from_mask
from pipelines.discovery import Study
from pipelines.study import PipelineConfig, compute_evidence


@pytest.fixture(scope="module")
def model():
    return load_model()


def _slice_probs_and_labels(model, path, lesion_path=None):
    ev = compute_evidence(Study("x", str(path)), PipelineConfig(method="density"), None)  # load + lung mask
    from monai_ext.transforms.slices import extract_slices

    stack = extract_slices(ev.ct, torch.from_numpy(ev.lung)[None], ev.spacing, **model.slice_kwargs)
    probs = predict_slices(model.network, stack.images)
    if lesion_path is None:
        return probs.numpy(), np.zeros(len(stack), int)
    labels = slice_labels_from_mask(load_ct_mask(lesion_path, ev.ct), torch.from_numpy(ev.lung)[None], stack.indices)
    keep = labels >= 0
    return probs.numpy()[keep.numpy()], labels.numpy()[keep.numpy()]


def test_model_file_matches_its_checksum(model):
    assert sha256_file(EMBEDDED_BUNDLE / "models" / "model.pt") == model.checksum
    assert model.iba_estimator is not None
    card = (EMBEDDED_BUNDLE / "docs" / "README.md").read_text(encoding="utf-8")
    assert f"{model.info['metrics']['slice_auc']:.3f}" in card  # the card carries the model's own figures


def test_slice_auc_on_fresh_synthetic_studies(model, tmp_path):
    recs = write_studies(tmp_path, [0, 15, 0, 45], seed=90210, shape=(192, 192, 54), spacing=(1.9, 1.9, 5.5),
                         masks=True, progress=False)
    probs, labels = [], []
    for r in recs:
        p, y = _slice_probs_and_labels(model, tmp_path / f"{r.study}.nii.gz", tmp_path / f"{r.study}_lesion.nii.gz")
        probs.append(p)
        labels.append(y)
    auc = slice_auc(np.concatenate(probs), np.concatenate(labels))
    assert auc >= 0.95, auc


def test_slice_auc_on_semisynthetic_real_ct(model, real_semisynthetic, real_ct_path):
    folder, recs = real_semisynthetic
    clean_p, clean_y = _slice_probs_and_labels(model, real_ct_path)
    r30 = next(r for r in recs if 25 <= r.lesion_percent <= 35)
    les_p, les_y = _slice_probs_and_labels(model, folder / f"{r30.study}.nii.gz", folder / f"{r30.study}_lesion.nii.gz")
    pos = les_p[les_y == 1]
    auc = slice_auc(np.concatenate([pos, clean_p]), np.concatenate([np.ones(len(pos)), clean_y]))
    assert auc >= 0.90, auc


def test_predict_on_real_ct_clean_low_with_lesions_high(real_semisynthetic, real_ct_path, capsys):
    """``ctseverity predict`` on the real chest CT: a study probability under the bundle's study call without
    lesions, a high one with 30 % inserted lesions (the input's surroundings flattened as model.json says)."""
    from pipelines.cli import main

    assert load_model().flatten_beyond_mm == 4.0
    folder, _ = real_semisynthetic
    rc = main(["-q", "predict", str(real_ct_path), str(folder / "real_002_f30.nii.gz"), "--lung-mask", "threshold"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("chest_ct_00", "real_"))}
    assert set(rows) == {"chest_ct_00", "real_002_f30"}
    clean, lesions = float(rows["chest_ct_00"][1]), float(rows["real_002_f30"][1])
    call = load_model().calibration["study_call"]
    assert f"call (at {call:g})" in out
    assert clean < call and " ".join(rows["chest_ct_00"][3:]) == "no lesion", rows
    assert lesions > 0.9 and rows["real_002_f30"][3] == "lesion", rows
