"""Lung masking and the joint, per-study scaling of maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_ext.attribution import MaskMap, MaskMapd, NormalizeStudyd, normalize_study
from monai_ext.errors import NoLungFoundError


def study() -> tuple[torch.Tensor, torch.Tensor]:
    maps = torch.zeros(1, 10, 10, 4)
    maps[0, :, :, 0] = 1.0    # a faint slice
    maps[0, :, :, 1] = 4.0    # a strong slice
    maps[0, 0, 0, :] = 100.0  # outside the lung: ignored
    lung = torch.zeros(10, 10, 4)
    lung[2:8, 2:8, :] = 1
    return maps, lung


def test_joint_scale_keeps_relative_strength_of_slices():
    maps, lung = study()
    out = normalize_study(maps, lung, percentile=100)
    assert out.shape == maps.shape and out.dtype == torch.float32
    assert float(out[0, 5, 5, 1]) == pytest.approx(1.0)
    assert float(out[0, 5, 5, 0]) == pytest.approx(0.25)  # not stretched to 1: one factor per study
    assert float(out[0, 0, 0, 1]) == 0.0  # outside the lung
    unmasked = normalize_study(maps, lung, percentile=100, mask_output=False)
    assert float(unmasked[0, 0, 0, 1]) == 1.0  # clipped


def test_percentile_clips_and_types_are_kept():
    maps, lung = study()
    maps[0, 4, 4, 1] = 1000.0  # one outlier inside the lung
    out = normalize_study(maps.numpy(), lung.numpy()[None], percentile=99)
    assert isinstance(out, np.ndarray) and out.max() == 1.0
    assert out[0, 5, 5, 1] == pytest.approx(1.0)
    meta = MetaTensor(maps, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    res = normalize_study(meta, lung)
    assert isinstance(res, MetaTensor) and float(res.affine[2, 2]) == 3.0


def test_signed_and_empty_maps():
    maps, lung = study()
    with pytest.warns(UserWarning, match="zero"):
        signed = normalize_study(-maps, lung)
    assert float(signed.max()) == 0.0  # negative evidence is not lesion evidence
    with pytest.raises(NoLungFoundError):
        normalize_study(maps, torch.zeros_like(lung))
    with pytest.raises(ValueError, match="does not fit"):
        normalize_study(maps, torch.ones(3, 3))
    with pytest.raises(ValueError, match="percentile"):
        normalize_study(maps, lung, percentile=0)


def test_mask_transforms():
    maps, lung = study()
    masked = MaskMap()(maps, lung)
    assert float(masked[0, 0, 0, 0]) == 0.0 and float(masked[0, 5, 5, 1]) == 4.0
    d = MaskMapd("heat", mask_key="lung")({"heat": maps, "lung": lung[None]})
    torch.testing.assert_close(d["heat"], masked)
    d = NormalizeStudyd("heat", mask_key="lung", percentile=100)({"heat": maps, "lung": lung})
    assert float(d["heat"].max()) == 1.0
    with pytest.raises(KeyError):
        MaskMapd("heat", mask_key="lung")({"heat": maps})


def test_evidence_on_few_voxels_is_kept():
    """Evidence on 0.5 % of the lung (a study with lesion on one slice of many): the scale comes from the
    voxels with evidence, so the map does not vanish as a percentile over the whole lung would make it."""
    maps = torch.zeros(1, 20, 20, 50)
    lung = torch.zeros(20, 20, 50)
    lung[:, :, :] = 1
    maps[0, 5:7, 5:15, 10] = 3.0  # 20 of 20000 lung voxels
    maps[0, 5, 5, 10] = 6.0
    out = normalize_study(maps, lung, percentile=99)  # the 99th percentile of 20 values: the 19th, 3.0
    assert float(out[0, 6, 10, 10]) == 1.0 and float(out.sum()) == pytest.approx(20.0)
    exact = normalize_study(maps, lung, percentile=100)
    assert float(exact[0, 6, 10, 10]) == pytest.approx(0.5) and float(exact[0, 5, 5, 10]) == pytest.approx(1.0)
