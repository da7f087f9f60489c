"""Slice panels (LR | SR | [GAN-SR |] HR | error) as PNG files, for logs and reports.

As in the paper's figures, every image carries a zoomed inset of one region, framed on the
image: the same region in every column, chosen on the reference (the window with the most
detail, :func:`zoom_window`) so that it does not depend on any model's output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mdcsrn_lightning.atomic import atomic_path

__all__ = ["inset_bounds", "middle_slice", "pyplot", "safe_name", "save_figure", "save_panel", "zoom_window"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only ``Agg`` backend (imported late: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save ``fig`` to a temporary name and move it into place (a reader never sees half a PNG)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


def safe_name(text: str, fallback: str = "panel") -> str:
    """``text`` as a file name: runs of characters other than ``A-Za-z0-9._+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or fallback


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
    error_row: bool = False,
    title: str | None = None,
    zoom: bool = True,
) -> Path:
    """Write 2D images side by side (grey, [0, 1] window), plus their errors against ``reference``.

    Args:
        images: ``{column title: (X, Y) slice}``, all of one shape, in display order.
        reference: the column errors are measured against (and the zoom chosen on).
        error_of: the column whose absolute error is added as the last column (its own
            colour scale).
        error_row: a second row with ``|image - reference|`` under every other column, all
            on one colour scale (the 99.5th percentile of all of them, with a colour bar in
            the free slot under the reference) so that they compare with each other.
        zoom: frame one region (:func:`zoom_window` of the reference, else of the first
            image) in every column and show it enlarged in the image corner farthest from it
            (:func:`inset_bounds`).

    Written with :func:`save_figure` (atomically).
    """
    if (error_of is not None or error_row) and reference is None:
        raise ValueError("save_panel: error_of and error_row need a reference column")
    panels = {name: np.rot90(np.asarray(image, dtype=np.float32)) for name, image in images.items()}
    errors = {n: np.abs(v - panels[reference]) for n, v in panels.items() if n != reference} if error_row else {}
    if error_of is not None:
        panels[f"|{error_of} - {reference}|"] = np.abs(panels[error_of] - panels[reference])  # type: ignore[index]
    window = None
    if zoom and panels:
        window = zoom_window(panels[reference] if reference is not None else next(iter(panels.values())))
    plt = pyplot()
    rows = 2 if error_row else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(3.2 * len(panels), 3.6 * rows), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels.items()):
        _show(ax, name, image, window, error_vmax=_own_scale(image) if name.startswith("|") else None)
    if errors:
        shared = _own_scale(np.stack(list(errors.values())))
        for ax, name in zip(axes[1], panels):
            ax.axis("off")
            if name in errors:
                shown = _show(ax, f"|{name} - {reference}|", errors[name], window, error_vmax=shared)
        free = [ax for ax, name in zip(axes[1], panels) if name not in errors]
        holder = free[0] if free else axes[1, -1]
        fig.colorbar(shown, cax=holder.inset_axes((0.45, 0.05, 0.1, 0.9)), label="abs. error (reference scale)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _own_scale(errors: np.ndarray) -> float:
    """The top of an error map's colour scale: its 99.5th percentile (at least 1e-6)."""
    return max(float(np.percentile(errors, 99.5)), 1e-6)


def _show(ax: Any, name: str, image: np.ndarray, window: tuple[int, int, int, int] | None,
          error_vmax: float | None = None) -> Any:
    """One column: ``image`` (grey on [0, 1], or an error map on ``[0, error_vmax]``), titled
    ``name``, with the framed ``window`` and its enlarged inset; returns the drawn image."""
    from matplotlib.patches import Rectangle

    is_error = error_vmax is not None
    style = {"cmap": "magma" if is_error else "gray", "vmin": 0.0, "vmax": error_vmax if is_error else 1.0,
             "interpolation": "nearest"}
    shown = ax.imshow(image, **style)
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
    return shown
