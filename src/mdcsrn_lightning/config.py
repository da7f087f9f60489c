"""Where the Hydra configs live and how commands compose them."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from mdcsrn_lightning.release import RELEASED_WEIGHTS

# `${release_weights:}` in configs: the checkpoint shipped with the package
OmegaConf.register_new_resolver("release_weights", lambda: str(RELEASED_WEIGHTS), replace=True)


def config_dir() -> str:
    """Absolute path of ``conf/``: ``$MDCSRN_CONFIG_DIR`` or the repository's ``conf/``."""
    env = os.environ.get("MDCSRN_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: no Hydra configs (train.yaml) here; install the package editable "
            "(`pip install -e .`) from its repository or set MDCSRN_CONFIG_DIR to its conf/ folder"
        )
    return str(path)
