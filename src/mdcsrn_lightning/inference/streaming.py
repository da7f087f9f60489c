"""Exact whole-volume mDCSRN inference with bounded memory: slab streaming + split 1x1 convs.

The plain forward pass of b8u4 over a 181x217x181 scan needs one 600-channel
concatenation of the whole volume (17 GB in float32) before the reconstruction, and more
for the compressors. Cutting the volume into patches avoids that but changes the result
near patch faces unless every patch keeps ``receptive_field_radius()`` voxels of context
(33 for b8u4), which multiplies the work. This module computes **the same numbers as one
whole-volume forward pass** (up to float32 rounding, ~1e-6), with peak memory that does
not grow with the volume's depth and never holds a concatenation wider than 4k channels.

Two ideas, both exact:

1. **Linear layers over a concatenation need no concatenation.** The compressors, the
   direct-combination reconstruction (and the "-r" bottleneck) and each dense unit's
   1x1x1 bottleneck are 1x1x1 convs of ``cat(a, b, ...)``:
   ``conv(cat(a, b)) = conv_a(a) + conv_b(b) + bias`` with ``conv_a`` the weight's
   input-channel slice for ``a``. BatchNorm (eval: per channel) and ELU (per element) act
   on each slice separately. So every feature map (the stem, each block's input, each
   unit's k-channel output) *pushes* its contribution into an accumulator per consumer as
   soon as it exists, and is dropped when no 3x3x3 conv needs it any more. One stream's
   contributions to all its consumers are one conv (their weight slices stacked).
2. **Streaming along the first spatial axis.** Every 3x3x3 conv has zero padding 1, so
   output slices ``[z0, z1)`` need input slices ``[z0-1, z1+1)`` (zeros outside the
   volume, applied to the conv's own input, exactly as the whole-volume pass pads every
   layer). Each feature map is produced ``slab`` slices at a time on demand; a slice is
   kept only while a later conv still needs it. Memory is then about
   ``H * W * (sum over layers of their channels times their lag)``: independent of ``D``.
   ``slab=None`` computes every layer over the whole depth at once (the "lean"
   whole-volume pass: only idea 1).

No overlap, no recomputation, no seams: each voxel of each layer is computed once.
Measured (``mdcsrn-bench depth=b8u4 bench.task=volume``, 2 CPU cores): b8u4 on a
181x217x181 volume in 122 s with 3.0 GB peak RSS (``slab=16``), equal to the plain
reference within 2.1e-7; at 64^3 it is 1.2x faster than the plain eager pass (its 3x3x3
convs go straight to oneDNN; see :func:`_conv`).

BatchNorm must use its running statistics (eval mode; ``bn_mode="train"`` has batch
statistics that depend on the whole batch, so it cannot be streamed).

Pure torch; works for :class:`~mdcsrn_lightning.models.mdcsrn.MDCSRN` and
:class:`~mdcsrn_lightning.models.reference.ReferenceMDCSRN` (same module layout).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdcsrn_lightning.models.mdcsrn import MDCSRN_ATTRIBUTES

__all__ = ["StreamingMDCSRN", "stream_forward", "stream_super_resolve"]


def _bn(x: Tensor, bn: nn.BatchNorm3d, channels: slice | None = None) -> Tensor:
    """Eval-mode BatchNorm of ``x`` with the parameters of ``bn``'s channels ``channels``."""
    sl = channels or slice(None)
    assert bn.running_mean is not None and bn.running_var is not None
    weight = bn.weight[sl] if bn.weight is not None else None
    bias = bn.bias[sl] if bn.bias is not None else None
    return F.batch_norm(x, bn.running_mean[sl], bn.running_var[sl], weight, bias, False, 0.0, bn.eps)


class _Ctx:
    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.depth = int(x.shape[2])
        self.streams: list[_Stream] = []
        self.max_live_channel_slices = 0  # most (channel, slice) planes allocated at once

    def count_live(self) -> None:
        live = sum(s.window.allocated_slices() * s.channels for s in self.streams)
        self.max_live_channel_slices = max(self.max_live_channel_slices, live)


