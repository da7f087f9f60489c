"""WGAN-GP gradient penalty against critics whose input gradient is known in closed form."""

from __future__ import annotations

import pytest
import torch

from mdcsrn_lightning.models.discriminator import Discriminator3D
from mdcsrn_lightning.training.gradient_penalty import gradient_penalty

B, SHAPE = 3, (1, 4, 5, 6)  # (C, D, H, W)


def linear_critic(w: torch.Tensor):
    """D(x) = sum(w * x) per sample: grad = w for every sample, GP = (||w|| - 1)^2."""
    return lambda x: (w * x).flatten(1).sum(1, keepdim=True)


def quadratic_critic(w: torch.Tensor):
    """D(x) = sum(w * x^2) / 2 per sample: grad = w * x, so every sample has its own norm."""
    return lambda x: (w * x * x / 2).flatten(1).sum(1, keepdim=True)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=g) * 0.3
    real = torch.rand((B, *SHAPE), generator=g)
    fake = torch.rand((B, *SHAPE), generator=g)
    alpha = torch.tensor([0.1, 0.5, 0.9]).view(B, 1, 1, 1, 1)
    return w, real, fake, alpha


def test_linear_critic_exact(data) -> None:
    w, real, fake, _ = data
    gp = gradient_penalty(linear_critic(w), real, fake)
    assert gp.dtype == torch.float32
    assert gp.item() == pytest.approx((w.norm().item() - 1.0) ** 2, rel=1e-5)
    # a critic with unit-norm gradient everywhere is not penalised
    gp1 = gradient_penalty(linear_critic(w / w.norm()), real, fake)
    assert gp1.item() == pytest.approx(0.0, abs=1e-6)


def test_quadratic_critic_per_sample_norms(data) -> None:
    w, real, fake, alpha = data
    x_hat = alpha * real + (1 - alpha) * fake
    norms = torch.stack([(w * x_hat[b]).norm() for b in range(B)])
    assert norms.std() > 0.05  # the samples really differ
    expected = ((norms - 1) ** 2).mean()
    gp = gradient_penalty(quadratic_critic(w), real, fake, alpha=alpha)
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)


def test_wrong_variants_give_other_values(data) -> None:
    """A per-voxel norm or one alpha shared by the batch would fail the tests above."""
    w, real, fake, alpha = data
    right = gradient_penalty(quadratic_critic(w), real, fake, alpha=alpha).item()

    # wrong 1: norm per voxel (over C only), then mean over voxels and samples
    def per_voxel(critic, real, fake, alpha):
        x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        return ((g.norm(2, dim=1) - 1) ** 2).mean()

    # wrong 2: one mixing weight for the whole batch
    def shared_alpha(critic, real, fake, alpha):
        a = alpha.flatten()[1]  # a scalar: the same for every sample
        x = (a * real + (1 - a) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        return ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()

    assert per_voxel(linear_critic(w), real, fake, alpha).item() != pytest.approx(
        gradient_penalty(linear_critic(w), real, fake).item(), rel=1e-3
    )
    assert per_voxel(quadratic_critic(w), real, fake, alpha).item() != pytest.approx(right, rel=1e-3)
    assert shared_alpha(quadratic_critic(w), real, fake, alpha).item() != pytest.approx(right, rel=1e-3)


def test_gradient_reaches_critic_parameters(data) -> None:
    w, real, fake, _ = data
    w = w.clone().requires_grad_(True)
    gradient_penalty(linear_critic(w), real, fake).backward()
    n = w.detach().norm()
    assert torch.allclose(w.grad, 2 * (n - 1) * w.detach() / n, rtol=1e-4, atol=1e-7)


def test_alpha_is_one_weight_per_sample() -> None:
    real, fake = torch.zeros(2, 1, 2, 2, 2), torch.ones(2, 1, 2, 2, 2)
    seen = []

    def critic(x):
        seen.append(x.detach().clone())
        return x.flatten(1).sum(1, keepdim=True)

    gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(1))
    x_hat = seen[0]
    for b in range(2):  # every voxel of a sample has the same weight; samples differ
        assert torch.unique(x_hat[b]).numel() == 1
    assert x_hat[0, 0, 0, 0, 0] != x_hat[1, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        gradient_penalty(critic, real, fake, alpha=torch.rand(2, 1, 2, 2, 2))


def test_float32_inside_bf16_autocast() -> None:
    torch.manual_seed(0)
    critic = Discriminator3D(channels=(2, 4), pooled_size=2, dense_features=4)
    real, fake = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    alpha = torch.rand(2, 1, 1, 1, 1)
    plain = gradient_penalty(critic, real, fake, alpha=alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic(real).dtype == torch.bfloat16  # autocast is on here ...
        mixed = gradient_penalty(critic, real.bfloat16(), fake.bfloat16(), alpha=alpha)
    assert mixed.dtype == torch.float32  # ... but not inside the penalty
    ref = gradient_penalty(critic, real.bfloat16().float(), fake.bfloat16().float(), alpha=alpha)
    assert torch.equal(mixed, ref)
    assert torch.isfinite(plain) and plain > 0


def test_real_critic_is_per_sample() -> None:
    """With the LayerNorm critic, the batch GP is the mean of the single-sample GPs."""
    torch.manual_seed(0)
    critic = Discriminator3D(channels=(2, 4), pooled_size=2, dense_features=4)
    real, fake = torch.rand(3, 1, 8, 8, 8), torch.rand(3, 1, 8, 8, 8)
    alpha = torch.rand(3, 1, 1, 1, 1)
    batch = gradient_penalty(critic, real, fake, alpha=alpha)
    single = torch.stack([gradient_penalty(critic, real[b : b + 1], fake[b : b + 1], alpha=alpha[b : b + 1]) for b in range(3)])
    assert batch.item() == pytest.approx(single.mean().item(), rel=1e-5)


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        gradient_penalty(lambda x: x.sum(), torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3))
