from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mdcsrn_lightning.config import config_dir

os.environ.setdefault("WANDB_SILENT", "true")

# A run that takes seconds on 2 cores: tiny model, 2 mm template, 8^3 patches.
TINY = [
    "depth=b1u2",
    "width=k4",
    "logger=csv",
    "data.source.resolution=2",
    "data.source.num_slabs=6",
    "data.split_fractions=[780,111,111,111]",
    "data.patch_size=8",
    "data.samples_per_volume=2",
    "data.batch_size=2",
    "data.queue_length=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",
    "baselines=[linear]",
]


def compose_train(overrides: Sequence[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The real `mdcsrn-train` config, composed as Hydra would, writing under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.paths.cache_dir = str(output_dir.parent / "cache")
    return cfg


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, tiny: bool = True, run: str = "run") -> DictConfig:
        return compose_train([*(TINY if tiny else []), *overrides], tmp_path / run)

    return make
