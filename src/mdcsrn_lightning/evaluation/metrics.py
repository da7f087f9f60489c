"""Reference metrics (PSNR, SSIM, NRMSE), slice by slice, as the paper reports them.

Protocol (SPEC "Inference and evaluation"):

1. Scale SR and HR by the HR's 99.9th percentile and clip to ``[0, 1]``
   (:func:`scale_to_unit`; the same HR scale for both, so an SR that is too bright is
   penalised, not renormalised away).
2. Take 2D slices across the most degraded plane: ``volume.take(k, axis)``, with
   ``axis = degradation.slice_axis(factors)`` (``2`` for factors ``(2, 2, 1)``, i.e.
   slices ``volume[:, :, k]``).
3. Keep only slices where at least ``min_fg_fraction`` (10 %) of the scaled HR voxels
   exceed ``fg_threshold`` (0.05): mostly-background slices would inflate PSNR/SSIM.
4. Per slice: PSNR (``data_range=1``), SSIM (torchmetrics; Gaussian window 11, sigma 1.5,
   K1=0.01, K2=0.03, ``data_range=1``), NRMSE; average the slices -> one value per subject
   (:func:`slice_metrics`).
5. Mean +- std over subjects (:func:`summarise`).

NRMSE is skimage's ``normalized_root_mse`` default (``normalization="euclidean"``):
``||sr - hr||_2 / ||hr||_2`` over the slice, i.e. ``sqrt(mean((sr - hr)^2)) / sqrt(mean(hr^2))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

__all__ = [
    "METRICS",
    "foreground_slices",
    "reference_scale",
    "scale_to_unit",
    "slice_metrics",
    "summarise",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
METRICS: tuple[str, ...] = ("psnr", "ssim", "nrmse")

# SSIM settings: the standard of Wang et al. (2004), torchmetrics' defaults, spelled out.
_SSIM_KERNEL = 11
_SSIM_SIGMA = 1.5
_SSIM_CHUNK = 32  # slices per torchmetrics call: bounds peak memory


def _to_numpy3d(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (X, Y, Z), got shape {arr.shape}")
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def scale_to_unit(
    volume: ArrayLike, reference: ArrayLike, percentile: float = 99.9, *, scale: float | None = None
) -> np.ndarray:
    """``(X, Y, Z) -> (X, Y, Z)`` float64: ``volume / percentile(reference, 99.9)``, clipped to ``[0, 1]``.

    Pass the HR as ``reference`` for both HR and SR/LR so they share one scale; ``scale``
    (if given) replaces the percentile, as in :func:`slice_metrics`.
    """
    vol = _to_numpy3d(volume, "volume")
    return _scale(vol, reference_scale(reference, percentile) if scale is None else scale)


def reference_scale(reference: ArrayLike, percentile: float = 99.9) -> float:
    """The HR's ``percentile`` (> 0): what :func:`scale_to_unit` and :func:`slice_metrics`
    divide by when given no ``scale``; compute it once to reuse it for many volumes."""
    return _unit_scale(_to_numpy3d(reference, "reference"), percentile)


def _unit_scale(ref: np.ndarray, percentile: float = 99.9) -> float:
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    scale = float(np.percentile(ref, percentile))
    if not scale > 0.0:
        raise ValueError(f"the reference's {percentile}th percentile is {scale}; it must be > 0 to scale by it")
    return scale


def _scale(vol: np.ndarray, scale: float) -> np.ndarray:
    if not scale > 0.0:
        raise ValueError(f"scale must be > 0, got {scale}")
    out = vol / scale  # a new array: clip it in place
    return np.clip(out, 0.0, 1.0, out=out)


def foreground_slices(
    hr_scaled: np.ndarray, *, axis: int = 2, fg_threshold: float = 0.05, min_fg_fraction: float = 0.10
) -> np.ndarray:
    """Indices of the slices along ``axis`` where ``>= min_fg_fraction`` of voxels exceed ``fg_threshold``."""
    if hr_scaled.ndim != 3 or not -3 <= axis < 3:
        raise ValueError(f"need a 3D volume and an axis in [-3, 2], got shape {hr_scaled.shape}, axis {axis}")
    other = tuple(a for a in range(3) if a != axis % 3)
    fraction = (hr_scaled > fg_threshold).mean(axis=other)
    return np.flatnonzero(fraction >= min_fg_fraction)


def _ssim(sr_t: torch.Tensor, hr_t: torch.Tensor, chunk: int = _SSIM_CHUNK) -> torch.Tensor:
    """Per-slice SSIM of ``(n, 1, H, W)`` batches -> ``(n,)``.

    Run in float32 and in chunks: PyTorch's float64 CPU conv2d unfolds the 11x11 window
    (im2col), which for ~150 brain slices asks for tens of GB; float32 (oneDNN) does not,
    and [0, 1] data loses nothing that matters (differences ~1e-6).
    """
    out = [
        structural_similarity_index_measure(
            sr_t[i : i + chunk].float(),
            hr_t[i : i + chunk].float(),
            gaussian_kernel=True,
            sigma=_SSIM_SIGMA,
            kernel_size=_SSIM_KERNEL,
            data_range=1.0,
            reduction="none",
        )
        for i in range(0, sr_t.shape[0], chunk)
    ]
    return torch.cat(out).double()


def slice_metrics(
    sr: ArrayLike,
    hr: ArrayLike,
    *,
    axis: int = 2,
    fg_threshold: float = 0.05,
    min_fg_fraction: float = 0.10,
    already_scaled: bool = False,
    scale: float | None = None,
) -> dict[str, float]:
    """One subject: ``sr``, ``hr`` of shape ``(X, Y, Z)`` -> ``{"psnr", "ssim", "nrmse", "n_slices"}``.

    Each metric is the mean over the foreground slices along ``axis`` (see the module
    docstring). PSNR is in dB; an exactly reproduced slice has PSNR ``inf`` (so the
    subject's mean is ``inf`` too). An all-zero HR slice cannot pass the foreground rule,
    so NRMSE never divides by zero.

    Args:
        already_scaled: ``True`` if both are already on the ``[0, 1]`` HR scale
            (:func:`scale_to_unit`); otherwise both are scaled by the HR's 99.9th percentile.
        scale: divide both by this instead of the HR's own percentile (then clip to
            ``[0, 1]``): for a part of a volume (a slab) normalised by the whole volume's
            percentile, where the part's own percentile is not the reference.
    """
    sr_arr = _to_numpy3d(sr, "sr")
    hr_arr = _to_numpy3d(hr, "hr")
    if sr_arr.shape != hr_arr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {sr_arr.shape} and {hr_arr.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be in [-3, 2], got {axis}")
    if not already_scaled:
        if scale is None:
            scale = _unit_scale(hr_arr)  # the HR's scale for both
        sr_arr, hr_arr = _scale(sr_arr, scale), _scale(hr_arr, scale)

    keep = foreground_slices(hr_arr, axis=axis, fg_threshold=fg_threshold, min_fg_fraction=min_fg_fraction)
    if keep.size == 0:
        raise ValueError(
            f"no slice along axis {axis} has >= {min_fg_fraction:.0%} of voxels above {fg_threshold} "
            "in the scaled HR: nothing to evaluate"
        )
    # (n_slices, 1, H, W) batches: one torchmetrics call for every slice.
    sr_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(sr_arr, axis, 0)[keep]))[:, None]
    hr_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(hr_arr, axis, 0)[keep]))[:, None]

    psnr = peak_signal_noise_ratio(sr_t, hr_t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = _ssim(sr_t, hr_t)
    err = torch.linalg.vector_norm((sr_t - hr_t).flatten(1), dim=1)
    nrmse = err / torch.linalg.vector_norm(hr_t.flatten(1), dim=1)
    return {
        "psnr": float(psnr.mean()),
        "ssim": float(ssim.mean()),
        "nrmse": float(nrmse.mean()),
        "n_slices": float(keep.size),
    }


def summarise(per_subject: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Subjects' :func:`slice_metrics` dicts -> ``{metric: (mean, std)}`` over subjects.

    The std is the population std (``ddof=0``; ``0.0`` for a single subject). Keys are those
    shared by every subject (``n_slices`` included).
    """
    if len(per_subject) == 0:
        raise ValueError("per_subject is empty: nothing to summarise")
    keys = [k for k in per_subject[0] if all(k in d for d in per_subject)]
    out: dict[str, tuple[float, float]] = {}
    for k in keys:
        vals = np.array([float(d[k]) for d in per_subject], dtype=np.float64)
        if np.isinf(vals).any():  # an exact reproduction: std is meaningless
            out[k] = (float(vals.mean()), math.nan if len(vals) > 1 else 0.0)
        else:
            out[k] = (float(vals.mean()), float(vals.std()))
    return out
