"""DICOM outputs of a study: a DICOM Segmentation (lung and lesion segments), a TID 1500 measurement report
(Comprehensive 3D SR), written with highdicom and referring to the source series slice by slice, and the
overview figure as a Secondary Capture. PACS access over DICOMweb (:mod:`~pipelines.dicom.dicomweb`,
:mod:`~pipelines.dicom.pacs`): studies pulled, the series to grade chosen as in a DICOM folder,
results pushed back; patient identifiers kept out of the other outputs (:mod:`~pipelines.dicom.privacy`).

See ``docs/dicom_outputs.md`` and ``docs/pacs.md``.
"""

from __future__ import annotations

from pipelines.dicom.codes import SCHEME, grade_code
from pipelines.dicom.dicomweb import DicomwebError, connect, credentials, is_dicomweb_url, server_url
from pipelines.dicom.outputs import (
    DICOM_DIR,
    is_dicom_input,
    study_dicom_outputs,
    write_dicom_outputs,
)
from pipelines.dicom.pacs import choose_study_series, pull_study, run_pacs, store_study
from pipelines.dicom.privacy import RedactIdentifiers, identifier_strings, patient_identifiers, redacting
from pipelines.dicom.sc import overview_capture
from pipelines.dicom.seg import LESION_SEGMENT, LUNG_SEGMENT, lesion_description, lung_lesion_segmentation
from pipelines.dicom.source import (
    MANUFACTURER,
    OffGridError,
    ct_series_from_grid,
    frames,
    source_headers,
    write_series,
)
from pipelines.dicom.sr import algorithm_parameters, measurement_report

__all__ = [
    "DICOM_DIR",
    "DicomwebError",
    "RedactIdentifiers",
    "choose_study_series",
    "connect",
    "credentials",
    "identifier_strings",
    "is_dicomweb_url",
    "patient_identifiers",
    "pull_study",
    "redacting",
    "run_pacs",
    "server_url",
    "store_study",
    "LESION_SEGMENT",
    "LUNG_SEGMENT",
    "MANUFACTURER",
    "OffGridError",
    "SCHEME",
    "algorithm_parameters",
    "ct_series_from_grid",
    "frames",
    "grade_code",
    "is_dicom_input",
    "lesion_description",
    "lung_lesion_segmentation",
    "measurement_report",
    "overview_capture",
    "source_headers",
    "study_dicom_outputs",
    "write_dicom_outputs",
    "write_series",
]
