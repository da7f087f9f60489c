"""``adapt.network=planes``: the per-scan 2D network, thick-slice and k-space (inference/planes.py, plane_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.data import slices as S
from mdcsrn_lightning.inference import plane_data
from mdcsrn_lightning.inference import planes as planes_mod
from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.options import (
    ADAPT_DEFAULTS,
    AdaptOptions,
    InferenceOptions,
)
from mdcsrn_lightning.inference.plane_data import (
    apply_planes,
    check_plane_fits,
    plane_layout,
    plane_stacks,
)
from mdcsrn_lightning.inference.planes import PlaneAdaptingInferer, train_planes
from mdcsrn_lightning.models.plane_net import PlaneNet

from .test_adapt import ADAPT_ARGS, _thick_setup
from .test_inference import run_cli, tiny_net, write_tiny_checkpoint

FAST = {"steps": 4, "minutes": None, "patch": 8, "batch": 2, "validate_every": 2, "patience": 2}
THICK = {"slice_factor": 3, "slice_axis": 2, "interpolation": "cubic"}
KSPACE_FACTORS = {"factors": (2, 2, 1)}


def _scan(shape=(14, 12, 18), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) + 0.5).astype(np.float32)


def test_plane_net_keeps_the_plane_shape_and_refuses_volumes() -> None:
    net = PlaneNet(channels=4, blocks=1)
    assert net(torch.zeros(3, 1, 10, 7)).shape == (3, 1, 10, 7)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        net(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        PlaneNet(channels=0)


def test_options_resolve_each_networks_defaults() -> None:
    thick = AdaptOptions(**THICK)
    assert thick.resolved().network == "planes" and thick.resolved().lr == ADAPT_DEFAULTS["planes"]["lr"]
    assert thick.resolved("checkpoint").patch == ADAPT_DEFAULTS["checkpoint"]["patch"]
    assert AdaptOptions().resolved().network == "planes"  # a k-space checkpoint too
    assert AdaptOptions(save="a.ckpt").resolved().network == "checkpoint"  # only a checkpoint can be saved
    assert AdaptOptions(patch=9, network="planes", **THICK).resolved().patch == 9  # given settings are kept
    assert AdaptOptions(**THICK).resolved().patch is None  # fitted to the scan
    with pytest.raises(ValueError, match="adapt.network must be one of"):
        AdaptOptions(network="2d")


def test_plane_stacks_degrade_one_inplane_axis_per_stack_with_the_thick_axis_first() -> None:
    options = AdaptOptions(**FAST, **THICK)
    line = np.sin(np.arange(14.0)).astype(np.float32)
    scan = np.broadcast_to(line[:, None, None], (14, 12, 18)).astype(np.float32)  # varies along axis 0 only
    (x0, y0), (x1, y1) = plane_stacks(scan, options)
    assert x0.shape == y0.shape == (18, 14, 12) and x1.shape == y1.shape == (18, 12, 14)
    np.testing.assert_array_equal(y0, np.transpose(scan, (2, 0, 1)))
    profile = S.slice_degrade(line[:, None, None], 3, 3, 0, "boxcar", "cubic")[:, 0, 0]
    np.testing.assert_allclose(x0, np.broadcast_to(profile[None, :, None], x0.shape), atol=1e-6)
    np.testing.assert_allclose(x1, y1, atol=1e-6)  # constant along axis 1: its slices lose nothing


def test_plane_stacks_add_copies_of_a_thick_scan_turned_in_its_planes() -> None:
    scan = _scan((12, 12, 6))
    stacks = plane_stacks(scan, AdaptOptions(**FAST, **THICK, rotations=1))  # one copy, turned by 90 degrees
    assert len(stacks) == 4
    quarter = np.rot90(scan, 1, (0, 1))
    np.testing.assert_allclose(stacks[2][1], np.transpose(quarter, (2, 0, 1)), atol=1e-5)
    thick = S.slice_degrade(quarter, 3, 3, 0, "boxcar", "cubic")  # its first order degrades axis 0, as stack 0's
    np.testing.assert_allclose(stacks[2][0], np.transpose(thick, (2, 0, 1)), atol=1e-5)


def test_plane_stacks_are_views_of_one_copy_and_one_degraded_array_per_axis() -> None:
    scan = _scan((12, 12, 6))
    options = AdaptOptions(**FAST, **THICK, rotations=2)
    stacks = plane_stacks(scan, options)
    for k in range(3):  # the scan, then its two turned copies
        (x0, y0), (x1, y1) = stacks[2 * k:2 * k + 2]
        assert np.shares_memory(y0, y1) and not np.shares_memory(x0, x1)  # one target, two degradations
        assert y0.base is not None and x0.base is not None  # transposed views, not copies
        arrays = {id(a.base) for a in (x0, y0, x1, y1)}
        assert len(arrays) == 3 and 3 * scan.nbytes == plane_data.stack_bytes(scan.shape, options)
    assert np.shares_memory(stacks[0][1], scan)  # the scan's own planes are the scan (float32 already)
    kspace = AdaptOptions(**FAST, **KSPACE_FACTORS)  # both orders degrade the full axis: one array
    (x0, _), (x1, _) = plane_stacks(_scan((12, 12, 8)), kspace)
    assert np.shares_memory(x0, x1) and plane_data.stack_bytes((12, 12, 8), kspace) == 2 * 4 * 12 * 12 * 8


def test_turned_copies_are_capped_to_what_half_the_free_memory_holds() -> None:
    options = AdaptOptions(**THICK, rotations=5)
    shape = (40, 40, 10)  # 16,000 voxels: 192,000 bytes a copy (3 float32 arrays), 128,000 to turn one
    assert plane_data.stack_bytes(shape, options) == 192_000
    assert plane_data.rotations_that_fit(shape, options, 2 * (128_000 + 2 * 192_000)) == 2
    assert plane_data.rotations_that_fit(shape, options, 2 * (128_000 + 2 * 192_000) - 2) == 1
    assert plane_data.rotations_that_fit(shape, options, 100_000) == 0
    assert plane_data.rotations_that_fit(shape, options, 10**12) == 5  # never more than asked


@pytest.mark.parametrize("asked", [None, 3])
def test_train_planes_caps_default_turned_copies_in_little_memory_and_says_so(monkeypatch, asked) -> None:
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)
    scan = _scan()
    per_copy = plane_data.stack_bytes(scan.shape, AdaptOptions(**THICK))
    monkeypatch.setattr(planes_mod, "free_memory_bytes", lambda device: 2 * (8 * scan.size + 2 * per_copy))
    lines: list[str] = []
    _, record = train_planes(scan, AdaptOptions(**FAST, **THICK, rotations=asked), tiny_net(), progress=False,
                             log=lines.append)
    if asked is None:  # the default 5 does not fit: 2 do, and one line says so
        assert record.settings["rotations"] == 2
        assert lines[0].startswith("adapt: 2 of 5 turned copies fit in half the free memory")
        assert "adapt.rotations=2" in lines[0] and "\n" not in lines[0]
    else:  # a given number is kept
        assert record.settings["rotations"] == 3 and "turned copies" not in " ".join(lines)


def test_rotations_default_to_five_only_where_the_training_planes_are_sharp_both_ways() -> None:
    shape = (30, 40, 40)
    assert plane_data.fitted(shape, AdaptOptions(**THICK)).rotations == plane_data.PLANE_ROTATIONS == 5
    assert plane_data.fitted(shape, AdaptOptions(factors=(1, 1, 2))).rotations == 5
    assert plane_data.fitted(shape, AdaptOptions(**KSPACE)).rotations == 0  # planes (2; d): d is degraded
    assert plane_data.fitted(shape, AdaptOptions(**THICK, rotations=0)).rotations == 0
    with pytest.raises(InferenceError, match=r"adapt.rotations=2 needs training planes sharp along both axes") as info:
        plane_data.fitted(shape, AdaptOptions(**KSPACE, rotations=2))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="adapt.rotations: an integer >= 0, got -1"):
        AdaptOptions(rotations=-1)


def test_noise_matching_defaults_on_only_where_the_training_planes_are_sharp_both_ways() -> None:
    shape = (30, 40, 40)
    assert plane_data.fitted(shape, AdaptOptions(**THICK)).noise is True
    assert plane_data.fitted(shape, AdaptOptions(**KSPACE)).noise is False  # 2x2x1: a training axis is degraded
    assert plane_data.fitted(shape, AdaptOptions(**THICK, noise=False)).noise is False
    with pytest.raises(InferenceError, match=r"adapt.noise=True needs training planes sharp along both axes") as info:
        plane_data.fitted(shape, AdaptOptions(**KSPACE, noise=True))
    assert "\n" not in str(info.value) and "give adapt.noise=false" in str(info.value)
    with pytest.raises(ValueError, match="adapt.noise: true, false or null, got 2"):
        AdaptOptions(noise=2)
    assert plane_data.pair_noise(_scan(), plane_data.fitted((14, 12, 18), AdaptOptions(**THICK, noise=False))) == (
        None, [])


def test_pair_noise_brings_a_pairs_input_to_the_scans_noise() -> None:
    """A thick-slice scan of pure noise: its in-plane noise is white; a pair's input (degraded again
    along a sharp axis) keeps a fraction k of its variance; with the added noise it has all of it."""
    rng = np.random.default_rng(1)
    scan = S.slice_degrade(rng.standard_normal((96, 96, 48)).astype(np.float32), 3, 3, 2, "boxcar", "cubic")
    options = plane_data.fitted(scan.shape, AdaptOptions(**FAST, **THICK))
    sigma, noise = plane_data.pair_noise(scan, options)
    assert sigma == pytest.approx(float(scan.std()), rel=0.05)  # estimated from the scan's planes
    layout = plane_layout(options)
    inputs = [x for x, _ in plane_stacks(scan, options)[:len(layout.train)]]
    assert [tuple(n.shape) for n in noise] == [x.shape for x in inputs]
    for x, n in zip(inputs, noise):
        k = float(x.var()) / float(scan.var())
        assert 0.2 < k < 0.8  # the pair's input is quieter than the scan
        assert float(x.var()) + float(n.var()) == pytest.approx(float(scan.var()), rel=0.05)
        # the added noise is correlated along H as the input's is (same degradation): equal lag-1 correlation
        assert float(np.corrcoef(n[:, :-1].flatten(), n[:, 1:].flatten())[0, 1]) == pytest.approx(
            float(np.corrcoef(x[:, :-1].flatten(), x[:, 1:].flatten())[0, 1]), abs=0.03)


def test_scan_noise_reads_white_noise_and_ignores_ramps() -> None:
    from mdcsrn_lightning.inference.plane_noise import scan_noise

    z, y, x = np.meshgrid(np.arange(20.0), np.arange(30.0), np.arange(16.0), indexing="ij")
    ramp = 5 * z - 3 * y + 7 * x  # no response to planes: only noise is read
    assert scan_noise(ramp, (0, 1)) == pytest.approx(0.0, abs=1e-6)
    noisy = ramp + np.random.default_rng(2).normal(0, 2.0, ramp.shape)
    assert scan_noise(noisy, (0, 1)) == pytest.approx(2.0, rel=0.05)
    masked = noisy.copy()
    masked[:, :20] = 0  # a background set to 0 (two thirds of each plane) holds no noise: not read as none
    assert scan_noise(masked, (0, 1)) == pytest.approx(2.0, rel=0.1)
    assert scan_noise(np.zeros((4, 5, 6)), (0, 1)) == 0.0


def test_noisy_crops_keep_the_slices_grid() -> None:
    from mdcsrn_lightning.inference.plane_noise import noisy

    noise = torch.arange(10.0)[None, :, None].expand(4, 10, 9).contiguous()  # value = H index
    rng = np.random.default_rng(3)
    for h in (0, 1, 2, 5):
        for _ in range(20):
            out = noisy(torch.zeros(4, 4), noise, h, 3, rng)
            first = abs(float(out[0, 0]))
            assert first % 3 == h % 3 and first <= 6  # a start on the crop's slice grid, inside the stack
            assert torch.equal(out.abs(), noise[0, int(first):int(first) + 4, :4])


def test_pair_inputs_get_the_noise_only_when_given() -> None:
    options = AdaptOptions(**{**FAST, "patch": 6, "batch": 8}, **THICK).resolved()
    layout = plane_layout(options)
    stacks = [(torch.zeros(15, 12, 12), torch.ones(15, 12, 12)) for _ in layout.train]
    noise = [torch.full((15, 12, 12), 0.5) for _ in layout.train]
    x, y = plane_data.plane_batch(stacks, layout, (5, 8), options, [0.0, 0.0], np.random.default_rng(0))
    assert float(x.abs().max()) == 0.0
    x, y = plane_data.plane_batch(stacks, layout, (5, 8), options, [0.0, 0.0], np.random.default_rng(0), noise=noise)
    assert torch.equal(x.abs(), torch.full_like(x, 0.5)) and torch.equal(y, torch.ones_like(y))


def test_turned_copies_are_trained_on_outside_the_slab_but_not_validated_on() -> None:
    options = AdaptOptions(**{**FAST, "patch": 6, "batch": 64}, **THICK, rotations=2).resolved()
    layout = plane_layout(options)  # thick axis 2: the stack axis of every training plane
    # target value = 100 * stack + plane index + 1: shows where each crop came from
    stacks = [(torch.zeros(15, 12, 12), torch.full((15, 12, 12), 100.0 * s) + torch.arange(1.0, 16.0)[:, None, None])
              for s in range(6)]
    slab = (5, 8)
    seen = set()
    for seed in range(10):
        _, y = plane_data.plane_batch(stacks, layout, slab, options, [0.0] * 6, np.random.default_rng(seed))
        seen |= {(int(v) // 100, int(v) % 100 - 1) for v in np.unique(y.numpy())}
    assert {s for s, _ in seen} == set(range(6)) and not {i for _, i in seen} & set(range(*slab))
    held = plane_data.held_out_planes(stacks, layout, slab, 6)
    assert len(held) == 2 and {int(v) // 100 for _, y in held for v in np.unique(y.numpy())} == {0, 1}


class _MarkFirstAxis(nn.Module):
    """Adds each row's index along the plane's first axis (H): shows which axis the planes put first."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.arange(x.shape[2], dtype=x.dtype)[:, None] + self.dummy


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_apply_planes_puts_the_thick_axis_first_and_averages_both_inplane_axes(slot: int) -> None:
    vol = _scan((6, 7, 8))
    layout = plane_layout(AdaptOptions(slice_factor=3, slice_axis=slot))
    out = apply_planes(_MarkFirstAxis(), vol, layout, batch=3)
    ramp = np.arange(vol.shape[slot], dtype=np.float32).reshape([-1 if ax == slot else 1 for ax in range(3)])
    np.testing.assert_allclose(out, vol + ramp, atol=1e-5)


