"""k-space truncation: how the low-resolution (LR) input is made (paper 3.4).

HR volume ``(X, Y, Z)`` -> FFT over the degraded axes -> keep the central ``M`` of the
``N`` frequencies per axis (``M = floor(N / f)``) -> inverse FFT, magnitude -> an LR grid
of shape ``(M_x, M_y, M_z)`` -> back onto the HR grid ``(X, Y, Z)`` by interpolation.

Alignment (the thing that is easy to get wrong): the inverse FFT of ``M`` kept
frequencies samples the *same* continuous, ``N``-periodic signal as the HR grid, at HR
coordinates ``i * N / M`` (``i * f`` when ``N`` is divisible by ``f``), not at the centres
of ``f``-voxel areas. So HR voxel ``x`` sits at LR coordinate ``x * M / N``, and the signal
wraps around at the far edge (it is periodic). A half-voxel slip costs several dB.

Intensities stay on the HR scale: a constant volume comes back exactly constant.

The two halves are separate functions, because a real scan may arrive at either point:

- :func:`kspace_truncate`: HR -> the native coarse grid (central k-space kept, no
  interpolation back): what a scanner's coarse matrix holds.
- :func:`to_fine_grid`: a coarse-grid volume -> the fine grid, the way :func:`degrade`
  makes the network's input (``nearest``/``linear``/``cubic``: exactly;
  ``zero_filled``: see there). :func:`fine_shape` is the fine grid's size.

:func:`data_consistency` puts the measured (central) band of k-space back into a
network's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.fft
import scipy.ndimage

__all__ = [
    "Interpolation",
    "KSpaceDegradation",
    "data_consistency",
    "degrade",
    "degraded_axes",
    "fine_shape",
    "kspace_truncate",
    "lr_shape",
    "slice_axis",
    "to_fine_grid",
]

Interpolation = Literal["nearest", "linear", "cubic", "zero_filled", "zero_filled_magnitude"]
_INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
# Spline order handed to scipy.ndimage for the grid-resampling methods.
_ORDER: dict[str, int] = {"nearest": 0, "linear": 1, "cubic": 3}


def _check_factors(factors: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    try:
        out = tuple(float(f) for f in factors)
    except TypeError as exc:  # a bare number, None, ...
        raise ValueError(f"factors must be a sequence of {ndim} numbers, got {factors!r}") from exc
    if len(out) != ndim:
        raise ValueError(f"factors must have one entry per axis ({ndim}), got {len(out)}: {factors!r}")
    for f in out:
        if not np.isfinite(f) or f < 1.0:
            raise ValueError(f"every factor must be a finite number >= 1, got {factors!r}")
    return out


def _check_volume(volume: np.ndarray) -> np.ndarray:
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise ValueError(f"volume must be 3D (X, Y, Z), got shape {arr.shape}")
    if np.iscomplexobj(arr):
        raise ValueError("volume must be real-valued (a magnitude image), got a complex array")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"volume must be numeric, got dtype {arr.dtype}")
    if min(arr.shape) < 1:
        raise ValueError(f"volume must not be empty, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("volume contains NaN or inf")
    return arr


def degraded_axes(factors: Sequence[float]) -> tuple[int, ...]:
    """Axes whose factor is > 1, e.g. ``(2, 2, 1) -> (0, 1)``."""
    fs = _check_factors(factors, len(list(factors)))
    return tuple(i for i, f in enumerate(fs) if f > 1.0)


def slice_axis(factors: Sequence[float]) -> int:
    """Axis perpendicular to the most degraded plane: ``(2, 2, 1) -> 2``.

    Slices ``volume.take(k, axis=slice_axis(factors))`` are the cross-sections in which
    metrics are reported. The least degraded axis is chosen (first one on ties).
    """
    fs = _check_factors(factors)
    return int(np.argmin(fs))


def lr_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """Shape of the LR grid: ``M = floor(N / f)`` per axis, ``N`` when ``f == 1``.

    Flooring keeps at most ``1/f`` of k-space, so the resolution is reduced by at least
    ``f``; ``(197, 233, 189)`` with ``(2, 2, 1)`` -> ``(98, 116, 189)``. This is the
    convention that reproduces SPEC's MNI152 baselines (rounding 98.5 up to 99 instead
    shifts PSNR by only ~0.03 dB but SSIM by ~0.005). The LR spacing is then ``N / M``
    HR voxels (2.0102 for 197 -> 98), and the resampling uses exactly that spacing.
    """
    fs = _check_factors(factors, len(shape))
    out = []
    for n, f in zip(shape, fs):
        m = n if f == 1.0 else int(np.floor(n / f + 1e-9))  # 1e-9: 6 / 1.2 must give 5, not 4
        if m < 1:
            raise ValueError(f"factor {f} is too large for an axis of size {n} (keeps no frequency)")
        out.append(m)
    return tuple(out)


def _band(n: int, m: int) -> np.ndarray:
    """Indices (into an ``n``-point FFT) of the ``m`` lowest frequencies, in ``m``-point FFT order."""
    return np.round(scipy.fft.fftfreq(m, d=1.0 / m)).astype(np.int64) % n


def _kspace(volume: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return scipy.fft.fftn(volume.astype(np.float64, copy=False), axes=axes)


def kspace_truncate(volume: np.ndarray, factors: Sequence[float] = (2, 2, 1)) -> np.ndarray:
    """The native coarse (LR) grid: ``(X, Y, Z)`` -> ``lr_shape((X, Y, Z), factors)``, float32 magnitude.

    The central ``M`` of ``N`` frequencies per degraded axis, inverse FFT on ``M`` points,
    magnitude, no interpolation back: what a scanner's coarse matrix holds. LR voxel ``i``
    lies at HR coordinate ``i * N / M`` along each axis (``i * f`` when ``f`` divides ``N``);
    scaled by ``M / N`` per axis so intensities stay on the HR scale.
    """
    return _lr_grid(_check_volume(volume), _check_factors(factors)).astype(np.float32)


def _lr_grid(arr: np.ndarray, fs: tuple[float, ...]) -> np.ndarray:
    axes = tuple(i for i, f in enumerate(fs) if f > 1.0)
    shape_lr = lr_shape(arr.shape, fs)
    if not axes:
        return np.abs(arr.astype(np.float64))
    k = _kspace(arr, axes)
    for ax in axes:
        k = np.take(k, _band(arr.shape[ax], shape_lr[ax]), axis=ax)
    lr = scipy.fft.ifftn(k, axes=axes)
    # numpy's ifft divides by M, the forward FFT summed N points: rescale by M/N.
    scale = float(np.prod([shape_lr[ax] / arr.shape[ax] for ax in axes]))
    return np.abs(lr) * scale


def _interp_matrix(n: int, m: int, order: int) -> np.ndarray:
    """``(n, m)`` matrix taking an ``m``-periodic LR signal to the ``n`` HR points ``x * m / n``."""
    coords = np.arange(n, dtype=np.float64) * (m / n)
    eye = np.eye(m, dtype=np.float64)
    w = np.empty((n, m), dtype=np.float64)
    for j in range(m):
        w[:, j] = scipy.ndimage.map_coordinates(
            eye[j], coords[None], order=order, mode="grid-wrap", prefilter=order > 1
        )
    return w


def _apply_along(w: np.ndarray, arr: np.ndarray, axis: int) -> np.ndarray:
    out = np.tensordot(w, arr, axes=([1], [axis]))  # new axis lands first
    return np.moveaxis(out, 0, axis)


def degrade(
    volume: np.ndarray,
    factors: Sequence[float] = (2, 2, 1),
    interpolation: Interpolation = "linear",
) -> np.ndarray:
    """HR ``(X, Y, Z)`` real array -> LR on the same ``(X, Y, Z)`` grid, float32, HR intensity scale.

    Args:
        volume: real 3D array ``(X, Y, Z)`` (a magnitude image).
        factors: k-space reduction per axis, each ``>= 1``; ``1`` leaves that axis untouched.
        interpolation: how the LR grid goes back onto the HR grid:
            ``"nearest"``/``"linear"``/``"cubic"`` resample the LR magnitude grid (spline
            order 0/1/3, the cubic being the interpolating cubic B-spline, periodic);
            ``"zero_filled"`` zero-pads the truncated k-space to full size and takes the
            magnitude of its inverse FFT (sinc interpolation, no LR grid at all);
            ``"zero_filled_magnitude"`` makes the coarse magnitude image first
            (:func:`kspace_truncate`) and zero-fills *its* spectrum (:func:`to_fine_grid`):
            exactly what ``mdcsrn-infer upsample=`` makes of a scanner's coarse matrix, so a
            model trained on it sees in training what that path gives it.

    Returns:
        float32 array of shape ``(X, Y, Z)``, non-negative (a magnitude).
    """
    arr = _check_volume(volume)
    fs = _check_factors(factors)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    axes = tuple(i for i, f in enumerate(fs) if f > 1.0)
    if not axes:
        return np.abs(arr).astype(np.float32)
    shape_lr = lr_shape(arr.shape, fs)
    if interpolation == "zero_filled_magnitude":
        return to_fine_grid(_lr_grid(arr, fs), fs, interpolation, arr.shape)
    if interpolation == "zero_filled":
        k = _kspace(arr, axes)
        mask = np.zeros(arr.shape, dtype=bool)
        keep = [np.arange(n) if ax not in axes else _band(n, shape_lr[ax]) for ax, n in enumerate(arr.shape)]
        mask[np.ix_(*keep)] = True
        k[~mask] = 0
        # Same N-point transform both ways: the scale is preserved without correction.
        return np.abs(scipy.fft.ifftn(k, axes=axes)).astype(np.float32)

    return _resample(_lr_grid(arr, fs), arr.shape, interpolation)


def _resample(lr: np.ndarray, shape: Sequence[int], interpolation: str) -> np.ndarray:
    """Coarse grid -> fine ``shape`` by spline interpolation (``nearest``/``linear``/``cubic``)."""
    order = _ORDER[interpolation]
    for ax, (n, m) in enumerate(zip(shape, lr.shape)):
        if n != m:  # separable: one (N, M) resampling matrix per degraded axis
            lr = _apply_along(_interp_matrix(n, m, order), lr, ax)
    # A magnitude image is >= 0; only the cubic spline's overshoot at edges dips below.
    return np.maximum(lr, 0.0).astype(np.float32)


def fine_shape(
    coarse_shape: Sequence[int], factors: Sequence[float], shape: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The fine grid a coarse grid of ``coarse_shape`` is brought onto.

    Default rule: ``N = round(M * f)`` per axis (``M`` where ``f == 1``): a scanner's
    ``M``-voxel coarse matrix becomes ``M * f`` voxels of ``1/f`` the size, the grid whose
    :func:`kspace_truncate` gives back ``M``. An HR axis of ``N`` voxels that ``f`` does not
    divide (e.g. 197 at 2 -> 98) maps back to ``98 * 2 = 196``: pass ``shape`` (any ``N``
    with ``lr_shape(N, f) == M``, here 196 or 197) to get it instead.

    Raises:
        ValueError: ``shape`` that does not reduce to ``coarse_shape`` at these factors,
            or a default size that does not (a non-integer factor; then give ``shape``).
    """
    fs = _check_factors(factors, len(coarse_shape))
    coarse = tuple(int(m) for m in coarse_shape)
    if shape is None:
        out = tuple(m if f == 1.0 else int(round(m * f)) for m, f in zip(coarse, fs))
        if lr_shape(out, fs) != coarse:
            raise ValueError(
                f"factors {list(fs)}: the fine size {list(out)} (coarse size x factor) does not reduce to the "
                f"coarse {list(coarse)}; give upsample_shape=[...] explicitly"
            )
        return out
    out = tuple(int(n) for n in shape)
    if len(out) != len(coarse):
        raise ValueError(f"upsample_shape must have {len(coarse)} entries, got {list(shape)}")
    if any(n < 1 for n in out) or lr_shape(out, fs) != coarse:
        raise ValueError(
            f"upsample_shape {list(out)} reduces to {list(lr_shape(out, fs)) if min(out) >= 1 else '?'} at factors "
            f"{list(fs)}, not to the input's coarse grid {list(coarse)}"
        )
    return out


