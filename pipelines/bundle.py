"""The ct-severity MONAI bundle: locating it, finalizing a trained model, loading it back.

A trained model lives in a bundle's ``models/`` folder as

- ``model.pt``: the network's state dict;
- ``model.json``: the network definition (a MONAI config ``_target_`` dict), the input
  preprocessing (slice size, 2.5D context, HU window), the SHA-256 of ``model.pt`` (checked at
  every load), validation metrics, calibration of the lesion threshold, and the names of the
  attribution side files;
- ``iba_estimator.pt``: the feature mean and std at the IBA bottleneck layer over training slices.

Untrusted bundles: a MONAI config can instantiate any Python object (``_target_``) and run any
expression (``$...``), so a bundle from elsewhere is code. Only the embedded bundle is trusted by
default. From any other bundle :func:`load_model` reads the weights (``weights_only=True``, checksum
checked) and builds the network only when ``model.json`` names one of :data:`SAFE_NETWORKS` with plain
JSON arguments (no other ``_target_``, no ``$`` expression, ``@`` reference or ``%`` macro, no
``pretrained`` download); anything else is refused with :class:`~monai_ext.errors.UntrustedBundleError`
unless the bundle is trusted (``--trust-bundle``, or ``CTSEVERITY_TRUST_BUNDLE=1``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc

from monai_ext.errors import CTSeverityError, InputNotFoundError, ModelChecksumError, UntrustedBundleError
from monai_ext.io import atomic_path, atomic_write_text
from pipelines import embedded_bundle

__all__ = [
    "EMBEDDED_BUNDLE",
    "embedded_bundle",
    "bundle_path",
    "LoadedModel",
    "load_model",
    "sha256_file",
    "network_config",
    "build_network",
    "study_probability",
    "study_metrics",
    "slice_auc",
    "predict_slices",
    "finalize_training",
    "fit_iba_estimator",
    "evaluate_dataset",
    "write_evaluation",
    "copy_bundle",
    "SAFE_NETWORKS",
    "TRUST_ENV",
    "is_trusted",
    "check_bundle",
    "safe_network",
]

log = logging.getLogger(__name__)

#: the bundle shipped with ct-severity (:func:`embedded_bundle`)
EMBEDDED_BUNDLE = embedded_bundle()


def bundle_path(path: str | os.PathLike | None = None) -> Path:
    """The bundle folder: ``path``, else ``$CTSEVERITY_BUNDLE``, else the embedded bundle.

    Raises:
        InputNotFoundError: if the folder or its ``models/model.json`` is missing.
    """
    p = Path(path or os.environ.get("CTSEVERITY_BUNDLE") or EMBEDDED_BUNDLE)
    if not p.is_dir():
        raise InputNotFoundError("bundle folder not found", p)
    if not (p / "models" / "model.json").exists():
        raise InputNotFoundError("not a trained ct-severity bundle (models/model.json is missing)", p)
    return p


#: the networks (``monai.networks.nets``) a bundle that is not trusted may name in ``model.json``
SAFE_NETWORKS: tuple[str, ...] = (
    "DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264",
    "ResNet", "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    "SENet", "SEResNet50", "SEResNet101", "SEResNet152", "SEResNext50", "SEResNext101",
    "BasicUNet", "UNet",
)

#: environment variable that trusts every bundle (for commands without ``--trust-bundle``)
TRUST_ENV = "CTSEVERITY_TRUST_BUNDLE"

_TRUST_HINT = "pass --trust-bundle (or set CTSEVERITY_TRUST_BUNDLE=1) only if you trust the bundle's author"


def is_trusted(root: str | os.PathLike, trust: bool | None = None) -> bool:
    """Whether the bundle at ``root`` may run its configs as code: the embedded bundle, ``trust``
    (``--trust-bundle``), or ``$CTSEVERITY_TRUST_BUNDLE`` set to a true value."""
    if trust:
        return True
    if os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return os.path.realpath(root) == os.path.realpath(EMBEDDED_BUNDLE)


def _check_plain(value: object, where: str, source: object) -> None:
    """Refuse what MONAI's config parser would turn into code: a ``_target_`` or other ``_key_``,
    a ``$`` expression, an ``@`` reference or a ``%`` macro, anything that is not plain JSON."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or (k.startswith("_") and k.endswith("_")):
                raise UntrustedBundleError(f"model.json: {where} holds the config key {k!r}; {_TRUST_HINT}", source)
            _check_plain(v, f"{where}.{k}", source)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", source)
    elif isinstance(value, str):
        if value.lstrip().startswith(("$", "@", "%")):
            raise UntrustedBundleError(f"model.json: {where} is the config expression {value[:60]!r}; {_TRUST_HINT}",
                                       source)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise UntrustedBundleError(f"model.json: {where} is not a JSON value", source)


