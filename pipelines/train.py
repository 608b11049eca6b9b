"""Training of the slice classifier with the bundle's ``train.json``, or fine-tuning of a trained one with
saliency guidance (``train.json`` + ``train_guided.json``); the command is :mod:`pipelines.commands.train`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from monai_ext.errors import UntrustedBundleError
from pipelines.bundle import EMBEDDED_BUNDLE, TRUST_ENV, copy_bundle

__all__ = ["train_bundle", "GUIDED_CONFIGS"]

log = logging.getLogger(__name__)


def train_bundle(data: str | Path, out: str | Path, epochs: int | None = None, device: str | None = None,
                 overrides: dict | None = None, config: str | Sequence[str] = "train.json",
                 trust: bool = False) -> dict:
    """Run a bundle training config on ``data`` and write the trained bundle to ``out``.

    The embedded bundle's configs and model card are copied to ``out`` (unless it already has
    configs), so the result is a complete bundle usable with ``--bundle out``.

    Args:
        data: dataset folder or CSV manifest.
        out: bundle folder to write.
        epochs: training epochs (default: the config's).
        device: torch device name (default: the config's).
        overrides: config values by id.
        config: config file name under ``configs/``, or several merged in order (MONAI's
            multi-file configs: later files override ids of earlier ones), e.g.
            ``("train.json", "train_guided.json")``.
        trust: run configs already in ``out`` that differ from the embedded bundle's (a MONAI config
            runs code), and build a ``--from`` bundle's network as its config says.

    Returns:
        The written ``models/model.json``.

    Raises:
        UntrustedBundleError: ``out`` holds configs other than the embedded bundle's and ``trust`` is not set.
    """
    from monai.bundle import run

    out = Path(out)
    names = [config] if isinstance(config, str) else list(config)
    if not all((out / "configs" / name).exists() for name in names):
        copy_bundle(out, EMBEDDED_BUNDLE)
    elif not trust:
        _check_own_configs(out, names)
    args: dict = {"bundle_root": str(out), "dataset_dir": str(data), "output_dir": str(out / "models")}
    if epochs is not None:
        args["epochs"] = int(epochs)
    if device is not None:
        args["device"] = f"$torch.device({device!r})"
    args.update(overrides or {})
    previous = os.environ.get(TRUST_ENV)
    if trust:  # the guided config loads its --from bundle with load_model, which reads this
        os.environ[TRUST_ENV] = "1"
    try:
        _run_configs(run, out, names, args)
    finally:
        if trust:
            if previous is None:
                os.environ.pop(TRUST_ENV, None)
            else:
                os.environ[TRUST_ENV] = previous
    return json.loads((out / "models" / "model.json").read_text())


def _run_configs(run, out: Path, names: list[str], args: dict) -> None:
    run(run_id="run", init_id="initialize", final_id="finalize",
        config_file=[str(out / "configs" / name) for name in names],
        logging_file=str(out / "configs" / "logging.conf") if (out / "configs" / "logging.conf").exists() else None,
        **args)


def _check_own_configs(out: Path, names: Sequence[str]) -> None:
    """Refuse to run configs in ``out`` that are not the embedded bundle's (they could run any code)."""
    for name in (*names, "logging.conf"):
        mine, embedded = out / "configs" / name, EMBEDDED_BUNDLE / "configs" / name
        if mine.exists() and (not embedded.exists() or mine.read_bytes() != embedded.read_bytes()):
            raise UntrustedBundleError(f"configs/{name} is not the embedded bundle's and a MONAI config runs code; "
                                       "pass --trust-bundle only if you wrote it or trust its author", out)


#: the configs of the guided stage: train.json with train_guided.json's overrides
GUIDED_CONFIGS = ("train.json", "train_guided.json")
