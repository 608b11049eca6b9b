"""Slice extraction for the classifier and pasting maps back onto the CT grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_ext.transforms.slices import extract_slices, lung_box, lung_slice_indices, paste_slices, window_hu


def _study():
    vol = torch.full((60, 50, 20), -1000.0)
    vol[5:55, 5:45] = 40.0
    lung = torch.zeros(60, 50, 20, dtype=torch.uint8)
    lung[10:50, 12:38, 3:17] = 1
    vol[lung.bool()] = -850.0
    return vol, lung


def test_window_maps_hu_to_unit_range():
    x = torch.tensor([-2000.0, -1350.0, -600.0, 150.0, 900.0])
    torch.testing.assert_close(window_hu(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_lung_slices_and_square_box():
    vol, lung = _study()
    lung[10:12, 12:14, 3] = 1  # slice 3 has a full lung already; add a slice with a sliver
    lung[20, 20, 18] = 1
    idx = lung_slice_indices(lung, min_fraction=0.02)
    assert idx.tolist() == list(range(3, 17))  # the one-voxel slice 18 is left out
    x0, x1, y0, y1 = lung_box(lung, (1.0, 1.0, 2.0), margin_mm=5.0)
    assert x1 - x0 == y1 - y0  # square in mm with isotropic in-plane spacing
    assert x0 <= 5 and x1 >= 55 and (y0 + y1) / 2 == pytest.approx((12 + 37) / 2, abs=1)
    # anisotropic in-plane spacing: square in millimetres
    x0, x1, y0, y1 = lung_box(lung, (1.0, 2.0, 2.0), margin_mm=0.0)
    assert (x1 - x0) * 1.0 == pytest.approx((y1 - y0) * 2.0, abs=2.5)


def test_extract_then_paste_is_identity_on_the_box():
    vol, lung = _study()
    stack = extract_slices(vol, lung, (1.0, 1.0, 2.0), size=32, margin_mm=3.0)
    assert stack.images.shape == (14, 1, 32, 32)
    assert 0.0 <= float(stack.images.min()) and float(stack.images.max()) <= 1.0
    # a constant map per slice comes back as that constant inside the box, on the selected slices
    maps = torch.arange(14, dtype=torch.float32).view(14, 1, 1, 1).expand(14, 1, 32, 32)
    vol_map = paste_slices(maps, stack)
    assert vol_map.shape == (60, 50, 20)
    x0, x1, y0, y1 = stack.box
    for k, z in enumerate(stack.indices.tolist()):
        inner = vol_map[max(0, x0):min(60, x1), max(0, y0):min(50, y1), z]
        torch.testing.assert_close(inner, torch.full_like(inner, float(k)))
    assert float(vol_map[:, :, :3].abs().sum()) == 0.0 and float(vol_map[:, :, 17:].abs().sum()) == 0.0


def test_context_channels_are_neighbours():
    vol, lung = _study()
    vol[:, :, 5] = 150.0  # a bright slice: window value 1
    stack = extract_slices(vol, lung, (1.0, 1.0, 2.0), size=16, context=1, indices=[4, 5, 6])
    assert stack.images.shape == (3, 3, 16, 16)
    bright = stack.images[1, 1]  # slice 5 itself
    assert float(bright.max()) == pytest.approx(1.0)
    torch.testing.assert_close(stack.images[0, 2], bright)  # slice 4's upper neighbour is 5
    torch.testing.assert_close(stack.images[2, 0], bright)  # slice 6's lower neighbour is 5
    assert float((stack.images[1, 0] - bright).abs().max()) > 0.5  # slice 4 is not bright


def test_empty_lung_is_an_error():
    vol, lung = _study()
    with pytest.raises(ValueError, match="empty"):
        extract_slices(vol, torch.zeros_like(lung), (1.0, 1.0, 2.0))


def test_flattened_surroundings():
    """With ``flatten_beyond_mm`` everything farther than the margin from its slice's lung is soft
    tissue (40 HU) in the input; the lung and the rim around it are as without it."""
    from scipy import ndimage as ndi

    from monai_ext.data import synthetic_chest_ct
    from monai_ext.transforms.slices import SOFT_TISSUE_HU, flatten_surroundings, lung_surroundings

    ct = synthetic_chest_ct((96, 96, 24), (3.5, 3.5, 10.0), seed=2, noise_hu=0)
    hu, lung, spc = torch.from_numpy(ct.image), torch.from_numpy(ct.lung_mask.astype(np.uint8)), ct.spacing
    near = lung_surroundings(lung, spc, 7.0)
    for k in range(lung.shape[2]):
        if lung[:, :, k].any():
            ref = ndi.distance_transform_edt(~lung[:, :, k].numpy().astype(bool), sampling=spc[:2]) <= 7.0
            assert np.array_equal(near[:, :, k].numpy(), ref)
        else:
            assert not near[:, :, k].any()
    lung_slices = lung.bool().any(dim=0).any(dim=0)
    flat_all = flatten_surroundings(hu, lung, spc, 7.0, keep_air=False)
    assert torch.equal(flat_all[near], hu[near]) and torch.equal(flat_all[:, :, ~lung_slices], hu[:, :, ~lung_slices])
    assert bool((flat_all[:, :, lung_slices][~near[:, :, lung_slices]] == SOFT_TISSUE_HU).all())
    flat = flatten_surroundings(hu, lung, spc, 7.0)  # the air around the body stays
    body = torch.from_numpy(ct.masks["body"] > 0)
    outside = ~body & ~near & lung_slices[None, None, :] & (hu < -900)  # air (the table is flattened too)
    assert outside.sum() > 1000 and torch.equal(flat[outside], hu[outside])
    far_body = body & ~near & lung_slices[None, None, :] & (hu > -900)
    assert far_body.sum() > 1000 and bool((flat[far_body] == SOFT_TISSUE_HU).all())
    assert torch.equal(flat[near], hu[near])
    plain = extract_slices(hu, lung, spc, size=64)
    flat_in = extract_slices(hu, lung, spc, size=64, flatten_beyond_mm=7.0)
    direct = extract_slices(flat, lung, spc, size=64)
    torch.testing.assert_close(flat_in.images, direct.images)
    # 2.5D: each neighbour plane flattened by its own lung, as in the flattened volume
    torch.testing.assert_close(extract_slices(hu, lung, spc, size=64, context=1, flatten_beyond_mm=7.0).images,
                               extract_slices(flat, lung, spc, size=64, context=1).images)
    assert not torch.equal(plain.images, flat_in.images)
    soft = float(window_hu(torch.tensor(SOFT_TISSUE_HU)))
    assert float((flat_in.images - soft).abs().lt(1e-4).float().mean()) > 0.2  # a large uniform part
    with pytest.raises(ValueError, match="margin_mm"):
        lung_surroundings(lung, spc, -1.0)
