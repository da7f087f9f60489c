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

__all__ = ["InferenceError", "Inferer", "predict_volume"]


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


def predict_volume(inferer: Inferer, lr: np.ndarray, *, scale: float | None = None) -> np.ndarray:
    """``(X, Y, Z)`` LR on its own intensity scale -> SR on the same scale, float32.

    ``scale`` divides the input and multiplies the output; default: the LR's own
    :func:`~mdcsrn_lightning.data.intensity.input_scale`, the rule training used.
    """
    if scale is None:
        scale = input_scale(lr)
    sr = inferer(np.asarray(lr, dtype=np.float32) / np.float32(scale))
    return (sr * np.float32(scale)).astype(np.float32, copy=False)
