"""The TorchIO patch-queue LightningDataModule shared by L1 pretraining and WGAN fine-tuning.

One volume's path: source file -> validated HR ``(X, Y, Z)`` -> degraded once (whole-volume
k-space truncation, cached in memory and optionally on disk) -> both divided by the
*LR's* 99.9th percentile (:func:`~mdcsrn_lightning.data.intensity.input_scale`, the one rule
that inference applies too; nothing the network sees is derived from the HR) ->
``tio.Subject(hr=, lr=, name=, input_scale=, metric_scale=)`` with images ``(1, X, Y, Z)``
float32; ``input_scale`` is the number both were divided by, ``metric_scale`` the HR's own
reference (its 99.9th percentile, or the whole template's for a slab) in those units, for
the metrics -> train: ``tio.Queue`` of random ``P^3`` patches -> augmented per patch (flips and
90-degree rotations in the degraded plane, identical for ``lr`` and ``hr``) -> batches
``batch["lr"][tio.DATA]``, ``batch["hr"][tio.DATA]`` of shape ``(B, 1, P, P, P)``;
val/eval/test: whole volumes, ``(B, 1, X, Y, Z)`` with ``B = val_batch_size`` (default 1).

DDP: each rank's queue draws subjects from its own share
(``DistributedSampler(train_set, shuffle=True, seed=split_seed)``). Two things keep it
right across epochs, and both are wired automatically:

- the train loader's sampler is a one-replica ``DistributedSampler`` whose ``set_epoch``
  reaches the subject sampler; Lightning calls ``set_epoch(epoch)`` on every train
  loader's sampler at the start of each epoch, so the shares are reshuffled every epoch
  with no callback (call :meth:`SRDataModule.set_epoch` yourself in a hand-written loop);
- being a ``DistributedSampler`` already, Lightning does not wrap it in another one, so
  the patch queue is never cut again. Still build the Trainer with
  ``use_distributed_sampler=False`` (the documented TorchIO recipe): then every rank
  validates every whole volume (exact metrics); with ``True`` Lightning shards the
  val/test loaders itself, padding with repeated subjects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torchio as tio
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchio.transforms.augmentation import RandomTransform

from mdcsrn_lightning.atomic import WriteError, atomic_path
from mdcsrn_lightning.data import degradation, intensity
from mdcsrn_lightning.data.augment import AugmentName, DegradeSample, RandomRegion, realistic_hr_transform, realistic_roi
from mdcsrn_lightning.data.sources import (
    VolumeError,
    VolumeSource,
    check_patch_fits,
    read_volume,
)
from mdcsrn_lightning.data.split import (
    SPLIT_NAMES,
    SplitName,
    check_fractions,
    load_or_create_split,
)

__all__ = ["Normalize", "PatchSamplerName", "RandomRot90", "Rot90", "SRDataModule", "WeightedSubjectSampler"]

log = logging.getLogger(__name__)

Normalize = Literal["percentile", "none"]
PatchSamplerName = Literal["uniform", "label"]
_CACHE_VERSION = 2  # bump when the cached content or its layout changes


# --------------------------------------------------------------------------- augmentation
class Rot90(tio.SpatialTransform):
    """Rotate every image of a subject by ``k * 90`` degrees in the plane of two spatial axes.

    Images are ``(C, X, Y, Z)``; spatial ``axes=(0, 1)`` rotate ``X`` into ``Y``. Affines are
    left alone (only patches are rotated, whose world position no one reads).
    """

    def __init__(self, k: int, axes: tuple[int, int] = (0, 1), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a, b = (int(x) for x in axes)
        if a == b or not {a, b} <= {0, 1, 2}:
            raise ValueError(f"axes must be two different spatial axes in (0, 1, 2), got {axes!r}")
        self.k = int(k) % 4
        self.axes = (a, b)
        self.args_names = ["k", "axes"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        dims = (self.axes[0] + 1, self.axes[1] + 1)
        for image in self.get_images(subject):
            image.set_data(torch.rot90(image.data, self.k, dims).contiguous())
        return subject

    def is_invertible(self) -> bool:
        return True

    def inverse(self) -> Rot90:
        return Rot90(-self.k, self.axes)


class RandomRot90(RandomTransform, tio.SpatialTransform):
    """Random ``k * 90`` degree rotation (``k`` uniform in 0..3) per plane, the same for all images.

    ``tio.Lambda`` cannot do this: it calls its function once per image, so a random angle
    would differ between ``lr`` and ``hr``. Draws from torch's RNG (seeded by
    ``seed_everything``).
    """

    def __init__(self, planes: Sequence[tuple[int, int]] = ((0, 1),), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planes = [tuple(int(x) for x in p) for p in planes]
        for p in self.planes:
            if len(p) != 2 or p[0] == p[1] or not set(p) <= {0, 1, 2}:
                raise ValueError(f"each plane must be two different axes in (0, 1, 2), got {planes!r}")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for plane in self.planes:
            k = int(torch.randint(0, 4, (1,)).item())
            if k:
                subject = Rot90(k, plane, **self._get_base_args())(subject)
        return subject


class _AddForegroundMask(tio.Transform):
    """Adds ``fg`` = ``hr > subject["fg_threshold"]`` as a label map (for ``sampler="label"``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.args_names: list[str] = []

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        hr = subject["hr"]
        mask = (hr.data > float(subject["fg_threshold"])).to(torch.uint8)
        subject.add_image(tio.LabelMap(tensor=mask, affine=hr.affine), "fg")
        return subject


class _AugmentedQueue(Dataset):
    """The patch queue with a per-patch transform (more varied than a per-volume one, and cheaper)."""

    def __init__(self, queue: tio.Queue, transform: tio.Transform) -> None:
        self.queue = queue
        self.transform = transform

    def __len__(self) -> int:
        return len(self.queue)

    def __getitem__(self, index: int) -> tio.Subject:
        return self.transform(self.queue[index])


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


class _QueueEpochSampler(DistributedSampler):
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


# --------------------------------------------------------------------------- lazy readers
class _NiftiReader:
    """TorchIO reader: a validated NIfTI divided by ``scale`` -> ``((1, X, Y, Z), affine)``."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
        data, affine = read_volume(path)
        return torch.from_numpy(np.divide(data, self.scale, dtype=np.float32))[None], affine


class _NpyReader:
    """TorchIO reader for a cached ``.npy`` volume divided by ``scale``, with a given affine."""

    def __init__(self, scale: float, affine: np.ndarray) -> None:
        self.scale = float(scale)
        self.affine = np.asarray(affine, dtype=np.float64)

    def __call__(self, path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
        data = np.load(path)
        return torch.from_numpy(np.divide(data, self.scale, dtype=np.float32))[None], self.affine


# --------------------------------------------------------------------------- disk cache
def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        write(fh)


@dataclass
class _Entry:
    """One prepared subject: in-memory raw arrays and/or files to read lazily."""

    name: str
    location: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    input_scale: float  # the LR's (intensity.input_scale; NaN if it has none): what input and target are divided by
    reference_scale: float  # the HR's: the metrics' intensity reference (raw units)
    hr: np.ndarray | None = None
    lr: np.ndarray | None = None
    hr_file: str | None = None
    lr_file: str | None = None
    lr_is_npy: bool = False


# --------------------------------------------------------------------------- data module
def _as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    vals = [value] * 3 if isinstance(value, int) else list(value)
    if len(vals) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in vals):
        raise ValueError(f"{name} must be an int >= 1 or 3 ints >= 1, got {value!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class SRDataModule(LightningDataModule):
    """HR/LR subjects from a :class:`~mdcsrn_lightning.data.sources.VolumeSource`, split by subject.

    Args:
        source: where volumes come from (``GlobSource``, ``EmbeddedMNI152Source``, ...).
        factors: k-space reduction per axis (paper: 2, 2, 1).
        interpolation: LR -> HR grid interpolation (see ``degradation.degrade``).
        patch_size: training patch edge ``P`` (or 3 edges); every volume must be at least
            this large.
        samples_per_volume: patches drawn per subject per epoch.
        batch_size: training patches per batch.
        queue_length: patches held by the TorchIO queue.
        num_workers: processes loading subjects for the queue (and the val/test loaders);
            the queue itself is read with 0 workers, as TorchIO requires.
        split_fractions: (train, val, eval, test) weights; paper 780/111/111/111.
        split_seed: seed of the split and of the DDP subject shuffling.
        split_file: JSON file to write the split to, or to reuse it from if it exists
            (e.g. ``<run_dir>/split.json``; a resumed run keeps its split).
        cache_dir: folder for degraded volumes (key = source file path + size + mtime +
            factors + interpolation). Without it everything is held in memory (fine for the
            embedded template, not for a 1000-subject cohort: give a cache_dir there, then
            only metadata is held and volumes are read lazily by the queue workers).
        normalize: ``"percentile"`` divides LR and HR by the LR's own 99.9th percentile
            (:func:`~mdcsrn_lightning.data.intensity.input_scale`, as ``mdcsrn-infer`` does;
            training sees ~[0, 1], not clipped); ``"none"`` keeps raw intensities. Recorded
            in the checkpoint as ``input_scale`` (``"lr_p99.9"`` or ``"none"``).
        augment: ``"paper"`` (or ``True``): random flips and 90-degree rotations of training
            patches in the degraded plane (axes with factor > 1), identical for ``lr`` and
            ``hr``; ``"realistic"``: also augments each training subject's HR (affine,
            elastic, bias field, gamma, Rician noise) *before* degrading it again, so LR and
            HR stay one acquisition; both are then divided by ``input_scale`` of that LR (see
            ``data/augment.py``); ``"none"`` (or ``False``): nothing. Val/test never.
        sampler: ``"uniform"`` patch positions, or ``"label"``: patch centres in the
            foreground (normalised HR > ``foreground_threshold``).
        val_batch_size: whole volumes per val/eval/test batch (> 1 needs equal shapes).
        augment_axes: override the augmentation axes (default: the degraded ones).
            Rotations use the pairs of these axes with equal factors.
        foreground_threshold: for ``sampler="label"``, relative to the HR's 99.9th percentile.
        world_size, rank: DDP share of the training subjects; default (``None``): the
            attached Trainer's, else ``torch.distributed``'s, else a single process.
        augment_options: ``augment="realistic"`` settings overriding
            ``data.augment.REALISTIC_DEFAULTS``; ``roi`` / ``roi_margin`` augment and
            re-degrade a random region (each edge ``>=`` the patch) instead of the whole
            volume (``data.augment.realistic_roi``, ``RandomRegion``).

    A source with ``forced_sets`` (held-out scans, slab roles) fixes those subjects' sets;
    one with ``sampling_groups`` (a ``MixSource``) has its training subjects drawn by
    weight (:class:`WeightedSubjectSampler`) instead of each once per epoch.
    """

    def __init__(
        self,
        source: VolumeSource,
        factors: Sequence[float] = (2, 2, 1),
        interpolation: degradation.Interpolation = "linear",
        patch_size: int | Sequence[int] = 40,
        samples_per_volume: int = 18,
        batch_size: int = 6,
        queue_length: int = 108,
        num_workers: int = 0,
        split_fractions: Sequence[float] = (780, 111, 111, 111),
        split_seed: int = 42,
        split_file: str | None = None,
        cache_dir: str | None = None,
        normalize: Normalize = "percentile",
        augment: bool | AugmentName = "paper",
        sampler: PatchSamplerName = "uniform",
        val_batch_size: int = 1,
        augment_axes: Sequence[int] | None = None,
        foreground_threshold: float = 0.05,
        world_size: int | None = None,
        rank: int | None = None,
        augment_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(source, VolumeSource):
            raise ValueError(f"source must be a VolumeSource (GlobSource, EmbeddedMNI152Source, ...), got {source!r}")
        try:
            fs = tuple(float(f) for f in factors)
        except TypeError:
            raise ValueError(f"factors must be 3 numbers >= 1, got {factors!r}") from None
        if len(fs) != 3 or any(not math.isfinite(f) or f < 1.0 for f in fs):
            raise ValueError(f"factors must be 3 finite numbers >= 1, got {factors!r}")
        if interpolation not in get_args(degradation.Interpolation):
            raise ValueError(f"interpolation must be one of {get_args(degradation.Interpolation)}, got {interpolation!r}")
        patch = _as_triple(patch_size, "patch_size")
        _check_int(samples_per_volume, "samples_per_volume", 1)
        _check_int(batch_size, "batch_size", 1)
        _check_int(queue_length, "queue_length", 1)
        if queue_length < samples_per_volume:
            # TorchIO 1.2.1's queue crashes (islice with a negative count) when one subject's
            # patches do not fit in it.
            raise ValueError(
                f"queue_length ({queue_length}) must be >= samples_per_volume ({samples_per_volume})"
            )
        _check_int(num_workers, "num_workers", 0)
        _check_int(val_batch_size, "val_batch_size", 1)
        check_fractions(split_fractions)
        if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
            raise ValueError(f"split_seed must be an int, got {split_seed!r}")
        if normalize not in get_args(Normalize):
            raise ValueError(f"normalize must be one of {get_args(Normalize)}, got {normalize!r}")
        if sampler not in get_args(PatchSamplerName):
            raise ValueError(f"sampler must be one of {get_args(PatchSamplerName)}, got {sampler!r}")
        if isinstance(augment, bool):  # the former switch: true = the paper's flips/rotations
            augment = "paper" if augment else "none"
        if augment not in get_args(AugmentName):
            raise ValueError(f"augment must be one of {get_args(AugmentName)} (or a bool), got {augment!r}")
        if augment == "realistic" and normalize == "none":
            raise ValueError("augment='realistic' divides HR and LR by input_scale(LR); it needs normalize='percentile'")
        if augment_options and augment != "realistic":
            raise ValueError(f"augment_options are for augment='realistic', got augment={augment!r}")
        # Built here so that a bad option fails at construction, not at the first batch.
        self._hr_transform = realistic_hr_transform(augment_options) if augment == "realistic" else None
        self._roi = realistic_roi(augment_options, patch) if augment == "realistic" else (None, 0, None)
        if not (isinstance(foreground_threshold, (int, float)) and foreground_threshold >= 0):
            raise ValueError(f"foreground_threshold must be a number >= 0, got {foreground_threshold!r}")
        if augment_axes is None:
            aug_axes = tuple(i for i, f in enumerate(fs) if f > 1.0)
        else:
            aug_axes = tuple(int(a) for a in augment_axes)
            if len(set(aug_axes)) != len(aug_axes) or not set(aug_axes) <= {0, 1, 2}:
                raise ValueError(f"augment_axes must be distinct axes in (0, 1, 2), got {augment_axes!r}")
        # Rotating mixes two axes: only fair when they were degraded alike.
        planes = [(a, b) for a, b in combinations(sorted(aug_axes), 2) if fs[a] == fs[b]]
        if augment != "none":
            for a, b in planes:
                if patch[a] != patch[b]:
                    raise ValueError(
                        f"augment rotates in the plane of axes {(a, b)}, which needs equal patch edges there; "
                        f"got patch_size {patch}"
                    )
        if (world_size is None) != (rank is None):
            raise ValueError(f"give both world_size and rank or neither, got world_size={world_size!r}, rank={rank!r}")
        if world_size is not None:
            _check_int(world_size, "world_size", 1)
            if not (isinstance(rank, int) and 0 <= rank < world_size):
                raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")

        self.save_hyperparameters(logger=False, ignore=["source"])
        # The normalisation rule, saved with the checkpoint (inference and eval read it back).
        self.hparams["input_scale"] = intensity.INPUT_SCALE_RULE if normalize == "percentile" else "none"
        self.source = source
        self.augment: AugmentName = augment
        self.factors = fs
        self.interpolation = interpolation
        self.patch_size = patch
        self.flip_axes = aug_axes
        self.rotation_planes = planes
        self._world_size = world_size
        self._rank = rank

        self.split: dict[str, list[str]] = {}
        self.subjects: dict[str, list[str]] = {}
        self.datasets: dict[str, tio.SubjectsDataset] = {}
        self.subject_sampler: DistributedSampler | WeightedSubjectSampler | None = None
        self.train_queue: tio.Queue | None = None
        self._entries: dict[str, _Entry] = {}
        self._epoch = 0
        self._ready = False

    # ---------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Nothing: volumes are validated and degraded in :meth:`setup` (every rank needs them)."""

    def setup(self, stage: str | None = None) -> None:
        """Split (read or write ``split_file``), validate and degrade every volume; idempotent.

        Raises:
            VolumeError: a bad volume (the message names the file).
            SplitError: an unusable split file or too few subjects.
        """
        if self._ready:
            return
        hp = self.hparams
        ids = self.source.subject_ids()
        split = load_or_create_split(
            ids, hp.split_fractions, hp.split_seed, hp.split_file, self.source.forced_sets(), self.source.split_groups()
        )
        names = [n for s in SPLIT_NAMES for n in split[s]]

        world, rank = self._ddp_share()
        if hp.cache_dir is not None and world > 1 and _dist_ready(world):
            # Share the one-off degradation work between ranks through the disk cache.
            for name in names[rank::world]:
                try:
                    self._entry(name)
                except Exception:  # noqa: BLE001
                    # Raising here would leave the other ranks waiting at the barrier; every
                    # rank meets the same error in the full pass below instead.
                    log.debug("rank %d: deferring the error on %s to the full pass", rank, name)
            torch.distributed.barrier()
        for i, name in enumerate(names):
            self._entry(name)
            if (i + 1) % 50 == 0:
                log.info("prepared %d/%d subjects", i + 1, len(names))

        subjects = {n: self._subject(self._entries[n]) for n in names}
        for entry in self._entries.values():
            # The subjects hold normalised copies now; don't keep the raw ones twice.
            entry.hr = entry.lr = None
        train_transform = self._train_transform()
        self.datasets = {
            s: tio.SubjectsDataset([subjects[n] for n in split[s]], transform=train_transform if s == "train" else None)
            for s in SPLIT_NAMES
            if split[s]  # a set with fraction 0 (e.g. no eval set for a small cohort) has no loader
        }
        if hp.val_batch_size > 1:
            for s in ("val", "eval", "test"):
                if s not in self.datasets:
                    continue
                shapes = {self._entries[n].shape for n in split[s]}
                if len(shapes) > 1:
                    raise ValueError(
                        f"val_batch_size={hp.val_batch_size} stacks whole volumes, but the {s} set has "
                        f"shapes {sorted(shapes)}; use val_batch_size=1"
                    )
        self.split = split
        self.subjects = {s: list(split[s]) for s in SPLIT_NAMES}
        self._ready = True
        log.info("split: %s", {s: len(v) for s, v in split.items()})

    def train_dataloader(self) -> DataLoader:
        """Patch batches: ``batch["lr"][tio.DATA]``, ``batch["hr"][tio.DATA]`` are ``(B, 1, P, P, P)``."""
        self._require_setup()
        hp = self.hparams
        train_set = self.datasets["train"]
        world, rank = self._ddp_share()
        weights = self._subject_weights()
        if weights is not None:
            self.subject_sampler = WeightedSubjectSampler(weights, seed=hp.split_seed, num_replicas=world, rank=rank)
            self.subject_sampler.set_epoch(self._epoch)
        elif world > 1:
            self.subject_sampler = DistributedSampler(
                train_set, num_replicas=world, rank=rank, shuffle=True, seed=hp.split_seed
            )
            self.subject_sampler.set_epoch(self._epoch)
        else:
            self.subject_sampler = None
        if hp.sampler == "label":
            patch_sampler: tio.data.PatchSampler = tio.LabelSampler(
                self.patch_size, label_name="fg", label_probabilities={1: 1.0}
            )
        else:
            patch_sampler = tio.UniformSampler(self.patch_size)
        self.train_queue = tio.Queue(
            train_set,
            max_length=hp.queue_length,
            samples_per_volume=hp.samples_per_volume,
            sampler=patch_sampler,
            subject_sampler=self.subject_sampler,
            num_workers=hp.num_workers,
            shuffle_subjects=self.subject_sampler is None,
            shuffle_patches=True,
            # Lazy: the subject order is drawn at the first batch, after set_epoch.
            start_background=False,
        )
        dataset: Dataset = self.train_queue
        transform = self._augmentation()
        if transform is not None:
            dataset = _AugmentedQueue(self.train_queue, transform)
        return tio.SubjectsLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=_QueueEpochSampler(dataset, self.set_epoch),
            num_workers=0,  # TorchIO: the queue must be read from the main process
        )

    def val_dataloader(self) -> DataLoader:
        """Whole validation volumes, ``(val_batch_size, 1, X, Y, Z)``."""
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Whole test volumes."""
        return self.dataloader("test")

    def eval_dataloader(self) -> DataLoader:
        """Whole volumes of the evaluation set (the paper's fourth set; not used by Lightning)."""
        return self.dataloader("eval")

    def dataloader(self, split: SplitName) -> DataLoader:
        """Whole-volume loader of any set (``"train"`` too: e.g. to evaluate on training subjects)."""
        self._require_setup()
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        if split not in self.datasets:
            raise ValueError(f"the {split} set is empty (split_fractions={list(self.hparams.split_fractions)})")
        return tio.SubjectsLoader(
            self.datasets[split],
            batch_size=self.hparams.val_batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the DDP subject shares for ``epoch`` (Lightning calls it through the loader)."""
        self._epoch = int(epoch)
        if self.subject_sampler is not None:
            self.subject_sampler.set_epoch(self._epoch)

    # ---------------------------------------------------------------- helpers
    @property
    def slice_axis(self) -> int:
        """Axis perpendicular to the most degraded plane (metrics are taken in its slices)."""
        return degradation.slice_axis(self.factors)

    def _require_setup(self) -> None:
        if not self._ready:
            raise RuntimeError("SRDataModule: call setup() before asking for a dataloader")

    def _ddp_share(self) -> tuple[int, int]:
        if self._world_size is not None:
            assert self._rank is not None
            return self._world_size, self._rank
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _train_transform(self) -> tio.Transform | None:
        """Per training subject (each time the queue loads it): ``realistic`` HR augmentation
        then degradation and normalisation, and the foreground mask of ``sampler="label"``."""
        hp = self.hparams
        steps: list[tio.Transform] = []
        if self._hr_transform is not None:
            fg = float(hp.foreground_threshold) if hp.sampler == "label" else None
            whole = tio.Compose(
                [self._hr_transform, DegradeSample(self.factors, self.interpolation, foreground_threshold=fg)]
            )
            size, margin, min_ratio = self._roi
            if size is None:
                steps.append(whole)
            else:
                # A region: the subject keeps its whole-volume unit (see data/augment.py).
                region = tio.Compose(
                    [self._hr_transform, DegradeSample(self.factors, self.interpolation, renormalize=False)]
                )
                grid = [max(1, round(f)) for f in self.factors]
                steps.append(RandomRegion(size, margin, region, whole_transform=whole, min_ratio=min_ratio, grid=grid))
        if hp.sampler == "label":
            steps.append(_AddForegroundMask())
        return tio.Compose(steps) if steps else None

    def _subject_weights(self) -> list[float] | None:
        """Per training subject: its group's weight shared among the group's training subjects."""
        groups = self.source.sampling_groups()
        if groups is None:
            return None
        train = self.split["train"]
        counts: dict[str, int] = {}
        for name in train:
            counts[groups[name][0]] = counts.get(groups[name][0], 0) + 1
        weights = [groups[n][1] / counts[groups[n][0]] for n in train]
        if not sum(weights) > 0:
            raise ValueError(f"every training subject has weight 0 (groups {sorted(counts)}); give a source a weight > 0")
        return weights

    def _augmentation(self) -> tio.Transform | None:
        if self.augment == "none" or not self.flip_axes:
            return None
        transforms: list[tio.Transform] = [tio.RandomFlip(axes=self.flip_axes, flip_probability=0.5)]
        if self.rotation_planes:
            transforms.append(RandomRot90(self.rotation_planes))
        return tio.Compose(transforms)

    def _cache_key(self, token: str) -> str:
        blob = json.dumps([_CACHE_VERSION, token, list(self.factors), self.interpolation])
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def _entry(self, name: str) -> _Entry:
        """Prepare one subject once: validate, degrade, measure, cache."""
        if name in self._entries:
            return self._entries[name]
        src = self.source
        try:
            token = src.cache_token(name)
        except OSError as exc:
            raise VolumeError(f"{src.location(name)}: cannot be read ({exc.strerror or exc})") from None
        cache = Path(self.hparams.cache_dir) if self.hparams.cache_dir is not None else None
        key = self._cache_key(token)
        entry = self._cached_entry(cache, key, token, name) if cache is not None else None
        if entry is None:
            entry = self._fresh_entry(name, cache, key, token)
        self._entries[name] = entry
        return entry

    def _cached_entry(self, cache: Path, key: str, token: str, name: str) -> _Entry | None:
        meta_path = cache / f"{key}.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("version") != _CACHE_VERSION or meta.get("token") != token:
                return None
            lr_file = meta["lr_file"]
            if lr_file is not None and not (cache / lr_file).is_file():
                return None
            shape = tuple(int(s) for s in meta["shape"])
            affine = np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4)
            input_scale = float(meta["input_scale"])
            reference_scale = float(meta["reference_scale"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unusable cache entry (%s); recomputing", meta_path, exc)
            return None
        if self.hparams.normalize == "percentile" and not (math.isfinite(input_scale) and input_scale > 0):
            return None  # the fresh pass raises the one-line error
        check_patch_fits(shape, self.patch_size, meta.get("location", name))
        entry = _Entry(name=name, location=str(meta.get("location", name)), shape=shape, affine=affine, input_scale=input_scale, reference_scale=reference_scale)  # type: ignore[arg-type]
        entry.hr_file = self.source.hr_path(name)
        if entry.hr_file is None:
            entry.hr = self.source.load(name).hr
        if lr_file is not None:
            entry.lr_file, entry.lr_is_npy = str(cache / lr_file), True
        else:
            entry.lr_file = self.source.lr_path(name)
            if entry.lr_file is None:  # cannot happen with a consistent source; recompute
                return None
        return entry

    def _fresh_entry(self, name: str, cache: Path | None, key: str, token: str) -> _Entry:
        src = self.source
        vol = src.load(name)
        hr = vol.hr
        location = vol.location or src.location(name)
        # Before the (costly) degradation: a volume too small for a patch is a config error.
        check_patch_fits(hr.shape, self.patch_size, location)
        lr_from_file = vol.lr is not None
        lr = vol.lr
        if lr is None:
            lr = src.degraded(name, self.factors, self.interpolation)
        if lr is None:
            # Looked up through the module so that tests can count the calls.
            lr = degradation.degrade(hr, factors=self.factors, interpolation=self.interpolation)
        lr = np.asarray(lr, dtype=np.float32)
        if lr.shape != hr.shape:
            raise VolumeError(f"{location}: LR grid shape {lr.shape} does not match the HR grid {hr.shape}")
        # The input scale comes from the LR alone (at inference there is no HR to ask).
        # Measured whatever `normalize` is, so that a cache entry serves both settings.
        try:
            input_scale = intensity.input_scale(lr, location)
        except ValueError as exc:
            if self.hparams.normalize == "percentile":
                raise VolumeError(str(exc)) from None
            input_scale = math.nan  # raw intensities need no scale
        reference_scale = float(vol.scale) if vol.scale is not None else float(np.percentile(hr, 99.9))
        if not (math.isfinite(reference_scale) and reference_scale > 0):
            raise VolumeError(
                f"{location}: 99.9th percentile of the HR intensities is {reference_scale:g}; cannot score "
                f"against an empty or negative volume"
            )
        entry = _Entry(
            name=name, location=location, shape=hr.shape, affine=vol.affine,  # type: ignore[arg-type]
            input_scale=input_scale, reference_scale=reference_scale, hr=hr, lr=lr,
        )
        if cache is None:
            return entry
        lr_file = None if lr_from_file else f"{key}.lr.npy"
        meta = {
            "version": _CACHE_VERSION,
            "name": name,
            "location": location,
            "token": token,
            "factors": list(self.factors),
            "interpolation": self.interpolation,
            "shape": list(hr.shape),
            "affine": np.asarray(vol.affine, dtype=np.float64).tolist(),
            "input_scale": input_scale,
            "reference_scale": reference_scale,
            "lr_file": lr_file,
        }
        self._write_cache_entry(cache, key, lr_file, lr, meta)
        # With a disk cache, hold only what cannot be re-read (keeps 1000-subject cohorts out of RAM).
        entry.hr_file = src.hr_path(name)
        if entry.hr_file is not None:
            entry.hr = None
        entry.lr_file = str(cache / lr_file) if lr_file is not None else src.lr_path(name)
        entry.lr_is_npy = lr_file is not None
        if entry.lr_file is not None:
            entry.lr = None
        return entry

    @staticmethod
    def _write_cache_entry(cache: Path, key: str, lr_file: str | None, lr: np.ndarray, meta: dict[str, Any]) -> None:
        """The LR array, then the metadata (whose presence marks a complete entry); on a
        failure neither is left behind and the error is one line naming the cache folder."""
        written: list[Path] = []
        try:
            if lr_file is not None:
                _atomic_write(cache / lr_file, lambda fh: np.save(fh, lr, allow_pickle=False))
                written.append(cache / lr_file)
            _atomic_write(cache / f"{key}.json", lambda fh: json.dump(meta, fh), mode="w")
        except OSError as exc:
            for path in written:  # complete but orphaned without its metadata
                path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                need = lr.nbytes / 1e6 if lr_file is not None else 0.0
                raise WriteError(
                    f"{cache}: no space left on device for the degraded-volume cache (data.cache_dir; "
                    f"{need:.0f} MB per subject); free space there or point data.cache_dir elsewhere",
                    exc.errno,
                ) from None
            raise

    def _subject(self, entry: _Entry) -> tio.Subject:
        # LR and HR share the LR's unit: the target is what the input would be at full resolution.
        scale = entry.input_scale if self.hparams.normalize == "percentile" else 1.0

        def image(arr: np.ndarray | None, path: str | None, npy: bool) -> tio.ScalarImage:
            if arr is not None:
                return tio.ScalarImage(
                    tensor=torch.from_numpy(np.divide(arr, scale, dtype=np.float32))[None], affine=entry.affine
                )
            assert path is not None
            reader = _NpyReader(scale, entry.affine) if npy else _NiftiReader(scale)
            return tio.ScalarImage(path=path, reader=reader)

        fields: dict[str, Any] = {
            "hr": image(entry.hr, entry.hr_file, False),
            "lr": image(entry.lr, entry.lr_file, entry.lr_is_npy),
            "name": entry.name,
            "input_scale": scale,
            # The HR's reference in the subject's units: metrics stay on the HR's own scale.
            "metric_scale": entry.reference_scale / scale,
        }
        if self.hparams.sampler == "label":
            fields["fg_threshold"] = float(self.hparams.foreground_threshold) * entry.reference_scale / scale
        return tio.Subject(**fields)


def _dist_ready(world: int) -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() == world
    )
