"""One dense block of mDCSRN as a graph over a slab of the first axis, its weights given as
inputs (BatchNorm folded), so one compiled model serves every block: what exact block
streaming (:mod:`mdcsrn_lightning.inference.block_stream`) compiles. Pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseBlockGraph", "block_layout", "block_parameters", "folded_bn"]


def folded_bn(bn: nn.BatchNorm3d, channels: slice | None = None) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm of ``bn``'s channels ``channels`` as ``x * scale + shift`` (both (C,))."""
    sl = channels or slice(None)
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var[sl] + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight[sl]
    shift = -bn.running_mean[sl] * scale
    if bn.bias is not None:
        shift = shift + bn.bias[sl]
    return scale, shift


def _folded(bn: nn.BatchNorm3d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift``, both (1, C, 1, 1, 1)."""
    scale, shift = folded_bn(bn)
    return scale.view(1, -1, 1, 1, 1), shift.view(1, -1, 1, 1, 1)


def block_parameters(block: nn.Module) -> list[Tensor]:
    """A dense block's weights in the order :class:`DenseBlockGraph` takes them: per unit,
    BN1 scale and shift, [bottleneck weight and bias, BN2 scale and shift], conv weight and
    bias (BatchNorm folded with its running statistics)."""
    out: list[Tensor] = []
    for unit in block.units:  # type: ignore[union-attr]
        out += _folded(unit.norm1)
        if unit.bottleneck is not None:
            out += [unit.bottleneck.weight, unit.bottleneck.bias, *_folded(unit.norm2)]
        out += [unit.conv.weight, unit.conv.bias]
    return [t.detach().contiguous() for t in out]


def block_layout(block: nn.Module) -> tuple[int, ...]:
    """What the graph's structure depends on: the input width, the units' output widths and
    which units have a bottleneck."""
    units = list(block.units)  # type: ignore[union-attr]
    return (
        int(units[0].norm1.num_features),
        *(int(u.conv.out_channels) for u in units),
        *(int(u.bottleneck is not None) for u in units),
    )


class DenseBlockGraph(nn.Module):
    """One dense block over one slab, its weights given as inputs: **one** graph (one
    compiled model, one working memory) serves every block of the network.

    ``forward(x, mask, *params)``: ``x`` (B, 2k, t + 2u, H, W) is the block input on slices
    ``[s - u, s + t + u)`` (anything finite outside the volume); ``mask`` (1, 1, t + 2u,
    1, 1) is 1 on the slices inside the volume, 0 outside; ``params`` is
    :func:`block_parameters` of the block. Returns (B, 2k + u k, t, H, W): the block input
    and the unit outputs on slices ``[s, s + t)`` (the block's output o_i there).

    The 3x3x3 convs are valid along the first axis (each unit's output loses a slice per
    side), and each unit's conv input is multiplied by the mask: zeros outside the volume,
    the whole-volume pass's own zero padding.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.layout = block_layout(block)
        self.units = len(list(block.units))  # type: ignore[union-attr]
        self.bottlenecks = [u.bottleneck is not None for u in block.units]  # type: ignore[union-attr]
        self.in_channels = self.layout[0]
        self.out_channels = self.in_channels + sum(self.layout[1 : 1 + self.units])
        self.halo = self.units

    def forward(self, x: Tensor, mask: Tensor, *params: Tensor) -> Tensor:
        n = x.shape[2]
        pieces = [(0, x)]  # (first slice, tensor of slices [first, n - first))
        i = 0

        def crop(first: int, t: Tensor, a: int) -> Tensor:
            return t[:, :, a - first : t.shape[2] - (a - first)]

        for a, bottleneck in enumerate(self.bottlenecks):  # unit a's conv input: slices [a, n - a)
            parts = [crop(first, t, a) for first, t in pieces]
            h = F.elu((torch.cat(parts, 1) if len(parts) > 1 else parts[0]) * params[i] + params[i + 1])
            i += 2
            if bottleneck:
                h = F.elu(F.conv3d(h, params[i], params[i + 1]) * params[i + 2] + params[i + 3])
                i += 4
            h = h * mask[:, :, a : n - a]  # zeros outside the volume = the conv's padding
            pieces.append((a + 1, F.conv3d(h, params[i], params[i + 1], padding=(0, 1, 1))))
            i += 2
        return torch.cat([crop(first, t, self.units) for first, t in pieces], 1)
