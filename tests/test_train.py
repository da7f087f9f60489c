"""`mdcsrn-train` end to end on the embedded data: fit, files written, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdcsrn_lightning.cli.train import train

from .conftest import TINY


def test_fast_dev_run_trains_and_tests(train_cfg) -> None:
    cfg = train_cfg("trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert "train/loss" in metrics and "test/psnr" in metrics
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_fit_writes_checkpoints_metrics_panel_and_split(train_cfg) -> None:
    cfg = train_cfg()
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "checkpoints").glob("epoch_*.ckpt")), "best checkpoint by val/mse"
    assert (out / "panels" / "test.png").stat().st_size > 1000
    assert (out / "split.json").is_file()
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["methods"]) == {"model", "trilinear"}
    assert result["methods"]["model"]["psnr"] == pytest.approx(metrics["test/psnr"], rel=1e-6)
    # the input of the model is the trilinear interpolation: the same subjects, the same score
    assert result["methods"]["trilinear"]["psnr"] == pytest.approx(metrics["test/input_psnr"], rel=1e-4)
    for key in ("val/mse", "val/psnr", "val/ssim"):
        assert key in metrics
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["net_config"]["num_blocks"] == 1 and ckpt["global_step"] == 2


def test_resume_continues_global_step_and_keeps_split(train_cfg) -> None:
    first = train_cfg(run="first")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    split_before = (Path(first.paths.output_dir) / "split.json").read_text()

    second = train_cfg("trainer.max_epochs=2", f"ckpt_path={last}", "data.split_seed=999", run="second")
    train(second)
    resumed = torch.load(Path(second.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    # the resumed run read the first run's split, not a new one from the other seed
    assert second.data.split_file == str(Path(first.paths.output_dir).resolve() / "split.json")
    assert (Path(first.paths.output_dir) / "split.json").read_text() == split_before


# full epochs (the queue is drained at every epoch end), 4 slabs of the 2 mm template
FULL_EPOCHS = [
    "data.source.num_slabs=4", "data.samples_per_volume=6", "data.queue_length=12",
    "trainer.limit_train_batches=null", "test=false",
    # Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint is written
    "callbacks.model_checkpoint.save_top_k=-1",
]


def _resumed_equals_uninterrupted(train_cfg, *overrides: str) -> bool:
    """2 epochs in one go vs 1 epoch, then resumed from its last.ckpt for the second."""
    whole = train_cfg(*FULL_EPOCHS, *overrides, "trainer.max_epochs=2", run="whole")
    train(whole)
    first = train_cfg(*FULL_EPOCHS, *overrides, "trainer.max_epochs=1", run="first")
    train(first)
    last_first = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    second = train_cfg(*FULL_EPOCHS, *overrides, "trainer.max_epochs=2", f"ckpt_path={last_first}", run="second")
    train(second)
    a = torch.load(Path(whole.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(Path(second.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6 and a["state_dict"].keys() == b["state_dict"].keys()
    return all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


@pytest.mark.slow
def test_l1_resume_is_exact(train_cfg) -> None:
    assert _resumed_equals_uninterrupted(train_cfg)


@pytest.mark.slow
def test_l1_resume_without_the_rng_states_differs(train_cfg) -> None:
    """The check above can fail: without the restored RNG states the second epoch draws other patches."""
    assert not _resumed_equals_uninterrupted(train_cfg, "module.restore_rng=false")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "mdcsrn_lightning.cli.train", *TINY,
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "metrics.json").is_file()


def test_cli_bad_input_is_one_line_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    proc = subprocess.run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.train", "logger=csv", "data=folder",
         f"data.source.root={missing}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mdcsrn-train: error: ") and str(missing) in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
