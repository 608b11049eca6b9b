"""Array transforms (channel-first, MONAI style) of ct-severity.

References:
    - Hofmanninger J et al. "Automatic lung segmentation in routinely acquired thoracic CT scans:
      a deep learning approach". European Radiology Experimental 4, 50 (2020).
    - Hu S, Hoffman EA, Reinhardt JM. "Automatic lung segmentation for accurate quantitation of
      volumetric X-ray CT images". IEEE Transactions on Medical Imaging 20(6):490-498 (2001).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils import MetaKeys, SpaceKeys, TransformBackends
from monai.utils.type_conversion import convert_to_dst_type

from monai_ext.transforms.lung import BACKENDS, check_threshold_kwargs, lung_mask, resolve_backend

__all__ = ["LungMask"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class LungMask(Transform):
    """Lung mask of a channel-first CT volume in HU, on the input's grid.

    Backends: ``"lungmask"``, the lungmask U-Net R231 (Hofmanninger et al. 2020) from a local
    weights file (``weights_path``, else ``$CTSEVERITY_LUNGMASK_WEIGHTS``, else
    ``torch.hub.get_dir()/checkpoints/unet_r231-d5d2fc3d.pth``; never downloaded); ``"unet"``, the
    project's own small lung U-Net (:mod:`monai_ext.transforms.lung_net`; ``net_path``, else
    ``$CTSEVERITY_LUNG_NET``, else the bundle's ``models/lung_net.pt`` registered by ``pipelines``);
    ``"threshold"``, a classical 3D threshold method needing no weights (Hu et al. 2001, see
    :func:`monai_ext.transforms.lung.threshold_lung_mask`); ``"auto"`` (default): ``lungmask`` when
    its weights are on disk, else ``unet`` when its weights are found, else ``threshold`` with one
    logged warning per process.

    The input is a ``MetaTensor`` of shape (1, X, Y, Z) as ``LoadImage(ensure_channel_first=True)``
    returns it: array axes in ITK index order and a RAS affine (an LPS affine is accepted when the
    meta data says ``space: LPS``). The affine gives the voxel spacing and which array axes are
    left/right, anterior/posterior and superior/inferior. A plain array or tensor is taken to have an
    identity affine (1 mm voxels, RAS axes).

    Args:
        backend: ``"auto"``, ``"lungmask"``, ``"unet"`` or ``"threshold"``.
        weights_path: lungmask R231 weights file (``lungmask``/``auto``).
        net_path: the project's lung U-Net weights, ``lung_net.pt`` (``unet``/``auto``).
        split_lr: label the right lung 1 and the left lung 2 (lungmask's convention) instead of both 1.
        device: torch device for the U-Net (``None``: CUDA when available, ``"cpu"`` forces the CPU).
        batch_size: slices per U-Net forward pass.
        min_lung_ml: less lung than this raises :class:`~monai_ext.errors.NoLungFoundError`.
        **threshold_kwargs: further parameters of the threshold method (``air_hu``, ``body_hu``,
            ``airway_hu``, ``max_airway_ml``, ``working_mm``, ``closing_mm``, ``fill_lesions``:
            ``True`` by default, adds the dense lesions that an air threshold misses).

    Returns:
        A ``uint8`` ``MetaTensor`` (1, X, Y, Z) with the input's affine and meta data: 0 background,
        1 lung (or 1 right, 2 left).

    Raises:
        ValueError: on an unknown backend or an input that is not (1, X, Y, Z).
        TypeError: on an unknown threshold parameter.
        LungMaskWeightsError: when ``backend="lungmask"`` and the weights are not on disk, or an
            explicit ``weights_path`` does not exist (raised when the transform is built).
        LungNetWeightsError: the same for ``backend="unet"`` and ``net_path``.
        NoLungFoundError: when no lung is found in the volume (naming ``filename_or_obj``).

    Example:
        >>> from monai.transforms import LoadImage
        >>> from monai_ext.transforms import LungMask
        >>> ct = LoadImage(image_only=True, ensure_channel_first=True)("chest.nii.gz")  # doctest: +SKIP
        >>> lung = LungMask(backend="threshold")(ct)  # doctest: +SKIP
        >>> lung.shape, lung.dtype  # doctest: +SKIP
        (torch.Size([1, 512, 512, 141]), torch.uint8)
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        backend: str = "auto",
        weights_path: str | os.PathLike | None = None,
        net_path: str | os.PathLike | None = None,
        split_lr: bool = False,
        device: str | None = None,
        batch_size: int = 20,
        min_lung_ml: float = 100.0,
        **threshold_kwargs: float,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown lung mask backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        check_threshold_kwargs({"min_lung_ml": min_lung_ml, **threshold_kwargs})
        if backend in ("lungmask", "unet") or (backend == "auto" and (weights_path or net_path) is not None):
            resolve_backend(backend, weights_path, net_path)  # fail early when asked-for weights are not on disk
        # ``self.backend`` is MONAI's list of array backends, so the method lives in ``lung_backend``
        self.lung_backend = backend
        self.weights_path = weights_path
        self.net_path = net_path
        self.split_lr = bool(split_lr)
        self.device = device
        self.batch_size = int(batch_size)
        self.min_lung_ml = float(min_lung_ml)
        self.threshold_kwargs = dict(threshold_kwargs)

    def __call__(self, img: NdarrayOrTensor) -> MetaTensor:
        """Compute the lung mask of ``img`` (1, X, Y, Z) in HU; see the class docstring."""
        if isinstance(img, MetaTensor):
            image = img
        else:
            image = MetaTensor(img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img)))
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"LungMask expects a channel-first volume of shape (1, X, Y, Z), got {tuple(image.shape)}")
        affine = np.asarray(image.affine.detach().cpu().numpy() if image.affine is not None else np.eye(4))
        if str(image.meta.get(MetaKeys.SPACE, SpaceKeys.RAS)) == str(SpaceKeys.LPS):
            affine = _LPS_TO_RAS @ affine
        spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        volume = image.detach().cpu().numpy()[0]
        mask = lung_mask(
            volume,
            spacing,
            affine=affine,
            backend=self.lung_backend,
            weights_path=self.weights_path,
            net_path=self.net_path,
            split_lr=self.split_lr,
            name=image.meta.get("filename_or_obj"),
            device=self.device,
            batch_size=self.batch_size,
            min_lung_ml=self.min_lung_ml,
            **self.threshold_kwargs,
        )
        out, *_ = convert_to_dst_type(mask[None], image, dtype=torch.uint8)
        return out
