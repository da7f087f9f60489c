"""The non-learned baselines: degrade HR and interpolate back, then score like the models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mdcsrn_lightning.data.degradation import Interpolation, degrade
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.evaluation.tables import BASELINES

_NAME_OF = {interp: name for name, interp in BASELINES.items()}


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
        _NAME_OF[m]: slice_metrics(degrade(hr, factors=factors, interpolation=m), hr, axis=axis, scale=scale)
        for m in methods
    }