def safe_network(network_def: object, source: object = None) -> torch.nn.Module:
    """Build the network of an untrusted bundle's ``model.json`` without MONAI's config parser.

    Args:
        network_def: the ``network_def`` of ``model.json``: ``{"_target_": NAME, **args}``.
        source: the file named in errors.

    Raises:
        UntrustedBundleError: the target is not one of :data:`SAFE_NETWORKS` (as ``NAME`` or
            ``monai.networks.nets.NAME``), an argument is not plain JSON (a nested ``_target_``, a
            ``$`` expression, an ``@`` reference, a ``%`` macro), ``pretrained`` is set (a download),
            or the arguments do not build the network.
    """
    if not isinstance(network_def, dict):
        raise UntrustedBundleError("model.json: network_def is not a network definition", source)
    target = network_def.get("_target_")
    name = target.removeprefix("monai.networks.nets.") if isinstance(target, str) else None
    if name not in SAFE_NETWORKS:
        raise UntrustedBundleError(f"model.json: the network {target!r} is not one an untrusted bundle may name "
                                   f"(MONAI's {', '.join(SAFE_NETWORKS[:5])}, ... networks); {_TRUST_HINT}", source)
    args = {k: v for k, v in network_def.items() if k != "_target_"}
    _check_plain(args, "network_def", source)
    if args.get("pretrained"):
        raise UntrustedBundleError("model.json: network_def asks for pretrained weights (a download); the "
                                   "bundle's own weights are used", source)
    from monai.networks import nets

    try:
        return getattr(nets, name)(**args)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise UntrustedBundleError(f"model.json: {name} cannot be built from its arguments ({exc})", source) from exc


def check_bundle(bundle: str | os.PathLike | None = None, trust: bool | None = None) -> Path:
    """Check, before any study is read, that :func:`load_model` will build the bundle's network:
    a trusted bundle, or ``model.json`` naming an allowed plain network and files inside ``models/``.

    Returns:
        The bundle folder.

    Raises:
        InputNotFoundError: no trained model in the bundle.
        UntrustedBundleError: an untrusted bundle asks for more (see :func:`safe_network`).
    """
    root = bundle_path(bundle)
    if is_trusted(root, trust):
        return root
    info = _read_model_json(root)
    _model_file(root / "models", info.get("weights", "model.pt"), False)
    if info.get("iba_estimator"):
        _model_file(root / "models", info["iba_estimator"], False)
    with torch.device("meta"):  # builds no weights: only the definition is checked
        safe_network(info.get("network_def"), root / "models" / "model.json")
    return root


