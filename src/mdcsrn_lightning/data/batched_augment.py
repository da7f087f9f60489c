"""``augment=realistic`` as batched torch operations, on whatever device the batch is on.

:class:`BatchedRealistic` takes a batch of HR regions ``(B, 1, *region_size)`` (cut by the
loader around each patch, ``margin`` voxels wider than the patch on each face of a degraded
axis, at most :data:`WARP_MARGIN` on the others, and a whole number of LR voxels long) and returns ``(lr, hr_aug)``, each ``(B, 1, *patch_size)``:

1. per sample, each with its own probability, in the order of
   :func:`~mdcsrn_lightning.data.augment.realistic_hr_transform`: affine -> elastic ->
   bias field -> gamma -> Rician noise, applied to the HR region;
2. :func:`degrade_batch` (a torch port of :func:`~mdcsrn_lightning.data.degradation.degrade`)
   of the whole region, so that the k-space truncation's ringing from the region's cut faces
   and the affine's padding stay in the margin;
3. the region's centre ``patch_size`` box of both.

Differences from the TorchIO path (see each helper for the detail):

- affine and elastic deformation are composed into **one** trilinear ``grid_sample``
  (TorchIO resamples twice, so it blurs slightly more);
- the elastic control grid (7^3 points, 4 cells of ``box / 4`` voxels, cubic B-spline) and
  the bias field's polynomial coordinates are those TorchIO uses on today's ROI box
  (``max(96, patch) + 2 margin`` per axis, 128 by default), in which the region sits at one
  random position per sample (the same for both fields): displacements and bias gradients
  per voxel have today's statistics although the region is smaller;
- the rotation and scaling are about the region's centre (today: about the ROI box's
  centre, which also shifts an off-centre patch by a few voxels; a shift of LR and HR together);
- the rotation follows ITK's Euler convention up to the RAS/LPS sign flip of the x and y
  angles, and the elastic control grid is in RAS voxel order (TorchIO's is LPS: x and y
  indices reversed, those components negated); both leave the (symmetric) distributions
  unchanged. As in TorchIO 1.2.1, the two outer control points are locked (zero) on the
  first two axes only, and ITK's padding of the grid's bounds (< 0.03 voxel) is left out.

All random parameters come from one CPU ``torch.Generator`` (small tensors, then moved to
the batch's device); the Rician noise comes from a generator on the batch's device seeded by
a draw from it, so a seed fixes the result on a given device. Shapes: ``B`` samples,
``X, Y, Z`` spatial axes (tensor dims 2, 3, 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.augment import AUTO_ROI, REALISTIC_DEFAULTS, ROI_OPTIONS
from mdcsrn_lightning.data.slices import (
    SliceDegradation,
    fine_matrix,
    slice_count,
    slice_matrix,
)
from mdcsrn_lightning.sizes import triple

__all__ = ["BatchedRealistic", "batched_flip_rot90", "degrade_batch", "slice_degrade_batch"]

_PROBABILITIES = ("affine_p", "elastic_p", "bias_p", "gamma_p", "noise_p")
_NON_NEGATIVE = ("degrees", "elastic_displacement", "bias_coefficients", "log_gamma")
#: TorchIO's defaults: 7 control points per axis = a mesh of 4 cells + spline order 3, the
#: two outer control points locked (TorchIO 1.2.1 locks them on the first two axes only)
_MESH = 4
_LOCKED = 2
_BIAS_ORDER = 3
#: voxels of context along an axis that is not degraded: the deformation's reach (rotation of 5
#: degrees at a 40^3 patch's corner ~2.5, scaling ~1, elastic 2 mm ~3 at 0.7 mm)
WARP_MARGIN = 8


# ----------------------------------------------------------------------------- degradation


@functools.lru_cache(maxsize=64)
def _interp_numpy(n: int, m: int, order: int) -> np.ndarray:
    """``degradation._interp_matrix(n, m, order)``, computed once per size."""
    return degradation._interp_matrix(n, m, order)


_MATRICES: dict[tuple[int, int, int, str, torch.dtype], Tensor] = {}
_BANDS: dict[tuple[int, int, str], Tensor] = {}


def _interp_tensor(n: int, m: int, order: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``(n, m)`` interpolation matrix on ``device``, cached per ``(n, m, order, device, dtype)``."""
    key = (n, m, order, str(device), dtype)
    if key not in _MATRICES:
        _MATRICES[key] = torch.as_tensor(_interp_numpy(n, m, order), dtype=dtype, device=device)
    return _MATRICES[key]


