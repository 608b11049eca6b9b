"""Lesion insertion: requested lesion shares on a phantom and on the real chest CT, appearance, shape."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from monai_ext.data import CONSOLIDATION_HU, GGO_HU, insert_lesions, synthetic_chest_ct
from monai_ext.errors import NoLungFoundError

FRACTIONS = (0.0, 0.05, 0.2, 0.4, 0.6, 0.8)


@pytest.fixture(scope="module")
def phantom():
    return synthetic_chest_ct((96, 96, 40), (4.0, 4.0, 8.0), seed=11)


@pytest.fixture(scope="module")
def fine_phantom():
    """Finer grid, so that vessels are several voxels wide."""
    return synthetic_chest_ct((144, 144, 64), (2.6, 2.6, 4.5), seed=2)


def rough_lung_mask(volume: np.ndarray) -> np.ndarray:
    """A rough lung mask for the tests: air below -320 HU not connected to the in-plane border
    (outside air, table), the two largest components, holes filled per slice; 1 right, 2 left."""
    air = volume < -320
    comp, _ = ndi.label(air)
    border = np.unique(np.concatenate([comp[[0, -1]].ravel(), comp[:, [0, -1]].ravel()]))
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    sizes[border] = 0
    keep = [k for k in np.argsort(sizes)[::-1][:2] if sizes[k] > 0.1 * sizes.max()]
    lung = np.isin(comp, keep)
    for k in range(lung.shape[2]):
        lung[:, :, k] = ndi.binary_fill_holes(lung[:, :, k])
    right = np.arange(lung.shape[0])[:, None, None] < lung.shape[0] // 2
    return np.where(lung, np.where(right, 1, 2), 0).astype(np.uint8)


@pytest.fixture(scope="module")
def real_ct(real_ct_path):
    nii = nib.load(str(real_ct_path))
    image = np.asarray(nii.dataobj)
    assert nib.aff2axcodes(nii.affine) == ("L", "P", "S")  # the lesion model's axis order
    lung = rough_lung_mask(image)
    assert 3.0 < lung.astype(bool).sum() * np.prod(nii.header.get_zooms()) / 1e6 < 8.0  # litres
    return image, lung, tuple(float(z) for z in nii.header.get_zooms())


def lesion_share(mask: np.ndarray, lung: np.ndarray) -> float:
    return float(np.count_nonzero(mask) / np.count_nonzero(lung))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_fraction_reached_on_phantom(phantom, fraction):
    out, mask = insert_lesions(phantom.image, phantom.lung, phantom.spacing, fraction, seed=3)
    lung = phantom.lung_mask
    assert out.shape == phantom.image.shape and out.dtype == np.float32 and mask.dtype == np.uint8
    assert abs(lesion_share(mask, lung) - fraction) <= 0.01
    assert not np.any((mask > 0) & ~lung)  # lesions inside the lung
    assert np.array_equal(out[~lung], phantom.image[~lung])  # nothing changes outside the lung
    if fraction == 0:
        assert not mask.any() and np.array_equal(out, phantom.image)
    else:
        assert np.mean(out[mask > 0]) > np.mean(phantom.image[mask > 0]) + 150
    if fraction >= 0.2:  # bilateral
        per_lung = [np.count_nonzero(mask[phantom.lung == k]) for k in (1, 2)]
        assert min(per_lung) > 0.15 * sum(per_lung)


def test_deterministic_and_seeded(phantom):
    a = insert_lesions(phantom.image, phantom.lung, phantom.spacing, 0.3, seed=5)
    b = insert_lesions(phantom.image, phantom.lung, phantom.spacing, 0.3, seed=5)
    c = insert_lesions(phantom.image, phantom.lung, phantom.spacing, 0.3, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_shape_peripheral_lower_posterior_multifocal(phantom):
    lung = phantom.lung_mask
    ratios = {"low": [], "post": [], "depth": []}
    for seed in range(4):
        _, mask = insert_lesions(phantom.image, phantom.lung, phantom.spacing, 0.15, seed=seed)
        les = mask > 0
        zs = np.nonzero(lung.any(axis=(0, 1)))[0]
        zmid = (zs[0] + zs[-1]) / 2
        z = np.arange(lung.shape[2])[None, None, :]
        ratios["low"].append(
            np.mean(np.broadcast_to(z, lung.shape)[les] < zmid) / np.mean(np.broadcast_to(z, lung.shape)[lung] < zmid)
        )
        ys = np.nonzero(lung.any(axis=(0, 2)))[0]
        y = np.arange(lung.shape[1])[None, :, None]
        ymid = (ys[0] + ys[-1]) / 2
        ratios["post"].append(
            np.mean(np.broadcast_to(y, lung.shape)[les] > ymid) / np.mean(np.broadcast_to(y, lung.shape)[lung] > ymid)
        )
        depth = ndi.distance_transform_edt(lung, sampling=phantom.spacing)
        ratios["depth"].append(depth[les].mean() / depth[lung].mean())
        _, n = ndi.label(les)
        assert n >= 3  # multifocal
    assert np.mean(ratios["low"]) > 1.05  # lower-lung predominance
    assert np.mean(ratios["post"]) > 1.05  # posterior predominance
    assert np.mean(ratios["depth"]) < 0.95  # peripheral, subpleural


def test_ggo_density_and_vessels_visible(fine_phantom):
    ct = fine_phantom
    out, mask = insert_lesions(ct.image, ct.lung, ct.spacing, 0.5, seed=1, kind="ggo")
    les = mask > 0
    vessel = (ct.masks["vessel"] > 0) & les & (ct.image > -150)  # vessels clearly seen before
    paren = les & (ct.masks["vessel"] == 0) & (ct.masks["airway"] == 0)
    assert GGO_HU[0] < np.median(out[paren]) < GGO_HU[1]
    assert np.std(out[paren]) > 40  # textured, not flat
    assert vessel.sum() > 50
    # vessels stay visible through ground glass: brighter than it, and barely changed
    assert np.median(out[vessel]) > np.median(out[paren]) + 150
    assert np.median(np.abs(out[vessel] - ct.image[vessel])) < 120


def test_consolidation_density(fine_phantom):
    ct = fine_phantom
    out, mask = insert_lesions(ct.image, ct.lung, ct.spacing, 0.3, seed=2, kind="consolidation")
    core = ndi.binary_erosion(mask > 0, iterations=2)
    assert core.sum() > 100
    assert CONSOLIDATION_HU[0] - 50 < np.median(out[core]) < CONSOLIDATION_HU[1] + 50
    mixed, mmask = insert_lesions(ct.image, ct.lung, ct.spacing, 0.6, seed=2, kind="mixed")
    vals = mixed[mmask > 0]
    assert np.mean(vals > -200) > 0.05 and np.mean(vals < -350) > 0.3  # consolidation and GGO


def test_integer_input_and_info(phantom):
    img16 = np.rint(phantom.image).astype(np.int16)
    lung01 = phantom.lung_mask.astype(np.uint8)  # no left/right labels: split at the midline
    out, mask, info = insert_lesions(img16, lung01, phantom.spacing, 0.25, seed=0, return_info=True)
    assert out.dtype == np.int16
    assert info["lesion_voxels"] == int(mask.sum()) == round(0.25 * lung01.sum())
    assert abs(info["fraction"] - 0.25) < 1e-3 and min(info["per_lung_voxels"]) > 0
    same, empty = insert_lesions(img16, lung01, phantom.spacing, 0.0)
    assert np.array_equal(same, img16) and same is not img16 and not empty.any()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fraction": 1.5}, ValueError, "fraction"),
        ({"fraction": -0.1}, ValueError, "fraction"),
        ({"fraction": float("nan")}, ValueError, "fraction"),
        ({"kind": "nodule"}, ValueError, "kind"),
        ({"spacing": (1.0, 1.0)}, ValueError, "spacing"),
        ({"lung_mask": np.zeros((8, 8, 8), np.uint8)}, ValueError, "shape"),
        ({"lung_mask": np.zeros((16, 16, 8), np.uint8)}, NoLungFoundError, "empty"),
        ({"image": np.zeros((16, 16), np.int16)}, ValueError, "3D"),
    ],
)
def test_bad_input(kwargs, error, match):
    lung = np.zeros((16, 16, 8), np.uint8)
    lung[4:12, 4:12, 2:6] = 1
    args = {
        "image": np.full((16, 16, 8), -850, np.int16),
        "lung_mask": lung,
        "spacing": (2.0, 2.0, 4.0),
        "fraction": 0.1,
    }
    args |= kwargs
    with pytest.raises(error, match=match):
        insert_lesions(**args)


@pytest.mark.parametrize("fraction", [0.1, 0.8])
def test_fraction_reached_on_real_ct(real_ct, fraction):
    image, lung, spacing = real_ct
    out, mask = insert_lesions(image, lung, spacing, fraction, seed=4)
    lung_b = lung > 0
    assert out.dtype == np.int16 and out.shape == image.shape
    assert abs(lesion_share(mask, lung_b) - fraction) <= 0.01
    assert not np.any((mask > 0) & ~lung_b)
    assert np.array_equal(out[~lung_b], image[~lung_b])
    per_lung = [np.count_nonzero(mask[lung == k]) for k in (1, 2)]
    assert min(per_lung) > 0.15 * sum(per_lung)
    # lesions raise the density of the real parenchyma into the GGO / consolidation range
    les = mask > 0
    assert np.median(out[les]) > np.median(image[les]) + 250
    assert -750 < np.median(out[les]) < 0
