"""The global RNG states as checkpoint data, for an exact resume.

The TorchIO queue draws subject order, patch positions and augmentations from the global
torch / numpy / ``random`` generators (and the DataLoader draws its workers' base seed
from torch's), the gradient penalty its mixing weights from torch's. A resumed fit that
restores these states draws the same numbers as the uninterrupted run would have.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_states", "set_rng_states"]


def get_rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG states as tensors and plain Python data (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`get_rng_states` returned (the CUDA state only onto a CUDA ``device``)."""
    torch.set_rng_state(states["torch"].cpu())
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
