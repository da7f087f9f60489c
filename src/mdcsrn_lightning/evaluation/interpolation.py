"""The non-learned baselines: degrade HR and interpolate back, then score like the models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mdcsrn_lightning.data.degradation import Interpolation, degrade
from mdcsrn_lightning.evaluation.metrics import slice_metrics

# The paper's names for each interpolation, as reported in tables.
BASELINE_NAMES: dict[str, str] = {
    "nearest": "nearest",
    "linear": "trilinear",
    "cubic": "tricubic",
    "zero_filled": "zero_filled",
}


def interpolation_scores(
    hr: np.ndarray,
    factors: Sequence[float],
    methods: Sequence[Interpolation],
    axis: int = 2,
    scale: float | None = None,
) -> dict[str, dict[str, float]]:
    """Score each interpolation of one (X, Y, Z) HR volume: ``{name: {"psnr", "ssim", "nrmse"}}``.

    ``scale``: as in :func:`slice_metrics` (``None``: the HR's own 99.9th percentile).
    """
    return {
        BASELINE_NAMES[m]: slice_metrics(degrade(hr, factors=factors, interpolation=m), hr, axis=axis, scale=scale)
        for m in methods
    }
