"""One process per run folder: an exclusive ``flock`` on ``<run>/.lock``.

Two ``mdcsrn-train`` with the same ``hydra.run.dir`` would interleave checkpoints, logs and
metrics. The first takes the lock and holds it until it exits (the kernel releases it even on
SIGKILL, so a crashed run never leaves a stale lock); the second gets :class:`RunLockError`.
Only the global-zero process locks: DDP ranks started by Lightning share the folder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

__all__ = ["LOCK_NAME", "RunLockError", "acquire_run_lock", "is_global_zero", "release_run_lock"]

LOCK_NAME = ".lock"
_HELD: dict[Path, IO[str]] = {}


class RunLockError(RuntimeError):
    """The run folder is in use by another process; the message is one line naming the folder."""


def is_global_zero() -> bool:
    """``False`` in a DDP / SLURM worker process other than the first (from the launcher's variables)."""
    return all(int(os.environ.get(key, "0") or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def acquire_run_lock(folder: str | os.PathLike[str]) -> Path:
    """Lock ``folder`` (created if needed) for this process; a no-op if this process holds it already.

    Raises:
        RunLockError: another process holds it.
    """
    path = Path(folder).resolve()
    if path in _HELD:
        return path
    path.mkdir(parents=True, exist_ok=True)
    fh = open(path / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunLockError(
            f"{path}: run folder in use by another run (pid {holder}); wait for it or give another hydra.run.dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD[path] = fh
    return path


def release_run_lock(folder: str | os.PathLike[str]) -> None:
    """Release the lock this process holds on ``folder`` (if any); the lock file stays."""
    fh = _HELD.pop(Path(folder).resolve(), None)
    if fh is not None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
