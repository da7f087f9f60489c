from __future__ import annotations

import pytest
import torch
from torch import nn

from mdcsrn_lightning.models.baselines import FSRCNN3D, SRDenseNet3D, SRResNet3D
from mdcsrn_lightning.models.mdcsrn import MDCSRN, count_parameters

# Paper Table 2 "#parm"; defaults must be within 10%.
PAPER = [
    (FSRCNN3D, 0.06e6, 64_900),
    (SRResNet3D, 2.01e6, 2_087_371),
    (SRDenseNet3D, 0.39e6, 359_041),
]


@pytest.mark.parametrize(("cls", "paper", "exact"), PAPER, ids=lambda v: getattr(v, "__name__", ""))
def test_parameter_counts_near_paper(cls: type[nn.Module], paper: float, exact: int) -> None:
    n = count_parameters(cls())
    rel = n / paper - 1
    print(f"{cls.__name__}: {n} parameters ({n / 1e6:.3f}M, paper {paper / 1e6:.2f}M, {rel:+.1%})")
    assert abs(n / paper - 1) <= 0.10
    assert n == exact  # pins the architecture: a change here must be a deliberate one


def test_fsrcnn_rounds_like_the_paper() -> None:
    assert round(count_parameters(FSRCNN3D()) / 1e6, 2) == 0.06


def test_srresnet_exact_variant() -> None:
    assert round(count_parameters(SRResNet3D(outer_kernel_size=5)) / 1e6, 2) == 2.01


def test_srdensenet_smaller_than_b8u4_and_no_block_input_links() -> None:
    net = SRDenseNet3D()
    assert count_parameters(net) < count_parameters(MDCSRN(8, 4, 12))
    block = net.blocks[1]
    # unit 1 sees the previous block output (u*k), units 2..4 only earlier units (j*k)
    assert [u.in_channels for u in block.units] == [48, 12, 24, 36]
    assert block.out_channels == 48


@pytest.mark.parametrize(
    "model",
    [
        FSRCNN3D(),
        SRResNet3D(channels=8, num_residual_blocks=2),
        SRDenseNet3D(num_blocks=2, units_per_block=2, growth_rate=4),
    ],
    ids=["fsrcnn", "srresnet", "srdensenet"],
)
def test_output_shape_equals_input_shape(model: nn.Module) -> None:
    x = torch.randn(2, 1, 5, 6, 7)
    assert model(x).shape == x.shape


def test_no_upsampling_layers() -> None:
    for model in (FSRCNN3D(), SRResNet3D(num_residual_blocks=1), SRDenseNet3D(num_blocks=1)):
        for m in model.modules():
            assert not isinstance(m, (nn.ConvTranspose3d, nn.PixelShuffle, nn.Upsample))
            if isinstance(m, nn.Conv3d):
                assert m.stride == (1, 1, 1)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: FSRCNN3D(feature_channels=0), "feature_channels"),
        (lambda: FSRCNN3D(last_kernel_size=4), "last_kernel_size"),
        (lambda: SRResNet3D(num_residual_blocks=0), "num_residual_blocks"),
        (lambda: SRResNet3D(num_same_scale_convs=-1), "num_same_scale_convs"),
        (lambda: SRDenseNet3D(growth_rate=0), "growth_rate"),
        (lambda: SRDenseNet3D(bottleneck_channels=0), "bottleneck_channels"),
    ],
)
def test_bad_arguments_raise(factory: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()  # type: ignore[operator]
