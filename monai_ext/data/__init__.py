"""Synthetic and semi-synthetic chest CT with ground truth.

- :mod:`~monai_ext.data.synthetic`: a procedural chest CT phantom in HU with lung labels;
- :mod:`~monai_ext.data.lesions`: COVID-19-like lesions inserted into any CT with a lung mask,
  reaching a requested share of the lung volume;
- :mod:`~monai_ext.data.studies`: sets of studies written as NIfTI with ``truth.csv``, and the
  severity grade of a lesion percentage;
- :mod:`~monai_ext.data.lesion_stats`: statistics of lesion masks (counts, sizes, location,
  density, texture) to compare real annotations with generated lesions.
"""

from __future__ import annotations

from monai_ext.data.lesion_stats import (
    BILATERAL_MIN_SHARE,
    SUBPLEURAL_MM,
    axis_codes,
    component_sizes,
    ggo_texture,
    half_share,
    hu_by_label,
    in_plane_boundary_distance,
    resample_slices,
    side_shares,
    slice_statistics,
    study_statistics,
    subpleural_share,
)
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
    "SUBPLEURAL_MM",
    "BILATERAL_MIN_SHARE",
    "axis_codes",
    "resample_slices",
    "component_sizes",
    "in_plane_boundary_distance",
    "subpleural_share",
    "half_share",
    "side_shares",
    "hu_by_label",
    "ggo_texture",
    "study_statistics",
    "slice_statistics",
]
