from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch import nn

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


def randomize_batchnorm(net: nn.Module, *, affine: bool = True, strong_convs: bool = False) -> None:
    """Non-trivial BN running statistics (and, with ``affine``, weights and biases); with
    ``strong_convs`` large conv weights too, so a wrong channel slice, padding or BN mode
    cannot hide behind near-identity layers. Draws from torch's global generator."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                if affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.Conv3d) and strong_convs:
                m.weight.normal_(0, 0.3)
                assert m.bias is not None
                m.bias.normal_(0, 0.1)

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
