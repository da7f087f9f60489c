from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mdcsrn_lightning.data.degradation import (
    KSpaceDegradation,
    degrade,
    degraded_axes,
    kspace_truncate,
    lr_shape,
    slice_axis,
)

METHODS = ("nearest", "linear", "cubic", "zero_filled")


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")


def _bump(shape: tuple[int, int, int], centre: tuple[float, float, float], sigma: float) -> np.ndarray:
    x, y, z = _grid(shape)
    c = centre
    return np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2))


def _com(v: np.ndarray, axis: int) -> float:
    other = tuple(a for a in range(3) if a != axis)
    w = v.sum(axis=other)
    return float((w * np.arange(v.shape[axis])).sum() / w.sum())


# --- shapes and helpers ---------------------------------------------------------------


def test_lr_shape_floor_and_untouched_axes() -> None:
    assert lr_shape((197, 233, 189), (2, 2, 1)) == (98, 116, 189)
    assert lr_shape((64, 64, 64), (2, 2, 1)) == (32, 32, 64)
    assert lr_shape((6, 7, 8), (1.2, 3, 8)) == (5, 2, 1)


def test_axes_helpers() -> None:
    assert degraded_axes((2, 2, 1)) == (0, 1)
    assert degraded_axes([1, 1, 3]) == (2,)
    assert slice_axis((2, 2, 1)) == 2
    assert slice_axis((1, 2, 2)) == 0
    assert slice_axis((2, 1, 2)) == 1


def test_kspace_truncate_shape_and_scale() -> None:
    v = np.full((17, 20, 5), 7.0)
    lr = kspace_truncate(v, (2, 2, 1))
    assert lr.shape == (8, 10, 5) and lr.dtype == np.float32
    np.testing.assert_allclose(lr, 7.0, rtol=1e-6)


# --- behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("shape", "factors"), [((16, 20, 6), (2, 2, 1)), ((17, 23, 9), (2, 3, 1.5))])
def test_constant_volume_stays_constant(method: str, shape: tuple[int, int, int], factors: tuple) -> None:
    out = degrade(np.full(shape, 3.25), factors, method)  # type: ignore[arg-type]
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.25, rtol=1e-6)


@pytest.mark.parametrize("shape", [(16, 20, 6), (17, 21, 7)])
def test_band_limited_volume_survives_zero_filling(shape: tuple[int, int, int]) -> None:
    # M = (8, 10, z) or (8, 10, z): cosines with |k| <= 3 (x) and <= 4 (y) lie in the kept band.
    x, y, z = _grid(shape)
    nx, ny, nz = shape
    v = (
        3.0
        + np.cos(2 * np.pi * 3 * x / nx + 0.3)
        + 0.5 * np.cos(2 * np.pi * (2 * x / nx + 4 * y / ny))
        + 0.4 * np.sin(2 * np.pi * (y / ny + 3 * z / nz))  # z is not truncated: any frequency
    )
    out = degrade(v, (2, 2, 1), "zero_filled")
    np.testing.assert_allclose(out, v, atol=1e-5)


def test_out_of_band_frequency_is_removed() -> None:
    x, _, _ = _grid((16, 4, 4))
    v = 2.0 + np.cos(2 * np.pi * 6 * x / 16)  # |k| = 6 > 4 = M/2: outside the kept band
    np.testing.assert_allclose(degrade(v, (2, 1, 1), "zero_filled"), 2.0, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "cubic", "nearest"])