def to_fine_grid(
    coarse: np.ndarray,
    factors: Sequence[float] = (2, 2, 1),
    interpolation: Interpolation = "linear",
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """A coarse-grid volume ``(M_x, M_y, M_z)`` -> the fine grid ``fine_shape(...)``, float32.

    ``nearest``/``linear``/``cubic``: the same resampling :func:`degrade` applies, so
    ``to_fine_grid(kspace_truncate(hr, f), f, i, hr.shape) == degrade(hr, f, i)`` exactly.

    ``zero_filled``: FFT of the coarse magnitude on ``M`` points, zero-padded to ``N``,
    inverse FFT, magnitude. :func:`degrade` zero-fills the *complex* truncated k-space
    instead; a coarse magnitude image has lost the sign of its negative Gibbs lobes (about
    12 % of the MNI152 voxels, mostly background), so the two differ: measured on MNI152
    at 2x2x1, 33.43 dB for this route against 34.53 dB for :func:`degrade`. A scanner's own
    fine-matrix (zero-filled) reconstruction is :func:`degrade`'s; this is the best that
    can be done from a coarse magnitude image.

    Args:
        coarse: real 3D array on the native coarse grid (LR voxel ``i`` at fine index ``i * N / M``).
        factors: the k-space reduction the coarse grid was made with.
        interpolation: how to reach the fine grid (the checkpoint's ``interpolation``).
        shape: the fine grid's size (see :func:`fine_shape`; default ``M * f``).
    """
    arr = _check_volume(coarse)
    fs = _check_factors(factors)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    target = fine_shape(arr.shape, fs, shape)
    axes = tuple(ax for ax, (n, m) in enumerate(zip(target, arr.shape)) if n != m)
    if not axes:
        return np.abs(arr).astype(np.float32)
    if interpolation not in ("zero_filled", "zero_filled_magnitude"):  # both: sinc from the magnitude image
        return _resample(np.abs(arr.astype(np.float64)), target, interpolation)
    k = _kspace(np.abs(arr.astype(np.float64)), axes)
    full = np.zeros(tuple(target[ax] if ax in axes else arr.shape[ax] for ax in range(3)), dtype=np.complex128)
    keep = [np.arange(arr.shape[ax]) if ax not in axes else _band(target[ax], arr.shape[ax]) for ax in range(3)]
    # The inverse of kspace_truncate's M / N intensity scaling.
    full[np.ix_(*keep)] = k * float(np.prod([target[ax] / arr.shape[ax] for ax in axes]))
    return np.abs(scipy.fft.ifftn(full, axes=axes)).astype(np.float32)


@dataclass(frozen=True)
class KSpaceDegradation:
    """Config-friendly callable around :func:`degrade`: ``(X, Y, Z) -> (X, Y, Z)`` float32."""

    factors: tuple[float, ...] = (2.0, 2.0, 1.0)
    interpolation: Interpolation = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", _check_factors(self.factors))
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def slice_axis(self) -> int:
        return slice_axis(self.factors)

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        return degrade(volume, self.factors, self.interpolation)


def _measured_index(n: int, m: int) -> np.ndarray:
    """Indices (into an ``n``-point FFT) of the frequencies ``|k| < m / 2``.

    The measured band without the lone Nyquist column of an even ``m`` (its conjugate
    partner ``+m/2`` was never measured): a band symmetric about 0 keeps a real image real.
    """
    h = (m - 1) // 2
    return np.arange(-h, h + 1) % n


def _coarse_from_fine(fine: np.ndarray, coarse_shape: Sequence[int], interpolation: str) -> np.ndarray:
    """Undo :func:`_resample`: the coarse samples a spline-interpolated fine-grid LR was made from.

    Each axis' ``(N, M)`` interpolation matrix has full column rank, so least squares gives
    the coarse grid back exactly (when ``f`` divides ``N`` it is every ``f``-th voxel).
    """
    out = fine.astype(np.float64)
    for ax, (n, m) in enumerate(zip(fine.shape, coarse_shape)):
        if n != m:
            out = _apply_along(np.linalg.pinv(_interp_matrix(n, m, _ORDER[interpolation])), out, ax)
    return out


def data_consistency(
    output: np.ndarray,
    measured: np.ndarray,
    factors: Sequence[float] = (2, 2, 1),
    interpolation: Interpolation = "zero_filled",
) -> np.ndarray:
    """Replace the output's measured (central) band of k-space by the measurement's, float32.

    The network then only adds what the acquisition did not measure. The band is the
    central ``M`` frequencies of each degraded axis (``M = lr_shape(N, f)``, as in
    :func:`kspace_truncate`), less the unpaired Nyquist column of an even ``M``; undegraded
    axes are kept whole. The result is real: both parts are Hermitian-symmetric. It is not
    clipped at 0 (a band-limited edge may dip a little below), so its band stays exact.

    Which input defines the band:

    - ``measured`` on the native coarse grid (shape ``lr_shape(output.shape, factors)``;
      ``mdcsrn-infer upsample=...``): its own ``M``-point spectrum (times ``N / M`` per
      axis, undoing :func:`kspace_truncate`'s scaling). This is the measured data itself.
    - ``measured`` on the fine grid (``output.shape``), made with ``interpolation``:
      ``zero_filled``/``zero_filled_magnitude``: its own ``N``-point spectrum in the band
      (zero-filling keeps the band); ``nearest``/``linear``/``cubic``: interpolation attenuates the band, so the
      coarse samples are recovered first (the interpolation inverted by least squares)
      and their spectrum is used, as for a coarse input.

    Args:
        output: ``(X, Y, Z)`` network output on the fine grid.
        measured: the network's LR input (fine grid) or the acquired coarse grid.
        factors: the k-space reduction (which band was measured).
        interpolation: how a fine-grid ``measured`` was made; ignored for a coarse one.
    """
    out = _check_volume(output).astype(np.float64)
    meas = _check_volume(measured).astype(np.float64)
    fs = _check_factors(factors)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    coarse_shape = lr_shape(out.shape, fs)
    axes = tuple(ax for ax in range(3) if coarse_shape[ax] != out.shape[ax])
    if meas.shape not in (out.shape, coarse_shape):
        raise ValueError(
            f"measured volume shape {meas.shape} is neither the output's grid {out.shape} nor its coarse grid "
            f"{coarse_shape} at factors {list(fs)}"
        )
    if not axes:
        return out.astype(np.float32)
    if meas.shape == out.shape and interpolation in ("zero_filled", "zero_filled_magnitude"):
        source, src_shape, gain = meas, out.shape, 1.0
    else:
        if meas.shape == out.shape:
            meas = _coarse_from_fine(meas, coarse_shape, interpolation)
        source, src_shape = meas, coarse_shape
        gain = float(np.prod([out.shape[ax] / coarse_shape[ax] for ax in axes]))
    band_src = [_measured_index(src_shape[ax], coarse_shape[ax]) if ax in axes else np.arange(out.shape[ax]) for ax in range(3)]
    band_out = [_measured_index(out.shape[ax], coarse_shape[ax]) if ax in axes else np.arange(out.shape[ax]) for ax in range(3)]
    k_out = _kspace(out, axes)
    k_out[np.ix_(*band_out)] = _kspace(source, axes)[np.ix_(*band_src)] * gain
    return scipy.fft.ifftn(k_out, axes=axes).real.astype(np.float32)
