"""Scanner styles: noise level and texture of kernels, thick slices, HU calibration, inspiration."""

from __future__ import annotations

import numpy as np
import pytest

from monai_ext.data.scanner import (
    SHARP_KERNEL,
    SMOOTH_KERNEL,
    ScannerStyle,
    add_dependent_density,
    adjust_inspiration,
    apply_kernel,
    draw_style,
    thick_slices,
)


def _radial_centroid(noise: np.ndarray, spacing: float) -> float:
    """Power-weighted mean spatial frequency (cycles/mm) of a noise image stack."""
    p = np.abs(np.fft.rfft2(noise, axes=(0, 1))) ** 2
    fx = np.fft.fftfreq(noise.shape[0], d=spacing)
    fy = np.fft.rfftfreq(noise.shape[1], d=spacing)
    f = np.sqrt(fx[:, None] ** 2 + fy[None, :] ** 2)
    w = p.mean(axis=2)
    return float((f * w).sum() / w.sum())


@pytest.mark.parametrize("noise", [5.0, 30.0, 60.0])
def test_noise_level_is_the_requested_one(noise):
    img = np.full((96, 96, 6), -850.0, np.float32)
    out = apply_kernel(img, (0.7, 0.7, 1.0), f50=0.6, noise_hu=noise, rng=np.random.default_rng(1))
    assert out.mean() == pytest.approx(-850.0, abs=1.0)
    assert out.std() == pytest.approx(noise, rel=0.05)


def test_sharp_kernel_noise_is_finer_than_smooth():
    img = np.zeros((128, 128, 4), np.float32)
    smooth, _, _ = SMOOTH_KERNEL.apply(img, (0.7, 0.7, 1.0), seed=0)
    sharp, _, _ = SHARP_KERNEL.apply(img, (0.7, 0.7, 1.0), seed=0)
    assert _radial_centroid(sharp, 0.7) > 1.5 * _radial_centroid(smooth, 0.7)
    assert sharp.std() > smooth.std()


def test_smooth_kernel_blurs_an_edge_and_keeps_flat_regions():
    img = np.full((64, 64, 2), -850.0, np.float32)
    img[32:] = 40.0
    out = apply_kernel(img, (0.7, 0.7, 1.0), f50=0.35)
    assert out[5, 10, 0] == pytest.approx(-850.0, abs=1.0) and out[50, 10, 0] == pytest.approx(40.0, abs=1.0)
    assert -850.0 + 50 < out[31, 10, 0] < 40.0 - 50  # the edge is spread over several voxels


def test_thick_slices_average_and_resample():
    vol = np.zeros((4, 4, 40), np.float32)
    vol[:, :, 20:] = 100.0
    out, sp = thick_slices(vol, (1.0, 1.0, 1.0), 5.0)
    assert sp == (1.0, 1.0, 5.0) and out.shape[2] == 8
    assert out[0, 0, 0] == 0.0 and out[0, 0, -1] == 100.0
    assert out.mean() == pytest.approx(vol[:, :, ::5].mean(), abs=15.0)
    same, sp2 = thick_slices(vol, (1.0, 1.0, 2.5), 2.0)  # thinner than native: unchanged
    assert same.shape == vol.shape and sp2 == (1.0, 1.0, 2.5)


def test_labels_follow_thick_slices():
    img = np.full((8, 8, 40), -850.0, np.float32)
    lesion = np.zeros(img.shape, np.uint8)
    lesion[:, :, 10:30] = 1
    out, sp, (les,) = ScannerStyle(thickness_mm=4.0).apply(img, (1.0, 1.0, 1.0), labels=[lesion])
    assert les.shape == out.shape and sp[2] == 4.0
    per_slice = les.sum(axis=(0, 1))
    assert set(per_slice.tolist()) == {0, 64} and per_slice.sum() == 5 * 64  # 20 mm of lesion: five 4 mm slices
    assert np.all(np.diff(np.flatnonzero(per_slice)) == 1)


def test_gain_and_offset():
    img = np.full((16, 16, 2), -1000.0, np.float32)
    out, _, _ = ScannerStyle(gain=1.02, offset_hu=20.0).apply(img, (1.0, 1.0, 1.0))
    assert np.allclose(out, -1000.0 * 1.02 + 20.0, atol=0.5)


def test_inspiration_moves_the_lung_median_and_keeps_air():
    rng = np.random.default_rng(0)
    img = rng.normal(-860.0, 30.0, (32, 32, 8)).astype(np.float32)
    img[0, :, :] = -1000.0
    lung = np.ones(img.shape, np.uint8)
    lung[0] = 0
    img[10:12, 10:12, :] = 40.0  # a vessel keeps its density
    out = adjust_inspiration(img, lung, -780.0)
    m = (lung > 0) & (img < -400)
    assert np.median(out[m]) == pytest.approx(-780.0, abs=1.0)
    assert np.all(out[0] == -1000.0)
    assert out[10, 10, 0] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="lung"):
        ScannerStyle(lung_median_hu=-800.0).apply(img, (1, 1, 1))


