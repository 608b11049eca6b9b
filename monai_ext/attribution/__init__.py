"""Attribution methods: one :class:`Attributor` subclass per method."""

from __future__ import annotations

from monai_ext.attribution.base import Attributor, gather_scores, resolve_layer, select_target

__all__ = ["Attributor", "resolve_layer", "select_target", "gather_scores"]
