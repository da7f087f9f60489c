"""Bad input and faults: nothing lost, one clear line (issue 13, item 4).

Each case asserts the exit status, the one-line message naming the file or key, that inputs
are byte-identical afterwards and that no partial or temporary file is left. Commands run
in-process (their Hydra ``main``) except where a second process is the point: signals and
the run-folder lock. A full disk is a real 3 MB tmpfs where this machine lets us mount one
(root), and a mocked ENOSPC from ``fsync`` (where a delayed-allocation file system reports
it) everywhere.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mdcsrn_lightning import atomic
from mdcsrn_lightning.atomic import WriteError, is_temp_name, publish_new, remove_stale_temps, write_text
from mdcsrn_lightning.cli import eval as eval_cli
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.cli import train as train_cli
from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.data.sources import GlobSource
from mdcsrn_lightning.data.volume_io import VolumeError, load_volume
from mdcsrn_lightning.data import volume_write as nifti_io
from mdcsrn_lightning.inference.files import collect_inputs
from mdcsrn_lightning.runlock import acquire_run_lock
from mdcsrn_lightning.checkpoints import CheckpointError, load_generator
from mdcsrn_lightning.training.checkpoint_io import AtomicCheckpointIO
from mdcsrn_lightning.training.csv_logger import SafeCSVLogger

from .test_inference import TINY_CONFIG, run_cli, write_tiny_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ----------------------------------------------------------------------------- helpers
def _volume(path: Path, shape: tuple[int, ...] = (12, 12, 10), *, zooms: tuple[float, ...] | None = None,
            data: np.ndarray | None = None, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).random(shape).astype(np.float32) + 0.1 if data is None else data
    image = nib.Nifti1Image(arr, np.diag([1.0, 1.0, 1.0, 1.0]))
    if zooms is not None:
        image.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if is_temp_name(p.name)]


def _one_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") or lines[0].startswith(f"{prog}: interrupted"), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def fsync_enospc(monkeypatch: pytest.MonkeyPatch):
    """``disable = enable(pred)``: fsync of a file whose name satisfies ``pred`` fails with ENOSPC."""
    real = os.fsync
    full = [False]

    def enable(pred=lambda name: True):
        def fsync(fd: int) -> None:
            if full[0] and pred(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        full[0] = True
        monkeypatch.setattr(atomic.os, "fsync", fsync)
        return lambda: full.__setitem__(0, False)

    return enable


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (needs root and mount permission; elsewhere the mocked-ENOSPC tests cover this)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); ENOSPC is covered by the mocked tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave_kb: int) -> None:
    """Fill ``disk`` until about ``leave_kb`` KiB are free."""
    free_kb = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
    (disk / "filler").write_bytes(b"\0" * max(0, free_kb - leave_kb) * 1024)


# ----------------------------------------------------------------------------- atomic writes
def test_enospc_keeps_the_previous_file_and_says_so(tmp_path: Path, fsync_enospc) -> None:
    target = write_text(tmp_path / "metrics.json", "old\n")
    fsync_enospc()
    with pytest.raises(WriteError) as info:
        write_text(target, "new\n")
    assert str(info.value) == f"{target}: no space left on device; the previous file (if any) is kept"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_text() == "old\n" and _no_temp_files(tmp_path)


def test_real_full_disk_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    io = AtomicCheckpointIO()
    path = small_disk / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    _fill(small_disk, leave_kb=64)
    with pytest.raises(WriteError, match=rf"^{path}: no space left on device"):
        io.save_checkpoint({"w": torch.zeros(200_000)}, path)  # 800 KB
    assert path.read_bytes() == before and _no_temp_files(small_disk)
    assert torch.load(path, weights_only=True)["w"].shape == (10,)


def test_publish_new_never_replaces_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    """Two writers of one output: the one that publishes second fails, the first's file stays."""
    target = tmp_path / "sr.nii.gz"
    with pytest.raises(FileExistsError, match="already exists"):
        with publish_new(target) as tmp:
            tmp.write_bytes(b"second")
            target.write_bytes(b"first")  # the other process published while we wrote
    assert target.read_bytes() == b"first" and _no_temp_files(tmp_path)


