"""The patch pipeline that feeds a GPU: memory-mapped cache, crop-only reads, the foreground
sampler, batched augmentation on the device, and equality with the pipeline before it."""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from mdcsrn_lightning.benchmark.legacy_queue import legacy_loader
from mdcsrn_lightning.benchmark.measure import rss_bytes
from mdcsrn_lightning.data.augment import Rot90
from mdcsrn_lightning.data.batched_augment import batched_flip_rot90
from mdcsrn_lightning.data.images import MemmapImage, MemmapReader
from mdcsrn_lightning.data.samplers import CropSampler, read_box
from tests.test_datamodule import _cohort, _dm


def _head_cohort(root: Path, n: int = 6) -> Path:
    """Cubes of foreground in a zero background, one per subject (for the foreground sampler)."""
    for i in range(n):
        data = np.zeros((24, 24, 24), np.float32)
        data[12:22, 2:10, 12:22] = 50.0 + i
        (root / f"sub{i:02d}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / f"sub{i:02d}" / "t1.nii.gz"))
    return root


def test_memmap_image_loads_without_copying_and_a_crop_reads_only_its_pages(tmp_path: Path) -> None:
    big = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=(256, 256, 256))
    big[:] = 1.0
    big.flush()
    del big
    image = MemmapImage(path=tmp_path / "v.npy", reader=MemmapReader(np.eye(4)))
    before = rss_bytes()
    image.load()
    assert image.data.shape == (1, 256, 256, 256)  # 64 MB
    patch = read_box(image.data.numpy()[0], (10, 20, 30), (8, 8, 8), 2.0)
    assert rss_bytes() - before < 8 * 2**20  # a whole-volume copy would be 64 MB
    assert patch.dtype == np.float32 and np.all(patch == 0.5)


def test_read_box_pads_outside_the_volume_with_zeros() -> None:
    volume = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    box = read_box(volume, (-1, 2, 0), (3, 3, 4), 1.0)
    assert box.shape == (3, 3, 4)
    np.testing.assert_array_equal(box[0], 0.0)
    np.testing.assert_array_equal(box[1:, :2], volume[:2, 2:])
    np.testing.assert_array_equal(box[1:, 2:], 0.0)


def test_patches_equal_the_previous_pipeline_for_the_same_seed(tmp_path: Path) -> None:
    """Same subjects, same positions, same data: the memory-mapped path changes only the speed."""
    dm = _dm(_cohort(tmp_path), augment="none", samples_per_volume=3, queue_length=6)
    dm.setup()

    def batches(loader: tio.SubjectsLoader) -> list[dict]:
        torch.manual_seed(7)
        random.seed(7)
        return list(loader)

    new, old = batches(dm.train_dataloader()), batches(legacy_loader(dm, "none", 0))
    assert len(new) == len(old) == 5  # 3 subjects x 3 patches (the last batch holds one patch)
    for a, b in zip(new, old):
        assert a["name"] == b["name"] and torch.equal(a["location"], b["location"])
        assert torch.equal(a["hr"][tio.DATA], b["hr"][tio.DATA]) and torch.equal(a["lr"][tio.DATA], b["lr"][tio.DATA])


