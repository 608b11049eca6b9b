"""Reusable MONAI-style components for weakly supervised lesion quantification in chest CT.

Nothing in this package knows about studies, batches of studies or dask: it holds readers and
writers, transforms, attribution methods, metrics, ignite handlers, networks and synthetic data.
"""

from __future__ import annotations

from monai_ext.errors import (
    CorruptImageError,
    CTSeverityError,
    DamagedImageError,
    InputNotFoundError,
    InputTooLargeError,
    ModelChecksumError,
    NoDicomSeriesError,
    NoLungFoundError,
    NotAnImageError,
    NotAVolumeError,
    NotCTError,
    StudyTimeoutError,
    UntrustedBundleError,
)

__all__ = [
    "CTSeverityError",
    "InputNotFoundError",
    "NotAnImageError",
    "CorruptImageError",
    "NotAVolumeError",
    "NotCTError",
    "NoDicomSeriesError",
    "NoLungFoundError",
    "ModelChecksumError",
    "DamagedImageError",
    "InputTooLargeError",
    "StudyTimeoutError",
    "UntrustedBundleError",
]
