"""Exact whole-volume mDCSRN inference at engine speed: one compiled graph per dense block,
run over slabs of the volume with a small halo.

:mod:`.streaming` computes the exact whole-volume pass layer by layer in eager torch (every
3x3x3 conv, BatchNorm and ELU a separate call, each moving whole planes through memory).
The engines of :mod:`.engines` (OpenVINO above all) fuse those layers and run ~4x faster,
but on fixed tensors: fed patches, they are exact only with ``margin = radius`` (33 for
b8u4), which multiplies the work. This module keeps the engine's speed and the streamed
pass's exactness by cutting at a finer grain:

* **One graph per dense block.** Block ``j`` (u units) sees ``u`` voxels of context per
  side (``u + 1`` for block 1, which also holds the stem conv), not the whole network's
  radius. Its graph (:class:`BlockGraph`) takes the block input on ``t + 2h`` slices of the
  first axis (``h`` the block's halo) and returns, for the ``t`` central slices, the
  block's contributions to every later compressor and to the reconstruction: the 1x1x1
  convs of the level concatenation, split per piece as in :mod:`.streaming` (idea 1), so
  no concatenation of the levels is ever built. Inside the graph the 3x3x3 convs are
  *valid* along the first axis (each unit trims one slice per side), so the halo costs
  ``(t + h) / t`` on average, not ``(t + 2h) / t``.
* **Volume faces through a mask, so every slab has the same shape.** The whole-volume pass
  pads every conv's input with zeros at the volume faces. The graph multiplies each
  unit's conv input by a per-slice mask (1 inside the volume, 0 outside), which is that
  padding exactly; slabs that stick out of the volume (the first and last of each block)
  are fed zeros there and their out-of-volume outputs are dropped. One shape per block and
  volume: each block compiles once per volume shape (cached).
* **Slabs staggered by block.** Block ``j`` computes slices
  ``[k t - j u - c, (k + 1) t - j u - c)`` in wave ``k``: then the compressor that feeds
  it is complete on the slices it reads as soon as block ``j - 1`` has done wave ``k``, and
  each compressor keeps only ``~ t + (j + 2) u`` slices of partial sums (memory
  independent of the depth). ``c`` is chosen to waste the fewest slices past the faces.

The compressor sums, the final reconstruction (and the "-r" variant's BN -> ELU ->
3x3x3 conv, streamed as in :mod:`.streaming`) and the global residual stay in torch.
The result is the plain whole-volume pass up to float32 rounding (tests: < 1e-5 against
one plain forward pass; float64 with the torch engine: < 1e-10).

Engines (``engine=``): ``torch`` (eager, always available; for checks, slower than
:mod:`.streaming`) and ``openvino`` (``pip install "mdcsrn-lightning[openvino]"``).
:func:`exact_engine_runner` picks ``openvino`` for ``auto`` where installed and falls
back to :class:`~.streaming.StreamingMDCSRN` (eager, exact) with one info line otherwise.
Measured figures: ``docs/performance.md`` ("Whole volumes without seams").

Pure torch plus the optional runtime; no Lightning, Hydra or files.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdcsrn_lightning.inference.streaming import StreamingMDCSRN, _bn, _conv3, _Window
from mdcsrn_lightning.models.mdcsrn import MDCSRN_ATTRIBUTES

__all__ = ["BLOCK_ENGINES", "BlockEngine", "BlockGraph", "BlockStreamingMDCSRN", "exact_engine_runner"]

BlockEngine = Literal["torch", "openvino"]
BLOCK_ENGINES: tuple[str, ...] = ("torch", "openvino")


def _check_mdcsrn(net: object) -> None:
    for attr in MDCSRN_ATTRIBUTES:
        if not hasattr(net, attr):
            raise TypeError(f"block streaming needs an mDCSRN generator; {type(net).__name__} has no {attr!r}")


class BlockGraph(nn.Module):
    """Dense block ``index`` of ``net`` (with the stem for block 0) over one slab.

    ``forward(x, mask)``: ``x`` (B, C_in, t + 2h, H, W) is the block input (the network
    input for block 0, else the compressor's output) on slices ``[s - h, s + t + h)``,
    zeros where outside the volume; ``mask`` (1, 1, t + 2h, 1, 1) is 1 on the slices inside
    the volume, 0 outside. Returns (B, R, t, H, W): for slices ``[s, s + t)``, the block's
    pieces (block input and unit outputs; for block 0 the stem counts twice, as the first
    level and as the block input) times the matching columns of every later consumer's
    1x1x1 conv (compressors ``index .. b-2``, then the reconstruction's first conv), stacked
    in that order; no biases (the caller's accumulators start at them). ``R`` is
    :attr:`rows`; ``h`` is :attr:`halo`.

    Shares ``net``'s modules (no copies); BatchNorm uses the running statistics.
    """

    def __init__(self, net: nn.Module, index: int) -> None:
        super().__init__()
        _check_mdcsrn(net)
        blocks = list(net.blocks)  # type: ignore[arg-type]
        if not 0 <= index < len(blocks):
            raise ValueError(f"block index must be in [0, {len(blocks)}), got {index}")
        self.index = index
        self.units = nn.ModuleList(blocks[index].units)
        self.stem = net.stem if index == 0 else None
        self.halo = len(self.units) + (1 if index == 0 else 0)
        consumers: list[nn.Conv3d] = [*list(net.compressors)[index:], net.reconstruction[0]]  # type: ignore[list-item]
        stem_width = int(net.stem.out_channels)  # type: ignore[union-attr]
        k = int(self.units[0].conv.out_channels)
        width = int(self.units[0].norm1.num_features) + len(self.units) * k  # block input + units
        # columns of this block's pieces in cat(stem, o_1, ..., o_b): o_1 starts after the stem
        column = stem_width + sum(int(b.units[0].norm1.num_features) + len(b.units) * k for b in blocks[:index])
        rows = []
        for conv in consumers:
            w = conv.weight.detach()[:, column : column + width]
            if w.shape[1] != width:
                raise ValueError(f"block {index + 1}: consumer has {conv.weight.shape[1]} input channels, too few")
            if index == 0:  # the stem is also level 0 (columns [0, stem_width))
                w = w.clone()
                w[:, :stem_width] += conv.weight.detach()[:, :stem_width]
            rows.append(w)
        self.register_buffer("weight", torch.cat(rows).contiguous(), persistent=False)
        #: rows of each consumer in the output, in order (compressors index.., reconstruction)
        self.consumer_rows = [int(r.shape[0]) for r in rows]
        self.rows = sum(self.consumer_rows)
        self.in_channels = int(net.stem.in_channels) if index == 0 else int(self.units[0].norm1.num_features)  # type: ignore[union-attr]

    @staticmethod
    def _head(unit: nn.Module, x: Tensor) -> Tensor:
        x = F.elu(_bn(x, unit.norm1))
        if unit.bottleneck is not None:
            x = F.elu(_bn(F.conv3d(x, unit.bottleneck.weight, unit.bottleneck.bias), unit.norm2))
        return x

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n = x.shape[2]
        lo = 0  # the pieces' common first slice (relative to the slab)
        if self.stem is not None:
            # x is zero outside the volume: exactly the stem conv's own padding
            x = F.conv3d(x, self.stem.weight, self.stem.bias, padding=(0, 1, 1))
            lo = 1
        pieces = [(lo, x)]  # (first slice, tensor of slices [first, n - first))

        def crop(first: int, t: Tensor, a: int) -> Tensor:
            return t[:, :, a - first : t.shape[2] - (a - first)]

        for j, unit in enumerate(self.units):
            a = lo + j  # this unit's conv input covers slices [a, n - a)
            parts = [crop(first, t, a) for first, t in pieces]
            head = self._head(unit, torch.cat(parts, 1) if len(parts) > 1 else parts[0])
            head = head * mask[:, :, a : n - a]  # zeros outside the volume = the conv's padding
            pieces.append((a + 1, F.conv3d(head, unit.conv.weight, unit.conv.bias, padding=(0, 1, 1))))
        last = lo + len(self.units)
        cat = torch.cat([crop(first, t, last) for first, t in pieces], 1)
        return F.conv3d(cat, self.weight)


# --------------------------------------------------------------------------- runners
class _TorchRunner:
    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph

    def __call__(self, x: Tensor, mask: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.graph(x, mask)


class _OpenVinoRunner:
    """``graph`` converted to OpenVINO once (traced on a small example) and compiled per
    input shape (float32 precision hint; LRU of 2 shapes)."""

    def __init__(self, graph: BlockGraph, threads: int | None = None) -> None:
        from mdcsrn_lightning.inference.engines import EngineUnavailable, engine_available

        if not engine_available("openvino"):
            raise EngineUnavailable("engine=openvino needs: pip install 'mdcsrn-lightning[openvino]'")
        import openvino as ov

        self.core = ov.Core()
        self.graph = graph
        self.config = {
            "INFERENCE_PRECISION_HINT": "f32",  # CPUs with AMX default to bf16
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, int(threads or torch.get_num_threads())),
        }
        self._models: dict[int, Any] = {}  # slab length -> converted model
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _model(self, channels: int, n: int) -> Any:
        # The slab length n is baked into the traced slices; H and W are reshaped later.
        if n not in self._models:
            import openvino as ov

            example = (torch.zeros(1, channels, n, 3, 3), torch.ones(1, 1, n, 1, 1))
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self._models[n] = ov.convert_model(self.graph.eval(), example_input=example)
        return self._models[n]

    def _compiled_for(self, shape: tuple[int, ...]) -> Any:
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        model = self._model(shape[1], shape[2]).clone()
        model.reshape({model.inputs[0]: list(shape), model.inputs[1]: [1, 1, shape[2], 1, 1]})
        compiled = self.core.compile_model(model, "CPU", self.config)
        self._compiled[shape] = compiled
        if len(self._compiled) > 2:
            self._compiled.popitem(last=False)
        return compiled

    def __call__(self, x: Tensor, mask: Tensor) -> Tensor:
        compiled = self._compiled_for(tuple(x.shape))
        out = compiled([x.numpy(), mask.numpy()])[compiled.outputs[0]]
        return torch.from_numpy(out)  # the request's buffer: used before the next call


def _runner(graph: BlockGraph, engine: str) -> Callable[[Tensor, Tensor], Tensor]:
    if engine == "torch":
        return _TorchRunner(graph)
    if engine == "openvino":
        return _OpenVinoRunner(graph)
    raise ValueError(f"engine must be one of {BLOCK_ENGINES}, got {engine!r}")


# --------------------------------------------------------------------------- driver
def best_offset(depth: int, slab: int, lags: list[int]) -> int:
    """The shift ``c`` in ``[0, slab)`` of all slab grids that computes the fewest slabs
    (block ``j``'s waves start at ``-lags[j] - c``), the smallest such ``c``."""

    def slabs(c: int) -> int:
        return sum(math.ceil((depth + lag + c) / slab) for lag in lags)

    return min(range(slab), key=lambda c: (slabs(c), c))


class BlockStreamingMDCSRN:
    """Callable ``(B, C, D, H, W) -> (B, C, D, H, W)``: ``net``'s eval forward pass over the
    whole volume, exact, by per-block graphs on slabs of ``slab`` slices along D.

    Args:
        net: an :class:`~mdcsrn_lightning.models.mdcsrn.MDCSRN` or
            :class:`~mdcsrn_lightning.models.reference.ReferenceMDCSRN` (eval-mode
            BatchNorm is used whatever its mode).
        slab: output slices per block graph call (``t``). Larger: less halo recompute
            (``(t + u) / t``) and fewer calls, more memory (``~ H W (t + 2u)`` times the
            block's widest working set, plus the compressors' partial sums).
        engine: ``torch`` (eager) or ``openvino``; CPU only for ``openvino``.

    Graphs are built once per engine and compiled once per input shape (cached), so
    calling it on several volumes of one shape pays the compilation once.
    """

    def __init__(self, net: nn.Module, slab: int = 24, engine: BlockEngine = "openvino") -> None:
        _check_mdcsrn(net)
        if isinstance(slab, bool) or int(slab) < 1:
            raise ValueError(f"slab must be an integer >= 1, got {slab!r}")
        if engine not in BLOCK_ENGINES:
            raise ValueError(f"engine must be one of {BLOCK_ENGINES}, got {engine!r}")
        self.net = net.eval()
        self.slab = int(slab)
        self.engine = engine
        self.name = f"block-stream[{engine}]"
        self.graphs = [BlockGraph(net, j) for j in range(len(net.blocks))]  # type: ignore[arg-type]
        self.runners = [_runner(g, engine) for g in self.graphs]
        first = next(iter(net.parameters()), None)  # type: ignore[union-attr]
        self.device = first.device if first is not None else torch.device("cpu")
        if engine == "openvino" and self.device.type != "cpu":
            raise ValueError("engine=openvino runs on the CPU; move the network to the CPU or use engine=torch")
        #: of the last call: block graph calls and the slices they computed, for the figures
        self.calls = 0
        self.computed_slices = 0

    def receptive_field_radius(self) -> int:
        return int(self.net.receptive_field_radius())  # type: ignore[operator]

    @torch.inference_mode()
    def __call__(self, x: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
        if x.dtype != torch.float32 and self.engine != "torch":
            raise ValueError(f"engine={self.engine} runs in float32, got {x.dtype}")
        net, t = self.net, self.slab
        batch, _, depth, height, width = x.shape
        nblocks = len(self.graphs)
        units = [len(g.units) for g in self.graphs]
        # block j's slabs lag block j-1's by the halo of block j (its units): the compressor
        # feeding block j is complete on the slices block j reads once block j-1 is done
        lags = [sum(units[1 : j + 1]) for j in range(nblocks)]
        offset = best_offset(depth, t, lags)
        compressors = list(net.compressors)  # type: ignore[arg-type]
        windows = [_Window(depth) for _ in compressors]  # compressor i feeds block i+1
        recon = net.reconstruction
        recon_first = recon[0]
        conv_recon = net.reconstruction_type == "conv"
        out = torch.empty(batch, int(recon[-1].out_channels), depth, height, width, dtype=x.dtype, device=x.device)
        if conv_recon:  # the 8k-channel sum, then BN -> ELU -> 3x3x3 conv, streamed
            recon_window = _Window(depth)
        else:
            out.copy_(recon_first.bias.view(1, -1, 1, 1, 1).expand_as(out))
        recon_done = 0  # slices of `out` final (conv_recon: of the 8k sum)
        out_done = 0
        self.calls = self.computed_slices = 0
        starts = [-lag - offset for lag in lags]  # block j's next slab start
        while starts[-1] < depth:
            for j, graph in enumerate(self.graphs):
                s = starts[j]
                if s >= depth:
                    continue
                starts[j] = s + t
                if s + t <= 0:
                    continue
                h = graph.halo
                a, b = s - h, s + t + h
                lo, hi = max(a, 0), min(b, depth)
                source = x[:, :, lo:hi] if j == 0 else windows[j - 1].view(lo, hi)
                slab_in = source if (lo, hi) == (a, b) else F.pad(source, (0, 0, 0, 0, lo - a, b - hi))
                mask = torch.zeros(1, 1, b - a, 1, 1, dtype=x.dtype, device=x.device)
                mask[:, :, lo - a : hi - a] = 1
                contrib = self.runners[j](slab_in.contiguous(), mask)
                self.calls += 1
                self.computed_slices += t
                z0, z1 = max(s, 0), min(s + t, depth)
                contrib = contrib[:, :, z0 - s : z1 - s]
                row = 0
                for i, rows in enumerate(graph.consumer_rows[:-1]):
                    windows[j + i].accumulate(z0, contrib[:, row : row + rows], compressors[j + i].bias)
                    row += rows
                part = contrib[:, row:]
                if j + 1 < nblocks:  # block j+1 never reads below its next slab's halo again
                    windows[j].drop_below(starts[j + 1] - self.graphs[j + 1].halo)
                if conv_recon:
                    recon_window.accumulate(z0, part, recon_first.bias)
                else:
                    out[:, :, z0:z1] += part
                if j == nblocks - 1:
                    recon_done = z1
            done = self._finish_conv_recon(recon_window, out, out_done, recon_done, depth) if conv_recon else recon_done
            if progress is not None and done > out_done:
                progress(done - out_done)
            out_done = done
        if getattr(net, "global_residual", False):
            out += x
        return out

    def _finish_conv_recon(self, window: _Window, out: Tensor, done: int, summed: int, depth: int) -> int:
        """The "-r" reconstruction's BN -> ELU -> 3x3x3 conv on the slices whose 8k sums
        (and their neighbours) are complete; returns the new count of final slices."""
        recon = self.net.reconstruction
        end = summed if summed == depth else summed - 1
        if end <= done:
            return done
        a, b = max(done - 1, 0), min(end + 1, depth)
        pad_lo, pad_hi = a - (done - 1), (end + 1) - b
        h = F.elu(_bn(window.view(a, b), recon[1]))
        out[:, :, done:end] = _conv3(h, recon[3], pad_lo, pad_hi)
        window.drop_below(end - 1)
        return end


def exact_engine_runner(
    net: nn.Module, engine: str = "auto", slab: int | None = None, log: Callable[[str], None] | None = None
) -> BlockStreamingMDCSRN | StreamingMDCSRN:
    """What ``stream=true`` runs for ``engine``: :class:`BlockStreamingMDCSRN` with OpenVINO
    (``openvino``, or ``auto`` where installed, on the CPU) or the eager
    :class:`~.streaming.StreamingMDCSRN` (``torch``, or ``auto`` without OpenVINO: one info
    line through ``log``). ``slab``: ``None`` for each path's default (24 / 16)."""
    from mdcsrn_lightning.inference.engines import EngineUnavailable, engine_available

    first = next(iter(net.parameters()), None)
    on_cpu = first is None or first.device.type == "cpu"
    if engine == "auto":
        if on_cpu and engine_available("openvino"):
            engine = "openvino"
        else:
            if log is not None and on_cpu:
                log("stream=true engine=auto: OpenVINO is not installed, using the eager streamed pass "
                    "(pip install 'mdcsrn-lightning[openvino]' for ~3x faster exact inference)")
            engine = "torch"
    if engine == "torch":
        return StreamingMDCSRN(net, 16 if slab is None else slab)
    if engine == "openvino":
        if not engine_available("openvino"):
            raise EngineUnavailable("stream=true engine=openvino needs: pip install 'mdcsrn-lightning[openvino]'")
        return BlockStreamingMDCSRN(net, 24 if slab is None else slab, "openvino")
    raise ValueError(f"stream=true runs engine=torch, openvino or auto, got engine={engine!r}")


def _stderr(msg: str) -> None:
    print(f"mdcsrn: {msg}", file=sys.stderr, flush=True)


def block_stream_super_resolve(
    net: nn.Module, volume: np.ndarray | Tensor, *, slab: int = 24, engine: BlockEngine = "openvino"
) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(X, Y, Z)`` float32: :class:`BlockStreamingMDCSRN` on the CPU."""
    from mdcsrn_lightning.inference.patches import checked_volume

    x = checked_volume(volume, torch.device("cpu"))[None, None]
    return BlockStreamingMDCSRN(net.cpu(), slab, engine)(x)[0, 0].numpy()
