"""Orchestration of ct-severity: study discovery, the per-study pipeline, dask, reports and the CLI.

dask and GPU specifics live here; :mod:`monai_ext` stays importable without them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ct-severity")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