@pytest.mark.parametrize("n", [40, 41])
def test_lr_samples_sit_on_hr_grid(method: str, n: int) -> None:
    # LR voxel i lies at HR coordinate i * N / M: where that is an integer the resampled
    # value must be the LR sample itself (no area-centre half-voxel offset).
    rng = np.random.default_rng(0)
    v = rng.random((n, 6, 3)) + 1.0
    lr = kspace_truncate(v, (2, 1, 1)).astype(np.float64)
    out = degrade(v, (2, 1, 1), method)  # type: ignore[arg-type]
    m = lr.shape[0]
    hits = [(i, i * n // m) for i in range(m) if (i * n) % m == 0]
    assert hits  # 40: every even voxel; 41 (M = 20): voxel 0
    for i, x in hits:
        np.testing.assert_allclose(out[x], lr[i], rtol=1e-5)


@pytest.mark.parametrize("method", ["linear", "cubic", "zero_filled"])
@pytest.mark.parametrize("n", [48, 49])
def test_no_half_voxel_shift(method: str, n: int) -> None:
    shape = (n, n, 4)
    v = _bump(shape, (27.3, 19.6, 1.5), sigma=3.0) + 0.01
    out = degrade(v, (2, 2, 1), method).astype(np.float64)  # type: ignore[arg-type]
    for axis in (0, 1):
        # A half-voxel slip would move the centre of mass by ~0.5.
        assert abs(_com(out - 0.01, axis) - _com(v - 0.01, axis)) < 0.05
    # ... and the best match is at shift 0, not at +-0.5 voxel (shift by Fourier phase).
    errs = {}
    for s in (-0.5, 0.0, 0.5):
        k = np.fft.fftfreq(n)[:, None, None]
        shifted = np.real(np.fft.ifft(np.fft.fft(v, axis=0) * np.exp(-2j * np.pi * k * s), axis=0))
        errs[s] = float(np.square(out - shifted).sum())
    assert min(errs, key=errs.get) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_factor_one_leaves_axis_untouched(method: str) -> None:
    rng = np.random.default_rng(1)
    v = rng.random((12, 9, 7)) + 0.5
    out = degrade(v, (2, 1, 1), method)  # type: ignore[arg-type]
    # No mixing along y or z: each (x, ., .) line degrades on its own.
    for j in (0, 4):
        for k in (0, 6):
            alone = degrade(v[:, j : j + 1, k : k + 1], (2, 1, 1), method)  # type: ignore[arg-type]
            np.testing.assert_allclose(out[:, j, k], alone[:, 0, 0], rtol=1e-5, atol=1e-6)
    # A volume that only varies along the untouched axis comes back as it was.
    zonly = np.broadcast_to(rng.random(7) + 0.5, (12, 9, 7)).copy()
    np.testing.assert_allclose(degrade(zonly, (2, 2, 1), method), zonly, rtol=1e-5)  # type: ignore[arg-type]


def test_all_factors_one_is_identity_on_magnitude_images() -> None:
    v = np.random.default_rng(2).random((5, 6, 7))
    np.testing.assert_allclose(degrade(v, (1, 1, 1), "linear"), v, rtol=1e-6)


def test_output_is_nonnegative_and_degrades() -> None:
    v = np.random.default_rng(3).random((16, 16, 4))
    for method in METHODS:
        out = degrade(v, (2, 2, 1), method)  # type: ignore[arg-type]
        assert out.min() >= 0.0
        assert not np.allclose(out, v, atol=1e-2)


def test_dataclass_wraps_degrade() -> None:
    v = np.random.default_rng(4).random((10, 10, 3))
    d = KSpaceDegradation(factors=[2, 2, 1], interpolation="cubic")  # type: ignore[arg-type]
    assert d.factors == (2.0, 2.0, 1.0) and d.slice_axis == 2
    np.testing.assert_array_equal(d(v), degrade(v, (2, 2, 1), "cubic"))


@pytest.mark.parametrize(
    ("volume", "factors", "interp", "match"),
    [
        (np.ones((4, 4)), (2, 2, 1), "linear", "3D"),
        (np.ones((4, 4, 4, 1)), (2, 2, 1), "linear", "3D"),
        (np.full((4, 4, 4), np.nan), (2, 2, 1), "linear", "NaN"),
        (np.ones((4, 4, 4), dtype=complex), (2, 2, 1), "linear", "real"),
        (np.ones((4, 4, 4)), (2, 2), "linear", "one entry per axis"),
        (np.ones((4, 4, 4)), (2, 0.5, 1), "linear", ">= 1"),
        (np.ones((4, 4, 4)), (2, np.inf, 1), "linear", ">= 1"),
        (np.ones((4, 4, 4)), 2, "linear", "sequence"),
        (np.ones((4, 4, 4)), (5, 1, 1), "linear", "too large"),
        (np.ones((4, 4, 4)), (2, 2, 1), "sinc", "interpolation"),
    ],
)
def test_bad_inputs_raise(volume: np.ndarray, factors: object, interp: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        degrade(volume, factors, interp)  # type: ignore[arg-type]


def test_dataclass_validates() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        KSpaceDegradation(interpolation="bicubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        KSpaceDegradation(factors=(0.5, 1, 1))


# --- the SPEC's measured baselines on real data ----------------------------------------

# SPEC "Degradation": MNI152 2009a T1, 2x2x1, slice-wise metrics (PSNR dB, SSIM).
SPEC_BASELINES = {
    "nearest": (28.78, 0.893),
    "linear": (31.56, 0.908),
    "cubic": (33.12, 0.917),
    "zero_filled": (34.53, 0.919),
}


def test_reproduces_spec_baselines_on_mni152() -> None:
    import nibabel as nib  # both are dependencies of the package: no skip
    import nilearn

    from mdcsrn_lightning.evaluation.metrics import slice_metrics

    path = os.path.join(
        os.path.dirname(nilearn.__file__), "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    assert os.path.exists(path), f"MNI152 template not found at {path} (nilearn's wheel ships it)"
    hr = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    assert hr.shape == (197, 233, 189)

    t0 = time.perf_counter()
    measured = {}
    for method, (psnr_ref, ssim_ref) in SPEC_BASELINES.items():
        lr = degrade(hr, (2, 2, 1), method)  # type: ignore[arg-type]
        m = slice_metrics(lr, hr, axis=slice_axis((2, 2, 1)))
        measured[method] = (m["psnr"], m["ssim"])
        assert abs(m["psnr"] - psnr_ref) < 0.3, (method, m)
        assert abs(m["ssim"] - ssim_ref) < 0.01, (method, m)
    # The ranking the SPEC reports: nearest < linear < cubic < zero-filled.
    psnrs = [measured[k][0] for k in SPEC_BASELINES]
    assert psnrs == sorted(psnrs)
    print(f"\nMNI152 baselines {measured} in {time.perf_counter() - t0:.1f} s")