def _band_tensor(n: int, m: int, device: torch.device) -> Tensor:
    """``degradation._band(n, m)`` as a long tensor on ``device`` (cached)."""
    key = (n, m, str(device))
    if key not in _BANDS:
        _BANDS[key] = torch.as_tensor(degradation._band(n, m), dtype=torch.long, device=device)
    return _BANDS[key]


def _apply_matrix(x: Tensor, w: Tensor, dim: int) -> Tensor:
    """``w`` ``(n, m)`` applied along ``dim`` of ``x`` (which has ``m`` there): ``n`` there after.

    In ``w``'s dtype: float64 on a GPU (a float32 matmul may run in TF32 there, ``1e-3``),
    float32 on the CPU (exact to ``1e-7``; half the cost).
    """
    return torch.movedim(torch.movedim(x.to(w.dtype), dim, -1) @ w.T, -1, dim)


def degrade_batch(hr: Tensor, factors: Sequence[float], interpolation: str) -> Tensor:
    """Batched :func:`~mdcsrn_lightning.data.degradation.degrade`: ``(B, C, X, Y, Z)`` -> same shape.

    k-space truncation of every volume (the central ``M = floor(N / f)`` of ``N`` frequencies
    per degraded axis, ``complex64`` FFTs on ``hr``'s device), magnitude, and back onto the
    grid: ``nearest``/``linear``/``cubic`` with degradation's own (periodic) interpolation
    matrices, ``zero_filled`` by zero-padding k-space, ``zero_filled_magnitude`` by zero-padding the coarse
    magnitude image's spectrum. Agrees with the numpy float64 original
    to about ``1e-6`` of the intensity scale. Returns float32, ``>= 0``.
    """
    if hr.dim() != 5:
        raise ValueError(f"hr must be (B, C, X, Y, Z), got shape {tuple(hr.shape)}")
    fs = degradation._check_factors(factors)
    if interpolation not in degradation._INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {degradation._INTERPOLATIONS}, got {interpolation!r}")
    x = hr.float()
    shape = tuple(x.shape[2:])
    axes = [ax for ax, f in enumerate(fs) if f > 1.0]
    if not axes:
        return x.abs()
    shape_lr = degradation.lr_shape(shape, fs)
    if interpolation == "zero_filled":
        dims = [2 + ax for ax in axes]
        k = torch.fft.fftn(x, dim=dims)
        mask = torch.zeros(shape, dtype=torch.bool, device=x.device)
        keep = [torch.arange(n, device=x.device) if ax not in axes else _band_tensor(n, shape_lr[ax], x.device)
                for ax, n in enumerate(shape)]
        mask[tuple(torch.meshgrid(*keep, indexing="ij"))] = True
        return torch.fft.ifftn(k * mask, dim=dims).abs()
    k = torch.fft.fftn(x, dim=[2 + ax for ax in axes])
    for ax in axes:
        k = torch.index_select(k, 2 + ax, _band_tensor(shape[ax], shape_lr[ax], x.device))
    if interpolation == "zero_filled_magnitude":
        return _magnitude_zero_filled(k, shape, shape_lr, axes)
    return _to_grid(k, shape, shape_lr, axes, interpolation)


def _magnitude_zero_filled(k: Tensor, shape: Sequence[int], shape_lr: Sequence[int], axes: Sequence[int]) -> Tensor:
    """The kept bands ``k`` -> the coarse magnitude image -> its spectrum zero-padded to ``shape``
    -> magnitude (degradation's ``zero_filled_magnitude``; the M/N and N/M scalings cancel)."""
    dims = [2 + ax for ax in axes]
    coarse = torch.fft.fftn(torch.fft.ifftn(k, dim=dims).abs(), dim=dims)
    full = coarse.new_zeros((*coarse.shape[:2], *(shape[ax] if ax in axes else coarse.shape[2 + ax] for ax in range(3))))
    index = [torch.arange(n, device=k.device) for n in full.shape[2:]]
    for ax in axes:
        index[ax] = _band_tensor(shape[ax], shape_lr[ax], k.device)
    full[(slice(None), slice(None), *torch.meshgrid(*index, indexing="ij"))] = coarse
    return torch.fft.ifftn(full, dim=dims).abs()


