"""Lung masks: the threshold backend on real and synthetic CT, the lungmask backend's loading path
and orientation handling, backend selection, errors, and the MONAI transform wrappers."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImage, LoadImaged
from scipy import ndimage

import monai_ext.transforms.lung as lung
from monai_ext.errors import CTSeverityError, NoLungFoundError
from monai_ext.transforms import (
    LEFT_LUNG,
    LUNGMASK_WEIGHTS_ENV,
    RIGHT_LUNG,
    LungMask,
    LungMaskD,
    LungMaskd,
    LungMaskDict,
    LungMaskWeightsError,
    lung_mask,
)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def phantom(
    shape: tuple[int, int, int] = (128, 128, 48),
    spacing: tuple[float, float, float] = (1.8, 1.8, 4.0),
    seed: int = 0,
    lungs: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A simple synthetic chest in ITK index order (x to the patient's left, y posterior, z superior).

    Body ellipse at 40 HU above a scanner table, two lung ellipsoids at -850 HU with vessels at
    40 HU, a trachea at -1000 HU from the top down to a carina whose main bronchi open into the
    lungs, Gaussian noise. Returns (volume in HU, ground-truth lung labels RIGHT_LUNG / LEFT_LUNG, air
    lumen of the trachea and main bronchi).
    """
    rng = np.random.default_rng(seed)
    n = np.asarray(shape)
    sp = np.asarray(spacing)
    x, y, z = (np.arange(k) * s - (k - 1) * s / 2.0 for k, s in zip(n, sp))  # mm, centred
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    zl = z[-1] - z[0]  # height of the volume in mm
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = (X / 105.0) ** 2 + ((Y + 5.0) / 75.0) ** 2 <= 1.0
    vol[body] = 40.0
    vol[(np.abs(X) < 105.0) & (Y > 78.0) & (Y < 86.0)] = 300.0  # table top
    vol[(np.abs(X) < 105.0) & (np.abs(np.hypot(X, Y - 400.0) - 305.0) < 2.0)] = 150.0  # curved table shell
    truth = np.zeros(shape, dtype=np.uint8)
    airway = np.zeros(shape, dtype=bool)
    if lungs:
        zc, rz = z[0] + 0.42 * zl, 0.36 * zl
        for label, xc in ((LEFT_LUNG, 45.0), (RIGHT_LUNG, -45.0)):  # +x is the patient's left
            inside = ((X - xc) / 33.0) ** 2 + (Y / 52.0) ** 2 + ((Z - zc) / rz) ** 2 <= 1.0
            vol[inside] = -850.0
            truth[inside] = label
        for _ in range(14):  # vessels: short tubes well inside the lungs
            xc = rng.choice([-45.0, 45.0]) + rng.uniform(-12, 12)
            yc, zc0 = rng.uniform(-30, 30), zc + rng.uniform(-0.5, 0.5) * rz
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            r = rng.uniform(1.5, 3.0)
            t = np.clip((X - xc) * d[0] + (Y - yc) * d[1] + (Z - zc0) * d[2], -15.0, 15.0)
            dist2 = (X - xc - t * d[0]) ** 2 + (Y - yc - t * d[1]) ** 2 + (Z - zc0 - t * d[2]) ** 2
            vol[(dist2 <= r * r) & (truth > 0)] = 40.0
        carina = z[0] + 0.62 * zl
        trachea = (np.hypot(X, Y + 25.0) <= 8.0) & (Z >= carina)
        for side in (-1.0, 1.0):  # main bronchi: from the carina down and out into each lung
            p0 = np.array([0.0, -25.0, carina])
            p1 = np.array([side * 35.0, -15.0, carina - 30.0])
            d = (p1 - p0) / np.linalg.norm(p1 - p0)
            t = np.clip((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2], 0.0, np.linalg.norm(p1 - p0))
            dist2 = (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2
            trachea |= dist2 <= 5.5**2
        airway = trachea & body
        vol[airway] = -1000.0
        truth[airway] = 0
    vol += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    return vol, truth, airway


def body_mask(volume: np.ndarray) -> np.ndarray:
    """Per axial slice (last axis), the largest tissue region (> -500 HU) with its holes filled."""
    out = np.zeros(volume.shape, dtype=bool)
    for k in range(volume.shape[2]):
        comp, n = ndimage.label(volume[:, :, k] > -500)
        if n:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[:, :, k] = ndimage.binary_fill_holes(comp == np.argmax(sizes))
    return out


def trachea_voxels(volume: np.ndarray, body: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """The trachea, found independently of the code under test: the central, tube-sized air region
    of the mediastinum in the top slice, followed down slice by slice while it stays one tube."""
    area_mm2 = spacing[0] * spacing[1]
    air = volume < -600
    top = volume.shape[2] - 1
    comp, n = ndimage.label(air[:, :, top] & body[:, :, top])
    xs = np.flatnonzero(body[:, :, top].any(axis=1))
    centre, width = (xs[0] + xs[-1]) / 2.0, xs[-1] - xs[0]
    found = None
    for i in range(1, n + 1):
        region = comp == i
        area = np.count_nonzero(region) * area_mm2
        cx = np.nonzero(region)[0].mean()
        if 50 <= area <= 800 and abs(cx - centre) < 0.1 * width:
            found = region
    assert found is not None, "no trachea in the top slice"
    out = np.zeros(volume.shape, dtype=bool)
    out[:, :, top] = found
    previous, first_area = found, np.count_nonzero(found)
    for k in range(top - 1, -1, -1):
        comp, _ = ndimage.label(air[:, :, k])
        ids = np.unique(comp[previous])
        ids = ids[ids > 0]
        if ids.size != 1:
            break
        current = comp == ids[0]
        if np.count_nonzero(current) > 1.6 * first_area:
            break
        out[:, :, k] = current
        previous = current
    return out


def ras_axis(affine: np.ndarray, world_axis: int) -> tuple[int, float]:
    """The array axis closest to a RAS world axis and the sign of its direction."""
    column = int(np.argmax(np.abs(affine[world_axis, :3])))
    return column, float(np.sign(affine[world_axis, column]))


# --------------------------------------------------------------------------------------------------
# the real chest CT (threshold backend, through LoadImaged + LungMaskd in a Compose)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_ct_path):
    chain = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            LungMaskd("image", output_keys="lung", backend="threshold", split_lr=True),
        ]
    )
    data = chain({"image": str(real_ct_path)})
    image, mask = data["image"], data["lung"]
    volume = image[0].numpy()
    affine = image.affine.numpy()
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return {
        "image": image,
        "mask": mask,
        "volume": volume,
        "labels": mask[0].numpy(),
        "affine": affine,
        "spacing": spacing,
        "body": body_mask(volume),
    }


