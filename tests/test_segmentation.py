"""The offline stand-in tissue segmentation and its Dice/Jaccard consistency scores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from mdcsrn_lightning.evaluation.segmentation import (
    CLASS_NAMES,
    STAND_IN_LABEL,
    brain_mask,
    kmeans_1d,
    overlap_scores,
    segment,
    segmentation_consistency,
)


def phantom(shape=(32, 32, 28), noise=0.02, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Concentric 'WM' core, 'GM' shell, 'CSF' shell in a zero background; and the true labels."""
    grid = np.indices(shape).astype(np.float64)
    centre = (np.array(shape, dtype=np.float64) - 1) / 2
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    truth = np.zeros(shape, np.uint8)
    truth[r < 13] = 1  # CSF
    truth[r < 10] = 2  # GM
    truth[r < 6] = 3  # WM
    intensity = np.array([0.0, 0.25, 0.55, 0.9])[truth]
    vol = intensity + np.random.default_rng(seed).normal(0, noise, shape) * (truth > 0)
    return (200.0 * vol).astype(np.float32), truth


def test_kmeans_on_a_known_sample() -> None:
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(m, 0.03, 4000) for m in (0.9, 0.2, 0.5)])
    np.testing.assert_allclose(kmeans_1d(y, 3), [0.2, 0.5, 0.9], atol=0.01)
    np.testing.assert_allclose(kmeans_1d(y, 3), kmeans_1d(y[::-1], 3), rtol=1e-12)  # order of the data does not matter
    # Very unequal class sizes (a quantile start alone would put two centres in the big class).
    z = np.concatenate([rng.normal(0.25, 0.02, 20000), rng.normal(0.55, 0.02, 3000), rng.normal(0.9, 0.02, 500)])
    np.testing.assert_allclose(kmeans_1d(z, 3), [0.25, 0.55, 0.9], atol=0.01)
    with pytest.raises(ValueError):
        kmeans_1d(np.array([1.0, 2.0]), 3)


def test_segment_recovers_a_phantom_and_is_deterministic() -> None:
    vol, truth = phantom()
    seg = segment(vol)
    assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 2, 3}
    scores = overlap_scores(seg, truth)
    assert scores["dice"] > 0.95, scores
    assert np.array_equal(seg, segment(vol.copy()))
    assert np.array_equal(seg, segment(vol * 7.0))  # intensity scale does not matter
    mask = brain_mask(vol)
    assert mask.sum() == pytest.approx((truth > 0).sum(), rel=0.1)


def test_overlap_scores_by_hand() -> None:
    a = np.zeros((4, 4, 1), np.uint8)
    b = np.zeros((4, 4, 1), np.uint8)
    a[:2, :, 0] = 1  # 8 voxels
    b[:1, :, 0] = 1  # 4 voxels, all inside a's
    a[2:, :2, 0] = 3
    b[2:, :2, 0] = 3  # identical class 3; class 2 absent from both
    s = overlap_scores(a, b)
    assert s["dice_csf"] == pytest.approx(2 * 4 / 12) and s["jaccard_csf"] == pytest.approx(4 / 8)
    assert s["dice_gm"] == 1.0 and s["jaccard_gm"] == 1.0
    assert s["dice_wm"] == 1.0
    assert s["dice"] == pytest.approx(np.mean([2 / 3, 1.0, 1.0]))
    assert s["jaccard"] == pytest.approx(np.mean([0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        overlap_scores(a, b[:3])


def test_consistency_falls_with_degradation() -> None:
    hr, _ = phantom()
    same = segmentation_consistency(hr, hr)
    assert same["dice"] == 1.0 and same["jaccard"] == 1.0
    slightly = segmentation_consistency(ndi.gaussian_filter(hr, 0.6), hr)
    badly = segmentation_consistency(ndi.gaussian_filter(hr, 2.0), hr)
    assert 1.0 > slightly["dice"] > badly["dice"]
    assert set(same) == {f"{m}_{c}" for m in ("dice", "jaccard") for c in CLASS_NAMES} | {"dice", "jaccard"}
    assert "stand-in" in STAND_IN_LABEL and "HighRes3DNet" in STAND_IN_LABEL


def test_bad_volumes() -> None:
    with pytest.raises(ValueError, match="3D"):
        segment(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="percentile"):
        segment(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        segment(np.full((4, 4, 4), np.nan))


def test_one_model_fitted_on_the_hr_segments_every_output() -> None:
    from mdcsrn_lightning.evaluation.segmentation import TissueModel

    hr, truth = phantom()
    model = TissueModel.fit(hr)
    assert model.centres == tuple(sorted(model.centres)) and len(model.centres) == 3
    assert np.array_equal(model.segment(hr), segment(hr))
    # The model is fixed on the HR's intensity scale: a too-bright output is segmented
    # differently (a model refitted on it would hide that).
    brighter = segmentation_consistency(hr * 1.4, hr, model=model)
    assert brighter["dice"] < 0.9
    assert segmentation_consistency(hr * 1.4, hr * 1.4)["dice"] == 1.0
