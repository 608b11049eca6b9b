"""Lung masks for chest CT: the lungmask U-Net (R231) when its weights are on disk, else a classical
3D threshold method that needs no weights.

Both work on a volume in Hounsfield units whose array axes are in ITK index order (x, y, z), the
layout of a MONAI ``MetaTensor`` from ``LoadImage`` without its channel. The patient orientation of
the array axes comes from the RAS affine (MONAI convention); without an affine the axes are taken to
be ITK's identity direction (x towards the patient's left, y posterior, z superior). The result is a
``uint8`` array on the input grid: 0 background and 1 lung, or with ``split_lr`` 1 for the right lung
and 2 for the left lung (:data:`RIGHT_LUNG`, :data:`LEFT_LUNG`), the convention of lungmask's R231
and of :mod:`monai_ext.data.synthetic`.

References:
    - Hofmanninger J, Prayer F, Pan J, Röhrich S, Prosch H, Langs G. "Automatic lung segmentation
      in routinely acquired thoracic CT scans: a deep learning approach". European Radiology
      Experimental 4, 50 (2020). https://doi.org/10.1186/s41747-020-00173-2 (the ``lungmask`` U-Net)
    - Hu S, Hoffman EA, Reinhardt JM. "Automatic lung segmentation for accurate quantitation of
      volumetric X-ray CT images". IEEE Transactions on Medical Imaging 20(6):490-498 (2001).
      https://doi.org/10.1109/42.929615 (threshold, airway removal by region growing, left/right
      separation, smoothing)
    - Armato SG, Sensakovic WF. "Automated lung segmentation for thoracic CT: impact on
      computer-aided diagnosis". Academic Radiology 11(9):1011-1021 (2004).
      https://doi.org/10.1016/j.acra.2004.06.005 (per-slice closing to keep juxtapleural structures)
    - Prasad MN, Brown MS, Ahmad S, Abtin F, Allen J, da Costa I, Kim HJ, McNitt-Gray MF, Goldin JG.
      "Automatic segmentation of lung parenchyma in the presence of diseases based on curvature of
      ribs". Academic Radiology 15(9):1173-1180 (2008). https://doi.org/10.1016/j.acra.2008.02.004
      (the rib cage bounds lungs whose dense periphery a threshold misses; ``fill_lesions``)

Example:
    >>> import numpy as np
    >>> from monai_ext.transforms.lung import lung_mask
    >>> ct = np.load("ct_xyz.npy")  # doctest: +SKIP
    >>> mask = lung_mask(ct, spacing=(0.98, 0.98, 2.0), backend="threshold")  # doctest: +SKIP
    >>> float(mask.sum()) * 0.98 * 0.98 * 2.0 / 1000.0  # lung volume in ml  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from monai_ext.errors import CTSeverityError, NoLungFoundError
from monai_ext.transforms.organs import organ_intrusion_canonical

__all__ = [
    "BACKENDS",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "LUNGMASK_WEIGHTS_ENV",
    "LUNGMASK_R231_FILENAME",
    "LUNGMASK_R231_URL",
    "THRESHOLD_PARAMETERS",
    "LungMaskWeightsError",
    "check_threshold_kwargs",
    "default_lungmask_weights_locations",
    "find_lungmask_weights",
    "resolve_backend",
    "lung_mask",
    "threshold_lung_mask",
    "unet_lung_mask",
]

logger = logging.getLogger("monai_ext.transforms")

BACKENDS = ("auto", "lungmask", "unet", "threshold")
RIGHT_LUNG = 1  # lungmask R231 convention
LEFT_LUNG = 2
LUNGMASK_WEIGHTS_ENV = "CTSEVERITY_LUNGMASK_WEIGHTS"
LUNGMASK_R231_FILENAME = "unet_r231-d5d2fc3d.pth"
LUNGMASK_R231_URL = "https://github.com/JoHof/lungmask/releases/download/v0.0/unet_r231-d5d2fc3d.pth"

#: tunable parameters of :func:`threshold_lung_mask` (keyword arguments of :func:`lung_mask` and LungMask)
THRESHOLD_PARAMETERS = (
    "air_hu",
    "body_hu",
    "airway_hu",
    "min_lung_ml",
    "max_airway_ml",
    "working_mm",
    "closing_mm",
    "fill_lesions",
    "remove_organs",
)

# ITK index order with identity direction: x towards the patient's left, y posterior, z superior.
_CANONICAL = axcodes2ornt(("L", "P", "S"))
_fallback_warned = False


class LungMaskWeightsError(CTSeverityError, FileNotFoundError):
    """The lungmask U-Net weights are not on disk (or cannot be loaded)."""


# --------------------------------------------------------------------------------------------------
# weights and backend choice
# --------------------------------------------------------------------------------------------------


def default_lungmask_weights_locations() -> list[Path]:
    """Where the lungmask R231 weights are looked for when no path is given, in order.

    Returns:
        The file named by ``CTSEVERITY_LUNGMASK_WEIGHTS`` (when set), then
        ``torch.hub.get_dir()/checkpoints/unet_r231-d5d2fc3d.pth``.
    """
    import torch

    places = []
    env = os.environ.get(LUNGMASK_WEIGHTS_ENV)
    if env:
        places.append(Path(env).expanduser())
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / LUNGMASK_R231_FILENAME)
    return places


def _missing_weights_message(searched: Sequence[Path]) -> str:
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints" / LUNGMASK_R231_FILENAME
    looked = ", ".join(str(p) for p in searched) or "nowhere"
    return (
        f"the lungmask backend needs the R231 U-Net weights ({LUNGMASK_R231_FILENAME}, about 124 MB) and "
        f"none were found (looked at: {looked}). Download them on a machine with internet access from "
        f"{LUNGMASK_R231_URL} and either pass weights_path=..., set {LUNGMASK_WEIGHTS_ENV}=/path/to/"
        f"{LUNGMASK_R231_FILENAME}, or copy the file to {hub}; ct-severity never downloads weights. "
        "backend='threshold' needs no weights."
    )


def find_lungmask_weights(weights_path: str | os.PathLike | None = None) -> Path | None:
    """Locate the lungmask R231 weights on disk (never downloads).

    Args:
        weights_path: an explicit weights file. When given it must exist.

    Returns:
        The first existing file among ``weights_path``, ``$CTSEVERITY_LUNGMASK_WEIGHTS`` and the torch
        hub cache, or ``None`` when no explicit path was given and neither of the others exists.

    Raises:
        LungMaskWeightsError: if ``weights_path`` is given and is not a file.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise LungMaskWeightsError(_missing_weights_message([path]), path)
        return path
    for path in default_lungmask_weights_locations():
        if path.is_file():
            return path
    return None