def test_real_compose_output_on_input_grid(real):
    image, mask = real["image"], real["mask"]
    assert isinstance(mask, MetaTensor)
    assert mask.shape == image.shape == (1, 512, 512, 141)
    assert mask.dtype == torch.uint8
    assert torch.equal(mask.affine, image.affine)
    assert str(mask.meta["filename_or_obj"]).endswith("chest_ct_00.nii.gz")
    assert set(np.unique(real["labels"]).tolist()) == {0, LEFT_LUNG, RIGHT_LUNG}


def test_real_two_lungs(real):
    labels, affine, spacing = real["labels"], real["affine"], real["spacing"]
    ml = np.prod(spacing) / 1000.0
    left, right = labels == LEFT_LUNG, labels == RIGHT_LUNG
    assert np.count_nonzero(left) * ml > 1000.0
    assert np.count_nonzero(right) * ml > 1000.0
    # each lung is essentially one piece
    for lung_ in (left, right):
        comp, n = ndimage.label(lung_)
        assert np.bincount(comp.ravel())[1:].max() > 0.95 * np.count_nonzero(lung_)
    # the left lung lies on the patient's left (RAS: smaller world x)
    world = [affine[:3, :3] @ np.argwhere(m).mean(axis=0) + affine[:3, 3] for m in (left, right)]
    assert world[0][0] < world[1][0]


def test_real_total_volume_between_3_and_8_litres(real):
    litres = np.count_nonzero(real["labels"]) * np.prod(real["spacing"]) / 1e6
    assert 3.0 < litres < 8.0