def test_infer_without_overwrite_refuses_an_output_that_appears_during_the_write(tmp_path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = _volume(tmp_path / "in.nii.gz")
    out = tmp_path / "out" / "sr.nii.gz"
    real_save = nifti_io.nib.save

    def racing_save(image, filename):
        real_save(image, filename)
        out.write_bytes(b"the other run's result")

    monkeypatch.setattr(nifti_io.nib, "save", racing_save)
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}", "patches.size=8")
    assert code == 2 and _one_line(err, "mdcsrn-infer") == f"mdcsrn-infer: error: {out}: already exists; pass overwrite=true to replace it"
    assert out.read_bytes() == b"the other run's result" and _no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- temp files
def test_temp_files_are_never_inputs_and_stale_ones_are_removed(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    _volume(scans / "a.nii.gz")
    stale = scans / ".b.nii.gz.k3j9x0qz.part.nii.gz"  # what a SIGKILLed writer leaves
    stale.write_bytes(b"\x1f\x8b half a file")
    young = scans / ".c.nii.gz.abcdefgh.part.nii.gz"
    young.write_bytes(b"still being written")
    old = time.time() - atomic.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    assert is_temp_name(stale) and not is_temp_name(scans / "a.nii.gz")
    assert collect_inputs(scans)[0] == [scans / "a.nii.gz"]
    assert collect_inputs(str(scans / "*.nii.gz"))[0] == [scans / "a.nii.gz"]
    assert GlobSource(str(scans), pattern="**/*.nii.gz").subject_ids() == ["a"]
    assert remove_stale_temps(scans) == [stale]
    assert young.exists() and not stale.exists()


def _run_infer_killed(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path, Path, bytes]:
    """``mdcsrn-infer`` in a child whose NIfTI write stalls half-way; ``sig`` arrives then."""
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = _volume(tmp_path / "in.nii.gz")
    before = src.read_bytes()
    out = tmp_path / "out" / "sr.nii.gz"
    # SIGINT as in a foreground command: a suite started in the background (`cmd &` in a
    # non-interactive shell) hands its children SIGINT ignored, and Python then never raises
    # KeyboardInterrupt
    code = textwrap.dedent(f"""
        import signal, sys, time, nibabel
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def stalled_save(image, filename):
            open(filename, "wb").write(b"half")
            print("WRITING", flush=True)
            time.sleep(60)
        nibabel.save = stalled_save
        sys.argv = ["mdcsrn-infer", "input={src}", "output={out}", "ckpt={ckpt}", "patches.size=8", "progress=false"]
        from mdcsrn_lightning.cli.infer import main
        main()
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "WRITING" in line:
            break
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), src, out, before


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_the_write_leaves_no_partial_file(tmp_path: Path, sig: int, status: int) -> None:
    done, src, out, before = _run_infer_killed(tmp_path, sig)
    assert done.returncode == status, done.stderr
    line = _one_line(done.stderr, "mdcsrn-infer")
    assert "interrupted" in line and "no partial file" in line
    assert not out.exists() and _no_temp_files(tmp_path) and src.read_bytes() == before


# ----------------------------------------------------------------------------- inference requests
def test_folder_with_an_all_zero_volume_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    scans = tmp_path / "scans"
    _volume(scans / "a.nii.gz")
    zero = _volume(scans / "z.nii.gz", data=np.zeros((12, 12, 10), np.float32))
    before = _snapshot(scans)
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={scans}", f"output={tmp_path / 'out'}", f"ckpt={ckpt}")
    assert code == 2 and _one_line(err, "mdcsrn-infer") == f"mdcsrn-infer: error: {zero}: the volume is all zero"
    assert not (tmp_path / "out").exists() and _snapshot(scans) == before


@pytest.mark.parametrize("case", ["parent_is_a_file", "name_too_long", "read_only"])
def test_unwritable_output_fails_before_computing(tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = _volume(tmp_path / "in.nii.gz")
    if case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out, problem = tmp_path / "file" / "sr.nii.gz", "is a file, not a folder"
    elif case == "name_too_long":
        out, problem = tmp_path / ("x" * 235 + ".nii.gz"), "file name too long"  # fits, its temp name does not
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        out, problem = ro / "sr.nii.gz", "not writable (Read-only file system)"

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(nifti_io.tempfile, "mkstemp", read_only)
    computed = []
    monkeypatch.setattr("mdcsrn_lightning.inference.patches.super_resolve", lambda *a, **k: computed.append(1))
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}")
    line = _one_line(err, "mdcsrn-infer")
    assert code == 2 and line.startswith(f"mdcsrn-infer: error: {out}: ") and problem in line
    assert not computed and not out.exists()


def test_infer_disk_full_at_the_write_is_one_line(tmp_path: Path, monkeypatch, capsys, fsync_enospc) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    scans = tmp_path / "scans"
    for name in ("a", "b"):
        _volume(scans / f"{name}.nii.gz", seed=ord(name))
    out = tmp_path / "out"
    fsync_enospc(lambda name: "b.nii.gz" in name)  # the disk fills up at the second output
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={scans}", f"output={out}", f"ckpt={ckpt}", "patches.size=8")
    assert code == 2
    assert _one_line(err, "mdcsrn-infer") == f"mdcsrn-infer: error: {out / 'b.nii.gz'}: no space left on device; the previous file (if any) is kept"
    assert load_volume(out / "a.nii.gz").data.shape == (12, 12, 10)  # the finished one is whole
    assert not (out / "b.nii.gz").exists() and _no_temp_files(tmp_path)


def test_infer_on_a_real_full_disk(tmp_path: Path, small_disk: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = _volume(tmp_path / "in.nii.gz", shape=(40, 40, 40))  # ~250 KB of float32 noise
    _fill(small_disk, leave_kb=32)
    out = small_disk / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}", "patches.size=16")
    assert code == 2 and _one_line(err, "mdcsrn-infer").startswith(f"mdcsrn-infer: error: {out}: no space left on device")
    assert not out.exists() and _no_temp_files(small_disk)


@pytest.mark.parametrize(("device", "problem"), [("cuda", "no CUDA GPU is available"), ("foo", "unknown device")])
def test_infer_bad_device_is_one_line(tmp_path: Path, monkeypatch, capsys, device: str, problem: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    src = _volume(tmp_path / "in.nii.gz")
    out = tmp_path / "sr.nii.gz"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={src}", f"output={out}", f"ckpt={ckpt}", f"device={device}")
    line = _one_line(err, "mdcsrn-infer")
    assert code == 2 and line.startswith(f"mdcsrn-infer: error: device={device}: ") and problem in line
    assert not out.exists()


# ----------------------------------------------------------------------------- volumes
@pytest.mark.parametrize("zooms", [(1.0, 0.0, 1.0), (1.0, 1.0, -2.0)])
def test_zero_or_negative_voxel_sizes_are_refused(tmp_path: Path, zooms, monkeypatch, capsys) -> None:
    path = _volume(tmp_path / "bad.nii")
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.asarray(zooms, "<f4").tobytes()  # pixdim[1:4]; nibabel's writer would "fix" them
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeError, match=rf"^{path}: voxel sizes .* must be positive numbers$"):
        load_volume(path)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={path}", f"output={tmp_path / 'sr.nii.gz'}", f"ckpt={ckpt}")
    assert code == 2 and "must be positive numbers" in _one_line(err, "mdcsrn-infer")


def test_mgz_is_read_alike_by_training_and_inference(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((10, 12, 8)).astype(np.float32)
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(data, affine), str(path))
    loaded = load_volume(path)
    train_data, train_affine = loaded.data, loaded.affine
    infer_volume = load_volume(path, error=nifti_io.NiftiError)
    assert np.array_equal(train_data, data) and np.array_equal(infer_volume.data, data)
    assert np.allclose(train_affine, affine) and infer_volume.voxel_sizes == (2.0, 1.5, 1.0)
    out = nifti_io.write_like(tmp_path / "sr.nii.gz", data * 2, infer_volume)
    written = nib.load(str(out))
    assert np.allclose(written.affine, affine) and np.allclose(written.get_fdata(), data * 2)


def test_mixed_voxel_sizes_in_a_training_folder_warn_once(tmp_path: Path) -> None:
    _volume(tmp_path / "a.nii.gz", zooms=(1.0, 1.0, 1.0))
    _volume(tmp_path / "b.nii.gz", zooms=(1.0, 1.0, 1.0))
    _volume(tmp_path / "c.nii.gz", zooms=(2.0, 2.0, 2.0))
    _volume(tmp_path / "d.nii.gz", zooms=(1.0, 1.0, 3.0))
    source = GlobSource(str(tmp_path), pattern="*.nii.gz")
    with pytest.warns(UserWarning) as record:
        source.subject_ids()
        source.subject_ids()
    assert len(record) == 1
    message = str(record[0].message)
    assert "3 different voxel sizes" in message
    assert "1x1x1 mm: 2 file(s)" in message and "2x2x2 mm: 1 file(s)" in message and "1x1x3 mm: 1 file(s)" in message


def test_eval_all_zero_reference_names_its_file(tmp_path: Path, monkeypatch, capsys) -> None:
    zero = _volume(tmp_path / "zero.nii.gz", data=np.zeros((12, 12, 10), np.float32))
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{zero}]", "methods=[trilinear]",
                           f"output_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert code == 2 and _one_line(err, "mdcsrn-eval") == f"mdcsrn-eval: error: {zero}: the volume is all zero"
    assert not (tmp_path / "ev").exists()


def test_another_architecture_is_a_short_line(tmp_path: Path) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["net_config"] = {**TINY_CONFIG, "num_blocks": 2}  # weights of b1u2 under a b2u2 config
    torch.save(checkpoint, ckpt)
    with pytest.raises(CheckpointError) as info:
        load_generator(ckpt)
    message = str(info.value)
    assert len(message) < 600 and "\n" not in message, message
    assert message.startswith(f"{ckpt}: weights do not fit the stored architecture (") and " missing (" in message
    assert "more)" in message  # the rest is counted, not listed


# ----------------------------------------------------------------------------- training
def test_csv_logger_full_disk_and_resume_keep_every_row(tmp_path: Path, fsync_enospc) -> None:
    logger = SafeCSVLogger(tmp_path, name="csv", version="")
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.save()
    metrics = tmp_path / "csv" / "metrics.csv"
    before = metrics.read_bytes()
    logger.log_metrics({"train/loss": 0.1, "val/psnr": 30.0}, step=3)  # a new column: a full rewrite
    disable = fsync_enospc()
    with pytest.raises(WriteError, match=rf"^{metrics}: no space left"):
        logger.save()
    assert metrics.read_bytes() == before and _no_temp_files(tmp_path)
    logger.finalize("failed")  # after a failure it must not mask that failure (no raise)
    disable()

    # a run resumed in the same folder from step 2 keeps steps 0 and 1 and redoes step 2
    resumed = SafeCSVLogger(tmp_path, name="csv", version="")
    resumed.log_metrics({"train/loss": 0.3}, step=2)
    resumed.log_metrics({"train/loss": 0.2}, step=3)
    resumed.save()
    rows = metrics.read_text().splitlines()
    assert rows[0] == "step,train/loss"
    assert rows[1:] == ["0,1.0", "1,0.5", "2,0.3", "3,0.2"]


def test_resume_in_place_keeps_the_earlier_csv_rows(train_cfg) -> None:
    first = train_cfg("trainer.max_epochs=1")
    train(first)
    run = Path(first.paths.output_dir)
    rows_before = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows_before) >= 3
    second = train_cfg("trainer.max_epochs=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert Path(second.paths.output_dir) == run
    train(second)
    rows_after = (run / "csv" / "metrics.csv").read_text().splitlines()
    step = rows_before[0].split(",").index("step")
    steps_before = [int(r.split(",")[step]) for r in rows_before[1:]]
    steps_after = [int(r.split(",")[step]) for r in rows_after[1:]]
    assert steps_before == [0, 1, 1, 2]  # train 0, 1; val at 1; test at 2
    # the first run's rows before the resumed step (2) are kept verbatim; its test row (step 2)
    # is replaced by what the resumed run logged from step 2 on
    kept = [r for r, s_ in zip(rows_before[1:], steps_before) if s_ < 2]
    assert rows_after[0] == rows_before[0] and rows_after[1 : 1 + len(kept)] == kept
    assert steps_after == [0, 1, 1, 2, 3, 3, 4]


def test_checkpoint_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, capsys, fsync_enospc) -> None:
    from .conftest import TINY

    run = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", "test=false"]
    code, _, err = run_cli(monkeypatch, capsys, train_cli, *args)
    assert code == 0, err
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    fsync_enospc(lambda name: name.endswith(".ckpt"))
    code, _, err = run_cli(monkeypatch, capsys, train_cli, *args, "trainer.max_epochs=2", f"ckpt_path={last}")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("mdcsrn-train: error: ") and f"{run / 'checkpoints'}" in line and "no space left on device" in line
    assert "Traceback" not in err
    assert last.read_bytes() == before and _no_temp_files(run)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt_path={tmp}/missing.ckpt"], "ckpt_path={tmp}/missing.ckpt: no such checkpoint file"),
        (["ckpt_path={tmp}/random.ckpt"], "ckpt_path={tmp}/random.ckpt: not a readable PyTorch checkpoint"),
        (["ckpt_path={tmp}/truncated.ckpt"], "ckpt_path={tmp}/truncated.ckpt: truncated or damaged checkpoint"),
        (["data=folder"], "data.source.root: required, give data.source.root=<value>"),
        (["trainer.max_steps=abc"], "trainer.max_steps='abc': expected int"),
        (["trainer.accelerator=gpu"], "trainer.accelerator=gpu: no CUDA GPU is available here"),
    ],
    ids=["missing-ckpt", "random-ckpt", "truncated-ckpt", "folder-without-root", "max-steps-abc", "gpu-without-cuda"],
)
def test_bad_training_request_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys, args, message) -> None:
    if "accelerator=gpu" in args[0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    whole = write_tiny_checkpoint(tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    inputs = _snapshot(tmp_path)
    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, train_cli, *[a.format(tmp=tmp_path) for a in args], "logger=csv",
                           f"hydra.run.dir={run}")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"mdcsrn-train: error: {message.format(tmp=tmp_path)}"), err
    assert "Traceback" not in err
    assert not run.exists() and _snapshot(tmp_path) == inputs


def test_second_run_in_a_locked_folder_stops_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from mdcsrn_lightning.runlock import acquire_run_lock as a; a({str(run)!r}); print('HELD', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert holder.stdout is not None and "HELD" in holder.stdout.readline()
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"the first run's checkpoint")
        before = _snapshot(run)
        code, _, err = run_cli(monkeypatch, capsys, train_cli, "logger=csv", f"hydra.run.dir={run}")
        assert code == 2
        assert _one_line(err, "mdcsrn-train") == (
            f"mdcsrn-train: error: {run.resolve()}: run folder in use by another run (pid {holder.pid}); "
            "wait for it or give another hydra.run.dir"
        )
        assert _snapshot(run) == before  # not even .hydra/ was written
    finally:
        holder.kill()
        holder.wait()
    acquire_run_lock(run)  # released with its holder (also after SIGKILL)
