"""The one inferer interface: a volume in, a super-resolved volume out, on a device.

Modelled on MONAI's ``monai.inferers.Inferer``, with one difference: the network is bound
when the inferer is built (:func:`.build.build_inferer`), not passed to every call, because
an engine (ONNX Runtime, OpenVINO, a compiled graph, a block-streaming plan) is made from
the network once and then serves every volume.

Pure torch/numpy: no files, no Lightning, no Hydra.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from mdcsrn_lightning.data.intensity import input_scale

__all__ = ["InferenceError", "Inferer", "predict_volume", "predict_volume_std"]


class InferenceError(ValueError):
    """A bad inference request; the message is one line, ``"<file>: <problem>"``."""


class Inferer(ABC):
    """``inferer(volume)``: ``(X, Y, Z)`` LR volume on the network's intensity scale ->
    ``(X, Y, Z)`` float32 SR volume (numpy), computed on :attr:`device`."""

    #: a short label for logs and benchmark rows, e.g. ``patches[openvino]``
    name: str
    device: torch.device

    @abstractmethod
    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        """``(X, Y, Z)`` -> ``(X, Y, Z)`` float32."""

    def mean_std(self, volume: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """``(result, per-voxel standard deviation)``; ``None``: one pass, no spread to report
        (an ensemble, :class:`~.ensemble.EnsembleInferer`, returns its spread)."""
        return self(volume), None


def predict_volume(inferer: Inferer, lr: np.ndarray, *, scale: float | None = None) -> np.ndarray:
    """``(X, Y, Z)`` LR on its own intensity scale -> SR on the same scale, float32.

    ``scale`` divides the input and multiplies the output; default: the LR's own
    :func:`~mdcsrn_lightning.data.intensity.input_scale`, the rule training used.
    """
    return predict_volume_std(inferer, lr, scale=scale)[0]


def predict_volume_std(inferer: Inferer, lr: np.ndarray, *,
                       scale: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`predict_volume` and the inferer's per-voxel standard deviation
    (:meth:`Inferer.mean_std`; ``None`` for a single pass), both on the LR's scale."""
    if scale is None:
        scale = input_scale(lr)
    sr, std = inferer.mean_std(np.asarray(lr, dtype=np.float32) / np.float32(scale))
    sr = (sr * np.float32(scale)).astype(np.float32, copy=False)
    if std is not None:
        std = (std * np.float32(scale)).astype(np.float32, copy=False)
    return sr, std
