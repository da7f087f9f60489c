"""HCP-size data: the HCP-layout generator, `mdcsrn-bench bench.task=data`, the degraded-volume
cache (reuse, invalidation, full disk). Tiny volumes, except the one slow test."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torchio as tio
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mdcsrn_lightning.atomic import WriteError
from mdcsrn_lightning.benchmark import conv_macs_per_voxel, data_task, markdown
from mdcsrn_lightning.benchmark.hcp_like import hcp_path, make_hcp_like, make_subject, subject_ids
from mdcsrn_lightning.cli import data as data_cli
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.data import cache as dm_mod
from mdcsrn_lightning.data.datamodule import SRDataModule
from mdcsrn_lightning.data.sources import GlobSource
from mdcsrn_lightning.models import MDCSRN
from tests.test_datamodule import _cohort, _count_degrade, _dm

TINY = (20, 22, 18)
TINY_MODEL = {"_target_": "mdcsrn_lightning.models.mdcsrn.MDCSRN", "num_blocks": 1, "units_per_block": 2, "growth_rate": 4}


def _hcp_cfg(root: Path) -> dict:
    """The `data=hcp` config (as the bench sees it, unresolved) with tiny queue settings."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "data=hcp", f"data.source.root={root}", "data.patch_size=8", "data.samples_per_volume=2",
            "data.queue_length=4", "data.batch_size=2",
        ])
    out = OmegaConf.to_container(cfg.data, resolve=False)
    assert isinstance(out, dict)
    return out


# ----------------------------------------------------------------------------- generator
def test_generator_writes_the_hcp_layout_with_the_grid_and_distinct_subjects(tmp_path: Path) -> None:
    out = make_hcp_like(tmp_path, 3, shape=TINY, spacing=8.0, seed=1)
    ids = subject_ids(3)
    assert ids == ["100000", "100001", "100002"] and out["made"] == 3 and out["skipped"] == 0
    paths = [hcp_path(tmp_path, s) for s in ids]
    assert out["paths"] == [str(p) for p in paths]
    assert paths[0] == tmp_path / "100000/unprocessed/3T/T1w_MPR1/100000_3T_T1w_MPR1.nii.gz"
    assert out["bytes"] == sum(p.stat().st_size for p in paths)
    volumes = []
    for p in paths:
        img = nib.load(str(p))
        assert img.shape == TINY and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(np.diag(img.affine)[:3], [8.0, 8.0, 8.0])
        assert int(img.header["sform_code"]) == 1 and img.header.get_xyzt_units() == ("mm", "sec")
        volumes.append(np.asarray(img.dataobj, dtype=np.float64))
    # a head, not noise: the brightest voxels sit inside, the corners are dark
    for v in volumes:
        assert v.max() > 300 and np.percentile(v, 99) > 10 * np.median(v[:2, :2, :2])
    # no two subjects alike; the same (seed, index) always the same
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.corrcoef(volumes[a].ravel(), volumes[b].ravel())[0, 1] < 0.995
    again, affine = make_subject(1, seed=1, shape=TINY, spacing=8.0)
    np.testing.assert_array_equal(again, volumes[1])
    np.testing.assert_allclose(affine, nib.load(str(paths[1])).affine)
    assert not np.array_equal(make_subject(1, seed=2, shape=TINY, spacing=8.0)[0], again)
    # the data=hcp pattern finds them, one subject id per folder
    cfg = _hcp_cfg(tmp_path)
    src = GlobSource(str(tmp_path), cfg["source"]["pattern"])
    assert src.subject_ids() == ids


def test_generator_is_idempotent_and_refuses_other_settings(tmp_path: Path) -> None:
    make_hcp_like(tmp_path, 2, shape=TINY, spacing=8.0)
    first = hcp_path(tmp_path, "100000")
    mtime = first.stat().st_mtime_ns
    out = make_hcp_like(tmp_path, 3, shape=TINY, spacing=8.0)
    assert out["made"] == 1 and out["skipped"] == 2 and first.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'hcp_like.json'}: this folder was made with .*seed"):
        make_hcp_like(tmp_path, 3, shape=TINY, spacing=8.0, seed=5)
    with pytest.raises(ValueError, match="shape must be 3 ints >= 2"):
        make_hcp_like(tmp_path / "x", 1, shape=(4, 4))
    with pytest.raises(ValueError, match="templates must be a non-empty list"):
        make_subject(0, shape=TINY, templates=("colin27",))  # type: ignore[arg-type]


