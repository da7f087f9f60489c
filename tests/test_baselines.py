from __future__ import annotations

import pytest
import torch
from torch import nn

from mdcsrn_lightning.models.baselines import FSRCNN3D, SRDenseNet3D, SRResNet3D
from mdcsrn_lightning.models.mdcsrn import MDCSRN, count_parameters

# Paper Table 2 "#parm", printed in millions to two decimals. Each tolerance is what the
# paper's rounding (+-0.005M) or a stated implementation choice needs; the counts are
# compared with the paper's numbers, not pinned to whatever the code produces.
ROUNDING = 0.005e6
PAPER = [
    # 64,900: FSRCNN(d=56, s=12, m=4) with the 9x9 deconvolution as a 9^3 conv hits 0.06M
    # within the paper's rounding.
    (FSRCNN3D, {}, 0.06e6, ROUNDING),
    # The paper gives no widths for its 3D SRResNet. Keeping SRGAN's 9^3 head/tail convs
    # gives 2,087,371 (+3.8%); 5^3 head/tail gives 2.01M within rounding (next row).
    (SRResNet3D, {}, 2.01e6, 0.04 * 2.01e6),
    (SRResNet3D, {"outer_kernel_size": 5}, 2.01e6, ROUNDING),
    # The paper gives no stem/bottleneck widths for its SRDenseNet; SRDenseNet's own width
    # ratios (stem u*k, bottleneck 8k) give 359,041 (-7.9%), see SRDenseNet3D's docstring.
    (SRDenseNet3D, {}, 0.39e6, 0.08 * 0.39e6),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "paper", "tolerance"), PAPER, ids=["fsrcnn", "srresnet", "srresnet_k5", "srdensenet"]
)
def test_parameter_counts_near_paper(cls: type[nn.Module], kwargs: dict, paper: float, tolerance: float) -> None:
    n = count_parameters(cls(**kwargs))
    print(f"{cls.__name__}{kwargs}: {n} parameters ({n / 1e6:.3f}M, paper {paper / 1e6:.2f}M, {n / paper - 1:+.1%})")
    assert abs(n - paper) <= tolerance


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
