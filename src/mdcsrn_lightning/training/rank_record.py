"""What each DDP rank did, one JSON file per rank: the subjects it drew, its losses, its weights.

Multi-node runs fail quietly: two ranks that draw the same subjects, or whose weights drift
apart, still train and still write a checkpoint (rank 0's). :class:`RankRecord` writes
``<dirpath>/rank<global_rank>.json`` on every rank so that such a run can be checked
afterwards (``tests/test_multinode.py`` does)::

    mdcsrn-train trainer=ddp trainer.num_nodes=2 callbacks=[default,rank_record]

File layout (rewritten whole at every epoch end and at the end of fit)::

    {"global_rank": 0, "world_size": 2, "node_rank": 0, "local_rank": 0,
     "epochs": {"0": {"first_step": 0, "last_step": 2, "subjects": ["slab_1", ...],
                       "patches": {"slab_1": 4, ...}, "losses": [0.31, 0.29]}},
     "weights": {"net": {"parameters": "<sha256>", "buffers": "<sha256>"}, ...}}

``subjects`` are the names of the training batches' subjects (``batch["name"]``, one per
patch), ``losses`` the rank's own training loss of each step (this rank's share of the
global batch; ``null`` entries for steps that return no loss, e.g. manual optimisation),
``weights`` the SHA-256 of each top-level submodule's parameters and, separately, buffers
(BatchNorm running statistics are per rank unless ``trainer.sync_batchnorm=true``).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from mdcsrn_lightning.atomic import write_json

__all__ = ["RankRecord", "tensor_digest"]


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes in order (dtype and shape included, so a reshaped copy differs)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _module_digests(module: nn.Module) -> dict[str, dict[str, str]]:
    """``{child: {"parameters": sha, "buffers": sha}}`` for each top-level child holding tensors."""
    out: dict[str, dict[str, str]] = {}
    for name, child in module.named_children():
        params = [p for _, p in child.named_parameters()]
        buffers = [b for _, b in child.named_buffers()]
        if params or buffers:
            out[name] = {"parameters": tensor_digest(params), "buffers": tensor_digest(buffers)}
    return out


def _loss_of(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class RankRecord(Callback):
    """Writes ``<dirpath>/rank<global_rank>.json`` on every rank (see the module docstring).

    Args:
        dirpath: folder of the per-rank files (created); e.g. ``${paths.output_dir}/ranks``.
    """

    def __init__(self, dirpath: str | os.PathLike[str]) -> None:
        super().__init__()
        if not str(dirpath):
            raise ValueError("dirpath must be a folder, got an empty string")
        self.dirpath = Path(dirpath)
        self.record: dict[str, Any] = {"epochs": {}, "weights": {}}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.record.update(
            global_rank=int(trainer.global_rank), world_size=int(trainer.world_size),
            node_rank=int(trainer.node_rank), local_rank=int(trainer.local_rank),
        )

    def _epoch(self, trainer: Trainer) -> dict[str, Any]:
        return self.record["epochs"].setdefault(
            str(trainer.current_epoch),
            {"first_step": int(trainer.global_step), "last_step": None, "subjects": [], "patches": {}, "losses": []},
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        epoch = self._epoch(trainer)
        names = batch.get("name") if isinstance(batch, dict) else None
        if names is not None:
            counts = Counter(epoch["patches"])
            counts.update(str(n) for n in names)
            epoch["patches"] = dict(sorted(counts.items()))
            epoch["subjects"] = sorted(counts)
        epoch["losses"].append(_loss_of(outputs))
        epoch["last_step"] = int(trainer.global_step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch(trainer)["last_step"] = int(trainer.global_step)
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["weights"] = _module_digests(pl_module)
        self.record["global_step"] = int(trainer.global_step)
        write_json(self.dirpath / f"rank{trainer.global_rank}.json", self.record)
