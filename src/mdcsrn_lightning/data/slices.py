"""Thick-slice degradation: what a 2D multi-slice scan with thick slices holds (issue 21).

Along one ``axis`` of an HR volume ``(X, Y, Z)`` (the fine grid, ``N`` voxels on that axis),
slices of ``thickness`` ``t`` fine voxels are acquired every ``spacing`` ``s`` fine voxels
(``s`` an integer >= 1, ``t >= 1``; ``t < s`` leaves gaps, ``t > s`` overlaps). Slice ``k``
covers fine voxels ``k*s .. k*s + s - 1``: its centre is at fine coordinate
``c_k = k*s + (s - 1) / 2`` and it is one sample of the HR weighted by the slice profile
around ``c_k``:

- ``boxcar``: the continuous box ``[c_k - t/2, c_k + t/2]``; a fine voxel ``j`` (the interval
  ``[j - 1/2, j + 1/2]``) weighs its overlap with the box, divided by ``t``;
- ``gaussian``: a Gaussian of FWHM ``t`` integrated over each fine voxel (``erf``), cut at
  4 sigma and normalised to sum 1.

A profile reaching past the volume's ends reads the edge voxel (edge replication), so the
weights always sum to 1 and a constant volume stays constant. There are
``n = floor(N / s)`` slices (:func:`slice_count`); fine voxels past ``n * s`` belong to no slice.

:func:`thick_slices` gives the coarse (thick-slice) volume, ``n`` samples along ``axis``;
:func:`slices_to_fine` brings it back to ``N`` fine voxels by interpolating between the slice
centres (fine voxel ``x`` sits at slice coordinate ``(x - (s - 1) / 2) / s``; beyond the
first and last centres the spline holds the edge value); :func:`slice_degrade` is both, the
network input of a thick-slice training pair.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import scipy.ndimage
import scipy.special

__all__ = [
    "Profile",
    "SliceDegradation",
    "SliceInterpolation",
    "profile_weights",
    "slice_consistency",
    "slice_count",
    "slice_degrade",
    "slice_matrix",
    "slices_to_fine",
    "thick_slices",
]

Profile = Literal["boxcar", "gaussian"]
SliceInterpolation = Literal["nearest", "linear", "cubic"]
PROFILES: tuple[str, ...] = get_args(Profile)
SLICE_INTERPOLATIONS: tuple[str, ...] = get_args(SliceInterpolation)
_ORDER = {"nearest": 0, "linear": 1, "cubic": 3}
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def check_slice_params(thickness: float, spacing: int, profile: str) -> tuple[float, int]:
    """``(thickness, spacing)`` checked: a finite thickness >= 1, an integer spacing >= 1, a known profile."""
    if isinstance(thickness, bool) or not isinstance(thickness, (int, float, np.number)) or not (
        math.isfinite(float(thickness)) and float(thickness) >= 1.0
    ):
        raise ValueError(f"thickness must be a number >= 1 (fine voxels), got {thickness!r}")
    if isinstance(spacing, bool) or not float(spacing).is_integer() or int(spacing) < 1:
        raise ValueError(f"spacing must be an integer >= 1 (fine voxels), got {spacing!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return float(thickness), int(spacing)


def _check_axis(volume: np.ndarray, axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= int(axis) < 3:
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    if volume.ndim != 3 or np.iscomplexobj(volume) or min(volume.shape) < 1:
        raise ValueError(f"volume must be a real, non-empty 3D array (X, Y, Z), got shape {volume.shape}")
    return int(axis)


def slice_count(n: int, spacing: int) -> int:
    """Slices of ``spacing`` fine voxels that fit in ``n`` fine voxels: ``floor(n / spacing)`` (>= 1)."""
    count = int(n) // int(spacing)
    if count < 1:
        raise ValueError(f"spacing {spacing} is larger than the axis ({n} voxels): no whole slice fits")
    return count


def profile_weights(centre: float, thickness: float, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """``(fine voxel indices, weights)`` of one slice centred at fine coordinate ``centre``; weights sum to 1."""
    if profile == "boxcar":
        lo, hi = centre - thickness / 2.0, centre + thickness / 2.0
        idx = np.arange(math.floor(lo + 0.5), math.ceil(hi - 0.5) + 1)
        w = np.clip(np.minimum(idx + 0.5, hi) - np.maximum(idx - 0.5, lo), 0.0, None)
    else:
        sigma = thickness * _FWHM_TO_SIGMA
        idx = np.arange(math.floor(centre - 4 * sigma - 0.5), math.ceil(centre + 4 * sigma + 0.5) + 1)
        edges = (np.append(idx - 0.5, idx[-1] + 0.5) - centre) / (sigma * math.sqrt(2.0))
        w = np.diff(scipy.special.erf(edges)) / 2.0
    keep = w > 0
    return idx[keep], w[keep] / w[keep].sum()


def slice_matrix(n: int, thickness: float, spacing: int, profile: Profile = "boxcar") -> np.ndarray:
    """``(slice_count(n, spacing), n)`` matrix: row ``k`` is slice ``k``'s profile on the fine
    voxels (edge voxels take the weight of the profile beyond the ends); each row sums to 1."""
    t, s = check_slice_params(thickness, spacing, profile)
    count = slice_count(n, s)
    out = np.zeros((count, n), dtype=np.float64)
    for k in range(count):
        idx, w = profile_weights(k * s + (s - 1) / 2.0, t, profile)  # type: ignore[arg-type]
        np.add.at(out[k], np.clip(idx, 0, n - 1), w)
    return out


def _along(matrix: np.ndarray, arr: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(matrix, arr, axes=([1], [axis])), 0, axis)


def thick_slices(volume: np.ndarray, thickness: float, spacing: int, axis: int = 2,
                 profile: Profile = "boxcar") -> np.ndarray:
    """HR ``(X, Y, Z)`` -> the thick-slice volume, ``slice_count(N, spacing)`` samples along
    ``axis`` (the other axes unchanged), float32, one sample per slice at its centre."""
    arr = np.asarray(volume)
    ax = _check_axis(arr, axis)
    if not np.isfinite(arr).all():
        raise ValueError("volume contains NaN or inf")
    matrix = slice_matrix(arr.shape[ax], thickness, spacing, profile)
    return _along(matrix, arr.astype(np.float64), ax).astype(np.float32)


def fine_matrix(count: int, spacing: int, n: int | None = None,
                interpolation: SliceInterpolation = "cubic") -> np.ndarray:
    """``(n, count)`` matrix taking ``count`` slice samples to ``n`` fine voxels (default ``count * spacing``)."""
    if interpolation not in SLICE_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {SLICE_INTERPOLATIONS} for thick slices, got {interpolation!r}")
    s = int(spacing)
    n = count * s if n is None else int(n)
    if n < count * s:
        raise ValueError(f"a fine axis of {n} voxels is shorter than {count} slices x spacing {s}")
    coords = (np.arange(n, dtype=np.float64) - (s - 1) / 2.0) / s
    order = _ORDER[interpolation]
    eye = np.eye(count, dtype=np.float64)
    out = np.empty((n, count), dtype=np.float64)
    for j in range(count):
        out[:, j] = scipy.ndimage.map_coordinates(eye[j], coords[None], order=order, mode="nearest",
                                                  prefilter=order > 1)
    return out


def slices_to_fine(coarse: np.ndarray, spacing: int, axis: int = 2, interpolation: SliceInterpolation = "cubic",
                   n: int | None = None) -> np.ndarray:
    """Thick-slice volume -> the fine grid along ``axis``: ``n`` voxels (default ``count * spacing``), float32.

    Fine voxel ``x`` is read at slice coordinate ``(x - (spacing - 1) / 2) / spacing``
    (``nearest``/``linear``/``cubic``: spline order 0/1/3, the cubic the interpolating cubic
    B-spline, edge values held beyond the outer slice centres).
    """
    arr = np.asarray(coarse)
    ax = _check_axis(arr, axis)
    if isinstance(spacing, bool) or not float(spacing).is_integer() or int(spacing) < 1:
        raise ValueError(f"spacing must be an integer >= 1 (fine voxels), got {spacing!r}")
    matrix = fine_matrix(arr.shape[ax], int(spacing), n, interpolation)
    return _along(matrix, arr.astype(np.float64), ax).astype(np.float32)


def slice_degrade(volume: np.ndarray, thickness: float, spacing: int, axis: int = 2, profile: Profile = "boxcar",
                  interpolation: SliceInterpolation = "cubic") -> np.ndarray:
    """HR ``(X, Y, Z)`` -> its thick-slice LR on the same grid ``(X, Y, Z)``, float32 (the network input)."""
    arr = np.asarray(volume)
    coarse = thick_slices(arr, thickness, spacing, axis, profile)
    return slices_to_fine(coarse, spacing, axis, interpolation, arr.shape[_check_axis(arr, axis)])


def slice_consistency(fine: np.ndarray, coarse: np.ndarray, spacing: int, axis: int = 2,
                      profile: Profile = "boxcar", thickness: float | None = None) -> np.ndarray:
    """``fine`` changed the least (sum of squares) for its thick slices to equal the measured
    ``coarse`` ones: ``fine + pinv(M) (coarse - M fine)`` along ``axis``, ``M`` the
    :func:`slice_matrix` of ``thickness`` (default ``spacing``: contiguous slices) and ``profile``;
    float32, ``fine``'s shape. For contiguous boxcar slices each slice's residual is added to
    its ``spacing`` fine voxels. ``ValueError``: ``coarse`` is not those slices' shape."""
    arr = np.asarray(fine, dtype=np.float64)
    ax = _check_axis(arr, axis)
    matrix = slice_matrix(arr.shape[ax], spacing if thickness is None else thickness, spacing, profile)
    measured = np.asarray(coarse, dtype=np.float64)
    expected = tuple(matrix.shape[0] if i == ax else n for i, n in enumerate(arr.shape))
    if measured.shape != expected:
        raise ValueError(f"measured slices of shape {measured.shape} do not match the {matrix.shape[0]} slices of "
                         f"spacing {spacing} along axis {ax} of a fine grid {arr.shape} (expected {expected})")
    residual = measured - _along(matrix, arr, ax)
    return (arr + _along(np.linalg.pinv(matrix), residual, ax)).astype(np.float32)


