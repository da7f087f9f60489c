"""L1 pretraining of the generator (paper 4.1: Adam 1e-4, L1 loss, batch 6 of 40^3)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchio as tio
from torch import nn

from mdcsrn_lightning.checkpoints import load_generator
from mdcsrn_lightning.training.base import SRModule


class L1Module(SRModule):
    """Supervised training with ``L1(SR, HR)``; checkpoints are picked by ``val/mse``.

    Args:
        net: the generator.
        optimizer: a partial optimizer (``_partial_: true`` in config), called with the
            generator's parameters.
        scheduler: optional partial LR scheduler, called with the optimizer.
        init_ckpt: a trained checkpoint (``mdcsrn-train``'s or a released one) whose generator
            weights the run starts from (fine-tuning); its architecture must match ``net_config``.
        **kwargs: see :class:`SRModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        init_ckpt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if init_ckpt is not None:
            pretrained, _ = load_generator(init_ckpt, expected_config=self.net_config)
            self.net.load_state_dict(pretrained.state_dict())
        # partial optimizers stay out of the checkpoint: it must load with weights_only=True
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        lr = batch["lr"][tio.DATA]
        hr = batch["hr"][tio.DATA]
        loss = F.l1_loss(self(lr), hr)
        self.log("train/loss", loss, prog_bar=True, batch_size=lr.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
