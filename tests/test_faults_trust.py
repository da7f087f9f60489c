"""Bad input and faults, third round (issue 22): damaged checkpoints, memory bombs, atomic
export, the last tracebacks.

Same style as ``test_faults.py``: each case asserts the exit status, the one-line message
naming the file or key, and that nothing is left half-written (no output, no temporary file,
inputs unchanged). Tiny models (b1u2, k4) and tiny volumes; a damaged checkpoint is a real
small checkpoint with one byte flipped inside a tensor record of its zip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mdcsrn_lightning.checkpoints import CheckpointError, load_generator, read_checkpoint
from mdcsrn_lightning.cli import eval as eval_cli
from mdcsrn_lightning.cli import export as export_cli
from mdcsrn_lightning.cli import infer as infer_cli

from .test_faults import SRC, _no_temp_files, _one_line, _snapshot, _volume, fsync_enospc, small_disk  # noqa: F401 (fixtures)
from .test_inference import TINY_CONFIG, run_cli, write_tiny_checkpoint
from .test_realdata import tiny_registry  # noqa: F401 (fixture)


# ----------------------------------------------------------------------------- helpers
def _flip_byte_in_a_tensor(ckpt: Path) -> str:
    """Flip one bit in the middle of the largest tensor record of ``ckpt`` (a zip); its name."""
    blob = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        raw = archive.read(info)
    start = bytes(blob).find(raw)  # torch stores records uncompressed
    assert start > 0 and info.compress_type == zipfile.ZIP_STORED
    blob[start + len(raw) // 2 + 3] ^= 0x40  # a high exponent bit of a float32: values of ~1e36
    ckpt.write_bytes(bytes(blob))
    return info.filename


def _damaged_checkpoint(tmp_path: Path) -> tuple[Path, str]:
    ckpt = write_tiny_checkpoint(tmp_path / "damaged.ckpt")
    return ckpt, _flip_byte_in_a_tensor(ckpt)


# ----------------------------------------------------------------------------- item 1: damaged checkpoints
def test_a_flipped_bit_is_refused_by_the_one_reader(tmp_path: Path) -> None:
    ckpt, member = _damaged_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(ckpt)
    assert str(info.value) == f"{ckpt}: damaged checkpoint (CRC error in {member}); the file changed after it was written"
    with pytest.raises(CheckpointError, match="CRC error"):
        load_generator(ckpt)


def test_infer_refuses_a_damaged_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt, member = _damaged_checkpoint(tmp_path)
    src = _volume(tmp_path / "in" / "scan.nii.gz")
    before = _snapshot(tmp_path)
    out = tmp_path / "out" / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}")
    assert code == 2
    assert _one_line(err, "mdcsrn-infer") == (
        f"mdcsrn-infer: error: {ckpt}: damaged checkpoint (CRC error in {member}); the file changed after it was written")
    assert not out.parent.exists() and _snapshot(tmp_path) == before


def test_eval_refuses_a_damaged_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt, member = _damaged_checkpoint(tmp_path)
    ref = _volume(tmp_path / "hr.nii.gz", shape=(16, 16, 12))
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{ref}]", "methods=[trilinear]", f"ckpts=[{ckpt}]",
                           f"output_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 2 and f"{ckpt}: damaged checkpoint (CRC error in {member})" in _one_line(err, "mdcsrn-eval")
    assert not (tmp_path / "ev").exists()


def test_export_refuses_a_damaged_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnx")
    ckpt, _ = _damaged_checkpoint(tmp_path)
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", f"out={out}")
    assert code == 2 and "damaged checkpoint (CRC error in" in _one_line(err, "mdcsrn-export")
    assert not out.exists() and _no_temp_files(tmp_path)


def test_non_finite_weights_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "nan.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("weight"))
    checkpoint["state_dict"][key].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1.0])
    torch.save(checkpoint, ckpt)  # an intact archive (CRCs fine) of non-finite weights
    src = _volume(tmp_path / "scan.nii.gz")
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}")
    assert code == 2 and _one_line(err, "mdcsrn-infer") == (
        f"mdcsrn-infer: error: {ckpt}: 2 non-finite (NaN or Inf) weight value(s) in {key}; "
        "refused (a diverged run or a damaged file)")
    assert not out.exists()


@pytest.mark.parametrize("case", ["empty", "truncated"])
def test_infer_says_a_checkpoint_is_empty_or_truncated(tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    whole = write_tiny_checkpoint(tmp_path / "whole.ckpt").read_bytes()
    ckpt = tmp_path / f"{case}.ckpt"
    ckpt.write_bytes(b"" if case == "empty" else whole[: len(whole) // 2])
    src = _volume(tmp_path / "scan.nii.gz")
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}")
    line = _one_line(err, "mdcsrn-infer")
    expected = "empty file (0 bytes), not a checkpoint" if case == "empty" else "truncated or damaged checkpoint ("
    assert code == 2 and line.startswith(f"mdcsrn-infer: error: {ckpt}: {expected}"), line
    assert "Errno" not in line and "EOFError" not in line and not out.exists()


# ----------------------------------------------------------------------------- item 2: memory bombs
def test_a_small_checkpoint_claiming_a_huge_generator_allocates_nothing(tmp_path: Path) -> None:
    """b8u8 at growth rate 256 is ~0.5 G parameters (2.4 GB): refused before it is built."""
    ckpt = write_tiny_checkpoint(tmp_path / "bomb.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["net_config"] = {**TINY_CONFIG, "num_blocks": 8, "units_per_block": 8, "growth_rate": 256}
    torch.save(checkpoint, ckpt)
    assert ckpt.stat().st_size < 200_000
    src = _volume(tmp_path / "scan.nii.gz")
    out = tmp_path / "sr.nii.gz"
    code = textwrap.dedent(f"""
        import sys
        sys.argv = ["mdcsrn-infer", "input={src}", "output={out}", "ckpt={ckpt}"]
        from mdcsrn_lightning.cli.infer import main
        try:
            main()
        finally:
            # this process's own peak (getrusage's ru_maxrss keeps the forked parent's peak across
            # exec: a large pytest process would be counted)
            hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
            print("MAXRSS_KB", hwm.split()[1], file=sys.stderr)
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    peak_kb = int(lines[-1].split()[1])
    assert done.returncode == 2, done.stderr
    line = _one_line("\n".join(lines[:-1]), "mdcsrn-infer")
    assert line.startswith(f"mdcsrn-infer: error: {ckpt}: weights do not fit the stored architecture (")
    assert peak_kb < 1_500_000, f"peak RSS {peak_kb / 1e6:.2f} GB: the claimed generator was allocated"
    assert not out.exists()


