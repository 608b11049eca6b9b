"""Coded concepts of ct-severity's DICOM outputs: standard codes (SNOMED CT, DCM, LOINC, UCUM) where one
fits, and the project's local coding scheme ``99CTSEV`` (declared in each SR's Coding Scheme Identification)
for what no standard code names: the lesion share of the lung, the lesion count, the severity grade."""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

__all__ = ["SCHEME", "AI_FAMILY", "LUNG", "LESION", "ANATOMICAL_STRUCTURE", "ABNORMAL_STRUCTURE", "VOLUME",
           "LESION_SHARE", "LESION_COUNT", "SEVERITY_GRADE", "CT_CHEST", "MILLILITER", "PERCENT", "COUNT_UNIT",
           "grade_code", "scheme_identification"]

#: the project's local coding scheme designator (local schemes start with "99")
SCHEME = "99CTSEV"

#: algorithm family of every ct-severity algorithm
AI_FAMILY = codes.DCM.ArtificialIntelligence
LUNG = codes.SCT.Lung
LESION = codes.SCT.Lesion
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure
ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure
VOLUME = codes.SCT.Volume
CT_CHEST = CodedConcept("24627-2", "LN", "CT Chest")
MILLILITER = CodedConcept("ml", "UCUM", "milliliter")
PERCENT = CodedConcept("%", "UCUM", "percent")
COUNT_UNIT = CodedConcept("{lesions}", "UCUM", "lesions")

LESION_SHARE = CodedConcept("LESION_SHARE", SCHEME, "Lesion volume as percent of lung volume")
LESION_COUNT = CodedConcept("LESION_COUNT", SCHEME, "Number of lesion components")
SEVERITY_GRADE = CodedConcept("SEVERITY_GRADE", SCHEME, "CT severity grade (MosMedData CT-0 to CT-4)")

_GRADES = {
    "CT-0": "CT-0: no lesion",
    "CT-1": "CT-1: lesions in up to 25 % of the lung",
    "CT-2": "CT-2: lesions in 25 to 50 % of the lung",
    "CT-3": "CT-3: lesions in 50 to 75 % of the lung",
    "CT-4": "CT-4: lesions in 75 % of the lung or more",
}


def grade_code(grade: str) -> CodedConcept:
    """The coded value of a severity grade ``CT-0`` ... ``CT-4``.

    Raises:
        ValueError: not a grade.
    """
    if grade not in _GRADES:
        raise ValueError(f"unknown severity grade {grade!r}; expected one of {', '.join(_GRADES)}")
    return CodedConcept(grade, SCHEME, _GRADES[grade])


def scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item that declares :data:`SCHEME`."""
    return CodingSchemeIdentificationItem(SCHEME, name="ct-severity measurement codes",
                                          responsible_organization="ct-severity developers")
