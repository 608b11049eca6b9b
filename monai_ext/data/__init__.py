"""Synthetic and semi-synthetic chest CT with ground truth.

- :mod:`~monai_ext.data.synthetic`: a procedural chest CT phantom in HU with lung labels;
- :mod:`~monai_ext.data.lesions`: COVID-19-like lesions inserted into any CT with a lung mask,
  reaching a requested share of the lung volume;
- :mod:`~monai_ext.data.studies`: sets of studies written as NIfTI with ``truth.csv``, and the
  severity grade of a lesion percentage.
"""

from __future__ import annotations

from monai_ext.data.lesions import CONSOLIDATION_HU, GGO_HU, LESION_KINDS, insert_lesions
from monai_ext.data.studies import (
    GRADES,
    TRUTH_COLUMNS,
    SynthStudy,
    grade_from_percent,
    insert_lesions_oriented,
    study_name,
    write_studies,
)
from monai_ext.data.synthetic import ANATOMY_OPTIONS, SyntheticCT, phantom_affine, synthetic_chest_ct

__all__ = [
    "SyntheticCT",
    "synthetic_chest_ct",
    "phantom_affine",
    "ANATOMY_OPTIONS",
    "insert_lesions",
    "LESION_KINDS",
    "GGO_HU",
    "CONSOLIDATION_HU",
    "insert_lesions_oriented",
    "grade_from_percent",
    "GRADES",
    "TRUTH_COLUMNS",
    "SynthStudy",
    "study_name",
    "write_studies",
]
