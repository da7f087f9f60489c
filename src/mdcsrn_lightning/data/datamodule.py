"""The TorchIO patch-queue LightningDataModule shared by L1 pretraining and WGAN fine-tuning.

One volume's path: source file -> validated HR ``(X, Y, Z)`` -> degraded once (whole-volume
k-space truncation, or thick slices with ``degradation="slices"``) -> HR and LR written once to the cache as uncompressed ``.npy``
(``data/cache.py``) -> both divided by the *LR's* 99.9th percentile (:func:`~mdcsrn_lightning.data.intensity.input_scale`, the one rule
that inference applies too; nothing the network sees is derived from the HR) ->
``tio.Subject(hr=, lr=, name=, input_scale=, metric_scale=)`` with images ``(1, X, Y, Z)``
float32; ``input_scale`` is the number both were divided by, ``metric_scale`` the HR's own
reference (its 99.9th percentile, or the whole template's for a slab) in those units, for
the metrics -> train: ``tio.Queue`` of random ``P^3`` patches cut from memory maps
(``data/samplers.py``: only the patches' pages are read) -> batches augmented as a whole on the
training device (``on_after_batch_transfer``) or in the loader (``augment_on``): flips and
90-degree rotations in the degraded plane, identical for ``lr`` and ``hr``; ``realistic``
first augments HR regions and re-degrades them (``data/batched_augment.py``) -> batches
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

import logging
import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any, Literal, get_args

import numpy as np
import torch
import torchio as tio
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from mdcsrn_lightning.data import degradation, intensity
from mdcsrn_lightning.data.augment import (
    REALISTIC_DEFAULTS,
    AugmentName,
    AugmentOn,
    PatchAugment,
    realistic_hr_transform,
    realistic_roi,
)
from mdcsrn_lightning.data.cache import CacheEntry, SubjectCache
from mdcsrn_lightning.data.slices import SliceDegradation
from mdcsrn_lightning.data.images import MemmapImage, MemmapReader, ScaledReader
from mdcsrn_lightning.data.samplers import CropSampler, QueueEpochSampler, WeightedSubjectSampler
from mdcsrn_lightning.data.sources import VolumeSource
from mdcsrn_lightning.sizes import triple
from mdcsrn_lightning.data.split import (
    SPLIT_NAMES,
    SplitName,
    check_fractions,
    load_or_create_split,
)

__all__ = ["DegradationName", "Normalize", "PatchSamplerName", "SRDataModule", "WeightedSubjectSampler", "slice_degradation"]

log = logging.getLogger(__name__)

Normalize = Literal["percentile", "none"]
PatchSamplerName = Literal["uniform", "label"]
DegradationName = Literal["kspace", "slices"]


def slice_degradation(degradation: str, slices: Mapping[str, Any] | None, interpolation: str) -> SliceDegradation | None:
    """``degradation="slices"``'s :class:`SliceDegradation` (``None`` for ``"kspace"``), checked."""
    if degradation not in get_args(DegradationName):
        raise ValueError(f"degradation must be one of {get_args(DegradationName)}, got {degradation!r}")
    if degradation == "kspace":
        return None
    options = dict(slices or {})
    unknown = sorted(set(options) - {"thickness", "spacing", "profile", "axis", "seed"})
    if unknown:
        raise ValueError(f"slices: unknown option(s) {unknown}; known: thickness, spacing, profile, axis, seed")
    return SliceDegradation(**options, interpolation=interpolation)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data module
def _check_factors(factors: Sequence[float], interpolation: str) -> tuple[float, float, float]:
    try:
        fs = tuple(float(f) for f in factors)
    except TypeError:
        raise ValueError(f"factors must be 3 numbers >= 1, got {factors!r}") from None
    if len(fs) != 3 or any(not math.isfinite(f) or f < 1.0 for f in fs):
        raise ValueError(f"factors must be 3 finite numbers >= 1, got {factors!r}")
    if interpolation not in get_args(degradation.Interpolation):
        raise ValueError(f"interpolation must be one of {get_args(degradation.Interpolation)}, got {interpolation!r}")
    return fs  # type: ignore[return-value]