def _to_grid(k: Tensor, shape: Sequence[int], shape_lr: Sequence[int], axes: Sequence[int], interpolation: str) -> Tensor:
    """The kept bands ``k`` -> inverse FFT, magnitude -> back onto the ``shape`` grid."""
    dims = [2 + ax for ax in axes]
    scale = float(np.prod([shape_lr[ax] / shape[ax] for ax in axes]))
    lr = torch.fft.ifftn(k, dim=dims).abs() * scale
    order = degradation._ORDER[interpolation]
    for ax in axes:
        dtype = torch.float64 if lr.device.type == "cuda" else torch.float32
        lr = _apply_matrix(lr, _interp_tensor(shape[ax], shape_lr[ax], order, lr.device, dtype), 2 + ax)
    return lr.clamp_min(0.0).float()


# ----------------------------------------------------------------------------- flips, rot90


@functools.lru_cache(maxsize=256)
def _slice_operator(n: int, thickness: float, spacing: int, profile: str, interpolation: str) -> np.ndarray:
    """``(n, n)``: thick slices of ``n`` fine voxels, then back onto them (``slice_degrade`` as a matrix)."""
    count = slice_count(n, spacing)
    return fine_matrix(count, spacing, n, interpolation) @ slice_matrix(n, thickness, spacing, profile)  # type: ignore[arg-type]


def slice_degrade_batch(hr: Tensor, thickness: Sequence[float], slices: SliceDegradation) -> Tensor:
    """Batched :func:`~mdcsrn_lightning.data.slices.slice_degrade`: ``(B, C, X, Y, Z)`` -> same shape.

    Sample ``b`` gets slices ``thickness[b]`` fine voxels thick (spacing: ``slices.spacing``, or
    the thickness rounded) along ``slices.axis``, starting at the region's first voxel.
    """
    if len(thickness) != hr.shape[0]:
        raise ValueError(f"thickness needs one value per sample ({hr.shape[0]}), got {len(thickness)}")
    dim, n = slices.axis + 2, hr.shape[slices.axis + 2]
    dtype = torch.float64 if hr.device.type != "cpu" else torch.float32
    out = torch.empty_like(hr)
    for b, t in enumerate(thickness):
        op = torch.as_tensor(_slice_operator(n, float(t), slices.spacing_for(t), slices.profile, slices.interpolation),
                             dtype=dtype, device=hr.device)
        out[b] = _apply_matrix(hr[b], op, dim - 1).to(hr.dtype)
    return out


def batched_flip_rot90(
    lr: Tensor,
    hr: Tensor,
    flip_axes: Sequence[int],
    planes: Sequence[tuple[int, int]],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """The paper's augmentation per sample, identical for ``lr`` and ``hr`` ``(B, C, X, Y, Z)``.

    Each spatial axis in ``flip_axes`` (0, 1, 2 = tensor dims 2, 3, 4) is flipped with
    probability 0.5, then each plane ``(a, b)`` in ``planes`` is rotated by ``k * 90``
    degrees, ``k`` uniform in 0..3 (the data module's ``RandomFlip`` + ``RandomRot90``
    order). Draws from the CPU ``generator``. A rotated plane needs equal edges.
    """
    if lr.shape[0] != hr.shape[0] or lr.dim() != 5 or hr.dim() != 5:
        raise ValueError(f"lr and hr must be (B, C, X, Y, Z) with the same B, got {tuple(lr.shape)}, {tuple(hr.shape)}")
    axes = [int(a) for a in flip_axes]
    plane_list = [(int(a), int(b)) for a, b in planes]
    if not set(axes) <= {0, 1, 2} or any(a == b or not {a, b} <= {0, 1, 2} for a, b in plane_list):
        raise ValueError(f"flip_axes and planes must use spatial axes 0, 1, 2, got {flip_axes!r}, {planes!r}")
    for a, b in plane_list:
        if lr.shape[2 + a] != lr.shape[2 + b] or hr.shape[2 + a] != hr.shape[2 + b]:
            raise ValueError(f"rotating in the plane {(a, b)} needs equal edges there, got {tuple(lr.shape)}")
    batch = lr.shape[0]
    flips = torch.rand(batch, len(axes), generator=generator) < 0.5
    turns = torch.randint(0, 4, (batch, len(plane_list)), generator=generator)
    lr_out, hr_out = [], []
    for i in range(batch):
        pair = [lr[i : i + 1], hr[i : i + 1]]
        dims = [2 + a for a, f in zip(axes, flips[i].tolist()) if f]
        if dims:
            pair = [torch.flip(t, dims) for t in pair]
        for (a, b), k in zip(plane_list, turns[i].tolist()):
            if k:
                pair = [torch.rot90(t, k, (2 + a, 2 + b)) for t in pair]
        lr_out.append(pair[0])
        hr_out.append(pair[1])
    return torch.cat(lr_out).contiguous(), torch.cat(hr_out).contiguous()


# ----------------------------------------------------------------------------- fields


@functools.lru_cache(maxsize=32)
def _bspline_weights(size: int, mesh: int = _MESH) -> np.ndarray:
    """``(size, mesh + 3)`` cubic B-spline weights of ITK's ``BSplineTransform`` over ``size`` voxels.

    ``sitk.BSplineTransformInitializer(image, [mesh] * 3)`` spans the image's extent (voxel
    index ``-0.5`` to ``size - 0.5``; ITK's ``2^-3``-voxel padding of the bounds is left out)
    with ``mesh`` cells of ``size / mesh`` voxels; voxel ``i`` sits at grid coordinate
    ``u = (i + 0.5) / (size / mesh) + 1`` and takes control points ``floor(u) - 1 .. floor(u) + 2``.
    """
    u = (np.arange(size, dtype=np.float64) + 0.5) * mesh / size + 1.0
    base = np.floor(u).astype(np.int64)
    t = u - base
    kernels = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]
    w = np.zeros((size, mesh + 3), dtype=np.float64)
    for k, kernel in enumerate(kernels):
        w[np.arange(size), base - 1 + k] = kernel
    return w


