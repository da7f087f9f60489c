"""`mdcsrn-infer upsample=auto` on thick-slice scans (inference/thick.py): grid, header, permutation, refusals."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mdcsrn_lightning.checkpoints import load_trained_model
from mdcsrn_lightning.data import slices as S
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.inference.base import predict_volume
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.inference.thick import plan_thick, thick_axis
from tests.test_inference import write_tiny_checkpoint
from tests.test_upsample import _ckpt, _hr, _infer, _save

# an oblique, shifted 1 x 1.05 x 0.95 mm HR grid: a wrong origin or axis order shows
_ROT = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, -0.6], [0.6, 0.0, 0.8]])
HR_AFFINE = np.eye(4)
HR_AFFINE[:3, :3] = _ROT @ np.diag([1.0, 1.05, 0.95])
HR_AFFINE[:3, 3] = [31.5, -40.25, 12.0]


def _slices_ckpt(tmp_path: Path, axis: int = 2) -> Path:
    return write_tiny_checkpoint(
        tmp_path / f"slices{axis}.ckpt",
        datamodule_hyper_parameters={"factors": [1.0, 1.0, 4.0], "interpolation": "cubic", "input_scale": "lr_p99.9",
                                     "degradation": "slices", "slices": {"thickness": [2.0, 6.0], "axis": axis,
                                                                         "spacing": None, "profile": "boxcar"}},
    )


def _thick_affine(hr_affine: np.ndarray, axis: int, s: int) -> np.ndarray:
    """Slice k of the thick scan is centred on HR voxels k*s .. k*s + s - 1: HR coordinate k*s + (s-1)/2."""
    grid = np.eye(4)
    grid[axis, axis] = s
    grid[axis, 3] = (s - 1) / 2
    return hr_affine @ grid


def test_thick_axis_rule() -> None:
    assert thick_axis((1, 1, 4)) == 2 and thick_axis((3.0, 0.9, 0.95)) == 0 and thick_axis((1, 1.49, 1)) is None
    assert thick_axis((1, 1, 1)) is None and thick_axis((2, 2, 1)) is None and thick_axis((1, 1.2, 3)) is None
    plan = plan_thick((10, 12, 8), (0.9, 0.9, 3.7), 2)
    assert (plan.axis, plan.factor, plan.shape) == (2, 4, (10, 12, 32))
    assert plan_thick((10, 12, 8), (0.9, 0.9, 3.7), 2, (10, 12, 24)).factor == 3
    with pytest.raises(ValueError, match=r"upsample_shape \[10, 12, 30\] must keep the in-plane size"):
        plan_thick((10, 12, 8), (0.9, 0.9, 3.7), 2, (10, 12, 30))


@pytest.mark.parametrize("axis,s,model_axis", [(1, 4, 2), (0, 3, 2), (2, 5, 0)])
def test_thick_scan_is_subdivided_permuted_and_keeps_world_positions(tmp_path, monkeypatch, capsys, axis, s,
                                                                     model_axis) -> None:
    hr = _hr((18, 20, 16))
    coarse = S.thick_slices(hr, s, s, axis)
    n = coarse.shape[axis]
    coarse_affine = _thick_affine(HR_AFFINE, axis, s)
    src = _save(tmp_path / "thick.nii.gz", coarse, coarse_affine, qcode=1, scode=2)
    ckpt = _slices_ckpt(tmp_path, model_axis)
    code, out, err = _infer(monkeypatch, capsys, f"input={src}", f"output={tmp_path / 'sr.nii.gz'}", f"ckpt={ckpt}",
                            "upsample=auto")
    assert code == 0, err
    sr = nib.load(str(tmp_path / "sr.nii.gz"))
    assert sr.shape == tuple(n * s if a == axis else k for a, k in enumerate(hr.shape))
    # the fine grid is the grid the slices were acquired from: the HR's own affine
    for affine in (sr.affine, sr.header.get_qform(), sr.header.get_sform()):
        np.testing.assert_allclose(affine, HR_AFFINE, atol=1e-4)
    assert (int(sr.header["qform_code"]), int(sr.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(sr.header.get_zooms(), (1.0, 1.05, 0.95), atol=1e-5)
    # a slice centre's world position: coarse voxel k <-> fine coordinate k*s + (s-1)/2
    point = np.array([3.0, 4.0, 2.0, 1.0])
    fine_point = point.copy()
    fine_point[axis] = point[axis] * s + (s - 1) / 2
    np.testing.assert_allclose(coarse_affine @ point, sr.affine @ fine_point, atol=1e-5)
    # the network saw the thick axis in its training slot
    model = load_trained_model(ckpt)
    fine = S.slices_to_fine(coarse, s, axis, "cubic")
    inferer = build_inferer(model.net, InferenceOptions(device="cpu"))
    scale = input_scale(fine, "x")
    expected = np.swapaxes(predict_volume(inferer, np.ascontiguousarray(np.swapaxes(fine, axis, model_axis)),
                                          scale=scale), axis, model_axis)
    np.testing.assert_allclose(sr.get_fdata(), expected, atol=1e-4)
    unpermuted = predict_volume(inferer, fine, scale=scale)
    assert np.abs(unpermuted - expected).max() > 1e-3


def test_scans_that_do_not_fit_the_checkpoint_are_refused_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    hr = _hr((18, 20, 16))
    thick = _save(tmp_path / "thick.nii.gz", S.thick_slices(hr, 4, 4, 2), _thick_affine(np.eye(4), 2, 4))
    iso = _save(tmp_path / "iso.nii.gz", hr, np.eye(4))
    out = tmp_path / "sr.nii.gz"
    kspace, slices = _ckpt(tmp_path), _slices_ckpt(tmp_path)
    cases = {
        "kspace on thick": ([f"input={thick}", f"ckpt={kspace}", "upsample=auto"],
                            rf"{re.escape(str(kspace))}: trained on a k-space coarse matrix .* but "
                            rf"{re.escape(str(thick))} is a thick-slice scan \(voxel sizes \[1, 1, 4\] mm"),
        "slices on isotropic": ([f"input={iso}", f"ckpt={slices}", "upsample=auto"],
                                rf"{re.escape(str(slices))}: trained on thick slices .* but {re.escape(str(iso))} "
                                r"is not a thick-slice scan \(voxel sizes \[1, 1, 1\] mm: no thick axis"),
        "explicit factors": ([f"input={thick}", f"ckpt={slices}", "upsample=[1,1,4]"], r"use upsample=auto"),
        "degrade": ([f"input={iso}", f"ckpt={slices}", "degrade=true"], r"degrade=true makes a k-space LR"),
        "bad shape": ([f"input={thick}", f"ckpt={slices}", "upsample=auto", "upsample_shape=[18,20,18]"],
                      rf"{re.escape(str(thick))}: upsample_shape \[18, 20, 18\] must keep"),
    }
    for name, (args, message) in cases.items():
        code, _, err = _infer(monkeypatch, capsys, f"output={out}", *args)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "mdcsrn-infer: error:" in err, (name, err)
        assert re.search(message, err), (name, err)
        assert not out.exists(), name


def test_an_mgh_thick_scan_gets_the_same_world_grid(tmp_path, monkeypatch, capsys) -> None:
    hr = _hr((18, 20, 16))
    coarse = S.thick_slices(hr, 4, 4, 1)
    src = tmp_path / "thick.mgz"
    nib.save(nib.MGHImage(coarse.astype(np.float32), _thick_affine(HR_AFFINE, 1, 4)), str(src))
    code, _, err = _infer(monkeypatch, capsys, f"input={src}", f"output={tmp_path / 'sr.nii.gz'}",
                          f"ckpt={_slices_ckpt(tmp_path)}", "upsample=auto")
    assert code == 0, err
    sr = nib.load(str(tmp_path / "sr.nii.gz"))
    assert sr.shape == (18, 20, 16)
    np.testing.assert_allclose(sr.affine, HR_AFFINE, atol=1e-4)
    np.testing.assert_allclose(sr.header.get_zooms(), (1.0, 1.05, 0.95), atol=1e-5)


# ------------------------------------------------------------------ no ckpt: the weights that fit the scan
def _thick_scan(tmp_path: Path, name: str = "thick.nii.gz", axis: int = 1, s: int = 4) -> Path:
    coarse = S.thick_slices(_hr((18, 20, 16)), s, s, axis)
    return _save(tmp_path / name, coarse, _thick_affine(HR_AFFINE, axis, s))


def test_without_ckpt_a_thick_scan_gets_the_thick_weights_and_upsample_auto(tmp_path, monkeypatch, capsys) -> None:
    from mdcsrn_lightning.inference import files

    thick_weights = _slices_ckpt(tmp_path)
    monkeypatch.setattr(files, "RELEASED_THICK_WEIGHTS", thick_weights)
    src = _thick_scan(tmp_path)
    code, _, err = _infer(monkeypatch, capsys, f"input={src}", f"output={tmp_path / 'sr.nii.gz'}")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "no ckpt" in ln]
    assert lines == [(f"mdcsrn: no ckpt: thick.nii.gz: voxel sizes [1, 4.2, 0.95] mm: thick slices along axis 1: "
                      f"using the released thick-slice weights {thick_weights.name} with upsample=auto")]
    assert nib.load(str(tmp_path / "sr.nii.gz")).shape == (18, 20, 16)  # subdivided along the thick axis
    with_ckpt = tmp_path / "with_ckpt.nii.gz"
    code, _, err = _infer(monkeypatch, capsys, f"input={src}", f"output={with_ckpt}", f"ckpt={thick_weights}",
                          "upsample=auto")
    assert code == 0, err
    np.testing.assert_array_equal(nib.load(str(with_ckpt)).get_fdata(), nib.load(str(tmp_path / "sr.nii.gz")).get_fdata())


def test_without_ckpt_each_route_gets_the_weights_trained_for_it(tmp_path, monkeypatch, capsys) -> None:
    from mdcsrn_lightning.data.volume_io import VolumeHeader
    from mdcsrn_lightning.inference import files

    coarse_weights = write_tiny_checkpoint(tmp_path / "coarse.ckpt", datamodule_hyper_parameters={
        "factors": [2, 2, 1], "interpolation": "zero_filled_magnitude", "input_scale": "lr_p99.9"})
    monkeypatch.setattr(files, "RELEASED_COARSE_WEIGHTS", coarse_weights)
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([1.0, 1.0, 1.2, 1.0]))
    iso = VolumeHeader(Path("iso.nii.gz"), (8, 8, 8), img)
    thick = VolumeHeader(Path("t.nii.gz"), (8, 8, 2), nib.Nifti1Image(np.zeros((8, 8, 2), np.float32),
                                                                       np.diag([1.0, 1.0, 4.0, 1.0])))
    assert files.pick_checkpoint(None, [iso], None) == (None, None)  # a fine-grid scan: the 2x2x1 weights
    assert files.pick_checkpoint(None, [iso], "null") == (None, "null")
    capsys.readouterr()
    assert files.pick_checkpoint(None, [iso], "auto") == (coarse_weights, "auto")  # a coarse matrix
    assert files.pick_checkpoint(None, [thick], [2, 2, 1]) == (coarse_weights, [2, 2, 1])  # factors: a coarse matrix
    assert capsys.readouterr().err.splitlines() == [
        "mdcsrn: no ckpt: upsample=auto: using the released coarse-matrix weights coarse.ckpt (trained on zero-filled "
        "magnitude images, what upsample= feeds)",
        "mdcsrn: no ckpt: upsample=[2, 2, 1]: using the released coarse-matrix weights coarse.ckpt (trained on "
        "zero-filled magnitude images, what upsample= feeds)"]
    assert files.pick_checkpoint("my.ckpt", [thick], None) == ("my.ckpt", None)
    monkeypatch.setattr(files, "RELEASED_COARSE_WEIGHTS", tmp_path / "gone.ckpt")
    with pytest.raises(files.InferenceError, match=r"gone.ckpt: released weights missing from this installation"):
        files.pick_checkpoint(None, [iso], "auto")


def test_without_ckpt_thick_and_isotropic_inputs_together_are_refused_in_one_line(tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _thick_scan(folder, "a_thick.nii.gz")
    _save(folder / "b_iso.nii.gz", _hr((12, 12, 12)), np.eye(4))
    code, _, err = _infer(monkeypatch, capsys, f"input={folder}", f"output={tmp_path / 'out'}")
    assert code != 0
    assert re.search(r"b_iso.nii.gz: voxel sizes \[1, 1, 1\] mm: no thick axis .* beside thick-slice inputs "
                     r"\(.*a_thick.nii.gz\); without ckpt= each kind needs its own weights", err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("axis", [0, 2])
def test_data_consistency_makes_the_output_slices_the_scans(tmp_path, monkeypatch, capsys, axis) -> None:
    hr = _hr((18, 20, 16))
    coarse = S.thick_slices(hr, 4, 4, axis)
    src = _save(tmp_path / "thick.nii.gz", coarse, _thick_affine(HR_AFFINE, axis, 4))
    ckpt = _slices_ckpt(tmp_path)
    runs = {}
    for dc in ("false", "true"):
        out = tmp_path / f"sr_{dc}.nii.gz"
        code, _, err = _infer(monkeypatch, capsys, f"input={src}", f"output={out}", f"ckpt={ckpt}", "upsample=auto",
                              f"data_consistency={dc}")
        assert code == 0, err
        runs[dc] = np.asarray(nib.load(str(out)).dataobj, dtype=np.float32)
    np.testing.assert_allclose(S.thick_slices(runs["true"], 4, 4, axis), coarse, atol=1e-3)
    assert np.abs(S.thick_slices(runs["false"], 4, 4, axis) - coarse).max() > 1e-2  # the network alone does not
    expected = S.slice_consistency(runs["false"], coarse, 4, axis)
    np.testing.assert_allclose(runs["true"], expected, atol=1e-3)
