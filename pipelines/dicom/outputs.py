"""Writing a study's DICOM outputs: a Segmentation, a measurement report SR and the overview figure as a
Secondary Capture, in ``<study>/dicom/``.

For a DICOM series input they join the source study (its patient, study and frame-of-reference) and refer
to the source series; a PACS stores them beside it. For other inputs (on request) a CT series of the input
grid with generated UIDs is written to ``dicom/ct/`` first and the SEG and SR refer to it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from monai_ext.errors import CTSeverityError
from monai_ext.io import atomic_path
from monai_ext.io.writer import reference_grid, to_reference_grid
from pipelines.dicom.sc import overview_capture
from pipelines.dicom.seg import lung_lesion_segmentation
from pipelines.dicom.source import OffGridError, ct_series_from_grid, frames, source_headers, write_series
from pipelines.dicom.sr import measurement_report

__all__ = ["study_dicom_outputs", "write_dicom_outputs", "is_dicom_input", "DICOM_DIR", "SETTING_KEYS"]

log = logging.getLogger(__name__)

#: folder of the DICOM outputs inside a study's output folder
DICOM_DIR = "dicom"

#: the lesion settings of ``result.json`` that go into the SEG and SR
SETTING_KEYS = ("threshold", "lesion_rule", "min_lesion_ml", "density_delta_hu", "slice_gate", "study_call")


def is_dicom_input(path: str | os.PathLike, meta: dict) -> bool:
    """Whether a study was read from a DICOM series (a folder the reader took a series from)."""
    return Path(path).is_dir() and "ctseverity|series_uid" in meta


def study_dicom_outputs(study_dir: str | os.PathLike, path: str | os.PathLike, ct, lung: np.ndarray,
                        lesion: np.ndarray, result: dict, lung_backend: str, required: bool = False) -> dict[str, str]:
    """The DICOM outputs of a study as the pipeline asks for them (:func:`write_dicom_outputs`).

    With ``required`` (``--dicom-out``) they are written for any input, and a failure fails the study. Without
    it they are written for DICOM series inputs; a series whose headers lack what the SEG needs (a frame of
    reference) then gets none, with a warning (logged, and in ``result["warnings"]`` where the result keeps
    warnings): the study's other results stand. A series the reader resampled (a gantry tilt corrected, slices
    put on an even step: its images do not lie on the grid the masks are on) gets its SR and overview but no
    SEG, with a warning saying why, whether required or not (:func:`write_dicom_outputs`).
    """
    if not required and not is_dicom_input(path, ct.meta):
        return {}
    try:
        return write_dicom_outputs(study_dir, path, ct, lung, lesion, result, lung_backend)
    except (CTSeverityError, ValueError, AttributeError, KeyError) as exc:  # also source headers highdicom refuses
        reason = exc.reason if isinstance(exc, CTSeverityError) else f"{type(exc).__name__}: {exc}"
        if required:
            raise CTSeverityError(f"cannot write the DICOM outputs ({reason})", path) from exc
        _warn(result, f"no DICOM outputs: {reason}")
        return {}


def _warn(result: dict, message: str) -> None:
    """Log a warning about a study's DICOM outputs and keep it in its result (where the result keeps warnings;
    results.csv joins them with '; ', so a warning holds none)."""
    message = message.replace("; ", ", ")
    log.warning("%s: %s", result.get("study"), message)
    if isinstance(result.get("warnings"), list):
        result["warnings"].append(message)


def write_dicom_outputs(study_dir: str | os.PathLike, path: str | os.PathLike, ct, lung: np.ndarray,
                        lesion: np.ndarray, result: dict, lung_backend: str) -> dict[str, str]:
    """Write ``dicom/seg.dcm``, ``dicom/sr.dcm``, ``dicom/overview.dcm`` (the overview figure as a Secondary
    Capture, when the study has one) and, for inputs that are not DICOM, ``dicom/ct/``.

    Args:
        study_dir: the study's output folder.
        path: the study's input (DICOM folder or image file).
        ct: the CT as the pipeline loaded it (MetaTensor on the processing grid, input grid in its metadata).
        lung, lesion: masks on the processing grid (same grid as ``ct``).
        result: the study's result (``result.json`` content so far: method, model, grade, volumes, settings).
        lung_backend: the lung mask backend of the run.

    A DICOM series the reader resampled (:class:`~pipelines.dicom.source.OffGridError`: a gantry tilt corrected,
    slices put on an even step) gets no SEG: its masks lie on the resampled grid, between the source pixels or
    slices, and a SEG on the source images would hold a second resampling of them, not the masks the figures were
    measured on. Its SR (measurement groups without a segment, TID 1501) and overview are written, and a warning
    gives the reason.

    Returns:
        The outputs written, relative to ``study_dir`` (keys ``dicom_seg``, ``dicom_sr``, ``dicom_overview``,
        ``dicom_ct``).

    Raises:
        CTSeverityError: a DICOM input whose files are not images of the grid read.
    """
    sdir = Path(study_dir)
    meta = ct.meta
    grid = reference_grid(meta)
    affine = ct.affine

    def on_input_grid(volume: np.ndarray) -> np.ndarray:
        return to_reference_grid(volume, grid, affine=affine)

    outputs: dict[str, str] = {}
    off_grid: OffGridError | None = None
    if is_dicom_input(path, meta):
        try:
            source, indices = source_headers(path, meta["ctseverity|series_uid"], grid)
        except OffGridError as exc:
            if not exc.headers:
                raise
            off_grid, source, indices = exc, exc.headers, []
    else:
        hu = on_input_grid(np.asarray(ct[0], dtype=np.float32))
        source = ct_series_from_grid(hu, grid, description=f"ct-severity input {result.get('study', '')}")
        indices = list(range(grid.shape[2]))
        folder = sdir / DICOM_DIR / "ct"
        _write_folder(source, folder)
        outputs["dicom_ct"] = f"{DICOM_DIR}/ct"
    settings = {k: result.get(k) for k in SETTING_KEYS}
    sha = (result.get("model") or {}).get("sha256")
    seg = None
    if off_grid is not None:
        _warn(result, f"no DICOM SEG: {off_grid.reason}; the DICOM SR and overview were written")
    else:
        lung_frames = frames(on_input_grid(lung.astype(np.uint8)))
        lesion_frames = frames(on_input_grid(lesion.astype(np.uint8)))
        missing = sorted(set(range(grid.shape[2])) - set(indices))
        if missing:
            _warn(result, f"{len(missing)} slice(s) filled in by the reader have no source image: the DICOM SEG "
                          f"leaves out their {int(lung_frames[missing].sum())} lung and "
                          f"{int(lesion_frames[missing].sum())} lesion voxels")
        seg = lung_lesion_segmentation(source, lung_frames[indices], lesion_frames[indices], str(result["method"]),
                                       settings, sha, lung_backend)
    sr = measurement_report(source, seg, result, settings)
    written = [*([] if seg is None else [("dicom_seg", "seg.dcm", seg)]), ("dicom_sr", "sr.dcm", sr)]
    overview = (result.get("outputs") or {}).get("overview")
    if overview and (sdir / overview).is_file():
        written.append(("dicom_overview", "overview.dcm", overview_capture(source, sdir / overview,
                                                                          str(result["method"]))))
    for key, name, ds in written:
        with atomic_path(sdir / DICOM_DIR / name) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        outputs[key] = f"{DICOM_DIR}/{name}"
    log.debug("DICOM outputs of %s: %s", result.get("study"), ", ".join(outputs.values()))
    return outputs


def _write_folder(datasets, folder: Path) -> None:
    """Write a series into ``folder`` atomically: a temporary folder beside it, then a rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_series(datasets, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not any(folder.iterdir()):
        raise CTSeverityError("no slice written", folder)
