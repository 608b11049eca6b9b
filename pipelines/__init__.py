"""Orchestration of ct-severity: study discovery, the per-study pipeline, dask, reports and the CLI
(:mod:`pipelines.commands`, one module per ``ctseverity`` command).

dask and GPU specifics live here; :mod:`monai_ext` stays importable without them.
"""

from __future__ import annotations

import importlib.resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("ct-severity")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "embedded_bundle", "EMBEDDED_LUNG_NET"]


def embedded_bundle() -> Path:
    """The folder of the bundle shipped with ct-severity, wherever the package is installed.

    The bundle is the data-only package ``ct_severity`` (``bundles/ct_severity`` in the source tree), found
    with ``importlib.resources``: in a wheel or after ``pip install .`` it lies in site-packages, in an
    editable install in the checkout. Only a source tree used without installing (``PYTHONPATH``) falls
    back to ``bundles/ct_severity`` beside ``pipelines/``.
    """
    try:
        root = importlib.resources.files("ct_severity")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "bundles" / "ct_severity"
    return Path(str(root))


#: the project's lung U-Net shipped in the embedded bundle: the library's default for the ``unet``
#: lung mask backend (``auto`` uses it when the lungmask R231 weights are not on disk)
EMBEDDED_LUNG_NET = embedded_bundle() / "models" / "lung_net.pt"


def _register_lung_net() -> None:
    from monai_ext.transforms.lung_net import register_default_lung_net

    register_default_lung_net(EMBEDDED_LUNG_NET)


_register_lung_net()
