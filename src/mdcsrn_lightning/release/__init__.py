"""Weights released with the package (see MODEL_CARD.md beside this file)."""

from __future__ import annotations

from pathlib import Path

RELEASE_DIR = Path(__file__).resolve().parent
# mDCSRN b2u4 k=8 with the global residual, trained by `mdcsrn-train experiment=release_cpu`
# on the realistic mixture (see MODEL_CARD.md)
RELEASED_WEIGHTS = RELEASE_DIR / "mdcsrn_b2u4k8_realmix.ckpt"
MODEL_CARD = RELEASE_DIR / "MODEL_CARD.md"


def released_weights() -> Path:
    """Path of the released checkpoint; FileNotFoundError if the package lacks it."""
    if not RELEASED_WEIGHTS.is_file():
        raise FileNotFoundError(f"{RELEASED_WEIGHTS}: released weights missing from this installation")
    return RELEASED_WEIGHTS