def _check_choices(normalize: str, sampler: str, augment: bool | str, augment_options: Mapping[str, Any] | None,
                   augment_on: str) -> AugmentName:
    """The named options checked; ``augment`` as a name (``True``: the paper's flips/rotations)."""
    for name, value, allowed in (("normalize", normalize, Normalize), ("sampler", sampler, PatchSamplerName),
                                 ("augment_on", augment_on, AugmentOn)):
        if value not in get_args(allowed):
            raise ValueError(f"{name} must be one of {get_args(allowed)}, got {value!r}")
    if isinstance(augment, bool):  # the former switch
        augment = "paper" if augment else "none"
    if augment not in get_args(AugmentName):
        raise ValueError(f"augment must be one of {get_args(AugmentName)} (or a bool), got {augment!r}")
    if augment == "realistic" and normalize == "none":
        raise ValueError("augment='realistic' divides HR and LR by input_scale(LR); it needs normalize='percentile'")
    if augment_options and augment != "realistic":
        raise ValueError(f"augment_options are for augment='realistic', got augment={augment!r}")
    return augment  # type: ignore[return-value]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_loader_ints(samples_per_volume: int, batch_size: int, queue_length: int, num_workers: int,
                       val_batch_size: int) -> None:
    _check_int(samples_per_volume, "samples_per_volume", 1)
    _check_int(batch_size, "batch_size", 1)
    _check_int(queue_length, "queue_length", 1)
    if queue_length < samples_per_volume:
        # TorchIO 1.2.1's queue crashes (islice with a negative count) when one subject's
        # patches do not fit in it.
        raise ValueError(f"queue_length ({queue_length}) must be >= samples_per_volume ({samples_per_volume})")
    _check_int(num_workers, "num_workers", 0)
    _check_int(val_batch_size, "val_batch_size", 1)


def _check_share(world_size: int | None, rank: int | None) -> None:
    if (world_size is None) != (rank is None):
        raise ValueError(f"give both world_size and rank or neither, got world_size={world_size!r}, rank={rank!r}")
    if world_size is not None:
        _check_int(world_size, "world_size", 1)
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


