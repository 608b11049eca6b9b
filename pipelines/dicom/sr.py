"""The DICOM Structured Report of a study: a TID 1500 measurement report of the lung and lesion segments.

One Comprehensive 3D SR with two volumetric measurement groups (TID 1411), each referring to its segment of
the study's DICOM Segmentation and, through it, to the source series:

- lung: lung volume (ml);
- lesion: lesion volume (ml), lesion share of the lung volume (%), number of lesion components, and the
  severity grade CT-0..CT-4 as a qualitative evaluation.

When the study has no DICOM Segmentation (a series the reader resampled, so that no SEG can refer to its
images exactly: ``docs/dicom_outputs.md``), the two groups are measurement groups without a region (TID 1501)
with the same measurements, and the evidence is the source series.

Each group names the algorithm (TID 4019: ct-severity, its version, and as parameters the method, the model
checksum and the lesion settings); the observation context names ct-severity as the observing device.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from pipelines import __version__
from pipelines.dicom import codes
from pipelines.dicom.seg import LESION_SEGMENT, LUNG_SEGMENT
from pipelines.dicom.source import new_series

__all__ = ["measurement_report", "algorithm_parameters", "DEVICE_UID"]

#: the observing device's UID: ct-severity of this version, the same in every report (a UUID-derived UID)
DEVICE_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'ct-severity {__version__}').int}"


def algorithm_parameters(method: str, model_sha256: str | None, settings: dict) -> list[str]:
    """The Algorithm Parameter items: ``method=...``, ``model_sha256=...`` and the lesion settings."""
    values = {"method": method, "model_sha256": model_sha256, **settings}
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def measurement_report(source: Sequence[Dataset], segmentation: Dataset | None, result: dict, settings: dict,
                       series_number: int = 9002) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report of a study's lung and lesion segments.

    Args:
        source: the source images (headers suffice) the segmentation was made on.
        segmentation: the study's DICOM Segmentation (:func:`~pipelines.dicom.seg.lung_lesion_segmentation`);
            ``None`` when it has none: the groups then refer to no segment (TID 1501).
        result: the study's result: ``method``, ``model`` (``sha256``), ``grade``, ``lesion_percent``,
            ``lung_volume_ml``, ``lesion_volume_ml``, ``n_lesions`` (as in ``result.json``).
        settings: the lesion settings (threshold, rule, minimum volume, ...), as algorithm parameters.
        series_number: Series Number of the SR.

    Returns:
        The SR document (a pydicom dataset).
    """
    method = str(result["method"])
    sha = (result.get("model") or {}).get("sha256")
    algorithm = hd.sr.AlgorithmIdentification(name="ct-severity", version=__version__,
                                              parameters=algorithm_parameters(method, sha, settings))
    device = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID,
            name="ct-severity", manufacturer_name="ct-severity developers",
            model_name=f"ct-severity {method}"[:64]))
    lung_measurements = [hd.sr.Measurement(name=codes.VOLUME, value=float(result["lung_volume_ml"]),
                                           unit=codes.MILLILITER)]
    lesion_measurements = [
        hd.sr.Measurement(name=codes.VOLUME, value=float(result["lesion_volume_ml"]), unit=codes.MILLILITER),
        hd.sr.Measurement(name=codes.LESION_SHARE, value=float(result["lesion_percent"]), unit=codes.PERCENT),
        hd.sr.Measurement(name=codes.LESION_COUNT, value=float(result["n_lesions"]), unit=codes.COUNT_UNIT),
    ]
    grade = [hd.sr.QualitativeEvaluation(name=codes.SEVERITY_GRADE, value=codes.grade_code(str(result["grade"])))]
    if segmentation is None:
        lung_group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="lung"),
            finding_type=codes.LUNG, algorithm_id=algorithm, measurements=lung_measurements)
        lesion_group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="lesion"),
            finding_type=codes.LESION, finding_sites=[hd.sr.FindingSite(codes.LUNG)], algorithm_id=algorithm,
            measurements=lesion_measurements, qualitative_evaluations=grade)
    else:
        source_series = hd.sr.SourceSeriesForSegmentation(source[0].SeriesInstanceUID)

        def segment(number: int) -> hd.sr.ReferencedSegment:
            return hd.sr.ReferencedSegment(sop_class_uid=segmentation.SOPClassUID,
                                           sop_instance_uid=segmentation.SOPInstanceUID, segment_number=number,
                                           source_series=source_series)

        lung_group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="lung"),
            referenced_segment=segment(LUNG_SEGMENT), finding_type=codes.LUNG, algorithm_id=algorithm,
            measurements=lung_measurements)
        lesion_group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="lesion"),
            referenced_segment=segment(LESION_SEGMENT), finding_type=codes.LESION,
            finding_sites=[hd.sr.FindingSite(codes.LUNG)], algorithm_id=algorithm,
            measurements=lesion_measurements, qualitative_evaluations=grade)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.CT_CHEST,
        imaging_measurements=[lung_group, lesion_group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*source, *([] if segmentation is None else [segmentation])],
        content=report,
        is_complete=True,
        coding_schemes=[codes.scheme_identification()],
        **new_series(series_number, f"ct-severity measurements ({method})"),
    )
