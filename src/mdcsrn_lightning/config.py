"""Where the Hydra configs live and how commands compose them."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from mdcsrn_lightning.release import RELEASED_WEIGHTS

# `${release_weights:}` in configs: the checkpoint shipped with the package
OmegaConf.register_new_resolver("release_weights", lambda: str(RELEASED_WEIGHTS), replace=True)


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