def resolve_backend(backend: str = "auto", weights_path: str | os.PathLike | None = None,
                    net_path: str | os.PathLike | None = None) -> tuple[str, Path | None]:
    """Decide which backend runs and with which weights.

    ``auto`` picks ``lungmask`` when the R231 weights are on disk, else ``unet`` when the project's
    lung U-Net weights are found (``net_path``, ``$CTSEVERITY_LUNG_NET`` or the default registered by
    the ``pipelines`` package: the bundle's ``models/lung_net.pt``), else ``threshold``, logging one
    warning per process (logger ``monai_ext.transforms``) the first time it falls back that far.

    Args:
        backend: ``"auto"``, ``"lungmask"``, ``"unet"`` or ``"threshold"``.
        weights_path: an explicit lungmask R231 weights file for ``lungmask``/``auto``.
        net_path: an explicit lung U-Net weights file (``lung_net.pt``) for ``unet``/``auto``.

    Returns:
        ``(backend, weights)``: the backend that runs and its weights file (``None`` for threshold).

    Raises:
        ValueError: if ``backend`` is not one of :data:`BACKENDS`.
        LungMaskWeightsError: if ``lungmask`` is asked for and no weights are on disk, or an
            explicit ``weights_path`` does not exist.
        LungNetWeightsError: if ``unet`` is asked for and no weights are found, or an explicit
            ``net_path`` does not exist.
    """
    from monai_ext.transforms.lung_net import LungNetWeightsError, find_lung_net

    global _fallback_warned
    if backend not in BACKENDS:
        raise ValueError(f"unknown lung mask backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "threshold":
        return "threshold", None
    if backend in ("lungmask", "auto"):
        weights = find_lungmask_weights(weights_path)
        if weights is not None:
            return "lungmask", weights
        if backend == "lungmask":
            raise LungMaskWeightsError(_missing_weights_message(default_lungmask_weights_locations()))
    net = find_lung_net(net_path)
    if net is not None:
        return "unet", net
    if backend == "unet":
        raise LungNetWeightsError("the unet backend needs the lung U-Net weights (lung_net.pt with lung_net.json "
                                  "beside it): pass them, set CTSEVERITY_LUNG_NET, or use the ct-severity bundle")
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "no lung network weights found (lungmask R231: set %s or put %s in the torch hub cache; the project's "
            "lung U-Net: set CTSEVERITY_LUNG_NET); using the threshold lung mask instead",
            LUNGMASK_WEIGHTS_ENV,
            LUNGMASK_R231_FILENAME,
        )
    return "threshold", None


# --------------------------------------------------------------------------------------------------
# orientation
# --------------------------------------------------------------------------------------------------


