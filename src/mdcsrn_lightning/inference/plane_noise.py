"""Noise matching for the plane network's pairs (``adapt.noise``; used by :mod:`.plane_data`).

A pair's input is the scan degraded once more along a sharp axis, so its noise is averaged
twice (by the scan's degradation and by the pair's), while the planes the network is run on
carry the scan's noise averaged once. Trained on the quieter inputs, the network takes the
scan's noise for detail. :func:`noise_stacks` holds noise that, added to a pair's input
(:func:`noisy`), brings its noise to the scan's: white noise degraded the way the pair's input
is (same axis, same slice grid), so the sum keeps the input's correlation, with variance
``sigma**2 * (1 - k)`` where ``k`` is the degradation's variance gain on white noise and
``sigma`` the scan's noise (:func:`scan_noise`). Below :mod:`.plane_data`, which degrades the
white noise. Pure numpy/torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

__all__ = ["noise_stacks", "noisy", "scan_noise"]

#: a 3x3 Laplacian-like mask orthogonal to planes and ramps; on white noise of std ``s`` its
#: response has std ``6 s`` (Immerkaer, CVIU 1996)
_MASK = np.outer([1.0, -2.0, 1.0], [1.0, -2.0, 1.0])


def scan_noise(scan: np.ndarray, axes: Sequence[int]) -> float:
    """The std of ``scan``'s noise (its units), from its planes spanned by ``axes`` (two axes
    along which the noise is white, the sharp ones): the median absolute response of
    :data:`_MASK` over every plane, as a Gaussian std. Structure leaks little into the median.
    Responses that touch an exact 0 are left out: a background set to 0 (masked, defaced or
    skull-stripped scans; 69 % of S1) holds no noise and would read as none. 0 where nothing is left."""
    a, b = axes
    planes = np.moveaxis(np.asarray(scan, dtype=np.float32), (a, b), (-2, -1))
    window = (1,) * (planes.ndim - 2) + (3, 3)
    response = scipy.ndimage.convolve(planes, _MASK.reshape(window), mode="nearest")[..., 1:-1, 1:-1]
    touches_zero = scipy.ndimage.maximum_filter(planes == 0, size=window)[..., 1:-1, 1:-1]
    kept = np.abs(response[~touches_zero])
    return float(np.median(kept)) / 0.6745 / 6.0 if kept.size else 0.0


def noise_stacks(shaped: Sequence[np.ndarray], sigma: float) -> list[Tensor]:
    """Noise to add to pairs' inputs, one ``(stack, H, W)`` stack for each of ``shaped`` (unit white
    noise degraded as those inputs are along ``H``), scaled so that its variance is
    ``sigma**2 * (1 - k)``, ``k`` the variance the degradation leaves of unit white noise (the
    variance of ``shaped``); empty when ``sigma`` is 0 or ``k >= 1``."""
    if sigma <= 0:
        return []
    stacks = []
    for unit in shaped:
        k = float(np.var(unit))
        if not 0 < k < 1:
            return []
        stacks.append(torch.from_numpy((unit * (sigma * math.sqrt((1 - k) / k))).astype(np.float32)))
    return stacks


def noisy(crop: Tensor, noise: Tensor, h: int, step: int, rng: np.random.Generator) -> Tensor:
    """``crop`` (``(P, P)``, its ``H`` starting at ``h``) plus a ``(P, P)`` crop of ``noise``
    (``(stack, H, W)``) at a random plane, ``W`` and sign, and an ``H`` start that differs from
    ``h`` by a multiple of ``step`` (the slices' grid, so that the noise's slices are the crop's)."""
    p = crop.shape[0]
    first = h % step
    h2 = first + step * int(rng.integers(0, (noise.shape[1] - p - first) // step + 1))
    i, w = int(rng.integers(noise.shape[0])), int(rng.integers(0, noise.shape[2] - p + 1))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return crop + sign * noise[i, h2:h2 + p, w:w + p]
