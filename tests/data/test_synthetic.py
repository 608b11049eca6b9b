"""The procedural chest CT phantom: determinism, tissues, lungs, airways, table, geometry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from monai_ext.data import SyntheticCT, phantom_affine, synthetic_chest_ct

SHAPE = (112, 112, 44)
SPACING = (3.4, 3.4, 6.6)  # a 381 x 381 x 290 mm field of view: a whole adult chest


@pytest.fixture(scope="module")
def ct() -> SyntheticCT:
    return synthetic_chest_ct(SHAPE, SPACING, seed=3)


def test_types_shapes_and_affine(ct):
    assert ct.image.shape == SHAPE and ct.image.dtype == np.float32
    assert ct.lung.shape == SHAPE and ct.lung.dtype == np.uint8
    assert set(np.unique(ct.lung).tolist()) == {0, 1, 2}
    assert ct.spacing == SPACING
    np.testing.assert_allclose(np.diag(ct.affine)[:3], [-3.4, -3.4, 6.6])
    centre = ct.affine @ np.array([(SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2, (SHAPE[2] - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    for name in ("body", "table", "trachea", "airway", "vessel", "bone", "heart"):
        assert ct.masks[name].shape == SHAPE and ct.masks[name].any(), name
    assert ct.meta["seed"] == 3 and 15 <= ct.meta["noise_hu"] <= 30


def test_deterministic_per_seed(ct):
    again = synthetic_chest_ct(SHAPE, SPACING, seed=3)
    np.testing.assert_array_equal(again.image, ct.image)
    np.testing.assert_array_equal(again.lung, ct.lung)
    other = synthetic_chest_ct(SHAPE, SPACING, seed=4)
    assert not np.array_equal(other.image, ct.image)
    assert other.meta["lung_height_mm"] != ct.meta["lung_height_mm"]


def test_tissue_hu_ranges(ct):
    img, lung, body, bone = ct.image, ct.lung_mask, ct.masks["body"] > 0, ct.masks["bone"] > 0
    assert -920 < np.median(img[lung]) < -780
    assert np.median(img[bone]) > 300 and np.percentile(img[bone], 90) > 450
    outside = ~body & (ct.masks["table"] == 0) & (img > -1024)
    assert np.median(img[outside]) < -950
    wall = body & ~lung & ~bone & (ct.masks["airway"] == 0)
    soft = img[wall]
    assert np.mean((soft > -160) & (soft < -40)) > 0.1  # fat
    assert np.mean((soft > 0) & (soft < 110)) > 0.2  # muscle, heart, vessels, organs
    heart = img[ct.masks["heart"] > 0]
    assert 0 < np.median(heart) < 80
    noise = np.std(np.diff(img[outside.all(axis=2)], axis=0)) / np.sqrt(2)  # air: noise only
    assert 5 < noise < 40


def test_lungs_volume_and_shape(ct):
    lung = ct.lung_mask
    voxel_ml = np.prod(SPACING) / 1000.0
    assert 2500 < lung.sum() * voxel_ml < 8000
    # two separate lungs: right (label 1) in the patient's right half (low x), left in the other
    comp, n = ndi.label(lung)
    sizes = np.sort(np.bincount(comp.ravel())[1:])[::-1]
    assert n >= 2 and sizes[:2].sum() > 0.99 * lung.sum() and sizes[1] > 0.3 * sizes[0]
    xs = np.arange(SHAPE[0])[:, None, None]
    mid = (SHAPE[0] - 1) / 2
    assert np.mean(np.broadcast_to(xs, SHAPE)[ct.lung == 1] < mid) > 0.99
    assert np.mean(np.broadcast_to(xs, SHAPE)[ct.lung == 2] > mid) > 0.99
    # lungs over most slices, with slices without lung at the top (neck) and bottom (abdomen)
    zl = np.flatnonzero(lung.any(axis=(0, 1)))
    assert len(zl) > 0.6 * SHAPE[2] and zl[0] > 0 and zl[-1] < SHAPE[2] - 1
    # apices: the lung cross-section shrinks towards the top; domes: towards the bottom
    area = lung.sum(axis=(0, 1))
    assert area[zl[-1]] < 0.3 * area.max() and area[zl[0]] < 0.5 * area.max()
    # lungs lie inside the body, and inside the ribs (not in the body wall)
    assert not np.any(lung & (ct.masks["body"] == 0)) and not np.any(lung & (ct.masks["bone"] > 0))


def test_trachea_at_the_top_not_in_lung(ct):
    airway = ct.masks["trachea"] > 0
    assert not np.any(airway & ct.lung_mask)
    assert np.any((ct.masks["airway"] > 0) & ct.lung_mask)  # intrapulmonary bronchi are in the lung
    zl = np.flatnonzero(ct.lung_mask.any(axis=(0, 1)))
    top = zl[-1]  # highest lung slice: the trachea is there, central, dark
    sl = airway[:, :, top]
    assert sl.any()
    xs, ys = np.nonzero(sl)
    assert abs(xs.mean() - (SHAPE[0] - 1) / 2) < 8
    assert np.median(ct.image[:, :, top][sl]) < -800
    assert airway[:, :, -1].any()  # runs up to the top of the volume (the neck)


def test_table_below_body_with_air_gap(ct):
    body, table = ct.masks["body"] > 0, ct.masks["table"] > 0
    assert not np.any(body & table)
    ys = np.arange(SHAPE[1])
    body_back = np.max(np.where(body, ys[None, :, None], -1), axis=1)  # (x, z): most posterior body voxel
    table_top = np.min(np.where(table, ys[None, :, None], 10**6), axis=1)
    both = (body_back >= 0) & (table_top < 10**6)
    assert both.any()
    assert np.all(table_top[both] > body_back[both] + 1)  # posterior (image bottom), with a gap
    col = np.argmax(both.sum(axis=1))
    k = SHAPE[2] // 2
    gap = ct.image[col, body_back[col, k] + 1 : table_top[col, k], k]
    assert len(gap) >= 1 and np.all(gap < -700)


def test_any_grid_and_physical_size():
    small = synthetic_chest_ct((40, 48, 20), (9.5, 8.0, 14.0), seed=0, noise_hu=0)
    assert small.image.shape == (40, 48, 20) and small.lung_mask.any()
    np.testing.assert_allclose(small.affine, phantom_affine((40, 48, 20), (9.5, 8.0, 14.0)))
    # the same field of view at two spacings gives the same anatomy in mm
    a = synthetic_chest_ct((80, 80, 32), (4.8, 4.8, 9.0), seed=5, noise_hu=0)
    b = synthetic_chest_ct((96, 96, 40), (4.0, 4.0, 7.2), seed=5, noise_hu=0)
    va = a.lung_mask.sum() * np.prod(a.spacing)
    vb = b.lung_mask.sum() * np.prod(b.spacing)
    assert abs(va - vb) / vb < 0.05
    # a field of view smaller than a chest shrinks the anatomy to fit
    tiny = synthetic_chest_ct((32, 32, 16), (2.0, 2.0, 4.0), seed=5, noise_hu=0)
    assert tiny.meta["scale_xy"] < 0.3 and tiny.lung_mask.any()


def test_anatomy_options_and_noise():
    quiet = synthetic_chest_ct((64, 64, 24), (6.0, 6.0, 12.0), seed=1, noise_hu=0, fov_circle=False, lung_hu=-870.0)
    assert quiet.meta["lung_hu"] == -870.0 and quiet.meta["noise_hu"] == 0.0
    assert quiet.image.min() >= -1000.5  # no noise, no -1024 outside a reconstruction circle
    no_table = synthetic_chest_ct((64, 64, 24), (6.0, 6.0, 12.0), seed=1, table=False)
    assert not no_table.masks["table"].any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (64, 64)}, "shape"),
        ({"shape": (64, 64, 4)}, "at least 8"),
        ({"shape": (64.5, 64, 24)}, "shape"),
        ({"spacing": (1.0, 0.0, 2.0)}, "spacing"),
        ({"spacing": "abc"}, "spacing"),
        ({"noise_hu": -1}, "noise_hu"),
        ({"lungs": 3}, "unknown anatomy option"),
        ({"lung_hu": 100.0}, "lung_hu"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"shape": (64, 64, 24), "spacing": (6.0, 6.0, 12.0)} | kwargs
    with pytest.raises(ValueError, match=match):
        synthetic_chest_ct(**args)
