"""``augment=realistic`` on regions: TorchIO's region transform (the benchmark's reference path) and the
data module's batched path (HR regions around each patch, re-degraded on the device): exactness,
alignment, options."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import torch
import torchio as tio

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.augment import DegradeSample, RandomRegion, realistic_hr_transform, realistic_roi
from mdcsrn_lightning.data.datamodule import SRDataModule
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.data.sources import GlobSource

# the margin study is a developer's script, not part of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from roi_margin import margin_errors, region_offset


def _head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """An elliptic 'head' with smooth texture on a zero background, float32 ``shape``."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = ((x / 0.8) ** 2 + (y / 0.85) ** 2 < 1).astype(np.float32)
    texture = scipy.ndimage.gaussian_filter(rng.random(shape), 1.5)
    return (head * (50 + 400 * texture)).astype(np.float32)


class _Record(tio.Transform):
    """Keeps a copy of the subject it sees (the augmented, re-degraded box)."""

    def __init__(self, seen: list[tio.Subject], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seen = seen
        self.args_names: list[str] = []

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        self.seen.append({k: (v.data.clone(), v.affine.copy()) for k, v in subject.get_images_dict().items()})
        return subject


def test_region_lr_approaches_the_whole_volume_lr_as_the_margin_grows() -> None:
    hr = _head((96, 96, 10))
    aligned = margin_errors(hr, np.eye(4), (16, 16, 8), [0, 4, 8, 16], boxes=6)
    rms = [r["rms_rel"] for r in aligned]
    assert all(a > b for a, b in zip(rms, rms[1:])), rms  # the cut faces' ringing fades with m
    assert rms[0] > 0.05  # no margin: the ringing reaches the region
    # m = 16 (the default): within 3% of the LR's 99.9th percentile anywhere, 1% RMS
    assert aligned[-1]["max_rel"] < 0.03 and aligned[-1]["rms_rel"] < 0.01
    # off the LR grid (an odd start with factor 2) the region interpolates between other samples
    unaligned = margin_errors(hr, np.eye(4), (16, 16, 8), [16], boxes=6, aligned=False)
    assert unaligned[0]["rms_rel"] > 2 * aligned[-1]["rms_rel"]


def test_region_keeps_lr_the_degradation_of_the_augmented_box_and_affines_right() -> None:
    hr = _head((64, 64, 24), seed=1)
    affine = np.array([[0.7, 0, 0, -20.0], [0, 0.7, 0, 5.0], [0, 0, 1.2, 3.0], [0, 0, 0, 1]])
    seen: list[dict] = []
    augment = realistic_hr_transform({"noise_p": 1.0, "bias_p": 1.0, "affine_p": 1.0, "snr": [10.0, 10.0]})
    region = RandomRegion((16, 16, 12), 8, tio.Compose([augment, DegradeSample((2, 2, 1), "linear", renormalize=False),
                                                         _Record(seen)]), grid=(2, 2, 1))
    subject = tio.Subject(hr=tio.ScalarImage(tensor=torch.from_numpy(hr)[None], affine=affine),
                          lr=tio.ScalarImage(tensor=torch.zeros((1, *hr.shape)), affine=affine),
                          input_scale=3.0, metric_scale=float(np.percentile(hr, 99.9)))
    torch.manual_seed(0)
    out = region(subject)
    # z (24 < 12 + 2 x 8) is kept whole: no cut face there, nothing to drop
    assert out["hr"].shape == out["lr"].shape == (1, 16, 16, 24)
    assert out["input_scale"] == 3.0 and out["metric_scale"] == subject["metric_scale"]  # unit kept
    box_hr, box_affine = seen[0]["hr"]
    box_lr, _ = seen[0]["lr"]
    assert box_hr.shape == (1, 32, 32, 24)  # R + 2 m on the axes that allow it
    np.testing.assert_allclose(box_lr[0].numpy(), degradation.degrade(box_hr[0].numpy(), (2, 2, 1), "linear"), atol=1e-5)
    # the output is the box without its margin, at the place the affines say
    x, y, z = region_offset(box_affine, out["hr"].affine)
    assert (x, y, z) == (8, 8, 0)
    np.testing.assert_array_equal(out["hr"].data, box_hr[:, 8:24, 8:24, :])
    np.testing.assert_array_equal(out["lr"].data, box_lr[:, 8:24, 8:24, :])
    np.testing.assert_allclose(out["lr"].affine, out["hr"].affine)
    ox, oy, oz = region_offset(affine, box_affine)
    assert ox % 2 == 0 and oy % 2 == 0  # the box starts on the whole volume's LR grid
    raw = hr[ox + x: ox + x + 16, oy + y: oy + y + 16, :]
    assert np.abs(out["hr"].data[0].numpy() - raw).mean() > 1.0  # augmented


def test_region_is_centred_on_foreground_and_auto_keeps_small_volumes_whole() -> None:
    vol = torch.zeros(1, 64, 64, 64)
    vol[:, 40:52, 6:18, 44:56] = 1.0  # 0.7% of the volume is foreground
    hits = 0
    torch.manual_seed(0)
    for _ in range(20):
        s = tio.Subject(hr=tio.ScalarImage(tensor=vol.clone()), lr=tio.ScalarImage(tensor=vol.clone()))
        out = RandomRegion((8, 8, 8), 0, tio.Compose([]))(s)
        hits += int(out["hr"].data.sum() > 0)
    assert hits == 20  # uniform boxes would hit it ~7% of the time
    same = tio.Compose([])
    small = tio.Subject(hr=tio.ScalarImage(tensor=torch.rand(1, 24, 24, 24)), lr=tio.ScalarImage(tensor=torch.rand(1, 24, 24, 24)))
    assert RandomRegion((8, 8, 8), 4, same, min_ratio=8.0)(small)["hr"].shape == (1, 24, 24, 24)  # 3.4x the box
    big = tio.Subject(hr=tio.ScalarImage(tensor=torch.rand(1, 40, 40, 40)), lr=tio.ScalarImage(tensor=torch.rand(1, 40, 40, 40)))
    assert RandomRegion((8, 8, 8), 4, same, min_ratio=8.0)(big)["hr"].shape == (1, 8, 8, 8)  # 15.6x


def _folder(root: Path, shape: tuple[int, int, int], n: int = 2) -> GlobSource:
    for i in range(n):
        (root / f"s{i}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(_head(shape, seed=i), np.diag([0.7, 0.7, 0.7, 1.0])), root / f"s{i}" / "t1.nii.gz")
    return GlobSource(str(root))


def test_datamodule_cuts_grid_aligned_hr_regions_in_the_whole_volume_unit(tmp_path: Path) -> None:
    """``augment=realistic`` (batched): the loader cuts HR regions (patch + 2 margin) starting on the LR
    grid, in the whole volume's unit; with no random transform the device step gives the whole
    volume's HR at the patch and the region's LR, close to the whole LR."""
    off = {k: 0.0 for k in ("affine_p", "elastic_p", "bias_p", "gamma_p", "noise_p")}
    dm = SRDataModule(_folder(tmp_path / "d", (64, 64, 24)), patch_size=8, samples_per_volume=4, batch_size=4,
                      queue_length=4, split_fractions=(1, 0, 0, 1), augment="realistic", augment_axes=[],
                      augment_options={**off, "roi_margin": 8})
    dm.setup()
    name = dm.split["train"][0]
    path = tmp_path / "d" / name / "t1.nii.gz"
    raw = nib.load(path).get_fdata(dtype=np.float32)
    scale = input_scale(degradation.degrade(raw, (2, 2, 1), "linear"))  # the whole LR's, independently
    hr_whole = raw / scale
    lr_whole = degradation.degrade(hr_whole, (2, 2, 1), "linear")
    regions = next(iter(dm.train_dataloader()))
    assert regions["hr"]["data"].shape == (4, 1, 24, 24, 24) and regions["input_scale"][0] == pytest.approx(scale, rel=1e-5)
    locations = regions["location"].clone()
    region_hr = regions["hr"]["data"].clone()
    batch = dm.on_after_batch_transfer(regions, 0)
    for i, (x, y, z) in enumerate(locations[:, :3].tolist()):
        assert x % 2 == 0 and y % 2 == 0  # region start = patch start - 8: on the LR grid of the degraded axes
        np.testing.assert_array_equal(batch["hr"]["data"][i, 0].numpy(), hr_whole[x:x + 8, y:y + 8, z:z + 8])
        lr = degradation.degrade(region_hr[i, 0].numpy(), (2, 2, 1), "linear")[8:16, 8:16, 8:16]
        np.testing.assert_allclose(batch["lr"]["data"][i, 0].numpy(), lr, atol=1e-5)
        if 8 <= z <= 24 - 16:  # the region inside the volume: within the margin's error of the whole LR
            err = np.abs(lr - lr_whole[x:x + 8, y:y + 8, z:z + 8]).max()
            assert err < 0.05 * float(np.percentile(lr_whole, 99.9))


def test_realistic_works_on_a_volume_smaller_than_the_region(tmp_path: Path) -> None:
    dm = SRDataModule(_folder(tmp_path / "d", (32, 32, 12)), patch_size=8, samples_per_volume=2, batch_size=2,
                      queue_length=4, split_fractions=(1, 0, 0, 1), augment="realistic",
                      augment_options={"noise_p": 1.0})
    dm.setup()
    regions = next(iter(dm.train_dataloader()))
    assert regions["hr"]["data"].shape == (2, 1, 40, 40, 24)  # 8 + 2 x 16 (z: 8 + 2 x 8): zero outside the volume
    batch = dm.on_after_batch_transfer(regions, 0)
    assert batch["lr"]["data"].shape == batch["hr"]["data"].shape == (2, 1, 8, 8, 8)
    assert torch.isfinite(batch["lr"]["data"]).all() and float(batch["hr"]["data"].std()) > 0


def test_roi_options_are_checked() -> None:
    assert realistic_roi(None, (40, 40, 40)) == ((96, 96, 96), 16, 8.0)  # auto by default
    assert realistic_roi({"roi": None}, (40, 40, 40)) == (None, 16, None)
    assert realistic_roi({"roi": 64, "roi_margin": 8}, (40, 40, 40)) == ((64, 64, 64), 8, None)
    assert realistic_roi({"roi": "auto"}, (128, 40, 40))[0] == (128, 96, 96)
    with pytest.raises(ValueError, match=r"augment_options.roi \[32, 64, 64\] must be >= the patch size \[40, 40, 40\]"):
        realistic_roi({"roi": [32, 64, 64]}, (40, 40, 40))
    for bad in ("big", [64, 64], 0, True):
        with pytest.raises(ValueError, match="augment_options.roi must be null, 'auto', an int >= 1 or 3 ints >= 1"):
            realistic_roi({"roi": bad}, (8, 8, 8))
    with pytest.raises(ValueError, match="augment_options.roi_margin must be an int >= 0"):
        realistic_roi({"roi_margin": -1}, (8, 8, 8))
    with pytest.raises(ValueError, match=r"augment_options.roi \[4, 4, 4\] must be >= the patch size \[8, 8, 8\]"):
        SRDataModule(GlobSource("/nonexistent"), patch_size=8, augment="realistic", augment_options={"roi": 4})
