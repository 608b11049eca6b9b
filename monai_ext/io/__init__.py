"""Reading CT with its geometry and writing results back on the input grid."""

from __future__ import annotations

from monai_ext.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, is_disk_full
from monai_ext.io.checks import InputReport, default_max_memory, lung_extent_warnings, parse_memory
from monai_ext.io.ct import MIN_INPLANE, MIN_SLICES, load_ct, read_ct, validate_ct
from monai_ext.io.dicom_select import SeriesInfo, choose_series, kernel_class, scan_dicom_folder
from monai_ext.io.isolate import call_in_child, can_isolate
from monai_ext.io.reader import SUPPORTED_SUFFIXES, SITKReader, dicom_series, read_sitk_image
from monai_ext.io.writer import ReferenceGrid, reference_grid, to_reference_grid, write_like

__all__ = [
    "SITKReader",
    "SUPPORTED_SUFFIXES",
    "read_sitk_image",
    "dicom_series",
    "scan_dicom_folder",
    "choose_series",
    "kernel_class",
    "SeriesInfo",
    "load_ct",
    "read_ct",
    "InputReport",
    "default_max_memory",
    "parse_memory",
    "lung_extent_warnings",
    "validate_ct",
    "MIN_SLICES",
    "MIN_INPLANE",
    "ReferenceGrid",
    "reference_grid",
    "to_reference_grid",
    "write_like",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "is_disk_full",
    "call_in_child",
    "can_isolate",
]
