"""Scanner and acquisition variety for chest CT: reconstruction kernel with its noise texture, slice
thickness with partial volume, HU calibration, inspiration level.

A classifier trained on a few scanners learns their look: the noise grain of the kernel, how thick
slices blur small structures, where normal lung sits in HU. :class:`ScannerStyle` describes one
acquisition and :meth:`ScannerStyle.apply` turns a volume into it; :func:`draw_style` draws styles
over the range seen in clinical chest CT, for training-time augmentation and for tests that ask
whether a grade survives a change of kernel.

- Kernel: an in-plane modulation transfer function ``MTF(f) = exp(-(f / f50)^2 ln 2) * (1 + boost *
  (f / fmax)^2)`` (a Gaussian roll-off at ``f50``, the frequency where it falls to one half, times an
  edge-enhancing boost for sharp kernels), applied to the image, and noise with the noise power
  spectrum of filtered back-projection, ``NPS(f) ~ f * MTF(f)^2`` (white noise shaped by it): a
  smooth kernel gives a blotchy low-frequency grain, a sharp one a fine high-frequency grain
  (Kijewski and Judy, "The noise power spectrum of CT images", Phys Med Biol 32:565 (1987)).
  ``noise_hu`` is the added noise's standard deviation in the native voxels.
- Slice thickness: a box average over ``thickness_mm`` along z, sampled every ``thickness_mm``
  (partial volume of thick slices); labels follow by the same average, thresholded at one half.
- HU calibration: ``hu * gain + offset`` (scanner and tube-voltage differences of a few tens of HU).
- Inspiration: lung parenchyma (label > 0, below -400 HU) is moved so that its median reaches
  ``lung_median_hu`` (``-1000 + (hu + 1000) * k``: air stays air), as between deep inspiration
  (about -900 HU) and shallow breathing (about -750 HU). Apply before inserting lesions.
- Dependent density: in a supine patient the posterior (gravity-dependent) lung is denser than the
  anterior, by some 30-150 HU over its last centimetres, a smooth band along the posterior pleura
  that is not disease. ``dependent_hu`` adds ``dependent_hu * exp(-d / dependent_mm)`` to aerated
  lung, ``d`` the height above the lung's lowest point in the voxel's column
  (:func:`add_dependent_density`). Apply before inserting lesions.

Array convention: (X, Y, Z) with z the axial (slice) axis; spacing in mm.

Example:
    >>> import numpy as np
    >>> from monai_ext.data.scanner import ScannerStyle
    >>> img = np.full((64, 64, 20), -850.0, np.float32)
    >>> out, sp, _ = ScannerStyle(noise_hu=40.0, f50=0.6).apply(img, (0.7, 0.7, 1.0), seed=0)
    >>> round(float(out.std()) / 10) * 10, sp
    (40, (0.7, 0.7, 1.0))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["ScannerStyle", "draw_style", "kernel_mtf", "apply_kernel", "thick_slices", "adjust_inspiration",
           "add_dependent_density", "posterior_height", "SMOOTH_KERNEL", "SHARP_KERNEL"]


def kernel_mtf(freq: np.ndarray, f50: float, boost: float, fmax: float) -> np.ndarray:
    """The kernel's modulation transfer function at spatial frequencies ``freq`` (cycles/mm)."""
    return np.exp(-((freq / f50) ** 2) * math.log(2.0)) * (1.0 + boost * (freq / fmax) ** 2)


