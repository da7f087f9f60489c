"""Slice panels (LR | SR | [GAN-SR |] HR | error) as PNG files, for logs and reports.

As in the paper's figures, every image carries a zoomed inset of one region, framed on the
image: the same region in every column, chosen on the reference (the window with the most
detail, :func:`zoom_window`) so that it does not depend on any model's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mdcsrn_lightning.atomic import atomic_path

__all__ = ["inset_bounds", "middle_slice", "save_panel", "zoom_window"]


def middle_slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) -> the 2D slice through the middle of ``axis``."""
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def zoom_window(image: np.ndarray, fraction: float = 0.3) -> tuple[int, int, int, int]:
    """``(row, col, height, width)`` of the window of ``image`` (2D) with the most detail.

    Detail is the mean gradient magnitude inside the window; the window's sides are
    ``fraction`` of the image's (at least 4 pixels, at most the whole image). Ties (a flat
    image) go to the first window in row-major order.
    """
    from scipy.ndimage import uniform_filter

    if image.ndim != 2:
        raise ValueError(f"zoom_window: expected a 2D image, got shape {image.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"zoom_window: fraction must be in (0, 1], got {fraction}")
    rows, cols = image.shape
    h = min(rows, max(4, int(round(rows * fraction))))
    w = min(cols, max(4, int(round(cols * fraction))))
    gy, gx = np.gradient(np.asarray(image, dtype=np.float64))
    detail = uniform_filter(np.hypot(gy, gx), size=(h, w), mode="constant")
    # uniform_filter centres the window: keep the centres whose window lies inside the image
    centres = detail[h // 2 : rows - (h - 1 - h // 2), w // 2 : cols - (w - 1 - w // 2)]
    r, c = np.unravel_index(int(np.argmax(centres)), centres.shape)
    return int(r), int(c), h, w


_INSET = 0.42  # the inset's side, as a share of the image's


def inset_bounds(window: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """``(x0, y0, width, height)`` in axes coordinates of the inset: the image corner farthest
    from the framed ``window`` (so the inset never hides the region it enlarges)."""
    r, c, h, w = window
    rows, cols = shape[:2]
    # the window's centre in axes coordinates (x right, y up; row 0 is the top)
    x, y = (c + w / 2) / cols, 1.0 - (r + h / 2) / rows
    corners = [(x0, y0) for y0 in (0.0, 1.0 - _INSET) for x0 in (1.0 - _INSET, 0.0)]
    x0, y0 = max(corners, key=lambda xy: (xy[0] + _INSET / 2 - x) ** 2 + (xy[1] + _INSET / 2 - y) ** 2)
    return x0, y0, _INSET, _INSET


def save_panel(
    path: str | Path,
    images: Mapping[str, np.ndarray],
    *,
    reference: str | None = None,
    error_of: str | None = None,
    title: str | None = None,
    zoom: bool = True,
) -> Path:
    """Write 2D images side by side (grey, [0, 1] window), plus |error_of - reference|.

    Args:
        images: ``{column title: (X, Y) slice}``, all of one shape, in display order.
        reference: the column the error is measured against (and the zoom chosen on).
        error_of: the column whose absolute error is added as the last column.
        zoom: frame one region (:func:`zoom_window` of the reference, else of the first
            image) in every column and show it enlarged in the image corner farthest from it
            (:func:`inset_bounds`).

    The file is written to a temporary name and moved into place, so a reader never
    sees half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = {name: np.rot90(np.asarray(image, dtype=np.float32)) for name, image in images.items()}
    if error_of is not None and reference is not None:
        panels[f"|{error_of} - {reference}|"] = np.abs(panels[error_of] - panels[reference])
    window = None
    if zoom and panels:
        basis = panels[reference] if reference is not None else next(iter(panels.values()))
        window = zoom_window(basis)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels.items()):
        is_error = name.startswith("|")
        vmax = max(float(np.percentile(image, 99.5)), 1e-6) if is_error else 1.0
        style = {"cmap": "magma" if is_error else "gray", "vmin": 0.0, "vmax": vmax, "interpolation": "nearest"}
        ax.imshow(image, **style)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        if window is not None:
            r, c, h, w = window
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), w, h, fill=False, edgecolor="#ffcc00", linewidth=1.0))
            inset = ax.inset_axes(inset_bounds(window, image.shape))
            inset.imshow(image[r : r + h, c : c + w], **style)
            inset.set_xticks([])
            inset.set_yticks([])
            for spine in inset.spines.values():
                spine.set_edgecolor("#ffcc00")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
