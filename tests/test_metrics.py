from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from mdcsrn_lightning.evaluation.metrics import (
    foreground_slices,
    scale_to_unit,
    slice_metrics,
    summarise,
)


def _phantom(shape: tuple[int, int, int] = (32, 28, 10), seed: int = 0) -> np.ndarray:
    """A bright ellipsoid with texture on a dark background, intensities ~0-200."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 1.5) ** 2 < 1
    return inside * (120 + 60 * np.sin(6 * x) * np.cos(5 * y)) + rng.random(shape)


def test_scale_to_unit_uses_reference_percentile() -> None:
    ref = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    p = np.percentile(ref, 99.9)
    out = scale_to_unit(ref * 2.0, ref)
    np.testing.assert_allclose(out, np.clip(ref * 2.0 / p, 0, 1))
    assert out.max() == 1.0 and out.min() == 0.0
    with pytest.raises(ValueError, match="> 0"):
        scale_to_unit(ref, np.zeros((2, 2, 2)))


def test_identical_volumes() -> None:
    hr = _phantom()
    m = slice_metrics(hr, hr)
    assert m["psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["nrmse"] == 0.0
    assert m["n_slices"] > 0


def test_psnr_nrmse_match_numpy() -> None:
    rng = np.random.default_rng(1)
    hr = np.clip(scale_to_unit(_phantom(), _phantom()), 0, 1)
    sr = np.clip(hr + rng.normal(0, 0.05, hr.shape), 0, 1)
    m = slice_metrics(sr, hr, already_scaled=True)

    keep = [k for k in range(hr.shape[2]) if (hr[:, :, k] > 0.05).mean() >= 0.10]
    psnr, nrmse = [], []
    for k in keep:
        d = sr[:, :, k] - hr[:, :, k]
        psnr.append(10 * np.log10(1.0 / np.mean(d**2)))
        # skimage.metrics.normalized_root_mse default ("euclidean").
        nrmse.append(np.sqrt(np.mean(d**2)) / np.sqrt(np.mean(hr[:, :, k] ** 2)))
    assert m["n_slices"] == len(keep)
    assert m["psnr"] == pytest.approx(np.mean(psnr), rel=1e-6)  # torchmetrics: float32 inside
    assert m["nrmse"] == pytest.approx(np.mean(nrmse), rel=1e-9)


def test_scaling_is_the_hr_scale_for_both() -> None:
    hr = _phantom()
    sr = hr * 1.1
    scaled = slice_metrics(sr, hr)
    manual = slice_metrics(scale_to_unit(sr, hr), scale_to_unit(hr, hr), already_scaled=True)
    assert scaled == pytest.approx(manual)
    # A too-bright SR is penalised, not normalised away.
    assert scaled["psnr"] < 40


def test_ssim_matches_torchmetrics_and_drops_with_noise() -> None:
    rng = np.random.default_rng(2)
    hr = scale_to_unit(_phantom(), _phantom())
    ssims = []
    for sigma in (0.0, 0.02, 0.05, 0.1):
        sr = np.clip(hr + rng.normal(0, sigma, hr.shape), 0, 1)
        m = slice_metrics(sr, hr, already_scaled=True)
        ssims.append(m["ssim"])
        keep = foreground_slices(hr, axis=2)
        ref = structural_similarity_index_measure(
            torch.from_numpy(np.moveaxis(sr, 2, 0)[keep][:, None]).float(),
            torch.from_numpy(np.moveaxis(hr, 2, 0)[keep][:, None]).float(),
            data_range=1.0,
        )
        assert m["ssim"] == pytest.approx(float(ref), abs=1e-5)
    assert ssims[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(ssims, ssims[1:]))


def test_background_slices_are_excluded() -> None:
    hr = np.zeros((20, 20, 6))
    hr[2:18, 2:18, 1:4] = 1.0  # 64 % foreground in slices 1..3
    hr[:4, :4, 4] = 1.0  # 4 % foreground: below 10 %, excluded
    assert list(foreground_slices(hr, axis=2)) == [1, 2, 3]
    sr = hr.copy()
    sr[:, :, [0, 4, 5]] = 0.7  # huge errors, but only in excluded slices
    sr[5, 5, 2] = 0.5
    m = slice_metrics(sr, hr, already_scaled=True)
    assert m["n_slices"] == 3
    assert m["psnr"] > 30
    # Lowering the bar lets slice 4 in.
    assert slice_metrics(sr, hr, already_scaled=True, min_fg_fraction=0.03)["n_slices"] == 4


def test_axis_and_torch_inputs() -> None:
    rng = np.random.default_rng(3)
    hr = _phantom()
    sr = hr + rng.normal(0, 5, hr.shape)
    ref = slice_metrics(sr, hr, axis=2)
    moved = slice_metrics(np.moveaxis(sr, 2, 0), np.moveaxis(hr, 2, 0), axis=0)
    assert moved == pytest.approx(ref)
    tens = slice_metrics(torch.from_numpy(sr).float(), torch.from_numpy(hr).float())
    assert tens["psnr"] == pytest.approx(ref["psnr"], abs=1e-3)


def test_bad_inputs_raise() -> None:
    hr = _phantom()
    with pytest.raises(ValueError, match="same shape"):
        slice_metrics(hr[:-1], hr)
    with pytest.raises(ValueError, match="3D"):
        slice_metrics(hr[:, :, 0], hr[:, :, 0])
    with pytest.raises(ValueError, match="no slice"):
        slice_metrics(hr, hr, fg_threshold=2.0)
    with pytest.raises(ValueError, match="axis"):
        slice_metrics(hr, hr, axis=3)
    with pytest.raises(ValueError, match="NaN"):
        slice_metrics(np.full_like(hr, np.nan), hr)


def test_summarise() -> None:
    subjects = [{"psnr": 30.0, "ssim": 0.9, "nrmse": 0.1, "n_slices": 100.0}, {"psnr": 32.0, "ssim": 0.8, "nrmse": 0.2, "n_slices": 90.0}]
    s = summarise(subjects)
    assert s["psnr"] == pytest.approx((31.0, 1.0))
    assert s["ssim"] == pytest.approx((0.85, 0.05))
    assert s["n_slices"] == pytest.approx((95.0, 5.0))
    assert summarise(subjects[:1])["psnr"] == (30.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        summarise([])
