"""WGAN-GP gradient penalty (Gulrajani et al. 2017), computed in float32."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["gradient_penalty", "interpolate"]


def interpolate(real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    """``alpha * real + (1 - alpha) * fake`` with one weight per sample (alpha: (B, 1, ..., 1))."""
    return alpha * real + (1.0 - alpha) * fake


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    alpha: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """``mean_b (||grad_x D(x_hat_b)||_2 - 1)^2`` on random interpolates of ``real`` and ``fake``.

    * One mixing weight per sample: ``alpha`` has shape (B, 1, 1, 1, 1) for 5D input (drawn
      from U[0, 1) when not given), so a whole patch is one point on the line between its
      real and its fake version.
    * The norm is per sample over all of (C, D, H, W), not per voxel.
    * Computed in float32 (autocast disabled, inputs cast to float) even inside a bf16 or
      16-mixed autocast region: the penalty is a difference of norms near 1 and its
      double backward is sensitive to rounding. The critic's parameters must be float32 or
      float64 (mixed precision keeps them so; "true" half precision is not supported).
      float64 inputs stay float64.
    * ``real`` and ``fake`` are detached: the penalty trains the critic only.
    * The result keeps the graph (``create_graph=True``), so ``loss.backward()`` reaches the
      critic's parameters through the gradient.

    Args:
        critic: (B, ...) -> (B, 1) or (B,) scores.
        real, fake: tensors of the same shape (B, C, D, H, W) (any rank >= 2).
        alpha: optional mixing weights of shape (B, 1, ..., 1); drawn when None.
        generator: RNG for ``alpha``.
        eps: added under the square root so the norm's gradient is finite at zero.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}")
    dtype = torch.float64 if real.dtype == torch.float64 else torch.float32
    weight_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    with torch.autocast(device_type=real.device.type, enabled=False):
        real = real.detach().to(dtype)
        fake = fake.detach().to(dtype)
        if alpha is None:
            alpha = torch.rand(weight_shape, device=real.device, dtype=dtype, generator=generator)
        elif tuple(alpha.shape) != weight_shape:
            raise ValueError(f"alpha must have shape {weight_shape} (one weight per sample), got {tuple(alpha.shape)}")
        x_hat = interpolate(real, fake, alpha.to(dtype)).requires_grad_(True)
        scores = critic(x_hat)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        norms = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + eps)
        return ((norms - 1.0) ** 2).mean()
