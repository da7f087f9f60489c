"""A checkpoint is data, never code: unsafe pickles and foreign `_target_`s are refused.

Every command that reads a checkpoint (mdcsrn-infer, -eval, -export, -train resume) is run
on crafted files; each must stop with one line and must not run the payload (a marker file
that the payload would create stays absent).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mdcsrn_lightning.checkpoints import CheckpointError, build_generator, load_generator, read_checkpoint
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.models import MDCSRN
from mdcsrn_lightning.models.generators import GENERATORS
from mdcsrn_lightning.models.reference import ReferenceMDCSRN
from mdcsrn_lightning.release import RELEASED_WEIGHTS

from .conftest import TINY

TINY_NET = {"_target_": "mdcsrn_lightning.models.mdcsrn.MDCSRN", "num_blocks": 1, "units_per_block": 2, "growth_rate": 4}


class _Payload:
    """Unpickling this runs ``os.system("touch <marker>")``, as an attacker's file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _tiny_state() -> dict[str, torch.Tensor]:
    net = build_generator(dict(TINY_NET))
    return {f"net.{k}": v for k, v in net.state_dict().items()}


def _evil_pickle(path: Path, marker: Path) -> Path:
    """A checkpoint that looks right (net_config, weights) and carries the payload."""
    torch.save({"net_config": dict(TINY_NET), "state_dict": _tiny_state(), "callbacks": _Payload(marker)}, path)
    return path