def _freq_grid(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    fx = np.fft.fftfreq(int(shape[0]), d=float(spacing[0]))
    fy = np.fft.rfftfreq(int(shape[1]), d=float(spacing[1]))
    return np.sqrt(fx[:, None] ** 2 + fy[None, :] ** 2)


def apply_kernel(image: np.ndarray, spacing: Sequence[float], f50: float, boost: float = 0.0, noise_hu: float = 0.0,
                 rng: np.random.Generator | None = None, reference_f50: float = 0.9) -> np.ndarray:
    """Re-render an (X, Y, Z) HU volume with another reconstruction kernel, slice by slice.

    The image is filtered by ``MTF(f50, boost) / MTF(reference_f50)`` (the reference being the kernel
    the image is assumed to have; the gain is capped at 4 so that a sharp kernel does not blow up
    the original noise) and noise with the kernel's texture is added.

    Args:
        image: (X, Y, Z) volume in HU.
        spacing: voxel size in mm.
        f50: frequency (cycles/mm) where the kernel's MTF is one half: about 0.35 for soft-tissue
            kernels, 0.5-0.7 for standard ones, 0.9-1.3 for sharp lung and bone kernels.
        boost: edge enhancement of sharp kernels (0 for smooth ones, up to about 1.5).
        noise_hu: standard deviation of the added noise in native voxels.
        rng: random generator for the noise.
        reference_f50: the kernel assumed for the input.

    Returns:
        float32 volume.
    """
    img = np.asarray(image, dtype=np.float32)
    freq = _freq_grid(img.shape[:2], spacing)
    fmax = 0.5 / min(float(spacing[0]), float(spacing[1]))
    target = kernel_mtf(freq, f50, boost, fmax)
    reference = kernel_mtf(freq, reference_f50, 0.0, fmax)
    gain = np.minimum(target / np.maximum(reference, 1e-3), 4.0).astype(np.float32)
    out = np.fft.irfft2(np.fft.rfft2(img, axes=(0, 1)) * gain[:, :, None], s=img.shape[:2], axes=(0, 1))
    if noise_hu > 0:
        rng = rng or np.random.default_rng(0)
        shape = np.sqrt(freq * target**2).astype(np.float32)  # amplitude: sqrt of NPS ~ f * MTF^2
        white = rng.standard_normal(img.shape, dtype=np.float32)
        noise = np.fft.irfft2(np.fft.rfft2(white, axes=(0, 1)) * shape[:, :, None], s=img.shape[:2], axes=(0, 1))
        std = float(noise.std())
        if std > 0:
            out += noise * np.float32(noise_hu / std)
    return out.astype(np.float32, copy=False)


def thick_slices(volume: np.ndarray, spacing: Sequence[float], thickness_mm: float, order: int = 1
                 ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Thick axial slices: a box average over ``thickness_mm`` along z, one slice every
    ``thickness_mm``. A thickness at or below the native spacing returns the input.

    Args:
        volume: (X, Y, Z) array (HU, or a 0/1 label to be thresholded by the caller).
        spacing: voxel size in mm.
        thickness_mm: slice thickness (and spacing) of the result.
        order: interpolation order of the resampling along z after the box average.

    Returns:
        ``(volume, spacing)`` as float32 with the new z spacing.
    """
    sz = float(spacing[2])
    vol = np.asarray(volume, dtype=np.float32)
    if thickness_mm <= sz * 1.05:
        return vol, (float(spacing[0]), float(spacing[1]), sz)
    width = max(1, int(round(thickness_mm / sz)))
    box = ndi.uniform_filter1d(vol, size=width, axis=2, mode="nearest")
    n_out = max(1, int(math.floor((vol.shape[2] - 1) * sz / thickness_mm)) + 1)
    z = np.arange(n_out) * (thickness_mm / sz)
    xs, ys = vol.shape[0], vol.shape[1]
    out = np.empty((xs, ys, n_out), dtype=np.float32)
    for k, zk in enumerate(z):
        lo = int(math.floor(zk))
        hi = min(lo + 1, vol.shape[2] - 1)
        w = float(zk - lo) if order > 0 else float(round(zk - lo))
        out[:, :, k] = (1 - w) * box[:, :, lo] + w * box[:, :, hi]
    return out, (float(spacing[0]), float(spacing[1]), float(thickness_mm))


def adjust_inspiration(image: np.ndarray, lung: np.ndarray, lung_median_hu: float) -> np.ndarray:
    """Move the aerated lung's median HU to ``lung_median_hu`` (``-1000 + (hu + 1000) * k`` on lung
    voxels below -400 HU; denser lung voxels move by the shift of a -400 HU voxel tapering to none at
    0 HU, so that vessels and solid tissue keep their density). Returns float32."""
    img = np.asarray(image, dtype=np.float32).copy()
    m = (np.asarray(lung) > 0) & (img < -400.0)
    if not m.any():
        return img
    med = float(np.median(img[m]))
    k = (lung_median_hu + 1000.0) / max(med + 1000.0, 1.0)
    img[m] = -1000.0 + (img[m] + 1000.0) * k
    dense = (np.asarray(lung) > 0) & ~m
    shift = (-1000.0 + 600.0 * k) - (-400.0)
    img[dense] += np.float32(shift) * np.clip(-img[dense] / 400.0, 0.0, 1.0)
    return img


def posterior_height(lung: np.ndarray, spacing: Sequence[float], posterior_axis: int = 1,
                     posterior_low: bool = False) -> np.ndarray:
    """Each voxel's height (mm) above the most posterior lung voxel of its column along ``posterior_axis``
    (negative below it; columns without lung get meaningless values). ``posterior_low``: the posterior side
    is at low indices (RAS arrays); else at high ones (the lesion model's axes, y posterior)."""
    lung = np.asarray(lung) > 0
    shape = [1] * lung.ndim
    shape[posterior_axis] = -1
    idx = np.arange(lung.shape[posterior_axis], dtype=np.float32).reshape(shape)
    step = np.float32(spacing[posterior_axis])
    if posterior_low:
        edge = np.where(lung, idx, np.float32(np.inf)).min(axis=posterior_axis, keepdims=True)
        return np.broadcast_to((idx - edge) * step, lung.shape)
    edge = np.where(lung, idx, np.float32(-1.0)).max(axis=posterior_axis, keepdims=True)
    return np.broadcast_to((edge - idx) * step, lung.shape)


def add_dependent_density(image: np.ndarray, lung: np.ndarray, spacing: Sequence[float], dependent_hu: float,
                          dependent_mm: float) -> np.ndarray:
    """Gravity-dependent density of a supine patient (y posterior): aerated lung voxels (below -400 HU)
    get ``dependent_hu * exp(-d / dependent_mm)`` HU more, ``d`` (mm) their height above the lowest
    (most posterior) lung voxel of their (x, z) column; denser voxels (vessels, lesions) are left as
    they are. Returns float32.

    Example:
        >>> import numpy as np
        >>> lung = np.ones((2, 10, 1), bool)
        >>> out = add_dependent_density(np.full((2, 10, 1), -850.0), lung, (1, 1, 1), 100.0, 2.0)
        >>> [round(float(v)) for v in out[0, -3:, 0]]
        [-813, -789, -750]
    """
    img = np.asarray(image, dtype=np.float32).copy()
    lung = np.asarray(lung) > 0
    if dependent_hu == 0.0 or not lung.any():
        return img
    d = posterior_height(lung, spacing)
    m = lung & (img < -400.0)
    add = np.float32(dependent_hu) * np.exp(-np.maximum(d, 0.0) / np.float32(max(dependent_mm, 1e-3)))
    img[m] += np.broadcast_to(add, img.shape)[m]
    return img


@dataclass(frozen=True)
class ScannerStyle:
    """One acquisition: kernel, noise, slice thickness, HU calibration, inspiration.

    Attributes:
        f50: kernel MTF half-value frequency, cycles/mm (see :func:`apply_kernel`).
        boost: edge enhancement of the kernel.
        noise_hu: added noise standard deviation (native voxels).
        thickness_mm: slice thickness; ``None`` keeps the input's.
        gain: HU gain.
        offset_hu: HU offset.
        lung_median_hu: aerated lung median after :func:`adjust_inspiration`; ``None`` keeps it.
        dependent_hu: dependent density added at the posterior lung edge (:func:`add_dependent_density`).
        dependent_mm: its decay length.
    """

    f50: float = 0.9
    boost: float = 0.0
    noise_hu: float = 0.0
    thickness_mm: float | None = None
    gain: float = 1.0
    offset_hu: float = 0.0
    lung_median_hu: float | None = None
    dependent_hu: float = 0.0
    dependent_mm: float = 20.0

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, image: np.ndarray, spacing: Sequence[float], labels: Sequence[np.ndarray] = (),
              lung: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float],
                                                                       list[np.ndarray]]:
        """Render ``image`` (X, Y, Z, HU) in this style.

        Args:
            image: the volume.
            spacing: its voxel size in mm.
            labels: label volumes on the same grid (masks), resampled with the slices (box average
                thresholded at one half).
            lung: lung mask, needed for ``lung_median_hu`` and ``dependent_hu``.
            seed: seed of the noise.

        Returns:
            ``(image, spacing, labels)``: float32 image and uint8 labels on the new grid.
        """
        img = np.asarray(image, dtype=np.float32)
        if self.lung_median_hu is not None:
            if lung is None:
                raise ValueError("lung_median_hu needs the lung mask")
            img = adjust_inspiration(img, lung, self.lung_median_hu)
        if self.dependent_hu:
            if lung is None:
                raise ValueError("dependent_hu needs the lung mask")
            img = add_dependent_density(img, lung, spacing, self.dependent_hu, self.dependent_mm)
        out_labels = [np.asarray(lab) for lab in labels]
        sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        if self.thickness_mm is not None:
            img, new_sp = thick_slices(img, sp, self.thickness_mm)
            out_labels = [(thick_slices((lab > 0).astype(np.float32), sp, self.thickness_mm)[0] >= 0.5)
                          .astype(np.uint8) for lab in out_labels]
            sp = new_sp
        img = apply_kernel(img, sp, self.f50, self.boost, self.noise_hu, np.random.default_rng(seed))
        if self.gain != 1.0 or self.offset_hu != 0.0:
            img = img * np.float32(self.gain) + np.float32(self.offset_hu)
        return img, sp, out_labels


