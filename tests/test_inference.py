"""Patch-wise whole-volume inference, file-level prediction and the `mdcsrn-infer` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mdcsrn_lightning.release import RELEASED_WEIGHTS
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.inference.patches import grid_for, super_resolve
from mdcsrn_lightning.checkpoints import CheckpointError, load_trained_model, resolve_checkpoint
from mdcsrn_lightning.inference.base import InferenceError, predict_volume
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.data.volume_io import VolumeError, collect_inputs
from mdcsrn_lightning.inference.files import plan_outputs
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.models import MDCSRN

from .conftest import randomize_batchnorm

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
TINY_CONFIG = {
    "_target_": "mdcsrn_lightning.models.mdcsrn.MDCSRN",
    "num_blocks": 1,
    "units_per_block": 2,
    "growth_rate": 4,
}
GEOMETRY_FIELDS = (
    "dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units",
)


def tiny_net(seed: int = 0, **kwargs: Any) -> MDCSRN:
    """A tiny generator with non-trivial BatchNorm running statistics, in eval mode."""
    torch.manual_seed(seed)
    net = MDCSRN(**{**{k: v for k, v in TINY_CONFIG.items() if k != "_target_"}, **kwargs})
    randomize_batchnorm(net, affine=False)
    return net.eval()


def write_tiny_checkpoint(path: Path, seed: int = 0, **extra: Any) -> Path:
    """What either LightningModule's checkpoint holds for inference: ``net.*`` weights and ``net_config``."""
    net = tiny_net(seed)
    state = {"net." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "net_config": dict(TINY_CONFIG), **extra}, path)
    return path


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, module: Any, *args: str) -> tuple[int, str, str]:
    """Run a Hydra command's ``main`` in-process: ``(exit status, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    code = 0
    try:
        module.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------- patches.py
def test_crop_merge_equals_one_whole_volume_pass() -> None:
    """No seams: with margin >= receptive-field radius, crop-merged patches == whole-volume forward."""
    net = tiny_net()
    radius = net.receptive_field_radius()
    vol = np.random.default_rng(0).random((20, 22, 17)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    assert grid_for(vol.shape, 14, radius) == ((14, 14, 14), (6, 6, 6))  # several patches per axis
    for batch_size in (1, 3):
        out = super_resolve(net, vol, patch_size=14, margin=radius, batch_size=batch_size, device="cpu")
        assert out.shape == vol.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, whole, atol=1e-5, rtol=0)
    # The "-r" variant has one more 3x3x3 conv: its radius, not the default's, is what matters.
    net_r = tiny_net(reconstruction="conv")
    with torch.no_grad():
        whole_r = net_r(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    out_r = super_resolve(net_r, vol, patch_size=(16, 14, 16), margin=net_r.receptive_field_radius())
    np.testing.assert_allclose(out_r, whole_r, atol=1e-5, rtol=0)


def test_margin_below_the_receptive_field_shows_seams() -> None:
    net = tiny_net()
    vol = np.random.default_rng(1).random((24, 24, 24)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    out = super_resolve(net, vol, patch_size=10, margin=1)
    assert np.abs(out - whole).max() > 1e-3


def test_volume_smaller_than_a_patch_and_odd_shapes() -> None:
    net = tiny_net()
    for shape in [(5, 7, 3), (1, 9, 40), (71, 2, 2)]:
        vol = np.random.default_rng(2).random(shape).astype(np.float32)
        with torch.no_grad():
            whole = net(torch.from_numpy(vol)[None, None])[0, 0].numpy()
        out = super_resolve(net, vol)  # default 70^3 patches, margin 3
        assert out.shape == shape
        np.testing.assert_allclose(out, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["crop", "average", "hann"])
def test_overlap_modes_reproduce_the_identity(mode: str) -> None:
    vol = np.random.default_rng(3).random((20, 17, 13)).astype(np.float32)
    out = super_resolve(nn.Identity(), vol, patch_size=8, margin=2, overlap_mode=mode, batch_size=4)
    np.testing.assert_allclose(out, vol, atol=1e-6)


def test_grid_for_clamps_and_checks() -> None:
    assert grid_for((100, 50, 6), 70, 3) == ((70, 50, 6), (6, 0, 0))
    with pytest.raises(ValueError, match="margin"):
        grid_for((100, 100, 100), 6, 3)
    with pytest.raises(ValueError):
        super_resolve(nn.Identity(), np.zeros((4, 4, 4)), overlap_mode="median")
    with pytest.raises(ValueError, match="3D"):
        super_resolve(nn.Identity(), np.zeros((4, 4)))


def test_bn_train_mode_uses_batch_statistics_and_leaves_the_net_alone() -> None:
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    vol = np.random.default_rng(4).random((16, 16, 16)).astype(np.float32)
    eval_out = super_resolve(net, vol, patch_size=16, margin=0)
    train_out = super_resolve(net, vol, patch_size=16, margin=0, bn_mode="train")
    assert np.abs(train_out - eval_out).max() > 1e-3
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training
    torch.manual_seed(0)
    ref = tiny_net()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.train()
    with torch.no_grad():
        expected = ref(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(train_out, expected, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close() -> None:
    net = tiny_net()
    vol = np.random.default_rng(5).random((12, 12, 12)).astype(np.float32)
    out32 = super_resolve(net, vol, patch_size=12, margin=0)
    out16 = super_resolve(net, vol, patch_size=12, margin=0, precision="bf16", device="cpu")
    assert out16.dtype == np.float32
    assert np.abs(out16 - out32).max() < 0.1


# ---------------------------------------------------------------------- files.py
class Times(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_normalisation_is_undone() -> None:
    vol = 1000.0 * np.random.default_rng(6).random((10, 11, 12)).astype(np.float32)
    np.testing.assert_allclose(predict_volume(build_inferer(nn.Identity()), vol), vol, rtol=1e-6)
    np.testing.assert_allclose(predict_volume(build_inferer(Times(2.0)), vol), 2 * vol, rtol=1e-6)

    seen = {}

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["max"] = float(x.max())
            return x

    predict_volume(build_inferer(Spy(), InferenceOptions(patch_size=70)), vol)
    assert seen["max"] == pytest.approx(float(vol.max() / np.percentile(vol, 99.9)), rel=1e-5)


def test_inputs_outputs_and_checkpoint_resolution(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for name in ("a.nii.gz", "b.nii", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"")
    files, many = collect_inputs(tmp_path / "in")
    assert [f.name for f in files] == ["a.nii.gz", "b.nii"] and many
    files, many = collect_inputs(str(tmp_path / "in" / "*.nii.gz"))
    assert [f.name for f in files] == ["a.nii.gz"] and many
    assert collect_inputs(tmp_path / "in" / "b.nii") == ([tmp_path / "in" / "b.nii"], False)
    with pytest.raises(VolumeError, match="no such file"):
        collect_inputs(tmp_path / "missing.nii.gz")
    with pytest.raises(VolumeError, match="no volume files or DICOM series folders match"):
        collect_inputs(str(tmp_path / "in" / "*.mgz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no .nii"):
        collect_inputs(tmp_path / "empty")
    assert plan_outputs([Path("x/a.nii.gz")], tmp_path / "o.nii.gz", False) == [tmp_path / "o.nii.gz"]
    assert plan_outputs([Path("x/a.nii.gz")], tmp_path / "dir", False) == [tmp_path / "dir" / "a_sr.nii.gz"]
    assert plan_outputs([Path("a.nii"), Path("b.nii")], tmp_path / "d", True) == [tmp_path / "d" / "a.nii", tmp_path / "d" / "b.nii"]
    # no checkpoint given: the released weights
    assert resolve_checkpoint(None) == RELEASED_WEIGHTS
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope.ckpt")


def test_trained_settings_come_from_the_checkpoint_or_its_run(tmp_path: Path) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "a.ckpt", datamodule_hyper_parameters={"interpolation": "cubic", "factors": [2, 2, 1]})
    assert load_trained_model(ckpt).data == {"interpolation": "cubic", "factors": [2, 2, 1]}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("data:\n  interpolation: zero_filled\n  normalize: none\n")
    ckpt = write_tiny_checkpoint(run / "checkpoints" / "last.ckpt")
    assert load_trained_model(ckpt).data == {"interpolation": "zero_filled", "normalize": "none"}
    assert load_trained_model(write_tiny_checkpoint(tmp_path / "plain.ckpt")).data == {}


# ---------------------------------------------------------------------- mdcsrn-infer
def _same_header(a: Path, b: Path) -> None:
    ia, ib = nib.load(str(a)), nib.load(str(b))
    assert np.array_equal(ia.affine, ib.affine)
    for key in GEOMETRY_FIELDS:
        assert np.array_equal(ia.header[key], ib.header[key]), key
    assert ia.header.get_zooms() == ib.header.get_zooms()
    assert ia.shape == ib.shape


def test_infer_real_nifti_keeps_affine_and_header(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "sr.nii.gz"
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}", "patches.size=20")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["outputs"] == [str(out)]
    _same_header(ANATOMICAL, out)
    sr = nib.load(str(out)).get_fdata(dtype=np.float32)
    assert sr.dtype == np.float32 and np.isfinite(sr).all()
    # On the input's intensity scale: the same as running the net by hand on the normalised input.
    data = nib.load(str(ANATOMICAL)).get_fdata(dtype=np.float32)
    scale = np.percentile(data, 99.9)
    with torch.no_grad():
        expected = tiny_net()(torch.from_numpy(data / scale)[None, None])[0, 0].numpy() * scale
    np.testing.assert_allclose(sr, expected, rtol=1e-4, atol=1e-3 * scale)


def test_infer_overwrite_and_degrade(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "sr.nii"
    args = [f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}"]
    assert run_cli(monkeypatch, capsys, infer_cli, *args)[0] == 0
    first = out.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, *args, "degrade=true")
    assert code == 2 and "already exists" in err and out.read_bytes() == first
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, *args, "degrade=true", "overwrite=true")
    assert code == 0, err
    assert out.read_bytes() != first  # the degraded input gives another result


def test_infer_folder_and_glob(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = tmp_path / "scans"
    src.mkdir()
    img = nib.load(str(ANATOMICAL))
    for name in ("s1.nii.gz", "s2.nii"):
        nib.save(img, str(src / name))
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={tmp_path / 'out'}", f"ckpt={ckpt}")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s1.json", "s1.nii.gz", "s2.json", "s2.nii"]
    _same_header(src / "s2.nii", tmp_path / "out" / "s2.nii")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f'input="{src}/*.nii.gz"', f"output={tmp_path / 'g'}", f"ckpt={ckpt}")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["s1.json", "s1.nii.gz"]  # + its provenance
    # Output folder == input folder: the inputs would be replaced; refused, nothing touched.
    before = (src / "s1.nii.gz").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={src}", f"ckpt={ckpt}", "overwrite=true")
    assert code == 2 and "input" in err and (src / "s1.nii.gz").read_bytes() == before


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    bad = tmp_path / "bad"
    bad.mkdir()
    four_d = bad / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(four_d))
    nan = bad / "nan.nii.gz"
    arr = np.ones((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    text = bad / "text.nii.gz"
    text.write_text("hello")
    return {
        "missing": (bad / "missing.nii.gz", "no such file"),
        "not_nifti": (text, "not readable as NIfTI"),
        "four_d": (four_d, "4D with 3 volumes"),
        "nan": (nan, "NaN"),
    }


@pytest.mark.parametrize("case", ["missing", "not_nifti", "four_d", "nan"])
def test_infer_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    path, problem = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "sr.nii.gz"
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={path}", f"output={out}", f"ckpt={ckpt}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mdcsrn-infer: error: {path}: ") and problem in lines[0]
    assert not out.exists() and not (tmp_path / "out").exists()


def test_infer_one_bad_file_in_a_folder_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = tmp_path / "scans"
    src.mkdir()
    nib.save(nib.load(str(ANATOMICAL)), str(src / "a_good.nii.gz"))
    (src / "b_bad.nii.gz").write_text("broken")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={tmp_path / 'out'}", f"ckpt={ckpt}")
    assert code == 2 and "b_bad.nii.gz" in err
    assert not (tmp_path / "out").exists()


# (no ckpt argument at all runs the released weights: tests/test_release.py)
@pytest.mark.parametrize("which", ["missing_file", "unreadable", "no_config", "wrong_weights"])
def test_infer_bad_checkpoint(tmp_path: Path, monkeypatch, capsys, which: str) -> None:
    ckpt = tmp_path / "model.ckpt"
    if which == "unreadable":
        ckpt.write_bytes(b"not a checkpoint")
    elif which == "no_config":
        torch.save({"state_dict": {}}, ckpt)
    elif which == "wrong_weights":
        torch.save({"state_dict": {"net.stem.weight": torch.zeros(1)}, "net_config": dict(TINY_CONFIG)}, ckpt)
    args = [f"input={ANATOMICAL}", f"output={tmp_path / 'sr.nii.gz'}", f"ckpt={ckpt}"]
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdcsrn-infer: error: ")
    assert str(ckpt) in lines[0]
    assert not (tmp_path / "sr.nii.gz").exists()


def test_infer_missing_input_argument(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"output={tmp_path / 'sr.nii.gz'}", "ckpt=x.ckpt")
    assert code == 2 and err.strip() == "mdcsrn-infer: error: input: required (input=scan.nii.gz)"


@pytest.mark.slow
def test_infer_on_the_mni152_template(tmp_path: Path, monkeypatch, capsys) -> None:
    from mdcsrn_lightning.data.sources import mni152_template_path

    template = Path(mni152_template_path())
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "mni_sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={template}", f"output={out}", f"ckpt={ckpt}", "patches.batch_size=2")
    assert code == 0, err
    _same_header(template, out)
    h = nib.load(str(out)).header
    assert (int(h["qform_code"]), int(h["sform_code"])) == (0, 2)  # the template's own codes


def test_infer_with_a_checkpoint_saved_by_lightning(tmp_path: Path, monkeypatch, capsys) -> None:
    """A real L1Module checkpoint (Lightning's own format): only the path is needed."""
    import functools

    import lightning as L

    from mdcsrn_lightning.training.l1_module import L1Module

    net = tiny_net(3)
    module = L1Module(net=net, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), net_config=dict(TINY_CONFIG))
    trainer = L.Trainer(
        max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    trainer.strategy.connect(module)
    ckpt = tmp_path / "l1.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}")
    assert code == 0, err
    data = nib.load(str(ANATOMICAL)).get_fdata(dtype=np.float32)
    scale = np.percentile(data, 99.9)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(data / scale)[None, None])[0, 0].numpy() * scale
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(dtype=np.float32), expected, rtol=1e-4, atol=1e-3 * scale)
