"""Organ intrusion into a lung mask: the column criterion on hand-made volumes, orientation, and the
threshold mask of real CT without the organ domes."""

from __future__ import annotations

import numpy as np
import pytest

from monai_ext.transforms.organs import canonical_view, organ_intrusion


def dome_volume():
    """Abdomen (50 HU) below z = 6, a dome bulging into the lung (x, y 5..14, z 6..8), a consolidation
    higher up with aerated lung under it (z 12..14), and a mask that took both in."""
    ct = np.full((20, 20, 20), -850.0, np.float32)
    ct[:, :, :6] = 50.0
    ct[5:15, 5:15, 6:9] = 50.0
    ct[6:10, 6:10, 12:15] = 20.0
    lung = np.zeros(ct.shape, bool)
    lung[2:18, 2:18, 6:18] = True
    return ct, lung


def test_dome_is_found_consolidation_with_air_below_is_not():
    ct, lung = dome_volume()
    dome = organ_intrusion(ct, lung, (2.0, 2.0, 2.0), smooth_mm=0.0, rim_mm=0.0)
    assert dome.sum() == 10 * 10 * 3
    assert dome[5:15, 5:15, 6:9].all()
    assert not dome[6:10, 6:10, 12:15].any()  # aerated lung below it in every column
    assert not (dome & ~lung).any()


def test_partial_volume_rim_goes_with_the_dome():
    ct, lung = dome_volume()
    ct[5:15, 5:15, 9] = -550.0  # partial volume above the dome
    ct[2:4, 2:4, 9] = -550.0  # the same density far from it stays
    dome = organ_intrusion(ct, lung, (2.0, 2.0, 2.0), smooth_mm=0.0, rim_mm=2.5)
    assert dome[5:15, 5:15, 9].all()
    assert not dome[2:4, 2:4, 9].any()


def test_height_limit_spares_a_mass_on_the_heart():
    ct, lung = dome_volume()
    ct[8:12, 8:12, 9:16] = 40.0  # a column of tissue rising from the dome up to z = 15
    full = organ_intrusion(ct, lung, (2.0, 2.0, 2.0), smooth_mm=0.0, rim_mm=0.0, max_height_mm=None)
    low = organ_intrusion(ct, lung, (2.0, 2.0, 2.0), smooth_mm=0.0, rim_mm=0.0, max_height_mm=10.0)
    assert full[8:12, 8:12, 15].all()
    assert not low[:, :, 12:].any() and low[:, :, 6:12].any()


def test_orientation_follows_the_affine():
    ct, lung = dome_volume()
    spacing = (2.0, 2.0, 2.0)
    ref = organ_intrusion(ct, lung, spacing, smooth_mm=0.0, rim_mm=0.0)
    # the same volume stored upside down (z inferior) with its RAS affine
    flipped_affine = np.diag([-2.0, -2.0, -2.0, 1.0])
    out = organ_intrusion(ct[:, :, ::-1], lung[:, :, ::-1], spacing, affine=flipped_affine, smooth_mm=0.0,
                          rim_mm=0.0)
    assert np.array_equal(out[:, :, ::-1], ref)
    canon, cspacing, _, _ = canonical_view(ct[:, :, ::-1], spacing, flipped_affine)
    assert np.array_equal(canon, ct) and cspacing == spacing


def test_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        organ_intrusion(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))


def test_threshold_mask_of_real_ct_leaves_the_spleen_dome_out(shared):
    """LIDC-IDRI-0003: the left dome bulges up between lung on axial slices; slice-wise hole filling took
    it in (tens of ml of soft tissue); with the organ removal no dense tissue rising from the abdomen
    is left in the mask."""
    from monai_ext.io import load_ct
    from monai_ext.transforms import LungMask

    ct = load_ct(shared("lidc_idri/LIDC-IDRI-0003_ct.nii.gz"))
    hu, spacing, affine = np.asarray(ct[0]), [float(s) for s in ct.pixdim], np.asarray(ct.affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    old = np.asarray(LungMask(backend="threshold", remove_organs=False)(ct)[0]) > 0
    new = np.asarray(LungMask(backend="threshold")(ct)[0]) > 0
    assert organ_intrusion(hu, old, spacing, affine=affine, rim_mm=0.0).sum() * voxel_ml > 10.0
    assert organ_intrusion(hu, new, spacing, affine=affine, rim_mm=0.0).sum() == 0
    assert not (new & ~old).any()
    assert 0.98 < new.sum() / old.sum() < 1.0  # the domes and rims, not the lung