@pytest.mark.parametrize("slot", [0, 2])
def test_apply_planes_with_flips_is_the_mean_over_the_flipped_scans(slot: int) -> None:
    vol = _scan((6, 7, 8))
    layout = plane_layout(AdaptOptions(slice_factor=3, slice_axis=slot))
    out = apply_planes(_MarkFirstAxis(), vol, layout, batch=3, flips=True)
    # the row ramp 0..n-1 along the thick axis, and its flip n-1..0: their mean is (n - 1) / 2 everywhere
    np.testing.assert_allclose(out, vol + (vol.shape[slot] - 1) / 2, atol=1e-5)


@pytest.mark.parametrize("layout_options", [AdaptOptions(**THICK), AdaptOptions(**KSPACE_FACTORS)])
def test_flips_make_the_plane_networks_output_follow_a_flipped_scan(layout_options: AdaptOptions) -> None:
    torch.manual_seed(0)
    net, vol, layout = PlaneNet(channels=4, blocks=1), _scan((6, 7, 9)), plane_layout(layout_options)
    flipped = np.flip(vol, (0, 2)).copy()
    with_flips = apply_planes(net, flipped, layout, flips=True)
    np.testing.assert_allclose(with_flips, np.flip(apply_planes(net, vol, layout, flips=True), (0, 2)), atol=1e-5)
    without = apply_planes(net, flipped, layout)
    assert np.abs(without - np.flip(apply_planes(net, vol, layout), (0, 2))).max() > 1e-3  # a fresh network is not


