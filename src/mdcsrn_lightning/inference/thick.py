"""Thick-slice scans at inference: which scans they are, their fine grid, the axis permutation.

A scan is a *thick-slice scan* when one axis's voxel size is at least :data:`THICK_RATIO`
times both others and those two agree within :data:`INPLANE_TOLERANCE` (:func:`thick_axis`).

Its fine grid subdivides every thick slice into ``f = round(s_thick / s_inplane)`` voxels
along that axis (``upsample_shape=`` may set another multiple of the slice count): slice ``k``
becomes fine voxels ``k*f .. k*f + f - 1``, centred at the slice centre plus
``(m - (f - 1) / 2) * s_thick / f``, ``m = 0 .. f - 1``. So fine voxel ``x`` sits at slice
coordinate ``x / f - (f - 1) / (2 f)``, the grid the slices were acquired from in training
(``data/slices.py``: slice ``k`` is centred on fine voxels ``k*f .. k*f + f - 1``). The
coarse-matrix path differs: there fine voxel ``x`` sits at coarse coordinate ``x * M / N``,
fine voxel 0 on coarse voxel 0's centre (k-space sampling, ``data/degradation.py``).

The network is run with the scan's thick axis swapped into the slot the checkpoint's thick
axis had in training (:meth:`ThickPlan.to_model`, undone by :meth:`ThickPlan.from_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mdcsrn_lightning.data.slices import SliceInterpolation, slices_to_fine

__all__ = ["INPLANE_TOLERANCE", "THICK_RATIO", "ThickPlan", "describe_scan", "plan_thick", "thick_axis"]

#: the thick axis's voxel size is at least this many times both in-plane ones
THICK_RATIO = 1.5
#: the two in-plane voxel sizes differ by at most this fraction of the larger
INPLANE_TOLERANCE = 0.10


def thick_axis(voxel_sizes: Sequence[float]) -> int | None:
    """The thick axis of a thick-slice scan with these voxel sizes (mm), else ``None``."""
    v = [float(z) for z in voxel_sizes[:3]]
    for ax in range(3):
        b, c = (v[i] for i in range(3) if i != ax)
        if abs(b - c) <= INPLANE_TOLERANCE * max(b, c) and v[ax] >= THICK_RATIO * max(b, c):
            return ax
    return None


def describe_scan(voxel_sizes: Sequence[float]) -> str:
    """``"voxel sizes [1, 1, 4] mm: thick slices along axis 2"`` or ``"... mm: no thick axis"``."""
    sizes = "[" + ", ".join(f"{float(z):.3g}" for z in voxel_sizes[:3]) + "] mm"
    ax = thick_axis(voxel_sizes)
    return f"voxel sizes {sizes}: " + (f"thick slices along axis {ax}" if ax is not None else
                                      f"no thick axis (none >= {THICK_RATIO}x two in-plane sizes within "
                                      f"{INPLANE_TOLERANCE:.0%})")


@dataclass(frozen=True)
class ThickPlan:
    """One thick-slice scan's fine grid: ``axis`` (the scan's thick axis), ``factor`` (fine
    voxels per slice), ``model_axis`` (the network's thick axis), ``shape`` (the fine grid)."""

    axis: int
    factor: int
    model_axis: int
    shape: tuple[int, int, int]

    @property
    def factors(self) -> list[float]:
        return [float(self.factor) if ax == self.axis else 1.0 for ax in range(3)]

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The fine grid in the network's axis order (what :meth:`to_model` gives)."""
        out = list(self.shape)
        out[self.axis], out[self.model_axis] = out[self.model_axis], out[self.axis]
        return tuple(out)  # type: ignore[return-value]

    def fine_input(self, coarse: np.ndarray, interpolation: SliceInterpolation) -> np.ndarray:
        """The scan on the fine grid, in the scan's axis order (``slices_to_fine`` along ``axis``)."""
        return slices_to_fine(coarse, self.factor, self.axis, interpolation, self.shape[self.axis])

    def to_model(self, volume: np.ndarray) -> np.ndarray:
        """Scan axis order -> the network's (thick axis in ``model_axis``'s slot)."""
        return np.ascontiguousarray(np.swapaxes(volume, self.axis, self.model_axis))

    def from_model(self, volume: np.ndarray) -> np.ndarray:
        """The network's axis order -> the scan's (a swap is its own inverse)."""
        return np.ascontiguousarray(np.swapaxes(volume, self.axis, self.model_axis))

    def offset(self) -> list[float]:
        """Coarse voxel coordinate of fine voxel 0, per axis: ``-(f - 1) / (2 f)`` on the thick axis."""
        return [-(self.factor - 1) / (2.0 * self.factor) if ax == self.axis else 0.0 for ax in range(3)]


def plan_thick(shape: Sequence[int], voxel_sizes: Sequence[float], model_axis: int,
               upsample_shape: Sequence[int] | None = None) -> ThickPlan:
    """The :class:`ThickPlan` of a scan of ``shape`` and ``voxel_sizes``; ``ValueError`` (one line,
    no file name) when it is not a thick-slice scan or ``upsample_shape`` does not fit it."""
    coarse = tuple(int(n) for n in shape[:3])
    ax = thick_axis(voxel_sizes)
    if ax is None:
        raise ValueError(describe_scan(voxel_sizes))
    inplane = np.mean([float(voxel_sizes[i]) for i in range(3) if i != ax])
    factor = max(1, int(round(float(voxel_sizes[ax]) / inplane)))
    fine = tuple(n * factor if i == ax else n for i, n in enumerate(coarse))
    if upsample_shape is not None:
        given = tuple(int(n) for n in upsample_shape)
        if len(given) != 3 or any(given[i] != coarse[i] for i in range(3) if i != ax) or given[ax] < coarse[ax] \
                or given[ax] % coarse[ax]:
            raise ValueError(f"upsample_shape {list(given)} must keep the in-plane size and give the thick "
                             f"axis {ax} a multiple of its {coarse[ax]} slices (default {list(fine)})")
        fine, factor = given, given[ax] // coarse[ax]
    return ThickPlan(axis=ax, factor=factor, model_axis=int(model_axis), shape=fine)  # type: ignore[arg-type]
