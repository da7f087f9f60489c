"""Hydra callback of ``mdcsrn-train``: lock the run folder before Hydra writes into it.

Hydra writes ``.hydra/*.yaml`` and the log file into ``hydra.run.dir`` before the task runs,
so the lock (:mod:`mdcsrn_lightning.runlock`) is taken in ``on_run_start``: a second run
with the same folder stops before touching the first run's files. It also records whether
the folder existed, so that a run refused before training (bad option, bad checkpoint)
removes the folder it created (:func:`created_run_folder`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.runlock import RunLockError, acquire_run_lock, is_global_zero

__all__ = ["RunFolderGuard", "created_run_folder"]

_CREATED: set[Path] = set()


def created_run_folder(folder: str | Path) -> bool:
    """``True`` when this process created ``folder`` (it did not exist before the run)."""
    return Path(folder).resolve() in _CREATED


class RunFolderGuard(Callback):
    """Takes the run folder's lock at ``on_run_start`` (single runs; multirun jobs lock in ``train``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        try:
            folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).resolve()
        except Exception:  # a run dir that needs runtime values: train() locks it later
            return
        existed = folder.exists()
        try:
            acquire_run_lock(folder)
        except RunLockError as exc:
            print(f"mdcsrn-train: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except OSError as exc:
            print(f"mdcsrn-train: error: {folder}: cannot create the run folder ({exc.strerror or exc})", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if existed:
            _CREATED.discard(folder)  # an earlier run in this process made it: not ours to remove
        else:
            _CREATED.add(folder)
