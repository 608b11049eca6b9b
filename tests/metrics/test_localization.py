"""Localization metrics on tiny hand-made maps and masks."""

from __future__ import annotations

import math

import pytest
import torch

from monai_ext.metrics import (
    BestMaskIoU,
    BoxAccuracy,
    EmptyMaskWarning,
    EnergyPointingGame,
    MaskIoU,
    PointingGame,
    mask_iou,
)


def _mask(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(1, 1, h, w, dtype=torch.bool)
    m[..., r0:r1, c0:c1] = True
    return m


def test_pointing_game_oracle_hits_and_outside_misses():
    lesion = _mask(8, 8, 2, 4, 2, 4)
    oracle = lesion.float() * 3.0 - 1.0  # signed, maximum on the lesion
    outside = torch.zeros(1, 1, 8, 8)
    outside[..., 6, 6] = 5.0
    res = PointingGame()(maps=torch.cat([oracle, outside]), lesion_mask=lesion.repeat(2, 1, 1, 1))
    assert res.scores.tolist() == [1.0, 0.0]
    assert res.extras["point"][1].tolist() == [6, 6]


def test_pointing_game_tolerance_constant_map_and_lung():
    lesion = _mask(8, 8, 2, 4, 2, 4)  # rows 2-3, cols 2-3
    near = torch.zeros(1, 1, 8, 8)
    near[..., 3, 5] = 1.0  # 2 pixels right of the lesion
    assert PointingGame(tolerance=2)(maps=near, lesion_mask=lesion).scores.item() == 1.0
    assert PointingGame(tolerance=1)(maps=near, lesion_mask=lesion).scores.item() == 0.0
    diag = torch.zeros(1, 1, 8, 8)
    diag[..., 5, 5] = 1.0  # Euclidean distance to (3, 3) is sqrt(8) > 2
    assert PointingGame(tolerance=2)(maps=diag, lesion_mask=lesion).scores.item() == 0.0
    assert PointingGame(tolerance=3)(maps=diag, lesion_mask=lesion).scores.item() == 1.0
    assert PointingGame()(maps=torch.zeros(1, 1, 8, 8), lesion_mask=lesion).scores.item() == 0.0
    # global maximum outside the lung, maximum inside the lung on the lesion
    maps = torch.zeros(1, 1, 8, 8)
    maps[..., 0, 7] = 9.0
    maps[..., 3, 3] = 2.0
    lung = _mask(8, 8, 1, 7, 1, 7)
    assert PointingGame()(maps=maps, lesion_mask=lesion).scores.item() == 0.0
    assert PointingGame()(maps=maps, lesion_mask=lesion, lung_mask=lung).scores.item() == 1.0
    with pytest.raises(ValueError):
        PointingGame(tolerance=-1)


def test_energy_pointing_game_exact_shares():
    lesion = _mask(4, 4, 0, 2, 0, 2)
    maps = torch.zeros(1, 1, 4, 4)
    maps[..., 0, 0], maps[..., 1, 1] = 2.0, 1.0  # 3 inside
    maps[..., 3, 3] = 1.0  # 1 outside
    maps[..., 2, 0] = -5.0  # negative values do not count
    assert EnergyPointingGame()(maps=maps, lesion_mask=lesion).scores.item() == pytest.approx(0.75)
    lung = _mask(4, 4, 0, 3, 0, 4)  # excludes row 3
    assert EnergyPointingGame()(maps=maps, lesion_mask=lesion, lung_mask=lung).scores.item() == pytest.approx(1.0)
    with pytest.warns(EmptyMaskWarning, match="positive energy"):
        out = EnergyPointingGame()(maps=-maps.abs(), lesion_mask=lesion)
    assert math.isnan(out.scores.item())


def test_empty_lesion_mask_is_nan_with_warning_for_every_localization_metric():
    maps = torch.rand(2, 1, 6, 6)
    lesion = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    lesion[0, :, 1:3, 1:3] = True
    for metric in (PointingGame(), EnergyPointingGame(), MaskIoU(), BestMaskIoU(), BoxAccuracy()):
        with pytest.warns(EmptyMaskWarning, match=r"lesion mask for sample\(s\) \[1\]"):
            res = metric(maps=maps, lesion_mask=lesion)
        assert math.isfinite(res.scores[0].item()) and math.isnan(res.scores[1].item()), metric
    lung = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    lung[:, :, 3:] = True  # the lesion of sample 0 is outside the lung
    with pytest.warns(EmptyMaskWarning, match="inside the lung"):
        res = MaskIoU()(maps=maps, lesion_mask=lesion, lung_mask=lung)
    assert torch.isnan(res.scores).all()


def test_mask_iou_exact():
    lesion = _mask(4, 4, 0, 2, 0, 2)  # 4 pixels
    maps = torch.tensor([[4.0, 3, 0, 0], [3, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]).view(1, 1, 4, 4)
    # normalized: 1, .75, .75, .25, .5; >= 0.5 -> (0,0), (0,1), (1,0), (2,0): inter 3, union 5
    assert MaskIoU(0.5)(maps=maps, lesion_mask=lesion).scores.item() == pytest.approx(0.6)
    # >= 0.7 -> 3 pixels inside: 3 / 4
    assert MaskIoU(0.7)(maps=maps, lesion_mask=lesion).scores.item() == pytest.approx(0.75)
    # signed map: min-max puts the minimum at 0
    assert MaskIoU(0.5)(maps=maps * 2 - 4, lesion_mask=lesion).scores.item() == pytest.approx(0.6)
    assert MaskIoU()(maps=torch.zeros(1, 1, 4, 4), lesion_mask=lesion).scores.item() == 0.0
    assert mask_iou(lesion, lesion).item() == 1.0
    with pytest.raises(ValueError):
        MaskIoU(threshold=1.5)


def test_best_mask_iou_over_sweep():
    lesion = _mask(4, 4, 0, 2, 0, 2)
    maps = torch.tensor([[4.0, 3, 0, 0], [3, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]).view(1, 1, 4, 4)
    res = BestMaskIoU(thresholds=[0.2, 0.5, 0.7, 0.9])(maps=maps, lesion_mask=lesion)
    # 0.2: 5 pixels, inter 4, union 5 -> 0.8; 0.5: 0.6; 0.7: 0.75; 0.9: 1/4
    assert res.curves[0].tolist() == pytest.approx([0.8, 0.6, 0.75, 0.25])
    assert res.scores.item() == pytest.approx(0.8)
    assert res.extras["best_threshold"].item() == pytest.approx(0.2)
    assert res.steps.tolist() == pytest.approx([0.2, 0.5, 0.7, 0.9])
    assert len(BestMaskIoU().thresholds) == 19


def test_box_accuracy():
    lesion = _mask(10, 10, 2, 6, 2, 6)  # box rows 2-5, cols 2-5
    exact = torch.zeros(1, 1, 10, 10)
    exact[..., 2:6, 2:6] = 1.0
    exact[..., 9, 9] = 1.0  # a one-pixel component: not the largest
    shifted = torch.zeros(1, 1, 10, 10)
    shifted[..., 4:8, 4:8] = 1.0  # inter 2x2 = 4, union 28
    res = BoxAccuracy()(maps=torch.cat([exact, shifted]), lesion_mask=lesion.repeat(2, 1, 1, 1))
    assert res.extras["box_iou"].tolist() == pytest.approx([1.0, 4 / 28])
    assert res.scores.tolist() == [1.0, 0.0]
    # an 8-connected diagonal component forms one box; no predicted pixel gives IoU 0
    diag = torch.zeros(1, 1, 10, 10)
    for i in range(2, 6):
        diag[..., i, i] = 1.0
    assert BoxAccuracy()(maps=diag, lesion_mask=lesion).extras["box_iou"].item() == pytest.approx(1.0)
    assert BoxAccuracy()(maps=torch.zeros(1, 1, 10, 10), lesion_mask=lesion).scores.item() == 0.0
