"""mDCSRN: 3D multi-level densely connected super-resolution network (paper 3.3, Fig. 3-5).

Pure torch: no Lightning, Hydra or file I/O. All tensors are (B, C, D, H, W); the network
keeps the grid size (LR and HR share one grid, there is no up-sampling layer).

Layout (k = growth rate, b = blocks, u = units per block)::

    x (B, C_in, D, H, W)
    stem      conv3x3x3  C_in -> 2k                                   -> s   (B, 2k, ...)
    block 1   DenseBlock(2k)   on s                                   -> o_1 (B, 2k + u*k, ...)
    block i   DenseBlock(2k)   on conv1x1x1(cat(s, o_1..o_{i-1})) -> 2k -> o_i
    recon     "direct": conv1x1x1(cat(s, o_1..o_b)) -> C_in
              "conv"  : conv1x1x1 -> 8k, BN, ELU, conv3x3x3 -> C_in      (the paper's "-r")
    out       recon (+ x when global_residual)

A DenseUnit is pre-activation DenseNet(-BC): BN -> ELU -> conv3x3x3(k); when the unit's input
is wider than 4k, BN -> ELU -> conv1x1x1(4k) -> BN -> ELU -> conv3x3x3(k).

Choices made so that every parameter count of the paper's Table 1 is hit to two decimals
(``round(n / 1e6, 2)``; measured counts in ``tests/test_mdcsrn.py``). All nine configurations
are met by this combination; changing any one of the first four breaks at least one:

* Bottleneck only when the unit input is *strictly* wider than 4k (``> 4k``). With ``>= 4k``
  b1u16-r lands on 0.36M instead of 0.35M.
* The compressor is a bare 1x1x1 conv (no BN/ELU before it). A BN before it puts b6u4 at
  0.36M instead of 0.35M. Its input is the raw concatenation, like the direct-combination
  layer's.
* BatchNorm counts 2 parameters per channel (gamma, beta; running statistics are buffers).
  Counting the running statistics too (Keras' "total params") breaks b1u16-r and b6u4.
* Every conv has a bias (the PyTorch / TensorFlow default). Bias-free convs put b8u4 at
  0.48M and b4u4 k=16 at 0.40M.
* The reconstruction has no BN/ELU before its first conv (Fig. 5: the direct combination
  and the -r bottleneck both act on the raw concatenation). A BN there would also fit all
  nine counts, so here the figure decides, not the counts.
* Block 1 has no compressor (its input, the stem output, is already 2k wide).
* b4u4 k=12 comes out at 228,961 parameters (0.23M): Table 2 prints 0.23M, Table 1 0.22M.
  No combination of the options above gives 0.22M for b4u4 while meeting the other eight.
  b8u4 k=12 is 485,473.

``in_channels`` > 1 makes the output ``in_channels`` wide too (an image in, an image of the
same kind out), so that the global residual is always defined; the paper uses 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MDCSRN", "MDCSRN_ATTRIBUTES", "DenseUnit", "DenseBlock", "count_parameters", "is_mdcsrn", "lean_forward"]

Reconstruction = Literal["direct", "conv"]
_RECONSTRUCTIONS: tuple[str, ...] = ("direct", "conv")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (buffers such as BN running stats excluded).

    This is the quantity the paper's "#Parm" columns report (see the module docstring).
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class DenseUnit(nn.Module):
    """Pre-activation dense unit: [BN-ELU-conv1x1(4k)]-BN-ELU-conv3x3x3(k).

    Input: a list of feature maps (B, C_j, D, H, W) whose channels sum to ``in_channels``;
    they are concatenated here so that the memory-efficient path never has to keep the
    concatenation alive. Output: (B, k, D, H, W).

    The bottleneck is used only when ``in_channels > 4k`` (DenseNet-BC, "when needed").

    ``memory_efficient``: in training with grad enabled, concat -> BN -> ELU (-> bottleneck
    conv -> BN -> ELU) runs under ``torch.utils.checkpoint`` (non-reentrant), as in
    torchvision's DenseNet, so the wide concatenation, its normalised copies (and the
    bottleneck's) are recomputed in backward instead of stored; only the 3x3x3 conv's input
    is kept. Outputs and gradients are unchanged; the recomputation does not touch the BN
    running statistics a second time (see ``_head``).
    """

    def __init__(self, in_channels: int, growth_rate: int, memory_efficient: bool = False) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("growth_rate", growth_rate)
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.memory_efficient = memory_efficient
        self.norm1 = nn.BatchNorm3d(in_channels)
        self.act1 = nn.ELU()
        conv_in = in_channels
        self.bottleneck: nn.Conv3d | None = None
        self.norm2: nn.BatchNorm3d | None = None
        self.act2: nn.ELU | None = None
        if in_channels > 4 * growth_rate:
            self.bottleneck = nn.Conv3d(in_channels, 4 * growth_rate, kernel_size=1)
            self.norm2 = nn.BatchNorm3d(4 * growth_rate)
            self.act2 = nn.ELU()
            conv_in = 4 * growth_rate
        self.conv = nn.Conv3d(conv_in, growth_rate, kernel_size=3, padding=1)

    @staticmethod
    def _norm(bn: nn.BatchNorm3d, x: Tensor, recompute: bool) -> Tensor:
        if recompute and bn.training and bn.running_mean is not None and bn.running_var is not None:
            # Training-mode BN normalises with batch statistics, so running it on throwaway
            # copies of the buffers gives the same output (and the same saved tensors, which
            # non-reentrant checkpointing checks) without a second running-stats update.
            return F.batch_norm(
                x,
                bn.running_mean.clone(),
                bn.running_var.clone(),
                bn.weight,
                bn.bias,
                True,
                0.0,
                bn.eps,
            )
        return bn(x)

    def _head(self, features: list[Tensor], recompute: bool) -> Tensor:
        """cat -> BN -> ELU (-> conv1x1 -> BN -> ELU): the input of the 3x3x3 conv.

        ``recompute`` marks the checkpoint's second pass.
        """
        x = torch.cat(features, dim=1) if len(features) > 1 else features[0]
        x = self.act1(self._norm(self.norm1, x, recompute))
        if self.bottleneck is not None and self.norm2 is not None and self.act2 is not None:
            x = self.act2(self._norm(self.norm2, self.bottleneck(x), recompute))
        return x

    def _checkpointed_head(self, features: list[Tensor]) -> Tensor:
        calls = 0

        def head(*inputs: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            return self._head(list(inputs), recompute=calls > 1)

        out = checkpoint(head, *features, use_reentrant=False)
        assert isinstance(out, Tensor)
        return out

    def forward(self, features: list[Tensor] | Tensor) -> Tensor:
        """(B, in_channels, D, H, W) (or a list summing to it) -> (B, k, D, H, W)."""
        if isinstance(features, Tensor):
            features = [features]
        if self.memory_efficient and self.training and torch.is_grad_enabled():
            x = self._checkpointed_head(features)
        else:
            x = self._head(features, recompute=False)
        return self.conv(x)


class DenseBlock(nn.Module):
    """u dense units, each seeing the block input and all earlier unit outputs.

    (B, C, D, H, W) -> (B, C + u*k, D, H, W): the block input followed by all unit outputs
    (the "red lines" of Fig. 4a).
    """

    def __init__(
        self, in_channels: int, num_units: int, growth_rate: int, memory_efficient: bool = False
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_units", num_units)
        _check_positive_int("growth_rate", growth_rate)
        self.in_channels = in_channels
        self.out_channels = in_channels + num_units * growth_rate
        self.units = nn.ModuleList(
            DenseUnit(in_channels + j * growth_rate, growth_rate, memory_efficient)
            for j in range(num_units)
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for unit in self.units:
            features.append(unit(features))
        return torch.cat(features, dim=1)


class MDCSRN(nn.Module):
    """mDCSRN generator: (B, C, D, H, W) -> (B, C, D, H, W), C = ``in_channels`` (1 in the paper).

    Args:
        num_blocks: b, number of DenseBlocks (>= 1).
        units_per_block: u, DenseUnits per block (>= 1).
        growth_rate: k, filters per DenseUnit (>= 1); the stem and compressors are 2k wide.
        reconstruction: ``"direct"`` (1x1x1 direct feature combination, the default model) or
            ``"conv"`` (1x1x1 bottleneck to 8k, BN, ELU, 3x3x3 conv: the paper's "-r").
        global_residual: output = input + network(input). The last conv is zero-initialised
            (weight and bias) so an untrained model is the identity. Not in the paper; it
            adds no parameters.
        in_channels: image channels in and out.
        memory_efficient: in training, checkpoint each unit's concat-BN-ELU(-bottleneck-
            BN-ELU) and build no level concatenation (:func:`lean_forward`: compressors and
            reconstruction as sums of per-piece 1x1x1 convs). Same outputs and gradients
            (up to float rounding); much less peak memory (measured: docs/performance.md),
            at the cost of recomputing those layers in backward.

    Any D, H, W >= 1 are accepted (all convs are size-preserving with zero padding); each
    output voxel sees ``receptive_field_radius()`` voxels of context on every side.
    """

    def __init__(
        self,
        num_blocks: int = 4,
        units_per_block: int = 4,
        growth_rate: int = 12,
        reconstruction: Reconstruction = "direct",
        global_residual: bool = False,
        in_channels: int = 1,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("num_blocks", num_blocks)
        _check_positive_int("units_per_block", units_per_block)
        _check_positive_int("growth_rate", growth_rate)
        _check_positive_int("in_channels", in_channels)
        if reconstruction not in _RECONSTRUCTIONS:
            raise ValueError(
                f"reconstruction must be one of {_RECONSTRUCTIONS}, got {reconstruction!r}"
            )
        self.num_blocks = num_blocks
        self.units_per_block = units_per_block
        self.growth_rate = growth_rate
        self.reconstruction_type: Reconstruction = reconstruction
        self.global_residual = bool(global_residual)
        self.in_channels = in_channels

        k = growth_rate
        stem_channels = 2 * k
        self.stem = nn.Conv3d(in_channels, stem_channels, kernel_size=3, padding=1)

        blocks: list[DenseBlock] = []
        compressors: list[nn.Conv3d] = []
        level_channels = stem_channels  # channels of cat(stem, outputs of blocks so far)
        for i in range(num_blocks):
            if i > 0:
                # Block 1 takes the stem directly; later blocks squeeze all earlier levels.
                compressors.append(nn.Conv3d(level_channels, 2 * k, kernel_size=1))
            block = DenseBlock(2 * k, units_per_block, k, memory_efficient)
            blocks.append(block)
            level_channels += block.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.compressors = nn.ModuleList(compressors)  # compressors[i-1] feeds blocks[i]

        if reconstruction == "direct":
            self.reconstruction = nn.Sequential(
                nn.Conv3d(level_channels, in_channels, kernel_size=1)
            )
        else:
            self.reconstruction = nn.Sequential(
                nn.Conv3d(level_channels, 8 * k, kernel_size=1),
                nn.BatchNorm3d(8 * k),
                nn.ELU(),
                nn.Conv3d(8 * k, in_channels, kernel_size=3, padding=1),
            )
        if self.global_residual:
            last = self.final_conv
            nn.init.zeros_(last.weight)
            assert last.bias is not None
            nn.init.zeros_(last.bias)

    @property
    def final_conv(self) -> nn.Conv3d:
        """The conv that produces the output image (zero-initialised under global_residual)."""
        last = self.reconstruction[-1]
        assert isinstance(last, nn.Conv3d)
        return last

    def _units(self) -> list[DenseUnit]:
        return [m for m in self.modules() if isinstance(m, DenseUnit)]

    @property
    def memory_efficient(self) -> bool:
        """Whether the dense units checkpoint their concat-BN-ELU(-bottleneck) in training."""
        return all(unit.memory_efficient for unit in self._units())

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        for unit in self._units():
            unit.memory_efficient = bool(value)

    def receptive_field_radius(self) -> int:
        """Voxels of context on each side of an output voxel.

        Counts the 3x3x3 convs on the longest path: stem + b*u units (+1 for the "-r"
        reconstruction conv); 1x1x1 convs add nothing.
        """
        return 1 + self.num_blocks * self.units_per_block + (
            1 if self.reconstruction_type == "conv" else 0
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if self.training and torch.is_grad_enabled() and self.memory_efficient:
            # no level concatenations either: autograd would keep each one for the
            # compressor's weight gradient, while the pieces are kept anyway
            return lean_forward(self, x)
        stem = self.stem(x)
        levels = [stem]
        for i, block in enumerate(self.blocks):
            inp = stem if i == 0 else self.compressors[i - 1](torch.cat(levels, dim=1))
            levels.append(block(inp))
        out = self.reconstruction(torch.cat(levels, dim=1))
        if self.global_residual:
            out = out + x
        return out


#: The attributes of an mDCSRN generator (:class:`MDCSRN` or
#: :class:`~mdcsrn_lightning.models.reference.ReferenceMDCSRN`) that the lean pass below and
#: the streamed pass (:mod:`mdcsrn_lightning.inference.streaming`) rely on.
MDCSRN_ATTRIBUTES = ("stem", "blocks", "compressors", "reconstruction", "reconstruction_type")


def is_mdcsrn(net: object) -> bool:
    """Whether ``net`` has the mDCSRN layout (:data:`MDCSRN_ATTRIBUTES`)."""
    return all(hasattr(net, a) for a in MDCSRN_ATTRIBUTES)


def check_mdcsrn(net: object, what: str) -> None:
    """The one layout check: ``TypeError`` naming ``what`` unless ``net`` is an mDCSRN generator."""
    for attr in MDCSRN_ATTRIBUTES:
        if not hasattr(net, attr):
            raise TypeError(f"{what} needs an mDCSRN generator; {type(net).__name__} has no {attr!r}")


def level_consumers(net: nn.Module) -> list[nn.Conv3d]:
    """The 1x1x1 convs of ``cat(stem, o_1, ..., o_b)``'s prefixes: the compressors (compressor
    ``i`` feeds block ``i + 1``), then the reconstruction's first conv."""
    return [*net.compressors, net.reconstruction[0]]  # type: ignore[list-item]


