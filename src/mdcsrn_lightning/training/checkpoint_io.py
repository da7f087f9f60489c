"""Lightning checkpoints written whole or not at all (the trainer's ``plugins``).

Lightning's own writer serialises to memory and hands the bytes to fsspec, whose local
"transaction" writes a temporary file elsewhere and moves it: across file systems that move
is a copy, and a full disk leaves a truncated ``last.ckpt`` at its final name. Here the bytes
go to a temporary file in the checkpoint's own folder, are fsynced and renamed over the old
file (:func:`mdcsrn_lightning.atomic.atomic_path`): a failure keeps the previous checkpoint
and raises a one-line :class:`~mdcsrn_lightning.atomic.WriteError` naming the file
(``"<run>/checkpoints/last.ckpt: no space left on device; ..."``).
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mdcsrn_lightning.atomic import atomic_path, remove_stale_temps

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose saves are atomic in the target folder (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        # serialise first: torch.save's own file writer reports a full disk as a RuntimeError
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        remove_stale_temps(os.path.dirname(os.fspath(path)) or ".")  # left by a killed run
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
