"""Exact whole-volume mDCSRN inference with bounded memory, in eager torch (the GPU path):
every feature map streamed ``slab`` slices at a time along the first axis, and every 1x1x1
conv of a concatenation computed as a sum over its pieces, so no concatenation of the levels
is ever held. Equals one whole-volume forward pass (eval-mode BatchNorm) up to float32
rounding; how: ``docs/inference.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdcsrn_lightning.inference.slabs import SlabWindow, bn_eval, conv3_slab, pointwise
from mdcsrn_lightning.models.block_graph import folded_bn
from mdcsrn_lightning.models.mdcsrn import check_mdcsrn, level_consumers, split_weights

__all__ = ["StreamingMDCSRN", "stream_forward"]


class _Ctx:
    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.depth = int(x.shape[2])
        self.streams: list[_Stream] = []
        self.max_live_channel_slices = 0  # most (channel, slice) planes allocated at once

    def count_live(self) -> None:
        live = sum(s.window.allocated_slices() * s.channels for s in self.streams)
        self.max_live_channel_slices = max(self.max_live_channel_slices, live)


class _Stream:
    """A (B, C, D, H, W) feature map produced slice range by slice range along D.

    ``hi``: slices ``[0, hi)`` are done. Done slices are kept in a
    :class:`~.slabs.SlabWindow` while a reader may still read them; each done chunk is
    pushed at once into the accumulators that subscribe to this stream.
    """

    def __init__(self, ctx: _Ctx, channels: int, name: str) -> None:
        self.ctx, self.channels, self.name = ctx, channels, name
        ctx.streams.append(self)
        self.hi = 0
        self.window = SlabWindow(ctx.depth)
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
            contrib = pointwise(chunk[:, :, s0 : s0 + step], self._push_weight)
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


def _bn_elu_(x: Tensor, bn: nn.BatchNorm3d, channels: slice | None = None, inplace: bool = False) -> Tensor:
    """ELU(BN_eval(x)); with ``inplace`` ``x`` (a tensor of our own) is overwritten."""
    if not inplace:
        return F.elu_(bn_eval(x, bn, channels))
    scale, shift = folded_bn(bn, channels)
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
        return conv3_slab(x, self.conv, lo, hi)


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
                part = pointwise(_bn_elu_(p.read(a, b), u.norm1, sl), w)
                x = part if x is None else x.add_(part)
            assert x is not None and u.bottleneck.bias is not None
            x = _bn_elu_(x.add_(u.bottleneck.bias.view(1, -1, 1, 1, 1)), u.norm2, inplace=True)
        return conv3_slab(x, u.conv, lo, hi)


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
        check_mdcsrn(net, "streaming")
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
        convs = level_consumers(net)
        names = [f"compressor{i + 1}" for i in range(len(convs) - 1)] + ["reconstruction"]
        accs = [_Accumulator(ctx, conv, name) for conv, name in zip(convs, names)]
        column = 0  # of the next piece in cat(stem, o_1, ..., o_b)

        def connect(piece: _Stream) -> None:
            nonlocal column
            for i, weight in split_weights(net, column, piece.channels):
                piece.subscribe(accs[i], weight)
            column += piece.channels

        connect(stem)
        for i, block in enumerate(net.blocks):  # type: ignore[arg-type]
            pieces: list[_Stream] = [stem if i == 0 else accs[i - 1]]
            connect(pieces[0])
            for j, unit in enumerate(block.units):
                pieces.append(_Unit(ctx, list(pieces), unit, f"block{i + 1}.unit{j + 1}"))
                connect(pieces[-1])
        if column != convs[-1].in_channels:
            raise ValueError(f"streaming: levels hold {column} channels, the reconstruction expects {convs[-1].in_channels}")
        if net.reconstruction_type != "conv":
            return accs[-1]
        recon = net.reconstruction

        def head(t: Tensor, bn: nn.BatchNorm3d = recon[1]) -> Tensor:  # type: ignore[assignment]
            return F.elu(bn_eval(t, bn))

        return _Conv3(ctx, accs[-1], recon[3], head, "reconstruction.conv")  # type: ignore[arg-type]

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
    """``net``'s eval forward pass of ``x`` (B, C, D, H, W), streamed."""
    return StreamingMDCSRN(net, slab)(x)