def test_adapt_flips_must_be_a_boolean() -> None:
    assert AdaptOptions().flips is True
    with pytest.raises(ValueError, match=r"adapt.flips: true or false, got 'yes'"):
        AdaptOptions(flips="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("ensemble", "flips", "expected"), [(None, True, True), (None, False, False),
                                                             ((0, 1), True, False)])
def test_the_adapted_plane_network_runs_with_flips_unless_an_ensemble_averages_it(monkeypatch, ensemble, flips,
                                                                                  expected) -> None:
    seen: list[bool] = []

    def recorded(net, volume, layout, bf16=False, batch=8, flips=False):
        seen.append(flips)
        return np.asarray(volume, dtype=np.float32)

    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)  # the plane network is used
    monkeypatch.setattr(plane_data, "apply_planes", recorded)
    inferer = PlaneAdaptingInferer(build_inferer(tiny_net(), InferenceOptions(device="cpu")), tiny_net(),
                                   AdaptOptions(**FAST, **THICK, flips=flips), log=lambda _: None, ensemble=ensemble)
    inferer(_scan((14, 12, 16)))
    assert seen and set(seen) == {expected}


def test_a_scan_too_small_for_the_plane_patch_is_refused_in_one_line() -> None:
    with pytest.raises(InferenceError, match=r"smaller than adapt.patch=16 along axis 1 of its training planes") as info:
        check_plane_fits((20, 10, 30), AdaptOptions(patch=16, network="planes", slice_axis=2, slice_factor=3))
    assert "\n" not in str(info.value)
    assert check_plane_fits((20, 20, 30), AdaptOptions(patch=16, slice_factor=3, holdout=0.2)) == 6