#: a smooth soft-tissue-like kernel with little noise (as a 2 mm standard chest protocol)
SMOOTH_KERNEL = ScannerStyle(f50=0.4, boost=0.0, noise_hu=12.0)
#: a sharp lung kernel with fine, strong noise (as B70f at 100 kV)
SHARP_KERNEL = ScannerStyle(f50=1.1, boost=1.2, noise_hu=55.0)


def draw_style(rng: np.random.Generator, native_spacing: Sequence[float] | None = None,
               dependent_share: float = 0.0) -> ScannerStyle:
    """A random acquisition over the range of clinical chest CT: kernels from soft to sharp lung
    kernels (f50 0.35-1.3 cycles/mm, edge boost up to 1.5), noise 5-60 HU, slice thickness 0.6-8 mm
    (kept at the native spacing when that is thicker), HU gain 0.96-1.04 and offset +-30 HU, aerated
    lung median -900..-750 HU (half of the draws keep the native inspiration), and with probability
    ``dependent_share`` a dependent density of 30-150 HU decaying over 8-40 mm (the default 0 draws
    none and keeps the random stream of earlier versions, so that studies rendered from a seed stay
    the same)."""
    sharp = rng.random() < 0.45
    f50 = float(rng.uniform(0.8, 1.3) if sharp else rng.uniform(0.35, 0.8))
    boost = float(rng.uniform(0.3, 1.5)) if sharp else 0.0
    noise = float(np.exp(rng.uniform(np.log(5.0), np.log(60.0))))
    thickness = None
    if rng.random() < 0.6:
        t = float(np.exp(rng.uniform(np.log(0.6), np.log(8.0))))
        if native_spacing is None or t > float(native_spacing[2]) * 1.05:
            thickness = t
    lung_median = float(rng.uniform(-900.0, -750.0)) if rng.random() < 0.5 else None
    style = ScannerStyle(f50=f50, boost=boost, noise_hu=noise, thickness_mm=thickness,
                         gain=float(rng.uniform(0.96, 1.04)), offset_hu=float(rng.uniform(-30.0, 30.0)),
                         lung_median_hu=lung_median)
    if dependent_share > 0 and rng.random() < dependent_share:
        style = ScannerStyle(**{**style.to_dict(), "dependent_hu": float(rng.uniform(30.0, 150.0)),
                                "dependent_mm": float(np.exp(rng.uniform(np.log(8.0), np.log(40.0))))})
    return style
