"""What inference tells the user on stderr (a module of its own: every layer may call it)."""

from __future__ import annotations

import sys

__all__ = ["info"]


def info(message: str) -> None:
    """One info line on stderr, ``mdcsrn: <message>`` (what inference chose for the user)."""
    print(f"mdcsrn: {message}", file=sys.stderr, flush=True)