def test_make_hcp_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["make-hcp", str(tmp_path), "--n", "2", "--shape", *map(str, TINY), "--spacing", "8"]
    assert data_cli.main(args) == 0
    assert f"{tmp_path}: 2 made" in capsys.readouterr().out
    assert data_cli.main(args) == 0
    assert "0 made (- s each), 2 already there" in capsys.readouterr().out
    assert data_cli.main([*args, "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mdcsrn-data: error: ") and "hcp_like.json" in err and "\n" not in err


# ----------------------------------------------------------------------------- cache
@pytest.mark.parametrize("change", [{"factors": (2, 1, 1)}, {"interpolation": "cubic"}])
def test_cache_is_recomputed_when_the_degradation_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict) -> None:
    root = _cohort(tmp_path / "data", n=4)
    cache = tmp_path / "cache"
    calls = _count_degrade(monkeypatch)
    _dm(root, cache_dir=str(cache)).setup()
    assert len(calls) == 4
    _dm(root, cache_dir=str(cache), split_file=None).setup()
    assert len(calls) == 4  # same settings: reused, no degradation
    changed = _dm(root, cache_dir=str(cache), **change)
    changed.setup()
    assert len(calls) == 8  # new settings: every subject degraded again
    metas = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert len(metas) == 8
    key, value = next(iter(change.items()))
    assert sum(m[key] == (list(map(float, value)) if key == "factors" else value) for m in metas) == 4
    # and what the queue serves is the new degradation
    (b,) = list(changed.val_dataloader())
    raw = nib.load(str(root / b["name"][0] / "t1.nii.gz")).get_fdata(dtype=np.float32)
    expected = np.asarray(_reference_degrade(raw, changed), dtype=np.float32)
    np.testing.assert_allclose(b["lr"][tio.DATA][0, 0].numpy(), expected / float(b["input_scale"][0]), rtol=1e-5, atol=1e-6)


def _reference_degrade(raw: np.ndarray, dm: SRDataModule) -> np.ndarray:
    from mdcsrn_lightning.data.degradation import kspace_truncate, to_fine_grid

    # the two published halves of the degradation, composed independently of degrade()
    return to_fine_grid(kspace_truncate(raw, dm.factors), dm.factors, dm.interpolation, raw.shape)


@pytest.mark.parametrize("where", ["lr", "meta"])
def test_full_disk_while_caching_is_one_line_naming_the_folder_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    root = _cohort(tmp_path / "data", n=4)
    cache = tmp_path / "cache"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "lr":
        monkeypatch.setattr(dm_mod.np, "save", full)
    else:  # the LR array is written, then the metadata fails: the array must go too
        monkeypatch.setattr(dm_mod.json, "dump", full)
    with pytest.raises(WriteError) as info:
        _dm(root, cache_dir=str(cache)).setup()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"{cache}: no space left on device for the degraded-volume cache (data.cache_dir; ")
    assert "MB per subject); free space there or point data.cache_dir elsewhere" in message
    assert [p.name for p in cache.iterdir()] == []  # no half-written, temporary or orphaned file
    monkeypatch.undo()
    _dm(root, cache_dir=str(cache)).setup()  # space again: the cache fills normally
    assert len(list(cache.glob("*.json"))) == 4 and len(list(cache.glob("*.npy"))) == 8  # HR and LR


