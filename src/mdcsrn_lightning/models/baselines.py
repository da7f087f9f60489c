"""CNN baselines of the paper's Table 2, in 3D and at one scale (pure torch).

The paper: "As there is no image-size changing in our SISR, the up-sampling CNNs
(transposed-convolutional layers or sub-pixel layers) in those original designs were
replaced with the same scale convolutional layers." All three map (B, C, D, H, W) to
(B, C, D, H, W) for any D, H, W (every conv is stride 1 with "same" zero padding).

Parameter counts with the defaults vs the paper (``tests/test_baselines.py`` compares them
with the paper's numbers, within these deviations):

* ``FSRCNN3D``: 64,900 (paper 0.06M). FSRCNN(d=56, s=12, m=4); the 9x9 deconvolution
  becomes a 9x9x9 conv. PReLU has one shared slope per layer (``nn.PReLU()``); per-channel
  slopes would add 172 and round to 0.07M.
* ``SRResNet3D``: 2,087,371 (paper 2.01M, +3.8%). SRGAN's 16 residual blocks would be 3.86M
  in 3D (each 3x3x3 64->64 conv is 110,656 weights), so the default keeps 8 blocks, the 9^3
  head/tail convs and one same-scale conv + PReLU in place of the single x2 pixel-shuffle
  stage. ``outer_kernel_size=5`` gives 2,010,059 (exactly 0.01M-rounded 2.01M); it is not
  the default because the paper gives no reason to shrink SRGAN's 9x9 head/tail.
* ``SRDenseNet3D``: 359,041 (paper 0.39M, -7.9%). See its docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdcsrn_lightning.models.mdcsrn import DenseUnit

__all__ = ["FSRCNN3D", "SRResNet3D", "SRDenseNet3D"]


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_odd_kernel(name: str, value: int) -> None:
    _check_positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd so the grid size is kept, got {value}")


def _conv(c_in: int, c_out: int, kernel_size: int) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2)


def _check_input(x: Tensor, in_channels: int) -> None:
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(
            f"expected input of shape (B, {in_channels}, D, H, W), got {tuple(x.shape)}"
        )


class FSRCNN3D(nn.Module):
    """FSRCNN (Dong et al. 2016) in 3D: (B, C, D, H, W) -> (B, C, D, H, W).

    conv5^3(C -> d) PReLU | conv1^3(d -> s) PReLU | m x [conv3^3(s -> s) PReLU] |
    conv1^3(s -> d) PReLU | conv9^3(d -> C) (the deconvolution, now same-scale).
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_channels: int = 56,
        shrink_channels: int = 12,
        num_mapping_layers: int = 4,
        first_kernel_size: int = 5,
        last_kernel_size: int = 9,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("feature_channels", feature_channels)
        _check_positive_int("shrink_channels", shrink_channels)
        _check_positive_int("num_mapping_layers", num_mapping_layers)
        _check_odd_kernel("first_kernel_size", first_kernel_size)
        _check_odd_kernel("last_kernel_size", last_kernel_size)
        self.in_channels = in_channels
        d, s = feature_channels, shrink_channels
        layers: list[nn.Module] = [_conv(in_channels, d, first_kernel_size), nn.PReLU()]
        layers += [_conv(d, s, 1), nn.PReLU()]
        for _ in range(num_mapping_layers):
            layers += [_conv(s, s, 3), nn.PReLU()]
        layers += [_conv(s, d, 1), nn.PReLU(), _conv(d, in_channels, last_kernel_size)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        _check_input(x, self.in_channels)
        return self.body(x)


class _ResidualBlock(nn.Module):
    """conv3-BN-PReLU-conv3-BN + skip: (B, C, ...) -> (B, C, ...)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, 3),
            nn.BatchNorm3d(channels),
            nn.PReLU(),
            _conv(channels, channels, 3),
            nn.BatchNorm3d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SRResNet3D(nn.Module):
    """SRResNet (Ledig et al. 2017) in 3D: (B, C, D, H, W) -> (B, C, D, H, W).

    conv(k_o)(C -> n) PReLU -> r residual blocks -> conv3-BN, + head skip ->
    u x [conv3(n -> n) PReLU] (the pixel-shuffle stages, now same-scale) -> conv(k_o)(n -> C).

    Defaults (r=8, u=1, k_o=9, n=64) give 2.09M parameters; see the module docstring for
    why not SRGAN's r=16.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        num_residual_blocks: int = 8,
        outer_kernel_size: int = 9,
        num_same_scale_convs: int = 1,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("channels", channels)
        _check_positive_int("num_residual_blocks", num_residual_blocks)
        _check_odd_kernel("outer_kernel_size", outer_kernel_size)
        if isinstance(num_same_scale_convs, bool) or not isinstance(num_same_scale_convs, int) or (
            num_same_scale_convs < 0
        ):
            raise ValueError(
                f"num_same_scale_convs must be an integer >= 0, got {num_same_scale_convs!r}"
            )
        self.in_channels = in_channels
        n = channels
        self.head = nn.Sequential(_conv(in_channels, n, outer_kernel_size), nn.PReLU())
        self.body = nn.Sequential(
            *(_ResidualBlock(n) for _ in range(num_residual_blocks)),
            _conv(n, n, 3),
            nn.BatchNorm3d(n),
        )
        upsample: list[nn.Module] = []
        for _ in range(num_same_scale_convs):
            upsample += [_conv(n, n, 3), nn.PReLU()]
        self.same_scale = nn.Sequential(*upsample)
        self.tail = _conv(n, in_channels, outer_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        _check_input(x, self.in_channels)
        h = self.head(x)
        return self.tail(self.same_scale(h + self.body(h)))


class _SRDenseBlock(nn.Module):
    """SRDenseNet block: unit 1 sees the block input, unit j > 1 sees units 1..j-1 only.

    (B, C_in, ...) -> (B, u*k, ...): the block input is *not* passed on (Fig. 4b: the
    "red lines" from the input are missing), which is what separates it from mDCSRN.
    """

    def __init__(self, in_channels: int, num_units: int, growth_rate: int) -> None:
        super().__init__()
        self.out_channels = num_units * growth_rate
        self.units = nn.ModuleList(
            DenseUnit(in_channels if j == 0 else j * growth_rate, growth_rate)
            for j in range(num_units)
        )

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        for j, unit in enumerate(self.units):
            outputs.append(unit([x] if j == 0 else outputs))
        return torch.cat(outputs, dim=1)


class SRDenseNet3D(nn.Module):
    """SRDenseNet (Tong et al. 2017, "All" variant) in 3D, set close to mDCSRN b8u4.

    (B, C, D, H, W) -> (B, C, D, H, W).

    As the paper adjusts it: 8 blocks of 4 units (instead of 8), ELU, growth rate k=12; the
    units are mDCSRN's pre-activation BN-ELU-conv units (``DenseUnit``). Connectivity is
    SRDenseNet's: each block takes only the previous block's output (no multi-level links
    to the stem or earlier blocks, no compressors) and, inside a block, only unit 1 sees the
    block input. The stem output and all block outputs are concatenated ("dense skip
    connections") into the reconstruction of Fig. 5b, which the paper attributes to
    SRDenseNet: conv1^3 bottleneck -> BN -> ELU -> conv3^3 -> C. SRDenseNet's
    deconvolution layers are dropped (a same-scale 3x3x3 conv at the bottleneck width would
    add 249k parameters and miss 0.39M by 56%).

    Widths keep SRDenseNet's ratios: the stem is as wide as a block output (128 = 8 x 16
    there, ``u*k`` = 48 here) and the bottleneck is 8k (256 = 16 x 16 there; 8k as in Fig. 5b).
    Defaults give 359,041 parameters (paper: 0.39M; -7.9%).
    """

    def __init__(
        self,
        num_blocks: int = 8,
        units_per_block: int = 4,
        growth_rate: int = 12,
        stem_channels: int | None = None,
        bottleneck_channels: int | None = None,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        _check_positive_int("num_blocks", num_blocks)
        _check_positive_int("units_per_block", units_per_block)
        _check_positive_int("growth_rate", growth_rate)
        _check_positive_int("in_channels", in_channels)
        stem = units_per_block * growth_rate if stem_channels is None else stem_channels
        bottleneck = 8 * growth_rate if bottleneck_channels is None else bottleneck_channels
        _check_positive_int("stem_channels", stem)
        _check_positive_int("bottleneck_channels", bottleneck)
        self.in_channels = in_channels
        self.stem = _conv(in_channels, stem, 3)
        blocks: list[_SRDenseBlock] = []
        width = stem
        for _ in range(num_blocks):
            blocks.append(_SRDenseBlock(width, units_per_block, growth_rate))
            width = blocks[-1].out_channels
        self.blocks = nn.ModuleList(blocks)
        concat = stem + num_blocks * units_per_block * growth_rate
        self.reconstruction = nn.Sequential(
            _conv(concat, bottleneck, 1),
            nn.BatchNorm3d(bottleneck),
            nn.ELU(),
            _conv(bottleneck, in_channels, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        _check_input(x, self.in_channels)
        h = self.stem(x)
        levels = [h]
        for block in self.blocks:
            h = block(h)
            levels.append(h)
        return self.reconstruction(torch.cat(levels, dim=1))