def test_batched_flips_and_rotations_equal_torchio_transforms_with_the_same_draws() -> None:
    lr, hr = torch.rand(4, 1, 6, 6, 3), torch.rand(4, 1, 6, 6, 3)
    out_lr, out_hr = batched_flip_rot90(lr, hr, (0, 1), [(0, 1)], torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the function's order
    flips = torch.rand(4, 2, generator=g) < 0.5
    turns = torch.randint(0, 4, (4, 1), generator=g)
    for i in range(4):
        subject = tio.Subject(lr=tio.ScalarImage(tensor=lr[i]), hr=tio.ScalarImage(tensor=hr[i]))
        axes = tuple(a for a, f in zip((0, 1), flips[i].tolist()) if f)
        if axes:
            subject = tio.Flip(axes)(subject)
        subject = Rot90(int(turns[i, 0]), (0, 1))(subject)
        assert torch.equal(out_lr[i], subject["lr"].data) and torch.equal(out_hr[i], subject["hr"].data)


def test_augmentation_runs_on_the_device_hook_for_patch_batches_only(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path), samples_per_volume=6, queue_length=12)
    dm.setup()
    assert dm.hparams.augment_on == "device" and dm.datasets["train"].load_getitem is False
    torch.manual_seed(0)
    raw = [{k: (v.copy() if isinstance(v, dict) else v) for k, v in b.items()} for b in dm.train_dataloader()]
    moved = 0
    for b in raw:
        hr = b["hr"][tio.DATA].clone()
        out = dm.on_after_batch_transfer(b, 0)
        moved += int(not torch.equal(out["hr"][tio.DATA], hr))
    assert moved > 0  # flips/rotations happened in the hook, not in the loader
    (val,) = list(dm.val_dataloader())
    before = val["hr"][tio.DATA].clone()
    assert torch.equal(dm.on_after_batch_transfer(val, 0)["hr"][tio.DATA], before)  # whole volumes pass


def test_loader_augmentation_equals_the_device_hook_for_the_same_seed(tmp_path: Path) -> None:
    root = _cohort(tmp_path)
    on_device = _dm(root, augment_on="device", split_file=None)
    in_loader = _dm(root, augment_on="loader", split_file=None)
    on_device.setup()
    in_loader.setup()
    torch.manual_seed(11)
    random.seed(11)
    a = [on_device.on_after_batch_transfer(b, 0) for b in on_device.train_dataloader()]
    torch.manual_seed(11)
    random.seed(11)
    b = list(in_loader.train_dataloader())
    for x, y in zip(a, b):
        assert torch.equal(x["hr"][tio.DATA], y["hr"][tio.DATA]) and torch.equal(x["lr"][tio.DATA], y["lr"][tio.DATA])


def test_realistic_device_augmentation_is_fixed_by_the_seed(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path), augment="realistic", augment_options={"roi_margin": 4, "noise_p": 1.0})
    dm.setup()

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        random.seed(seed)
        return [dm.on_after_batch_transfer(b, 0)["lr"][tio.DATA] for b in dm.train_dataloader()]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_foreground_sampler_centres_patches_in_the_foreground_from_cached_coordinates(tmp_path: Path) -> None:
    dm = _dm(_head_cohort(tmp_path / "d"), sampler="label", augment="none", samples_per_volume=8, queue_length=8,
             cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert len(list((tmp_path / "cache").glob("*.fg-0.05.npy"))) == 3  # the training subjects'
    centres = 0
    for b in dm.train_dataloader():
        start = b["location"][:, :3]
        centre = start + 4
        assert torch.all((centre[:, 0] >= 12) & (centre[:, 0] < 22) & (centre[:, 1] >= 2) & (centre[:, 1] < 10))
        assert torch.all(b["hr"][tio.DATA][:, 0, 4, 4, 4] > 0.05)
        centres += len(centre)
    assert centres == 3 * 8


def test_crop_sampler_checks_its_geometry() -> None:
    with pytest.raises(ValueError, match="positions must be one of"):
        CropSampler((8, 8, 8), positions="centre")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"the patch \[8, 8, 8\] at offset \[4, 4, 4\] inside the region \[10, 10, 10\]"):
        CropSampler((8, 8, 8), region=(10, 10, 10), offset=(4, 4, 4))


def test_queue_workers_hand_over_unloaded_subjects(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), num_workers=1)
    dm.setup()
    seen: list[bool] = []
    real = CropSampler.__call__

    def spy(self: CropSampler, subject: tio.Subject, num_patches: int | None = None):  # type: ignore[no-untyped-def]
        seen.append(subject["hr"]._loaded)  # as received from the worker
        return real(self, subject, num_patches)

    CropSampler.__call__ = spy  # type: ignore[method-assign]
    try:
        names = [n for b in dm.train_dataloader() for n in b["name"]]
    finally:
        CropSampler.__call__ = real  # type: ignore[method-assign]
    assert sorted(set(names)) == dm.subjects["train"] and seen and not any(seen)