class _Window:
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
        # Always a new buffer (never moved in place): views handed out earlier stay valid.
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


class _Stream:
    """A (B, C, D, H, W) feature map produced slice range by slice range along D.

    ``hi``: slices ``[0, hi)`` are done. Done slices are kept in a :class:`_Window` while a
    reader may still read them; each done chunk is pushed at once into the accumulators
    that subscribe to this stream.
    """

    def __init__(self, ctx: _Ctx, channels: int, name: str) -> None:
        self.ctx, self.channels, self.name = ctx, channels, name
        ctx.streams.append(self)
        self.hi = 0
        self.window = _Window(ctx.depth)
        self.readers: list[_Stream | _Output] = []  # each reads slices [reader.hi - 1, ...)
        self.sources: list[_Stream] = []  # streams this one reads
        self._push_weight: Tensor | None = None  # stacked 1x1x1 weight slices of the subscribers
        self._push_targets: list[tuple[_Accumulator, int, int]] = []  # (acc, first row, rows)

    # -- wiring ---------------------------------------------------------------------
    def subscribe(self, acc: _Accumulator, weight: Tensor) -> None:
        """Push ``conv1x1(chunk, weight)`` (weight: (C_out, self.channels, 1, 1, 1)) into ``acc``."""
        rows = int(weight.shape[0])
        weight = weight.reshape(rows, -1)
        first = 0 if self._push_weight is None else int(self._push_weight.shape[0])
        self._push_weight = (weight if self._push_weight is None else torch.cat([self._push_weight, weight])).contiguous()
        self._push_targets.append((acc, first, rows))
        acc.contributors.append(self)

    # -- producing ------------------------------------------------------------------
    def compute(self, z0: int, z1: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensure(self, end: int) -> None:
        end = min(int(end), self.ctx.depth)
        if self.hi >= end:
            return
        z0 = self.hi
        z1 = end  # exactly what is asked: each layer then lags its consumer by one slice
        chunk = self.compute(z0, z1)
        self.hi = z1
        if self.readers:
            self.window.append(chunk)
        self._push(z0, chunk)
        del chunk
        self.ctx.count_live()
        for source in self.sources:
            source.release()
        self.release()

    def _push(self, z0: int, chunk: Tensor) -> None:
        if self._push_weight is None:
            return
        # 1x1x1 convs are per voxel: push a few slices at a time, so the stacked
        # contributions (up to b * 2k channels) never cover a whole volume.
        step = 8
        for s0 in range(0, chunk.shape[2], step):
            contrib = _pointwise(chunk[:, :, s0 : s0 + step], self._push_weight)
            for acc, first, rows in self._push_targets:
                acc.add(z0 + s0, contrib[:, first : first + rows])

    def read(self, z0: int, z1: int) -> Tensor:
        """Slices ``[z0, z1)`` (inside the volume) as a (B, C, z1 - z0, H, W) view: do not
        modify it in place."""
        self.ensure(z1)
        return self.window.view(z0, z1)

    def _keep_from(self) -> int:
        """The lowest slice a reader may still read (a reader at ``hi`` next reads ``hi - 1``;
        a finished reader reads nothing)."""
        depth = self.ctx.depth
        return min((r.hi - 1 if r.hi < depth else depth for r in self.readers), default=self.hi)

    def release(self) -> None:
        """Drop the slices no reader will read again."""
        self.window.drop_below(self._keep_from())

    def conv3_window(self, z0: int, z1: int) -> tuple[int, int, int, int]:
        """Input slices ``[a, b)`` a 3x3x3 conv needs for outputs ``[z0, z1)`` and the zero
        slices to pad before/after (outside the volume)."""
        a, b = max(z0 - 1, 0), min(z1 + 1, self.ctx.depth)
        return a, b, a - (z0 - 1), (z1 + 1) - b


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int]) -> Tensor:
    """conv3d, on CPU always through oneDNN: for batch 1 and thin slabs ATen's heuristic
    picks its im2col fallback (``slow_conv3d``), ~10x slower here."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, padding, [1, 1, 1], [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, padding=padding)


def _pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """1x1x1 conv without bias as a matmul: (B, C, n, H, W), (C_out, C) -> (B, C_out, n, H, W)."""
    b, c, *spatial = x.shape
    return torch.matmul(weight, x.reshape(b, c, -1)).view(b, weight.shape[0], *spatial)


def _conv3(x: Tensor, conv: nn.Conv3d, pad_lo: int, pad_hi: int) -> Tensor:
    """The 3x3x3 conv on a slab whose D-padding is explicit (zeros only outside the volume)."""
    if pad_lo and pad_hi:
        return _conv(x, conv.weight, conv.bias, [1, 1, 1])
    if pad_lo or pad_hi:
        x = F.pad(x, (0, 0, 0, 0, pad_lo, pad_hi))
    return _conv(x, conv.weight, conv.bias, [0, 1, 1])


def _bn_elu_(x: Tensor, bn: nn.BatchNorm3d, channels: slice | None = None, inplace: bool = False) -> Tensor:
    """ELU(BN_eval(x)); with ``inplace`` ``x`` (a tensor of our own) is overwritten."""
    if not inplace:
        return F.elu_(_bn(x, bn, channels))
    sl = channels or slice(None)
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var[sl] + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight[sl]
    shift = -bn.running_mean[sl] * scale
    if bn.bias is not None:
        shift = shift + bn.bias[sl]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x.mul_(scale.view(shape)).add_(shift.view(shape))
    return F.elu_(x)


class _Input(_Stream):
    def read(self, z0: int, z1: int) -> Tensor:
        return self.ctx.x[:, :, z0:z1]

    def release(self) -> None:
        pass

    def ensure(self, end: int) -> None:
        self.hi = self.ctx.depth


class _Conv3(_Stream):
    """conv3x3x3(head(source)): the stem, or the "-r" reconstruction's BN -> ELU -> conv."""

    def __init__(self, ctx: _Ctx, source: _Stream, conv: nn.Conv3d, head: Callable[[Tensor], Tensor] | None, name: str) -> None:
        super().__init__(ctx, conv.out_channels, name)
        self.source, self.conv, self.head = source, conv, head
        source.readers.append(self)
        self.sources.append(source)

    def compute(self, z0: int, z1: int) -> Tensor:
        a, b, lo, hi = self.conv3_window(z0, z1)
        x = self.source.read(a, b)
        if self.head is not None:
            x = self.head(x)
        return _conv3(x, self.conv, lo, hi)


