"""Lesion statistics (monai_ext.data.lesion_stats): hand-checkable values on small masks, and the fitted
generator against the real MosMed / MedSeg figures (scripts/lesion_stats.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from monai_ext.data import (
    axis_codes,
    component_sizes,
    ggo_texture,
    half_share,
    hu_by_label,
    in_plane_boundary_distance,
    resample_slices,
    side_shares,
    slice_statistics,
    study_statistics,
    subpleural_share,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lesion_stats.py"


# ------------------------------------------------------------------------------ small synthetic masks
def test_two_cubes_count_and_volumes():
    m = np.zeros((30, 30, 12), np.uint8)
    m[2:5, 2:5, 2:5] = 1  # 27 voxels
    m[10:14, 10:14, 6:8] = 1  # 32 voxels
    sizes = component_sizes(m, (0.5, 0.5, 8.0))  # 2 mm3 per voxel
    assert sizes.tolist() == [64.0, 54.0]
    s = study_statistics(m, (0.5, 0.5, 8.0), axcodes=("L", "A", "S"))
    assert s["n_components"] == 2 and s["component_ml"] == [0.064, 0.054]
    assert s["n_components_min"] == 0  # both under 0.1 ml
    assert s["lesion_ml"] == pytest.approx(0.118)
    assert s["largest_share"] == pytest.approx(64 / 118)
    assert s["slices_with_lesion"] == 5


def test_connectivity():
    m = np.zeros((6, 6, 6), bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # corner neighbours
    assert component_sizes(m, (1, 1, 1)).size == 1  # 26-connected by default
    assert component_sizes(m, (1, 1, 1), connectivity=2).size == 2
    assert component_sizes(m, (1, 1, 1), connectivity=1).size == 2
    assert component_sizes(np.zeros((4, 4, 4)), (1, 1, 1)).size == 0
    with pytest.raises(ValueError, match="connectivity"):
        component_sizes(m, (1, 1, 1), connectivity=4)


def test_resample_slices_like_mosmed():
    v = np.arange(100)[None, None, :] * np.ones((2, 2, 1), int)
    out, spc = resample_slices(v, (0.7, 0.7, 0.8), 8.0)  # every 10th 0.8 mm slice, as MosMed
    assert out[0, 0].tolist() == list(range(0, 100, 10)) and spc == (0.7, 0.7, 8.0)
    same, spc2 = resample_slices(v, (0.7, 0.7, 8.0), 8.0)
    assert same is v and spc2 == (0.7, 0.7, 8.0)
    with pytest.raises(ValueError, match="spacing"):
        resample_slices(v, (0.7, 0.7), 8.0)


def test_subpleural_touching_boundary_and_deep():
    lung = np.zeros((80, 80, 5), bool)
    lung[10:70, 10:70, :] = True  # 60 x 60 mm square lung, 1 mm pixels
    rim = np.zeros_like(lung)
    rim[10:13, 20:40, 1:4] = True  # touches the boundary
    deep = np.zeros_like(lung)
    deep[38:42, 38:42, 1:4] = True  # 28 mm from every side
    assert subpleural_share(rim, lung, (1.0, 1.0, 5.0)) == 1.0
    assert subpleural_share(deep, lung, (1.0, 1.0, 5.0)) == 0.0
    # in-plane: the lesion at the top slice is not subpleural because of z
    top = np.zeros_like(lung)
    top[38:42, 38:42, 4] = True
    assert subpleural_share(top, lung, (1.0, 1.0, 5.0)) == 0.0
    assert subpleural_share(top, lung, (1.0, 1.0, 5.0), slice_axis=None) == 1.0
    assert np.isnan(subpleural_share(np.zeros_like(lung), lung, (1.0, 1.0, 5.0)))
    # the array border counts as outside the lung
    d = in_plane_boundary_distance(np.ones((5, 5), bool), (1.0, 1.0), None)
    assert d[0, 0] == 1.0 and d[2, 2] == 3.0


def test_halves_and_orientation():
    les = np.zeros((10, 10, 10), bool)
    les[:, :, 1:3] = True  # low z
    lung = np.ones_like(les)
    # z index grows towards superior (S): lesion in the lower half
    assert half_share(les, lung, axis=2, towards_high=False) == 1.0
    s = study_statistics(les, (1, 1, 1), lung=lung, axcodes=("L", "A", "S"))
    assert s["lower_share"] == 1.0 and s["lung_lower_share"] == 0.5
    s = study_statistics(les, (1, 1, 1), lung=lung, axcodes=("L", "A", "I"))  # z grows towards inferior
    assert s["lower_share"] == 0.0
    post = np.zeros_like(les)
    post[:, 7:9] = True  # high y
    assert study_statistics(post, (1, 1, 1), lung=lung, axcodes=("L", "P", "S"))["posterior_share"] == 1.0
    assert study_statistics(post, (1, 1, 1), lung=lung, axcodes=("L", "A", "S"))["posterior_share"] == 0.0
    assert axis_codes(np.diag([-1.0, 1.0, 1.0, 1.0])) == ("L", "A", "S")
    with pytest.raises(ValueError, match="repeated"):
        axis_codes(axcodes=("L", "R", "S"))
    with pytest.raises(ValueError, match="axcodes"):
        axis_codes(axcodes=("L", "P"), ndim=3)


def test_sides_and_bilateral():
    les = np.zeros((20, 4, 4), bool)
    les[2:5] = True  # index 0 is the patient's right with L codes
    right, left = side_shares(les, ("L", "P", "S"))
    assert (right, left) == (1.0, 0.0)
    assert side_shares(les, ("R", "P", "S")) == (0.0, 1.0)
    les[15] = True  # 16 voxels on the left, 48 on the right
    assert side_shares(les, ("L", "P", "S")) == (0.75, 0.25)
    lung = np.zeros(les.shape, np.uint8)
    lung[:10] = 1
    lung[10:] = 2
    assert side_shares(les, ("L", "P", "S"), lung) == (0.75, 0.25)
    s = study_statistics(les, (1, 1, 1), axcodes=("L", "P", "S"))
    assert s["bilateral"] and s["right_share"] == 0.75
    one = np.zeros((40, 4, 4), bool)  # midline at index 19.5
    one[0:13] = True  # 208 voxels on the right
    one[30, 0, 0] = True  # 1 voxel on the left: 0.5 % < 1 %
    assert not study_statistics(one, (1, 1, 1), axcodes=("L", "P", "S"))["bilateral"]
    one[30, 0, :] = True  # 4 voxels: 1.9 %
    assert study_statistics(one, (1, 1, 1), axcodes=("L", "P", "S"))["bilateral"]


def test_slice_statistics_labels_and_hu():
    lung = np.zeros((60, 40), np.uint8)
    lung[5:28, 5:35] = 1
    lung[32:55, 5:35] = 2
    labels = np.zeros(lung.shape, np.uint8)
    labels[8:20, 20:34] = 1  # GGO, right lung, posterior
    labels[40:44, 25:29] = 2  # consolidation, left lung
    lesion = labels > 0
    hu = np.full(lung.shape, -850.0)
    hu[labels == 1] = -600.0
    hu[labels == 2] = -20.0
    s = slice_statistics(lesion, lung, 1.0, hu=hu, labels=labels)
    assert s["load_percent"] == pytest.approx(100 * (12 * 14 + 16) / (2 * 23 * 30))
    assert s["consolidation_share"] == pytest.approx(16 / (12 * 14 + 16))
    assert s["n_components"] == 2 and s["bilateral"]
    assert s["posterior_share"] == 1.0 and s["lung_posterior_share"] == 0.5
    assert s["hu"]["ggo"]["p50"] == -600.0 and s["hu"]["consolidation"]["p50"] == -20.0
    assert hu_by_label(hu, labels)["ggo"]["n"] == 12 * 14
    with pytest.raises(ValueError, match="pixel_mm"):
        slice_statistics(lesion, lung, 0.0)


def test_ggo_texture_sees_reticulation():
    rng = np.random.default_rng(0)
    hu = -850.0 + 20.0 * rng.standard_normal((120, 120))
    lung = np.ones(hu.shape, bool)
    ggo = np.zeros(hu.shape, bool)
    ggo[30:90, 60:115] = True
    smooth = hu + 300.0 * ndi.gaussian_filter(ggo.astype(float), 3.0)  # a soft margin, as real GGO has
    paved = smooth.copy()
    paved[30:90:6, 60:115] += 150.0  # thickened septa, 1 pixel wide, 6 pixels apart
    paved[30:90, 60:115:6] += 150.0
    a = ggo_texture(smooth, ggo, lung, 1.0)
    b = ggo_texture(paved, ggo, lung, 1.0)
    assert 0.8 < a["texture_ratio"] < 1.25 and a["reticular_fraction"] < 0.05
    assert b["texture_ratio"] > 2.0 and b["reticular_fraction"] > 0.5
    empty = ggo_texture(smooth, np.zeros_like(ggo), lung, 1.0)
    assert np.isnan(empty["texture_ratio"])


# ---------------------------------------------------------------- fitted generator vs the real figures
@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("lesion_stats_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_fitted_generator_matches_real_statistics(script, shared):
    """One LIDC CT, lesions at the MosMed volume quartiles (3D) and at 5..60 % load (2D: 12 studies, 3 slices each).

    Tolerances (the generator's median against the real one): components >= 0.1 ml per study within
    a factor 2 of MosMed's; largest component share within 0.2; GGO median HU within 80 HU, subpleural
    share within 0.1, posterior share within 0.15, consolidation share within 0.15 of the MedSeg medians
    (each MedSeg slice paired with the generator slice of the nearest lesion load).
    """
    data = shared("mosmed_masks/study_0255_mask.nii.gz").parents[1]
    shared("medseg_slices_infnet/train/images/0.jpg")
    base = script.load_base(shared("lidc_idri/LIDC-IDRI-0001_ct.nii.gz"))
    base["lung_ml"] = float(np.count_nonzero(base["lung"]) * np.prod(base["spacing"]) / 1000.0)

    mosmed, _ = script.measure_mosmed(data)
    real_vol = np.percentile([r["lesion_ml"] for r in mosmed], [25, 50, 75])
    gen3d = [script.measure_generator_study(base, v / base["lung_ml"], seed=i, rng=None)[0]
             for i, v in enumerate(real_vol)]
    real_n = np.median([r["n_components_min"] for r in mosmed])
    gen_n = np.median([r["n_components_min"] for r in gen3d])
    assert real_n / 2 <= gen_n <= 2 * real_n, (gen_n, real_n)
    real_big = np.median([r["largest_share"] for r in mosmed])
    gen_big = np.median([r["largest_share"] for r in gen3d])
    assert abs(gen_big - real_big) <= 0.2, (gen_big, real_big)

    cache = script.medseg_slices(data)
    rng = np.random.default_rng(0)
    gen_cache = []
    for i, load in enumerate((5.0, 10.0, 20.0, 30.0, 45.0, 60.0) * 2):
        gen_cache += script.measure_generator_study(base, load / 100.0, seed=10 + i, rng=rng)[1]
    width = float(np.median(script.lung_width_mm(base)))
    assert 180.0 < width < 300.0  # mm: a chest, so the pixel size estimate of the MedSeg slices is sane
    real2d = script.slice_rows(cache, width)
    gen2d = script.match_by_load(real2d, script.slice_rows(gen_cache, width))

    def med(rows, key):
        return float(np.nanmedian(script._vals(rows, key)))

    assert abs(med(gen2d, "hu.ggo.p50") - med(real2d, "hu.ggo.p50")) <= 80.0
    assert abs(med(gen2d, "subpleural_share") - med(real2d, "subpleural_share")) <= 0.1
    assert abs(med(gen2d, "posterior_share") - med(real2d, "posterior_share")) <= 0.15
    assert abs(med(gen2d, "consolidation_share") - med(real2d, "consolidation_share")) <= 0.15