def _read_model_json(root: Path) -> dict:
    try:
        info = json.loads((root / "models" / "model.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CTSeverityError(f"cannot read models/model.json ({exc})", root) from exc
    if not isinstance(info, dict):
        raise CTSeverityError("models/model.json is not a model description", root)
    return info


def network_config(target: str, args: dict) -> dict:
    """A MONAI config dict (``_target_`` plus arguments) for a network."""
    return {"_target_": str(target), **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(args).items()}}


def build_network(target: str, args: dict) -> torch.nn.Module:
    """Instantiate a network from its ``_target_`` name and arguments (as in a MONAI config)."""
    return ConfigParser({"net": network_config(target, args)}).get_parsed_content("net")


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A trained slice classifier with everything needed to use and explain it."""

    network: torch.nn.Module
    info: dict
    bundle: Path
    iba_estimator: object | None = None  # monai_ext.attribution.FeatureEstimator
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def size(self) -> int:
        return int(self.info["input"]["size"])

    @property
    def context(self) -> int:
        return int(self.info["input"].get("context", 0))

    @property
    def window(self) -> tuple[float, float]:
        lo, hi = self.info["input"].get("window", (-1350.0, 150.0))
        return float(lo), float(hi)

    @property
    def flatten_beyond_mm(self) -> float | None:
        """Lung surroundings farther than this are flattened to soft tissue in the classifier's
        input (:func:`~monai_ext.transforms.slices.flatten_surroundings`); None: not flattened."""
        v = self.info["input"].get("flatten_beyond_mm")
        return None if v is None else float(v)

    @property
    def slice_kwargs(self) -> dict:
        """Keyword arguments of :func:`~monai_ext.transforms.slices.extract_slices` that make this
        model's input."""
        return {"size": self.size, "context": self.context, "window": self.window,
                "flatten_beyond_mm": self.flatten_beyond_mm}

    @property
    def checksum(self) -> str:
        return str(self.info["sha256"])

    @property
    def calibration(self) -> dict:
        return dict(self.info.get("calibration", {}))

    def method_defaults(self, method: str) -> dict:
        """The bundle's own parameters of an attribution method (``model.json`` ``method_params``), which
        ``--param`` overrides: e.g. the IBA ``beta`` its calibration was fitted with."""
        return dict(self.info.get("method_params", {}).get(method, {}))

    @property
    def run_key(self) -> str:
        """What of the bundle enters a run's fingerprint (:func:`run_key`)."""
        return run_key(self.info)


def run_key(info: dict) -> str:
    """The model's SHA-256 and a short hash of what else in ``model.json`` changes results (calibration and
    method parameters): part of a run's fingerprint, so that a recalibrated bundle reruns finished studies."""
    keys = {k: info.get(k) for k in ("calibration", "method_params")}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{info.get('sha256', '')}:{digest}"


def load_model(bundle: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               trust: bool | None = None) -> LoadedModel:
    """Load the trained classifier of a bundle, verifying its checksum.

    The weights are read with ``weights_only=True``. A bundle that is not trusted (:func:`is_trusted`:
    not the embedded bundle, no ``trust``) gets its network built by :func:`safe_network` only.

    Args:
        bundle: bundle folder (default: ``$CTSEVERITY_BUNDLE`` or the embedded bundle).
        device: where to put the network.
        trust: build the network with MONAI's config parser whatever ``model.json`` asks for
            (``--trust-bundle``).

    Raises:
        InputNotFoundError: no trained model in the bundle.
        ModelChecksumError: ``model.pt`` does not match the checksum in ``model.json``.
        UntrustedBundleError: an untrusted bundle's network is not a plain allowed MONAI network.

    Example::

        model = load_model("downloaded_bundle")               # weights and an allowed network only
        model = load_model("my_bundle", trust=True)           # any network_def (runs its config)
    """
    root = bundle_path(bundle)
    models = root / "models"
    info = _read_model_json(root)
    trusted = is_trusted(root, trust)
    weights = _model_file(models, info.get("weights", "model.pt"), trusted)
    if not weights.exists():
        raise InputNotFoundError("model weights missing", weights)
    digest = sha256_file(weights)
    if digest != info.get("sha256"):
        raise ModelChecksumError(f"checksum mismatch (expected {info.get('sha256')}, file has {digest}); "
                                 "the file is damaged or was replaced", weights)
    if trusted:
        net = ConfigParser({"net": dict(info["network_def"])}).get_parsed_content("net")
    else:
        net = safe_network(info.get("network_def"), models / "model.json")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as exc:
        raise CTSeverityError(f"not the weights of its network ({type(exc).__name__}: {str(exc)[:200]})",
                              weights) from exc
    dev = torch.device(device)
    net = net.to(dev).eval()
    est = None
    if info.get("iba_estimator") and _model_file(models, info["iba_estimator"], trusted).exists():
        from monai_ext.attribution import FeatureEstimator

        est = FeatureEstimator.load(_model_file(models, info["iba_estimator"], trusted))  # weights_only
    return LoadedModel(net, info, root, est, dev)


def _model_file(models: Path, name: object, trusted: bool) -> Path:
    """A file named in ``model.json``: for an untrusted bundle only a plain file name inside ``models/``."""
    if not trusted and (not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name
                        or "\\" in name):
        raise UntrustedBundleError(f"model.json names the file {name!r} outside models/; {_TRUST_HINT}",
                                   models / "model.json")
    return models / str(name)


def study_probability(slice_probs: torch.Tensor | np.ndarray, top_fraction: float = 0.1, min_slices: int = 3) -> float:
    """Study-level lesion probability from slice probabilities: the mean of the top slices.

    The mean of the highest ``top_fraction`` of slice probabilities (at least ``min_slices``
    slices) follows a study with lesions on few slices while ignoring a single noisy slice.
    """
    p = np.sort(np.asarray(slice_probs, dtype=np.float64).ravel())[::-1]
    if p.size == 0:
        return float("nan")
    k = min(p.size, max(min_slices, int(np.ceil(top_fraction * p.size))))
    return float(p[:k].mean())


def slice_auc(probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """ROC AUC of probabilities against 0/1 labels (MONAI's ``compute_roc_auc``); NaN when a class is missing."""
    y = torch.as_tensor(np.asarray(labels)).long()
    if y.numel() == 0 or int(y.min()) == int(y.max()):
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(np.asarray(probs, dtype=np.float64)), y))


