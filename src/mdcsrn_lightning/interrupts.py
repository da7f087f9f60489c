"""SIGTERM and SIGINT as ordinary exceptions, so every ``finally`` (temporary files) runs.

Python turns SIGINT into :class:`KeyboardInterrupt`; SIGTERM (what ``kill``, SLURM and
container runtimes send) kills the process at once by default, leaving temporary files.
Inside :func:`terminate_as_exception` SIGTERM raises :class:`Terminated` instead, which
unwinds the stack like Ctrl-C does. SIGKILL cannot be caught: its leftovers are removed by
:func:`mdcsrn_lightning.atomic.remove_stale_temps`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Terminated", "exit_code", "terminate_as_exception"]


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (a ``BaseException``,
    like ``KeyboardInterrupt``, so ``except Exception`` does not swallow it)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: BaseException) -> int:
    """The shell's status for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
