"""The exact whole-volume pass as an inferer: a slab runner (eager :mod:`.streaming` or OpenVINO
:mod:`.block_stream`) over the volume, on the runner's device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from mdcsrn_lightning.inference.base import Inferer
from mdcsrn_lightning.inference.patches import checked_volume, progress_bar

__all__ = ["ExactInferer", "SlabRunner"]


class SlabRunner(Protocol):
    """An exact whole-volume pass over (B, C, D, H, W), slab by slab along D."""

    name: str
    device: torch.device

    def __call__(self, x: Tensor, progress: Callable[[int], object] | None = None) -> Tensor: ...


class ExactInferer(Inferer):
    """``inferer(volume)``: ``(X, Y, Z)`` -> ``(X, Y, Z)`` float32 by ``runner``; ``progress``: a
    bar of the slices done on stderr."""

    def __init__(self, runner: SlabRunner, progress: bool = False) -> None:
        self.runner, self.progress = runner, progress
        self.name, self.device = runner.name, runner.device

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        x = checked_volume(volume, self.device)[None, None]
        with progress_bar(x.shape[2], self.progress, "slice") as bar:
            out = self.runner(x, bar.update)
        return out[0, 0].float().cpu().numpy()
