"""Test-time ensembling over the symmetries of the degraded plane (``uncertainty=true``).

:class:`EnsembleInferer` wraps any inferer: it runs it on each transformed copy of the volume,
maps each output back, and returns their mean; :meth:`EnsembleInferer.mean_std` also gives
the per-voxel standard deviation across the copies, a measure of how much the network's
answer depends on the orientation of its input (a network that is exactly equivariant to
these transforms gives 0). Pure numpy/torch: no files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mdcsrn_lightning.inference.base import Inferer

__all__ = ["EnsembleInferer", "plane_symmetries", "symmetry_plane"]

# (quarter turns k, flip first) for the full dihedral group of a square plane, and for the
# four elements that keep a rectangular plane's shape (identity, the two flips, half turn)
_SQUARE = tuple((k, flip) for k in range(4) for flip in (False, True))
_RECTANGLE = tuple((k, flip) for k in (0, 2) for flip in (False, True))


def symmetry_plane(factors: Sequence[float]) -> tuple[int, int]:
    """The plane whose flips and quarter turns keep a degradation of these per-axis ``factors``:
    the two axes with equal factors ((2, 2, 1) -> (0, 1); (1, 1, 4), thick slices along axis 2,
    -> (0, 1); (1, 2, 2) -> (1, 2)); (0, 1) when all three are equal.

    Raises:
        ValueError: three different factors (no quarter turn keeps the degradation).
    """
    fs = [float(f) for f in factors]
    if len(fs) != 3:
        raise ValueError(f"factors: three numbers, got {list(factors)!r}")
    for plane in ((0, 1), (0, 2), (1, 2)):
        if fs[plane[0]] == fs[plane[1]]:
            return plane
    raise ValueError(f"factors {fs} have no two equal axes: no plane of symmetries to average over")


def plane_symmetries(shape: Sequence[int], axes: tuple[int, int] = (0, 1)) -> tuple[tuple[int, bool], ...]:
    """The transforms ``(quarter turns, flip)`` used on a volume of ``shape``: all 8 of the
    dihedral group when the plane's two axes have equal length, else the 4 that keep the
    shape (rotations by 90/270 degrees would swap the two axes)."""
    return _SQUARE if shape[axes[0]] == shape[axes[1]] else _RECTANGLE


class EnsembleInferer(Inferer):
    """``inferer(volume)``: the mean of ``inner`` over the symmetries of the plane ``axes``.

    Each element ``(k, flip)`` maps the volume by a flip along ``axes[0]`` (if ``flip``)
    then ``k`` quarter turns in the plane ``axes`` (``np.rot90``), runs ``inner`` and maps
    the output back by the inverse. The plane is the model's degraded plane: axes (0, 1) for
    the 2x2x1 degradation. With equal plane axes all 8 elements of the dihedral group are
    used, else the 4 that keep the shape (identity, flip of each axis, half turn);
    :func:`plane_symmetries`. The cost is ``len(symmetries)`` passes of ``inner``.

    ``mean_std(volume)`` returns ``(mean, std)``; the standard deviation is the population
    one (over the passes, ``ddof=0``), accumulated with Welford's update in float64, so
    identical passes give exactly 0 and only one output is held at a time besides the sums.
    """

    def __init__(self, inner: Inferer, axes: tuple[int, int] = (0, 1)) -> None:
        if len(set(axes)) != 2 or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"axes: two different axes of a 3D volume, got {axes!r}")
        self.inner, self.axes = inner, (int(axes[0]), int(axes[1]))
        self.name = f"ensemble[{inner.name}]"
        self.device = inner.device

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        return self.mean_std(volume)[0]

    def mean_std(self, volume: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """``(X, Y, Z)`` -> ``(mean, std)`` over the symmetries, both ``(X, Y, Z)`` float32."""
        x = torch.as_tensor(volume)
        if x.ndim != 3:
            raise ValueError(f"expected an (X, Y, Z) volume, got shape {tuple(x.shape)}")
        a0, a1 = self.axes
        mean = m2 = None
        elements = plane_symmetries(tuple(x.shape), self.axes)
        for n, (k, flip) in enumerate(elements, start=1):
            moved = torch.flip(x, (a0,)) if flip else x
            moved = torch.rot90(moved, k, (a0, a1)).contiguous()
            out = np.rot90(np.asarray(self.inner(moved)), -k, (a0, a1))
            out = (np.flip(out, a0) if flip else out).astype(np.float64)
            if mean is None:
                mean, m2 = out.copy(), np.zeros_like(out)
                continue
            delta = out - mean
            mean += delta / n
            m2 += delta * (out - mean)
        assert mean is not None and m2 is not None
        std = np.sqrt(np.maximum(m2, 0.0) / len(elements))
        return mean.astype(np.float32), std.astype(np.float32)
