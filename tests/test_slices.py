"""Thick-slice degradation (data/slices.py), its data-config wiring and its training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.data import slices as S
from mdcsrn_lightning.data.batched_augment import BatchedRealistic, slice_degrade_batch
from mdcsrn_lightning.data.cache import SubjectCache
from mdcsrn_lightning.data.datamodule import slice_degradation

RNG = np.random.default_rng(7)
VOL = RNG.random((6, 7, 19))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_boxcar_4_every_4_is_the_mean_of_4_consecutive_slices(axis: int) -> None:
    vol = np.moveaxis(VOL, 2, axis)
    out = S.thick_slices(vol, 4, 4, axis, "boxcar")
    assert out.shape[axis] == 4 and out.shape == tuple(4 if a == axis else n for a, n in enumerate(vol.shape))
    for k in range(4):
        expected = vol.take(range(4 * k, 4 * k + 4), axis=axis).mean(axis=axis)
        np.testing.assert_allclose(out.take(k, axis=axis), expected, atol=1e-6)


def test_boxcar_with_gaps_and_fractional_thickness() -> None:
    # thickness 2 every 4: voxels 1, 2 of each group of 4 (the slice centre is 1.5)
    out = S.thick_slices(VOL, 2, 4, 2)
    np.testing.assert_allclose(out[..., 1], VOL[..., 5:7].mean(-1), atol=1e-6)
    # thickness 3 every 4: [0, 3] around 1.5: voxels 0 and 3 count half
    out = S.thick_slices(VOL, 3, 4, 2)
    expected = (0.5 * VOL[..., 8] + VOL[..., 9] + VOL[..., 10] + 0.5 * VOL[..., 11]) / 3
    np.testing.assert_allclose(out[..., 2], expected, atol=1e-6)
    # thickness 1 every 1: the volume itself
    np.testing.assert_allclose(S.thick_slices(VOL, 1, 1, 0), VOL, atol=1e-6)


@pytest.mark.parametrize("thickness", [1.0, 2.5, 4.0, 7.0])
def test_gaussian_profile_sums_to_1_is_centred_and_has_the_fwhm(thickness: float) -> None:
    idx, w = S.profile_weights(10.5, thickness, "gaussian")
    assert math.isclose(w.sum(), 1.0, abs_tol=1e-12)
    assert math.isclose(float((idx * w).sum()), 10.5, abs_tol=1e-9)
    sigma = thickness / (2 * math.sqrt(2 * math.log(2)))
    # the discrete variance is the Gaussian's plus the voxel's 1/12 (Sheppard: each weight is a
    # voxel integral; exact enough once sigma is a voxel or more)
    var = float((w * (idx - 10.5) ** 2).sum())
    assert thickness < 2.5 or abs(var - (sigma**2 + 1 / 12)) < 0.02 * sigma**2 + 0.01


@pytest.mark.parametrize("profile", ["boxcar", "gaussian"])
@pytest.mark.parametrize("interpolation", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("thickness,spacing", [(4, 4), (2, 5), (6, 3), (1, 1)])
def test_a_constant_volume_stays_constant(profile, interpolation, thickness, spacing) -> None:
    vol = np.full((5, 4, 17), 3.25)
    out = S.slice_degrade(vol, thickness, spacing, 2, profile, interpolation)
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.25, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["nearest", "linear", "cubic"])
def test_the_fine_grid_passes_through_the_slice_centres(interpolation: str) -> None:
    coarse = RNG.random((4, 5, 6))
    fine = S.slices_to_fine(coarse, 3, 2, interpolation)  # odd spacing: centres on fine voxels 1, 4, 7...
    assert fine.shape == (4, 5, 18)
    np.testing.assert_allclose(fine[..., 1::3], coarse, atol=1e-5)
    assert S.slices_to_fine(coarse, 3, 2, interpolation, 20).shape == (4, 5, 20)
    if interpolation == "nearest":  # each slice fills its own fine voxels
        np.testing.assert_allclose(fine, np.repeat(coarse, 3, axis=2), atol=1e-6)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: S.thick_slices(VOL, 0.5, 2), r"thickness must be a number >= 1 \(fine voxels\), got 0.5"),
        (lambda: S.thick_slices(VOL, 2, 1.5), r"spacing must be an integer >= 1 \(fine voxels\), got 1.5"),
        (lambda: S.thick_slices(VOL, 2, 0), r"spacing must be an integer >= 1"),
        (lambda: S.thick_slices(VOL, 2, 2, 3), r"axis must be 0, 1 or 2, got 3"),
        (lambda: S.thick_slices(VOL, 2, 2, 2, "sinc"), r"profile must be one of \('boxcar', 'gaussian'\)"),
        (lambda: S.thick_slices(VOL, 2, 20, 2), r"spacing 20 is larger than the axis \(19 voxels\)"),
        (lambda: S.thick_slices(VOL[0], 2, 2), r"volume must be a real, non-empty 3D array"),
        (lambda: S.slices_to_fine(VOL, 2, 2, "zero_filled"), r"interpolation must be one of"),
        (lambda: S.slices_to_fine(VOL, 2, 2, "linear", 30), r"a fine axis of 30 voxels is shorter than 19 slices"),
        (lambda: S.SliceDegradation(thickness=(6, 2)), r"slices.thickness must be a number or a range"),
        (lambda: S.SliceDegradation(thickness="thick"), r"slices.thickness must be a number or a range"),
    ],
)
def test_errors_are_one_precise_line(call, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_per_subject_draw_is_fixed_and_in_range() -> None:
    deg = S.SliceDegradation(thickness=(2, 6), seed=3)
    draws = [deg.draw(f"sub-{i}") for i in range(20)]
    assert draws == [deg.draw(f"sub-{i}") for i in range(20)]
    assert all(2 <= t <= 6 and s == max(1, round(t)) for t, s in draws)
    assert len({t for t, _ in draws}) == 20
    assert deg.factors() == (1.0, 1.0, 4.0)
    assert S.SliceDegradation(thickness=3, spacing=5, axis=0).draw("x") == (3.0, 5)


@pytest.mark.parametrize("axis", [0, 2])
def test_batched_slice_degradation_equals_slice_degrade_per_sample(axis: int) -> None:
    rng = np.random.default_rng(3)
    hr = rng.random((3, 1, 12, 16, 20)).astype(np.float32)
    deg = S.SliceDegradation(thickness=(2, 6), axis=axis, profile="gaussian", interpolation="cubic")
    thickness = [2.0, 3.4, 5.9]
    out = slice_degrade_batch(torch.from_numpy(hr), thickness, deg).numpy()
    for b, t in enumerate(thickness):
        expected = S.slice_degrade(hr[b, 0], t, max(1, round(t)), axis, "gaussian", "cubic")
        np.testing.assert_allclose(out[b, 0], expected, atol=2e-6)
    with pytest.raises(ValueError, match=r"thickness needs one value per sample \(3\), got 2"):
        slice_degrade_batch(torch.from_numpy(hr), thickness[:2], deg)


def test_realistic_augmentation_re_degrades_by_thick_slices() -> None:
    deg = S.SliceDegradation(thickness=(2, 6), axis=2, interpolation="cubic")
    aug = BatchedRealistic({"affine_p": 0.0, "elastic_p": 0.0, "bias_p": 0.0, "gamma_p": 0.0, "noise_p": 0.0},
                           (2.0, 2.0, 1.0), "zero_filled", (8, 8, 8), 4, slices=deg)
    assert aug.factors == (1.0, 1.0, 4.0) and aug.interpolation == "cubic"
    hr = torch.rand(2, 1, *aug.region_size)
    generator = torch.Generator().manual_seed(0)
    lr, hr_aug = aug(hr, torch.ones(2, 3), generator)
    assert lr.shape == hr_aug.shape == (2, 1, 8, 8, 8)
    window = hr[(slice(None), slice(None), *(slice(a, b) for a, b in aug.window))]
    torch.testing.assert_close(hr_aug, aug.crop(window))  # nothing drawn: the HR passes unchanged
    draw = torch.Generator().manual_seed(0)
    aug._draw(2, draw)
    thickness = (2 + torch.rand(2, generator=draw, dtype=torch.float64) * 4).tolist()
    torch.testing.assert_close(lr, aug.crop(slice_degrade_batch(window, thickness, deg)))
    assert not torch.allclose(lr, hr_aug)


def test_data_option_and_cache_key() -> None:
    assert slice_degradation("kspace", {"axis": 0}, "linear") is None
    deg = slice_degradation("slices", {"thickness": [2, 6], "axis": 1}, "cubic")
    assert deg is not None and deg.axis == 1 and deg.interpolation == "cubic"
    for bad, message in [(("voxels", None, "linear"), "degradation must be one of"),
                         (("slices", {"thick": 2}, "linear"), r"slices: unknown option\(s\) \['thick'\]"),
                         (("slices", {}, "zero_filled"), "interpolation must be one of")]:
        with pytest.raises(ValueError, match=message):
            slice_degradation(*bad)
    kspace = SubjectCache(None, (2.0, 2.0, 1.0), "linear", (8, 8, 8), None, True)  # type: ignore[arg-type]
    thick = SubjectCache(None, (2.0, 2.0, 1.0), "linear", (8, 8, 8), None, True, slices=deg)  # type: ignore[arg-type]
    other = SubjectCache(None, (2.0, 2.0, 1.0), "linear", (8, 8, 8), None, True,  # type: ignore[arg-type]
                         slices=S.SliceDegradation(thickness=(2, 5), axis=1, interpolation="cubic"))
    assert len({kspace.key("t"), thick.key("t"), other.key("t")}) == 3


def test_thick_slices_experiment_trains_and_records_its_degradation(train_cfg) -> None:
    cfg = train_cfg("experiment=thick_slices", "trainer.fast_dev_run=true", "data.patch_size=8")
    assert cfg.data.degradation == "slices" and cfg.data.interpolation == "cubic"
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    from hydra.utils import instantiate

    assert instantiate(cfg.data).slices == instantiate(cfg.data, _convert_="all").slices  # OmegaConf containers too
    dm = instantiate(cfg.data, _convert_="all")
    assert dm.hparams["degradation"] == "slices" and list(dm.hparams["factors"]) == [1.0, 1.0, 4.0]
    assert dm.hparams["slices"]["axis"] == 2 and dm.hparams["slices"]["thickness"] == [2.0, 6.0]
    assert dm.flip_axes == (2,)
    from mdcsrn_lightning.checkpoints import data_settings

    recorded = data_settings({"datamodule_hyper_parameters": dict(dm.hparams)}, "run.ckpt")
    assert recorded["degradation"] == "slices" and recorded["slices"]["profile"] == "boxcar"
    assert recorded["interpolation"] == "cubic" and list(recorded["factors"]) == [1.0, 1.0, 4.0]


@pytest.mark.parametrize(("thickness", "spacing", "profile"), [(4, 4, "boxcar"), (3, 4, "boxcar"), (4, 3, "gaussian")])
def test_slice_consistency_makes_the_slices_equal_the_measured_ones(thickness, spacing, profile) -> None:
    rng = np.random.default_rng(1)
    hr, guess = rng.random((5, 6, 24)), rng.random((5, 6, 24))
    measured = S.thick_slices(hr, thickness, spacing, 2, profile)
    fixed = S.slice_consistency(guess, measured, spacing, 2, profile, thickness)
    np.testing.assert_allclose(S.thick_slices(fixed, thickness, spacing, 2, profile), measured, atol=1e-5)
    # the least change: a guess whose slices already agree is kept
    np.testing.assert_allclose(S.slice_consistency(hr, measured, spacing, 2, profile, thickness), hr, atol=1e-5)


def test_contiguous_boxcar_consistency_adds_each_slice_residual_to_its_voxels() -> None:
    guess = np.zeros((2, 3, 8), dtype=np.float32)
    measured = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    fixed = S.slice_consistency(guess, measured, 4, 2)
    np.testing.assert_allclose(fixed, np.repeat(measured, 4, axis=2), atol=1e-6)


def test_slice_consistency_refuses_slices_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"measured slices of shape \(2, 3, 3\) do not match the 2 slices"):
        S.slice_consistency(np.zeros((2, 3, 8)), np.zeros((2, 3, 3)), 4, 2)
