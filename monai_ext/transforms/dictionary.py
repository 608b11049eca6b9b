"""Dictionary transforms (MONAI style) wrapping the array transforms of :mod:`monai_ext.transforms.array`.

References:
    - Hofmanninger J et al. "Automatic lung segmentation in routinely acquired thoracic CT scans:
      a deep learning approach". European Radiology Experimental 4, 50 (2020).
    - Hu S, Hoffman EA, Reinhardt JM. "Automatic lung segmentation for accurate quantitation of
      volumetric X-ray CT images". IEEE Transactions on Medical Imaging 20(6):490-498 (2001).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from monai_ext.transforms.array import LungMask

__all__ = ["LungMaskd", "LungMaskD", "LungMaskDict"]


class LungMaskd(MapTransform):
    """Dictionary wrapper of :class:`~monai_ext.transforms.array.LungMask`.

    Args:
        keys: keys of the CT images (channel-first ``MetaTensor`` in HU) to mask.
        backend: ``"auto"``, ``"lungmask"``, ``"unet"`` or ``"threshold"`` (see :class:`LungMask`).
        weights_path: lungmask R231 weights file.
        net_path: the project's lung U-Net weights (``lung_net.pt``).
        split_lr: label the right lung 1 and the left lung 2 (lungmask's convention) instead of both 1.
        output_keys: where to store each mask, one key per entry of ``keys``; ``None`` replaces the
            image with its mask (MONAI's usual in-place convention).
        device: torch device for the U-Net.
        batch_size: slices per U-Net forward pass.
        min_lung_ml: less lung than this raises :class:`~monai_ext.errors.NoLungFoundError`.
        allow_missing_keys: do not raise when a key is absent.
        **threshold_kwargs: further parameters of the threshold method.

    Returns:
        The data dictionary with the ``uint8`` lung masks added (or in place of the images).

    Raises:
        ValueError: on an unknown backend, or when ``output_keys`` and ``keys`` differ in length.
        LungMaskWeightsError: when ``backend="lungmask"`` and the weights are not on disk.
        NoLungFoundError: when no lung is found in an image.

    Example:
        >>> from monai.transforms import Compose, LoadImaged
        >>> from monai_ext.transforms import LungMaskd
        >>> chain = Compose([LoadImaged("image", ensure_channel_first=True),
        ...                  LungMaskd("image", output_keys="lung", backend="threshold")])
        >>> data = chain({"image": "chest.nii.gz"})  # doctest: +SKIP
        >>> data["lung"].shape  # doctest: +SKIP
        torch.Size([1, 512, 512, 141])
    """

    backend = LungMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        backend: str = "auto",
        weights_path: str | os.PathLike | None = None,
        net_path: str | os.PathLike | None = None,
        split_lr: bool = False,
        output_keys: KeysCollection | None = None,
        device: str | None = None,
        batch_size: int = 20,
        min_lung_ml: float = 100.0,
        allow_missing_keys: bool = False,
        **threshold_kwargs: float,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = self.keys if output_keys is None else ensure_tuple(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys {self.output_keys} must give one key per entry of keys {self.keys}")
        self.masker = LungMask(
            backend=backend,
            weights_path=weights_path,
            net_path=net_path,
            split_lr=split_lr,
            device=device,
            batch_size=batch_size,
            min_lung_ml=min_lung_ml,
            **threshold_kwargs,
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Add the lung mask of each image key to a copy of ``data``."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.masker(d[key])
        return d


LungMaskD = LungMaskDict = LungMaskd
