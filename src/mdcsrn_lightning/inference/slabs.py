"""What both exact whole-volume passes (:mod:`.streaming`, :mod:`.block_stream`) share: layers
on slabs of the first axis and the slab window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SlabWindow", "bn_eval", "conv3_slab", "pointwise"]


def bn_eval(x: Tensor, bn: nn.BatchNorm3d, channels: slice | None = None) -> Tensor:
    """Eval-mode BatchNorm of ``x`` with the parameters of ``bn``'s channels ``channels``."""
    sl = channels or slice(None)
    assert bn.running_mean is not None and bn.running_var is not None
    weight = bn.weight[sl] if bn.weight is not None else None
    bias = bn.bias[sl] if bn.bias is not None else None
    return F.batch_norm(x, bn.running_mean[sl], bn.running_var[sl], weight, bias, False, 0.0, bn.eps)


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int]) -> Tensor:
    """conv3d, on CPU always through oneDNN: for batch 1 and thin slabs ATen's heuristic
    picks its im2col fallback (``slow_conv3d``), far slower."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, padding, [1, 1, 1], [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, padding=padding)


def conv3_slab(x: Tensor, conv: nn.Conv3d, pad_lo: int, pad_hi: int) -> Tensor:
    """A 3x3x3 conv on a slab whose D-padding is explicit (zeros only outside the volume)."""
    if pad_lo and pad_hi:
        return _conv(x, conv.weight, conv.bias, [1, 1, 1])
    if pad_lo or pad_hi:
        x = F.pad(x, (0, 0, 0, 0, pad_lo, pad_hi))
    return _conv(x, conv.weight, conv.bias, [0, 1, 1])


def pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """1x1x1 conv without bias as a matmul: (B, C, n, H, W), (C_out, C) -> (B, C_out, n, H, W)."""
    b, c, *spatial = x.shape
    return torch.matmul(weight, x.reshape(b, c, -1)).view(b, weight.shape[0], *spatial)


class SlabWindow:
    """Slices ``[lo, hi)`` of a (B, C, D, H, W) map, contiguous along D in one buffer.

    Appending past the buffer moves the live slices into a new buffer half as large again
    as needed (never in place: views handed out stay valid), so reads are views; a buffer
    whose live slices shrink to a quarter of it is reallocated, and freed when nothing is
    live.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.buf: Tensor | None = None
        self.base = 0  # slice index of buf[:, :, 0]
        self.lo = self.hi = 0

    def allocated_slices(self) -> int:
        return 0 if self.buf is None else int(self.buf.shape[2])

    def _room(self, like: Tensor, end: int) -> None:
        cap = self.allocated_slices()
        if self.buf is not None and end <= self.base + cap:
            return
        live = self.hi - self.lo
        need = live + (end - self.hi)
        self._realloc(like, min(self.depth - self.lo, need + max(need // 2, 8)))

    def _realloc(self, like: Tensor, cap: int) -> None:
        live = self.hi - self.lo
        new = like.new_empty((*like.shape[:2], cap, *like.shape[3:]))
        if self.buf is not None and live:
            new[:, :, :live] = self.buf[:, :, self.lo - self.base : self.hi - self.base]
        self.buf = new
        self.base = self.lo

    def append(self, chunk: Tensor) -> None:
        """Store ``chunk`` as slices ``[hi, hi + n)``."""
        end = self.hi + int(chunk.shape[2])
        self._room(chunk, end)
        assert self.buf is not None
        self.buf[:, :, self.hi - self.base : end - self.base] = chunk
        self.hi = end

    def accumulate(self, z0: int, contrib: Tensor, fill: Tensor | None) -> None:
        """``[z0, z0 + n) += contrib``; slices new to the window start at ``fill`` (a bias)."""
        end = z0 + int(contrib.shape[2])
        if end > self.hi:
            self._room(contrib, end)
            assert self.buf is not None
            fresh = self.buf[:, :, self.hi - self.base : end - self.base]
            if fill is None:
                fresh.zero_()
            else:
                fresh.copy_(fill.view(1, -1, 1, 1, 1).expand_as(fresh))
            self.hi = end
        assert self.buf is not None and z0 >= self.lo
        self.buf[:, :, z0 - self.base : end - self.base].add_(contrib)

    def view(self, z0: int, z1: int) -> Tensor:
        assert self.buf is not None and self.lo <= z0 and z1 <= self.hi, (z0, z1, self.lo, self.hi)
        return self.buf[:, :, z0 - self.base : z1 - self.base]

    def drop_below(self, z: int) -> None:
        self.lo = max(self.lo, min(z, self.hi))
        if self.buf is None:
            return
        live = self.hi - self.lo
        if live == 0:
            self.buf, self.base = None, self.lo
        elif 4 * live < self.allocated_slices() and self.allocated_slices() > 16:
            self._realloc(self.buf, live + max(live // 2, 8))
