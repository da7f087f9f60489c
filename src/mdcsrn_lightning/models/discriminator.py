"""3D SRGAN discriminator used as the WGAN-GP critic (paper 3.3, Fig. 3 (D)).

Pure torch. The SRGAN discriminator (Ledig et al.) moved to 3D, with the two changes
WGAN-GP asks for: BatchNorm -> LayerNorm (the gradient penalty is taken per sample, so the
critic must not mix samples of a batch) and no sigmoid (the critic outputs a score).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Discriminator3D"]


class Discriminator3D(nn.Module):
    """SRGAN critic in 3D: (B, C, D, H, W) -> (B, 1) unbounded scores.

    Layout (widths w_1..w_L = ``channels``, default 64, 128, 256, 512)::

        conv3x3x3(C -> w_1), LeakyReLU
        for i in 1..L:
            [i > 1]  conv3x3x3 stride 1 (w_{i-1} -> w_i), LayerNorm, LeakyReLU
                     conv3x3x3 stride 2 (w_i -> w_i),     LayerNorm, LeakyReLU
        AdaptiveAvgPool3d(pooled_size)
        Linear(w_L * pooled_size**3 -> dense_features), LeakyReLU, Linear(-> 1)

    "LayerNorm" is ``nn.GroupNorm(1, C)``: one group normalises each sample over
    (C, D, H, W), exactly LayerNorm over the feature map, with a per-channel affine and
    independent of the spatial size (``nn.LayerNorm`` would need a fixed (D, H, W)).

    Input sizes: each stride-2 conv (kernel 3, padding 1) maps n -> ceil(n / 2), so after L of
    them n -> ceil(n / 2**L). Every spatial size must leave at least ``pooled_size`` voxels,
    i.e. n >= 2**L * (pooled_size - 1) + 1 (``min_input_size``; 33 with the defaults). The
    adaptive pool then maps any larger grid to ``pooled_size**3``, so the critic takes the
    40^3 training patches (grid 3^3: the pool is the identity, i.e. the plain SRGAN critic
    for that size) and larger validation patches alike. Smaller inputs raise ValueError.

    Args:
        in_channels: image channels.
        channels: widths of the L conv pairs; ``None`` means
            ``base_channels * 2**i`` for ``i < num_blocks`` (SRGAN: 64, 128, 256, 512).
        base_channels, num_blocks: used only when ``channels`` is None.
        leaky_slope: LeakyReLU negative slope (SRGAN: 0.2).
        pooled_size: side of the grid the features are averaged to before the dense head.
            The default 3 is what a 40^3 patch gives after 4 stride-2 convs.
        dense_features: width of the hidden dense layer (SRGAN: 1024).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] | None = None,
        base_channels: int = 64,
        num_blocks: int = 4,
        leaky_slope: float = 0.2,
        pooled_size: int = 3,
        dense_features: int = 1024,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("base_channels", base_channels),
            ("num_blocks", num_blocks),
            ("pooled_size", pooled_size),
            ("dense_features", dense_features),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= leaky_slope < 1.0:
            raise ValueError(f"leaky_slope must be in [0, 1), got {leaky_slope!r}")
        if channels is None:
            widths = [base_channels * 2**i for i in range(num_blocks)]
        else:
            widths = list(channels)
            if not widths or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths
            ):
                raise ValueError(
                    f"channels must be a non-empty sequence of integers >= 1, got {channels!r}"
                )
        self.in_channels = in_channels
        self.channels: tuple[int, ...] = tuple(widths)
        self.pooled_size = pooled_size
        self.num_downsamplings = len(widths)

        def act() -> nn.LeakyReLU:
            return nn.LeakyReLU(leaky_slope)

        def conv_norm_act(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
                nn.GroupNorm(1, c_out),
                act(),
            ]

        # The first conv has no norm, as in SRGAN.
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, widths[0], kernel_size=3, padding=1),
            act(),
        ]
        prev = widths[0]
        for i, width in enumerate(widths):
            if i > 0:
                layers += conv_norm_act(prev, width, stride=1)
            layers += conv_norm_act(width, width, stride=2)
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(pooled_size)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev * pooled_size**3, dense_features),
            act(),
            nn.Linear(dense_features, 1),
        )

    @property
    def min_input_size(self) -> int:
        """Smallest accepted size of each spatial dimension."""
        return 2**self.num_downsamplings * (self.pooled_size - 1) + 1

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, 1) critic scores (no sigmoid)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is too small: this critic has "
                f"{self.num_downsamplings} stride-2 convs and pools to {self.pooled_size}^3, "
                f"so every dimension must be >= {self.min_input_size}"
            )
        return self.head(self.pool(self.features(x)))