def _checked_affine(spacing: Sequence[float], affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        sx, sy, sz = (float(s) for s in spacing)
        return np.diag([-sx, -sy, sz, 1.0])  # ITK identity direction (LPS) expressed in RAS
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be a finite, invertible 4x4 matrix, got shape {aff.shape}")
    return aff


def _orientation(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transforms from the array's axes to the canonical (L, P, S) axes and back."""
    start = io_orientation(affine)
    return ornt_transform(start, _CANONICAL), ornt_transform(_CANONICAL, start)


def _canonical_spacing(spacing: Sequence[float], forward: np.ndarray) -> tuple[float, float, float]:
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(forward):
        out[int(target)] = float(spacing[axis])
    return out[0], out[1], out[2]


def _check_volume(volume: np.ndarray, spacing: Sequence[float], name: object | None) -> None:
    if volume.ndim != 3:
        raise ValueError(f"{name or 'volume'}: expected a 3D (x, y, z) volume, got shape {tuple(volume.shape)}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{name or 'volume'}: spacing must be three positive numbers, got {tuple(spacing)}")


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


def lung_mask(
    volume_xyz: np.ndarray,
    spacing: Sequence[float],
    *,
    affine: np.ndarray | None = None,
    backend: str = "auto",
    weights_path: str | os.PathLike | None = None,
    net_path: str | os.PathLike | None = None,
    split_lr: bool = False,
    name: object | None = None,
    device: str | None = None,
    batch_size: int = 20,
    **threshold_kwargs: float,
) -> np.ndarray:
    """Lung mask of a chest CT volume in HU (the function behind :class:`LungMask`).

    Args:
        volume_xyz: (X, Y, Z) array in Hounsfield units, ITK index order.
        spacing: voxel size in mm along the three array axes.
        affine: 4x4 RAS affine of the array (MONAI convention) giving the patient orientation of the
            axes; ``None`` means ITK's identity direction (x left, y posterior, z superior).
        backend: ``"auto"`` (lungmask when its weights are on disk, else the project's lung U-Net
            when its weights are found, else threshold with one logged warning), ``"lungmask"``,
            ``"unet"`` (:mod:`monai_ext.transforms.lung_net`) or ``"threshold"``.
        weights_path: lungmask R231 weights file; else ``$CTSEVERITY_LUNGMASK_WEIGHTS``, else the
            torch hub cache.
        net_path: the project's lung U-Net weights (``lung_net.pt``); else ``$CTSEVERITY_LUNG_NET``,
            else the registered default (the bundle's).
        split_lr: label the right lung 1 and the left lung 2 (lungmask's convention) instead of both 1.
        name: what to call the input in error messages (a file name).
        device: torch device for the U-Net (``None``: CUDA when available).
        batch_size: slices per U-Net forward pass.
        **threshold_kwargs: parameters of :func:`threshold_lung_mask` (``air_hu``, ``body_hu``, ...).

    Returns:
        ``uint8`` array of the input's shape: 0 background, 1 lung (or 1 right, 2 left).

    Raises:
        ValueError: on a bad backend, shape, spacing or affine.
        TypeError: on an unknown threshold parameter.
        LungMaskWeightsError: if ``lungmask`` is asked for and its weights are not on disk.
        NoLungFoundError: if no lung (or less than ``min_lung_ml``) is found.

    Example:
        >>> mask = lung_mask(ct_xyz, (0.98, 0.98, 2.0), backend="threshold", split_lr=True)  # doctest: +SKIP
    """
    check_threshold_kwargs(threshold_kwargs)
    chosen, weights = resolve_backend(backend, weights_path, net_path)
    if chosen == "unet":
        from monai_ext.transforms.lung_net import net_lung_mask

        return net_lung_mask(volume_xyz, spacing, affine=affine, weights_path=weights, split_lr=split_lr, name=name,
                             device=device, min_lung_ml=float(threshold_kwargs.get("min_lung_ml", 100.0)))
    if chosen == "lungmask":
        return unet_lung_mask(
            volume_xyz,
            spacing,
            affine=affine,
            weights_path=weights,
            split_lr=split_lr,
            name=name,
            device=device,
            batch_size=batch_size,
            min_lung_ml=float(threshold_kwargs.get("min_lung_ml", 100.0)),
        )
    return threshold_lung_mask(volume_xyz, spacing, affine=affine, split_lr=split_lr, name=name, **threshold_kwargs)


def check_threshold_kwargs(kwargs: dict[str, object]) -> None:
    """Check that ``kwargs`` only names parameters of :func:`threshold_lung_mask`.

    Args:
        kwargs: keyword arguments meant for the threshold method.

    Raises:
        TypeError: naming the unknown parameters and the valid ones.
    """
    unknown = sorted(set(kwargs) - set(THRESHOLD_PARAMETERS))
    if unknown:
        raise TypeError(
            f"unknown threshold lung mask parameter(s) {', '.join(unknown)}; valid: {', '.join(THRESHOLD_PARAMETERS)}"
        )


def threshold_lung_mask(
    volume_xyz: np.ndarray,
    spacing: Sequence[float],
    *,
    affine: np.ndarray | None = None,
    split_lr: bool = False,
    name: object | None = None,
    air_hu: float = -320.0,
    body_hu: float = -500.0,
    airway_hu: float = -900.0,
    min_lung_ml: float = 100.0,
    max_airway_ml: float = 250.0,
    working_mm: float = 2.0,
    closing_mm: float = 3.0,
    fill_lesions: bool = True,
    remove_organs: bool = True,
) -> np.ndarray:
    """Classical 3D lung mask by thresholding (no weights needed).

    Steps (after Hu et al. 2001): on a grid of about ``working_mm`` voxels, the body is the largest
    connected component of tissue above ``body_hu`` (a small in-plane opening detaches the scanner
    table), filled slice by slice; lung candidates are voxels below ``air_hu`` inside it, which
    leaves outside air and the table out. The trachea is found in the top slices as the central air
    tube of the mediastinum and grown down through the main bronchi with a tight lumen threshold
    (raised from -1000 HU towards ``airway_hu`` until the growth would leak into the lung), then
    removed with a margin. The largest air component and the largest one on the other side of the
    midline that overlaps it in height are kept as the lungs (other air, such as bowel gas, is
    dropped; a single component spanning both sides is split where it is narrowest), the boundary is
    refined by thresholding again at full resolution, and each lung is closed (disk of
    ``closing_mm``) and hole-filled slice by slice so that vessels and juxtapleural structures stay
    inside (Armato and Sensakovic 2004).

    With ``fill_lesions`` (default), lesions denser than ``air_hu`` are put back, the part of the
    lung the threshold misses in COVID-19 pneumonia (the role of lungmask's R231CovidWeb model for
    the U-Net): thick ground glass connected to the lungs, and pockets of consolidation that the
    lungs enclose together with the rib cage (the cavity inside the ribs, after Prasad et al.
    2008), as long as the pocket cannot be reached from the mediastinum or the chest wall without
    crossing fat or soft tissue, has a ground-glass margin, and is not the top of an abdominal
    organ under the diaphragm (:func:`_add_lesions`). On healthy lungs it adds little: under 1 % of
    the lung volume on the synthetic chests of :mod:`monai_ext.data.synthetic`, about 1.5 % on a
    real chest CT (mostly dense dependent lung along the posterior pleura). On synthetic chests with
    lesions over 60 / 80 / 90 % of the lung it keeps about 0.93 / 0.87 / 0.85 of the lung (about 0.85 and
    0.70 at 60 and 80 % without it). Dense consolidation lying directly against the heart, the mediastinum,
    the chest wall or the diaphragm with no ground glass or fat between them cannot be told apart
    from those by intensity and stays out, so severe cases still come out a few points low; the
    lungmask U-Net (R231CovidWeb weights) is the better choice for them. About 4-10 s for
    512x512x141 on two CPU cores (2-5 s without ``fill_lesions``).

    Args:
        volume_xyz: (X, Y, Z) array in Hounsfield units, ITK index order.
        spacing: voxel size in mm along the three array axes.
        affine: RAS affine giving the orientation of the axes; ``None`` means ITK identity direction.
        split_lr: label the right lung 1 and the left lung 2 (lungmask's convention) instead of both 1.
        name: what to call the input in error messages.
        air_hu: voxels below this are air (lung parenchyma).
        body_hu: voxels above this are tissue (body, table).
        airway_hu: highest (loosest) threshold tried when growing the airway lumen from the trachea;
            the growth starts at -1000 HU and stops one step before it leaks into the lung.
        min_lung_ml: a mask below this volume counts as no lung found.
        max_airway_ml: an airway growth above this volume counts as a leak into the lung.
        working_mm: voxel size of the grid used for the 3D steps (the input is block-averaged to it).
        closing_mm: radius of the per-slice closing of each lung (0 disables it).
        fill_lesions: add ground glass and consolidation that the air threshold leaves out (see
            above); ``False`` gives the plain air-based mask.
        remove_organs: take out the tissue that rises from the abdomen into the lung bases (liver and
            spleen domes, the diaphragm, the heart on it, with their partial-volume rims; see
            :func:`monai_ext.transforms.organs.organ_intrusion`), which slice-wise hole filling takes
            in. It also takes out consolidation lying directly on the diaphragm with no aerated
            lung below it.

    Returns:
        ``uint8`` array of the input's shape: 0 background, 1 lung (or 1 right, 2 left).

    Raises:
        ValueError: on a bad shape, spacing or affine.
        NoLungFoundError: if no body, no air inside it, or less than ``min_lung_ml`` of lung is found.

    Example:
        >>> mask = threshold_lung_mask(ct_xyz, (0.98, 0.98, 2.0))  # doctest: +SKIP
    """
    volume = np.asarray(volume_xyz)
    _check_volume(volume, spacing, name)
    aff = _checked_affine(spacing, affine)
    forward, backward = _orientation(aff)
    canon = apply_orientation(volume, forward)
    cspacing = _canonical_spacing(spacing, forward)
    params = _ThresholdParams(
        air_hu=air_hu,
        body_hu=body_hu,
        airway_hu=airway_hu,
        min_lung_ml=min_lung_ml,
        max_airway_ml=max_airway_ml,
        working_mm=working_mm,
        closing_mm=closing_mm,
        fill_lesions=bool(fill_lesions),
        remove_organs=bool(remove_organs),
    )
    labels = _threshold_canonical(canon, cspacing, params, name)
    if not split_lr:
        labels = (labels > 0).astype(np.uint8)
    return np.ascontiguousarray(apply_orientation(labels, backward)).astype(np.uint8, copy=False)


def unet_lung_mask(
    volume_xyz: np.ndarray,
    spacing: Sequence[float],
    *,
    affine: np.ndarray | None = None,
    weights_path: str | os.PathLike | None = None,
    split_lr: bool = False,
    name: object | None = None,
    device: str | None = None,
    batch_size: int = 20,
    min_lung_ml: float = 100.0,
) -> np.ndarray:
    """Lung mask by the lungmask U-Net R231 (Hofmanninger et al. 2020) from a local weights file.

    The volume is reoriented to the layout lungmask expects (an LPS ``sitk.GetArrayFromImage``
    array: slices, rows anterior to posterior, columns right to left), segmented slice by slice
    with lungmask's own pre- and post-processing, and the labels are put back on the input grid.

    Args:
        volume_xyz: (X, Y, Z) array in Hounsfield units, ITK index order.
        spacing: voxel size in mm along the three array axes.
        affine: RAS affine giving the orientation of the axes; ``None`` means ITK identity direction.
        weights_path: the R231 weights; ``None`` looks in ``$CTSEVERITY_LUNGMASK_WEIGHTS`` and the
            torch hub cache.
        split_lr: label the right lung 1 and the left lung 2 (lungmask's convention) instead of both 1.
        name: what to call the input in error messages.
        device: torch device to run on (``"cpu"``, ``"cuda:1"``, ...); ``None`` lets lungmask use CUDA
            when available.
        batch_size: slices per forward pass.
        min_lung_ml: a mask below this volume counts as no lung found.

    Returns:
        ``uint8`` array of the input's shape: 0 background, 1 lung (or 1 right, 2 left).

    Raises:
        LungMaskWeightsError: if the weights are not on disk or cannot be loaded.
        NoLungFoundError: if the U-Net finds less than ``min_lung_ml`` of lung.

    Example:
        >>> mask = unet_lung_mask(ct_xyz, (0.98, 0.98, 2.0), weights_path="unet_r231-d5d2fc3d.pth")  # doctest: +SKIP
    """
    volume = np.asarray(volume_xyz)
    _check_volume(volume, spacing, name)
    weights = find_lungmask_weights(weights_path)
    if weights is None:
        raise LungMaskWeightsError(_missing_weights_message(default_lungmask_weights_locations()), name)
    aff = _checked_affine(spacing, affine)
    forward, backward = _orientation(aff)
    canon = apply_orientation(volume, forward)
    inferer = _load_inferer(str(weights.resolve()), weights.stat().st_mtime_ns, device, int(batch_size))
    lungmask_logger = logging.getLogger("lungmask")
    level = lungmask_logger.level
    lungmask_logger.setLevel(logging.WARNING)
    try:
        # lungmask wants (z, y, x) with y running anterior->posterior and x right->left (LPS).
        zyx = np.ascontiguousarray(canon.transpose(2, 1, 0), dtype=np.float32)
        out = np.asarray(inferer.apply(zyx)).transpose(2, 1, 0)
    finally:
        lungmask_logger.setLevel(level)
    labels = np.zeros(out.shape, dtype=np.uint8)
    labels[out == 1] = RIGHT_LUNG  # lungmask: 1 right lung, 2 left lung (the same convention)
    labels[out == 2] = LEFT_LUNG
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volume_ml = float(np.count_nonzero(labels)) * voxel_ml
    if volume_ml < min_lung_ml:
        raise NoLungFoundError(
            f"the lungmask U-Net found {volume_ml:.0f} ml of lung, below the {min_lung_ml:.0f} ml minimum", name
        )
    if not split_lr:
        labels = (labels > 0).astype(np.uint8)
    return np.ascontiguousarray(apply_orientation(labels, backward)).astype(np.uint8, copy=False)


@functools.lru_cache(maxsize=2)
def _load_inferer(path: str, mtime_ns: int, device: str | None, batch_size: int):  # noqa: ARG001 (mtime keys the cache)
    """A cached lungmask ``LMInferer`` for one weights file on one device (lungmask is imported lazily)."""
    import torch

    with warnings.catch_warnings():  # lungmask.mask silences every UserWarning at import; keep that local
        from lungmask.mask import LMInferer

    try:
        inferer = LMInferer(modelpath=path, force_cpu=device is not None, batch_size=batch_size, tqdm_disable=True)
    except Exception as exc:  # torch.load / load_state_dict errors: not a usable R231 state dict
        raise LungMaskWeightsError(f"cannot load the lungmask U-Net weights: {exc}", path) from exc
    if device is not None:  # lungmask itself only knows "CUDA if available" or the CPU
        inferer.device = torch.device(device)
        inferer.model.to(inferer.device)
    return inferer


# --------------------------------------------------------------------------------------------------
# threshold method (canonical orientation: x to the left, y posterior, z superior)
# --------------------------------------------------------------------------------------------------


class _ThresholdParams:
    def __init__(self, **kwargs: float) -> None:
        for key, value in kwargs.items():
            setattr(self, key, float(value))


def _disk(radius: int) -> np.ndarray:
    """In-plane disk as a 3D structuring element of shape (2r+1, 2r+1, 1)."""
    r = max(0, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy <= r * r + r)[:, :, None]


_PLANE = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)[:, :, None]  # 4-connectivity per slice


def _block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    if factors == (1, 1, 1):
        return volume.astype(np.float32)
    pads = [(0, (-n) % f) for n, f in zip(volume.shape, factors)]
    if any(p for _, p in pads):
        volume = np.pad(volume, pads, mode="edge")
    cx, cy, cz = (n // f for n, f in zip(volume.shape, factors))
    fx, fy, fz = factors
    return volume.reshape(cx, fx, cy, fy, cz, fz).mean(axis=(1, 3, 5), dtype=np.float32)


def _upsample(labels: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def _clear_upsampled(labels: np.ndarray, coarse_mask: np.ndarray, factors: tuple[int, int, int]) -> None:
    """Set ``labels`` to 0 where the coarse mask, upsampled to the labels' grid, is set."""
    if not coarse_mask.any():
        return
    box = _bbox(coarse_mask)
    full = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, labels.shape))
    shape = tuple(b.stop - b.start for b in full)
    labels[full][_upsample(coarse_mask[box], factors, shape)] = 0


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d))) for d in range(mask.ndim)]
    return tuple(slice(max(0, int(i[0]) - margin), min(n, int(i[-1]) + 1 + margin)) for i, n in zip(idx, mask.shape))


