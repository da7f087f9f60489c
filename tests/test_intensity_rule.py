"""One normalisation rule: training, mdcsrn-eval and mdcsrn-infer give the network the same tensor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from mdcsrn_lightning.cli import eval as eval_cli
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.datamodule import SRDataModule
from mdcsrn_lightning.data.intensity import INPUT_SCALE_RULE, input_scale, trained_input_scale
from mdcsrn_lightning.data.sources import GlobSource
from mdcsrn_lightning.evaluation.evaluate import checkpoint_methods, evaluate, references_from_files
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.inference import patches as patches_mod
from tests.test_eval import phantom_hr
from tests.test_inference import run_cli, write_tiny_checkpoint

SMALL = dict(patch_size=8, samples_per_volume=2, batch_size=2, queue_length=4)


def _phantoms(
    root: Path, n: int, shape=(24, 22, 12), gain: float = 1.0, name: str = "t1.nii.gz", hot: bool = False
) -> Path:
    """``n`` phantom subjects; ``hot``: a dozen 1-voxel vessels at 4x the tissue, which set the HR's
    99.9th percentile (3200) but are smoothed away in the LR (~990): the two scales differ 3x."""
    affine = np.diag([1.1, 0.9, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"sub{i:02d}").mkdir(parents=True, exist_ok=True)
        hr = phantom_hr(shape, seed=i)
        if hot:
            hr[tuple(rng.integers(4, [s - 4 for s in shape], size=(12, 3)).T)] = 3200.0
        nib.save(nib.Nifti1Image(gain * hr, affine), str(root / f"sub{i:02d}" / name))
    return root


@pytest.mark.parametrize("interpolation", ["linear", "zero_filled"])
def test_training_input_equals_what_infer_and_eval_give(tmp_path: Path, monkeypatch, capsys, interpolation: str) -> None:
    root = _phantoms(tmp_path / "data", 4, hot=True)
    dm = SRDataModule(GlobSource(str(root), "*/t1.nii.gz"), interpolation=interpolation, split_fractions=(2, 1, 0, 1), **SMALL)  # type: ignore[arg-type]
    dm.setup()
    (batch,) = list(dm.val_dataloader())
    trained_on = batch["lr"][tio.DATA][0, 0].numpy()
    name = batch["name"][0]

    seen: list[np.ndarray] = []

    def spy(inferer, volume):  # what mdcsrn-infer hands the network
        seen.append(np.array(volume))
        return np.array(volume)

    monkeypatch.setattr(patches_mod.PatchInferer, "__call__", spy)
    ckpt = write_tiny_checkpoint(
        tmp_path / "m.ckpt",
        datamodule_hyper_parameters={"factors": [2, 2, 1], "interpolation": interpolation, "input_scale": INPUT_SCALE_RULE},
    )
    code, _, err = run_cli(
        monkeypatch, capsys, infer_cli, f"input={root / name / 't1.nii.gz'}", f"output={tmp_path / 'sr.nii.gz'}",
        f"ckpt={ckpt}", "degrade=true",
    )
    assert code == 0, err
    # mdcsrn-eval's path (the library under the command) on the same HR file
    evaluate(references_from_files([root / name / "t1.nii.gz"]), [], checkpoint_methods([ckpt]), perceptual=[], segmentation=False)
    infer_given, eval_given = seen
    for given in (infer_given, eval_given):
        np.testing.assert_allclose(given, trained_on, rtol=1e-6, atol=1e-6)
    assert float(np.percentile(infer_given, 99.9)) == pytest.approx(1.0, rel=1e-5)


def test_the_hr_never_sets_the_input_scale(tmp_path: Path) -> None:
    """Paired LR files: scaling the HR by 10 leaves the network's input unchanged."""
    lr_root = _phantoms(tmp_path / "lr", 4, name="lr.nii.gz")
    tensors = {}
    for gain in (1.0, 10.0):
        hr_root = _phantoms(tmp_path / f"hr{gain:g}", 4, gain=gain)
        src = GlobSource(str(hr_root), "*/t1.nii.gz", lr_root=str(lr_root), lr_pattern="*/lr.nii.gz")
        dm = SRDataModule(src, split_fractions=(2, 1, 0, 1), **SMALL)  # type: ignore[arg-type]
        dm.setup()
        (batch,) = list(dm.val_dataloader())
        tensors[gain] = batch
    one, ten = tensors[1.0], tensors[10.0]
    assert torch.equal(one["lr"][tio.DATA], ten["lr"][tio.DATA])
    torch.testing.assert_close(ten["hr"][tio.DATA], 10 * one["hr"][tio.DATA], rtol=1e-6, atol=0)
    # The metrics follow the HR: its reference moves with it.
    assert float(ten["metric_scale"][0]) == pytest.approx(10 * float(one["metric_scale"][0]), rel=1e-6)


