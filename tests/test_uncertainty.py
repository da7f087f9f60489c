"""``uncertainty=true``: the mean over the symmetries of the degraded plane and its standard
deviation (inference/ensemble.py), written beside the output by ``mdcsrn-infer``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.ensemble import EnsembleInferer, plane_symmetries, symmetry_plane
from mdcsrn_lightning.inference.options import InferenceOptions

from .test_inference import ANATOMICAL, GEOMETRY_FIELDS, run_cli, write_tiny_checkpoint

OPTIONS = {"patch_size": 16, "margin": 2, "device": "cpu"}


def _pointwise() -> nn.Module:
    """1x1x1 convs only: equivariant to every transform of the grid."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 1), nn.ELU(), nn.Conv3d(4, 1, 1)).eval()


def _oriented() -> nn.Module:
    """A 3x3x3 conv with random weights: its answer depends on the input's orientation."""
    torch.manual_seed(1)
    return nn.Conv3d(1, 1, 3, padding=1, bias=False).eval()


@pytest.mark.parametrize("shape", [(12, 12, 7), (10, 13, 6)])
@pytest.mark.parametrize("net", [nn.Identity, _pointwise])
def test_an_equivariant_model_has_std_exactly_zero(shape: tuple[int, ...], net) -> None:
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    model = net().eval()
    single = build_inferer(model, InferenceOptions(**OPTIONS))
    ensemble = build_inferer(model, InferenceOptions(**OPTIONS, uncertainty=True))
    assert isinstance(ensemble, EnsembleInferer) and ensemble.name == f"ensemble[{single.name}]"
    mean, std = ensemble.mean_std(volume)
    assert mean.shape == std.shape == shape and mean.dtype == std.dtype == np.float32
    assert np.all(std == 0)
    np.testing.assert_allclose(mean, single(volume), rtol=0, atol=1e-6)
    assert len(plane_symmetries(shape)) == (8 if shape[0] == shape[1] else 4)


@pytest.mark.parametrize("shape", [(12, 12, 7), (10, 13, 6)])
def test_the_mean_of_an_oriented_model_is_the_average_of_the_mapped_back_passes(shape: tuple[int, ...]) -> None:
    volume = np.random.default_rng(1).random(shape, dtype=np.float32)
    net = _oriented()
    single = build_inferer(net, InferenceOptions(**OPTIONS))(volume)
    mean, std = build_inferer(net, InferenceOptions(**OPTIONS, uncertainty=True)).mean_std(volume)
    assert np.abs(mean - single).max() > 1e-3 and std.max() > 1e-3
    # the same numbers by hand: each transformed conv, mapped back
    outs = []
    with torch.no_grad():
        for k, flip in plane_symmetries(shape):
            x = np.flip(volume, 0) if flip else volume
            y = net(torch.from_numpy(np.rot90(x, k, (0, 1)).copy())[None, None])[0, 0].numpy()
            y = np.rot90(y, -k, (0, 1))
            outs.append(np.flip(y, 0) if flip else y)
    np.testing.assert_allclose(mean, np.mean(outs, axis=0), atol=1e-5)
    np.testing.assert_allclose(std, np.std(outs, axis=0), atol=1e-5)


def test_the_ensemble_wraps_the_exact_pass_too() -> None:
    from .test_inference import tiny_net

    volume = np.random.default_rng(2).random((9, 9, 8), dtype=np.float32)
    inferer = build_inferer(tiny_net(), InferenceOptions(stream=True, slab=3, device="cpu", uncertainty=True))
    mean, std = inferer.mean_std(volume)
    assert inferer.name.startswith("ensemble[") and mean.shape == std.shape == volume.shape and std.max() > 0


def test_infer_writes_the_std_beside_the_output_with_its_header(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out, std = tmp_path / "sr.nii.gz", tmp_path / "sr_std.nii.gz"
    args = [f"input={ANATOMICAL}", f"ckpt={ckpt}", "patches.size=24", "progress=false", "device=cpu"]
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, *args, f"output={out}", "uncertainty=true",
                                "data_consistency=true")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["std"] == [str(std)]
    a, b = nib.load(str(out)), nib.load(str(std))
    assert np.array_equal(a.affine, b.affine) and a.shape == b.shape
    for key in GEOMETRY_FIELDS:
        assert np.array_equal(a.header[key], b.header[key]), key
    spread = b.get_fdata(dtype=np.float32)
    scan = nib.load(str(ANATOMICAL)).get_fdata(dtype=np.float32)
    assert spread.min() >= 0 and 0 < spread.max() < scan.max()  # on the scan's intensity scale
    assert json.loads((tmp_path / "sr.json").read_text())["uncertainty"] is True
    # the single pass differs from the mean
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, *args, f"output={tmp_path / 'one.nii.gz'}",
                           "data_consistency=true")
    assert code == 0, err and not (tmp_path / "one_std.nii.gz").exists()
    assert not np.array_equal(nib.load(str(tmp_path / "one.nii.gz")).get_fdata(), a.get_fdata())


