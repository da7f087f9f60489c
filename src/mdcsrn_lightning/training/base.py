"""What both LightningModules share: the generator, whole-volume validation, panels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.evaluation.panels import middle_slice, save_panel
from mdcsrn_lightning.models import count_parameters

METRICS = ("psnr", "ssim", "nrmse")


class SRModule(LightningModule):
    """Base for the L1 and WGAN-GP modules.

    Args:
        net: the generator, (B, 1, D, H, W) -> (B, 1, D, H, W).
        net_config: the generator's config (``_target_`` and arguments), stored in the
            checkpoint so inference can rebuild the architecture from the file alone.
        metric_axis: slices for PSNR/SSIM/NRMSE are taken along this axis (the one
            perpendicular to the degraded plane: 2 for factors (2, 2, 1)).
        channels_last: run the generator in ``torch.channels_last_3d`` memory format.
        compile: wrap the generator's forward in ``torch.compile``.
    """

    def __init__(
        self,
        net: nn.Module,
        net_config: dict[str, Any] | None = None,
        metric_axis: int = 2,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if metric_axis not in (0, 1, 2):
            raise ValueError(f"metric_axis must be 0, 1 or 2, got {metric_axis}")
        self.net = net
        self.net_config = net_config
        self.metric_axis = metric_axis
        self.channels_last = channels_last
        self.compile = compile
        self._forward = net
        self._val_rows: list[dict[str, float]] = []
        self._test_rows: list[dict[str, float]] = []

    # -- generator -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
        if self.compile and self._forward is self.net:
            self._forward = torch.compile(self.net)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) LR on the HR grid -> (B, 1, D, H, W) SR."""
        if self.channels_last:
            lr = lr.contiguous(memory_format=torch.channels_last_3d)
        return self._forward(lr)

    def on_fit_start(self) -> None:
        n = count_parameters(self.net)
        for logger in self.loggers:
            logger.log_hyperparams({"params": n, "params_M": round(n / 1e6, 2)})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["net_config"] = self.net_config

    # -- whole-volume evaluation ---------------------------------------------------
    def _evaluate_subject(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, float], dict[str, np.ndarray], torch.Tensor]:
        """Metrics row, the volumes on the host (LR, SR, HR; for panels) and SR on the device."""
        lr = batch["lr"][tio.DATA]
        hr = batch["hr"][tio.DATA]
        start = time.perf_counter()
        sr = self(lr)
        seconds = time.perf_counter() - start
        row = {"mse": float(torch.mean((sr.float() - hr.float()) ** 2)), "seconds": seconds}
        volumes = {name: t[0, 0].float().cpu().numpy() for name, t in (("LR", lr), ("SR", sr), ("HR", hr))}
        scale = self.metric_scale(batch)
        for prefix, key in (("", "SR"), ("input_", "LR")):
            scores = slice_metrics(volumes[key], volumes["HR"], axis=self.metric_axis, scale=scale)
            row.update({f"{prefix}{m}": float(scores[m]) for m in METRICS})
        return row, volumes, sr

    @staticmethod
    def metric_scale(batch: dict[str, Any], index: int = 0) -> float | None:
        """The HR's intensity reference of volume ``index`` of ``batch``, in the batch's units.

        The data module divides LR and HR by the LR's own percentile (the network's input
        rule) and hands the HR's reference in those units as ``metric_scale``: metrics stay
        on the HR's own scale (for a slab of the embedded template, the whole template's).
        ``None`` (the HR's own 99.9th percentile) for batches that do not carry it.
        """
        value = batch.get("metric_scale")
        if value is None:
            return None
        return float(value[index]) if isinstance(value, (torch.Tensor, list, tuple)) else float(value)

    def _log_rows(self, stage: str, rows: list[dict[str, float]]) -> None:
        if not rows:
            return
        for key in rows[0]:
            value = float(np.mean([r[key] for r in rows]))
            self.log(f"{stage}/{key}", value, prog_bar=key in ("psnr", "mse"), sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        row, volumes, _ = self._evaluate_subject(batch)
        self._val_rows.append(row)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_panel(volumes, f"val_epoch{self.current_epoch:03d}")

    def on_validation_epoch_end(self) -> None:
        self._log_rows("val", self._val_rows)
        self._val_rows.clear()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        row, volumes, _ = self._evaluate_subject(batch)
        self._test_rows.append(row)
        if batch_idx == 0:
            self._log_panel(volumes, "test")

    def on_test_epoch_end(self) -> None:
        self._log_rows("test", self._test_rows)
        self.test_rows = list(self._test_rows)
        self._test_rows.clear()

    # -- panels ----------------------------------------------------------------------
    def panel_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "panels"

    def _log_panel(self, volumes: dict[str, np.ndarray], name: str, error_of: str = "SR") -> None:
        if not self.trainer.is_global_zero:
            return
        images = {k: np.clip(middle_slice(v, self.metric_axis), 0.0, 1.0) for k, v in volumes.items()}
        path = save_panel(
            self.panel_dir() / f"{name}.png", images, reference="HR", error_of=error_of, title=name
        )
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/panel", images=[str(path)], caption=[name])
