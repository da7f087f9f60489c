"""The one validator of 3-value sizes (patch sizes, margins): one integer or three."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["triple"]


def triple(value: int | Sequence[int], name: str, minimum: int = 1) -> tuple[int, int, int]:
    """``value`` as three ints ``>= minimum``; raises ``ValueError`` naming ``name`` otherwise.

    >>> triple(4, "margin", 0), triple([70, 70, 40], "patch_size")
    ((4, 4, 4), (70, 70, 40))
    """
    values = [value] * 3 if isinstance(value, (int, np.integer)) else value
    try:
        vals = list(values)  # type: ignore[arg-type]
    except TypeError:
        vals = []
    if len(vals) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or 3 ints >= {minimum}, got {value!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]
