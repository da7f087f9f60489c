"""``adapt=true``: per-scan self-supervised fine-tuning (inference/adapt.py) and its CLI path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mdcsrn_lightning.checkpoints import load_trained_model
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.inference import adapt as adapt_mod
from mdcsrn_lightning.inference.adapt import fine_tune, self_pairs
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.holdout import holdout_slab
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions
from mdcsrn_lightning.inference.permuted import apply_permuted, pair_factors

from .test_inference import ANATOMICAL, run_cli, tiny_net, write_tiny_checkpoint

FAST = {"network": "checkpoint", "steps": 4, "minutes": None, "patch": 8, "batch": 2, "validate_every": 2, "patience": 2}


def _scan(shape=(20, 18, 14), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) + 0.5).astype(np.float32)


def test_pair_factors_name_the_full_resolution_axis() -> None:
    assert pair_factors((2, 2, 1)) == (2, (1.0, 1.0, 2.0))
    assert pair_factors((1, 3, 3)) == (0, (3.0, 1.0, 1.0))
    for factors in ((2, 2, 2), (1, 1, 1)):
        with pytest.raises(InferenceError, match="full resolution") as info:
            pair_factors(factors)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("interpolation", ["linear", "zero_filled"])
def test_pairs_degrade_only_the_full_resolution_axis(interpolation: str) -> None:
    scan = _scan()
    x, y = self_pairs(scan, (2, 2, 1), interpolation)
    assert np.array_equal(y, scan) and x.shape == scan.shape
    assert not np.allclose(x, scan)
    # degraded along axis 2 only: each (i, j) line along axis 2 is changed on its own, so a
    # volume constant along axis 2 comes back unchanged (nothing to truncate there)
    flat = np.repeat(scan[:, :, :1], scan.shape[2], axis=2)
    fx, _ = self_pairs(flat, (2, 2, 1), interpolation)
    np.testing.assert_allclose(fx, flat, rtol=1e-4, atol=1e-4)


def test_permuted_application_restores_shapes_and_undoes_the_permutation() -> None:
    vol = _scan((10, 12, 8))
    seen: list[tuple[int, ...]] = []

    def identity(v: np.ndarray) -> np.ndarray:
        seen.append(v.shape)
        return v.copy()

    for order in ("01", "10", "average"):
        seen.clear()
        out = apply_permuted(identity, vol, (2, 2, 1), order)
        assert out.shape == vol.shape and out.dtype == np.float32
        np.testing.assert_array_equal(out, vol)
    assert seen == [(8, 12, 10), (10, 8, 12), (10, 8, 12), (8, 12, 10)]  # average: axis 0 first, then axis 1 first

    def mark_slot2(v: np.ndarray) -> np.ndarray:  # adds the index along the full-resolution slot
        return v + np.arange(v.shape[2], dtype=np.float32)[None, None, :]

    out = apply_permuted(mark_slot2, np.zeros((3, 4, 5), np.float32), (2, 2, 1), "01")
    expected = np.arange(3)[:, None, None] + np.arange(4)[None, :, None] + np.zeros((3, 4, 5))
    np.testing.assert_array_equal(out, expected)  # the restored axes are 0 and 1, never 2


def test_fine_tune_trains_a_copy_and_records_it() -> None:
    net = tiny_net(0).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model, result = fine_tune(net, _scan(), AdaptOptions(**FAST, lr=1e-3), progress=False, log=lambda m: None)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the given net is untouched
    assert result.steps >= 2 and len(result.losses) == result.steps
    record = result.record()
    assert record["used"] in ("adapted", "unadapted") and set(record["self_validation_psnr"]) == {"unadapted", "adapted"}
    assert (model is net) == (record["used"] == "unadapted")


def test_self_validation_falls_back_to_the_unadapted_model_when_adaptation_hurts() -> None:
    net = tiny_net(0).eval()

    def ruin(work: nn.Module, optimizer, x, y, bf16) -> float:  # a step that makes the model worse
        with torch.no_grad():
            for p in work.parameters():
                p.add_(torch.randn_like(p) * 5)
        return 1.0

    lines: list[str] = []
    model, result = fine_tune(net, _scan(), AdaptOptions(**FAST), progress=False, log=lines.append, step=ruin)
    assert model is net and result.used == "unadapted"
    assert result.stopped == "early" and result.steps == 4
    assert len(lines) == 1 and "using the unadapted model" in lines[0]


def test_adapting_inferer_with_unadapted_fallback_runs_the_plain_pass(monkeypatch) -> None:
    net = tiny_net(0).eval()
    vol = _scan()
    monkeypatch.setattr(adapt_mod, "fine_tune", lambda work, scan, options, **kw: (
        work, adapt_mod.Adaptation(used="unadapted")))
    options = InferenceOptions(device="cpu", patch_size=32)
    inferer = build_inferer(net, InferenceOptions(device="cpu", patch_size=32, adapt=AdaptOptions(**FAST)))
    np.testing.assert_allclose(inferer(vol), build_inferer(net, options)(vol), rtol=1e-6, atol=1e-6)
    assert inferer.name == "adapt[patches[torch]]" and inferer.adaptation.used == "unadapted"


@pytest.mark.parametrize("options, match", [
    ({"patch_size": 16, "adapt": AdaptOptions(**FAST, factors=(2, 2, 2))}, "no axis at full resolution"),
    ({"stream": True, "adapt": AdaptOptions(**FAST)}, "stream=true"),
    ({"engine": "openvino", "adapt": AdaptOptions(**FAST)}, "engine=openvino"),
])
def test_build_refuses_in_one_line(options, match) -> None:
    with pytest.raises(InferenceError, match=match) as info:
        build_inferer(tiny_net(0), InferenceOptions(device="cpu", **options))
    assert "\n" not in str(info.value)


def _signal_at(n: int, lo: int, hi: int) -> torch.Tensor:
    target = torch.zeros(n, 6, 6)
    target[lo:hi] = 1.0
    return target


def test_the_held_out_slab_sits_on_the_signal_not_at_the_edge() -> None:
    assert holdout_slab(_signal_at(50, 20, 30), held=6, patch=8) == (22, 28)
    assert holdout_slab(_signal_at(50, 0, 4), held=6, patch=8) == (0, 6)  # patches fit after it
    assert holdout_slab(torch.zeros(50, 6, 6), held=6, patch=8) == (22, 28)  # no signal: the middle


def test_the_held_out_slab_moves_the_least_way_that_leaves_a_patch_beside_it() -> None:
    # centred it would start at 8: 8 slices before, 8 after, no room for a 10-slice patch either side
    assert holdout_slab(_signal_at(20, 8, 12), held=4, patch=10) == (10, 14)
    assert holdout_slab(_signal_at(20, 6, 10), held=4, patch=10) == (6, 10)


@pytest.mark.parametrize("slab", [(22, 28), (0, 6), (44, 50), (10, 14)])
def test_training_patches_never_overlap_the_held_out_slab(slab: tuple[int, int]) -> None:
    n, patch = 50, 10
    x = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 12, 12).contiguous()
    options = AdaptOptions(**{**FAST, "patch": patch, "batch": 16})
    rng, starts = np.random.default_rng(0), set()
    for _ in range(40):
        bx, by = adapt_mod._random_batch(x, x, slab, options, rng)
        for patch_x in bx[:, 0]:
            rows = set(patch_x[:, 0, 0].int().tolist())
            assert not rows & set(range(*slab)), (slab, sorted(rows))
            starts.add(min(rows))
    allowed = [i for i in range(n - patch + 1) if i + patch <= slab[0] or i >= slab[1]]
    assert starts == set(allowed)  # every start beside the slab is drawn, on both sides


def test_a_scan_too_small_for_the_patch_is_refused_in_one_line() -> None:
    inferer = build_inferer(tiny_net(0), InferenceOptions(device="cpu", adapt=AdaptOptions(**{**FAST, "patch": 16})))
    with pytest.raises(InferenceError, match="smaller than adapt.patch=16 along axis 2"):
        inferer(_scan((20, 18, 14)))
    with pytest.raises(InferenceError, match="held-out slab"):
        inferer(_scan((18, 18, 18)))


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": -1.0}, {"holdout": 1.0}, {"order": "02"}, {"minutes": 0}])
def test_adapt_options_are_checked(bad) -> None:
    with pytest.raises(ValueError, match="adapt."):
        AdaptOptions(**bad)


ADAPT_ARGS = ("adapt=true", "adapt_options.steps=4", "adapt_options.validate_every=2", "adapt_options.patch=12",
              "adapt_options.batch=2", "adapt_options.minutes=null")


def test_cli_adapt_writes_an_output_its_record_and_the_adapted_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt")
    out, saved = tmp_path / "sr.nii.gz", tmp_path / "adapted.ckpt"
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}",
                                f"ckpt={ckpt}", "progress=false", "device=cpu", "patches.size=16", "degrade=true",
                                "factors=[2,2,1]", *ADAPT_ARGS, f"adapt_options.save={saved}")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert out.is_file() and summary["adapt"][0]["steps"] >= 2
    assert json.loads((tmp_path / "sr.json").read_text())["adapt"] == summary["adapt"][0]
    model = load_trained_model(saved)  # the training checkpoints' format
    assert model.net_config == load_trained_model(ckpt).net_config
    recorded = torch.load(saved, weights_only=True)["adapted"]
    assert recorded["scan"] == str(ANATOMICAL.resolve()) and recorded["steps"] == summary["adapt"][0]["steps"]


@pytest.mark.parametrize("extra, match", [
    (("adapt_options.patch=30",), "smaller than adapt.patch=30 along axis 2"),
    (("factors=[2,2,2]", "degrade=true"), "full resolution"),
    (("+adapt_options.bogus=1",), "adapt_options.bogus: unknown key"),
    (("adapt_options.flips=2",), "adapt.flips: true or false, got 2"),
])
def test_cli_adapt_refusals_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch, capsys, extra, match) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt")
    args = [a for a in ADAPT_ARGS if not any(a.split("=")[0] == e.split("=")[0] for e in extra)]
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={tmp_path / 'sr.nii.gz'}",
                           f"ckpt={ckpt}", "progress=false", "device=cpu", *args, *extra)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sr.nii.gz").exists()


def test_real_task_check_scores_both_models_on_the_scan_degraded_again() -> None:
    from mdcsrn_lightning.data.degradation import data_consistency, degrade

    scan = _scan((20, 18, 14), seed=4)
    options = AdaptOptions(**FAST, factors=(2, 2, 1), interpolation="zero_filled")
    identity = nn.Identity()
    identity.register_parameter("w", nn.Parameter(torch.zeros(1)))  # a device to read
    scores = adapt_mod.real_task_check(identity, identity, scan, options, size=16)
    crop = scan[2:18, 1:17, 0:14]
    low = degrade(crop, (2, 2, 1), "zero_filled")
    expected = data_consistency(low, low, (2, 2, 1), "zero_filled").astype(np.float64)
    psnr = 10 * np.log10(crop.max() ** 2 / np.mean((expected - crop) ** 2))
    assert scores["unadapted"] == pytest.approx(psnr, abs=1e-4)
    assert scores["adapted"] == pytest.approx(psnr, abs=1e-4)


def test_an_adapted_model_worse_on_the_real_task_is_not_used(monkeypatch) -> None:
    net = tiny_net(0).eval()
    scores = iter(range(20, 40))  # every validation better than the last: self-validation keeps the adapted model
    monkeypatch.setattr(adapt_mod, "self_validate", lambda *a: float(next(scores)))
    monkeypatch.setattr(adapt_mod, "real_task_check", lambda *a, **k: {"unadapted": 30.0, "adapted": 29.5})
    lines: list[str] = []
    model, result = fine_tune(net, _scan(), AdaptOptions(**FAST, lr=1e-3), progress=False, log=lines.append)
    assert result.best_step == 4 and result.psnr_adapted > result.psnr_unadapted
    assert model is net and result.used == "unadapted"
    assert result.record()["real_task_psnr"] == {"unadapted": 30.0, "adapted": 29.5}
    assert len(lines) == 1 and lines[0].endswith("real task one scale down 30.00 -> 29.50 dB: no better; "
                                                 "using the unadapted model")


def test_an_adapted_model_better_on_the_real_task_is_used(monkeypatch) -> None:
    net = tiny_net(0).eval()
    scores = iter(range(20, 40))
    monkeypatch.setattr(adapt_mod, "self_validate", lambda *a: float(next(scores)))
    monkeypatch.setattr(adapt_mod, "real_task_check", lambda *a, **k: {"unadapted": 30.0, "adapted": 30.5})
    model, result = fine_tune(net, _scan(), AdaptOptions(**FAST, lr=1e-3), progress=False, log=lambda m: None)
    assert model is not net and result.used == "adapted"


def test_adapt_with_uncertainty_fine_tunes_once_and_averages_the_adapted_application(monkeypatch) -> None:
    net = tiny_net(0).eval()
    tuned: list[int] = []
    real_fine_tune = adapt_mod.fine_tune
    monkeypatch.setattr(adapt_mod, "fine_tune", lambda *a, **k: tuned.append(1) or real_fine_tune(*a, **k))
    scores = iter(range(20, 40))  # self-validation and the real-task check keep the adapted model
    monkeypatch.setattr(adapt_mod, "self_validate", lambda *a: float(next(scores)))
    monkeypatch.setattr(adapt_mod, "real_task_check", lambda *a, **k: {"unadapted": 30.0, "adapted": 30.5})
    vol = _scan((16, 16, 12))
    inferer = build_inferer(net, InferenceOptions(device="cpu", patch_size=32, uncertainty=True,
                                                  adapt=AdaptOptions(**FAST, lr=1e-3)))
    mean, std = inferer.mean_std(vol)
    assert tuned == [1] and inferer.adaptation.used == "adapted"
    assert inferer.name == "ensemble[adapt[patches[torch]]]"
    # by hand: the adapted weights in a plain network, applied permuted, over the 8 symmetries of plane (0, 1)
    adapted = tiny_net(0)
    adapted.load_state_dict(inferer.adapted_state)
    plain = build_inferer(adapted.eval(), InferenceOptions(device="cpu", patch_size=32))
    outs = []
    for k in range(4):
        for flip in (False, True):
            moved = np.ascontiguousarray(np.rot90(np.flip(vol, 0) if flip else vol, k, (0, 1)))
            out = np.rot90(apply_permuted(plain, moved, (2, 2, 1), "average"), -k, (0, 1))
            outs.append(np.flip(out, 0) if flip else out)
    np.testing.assert_allclose(mean, np.mean(outs, axis=0), atol=1e-5)
    np.testing.assert_allclose(std, np.std(outs, axis=0), atol=1e-5)
    assert std.max() > 0
    for key, value in net.state_dict().items():  # the network the inferer holds is reset for the next scan
        assert torch.equal(inferer.work.state_dict()[key], value), key


# ------------------------------------------------------------------ thick-slice checkpoints
def test_thick_pairs_simulate_slices_along_an_inplane_axis_in_the_thick_slot() -> None:
    from mdcsrn_lightning.data import slices as S

    options = AdaptOptions(**FAST, interpolation="cubic", slice_factor=3, slice_axis=2)
    ramp0 = np.broadcast_to(np.sin(np.arange(18.0))[:, None, None], (18, 10, 12)).astype(np.float32)
    x, y = adapt_mod.thick_pairs(ramp0, options)
    assert x.shape == y.shape == (12, 10, 18) == adapt_mod.pair_shape(ramp0.shape, options)
    np.testing.assert_array_equal(y, np.swapaxes(ramp0, 0, 2))
    profile = S.slice_degrade(np.sin(np.arange(18.0))[None, None, :].astype(np.float32), 3, 3, 2, "boxcar", "cubic")
    np.testing.assert_allclose(x, np.broadcast_to(profile, x.shape), atol=1e-6)  # slices along the thick slot
    ramp1 = np.broadcast_to(np.sin(np.arange(10.0))[None, :, None], (10, 10, 12)).astype(np.float32)
    x, y = adapt_mod.thick_pairs(ramp1, options)  # constant along the simulated axis 0: nothing to lose
    np.testing.assert_allclose(x, y, atol=1e-6)


def _thick_setup(tmp_path: Path, s: int = 3) -> tuple[Path, Path]:
    from mdcsrn_lightning.data import slices as S
    from tests.test_thick_inference import _slices_ckpt, _thick_affine
    from tests.test_upsample import _hr, _save

    coarse = S.thick_slices(_hr((30, 28, 30)), s, s, 2)
    src = _save(tmp_path / "thick.nii.gz", coarse, _thick_affine(np.eye(4), 2, s))
    return src, _slices_ckpt(tmp_path)


def test_cli_adapts_a_thick_slice_checkpoint_and_applies_it_as_is(tmp_path: Path, monkeypatch, capsys) -> None:
    src, ckpt = _thick_setup(tmp_path)
    out, saved = tmp_path / "sr.nii.gz", tmp_path / "adapted.ckpt"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}",
                                "upsample=auto", "progress=false", "device=cpu", *ADAPT_ARGS,
                                "adapt_options.network=checkpoint", f"adapt_options.save={saved}")
    assert code == 0, err
    record = json.loads((tmp_path / "sr.json").read_text())["adapt"]
    assert record["steps"] == 4 and record["real_task_psnr"] == {}
    assert torch.load(saved, weights_only=True)["adapted"]["used"] == record["used"]
    # the output is the plain thick-slice pass of the model adaptation chose (no permutation)
    plain = tmp_path / "plain.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={plain}", f"ckpt={saved}",
                           "upsample=auto", "progress=false", "device=cpu")
    assert code == 0, err
    import nibabel as nib

    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), nib.load(str(plain)).get_fdata(), atol=1e-5)


def test_cli_thick_adapt_with_uncertainty_averages_the_adapted_model_over_the_inplane_symmetries(
        tmp_path: Path, monkeypatch, capsys) -> None:
    import nibabel as nib

    src, ckpt = _thick_setup(tmp_path)
    out, saved = tmp_path / "sr.nii.gz", tmp_path / "adapted.ckpt"
    common = ("upsample=auto", "progress=false", "device=cpu")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}", *common,
                           *ADAPT_ARGS, "uncertainty=true", "adapt_options.network=checkpoint",
                           f"adapt_options.save={saved}")
    assert code == 0, err
    assert (tmp_path / "sr_std.nii.gz").is_file() and json.loads((tmp_path / "sr.json").read_text())["uncertainty"]
    # the same numbers as the ensemble of the saved adapted checkpoint (thick axis 2: the plane of axes 0, 1)
    plain = tmp_path / "plain.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={plain}", f"ckpt={saved}",
                           *common, "uncertainty=true")
    assert code == 0, err
    for a, b in ((out, plain), (tmp_path / "sr_std.nii.gz", tmp_path / "plain_std.nii.gz")):
        np.testing.assert_allclose(nib.load(str(a)).get_fdata(), nib.load(str(b)).get_fdata(), atol=1e-5)


def test_cli_thick_adapt_refuses_inputs_of_different_slice_factors(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    src3, ckpt = _thick_setup(folder, 3)
    src3.rename(folder / "a3.nii.gz")
    src2, _ = _thick_setup(folder, 2)
    src2.rename(folder / "b2.nii.gz")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={folder}", f"output={tmp_path / 'out'}",
                           f"ckpt={ckpt}", "upsample=auto", "progress=false", "device=cpu", *ADAPT_ARGS)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a3.nii.gz has 3 fine voxels per slice" in err and "b2.nii.gz 2" in err
    assert not (tmp_path / "out").exists()


def test_epochs_cap_the_checkpoints_fine_tuning_steps() -> None:
    options = AdaptOptions(**{**FAST, "steps": 1000, "patience": 1000}, epochs=1.0)
    scan = _scan((20, 16, 12))
    _, result = fine_tune(tiny_net(0).eval(), scan, options, progress=False, log=lambda m: None)
    held = round(0.2 * 20)
    assert result.steps == int(np.ceil(20 * 16 * 12 * (1 - held / 20) / (2 * 8 ** 3))) == 3


@pytest.mark.parametrize("epochs", [0, -1.0, "many"])
def test_epochs_must_be_positive(epochs) -> None:
    with pytest.raises(ValueError, match="adapt.epochs"):
        AdaptOptions(epochs=epochs)
