"""The project's lung U-Net (canvas geometry, weights checks, backend choice) and the default lung mask on
real CT (organ domes out, dense lesions in, agreement with the reference masks)."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch

import monai_ext.transforms.lung as lung
from monai_ext.transforms.lung_net import (
    LungNetInput,
    LungNetWeightsError,
    body_centre,
    canvas_grid,
    find_lung_net,
    load_lung_net,
    paste_canvas,
    register_default_lung_net,
    sample_canvas,
)
from monai_ext.transforms.organs import organ_intrusion
from pipelines import EMBEDDED_LUNG_NET

TINY = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1,
        "channels": [4, 8], "strides": [2], "num_res_units": 0}


def _write_net(folder, network_def=TINY, corrupt=False):
    from monai.bundle import ConfigParser

    net = ConfigParser({"net": dict(TINY)}).get_parsed_content("net")
    path = folder / "lung_net.pt"
    torch.save(net.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    info = {"network_def": network_def, "input": LungNetInput(size=32, pixel_mm=4.0).to_dict(),
            "sha256": "0" * 64 if corrupt else digest}
    path.with_suffix(".json").write_text(json.dumps(info))
    return path


def test_canvas_puts_a_point_where_its_millimetres_say():
    vol = np.full((100, 80, 5), -1000.0, np.float32)
    vol[60, 30, 2] = 1000.0  # at (60 * 0.5, 30 * 0.5) = (30, 15) mm
    cfg = LungNetInput(size=21, pixel_mm=1.0, context_mm=0.0, window=(-1000.0, 1000.0))
    x = sample_canvas(vol, [2], (0.5, 0.5, 2.0), (20.0, 15.0), cfg)
    assert x.shape == (1, 3, 21, 21)
    i, j = np.unravel_index(int(x[0, 1].argmax()), (21, 21))
    assert (i - 10, j - 10) == (10, 0)  # 10 mm further along x than the centre, same y
    assert np.allclose(x[0, 0], x[0, 1]) and np.allclose(x[0, 2], x[0, 1])  # context 0: the same slice


def test_canvas_and_paste_are_inverse_on_smooth_images():
    yy, xx = np.meshgrid(np.arange(64), np.arange(64))
    img = (np.sin(xx / 9.0) + np.cos(yy / 7.0)).astype(np.float32)
    cfg = LungNetInput(size=96, pixel_mm=0.5, context_mm=0.0, window=(-2.0, 2.0))
    x = sample_canvas(img[:, :, None].repeat(3, 2), [1], (1.0, 1.0, 1.0), (31.5, 31.5), cfg)
    back = paste_canvas(x[:, 1], (64, 64), (1.0, 1.0, 1.0), (31.5, 31.5), cfg)[0].numpy()
    expected = (img + 2.0) / 4.0
    inside = (slice(10, 54), slice(10, 54))  # the canvas spans 31.5 +- 23.75 mm
    assert np.abs(back[inside] - expected[inside]).max() < 0.02
    assert back[:6].max() == 0.0  # outside the canvas


def test_augmented_grid_rotates_and_scales_about_the_centre():
    cfg = LungNetInput(size=33, pixel_mm=1.0)
    g = canvas_grid((101, 101), (1.0, 1.0), (50.0, 50.0), cfg, scale=2.0, angle=np.pi / 2)
    # canvas pixel (16 + 5, 16) is 5 px along u: with scale 2 and a quarter turn it reads 10 mm along +y
    gy, gx = g[0, 21, 16].tolist()
    assert gx == pytest.approx(0.0, abs=1e-5) and gy == pytest.approx(10.0 / 50.0, abs=1e-5)


def test_body_centre_ignores_a_table_edge():
    vol = np.full((120, 120, 10), -1000.0, np.float32)
    vol[20:80, 30:90, :] = 40.0  # body
    vol[:, 104:116, :] = 200.0  # a table across the field of view, apart from the body
    cx, cy = body_centre(vol, (1.0, 1.0, 5.0))
    assert abs(cx - 49.5) < 4.0 and abs(cy - 59.5) < 4.0


def test_weights_are_checked(tmp_path):
    good = _write_net(tmp_path)
    net = load_lung_net(good)
    assert net.input.size == 32 and not net.network.training
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    with pytest.raises(LungNetWeightsError, match="checksum"):
        load_lung_net(_write_net(bad_dir, corrupt=True))
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    with pytest.raises(LungNetWeightsError, match="not a plain MONAI network"):
        load_lung_net(_write_net(code_dir, {**TINY, "_target_": "os.system"}))
    with pytest.raises(LungNetWeightsError, match="not found"):
        find_lung_net(tmp_path / "missing.pt")
    (tmp_path / "lonely.pt").write_bytes(good.read_bytes())
    with pytest.raises(LungNetWeightsError, match="lung_net.json|lonely.json"):
        load_lung_net(tmp_path / "lonely.pt")


def test_backend_choice(tmp_path, monkeypatch, caplog):
    """auto: lungmask R231 when its weights are on disk, else the lung U-Net when one is registered or named
    by $CTSEVERITY_LUNG_NET, else the threshold mask with one warning. The bundle ships no lung U-Net this
    release (measured worse than the threshold mask at the bases of an evaluation CT, docs/lung_masks.md),
    so the registered default resolves to nothing and auto falls back to the threshold mask."""
    monkeypatch.delenv("CTSEVERITY_LUNGMASK_WEIGHTS", raising=False)
    monkeypatch.delenv("CTSEVERITY_LUNG_NET", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    net = _write_net(tmp_path)
    try:
        register_default_lung_net(net)
        assert lung.resolve_backend("auto") == ("unet", net)
        register_default_lung_net(EMBEDDED_LUNG_NET)
        assert lung.resolve_backend("auto")[0] == ("unet" if EMBEDDED_LUNG_NET.is_file() else "threshold")
        register_default_lung_net(None)
        monkeypatch.setattr(lung, "_fallback_warned", False)
        with caplog.at_level(logging.WARNING, logger="monai_ext.transforms"):
            assert lung.resolve_backend("auto") == ("threshold", None)
        assert "threshold" in caplog.text
        with pytest.raises(LungNetWeightsError, match="CTSEVERITY_LUNG_NET"):
            lung.resolve_backend("unet")
        monkeypatch.setenv("CTSEVERITY_LUNG_NET", str(net))
        assert lung.resolve_backend("auto") == ("unet", net)
    finally:
        register_default_lung_net(EMBEDDED_LUNG_NET)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def evaluation_ct(shared):
    from monai_ext.io import load_ct

    return {name: load_ct(shared(rel)) for name, rel in (
        ("chest_ct_00", "chest_ct_itkelastix_00/chest_ct_00.nii.gz"),
        ("C3N-00247", "chest_ct_more/tcia_cptac_luad_C3N-00247/C3N-00247_ct.nii.gz"))}


@pytest.mark.parametrize("name", ["chest_ct_00", "C3N-00247"])
def test_default_mask_leaves_the_domes_out_of_real_ct(evaluation_ct, name):
    """Evaluation CT (never trained or tuned on): no dense tissue rising from the abdomen in the default mask
    at the lung bases (the column criterion of :func:`organ_intrusion`, without the partial-volume rim), while
    taking the domes out costs little aerated lung (Dice with the mask that keeps them)."""
    from monai_ext.transforms import LungMask

    ct = evaluation_ct[name]
    hu, spacing, affine = np.asarray(ct[0]), [float(s) for s in ct.pixdim], np.asarray(ct.affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    mask = np.asarray(LungMask()(ct)[0]) > 0
    with_domes = np.asarray(LungMask(backend="threshold", remove_organs=False)(ct)[0]) > 0
    assert organ_intrusion(hu, with_domes, spacing, affine=affine, rim_mm=0.0).sum() * voxel_ml > 2.0  # domes there
    dense_organ = organ_intrusion(hu, mask, spacing, affine=affine, rim_mm=0.0).sum() * voxel_ml
    assert dense_organ <= 2.0, dense_organ
    assert _dice(mask, with_domes) >= 0.97


def test_dice_against_the_cip_reference_lung(shared):
    """CIP COPDGene 10002K, left out of the network's training: Dice against CIP's own whole-lung mask."""
    from monai_ext.io import load_ct
    from monai_ext.transforms import LungMask
    from pipelines.datasets import load_ct_mask

    ct = load_ct(shared("chest_ct_more/cip_copdgene_10002K/ct-64.nrrd"))
    ref = np.asarray(load_ct_mask(shared("chest_ct_more/cip_copdgene_10002K/wholeLung-64.nrrd"), ct)[0]) > 0
    assert _dice(np.asarray(LungMask()(ct)[0]) > 0, ref) >= 0.95


@pytest.mark.parametrize("name", ["chest_ct_00", "C3N-00247"])
def test_dense_lesions_at_85_percent_stay_in_the_mask(evaluation_ct, name, shared):
    """Ground glass and consolidation over 85 % of the lung of an evaluation CT: the share of inserted lesion
    voxels inside the default lung mask. Measured 0.831 (chest_ct_00) and 0.840 (C3N-00247): the dense,
    subpleural part of the fitted lesions touches the chest wall and reads as wall (docs/lung_masks.md). The
    target of 0.98 is not reached yet; this guards the measured level against regressions."""
    from monai.data import MetaTensor

    from monai_ext.data.scanner import ScannerStyle
    from monai_ext.data.synthetic import phantom_affine
    from monai_ext.data.variants import load_clean_ct, render_variant
    from monai_ext.transforms import LungMask

    path = evaluation_ct[name].meta["filename_or_obj"]
    v = render_variant(load_clean_ct(path), np.random.default_rng(85), fraction=0.85, kind="mixed",
                       style=ScannerStyle())
    image = MetaTensor(torch.from_numpy(np.rint(v.image))[None],
                       affine=torch.as_tensor(phantom_affine(v.image.shape, v.spacing)))
    mask = np.asarray(LungMask()(image)[0]) > 0
    kept = float(mask[v.lesion > 0].mean())
    assert kept >= 0.80, kept


def test_network_adds_dense_lesion_but_not_air_beyond_the_threshold_mask():
    """:func:`combine_with_threshold` on a phantom: the lateral 20 mm of the right lung made consolidation
    (40 HU, lost by the threshold mask against the chest wall) and the trachea (air the threshold mask leaves
    out on purpose) both marked lung by a stand-in network output; the consolidation comes in, the air does
    not."""
    from monai_ext.data import synthetic_chest_ct
    from monai_ext.transforms.lung import threshold_lung_mask
    from monai_ext.transforms.lung_net import combine_with_threshold

    ct = synthetic_chest_ct((128, 128, 48), (2.5, 2.5, 5.0), seed=3)
    image, lung, spacing = ct.image.astype(np.float32), ct.lung > 0, ct.spacing
    trachea = ct.masks["trachea"] > 0
    xs = np.flatnonzero(lung.any(axis=(1, 2)))
    lesion = lung & (np.arange(lung.shape[0])[:, None, None] < xs[0] + round(20.0 / spacing[0]))
    image[lesion] = 40.0
    assert lesion.sum() > 1000
    before = threshold_lung_mask(image, spacing) > 0
    assert before[lesion].mean() < 0.5  # the threshold mask loses most of it
    combined = combine_with_threshold(image, spacing, lung | trachea)
    assert combined[lesion].mean() >= 0.9
    assert not (combined & trachea & ~before).any()
    assert np.count_nonzero(combined & ~(lung | before)) == 0
