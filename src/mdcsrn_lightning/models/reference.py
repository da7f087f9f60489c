"""The plain reference mDCSRN: the textbook forward pass, kept as the yardstick.

:class:`ReferenceMDCSRN` is the generator written the obvious way: every dense unit
concatenates its inputs with ``torch.cat``, then BN -> ELU -> conv, every compressor and
the reconstruction concatenate all levels; eager, float32, no checkpointing, no memory
format tricks, no fused or split kernels. It is not used for training. It exists

* for tests: every faster path (:class:`~mdcsrn_lightning.models.mdcsrn.MDCSRN` with its
  options, the streaming pass, the exported ONNX/OpenVINO engines) must give its outputs;
* as the baseline of ``mdcsrn-bench`` (the "reference" row every speed-up is relative to).

It has exactly the modules (names, shapes) of :class:`MDCSRN`, so a state dict moves
between the two unchanged: ``ReferenceMDCSRN.from_mdcsrn(net)`` or
``ref.load_state_dict(net.state_dict())``. Pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ReferenceMDCSRN", "reference_like"]


class _Unit(nn.Module):
    def __init__(self, in_channels: int, k: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm3d(in_channels)
        self.bottleneck: nn.Conv3d | None = None
        self.norm2: nn.BatchNorm3d | None = None
        conv_in = in_channels
        if in_channels > 4 * k:
            self.bottleneck = nn.Conv3d(in_channels, 4 * k, kernel_size=1)
            self.norm2 = nn.BatchNorm3d(4 * k)
            conv_in = 4 * k
        self.conv = nn.Conv3d(conv_in, k, kernel_size=3, padding=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.nn.functional.elu(self.norm1(torch.cat(features, dim=1)))
        if self.bottleneck is not None and self.norm2 is not None:
            x = torch.nn.functional.elu(self.norm2(self.bottleneck(x)))
        return self.conv(x)


class _Block(nn.Module):
    def __init__(self, in_channels: int, units: int, k: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(_Unit(in_channels + j * k, k) for j in range(units))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for unit in self.units:
            features.append(unit(features))
        return torch.cat(features, dim=1)


class ReferenceMDCSRN(nn.Module):
    """Plain mDCSRN (same arguments and state-dict keys as :class:`MDCSRN`; see there).

    ``memory_efficient`` is accepted (so a generator config builds either class) and
    ignored: the reference never checkpoints.
    """

    def __init__(
        self,
        num_blocks: int = 4,
        units_per_block: int = 4,
        growth_rate: int = 12,
        reconstruction: str = "direct",
        global_residual: bool = False,
        in_channels: int = 1,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if reconstruction not in ("direct", "conv"):
            raise ValueError(f"reconstruction must be 'direct' or 'conv', got {reconstruction!r}")
        k = growth_rate
        self.num_blocks, self.units_per_block, self.growth_rate = num_blocks, units_per_block, k
        self.reconstruction_type = reconstruction
        self.global_residual = bool(global_residual)
        self.in_channels = in_channels
        self.stem = nn.Conv3d(in_channels, 2 * k, kernel_size=3, padding=1)
        width = 2 * k
        blocks, compressors = [], []
        for i in range(num_blocks):
            if i > 0:
                compressors.append(nn.Conv3d(width, 2 * k, kernel_size=1))
            blocks.append(_Block(2 * k, units_per_block, k))
            width += 2 * k + units_per_block * k
        self.blocks = nn.ModuleList(blocks)
        self.compressors = nn.ModuleList(compressors)
        if reconstruction == "direct":
            self.reconstruction = nn.Sequential(nn.Conv3d(width, in_channels, kernel_size=1))
        else:
            self.reconstruction = nn.Sequential(
                nn.Conv3d(width, 8 * k, kernel_size=1),
                nn.BatchNorm3d(8 * k),
                nn.ELU(),
                nn.Conv3d(8 * k, in_channels, kernel_size=3, padding=1),
            )

    @classmethod
    def from_mdcsrn(cls, net: nn.Module) -> ReferenceMDCSRN:
        """A reference with ``net``'s architecture and a copy of its weights, in ``net``'s mode,
        dtype and device."""
        ref = cls(**architecture_of(net))
        first = next(net.parameters(), None)
        if first is not None:
            ref = ref.to(device=first.device, dtype=first.dtype)
        ref.load_state_dict(net.state_dict())
        return ref.train(net.training)

    def receptive_field_radius(self) -> int:
        return 1 + self.num_blocks * self.units_per_block + int(self.reconstruction_type == "conv")

    def forward(self, x: Tensor) -> Tensor:
        stem = self.stem(x)
        levels = [stem]
        for i, block in enumerate(self.blocks):
            inp = stem if i == 0 else self.compressors[i - 1](torch.cat(levels, dim=1))
            levels.append(block(inp))
        out = self.reconstruction(torch.cat(levels, dim=1))
        return out + x if self.global_residual else out


def architecture_of(net: nn.Module) -> dict[str, Any]:
    """The constructor arguments of an :class:`MDCSRN` (or reference) ``net``."""
    return {
        "num_blocks": int(net.num_blocks),  # type: ignore[arg-type]
        "units_per_block": int(net.units_per_block),  # type: ignore[arg-type]
        "growth_rate": int(net.growth_rate),  # type: ignore[arg-type]
        "reconstruction": str(net.reconstruction_type),
        "global_residual": bool(net.global_residual),
        "in_channels": int(net.in_channels),  # type: ignore[arg-type]
    }


def reference_like(net: nn.Module) -> ReferenceMDCSRN:
    """Shorthand for :meth:`ReferenceMDCSRN.from_mdcsrn`."""
    return ReferenceMDCSRN.from_mdcsrn(net)
