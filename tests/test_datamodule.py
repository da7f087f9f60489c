"""Split and data module: tiny synthetic volumes (24^3) and 8^3 patches only."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.augment import RandomRot90, Rot90
from mdcsrn_lightning.data.datamodule import SRDataModule
from mdcsrn_lightning.data.sources import EmbeddedMNI152Source, GlobSource, VolumeError
from mdcsrn_lightning.data.split import SplitError, load_or_create_split, make_split, read_split, split_counts

SMALL = dict(patch_size=8, samples_per_volume=2, batch_size=2, queue_length=4)


def _cohort(root: Path, n: int = 6, shape: tuple[int, int, int] = (24, 24, 24), vary_z: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        s = (shape[0], shape[1], shape[2] + i) if vary_z else shape
        (root / f"sub{i:02d}").mkdir(parents=True, exist_ok=True)
        data = (rng.random(s) * 100 + 10).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / f"sub{i:02d}" / "t1.nii.gz"))
    return root


def _dm(root: Path, **kwargs: object) -> SRDataModule:
    args = {**SMALL, **kwargs}
    return SRDataModule(GlobSource(str(root), "*/t1.nii.gz"), **args)  # type: ignore[arg-type]


def _count_degrade(monkeypatch: pytest.MonkeyPatch, fn=None) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = degradation.degrade

    def counting(volume: np.ndarray, factors=(2, 2, 1), interpolation="linear") -> np.ndarray:
        calls.append(tuple(volume.shape))
        return fn(volume) if fn is not None else real(volume, factors, interpolation)

    monkeypatch.setattr(degradation, "degrade", counting)
    return calls


# ----------------------------------------------------------------------------- split
def test_split_paper_proportions_are_exact_for_1113() -> None:
    names = [f"s{i:04d}" for i in range(1113)]
    split = make_split(names, (780, 111, 111, 111), seed=42)
    assert {k: len(v) for k, v in split.items()} == {"train": 780, "val": 111, "eval": 111, "test": 111}
    assert split_counts(1113) == {"train": 780, "val": 111, "eval": 111, "test": 111}


@pytest.mark.parametrize("n", [4, 5, 7, 30, 200])
def test_split_is_disjoint_covering_and_every_set_non_empty(n: int) -> None:
    names = [f"s{i}" for i in range(n)]
    split = make_split(names, seed=1)
    flat = [s for v in split.values() for s in v]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert all(len(v) >= 1 for v in split.values())
    assert min(len(split["val"]), len(split["eval"]), len(split["test"])) >= 1


def test_split_is_stable_for_a_seed_and_changes_with_another() -> None:
    names = [f"s{i}" for i in range(50)]
    a = make_split(names, seed=42)
    assert make_split(list(reversed(names)), seed=42) == a  # order of arrival does not matter
    assert make_split(names, seed=43) != a


def test_split_needs_enough_subjects_and_allows_an_empty_set() -> None:
    with pytest.raises(SplitError, match="cannot split 3 subject"):
        make_split(["a", "b", "c"])
    split = make_split(["a", "b", "c"], (780, 111, 0, 111))
    assert split["eval"] == [] and len(split["train"]) == 1
    with pytest.raises(ValueError, match="train fraction must be > 0"):
        split_counts(10, (0, 1, 1, 1))


def test_split_file_is_written_atomically_and_reused(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(10)]
    path = tmp_path / "run" / "split.json"
    first = load_or_create_split(names, seed=1, path=path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["split.json"]  # no temp file left
    on_disk = json.loads(path.read_text())
    assert on_disk["seed"] == 1 and {k: on_disk[k] for k in first} == first
    # Another seed, same file: the file wins (a resumed run keeps its split).
    assert load_or_create_split(names, seed=2, path=path) == first


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "split file is not readable JSON"),
        ('["a"]', "must hold a JSON object"),
        ('{"train": ["s0"], "val": ["s1"], "eval": ["s2"]}', "no list of subject ids under 'test'"),
        ('{"train": ["s0", "s1"], "val": ["s1"], "eval": ["s2"], "test": ["s3"]}', "'s1' is in both 'train' and 'val'"),
        ('{"train": ["s0", "zz"], "val": ["s1"], "eval": ["s2"], "test": ["s3"]}', r"names 1 subject\(s\) the data source does not have \(zz\)"),
    ],
    ids=["corrupt", "not-object", "missing-set", "twice", "foreign"],
)
def test_bad_split_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(SplitError, match=rf"^{path}: .*{message}"):
        read_split(path, known_subjects=[f"s{i}" for i in range(6)])


def test_datamodule_reuses_an_existing_split_file(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "data")
    mine = {"train": ["sub00", "sub01", "sub02"], "val": ["sub03"], "eval": ["sub04"], "test": ["sub05"]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(mine))
    dm = _dm(root, split_file=str(path), split_seed=999)
    dm.setup()
    assert dm.split == mine and dm.subjects["train"] == mine["train"]
    assert [s["name"] for s in dm.datasets["val"].dry_iter()] == ["sub03"]


def test_datamodule_writes_the_split_file_and_rejects_a_foreign_one(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "data")
    path = tmp_path / "run" / "split.json"
    dm = _dm(root, split_file=str(path))
    dm.setup()
    assert read_split(path) == dm.split
    path.write_text(json.dumps({"train": ["other"], "val": ["sub03"], "eval": ["sub04"], "test": ["sub05"]}))
    with pytest.raises(SplitError, match="does not have"):
        _dm(root, split_file=str(path)).setup()


# ----------------------------------------------------------------------------- batches
def test_train_batches_are_patches_and_val_batches_whole_volumes(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path))
    dm.prepare_data()
    dm.setup()
    assert {k: len(v) for k, v in dm.subjects.items()} == {"train": 3, "val": 1, "eval": 1, "test": 1}
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 3  # 3 subjects x 2 patches / batch 2
    for b in batches:
        lr, hr = b["lr"][tio.DATA], b["hr"][tio.DATA]
        assert lr.shape == hr.shape == (2, 1, 8, 8, 8) and lr.dtype == hr.dtype == torch.float32
        assert not torch.allclose(lr, hr)
        assert set(b["name"]) <= set(dm.subjects["train"])
    assert 0.0 <= float(hr.min()) and float(lr.max()) <= 1.5  # ~[0, 1]
    for name, get in (("val", dm.val_dataloader), ("test", dm.test_dataloader), ("eval", dm.eval_dataloader)):
        (b,) = list(get())
        assert b["hr"][tio.DATA].shape == b["lr"][tio.DATA].shape == (1, 1, 24, 24, 24)
        assert b["name"] == dm.subjects[name]
        # Both divided by the LR's own 99.9th percentile; the HR's reference travels along for the metrics.
        raw_hr = nib.load(str(tmp_path / b["name"][0] / "t1.nii.gz")).get_fdata(dtype=np.float32)
        raw_lr = degradation.degrade(raw_hr, (2, 2, 1), "linear")
        scale = float(np.percentile(raw_lr, 99.9))
        assert float(b["input_scale"][0]) == pytest.approx(scale, rel=1e-6)
        np.testing.assert_allclose(b["lr"][tio.DATA][0, 0].numpy(), raw_lr / scale, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["hr"][tio.DATA][0, 0].numpy(), raw_hr / scale, rtol=1e-5, atol=1e-6)
        assert float(b["metric_scale"][0]) == pytest.approx(np.percentile(raw_hr, 99.9) / scale, rel=1e-5)


def test_degradation_runs_once_per_subject_across_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_degrade(monkeypatch)
    dm = _dm(_cohort(tmp_path))
    dm.setup()
    dm.setup("fit")  # idempotent
    for epoch in range(3):
        dm.set_epoch(epoch)
        for _ in dm.train_dataloader():
            pass
        for _ in dm.val_dataloader():
            pass
    assert len(calls) == 6 and set(calls) == {(24, 24, 24)}


def test_disk_cache_is_reused_by_a_new_run_and_invalidated_by_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _cohort(tmp_path / "data")
    cache = tmp_path / "cache"
    calls = _count_degrade(monkeypatch)
    in_memory = _dm(root)
    in_memory.setup()
    assert len(calls) == 6
    first = _dm(root, cache_dir=str(cache))
    first.setup()
    assert len(calls) == 12 and len(list(cache.glob("*.json"))) == 6 and not list(cache.glob(".*tmp"))
    second = _dm(root, cache_dir=str(cache))
    second.setup()
    assert len(calls) == 12  # a new run degrades nothing
    # Lazily read (cache) and in-memory subjects hold the same normalised data.
    for a, b in zip(in_memory.datasets["val"], second.datasets["val"]):
        assert torch.equal(a["lr"][tio.DATA], b["lr"][tio.DATA]) and torch.equal(a["hr"][tio.DATA], b["hr"][tio.DATA])
    assert next(iter(second.train_dataloader()))["lr"][tio.DATA].shape == (2, 1, 8, 8, 8)
    # Rewriting one file changes its size/mtime key: only that subject is degraded again.
    data = np.full((24, 24, 24), 7.0, np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / "sub02" / "t1.nii.gz"))
    _dm(root, cache_dir=str(cache)).setup()
    assert len(calls) == 13
    # A damaged cache entry is recomputed, not trusted. (Damage a live one: sub02's old
    # entry is still on disk but no longer used, and glob order is the file system's.)
    live = next(p for p in sorted(cache.glob("*.json")) if json.loads(p.read_text())["name"] != "sub02")
    live.write_text("{half")
    _dm(root, cache_dir=str(cache)).setup()
    assert len(calls) == 14


def test_lazy_cached_subjects_load_in_queue_workers(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "data")
    dm = _dm(root, cache_dir=str(tmp_path / "cache"), num_workers=1)
    dm.setup()
    names = [n for b in dm.train_dataloader() for n in b["name"]]
    assert sorted(set(names)) == dm.subjects["train"] and len(names) == 6
    (b,) = list(dm.val_dataloader())
    assert b["lr"][tio.DATA].shape == (1, 1, 24, 24, 24)


def test_embedded_source_through_the_datamodule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_degrade(monkeypatch)
    src = EmbeddedMNI152Source(resolution=2, num_slabs=4)
    dm = SRDataModule(src, **SMALL)  # type: ignore[arg-type]
    dm.setup()
    assert calls == [(99, 117, 95)]  # the whole template, once
    (b,) = list(dm.val_dataloader())
    name = b["name"][0]
    lr = src.degraded(name, (2, 2, 1), "linear")
    scale = float(np.percentile(lr, 99.9))  # the slab's LR itself: what inference would see
    assert np.allclose(b["lr"][tio.DATA][0, 0].numpy(), lr / scale, atol=1e-6)
    assert np.allclose(b["hr"][tio.DATA][0, 0].numpy(), src.load(name).hr / scale, atol=1e-6)
    # Metrics keep the whole template's reference (not the slab's own).
    assert float(b["metric_scale"][0]) == pytest.approx(src.template_scale() / scale, rel=1e-6)
    assert next(iter(dm.train_dataloader()))["hr"][tio.DATA].shape == (2, 1, 8, 8, 8)


# ----------------------------------------------------------------------------- bad input
def test_too_small_volume_is_named_with_shape_and_patch(tmp_path: Path) -> None:
    root = _cohort(tmp_path)
    bad = root / "sub03" / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 24, 6), np.float32), np.eye(4)), str(bad))
    with pytest.raises(VolumeError, match=rf"^{bad}: volume shape \(24, 24, 6\) is smaller than the patch size \(8, 8, 8\)"):
        _dm(root).setup()


@pytest.mark.parametrize("kind", ["nan", "4d", "text"])
def test_bad_volume_fails_setup_naming_the_file(tmp_path: Path, kind: str) -> None:
    root = _cohort(tmp_path)
    bad = root / "sub04" / "t1.nii.gz"
    if kind == "text":
        bad.write_text("not an image")
        message = "not readable as NIfTI"
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((24, 24, 24, 2), np.float32), np.eye(4)), str(bad))
        message = "4D with 2 volumes"
    else:
        data = np.ones((24, 24, 24), np.float32)
        data[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
        message = "contains 1 NaN"
    with pytest.raises(VolumeError, match=rf"^{bad}: {message}"):
        _dm(root).setup()


def test_empty_glob_and_missing_root_through_the_datamodule(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="data root not found"):
        _dm(tmp_path / "missing").setup()
    with pytest.raises(VolumeError, match=r"no files match the pattern '\*/t1\.nii\.gz'"):
        _dm(tmp_path).setup()


def test_constructor_argument_checks(tmp_path: Path) -> None:
    src = GlobSource(str(tmp_path))
    bad = {
        "factors": ((2, 2), "factors must be 3"),
        "interpolation": ("bicubic", "interpolation must be one of"),
        "patch_size": (0, "patch_size must be an int >= 1"),
        "batch_size": (0, "batch_size must be an int >= 1"),
        "num_workers": (-1, "num_workers must be an int >= 0"),
        "split_fractions": ((1, 1, 1), "split fractions must be 4 numbers"),
        "normalize": ("zscore", "normalize must be one of"),
        "sampler": ("grid", "sampler must be one of"),
        "augment_axes": ((0, 0), "augment_axes must be distinct"),
        "queue_length": (10, r"queue_length \(10\) must be >= samples_per_volume \(18\)"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            SRDataModule(src, **{key: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs equal patch edges"):
        SRDataModule(src, patch_size=(8, 16, 8))
    SRDataModule(src, patch_size=(8, 16, 8), augment=False)
    SRDataModule(src, patch_size=(8, 8, 16))  # the rotation plane (0, 1) is square
    with pytest.raises(ValueError, match="give both world_size and rank"):
        SRDataModule(src, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        SRDataModule(src, world_size=2, rank=2)
    with pytest.raises(ValueError, match="source must be a VolumeSource"):
        SRDataModule(str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="call setup"):
        SRDataModule(src).train_dataloader()


def test_val_batch_size_needs_equal_shapes(tmp_path: Path) -> None:
    root = _cohort(tmp_path, n=8, vary_z=True)
    with pytest.raises(ValueError, match="val_batch_size=2 stacks whole volumes"):
        _dm(root, val_batch_size=2, split_fractions=(2, 2, 2, 2)).setup()


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_lr_and_hr_aligned_with_identity_degradation(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path), factors=(1, 1, 1), augment_axes=(0, 1, 2), samples_per_volume=6, queue_length=12,
             augment_on="loader")
    dm.setup()
    assert dm.rotation_planes == [(0, 1), (0, 2), (1, 2)]
    for b in dm.train_dataloader():
        assert torch.equal(b["lr"][tio.DATA], b["hr"][tio.DATA])


def test_augmentation_keeps_a_pointwise_degradation_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _count_degrade(monkeypatch, fn=lambda v: (2.0 * v + 1.0).astype(np.float32))
    dm = _dm(_cohort(tmp_path), normalize="none", samples_per_volume=6, queue_length=12)
    dm.setup()
    assert dm.flip_axes == (0, 1) and dm.rotation_planes == [(0, 1)]
    for b in dm.train_dataloader():
        before = b["hr"][tio.DATA].clone()
        b = dm.on_after_batch_transfer(b, 0)  # augment_on="device": the hook augments
        assert torch.allclose(b["lr"][tio.DATA], 2.0 * b["hr"][tio.DATA] + 1.0)
        assert torch.equal(b["hr"][tio.DATA].flatten(1).sort().values, before.flatten(1).sort().values)  # moved only


def test_rotation_and_flip_transforms_act_identically_on_both_images() -> None:
    data = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(1, 4, 4, 2)
    subject = tio.Subject(hr=tio.ScalarImage(tensor=data), lr=tio.ScalarImage(tensor=data * 3))
    rot = Rot90(1, (0, 1))(subject)
    assert torch.equal(rot["hr"].data, torch.rot90(data, 1, (1, 2)))
    assert torch.equal(rot.get_inverse_transform()(rot)["hr"].data, data)
    transform = tio.Compose([tio.RandomFlip(axes=(0, 1)), RandomRot90([(0, 1)])])
    torch.manual_seed(0)
    outs = set()
    for _ in range(30):
        out = transform(subject)
        assert torch.equal(out["lr"].data, 3 * out["hr"].data)
        outs.add(tuple(out["hr"].data.flatten().tolist()))
    assert len(outs) >= 6  # 8 distinct flip/rotation outcomes of the plane


def test_batches_are_reproducible_under_a_seed(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path), augment_on="loader")
    dm.setup()

    def run() -> list[torch.Tensor]:
        torch.manual_seed(123)
        return [b["hr"][tio.DATA] for b in dm.train_dataloader()]

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_label_sampler_centres_patches_in_the_foreground(tmp_path: Path) -> None:
    root = tmp_path
    for i in range(4):
        data = np.zeros((24, 24, 24), np.float32)
        data[10:22, 10:22, 10:22] = 50.0 + i
        (root / f"sub{i}").mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / f"sub{i}" / "t1.nii.gz"))
    dm = _dm(root, sampler="label", augment=False, samples_per_volume=8, queue_length=8)
    dm.setup()
    for b in dm.train_dataloader():
        assert torch.all(b["hr"][tio.DATA][:, 0, 4, 4, 4] > 0.05)


# ----------------------------------------------------------------------------- DDP
def test_two_ranks_get_disjoint_subject_shares_every_epoch(tmp_path: Path) -> None:
    root = _cohort(tmp_path, n=7)  # 4 train subjects: 2 per rank
    ranks = [_dm(root, world_size=2, rank=r, augment=False) for r in (0, 1)]
    for dm in ranks:
        dm.setup()
    train = set(ranks[0].subjects["train"])
    assert len(train) == 4 and ranks[0].split == ranks[1].split
    shares_by_epoch = []
    for epoch in range(3):
        shares = []
        for dm in ranks:
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
            assert dm.subject_sampler is not None and dm.subject_sampler.epoch == epoch
            seen = {n for b in loader for n in b["name"]}
            assert seen == {dm.datasets["train"][i]["name"] for i in dm.subject_sampler}
            shares.append(seen)
        assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == train
        shares_by_epoch.append(tuple(tuple(sorted(s)) for s in shares))
    assert len(set(shares_by_epoch)) > 1  # reshuffled across epochs


def test_lightning_calls_set_epoch_through_the_train_loader(tmp_path: Path) -> None:
    from lightning.pytorch import LightningModule, Trainer

    class Probe(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, int, str]] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            sampler = self.trainer.datamodule.subject_sampler
            self.seen += [(self.current_epoch, sampler.epoch, n) for n in batch["name"]]
            return (self.w * batch["lr"][tio.DATA].mean()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    # world_size/rank given explicitly: rank 0's share in a single process.
    dm = _dm(_cohort(tmp_path / "data", n=7), world_size=2, rank=0)
    model = Probe()
    trainer = Trainer(
        default_root_dir=str(tmp_path), max_epochs=3, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert {(e, s) for e, s, _ in model.seen} == {(0, 0), (1, 1), (2, 2)}
    assert len(model.seen) == 3 * 2 * 2  # 3 epochs x 2 subjects x 2 patches


def test_a_set_with_fraction_zero_has_no_loader_and_says_so(tmp_path: Path) -> None:
    dm = _dm(_cohort(tmp_path / "data", n=5), split_fractions=(3, 1, 0, 1))
    dm.setup("fit")
    assert [len(dm.split[s]) for s in ("train", "val", "eval", "test")] == [3, 1, 0, 1]
    assert len(dm.val_dataloader()) == 1 and len(dm.test_dataloader()) == 1
    with pytest.raises(ValueError, match="the eval set is empty"):
        dm.eval_dataloader()
