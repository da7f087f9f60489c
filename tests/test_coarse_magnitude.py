"""``interpolation=zero_filled_magnitude``: training LR made the way ``mdcsrn-infer upsample=``
makes the network's input from a scanner's coarse magnitude image (issue: the released
model was trained on zero-filled complex k-space but fed a zero-filled magnitude image)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mdcsrn_lightning.data import degradation as D
from mdcsrn_lightning.data.batched_augment import degrade_batch

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _hr() -> np.ndarray:
    return np.asarray(nib.load(ANATOMICAL).dataobj, dtype=np.float32)  # a real scan, 33x41x25


def test_training_lr_is_exactly_what_the_coarse_matrix_path_feeds() -> None:
    hr = _hr()
    for factors in ((2, 2, 1), (2, 1, 3), (1.5, 2, 1)):
        coarse = D.kspace_truncate(hr, factors)  # what the scanner stores
        fed = D.to_fine_grid(coarse, factors, "zero_filled_magnitude", hr.shape)  # what upsample= feeds
        trained = D.degrade(hr, factors, "zero_filled_magnitude")
        np.testing.assert_allclose(trained, fed, rtol=0, atol=1e-5 * float(hr.max()))
        assert trained.shape == hr.shape and trained.dtype == np.float32


def test_it_differs_from_complex_zero_filling_where_the_gibbs_lobes_were_negative() -> None:
    hr = _hr()
    magnitude_first = D.degrade(hr, (2, 2, 1), "zero_filled_magnitude")
    complex_first = D.degrade(hr, (2, 2, 1), "zero_filled")
    assert float(np.abs(magnitude_first - complex_first).max()) > 1e-3 * float(hr.max())
    # the same band-limited content: their spectra agree inside most of the measured band
    k1, k2 = np.fft.fftn(magnitude_first), np.fft.fftn(complex_first)
    assert abs(k1[0, 0, 0] - k2[0, 0, 0]) / abs(k2[0, 0, 0]) < 0.05


def test_the_batched_port_agrees_with_numpy() -> None:
    hr = _hr()
    for factors in ((2, 2, 1), (1, 3, 2)):
        expected = D.degrade(hr, factors, "zero_filled_magnitude")
        got = degrade_batch(torch.from_numpy(hr)[None, None].repeat(2, 1, 1, 1, 1), factors, "zero_filled_magnitude")
        assert got.shape == (2, 1, *hr.shape)
        np.testing.assert_allclose(got[1, 0].numpy(), expected, rtol=0, atol=2e-5 * float(hr.max()))


def test_data_consistency_keeps_the_fine_grid_band_like_zero_filling() -> None:
    hr = _hr()
    lr = D.degrade(hr, (2, 2, 1), "zero_filled_magnitude")
    out = D.data_consistency(hr, lr, (2, 2, 1), "zero_filled_magnitude")
    again = D.data_consistency(out, lr, (2, 2, 1), "zero_filled_magnitude")
    np.testing.assert_allclose(again, out, atol=1e-4 * float(hr.max()))  # the band is the measured one: idempotent


@pytest.mark.parametrize("consistency", ["false", "true"])
def test_a_model_trained_this_way_gets_the_same_input_from_a_coarse_scan_as_from_degrade(tmp_path, monkeypatch, capsys,
                                                                                         consistency) -> None:
    """``upsample=auto`` on the scanner's coarse matrix and ``degrade=true`` on the HR give the
    network the same input and data consistency the same band, so the same output (for a
    checkpoint with this interpolation)."""
    from mdcsrn_lightning.cli import infer as infer_cli

    from .test_inference import run_cli, write_tiny_checkpoint

    hr_img = nib.load(ANATOMICAL)
    hr = np.asarray(hr_img.dataobj, dtype=np.float32)
    coarse = D.kspace_truncate(hr, (2, 2, 1))
    affine = hr_img.affine @ np.diag([hr.shape[0] / coarse.shape[0], hr.shape[1] / coarse.shape[1], 1, 1])
    nib.save(nib.Nifti1Image(coarse, affine), str(tmp_path / "coarse.nii.gz"))
    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt", datamodule_hyper_parameters={
        "factors": [2, 2, 1], "interpolation": "zero_filled_magnitude"})
    outputs = {}
    for name, args in (("upsample", [f"input={tmp_path / 'coarse.nii.gz'}", "upsample=auto",
                                     f"upsample_shape=[{hr.shape[0]},{hr.shape[1]},{hr.shape[2]}]"]),
                       ("degrade", [f"input={ANATOMICAL}", "degrade=true"])):
        code, _, err = run_cli(monkeypatch, capsys, infer_cli, *args, f"output={tmp_path / name}.nii.gz", f"ckpt={ckpt}",
                               "patches.size=[40,48,40]", "patches.margin=0", f"data_consistency={consistency}",
                               "device=cpu")
        assert code == 0, err
        outputs[name] = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj, dtype=np.float32)
    assert outputs["upsample"].shape == outputs["degrade"].shape == hr.shape
    np.testing.assert_allclose(outputs["upsample"], outputs["degrade"], rtol=0, atol=1e-4 * float(np.abs(outputs["degrade"]).max()))


def test_a_training_run_records_it_for_inference(train_cfg) -> None:
    from mdcsrn_lightning.checkpoints import load_trained_model
    from mdcsrn_lightning.cli.train import train

    cfg = train_cfg("data.interpolation=zero_filled_magnitude", "trainer.max_epochs=1", "test=false")
    train(cfg)
    model = load_trained_model(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert model.interpolation == "zero_filled_magnitude"
