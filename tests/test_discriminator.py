from __future__ import annotations

import pytest
import torch
from torch import nn

from mdcsrn_lightning.models.discriminator import Discriminator3D
from mdcsrn_lightning.models.mdcsrn import count_parameters


def tiny(**kwargs: object) -> Discriminator3D:
    # 4 stride-2 convs and the default 3^3 pool, as the real critic, but tiny widths.
    return Discriminator3D(channels=(2, 2, 4, 4), dense_features=8, **kwargs)  # type: ignore


@pytest.mark.parametrize("size", [40, 64])
def test_output_shape(size: int) -> None:
    d = tiny()
    assert d(torch.randn(2, 1, size, size, size)).shape == (2, 1)


def test_non_cubic_input() -> None:
    assert tiny()(torch.randn(1, 1, 33, 40, 48)).shape == (1, 1)


def test_default_layout_is_srgan() -> None:
    d = Discriminator3D()
    assert d.channels == (64, 128, 256, 512)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    linears = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 27, 1024), (1024, 1)]
    assert d.min_input_size == 33
    print(f"Discriminator3D default: {count_parameters(d)} parameters")


def test_no_sigmoid_and_no_batchnorm() -> None:
    torch.manual_seed(0)
    d = tiny()
    assert not any(isinstance(m, (nn.BatchNorm3d, nn.Sigmoid)) for m in d.modules())
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 for m in norms)
    # Unbounded critic: scaling the last layer scales the score past [0, 1].
    last = d.head[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.mul_(1e3)
        last.bias.fill_(5.0)
    out = d(torch.randn(4, 1, 40, 40, 40))
    assert (out < 0).any() or (out > 1).any()


def test_per_sample_independence() -> None:
    """A sample's score does not depend on the rest of the batch (needed by WGAN-GP)."""
    torch.manual_seed(0)
    d = tiny()
    x = torch.randn(3, 1, 40, 40, 40)
    torch.testing.assert_close(d(x)[1:2], d(x[1:2]))


def test_double_backward_for_gradient_penalty() -> None:
    torch.manual_seed(0)
    d = tiny()
    x = torch.randn(2, 1, 40, 40, 40, requires_grad=True)
    (grad,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    # d(x)'s input gradient does not involve the last bias; every other weight gets a grad.
    last_bias = d.head[-1].bias
    assert all(p.grad is not None for p in d.parameters() if p is not last_bias)


@pytest.mark.parametrize("shape", [(1, 1, 32, 40, 40), (1, 1, 16, 16, 16)])
def test_too_small_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="too small.*>= 33"):
        tiny()(torch.randn(*shape))


def test_min_size_follows_config() -> None:
    d = Discriminator3D(channels=(2, 2), pooled_size=2, dense_features=4)
    assert d.min_input_size == 5
    assert d(torch.randn(1, 1, 5, 5, 5)).shape == (1, 1)
    with pytest.raises(ValueError, match="too small"):
        d(torch.randn(1, 1, 4, 5, 5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": ()}, "channels"),
        ({"channels": (4, 0)}, "channels"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"pooled_size": 0}, "pooled_size"),
        ({"leaky_slope": 1.5}, "leaky_slope"),
        ({"dense_features": 0}, "dense_features"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Discriminator3D(**kwargs)  # type: ignore[arg-type]


def test_wrong_channels_raise() -> None:
    with pytest.raises(ValueError, match="expected input"):
        tiny()(torch.randn(1, 2, 40, 40, 40))
