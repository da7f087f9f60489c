"""Wall-clock timing of device work: CUDA kernels run asynchronously, so synchronise first."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["synchronize", "timed"]

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Wait for every queued kernel on ``device`` (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``(fn(), seconds)``; on CUDA the clock is read only after the device has finished.

    Without the synchronisation a CUDA forward returns as soon as its kernels are queued,
    and the time measured is the launch time, not the compute time.
    """
    synchronize(device)  # earlier queued work must not be billed to fn
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start