def _rows(table: np.ndarray, offsets: Tensor, length: int, device: torch.device) -> Tensor:
    """``table[offset : offset + length]`` per sample: ``(B, length, table.shape[1])`` float64."""
    full = torch.as_tensor(table, dtype=torch.float64, device=device)
    idx = offsets.to(device)[:, None] + torch.arange(length, device=device)[None]
    return full[idx]


def _elastic_displacement(control: Tensor, offsets: Tensor, region: tuple[int, int, int],
                          box: tuple[int, int, int], spacing: Tensor) -> Tensor:
    """Dense displacement ``(B, 3, X, Y, Z)`` in voxels of the region's voxels.

    ``control``: ``(B, n0, n1, n2, 3)`` control-point displacements in mm (B-spline
    coefficients, as TorchIO hands them to ITK) on the grid of the virtual ``box``, in which
    the region starts at ``offsets`` ``(B, 3)``; ``spacing`` ``(B, 3)`` mm converts to voxels.
    """
    w = [_rows(_bspline_weights(box[a]), offsets[:, a], region[a], control.device) for a in range(3)]
    # float32: TF32 (if a user enables it) moves a ~3-voxel displacement by ~1e-3 voxel
    t = torch.einsum("bijkd,bzk->bijzd", control.float(), w[2].float())
    t = torch.einsum("bijzd,byj->bizyd", t, w[1].float())
    disp = torch.einsum("bizyd,bxi->bdxyz", t, w[0].float())
    return disp / spacing[:, :, None, None, None]


def _bias_terms(order: int = _BIAS_ORDER) -> list[tuple[int, int, int]]:
    """Exponents ``(x, y, z)`` of the polynomial terms, in TorchIO's coefficient order (20 for order 3)."""
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]


def _bias_log_field(coefficients: Tensor, offsets: Tensor, region: tuple[int, int, int],
                    box: tuple[int, int, int]) -> Tensor:
    """``log`` of the bias field ``(B, X, Y, Z)`` (``coefficients`` ``(B, 20)``).

    TorchIO's ``BiasField.generate_bias_field`` on the virtual ``box``: voxel ``i`` of an
    axis of ``n`` has coordinate ``(i - (n - 1) / 2) / ((n - 1) / 2)`` in ``[-1, 1]``; the
    region covers ``offsets .. offsets + region`` of it.
    """
    device = coefficients.device
    powers = []
    for a in range(3):
        n = box[a]
        c = (np.arange(n, dtype=np.float64) - (n - 1) / 2) / max((n - 1) / 2, 1e-12)
        table = np.stack([c**p for p in range(_BIAS_ORDER + 1)], axis=1)
        powers.append(_rows(table, offsets[:, a], region[a], device))  # (B, R, order + 1)
    grid = torch.zeros(coefficients.shape[0], *(_BIAS_ORDER + 1,) * 3, device=device, dtype=torch.float64)
    for t, (i, j, k) in enumerate(_bias_terms()):
        grid[:, i, j, k] = coefficients[:, t]
    out = torch.einsum("nabc,nxa->nxbc", grid, powers[0])  # small: (B, R, 4, 4) in float64
    out = torch.einsum("nxbc,nyb->nxyc", out, powers[1]).float()
    return torch.einsum("nxyc,nzc->nxyz", out, powers[2].float())


