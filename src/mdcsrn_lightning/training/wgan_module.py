"""mDCSRN-GAN: WGAN-GP fine-tuning of an L1-trained generator (paper 3.3, 4.1).

One ``training_step`` is one update, of the critic or of the generator; which one is
decided by :func:`~mdcsrn_lightning.training.gan_schedule.next_update` from two counters,
``critic_steps`` and ``generator_steps``. They are the whole schedule state: plain ints
on the module, written to the checkpoint (``checkpoint["gan_schedule"]``) and read back
on resume, so a resumed run continues the schedule exactly. Lightning's ``global_step``
counts the updates of both optimizers (``critic_steps + generator_steps``), so
``trainer.max_steps`` counts updates; ``max_generator_steps`` is what ends GAN training
(the module sets ``trainer.should_stop``).

Losses (``D`` the critic, ``G`` the generator, SR = G(LR))::

    critic     D(SR) - D(HR) + gp_weight * GP(HR, SR)          (SR detached)
    generator  L1(SR, HR) + adversarial_weight * (-D(SR))

DDP without ``find_unused_parameters``: the critic's parameters are left out of DDP's
gradient reducer (``_ddp_params_and_buffers_to_ignore``) and their gradients are averaged
over the processes here (one flat all-reduce after each critic backward; the critic's
initial weights are broadcast from rank 0 at fit start). DDP's reducer then only knows
the generator, and every backward either uses all of the generator (generator step) or
none of it (critic step: SR is computed under ``torch.no_grad``, so no reducer hook fires
and none is expected). In the generator step the critic's ``requires_grad`` is switched
off (``toggle_optimizer``), so no critic weight gradients are computed at all.

Exact resume: besides the counters, checkpoints hold the global RNG states, restored on
resume, as for every :class:`~mdcsrn_lightning.training.base.SRModule`.

Critic steps leave the generator exactly as it was: SR is computed under ``no_grad`` in
train mode (the same function of the batch as in the generator's own step, so the critic
learns on what the adversarial term will push), and the generator's buffers (BatchNorm
running statistics, ``num_batches_tracked``) are put back afterwards, so they do not drift
through the 10k critic-only warm-up updates nor the 5 critic updates of every cycle.

Lightning warns "Found N module(s) in eval mode at the start of training": that is the
frozen copy of the initial generator (``l1_net``, the panels' "SR"), kept in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchio as tio
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from mdcsrn_lightning.checkpoints import load_generator
from mdcsrn_lightning.sizes import triple
from mdcsrn_lightning.training.base import SRModule
from mdcsrn_lightning.training.gan_schedule import GanSchedule, next_update
from mdcsrn_lightning.training.gradient_penalty import gradient_penalty

__all__ = ["WGANGPModule"]

_STATE_KEY = "gan_schedule"


@contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` (BatchNorm running statistics, counters) back on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class WGANGPModule(SRModule):
    """WGAN-GP training of the generator ``net`` against ``discriminator``.

    Args:
        net: the generator.
        discriminator: the critic, (B, 1, D, H, W) -> (B, 1) (e.g. ``Discriminator3D``).
        optimizer: partial optimizer of the generator (paper: Adam, lr 5e-6). The name
            matches :class:`L1Module`'s, so experiment files that tune
            ``module.optimizer`` work with either loss.
        critic_optimizer: partial optimizer of the critic (the paper gives none; the
            config uses WGAN-GP's Adam lr 1e-4, betas (0.5, 0.9)).
        init_ckpt: an ``mdcsrn-train`` checkpoint (L1 pretraining) to start the generator
            from; it must hold the same architecture as ``net_config``
            (:class:`~mdcsrn_lightning.checkpoints.CheckpointError` otherwise).
            ``None`` starts from the freshly initialised generator, with a warning.
        adversarial_weight: lambda of the generator loss (paper: 0.1).
        gp_weight: weight of the gradient penalty (paper: 10).
        critic_warmup_steps, critic_per_generator, burst_every, burst_steps: the schedule,
            see :mod:`~mdcsrn_lightning.training.gan_schedule` (paper: 10000, 5, 500, 200).
        max_generator_steps: generator updates after which training stops (paper: 200k).
        em_patch_size: size of the crops (an int for a cube, or 3 ints) on which
            validation evaluates the critic for ``val/em_distance`` (clamped to the
            volume's size per axis). The configs set it to ``data.patch_size``: the critic
            is trained on those patches, and its scores (a dense head after adaptive
            pooling) are only calibrated for inputs of that size. The same value
            is logged as ``val/em_distance_gan`` once the generator has had a GAN update
            (+inf before: the checkpoint monitor, see ``on_validation_epoch_end``).
        em_crops: crops per validation subject: the centre crop, then ``em_crops - 1``
            random ones (drawn from a generator seeded by the subject's index, so
            validation does not touch the global RNG and is the same every epoch).
        net_config: the generator's config (see :class:`SRModule`); ``init_ckpt`` must match it.
        **kwargs: see :class:`SRModule` (``metric_axis``, ``channels_last``, ``compile``,
            ``restore_rng``).
    """

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        critic_optimizer: Callable[..., torch.optim.Optimizer],
        init_ckpt: str | None = None,
        adversarial_weight: float = 0.1,
        gp_weight: float = 10.0,
        critic_warmup_steps: int = 10_000,
        critic_per_generator: int = 5,
        burst_every: int = 500,
        burst_steps: int = 200,
        max_generator_steps: int = 200_000,
        em_patch_size: int | Sequence[int] = 40,
        em_crops: int = 1,
        net_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, net_config=net_config, **kwargs)
        # the optimizer partials stay out: checkpoints then load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["net", "discriminator", "optimizer", "critic_optimizer"], logger=False)
        self.automatic_optimization = False
        if isinstance(em_crops, bool) or not isinstance(em_crops, int) or em_crops < 1:
            raise ValueError(f"em_crops must be an int >= 1, got {em_crops!r}")
        if max_generator_steps < 0:
            raise ValueError(f"max_generator_steps must be >= 0, got {max_generator_steps}")
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.critic_optimizer_factory = critic_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.gp_weight = float(gp_weight)
        self.schedule = GanSchedule(
            critic_warmup_steps=critic_warmup_steps,
            critic_per_generator=critic_per_generator,
            burst_every=burst_every,
            burst_steps=burst_steps,
        )
        self.max_generator_steps = int(max_generator_steps)
        self.em_patch_size = triple(em_patch_size, "em_patch_size")
        self.em_crops = int(em_crops)
        # the schedule state: updates done so far (saved in / restored from checkpoints)
        self.critic_steps = 0
        self.generator_steps = 0

        if init_ckpt is None:
            rank_zero_warn(
                "module.init_ckpt is null: the GAN starts from an untrained generator. The paper "
                "fine-tunes an L1-trained one: pass module.init_ckpt=<run>/checkpoints/<best>.ckpt."
            )
        else:
            pretrained, _ = load_generator(init_ckpt, expected_config=net_config)
            self.net.load_state_dict(pretrained.state_dict())
        # the generator as it started (the L1 model): the "SR" column of the panels
        self.l1_net = copy.deepcopy(self.net).eval().requires_grad_(False)

        # DDP reduces the generator's gradients only; the critic's are averaged in
        # _average_critic_grads (see the module docstring). The frozen copy needs no DDP.
        self._ddp_params_and_buffers_to_ignore = [
            f"{prefix}.{name}"
            for prefix, module in (("discriminator", self.discriminator), ("l1_net", self.l1_net))
            for name, _ in [*module.named_parameters(), *module.named_buffers()]
        ]

    # -- modes, optimizers ----------------------------------------------------------
    def train(self, mode: bool = True) -> WGANGPModule:
        super().train(mode)
        self.l1_net.eval()  # frozen: BN keeps its running statistics
        return self

    def configure_optimizers(self) -> Any:
        opt_g = self.optimizer_factory(params=self.net.parameters())
        opt_d = self.critic_optimizer_factory(params=self.discriminator.parameters())
        return [opt_g, opt_d]

    # -- distributed ----------------------------------------------------------------
    @staticmethod
    def _world_size() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._world_size() > 1:
            # DDP broadcasts only what it manages; the critic must start equal everywhere
            for tensor in [*self.discriminator.parameters(), *self.discriminator.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def _average_critic_grads(self) -> None:
        world = self._world_size()
        if world == 1:
            return
        grads = [p.grad for p in self.discriminator.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    # -- training -------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.generator_steps >= self.max_generator_steps:
            self.trainer.should_stop = True
            return -1  # skip the rest of the epoch
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        lr = batch["lr"][tio.DATA]
        hr = batch["hr"][tio.DATA]
        opt_g, opt_d = self.optimizers()
        if next_update(self.critic_steps, self.generator_steps, self.schedule) == "critic":
            self._critic_step(lr, hr, opt_d)
            self.critic_steps += 1
        else:
            self._generator_step(lr, hr, opt_g)
            self.generator_steps += 1
            if self.generator_steps >= self.max_generator_steps:
                self.trainer.should_stop = True
        n = lr.shape[0]
        self.log("train/critic_steps", float(self.critic_steps), batch_size=n)
        self.log("train/generator_steps", float(self.generator_steps), batch_size=n, prog_bar=True)

    def _critic_step(self, lr: Tensor, hr: Tensor, opt_d: Any) -> None:
        with torch.no_grad(), kept_buffers(self.net):  # the generator must not change here
            sr = self(lr)
        self.toggle_optimizer(opt_d)
        scores = self.discriminator(torch.cat([hr, sr.to(hr.dtype)])).float()
        d_real, d_fake = scores[: hr.shape[0]].mean(), scores[hr.shape[0] :].mean()
        gp = gradient_penalty(self.discriminator, hr, sr)
        d_loss = d_fake - d_real + self.gp_weight * gp
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        self._average_critic_grads()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)  # free the memory until the next critic step
        self.untoggle_optimizer(opt_d)
        n = lr.shape[0]
        self.log("train/d_loss", d_loss.detach(), batch_size=n, prog_bar=True)
        self.log("train/gp", gp.detach(), batch_size=n)
        self.log("train/em_distance", (d_real - d_fake).detach(), batch_size=n)

    def _generator_step(self, lr: Tensor, hr: Tensor, opt_g: Any) -> None:
        self.toggle_optimizer(opt_g)  # the critic's requires_grad off: no weight gradients
        sr = self(lr)
        l1 = F.l1_loss(sr.float(), hr.float())
        adv = -self.discriminator(sr).float().mean()
        g_loss = l1 + self.adversarial_weight * adv
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        self.untoggle_optimizer(opt_g)
        n = lr.shape[0]
        self.log("train/g_loss", g_loss.detach(), batch_size=n, prog_bar=True)
        self.log("train/l1", l1.detach(), batch_size=n)
        self.log("train/adv", adv.detach(), batch_size=n)

    # -- checkpoints ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_STATE_KEY] = {"critic_steps": self.critic_steps, "generator_steps": self.generator_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(_STATE_KEY)
        if state is not None:
            self.critic_steps = int(state["critic_steps"])
            self.generator_steps = int(state["generator_steps"])

    # -- validation: EM distance and the LR | SR | GAN-SR | HR panel ------------------
    def _crop_starts(self, shape: tuple[int, ...], size: tuple[int, ...], index: int) -> list[tuple[int, ...]]:
        starts = [tuple((n - s) // 2 for n, s in zip(shape, size))]
        rng = torch.Generator().manual_seed(index)
        for _ in range(self.em_crops - 1):
            starts.append(tuple(int(torch.randint(0, n - s + 1, (1,), generator=rng)) for n, s in zip(shape, size)))
        return starts

    @torch.no_grad()
    def em_distance(self, hr: Tensor, sr: Tensor, index: int = 0) -> float:
        """Mean D(HR) - D(SR) over the crops of one subject (tensors (1, 1, D, H, W))."""
        shape = tuple(hr.shape[2:])
        size = tuple(min(p, n) for p, n in zip(self.em_patch_size, shape))
        minimum = getattr(self.discriminator, "min_input_size", 1)
        if min(size) < minimum:
            raise ValueError(
                f"val/em_distance: crops of {size} (em_patch_size={self.em_patch_size} clamped to the "
                f"volume {shape}) are smaller than the critic's minimum input {minimum}; use a critic "
                "with fewer stride-2 blocks or a smaller pooled_size, or larger volumes"
            )
        crops_hr, crops_sr = [], []
        for start in self._crop_starts(shape, size, index):
            region = (..., *(slice(a, a + s) for a, s in zip(start, size)))
            crops_hr.append(hr[region])
            crops_sr.append(sr[region].to(hr.dtype))
        scores = self.discriminator(torch.cat(crops_hr + crops_sr)).float()
        k = len(crops_hr)
        return float(scores[:k].mean() - scores[k:].mean())

    def _evaluate_gan(self, batch: dict[str, Any], batch_idx: int, rows: list[dict[str, float]], stage: str) -> None:
        new_rows, volumes, sr = self._evaluate_batch(batch)
        hr = batch["hr"][tio.DATA]
        for i, row in enumerate(new_rows):
            # the subject's index in the loader seeds its random crops (same every epoch)
            row["em_distance"] = self.em_distance(hr[i : i + 1], sr[i : i + 1], index=batch_idx * hr.shape[0] + i)
        rows.extend(new_rows)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            with torch.no_grad():
                l1_sr = self.l1_net(batch["lr"][tio.DATA])
            # the paper's figure: LR | SR (the L1 model it started from) | GAN-SR | HR | error
            images = {"LR": volumes["LR"], "SR": l1_sr[0, 0].float().cpu().numpy(), "GAN-SR": volumes["SR"], "HR": volumes["HR"]}
            name = f"val_epoch{self.current_epoch:03d}" if stage == "val" else "test"
            self._log_panel(images, name, error_of="GAN-SR")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_gan(batch, batch_idx, self._val_rows, "val")

    def on_validation_epoch_end(self) -> None:
        if self._val_rows:
            # The checkpoint monitor: the EM distance once the GAN has updated the generator.
            # During the critic-only warm-up the critic is still weak, so D(HR) - D(SR) is
            # small for an untrained critic, not for a good generator; a plain min over
            # val/em_distance would keep the warm-up's (L1) checkpoint. +inf until then.
            em = float(np.mean([r["em_distance"] for r in self._val_rows]))
            self.log("val/em_distance_gan", em if self.generator_steps > 0 else float("inf"), sync_dist=False)
        super().on_validation_epoch_end()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_gan(batch, batch_idx, self._test_rows, "test")

