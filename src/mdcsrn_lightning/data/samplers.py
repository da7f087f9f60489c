"""Samplers: where patches come from (patch positions) and which subjects a rank draws.

- :class:`CropSampler`: a TorchIO patch sampler (the ``tio.Queue`` calls it) that crops the
  cache's memory-mapped volumes (:class:`~mdcsrn_lightning.data.images.MemmapImage`), reads
  only the patch's pages and divides the crop by the subject's ``input_scale``. Positions are
  ``uniform`` (drawn exactly as ``tio.UniformSampler`` draws them: one ``torch.randint`` per
  axis) or ``foreground`` (a patch centred on a voxel drawn from the subject's cached
  foreground coordinates: ``tio.LabelSampler``'s rule at the uniform sampler's cost). With a
  ``region`` it cuts a larger box around the patch for augmentation that needs context
  (``augment=realistic`` on the training device).
- :class:`WeightedSubjectSampler`: training subjects drawn by weight (a mix's parts).
- :class:`QueueEpochSampler`: the train loader's sampler, which forwards ``set_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Literal, get_args

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchio.constants import LOCATION
from torchio.data.sampler.sampler import RandomSampler

__all__ = ["CropSampler", "PositionRule", "QueueEpochSampler", "WeightedSubjectSampler", "read_box"]

PositionRule = Literal["uniform", "foreground"]


def read_box(volume: np.ndarray, start: Sequence[int], size: Sequence[int], scale: float) -> np.ndarray:
    """``volume[start : start + size] / scale`` as float32; parts outside the volume are 0.

    ``volume``: ``(X, Y, Z)`` (a memory map: only the box's pages are read). The divide is
    elementwise ``np.divide(x, scale, dtype=float32)``, the same float32 operation as
    dividing the whole volume first.
    """
    out = np.zeros(tuple(int(s) for s in size), dtype=np.float32)
    src, dst = [], []
    for s, n, length in zip(start, volume.shape, size):
        lo, hi = max(int(s), 0), min(int(s) + int(length), int(n))
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    np.divide(volume[tuple(src)], scale, out=out[tuple(dst)], dtype=np.float32)
    return out


class CropSampler(RandomSampler):
    """Random patches of ``patch_size`` cut from memory-mapped subjects, divided by ``input_scale``.

    Args:
        patch_size: ``P`` or ``(Px, Py, Pz)``.
        positions: ``"uniform"``, or ``"foreground"``: the patch centre (``start + P // 2``)
            is drawn uniformly among the subject's foreground coordinates (``subject["fg_file"]``,
            written by :meth:`~mdcsrn_lightning.data.cache.SubjectCache.foreground`) whose patch
            fits; uniform when none does.
        images: the subject's images to cut (e.g. ``("hr",)`` when the LR is re-made later).
        region: cut regions of this size instead of the patch (context for augmentation), the
            patch at ``offset`` inside, each region starting on a multiple of ``grid`` (the
            degradation's factors: the region's LR samples then sit where the whole volume's
            do); zero outside the volume. ``None``: the patch itself.
        offset, grid: see ``region``.

    Yields subjects with ``(1, *region)`` float32 images, the other attributes of the subject,
    and ``LOCATION`` = the patch's ``(i0, j0, k0, i1, j1, k1)`` in the volume.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        positions: PositionRule = "uniform",
        images: Sequence[str] = ("hr", "lr"),
        region: Sequence[int] | None = None,
        offset: Sequence[int] = (0, 0, 0),
        grid: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__(tuple(int(p) for p in patch_size))
        if positions not in get_args(PositionRule):
            raise ValueError(f"positions must be one of {get_args(PositionRule)}, got {positions!r}")
        self.positions: PositionRule = positions
        self.images = tuple(images)
        patch = self.patch_size.astype(np.int64)
        self.region = patch if region is None else np.array([int(r) for r in region])
        self.offset = np.array([int(o) for o in offset])
        self.grid = np.array([int(g) for g in grid])
        if not (len(self.region) == len(self.offset) == len(self.grid) == 3):
            raise ValueError(f"region, offset and grid need 3 values each, got {region!r}, {offset!r}, {grid!r}")
        if self.grid.min() < 1 or self.offset.min() < 0 or np.any(self.offset + patch > self.region):
            raise ValueError(
                f"need grid >= 1 and the patch {patch.tolist()} at offset {self.offset.tolist()} inside the "
                f"region {self.region.tolist()}"
            )

    def _generate_patches(self, subject: tio.Subject, num_patches: int | None = None) -> Generator[tio.Subject]:
        shape = np.array(subject.spatial_shape)
        patch = self.patch_size.astype(np.int64)
        centres = self._centres(subject, shape, patch) if self.positions == "foreground" else None
        left = num_patches if num_patches is not None else -1
        while left != 0:
            if centres is not None and len(centres):
                pick = int(torch.randint(len(centres), (1,)).item())
                start = centres[pick] - patch // 2
            else:  # as tio.UniformSampler draws
                start = np.array([int(torch.randint(int(x) + 1, (1,)).item()) for x in shape - patch])
            # tio.UniformSampler crops through tio.Crop, whose __call__ draws torch.rand(1); the same
            # draw here keeps the RNG stream, and so a seed's patches, identical to TorchIO's
            torch.rand(1)
            if (self.grid > 1).any():  # the region starts on the grid
                origin = (start - self.offset) // self.grid * self.grid
                origin += self.grid * (origin + self.offset < 0)
                start = origin + self.offset
            yield self._cut(subject, start)
            left -= 1

    def _centres(self, subject: tio.Subject, shape: np.ndarray, patch: np.ndarray) -> np.ndarray:
        coords = np.load(subject["fg_file"], allow_pickle=False).astype(np.int64)
        lo, hi = patch // 2, shape - patch + patch // 2
        return coords[np.all((coords >= lo) & (coords <= hi), axis=1)]

    def _cut(self, subject: tio.Subject, start: np.ndarray) -> tio.Subject:
        scale = float(subject["input_scale"])
        origin = start - self.offset
        fields: dict[str, object] = {k: v for k, v in subject.items() if not isinstance(v, tio.Image)}
        for key in self.images:
            image = subject[key]
            box = read_box(image.data.numpy()[0], origin, self.region, scale)
            affine = np.array(image.affine, dtype=np.float64)
            affine[:3, 3] = affine[:3, :3] @ origin + affine[:3, 3]
            fields[key] = tio.ScalarImage(tensor=torch.from_numpy(box)[None], affine=affine)
        fields[LOCATION] = torch.as_tensor(np.concatenate([start, start + self.patch_size]).tolist())
        return tio.Subject(**fields)


class WeightedSubjectSampler(Sampler[int]):
    """Training subjects drawn with replacement in proportion to ``weights`` (a mix's parts).

    Each of ``num_replicas`` ranks draws ``ceil(len(weights) / num_replicas)`` indices per
    epoch from its own generator, seeded by ``(seed, epoch, rank)``: deterministic, and
    different per rank and per epoch (call :meth:`set_epoch`, as with ``DistributedSampler``).
    """

    def __init__(self, weights: Sequence[float], seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
        if w.numel() == 0 or not torch.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
        if not (isinstance(num_replicas, int) and num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.weights = w
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_samples = math.ceil(w.numel() / num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) % (1 << 62))
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class QueueEpochSampler(DistributedSampler):
    """Sequential indices over the patch queue (which ignores them) that forwards ``set_epoch``.

    A one-replica ``DistributedSampler``: Lightning calls ``set_epoch`` on a train loader's
    sampler every epoch (so the subject shares are reshuffled), and does not wrap a loader
    whose sampler is already distributed (so the queue is never sharded twice).
    """

    def __init__(self, dataset: Dataset, on_epoch: Callable[[int], None]) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self._on_epoch = on_epoch

    def __iter__(self):  # type: ignore[override]
        return iter(range(len(self.dataset)))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._on_epoch(epoch)