def test_real_no_voxel_outside_body(real):
    assert not np.any((real["labels"] > 0) & ~real["body"])


def test_real_table_excluded(real):
    volume, labels, affine, body = real["volume"], real["labels"], real["affine"], real["body"]
    ap_axis, anterior = ras_axis(affine, 1)
    assert ap_axis == 1
    # posterior = decreasing RAS y; here it is increasing array index along axis 1
    posterior_step = -anterior
    assert posterior_step > 0
    index = np.arange(volume.shape[1])[None, :, None]
    last_body = np.where(body, index, -1).max(axis=1, keepdims=True)
    below_body = index > last_body
    table = (volume > -500) & below_body
    assert np.count_nonzero(table) > 10_000, "expected the scanner table below the body"
    assert not np.any((labels > 0) & table)
    assert not np.any((labels > 0) & below_body)


def test_real_trachea_excluded(real):
    volume, labels, spacing = real["volume"], real["labels"], real["spacing"]
    assert ras_axis(real["affine"], 2) == (2, 1.0)  # superior = last array axis, increasing
    trachea = trachea_voxels(volume, real["body"], spacing)
    slices = np.flatnonzero(trachea.any(axis=(0, 1)))
    assert slices.size >= 30, "the trachea should be followed for at least 6 cm"
    lung_slices = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    assert np.intersect1d(slices, lung_slices).size >= 10, "the tracked trachea should run between the lungs"
    assert not np.any(labels[trachea] > 0)


# --------------------------------------------------------------------------------------------------
# other real CT: Dice against the CIP whole-lung reference, bowel gas
# --------------------------------------------------------------------------------------------------


def _read_xyz(path) -> tuple[np.ndarray, tuple[float, ...], sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), image.GetSpacing(), image


def test_dice_against_cip_whole_lung_reference(shared):
    ct, spacing, image = _read_xyz(shared("chest_ct_more/cip_copdgene_10002K/ct-64.nrrd"))
    reference, _, _ = _read_xyz(shared("chest_ct_more/cip_copdgene_10002K/wholeLung-64.nrrd"))
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    mask = lung_mask(ct.astype(np.float32), spacing, backend="threshold")
    assert dice(mask, reference) >= 0.95


def test_lung_mask_on_sitk_reader_output(shared):
    """The transform on the project's SimpleITK reader (NRRD, LPS file, RAS affine) matches the reference."""
    from monai_ext.io import SITKReader

    path = shared("chest_ct_more/cip_copdgene_10002K/ct-64.nrrd")
    image = LoadImage(reader=SITKReader(), image_only=True, ensure_channel_first=True)(str(path))
    reference, _, _ = _read_xyz(shared("chest_ct_more/cip_copdgene_10002K/wholeLung-64.nrrd"))
    mask = LungMask(backend="threshold")(image)
    assert mask.shape == image.shape and torch.equal(mask.affine, image.affine)
    assert dice(mask[0].numpy(), reference) >= 0.95


def test_bowel_gas_excluded(shared):
    """TestInput reaches into the upper abdomen: air pockets of 5 ml or more that stay in the lowest
    third of the volume (bowel and stomach gas, not connected to the lungs) must not be in the mask."""
    ct, spacing, _ = _read_xyz(shared("chest_ct_more/cip_testinput/TestInput.nrrd"))
    ct = ct.astype(np.float32)
    labels = lung_mask(ct, spacing, backend="threshold", split_lr=True)
    comp, _ = ndimage.label((ct < -600) & body_mask(ct))
    ml = np.prod(spacing) / 1000.0
    sizes = np.bincount(comp.ravel()) * ml
    boxes = ndimage.find_objects(comp)
    low = [i for i, box in enumerate(boxes, start=1) if box[2].stop - 1 < ct.shape[2] / 3 and sizes[i] >= 5.0]
    gas = np.isin(comp, low)
    assert len(low) >= 2 and np.count_nonzero(gas) * ml > 30.0, "expected bowel gas in TestInput"
    assert not np.any(labels[gas])
    assert np.count_nonzero(labels == LEFT_LUNG) and np.count_nonzero(labels == RIGHT_LUNG)