def test_train_planes_trains_a_plane_network_and_records_it(monkeypatch) -> None:
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)  # any plane network beats it
    lines: list[str] = []
    net, record = train_planes(_scan(), AdaptOptions(**FAST, **THICK), tiny_net(), progress=False, log=lines.append)
    assert isinstance(net, PlaneNet) and record.network == "planes" and record.used == "adapted"
    assert record.steps == 4 and record.record()["network"] == "planes"
    assert "plane network, 4 steps" in lines[0]


def test_the_checkpoint_is_kept_when_the_plane_network_never_beats_it(monkeypatch) -> None:
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: np.inf)
    lines: list[str] = []
    net, record = train_planes(_scan(), AdaptOptions(**FAST, **THICK), tiny_net(), progress=False, log=lines.append)
    assert net is None and record.used == "unadapted" and "using the checkpoint" in lines[0]
    # the inferer then runs the checkpoint's own pass
    checkpoint = tiny_net().eval()
    seen: list[np.ndarray] = []

    class Spy(Inferer):
        name, device = "spy", torch.device("cpu")

        def __call__(self, volume):
            seen.append(volume)
            return np.zeros_like(volume)

    inferer = PlaneAdaptingInferer(Spy(), checkpoint, AdaptOptions(**FAST, **THICK), log=lines.append)
    assert np.all(inferer(_scan()) == 0) and len(seen) == 1
    assert inferer.adaptation.settings["flips"] is False  # the record says what ran: no plane network, no flips