def _rotation(angles: Tensor) -> Tensor:
    """``(B, 3)`` radians -> ``(B, 3, 3)`` ``Rz @ Rx @ Ry`` (ITK's ``Euler3DTransform`` default order)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows: list[list[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ rx @ ry


def _affine_voxel_matrix(angles: Tensor, scales: Tensor, spacing: Tensor) -> Tensor:
    """``(B, 3, 3)`` map from an output voxel offset (from the centre) to the source voxel offset.

    TorchIO's forward transform is ``S R`` in mm (scale ``s > 1`` enlarges the objects) and
    the resampler uses its inverse ``R^T S^-1``; in voxels ``D^-1 R^T S^-1 D`` with ``D = diag(spacing)``.
    """
    inverse = _rotation(angles).transpose(1, 2) @ torch.diag_embed(1.0 / scales)
    return torch.diag_embed(1.0 / spacing) @ inverse @ torch.diag_embed(spacing)


def _warp(hr: Tensor, matrix: Tensor, displacement: Tensor | None,
          window: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """Trilinear resampling of ``hr`` ``(B, 1, X, Y, Z)`` at ``c + matrix (x + displacement - c)``.

    ``c`` is the region's centre, ``displacement`` ``(B, 3, X, Y, Z)`` voxels or ``None`` (the
    elastic field, applied first in output space as ITK does after the affine). Points outside
    the region take the sample's minimum (TorchIO's ``default_pad_value="minimum"``). In
    ``grid_sample``'s normalised coordinates (``align_corners=True``, ``D = diag((N - 1) / 2)``)
    the source is ``D^-1 M (x - c) + D^-1 M d``. ``window``: per axis ``(start, stop)`` of the
    output voxels to compute (default: all; ``displacement`` then covers only those).
    """
    size = hr.shape[2:]
    window = [(0, n) for n in size] if window is None else [(int(a), int(b)) for a, b in window]
    half = torch.tensor([max((n - 1) / 2, 0.5) for n in size], device=hr.device, dtype=torch.float32)
    w = matrix.float() / half[None, :, None]  # D^-1 M: a voxel offset -> a normalised source coordinate
    ax = [torch.arange(a, b, device=hr.device, dtype=torch.float32) - (n - 1) / 2 for (a, b), n in zip(window, size)]
    grid = torch.empty(hr.shape[0], *(len(a) for a in ax), 3, device=hr.device, dtype=torch.float32)
    for i in range(3):  # separable: three broadcast terms per component (no full-size coordinate arrays)
        component = (w[:, i, 0, None, None, None] * ax[0][None, :, None, None]
                     + w[:, i, 1, None, None, None] * ax[1][None, None, :, None]
                     + w[:, i, 2, None, None, None] * ax[2][None, None, None, :])
        if displacement is not None:
            for j in range(3):
                component = component + w[:, i, j, None, None, None] * displacement[:, j]
        grid[..., 2 - i] = component
    low = hr.amin(dim=(1, 2, 3, 4), keepdim=True)
    out = F.grid_sample(hr - low, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out + low


# ----------------------------------------------------------------------------- intensity


def _row_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row ``q`` quantile of ``x`` ``(B, N)`` with linear interpolation (``torch.quantile``'s rule).

    Reads the two order statistics off a ``topk`` of the ``N - floor(q (N - 1))`` largest
    values: for the 99.9th percentile a tiny partial sort instead of a full one.
    """
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    top = torch.topk(x, n - lo, dim=1, sorted=True).values  # descending: ordered[:, i] = top[:, n - 1 - i]
    low, high = top[:, n - 1 - lo], top[:, n - 1 - hi]
    return low + (pos - lo) * (high - low)


