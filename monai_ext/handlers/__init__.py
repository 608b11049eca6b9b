"""Ignite handlers around the library's attributors and savers."""

from __future__ import annotations

from monai_ext.handlers.attribution import AttributionHandler
from monai_ext.handlers.heatmap_saver import HeatmapSaver

__all__ = ["AttributionHandler", "HeatmapSaver"]