def test_rule_read_back_from_checkpoints(caplog: pytest.LogCaptureFixture) -> None:
    assert trained_input_scale({"input_scale": "lr_p99.9"}) == "lr_p99.9"
    assert trained_input_scale({"input_scale": "none"}) == "none"
    assert trained_input_scale({"normalize": "none"}) == "none"
    with caplog.at_level(logging.WARNING):
        assert trained_input_scale({}, "bare.ckpt") == "lr_p99.9"  # records no data settings at all
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert trained_input_scale({"normalize": "percentile"}, "old.ckpt") == "lr_p99.9"
    assert len(caplog.records) == 1 and "old.ckpt: records no input_scale" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match="^new.ckpt: unknown input_scale 'hr_p99'"):
        trained_input_scale({"input_scale": "hr_p99"}, "new.ckpt")
    with pytest.raises(ValueError, match="^scan.nii: the 99.9th percentile of the LR intensities is 0"):
        input_scale(np.zeros((4, 4, 4)), "scan.nii")


def test_eval_and_infer_reproduce_a_folder_runs_metrics(train_cfg, tmp_path: Path, monkeypatch, capsys) -> None:
    """A trained run's metrics.json == mdcsrn-eval on its test split == mdcsrn-infer degrade=true, scored."""
    from hydra.core.global_hydra import GlobalHydra

    from mdcsrn_lightning.cli.train import train
    from mdcsrn_lightning.checkpoints import read_checkpoint

    root = _phantoms(tmp_path / "data", 4, hot=True)
    data = ["data=folder", f"data.source.root={root}", "data.source.pattern=*/t1.nii.gz", "data.split_fractions=[2,1,0,1]"]
    tiny = ["depth=b1u2", "width=k4", "logger=csv", "data.patch_size=8", "data.samples_per_volume=2", "data.batch_size=2",
            "data.queue_length=8", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "baselines=[linear]"]
    cfg = train_cfg(*tiny, *data, tiny=False)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    written = json.loads((run / "metrics.json").read_text())
    assert read_checkpoint(written["checkpoint"])["datamodule_hyper_parameters"]["input_scale"] == "lr_p99.9"

    GlobalHydra.instance().clear()
    code, stdout, err = run_cli(
        monkeypatch, capsys, eval_cli, *data, f"data.split_file={run / 'split.json'}", f"ckpts=[{written['checkpoint']}]",
        "ckpt_names=[model]", "methods=[trilinear]", "perceptual=[]", "segmentation=false", "panels=false",
        f"output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert code == 0, err
    means = json.loads(stdout.strip().splitlines()[-1])
    for method in ("model", "trilinear"):
        for metric in ("psnr", "ssim", "nrmse"):
            assert means[method][metric] == pytest.approx(written["methods"][method][metric], rel=1e-4), (method, metric)

    (test_name,) = json.loads((run / "split.json").read_text())["test"]
    hr_file = root / test_name / "t1.nii.gz"
    GlobalHydra.instance().clear()
    code, _, err = run_cli(
        monkeypatch, capsys, infer_cli, f"input={hr_file}", f"output={tmp_path / 'sr.nii.gz'}",
        f"ckpt={written['checkpoint']}", "degrade=true",
    )
    assert code == 0, err
    sr = nib.load(str(tmp_path / "sr.nii.gz")).get_fdata(dtype=np.float32)
    hr = nib.load(str(hr_file)).get_fdata(dtype=np.float32)
    scored = slice_metrics(sr, hr, axis=degradation.slice_axis((2, 2, 1)))
    for metric in ("psnr", "ssim", "nrmse"):
        assert scored[metric] == pytest.approx(written["methods"]["model"][metric], rel=1e-4), metric


def test_a_disk_cache_serves_both_normalize_settings(tmp_path: Path) -> None:
    root = _phantoms(tmp_path / "data", 4, hot=True)
    batches = {}
    for normalize in ("none", "percentile"):  # the second run reuses the first one's entries
        dm = SRDataModule(GlobSource(str(root), "*/t1.nii.gz"), split_fractions=(2, 1, 0, 1), cache_dir=str(tmp_path / "cache"), normalize=normalize, **SMALL)  # type: ignore[arg-type]
        dm.setup()
        (batches[normalize],) = list(dm.val_dataloader())
    raw, normed = batches["none"]["lr"][tio.DATA], batches["percentile"]["lr"][tio.DATA]
    scale = float(np.percentile(raw.numpy(), 99.9))
    torch.testing.assert_close(normed, raw / scale, rtol=1e-5, atol=1e-6)
    assert float(batches["none"]["input_scale"][0]) == 1.0
    assert float(batches["percentile"]["input_scale"][0]) == pytest.approx(scale, rel=1e-5)