# ----------------------------------------------------------------------------- bench
def test_bench_data_task_measures_each_n_in_a_fresh_process(tmp_path: Path) -> None:
    make_hcp_like(tmp_path / "hcp", 5, shape=TINY, spacing=8.0)
    cfg = _hcp_cfg(tmp_path / "hcp")
    work = tmp_path / "work"
    result = data_task(cfg, TINY_MODEL, subjects=[4, 5], workers=[0], augments=["paper", "realistic"], batches=3,
                       step_repeats=1, workdir=str(work), monai_subjects=2, raw_pairs=20, log=lambda m: None)
    assert [r["subjects"] for r in result["runs"]] == [4, 5] and result["volume_shape"] == list(TINY)
    s_mb = 8 * math.prod(TINY) / 2**20
    gpu = result["demand"]["gpu_patches_per_s_estimate"]
    for run, n in zip(result["runs"], [4, 5]):
        assert "error" not in run, run
        assert run["setup_degradations"] == n and sum(run["split"].values()) == n
        assert run["setup_seconds_per_subject"] == pytest.approx(run["setup_seconds"] / n)
        # the cached HR and LR (float32, .npy headers) and their metadata, per subject
        assert 8 * math.prod(TINY) < run["cache_bytes_per_subject"] < 8 * math.prod(TINY) + 4096
        assert run["subject_mb"] == pytest.approx(s_mb, abs=0.05)
        rows = {(q["path"], q["augment"], q["sampler"], q.get("cache", "warm"), q.get("device_step", True)): q
                for q in run["queue"]}
        assert [k[:4] for k in rows] == [
            ("raw", "none", "uniform", "warm"), ("raw", "none", "uniform", "cold"),
            ("new", "paper", "uniform", "warm"), ("today", "paper", "uniform", "warm"),
            ("new", "realistic", "uniform", "warm"), ("new", "realistic", "uniform", "warm"),
            ("today", "realistic", "uniform", "warm"),
            ("new", "paper", "label", "warm"), ("today", "paper", "label", "warm"),
            ("new", "paper", "uniform", "cold"), ("monai", "paper", "uniform", "warm"),
        ]
        assert ("new", "realistic", "uniform", "warm", False) in rows  # the loader alone (the GPU augments)
        rows = {k[:4]: q for k, q in rows.items() if k[4]}
        for q in run["queue"]:
            assert q["patches_per_s"] > 0 and q["supply_over_gpu_estimate"] == pytest.approx(q["patches_per_s"] / gpu)
        assert all(q["cache_reused"] for q in run["queue"] if q["path"] in ("new", "today"))  # no degradation again
        new = rows["new", "paper", "uniform", "warm"]
        assert new["cache_reused"] and new["workers"] == 0 and new["worker_peak_rss_mb"] is None
        assert new["batches"] == 3 and new["patches"] == 6
        assert new["vs_today"] == pytest.approx(new["patches_per_s"] / rows["today", "paper", "uniform", "warm"]["patches_per_s"])
        assert new["vs_monai"] == pytest.approx(new["patches_per_s"] / rows["monai", "paper", "uniform", "warm"]["patches_per_s"])
        assert rows["today", "paper", "uniform", "warm"]["batches"] == 3  # one fill (4 patches) and the next batch
        assert rows["monai", "paper", "uniform", "warm"]["subjects"] == min(2, run["split"]["train"])
        assert [c["what"] for c in run["rss_checks"]] == [
            "setup", "new paper uniform w=0", "today paper uniform w=0", "new realistic uniform w=0",
            "new realistic uniform w=0 loader only", "today realistic uniform w=0", "new paper label w=0",
            "today paper label w=0", "new paper uniform w=0 cold",
        ]
        assert all(c["within"] for c in run["rss_checks"]), run["rss_checks"]
        assert not (work / f"n{n}" / "cache").exists()  # deleted after the run (keep_cache=False)
        assert sorted(p.name for p in (work / f"n{n}" / "subjects").iterdir()) == subject_ids(n)
    d = result["demand"]
    assert d["batch"] == 2 and d["patch"] == 8 and d["cpu_seconds_per_step"] > 0
    # 3 x the forward conv MACs x 2 FLOPs, at the assumed 20 TFLOP/s
    macs = conv_macs_per_voxel(MDCSRN(1, 2, 4)) * 2 * 8**3
    assert d["step_flop"] == 6 * macs and d["gpu_seconds_per_step_estimate"] == pytest.approx(6 * macs / 20e12)
    assert result["rss_flat_in_n"]["flat"] and result["rss_flat_in_n"]["all_within_bound"]
    table = markdown(result)
    assert "| N (train) | setup s/subject | cache MB/subject |" in table
    assert table.count("| new | paper | uniform | 0 | warm |") == 2 and "**estimate**" in table and "flat in N" in table
    assert table.count("| monai (1 subjects) | paper |") == 1 and table.count("| monai (2 subjects) | paper |") == 1


def test_bench_data_task_argument_checks(tmp_path: Path) -> None:
    make_hcp_like(tmp_path / "hcp", 4, shape=TINY, spacing=8.0)
    cfg = _hcp_cfg(tmp_path / "hcp")
    with pytest.raises(ValueError, match="needs a folder source: data=hcp data.source.root="):
        data_task({**cfg, "source": {"_target_": "mdcsrn_lightning.data.sources.EmbeddedMNI152Source"}}, TINY_MODEL)
    with pytest.raises(ValueError, match=r"cohort sizes >= 4"):
        data_task(cfg, TINY_MODEL, subjects=[2])
    with pytest.raises(ValueError, match=r"holds 4 subjects, bench.data.subjects asks for 8"):
        data_task(cfg, TINY_MODEL, subjects=[8], workdir=str(tmp_path / "w"), log=lambda m: None)
    with pytest.raises(ValueError, match="bench.data.batches must be >= 2"):
        data_task(cfg, TINY_MODEL, batches=1)
    with pytest.raises(ValueError, match="bench.data.augments must be among none, paper, realistic"):
        data_task(cfg, TINY_MODEL, augments=["realistic_roi"])


# ----------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_full_size_hcp_subjects_set_up_and_feed_the_queue(tmp_path: Path) -> None:
    """Three 320x320x256 subjects: generated, degraded into the disk cache, batches drawn."""
    out = make_hcp_like(tmp_path / "hcp", 3)
    assert out["made"] == 3
    src = GlobSource(str(tmp_path / "hcp"), "*/unprocessed/3T/T1w_MPR1/*_3T_T1w_MPR1.nii.gz")
    dm = SRDataModule(src, split_fractions=(2, 1, 0, 0), queue_length=36, cache_dir=str(tmp_path / "cache"),
                      split_file=str(tmp_path / "split.json"))
    dm.setup("fit")
    assert all(e.hr_file.endswith(".hr.npy") for e in dm._entries.values())  # only metadata held
    assert len(list((tmp_path / "cache").glob("*.lr.npy"))) == len(list((tmp_path / "cache").glob("*.hr.npy"))) == 3
    it = iter(dm.train_dataloader())
    for _ in range(3):
        batch = next(it)
        assert batch["lr"][tio.DATA].shape == batch["hr"][tio.DATA].shape == (6, 1, 40, 40, 40)
    assert float(batch["hr"][tio.DATA].max()) > 0.3  # patches of a head on the LR's scale
