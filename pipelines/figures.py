"""Figures a person looks at: the per-study overview montage."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from monai_ext.io import atomic_path  # noqa: E402

__all__ = ["overview_png", "pick_slices"]


def pick_slices(lung: np.ndarray, lesion: np.ndarray, n: int = 8) -> list[int]:
    """Axial slices for a montage: evenly over the lung, preferring slices with lesion."""
    lung_z = np.nonzero(lung.any(axis=(0, 1)))[0]
    if lung_z.size == 0:
        return list(np.linspace(0, lung.shape[2] - 1, n).round().astype(int))
    les_area = lesion.sum(axis=(0, 1))
    chosen = set(np.linspace(lung_z[0], lung_z[-1], n + 2)[1:-1].round().astype(int).tolist())
    if les_area.any():
        top = np.argsort(les_area)[::-1][: n // 2]
        chosen = set(sorted(chosen)[: n - len(top)]) | set(int(z) for z in top if les_area[z] > 0)
    return sorted(chosen)[:n]


def overview_png(hu: np.ndarray, lung: np.ndarray, heat: np.ndarray, lesion: np.ndarray,
                 path: str | os.PathLike, title: str = "", n: int = 8, window: tuple[float, float] = (-1350, 150),
                 dpi: int = 80) -> Path:
    """A montage of axial slices: CT (lung window), lung contour (cyan), heatmap overlay, lesion contours (red).

    Volumes are (X, Y, Z) on the RAS grid; slices are shown with anterior up and the patient's
    right on the left of the image, as radiologists read them.
    """
    zs = pick_slices(lung > 0, lesion > 0, n)
    cols = min(4, len(zs))
    rows = int(np.ceil(len(zs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), zs):

        def view(a: np.ndarray, z: int = z) -> np.ndarray:
            # RAS grid (x toward the patient's right, y anterior): rows anterior-up, patient's right
            # on the viewer's left (radiological convention)
            return a[:, :, z].T[::-1, ::-1]

        ax.imshow(view(hu), cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
        h = np.ma.masked_less_equal(view(heat), 0.05)
        ax.imshow(h, cmap="inferno", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        if lung[:, :, z].any():
            ax.contour(view(lung > 0).astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
        if lesion[:, :, z].any():
            ax.contour(view(lesion > 0).astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"slice {z}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)