@pytest.mark.parametrize(("given", "applied"), [("auto", False), ("true", True)])
def test_where_the_checkpoint_is_kept_auto_data_consistency_is_the_checkpoints_own(
        tmp_path: Path, monkeypatch, capsys, given, applied) -> None:
    import nibabel as nib

    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: np.inf)  # self-validation keeps it
    src, ckpt = _thick_setup(tmp_path)  # a thick-slice checkpoint whose record does not recommend it
    common = (f"input={src}", f"ckpt={ckpt}", "upsample=auto", "progress=false", "device=cpu")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, *common, f"output={tmp_path / 'sr.nii.gz'}",
                           f"data_consistency={given}", *ADAPT_ARGS)
    assert code == 0, err
    record = json.loads((tmp_path / "sr.json").read_text())
    assert record["adapt"]["used"] == "unadapted" and record["data_consistency"] is applied
    # the checkpoint's plain pass with data consistency as applied gives the same file
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, *common, f"output={tmp_path / 'plain.nii.gz'}",
                           f"data_consistency={str(applied).lower()}")
    assert code == 0, err
    np.testing.assert_allclose(nib.load(str(tmp_path / "sr.nii.gz")).get_fdata(),
                               nib.load(str(tmp_path / "plain.nii.gz")).get_fdata(), atol=1e-5)


def test_the_checkpoint_score_puts_the_degraded_axis_in_its_thick_slot() -> None:
    class Slot2Only(nn.Module):  # restores exactly when the degraded axis is in slot 2: returns the target
        def __init__(self, target: Tensor) -> None:
            super().__init__()
            self.target, self.dummy = target, nn.Parameter(torch.zeros(()))

        def forward(self, x: Tensor) -> Tensor:
            return self.target.reshape(x.shape) if tuple(x.shape[2:]) == tuple(self.target.shape) else x

    y = torch.rand(4, 6, 5) + 1
    x = y + 0.1
    target = torch.from_numpy(np.moveaxis(y.numpy(), 1, 2).copy())  # (slices, b, a): a in slot 2
    layout = plane_layout(AdaptOptions(slice_factor=3, slice_axis=2))
    assert plane_data.checkpoint_score(Slot2Only(target), [(x, y)], 1, layout, AdaptOptions(**THICK)) == np.inf


@pytest.mark.parametrize("adapt", [AdaptOptions(**FAST, **THICK), AdaptOptions(**FAST)])
def test_build_gives_the_plane_inferer_by_default(adapt: AdaptOptions) -> None:
    inferer = build_inferer(tiny_net(), InferenceOptions(device="cpu", adapt=adapt))
    assert isinstance(inferer, PlaneAdaptingInferer) and inferer.name == "adapt[planes]"


@pytest.mark.parametrize(("factors", "match"), [((2, 2, 2), "needs an axis at full resolution"),
                                                ((2, 3, 1), "needs one factor on every degraded axis")])
def test_build_refuses_planes_without_a_full_axis_or_with_unequal_factors(factors, match) -> None:
    adapt = AdaptOptions(**FAST, factors=factors, network="planes")
    with pytest.raises(InferenceError, match=f"^adapt=true: adapt.network=planes {match}") as info:
        build_inferer(tiny_net(), InferenceOptions(device="cpu", adapt=adapt))
    assert "\n" not in str(info.value)


