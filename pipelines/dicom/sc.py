"""The study's overview figure as a DICOM Secondary Capture image, so that a PACS shows it beside the study.

The overview (``overview.png``: axial slices with lung contours, heatmap and lesion contours, see
:func:`pipelines.figures.overview_png`) is stored as one RGB Secondary Capture image in the source study. Its
slices are shown as radiologists read them (anterior up, the patient's left on the right), which the Patient
Orientation ``L\\P`` states.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.dicom.source import new_series

__all__ = ["overview_capture"]


def overview_capture(source: Sequence[Dataset], png: str | os.PathLike, method: str,
                     series_number: int = 9003) -> hd.sc.SCImage:
    """The overview figure ``png`` as an RGB Secondary Capture image in the study of ``source``.

    Args:
        source: the source images (headers suffice); the capture joins their study.
        png: the overview figure.
        method: the attribution method, named in the Series Description.
        series_number: Series Number of the capture.
    """
    rgb = np.asarray(Image.open(png).convert("RGB"))
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source[0],
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **new_series(series_number, f"ct-severity overview ({method})"),
    )
    capture.BodyPartExamined = str(source[0].get("BodyPartExamined") or "CHEST")  # an unpaired part: no laterality
    return capture
