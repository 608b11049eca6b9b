"""The DICOM Segmentation of a study: a lung segment and a lesion segment on the source slices.

Both segments are BINARY (they overlap: every lesion voxel is a lung voxel). Frame ``k`` of a segment is
source image ``k`` (or, for an enhanced multi-frame CT source, its frame ``k + 1``, referenced by its frame
number); highdicom takes each frame's position, orientation and pixel spacing from its source
image and references it (Derivation Image and Source Image sequences), so the frames map back onto the
source slices exactly. Empty frames are left out. The lesion segment's description names the method and the
lesion threshold; the algorithm parameters hold them too, with the model's checksum.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from pipelines import __version__
from pipelines.dicom import codes
from pipelines.dicom.source import new_series

__all__ = ["lung_lesion_segmentation", "lesion_description", "LUNG_SEGMENT", "LESION_SEGMENT"]

#: segment numbers
LUNG_SEGMENT = 1
LESION_SEGMENT = 2


def lesion_description(method: str, settings: dict) -> str:
    """The lesion segment's Segment Description: how the lesion mask was made (method, threshold, rule)."""
    if method == "density":
        text = (f"ct-severity lesion mask: lung voxels at least {settings.get('density_delta_hu')} HU above the "
                "study's normal lung level (method density, no classifier)")
    else:
        text = (f"ct-severity lesion mask: {method} heatmap above threshold {settings.get('threshold')} "
                f"(study-normalized), lesion rule {settings.get('lesion_rule')}")
        if settings.get("density_delta_hu") is not None:
            text += f", density delta {settings['density_delta_hu']} HU"
    return f"{text}; components below {settings.get('min_lesion_ml')} ml removed"


def _parameters(values: dict) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def lung_lesion_segmentation(source: Sequence[Dataset], lung: np.ndarray, lesion: np.ndarray, method: str,
                             settings: dict, model_sha256: str | None, lung_backend: str,
                             series_number: int = 9001) -> hd.seg.Segmentation:
    """A DICOM Segmentation with the lung (segment 1) and the lesions (segment 2) of a study.

    Args:
        source: the source images (headers suffice): single-frame images, one per slice, in slice order, or one
            enhanced multi-frame CT image.
        lung, lesion: masks as frames (frames, rows, columns) of ``source``, one per source frame in the
            source's frame order (:func:`~pipelines.dicom.source.frames` indexed by
            :func:`~pipelines.dicom.source.source_headers`' slice of each frame).
        method: the attribution method (or ``density``).
        settings: the lesion settings of the run: ``threshold``, ``lesion_rule``, ``min_lesion_ml``,
            ``density_delta_hu``, ``study_call`` (as in ``result.json``).
        model_sha256: checksum of the classifier (None for ``density``).
        lung_backend: the lung mask backend asked for (``auto``, ``threshold``, ...).
        series_number: Series Number of the SEG.

    Returns:
        The segmentation (a pydicom dataset).

    Raises:
        ValueError: masks that do not match the source images.
    """
    n_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in source)
    shape = (n_frames, int(source[0].Rows), int(source[0].Columns))
    for name, mask in (("lung", lung), ("lesion", lesion)):
        if mask.shape != shape:
            raise ValueError(f"{name} mask has shape {mask.shape}; the source images give {shape}")
    family = codes.AI_FAMILY
    lung_algo = hd.AlgorithmIdentificationSequence(
        name="ct-severity lung mask", family=family, version=__version__,
        parameters=_parameters({"lung_mask": lung_backend}))
    lesion_algo = hd.AlgorithmIdentificationSequence(
        name=f"ct-severity {method}", family=family, version=__version__,
        parameters=_parameters({"method": method, "model_sha256": model_sha256, **settings}))
    lung_desc = hd.seg.SegmentDescription(
        segment_number=LUNG_SEGMENT, segment_label="Lung", segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.LUNG, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=lung_algo, tracking_id="lung", tracking_uid=hd.UID())
    lung_desc.SegmentDescription = f"ct-severity lung mask ({lung_backend} backend)"
    lesion_desc = hd.seg.SegmentDescription(
        segment_number=LESION_SEGMENT, segment_label="Lesion", segmented_property_category=codes.ABNORMAL_STRUCTURE,
        segmented_property_type=codes.LESION, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=lesion_algo, tracking_id="lesion", tracking_uid=hd.UID(),
        anatomic_regions=[codes.LUNG])
    lesion_desc.SegmentDescription = lesion_description(method, settings)[:1024]
    lung_desc.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(60.0, -20.0, -40.0).value)
    lesion_desc.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(55.0, 70.0, 50.0).value)
    pixels = np.stack([np.asarray(lung, dtype=bool), np.asarray(lesion, dtype=bool)], axis=-1)
    return hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[lung_desc, lesion_desc],
        manufacturer_model_name=f"ct-severity {method}"[:64],
        device_serial_number=(model_sha256 or "none")[:16],
        content_label="CTSEVERITY",
        content_description=f"Lung and lesions ({method})"[:64],
        omit_empty_frames=True,
        **new_series(series_number, f"ct-severity lung and lesions ({method})"),
    )
