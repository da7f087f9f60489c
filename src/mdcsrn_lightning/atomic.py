"""Files that appear whole or not at all: write to a temporary name, then rename.

Every file the package writes goes through :func:`atomic_path`: a hidden temporary file
``.<name>.<random>.part<suffix>`` in the *same* folder (so the final rename never crosses
file systems), flushed to disk (``fsync``), then renamed over the final name. A failure
(disk full, read-only folder, an interrupt) removes the temporary file and leaves the
previous file, if any, untouched; the error is a :class:`WriteError` whose message is one
line naming the file (``"<file>: no space left on device; ..."``).

A process killed with SIGKILL cannot clean up: its temporary file stays. Our temporary
names are recognised by :func:`is_temp_name` (inputs are listed without them) and
:func:`remove_stale_temps` removes ours that are older than a few minutes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "STALE_SECONDS",
    "WriteError",
    "atomic_path",
    "atomic_files",
    "describe_os_error",
    "is_temp_name",
    "publish_new",
    "remove_stale_temps",
    "write_json",
    "write_text",
]

# `.<name>.<mkstemp's 8 random characters>.part<suffix>`, the names atomic_path makes
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.part(\.[A-Za-z0-9.]+)?$")
# A temp file lives while one file is written (seconds); one this old belongs to a killed process.
STALE_SECONDS = 15 * 60


class WriteError(OSError):
    """A file could not be written; the message is one line ``"<file>: <problem>"``.

    An ``OSError`` (its ``errno`` is the original one), so callers that catch ``OSError``
    keep working; the previous file at that name, if any, is untouched.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code  # type: ignore[misc]


def describe_os_error(path: str | os.PathLike[str], exc: OSError) -> str:
    """One line for a failed write of ``path``: ``"<path>: no space left on device; ..."`` etc."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on device; the previous file (if any) is kept"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable ({exc.strerror or exc})"
    if code == errno.ENAMETOOLONG:
        return f"{path}: file name too long"
    if code == errno.ENOTDIR:
        return f"{path}: a parent of this path is a file, not a folder"
    return f"{path}: cannot write ({exc.strerror or exc})"


def _suffix(path: Path) -> str:
    # writers pick the format from the extension (savefig, nib.save): keep it
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def is_temp_name(name: str | os.PathLike[str]) -> bool:
    """``True`` for a temporary file name that :func:`atomic_path` makes (``.scan.nii.gz.ab12cd34.part.nii.gz``)."""
    return bool(_TEMP_NAME.match(Path(name).name))


def remove_stale_temps(folder: str | os.PathLike[str], older_than_s: float = STALE_SECONDS) -> list[Path]:
    """Remove our temporary files (and folders) in ``folder`` (not recursive) last modified over ``older_than_s`` ago.

    Left by a killed process (SIGKILL, power loss). Younger ones may belong to a writer that
    is still running and are kept. Returns the removed paths; errors are ignored (best effort).
    """
    base = Path(folder)
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    now = time.time()
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for p in entries:
        try:
            if not is_temp_name(p.name) or now - p.stat().st_mtime <= older_than_s:
                continue
            if p.is_file():
                p.unlink()
            elif p.is_dir():  # the temporary folder of atomic_files
                import shutil

                shutil.rmtree(p)
            else:
                continue
            removed.append(p)
        except OSError:
            continue
    return removed


def _fsync_dir(folder: Path) -> None:
    # the rename itself is durable only once the folder's entry is on disk
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part" + _suffix(target), dir=target.parent)
    except OSError as exc:
        raise WriteError(describe_os_error(target, exc), exc.errno) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except OSError as exc:
        if isinstance(exc, (WriteError, FileExistsError)):
            raise
        raise WriteError(describe_os_error(target, exc), exc.errno) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _finish(tmp: Path, target: Path) -> None:
    """fsync ``tmp`` and give it the usual permissions of a new file (mkstemp makes 0600)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` when the block succeeds.

    On an error (or an interrupt) the temporary file is removed and ``path`` is untouched,
    so an interrupted run never leaves a half-written file. An ``OSError`` in the block or
    while publishing (disk full, read-only folder...) becomes a one-line :class:`WriteError`.
    """
    target = Path(path)
    with _temp_beside(target) as tmp:
        yield tmp
        _finish(tmp, target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)


@contextmanager
def publish_new(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_path`, but the result may only *create* ``path``, never replace it.

    The finished temporary file is hard-linked to the final name, which fails if that name
    exists (whoever published first wins, atomically: no check-then-rename race), then the
    temporary name is removed. Raises :class:`FileExistsError` (``"<file>: already exists"``)
    and leaves the existing file alone. On a file system without hard links it falls back to
    check-then-rename.
    """
    target = Path(path)
    with _temp_beside(target) as tmp:
        yield tmp
        _finish(tmp, target)
        _link_new(tmp, target)
        _fsync_dir(target.parent)


@contextmanager
def _temp_folder_beside(target: Path) -> Iterator[Path]:
    """A hidden temporary folder ``.<name>.<random>.part`` beside ``target``, removed afterwards."""
    import shutil

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    except OSError as exc:
        raise WriteError(describe_os_error(target, exc), exc.errno) from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _link_new(tmp: Path, target: Path) -> None:
    """Create ``target`` as a hard link to ``tmp``; never replaces (check-then-rename without hard links)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"{target}: already exists; pass overwrite=true to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # a file system without hard links (FAT, some network mounts): check, then rename
        # (a small window remains in which a concurrent writer can be replaced)
        if target.exists():
            raise FileExistsError(f"{target}: already exists; pass overwrite=true to replace it") from None
        os.replace(tmp, target)


def _publish_all(pairs: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Move each finished temporary file to its target; on a failure the ones published are removed."""
    published: list[Path] = []
    try:
        for tmp, target in pairs:
            if overwrite:
                os.replace(tmp, target)
            else:
                _link_new(tmp, target)
            published.append(target)
    except BaseException:
        for target in published:
            target.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_files(paths: list[str | os.PathLike[str]], overwrite: bool = False) -> Iterator[list[Path]]:
    """Several files that appear together or not at all (a model and its side files).

    Yields temporary paths with the targets' own names inside one hidden temporary folder
    beside the first target (a writer that derives side-file names from the main file, as
    OpenVINO's ``.bin`` beside the ``.xml``, keeps working). When the block succeeds each file
    is fsynced and published: hard-linked (``overwrite=False``: an existing name is a
    :class:`FileExistsError`) or renamed over its target; if one fails, those already
    published are removed (with ``overwrite`` the files they replaced are gone too: a set is
    never left mixed from two exports). An ``OSError`` (disk full, read-only folder) is a one-line
    :class:`WriteError` naming the first target; the temporary folder is always removed.
    """
    targets = [Path(p) for p in paths]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise FileExistsError(f"{target}: already exists; pass overwrite=true to replace it")
    with _temp_folder_beside(targets[0]) as folder:
        temps = [folder / t.name for t in targets]
        try:
            yield temps
            for tmp, target in zip(temps, targets):
                _finish(tmp, target)
            _publish_all(list(zip(temps, targets)), overwrite)
        except OSError as exc:
            if isinstance(exc, (WriteError, FileExistsError)):
                raise
            raise WriteError(describe_os_error(targets[0], exc), exc.errno) from exc
        _fsync_dir(targets[0].parent)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")
