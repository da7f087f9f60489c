"""Command-line overrides checked before Hydra sees them: a grammar error is one line, exit 2.

Hydra reports a malformed override (``trainer.max_epochs=)``, ``input=[a``) on several lines
and exits with status 1; every other refusal of our commands is one line
``<command>: error: <key>: <problem>`` with status 2. :func:`one_line_override_errors` wraps a
``@hydra.main`` function so that its overrides are parsed first with Hydra's own parser, and a
grammar error is printed in that form, with Hydra's message text.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["check_overrides", "one_line_override_errors"]

F = TypeVar("F", bound=Callable[..., Any])

# Hydra's own flags whose value is the next word (``--config-name train``, ``--cfg job``)
_FLAGS_WITH_VALUE = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun",
                     "-c", "--cfg", "-p", "--package", "-i", "--info")


def _overrides(argv: Sequence[str]) -> list[str]:
    """The override words of a Hydra command line: ``key=value`` and ``~key`` (flags, their
    values and anything else are left to Hydra)."""
    words: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = word in _FLAGS_WITH_VALUE
            continue
        if "=" in word or word.startswith("~"):
            words.append(word)
    return words


def check_overrides(prog: str, argv: Sequence[str] | None = None) -> None:
    """Parse each override with Hydra's grammar; a malformed one: one line on stderr, exit 2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for word in _overrides(sys.argv[1:] if argv is None else argv):
        try:
            parser.parse_overrides([word])
        except OverrideParseException as exc:
            lines = [ln.strip() for ln in str(exc).splitlines()]
            docs = next((ln.split()[1] for ln in lines if ln.startswith("See http")), None)
            reason = "; ".join(ln for ln in lines if ln and not ln.startswith(("See http", "Error parsing override", "^")))
            where = f" (Hydra override grammar: {docs})" if docs else ""
            print(f"{prog}: error: {word}: {reason or 'not a valid override'}{where}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


def one_line_override_errors(prog: str) -> Callable[[F], F]:
    """Decorate a ``@hydra.main`` function: called from the command line (no arguments), its
    overrides are checked by :func:`check_overrides` before Hydra composes anything."""

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                check_overrides(prog)
            return main(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap
