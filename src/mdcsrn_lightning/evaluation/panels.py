"""Slice panels (LR | SR | HR | error) as PNG files, for logs and reports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mdcsrn_lightning.atomic import atomic_path


def middle_slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) -> the 2D slice through the middle of ``axis``."""
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def save_panel(
    path: str | Path,
    images: Mapping[str, np.ndarray],
    *,
    reference: str | None = None,
    error_of: str | None = None,
    title: str | None = None,
) -> Path:
    """Write 2D images side by side (grey, [0, 1] window), plus |error_of - reference|.

    The file is written to a temporary name and moved into place, so a reader never
    sees half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dict(images)
    if error_of is not None and reference is not None:
        panels[f"|{error_of} - {reference}|"] = np.abs(images[error_of] - images[reference])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels.items()):
        is_error = name.startswith("|")
        vmax = max(float(np.percentile(image, 99.5)), 1e-6) if is_error else 1.0
        ax.imshow(np.rot90(image), cmap="magma" if is_error else "gray", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