def _rician(x: Tensor, snr: Tensor, seed: int) -> Tensor:
    """``|x + n1 + i n2|``, ``n ~ N(0, sigma^2)``, ``sigma = mean foreground / snr`` per sample.

    The foreground is ``x > 0.05 x`` the 99.9th percentile of the sample; both the
    percentile and the foreground mean are taken on every ``numel // 65536``-th voxel
    (:class:`~mdcsrn_lightning.data.augment.RandomRicianNoise` uses every voxel for the mean);
    ``sigma = 0`` without foreground. The noise comes from a ``hr.device`` generator seeded with ``seed``.
    """
    flat = x.flatten(1)
    sample = flat[:, :: max(1, flat.shape[1] // 65536)]  # the reference and the mean from ~64k voxels
    reference = _row_quantile(sample, 0.999)
    fg = sample > 0.05 * reference[:, None]
    count = fg.sum(1)
    mean = torch.where(fg, sample, 0.0).sum(1) / count.clamp_min(1)
    sigma = torch.where(count > 0, mean / snr, torch.zeros_like(mean))[:, None, None, None, None]
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    noise = torch.randn((2, *x.shape), generator=gen, device=x.device, dtype=x.dtype).mul_(sigma)
    return torch.hypot(noise[0].add_(x), noise[1])


def _gamma(x: Tensor, log_gamma: Tensor) -> Tensor:
    """``sign(x) |x| ** exp(log_gamma)`` per sample: TorchIO's ``x ** gamma`` when ``x >= 0``, its
    rule for images with negatives otherwise (``log_gamma`` ``(B,)``)."""
    gamma = torch.exp(log_gamma)[:, None, None, None, None]
    return x.abs().pow(gamma).copysign(x)


# ----------------------------------------------------------------------------- the transform


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`REALISTIC_DEFAULTS` overridden by ``options``, validated (errors name the key)."""
    opts = dict(REALISTIC_DEFAULTS)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise ValueError(f"unknown augment_options {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(options or {})
    for key in set(opts) - set(ROI_OPTIONS):
        if key == "snr":
            continue
        value = opts[key]
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value):
            raise ValueError(f"augment_options.{key} must be a finite number, got {value!r}")
    for key in _PROBABILITIES:
        if not 0.0 <= float(opts[key]) <= 1.0:
            raise ValueError(f"augment_options.{key} must be a probability in [0, 1], got {opts[key]!r}")
    for key in _NON_NEGATIVE:
        if float(opts[key]) < 0:
            raise ValueError(f"augment_options.{key} must be >= 0, got {opts[key]!r}")
    if not 0.0 <= float(opts["scales"]) < 1.0:
        raise ValueError(
            f"augment_options.scales must be in [0, 1) (scale factors 1 +- scales), got {opts['scales']!r}"
        )
    snr = opts["snr"]
    try:
        lo, hi = (float(s) for s in snr)
    except (TypeError, ValueError):
        raise ValueError(f"augment_options.snr must be two numbers [low, high], got {snr!r}") from None
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"augment_options.snr must be two finite numbers 0 < low <= high, got {snr!r}")
    opts["snr"] = (lo, hi)
    return opts


def _check_geometry(patch_size: Sequence[int], margin: int) -> tuple[tuple[int, int, int], int]:
    patch = triple(patch_size, "patch_size")
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (voxels), got {margin!r}")
    return patch, int(margin)


class BatchedRealistic:
    """``augment=realistic`` of a batch of HR regions, then their degradation and centre crop.

    See the module docstring. ``options`` has :data:`REALISTIC_DEFAULTS`' keys (``roi`` is
    ignored, ``roi_margin`` replaced by ``margin``); ``factors`` and ``interpolation`` are
    the run's degradation; the loader cuts regions of :attr:`region_size` around patches of
    ``patch_size``, each starting on a multiple of ``round(factor)`` per axis.
    """

    def __init__(self, options: Mapping[str, Any] | None, factors: Sequence[float], interpolation: str,
                 patch_size: Sequence[int], margin: int, slices: SliceDegradation | None = None) -> None:
        opts = _check_options(options)
        self.slices = slices
        self.factors = degradation._check_factors(slices.factors() if slices is not None else factors)
        if slices is None and interpolation not in degradation._INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {degradation._INTERPOLATIONS}, got {interpolation!r}")
        self.interpolation = slices.interpolation if slices is not None else interpolation
        self.patch_size, self.margin = _check_geometry(patch_size, margin)
        self.grid = tuple(max(1, round(f)) for f in self.factors)
        self.probabilities = torch.tensor([float(opts[k]) for k in _PROBABILITIES])
        self.degrees = float(opts["degrees"])
        self.scales = float(opts["scales"])
        self.elastic_displacement = float(opts["elastic_displacement"])
        self.bias_coefficients = float(opts["bias_coefficients"])
        self.log_gamma = float(opts["log_gamma"])
        self.snr: tuple[float, float] = opts["snr"]
        # today's ROI box (max(96, patch) + 2 margin, on the LR grid), in which fields are defined
        self.box = tuple(max(-(-(max(AUTO_ROI, p) + 2 * self.margin) // g) * g, r)
                         for p, g, r in zip(self.patch_size, self.grid, self.region_size))

    @property
    def margins(self) -> tuple[int, int, int]:
        """Per axis: ``margin`` along degraded axes (the k-space truncation's ringing from the
        region's cut faces); along the others only the deformation's reach, at most
        :data:`WARP_MARGIN` (no truncation there)."""
        return tuple(self.margin if f > 1 else min(self.margin, WARP_MARGIN) for f in self.factors)  # type: ignore[return-value]

    @property
    def region_size(self) -> tuple[int, int, int]:
        """``patch + 2 margins`` per axis, rounded up to a multiple of ``round(factor)``."""
        edges = (-(-(p + 2 * m) // g) * g for p, m, g in zip(self.patch_size, self.margins, self.grid))
        return tuple(edges)  # type: ignore[return-value]

    def _draw(self, batch: int, generator: torch.Generator) -> dict[str, Any]:
        """All random parameters of a batch, from the CPU ``generator``, always in the same order and number."""
        region, box = self.region_size, self.box
        n_ctrl = _MESH + 3

        def sym(*shape: int) -> Tensor:  # U(-1, 1)
            return torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1

        apply = torch.rand(batch, len(_PROBABILITIES), generator=generator, dtype=torch.float64) < self.probabilities
        angles = sym(batch, 3) * math.radians(self.degrees)
        scales = 1 + sym(batch, 3) * self.scales
        control = sym(batch, n_ctrl, n_ctrl, n_ctrl, 3) * self.elastic_displacement
        for i in range(_LOCKED):  # as TorchIO 1.2.1: only the first two axes are locked
            control[:, [i, -1 - i]] = 0
            control[:, :, [i, -1 - i]] = 0
        room = torch.tensor([b - r + 1 for b, r in zip(box, region)], dtype=torch.float64)
        offsets = (torch.rand(batch, 3, generator=generator, dtype=torch.float64) * room).long()
        bias = sym(batch, len(_bias_terms())) * self.bias_coefficients
        log_gamma = sym(batch) * self.log_gamma
        lo, hi = math.log(self.snr[0]), math.log(self.snr[1])
        snr = torch.exp(lo + torch.rand(batch, generator=generator, dtype=torch.float64) * (hi - lo))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return {"apply": apply, "angles": angles, "scales": scales, "control": control, "offsets": offsets,
                "bias": bias, "log_gamma": log_gamma, "snr": snr, "seed": seed}

    def _check_inputs(self, hr: Tensor, spacing: Tensor, generator: torch.Generator) -> None:
        if hr.dim() != 5 or hr.shape[1] != 1 or tuple(hr.shape[2:]) != self.region_size:
            raise ValueError(f"hr must be (B, 1, *{list(self.region_size)}), got shape {tuple(hr.shape)}")
        if tuple(spacing.shape) != (hr.shape[0], 3) or not bool((spacing > 0).all()):
            raise ValueError(f"spacing must be (B, 3) positive voxel sizes in mm, got shape {tuple(spacing.shape)}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")

    def _spatial(self, hr: Tensor, p: dict[str, Any], spacing: Tensor) -> Tensor:
        """Affine and elastic deformation, composed, of the samples that draw either."""
        affine, elastic = p["apply"][:, 0], p["apply"][:, 1]
        window = self.window
        out = hr[(slice(None), slice(None), *(slice(a, b) for a, b in window))].clone()
        if not bool((affine | elastic).any()):
            return out
        dev = hr.device
        starts = torch.tensor([a for a, _ in window], dtype=torch.long)
        sizes = tuple(b - a for a, b in window)
        # two groups: the elastic field (a full-size displacement) only where it was drawn
        for group, deform in ((affine & ~elastic, False), (elastic, True)):
            chosen = torch.nonzero(group).flatten()
            if chosen.numel() == 0:
                continue
            sub = chosen.to(dev)
            matrix = _affine_voxel_matrix(p["angles"][chosen].float().to(dev), p["scales"][chosen].float().to(dev),
                                          spacing[sub])
            matrix = torch.where(affine[chosen].to(dev)[:, None, None], matrix, torch.eye(3, device=dev))
            disp = None
            if deform:
                disp = _elastic_displacement(p["control"][chosen].float().to(dev), p["offsets"][chosen] + starts,
                                             sizes, self.box, spacing[sub])
            out[sub] = _warp(hr[sub], matrix, disp, window)
        return out

    def _intensity(self, hr: Tensor, p: dict[str, Any]) -> Tensor:
        """Bias field, gamma and Rician noise, each where its sample drew it."""
        dev = hr.device
        apply = p["apply"]  # on the CPU: deciding what to compute needs no device sync

        x = hr.clone()
        bias, gamma, noise = (torch.nonzero(apply[:, j]).flatten() for j in (2, 3, 4))
        if bias.numel():
            starts = torch.tensor([a for a, _ in self.window], dtype=torch.long)
            sizes = tuple(b - a for a, b in self.window)
            log_field = _bias_log_field(p["bias"][bias].float().to(dev), p["offsets"][bias] + starts, sizes, self.box)
            x[bias.to(dev)] = x[bias.to(dev)] * torch.exp(log_field)[:, None]
        if gamma.numel():
            x[gamma.to(dev)] = _gamma(x[gamma.to(dev)], p["log_gamma"][gamma].float().to(dev))
        if noise.numel():
            x[noise.to(dev)] = _rician(x[noise.to(dev)], p["snr"][noise].float().to(dev), p["seed"])
        return x

    def augment(self, hr: Tensor, spacing: Tensor, generator: torch.Generator) -> Tensor:
        """The augmented HR regions ``(B, 1, *window sizes)`` (see :attr:`window`; no degradation, no crop)."""
        self._check_inputs(hr, spacing, generator)
        params = self._draw(hr.shape[0], generator)
        x = self._spatial(hr.float(), params, spacing.to(device=hr.device, dtype=torch.float32))
        return self._intensity(x, params)

    @property
    def window(self) -> tuple[tuple[int, int], ...]:
        """Per axis, the part of the region :meth:`augment` computes: all of it along a degraded
        axis (the k-space truncation mixes it), only the patch along the others (every step after
        the deformation is per voxel or in-plane there)."""
        return tuple(
            (0, r) if f > 1 else ((r - p) // 2, (r - p) // 2 + p)
            for r, p, f in zip(self.region_size, self.patch_size, self.factors)
        )

    def crop(self, x: Tensor) -> Tensor:
        """The patch: the region's centre ``patch_size`` box of :meth:`augment`'s output
        ``(B, C, *window)`` -> ``(B, C, *patch_size)``."""
        starts = [(r - p) // 2 - a for r, p, (a, _) in zip(self.region_size, self.patch_size, self.window)]
        (a, b, c), (pa, pb, pc) = starts, self.patch_size
        return x[:, :, a : a + pa, b : b + pb, c : c + pc]

    def __call__(self, hr: Tensor, spacing: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``hr`` ``(B, 1, *region_size)``, ``spacing`` ``(B, 3)`` mm -> ``(lr, hr_aug)``, each
        ``(B, 1, *patch_size)``."""
        augmented = self.augment(hr, spacing, generator)
        if self.slices is None:
            lr = degrade_batch(augmented, self.factors, self.interpolation)
        else:  # a thickness per sample, drawn after (so without changing) the augmentation's parameters
            lo, hi = self.slices.thickness[0], self.slices.thickness[-1]
            thickness = (lo + torch.rand(hr.shape[0], generator=generator, dtype=torch.float64) * (hi - lo)).tolist()
            lr = slice_degrade_batch(augmented, thickness, self.slices)
        return self.crop(lr).contiguous(), self.crop(augmented).contiguous()