def study_metrics(study_probs: dict[str, float], study_labels: dict[str, int], threshold: float = 0.5) -> dict:
    """Study accuracy, sensitivity, specificity and AUC at ``threshold``."""
    ids = sorted(study_probs)
    p = np.array([study_probs[s] for s in ids])
    y = np.array([int(study_labels[s]) for s in ids])
    pred = p >= threshold
    tp, tn = int((pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    npos, nneg = int((y == 1).sum()), int((y == 0).sum())
    return {
        "n_studies": len(ids),
        "study_accuracy": float((tp + tn) / max(1, len(ids))),
        "sensitivity": float(tp / npos) if npos else float("nan"),
        "specificity": float(tn / nneg) if nneg else float("nan"),
        "study_auc": slice_auc(p, y),
    }


@torch.no_grad()
def predict_slices(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 64,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Lesion probability (softmax class 1) of each slice, on the CPU."""
    dev = torch.device(device) if device is not None else next(network.parameters()).device
    network.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(dev, dtype=torch.float32)
        out.append(torch.softmax(network(x).float(), dim=1)[:, 1].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _dataset_predictions(network: torch.nn.Module, dataset, device) -> tuple[np.ndarray, np.ndarray, list[str]]:
    probs = predict_slices(network, dataset.images, device=device).numpy()
    return probs, dataset.labels.numpy(), list(dataset.study)


def evaluate_dataset(network: torch.nn.Module, dataset, records: Sequence, device: str | torch.device) -> dict:
    """Slice AUC and study accuracy, sensitivity, specificity of ``network`` on a :class:`SliceDataset`."""
    if dataset is None or not len(dataset):
        return {}
    probs, labels, studies = _dataset_predictions(network, dataset, device)
    metrics: dict = {"slice_auc": slice_auc(probs, labels), "n_slices": int(len(labels))}
    per_study: dict[str, list[float]] = {}
    for s, p in zip(studies, probs):
        per_study.setdefault(s, []).append(float(p))
    lab = {(r.study if hasattr(r, "study") else r["study"]): int(r.label if hasattr(r, "label") else r["label"])
           for r in records}
    metrics.update(study_metrics({s: study_probability(v) for s, v in per_study.items()},
                                 {s: lab[s] for s in per_study}))
    return metrics


def write_evaluation(output_dir: str | os.PathLike, network: torch.nn.Module, dataset, records: Sequence,
                     device: str | torch.device, engine_metrics: dict | None = None) -> dict:
    """Write ``metrics.json`` (slice AUC, study accuracy, sensitivity, specificity) and
    ``slice_predictions.csv`` for an evaluated dataset; return the metrics."""
    out = Path(output_dir)
    metrics = evaluate_dataset(network, dataset, records, device)
    metrics.update({f"engine_{k}": float(v) for k, v in (engine_metrics or {}).items()
                    if isinstance(v, (int, float))})
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    probs, labels, studies = _dataset_predictions(network, dataset, device)
    lines = ["study,slice,label,lesion_probability"] + [
        f"{s},{int(z)},{int(y)},{p:.6f}" for s, z, y, p in zip(studies, dataset.z.tolist(), labels, probs)]
    atomic_write_text(out / "slice_predictions.csv", "\n".join(lines) + "\n")
    log.info("evaluation written to %s: %s", out, json.dumps(metrics))
    return metrics


def fit_iba_estimator(network: torch.nn.Module, dataset, layer: str, device: str | torch.device, seed: int = 0,
                      max_slices: int = 2048):
    """The IBA feature statistics of ``network`` at ``layer`` over (at most ``max_slices``, drawn with
    ``seed``) slices of a :class:`~pipelines.datasets.SliceDataset`, without its augmentation.

    Returns:
        A :class:`~monai_ext.attribution.FeatureEstimator`.
    """
    from monai_ext.attribution import IBA

    torch.manual_seed(seed)
    idx = torch.randperm(len(dataset))[:max_slices]
    return IBA.fit_estimator(network.to(device), dataset.images[idx].float(), layer=layer, device=device)


def finalize_training(output_dir: str | os.PathLike, network: torch.nn.Module, network_def: dict,
                      input_cfg: dict, train_dataset, val_dataset, val_records: Sequence, device: str | torch.device,
                      iba_layer: str | None = None, seed: int = 0, extra: dict | None = None,
                      cam_layer: str | None = None) -> dict:
    """Write ``model.pt``/``model.json`` (checksum, metrics) and the IBA estimator of a trained network.

    ``cam_layer`` (when given) is recorded as the layer HiResCAM and Grad-CAM explain.

    The best checkpoint (by validation slice AUC) is expected at ``output_dir/model.pt`` as written by
    MONAI's ``CheckpointSaver(key_metric_filename="model.pt")``; if it is missing the current
    network weights are used.

    Returns:
        The ``model.json`` content.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.pt"
    if weights.exists():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    with atomic_path(weights) as tmp:
        torch.save(state, tmp)
    network.eval()
    metrics = evaluate_dataset(network, val_dataset, val_records, device) if val_dataset is not None else {}
    info = {
        "format": "ct-severity-model/1",
        "weights": "model.pt",
        "sha256": sha256_file(weights),
        "network_def": network_def,
        "input": dict(input_cfg),
        "metrics": metrics,
        "training": {"seed": seed, "n_train_slices": int(len(train_dataset)) if train_dataset is not None else 0,
                     **(extra or {})},
    }
    if cam_layer not in (None, "", "None", "none", "null"):
        info["cam_layer"] = str(cam_layer)
    if iba_layer in ("", "None", "none", "null"):
        iba_layer = None
    if iba_layer is not None and train_dataset is not None and len(train_dataset):
        est = fit_iba_estimator(network, train_dataset, iba_layer, device, seed)
        est.save(out / "iba_estimator.pt")
        info["iba_estimator"] = "iba_estimator.pt"
        info["iba_layer"] = iba_layer
    atomic_write_text(out / "model.json", json.dumps(info, indent=2, sort_keys=True))
    log.info("model written to %s: %s", out, json.dumps(metrics))
    return info


def copy_bundle(dest: str | os.PathLike, source: str | os.PathLike | None = None, with_models: bool = False) -> Path:
    """Copy a bundle's configs and docs (and optionally models) to ``dest``."""
    src = Path(source or EMBEDDED_BUNDLE)
    dst = Path(dest)
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("configs", "docs") + (("models",) if with_models else ()):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
    (dst / "models").mkdir(exist_ok=True)
    if not (src / "configs").is_dir():
        raise CTSeverityError("bundle has no configs folder", src)
    return dst
