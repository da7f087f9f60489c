"""The slab of a scan held out for adaptation's self-validation (``adapt.holdout``): where it
lies (:func:`holdout_slab`), training windows that keep out of it (:func:`start_outside`), and
the held-out block scored (:func:`validation_crop`). Used by :mod:`.adapt` and
:mod:`.plane_data`; pure torch/numpy."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["holdout_slab", "start_outside", "validation_crop"]


def holdout_slab(target: Tensor, held: int, patch: int) -> tuple[int, int]:
    """``(start, stop)`` along axis 0 of the slab of ``held`` slices held out for self-validation:
    centred on the target's intensity centre along axis 0 (where the anatomy is: a slab at the
    volume's edge may hold only air), moved the least way that leaves a ``patch``-wide training
    patch on one side (:func:`~.adapt.check_patch_fits` has made sure that ``held + patch`` fit)."""
    n = target.shape[0]
    weights = target.detach().abs().double().sum(dim=tuple(range(1, target.ndim)))
    total = float(weights.sum())
    centre = float((weights * torch.arange(n, dtype=torch.float64)).sum()) / total if total > 0 else n / 2
    start = min(max(0, round(centre - held / 2)), n - held)
    if start < patch and n - start - held < patch:  # neither side holds a patch: move it the least way
        after_one, before_one = patch, n - held - patch  # the slab just after one patch, or just before one
        start = after_one if abs(after_one - start) <= abs(before_one - start) else before_one
    return start, start + held


def start_outside(n: int, length: int, slab: tuple[int, int], rng: np.random.Generator) -> int:
    """A random start of a ``length``-long window in ``[0, n)`` that does not overlap ``slab``
    (before it or after it, each start equally likely)."""
    before, after = max(0, slab[0] - length + 1), max(0, n - length + 1 - slab[1])
    i = int(rng.integers(0, before + after))
    return i if i < before else slab[1] + i - before


def validation_crop(x: Tensor, y: Tensor, slab: tuple[int, int], patch: int) -> tuple[Tensor, Tensor]:
    """The held-out ``slab`` along axis 0, its centre at most 2 * ``patch`` wide along axes 1, 2,
    as ``(1, 1, ...)`` batches (also the plane network's held-out slices: :mod:`.plane_data`)."""
    sl = [slice(*slab)]
    for n in x.shape[1:]:
        w = min(n, 2 * patch)
        sl.append(slice((n - w) // 2, (n - w) // 2 + w))
    return x[tuple(sl)][None, None], y[tuple(sl)][None, None]
