"""What the CPU does natively, for the choices of precision (``training/precision.py``) and of
per-scan fine-tuning (``inference/adapt.py``): a low module, so both layers can ask it."""

from __future__ import annotations

import torch

__all__ = ["cpu_bf16_support"]


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU runs bfloat16 natively, and what was found (for the log line)."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    # torch.cpu's cpuinfo queries (private but stable since torch 2.2); absent: assume none
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if amx:
        return True, "the CPU has AMX (native bfloat16 matrix units)"
    if avx512_bf16:
        return True, "the CPU has AVX-512 BF16 (native bfloat16 dot products)"
    return False, "the CPU has neither AVX-512 BF16 nor AMX (bfloat16 would be emulated, slower than float32)"