# ----------------------------------------------------------------------------- item 3: volume size limit
@pytest.fixture
def default_voxel_limit():
    """Whatever a test sets, the next one starts from the default limit (available memory)."""
    from mdcsrn_lightning.data import volume_io

    yield volume_io
    volume_io.set_max_voxels(None)


def _claiming_nifti(path: Path, shape: tuple[int, int, int]) -> Path:
    """A small ``.nii.gz`` whose header claims ``shape`` (float32) but holds a few bytes of data."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 4096
    path.write_bytes(gzip.compress(raw))
    return path


def test_a_header_claiming_a_huge_volume_is_refused_before_decompressing(tmp_path: Path, monkeypatch, capsys,
                                                                          default_voxel_limit) -> None:
    bomb = _claiming_nifti(tmp_path / "bomb.nii.gz", (1400, 1400, 1400))  # ~11 GB of float32 claimed
    before = _snapshot(tmp_path)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "out" / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={bomb}", f"output={out}", f"ckpt={ckpt}",
                           "max_voxels=100000000")
    assert code == 2 and _one_line(err, "mdcsrn-infer") == (
        f"mdcsrn-infer: error: {bomb}: shape (1400, 1400, 1400) is 2,744,000,000 voxels, over the size limit of "
        "100,000,000 voxels (max_voxels=100000000); nothing was decompressed")
    assert not out.parent.exists() and _snapshot(tmp_path) == {**before, "tiny.ckpt": ckpt.read_bytes()}
    # the default limit (available memory / 32 bytes) refuses it too on any machine under 80 GB
    default_voxel_limit.set_max_voxels(None)
    if default_voxel_limit.max_voxels() < 1400**3:
        with pytest.raises(default_voxel_limit.VolumeError, match=r"raise it with max_voxels=<n>\); nothing was decompressed$"):
            default_voxel_limit.load_volume(bomb)


def test_max_voxels_applies_to_eval_references_and_is_checked(tmp_path: Path, monkeypatch, capsys,
                                                             default_voxel_limit) -> None:
    ref = _volume(tmp_path / "hr.nii.gz", shape=(12, 12, 10))
    args = [f"inputs=[{ref}]", "methods=[trilinear]", f"output_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}"]
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, *args, "max_voxels=1000")
    assert code == 2 and _one_line(err, "mdcsrn-eval") == (
        f"mdcsrn-eval: error: {ref}: shape (12, 12, 10) is 1,440 voxels, over the size limit of 1,000 voxels "
        "(max_voxels=1000); nothing was decompressed")
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, *args, "max_voxels=abc")
    assert code == 2 and _one_line(err, "mdcsrn-eval") == (
        "mdcsrn-eval: error: max_voxels='abc': expected a positive number of voxels or auto")
    assert not (tmp_path / "ev").exists()


# ----------------------------------------------------------------------------- item 4: atomic export
def _export_outputs(tmp_path: Path, fmt: str) -> list[Path]:
    return [tmp_path / "out" / "model.onnx"] if fmt == "onnx" else [tmp_path / "out" / "model.xml", tmp_path / "out" / "model.bin"]


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_on_a_full_disk_leaves_nothing_and_a_retry_works(tmp_path: Path, monkeypatch, capsys, fsync_enospc,
                                                                 fmt: str) -> None:
    pytest.importorskip("onnx" if fmt == "onnx" else "openvino")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    outputs = _export_outputs(tmp_path, fmt)
    args = [f"ckpt={ckpt}", f"format={fmt}", f"out={outputs[0]}", "check_size=[8,8,8]"]
    disable = fsync_enospc(lambda name: name.endswith(outputs[-1].suffix))  # the last file of the set
    code, _, err = run_cli(monkeypatch, capsys, export_cli, *args)
    assert code == 2 and _one_line(err, "mdcsrn-export") == (
        f"mdcsrn-export: error: {outputs[0]}: no space left on device; the previous file (if any) is kept")
    assert not any(p.exists() for p in outputs) and _no_temp_files(tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no temporary folder either
    disable()
    code, _, err = run_cli(monkeypatch, capsys, export_cli, *args)  # the retry does not say "exists"
    assert code == 0, err
    assert all(p.is_file() for p in outputs) and sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in outputs)


def test_export_to_a_read_only_folder_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnx")
    import errno

    from mdcsrn_lightning import atomic

    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "ro" / "model.onnx"
    out.parent.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    code, _, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", f"out={out}")
    assert code == 2 and _one_line(err, "mdcsrn-export") == (
        f"mdcsrn-export: error: {out}: not writable (Read-only file system)")
    assert list(out.parent.iterdir()) == []


def test_export_refuses_an_existing_side_file_and_keeps_it(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("openvino")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    xml, binary = _export_outputs(tmp_path, "openvino")
    binary.parent.mkdir()
    binary.write_bytes(b"another model's weights")
    code, _, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", "format=openvino", f"out={xml}")
    assert code == 2 and _one_line(err, "mdcsrn-export") == (
        f"mdcsrn-export: error: {binary}: already exists; pass overwrite=true to replace it")
    assert not xml.exists() and binary.read_bytes() == b"another model's weights" and _no_temp_files(tmp_path)


def test_real_full_disk_export(tmp_path: Path, small_disk: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnx")
    from .test_faults import _fill

    torch.manual_seed(0)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    _fill(small_disk, leave_kb=4)
    out = small_disk / "model.onnx"
    code, _, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", f"out={out}")
    line = _one_line(err, "mdcsrn-export")
    assert code == 2 and line.startswith(f"mdcsrn-export: error: {out}: "), line
    assert not out.exists() and _no_temp_files(small_disk) and sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# ----------------------------------------------------------------------------- item 6: critic vs patch size
def test_gan_on_patches_smaller_than_the_critic_is_one_line_before_anything(tmp_path: Path, monkeypatch, capsys) -> None:
    from mdcsrn_lightning.cli import train as train_cli
    from mdcsrn_lightning.release import RELEASED_WEIGHTS

    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, train_cli, "experiment=quickstart", "loss=wgan_gp",
                           f"module.init_ckpt={RELEASED_WEIGHTS}", "module.discriminator.pooled_size=3",
                           "logger=csv", f"hydra.run.dir={run}")
    assert code == 2 and _one_line(err, "mdcsrn-train") == (
        "mdcsrn-train: error: data.patch_size=24: smaller than the critic's minimum input of 33 per side "
        "(module.discriminator: 4 stride-2 convs, pooled_size=3); give data.patch_size>=33 or a critic that takes it "
        "(module.discriminator.pooled_size), or use experiment=quickstart_gan for the quickstart's data")
    assert not run.exists()


def test_the_readme_gan_pattern_on_the_quickstart_data_gets_a_critic_that_fits(tmp_path: Path) -> None:
    """``experiment=quickstart loss=wgan_gp module.init_ckpt=<L1>``: the critic pools to 2^3 for 24^3."""
    from hydra.utils import instantiate

    from mdcsrn_lightning.cli.train import check_run_config
    from mdcsrn_lightning.release import RELEASED_WEIGHTS

    from .conftest import compose_train

    cfg = compose_train(["experiment=quickstart", "loss=wgan_gp", f"module.init_ckpt={RELEASED_WEIGHTS}"], tmp_path / "run")
    assert cfg.module.discriminator.pooled_size == 2
    check_run_config(cfg)
    critic = instantiate(cfg.module.discriminator)
    assert critic.min_input_size <= 24 and critic(torch.zeros(1, 1, 24, 24, 24)).shape == (1, 1)
    paper = compose_train(["loss=wgan_gp", "depth=b8u4", f"module.init_ckpt={RELEASED_WEIGHTS}"], tmp_path / "paper")
    assert paper.data.patch_size == 40 and paper.module.discriminator.pooled_size == 3  # the paper's critic
    check_run_config(paper)


# ----------------------------------------------------------------------------- item 5: thin volumes in eval
def test_eval_refuses_a_thin_volume_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    good = _volume(tmp_path / "refs" / "a.nii.gz", shape=(12, 12, 10))
    thin = _volume(tmp_path / "refs" / "thin.nii.gz", shape=(3, 3, 300))  # mdcsrn-infer accepts it
    before = _snapshot(tmp_path / "refs")
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{good},{thin}]", "methods=[trilinear]",
                           f"output_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 2 and _one_line(err, "mdcsrn-eval") == (
        f"mdcsrn-eval: error: {thin}: slices across axis 2 are 3x3 voxels (shape (3, 3, 300)), smaller than the "
        "11x11 SSIM window; evaluation needs at least 11 voxels along axes 0 and 1")
    assert not (tmp_path / "ev").exists() and _snapshot(tmp_path / "refs") == before


# ----------------------------------------------------------------------------- item 7: the data cache
def test_a_damaged_cached_file_is_refused_on_use_and_listed_as_damaged(tiny_registry, capsys) -> None:
    from mdcsrn_lightning.cli import data as data_cli
    from mdcsrn_lightning.data import fetch

    cache, calls, files = tiny_registry["cache"], tiny_registry["calls"], tiny_registry["files"]
    path = fetch.fetch(["s1"])["s1"]
    assert fetch.read_manifest(path)["stamp"] == {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    assert fetch.data_path("s1") == path and len(calls) == 1
    path.write_bytes(b"damaged" + files["s1"][7:])  # right size, wrong content, a new mtime
    manifest_before = (cache / f"{path.name}.json").read_bytes()
    assert data_cli.main(["path", "s1"]) == 2
    err = capsys.readouterr().err
    assert _one_line(err, "mdcsrn-data") == (
        f"mdcsrn-data: error: {path}: cached s1 is damaged (its content is not the pinned sha256 "
        f"{fetch.REGISTRY_FILES['s1'].sha256[:12]}...); fetch it again: mdcsrn-data fetch s1")
    assert data_cli.main(["list"]) == 0
    listed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("s1\t"))
    assert listed.split("\t")[1] == "damaged (mdcsrn-data fetch s1)"
    assert (cache / f"{path.name}.json").read_bytes() == manifest_before and len(calls) == 1  # nothing changed
    assert data_cli.main(["fetch", "s1"]) == 0  # the fix the line names
    capsys.readouterr()
    assert path.read_bytes() == files["s1"] and fetch.data_path("s1") == path
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_touched_but_intact_cached_file_is_rehashed_once(tiny_registry, monkeypatch) -> None:
    from mdcsrn_lightning.data import fetch

    path = fetch.fetch(["s1"])["s1"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # e.g. copied with cp
    hashed = []
    real = fetch.sha256_of
    monkeypatch.setattr(fetch, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert fetch.data_path("s1") == path and hashed == [path]  # stamp differs: re-hashed, stamp renewed
    assert fetch.data_path("s1") == path and hashed == [path]  # stamp matches: trusted


# ----------------------------------------------------------------------------- minor: one line, exit 2
@pytest.mark.parametrize(("module", "prog", "override", "reason"), [
    ("train", "mdcsrn-train", "trainer.max_epochs=)", "extraneous input ')' expecting"),
    ("infer", "mdcsrn-infer", "input=[a", "no viable alternative at input '[a'"),
    ("eval", "mdcsrn-eval", "methods=[trilinear", "no viable alternative at input '[trilinear'"),
])
def test_hydra_grammar_errors_are_one_line_exit_2(tmp_path: Path, monkeypatch, capsys, module: str, prog: str,
                                                  override: str, reason: str) -> None:
    import importlib

    cli = importlib.import_module(f"mdcsrn_lightning.cli.{module}")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, cli, override, "output=sr.nii.gz")
    line = _one_line(err, prog)
    assert code == 2 and line.startswith(f"{prog}: error: {override}: {reason}"), line
    assert line.endswith("(Hydra override grammar: https://hydra.cc/docs/1.2/advanced/override_grammar/basic)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("target", "problem"), [
    ("builtins.dict", "not a Lightning Callback (a subclass of lightning.pytorch.Callback)"),
    ("no_such_module.Callback", "cannot be imported ("),
])
def test_a_callback_that_is_not_a_callback_is_one_line(tmp_path: Path, monkeypatch, capsys, target: str, problem: str) -> None:
    from mdcsrn_lightning.cli import train as train_cli

    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, train_cli, f"+callbacks.bad._target_={target}", "logger=csv",
                           f"hydra.run.dir={run}")
    line = _one_line(err, "mdcsrn-train")
    assert code == 2 and line.startswith(f"mdcsrn-train: error: callbacks.bad._target_={target}: {problem}"), line
    assert not run.exists()


@pytest.mark.parametrize("name", ["sr.mgz", "sr.png", "sr.img"])
def test_an_output_name_of_a_format_we_do_not_write_is_refused(tmp_path: Path, monkeypatch, capsys, name: str) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = _volume(tmp_path / "scan.nii.gz")
    out = tmp_path / name
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}")
    assert code == 2 and _one_line(err, "mdcsrn-infer") == (
        f"mdcsrn-infer: error: {out}: outputs are written as NIfTI only, not {out.suffix}; give output=<name>.nii.gz "
        "(or a folder name without a file extension)")
    assert not out.exists() and _no_temp_files(tmp_path)


def test_eval_to_a_read_only_folder_fails_before_computing(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    from mdcsrn_lightning.data import volume_write as nifti_io

    ref = _volume(tmp_path / "hr.nii.gz", shape=(12, 12, 10))
    out = tmp_path / "ro"
    out.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    computed = []
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: computed.append(1))
    monkeypatch.setattr(nifti_io.tempfile, "mkstemp", read_only)
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{ref}]", "methods=[trilinear]", f"output_dir={out}",
                           f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 2 and _one_line(err, "mdcsrn-eval") == (
        f"mdcsrn-eval: error: {out / 'results.json'}: not writable (Read-only file system)")
    assert not computed and list(out.iterdir()) == []


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "not readable as JSON (Expecting property name enclosed in double quotes"),
    ("[1, 2]", "expected a JSON object with 'methods', got list"),
    ('{"methods": {"trilinear": 31.5}}', "'methods' must map each method to its metrics (an object of objects)"),
])
def test_report_on_a_malformed_metrics_json_is_one_line(tmp_path: Path, capsys, content: str, problem: str) -> None:
    from mdcsrn_lightning.cli.report import main as report_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(content)
    assert report_main([str(run), "--out", str(tmp_path / "report")]) == 2
    assert _one_line(capsys.readouterr().err, "mdcsrn-report").startswith(
        f"mdcsrn-report: error: {run / 'metrics.json'}: {problem}")
    assert not (tmp_path / "report").exists()


def test_bench_unknown_task_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from mdcsrn_lightning.cli import bench as bench_cli

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, bench_cli, "bench.task=foo", "depth=b1u2", "width=k4")
    assert code == 2 and _one_line(err, "mdcsrn-bench") == (
        "mdcsrn-bench: error: bench.task='foo': choose one of ('infer', 'train', 'queue', 'volume', 'data')")
    assert out == ""


@pytest.mark.parametrize(("value", "problem"), [
    ('"${data.missing}"', "data.factors: '${data.missing}' cannot be resolved (Interpolation key 'data.missing' not found)"),
    ('"2x2x1"', "data.factors: '2x2x1' is not three positive numbers"),
])
def test_a_bad_run_config_beside_a_checkpoint_names_the_file_and_key(tmp_path: Path, monkeypatch, capsys, value: str,
                                                                      problem: str) -> None:
    run = tmp_path / "run"
    ckpt = write_tiny_checkpoint((run / "checkpoints").mkdir(parents=True) or run / "checkpoints" / "last.ckpt")
    config = run / ".hydra" / "config.yaml"
    config.parent.mkdir()
    config.write_text(f"data:\n  factors: {value}\n  interpolation: linear\n")
    src = _volume(tmp_path / "scan.nii.gz")
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}")
    assert code == 2 and _one_line(err, "mdcsrn-infer") == f"mdcsrn-infer: error: {config}: {problem}"
    assert not out.exists()
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{src}]", "methods=[]", f"ckpts=[{ckpt}]",
                           f"output_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 2 and _one_line(err, "mdcsrn-eval") == f"mdcsrn-eval: error: {config}: {problem}"
    assert not (tmp_path / "ev").exists()


def test_eval_over_references_of_different_voxel_sizes_warns_once(tmp_path: Path, monkeypatch, capsys) -> None:
    a = _volume(tmp_path / "refs" / "a.nii.gz", shape=(12, 12, 10), zooms=(1.0, 1.0, 1.0))
    b = _volume(tmp_path / "refs" / "b.nii.gz", shape=(12, 12, 10), zooms=(1.0, 1.0, 1.0), seed=1)
    c = _volume(tmp_path / "refs" / "c.nii.gz", shape=(12, 12, 10), zooms=(0.7, 0.7, 0.7), seed=2)
    with pytest.warns(UserWarning) as record:
        code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{a},{b},{c}]", "methods=[trilinear]",
                               "perceptual=[]", "segmentation=false", "panels=false",
                               f"output_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 0, err
    mixed = [str(w.message) for w in record if "different voxel sizes" in str(w.message)]
    assert mixed == [
        f"inputs: the volumes have 2 different voxel sizes (1x1x1 mm: 2 file(s), e.g. {a}; 0.7x0.7x0.7 mm: 1 file(s), "
        f"e.g. {c}); their metrics are compared across resolutions (the degradation and the slices are per voxel, not per mm)"]


def test_a_dicom_series_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, default_voxel_limit) -> None:
    from .test_inputs import phantom, write_dicom_series, write_nifti

    data = phantom()
    folder = tmp_path / "T1_MPRAGE"
    write_dicom_series(write_nifti(tmp_path / "scan.nii.gz", data), folder)
    default_voxel_limit.set_max_voxels(data.size - 1)
    with pytest.raises(default_voxel_limit.VolumeError) as info:
        default_voxel_limit.load_volume(folder)
    assert str(info.value).startswith(f"{folder}: shape (") and f"is {data.size:,} voxels, over the size limit of " \
        f"{data.size - 1:,} voxels (max_voxels={data.size - 1}); nothing was decompressed" in str(info.value)
    default_voxel_limit.set_max_voxels(data.size)
    assert default_voxel_limit.load_volume(folder).data.shape == data.shape
