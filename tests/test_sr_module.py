"""The shared LightningModule: every volume of a batch scored, the metric axis from the data,
CUDA-synchronised timing, exact L1 resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from mdcsrn_lightning.data.datamodule import SRDataModule
from mdcsrn_lightning.data.sources import GlobSource
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.models.mdcsrn import MDCSRN
from mdcsrn_lightning.training import timing
from mdcsrn_lightning.training.l1_module import L1Module

SHAPE = (12, 14, 10)


def _cohort(root: Path, n: int = 4) -> Path:
    """``n`` subjects of smooth-ish random volumes (different per subject and per axis)."""
    rng = np.random.default_rng(7)
    for i in range(n):
        (root / f"sub{i}").mkdir(parents=True)
        data = rng.random(SHAPE) * 80 + 20
        data[:, :, : 2 + i] *= 0.3  # subjects differ, and slices along each axis differ
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(root / f"sub{i}" / "t1.nii.gz"))
    return root


def _datamodule(root: Path, **kwargs: object) -> SRDataModule:
    args: dict[str, object] = dict(
        patch_size=8, samples_per_volume=2, batch_size=2, queue_length=4,
        split_fractions=(1, 2, 0, 1), split_seed=3, augment=False,
    )
    args.update(kwargs)
    return SRDataModule(GlobSource(str(root), "*/t1.nii.gz"), **args)  # type: ignore[arg-type]


def _module(**kwargs: object) -> L1Module:
    torch.manual_seed(0)
    net = MDCSRN(num_blocks=1, units_per_block=2, growth_rate=4)
    with torch.no_grad():  # not the identity-like init: SR must differ from LR
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return L1Module(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.0), **kwargs)  # type: ignore[arg-type]


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    args: dict[str, object] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    args.update(kwargs)
    return L.Trainer(**args)  # type: ignore[arg-type]


def _expected(module: L1Module, dm: SRDataModule, axis: int) -> dict[str, float]:
    """Each validation volume on its own (batch of one), metrics averaged over the volumes."""
    rows = []
    module.eval()
    for subject in dm.datasets["val"]:
        lr, hr = subject["lr"][tio.DATA][None], subject["hr"][tio.DATA][None]
        with torch.no_grad():
            sr = module.net(lr)[0, 0].numpy()
        # the HR's reference in the batch's units (inputs are divided by the LR's own scale)
        scores = slice_metrics(sr, hr[0, 0].numpy(), axis=axis, scale=float(subject["metric_scale"]))
        scores["mse"] = float(np.mean((sr - hr[0, 0].numpy()) ** 2))
        rows.append(scores)
    assert len(rows) == 2
    return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nrmse", "mse")} | {
        "first_psnr": float(rows[0]["psnr"])
    }


def test_validation_scores_every_volume_of_a_batch(tmp_path: Path) -> None:
    dm = _datamodule(_cohort(tmp_path / "data"), val_batch_size=2)
    dm.setup("validate")
    module = _module()
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert len(trainer.val_dataloaders) == 1  # both val volumes in one batch
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    expected = _expected(module, dm, axis=2)
    assert abs(expected["psnr"] - expected["first_psnr"]) > 0.01  # scoring the first only would show
    for key in ("psnr", "ssim", "nrmse", "mse"):
        assert got[f"val/{key}"] == pytest.approx(expected[key], rel=1e-5), key


def test_test_rows_hold_one_row_per_volume(tmp_path: Path) -> None:
    dm = _datamodule(_cohort(tmp_path / "data"), val_batch_size=2, split_fractions=(1, 1, 0, 2))
    module = _module()
    _trainer(tmp_path).test(module, datamodule=dm, verbose=False)
    assert len(module.test_rows) == 2
    assert module.test_rows[0]["psnr"] != module.test_rows[1]["psnr"]
    assert all(r["seconds"] > 0 for r in module.test_rows)


def test_metric_axis_follows_the_data_factors(tmp_path: Path) -> None:
    """factors (1, 2, 2) degrade the (Y, Z) plane: slices are taken along axis 0."""
    dm = _datamodule(_cohort(tmp_path / "data"), factors=(1, 2, 2))
    module = _module()  # metric_axis=None, the configs' default
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert module.metric_axis == 0
    expected0, expected2 = _expected(module, dm, axis=0), _expected(module, dm, axis=2)
    assert abs(expected0["psnr"] - expected2["psnr"]) > 0.01  # the axis matters for these volumes
    assert float(trainer.callback_metrics["val/psnr"]) == pytest.approx(expected0["psnr"], rel=1e-5)


def test_explicit_metric_axis_wins_and_bad_values_are_refused(tmp_path: Path) -> None:
    dm = _datamodule(_cohort(tmp_path / "data"), factors=(1, 2, 2))
    module = _module(metric_axis=2)
    with pytest.warns(UserWarning, match="metric_axis=2 but .* along axis 0"):
        _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    assert module.metric_axis == 2
    for bad in (3, -1, True, 1.5):
        with pytest.raises(ValueError, match="metric_axis must be 0, 1, 2 or None"):
            _module(metric_axis=bad)


def test_configs_leave_metric_axis_to_the_data(train_cfg) -> None:
    for loss in ("l1", "wgan_gp"):
        assert train_cfg(f"loss={loss}", tiny=False).module.metric_axis is None


# --------------------------------------------------------------------------- timing
def test_timing_synchronises_cuda_before_reading_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))

    def work() -> str:
        events.append("work")
        return "out"

    result, seconds = timing.timed(work, torch.device("cuda", 1))
    assert (result, seconds) == ("out", 2.5)
    # queued work is finished before the clock starts, and fn's kernels before it stops
    assert events == ["sync cuda:1", "work", "sync cuda:1"]
    events.clear()
    clock = iter([0.0, 1.0])
    timing.timed(work, torch.device("cpu"))
    assert events == ["work"]


def test_validation_times_through_the_synchronised_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's seconds come from timing.timed, divided over the volumes of the batch."""
    import mdcsrn_lightning.training.base as base

    calls: list[torch.device] = []

    def fake_timed(fn, device):  # type: ignore[no-untyped-def]
        calls.append(device)
        return fn(), 3.0

    monkeypatch.setattr(base, "timed", fake_timed)
    dm = _datamodule(_cohort(tmp_path / "data"), val_batch_size=2, split_fractions=(1, 1, 0, 2))
    module = _module()
    _trainer(tmp_path).test(module, datamodule=dm, verbose=False)
    assert calls == [torch.device("cpu")]
    assert [r["seconds"] for r in module.test_rows] == [1.5, 1.5]


def test_init_ckpt_starts_from_the_released_generator() -> None:
    from mdcsrn_lightning.checkpoints import CheckpointError, load_trained_model
    from mdcsrn_lightning.release import RELEASED_WEIGHTS

    released = load_trained_model(RELEASED_WEIGHTS)
    net = MDCSRN(**{k: v for k, v in released.net_config.items() if k != "_target_"})
    module = L1Module(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.0),  # type: ignore[arg-type]
                      net_config=released.net_config, init_ckpt=str(RELEASED_WEIGHTS))
    for name, value in released.net.state_dict().items():
        torch.testing.assert_close(module.net.state_dict()[name], value, rtol=0, atol=0)
    other = {**released.net_config, "growth_rate": 4}
    with pytest.raises(CheckpointError, match="mdcsrn_b2u4k8_realmix.ckpt"):
        L1Module(MDCSRN(**{k: v for k, v in other.items() if k != "_target_"}),
                 optimizer=lambda params: torch.optim.SGD(params, lr=0.0),  # type: ignore[arg-type]
                 net_config=other, init_ckpt=str(RELEASED_WEIGHTS))
