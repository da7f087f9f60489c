"""Native low-resolution input (`mdcsrn-infer upsample=`) and k-space data consistency."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.data import degradation as d
from mdcsrn_lightning.evaluation.evaluate import CheckpointMethod, Reference, evaluate
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from tests.test_eval import phantom_hr
from tests.test_inference import Times, run_cli, write_tiny_checkpoint

# A rotated, shifted HR grid (1.1 x 0.9 x 2 mm): a wrong origin or axis order shows.
_ROT = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, -0.6], [0.6, 0.0, 0.8]])
HR_AFFINE = np.eye(4)
HR_AFFINE[:3, :3] = _ROT @ np.diag([1.1, 0.9, 2.0])
HR_AFFINE[:3, 3] = [31.5, -40.25, 12.0]


def _hr(shape: tuple[int, int, int]) -> np.ndarray:
    return phantom_hr(shape, seed=3) / 800.0  # ~[0, 1]: 1e-4 is a tolerance on the unit scale


def _save(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 2) -> Path:
    img = nib.Nifti1Image(data.astype(np.float32), None)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def _coarse_affine(hr_affine: np.ndarray, hr_shape, coarse_shape) -> np.ndarray:
    """LR voxel i sits at HR coordinate i * N / M (the degradation's sampling convention)."""
    return hr_affine @ np.diag([n / m for n, m in zip(hr_shape, coarse_shape)] + [1.0])


def _ckpt(tmp_path: Path, interpolation: str = "linear", factors=(2, 2, 1)) -> Path:
    return write_tiny_checkpoint(
        tmp_path / f"{interpolation}.ckpt",
        datamodule_hyper_parameters={"factors": list(factors), "interpolation": interpolation, "input_scale": "lr_p99.9"},
    )


def _infer(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, infer_cli, *args, "progress=false")


# ------------------------------------------------------------------ degradation split
@pytest.mark.parametrize("interpolation", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("shape", [(26, 22, 7), (23, 27, 8), (17, 9, 5)])
def test_coarse_grid_to_fine_grid_is_the_training_degradation(interpolation: str, shape) -> None:
    hr = _hr(shape)
    coarse = d.kspace_truncate(hr, (2, 2, 1))
    assert coarse.shape == d.lr_shape(shape, (2, 2, 1))
    fine = d.to_fine_grid(coarse, (2, 2, 1), interpolation, shape=shape)
    np.testing.assert_allclose(fine, d.degrade(hr, (2, 2, 1), interpolation), atol=1e-5)


def test_fine_shape_rule_and_its_errors() -> None:
    assert d.fine_shape((13, 11, 7), (2, 2, 1)) == (26, 22, 7)
    assert d.fine_shape((11, 13, 8), (2, 2, 1)) == (22, 26, 8)  # default M * f
    assert d.fine_shape((11, 13, 8), (2, 2, 1), (23, 27, 8)) == (23, 27, 8)  # floor(23 / 2) = 11
    with pytest.raises(ValueError, match=r"upsample_shape \[24, 26, 8\] reduces to \[12, 13, 8\].*not to the input's coarse grid \[11, 13, 8\]"):
        d.fine_shape((11, 13, 8), (2, 2, 1), (24, 26, 8))
    with pytest.raises(ValueError, match="does not reduce to the coarse"):
        d.fine_shape((2, 5, 5), (1.2, 1, 1))  # round(2.4) = 2, and floor(2 / 1.2) = 1, not 2
    assert d.fine_shape((5, 5, 5), (1.5, 1, 1)) == (8, 5, 5)


# ------------------------------------------------------------------ mdcsrn-infer upsample=
@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
@pytest.mark.parametrize(
    "shape,upsample_shape",
    [((26, 22, 7), None), ((23, 27, 8), "[23,27,8]")],  # odd sizes; 2 does not divide 23 or 27
)
def test_native_lr_input_matches_degrade_on_the_hr(tmp_path: Path, monkeypatch, capsys, interpolation, shape, upsample_shape) -> None:
    hr = _hr(shape)
    hr_file = _save(tmp_path / "hr.nii.gz", hr, HR_AFFINE)
    coarse = d.kspace_truncate(hr, (2, 2, 1))
    coarse_file = _save(tmp_path / "coarse.nii.gz", coarse, _coarse_affine(HR_AFFINE, shape, coarse.shape))
    ckpt = _ckpt(tmp_path, interpolation)
    extra = [f"upsample_shape={upsample_shape}"] if upsample_shape else []
    code, out, err = _infer(monkeypatch, capsys, f"input={coarse_file}", f"output={tmp_path / 'up.nii.gz'}", f"ckpt={ckpt}", "upsample=[2,2,1]", *extra)
    assert code == 0, err
    code, _, err = _infer(monkeypatch, capsys, f"input={hr_file}", f"output={tmp_path / 'deg.nii.gz'}", f"ckpt={ckpt}", "degrade=true")
    assert code == 0, err
    up, deg = nib.load(str(tmp_path / "up.nii.gz")), nib.load(str(tmp_path / "deg.nii.gz"))
    assert up.shape == shape
    np.testing.assert_allclose(up.get_fdata(), deg.get_fdata(), atol=1e-4)
    np.testing.assert_allclose(up.affine, HR_AFFINE, atol=1e-4)
    np.testing.assert_allclose(up.header.get_qform(), HR_AFFINE, atol=1e-4)
    np.testing.assert_allclose(up.header.get_sform(), HR_AFFINE, atol=1e-4)
    assert (int(up.header["qform_code"]), int(up.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(up.header.get_zooms(), (1.1, 0.9, 2.0), atol=1e-5)


def test_default_fine_grid_when_the_factor_does_not_divide_the_size(tmp_path: Path, monkeypatch, capsys) -> None:
    """23 x 27 at 2 -> 11 x 13 coarse -> 22 x 26 fine: voxels exactly half the coarse ones, same origin."""
    coarse = d.kspace_truncate(_hr((23, 27, 8)), (2, 2, 1))
    coarse_affine = HR_AFFINE @ np.diag([2.0, 2.0, 1.0, 1.0])
    coarse_file = _save(tmp_path / "coarse.nii.gz", coarse, coarse_affine, qcode=2, scode=0)
    code, out, err = _infer(monkeypatch, capsys, f"input={coarse_file}", f"output={tmp_path / 'up.nii.gz'}", f"ckpt={_ckpt(tmp_path)}", "upsample=auto")
    assert code == 0, err
    up = nib.load(str(tmp_path / "up.nii.gz"))
    assert up.shape == (22, 26, 8)
    np.testing.assert_allclose(up.affine, HR_AFFINE, atol=1e-4)
    assert (int(up.header["qform_code"]), int(up.header["sform_code"])) == (2, 0)
    # coarse voxel i and fine voxel 2i are the same point in the world
    i = np.array([5, 7, 3, 1.0])
    np.testing.assert_allclose(coarse_affine @ i, up.affine @ (i * [2, 2, 1, 1]), atol=1e-6)
    expected = d.to_fine_grid(coarse, (2, 2, 1), "linear")
    assert json.loads(out.strip().splitlines()[-1])["outputs"] == [str(tmp_path / "up.nii.gz")]
    assert up.get_fdata().shape == expected.shape


def test_upsample_refusals_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    coarse_file = _save(tmp_path / "coarse.nii.gz", d.kspace_truncate(_hr((26, 22, 7)), (2, 2, 1)), np.eye(4))
    out = tmp_path / "up.nii.gz"
    base = [f"input={coarse_file}", f"output={out}"]
    cases = {
        "mismatch": ([f"ckpt={_ckpt(tmp_path)}", "upsample=[3,3,1]"], r"trained with factors \[2.0, 2.0, 1.0\], not upsample=\[3.0, 3.0, 1.0\]"),
        "no factors": ([f"ckpt={write_tiny_checkpoint(tmp_path / 'plain.ckpt')}", "upsample=auto"], "records no training factors"),
        "degrade too": ([f"ckpt={_ckpt(tmp_path)}", "upsample=auto", "degrade=true"], "degrade=true and upsample exclude each other"),
        "bad shape": ([f"ckpt={_ckpt(tmp_path)}", "upsample=auto", "upsample_shape=[28,22,7]"], r"coarse.nii.gz: upsample_shape \[28, 22, 7\]"),
        "bad value": ([f"ckpt={_ckpt(tmp_path)}", "upsample=twice"], "upsample: expected"),
    }
    for name, (args, message) in cases.items():
        code, _, err = _infer(monkeypatch, capsys, *base, *args)
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1 and "mdcsrn-infer: error:" in err, (name, err)
        assert re.search(message, err), (name, err)
        assert not out.exists(), name


# ------------------------------------------------------------------ data consistency
def _band_values(vol: np.ndarray, coarse_shape, axes=(0, 1)) -> np.ndarray:
    """The centred |k| < M/2 frequencies of ``vol``'s FFT over ``axes`` (independent of the code)."""
    k = np.fft.fftn(vol.astype(np.float64), axes=axes)
    index = []
    for ax in range(3):
        if ax in axes:
            h = (coarse_shape[ax] - 1) // 2
            index.append(np.arange(-h, h + 1) % vol.shape[ax])
        else:
            index.append(np.arange(vol.shape[ax]))
    return k[np.ix_(*index)], index


@pytest.mark.parametrize("shape", [(26, 22, 7), (23, 27, 8)])
@pytest.mark.parametrize("kind", ["coarse", "zero_filled", "linear", "cubic"])
def test_data_consistency_keeps_the_measured_band_and_the_rest(shape, kind: str) -> None:
    rng = np.random.default_rng(1)
    hr = _hr(shape)
    coarse = d.kspace_truncate(hr, (2, 2, 1))
    sr = hr + 0.05 * rng.standard_normal(shape).astype(np.float32)  # a "network output"
    measured = coarse if kind == "coarse" else d.degrade(hr, (2, 2, 1), kind)
    out = d.data_consistency(sr, measured, (2, 2, 1), "zero_filled" if kind == "coarse" else kind)
    assert out.shape == shape and out.dtype == np.float32

    got, index = _band_values(out, coarse.shape)
    if kind == "zero_filled":
        want, _ = _band_values(measured, coarse.shape)
    else:
        # the coarse samples' own spectrum, times N / M per axis (kspace_truncate kept M / N)
        k = np.fft.fftn(coarse.astype(np.float64), axes=(0, 1)) * (shape[0] * shape[1]) / (coarse.shape[0] * coarse.shape[1])
        h = [(m - 1) // 2 for m in coarse.shape]
        want = k[np.ix_(np.arange(-h[0], h[0] + 1) % coarse.shape[0], np.arange(-h[1], h[1] + 1) % coarse.shape[1], np.arange(shape[2]))]
    # cubic: degrade clips the spline's small undershoot at 0, so the coarse samples come back
    # only approximately (0.15 % of the DC term here)
    tol = (5e-3 if kind == "cubic" else 1e-4) * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol)
    # outside the band: the network's output untouched
    mask = np.ones(shape, dtype=bool)
    mask[np.ix_(*index)] = False
    k_out, k_sr = np.fft.fftn(out, axes=(0, 1)), np.fft.fftn(sr.astype(np.float64), axes=(0, 1))
    np.testing.assert_allclose(k_out[mask], k_sr[mask], atol=tol)
    # and a real output already consistent is left alone
    consistent = d.data_consistency(out, measured, (2, 2, 1), "zero_filled" if kind == "coarse" else kind)
    np.testing.assert_allclose(consistent, out, atol=1e-4)


def test_data_consistency_argument_checks() -> None:
    with pytest.raises(ValueError, match=r"measured volume shape \(5, 5, 5\) is neither the output's grid \(8, 8, 4\) nor its coarse grid \(4, 4, 4\)"):
        d.data_consistency(np.ones((8, 8, 4)), np.ones((5, 5, 5)), (2, 2, 1))
    np.testing.assert_array_equal(d.data_consistency(np.ones((8, 8, 4)), np.zeros((8, 8, 4)), (1, 1, 1)), np.ones((8, 8, 4)))


def test_infer_and_eval_apply_data_consistency(tmp_path: Path, monkeypatch, capsys) -> None:
    shape = (26, 22, 7)
    hr = _hr(shape)
    coarse = d.kspace_truncate(hr, (2, 2, 1))
    coarse_file = _save(tmp_path / "coarse.nii.gz", coarse, _coarse_affine(HR_AFFINE, shape, coarse.shape))
    ckpt = _ckpt(tmp_path, "zero_filled")
    args = [f"input={coarse_file}", f"ckpt={ckpt}", "upsample=auto"]
    assert _infer(monkeypatch, capsys, *args, f"output={tmp_path / 'plain.nii.gz'}")[0] == 0
    code, _, err = _infer(monkeypatch, capsys, *args, f"output={tmp_path / 'dc.nii.gz'}", "data_consistency=true")
    assert code == 0, err
    plain = nib.load(str(tmp_path / "plain.nii.gz")).get_fdata()
    dc = nib.load(str(tmp_path / "dc.nii.gz")).get_fdata()
    np.testing.assert_allclose(dc, d.data_consistency(plain.astype(np.float32), coarse, (2, 2, 1)), atol=1e-5)
    assert not np.allclose(dc, plain, atol=1e-3)

    # mdcsrn-eval: a "network" that doubles its input; with data consistency the band is the LR's again
    lr = d.degrade(hr, (2, 2, 1), "zero_filled")
    method = CheckpointMethod(name="x2", net=Times(2.0), input_interpolation="zero_filled")
    results = {
        dc_on: evaluate([Reference("s", hr)], [], [method], perceptual=[], segmentation=False, data_consistency=dc_on)
        for dc_on in (False, True)
    }
    expected = slice_metrics(d.data_consistency(2 * lr, lr, (2, 2, 1), "zero_filled"), hr, axis=2)
    assert results[True].rows[0]["psnr"] == pytest.approx(expected["psnr"], rel=1e-5)
    assert results[False].rows[0]["psnr"] == pytest.approx(slice_metrics(2 * lr, hr, axis=2)["psnr"], rel=1e-5)
    assert results[True].rows[0]["psnr"] > results[False].rows[0]["psnr"] + 3
    assert results[True].settings["data_consistency"] is True


def test_data_consistency_auto_follows_the_checkpoints_recommendation(tmp_path: Path, monkeypatch, capsys) -> None:
    """`auto` (infer's default): on for a checkpoint whose release record asks for it, off otherwise."""
    shape = (26, 22, 7)
    hr = _hr(shape)
    lr = d.degrade(hr, (2, 2, 1), "zero_filled")
    lr_file = _save(tmp_path / "lr.nii.gz", lr, HR_AFFINE)
    settings = {"factors": [2, 2, 1], "interpolation": "zero_filled", "input_scale": "lr_p99.9"}
    plain = write_tiny_checkpoint(tmp_path / "plain.ckpt", datamodule_hyper_parameters=settings)
    released = write_tiny_checkpoint(
        tmp_path / "released.ckpt", datamodule_hyper_parameters=settings, release={"data_consistency": True}
    )
    outputs = {}
    for name, ckpt, extra in (
        ("plain_auto", plain, []), ("released_auto", released, []), ("released_off", released, ["data_consistency=false"])
    ):
        code, out, err = _infer(monkeypatch, capsys, f"input={lr_file}", f"ckpt={ckpt}", f"output={tmp_path / name}.nii.gz", *extra)
        assert code == 0, err
        outputs[name] = nib.load(str(tmp_path / f"{name}.nii.gz")).get_fdata().astype(np.float32)
    # the released record switches it on; `false` still wins; a plain checkpoint stays off
    np.testing.assert_allclose(
        outputs["released_auto"], d.data_consistency(outputs["released_off"], lr, (2, 2, 1), "zero_filled"), atol=1e-5
    )
    assert not np.allclose(outputs["released_auto"], outputs["released_off"], atol=1e-3)
    np.testing.assert_allclose(outputs["plain_auto"], outputs["released_off"], atol=1e-6)  # same weights, no step

    code, _, err = _infer(monkeypatch, capsys, f"input={lr_file}", f"ckpt={plain}", f"output={tmp_path / 'x.nii.gz'}", "data_consistency=maybe")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data_consistency must be true, false or auto" in err
    assert not (tmp_path / "x.nii.gz").exists()