def test_cli_thick_adapt_trains_planes_by_default_and_records_it(tmp_path: Path, monkeypatch, capsys) -> None:
    import nibabel as nib

    src, ckpt = _thick_setup(tmp_path)
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}",
                           "upsample=auto", "progress=false", "device=cpu", *ADAPT_ARGS)
    assert code == 0, err
    record = json.loads((tmp_path / "sr.json").read_text())["adapt"]
    assert record["network"] == "planes" and record["steps"] <= 4
    noise = record["settings"].pop("noise")  # the scan's noise std, in the network's input units
    assert isinstance(noise, float) and noise > 0
    assert record["settings"] == {"patch": 12, "epochs": None, "rotations": 5, "flips": True,  # resolved for the scan
                                  "prior": "planenet_thick_prior.pt"}
    assert json.loads((tmp_path / "sr.json").read_text())["data_consistency"] is True  # auto, under the plane network
    assert nib.load(str(out)).shape == (30, 28, 30)


@pytest.mark.parametrize(("extra", "match"), [
    (("adapt_options.save=ADAPTED", "adapt_options.network=planes"),
     "the plane network (adapt.network=planes) is this scan's only"),
    (("adapt_options.patch=40",), "smaller than adapt.patch=40 along axis"),
])
def test_cli_plane_refusals_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch, capsys, extra,
                                                           match) -> None:
    src, ckpt = _thick_setup(tmp_path)
    extra = tuple(e.replace("ADAPTED", str(tmp_path / "a.ckpt")) for e in extra)
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={tmp_path / 'sr.nii.gz'}",
                           f"ckpt={ckpt}", "upsample=auto", "progress=false", "device=cpu", *ADAPT_ARGS, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert not (tmp_path / "sr.nii.gz").exists() and not (tmp_path / "a.ckpt").exists()


def test_training_stops_on_the_plane_networks_own_best_not_the_checkpoints(monkeypatch) -> None:
    scores = iter(range(1, 100))  # the network improves at every validation, but never reaches the checkpoint
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: 1000.0)
    monkeypatch.setattr(planes_mod, "plane_score", lambda *a, **k: float(next(scores)))
    options = AdaptOptions(**{**FAST, "steps": 8}, **THICK)
    net, record = train_planes(_scan(), options, tiny_net(), progress=False, log=lambda _: None)
    assert record.steps == 8 and record.stopped == "steps" and record.best_step == 8
    assert net is None and record.used == "unadapted" and record.psnr_adapted == 4.0


def test_cli_without_ckpt_adapts_a_thick_scan_with_the_plane_network(tmp_path: Path, monkeypatch, capsys) -> None:
    from mdcsrn_lightning.release import RELEASED_THICK_WEIGHTS

    src, _ = _thick_setup(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={tmp_path / 'sr.nii.gz'}",
                             "progress=false", "device=cpu", "data_consistency=true", *ADAPT_ARGS)
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["adapt"][0]["network"] == "planes" and line["checkpoint"] == str(RELEASED_THICK_WEIGHTS)
    assert (tmp_path / "sr.nii.gz").is_file()


def test_cli_thick_adapt_with_uncertainty_averages_the_plane_network_over_the_inplane_symmetries(
        tmp_path: Path, monkeypatch, capsys) -> None:
    import nibabel as nib

    calls: list[int] = []
    real = planes_mod.train_planes

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)  # the plane network is used
    monkeypatch.setattr(planes_mod, "train_planes", counted)
    src, ckpt = _thick_setup(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={tmp_path / 'sr.nii.gz'}",
                           f"ckpt={ckpt}", "upsample=auto", "progress=false", "device=cpu", "uncertainty=true",
                           *ADAPT_ARGS)
    assert code == 0, err
    record = json.loads((tmp_path / "sr.json").read_text())
    assert record["adapt"]["network"] == "planes" and record["adapt"]["used"] == "adapted"
    assert record["inferer"]["name"] == "ensemble[adapt[planes]]" and calls == [1]  # trained once
    assert record["adapt"]["settings"]["flips"] is False  # the ensemble averages instead
    std = nib.load(str(tmp_path / "sr_std.nii.gz")).get_fdata()
    assert std.shape == (30, 28, 30) and std.max() > 0  # a fresh 2D network is not rotation-equivariant


# ---------------------------------------------------------------- k-space checkpoints
KSPACE = {"factors": (2, 2, 1), "interpolation": "zero_filled"}


