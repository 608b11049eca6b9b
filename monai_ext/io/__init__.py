"""monai_ext.io."""

from __future__ import annotations

__all__: list[str] = []
