"""Inference engines (torch, compile, ONNX Runtime, OpenVINO): equal to eager within 1e-4,
exported files, `auto`, patch inference and `mdcsrn-export` / `mdcsrn-infer engine=`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mdcsrn_lightning.cli import export as export_cli
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.inference import engines as E
from mdcsrn_lightning.models.export import export
from mdcsrn_lightning.inference.patches import super_resolve

from .test_inference import ANATOMICAL, run_cli, tiny_net, write_tiny_checkpoint

RUNTIMES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",)}


def need(engine: str) -> None:
    """The runtimes are in the `test` extra: a missing one fails the test instead of skipping it."""
    for module in RUNTIMES.get(engine, ()):
        importlib.import_module(module)


def x01(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "openvino"])
def test_engine_equals_eager_on_two_shapes(engine: str) -> None:
    need(engine)
    net = tiny_net()
    run = E.build_engine(net, engine)
    assert run.name == engine and run.receptive_field_radius() == net.receptive_field_radius()
    # dynamic batch and spatial axes: one export serves any patch
    for shape in ((2, 1, 9, 10, 11), (1, 1, 6, 5, 7)):
        x = x01(*shape)
        with torch.inference_mode():
            expected = net(x)
        out = run(x)
        assert out.shape == expected.shape and out.dtype == torch.float32
        assert float((out - expected).abs().max()) < 1e-4


@pytest.mark.slow
def test_compile_engine_equals_eager() -> None:
    net = tiny_net()
    run = E.build_engine(net, "compile")
    x = x01(1, 1, 8, 8, 8)
    with torch.inference_mode():
        expected = net(x)
    assert float((run(x) - expected).abs().max()) < 1e-4


@pytest.mark.parametrize(("fmt", "suffix"), [("onnx", ".onnx"), ("openvino", ".xml")])
def test_export_and_load_keep_outputs_and_radius(tmp_path: Path, fmt: str, suffix: str) -> None:
    need("onnxruntime" if fmt == "onnx" else "openvino")
    net = tiny_net(seed=3)
    path = export(net, tmp_path / f"model{suffix}", fmt)
    assert path.suffix == suffix and path.is_file()
    if fmt == "openvino":
        assert path.with_suffix(".bin").is_file()
    run = E.load_engine(path)
    assert run.receptive_field_radius() == net.receptive_field_radius()  # read from the file
    x = x01(1, 1, 7, 8, 9, seed=1)
    with torch.inference_mode():
        assert float((run(x) - net(x)).abs().max()) < 1e-4
    # patch inference with an engine as the network, margin=auto from the file's metadata
    vol = x01(15, 13, 11, seed=2).numpy()
    eager = super_resolve(net, vol, patch_size=10, margin="auto", device="cpu")
    assert np.abs(super_resolve(run, vol, patch_size=10, margin="auto") - eager).max() < 1e-4


def test_auto_follows_the_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    available = {"torch", "compile"}
    monkeypatch.setattr(E, "engine_available", lambda name: name in available)
    assert E.resolve_engine_name("auto") == "compile"
    available.add("onnxruntime")
    assert E.resolve_engine_name("auto") == "onnxruntime"
    available.add("openvino")
    assert E.resolve_engine_name("auto") == "openvino"
    assert E.resolve_engine_name("auto", "cuda") == "torch"
    with pytest.raises(E.EngineUnavailable, match=r"mdcsrn-lightning\[onnx\]"):
        available.discard("onnxruntime")
        E.resolve_engine_name("onnxruntime")
    with pytest.raises(ValueError, match="engine must be one of"):
        E.resolve_engine_name("tensorrt")


def test_bn_mode_train_needs_the_torch_engine() -> None:
    need("onnxruntime")
    run = E.build_engine(tiny_net(), "onnxruntime")
    with pytest.raises(ValueError, match="bn_mode=train"):
        super_resolve(run, np.zeros((6, 6, 6), np.float32), bn_mode="train")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_cli_writes_a_checked_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, fmt: str
) -> None:
    need("onnxruntime" if fmt == "onnx" else "openvino")
    ckpt = write_tiny_checkpoint(tmp_path / "model.ckpt")
    code, out, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", f"format={fmt}", "check_size=[8,8,8]")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert Path(summary["output"]).is_file() and summary["receptive_field_radius"] == 3
    assert summary["check_max_abs_diff"] < 1e-4
    # refuses to replace without overwrite=true, in one line
    code, out, err = run_cli(monkeypatch, capsys, export_cli, f"ckpt={ckpt}", f"format={fmt}")
    assert code == 2 and "overwrite=true" in err and len(err.strip().splitlines()) == 1


def test_infer_cli_engine_and_stream_match_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    need("onnxruntime")
    ckpt = write_tiny_checkpoint(tmp_path / "model.ckpt")
    outputs = {}
    for name, extra in (
        ("torch", ["engine=torch", "patches.margin=auto", "patches.size=16"]),
        ("onnxruntime", ["engine=onnxruntime", "patches.margin=auto", "patches.size=16"]),
        ("stream", ["stream=true", "slab=5"]),
    ):
        target = tmp_path / f"{name}.nii.gz"
        code, out, err = run_cli(
            monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={target}", f"ckpt={ckpt}",
            "progress=false", *extra,
        )
        assert code == 0, err
        outputs[name] = np.asarray(nib.load(target).dataobj, dtype=np.float32)
    scale = float(np.abs(outputs["torch"]).max())
    assert np.abs(outputs["onnxruntime"] - outputs["torch"]).max() < 1e-4 * scale
    # margin=auto patches and the streamed whole-volume pass are one and the same
    assert np.abs(outputs["stream"] - outputs["torch"]).max() < 1e-5 * scale
