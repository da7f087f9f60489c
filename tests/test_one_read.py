"""Every command reads its checkpoint once (one ``torch.load``) and ``mdcsrn-infer`` each input
once (one ``nibabel.load``): counted, not assumed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mdcsrn_lightning.cli import eval as eval_cli
from mdcsrn_lightning.cli import export as export_cli
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.inference import engines

from .test_inference import run_cli, write_tiny_checkpoint


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The paths given to ``torch.load`` and ``nibabel.load`` while the test runs."""
    seen: dict[str, list[str]] = {"torch": [], "nibabel": []}
    torch_load, nib_load = torch.load, nib.load

    def counted_torch(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["torch"].append(str(f))
        return torch_load(f, *args, **kwargs)

    def counted_nib(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["nibabel"].append(str(f))
        return nib_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_torch)
    monkeypatch.setattr(nib, "load", counted_nib)
    return seen


def _scans(folder: Path, names: tuple[str, ...] = ("a", "b", "c"), shape: tuple[int, ...] = (12, 10, 8)) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for i, name in enumerate(names):
        data = np.random.default_rng(i).uniform(10, 100, shape).astype(np.float32)
        out.append(folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(out[-1]))
    return out


def test_infer_reads_the_checkpoint_once_and_each_input_once(tmp_path: Path, monkeypatch, capsys, reads) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt", datamodule_hyper_parameters={"factors": [2, 2, 1]})
    inputs = _scans(tmp_path / "scans")
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={tmp_path / 'scans'}", f"output={tmp_path / 'sr'}",
                                f"ckpt={ckpt}", "patches.size=8", "data_consistency=true")
    assert code == 0, err
    assert len(json.loads(stdout.strip().splitlines()[-1])["outputs"]) == 3
    assert reads["torch"] == [str(ckpt)]
    assert sorted(reads["nibabel"]) == sorted(str(p) for p in inputs)


def test_eval_reads_each_checkpoint_once(tmp_path: Path, monkeypatch, capsys, reads) -> None:
    ckpts = [write_tiny_checkpoint(tmp_path / f"m{i}.ckpt", seed=i) for i in range(2)]
    (scan,) = _scans(tmp_path / "refs", ("hr",), (16, 16, 8))  # SSIM needs 11x11 slices
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{scan}]", "methods=[]", f"ckpts=[{ckpts[0]},{ckpts[1]}]",
                           "perceptual=[]", "segmentation=false", "panels=false", f"output_dir={tmp_path / 'ev'}",
                           f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 0, err
    assert sorted(reads["torch"]) == sorted(str(c) for c in ckpts)


def test_export_reads_the_checkpoint_once(tmp_path: Path, monkeypatch, capsys, reads) -> None:
    if not engines.engine_available("onnxruntime"):
        pytest.skip("ONNX export needs the onnx extra")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", "format=onnx", f"out={tmp_path / 'm.onnx'}",
                           "check=false")
    assert code == 0, err
    assert reads["torch"] == [str(ckpt)]


@pytest.mark.slow
def test_a_resume_reads_the_checkpoint_once_before_lightning(train_cfg, reads) -> None:
    first = train_cfg("trainer.max_epochs=1", "test=false")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    reads["torch"].clear()
    train(train_cfg("trainer.max_epochs=2", "test=false", f"ckpt_path={last}", run="second"))
    # ours (the checks, by path) and Lightning's restore (an open file object)
    assert reads["torch"].count(str(last)) == 1 and len(reads["torch"]) == 2, reads["torch"]


@pytest.mark.slow
def test_a_gan_run_reads_its_init_checkpoint_once(train_cfg, reads) -> None:
    from .test_wgan_module import TINY_D

    first = train_cfg("trainer.max_epochs=1", "test=false")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    reads["torch"].clear()
    train(train_cfg("loss=wgan_gp", *TINY_D, f"module.init_ckpt={last}", "module.critic_warmup_steps=1",
                    "trainer.max_epochs=1", "test=false", run="gan"))
    assert reads["torch"] == [str(last)]


def test_infer_holds_checked_inputs_within_its_memory_budget(tmp_path: Path, monkeypatch) -> None:
    """A folder beyond the memory budget: the inputs that fit are read once and held, the rest
    read to check, dropped and read again; never more than the budget's volumes plus one are held,
    and a bad last input still means nothing is written."""
    import gc
    import weakref

    from mdcsrn_lightning.inference import files
    from mdcsrn_lightning.inference.options import InferenceOptions

    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt", datamodule_hyper_parameters={"factors": [2, 2, 1]})
    inputs = _scans(tmp_path / "scans")  # three 12x10x8 float32 volumes: 3840 bytes each
    one_volume = 12 * 10 * 8 * 4
    reads: dict[str, int] = {}
    live: set[int] = set()
    most_live = [0]
    load = files.load_volume

    def counted(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        gc.collect()
        volume = load(source, *args, **kwargs)
        reads[volume.path.name] = reads.get(volume.path.name, 0) + 1
        live.add(id(volume))
        weakref.finalize(volume, live.discard, id(volume))
        most_live[0] = max(most_live[0], len(live))
        return volume

    monkeypatch.setattr(files, "load_volume", counted)
    options = InferenceOptions(patch_size=8, device="cpu")
    done = list(files.predict(tmp_path / "scans", tmp_path / "sr", ckpt, options=options, memory_budget=one_volume))
    assert [Path(d.output).name for d in done] == [p.name for p in inputs]
    assert reads == {"a.nii.gz": 1, "b.nii.gz": 2, "c.nii.gz": 2}  # a held; b and c beyond the budget
    assert most_live[0] == 2  # the held one and the one being read, never all three

    # the same folder with a bad last input: nothing written, though b and c were dropped
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.float32), np.eye(4)), str(inputs[2]))
    reads.clear()
    with pytest.raises(ValueError, match="c.nii.gz: the volume is all zero"):
        files.predict(tmp_path / "scans", tmp_path / "sr2", ckpt, options=options, memory_budget=one_volume)
    assert reads == {"a.nii.gz": 1, "b.nii.gz": 1, "c.nii.gz": 1}  # c failed its check: nothing read again
    assert not (tmp_path / "sr2").exists() or not any((tmp_path / "sr2").iterdir())