@pytest.mark.parametrize(
    "relative",
    [
        "chest_ct_more/cip_testinput/TestInput.nrrd",
        "chest_ct_more/tcia_lung_pet_ct_dx_A0002/Lung_Dx-A0002_ct.nii.gz",
        "chest_ct_more/tcia_cptac_luad_C3N-00247/C3N-00247_ct.nii.gz",
    ],
    ids=["cip_testinput", "lung_pet_ct_dx", "cptac_luad"],
)
def test_other_real_ct_plausible(shared, relative):
    """Other scanners, patients and slice thicknesses (0.56 to 8 mm): two lungs of plausible size,
    nothing outside the body, trachea excluded where the test can follow it."""
    ct, spacing, _ = _read_xyz(shared(relative))
    ct = ct.astype(np.float32)
    labels = lung_mask(ct, spacing, backend="threshold", split_lr=True)
    ml = np.prod(spacing) / 1000.0
    right, left = np.count_nonzero(labels == RIGHT_LUNG) * ml, np.count_nonzero(labels == LEFT_LUNG) * ml
    assert 500.0 < right < 5000.0 and 500.0 < left < 5000.0
    centre_x = [np.argwhere(labels == value)[:, 0].mean() for value in (RIGHT_LUNG, LEFT_LUNG)]
    assert centre_x[0] < centre_x[1]  # identity direction: x runs to the patient's left
    body = body_mask(ct)
    assert not np.any((labels > 0) & ~body)
    assert not np.any(labels[trachea_voxels(ct, body, spacing)])


# --------------------------------------------------------------------------------------------------
# synthetic chest
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, spacing", [((128, 128, 48), (1.8, 1.8, 4.0)), ((240, 240, 40), (0.95, 0.95, 5.0))], ids=["2mm", "1mm"]
)
def test_synthetic_dice(shape, spacing):
    volume, truth, airway = phantom(shape, spacing, seed=1)
    labels = lung_mask(volume, spacing, backend="threshold", split_lr=True)
    assert dice(labels, truth) >= 0.97
    assert dice(labels == LEFT_LUNG, truth == LEFT_LUNG) >= 0.97
    assert dice(labels == RIGHT_LUNG, truth == RIGHT_LUNG) >= 0.97
    top = airway & (np.arange(shape[2]) > 0.65 * shape[2])[None, None, :]
    assert top.any() and not np.any(labels[top])


def test_touching_lungs_are_split():
    """Lungs joined by an anterior air bridge form one component; split_lr still separates them."""
    spacing = (1.8, 1.8, 4.0)
    volume, truth, _ = phantom((128, 128, 48), spacing, seed=1)
    X, Y, Z = np.meshgrid(*(np.arange(k) for k in volume.shape), indexing="ij")
    bridge = (np.abs(X - 64) < 20) & (np.abs(Y - 40) < 3) & (np.abs(Z - 20) < 8)
    volume[bridge] = -850.0
    truth[bridge] = np.where(X[bridge] < 64, RIGHT_LUNG, LEFT_LUNG)  # x runs to the patient's left
    labels = lung_mask(volume, spacing, backend="threshold", split_lr=True)
    assert dice(labels == RIGHT_LUNG, truth == RIGHT_LUNG) >= 0.97
    assert dice(labels == LEFT_LUNG, truth == LEFT_LUNG) >= 0.97


@pytest.mark.parametrize(
    "shape, spacing, seed",
    [((128, 128, 48), (3.0, 3.0, 6.0), 0), ((128, 128, 48), (3.0, 3.0, 6.0), 4), ((192, 192, 64), (1.6, 1.6, 4.0), 1)],
)
def test_procedural_phantom_dice(shape, spacing, seed):
    """The project's procedural chest CT (ribs, mediastinum, vessel trees, table, noise)."""
    from monai_ext.data import synthetic_chest_ct

    ct = synthetic_chest_ct(shape, spacing, seed=seed)
    image = MetaTensor(torch.as_tensor(ct.image[None]), affine=torch.as_tensor(ct.affine))
    labels = LungMask(backend="threshold", split_lr=True)(image)[0].numpy()
    assert dice(labels, ct.lung) >= 0.97
    assert dice(labels == RIGHT_LUNG, ct.lung == RIGHT_LUNG) >= 0.97
    assert dice(labels == LEFT_LUNG, ct.lung == LEFT_LUNG) >= 0.97
    assert not np.any((labels > 0) & (ct.masks["body"] == 0))
    assert not np.any((labels > 0) & (ct.masks["table"] > 0))
    central_airway = (ct.masks["airway"] > 0) & (ct.lung == 0)  # trachea and main bronchi
    assert np.count_nonzero(labels[central_airway]) <= 0.1 * np.count_nonzero(central_airway)