@pytest.mark.parametrize(("factors", "train", "apply", "hold"), [
    ((2, 2, 1), ((1, 2, 0), (0, 2, 1)), ((2, 0, 1), (2, 1, 0)), 0),  # planes (full, degraded); run on (d0, d1)
    ((1, 2, 2), ((2, 0, 1), (1, 0, 2)), ((0, 1, 2), (0, 2, 1)), 1),
    ((1, 1, 2), ((2, 0, 1), (2, 1, 0)), ((1, 2, 0), (0, 2, 1)), 2),  # one degraded axis: as thick slices
])
def test_plane_layout_trains_on_planes_whose_other_axis_is_as_degraded_as_where_it_runs(factors, train, apply,
                                                                                        hold) -> None:
    layout = plane_layout(AdaptOptions(factors=factors))
    assert (layout.train, layout.apply, layout.hold, layout.factor) == (train, apply, hold, 2.0)
    degraded = {ax for ax, f in enumerate(factors) if f > 1}
    for stack, h, w in layout.train:  # H at full resolution; W degraded exactly when it is where the net runs
        assert h not in degraded
    assert {w in degraded for *_, w in layout.train} == {w in degraded for *_, w in layout.apply}
    assert {h for _, h, _ in layout.apply} == degraded


def test_kspace_plane_stacks_truncate_the_full_axis_only() -> None:
    options = AdaptOptions(**FAST, **KSPACE)
    n = np.arange(12.0)
    nyquist = np.cos(np.pi * n).astype(np.float32)  # the highest frequency along the full axis 2
    scan = (2 + np.sin(np.arange(10.0))[:, None, None] + 0.5 * nyquist[None, None, :]
            + np.zeros((10, 8, 12))).astype(np.float32)
    (x0, y0), (x1, y1) = plane_stacks(scan, options)
    assert x0.shape == y0.shape == (8, 12, 10) and x1.shape == y1.shape == (10, 12, 8)
    np.testing.assert_array_equal(y0, np.transpose(scan, (1, 2, 0)))
    expected = 2 + np.sin(np.arange(10.0))  # truncating axis 2 removes its Nyquist term, nothing along axis 0
    np.testing.assert_allclose(x0, np.broadcast_to(expected[None, None, :], x0.shape), atol=1e-5)


def test_kspace_apply_planes_adds_the_change_of_each_degraded_axis() -> None:
    vol = _scan((6, 7, 8))
    out = apply_planes(_MarkFirstAxis(), vol, plane_layout(AdaptOptions(**KSPACE)), batch=4)
    ramps = [np.arange(n, dtype=np.float32).reshape([-1 if ax == a else 1 for ax in range(3)])
             for a, n in ((0, 6), (1, 7))]
    np.testing.assert_allclose(out, vol + ramps[0] + ramps[1], atol=1e-5)


def test_kspace_training_crops_never_touch_the_held_out_slab() -> None:
    options = AdaptOptions(**{**FAST, "patch": 6, "batch": 64}, **KSPACE).resolved()
    scan = np.broadcast_to(np.arange(1.0, 25.0)[:, None, None], (24, 10, 12)).astype(np.float32)  # value: axis-0 index + 1
    layout = plane_layout(options)
    stacks = [tuple(torch.from_numpy(v) for v in pair) for pair in plane_stacks(scan, options)]
    slab = plane_data.plane_slab(scan, options)
    assert slab[1] - slab[0] == 5  # 0.2 of axis 0, the hold axis
    seen = set()
    for seed in range(20):
        _, y = plane_data.plane_batch(stacks, layout, slab, options, [0.0, 0.0], np.random.default_rng(seed))
        values = set(np.unique(y.numpy()).astype(int) - 1)
        assert not values & set(range(*slab)), (slab, sorted(values))
        seen |= values
    assert seen == set(range(24)) - set(range(*slab))  # both stacks, both sides of the slab
    held = plane_data.held_out_planes(stacks, layout, slab, 6)
    for (_, y), order in zip(held, layout.train):  # the held-out blocks are the slab along axis 0
        assert set(np.unique(y.numpy()).astype(int) - 1) == set(range(*slab))
        assert y.shape[order.index(layout.hold)] == 5


def test_kspace_checkpoint_score_keeps_the_targets_band_along_its_degraded_axes() -> None:
    from mdcsrn_lightning.data.degradation import degrade

    class AddsNyquist(nn.Module):  # returns the target, plus detail the target's band cannot hold
        def __init__(self, target: np.ndarray, amplitude: float) -> None:
            super().__init__()
            self.target, self.amplitude = torch.from_numpy(target), amplitude
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x: Tensor) -> Tensor:
            n = torch.arange(x.shape[3], dtype=x.dtype)  # along the block's stack axis (slot 1)
            return self.target.reshape(x.shape) + self.amplitude * torch.cos(torch.pi * n)[None, None, None, :, None]

    options = AdaptOptions(**KSPACE)
    layout = plane_layout(options)
    y = degrade(_scan((8, 10, 12), seed=3) + 2, (2, 1, 2), "zero_filled")  # (stack, H, W): stack and W in band
    held = [(torch.from_numpy(y) + 0.3, torch.from_numpy(y))]
    inside = np.ascontiguousarray(np.moveaxis(y, 1, layout.apply[0][1]))  # H in the first degraded slot
    exact, extra = (plane_data.checkpoint_score(AddsNyquist(inside, a), held, 1, layout, options) for a in (0.0, 0.5))
    raw = plane_data.pooled_psnr([torch.from_numpy(y) + 0.5], held)  # the extra detail, were it counted
    assert extra == pytest.approx(exact, abs=0.5) and extra > raw + 10