class SRDataModule(LightningDataModule):
    """HR/LR subjects from a :class:`~mdcsrn_lightning.data.sources.VolumeSource`, split by subject.

    Args:
        source: where volumes come from (``GlobSource``, ``EmbeddedMNI152Source``, ...).
        factors: k-space reduction per axis (paper: 2, 2, 1).
        interpolation: LR -> HR grid interpolation (see ``degradation.degrade``; with
            ``degradation="slices"``: slices -> fine grid, ``nearest``/``linear``/``cubic``).
        degradation: ``"kspace"`` (the paper's k-space truncation by ``factors``) or
            ``"slices"``: thick slices along one axis (``data/slices.py``), set by ``slices``
            (``thickness``: fine voxels, a number or a ``[lo, hi]`` range drawn per subject;
            ``spacing``: ``null`` = the drawn thickness rounded; ``profile``: boxcar or gaussian;
            ``axis``; ``seed``). ``factors`` is then derived (1 in-plane, the mid-range spacing
            along the axis: augmentation planes and metric slices) and recorded with
            ``degradation`` and ``slices`` in the checkpoint. A source's own LR is not used.
        slices: the ``"slices"`` settings (ignored for ``"kspace"``).
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
        cache_dir: folder of the cache (``data/cache.py``: HR and LR as uncompressed
            ``.npy``, key = source file path + size + mtime + factors + interpolation), written
            once by :meth:`setup` and memory-mapped afterwards: a patch reads only its pages and
            only metadata is held per subject. ``None``: a private temporary folder, removed
            with the data module.
        normalize: ``"percentile"`` divides LR and HR by the LR's own 99.9th percentile
            (:func:`~mdcsrn_lightning.data.intensity.input_scale`, as ``mdcsrn-infer`` does;
            training sees ~[0, 1], not clipped); ``"none"`` keeps raw intensities. Recorded
            in the checkpoint as ``input_scale`` (``"lr_p99.9"`` or ``"none"``).
        augment: ``"paper"`` (or ``True``): random flips and 90-degree rotations of training
            patches in the degraded plane (axes with factor > 1), identical for ``lr`` and
            ``hr``; ``"realistic"``: first augments an HR region around each training patch
            (affine, elastic, bias field, gamma, Rician noise) and degrades it again, so LR and
            HR stay one acquisition, in the subject's unit (``data/batched_augment.py``);
            ``"none"`` (or ``False``): nothing. Val/test never.
        augment_on: ``"device"``: training batches are augmented by
            :meth:`on_after_batch_transfer`, on the training device (the GPU), as a batch;
            ``"loader"``: by the train loader, on the CPU. The same operations either way.
        sampler: ``"uniform"`` patch positions, or ``"label"``: patch centres in the
            foreground (normalised HR > ``foreground_threshold``).
        val_batch_size: whole volumes per val/eval/test batch (> 1 needs equal shapes).
        augment_axes: override the augmentation axes (default: the degraded ones).
            Rotations use the pairs of these axes with equal factors.
        foreground_threshold: for ``sampler="label"``, relative to the HR's 99.9th percentile.
        world_size, rank: DDP share of the training subjects; default (``None``): the
            attached Trainer's, else ``torch.distributed``'s, else a single process.
        augment_options: ``augment="realistic"`` settings overriding
            ``data.augment.REALISTIC_DEFAULTS``; ``roi_margin``: voxels of context around each
            patch that are augmented and re-degraded, then dropped (``roi`` is not used by
            this batched path).

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
        augment_on: AugmentOn = "device",
        degradation: DegradationName = "kspace",
        slices: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(source, VolumeSource):
            raise ValueError(f"source must be a VolumeSource (GlobSource, EmbeddedMNI152Source, ...), got {source!r}")
        fs = _check_factors(factors, interpolation)
        patch = triple(patch_size, "patch_size")
        _check_loader_ints(samples_per_volume, batch_size, queue_length, num_workers, val_batch_size)
        check_fractions(split_fractions)
        if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
            raise ValueError(f"split_seed must be an int, got {split_seed!r}")
        augment = _check_choices(normalize, sampler, augment, augment_options, augment_on)
        self.slices = slice_degradation(degradation, slices, interpolation)
        fs = self.slices.factors() if self.slices is not None else fs
        # Built here so that a bad option fails at construction, not at the first batch.
        self._realistic = (_batched_realistic(augment_options, fs, interpolation, patch, self.slices)
                           if augment == "realistic" else None)
        if not (isinstance(foreground_threshold, (int, float)) and foreground_threshold >= 0):
            raise ValueError(f"foreground_threshold must be a number >= 0, got {foreground_threshold!r}")
        aug_axes, planes = _augment_planes(augment_axes, fs, patch, augment)
        _check_share(world_size, rank)

        self.save_hyperparameters(logger=False, ignore=["source"])
        # The normalisation rule, saved with the checkpoint (inference and eval read it back).
        self.hparams["input_scale"] = intensity.INPUT_SCALE_RULE if normalize == "percentile" else "none"
        if self.slices is not None:  # what inference needs to know: the kind, its parameters, the nominal factors
            self.hparams["factors"] = list(fs)
            self.hparams["slices"] = self.slices.record()
        else:
            self.hparams["slices"] = None
        self.source = source
        self.augment: AugmentName = augment
        self.factors = fs
        self.interpolation = interpolation
        self.patch_size = patch
        self.flip_axes = aug_axes
        self.rotation_planes = planes
        flips = aug_axes if augment != "none" else ()
        self._augmenter: PatchAugment | None = (
            PatchAugment(flips, planes if flips else [], self._realistic) if flips or self._realistic else None
        )
        self._world_size = world_size
        self._rank = rank

        self.split: dict[str, list[str]] = {}
        self.subjects: dict[str, list[str]] = {}
        self.datasets: dict[str, tio.SubjectsDataset] = {}
        self.subject_sampler: DistributedSampler | WeightedSubjectSampler | None = None
        self.train_queue: tio.Queue | None = None
        self.cache: SubjectCache | None = None
        self._entries: dict[str, CacheEntry] = {}
        self._epoch = 0
        self._ready = False

    # ---------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Nothing: volumes are validated and degraded in :meth:`setup` (every rank needs them)."""

    def setup(self, stage: str | None = None) -> None:
        """Split (read or write ``split_file``), validate, degrade and cache every volume; idempotent.

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
        self.cache = SubjectCache(
            self.source, self.factors, self.interpolation, self.patch_size, hp.cache_dir, hp.normalize == "percentile",
            slices=self.slices,
        )
        world, rank = self._ddp_share()
        if hp.cache_dir is not None and world > 1 and _dist_ready(world):
            # Share the one-off degradation work between ranks through the disk cache.
            for name in names[rank::world]:
                try:
                    self._prepare(name)
                except Exception:  # noqa: BLE001
                    # Raising here would leave the other ranks waiting at the barrier; every
                    # rank meets the same error in the full pass below instead.
                    log.debug("rank %d: deferring the error on %s to the full pass", rank, name)
            torch.distributed.barrier()
        for i, name in enumerate(names):
            self._prepare(name)
            if (i + 1) % 50 == 0:
                log.info("prepared %d/%d subjects", i + 1, len(names))
        self.datasets = {
            s: tio.SubjectsDataset(
                [self._subject(self._entries[n], patches=s == "train") for n in split[s]],
                load_getitem=s != "train",  # training subjects are mapped when the sampler cuts them
            )
            for s in SPLIT_NAMES
            if split[s]  # a set with fraction 0 (e.g. no eval set for a small cohort) has no loader
        }
        self._check_val_shapes(split)
        self.split = split
        self.subjects = {s: list(split[s]) for s in SPLIT_NAMES}
        self._ready = True
        log.info("split: %s", {s: len(v) for s, v in split.items()})

    def train_dataloader(self) -> DataLoader:
        """Patch batches: ``batch["lr"][tio.DATA]``, ``batch["hr"][tio.DATA]`` are ``(B, 1, P, P, P)``
        once augmented (with ``augment="realistic"`` and ``augment_on="device"`` the loader's
        batches hold HR regions only, until :meth:`on_after_batch_transfer`)."""
        self._require_setup()
        hp = self.hparams
        self.subject_sampler = self._make_subject_sampler()
        self.train_queue = tio.Queue(
            self.datasets["train"],
            max_length=hp.queue_length,
            samples_per_volume=hp.samples_per_volume,
            sampler=self._patch_sampler(),
            subject_sampler=self.subject_sampler,
            num_workers=hp.num_workers,
            shuffle_subjects=self.subject_sampler is None,
            shuffle_patches=True,
            # Lazy: the subject order is drawn at the first batch, after set_epoch.
            start_background=False,
        )
        augment = self.batch_augment if hp.augment_on == "loader" else None
        return tio.SubjectsLoader(
            self.train_queue,
            batch_size=hp.batch_size,
            sampler=QueueEpochSampler(self.train_queue, self.set_epoch),
            num_workers=0,  # TorchIO: the queue must be read from the main process
            collate_fn=_collate_then(augment),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment a training batch on its device (``augment_on="device"``); other batches pass."""
        if self.hparams.augment_on == "device" and isinstance(batch, dict) and tio.LOCATION in batch:
            return self.batch_augment(batch)
        return batch

    def batch_augment(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The training augmentation of one collated patch batch, on the batch's device."""
        if self._augmenter is None:
            return batch
        return self._augmenter(batch)

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
        dataset = self.datasets[split]
        if split == "train":  # its subjects are memory-mapped for patches: whole volumes read like val
            dataset = tio.SubjectsDataset([self._subject(self._entries[n], patches=False) for n in self.split["train"]])
        return tio.SubjectsLoader(
            dataset,
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

    def _make_subject_sampler(self) -> DistributedSampler | WeightedSubjectSampler | None:
        hp = self.hparams
        world, rank = self._ddp_share()
        weights = self._subject_weights()
        sampler: DistributedSampler | WeightedSubjectSampler | None = None
        if weights is not None:
            sampler = WeightedSubjectSampler(weights, seed=hp.split_seed, num_replicas=world, rank=rank)
        elif world > 1:
            sampler = DistributedSampler(self.datasets["train"], num_replicas=world, rank=rank, shuffle=True, seed=hp.split_seed)
        if sampler is not None:
            sampler.set_epoch(self._epoch)
        return sampler

    def _patch_sampler(self) -> CropSampler:
        positions = "foreground" if self.hparams.sampler == "label" else "uniform"
        if self._realistic is None:
            return CropSampler(self.patch_size, positions)
        # HR regions with context; the LR is made again from the augmented HR
        region = self._realistic.region_size
        offset = [(r - p) // 2 for r, p in zip(region, self.patch_size)]  # BatchedRealistic.crop's
        grid = [max(1, round(f)) for f in self.factors]
        return CropSampler(self.patch_size, positions, images=("hr",), region=region, offset=offset, grid=grid)

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

    def _check_val_shapes(self, split: dict[str, list[str]]) -> None:
        if self.hparams.val_batch_size <= 1:
            return
        for s in ("val", "eval", "test"):
            shapes = {self._entries[n].shape for n in split[s]}
            if len(shapes) > 1:
                raise ValueError(
                    f"val_batch_size={self.hparams.val_batch_size} stacks whole volumes, but the {s} set has "
                    f"shapes {sorted(shapes)}; use val_batch_size=1"
                )

    def _prepare(self, name: str) -> CacheEntry:
        assert self.cache is not None
        if name not in self._entries:
            self._entries[name] = self.cache.entry(name)
        return self._entries[name]

    def _subject(self, entry: CacheEntry, patches: bool) -> tio.Subject:
        """A training subject (``patches``: memory-mapped raw images for :class:`CropSampler`) or a
        whole-volume one (images read whole and divided by ``input_scale``)."""
        hp = self.hparams
        # LR and HR share the LR's unit: the target is what the input would be at full resolution.
        scale = entry.input_scale if hp.normalize == "percentile" else 1.0

        def image(path: str) -> tio.ScalarImage:
            if patches:
                return MemmapImage(path=path, reader=MemmapReader(entry.affine))
            return tio.ScalarImage(path=path, reader=ScaledReader(scale, entry.affine))

        fields: dict[str, Any] = {
            "hr": image(entry.hr_file),
            "lr": image(entry.lr_file),
            "name": entry.name,
            "input_scale": scale,
            # The HR's reference in the subject's units: metrics stay on the HR's own scale.
            "metric_scale": entry.reference_scale / scale,
        }
        if patches and self._realistic is not None:
            fields["spacing"] = torch.tensor(entry.spacing, dtype=torch.float32)
        if patches and hp.sampler == "label":
            assert self.cache is not None
            fields["fg_file"] = self.cache.foreground(entry, float(hp.foreground_threshold))
        return tio.Subject(**fields)


def _augment_planes(
    augment_axes: Sequence[int] | None, factors: tuple[float, ...], patch: tuple[int, int, int], augment: str
) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """The flip axes (default: the degraded ones) and the rotation planes: pairs of them degraded alike."""
    if augment_axes is None:
        axes = tuple(i for i, f in enumerate(factors) if f > 1.0)
    else:
        axes = tuple(int(a) for a in augment_axes)
        if len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
            raise ValueError(f"augment_axes must be distinct axes in (0, 1, 2), got {augment_axes!r}")
    # Rotating mixes two axes: only fair when they were degraded alike.
    planes = [(a, b) for a, b in combinations(sorted(axes), 2) if factors[a] == factors[b]]
    if augment != "none":
        for a, b in planes:
            if patch[a] != patch[b]:
                raise ValueError(
                    f"augment rotates in the plane of axes {(a, b)}, which needs equal patch edges there; "
                    f"got patch_size {patch}"
                )
    return axes, planes


def _batched_realistic(
    options: Mapping[str, Any] | None, factors: Sequence[float], interpolation: str, patch: Sequence[int],
    slices: SliceDegradation | None = None,
) -> Any:
    """``augment=realistic``'s batched HR transforms and re-degradation around ``patch``-sized patches."""
    from mdcsrn_lightning.data.batched_augment import BatchedRealistic

    realistic_hr_transform(options)  # the option checks shared with the TorchIO transforms
    realistic_roi(options, patch)
    margin = int(dict(options or {}).get("roi_margin", REALISTIC_DEFAULTS["roi_margin"]))
    return BatchedRealistic(options, factors, interpolation, patch, margin, slices)


def _collate_then(augment: Any | None) -> Any:
    """TorchIO's collate, then ``augment`` (a batch-level transform) if given."""
    collate = tio.SubjectsLoader._collate
    if augment is None:
        return collate

    def collate_and_augment(subjects: list[tio.Subject]) -> dict[str, Any]:
        return augment(collate(subjects))

    return collate_and_augment


def _dist_ready(world: int) -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() == world
    )
