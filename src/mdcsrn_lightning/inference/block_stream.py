"""Exact whole-volume mDCSRN inference at engine speed: one compiled dense-block graph
(:class:`DenseBlockGraph`, weights as inputs) run by OpenVINO over slabs of the first axis,
volume faces through a mask, slabs staggered by block; the stem, the 1x1x1 contributions,
their sums and the "-r" reconstruction in torch. How and why: ``docs/inference.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdcsrn_lightning.inference.engines import OpenVinoEngine
from mdcsrn_lightning.inference.slabs import SlabWindow, bn_eval, conv3_slab
from mdcsrn_lightning.models.block_graph import DenseBlockGraph, block_layout, block_parameters
from mdcsrn_lightning.models.export import convert_openvino
from mdcsrn_lightning.models.mdcsrn import check_mdcsrn, split_weights

__all__ = ["BlockStreamingMDCSRN"]

BlockRunner = Callable[..., Tensor]  # (x, mask, *params) -> the block's output on the slab


# --------------------------------------------------------------------------- sums
class _Ring:
    """Slices ``[lo, hi)`` of a (B, C, D, H, W) sum in a ring of ``capacity`` slices: the
    compressors' partial sums, whose span the schedule bounds, without the growth slack and
    reallocation copies of :class:`~.slabs.SlabWindow` (a large share of the peak;
    docs/performance.md)."""

    def __init__(self, like: Tensor, channels: int, capacity: int, bias: Tensor | None) -> None:
        b, _, _, h, w = like.shape
        self.buf = like.new_empty((b, channels, capacity, h, w))
        self.capacity = capacity
        self.bias = None if bias is None else bias.to(like.dtype).view(1, -1, 1, 1)
        self.lo = self.hi = 0

    def _spans(self, z0: int, z1: int) -> list[tuple[int, int, int]]:
        """(ring index, offset in [z0, z1), length) pieces of slices ``[z0, z1)``."""
        out, z = [], z0
        while z < z1:
            i = z % self.capacity
            n = min(z1 - z, self.capacity - i)
            out.append((i, z - z0, n))
            z += n
        return out

    def accumulate(self, z0: int, contrib: Tensor) -> None:
        """``[z0, z0 + n) += contrib``; slices new to the ring start at the bias."""
        z1 = z0 + int(contrib.shape[2])
        if z0 < self.lo or z0 > self.hi or z1 - self.lo > self.capacity:
            raise RuntimeError(f"block streaming: sums [{z0}, {z1}) outside the ring [{self.lo}, {self.hi}) "
                               f"of {self.capacity} slices")
        if z1 > self.hi:
            for i, _, n in self._spans(self.hi, z1):
                fresh = self.buf[:, :, i : i + n]
                if self.bias is None:
                    fresh.zero_()
                else:
                    fresh.copy_(self.bias.unsqueeze(2).expand_as(fresh))
            self.hi = z1
        for i, off, n in self._spans(z0, z1):
            self.buf[:, :, i : i + n].add_(contrib[:, :, off : off + n])

    def read(self, z0: int, z1: int, out: Tensor) -> None:
        """Copy slices ``[z0, z1)`` (done, still kept) into ``out`` (B, C, z1 - z0, H, W)."""
        if z0 < self.lo or z1 > self.hi:
            raise RuntimeError(f"block streaming: read [{z0}, {z1}) outside [{self.lo}, {self.hi})")
        for i, off, n in self._spans(z0, z1):
            out[:, :, off : off + n] = self.buf[:, :, i : i + n]

    def drop_below(self, z: int) -> None:
        self.lo = max(self.lo, min(z, self.hi))


# --------------------------------------------------------------------------- driver
def best_offset(depth: int, slab: int, lags: list[int]) -> int:
    """The shift ``c`` in ``[0, slab)`` of all slab grids that computes the fewest slabs
    (block ``j``'s waves start at ``-lags[j] - c``), the smallest such ``c``."""

    def slabs(c: int) -> int:
        return sum(math.ceil((depth + lag + c) / slab) for lag in lags)

    return min(range(slab), key=lambda c: (slabs(c), c))


class BlockStreamingMDCSRN:
    """Callable ``(B, C, D, H, W) -> (B, C, D, H, W)``: ``net``'s eval forward pass over the
    whole volume, exact, by one dense-block graph on slabs of ``slab`` slices along D.

    Args:
        net: an :class:`~mdcsrn_lightning.models.mdcsrn.MDCSRN` or
            :class:`~mdcsrn_lightning.models.reference.ReferenceMDCSRN` (eval-mode
            BatchNorm is used whatever its mode).
        slab: output slices per block graph call (``t``). Larger: less halo recompute
            (``~(t + u) / t``) and fewer calls, more memory (``~ H W (t + 2u)`` times the
            block's working channels, plus the compressors' partial sums).
        runner: ``(x, mask, *params) -> output`` of the block graph; default: the graph in
            OpenVINO (CPU, float32). The tests pass :attr:`graph` itself to check the schedule
            in float64.

    The graph is converted once and compiled once per slab shape (cached), so volumes of
    one shape pay the compilation once.
    """

    def __init__(self, net: nn.Module, slab: int = 16, runner: BlockRunner | None = None) -> None:
        check_mdcsrn(net, "block streaming")
        if isinstance(slab, bool) or not isinstance(slab, int) or slab < 1:
            raise ValueError(f"slab must be an integer >= 1, got {slab!r}")
        self.net = net.eval()
        self.slab = slab
        blocks = list(net.blocks)  # type: ignore[arg-type]
        layouts = {block_layout(b) for b in blocks}
        if len(layouts) != 1:
            raise ValueError(f"block streaming needs blocks of one layout, got {sorted(layouts)}")
        self.graph = DenseBlockGraph(blocks[0])
        self.params = [block_parameters(b) for b in blocks]
        self.weights, self.consumer_rows = self._contribution_weights()
        first = next(iter(net.parameters()), None)  # type: ignore[union-attr]
        self.device = first.device if first is not None else torch.device("cpu")
        self.runner = runner or self._openvino()
        self.name = f"block-stream[{'openvino' if runner is None else 'custom'}]"
        #: of the last call: block graph calls and the output slices they computed
        self.calls = 0
        self.computed_slices = 0

    def _openvino(self) -> OpenVinoEngine:
        """The graph traced for this slab length (H and W are reshaped per volume)."""
        if self.device.type != "cpu":
            raise ValueError("block streaming runs OpenVINO on the CPU; move the network to the CPU")
        n = self.slab + 2 * self.graph.halo
        example = (torch.zeros(1, self.graph.in_channels, n, 3, 3), torch.ones(1, 1, n, 1, 1), *self.params[0])
        return OpenVinoEngine(convert_openvino(self.graph, example), cache=2)

    def _contribution_weights(self) -> tuple[list[Tensor], list[list[int]]]:
        """Per block: the (R, 2k + u k) weight taking its output o_i to every later consumer
        (compressors i.., then the reconstruction's first conv; for block 1 the stem is
        also level 0), and the rows of each consumer."""
        net = self.net
        stem_width = int(net.stem.out_channels)  # type: ignore[union-attr]
        width = self.graph.out_channels
        stem_parts = dict(split_weights(net, 0, stem_width))
        weights, rows = [], []
        for j in range(len(self.params)):
            parts = []
            for i, w in split_weights(net, stem_width + j * width, width):  # o_j's columns
                part = w.detach().reshape(w.shape[0], -1).clone()
                if j == 0:  # o_1 starts with the stem, which is level 0 as well
                    part[:, :stem_width] += stem_parts[i].detach().reshape(w.shape[0], -1)
                parts.append(part)
            weights.append(torch.cat(parts).contiguous())
            rows.append([int(p.shape[0]) for p in parts])
        return weights, rows

    def receptive_field_radius(self) -> int:
        return int(self.net.receptive_field_radius())  # type: ignore[operator]

    def _stem(self, x: Tensor, a: int, b: int) -> Tensor:
        """The stem's output on slices ``[a, b)`` (zeros around the volume: its padding)."""
        depth = x.shape[2]
        lo, hi = max(a - 1, 0), min(b + 1, depth)
        xs = F.pad(x[:, :, lo:hi], (0, 0, 0, 0, lo - (a - 1), (b + 1) - hi))
        stem = self.net.stem
        return F.conv3d(xs, stem.weight, stem.bias, padding=(0, 1, 1))  # type: ignore[union-attr]

    @torch.inference_mode()
    def __call__(self, x: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
        if x.dtype != torch.float32 and isinstance(self.runner, OpenVinoEngine):
            raise ValueError(f"block streaming on OpenVINO runs in float32, got {x.dtype}")
        net, t, h = self.net, self.slab, self.graph.halo
        batch, _, depth, height, width = x.shape
        nblocks = len(self.params)
        # block j's slabs lag block j-1's by the halo: the compressor feeding block j is
        # complete on the slices block j reads once block j-1 is done with the same wave
        lags = [j * h for j in range(nblocks)]
        offset = best_offset(depth, t, lags)
        compressors = list(net.compressors)  # type: ignore[arg-type]
        # compressor i (feeding block i+1) is written by blocks 0..i up to block 0's end and
        # read by block i+1 from its slab start minus the halo: t + (i + 2) h slices at most
        windows = [_Ring(x, int(c.out_channels), t + (i + 3) * h, c.bias) for i, c in enumerate(compressors)]
        recon = net.reconstruction
        recon_first = recon[0]
        conv_recon = net.reconstruction_type == "conv"
        out = torch.empty(batch, int(recon[-1].out_channels), depth, height, width, dtype=x.dtype, device=x.device)
        recon_window = SlabWindow(depth)  # conv_recon: the 8k-channel sums
        if not conv_recon:
            out.copy_(recon_first.bias.view(1, -1, 1, 1, 1).expand_as(out))
        params = [[p.to(x.dtype) for p in ps] for ps in self.params]
        weights = [w.to(x.dtype) for w in self.weights]
        summed = out_done = 0
        self.calls = self.computed_slices = 0
        starts = [-lag - offset for lag in lags]  # block j's next slab start
        while starts[-1] < depth:
            for j in range(nblocks):
                s = starts[j]
                if s >= depth:
                    continue
                starts[j] = s + t
                if s + t <= 0:
                    continue
                a, b = s - h, s + t + h
                lo, hi = max(a, 0), min(b, depth)
                if j == 0:
                    slab_in = self._stem(x, a, b)
                else:  # the block input, zeros outside the volume (masked in the graph)
                    slab_in = x.new_zeros((batch, self.graph.in_channels, b - a, height, width))
                    windows[j - 1].read(lo, hi, slab_in[:, :, lo - a : hi - a])
                mask = torch.zeros(1, 1, b - a, 1, 1, dtype=x.dtype, device=x.device)
                mask[:, :, lo - a : hi - a] = 1
                pieces = self.runner(slab_in if j else slab_in.contiguous(), mask, *params[j])
                del slab_in
                if j > 0:  # block j reads compressor j-1 from its next slab's halo on
                    windows[j - 1].drop_below(s + t - h)
                self.calls += 1
                self.computed_slices += t
                z0, z1 = max(s, 0), min(s + t, depth)
                self._push(pieces[:, :, z0 - s : z1 - s], z0, weights[j], self.consumer_rows[j],
                           [*windows[j:], recon_window], recon_first.bias, out, conv_recon)
                del pieces
                if j == nblocks - 1:
                    summed = z1
            done = self._finish_conv_recon(recon_window, out, out_done, summed, depth) if conv_recon else summed
            if progress is not None and done > out_done:
                progress(done - out_done)
            out_done = done
        if getattr(net, "global_residual", False):
            out += x
        return out

    @staticmethod
    def _push(
        pieces: Tensor, z0: int, weight: Tensor, rows: list[int], windows: list[Any],
        recon_bias: Tensor | None, out: Tensor, conv_recon: bool,
    ) -> None:
        """Add ``weight @ pieces`` (the 1x1x1 contributions of a block's output on slices
        ``[z0, z0 + n)``) to each consumer's sums, 8 slices at a time (bounded memory)."""
        b, c, n, hh, ww = pieces.shape
        step = 8
        for s0 in range(0, n, step):
            chunk = pieces[:, :, s0 : s0 + step]
            m = chunk.shape[2]
            contrib = torch.matmul(weight, chunk.reshape(b, c, -1)).view(b, -1, m, hh, ww)
            first = 0
            for i, r in enumerate(rows):
                part = contrib[:, first : first + r]
                first += r
                if i < len(rows) - 1:  # a compressor
                    windows[i].accumulate(z0 + s0, part)
                elif conv_recon:  # the 8k-channel sums of the "-r" reconstruction
                    windows[-1].accumulate(z0 + s0, part, recon_bias)
                else:  # the output itself
                    out[:, :, z0 + s0 : z0 + s0 + m] += part

    def _finish_conv_recon(self, window: SlabWindow, out: Tensor, done: int, summed: int, depth: int) -> int:
        """The "-r" reconstruction's BN -> ELU -> 3x3x3 conv on the slices whose 8k sums
        (and their neighbours) are complete; returns the new count of final slices."""
        recon = self.net.reconstruction
        end = summed if summed == depth else summed - 1
        if end <= done:
            return done
        a, b = max(done - 1, 0), min(end + 1, depth)
        h = F.elu(bn_eval(window.view(a, b), recon[1]))
        out[:, :, done:end] = conv3_slab(h, recon[3], a - (done - 1), (end + 1) - b)
        window.drop_below(end - 1)
        return end
