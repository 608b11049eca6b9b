"""The per-study pipeline: one chest CT in, lung mask, heatmaps, lesion mask, severity and figures out.

load -> lung mask -> lung slices -> classifier -> attribution (class "lesion", batched over
slices) -> maps back on the CT grid, times the lung mask, slices the classifier scores negative
zeroed -> joint normalization over the study -> lesion mask (threshold, lesion rule, minimum
component volume) -> lesion % of lung volume -> CT-0..CT-4 -> outputs on the input grid.

Outputs in ``out_dir/<study>/``: ``heatmap.nii.gz`` (the study-normalized heatmap the threshold
is applied to), ``lesion_mask.nii.gz``, ``lung_mask.nii.gz``, ``overview.png``, for DICOM series inputs
(or with ``dicom_out``) ``dicom/seg.dcm`` and ``dicom/sr.dcm`` (:mod:`pipelines.dicom`) and, written last,
``result.json``: a study folder with a ``result.json`` is complete.

Damaged input is repaired with a warning or refused (:mod:`monai_ext.io.checks`); the warnings go into
``result.json`` (``warnings``). A study run inside :func:`study_time_limit` stops with a
:class:`~monai_ext.errors.StudyTimeoutError` at the first check past its limit (between stages and
between attribution batches); its input is then read in a child process that is stopped when the limit
passes, so that a reader that hangs (a decoder, a named pipe) cannot hold the study past it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from monai_ext.attribution import normalize_study
from monai_ext.errors import StudyTimeoutError
from monai_ext.io import atomic_write_text, read_ct, write_like
from monai_ext.io.checks import lung_extent_warnings
from monai_ext.transforms import LungMask
from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from pipelines import __version__
from pipelines.bundle import LoadedModel, predict_slices, study_probability
from pipelines.discovery import Study
from pipelines.methods import METHODS, make_attributor
from pipelines.severity import (
    DEFAULT_DELTA_HU,
    LESION_RULES,
    lesion_mask_from_heatmap,
    relative_attenuation,
    remove_small_components,
    severity,
)

__all__ = ["PipelineConfig", "process_study", "resolve_calibration", "is_complete", "DEFAULT_CALIBRATION", "Evidence",
           "compute_evidence", "lesion_mask", "study_time_limit", "check_time", "Prepared", "Inferred",
           "prepare_study", "infer_slices", "assemble_evidence", "write_study"]

#: used when a bundle carries no calibration
DEFAULT_CALIBRATION = {"threshold": 0.3, "min_lesion_ml": 0.5, "lesion_rule": "heatmap-relative", "slice_gate": 0.5,
                       "density_delta_hu": DEFAULT_DELTA_HU, "study_call": 0.0, "grow_mm": 0.0}


@dataclass
class PipelineConfig:
    """Settings of a severity run; ``None`` means "the bundle's calibrated value".

    Attributes:
        method: attribution method (``iba``, ``hirescam``, ``gradcam``, ``igospp``, ``lrp``) or
            ``density`` (abnormal attenuation, no classifier).
        bundle: bundle folder (``None``: the embedded bundle).
        lung_mask: lung mask backend (``auto``, ``lungmask``, ``unet``, ``threshold``).
        lung_weights: lungmask U-Net weights file.
        device: torch device.
        lesion_rule: one of :data:`pipelines.severity.LESION_RULES`.
        threshold: heatmap threshold on the study-normalized map.
        min_lesion_ml: smallest lesion component kept.
        density_delta_hu: rise above the study's normal lung level counted as abnormal (rule
            ``heatmap-relative`` and method ``density``).
        grow_mm: density rules: the lesion grows from the thresholded heatmap through the abnormal
            attenuation by up to this distance (0: the intersection only).
        slice_gate: slices whose lesion probability is below this contribute no lesion.
        study_call: a study whose probability (mean of its top 10 % slice probabilities) is below this has
            no lesion (CT-0): the classifier decides whether there is disease, the heatmap where and how
            much. 0 turns the call off; not used by ``density``.
        batch_size: slices per attribution batch.
        seed: seed for stochastic methods (IBA noise, iGOS++ noise).
        overview: write ``overview.png``.
        keep_identifiers: put the patient name, ID and birth date of a DICOM input's headers into
            ``result.json`` (``patient``) and ``results.csv``; without it no output but the DICOM ones holds them
            (:mod:`pipelines.dicom.privacy`).
        dicom_out: write a DICOM Segmentation and SR (:mod:`pipelines.dicom`): ``None`` for DICOM series
            inputs only, ``True`` for every input (a CT series with generated UIDs for the others), ``False``
            never.
        max_memory: memory budget of one study in bytes: an input whose header declares a larger
            volume is refused before it is read (``None``: no budget).
        trust_bundle: build the bundle's network with MONAI's config parser whatever its ``model.json``
            asks for (:func:`pipelines.bundle.load_model`); otherwise only an allowed plain network.
        series_uid: the DICOM series to read from a folder holding several (``--series``); ``None``: the
            axial CT series fit for the lungs (:mod:`monai_ext.io.dicom_select`).
    """

    method: str = "iba"
    bundle: str | None = None
    lung_mask: str = "auto"
    lung_weights: str | None = None
    device: str = "cpu"
    lesion_rule: str | None = None
    threshold: float | None = None
    min_lesion_ml: float | None = None
    density_delta_hu: float | None = None
    slice_gate: float | None = None
    study_call: float | None = None
    grow_mm: float | None = None
    batch_size: int = 16
    seed: int = 0
    overview: bool = True
    keep_identifiers: bool = False
    dicom_out: bool | None = None
    method_params: dict = field(default_factory=dict)
    max_memory: int | None = None
    trust_bundle: bool = False
    series_uid: str | None = None

    def validate(self) -> PipelineConfig:
        """Check the settings; raises ``ValueError`` naming the bad one."""
        if self.method not in (*METHODS, "density"):
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join((*METHODS, 'density'))}")
        if self.lung_mask not in LUNG_BACKENDS:
            raise ValueError(f"unknown lung mask backend {self.lung_mask!r}; choose one of {', '.join(LUNG_BACKENDS)}")
        if self.lesion_rule is not None and self.lesion_rule not in LESION_RULES:
            raise ValueError(f"unknown lesion rule {self.lesion_rule!r}; choose one of {', '.join(LESION_RULES)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.min_lesion_ml is not None and self.min_lesion_ml < 0:
            raise ValueError(f"minimum lesion volume must be >= 0, got {self.min_lesion_ml}")
        if self.density_delta_hu is not None and not 0.0 < self.density_delta_hu < 1500.0:
            raise ValueError(f"density delta must be between 0 and 1500 HU, got {self.density_delta_hu}")
        if self.grow_mm is not None and not 0.0 <= self.grow_mm <= 200.0:
            raise ValueError(f"lesion growth must be between 0 and 200 mm, got {self.grow_mm}")
        if self.study_call is not None and not 0.0 <= self.study_call <= 1.0:
            raise ValueError(f"study call must be in [0, 1], got {self.study_call}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"memory budget must be positive, got {self.max_memory}")
        return self

    def fingerprint(self, model_checksum: str = "") -> str:
        """Hash of everything that changes a study's results (not the device, batch size, memory budget or trust)."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("device", "batch_size", "max_memory", "trust_bundle")}
        for key in ("dicom_out", "grow_mm", "series_uid"):  # their defaults leave earlier fingerprints as they were
            if keys.get(key) is None:
                keys.pop(key, None)
        if not keys.get("keep_identifiers"):
            keys.pop("keep_identifiers", None)
        return hashlib.sha256(json.dumps([keys, model_checksum], sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_calibration(config: PipelineConfig, model: LoadedModel | None) -> dict:
    """Threshold, minimum lesion volume, lesion rule, density delta and slice gate: the run's own
    values where set, else the bundle's calibration for the method, else :data:`DEFAULT_CALIBRATION`."""
    cal = dict(DEFAULT_CALIBRATION)
    if model is not None:
        bundle_cal = model.calibration
        cal.update({k: v for k, v in bundle_cal.items() if k in cal})
        cal.update(bundle_cal.get("methods", {}).get(config.method, {}))
    for key in ("threshold", "min_lesion_ml", "lesion_rule", "slice_gate", "density_delta_hu", "study_call", "grow_mm"):
        if getattr(config, key) is not None:
            cal[key] = getattr(config, key)
    return cal


def is_complete(study_dir: str | os.PathLike, fingerprint: str | None = None) -> bool:
    """Whether a study folder holds a finished result (of the same settings, if given)."""
    path = Path(study_dir) / "result.json"
    if not path.exists():
        return False
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if res.get("status") != "ok":
        return False
    if fingerprint is not None and res.get("fingerprint") != fingerprint:
        return False
    return all((Path(study_dir) / f).exists() for f in res.get("outputs", {}).values())


_DEADLINE = threading.local()


@contextlib.contextmanager
def study_time_limit(seconds: float | None, started: float | None = None) -> Iterator[None]:
    """Limit the time of the study run inside the block (in this thread) to ``seconds`` (``None``: no limit).

    The limit is checked by :func:`check_time` between the pipeline's stages and attribution batches, so
    a study stops at the first check past it, and before any output is written as complete. The input is read
    in a child process killed when the limit passes (a hanging reader cannot be interrupted in this process).

    ``started`` (a ``time.time()``) counts the limit from that moment instead of from entering the block:
    a study whose stages run as separate tasks, possibly in other processes, has one limit over all of them.

    Example::

        with study_time_limit(600):
            process_study(study, "out", config, model)   # StudyTimeoutError after 10 minutes
    """
    before = getattr(_DEADLINE, "value", None)
    spent = 0.0 if started is None else time.time() - started
    _DEADLINE.value = (time.monotonic() + seconds - spent, seconds) if seconds else None
    try:
        yield
    finally:
        _DEADLINE.value = before


def check_time(stage: str) -> None:
    """Raise :class:`~monai_ext.errors.StudyTimeoutError` when the study's time limit has passed.

    Args:
        stage: what the study was doing, named in the reason.
    """
    deadline = getattr(_DEADLINE, "value", None)
    if deadline is not None and time.monotonic() > deadline[0]:
        raise _timeout_error(stage)


def _timeout_error(stage: str) -> StudyTimeoutError:
    return StudyTimeoutError(f"took longer than the time limit of {_DEADLINE.value[1]:g} s per study "
                             f"(--study-timeout); stopped at {stage}")


def time_left() -> float | None:
    """Seconds left of the study's time limit in this thread (``None``: no limit)."""
    deadline = getattr(_DEADLINE, "value", None)
    return None if deadline is None else deadline[0] - time.monotonic()


def _read_within_limit(study: Study, config: PipelineConfig):
    """Read a study; under a time limit in a child process stopped when the limit passes (a decoder that hangs,
    a named pipe that never delivers data), since a thread blocked in a reader cannot be interrupted."""
    left = time_left()
    if left is not None and left <= 0:
        check_time("reading the input")
    try:
        return read_ct(study.path, series_uid=config.series_uid, max_bytes=config.max_memory, timeout=left)
    except TimeoutError as exc:
        if isinstance(exc, StudyTimeoutError):
            raise
        raise _timeout_error("reading the input (the reader was stopped)") from None


def _versions() -> dict:
    import monai
    import numpy
    import scipy
    import SimpleITK

    return {"ct-severity": __version__, "monai": monai.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "SimpleITK": SimpleITK.Version.VersionString(),
            "python": platform.python_version()}


def _settings(config: PipelineConfig) -> dict:
    """The run's settings as given (``None``: the bundle's calibrated value, recorded beside them)."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("trust_bundle",)}
    return json.loads(json.dumps(settings, default=str))  # JSON values only (a dtype parameter as its name)


def _attribute(model: LoadedModel, config: PipelineConfig, images: torch.Tensor, probs: torch.Tensor,
               gate: float) -> torch.Tensor:
    """Maps (N, 1, S, S) of the lesion class for the slices scored positive; zeros elsewhere."""
    maps = torch.zeros(images.shape[0], 1, images.shape[-2], images.shape[-1])
    positive = torch.nonzero(probs >= gate).flatten()
    if positive.numel() == 0:
        return maps
    attributor = make_attributor(config.method, model, **config.method_params)
    torch.manual_seed(config.seed)
    for i in range(0, positive.numel(), config.batch_size):
        check_time("attribution")
        idx = positive[i:i + config.batch_size]
        x = images[idx].to(model.device, dtype=torch.float32)
        maps[idx] = attributor(x, target=1).float().cpu()
    return maps


@dataclass
class Evidence:
    """What a study gives before the lesion threshold: CT, lung, the study-normalized heatmap."""

    ct: object  # MetaTensor (1, X, Y, Z), RAS
    hu: np.ndarray
    lung: np.ndarray
    heat: np.ndarray
    spacing: list[float]
    slice_info: list[dict]
    study_probability: float
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A study after the CPU stage that precedes the network (:func:`prepare_study`): the CT, its lung
    mask and the classifier's slices.

    Attributes:
        ct: the CT, a MetaTensor (1, X, Y, Z) oriented to RAS.
        hu: its voxels in HU, (X, Y, Z).
        lung: the lung mask (X, Y, Z), bool.
        spacing: voxel spacing in mm.
        stack: the lung slices for the classifier (a :class:`~monai_ext.transforms.slices.SliceStack`);
            ``None`` for ``method="density"``.
        heat: ``method="density"`` only: the abnormal-attenuation map (0/1), which needs no network.
        timings: seconds per stage so far.
        warnings: repairs of the input and lung extent warnings.
    """

    ct: object
    hu: np.ndarray
    lung: np.ndarray
    spacing: list[float]
    stack: object | None
    heat: np.ndarray | None
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Inferred:
    """What the network stage (:func:`infer_slices`) gives for one study's slices.

    Attributes:
        probs: (N,) lesion probability of each slice.
        maps: (N, 1, S, S) attribution maps of the lesion class (zeros for slices not attributed).
        study_probability: the study's lesion probability (:func:`pipelines.bundle.study_probability`).
        timings: seconds of ``classify`` and ``attribution``.
    """

    probs: torch.Tensor
    maps: torch.Tensor
    study_probability: float
    timings: dict[str, float]


def prepare_study(study: Study, config: PipelineConfig, slice_kwargs: dict | None,
                  density_delta_hu: float = DEFAULT_DELTA_HU, loaded: tuple | None = None) -> Prepared:
    """CPU stage before the network: load the study, segment its lungs, extract the classifier's slices.

    Args:
        study: the study.
        config: run settings (input options, lung mask backend, memory budget, method).
        slice_kwargs: the model's :attr:`~pipelines.bundle.LoadedModel.slice_kwargs` (``None`` for ``density``).
        density_delta_hu: ``method="density"``: rise above the normal lung level counted as abnormal.
        loaded: the study as :func:`~monai_ext.io.read_ct` already read it (``(ct, report)``), not read again;
            otherwise it is read, under a time limit in a child process stopped at the limit.

    Raises:
        CTSeverityError subclasses for unreadable or unsuitable input.
    """
    from monai_ext.transforms.slices import extract_slices

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ct, report = _read_within_limit(study, config) if loaded is None else loaded
    spacing = [float(v) for v in ct.pixdim.tolist()]
    t["load"] = time.perf_counter() - t0
    check_time("the lung mask")
    t0 = time.perf_counter()
    lung_t = LungMask(backend=config.lung_mask, weights_path=config.lung_weights)(ct)
    lung = np.asarray(lung_t[0]) > 0
    t["lung_mask"] = time.perf_counter() - t0
    report.check_lung(lung)  # refuses a lung with more than 1 % repaired voxels
    warnings = [*report.warnings, *lung_extent_warnings(lung, spacing)]
    hu = np.asarray(ct[0])
    if config.method == "density":
        t0 = time.perf_counter()
        heat = relative_attenuation(hu, lung, spacing, density_delta_hu).astype(np.float32)
        t["attribution"] = time.perf_counter() - t0
        return Prepared(ct, hu, lung, spacing, None, heat, t, warnings)
    check_time("slice classification")
    t0 = time.perf_counter()
    stack = extract_slices(ct, lung_t, spacing, **(slice_kwargs or {}))
    t["slices"] = time.perf_counter() - t0
    return Prepared(ct, hu, lung, spacing, stack, None, t, warnings)


def infer_slices(images: torch.Tensor, config: PipelineConfig, model: LoadedModel, slice_gate: float = 0.5,
                 study_call: float = 0.0) -> Inferred:
    """Network stage of one study: classify its slices, attribute those scored positive.

    The slices go through the network in the same batches whichever stage or process runs this (the
    classifier in batches of ``max(batch_size, 32)``, the attribution in batches of ``batch_size`` of the
    positive slices), so the maps are bit for bit those of :func:`compute_evidence`.
    """
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    probs = predict_slices(model.network, images, batch_size=max(config.batch_size, 32), device=model.device)
    t["classify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p_study = study_probability(probs)
    maps = _attribute(model, config, images, probs, slice_gate if p_study >= study_call else float("inf"))
    t["attribution"] = time.perf_counter() - t0
    return Inferred(probs, maps, p_study, t)


def assemble_evidence(prepared: Prepared, inferred: Inferred | None) -> Evidence:
    """CPU stage after the network: maps back on the CT grid, times the lung mask, normalized over the study
    (``inferred`` is ``None`` for ``method="density"``)."""
    from monai_ext.transforms.slices import paste_slices

    p = prepared
    t = dict(p.timings)
    if inferred is None:
        return Evidence(p.ct, p.hu, p.lung, p.heat, p.spacing, [], float("nan"), t, p.warnings)
    t.update(inferred.timings)
    t0 = time.perf_counter()
    raw = paste_slices(inferred.maps, p.stack).numpy() * p.lung
    # no positive slice (or no evidence at all): nothing to normalize, the study has no lesion
    heat = np.asarray(normalize_study(raw, p.lung), dtype=np.float32) if (raw > 0).any() else np.zeros_like(raw)
    t["normalize"] = time.perf_counter() - t0
    slice_info = [{"index": int(z), "probability": round(float(q), 5)}
                  for z, q in zip(p.stack.indices, inferred.probs)]
    return Evidence(p.ct, p.hu, p.lung, heat, p.spacing, slice_info, inferred.study_probability, t, p.warnings)


def compute_evidence(study: Study, config: PipelineConfig, model: LoadedModel | None, slice_gate: float = 0.5,
                     density_delta_hu: float = DEFAULT_DELTA_HU, study_call: float = 0.0,
                     loaded: tuple | None = None) -> Evidence:
    """Load a study, segment its lungs, classify its slices and compute the study-normalized heatmap.

    For ``method="density"`` the heatmap is the abnormal-attenuation mask (0/1): lung voxels
    ``density_delta_hu`` above the study's normal lung level. A study whose probability is below
    ``study_call`` has no lesion whatever its maps (:func:`lesion_mask`), so its slices are not attributed
    and its heatmap is zero (calibration passes 0 to see every study's maps). ``loaded``: the study as
    :func:`~monai_ext.io.read_ct` already read it (``(ct, report)``), not read again.

    The three stages in one call: :func:`prepare_study` (CPU), :func:`infer_slices` (network),
    :func:`assemble_evidence` (CPU); :mod:`pipelines.stages` runs them as separate tasks.
    """
    config.validate()
    if model is None and config.method != "density":
        raise ValueError(f"method {config.method!r} needs a model")
    prepared = prepare_study(study, config, None if model is None else model.slice_kwargs, density_delta_hu, loaded)
    if config.method == "density":
        return assemble_evidence(prepared, None)
    check_time("slice classification")
    return assemble_evidence(prepared, infer_slices(prepared.stack.images, config, model, slice_gate, study_call))


def lesion_mask(evidence: Evidence, method: str, cal: dict) -> np.ndarray:
    """The lesion mask of a study's evidence under a calibration (study call, threshold, rule, minimum volume)."""
    if method != "density" and evidence.study_probability < cal.get("study_call", 0.0):
        return np.zeros(evidence.lung.shape, dtype=bool)
    if method == "density":
        return remove_small_components(evidence.heat > 0, evidence.spacing, cal["min_lesion_ml"])
    return lesion_mask_from_heatmap(evidence.heat, evidence.lung, cal["threshold"], cal["lesion_rule"],
                                    ct=evidence.hu, spacing=evidence.spacing, min_volume_ml=cal["min_lesion_ml"],
                                    density_delta_hu=cal["density_delta_hu"], grow_mm=cal.get("grow_mm", 0.0))


def process_study(study: Study, out_dir: str | os.PathLike, config: PipelineConfig, model: LoadedModel | None
                  ) -> dict:
    """Run the whole pipeline on one study and write its outputs.

    Args:
        study: the study (name and input path).
        out_dir: batch output folder; the study's outputs go to ``out_dir/<study>/``.
        config: run settings.
        model: the loaded classifier (not needed for ``method="density"``).

    Returns:
        The content of ``result.json``.

    Raises:
        CTSeverityError subclasses for unreadable or unsuitable input.
    """
    t_all = time.perf_counter()
    cal = resolve_calibration(config, model)
    (Path(out_dir) / study.study).mkdir(parents=True, exist_ok=True)
    ev = compute_evidence(study, config, model, cal["slice_gate"], cal["density_delta_hu"], cal["study_call"])
    return write_study(study, out_dir, config, model, cal, ev, time.perf_counter() - t_all)


def write_study(study: Study, out_dir: str | os.PathLike, config: PipelineConfig, model: LoadedModel | None,
                cal: dict, ev: Evidence, seconds_before: float = 0.0) -> dict:
    """CPU stage after the evidence: lesion mask, severity, the study's outputs and, last, ``result.json``.

    Args:
        study: the study.
        out_dir: batch output folder (outputs in ``out_dir/<study>/``).
        config: run settings.
        model: the loaded model (its bundle, checksum and method defaults; ``None`` for ``density``).
        cal: the calibration (:func:`resolve_calibration`).
        ev: the study's evidence.
        seconds_before: time the study took before this stage (``timings_s.total`` adds this stage's).

    Returns:
        The content of ``result.json``.
    """
    t_start = time.perf_counter()
    sdir = Path(out_dir) / study.study
    sdir.mkdir(parents=True, exist_ok=True)
    t = dict(ev.timings)
    t0 = time.perf_counter()
    lesion = lesion_mask(ev, config.method, cal)
    rule = "density" if config.method == "density" else cal["lesion_rule"]
    t["lesion_mask"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sev = severity(lesion, ev.lung, ev.spacing, affine=ev.ct.affine.numpy())
    t["severity"] = time.perf_counter() - t0
    check_time("writing the outputs")

    t0 = time.perf_counter()
    outputs = {"heatmap": "heatmap.nii.gz", "lesion_mask": "lesion_mask.nii.gz", "lung_mask": "lung_mask.nii.gz"}
    affine = ev.ct.affine
    write_like(ev.heat.astype(np.float32), ev.ct.meta, sdir / outputs["heatmap"], affine=affine)
    write_like(lesion.astype(np.uint8), ev.ct.meta, sdir / outputs["lesion_mask"], affine=affine)
    write_like(ev.lung.astype(np.uint8), ev.ct.meta, sdir / outputs["lung_mask"], affine=affine)
    t["write"] = time.perf_counter() - t0
    if config.overview:
        from pipelines.figures import overview_png

        t0 = time.perf_counter()
        overview_png(ev.hu, ev.lung, ev.heat, lesion, sdir / "overview.png", title=f"{study.study}: {sev.grade} "
                     f"({sev.lesion_percent:.1f} % of lung), {config.method}")
        outputs["overview"] = "overview.png"
        t["overview"] = time.perf_counter() - t0
    t["total"] = seconds_before + time.perf_counter() - t_start

    dens = config.method == "density"
    result = {
        "study": study.study,
        "input": str(study.path),
        "status": "ok",
        "method": config.method,
        "method_params": {**(model.method_defaults(config.method) if model is not None else {}),
                          **config.method_params},
        "lesion_rule": rule,
        "threshold": None if dens else cal["threshold"],
        "min_lesion_ml": cal["min_lesion_ml"],
        "density_delta_hu": cal["density_delta_hu"] if dens or cal["lesion_rule"] == "heatmap-relative" else None,
        "slice_gate": None if dens else cal["slice_gate"],
        "study_call": None if dens else cal["study_call"],
        "grow_mm": None if dens or cal["lesion_rule"] == "heatmap" else cal.get("grow_mm", 0.0),
        "model": None if model is None else {"bundle": str(model.bundle), "sha256": model.checksum},
        **sev.to_dict(),
        "study_probability": None if np.isnan(ev.study_probability) else round(ev.study_probability, 5),
        "warnings": list(ev.warnings),
        "slices": ev.slice_info,
        "spacing_mm": [round(s, 5) for s in ev.spacing],
        "shape": [int(s) for s in ev.ct.meta["spatial_shape"]],
        "timings_s": {k: round(v, 3) for k, v in t.items()},
        "versions": _versions(),
        "seed": config.seed,
        "settings": _settings(config),
        "fingerprint": config.fingerprint(model.run_key if model is not None else ""),
        "outputs": outputs,
    }
    if config.keep_identifiers:
        from pipelines.dicom.privacy import patient_identifiers

        result["patient"] = patient_identifiers(study.path)
    if config.dicom_out or (config.dicom_out is None and Path(study.path).is_dir()):
        from pipelines.dicom import study_dicom_outputs

        t0 = time.perf_counter()
        outputs.update(study_dicom_outputs(sdir, study.path, ev.ct, ev.lung, lesion, result, config.lung_mask,
                                           required=bool(config.dicom_out)))
        result["timings_s"]["dicom"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(sdir / "result.json", json.dumps(result, indent=2))
    return result