class _Unit(_Stream):
    """One dense unit over its input pieces: [BN-ELU-conv1x1(4k)-BN-ELU]-conv3x3x3(k).

    Without a bottleneck the pieces (together at most 4k channels) are concatenated per
    slab; with one, each piece goes through its slice of BN -> ELU -> 1x1x1 conv and the
    sums make the 4k-channel bottleneck output (no concatenation wider than 4k).
    """

    def __init__(self, ctx: _Ctx, pieces: Sequence[_Stream], unit: nn.Module, name: str) -> None:
        conv = unit.conv
        assert isinstance(conv, nn.Conv3d)
        super().__init__(ctx, conv.out_channels, name)
        self.pieces = list(pieces)
        self.unit = unit
        self.slices_in: list[slice] = []
        self.bottleneck_weights: list[Tensor] = []
        start = 0
        for p in self.pieces:
            self.slices_in.append(slice(start, start + p.channels))
            start += p.channels
            p.readers.append(self)
            self.sources.append(p)
            if unit.bottleneck is not None:
                w = unit.bottleneck.weight
                self.bottleneck_weights.append(w[:, self.slices_in[-1]].reshape(w.shape[0], -1).contiguous())
        if start != unit.norm1.num_features:
            raise ValueError(f"{name}: pieces hold {start} channels, the unit expects {unit.norm1.num_features}")

    def compute(self, z0: int, z1: int) -> Tensor:
        u = self.unit
        a, b, lo, hi = self.conv3_window(z0, z1)
        if u.bottleneck is None:
            if len(self.pieces) > 1:  # a fresh tensor: normalise it in place
                x = _bn_elu_(torch.cat([p.read(a, b) for p in self.pieces], dim=1), u.norm1, inplace=True)
            else:  # a view of the stored piece
                x = _bn_elu_(self.pieces[0].read(a, b), u.norm1)
        else:
            x = None
            for p, sl, w in zip(self.pieces, self.slices_in, self.bottleneck_weights):
                part = _pointwise(_bn_elu_(p.read(a, b), u.norm1, sl), w)
                x = part if x is None else x.add_(part)
            assert x is not None and u.bottleneck.bias is not None
            x = _bn_elu_(x.add_(u.bottleneck.bias.view(1, -1, 1, 1, 1)), u.norm2, inplace=True)
        return _conv3(x, u.conv, lo, hi)