def _foreign_target(path: Path, marker: Path) -> Path:
    """Plain data only, but its net_config asks Hydra-style instantiation to run ``exec``."""
    config = {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w').close()"]}
    torch.save({"net_config": config, "state_dict": _tiny_state()}, path)
    return path


def test_the_payload_is_real(tmp_path: Path) -> None:
    # the control: an unrestricted load does run it, so the refusals below mean something
    marker = tmp_path / "PWNED"
    torch.load(_evil_pickle(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_read_refuses_an_unsafe_pickle_in_one_line(tmp_path: Path, monkeypatch) -> None:
    # an environment that switches torch's default off must not matter
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    evil = _evil_pickle(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(evil)
    message = str(info.value)
    assert "\n" not in message and str(evil) in message and "refused" in message
    assert "system" in message  # names what the file asked for
    assert not marker.exists()


def test_a_damaged_file_is_unreadable_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "random.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(CheckpointError, match=r"random\.ckpt: not a readable PyTorch checkpoint \(\w+: [^\n]+\)$"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"_target_": "os.system", "command": "true"}, "'os.system' is not one of our generators"),
        ({"_target_": "builtins.eval", "_args_": ["1"]}, "'builtins.eval' is not one of our generators"),
        # our package, but not a generator (and not a class at all)
        ({"_target_": "mdcsrn_lightning.models.discriminator.Discriminator3D"}, "not one of our generators"),
        ({"_target_": "mdcsrn_lightning.models.mdcsrn.count_parameters"}, "not one of our generators"),
        ({**TINY_NET, "_partial_": True}, "key '_partial_' is not a constructor argument"),
        ({**TINY_NET, "growth_rate": {"_target_": "builtins.eval", "_args_": ["4"]}}, "net_config.growth_rate: a nested mapping"),
        ({**TINY_NET, "no_such_argument": 1}, "MDCSRN cannot be built"),
        ({"num_blocks": 1}, "_target_ None is not one of our generators"),
    ],
)
def test_build_generator_allows_only_our_generators(config: dict, expected: str) -> None:
    with pytest.raises(ValueError, match="^.*" + expected.replace("(", r"\(").replace(")", r"\)")):
        build_generator(config)


def test_load_refuses_a_foreign_target_without_calling_it(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = _foreign_target(tmp_path / "exec.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"exec\.ckpt: _target_ 'builtins.exec' is not one of our generators"):
        load_generator(path)
    assert not marker.exists()


def test_every_shipped_model_config_is_allowed() -> None:
    targets = {OmegaConf.load(p)["_target_"] for p in (Path(config_dir()) / "model").glob("*.yaml")}
    assert targets and targets <= set(GENERATORS)
    assert GENERATORS["mdcsrn_lightning.models.reference.ReferenceMDCSRN"] is ReferenceMDCSRN
    assert GENERATORS["mdcsrn_lightning.models.MDCSRN"] is MDCSRN


def test_released_and_fresh_checkpoints_load(tmp_path: Path) -> None:
    net, config = load_generator(RELEASED_WEIGHTS)
    assert isinstance(net, MDCSRN) and config["_target_"] in GENERATORS
    # a freshly written one, built the way training stores it, gives back the same weights
    source = build_generator(dict(TINY_NET))
    path = tmp_path / "fresh.ckpt"
    torch.save({"net_config": dict(TINY_NET), "state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded, _ = load_generator(path)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def _nifti(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(0, 1, (12, 12, 8)).astype(np.float32), np.eye(4)), str(path))
    return path


def _commands(tmp_path: Path, ckpt: Path) -> dict[str, list[str]]:
    image = _nifti(tmp_path / "in.nii.gz")
    return {
        "mdcsrn-infer": ["mdcsrn_lightning.cli.infer", f"input={image}", f"output={tmp_path / 'out.nii.gz'}", f"ckpt={ckpt}"],
        "mdcsrn-eval": ["mdcsrn_lightning.cli.eval", f"inputs=[{image}]", f"ckpts=[{ckpt}]", "methods=[]",
                        "perceptual=[]", "segmentation=false", "panels=false", f"hydra.run.dir={tmp_path / 'eval'}"],
        "mdcsrn-export": ["mdcsrn_lightning.cli.export", f"ckpt={ckpt}", f"out={tmp_path / 'model.onnx'}"],
        "mdcsrn-train": ["mdcsrn_lightning.cli.train", *TINY, f"ckpt_path={ckpt}",
                         f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"],
        # the GAN's start from an L1 checkpoint
        "mdcsrn-train init_ckpt": ["mdcsrn_lightning.cli.train", *TINY, "loss=wgan_gp", f"module.init_ckpt={ckpt}",
                                   f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"],
    }


PROGRAMS = ["mdcsrn-infer", "mdcsrn-eval", "mdcsrn-export", "mdcsrn-train", "mdcsrn-train init_ckpt"]
# Lightning's resume reads the weights, not net_config: a foreign _target_ only matters to the rest
CASES = [(k, p) for k in ("pickle", "target") for p in PROGRAMS if (k, p) != ("target", "mdcsrn-train")]


# the reproduction runs in the fast suite; the other commands (a few seconds each) are slow
@pytest.mark.parametrize(
    ("kind", "prog"),
    [pytest.param(k, p, marks=() if (k, p) == ("pickle", "mdcsrn-infer") else pytest.mark.slow) for k, p in CASES],
)
def test_every_command_refuses_a_crafted_checkpoint_in_one_line(tmp_path: Path, kind: str, prog: str) -> None:
    marker = tmp_path / "PWNED"
    ckpt = (_evil_pickle if kind == "pickle" else _foreign_target)(tmp_path / "evil.ckpt", marker)
    # explicit weights_only=True: torch's default would yield to this variable
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": "1"}
    args = _commands(tmp_path, ckpt)[prog]
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith(f"{prog.split()[0]}: error: {ckpt}: "), proc.stderr[-2000:]
    assert ("refused" if kind == "pickle" else "'builtins.exec' is not one of our generators") in lines[-1]
    assert not marker.exists()
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "model.onnx").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lightning_resume_itself_loads_weights_only(train_cfg, tmp_path: Path, monkeypatch) -> None:
    # ckpt_path=last: Lightning finds <run>/checkpoints/last.ckpt and reads it itself; with
    # torch's default switched off by the environment, only an explicit weights_only=True holds
    from mdcsrn_lightning.cli.train import train

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = train_cfg("ckpt_path=last", "test=false")
    marker = tmp_path / "PWNED"
    (Path(cfg.paths.output_dir) / "checkpoints").mkdir(parents=True)
    _evil_pickle(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"^ckpt_path=last: refused: .*system") as info:
        train(cfg)
    assert "\n" not in str(info.value)
    assert not marker.exists()
