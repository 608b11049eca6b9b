"""Lesion masks from evidence, lesion share, grades and components, on hand-built volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from monai_ext.errors import CTSeverityError
from pipelines.calibrate import fit_calibration
from pipelines.report import read_truth
from pipelines.severity import (
    abnormal_attenuation,
    dependent_shift,
    geodesic_steps,
    grade_from_percent,
    grow_levels,
    grow_within,
    lesion_mask_from_heatmap,
    normal_lung_level,
    relative_attenuation,
    remove_small_components,
    severity,
)
from pipelines.study import Evidence, lesion_mask


def _lung_with_lesions():
    """40x40x10 lung block at -850 HU with a 10x10x4 ground-glass cube, a 2x2x2 one, and a vessel."""
    hu = np.full((50, 50, 12), 40.0)
    lung = np.zeros(hu.shape, bool)
    lung[5:45, 5:45, 1:11] = True
    hu[lung] = -850.0
    lesion = np.zeros(hu.shape, bool)
    lesion[10:20, 10:20, 3:7] = True  # 400 voxels
    lesion[30:32, 30:32, 5:7] = True  # 8 voxels
    hu[lesion] = -500.0
    hu[25, 5:45, 1:11] = 40.0  # a one-voxel-thin vessel across the lung
    return hu, lung, lesion


def test_severity_percent_grade_volumes_components():
    hu, lung, lesion = _lung_with_lesions()
    res = severity(lesion, lung, (2.0, 2.0, 2.5), affine=np.diag([2.0, 2.0, 2.5, 1.0]))
    assert res.lesion_percent == pytest.approx(100 * 408 / 16000)
    assert res.grade == "CT-1"
    assert res.lung_volume_ml == pytest.approx(16000 * 10 / 1000)
    assert res.lesion_volume_ml == pytest.approx(408 * 10 / 1000)
    assert res.n_lesions == 2
    assert res.lesions[0]["voxels"] == 400 and res.lesions[1]["voxels"] == 8
    assert res.lesions[0]["centroid_voxel"] == [14.5, 14.5, 4.5]
    assert res.lesions[0]["centroid_mm"] == [29.0, 29.0, 11.25]
    lesion_outside = np.zeros_like(lesion)
    lesion_outside[0:3, 0:3, 0] = True
    assert severity(lesion_outside, lung, (1, 1, 1)).grade == "CT-0"  # lesion outside the lung does not count


@pytest.mark.parametrize(("share", "grade"), [(0.0, "CT-0"), (0.25, "CT-1"), (0.5, "CT-2"), (0.7, "CT-3"),
                                              (0.75, "CT-4"), (1.0, "CT-4")])
def test_grade_boundaries(share, grade):
    lung = np.ones((10, 10, 4), bool)
    lesion = np.zeros_like(lung)
    lesion.reshape(-1)[: int(round(share * lung.size))] = True
    assert severity(lesion, lung, (1, 1, 1)).grade == grade


def test_small_components_removed_by_volume():
    _, lung, lesion = _lung_with_lesions()
    kept = remove_small_components(lesion, (2.0, 2.0, 2.5), min_volume_ml=0.5)  # 8 voxels = 0.08 ml
    assert kept.sum() == 400


def test_abnormal_attenuation_keeps_blobs_drops_thin_vessels():
    hu, lung, lesion = _lung_with_lesions()
    dense = abnormal_attenuation(hu, lung, (1.0, 1.0, 2.5), vessel_radius_mm=1.5, smooth_mm=0.0)
    assert dense[lesion].mean() > 0.9  # the ground-glass cube survives the opening
    assert not dense[25, 5:45, 1:11].any()  # the thin vessel is gone
    # smoothed (the default, 1 mm): the vessel's blur is opened away by the default 2 mm disc, the cube stays
    smoothed = abnormal_attenuation(hu, lung, (1.0, 1.0, 2.5))
    big = np.zeros_like(lesion)
    big[10:20, 10:20, 3:7] = True
    assert smoothed[big].mean() > 0.85 and not smoothed[25, 5:45, 1:11].any()
    assert not (smoothed & ~ndimage.binary_dilation(lesion)).any()  # at most one voxel of blur around it


def test_abnormal_attenuation_sees_ground_glass_through_sharp_kernel_noise():
    """Faint ground glass (-600 HU) under 80 HU of noise (a sharp lung kernel at 0.7 mm pixels): about one
    voxel in ten falls out of the band, and the vessel-removing opening then erases most of the rest; on the CT
    smoothed over 1 mm the cube is found and normal lung stays out."""
    hu, lung, lesion = _lung_with_lesions()
    big = np.zeros_like(lesion)
    big[10:20, 10:20, 3:7] = True
    hu[big] = -600.0
    hu[25, 5:45, 1:11] = -850.0  # no vessel here (the test above covers it)
    noisy = hu + np.random.default_rng(1).normal(0.0, 80.0, hu.shape)
    spacing = (0.7, 0.7, 2.5)
    raw = abnormal_attenuation(noisy, lung, spacing, smooth_mm=0.0)
    got = abnormal_attenuation(noisy, lung, spacing)
    assert got[big].mean() > 0.8 and got[big].mean() > raw[big].mean() + 0.1
    assert (got & ~ndimage.binary_dilation(lesion)).sum() < 0.01 * (lung & ~lesion).sum()


def test_normal_lung_level_follows_the_aerated_lung():
    hu, lung, lesion = _lung_with_lesions()
    assert normal_lung_level(hu, lung, (1.0, 1.0, 2.5)) == pytest.approx(-850.0, abs=5.0)
    # a calibration offset, a noisier kernel and a lesion over half of the lung do not move it off
    rng = np.random.default_rng(0)
    noisy = hu + 30.0 + rng.normal(0.0, 40.0, hu.shape)
    heavy = noisy.copy()
    heavy[5:25, 5:45, 1:11] = -450.0 + rng.normal(0.0, 40.0, (20, 40, 10))
    assert normal_lung_level(noisy, lung, (1.0, 1.0, 2.5)) == pytest.approx(-820.0, abs=10.0)
    assert normal_lung_level(heavy, lung, (1.0, 1.0, 2.5)) == pytest.approx(-820.0, abs=15.0)
    white = np.full(hu.shape, -300.0)
    assert normal_lung_level(white, lung, (1.0, 1.0, 2.5)) == -850.0  # no aerated lung left: the fallback


def test_normal_lung_level_is_the_aerated_lung_not_the_ground_glass_at_high_loads():
    """Ground glass over 70 % of the lung, still below -600 HU, makes the histogram's highest peak; the level is
    the lowest prominent peak, the 30 % of aerated lung left (the highest one would be -680 HU)."""
    hu, lung, _ = _lung_with_lesions()
    rng = np.random.default_rng(2)
    hu = np.where(lung, -850.0 + rng.normal(0.0, 15.0, hu.shape), hu)
    hu[5:33, 5:45, 1:11] = -680.0 + rng.normal(0.0, 15.0, (28, 40, 10))  # 70 % of the lung
    assert normal_lung_level(hu, lung, (1.0, 1.0, 2.5)) == pytest.approx(-850.0, abs=10.0)
    # a small dense tail (dependent lung) at 10 % of the highest bin is not a peak of its own
    hu2 = np.where(lung, -850.0 + rng.normal(0.0, 15.0, hu.shape), hu)
    hu2[5:7, 5:45, 1:11] = -950.0 + rng.normal(0.0, 15.0, (2, 40, 10))  # 5 % of the lung, lower still
    assert normal_lung_level(hu2, lung, (1.0, 1.0, 2.5)) == pytest.approx(-850.0, abs=10.0)


def test_relative_attenuation_does_not_move_with_calibration_or_inspiration():
    hu, lung, lesion = _lung_with_lesions()
    spacing = (1.0, 1.0, 2.5)
    ref = relative_attenuation(hu, lung, spacing, 200.0)
    big = np.zeros_like(lesion)
    big[10:20, 10:20, 3:7] = True
    assert ref[big].mean() > 0.85 and not ref[25, 5:45, 1:11].any()  # the vessel is opened away
    assert not (ref & ~ndimage.binary_dilation(lesion)).any()
    shifted = hu + 60.0  # another scanner's calibration
    assert np.array_equal(relative_attenuation(shifted, lung, spacing, 200.0), ref)
    # an absolute window would take the whole shifted lung in or lose the lesion
    expired = np.where(lung & ~lesion, -760.0, hu)  # denser normal lung (expiration)
    assert abnormal_attenuation(expired + 20.0, lung, spacing, vessel_radius_mm=1.5)[lung & ~lesion].mean() > 0.9
    assert not (relative_attenuation(expired + 20.0, lung, spacing, 200.0) & ~ndimage.binary_dilation(lesion)).any()
    # a sharp kernel's noise is smoothed out before the threshold
    rng = np.random.default_rng(1)
    noisy = hu + rng.normal(0.0, 60.0, hu.shape)
    got = relative_attenuation(noisy, lung, (0.7, 0.7, 2.5), 200.0)
    assert got[big].mean() > 0.8 and (got & ~lesion).sum() < 0.01 * (lung & ~lesion).sum()


def test_heatmap_rules():
    hu, lung, lesion = _lung_with_lesions()
    heat = np.zeros(hu.shape, np.float32)
    heat[8:22, 8:22, 2:8] = 0.9  # a blurry blob larger than the lesion
    plain = lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap")
    assert plain.sum() == 14 * 14 * 6
    sharp = lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-density", ct=hu, spacing=(1.0, 1.0, 2.5))
    # intersected with attenuation: the lesion, its corners rounded by the vessel-removing opening and its
    # edges blurred by at most a voxel by the 1 mm smoothing
    assert not (sharp & ~ndimage.binary_dilation(lesion)).any() and (sharp & lesion).sum() >= 0.85 * 400
    with pytest.raises(ValueError, match="needs the CT"):
        lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-density")
    relative = lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-relative", ct=hu, spacing=(1.0, 1.0, 2.5),
                                        density_delta_hu=200.0)
    assert relative.sum() <= 400 and (relative & lesion).sum() >= 0.8 * 400
    with pytest.raises(ValueError, match="needs the CT"):
        lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-relative")
    with pytest.raises(ValueError, match="lesion rule"):
        lesion_mask_from_heatmap(heat, lung, 0.5, "blobs")


def _supine_lung(amplitude: float = 110.0, decay_mm: float = 20.0):
    """RAS block lung (y grows anterior; 1 mm in-plane, 2.5 mm slices) of a dense-lung scan: -840 HU, plus
    ``amplitude * exp(-h / decay_mm)`` at height h above the posterior lung edge (y = 5), so that its
    posterior 6 mm lie above -750 HU; a ground-glass blob (-600 HU) in that dependent lung and one (-650 HU)
    anteriorly."""
    hu = np.full((60, 80, 12), 40.0)
    lung = np.zeros(hu.shape, bool)
    lung[5:55, 5:75, 1:11] = True
    height = np.broadcast_to((np.arange(80) - 5.0)[None, :, None], hu.shape)
    rng = np.random.default_rng(3)
    hu = np.where(lung, -840.0 + amplitude * np.exp(-height / decay_mm) + rng.normal(0.0, 8.0, hu.shape), hu)
    lesion = np.zeros(hu.shape, bool)
    lesion[12:24, 7:17, 3:8] = True  # posterior, 2-12 mm above the edge
    lesion[30:42, 55:65, 3:8] = True  # anterior
    hu[lesion & (np.arange(80)[None, :, None] < 40)] = -600.0
    hu[lesion & (np.arange(80)[None, :, None] >= 40)] = -650.0
    return hu, lung, lesion


def test_dependent_shift_measures_the_studys_own_gravity_gradient():
    hu, lung, lesion = _supine_lung()
    shift = dependent_shift(hu, lung, (1.0, 1.0, 2.5))
    assert shift[~lung].max() == 0.0
    # by hand: the 0-5 mm band's level is about -840 + 110 e^(-2.5/20) = -743 HU against about -830 above
    # 45 mm: some 85-95 HU at the posterior edge, falling with height, none above 45 mm
    assert 70.0 <= shift[30, 5, 5] <= 105.0
    assert shift[30, 15, 5] < shift[30, 5, 5] and shift[30, 55, 5] == 0.0
    # a flipped (prone) lung has its dense side up: no shift where gravity is not
    assert dependent_shift(hu[:, ::-1], lung[:, ::-1], (1.0, 1.0, 2.5)).max() == 0.0
    # ground glass over the dependent half reads as disease, not gravity: no shift there
    sick = np.where(lung & (np.arange(80)[None, :, None] < 45), -620.0, hu)
    assert dependent_shift(sick, lung, (1.0, 1.0, 2.5))[30, 5:30, 5].max() == 0.0


def test_dependent_rule_leaves_normal_posterior_lung_out_and_keeps_lesions():
    hu, lung, lesion = _supine_lung()
    heat = np.where(lung, 0.9, 0.0).astype(np.float32)  # a map over the whole lung: the attenuation decides
    spacing = (1.0, 1.0, 2.5)
    absolute = lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-density", ct=hu, spacing=spacing)
    dependent = lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-dependent", ct=hu, spacing=spacing)
    near = ndimage.binary_dilation(lesion, iterations=2)
    band = lung & ~near & (np.arange(80)[None, :, None] < 10)  # the posterior 5 mm outside the lesions
    assert absolute[band].mean() > 0.6  # the absolute band takes the dense normal lung for lesion
    assert dependent[band].mean() < 0.02 and not (dependent & ~near).sum() > 0.002 * lung.sum()
    assert (dependent & lesion).sum() >= 0.85 * lesion.sum()  # both lesions, the dependent one too
    # without a gradient the two rules agree
    flat, _, _ = _supine_lung(amplitude=0.0)
    flat[lesion] = -600.0
    assert np.array_equal(lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-density", ct=flat, spacing=spacing),
                          lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-dependent", ct=flat, spacing=spacing))


def test_growth_follows_the_touched_opacity_only():
    """A compact map (a few voxels in one lesion) grows through that lesion's opacity by the growth distance,
    along the opacity only: lesion B, 7 voxels away across normal lung, stays out; without the CT the rule
    refuses; the grey levels that calibration uses give the same masks at every threshold."""
    hu = np.full((40, 40, 10), -850.0)
    lung = np.zeros(hu.shape, bool)
    lung[2:38, 2:38, :] = True
    hu[5:17, 5:17, 2:8] = -450.0  # lesion A, 12 x 12 x 6
    hu[24:34, 5:17, 2:8] = -400.0  # lesion B, not in the map
    heat = np.zeros(hu.shape, np.float32)
    heat[9:12, 9:12, 4:6] = 1.0  # 18 voxels inside A
    heat[10, 10, 5] = 0.4
    a = np.zeros(hu.shape, bool)
    a[5:17, 5:17, 2:8] = True
    spacing = (1.0, 1.0, 2.5)
    narrow = lesion_mask_from_heatmap(heat, lung, 0.5, "heatmap-density", ct=hu, spacing=spacing)
    assert narrow.sum() <= 18
    for rule in ("heatmap-density", "heatmap-relative"):
        kw = dict(ct=hu, spacing=spacing, density_delta_hu=200.0)
        part = lesion_mask_from_heatmap(heat, lung, 0.5, rule, grow_mm=3.0, **kw)
        got = lesion_mask_from_heatmap(heat, lung, 0.5, rule, grow_mm=40.0, **kw)
        assert 18 < part.sum() < 0.7 * got.sum(), rule
        # a 3 mm growth: within 3 voxels in-plane and one slice of the seed
        near = np.zeros_like(a)
        near[6:15, 6:15, 3:7] = True
        assert not (part & ~near).any(), rule
        assert (got & a).sum() >= 0.85 * a.sum(), rule  # corners rounded by the opening, edges by the smoothing
        assert not (got & ~ndimage.binary_dilation(a)).any(), rule  # B and normal lung stay out
        with pytest.raises(ValueError, match="needs the CT"):
            lesion_mask_from_heatmap(heat, lung, 0.5, rule, grow_mm=10.0)
    opacity = abnormal_attenuation(hu, lung, spacing)
    levels = grow_levels(heat, opacity, spacing, (0.0, 3.0, 40.0))
    for r in (0.0, 3.0, 40.0):
        for t in (0.3, 0.5):
            assert np.array_equal(levels[r] >= t, grow_within(heat >= t, opacity, spacing, r)), (r, t)
    assert len(geodesic_steps((0.7, 0.7, 2.8), 7.0)) == 10  # 10 in-plane steps, of which 2 also cross a slice
    assert sum(st[1, 1, 0] for st in geodesic_steps((0.7, 0.7, 2.8), 7.0)) == 2


def test_calibration_fits_a_growth_where_maps_are_compact():
    """Maps that cover only the centre of each lesion: intersected with attenuation they read a fraction of
    the load at any threshold; grown through the attenuation, the same maps give the load, and the fit
    picks the growth."""
    evidence, truth = [], []
    for radius in (5.0, 9.0, 13.0):
        ev, true = _disc_study(radius, 0.9)
        dist = np.sqrt(((np.indices((40, 40)) - 20.0) ** 2).sum(0))[:, :, None].repeat(8, 2)
        ev.heat[:] = np.clip(1.0 - dist / 4.0, 0, 1)  # 4 voxels wide whatever the lesion
        evidence.append(ev)
        pct = 100.0 * true.sum() / ev.lung.sum()
        truth.append({"lesion_percent": pct, "grade": grade_from_percent(pct)})
    kw = dict(thresholds=(0.3, 0.5), min_volumes=(0.0,), rules=("heatmap-density",), study_calls=(0.0,))
    fixed = fit_calibration(evidence, truth, "iba", 0.5, grow_mm=(0.0,), **kw)
    fit = fit_calibration(evidence, truth, "iba", 0.5, grow_mm=(0.0, 20.0), **kw)
    assert fit.grow_mm == 20.0 and fit.values()["grow_mm"] == 20.0
    assert fit.per_rule["heatmap-density"]["grow_mm"] == 20.0
    # (the grown MAE is the 1 mm smoothing widening each edge by under a voxel)
    assert 3 * fit.mae_percent < fixed.mae_percent
    assert fixed.grow_mm == 0.0


def test_calibration_recovers_the_threshold_that_matches_truth():
    """Heatmaps decay away from each lesion; truth is the lesion share: the fit finds the level that
    reproduces it."""
    evidence, truth = [], []
    for half in (4, 7, 10):
        lung = np.zeros((40, 40, 8), bool)
        lung[2:38, 2:38, :] = True
        dist = np.sqrt(((np.indices((40, 40)) - 20.0) ** 2).sum(0))[:, :, None].repeat(8, 2)
        heat = np.clip(1.0 - dist / (2.0 * half), 0, 1).astype(np.float32)  # 0.5 exactly at radius = half
        hu = np.full(lung.shape, -850.0)
        hu[dist <= half] = -400.0
        true = (dist <= half) & lung
        evidence.append(Evidence(None, hu, lung, heat, [1.0, 1.0, 1.0], [], 0.9, {}))
        pct = 100.0 * true.sum() / lung.sum()
        truth.append({"lesion_percent": pct, "grade": grade_from_percent(pct)})
    fit = fit_calibration(evidence, truth, "hirescam", 0.5, thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
                          min_volumes=(0.0, 1.0))
    assert fit.per_rule["heatmap"]["threshold"] == 0.5
    assert fit.per_rule["heatmap"]["mae_percent"] < 0.5
    assert fit.mae_percent < 0.5 and fit.grade_accuracy == 1.0


def _disc_study(radius: float, probability: float) -> tuple[Evidence, np.ndarray]:
    lung = np.zeros((40, 40, 8), bool)
    lung[2:38, 2:38, :] = True
    dist = np.sqrt(((np.indices((40, 40)) - 20.0) ** 2).sum(0))[:, :, None].repeat(8, 2)
    heat = np.clip(1.0 - dist / (2.0 * radius), 0, 1).astype(np.float32)
    hu = np.full(lung.shape, -850.0)
    hu[dist <= radius] = -400.0
    return Evidence(None, hu, lung, heat, [1.0, 1.0, 1.0], [], probability, {}), (dist <= radius) & lung


def test_study_call_keeps_false_heat_of_negative_studies_out():
    """Two studies without lesions whose normalized map still shows a small dense spot (study probability 0.3)
    and two with lesions (0.9): without a study call the clean ones read as CT-1; the fit finds a call between
    0.3 and 0.9, grades all four right, and lesion_mask applies it."""
    evidence, truth = [], []
    for radius, prob, has_lesion in ((3, 0.3, False), (4, 0.3, False), (7, 0.9, True), (10, 0.9, True)):
        ev, true = _disc_study(radius, prob)
        evidence.append(ev)
        pct = 100.0 * true.sum() / ev.lung.sum() if has_lesion else 0.0
        truth.append({"lesion_percent": pct, "grade": grade_from_percent(pct)})
    kw = dict(thresholds=(0.5,), min_volumes=(0.0,), rules=("heatmap",))
    no_call = fit_calibration(evidence, truth, "hirescam", 0.5, study_calls=(0.0,), **kw)
    assert no_call.grade_accuracy == 0.5 and no_call.study_call == 0.0
    fit = fit_calibration(evidence, truth, "hirescam", 0.5, study_calls=(0.0, 0.2, 0.5, 0.95), **kw)
    assert fit.study_call == 0.5 and fit.grade_accuracy == 1.0 and fit.mae_percent < 0.5
    assert [s["grade"] for s in fit.per_study] == ["CT-0", "CT-0", "CT-1", "CT-1"]
    assert fit.values()["study_call"] == 0.5
    cal = {"threshold": 0.5, "lesion_rule": "heatmap", "min_lesion_ml": 0.0, "density_delta_hu": 200.0}
    assert not lesion_mask(evidence[0], "hirescam", {**cal, "study_call": 0.5}).any()
    assert lesion_mask(evidence[0], "hirescam", {**cal, "study_call": 0.0}).sum() > 0
    assert lesion_mask(evidence[2], "hirescam", {**cal, "study_call": 0.5}).sum() > 0


def test_read_truth(tmp_path):
    (tmp_path / "t.csv").write_text("study,lesion_percent,grade\na,0,CT-0\nb,30.5,\nc,,CT-3\n")
    t = read_truth(tmp_path / "t.csv")
    assert t == {"a": {"lesion_percent": 0.0, "grade": "CT-0"}, "b": {"lesion_percent": 30.5, "grade": "CT-2"},
                 "c": {"lesion_percent": None, "grade": "CT-3"}}
    (tmp_path / "bad.csv").write_text("study,grade\na,CT-9\n")
    with pytest.raises(CTSeverityError, match="CT-9"):
        read_truth(tmp_path / "bad.csv")
