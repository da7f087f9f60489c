"""The one intensity rule shared by training, evaluation and inference.

The network's input is the LR volume divided by :func:`input_scale` of that same LR volume,
and its output is multiplied back by it. Only the LR is used: at real inference there is no
HR to take a scale from, so training must not take one from it either. The training target
(the HR) is divided by the *LR's* scale too, so input and target share one unit.

Metrics are a separate matter: they compare SR and HR on the HR's own scale (its 99.9th
percentile), as the paper does; see ``evaluation/metrics.py``.

The rule is recorded in every new checkpoint (the data module's hyperparameter
``input_scale``: :data:`INPUT_SCALE_RULE`, or ``"none"`` for ``normalize=none``).
:func:`trained_input_scale` reads it back; a checkpoint written before the rule existed
(trained with the HR's percentile) is run under this rule with a one-line warning: the two
scales differ by a few percent (k-space truncation lowers the brightest voxels a little).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["INPUT_PERCENTILE", "INPUT_SCALE_RULE", "InputScaleRule", "input_scale", "trained_input_scale"]

log = logging.getLogger(__name__)

InputScaleRule = Literal["lr_p99.9", "none"]
# The name checkpoints record for this module's rule.
INPUT_SCALE_RULE: InputScaleRule = "lr_p99.9"

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


def trained_input_scale(settings: Mapping[str, Any], location: str = "checkpoint") -> InputScaleRule:
    """The rule a checkpoint's data settings record (``datamodule_hyper_parameters``).

    ``"none"`` for a model trained with ``normalize=none`` (raw intensities); else
    :data:`INPUT_SCALE_RULE`. A checkpoint of ``mdcsrn-train`` from before the rule was
    recorded (``normalize`` but no ``input_scale``) was trained with the HR's 99.9th
    percentile: it is run under this rule, and one warning line naming ``location`` says so.
    Settings without either key (a checkpoint that records no data settings) get the rule
    silently.

    Raises:
        ValueError: an ``input_scale`` this version does not know (a newer checkpoint).
    """
    rule = settings.get("input_scale")
    if rule is None:
        if settings.get("normalize") == "none":
            return "none"
        if "normalize" not in settings:  # no data settings at all: nothing to warn about
            return INPUT_SCALE_RULE
        log.warning(
            "%s: records no input_scale (older checkpoints were trained with the HR's 99.9th "
            "percentile); its input is divided by the LR's own 99.9th percentile",
            location,
        )
        return INPUT_SCALE_RULE
    if rule not in ("lr_p99.9", "none"):
        raise ValueError(f"{location}: unknown input_scale {rule!r} (this version knows 'lr_p99.9' and 'none')")
    return rule  # type: ignore[return-value]
