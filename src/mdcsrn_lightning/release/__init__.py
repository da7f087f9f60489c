"""Weights released with the package (see MODEL_CARD.md beside this file)."""

from __future__ import annotations

from pathlib import Path

RELEASE_DIR = Path(__file__).resolve().parent
# mDCSRN b2u4 k=8 with the global residual, trained by `mdcsrn-train experiment=release_cpu`
# on the realistic mixture (see MODEL_CARD.md)
RELEASED_WEIGHTS = RELEASE_DIR / "mdcsrn_b2u4k8_realmix.ckpt"
MODEL_CARD = RELEASE_DIR / "MODEL_CARD.md"
# v2 fine-tuned on zero-filled magnitude images (`data.interpolation=zero_filled_magnitude`, what
# `upsample=` feeds from a coarse matrix; MODEL_CARD.md "Coarse-matrix weights"); mdcsrn-infer picks
# it for `upsample=` when no ckpt is given
RELEASED_COARSE_WEIGHTS = RELEASE_DIR / "mdcsrn_b2u4k8_realmix_magnitude.ckpt"
# the same network trained on thick slices (2-6 mm, along axis 2) by `experiment=release_thick_cpu`
# (MODEL_CARD_thick.md); mdcsrn-infer picks it for thick-slice scans when no ckpt is given
RELEASED_THICK_WEIGHTS = RELEASE_DIR / "mdcsrn_b2u4k8_thick.ckpt"
THICK_MODEL_CARD = RELEASE_DIR / "MODEL_CARD_thick.md"
# the 2D plane network trained across scans on thick-slice pairs (scripts/train_plane_prior.py;
# MODEL_CARD_thick.md "The plane prior"): where adaptation to a thick-slice scan starts (adapt.prior)
RELEASED_PLANE_PRIOR = RELEASE_DIR / "planenet_thick_prior.pt"


def released_weights() -> Path:
    """Path of the released checkpoint; FileNotFoundError if the package lacks it."""
    if not RELEASED_WEIGHTS.is_file():
        raise FileNotFoundError(f"{RELEASED_WEIGHTS}: released weights missing from this installation")
    return RELEASED_WEIGHTS