def test_orientation_follows_the_affine():
    """The same phantom stored with permuted and flipped axes gives the same mask in the world."""
    spacing = (1.8, 1.8, 4.0)
    volume, truth, _ = phantom((128, 128, 48), spacing, seed=2)
    base = lung_mask(volume, spacing, backend="threshold", split_lr=True)
    lps_as_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    # new array axes (z, x reversed, y): a sagittal-style layout
    moved = np.ascontiguousarray(np.transpose(volume, (2, 0, 1))[:, ::-1, :])
    perm = np.zeros((4, 4))
    perm[3, 3] = 1.0
    perm[2, 0] = 1.0  # new axis 0 -> old z
    perm[0, 1] = -1.0  # new axis 1 -> old x, reversed
    perm[0, 3] = volume.shape[0] - 1
    perm[1, 2] = 1.0  # new axis 2 -> old y
    affine = lps_as_ras @ perm
    moved_spacing = (spacing[2], spacing[0], spacing[1])
    out = lung_mask(moved, moved_spacing, affine=affine, backend="threshold", split_lr=True)
    back = np.transpose(out[:, ::-1, :], (1, 2, 0))
    assert np.array_equal(back, base)
    assert dice(base, truth) >= 0.97
    # an LPS affine is accepted when the meta data says so
    lps = MetaTensor(torch.as_tensor(volume[None]), affine=torch.as_tensor(np.diag([*spacing, 1.0])))
    lps.meta["space"] = "LPS"
    assert np.array_equal(LungMask(backend="threshold", split_lr=True)(lps)[0].numpy(), base)


