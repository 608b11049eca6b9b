"""Project exceptions.

Every error caused by user input derives from :class:`CTSeverityError` and carries the input it
concerns, so that the command line can print one line naming the input and the reason.
"""

from __future__ import annotations

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


class CTSeverityError(Exception):
    """Base class of the errors ct-severity reports to its users.

    Args:
        message: what is wrong, in words a user can act on.
        path: the input concerned (file, folder, bundle), if any.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def __reduce__(self):
        """Pickle with the reason and path apart (an error raised in another process keeps both)."""
        return self.__class__, (self.reason, self.path), self.__dict__


class InputNotFoundError(CTSeverityError, FileNotFoundError):
    """The input path does not exist."""


class NotAnImageError(CTSeverityError, ValueError):
    """The input exists but is not a readable medical image (or a folder without one)."""


class CorruptImageError(CTSeverityError, ValueError):
    """The input looks like an image file but cannot be decoded (truncated, damaged)."""


class NotAVolumeError(CTSeverityError, ValueError):
    """The image is not a 3D volume (a 2D image, a single slice, a 4D series)."""


class NotCTError(CTSeverityError, ValueError):
    """The intensities are not in Hounsfield units of a CT scan."""


class NoDicomSeriesError(CTSeverityError, ValueError):
    """A folder holds no DICOM series (or not the series asked for)."""


class NoLungFoundError(CTSeverityError, ValueError):
    """No lung could be segmented in the volume."""


class ModelChecksumError(CTSeverityError, ValueError):
    """A model file does not match the checksum recorded beside it."""


class DamagedImageError(CTSeverityError, ValueError):
    """The voxels are too damaged to repair without changing the result (NaN/inf voxels, missing or
    conflicting slices, a header that disagrees with the data)."""


class InputTooLargeError(CTSeverityError, ValueError):
    """The header declares an image that does not fit the file or the memory budget."""


class StudyTimeoutError(CTSeverityError, TimeoutError):
    """A study ran past its time limit."""


class UntrustedBundleError(CTSeverityError, ValueError):
    """A bundle that is not trusted asks for more than model weights and an allowed network
    (another ``_target_``, a ``$`` expression, a reference): it could run code."""