def split_weights(net: nn.Module, column: int, width: int) -> list[tuple[int, Tensor]]:
    """The rule behind every lean pass: a 1x1x1 conv of a concatenation is the sum of the
    convs of its slices, ``conv(cat(a, b)) = conv_a(a) + conv_b(b) + bias``.

    For the piece in columns ``[column, column + width)`` of the levels' concatenation:
    ``(i, weight)`` for each consumer ``i`` of :func:`level_consumers` whose input holds
    those columns, ``weight`` its ``(C_out, width, 1, 1, 1)`` input-channel slice (a view).
    """
    return [(i, conv.weight[:, column : column + width])
            for i, conv in enumerate(level_consumers(net)) if column + width <= conv.in_channels]


def lean_forward(net: nn.Module, x: Tensor) -> Tensor:
    """``net(x)`` computed without concatenating the levels: the same function, less memory.

    The compressors and the reconstruction's first layer are 1x1x1 convs of
    ``cat(stem, o_1, ..., o_b)``, and a 1x1x1 conv of a concatenation is the sum of its
    input-channel slices' convs: ``conv(cat(a, b)) = conv_a(a) + conv_b(b) + bias``. So each
    piece (the stem, each block's input, each unit's k-channel output) adds its
    contribution to every later compressor and to the reconstruction as soon as it exists,
    and no block output or level concatenation is ever built. The pieces still live while
    the block needs them (inside a block, units concatenate at most 4k channels). Peak
    memory: the running sums (2k per later block) plus one block, instead of the whole
    concatenation (600 channels for b8u4). Exported to ONNX/OpenVINO, this graph also runs
    faster (no large Concat copies). Works for :class:`MDCSRN` and the reference class
    (same module layout). For exact whole-volume inference with memory independent of the
    depth, see :mod:`mdcsrn_lightning.inference.streaming`.
    """
    stem = net.stem(x)
    recon = net.reconstruction
    consumers = level_consumers(net)
    sums: list[Tensor | None] = [None] * len(consumers)
    column = 0

    def push(piece: Tensor) -> None:
        # the piece's share of every consumer whose concatenation holds it
        nonlocal column
        for i, weight in split_weights(net, column, piece.shape[1]):
            y = F.conv3d(piece, weight, consumers[i].bias if sums[i] is None else None)
            sums[i] = y if sums[i] is None else sums[i] + y
        column += piece.shape[1]

    push(stem)
    for i, block in enumerate(net.blocks):  # type: ignore[arg-type]
        if i == 0:
            inp = stem
        else:
            inp = sums[i - 1]
            sums[i - 1] = None
            assert inp is not None
        features = [inp]
        push(inp)
        for unit in block.units:
            out = unit(features)
            features.append(out)
            push(out)
        del features
    out = sums[-1]
    assert out is not None
    if net.reconstruction_type == "conv":
        out = recon[3](recon[2](recon[1](out)))
    if net.global_residual:
        out = out + x
    return out