class _Accumulator(_Stream):
    """``conv1x1(cat(contributors))``: a sum of pushed per-contributor contributions.

    Its window holds partial sums; slices below the lowest contributor's ``hi`` are done.
    """

    def __init__(self, ctx: _Ctx, conv: nn.Conv3d, name: str) -> None:
        super().__init__(ctx, conv.out_channels, name)
        self.bias = conv.bias
        self.weight = conv.weight
        self.contributors: list[_Stream] = []

    def add(self, z0: int, contrib: Tensor) -> None:
        self.window.accumulate(z0, contrib, self.bias)

    def ensure(self, end: int) -> None:
        end = min(int(end), self.ctx.depth)
        if self.hi >= end:
            return
        for c in self.contributors:
            c.ensure(end)
        done = min(c.hi for c in self.contributors)
        z0, self.hi = self.hi, done
        if done > z0:
            self._push(z0, self.window.view(z0, done))
        self.release()

    def release(self) -> None:
        # partial sums above ``hi`` are still being summed: never drop past ``hi``
        self.window.drop_below(min(self._keep_from(), self.hi))


class _Output:
    """The driver: reads the output stream slab by slab."""

    def __init__(self, source: _Stream) -> None:
        self.hi = 0
        source.readers.append(self)


class StreamingMDCSRN:
    """Callable ``(B, C, D, H, W) -> (B, C, D, H, W)``: ``net``'s eval forward, streamed.

    Args:
        net: an :class:`MDCSRN` or :class:`ReferenceMDCSRN` (eval-mode BN is used whatever
            its mode).
        slab: output slices computed per step along D (memory grows with it; speed too,
            up to a point). ``None``: the whole depth in one step (only the split 1x1
            convs save memory then).

    ``out = StreamingMDCSRN(net, slab=8)(x)`` equals ``net.eval()(x)`` up to float32
    rounding.
    """

    def __init__(self, net: nn.Module, slab: int | None = 16) -> None:
        for attr in MDCSRN_ATTRIBUTES:
            if not hasattr(net, attr):
                raise TypeError(f"streaming needs an mDCSRN generator; {type(net).__name__} has no {attr!r}")
        if slab is not None and int(slab) < 1:
            raise ValueError(f"slab must be >= 1 or None, got {slab!r}")
        self.net = net
        self.slab = slab
        self.name = "stream"
        first = next(iter(net.parameters()), None)  # type: ignore[union-attr]
        self.device = first.device if first is not None else torch.device("cpu")
        #: of the last call: most (channel, slice) planes of H x W held at once (x B x 4 bytes)
        self.max_live_channel_slices = 0

    def receptive_field_radius(self) -> int:
        return int(self.net.receptive_field_radius())  # type: ignore[operator]

    def _build(self, x: Tensor) -> _Stream:
        net = self.net
        ctx = _Ctx(x)
        inp = _Input(ctx, x.shape[1], "input")
        stem = _Conv3(ctx, inp, net.stem, None, "stem")  # type: ignore[arg-type]
        recon = net.reconstruction
        first = recon[0]
        assert isinstance(first, nn.Conv3d)
        consumers: list[_Accumulator] = [
            _Accumulator(ctx, comp, f"compressor{i + 1}") for i, comp in enumerate(net.compressors)  # type: ignore[arg-type]
        ]
        recon_acc = _Accumulator(ctx, first, "reconstruction")
        # Column offset of each level in cat(stem, o_1, ..., o_b), the input of every
        # compressor (its first columns) and of the reconstruction.
        levels: list[_Stream] = []  # pieces of the concatenation, in channel order

        def connect(piece: _Stream, column: int) -> None:
            # This piece feeds every compressor whose concatenation already contains it
            # (those of later blocks) and the reconstruction.
            weights, targets = [], []
            for acc in consumers + [recon_acc]:
                if column + piece.channels <= acc.weight.shape[1]:
                    weights.append(acc.weight[:, column : column + piece.channels])
                    targets.append(acc)
            for acc, w in zip(targets, weights):
                piece.subscribe(acc, w)

        column = 0
        connect(stem, column)
        levels.append(stem)
        column += stem.channels
        for i, block in enumerate(net.blocks):  # type: ignore[arg-type]
            block_in: _Stream = stem if i == 0 else consumers[i - 1]
            # compressor i-1 is fed by the levels [0, column); blocks' own levels come after
            pieces: list[_Stream] = [block_in]
            connect(block_in, column)
            column += block_in.channels
            for j, unit in enumerate(block.units):
                out = _Unit(ctx, list(pieces), unit, f"block{i + 1}.unit{j + 1}")
                pieces.append(out)
                connect(out, column)
                column += out.channels
        if column != first.weight.shape[1]:
            raise ValueError(f"streaming: levels hold {column} channels, the reconstruction expects {first.weight.shape[1]}")
        out_stream: _Stream = recon_acc
        if net.reconstruction_type == "conv":
            bn, conv = recon[1], recon[3]

            def head(t: Tensor, bn: nn.BatchNorm3d = bn) -> Tensor:
                return F.elu(_bn(t, bn))

            out_stream = _Conv3(ctx, recon_acc, conv, head, "reconstruction.conv")  # type: ignore[arg-type]
        return out_stream

    @torch.inference_mode()
    def __call__(self, x: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
        out_stream = self._build(x)
        driver = _Output(out_stream)
        depth = int(x.shape[2])
        slab = depth if self.slab is None else int(self.slab)
        out = torch.empty(x.shape[0], out_stream.channels, *x.shape[2:], dtype=x.dtype, device=x.device)
        for z0 in range(0, depth, slab):
            z1 = min(z0 + slab, depth)
            out[:, :, z0:z1] = out_stream.read(z0, z1)
            driver.hi = z1  # done up to z1 (keeps slice z1 - 1 one step longer: harmless)
            out_stream.release()
            if progress is not None:
                progress(z1 - z0)
        self.max_live_channel_slices = out_stream.ctx.max_live_channel_slices
        if getattr(self.net, "global_residual", False):
            out += x
        return out


def stream_forward(net: nn.Module, x: Tensor, slab: int | None = 16) -> Tensor:
    """``net``'s eval forward pass of ``x`` (B, C, D, H, W), streamed (see the module docstring)."""
    return StreamingMDCSRN(net, slab)(x)


def stream_super_resolve(
    net: nn.Module,
    volume: np.ndarray | Tensor,
    *,
    slab: int | None = 16,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> np.ndarray:
    """``(X, Y, Z)`` LR volume -> ``(X, Y, Z)`` float32 SR: one exact whole-volume pass, streamed."""
    from mdcsrn_lightning.inference.patches import resolve_device

    runner = StreamingMDCSRN(net.to(resolve_device(device)), slab)
    return run_exact(runner, volume, label="streamed", progress=progress)


def run_exact(runner: Any, volume: np.ndarray | Tensor, *, label: str, progress: bool = False) -> np.ndarray:
    """``(X, Y, Z)`` LR volume -> ``(X, Y, Z)`` float32 SR by an exact slab runner (this module's
    :class:`StreamingMDCSRN` or the block-streamed one), on the runner's device; ``progress``
    prints ``label`` and the slices done to stderr."""
    from mdcsrn_lightning.inference.patches import checked_volume

    x = checked_volume(volume, runner.device)[None, None]
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            print(f"\rmdcsrn SR ({label}): {done}/{x.shape[2]} slices", end="", file=sys.stderr, flush=True)

    out = runner(x, report)
    if progress:
        print(file=sys.stderr)
    return out[0, 0].float().cpu().numpy()