def test_train_planes_on_a_kspace_scan_fits_the_patch_and_records_it(monkeypatch) -> None:
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)
    options = AdaptOptions(**{**FAST, "patch": None}, **KSPACE)
    assert plane_data.fitted((30, 20, 9), options).patch == 9  # the smallest training-plane axis
    assert plane_data.fitted((300, 200, 90), options).patch == plane_data.PLANE_PATCH
    assert plane_data.fitted((30, 40, 40), options).patch == 24  # axis 0 beside its 6 held out
    net, record = train_planes(_scan((30, 20, 9)), options, tiny_net(), progress=False, log=lambda _: None)
    assert isinstance(net, PlaneNet) and record.network == "planes" and record.steps == 4


def test_cli_kspace_adapt_trains_planes_by_default_with_data_consistency(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    import nibabel as nib

    from .test_inference import ANATOMICAL

    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)  # the plane network is used
    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}",
                           "degrade=true", "data_consistency=true", "progress=false", "device=cpu",
                           *ADAPT_ARGS)
    assert code == 0, err
    record = json.loads((tmp_path / "sr.json").read_text())
    assert record["adapt"]["network"] == "planes" and record["adapt"]["used"] == "adapted"
    assert record["inferer"]["name"] == "adapt[planes]"
    assert record["data_consistency"] is True and nib.load(str(out)).shape == nib.load(str(ANATOMICAL)).shape


def test_epochs_default_to_a_limit_only_where_every_training_plane_restores_one_axis() -> None:
    shape = (30, 40, 40)
    assert plane_data.fitted(shape, AdaptOptions(**KSPACE)).epochs == plane_data.ONE_AXIS_EPOCHS  # axis 2 only
    assert plane_data.fitted(shape, AdaptOptions(factors=(1, 1, 2))).epochs is None  # axes 0 and 1 in turn
    assert plane_data.fitted(shape, AdaptOptions(**THICK)).epochs is None
    assert plane_data.fitted(shape, AdaptOptions(epochs=3.0, **KSPACE)).epochs == 3.0  # given: kept


def test_epochs_cap_the_steps_at_that_many_passes_over_the_training_planes(monkeypatch) -> None:
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)
    scan = _scan((20, 16, 10))
    options = AdaptOptions(**{**FAST, "steps": 1000, "patch": 8, "batch": 2, "patience": 1000}, epochs=0.5, **KSPACE)
    _, record = train_planes(scan, options, tiny_net(), progress=False, log=lambda _: None)
    # two stacks of 20x16x10 planes, axis 0 (4 of 20 held out) outside the slab: 0.5 passes of 8^2 crops, 2 a step
    training = 2 * 20 * 16 * 10 * (1 - 4 / 20)
    assert record.steps == int(np.ceil(0.5 * training / (2 * 64))) == 20 and record.stopped == "steps"


def test_kspace_planes_with_uncertainty_train_once_and_give_a_spread(monkeypatch) -> None:
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)
    calls: list[int] = []
    real = planes_mod.train_planes
    monkeypatch.setattr(planes_mod, "train_planes", lambda *a, **k: calls.append(1) or real(*a, **k))
    inferer = build_inferer(tiny_net(), InferenceOptions(device="cpu", uncertainty=True,
                                                         adapt=AdaptOptions(**FAST, **KSPACE)))
    mean, std = inferer.mean_std(_scan((16, 16, 12)))
    assert inferer.name == "ensemble[adapt[planes]]" and calls == [1]
    assert mean.shape == std.shape == (16, 16, 12) and std.max() > 0  # a fresh 2D network is not equivariant


def test_cli_refuses_planes_for_unequal_factors_in_one_line_naming_the_checkpoint(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    from .test_inference import ANATOMICAL

    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={tmp_path / 'sr.nii.gz'}",
                           f"ckpt={ckpt}", "degrade=true", "factors=[2,3,1]", "progress=false", "device=cpu",
                           *ADAPT_ARGS)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{ckpt}: adapt=true: adapt.network=planes needs one factor on every degraded axis" in err, err
    assert not (tmp_path / "sr.nii.gz").exists()