def _threshold_canonical(
    volume: np.ndarray, spacing: tuple[float, float, float], p: _ThresholdParams, name: object | None
) -> np.ndarray:
    factors = tuple(max(1, int(round(p.working_mm / s))) for s in spacing)
    cspacing = tuple(s * f for s, f in zip(spacing, factors))
    cvox_ml = float(np.prod(cspacing)) / 1000.0
    coarse = _block_mean(volume, factors)
    np.maximum(coarse, -1024.0, out=coarse)

    body = _body_mask(coarse, cspacing, p, name)
    filled = ndimage.binary_fill_holes(body, structure=_PLANE)
    candidates = (coarse < p.air_hu) & filled
    if not candidates.any():
        raise NoLungFoundError(f"no air-filled region (below {p.air_hu:.0f} HU) inside the body", name)

    seed = _trachea_seed(coarse, candidates, filled, cspacing, p)
    airway = trachea = None
    if seed is not None:
        grown, trachea = _grow_airway(coarse, candidates, seed, cvox_ml, p)
        airway, trachea = _dilate_in_box(grown), _dilate_in_box(trachea)
        candidates &= ~airway
        x_mid = float(np.mean(np.nonzero(seed)[0]))
    else:
        logger.debug("lung mask: no trachea found in the top slices of %s; airway not removed", name)
        xs = np.nonzero(filled)[0]
        x_mid = float(xs.mean()) if xs.size else coarse.shape[0] / 2.0

    comp, _ = ndimage.label(candidates)
    lungs = _select_lungs(comp, x_mid, cvox_ml, p, name)
    coarse_labels = _left_right(comp, lungs, x_mid)
    gas = (comp > 0) & (coarse_labels == 0)  # air that is not lung: bowel gas, oesophagus, lung islands

    # back to the input grid: threshold again at full resolution near the coarse lungs, but not in
    # the other air regions (bowel gas, oesophagus) that were not kept
    near = ndimage.grey_dilation(coarse_labels, size=(3, 3, 3))
    near[(comp > 0) & (coarse_labels == 0)] = 0
    del comp, candidates
    near_full = _upsample(near, factors, volume.shape)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    box = _bbox(near_full > 0)
    labels[box] = np.where(volume[box] < p.air_hu, near_full[box], 0)
    del near_full
    if airway is not None:
        _clear_upsampled(labels, airway, factors)
    if p.fill_lesions:
        _add_lesions(labels, volume, coarse, coarse_labels, filled, gas, airway, factors, cspacing)
    del gas

    radius = int(round(p.closing_mm / min(spacing[0], spacing[1]))) if p.closing_mm > 0 else 0
    for value in (RIGHT_LUNG, LEFT_LUNG):
        mask = labels == value
        if not mask.any():
            continue
        pad = radius + 1
        box = _bbox(mask, margin=pad)
        sub = mask[box]
        if radius > 0:
            sub = np.pad(sub, ((pad, pad), (pad, pad), (0, 0)))
            sub = ndimage.binary_closing(sub, structure=_disk(radius))[pad:-pad, pad:-pad, :]
        sub = ndimage.binary_fill_holes(sub, structure=_PLANE)
        region = labels[box]
        region[sub & (region == 0)] = value
    if trachea is not None:  # the closing and filling must not bring the trachea back
        _clear_upsampled(labels, trachea, factors)
    for _ in range(3) if p.remove_organs else ():  # removing a whole lowest slice moves the columns' start up
        organ = organ_intrusion_canonical(volume, labels > 0, spacing)
        if not organ.any():
            break
        labels[organ] = 0

    voxel_ml = float(np.prod(spacing)) / 1000.0
    total_ml = float(np.count_nonzero(labels)) * voxel_ml
    if total_ml < p.min_lung_ml:
        raise NoLungFoundError(f"the lung mask holds {total_ml:.0f} ml, below the {p.min_lung_ml:.0f} ml minimum", name)
    return labels


