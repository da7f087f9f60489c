"""``trainer.precision=auto``: the fastest safe precision for the machine a run starts on.

* CPU: ``bf16-mixed`` where the CPU does bfloat16 dot products natively (AVX-512 BF16 or
  AMX, through oneDNN): faster than float32 there (measured: docs/performance.md). Elsewhere oneDNN emulates bfloat16, slower
  than float32, so ``32-true``.
* CUDA: ``bf16-mixed`` on GPUs with native bfloat16 (Ampere and later); ``32-true`` on older
  ones (``16-mixed`` would need loss scaling, which the WGAN-GP module's manual optimization
  does not do).
* Anything else (MPS, ...): ``32-true``.

``bf16-mixed`` keeps float32 master weights and optimizer state (autocast around the
forward pass), so checkpoints are float32 either way and a run can be resumed under
another precision. An explicit ``trainer.precision=...`` is never changed.
"""

from __future__ import annotations

from typing import Literal

import torch

from mdcsrn_lightning.cpu_features import cpu_bf16_support

__all__ = ["AUTO", "cpu_bf16_support", "cuda_bf16_support", "resolve_precision"]

AUTO = "auto"
Resolved = Literal["bf16-mixed", "32-true"]


def cuda_bf16_support() -> tuple[bool, str]:
    """Whether the first visible CUDA GPU runs bfloat16 natively, and what was found."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    # including_emulation=False: pre-Ampere GPUs run bf16 emulated (slow); the argument is
    # absent in older torch, whose default was already the native check
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # pragma: no cover - torch < 2.4
        native = torch.cuda.is_bf16_supported()
    if native:
        return True, f"{name} (compute capability {major}.{minor}) has native bfloat16"
    return False, f"{name} (compute capability {major}.{minor}) has no native bfloat16"


def _device_type(accelerator: str) -> str:
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        # Lightning's own order for "auto": CUDA, then MPS, then CPU
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return accelerator


def resolve_precision(precision: str | int | None, accelerator: str = "auto") -> tuple[str | int, str]:
    """``(precision, why)``: ``precision`` unchanged unless it is ``"auto"`` (or ``None``).

    Args:
        precision: the ``trainer.precision`` setting (``"auto"``, ``"bf16-mixed"``, ``32``, ...).
        accelerator: the ``trainer.accelerator`` setting (``"cpu"``, ``"gpu"``, ``"cuda"``,
            ``"auto"``, ...).

    Returns:
        The precision to give ``lightning.Trainer`` and one sentence saying why.
    """
    if precision is not None and str(precision) != AUTO:
        return precision, "set explicitly"
    device = _device_type(accelerator)
    if device == "cpu":
        native, why = cpu_bf16_support()
    elif device == "cuda":
        native, why = cuda_bf16_support()
    else:
        return "32-true", f"accelerator {device}: bf16-mixed is not chosen automatically there"
    chosen: Resolved = "bf16-mixed" if native else "32-true"
    return chosen, why
