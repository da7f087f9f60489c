"""WGAN-GP losses of the module against closed forms, on a linear critic and a 1x1x1 generator.

Critic ``D(x) = w . x + b`` (x flattened per sample): its gradient with respect to any
input is ``w``, so the penalty is ``(|w| - 1)^2`` for every interpolate, whatever the
mixing weights. Generator ``G(x) = a x + c``. With plain SGD (step ``eta``) one update moves
each parameter by ``-eta`` times the closed-form gradient of the loss, so the values the
module logs and the parameters after one step together pin every term and its sign:

    critic     D(SR) - D(HR) + gp_weight * GP       dL/dw = mean(SR) - mean(HR) + gp_weight * 2 (|w| - 1) w / |w|
    generator  L1(SR, HR) + adv_weight * (-D(SR))   dL/da = mean(sign(SR - HR) LR) - adv_weight * mean_b(w . LR_b)
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mdcsrn_lightning.training.wgan_module import WGANGPModule

SIZE = 2  # patches of 2^3 voxels
ETA = 0.1
GP_WEIGHT = 10.0
ADV_WEIGHT = 0.3


class LinearCritic(nn.Module):
    """``D(x) = w . flatten(x) + b``, (B, 1, S, S, S) -> (B, 1)."""

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor([b]))

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1) @ self.w + self.b)[:, None]


class OneBatch(Dataset):
    def __init__(self, lr: Tensor, hr: Tensor) -> None:
        self.lr, self.hr = lr, hr

    def __len__(self) -> int:
        return len(self.lr)

    def __getitem__(self, i: int) -> dict:
        return {"lr": {"data": self.lr[i]}, "hr": {"data": self.hr[i]}}


def _setup(w_norm: float, **schedule: int) -> tuple[WGANGPModule, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 1, SIZE, SIZE, SIZE, generator=g)
    lr = hr + 0.2 * torch.randn(2, 1, SIZE, SIZE, SIZE, generator=g)
    w = torch.randn(SIZE**3, generator=g)
    critic = LinearCritic(w / w.norm() * w_norm, b=0.7)
    generator = nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        generator.weight.fill_(0.8)
        generator.bias.fill_(0.05)
    sgd = lambda params: torch.optim.SGD(params, lr=ETA)  # noqa: E731
    with pytest.warns(UserWarning, match="init_ckpt is null"):
        module = WGANGPModule(
            net=generator, discriminator=critic, optimizer=sgd, critic_optimizer=sgd,
            gp_weight=GP_WEIGHT, adversarial_weight=ADV_WEIGHT, em_patch_size=SIZE, metric_axis=2, **schedule,
        )
    return module, lr, hr


def _one_step(module: WGANGPModule, lr: Tensor, hr: Tensor) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(OneBatch(lr, hr), batch_size=len(lr)))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("w_norm", [0.5, 2.0])  # penalty gradient pulls |w| up, resp. down
def test_critic_step_matches_the_closed_form(w_norm: float) -> None:
    module, lr, hr = _setup(w_norm, critic_warmup_steps=10)
    w0, b0 = module.discriminator.w.detach().clone(), module.discriminator.b.detach().clone()
    a0, c0 = module.net.weight.detach().clone(), module.net.bias.detach().clone()
    logged = _one_step(module, lr, hr)
    assert (module.critic_steps, module.generator_steps) == (1, 0)

    sr = a0.flatten()[0] * lr + c0[0]
    d_real = (hr.flatten(1) @ w0 + b0).mean()
    d_fake = (sr.flatten(1) @ w0 + b0).mean()
    norm = w0.norm()
    gp = (norm - 1.0) ** 2
    assert logged["train/gp"] == pytest.approx(float(gp), rel=1e-5)
    assert logged["train/em_distance"] == pytest.approx(float(d_real - d_fake), rel=1e-5)
    assert logged["train/d_loss"] == pytest.approx(float(d_fake - d_real + GP_WEIGHT * gp), rel=1e-5)

    grad_w = sr.flatten(1).mean(0) - hr.flatten(1).mean(0) + GP_WEIGHT * 2.0 * (norm - 1.0) * w0 / norm
    torch.testing.assert_close(module.discriminator.w.detach(), w0 - ETA * grad_w, rtol=1e-5, atol=1e-6)
    # b cancels in D(SR) - D(HR) and has no input gradient: it does not move
    torch.testing.assert_close(module.discriminator.b.detach(), b0)
    # the generator is not trained in a critic step
    assert torch.equal(module.net.weight, a0) and torch.equal(module.net.bias, c0)


def test_generator_step_matches_the_closed_form() -> None:
    # no warm-up, no critic updates per generator update: the first update is the generator's
    module, lr, hr = _setup(1.5, critic_warmup_steps=0, critic_per_generator=0, burst_steps=0)
    w0, b0 = module.discriminator.w.detach().clone(), module.discriminator.b.detach().clone()
    a0, c0 = module.net.weight.detach().flatten()[0].item(), module.net.bias.detach()[0].item()
    logged = _one_step(module, lr, hr)
    assert (module.critic_steps, module.generator_steps) == (0, 1)

    sr = a0 * lr + c0
    l1 = (sr - hr).abs().mean()
    adv = -(sr.flatten(1) @ w0 + b0).mean()
    assert logged["train/l1"] == pytest.approx(float(l1), rel=1e-5)
    assert logged["train/adv"] == pytest.approx(float(adv), rel=1e-5)
    assert logged["train/g_loss"] == pytest.approx(float(l1 + ADV_WEIGHT * adv), rel=1e-5)

    sign = torch.sign(sr - hr)
    grad_a = (sign * lr).mean() - ADV_WEIGHT * (lr.flatten(1) @ w0).mean()
    grad_c = sign.mean() - ADV_WEIGHT * w0.sum()
    assert module.net.weight.detach().flatten()[0].item() == pytest.approx(float(a0 - ETA * grad_a), rel=1e-5)
    assert module.net.bias.detach()[0].item() == pytest.approx(float(c0 - ETA * grad_c), rel=1e-5)
    # the critic is not trained in a generator step
    assert torch.equal(module.discriminator.w, w0) and torch.equal(module.discriminator.b, b0)
