"""TorchIO images over the cache's ``.npy`` files.

- :class:`MemmapImage` (training subjects): loading maps the file and copies nothing, so a
  patch sampler that crops it reads only the pages of its patches. TorchIO's own
  ``Image.load`` concatenates the reader's tensors (``torch.cat`` of one tensor is a copy of
  the whole volume, per subject load) and would do so here too.
- :class:`ScaledReader` (validation, evaluation, test): the whole volume divided by the
  subject's ``input_scale``, the array the network sees.

Both keep the subject's affine from the cache's metadata (TorchIO cannot read one from a
``.npy``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torchio as tio
from torchio.constants import AFFINE, DATA

__all__ = ["MemmapImage", "MemmapReader", "ScaledReader", "open_memmap"]


def open_memmap(path: str | os.PathLike[str]) -> np.ndarray:
    """A copy-on-write memory map of a ``.npy`` file (writable for torch, never written back)."""
    return np.load(path, mmap_mode="c", allow_pickle=False)


class MemmapReader:
    """TorchIO reader: ``path -> ((1, X, Y, Z) tensor over the memory map, affine)``; raw values."""

    def __init__(self, affine: np.ndarray) -> None:
        self.affine = np.asarray(affine, dtype=np.float64)

    def __call__(self, path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "non-writable" (it is copy-on-write)
            return torch.from_numpy(open_memmap(path))[None], self.affine


class ScaledReader:
    """TorchIO reader: a cached ``.npy`` volume divided by ``scale`` -> ``((1, X, Y, Z) float32, affine)``."""

    def __init__(self, scale: float, affine: np.ndarray) -> None:
        self.scale = float(scale)
        self.affine = np.asarray(affine, dtype=np.float64)

    def __call__(self, path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
        data = np.load(path, allow_pickle=False)
        return torch.from_numpy(np.divide(data, self.scale, dtype=np.float32))[None], self.affine


class MemmapImage(tio.ScalarImage):
    """A scalar image whose ``load`` maps its file instead of reading it.

    ``data`` is ``(1, X, Y, Z)`` over the memory map, in the file's raw units: only the data
    module's patch samplers should read it (they crop and divide by the subject's
    ``input_scale``). Deep copies of an unloaded image (``SubjectsDataset`` makes one per
    subject load) copy only the path. Build it as ``MemmapImage(path=..., reader=MemmapReader(affine))``
    (TorchIO re-creates images with its own keyword arguments).
    """

    def load(self) -> None:
        if self._loaded:
            return
        tensor, affine = self.reader(self.path)  # type: ignore[arg-type]
        self[DATA] = tensor  # no torch.cat, no copy
        self[AFFINE] = affine
        self._loaded = True
