"""A small 2D residual network for per-scan adaptation (``adapt.network=planes``).

Trained from scratch on one scan's own planes (:mod:`mdcsrn_lightning.inference.planes`):
2D convolutions are several times cheaper per voxel than 3D ones, so on a CPU it sees far more
patches in the same minutes, and its training planes are the same kind of plane it is applied
to (:func:`~mdcsrn_lightning.inference.plane_data.plane_layout`).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PlaneNet"]


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class PlaneNet(nn.Module):
    """``(N, 1, H, W)`` -> ``(N, 1, H, W)``: the input plus a learned residual (a head
    convolution, ``blocks`` residual blocks of two 3x3 convolutions with ``channels`` features,
    a long skip, a tail convolution; no normalisation, as EDSR)."""

    def __init__(self, channels: int = 32, blocks: int = 6) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("blocks", blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PlaneNet {name}: an integer >= 1, got {value!r}")
        self.channels, self.blocks = channels, blocks
        self.head = nn.Conv2d(1, channels, 3, padding=1)
        self.body = nn.Sequential(*(_Block(channels) for _ in range(blocks)))
        self.tail = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"PlaneNet expects (N, 1, H, W), got {tuple(x.shape)}")
        head = self.head(x)
        return x + self.tail(head + self.body(head)).to(x.dtype)

