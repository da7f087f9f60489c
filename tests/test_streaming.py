"""Exact whole-volume inference: streamed pass, margin=auto patches, patch_size=auto."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mdcsrn_lightning.inference import patches
from mdcsrn_lightning.inference.patches import auto_patch_size, bytes_per_voxel, super_resolve
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.inference.streaming import StreamingMDCSRN, stream_forward
from mdcsrn_lightning.models import MDCSRN
from mdcsrn_lightning.models.reference import reference_like

from .conftest import randomize_batchnorm


def net_with_stats(*args: object, seed: int = 0, strong: bool = False, **kwargs: object) -> MDCSRN:
    """An eval-mode generator with non-trivial BN statistics (``strong``: and large conv
    weights, so that a wrong channel slice or padding cannot hide)."""
    torch.manual_seed(seed)
    net = MDCSRN(*args, **kwargs)  # type: ignore[arg-type]
    randomize_batchnorm(net, strong_convs=strong)
    return net.eval()


@pytest.mark.parametrize(
    ("recon", "residual", "slab"),
    [("direct", False, 3), ("conv", False, 1), ("direct", True, None), ("conv", True, 50)],
)
def test_stream_equals_one_plain_forward_pass(recon: str, residual: bool, slab: int | None) -> None:
    # b2u4 k=4: unit 4 of each block has a bottleneck (5k > 4k inputs); depth 11 is not a
    # multiple of 3, so the last slab is partial; None and 50: one step over the whole depth.
    # float64 and large weights: the algorithm (channel slices, padding, lags) must be exact,
    # with no float32 rounding to hide behind.
    net = net_with_stats(2, 4, 4, recon, global_residual=residual, strong=True).double()
    x = torch.rand(2, 1, 11, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_like(net)(x)
    out = stream_forward(net, x, slab)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_stream_float32_within_1e5_of_the_plain_pass() -> None:
    net = net_with_stats(2, 4, 4)
    x = torch.rand(1, 1, 13, 9, 8)
    with torch.no_grad():
        expected = net(x)
    assert float((stream_forward(net, x, 4) - expected).abs().max()) < 1e-5


def test_stream_memory_does_not_grow_with_depth() -> None:
    net = net_with_stats(2, 2, 4)
    live = {}
    for depth in (48, 96):
        s = StreamingMDCSRN(net, slab=4)
        s(torch.rand(1, 1, depth, 5, 5))
        live[depth] = s.max_live_channel_slices
    assert live[48] == live[96] > 0
    whole = StreamingMDCSRN(net, slab=None)
    whole(torch.rand(1, 1, 96, 5, 5))
    assert whole.max_live_channel_slices > 2 * live[96]


def test_stream_needs_an_mdcsrn() -> None:
    with pytest.raises(TypeError, match="mDCSRN"):
        StreamingMDCSRN(nn.Conv3d(1, 1, 3))
    with pytest.raises(ValueError, match="slab"):
        StreamingMDCSRN(MDCSRN(1, 1, 4), slab=0)


def test_margin_auto_patches_equal_the_whole_volume_pass() -> None:
    net = net_with_stats(1, 3, 4)  # radius 4: margins of 4, patches > 8 along cut axes
    assert net.receptive_field_radius() == 4
    vol = np.random.default_rng(0).random((23, 20, 13)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    out = super_resolve(net, vol, patch_size=(12, 11, 13), margin="auto", device="cpu", batch_size=3)
    assert np.abs(out - whole).max() < 1e-5
    # the paper's margin 3 < radius 4 leaves seams
    seams = super_resolve(net, vol, patch_size=(12, 11, 13), margin=3, device="cpu")
    assert np.abs(seams - whole).max() > 1e-4
    streamed = build_inferer(net, InferenceOptions(stream=True, slab=5, device="cpu"))(vol)
    assert np.abs(streamed - whole).max() < 1e-5


def test_patch_size_auto_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    net = MDCSRN(8, 4, 12)
    per_voxel = bytes_per_voxel(net)
    assert per_voxel > 4 * 2 * 600  # the 600-channel concatenation, at least twice
    monkeypatch.setattr(patches, "free_memory_bytes", lambda device: 2 * per_voxel * 100**3)
    edge = auto_patch_size(net, margin=3)
    assert edge == 96  # the cube of 100^3 voxels, down to a multiple of 8
    monkeypatch.setattr(patches, "free_memory_bytes", lambda device: 2 * per_voxel * 40**3)
    with pytest.raises(ValueError, match="patch_size=auto"):
        auto_patch_size(net, margin=33)  # margin=auto for b8u4 needs more than 66
    tiny = MDCSRN(1, 1, 4).eval()
    monkeypatch.setattr(patches, "free_memory_bytes", lambda device: 1 << 30)
    vol = np.random.default_rng(1).random((9, 8, 7)).astype(np.float32)
    with torch.no_grad():
        whole = tiny(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    out = super_resolve(tiny, vol, patch_size="auto", margin="auto", device="cpu")
    assert np.abs(out - whole).max() < 1e-5


def test_bad_margin_and_patch_size_strings() -> None:
    with pytest.raises(ValueError, match="margin"):
        super_resolve(MDCSRN(1, 1, 4), np.zeros((4, 4, 4)), margin="big")
    with pytest.raises(ValueError, match="patch_size"):
        super_resolve(MDCSRN(1, 1, 4), np.zeros((4, 4, 4)), patch_size="large")
    with pytest.raises(ValueError, match="receptive_field_radius"):
        super_resolve(nn.Identity(), np.zeros((4, 4, 4)), margin="auto")
