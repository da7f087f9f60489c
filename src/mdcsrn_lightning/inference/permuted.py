"""The adapted model's application (``adapt=true``, a k-space checkpoint): each degraded axis in turn.

A model adapted on the scan's own pairs (:mod:`.adapt`) restores whatever axis is in the
full-resolution slot (axis 2 for 2x2x1), so it is run once per degraded axis with that axis
swapped into the slot (:func:`apply_permuted`, :class:`PermutedInferer`). Its own module so that
an ensemble around it (``uncertainty=true``) enters each file once. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

from mdcsrn_lightning.inference.base import InferenceError, Inferer

__all__ = ["Apply", "PermutedInferer", "apply_permuted", "pair_factors"]

Apply = Callable[[np.ndarray], np.ndarray]


def pair_factors(factors: Sequence[float]) -> tuple[int, tuple[float, float, float]]:
    """``(full-resolution axis, factors of the self-supervised pairs)``: the last axis the
    checkpoint's ``factors`` leave at 1, reduced by the largest in-plane factor; (2, 2, 1) ->
    ``(2, (1, 1, 2))``. All factors > 1: an :class:`~.base.InferenceError` (one line)."""
    fs = [float(f) for f in factors]
    full = [ax for ax, f in enumerate(fs) if f == 1.0]
    if not full or len(full) == 3:
        raise InferenceError(f"adapt=true: factors {fs} leave {'no' if not full else 'every'} axis at full "
                             "resolution; the scan's own pairs need one full-resolution and one degraded axis")
    out = [1.0, 1.0, 1.0]
    out[full[-1]] = max(fs)
    return full[-1], tuple(out)  # type: ignore[return-value]


def _restore_along(apply: Apply, volume: np.ndarray, axis: int, full: int) -> np.ndarray:
    """``apply`` with ``axis`` swapped into the full-resolution slot ``full``, and back."""
    moved = np.ascontiguousarray(np.swapaxes(volume, axis, full))
    return np.ascontiguousarray(np.swapaxes(np.asarray(apply(moved), dtype=np.float32), axis, full))


def apply_permuted(apply: Apply, volume: np.ndarray, factors: Sequence[float], order: str = "01") -> np.ndarray:
    """The adapted model ``apply`` (which restores the full-resolution slot) run once per degraded
    axis, each swapped into that slot in turn: axis 0 first (``"01"``), axis 1 first (``"10"``),
    or the mean of both orders (``"average"``); ``(X, Y, Z)`` -> ``(X, Y, Z)`` float32."""
    full, _ = pair_factors(factors)
    axes = [ax for ax, f in enumerate(factors) if float(f) > 1.0]
    orders = {"01": [axes], "10": [axes[::-1]], "average": [axes, axes[::-1]]}[order]
    total = None
    for sequence in orders:
        out = np.asarray(volume, dtype=np.float32)
        for axis in sequence:
            out = _restore_along(apply, out, axis, full)
        total = out if total is None else total + out
    assert total is not None
    return (total / np.float32(len(orders))).astype(np.float32, copy=False)


class PermutedInferer(Inferer):
    """``inner`` applied by :func:`apply_permuted`: each degraded axis of ``factors`` in turn in the
    full-resolution slot (the adapted model of a k-space checkpoint)."""

    def __init__(self, inner: Inferer, factors: Sequence[float], order: str) -> None:
        self.inner, self.factors, self.order = inner, tuple(factors), order
        self.name, self.device = f"permuted[{inner.name}]", inner.device

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        return apply_permuted(self.inner, np.asarray(volume, dtype=np.float32), self.factors, self.order)
