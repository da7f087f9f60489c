"""``mdcsrn-infer``'s call path goes down the layers and never back: along every call stack of
a run, each of the package's files is entered once (a file below never calls back into a
file above it). Traced with ``sys.setprofile``, not assumed."""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import mdcsrn_lightning
from mdcsrn_lightning.cli import infer as infer_cli

from .test_inference import ANATOMICAL, run_cli, write_tiny_checkpoint

PACKAGE = str(Path(mdcsrn_lightning.__file__).parent)


def _package_files(frame: FrameType | None) -> list[str] | None:
    """The package files on ``frame``'s stack, outermost first, repeats of one file in a row
    merged; ``None`` while one of our modules is being imported (module and class bodies run)."""
    files: list[str] = []
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE):
            if frame.f_code.co_name == "<module>":
                return None
            if not files or files[-1] != name:
                files.append(name)
        frame = frame.f_back
    return files[::-1]


def _reentries(*args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[set, set]:
    """``(re-entered stacks, files seen)`` over one ``mdcsrn-infer`` run with ``args``."""
    bad: set[tuple[str, ...]] = set()
    seen: set[str] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(PACKAGE):
            return
        stack = _package_files(frame)
        if stack is None:
            return
        seen.update(stack)
        if len(set(stack)) != len(stack):
            bad.add(tuple(Path(f).relative_to(PACKAGE).as_posix() for f in stack))

    sys.setprofile(profile)
    try:
        code, _, err = run_cli(monkeypatch, capsys, infer_cli, *args)
    finally:
        sys.setprofile(None)
    assert code == 0, err
    return bad, {Path(f).relative_to(PACKAGE).as_posix() for f in seen}


@pytest.mark.parametrize("strategy", [["patches.size=16"], ["stream=true", "engine=torch", "slab=4"],
                                      ["stream=true", "engine=openvino", "slab=4"], ["engine=openvino", "patches.size=16"],
                                      ["patches.size=16", "uncertainty=true", "data_consistency=true"],
                                      ["stream=true", "engine=torch", "slab=4", "uncertainty=true"],
                                      ["patches.size=16", "adapt=true", "adapt_options.steps=4",
                                       "adapt_options.validate_every=2", "adapt_options.patch=12",
                                       "adapt_options.batch=2", "data_consistency=true", "degrade=true",
                                       "factors=[2,2,1]"],
                                      ["patches.size=16", "adapt=true", "adapt_options.steps=4",
                                       "adapt_options.validate_every=2", "adapt_options.patch=12",
                                       "adapt_options.batch=2", "degrade=true", "uncertainty=true",
                                       "adapt_options.network=checkpoint"]])
def test_infer_enters_each_file_once_along_every_stack(tmp_path: Path, monkeypatch, capsys, strategy) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt")
    bad, seen = _reentries(f"input={ANATOMICAL}", f"output={tmp_path / 'sr.nii.gz'}", f"ckpt={ckpt}",
                           "progress=false", "device=cpu", *strategy, monkeypatch=monkeypatch, capsys=capsys)
    assert not bad, sorted(bad)[:3]
    # the path the README describes
    for f in ("cli/infer.py", "inference/files.py", "checkpoints.py", "inference/build.py", "inference/base.py",
              "data/volume_write.py", "data/volume_io.py", "inference/sidecars.py"):
        assert f in seen, f
    assert ("inference/streaming.py" in seen) == ("engine=torch" in strategy)
    assert ("inference/ensemble.py" in seen) == ("uncertainty=true" in strategy)
    assert ("inference/adapt.py" in seen) == ("adapt=true" in strategy)
    planes = "adapt=true" in strategy and "adapt_options.network=checkpoint" not in strategy  # the default
    assert ("inference/plane_data.py" in seen) == planes and ("models/plane_net.py" in seen) == planes
    assert ("inference/block_stream.py" in seen) == ("stream=true" in strategy and "engine=openvino" in strategy)


def test_infer_bids_enters_each_file_once_along_every_stack(tmp_path: Path, monkeypatch, capsys) -> None:
    import nibabel as nib

    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt")
    src = tmp_path / "raw" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    src.parent.mkdir(parents=True)
    nib.save(nib.load(str(ANATOMICAL)), str(src))
    bad, seen = _reentries(f"input={src}", f"output={tmp_path / 'sr'}", f"ckpt={ckpt}", "bids=true", "progress=false",
                           "device=cpu", "patches.size=16", monkeypatch=monkeypatch, capsys=capsys)
    assert not bad, sorted(bad)[:3]
    assert {"inference/bids.py", "inference/sidecars.py"} <= seen


def test_thick_adapt_enters_each_file_once_along_every_stack(tmp_path: Path, monkeypatch, capsys) -> None:
    from .test_adapt import ADAPT_ARGS, _thick_setup

    src, ckpt = _thick_setup(tmp_path)
    bad, seen = _reentries(f"input={src}", f"output={tmp_path / 'sr.nii.gz'}", f"ckpt={ckpt}", "upsample=auto",
                           "progress=false", "device=cpu", "data_consistency=true", *ADAPT_ARGS,
                           monkeypatch=monkeypatch, capsys=capsys)
    assert not bad, sorted(bad)[:3]
    assert {"inference/planes.py", "inference/plane_data.py", "inference/adapt.py", "models/plane_net.py"} <= seen