def fine_positions(count: int, spacing: int) -> np.ndarray:
    """Fine-voxel coordinates of the ``count`` slice centres: ``k * s + (s - 1) / 2``."""
    return np.arange(count) * float(spacing) + (spacing - 1) / 2.0


def as_sequence(value: float | Sequence[float]) -> tuple[float, ...]:
    """A number or a ``[lo, hi]`` range (any sequence: a list, an OmegaConf ``ListConfig``) as a tuple."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return (float(value),)
    try:
        return tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"slices.thickness must be a number or a range [lo, hi], got {value!r}") from None


@dataclass(frozen=True)
class SliceDegradation:
    """The training data's thick-slice degradation (``data.degradation=slices``), config-friendly.

    ``thickness``: fine voxels, a number or a ``[lo, hi]`` range drawn uniformly per subject
    (the draw is seeded by ``seed`` and the subject's name: the same subject always gets the
    same slices, so its cache entry stays valid); ``spacing``: fine voxels, ``None`` = the
    drawn thickness rounded (contiguous slices); ``axis``: the thick axis; ``interpolation``:
    slices -> fine grid.
    """

    thickness: tuple[float, ...] = (4.0,)
    spacing: int | None = None
    profile: Profile = "boxcar"
    axis: int = 2
    interpolation: SliceInterpolation = "cubic"
    seed: int = 0

    def __post_init__(self) -> None:
        thick = as_sequence(self.thickness)  # type: ignore[arg-type]
        if len(thick) not in (1, 2) or (len(thick) == 2 and thick[0] > thick[1]):
            raise ValueError(f"slices.thickness must be a number or a range [lo, hi], got {list(thick)}")
        for t in thick:
            check_slice_params(t, self.spacing or 1, self.profile)
        if self.axis not in (0, 1, 2) or isinstance(self.axis, bool):
            raise ValueError(f"slices.axis must be 0, 1 or 2, got {self.axis!r}")
        if self.interpolation not in SLICE_INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {SLICE_INTERPOLATIONS} with degradation=slices, "
                             f"got {self.interpolation!r}")
        object.__setattr__(self, "thickness", thick)
        object.__setattr__(self, "spacing", None if self.spacing is None else int(self.spacing))

    def draw(self, name: str) -> tuple[float, int]:
        """``(thickness, spacing)`` of subject ``name``."""
        if len(self.thickness) == 1:
            t = self.thickness[0]
        else:
            digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
            u = int.from_bytes(digest[:8], "little") / 2.0**64
            t = self.thickness[0] + u * (self.thickness[1] - self.thickness[0])
        return t, self.spacing_for(t)

    def spacing_for(self, thickness: float) -> int:
        """The slice spacing for slices ``thickness`` thick: ``spacing``, or the thickness rounded (contiguous)."""
        return self.spacing if self.spacing is not None else max(1, round(float(thickness)))

    def __call__(self, volume: np.ndarray, name: str) -> np.ndarray:
        t, s = self.draw(name)
        return slice_degrade(volume, t, s, self.axis, self.profile, self.interpolation)

    def factors(self) -> tuple[float, float, float]:
        """Nominal per-axis factors: 1 in-plane, the mid-range spacing along ``axis`` (augmentation, metrics)."""
        mid = sum(self.thickness) / len(self.thickness)
        s = self.spacing if self.spacing is not None else max(1, round(mid))
        return tuple(float(s) if ax == self.axis else 1.0 for ax in range(3))  # type: ignore[return-value]

    def record(self) -> dict[str, Any]:
        """Plain data for cache keys and checkpoints."""
        return {"thickness": list(self.thickness), "spacing": self.spacing, "profile": self.profile,
                "axis": self.axis, "interpolation": self.interpolation, "seed": self.seed}