# lesion filling (``fill_lesions``): HU bands, in HU after a Gaussian of 1.5 mm (GGO) or 2 mm (the rest)
_BONE_HU = 200.0  # ribs, sternum, vertebrae
_RIB_SLAB_MM = 15.0  # ribs of the slices within this distance close the rib cage of a slice
_GGO_HU = (-750.0, -150.0)  # ground glass and partly aerated lung
_FAT_HU = (-140.0, -70.0)  # mediastinal, pericardial and extrapleural fat
_SOFT_HU = 25.0  # above: heart, vessels, muscle, liver, spleen (and bone)
_LESION_MAX_HU = 150.0  # full-resolution voxels above this are never added (bone, contrast, calcium)


def _block_any(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block-wise OR onto the working grid (the grid of :func:`_block_mean`)."""
    if factors == (1, 1, 1):
        return mask.copy()
    pads = [(0, (-n) % f) for n, f in zip(mask.shape, factors)]
    if any(p for _, p in pads):
        mask = np.pad(mask, pads)
    cx, cy, cz = (n // f for n, f in zip(mask.shape, factors))
    fx, fy, fz = factors
    return mask.reshape(cx, fx, cy, fy, cz, fz).any(axis=(1, 3, 5))


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on an anisotropic grid."""
    rx, ry, rz = (int(np.floor(radius_mm / s)) for s in spacing)
    x, y, z = np.ogrid[-rx : rx + 1, -ry : ry + 1, -rz : rz + 1]
    return (x * spacing[0]) ** 2 + (y * spacing[1]) ** 2 + (z * spacing[2]) ** 2 <= radius_mm**2 + 1e-6


def _rib_cage(bone: np.ndarray, lungs: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Thoracic cavity per axial slice, bounded by the inner surface of the rib cage (rib-based
    lung-border correction, after Prasad et al. 2008): the bone of the slices within
    ``_RIB_SLAB_MM`` (which closes the gaps between the ribs of one slice) is looked at from the
    centre of the lungs in 4 degree sectors; the innermost bone of each sector, unless it lies more
    than 20 mm beyond that of its neighbours (a scapula or a skin marker seen through a gap between
    ribs), and the lungs themselves span the cavity as their convex hull. Only slices with lung
    are filled."""
    from skimage.morphology import convex_hull_image

    k = int(round(_RIB_SLAB_MM / spacing[2]))
    slab = ndimage.maximum_filter1d(bone.view(np.uint8), 2 * k + 1, axis=2) > 0 if k > 0 else bone
    cage = np.zeros(bone.shape, dtype=bool)
    n_sectors = 90
    for z in np.flatnonzero(lungs.any(axis=(0, 1))):
        lung_z = lungs[:, :, z]
        points = np.argwhere(slab[:, :, z])
        if points.shape[0]:
            d = (points - np.argwhere(lung_z).mean(axis=0)) * np.asarray(spacing[:2])
            radius = np.hypot(d[:, 0], d[:, 1])
            sector = ((np.arctan2(d[:, 1], d[:, 0]) + np.pi) * (n_sectors / (2 * np.pi))).astype(int) % n_sectors
            order = np.lexsort((radius, sector))
            first = np.ones(order.size, dtype=bool)
            first[1:] = sector[order[1:]] != sector[order[:-1]]
            inner = order[first]
            profile = np.full(n_sectors, np.nan)
            profile[sector[inner]] = radius[inner]
            ring = np.concatenate([profile[-5:], profile, profile[:5]])
            windows = np.lib.stride_tricks.sliding_window_view(ring, 11)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
                reference = np.nanmedian(windows, axis=1)
            ok = ~(radius[inner] > reference[sector[inner]] + 20.0)
            lung_z = lung_z.copy()
            lung_z[points[inner[ok], 0], points[inner[ok], 1]] = True
        if np.count_nonzero(lung_z) >= 3:
            cage[:, :, z] = convex_hull_image(lung_z)
    return cage


def _add_lesions(
    labels: np.ndarray,
    volume: np.ndarray,
    coarse: np.ndarray,
    coarse_labels: np.ndarray,
    filled: np.ndarray,
    gas: np.ndarray,
    airway: np.ndarray | None,
    factors: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> None:
    """Add the lesions that the air threshold leaves out (ground glass, consolidation), in place.

    On the working grid (``spacing``, cropped to the lungs):

    1. Ground glass: voxels in ``_GGO_HU`` (1.5 mm Gaussian) inside the rib cage, thick enough to
       hold a 3.5 mm disk in two consecutive slices (which leaves out the partial-volume rim of the
       lungs), in components that touch the lungs and not bowel gas (pure air, median below
       -950 HU, as next to stomach contents).
    2. Pockets: slice by slice, what the lungs and the ground glass enclose together with the rib
       cage (:func:`_rib_cage`, eroded by 2 mm) is a subpleural or enclosed lesion, unless it can
       be reached from outside the cage or from the mediastinum (a 4 mm channel on the midline of
       the cage) without crossing lung, ground glass, bone, other air, fat (``_FAT_HU``) or soft
       tissue (above ``_SOFT_HU`` after a 2 or a 4 mm Gaussian): mediastinum, heart, chest wall and
       abdomen stay out. A pocket is kept if it holds a 2.5 mm disk, touches the lungs, lies
       within 2 voxels of 0.5 ml of ground glass (dense lesions have a ground-glass margin;
       healthy structures enclosed by lung, such as hilar vessels, do not), and is not the top of
       an abdominal organ: a pocket mostly without lung below it whose roof is mostly tissue
       attached to the chest wall or the mediastinum (the diaphragm over the stomach or spleen),
       rather than lung (a lesion of the lung base), is dropped.
    3. Consolidated cores that the lungs and the additions enclose in a slice are filled, and the
       additions are written back on the input grid, labelled by the side of the midline, to
       voxels below ``_LESION_MAX_HU``.
    """
    lungs = coarse_labels > 0
    if not lungs.any():
        return
    margin = [int(np.ceil(30.0 / s)) for s in spacing[:2]]
    lbox = _bbox(lungs)
    slab = int(round(_RIB_SLAB_MM / spacing[2]))
    box = (
        slice(max(0, lbox[0].start - margin[0]), min(coarse.shape[0], lbox[0].stop + margin[0])),
        slice(max(0, lbox[1].start - margin[1]), min(coarse.shape[1], lbox[1].stop + margin[1])),
        slice(max(0, lbox[2].start - slab), min(coarse.shape[2], lbox[2].stop + slab)),
    )
    full = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, volume.shape))
    sub = coarse[box]
    lab = coarse_labels[box]
    lungs = lab > 0
    inside = filled[box]
    other_air = gas[box] | airway[box] if airway is not None else gas[box]
    comp, n = ndimage.label(gas[box])
    gas = np.zeros(sub.shape, dtype=bool)
    if n:  # bowel gas is pure air; air islands of the lungs cut off by lesions hold parenchyma
        gas = (ndimage.median(sub, comp, np.arange(n + 1)) < -950.0)[comp] & (comp > 0)
    del comp

    bone = _block_any(volume[full] > _BONE_HU, factors) & inside
    comp, n = ndimage.label(bone)
    if n:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        bone = (sizes * float(np.prod(spacing)) / 1000.0 >= 0.3)[comp]  # drop skin markers, calcium specks
    del comp
    cage = _rib_cage(bone, lungs, spacing)
    cage = ndimage.binary_erosion(cage, structure=_disk(max(1, int(round(2.0 / min(spacing[:2]))))))

    def smooth(mm: float) -> np.ndarray:
        sigma = [mm / s for s in spacing[:2]] + [min(mm / spacing[2], 0.6)]
        return ndimage.gaussian_filter(sub, sigma)

    sm = smooth(1.5)
    ggo = (sm > _GGO_HU[0]) & (sm < _GGO_HU[1]) & cage & ~other_air
    ggo = ndimage.binary_opening(ggo, structure=np.repeat(_ball(3.5, spacing), 2, axis=2))  # >= 2 slices thick
    comp, n = ndimage.label(ggo)
    if n:  # ground glass touches the lungs, not bowel gas (stomach contents look alike)
        ok = np.zeros(n + 1, dtype=bool)
        ok[np.unique(comp[ndimage.binary_dilation(lungs) & ggo])] = True
        ok[np.unique(comp[ndimage.binary_dilation(gas) & ggo])] = False
        ok[0] = False
        ggo = ok[comp]
    known = lungs | ggo
    del comp

    sm = smooth(2.0)
    tissue = ((sm > _FAT_HU[0]) & (sm < _FAT_HU[1])) | (sm > _SOFT_HU)
    tissue |= smooth(4.0) > _SOFT_HU  # noisy organs (spleen, liver without contrast) on average
    tissue &= ~known
    del sm
    xs = np.arange(sub.shape[0])
    wall = ~cage | tissue | ndimage.binary_dilation(bone, structure=_disk(1)) | other_air
    free = ~(known | wall)  # space not yet explained: lesion, or partial volume and mixed tissue
    holes = np.zeros(sub.shape, dtype=bool)
    attached = ~cage
    x_mid = np.zeros(sub.shape[2])
    for z in np.flatnonzero(cage.any(axis=(0, 1))):
        cx = np.flatnonzero(cage[:, :, z].any(axis=1))
        x_mid[z] = 0.5 * (cx[0] + cx[-1])
        channel = np.abs(xs - x_mid[z]) * spacing[0] <= 4.0
        free[channel, :, z] = ~known[channel, :, z]
        if known[:, :, z].any():
            obj = ~free[:, :, z]
            holes[:, :, z] = ndimage.binary_fill_holes(obj) & ~obj
            # tissue reachable from outside the cavity or from the mediastinum within this slice
            seed = ~cage[:, :, z]
            seed[channel] |= tissue[channel, :, z]
            attached[:, :, z] = ndimage.binary_propagation(seed, mask=tissue[:, :, z] | seed)
    del wall
    opened = ndimage.binary_opening(holes, structure=_disk(max(1, int(round(2.5 / min(spacing[:2]))))))
    comp, n = ndimage.label(opened)
    if n:
        index = np.arange(n + 1)
        keep = np.zeros(n + 1, dtype=bool)
        keep[np.unique(comp[ndimage.binary_dilation(known, structure=_PLANE) & opened])] = True  # touch the lungs
        near_ggo = ndimage.binary_dilation(ggo, structure=_disk(2)) & opened
        keep &= ndimage.sum_labels(near_ggo, comp, index) * float(np.prod(spacing)) / 1000.0 >= 0.5
        # a lesion's roof is lung; the roof of a stomach or spleen under the lung base is diaphragm
        roof = np.zeros(sub.shape, dtype=bool)
        roof[:, :, :-1] = opened[:, :, :-1] & ~opened[:, :, 1:]
        above_known = np.zeros(sub.shape, dtype=bool)
        above_known[:, :, :-1] = roof[:, :, :-1] & known[:, :, 1:]
        above_wall = np.zeros(sub.shape, dtype=bool)
        above_wall[:, :, :-1] = roof[:, :, :-1] & attached[:, :, 1:]
        below = np.zeros(sub.shape, dtype=bool)  # lung somewhere below in the same column
        np.logical_or.accumulate(known[:, :, :-1], axis=2, out=below[:, :, 1:])
        size = ndimage.sum_labels(opened, comp, index)
        under = ndimage.sum_labels(opened & ~below, comp, index) > 0.5 * size  # under the lung base
        roofed = ndimage.sum_labels(above_wall, comp, index) > ndimage.sum_labels(above_known, comp, index)
        keep &= ~(under & roofed)
        del roof, above_known, above_wall, below
        keep[0] = False
        opened = keep[comp]
    holes = opened
    del comp, free, attached
    added = (ggo | holes) & ~lungs
    del tissue
    if not added.any():
        return
    side = np.where(xs[:, None, None] > x_mid[None, None, :], LEFT_LUNG, RIGHT_LUNG).astype(np.uint8)
    new = np.where(lungs, lab, np.where(added, side, 0)).astype(np.uint8)
    for value in (RIGHT_LUNG, LEFT_LUNG):  # consolidated cores inside ground glass
        mask = new == value
        for z in np.flatnonzero(mask.any(axis=(0, 1))):
            new[:, :, z][ndimage.binary_fill_holes(mask[:, :, z]) & (new[:, :, z] == 0)] = value
    new[lungs | other_air] = 0
    up = _upsample(new, factors, tuple(b.stop - b.start for b in full))
    region = labels[full]
    take = (up > 0) & (region == 0) & (volume[full] < _LESION_MAX_HU)
    region[take] = up[take]


def _dilate_in_box(mask: np.ndarray) -> np.ndarray:
    """One-voxel (6-connected) dilation, computed in the mask's bounding box."""
    out = np.zeros_like(mask)
    if mask.any():
        box = _bbox(mask, margin=1)
        out[box] = ndimage.binary_dilation(mask[box])
    return out


def _body_mask(coarse: np.ndarray, spacing: tuple[float, ...], p: _ThresholdParams, name: object | None) -> np.ndarray:
    """Largest tissue component after an in-plane opening that cuts thin links to the table."""
    tissue = coarse > p.body_hu
    if not tissue.any():
        raise NoLungFoundError(f"no body found (no tissue above {p.body_hu:.0f} HU)", name)
    disk = _disk(max(1, int(round(4.0 / min(spacing[0], spacing[1])))))
    opened = ndimage.binary_opening(tissue, structure=disk)
    comp, n = ndimage.label(opened)
    if n == 0:
        comp, n = ndimage.label(tissue)
        opened = tissue
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    body = comp == int(np.argmax(sizes))
    return ndimage.binary_dilation(body, structure=disk) & tissue


def _trachea_seed(
    coarse: np.ndarray,
    candidates: np.ndarray,
    filled: np.ndarray,
    spacing: tuple[float, ...],
    p: _ThresholdParams,
) -> np.ndarray | None:
    """The trachea's cross-section in the highest slice where a central, dark, tube-sized air region
    lies inside the body (searched in the top 80 mm that hold air)."""
    zs = np.flatnonzero(candidates.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    area_px = spacing[0] * spacing[1]
    depth = max(1, int(round(80.0 / spacing[2])))
    for z in range(int(zs[-1]), max(-1, int(zs[-1]) - depth), -1):
        body_x = np.flatnonzero(filled[:, :, z].any(axis=1))
        if body_x.size == 0:
            continue
        centre, width = (body_x[0] + body_x[-1]) / 2.0, float(body_x[-1] - body_x[0] + 1)
        comp, n = ndimage.label(candidates[:, :, z])
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        areas = ndimage.sum_labels(np.ones_like(comp), comp, index) * area_px
        minima = ndimage.minimum(coarse[:, :, z], comp, index)
        centroids = ndimage.center_of_mass(np.ones_like(comp), comp, index)
        best, best_area = 0, 0.0
        for i, (area, low, (cx, _)) in enumerate(zip(areas, minima, centroids), start=1):
            if 30.0 <= area <= 1200.0 and low < p.airway_hu and abs(cx - centre) < 0.15 * width and area > best_area:
                best, best_area = i, float(area)
        if best:
            seed = np.zeros(candidates.shape, dtype=bool)
            seed[:, :, z] = comp == best
            return seed
    return None


def _grow_airway(
    coarse: np.ndarray, candidates: np.ndarray, seed: np.ndarray, voxel_ml: float, p: _ThresholdParams
) -> tuple[np.ndarray, np.ndarray]:
    """Airway lumen connected to the trachea seed (Hu et al. 2001): the highest threshold between
    -1000 HU and ``airway_hu`` (10 HU steps) whose growth does not leak into the lung (stays below
    ``max_airway_ml``), one step lower for safety after a leak, together with the trachea followed
    slice by slice (which also holds when the lumen is too noisy to grow at any threshold).
    Returns ``(airway, trachea)``, the second being the slice-by-slice part above the carina."""
    z_top = int(np.flatnonzero(seed.any(axis=(0, 1)))[-1])
    box = _bbox(candidates[:, :, : z_top + 1])
    sub_c, sub_v, sub_s = candidates[box], coarse[box], seed[box]
    cache: dict[float, np.ndarray] = {}

    def grow(threshold: float) -> np.ndarray:
        if threshold not in cache:
            comp, _ = ndimage.label(sub_c & (sub_v < threshold))
            ids = np.unique(comp[sub_s])
            cache[threshold] = np.isin(comp, ids[ids > 0])
        return cache[threshold]

    def leaks(threshold: float) -> bool:
        return np.count_nonzero(grow(threshold)) * voxel_ml > p.max_airway_ml

    thresholds = list(np.arange(-1000.0, p.airway_hu + 0.5, 10.0)) or [p.airway_hu]
    lo, hi = 0, len(thresholds) - 1  # find the last threshold that does not leak (volume grows with it)
    if leaks(thresholds[0]):
        chosen = None
    elif not leaks(thresholds[hi]):
        chosen = thresholds[hi]
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if leaks(thresholds[mid]) else (mid, hi)
        chosen = thresholds[max(0, lo - 1)]
    trachea = _track_trachea(candidates & (coarse < (p.air_hu + p.airway_hu) / 2.0), seed)
    airway = trachea.copy()
    if chosen is not None:
        airway[box] |= grow(chosen)
    return airway, trachea


def _track_trachea(candidates: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Leak-proof fallback: follow the trachea down slice by slice while it stays one tube."""
    airway = seed.copy()
    z = int(np.flatnonzero(seed.any(axis=(0, 1)))[-1])
    previous = seed[:, :, z]
    seed_area = np.count_nonzero(previous)
    for zz in range(z - 1, -1, -1):
        comp, _ = ndimage.label(candidates[:, :, zz])
        ids = np.unique(comp[previous])
        ids = ids[ids > 0]
        if ids.size != 1:
            break
        current = comp == ids[0]
        if np.count_nonzero(current) > 2 * np.count_nonzero(previous) or np.count_nonzero(current) > 3 * seed_area:
            break
        airway[:, :, zz] = current
        previous = current
    return airway


def _select_lungs(
    comp: np.ndarray, x_mid: float, voxel_ml: float, p: _ThresholdParams, name: object | None
) -> list[int]:
    """Component ids of the lungs: the largest, plus the largest on the other side of the midline
    that overlaps it in height (one component is kept when it spans both sides)."""
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    if sizes.max() * voxel_ml < p.min_lung_ml / 2.0:
        raise NoLungFoundError(
            f"no lung found: the largest air region inside the body holds {sizes.max() * voxel_ml:.0f} ml", name
        )
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0]
    first = order[0]
    slices = ndimage.find_objects(comp)
    xs = np.nonzero(comp[slices[first - 1]] == first)[0] + slices[first - 1][0].start
    left_share = float(np.mean(xs > x_mid))
    if 0.2 < left_share < 0.8:
        return [first]
    first_side = left_share >= 0.5
    z0, z1 = slices[first - 1][2].start, slices[first - 1][2].stop
    for other in order[1:]:
        if sizes[other] < 0.02 * sizes[first] or sizes[other] * voxel_ml < 10.0:
            break
        box = slices[other - 1]
        cx = float(np.mean(np.nonzero(comp[box] == other)[0])) + box[0].start
        if (cx > x_mid) == first_side:
            continue
        b0, b1 = box[2].start, box[2].stop
        overlap = min(z1, b1) - max(z0, b0)
        if overlap >= 0.5 * (b1 - b0) and b1 >= z0 + 0.5 * (z1 - z0):
            return [first, other]
    return [first]


def _left_right(comp: np.ndarray, lungs: list[int], x_mid: float) -> np.ndarray:
    """Coarse label image: LEFT_LUNG / RIGHT_LUNG (x grows towards the patient's left)."""
    labels = np.zeros(comp.shape, dtype=np.uint8)
    if len(lungs) == 2:
        a, b = (comp == lungs[0]), (comp == lungs[1])
        a_left = np.mean(np.nonzero(a)[0]) > np.mean(np.nonzero(b)[0])
        labels[a] = LEFT_LUNG if a_left else RIGHT_LUNG
        labels[b] = RIGHT_LUNG if a_left else LEFT_LUNG
        return labels
    whole = comp == lungs[0]
    box = _bbox(whole, margin=1)
    labels[box] = _split_merged(whole[box], x_mid - box[0].start)
    return labels


def _split_merged(mask: np.ndarray, x_mid: float) -> np.ndarray:
    """Split one component holding both lungs: erode until it falls in two, grow the parts back;
    if it never falls apart, cut each slice at its narrowest column near the midline."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    total = np.count_nonzero(mask)
    eroded = mask
    for step in range(1, 9):
        eroded = ndimage.binary_erosion(eroded, structure=_PLANE)
        comp, n = ndimage.label(eroded)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        a, b = (int(i) for i in np.argsort(sizes)[::-1][:2])
        if sizes[b] < 0.1 * sizes[a] or sizes[b] < 0.02 * total:
            continue
        xa, xb = np.mean(np.nonzero(comp == a)[0]), np.mean(np.nonzero(comp == b)[0])
        out[comp == a] = LEFT_LUNG if xa > xb else RIGHT_LUNG
        out[comp == b] = RIGHT_LUNG if xa > xb else LEFT_LUNG
        for _ in range(step + 2):
            grown = ndimage.grey_dilation(out, footprint=_PLANE)
            out = np.where((out == 0) & mask, grown, out)
        rest = mask & (out == 0)
        out[rest] = np.where(np.nonzero(rest)[0] > x_mid, LEFT_LUNG, RIGHT_LUNG)
        return out
    # narrowest column per slice, within the middle of the component
    xs = np.arange(mask.shape[0])
    for z in range(mask.shape[2]):
        sl = mask[:, :, z]
        if not sl.any():
            continue
        counts = sl.sum(axis=1)
        band = (xs > x_mid - 0.15 * mask.shape[0]) & (xs < x_mid + 0.15 * mask.shape[0])
        cut = int(xs[band][np.argmin(counts[band])]) if band.any() else int(round(x_mid))
        out[:, :, z] = np.where(sl, np.where(xs[:, None] > cut, LEFT_LUNG, RIGHT_LUNG), 0)
    return out
