"""monai_ext.transforms."""

from __future__ import annotations

__all__: list[str] = []