@pytest.mark.parametrize("case", ["exists", "folder", "collision"])
def test_a_bad_std_path_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out, std = tmp_path / "sr.nii.gz", tmp_path / "sr_std.nii.gz"
    if case == "exists":
        std.write_bytes(b"an earlier map")
        problem = "already exists"
    else:
        std.mkdir()
        problem = "is a folder"
    if case == "collision":  # a collection's std map collides with another input's output
        std.rmdir()
        scans = tmp_path / "scans"
        scans.mkdir()
        for name in ("a.nii.gz", "a_std.nii.gz"):
            nib.save(nib.load(str(ANATOMICAL)), str(scans / name))
        out, std, problem = tmp_path / "out", tmp_path / "out" / "a_std.nii.gz", "share this name"
    source = tmp_path / "scans" if case == "collision" else ANATOMICAL
    computed: list[int] = []
    monkeypatch.setattr(EnsembleInferer, "mean_std", lambda *a: computed.append(1))
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={source}", f"output={out}", f"ckpt={ckpt}",
                           "uncertainty=true", "device=cpu")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"mdcsrn-infer: error: {std}: ") and problem in line, line
    assert not computed and not (tmp_path / "sr.nii.gz").exists() and not (tmp_path / "sr.json").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("factors, plane", [((2, 2, 1), (0, 1)), ((1, 1, 4), (0, 1)), ((1, 2, 2), (1, 2)),
                                            ((2, 1, 2), (0, 2)), ((3, 3, 3), (0, 1))])
def test_the_symmetry_plane_is_the_one_whose_two_axes_share_a_factor(factors, plane) -> None:
    assert symmetry_plane(factors) == plane


def test_three_different_factors_have_no_symmetry_plane() -> None:
    with pytest.raises(ValueError, match="no two equal axes"):
        symmetry_plane((1, 2, 3))


def test_the_ensemble_turns_the_plane_it_is_given() -> None:
    volume = np.random.default_rng(3).random((7, 10, 10), dtype=np.float32)
    net = _oriented()
    mean, _ = build_inferer(net, InferenceOptions(**OPTIONS, uncertainty=True), plane=(1, 2)).mean_std(volume)
    outs = []
    with torch.no_grad():
        for k, flip in plane_symmetries(volume.shape, (1, 2)):
            x = np.flip(volume, 1) if flip else volume
            y = net(torch.from_numpy(np.rot90(x, k, (1, 2)).copy())[None, None])[0, 0].numpy()
            y = np.rot90(y, -k, (1, 2))
            outs.append(np.flip(y, 1) if flip else y)
    assert len(outs) == 8
    np.testing.assert_allclose(mean, np.mean(outs, axis=0), atol=1e-5)


@pytest.mark.parametrize("factors, plane", [("[1,2,2]", (1, 2)), ("[2,1,2]", (0, 2))])
def test_infer_averages_over_the_plane_of_the_requested_factors(tmp_path: Path, monkeypatch, capsys, factors,
                                                                 plane) -> None:
    from mdcsrn_lightning.inference import files

    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    planes: list[tuple[int, int]] = []
    real = files.build_inferer
    monkeypatch.setattr(files, "build_inferer", lambda *a, **k: planes.append(k["plane"]) or real(*a, **k))
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={tmp_path / 'sr.nii.gz'}",
                           f"ckpt={ckpt}", "degrade=true", f"factors={factors}", "uncertainty=true", "patches.size=24",
                           "progress=false", "device=cpu")
    assert code == 0, err
    assert planes == [plane] and (tmp_path / "sr_std.nii.gz").is_file()


def test_infer_refuses_uncertainty_for_factors_with_no_symmetry_plane(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={tmp_path / 'sr.nii.gz'}",
                           f"ckpt={ckpt}", "degrade=true", "factors=[1,2,3]", "uncertainty=true", "device=cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "uncertainty=true" in err and "no two equal axes" in err
    assert list(tmp_path.iterdir()) == [ckpt]
