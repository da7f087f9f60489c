"""What both LightningModules share: the generator, whole-volume validation, panels, RNG states.

Exact resume: checkpoints hold the global RNG states (torch, numpy, ``random``; CUDA for
this device) and a resumed fit restores them (``restore_rng``), so the TorchIO queue
(subject order, patch positions, augmentations), the DataLoader's worker seeds and the
gradient penalty's mixing weights draw what an uninterrupted run would. Lightning creates
the train loader's iterator (one draw from torch's RNG) before ``on_train_epoch_start`` in
the first epoch of a run but after it in later epochs, so without the restore a resumed
epoch sees other patches. Exact for a checkpoint written at an epoch end with the queue
drained (a full epoch, ``last.ckpt``); a mid-epoch checkpoint cannot be, because the
queue's content is not saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.evaluation.panels import middle_slice, save_panel
from mdcsrn_lightning.models import count_parameters
from mdcsrn_lightning.training.loggers import log_panel
from mdcsrn_lightning.training.rng_state import get_rng_states, set_rng_states
from mdcsrn_lightning.training.timing import timed

METRICS = ("psnr", "ssim", "nrmse")
_RNG_KEY = "rng_states"


class SRModule(LightningModule):
    """Base for the L1 and WGAN-GP modules.

    Args:
        net: the generator, (B, 1, D, H, W) -> (B, 1, D, H, W).
        net_config: the generator's config (``_target_`` and arguments), stored in the
            checkpoint so inference can rebuild the architecture from the file alone.
        metric_axis: slices for PSNR/SSIM/NRMSE are taken along this axis. ``None``
            (the configs' default): the attached data module's ``slice_axis``, the axis
            perpendicular to the most degraded plane of ``data.factors`` (2 for (2, 2, 1),
            0 for (1, 2, 2)), read at ``setup``.
        channels_last: run the generator in ``torch.channels_last_3d`` memory format.
        compile: wrap the generator's forward in ``torch.compile``.
        restore_rng: checkpoints hold the RNG states and a resumed fit restores them (see
            the module docstring).
    """

    def __init__(
        self,
        net: nn.Module,
        net_config: dict[str, Any] | None = None,
        metric_axis: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        restore_rng: bool = True,
    ) -> None:
        super().__init__()
        if metric_axis is not None and (isinstance(metric_axis, bool) or metric_axis not in (0, 1, 2)):
            raise ValueError(f"metric_axis must be 0, 1, 2 or None (the data module's slice axis), got {metric_axis!r}")
        self.net = net
        self.net_config = net_config
        self.metric_axis = metric_axis
        self.channels_last = channels_last
        self.compile = compile
        self.restore_rng = bool(restore_rng)
        self._forward = net
        self._val_rows: list[dict[str, float]] = []
        self._test_rows: list[dict[str, float]] = []

    # -- generator -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._resolve_metric_axis()
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

    def _resolve_metric_axis(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_axis = getattr(datamodule, "slice_axis", None)
        if self.metric_axis is None:
            self.metric_axis = data_axis
        elif data_axis is not None and data_axis != self.metric_axis:
            rank_zero_warn(
                f"module.metric_axis={self.metric_axis} but the data's factors degrade the slices "
                f"along axis {data_axis}; metrics follow metric_axis (null follows the data)"
            )

    def _metric_axis(self) -> int:
        if self.metric_axis is None:
            raise ValueError(
                "metric_axis is None and no data module with a slice_axis is attached: pass "
                "metric_axis (0, 1 or 2) or fit with an SRDataModule"
            )
        return self.metric_axis

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["net_config"] = self.net_config
        checkpoint[_RNG_KEY] = get_rng_states(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only when resuming a fit: a test/validate/predict from a checkpoint leaves the RNGs alone
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if self.restore_rng and fitting and _RNG_KEY in checkpoint:
            set_rng_states(checkpoint[_RNG_KEY], self.device)

    # -- whole-volume evaluation ---------------------------------------------------
    def _evaluate_batch(
        self, batch: dict[str, Any]
    ) -> tuple[list[dict[str, float]], dict[str, np.ndarray], torch.Tensor]:
        """One metrics row per volume of the batch, the first volume on the host (LR, SR,
        HR; for panels) and SR ``(B, 1, X, Y, Z)`` on the device.

        ``seconds`` of each row is the batch's forward time divided by ``B`` (synchronised
        on CUDA, see :func:`~mdcsrn_lightning.training.timing.timed`).
        """
        # Scored as mdcsrn-infer / mdcsrn-eval run the model and score it (float32), whatever the
        # training precision: under trainer.precision=bf16-mixed Lightning runs validation and test
        # inside bf16 autocast, which would score bf16 inference (and SSIM's convolutions in bf16)
        # and pick checkpoints by that.
        with torch.autocast(batch["lr"][tio.DATA].device.type, enabled=False):
            return self._evaluate_batch_fp32(batch)

    def _evaluate_batch_fp32(
        self, batch: dict[str, Any]
    ) -> tuple[list[dict[str, float]], dict[str, np.ndarray], torch.Tensor]:
        lr = batch["lr"][tio.DATA].float()
        hr = batch["hr"][tio.DATA]
        sr, seconds = timed(lambda: self(lr), lr.device)
        axis = self._metric_axis()
        rows: list[dict[str, float]] = []
        first: dict[str, np.ndarray] = {}
        for i in range(hr.shape[0]):
            volumes = {name: t[i, 0].float().cpu().numpy() for name, t in (("LR", lr), ("SR", sr), ("HR", hr))}
            row = {"mse": float(np.mean((volumes["SR"] - volumes["HR"]) ** 2)), "seconds": seconds / hr.shape[0]}
            for prefix, key in (("", "SR"), ("input_", "LR")):
                scores = slice_metrics(volumes[key], volumes["HR"], axis=axis, scale=self.metric_scale(batch, i))
                row.update({f"{prefix}{m}": float(scores[m]) for m in METRICS})
            rows.append(row)
            first = first or volumes
        return rows, first, sr

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
        rows, volumes, _ = self._evaluate_batch(batch)
        self._val_rows.extend(rows)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_panel(volumes, f"val_epoch{self.current_epoch:03d}")

    def on_validation_epoch_end(self) -> None:
        self._log_rows("val", self._val_rows)
        self._val_rows.clear()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows, volumes, _ = self._evaluate_batch(batch)
        self._test_rows.extend(rows)
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
        images = {k: np.clip(middle_slice(v, self._metric_axis()), 0.0, 1.0) for k, v in volumes.items()}
        path = save_panel(
            self.panel_dir() / f"{name}.png", images, reference="HR", error_of=error_of, title=name
        )
        # W&B and TensorBoard show it as an image on the step axis, MLflow keeps the file
        log_panel(self.loggers, path, key="test/panel" if name == "test" else "val/panel", caption=name,
                  step=self.global_step)
