"""Where the Hydra configs live and how commands compose them."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mdcsrn_lightning.release import RELEASED_WEIGHTS

# `${release_weights:}` in configs: the checkpoint shipped with the package
OmegaConf.register_new_resolver("release_weights", lambda: str(RELEASED_WEIGHTS), replace=True)


def critic_pooled_size(patch_size: Any, channels: Any, largest: int = 3) -> int:
    """The critic's pooled grid for training patches of ``patch_size``: ``largest`` (the paper's
    3, for its 40^3 patches) where every side allows it, else the largest grid the patch leaves
    after the ``len(channels)`` stride-2 convs (24^3 and 4 convs: 2).

    ``${critic_pool:${data.patch_size},${module.discriminator.channels}}`` in ``loss/wgan_gp.yaml``.
    """
    side = int(patch_size) if isinstance(patch_size, (int, float)) else min(int(v) for v in patch_size)
    strides = len(channels) if channels is not None else 4
    return max(1, min(int(largest), (side - 1) // 2**strides + 1))


OmegaConf.register_new_resolver("critic_pool", critic_pooled_size, replace=True)


def config_dir() -> str:
    """Absolute path of the Hydra configs: ``$MDCSRN_CONFIG_DIR`` or the ones shipped in the package.

    The configs are package data (``mdcsrn_lightning/conf``), so an installed wheel finds them
    with no repository; the repository's top-level ``conf`` is a link to the same folder.
    """
    env = os.environ.get("MDCSRN_CONFIG_DIR")
    if env:
        path = Path(env)
    else:
        with resources.as_file(resources.files("mdcsrn_lightning") / "conf") as shipped:
            path = Path(shipped)
    if not (path / "train.yaml").is_file():
        where = "MDCSRN_CONFIG_DIR" if env else "the installed package"
        raise FileNotFoundError(f"{path}: no Hydra configs (train.yaml) in {where}")
    return str(path.resolve())