# --------------------------------------------------------------------------------------------------
# backend choice, weights, lungmask loading path
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No lungmask weights anywhere: env var unset, an empty torch hub folder."""
    monkeypatch.delenv(LUNGMASK_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path


def _meta(volume: np.ndarray, spacing, name: str = "phantom.nii.gz") -> MetaTensor:
    affine = torch.as_tensor(np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]))
    return MetaTensor(torch.as_tensor(volume[None]), affine=affine, meta={"filename_or_obj": name})


def test_lungmask_backend_without_weights_raises(no_weights):
    with pytest.raises(LungMaskWeightsError) as info:
        LungMask(backend="lungmask")
    assert isinstance(info.value, CTSeverityError)
    message = str(info.value)
    assert "weights" in message and LUNGMASK_WEIGHTS_ENV in message and "unet_r231-d5d2fc3d.pth" in message
    assert str(no_weights / "hub" / "checkpoints") in message
    with pytest.raises(LungMaskWeightsError, match="never downloads"):
        lung_mask(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0), backend="lungmask")
    missing = no_weights / "nope.pth"
    with pytest.raises(LungMaskWeightsError, match="nope.pth"):
        LungMask(backend="auto", weights_path=missing)


def test_auto_falls_back_to_threshold_with_one_warning(no_weights, monkeypatch, caplog):
    monkeypatch.setattr(lung, "_fallback_warned", False)
    spacing = (1.8, 1.8, 4.0)
    volume, truth, _ = phantom((128, 128, 48), spacing, seed=3)
    image = _meta(volume, spacing)
    transform = LungMask()
    with caplog.at_level(logging.WARNING, logger="monai_ext.transforms"):
        first = transform(image)
        second = LungMask(backend="auto")(image)
    warnings_ = [r for r in caplog.records if r.name == "monai_ext.transforms" and r.levelno == logging.WARNING]
    assert len(warnings_) == 1
    assert "threshold" in warnings_[0].getMessage()
    expected = lung_mask(volume, spacing, backend="threshold")
    assert np.array_equal(first[0].numpy(), expected)
    assert np.array_equal(second[0].numpy(), expected)
    assert dice(expected, truth) >= 0.97


def _random_r231(path) -> None:
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    torch.save(net.state_dict(), path)


def test_lungmask_backend_loads_weights_and_returns_mask_on_input_grid(tmp_path, monkeypatch):
    weights = tmp_path / "r231_random.pth"
    _random_r231(weights)
    monkeypatch.setenv(LUNGMASK_WEIGHTS_ENV, str(weights))
    spacing = (2.5, 2.5, 5.0)
    volume, _, _ = phantom((96, 80, 2), spacing, seed=4)
    image = _meta(volume, spacing)
    out = LungMask(backend="lungmask", device="cpu", min_lung_ml=0.0, split_lr=True)(image)  # weights from env
    assert isinstance(out, MetaTensor)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert torch.equal(out.affine, image.affine)
    assert set(np.unique(out.numpy()).tolist()) <= {0, LEFT_LUNG, RIGHT_LUNG}
    lung._load_inferer.cache_clear()  # do not keep the 120 MB model for the rest of the session


def test_lungmask_backend_unreadable_weights(tmp_path):
    weights = tmp_path / "unet_r231-d5d2fc3d.pth"
    weights.write_bytes(b"not a torch file")
    with pytest.raises(LungMaskWeightsError, match="cannot load"):
        lung_mask(np.zeros((16, 16, 4), np.float32), (1.0, 1.0, 1.0), backend="lungmask", weights_path=weights)


def test_lungmask_backend_orientation(tmp_path, monkeypatch):
    """lungmask receives an LPS (z, y, x) array and its labels (1 right, 2 left) come back right."""
    spacing = (2.0, 2.0, 4.0)
    volume, truth, _ = phantom((128, 128, 12), spacing, seed=5)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"stub")
    seen = {}

    class FakeInferer:
        def apply(self, zyx):
            seen["shape"] = zyx.shape
            out = np.zeros(zyx.shape, dtype=np.uint8)
            lungs = (zyx > -925) & (zyx < -500)
            columns = np.arange(zyx.shape[2])[None, None, :]
            out[lungs & (columns < zyx.shape[2] // 2)] = 1  # LPS columns run right -> left
            out[lungs & (columns >= zyx.shape[2] // 2)] = 2
            return out

    monkeypatch.setattr(lung, "_load_inferer", lambda *args: FakeInferer())
    # store the phantom in RAS index order (x to the right, y anterior): both in-plane axes flipped
    ras_volume = np.ascontiguousarray(volume[::-1, ::-1, :])
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    labels = lung_mask(ras_volume, spacing, affine=affine, backend="lungmask", weights_path=weights, split_lr=True)
    assert seen["shape"] == (12, 128, 128)
    labels = labels[::-1, ::-1, :]
    assert dice(labels == LEFT_LUNG, truth == LEFT_LUNG) > 0.9
    assert dice(labels == RIGHT_LUNG, truth == RIGHT_LUNG) > 0.9


# --------------------------------------------------------------------------------------------------
# errors and wrappers
# --------------------------------------------------------------------------------------------------


def test_no_lung_found_in_soft_tissue():
    spacing = (1.8, 1.8, 4.0)
    volume, _, _ = phantom((96, 96, 16), spacing, seed=6, lungs=False)
    with pytest.raises(NoLungFoundError) as info:
        LungMask(backend="threshold")(_meta(volume, spacing, name="soft_tissue.nii.gz"))
    assert "soft_tissue.nii.gz" in str(info.value)
    assert "air" in info.value.reason or "lung" in info.value.reason


def test_no_lung_found_for_tiny_lung():
    spacing = (1.8, 1.8, 4.0)
    volume, _, _ = phantom((96, 96, 16), spacing, seed=7, lungs=False)
    X, Y, Z = np.meshgrid(*(np.arange(k) for k in volume.shape), indexing="ij")
    volume[(X - 60) ** 2 + (Y - 48) ** 2 + (Z - 8) ** 2 <= 16] = -850.0  # a few ml of air
    with pytest.raises(NoLungFoundError, match="tiny.nii.gz: .*ml"):
        LungMask(backend="threshold")(_meta(volume, spacing, name="tiny.nii.gz"))


def test_bad_input():
    with pytest.raises(ValueError, match="backend"):
        LungMask(backend="deeplab")
    with pytest.raises(TypeError, match="air_hu"):
        LungMask(backend="threshold", air_hu_max=-300)
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        LungMask(backend="threshold")(MetaTensor(torch.zeros(2, 8, 8, 8)))


def test_dictionary_aliases_and_compose_on_nifti(tmp_path):
    assert LungMaskD is LungMaskd and LungMaskDict is LungMaskd
    spacing = (1.8, 1.8, 4.0)
    volume, truth, _ = phantom((128, 128, 48), spacing, seed=8)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(path))
    chain = Compose(
        [LoadImaged(["image"], image_only=True, ensure_channel_first=True), LungMaskd("image", backend="threshold")]
    )
    out = chain({"image": str(path)})["image"]
    assert out.shape == (1, *volume.shape) and out.dtype == torch.uint8
    assert set(np.unique(out.numpy()).tolist()) == {0, 1}
    assert dice(out[0].numpy(), truth) >= 0.97
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    assert np.array_equal(LungMask(backend="threshold")(image).numpy(), out.numpy())


# --------------------------------------------------------------------------------------------------
# lesion-robust threshold mask (fill_lesions)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def severe_phantom():
    """A procedural chest with lesions over 60 % of the lung (ground glass and consolidation)."""
    from monai_ext.data import insert_lesions, synthetic_chest_ct

    ct = synthetic_chest_ct((192, 192, 54), (1.9, 1.9, 5.5), seed=0)
    image, lesion = insert_lesions(ct.image, ct.lung, ct.spacing, 0.6, seed=0)
    return ct, image, lesion > 0


def test_fill_lesions_recovers_dense_lung(severe_phantom):
    ct, image, lesion = severe_phantom
    truth = ct.lung > 0
    # fill_lesions alone (the organ removal, tested below, also takes consolidation lying on the diaphragm)
    plain = lung.threshold_lung_mask(image, ct.spacing, fill_lesions=False, remove_organs=False) > 0
    filled = lung.threshold_lung_mask(image, ct.spacing, remove_organs=False) > 0
    kept_plain = np.count_nonzero(plain & truth) / np.count_nonzero(truth)
    kept = np.count_nonzero(filled & truth) / np.count_nonzero(truth)
    lesion_kept = np.count_nonzero(filled & lesion) / np.count_nonzero(lesion)
    assert kept_plain < 0.9  # an air threshold loses the consolidated lung
    assert kept >= kept_plain + 0.04 and kept >= 0.9
    assert lesion_kept >= 0.85
    # what it adds is lung: little lies outside the true lungs, nothing outside the body or on the table
    assert np.count_nonzero(filled & ~truth) <= 0.06 * np.count_nonzero(truth)
    assert not np.any(filled & (ct.masks["body"] == 0))
    assert not np.any(filled & (ct.masks["table"] > 0))
    # the measured lesion share comes closer to the truth (60 %)
    share = lambda m: 100.0 * np.count_nonzero(m & lesion) / np.count_nonzero(m)  # noqa: E731
    assert abs(share(filled) - 60.0) < abs(share(plain) - 60.0)


def test_fill_lesions_adds_little_to_healthy_lungs(severe_phantom, real):
    ct = severe_phantom[0]
    plain = lung.threshold_lung_mask(ct.image, ct.spacing, fill_lesions=False, remove_organs=False) > 0
    filled = lung.threshold_lung_mask(ct.image, ct.spacing, remove_organs=False) > 0
    assert np.all(filled[plain])
    assert np.count_nonzero(filled & ~plain) <= 0.01 * np.count_nonzero(plain)
    # the real chest CT (no pneumonia): the default mask is within 3 % of the plain air-based one
    real_plain = lung.threshold_lung_mask(real["volume"], real["spacing"], affine=real["affine"], fill_lesions=False)
    real_plain = real_plain > 0
    real_filled = real["labels"] > 0
    assert np.count_nonzero(real_filled & ~real_plain) <= 0.03 * np.count_nonzero(real_plain)
