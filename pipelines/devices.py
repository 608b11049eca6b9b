"""The torch device a command or script runs on."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(device: str | None) -> str:
    """``auto`` (or ``None``): ``cuda`` when a GPU is available, else ``cpu``; anything else as given."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)
