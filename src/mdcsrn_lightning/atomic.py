"""Files that appear whole or not at all: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _suffix(path: Path) -> str:
    # writers pick the format from the extension (savefig, nib.save): keep it
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` when the block succeeds.

    On an error (or an interrupt) the temporary file is removed and ``path`` is untouched,
    so an interrupted run never leaves a half-written file. The new file gets the usual
    permissions of a new file (``mkstemp`` alone would make it 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part" + _suffix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")
