"""mDCSRN / mDCSRN-GAN 3D MRI super-resolution (Chen et al.) with Lightning, Hydra and TorchIO."""

from __future__ import annotations

__version__ = "0.1.0"
