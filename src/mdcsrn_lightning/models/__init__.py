"""Networks (pure torch): the mDCSRN generator, the WGAN-GP critic and the CNN baselines."""

from __future__ import annotations

from mdcsrn_lightning.models.baselines import FSRCNN3D, SRDenseNet3D, SRResNet3D
from mdcsrn_lightning.models.discriminator import Discriminator3D
from mdcsrn_lightning.models.mdcsrn import MDCSRN, DenseBlock, DenseUnit, count_parameters

__all__ = [
    "MDCSRN",
    "DenseBlock",
    "DenseUnit",
    "Discriminator3D",
    "FSRCNN3D",
    "SRDenseNet3D",
    "SRResNet3D",
    "count_parameters",
]
