"""Every config composes and instantiates; every Table 1 row is expressible with overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from mdcsrn_lightning.cli.train import build_module, resolve_trainer_precision
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.models import count_parameters

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))

# Table 1 rows as overrides -> the paper's #Parm (two decimals, millions).
TABLE1 = {
    ("model=mdcsrn_r", "depth=b1u16", "width=k12"): 0.35,
    ("model=mdcsrn_r", "depth=b4u4", "width=k12"): 0.26,
    ("model=mdcsrn_r", "depth=b1u12", "width=k12"): 0.25,
    ("model=mdcsrn", "depth=b6u4", "width=k12"): 0.35,
    ("model=mdcsrn", "depth=b8u4", "width=k12"): 0.49,
    ("model=mdcsrn", "depth=b4u4", "width=k8"): 0.10,
    ("model=mdcsrn", "depth=b4u4", "width=k16"): 0.41,
    ("model=mdcsrn", "depth=b8u4", "width=k8"): 0.22,
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment: str, train_cfg) -> None:
    cfg = train_cfg(f"experiment={experiment}", tiny=False)
    net = instantiate(cfg.model)
    module = build_module(cfg, net)
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    resolve_trainer_precision(cfg)  # "auto" -> what mdcsrn-train gives Lightning
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert module.net is net and datamodule is not None and trainer is not None


@pytest.mark.parametrize("overrides,params_m", list(TABLE1.items()))
def test_table1_rows_compose_to_paper_sizes(overrides, params_m, train_cfg) -> None:
    cfg = train_cfg(*overrides, tiny=False)
    assert round(count_parameters(instantiate(cfg.model)) / 1e6, 2) == params_m


def test_default_is_paper_b4u4_with_l1_and_offline_wandb(train_cfg) -> None:
    cfg = train_cfg(tiny=False)
    assert (cfg.model.num_blocks, cfg.model.units_per_block, cfg.model.growth_rate) == (4, 4, 12)
    assert cfg.model.reconstruction == "direct"
    assert cfg.module.optimizer.lr == pytest.approx(1e-4)
    assert cfg.callbacks.model_checkpoint.monitor == "val/mse"
    assert cfg.logger.wandb.offline is True
    assert (cfg.data.patch_size, cfg.data.samples_per_volume, cfg.data.batch_size) == (40, 18, 6)


def test_trainer_groups_compose(train_cfg) -> None:
    assert train_cfg("trainer=gpu", tiny=False).trainer.accelerator == "gpu"
    ddp = train_cfg("trainer=ddp", tiny=False).trainer
    assert ddp.strategy == "ddp" and ddp.use_distributed_sampler is False


def test_default_data_config_sets_up_with_paper_patches(train_cfg) -> None:
    cfg = train_cfg(tiny=False)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert tuple(batch["hr"]["data"].shape) == (6, 1, 40, 40, 40)
    assert {k: len(v) for k, v in datamodule.split.items()} == {"train": 1, "val": 1, "eval": 0, "test": 1}
