"""``adapt.prior``: the plane network trained across scans, where thick-slice adaptation starts
(inference/plane_prior.py, planes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mdcsrn_lightning.inference import plane_data
from mdcsrn_lightning.inference import planes as planes_mod
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.inference.options import AdaptOptions
from mdcsrn_lightning.inference.plane_prior import load_prior, prior_pairs, save_prior, train_prior
from mdcsrn_lightning.inference.planes import train_planes
from mdcsrn_lightning.models.plane_net import PlaneNet
from mdcsrn_lightning.release import RELEASED_PLANE_PRIOR

from .test_inference import tiny_net
from .test_planes import FAST, KSPACE_FACTORS, THICK, _scan


def _volume(shape=(12, 10, 9), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 * rng.random(shape) + 50).astype(np.float32)


def test_the_prior_defaults_on_only_for_thick_slices() -> None:
    shape = (14, 12, 18)
    assert plane_data.fitted(shape, AdaptOptions(**THICK)).prior is True
    assert plane_data.fitted(shape, AdaptOptions(**THICK, prior=False)).prior is False
    assert plane_data.fitted(shape, AdaptOptions(**KSPACE_FACTORS)).prior is False  # 2x2x1: a training axis degraded
    # one degraded k-space axis: planes sharp both ways, but the prior learned slices, not truncation
    assert plane_data.fitted(shape, AdaptOptions(factors=(1, 1, 2))).prior is False
    assert plane_data.fitted(shape, AdaptOptions(factors=(1, 1, 2), prior=True)).prior is True


def test_the_prior_is_refused_in_one_line_where_a_training_plane_has_a_degraded_axis() -> None:
    with pytest.raises(InferenceError, match=r"adapt.prior=True needs training planes sharp along both axes") as info:
        plane_data.fitted((14, 12, 18), AdaptOptions(**KSPACE_FACTORS, prior=True))
    assert "\n" not in str(info.value) and "give adapt.prior=false" in str(info.value)
    with pytest.raises(ValueError, match="adapt.prior: true, false or null, got 'yes'"):
        AdaptOptions(prior="yes")  # type: ignore[arg-type]


def test_prior_pairs_cut_each_inplane_axis_into_slices_of_the_factor() -> None:
    from mdcsrn_lightning.data.slices import slice_degrade

    volume = _volume()
    pairs = prior_pairs(volume, 3, 0.0, 6, np.random.default_rng(0))
    assert len(pairs.stacks) == 2 and pairs.thick_length == 9
    for (x, y), order in zip(pairs.stacks, ((2, 0, 1), (2, 1, 0))):
        np.testing.assert_allclose(y.numpy(), np.transpose(volume, order))  # no noise asked: the volume itself
        # the input: boxcar slices of 3 voxels along H (order[1]), back by the cubic B-spline
        expected = slice_degrade(volume, 3, 3, order[1], "boxcar", "cubic")
        np.testing.assert_allclose(x.numpy(), np.transpose(expected, order), rtol=1e-5)
        assert not np.allclose(x.numpy(), y.numpy())
    x, y = pairs.crop(np.random.default_rng(1))
    assert tuple(x.shape) == tuple(y.shape) == (1, 1, 6, 6)
    assert pairs.layout is pairs.layout and pairs.layout == plane_data.plane_layout(pairs.options)  # worked out once


def test_train_prior_scales_each_volume_and_stops_at_its_budget() -> None:
    torch.manual_seed(0)
    net, record = train_prior([_volume(), 3 * _volume(seed=1)], [[2, 3], [2]], steps=3, patch=6, batch=4)
    assert isinstance(net, PlaneNet) and not net.training
    assert record["steps"] == 3 and record["factors"] == [[2, 3], [2]] and np.isfinite(record["last_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), PlaneNet().state_dict().values()))


@pytest.mark.parametrize(("volumes", "factors", "kwargs", "match"), [
    ([np.ones((8, 8, 8))], [[2]], {}, "give steps or minutes"),
    ([np.ones((8, 8, 8))], [[2], [3]], {"steps": 1}, "one list of factors per volume, got 1 volumes and 2"),
    ([np.ones((8, 8, 8))], [[1]], {"steps": 1, "patch": 6}, r"factors of volume 0 must be integers >= 2, got \[1\]"),
    ([np.ones((5, 8, 8))], [[2]], {"steps": 1, "patch": 6}, r"volume 0 \[5, 8, 8\] is smaller than patch=6"),
    ([np.zeros((8, 8, 8))], [[2]], {"steps": 1, "patch": 6}, "train_prior volume 0: the 99.9th percentile"),
])
def test_train_prior_refuses_bad_requests(volumes, factors, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        train_prior(volumes, factors, **kwargs)


def test_a_saved_prior_loads_back_the_same_network_and_record(tmp_path: Path) -> None:
    net = PlaneNet(channels=4, blocks=1)
    path = save_prior(net, {"steps": 7}, tmp_path / "prior.pt")
    loaded, record = load_prior(path)
    assert record == {"steps": 7} and (loaded.channels, loaded.blocks) == (4, 1)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir()] == ["prior.pt"]  # written whole: no temporary left


def test_load_prior_names_the_file_that_is_missing_or_not_a_prior(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match=r"missing.pt: the plane prior is missing .*give adapt.prior=false"):
        load_prior(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")  # another kind of checkpoint
    for name in ("garbage.pt", "other.pt"):
        with pytest.raises(InferenceError, match=rf"{name}: not a plane prior \(") as info:
            load_prior(tmp_path / name)
        assert "\n" not in str(info.value)


def test_the_released_prior_loads_weights_only_and_names_its_training_volumes() -> None:
    assert RELEASED_PLANE_PRIOR.stat().st_size < 1_000_000
    net, record = load_prior()
    assert (net.channels, net.blocks) == (32, 6)
    # the templates' training slabs and ITK's scan, never a scan results are reported on (S1, anatomical.nii)
    assert record["volumes"] and all(v.startswith(("icbm152_t1 slabs 1-3", "icbm152_t2 slabs 1-3", "itk_lowres"))
                                     for v in record["volumes"])
    assert any(v.startswith("itk_lowres") for v in record["volumes"])
    assert record["steps"] > 1000


@pytest.mark.parametrize("prior", [None, False])
def test_thick_slice_adaptation_starts_from_the_prior_unless_told_not_to(monkeypatch, prior) -> None:
    start = PlaneNet()
    with torch.no_grad():
        for p in start.parameters():
            p.fill_(0.01)
    monkeypatch.setattr(planes_mod, "checkpoint_score", lambda *a, **k: -np.inf)  # any plane network beats it
    monkeypatch.setattr(planes_mod, "load_prior", lambda: (start, {}))
    options = AdaptOptions(**{**FAST, "steps": 2, "validate_every": 1, "lr": 1e-9}, **THICK, prior=prior)
    net, record = train_planes(_scan(), options, tiny_net(), progress=False, log=lambda _: None)
    from_prior = all(torch.allclose(p, torch.full_like(p, 0.01)) for p in net.parameters())
    assert from_prior is (prior is None)  # two steps at lr 1e-9 leave the start as it was
    assert record.settings["prior"] == ("planenet_thick_prior.pt" if prior is None else None)
