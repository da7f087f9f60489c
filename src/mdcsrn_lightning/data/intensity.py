"""The one intensity rule shared by training, evaluation and inference.

The network's input is the LR volume divided by :func:`input_scale` of that same LR volume,
and its output is multiplied back by it. Only the LR is used: at real inference there is no
HR to take a scale from, so training must not take one from it either. The training target
(the HR) is divided by the *LR's* scale too, so input and target share one unit.

Metrics are a separate matter: they compare SR and HR on the HR's own scale (its 99.9th
percentile), as the paper does; see ``evaluation/metrics.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["INPUT_PERCENTILE", "input_scale"]

# The 99.9th percentile ignores a few hot voxels (vessels, fat, artefacts) yet tracks the
# bright tissue; k-space truncation lowers it by only a few percent against the HR's.
INPUT_PERCENTILE = 99.9


def input_scale(lr: np.ndarray | torch.Tensor, location: str = "volume", percentile: float = INPUT_PERCENTILE) -> float:
    """The number an LR volume (any shape) is divided by before the network.

    Args:
        lr: the network's input before normalisation, on the LR's own intensity scale.
        location: named in the error (a file path).
        percentile: which percentile of ``lr`` (default 99.9).

    Raises:
        ValueError: the percentile is not a finite positive number (an empty, all-zero or
            negative volume), with ``location`` in the message.
    """
    values = lr.detach().float().cpu().numpy() if isinstance(lr, torch.Tensor) else np.asarray(lr)
    scale = float(np.percentile(values, percentile))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{location}: the {percentile}th percentile of the LR intensities is {scale:g}; "
            "cannot normalise an empty (all-zero) or negative volume"
        )
    return scale
