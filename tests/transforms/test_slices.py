"""Slice extraction for the classifier and pasting maps back onto the CT grid."""

from __future__ import annotations

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