def test_drawn_styles_span_the_ranges():
    rng = np.random.default_rng(3)
    styles = [draw_style(rng, (0.7, 0.7, 2.5)) for _ in range(400)]
    f50 = np.array([s.f50 for s in styles])
    noise = np.array([s.noise_hu for s in styles])
    thick = [s.thickness_mm for s in styles if s.thickness_mm is not None]
    assert f50.min() < 0.45 and f50.max() > 1.2
    assert noise.min() >= 5.0 and noise.max() <= 60.0 and noise.min() < 8 and noise.max() > 50
    assert min(thick) > 2.5 and max(thick) <= 8.0  # never thinner than the native 2.5 mm
    assert all(abs(s.offset_hu) <= 30 and 0.96 <= s.gain <= 1.04 for s in styles)
    med = [s.lung_median_hu for s in styles if s.lung_median_hu is not None]
    assert 150 < len(med) < 250 and min(med) >= -900 and max(med) <= -750


def test_dependent_density_is_a_posterior_band_of_aerated_lung():
    # a 40 mm tall lung block (y posterior, 1 mm voxels) over air: +100 HU at its lowest row, e^-1 of it
    # 10 mm higher, nothing on vessels (denser than -400 HU) or outside the lung
    img = np.full((4, 60, 3), -1000.0, np.float32)
    lung = np.zeros(img.shape, np.uint8)
    lung[:, 10:50] = 1
    img[:, 10:50] = -850.0
    img[1, 45, :] = 30.0
    out = add_dependent_density(img, lung, (1.0, 1.0, 2.0), 100.0, 10.0)
    assert out[0, 49, 0] == pytest.approx(-750.0)
    assert out[0, 39, 0] == pytest.approx(-850.0 + 100.0 * np.exp(-1.0), abs=1e-3)
    assert out[0, 10, 0] == pytest.approx(-850.0 + 100.0 * np.exp(-3.9), abs=1e-3)
    assert out[1, 45, 0] == 30.0
    assert np.all(out[:, :10] == -1000.0) and np.all(out[:, 50:] == -1000.0)
    # the band follows each column's own lowest lung voxel
    lung[2, 40:50] = 0
    out = add_dependent_density(img, lung, (1.0, 1.0, 2.0), 100.0, 10.0)
    assert out[2, 39, 0] == pytest.approx(-750.0)
    with pytest.raises(ValueError, match="lung"):
        ScannerStyle(dependent_hu=50.0).apply(img, (1, 1, 1))
    styled, _, _ = ScannerStyle(dependent_hu=100.0, dependent_mm=10.0).apply(img, (1.0, 1.0, 2.0), lung=lung)
    assert styled[0, 49, 0] == pytest.approx(-750.0, abs=1.0)


def test_dependent_density_is_drawn_only_when_asked():
    plain = [draw_style(np.random.default_rng(5), (0.7, 0.7, 2.5)) for _ in range(3)]
    assert all(s.dependent_hu == 0.0 for s in plain)
    rng = np.random.default_rng(5)
    styles = [draw_style(rng, (0.7, 0.7, 2.5), dependent_share=0.6) for _ in range(300)]
    dep = [s for s in styles if s.dependent_hu]
    assert 140 < len(dep) < 220
    assert all(30 <= s.dependent_hu <= 150 and 8 <= s.dependent_mm <= 40 for s in dep)
    # the first draws of a style do not depend on dependent_share: a seed renders the same scanner
    a, b = draw_style(np.random.default_rng(9)), draw_style(np.random.default_rng(9), dependent_share=1.0)
    assert (a.f50, a.noise_hu, a.lung_median_hu) == (b.f50, b.noise_hu, b.lung_median_hu)


def test_render_variant_adds_the_styles_dependent_density_to_a_clean_study():
    # the same clean phantom study with and without dependent density: the posterior lung band is denser by
    # the drawn amount, the anterior lung unchanged, and no lesion appears
    from monai_ext.data import synthetic_chest_ct
    from monai_ext.data.variants import CleanCT, render_variant

    ct = synthetic_chest_ct((96, 96, 12), (3.0, 3.0, 6.0), seed=4, noise_hu=0.0)
    base = CleanCT("p", np.maximum(ct.image, -1024).astype(np.int16), ct.lung, tuple(ct.spacing))
    plain = render_variant(base, np.random.default_rng(0), fraction=0.0, style=ScannerStyle())
    dep = render_variant(base, np.random.default_rng(0), fraction=0.0,
                         style=ScannerStyle(dependent_hu=120.0, dependent_mm=10.0))
    assert plain.lesion.sum() == 0 and dep.lesion.sum() == 0
    lung = (plain.lung > 0) & (plain.image < -400)
    ys = np.arange(lung.shape[1])[None, :, None]
    bottom = np.where(lung, ys, -1).max(axis=1, keepdims=True)
    height = (bottom - ys) * 3.0
    diff = dep.image - plain.image
    assert np.median(diff[lung & (height == 0)]) == pytest.approx(120.0, abs=1.0)
    assert np.median(diff[lung & (height >= 60)]) < 1.0


def test_semisynthetic_random_dependent_style_always_adds_dependent_density(script):
    style = script("make_semisynthetic")._style
    rng = np.random.default_rng(13)
    dependent = [style("random-dependent", rng, (0.7, 0.7, 2.5)) for _ in range(20)]
    plain = [style("random", rng, (0.7, 0.7, 2.5)) for _ in range(20)]
    assert all(30.0 <= s.dependent_hu <= 150.0 for s in dependent)
    assert all(s.dependent_hu == 0.0 for s in plain)
