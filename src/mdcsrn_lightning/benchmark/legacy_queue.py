"""The patch pipeline as it was before the memory-mapped cache, rebuilt for side-by-side timing.

``bench.task=data`` runs it on the same files as the data module (the row ``today``): per
subject load TorchIO reads the whole HR (decompressing the source NIfTI) and the whole cached
LR (``np.load``) and divides both by ``input_scale``; ``tio.UniformSampler`` (or, for
``sampler="label"``, a foreground mask made per load and ``tio.LabelSampler``) crops through
``tio.Crop``; flips and rotations are TorchIO transforms applied per patch; ``realistic``
augments and re-degrades a random region per subject load with TorchIO
(``data.augment.RandomRegion``). Only the benchmark uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from mdcsrn_lightning.data.augment import DegradeSample, RandomRegion, RandomRot90, realistic_hr_transform, realistic_roi
from mdcsrn_lightning.data.images import ScaledReader
from mdcsrn_lightning.data.volume_io import load_volume

__all__ = ["legacy_loader"]


class _NiftiReader:
    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, path: str) -> tuple[torch.Tensor, np.ndarray]:
        loaded = load_volume(path)
        data, affine = loaded.data, loaded.affine
        return torch.from_numpy(np.divide(data, self.scale, dtype=np.float32))[None], affine


class _AddForegroundMask(tio.Transform):
    def __init__(self, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.args_names = ["threshold"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        hr = subject["hr"]
        limit = self.threshold * float(subject["metric_scale"])
        subject.add_image(tio.LabelMap(tensor=(hr.data > limit).to(torch.uint8), affine=hr.affine), "fg")
        return subject


class _PerPatch(Dataset):
    def __init__(self, queue: tio.Queue, transform: tio.Transform) -> None:
        self.queue, self.transform = queue, transform

    def __len__(self) -> int:
        return len(self.queue)

    def __getitem__(self, index: int) -> tio.Subject:
        return self.transform(self.queue[index])


def _subject(dm: Any, name: str) -> tio.Subject:
    entry = dm._entries[name]
    scale = entry.input_scale if dm.hparams.normalize == "percentile" else 1.0
    hr_path = dm.source.hr_path(name)
    hr = (tio.ScalarImage(path=hr_path, reader=_NiftiReader(scale)) if hr_path is not None
          else tio.ScalarImage(path=entry.hr_file, reader=ScaledReader(scale, entry.affine)))
    lr = tio.ScalarImage(path=entry.lr_file, reader=ScaledReader(scale, entry.affine))
    return tio.Subject(hr=hr, lr=lr, name=name, input_scale=scale, metric_scale=entry.reference_scale / scale)


def _subject_transform(dm: Any, augment: str, options: dict[str, Any] | None) -> tio.Transform | None:
    steps: list[tio.Transform] = []
    if augment == "realistic":
        hr_transform = realistic_hr_transform(options)
        size, margin, min_ratio = realistic_roi(options, dm.patch_size)
        grid = [max(1, round(f)) for f in dm.factors]
        whole = tio.Compose([hr_transform, DegradeSample(dm.factors, dm.interpolation)])
        if size is None:
            steps.append(whole)
        else:
            region = tio.Compose([hr_transform, DegradeSample(dm.factors, dm.interpolation, renormalize=False)])
            steps.append(RandomRegion(size, margin, region, whole_transform=whole, min_ratio=min_ratio, grid=grid))
    if dm.hparams.sampler == "label":
        steps.append(_AddForegroundMask(float(dm.hparams.foreground_threshold)))
    return tio.Compose(steps) if steps else None


def legacy_loader(dm: Any, augment: str, num_workers: int, options: dict[str, Any] | None = None) -> tio.SubjectsLoader:
    """Today's train loader over ``dm``'s training subjects (``dm`` set up: its cache exists)."""
    hp = dm.hparams
    subjects = [_subject(dm, n) for n in dm.split["train"]]
    dataset = tio.SubjectsDataset(subjects, transform=_subject_transform(dm, augment, options))
    if hp.sampler == "label":
        sampler: tio.data.PatchSampler = tio.LabelSampler(dm.patch_size, label_name="fg", label_probabilities={1: 1.0})
    else:
        sampler = tio.UniformSampler(dm.patch_size)
    queue = tio.Queue(dataset, max_length=hp.queue_length, samples_per_volume=hp.samples_per_volume, sampler=sampler,
                      num_workers=num_workers, shuffle_subjects=True, shuffle_patches=True, start_background=False)
    data: Dataset = queue
    if augment != "none" and dm.flip_axes:
        steps: list[tio.Transform] = [tio.RandomFlip(axes=dm.flip_axes, flip_probability=0.5)]
        if dm.rotation_planes:
            steps.append(RandomRot90(dm.rotation_planes))
        data = _PerPatch(queue, tio.Compose(steps))
    return tio.SubjectsLoader(data, batch_size=hp.batch_size, num_workers=0)
