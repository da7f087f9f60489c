"""Exact whole-volume inference by one dense-block graph over staggered slabs
(`inference/block_stream.py`): equal to one plain whole-volume forward pass, with the graph run
eagerly (always) and by OpenVINO (in the `test` extra: a missing runtime fails)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.inference import block_stream as B
from mdcsrn_lightning.inference import engines
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.inference.block_stream import BlockStreamingMDCSRN
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.inference.exact import ExactInferer
from mdcsrn_lightning.inference.streaming import StreamingMDCSRN
from mdcsrn_lightning.models import MDCSRN
from mdcsrn_lightning.models.block_graph import DenseBlockGraph
from mdcsrn_lightning.models.reference import ReferenceMDCSRN, reference_like

from .conftest import randomize_batchnorm
from .test_inference import ANATOMICAL, run_cli, write_tiny_checkpoint


def make_net(*args: object, seed: int = 0, strong: bool = False, **kwargs: object) -> MDCSRN:
    """Eval-mode generator with non-trivial BN statistics; ``strong``: large conv weights
    too (a wrong slice, padding or mask cannot hide behind near-identity layers)."""
    torch.manual_seed(seed)
    net = MDCSRN(*args, **kwargs)  # type: ignore[arg-type]
    randomize_batchnorm(net, strong_convs=strong)
    return net.eval()


def eager(net: torch.nn.Module, slab: int) -> BlockStreamingMDCSRN:
    """The block schedule with the graph run eagerly (float64 checks; no user option reaches it)."""
    return BlockStreamingMDCSRN(net, slab, runner=DenseBlockGraph(net.blocks[0]))


def plain(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference_like(net)(x)


@pytest.mark.parametrize(
    ("blocks", "units", "recon", "residual", "slab", "depth"),
    [
        (2, 4, "direct", False, 3, 11),  # unit 4 has a bottleneck; 3 does not divide 11
        (3, 2, "conv", True, 5, 13),  # "-r" reconstruction (streamed 3x3x3 conv) + residual
        (2, 3, "direct", True, 1, 7),  # one slice per call: lags longer than the slab
        (1, 4, "conv", False, 50, 9),  # slab deeper than the volume: one call, masks both faces
        (3, 4, "direct", False, 2, 20),  # first slabs of later blocks lie wholly outside
    ],
)
def test_torch_runner_equals_one_plain_pass_in_float64(
    blocks: int, units: int, recon: str, residual: bool, slab: int, depth: int
) -> None:
    # float64: the schedule, masks, crops and weight slices must be exact, not just close
    net = make_net(blocks, units, 4, recon, global_residual=residual, strong=True).double()
    x = torch.rand(2, 1, depth, 7, 6, dtype=torch.float64)
    out = eager(net, slab)(x)
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out, plain(net, x), rtol=1e-10, atol=1e-10)


def test_openvino_runner_equals_one_plain_pass() -> None:
    importlib.import_module("openvino")  # in the `test` extra
    for recon, residual in (("direct", False), ("conv", True)):
        net = make_net(2, 4, 4, recon, global_residual=residual)
        if residual:  # the zero-initialised last conv would hide the reconstruction
            torch.nn.init.normal_(net.final_conv.weight, 0, 0.3)
        x = torch.rand(1, 1, 13, 9, 8)
        expected = plain(net, x)
        run = BlockStreamingMDCSRN(net, 4)
        out = run(x)
        assert float((out - expected).abs().max()) < 1e-5 * max(1.0, float(expected.abs().max()))
        assert float(expected.abs().max()) > 0.1
        # another depth: the same slab shape (one compiled model); other planes: a second one
        for shape, models in (((1, 1, 6, 9, 8), 1), ((1, 1, 7, 5, 8), 2)):
            x2 = torch.rand(*shape)
            ref2 = plain(net, x2)
            assert float((run(x2) - ref2).abs().max()) < 1e-5 * max(1.0, float(ref2.abs().max()))
            assert len(run.runner._compiled) == models  # for all blocks


def test_reference_generator_and_progress() -> None:
    net = make_net(2, 2, 4)
    ref = ReferenceMDCSRN.from_mdcsrn(net).eval()
    vol = np.random.default_rng(0).random((10, 8, 7)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(vol)[None, None])[0, 0].numpy()
    run = eager(ref, 3)
    seen: list[int] = []
    out = run(torch.from_numpy(vol)[None, None], seen.append)[0, 0].numpy()
    assert np.abs(out - whole).max() < 1e-5
    assert sum(seen) == 10 and all(n > 0 for n in seen)  # every slice reported once
    assert np.abs(ExactInferer(run)(vol) - whole).max() < 1e-5


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="mDCSRN"):
        BlockStreamingMDCSRN(torch.nn.Conv3d(1, 1, 3), 4)
    with pytest.raises(ValueError, match="slab"):
        BlockStreamingMDCSRN(make_net(1, 1, 4), 0)
    with pytest.raises(ValueError, match="float32"):
        BlockStreamingMDCSRN(make_net(1, 1, 4), 4)(torch.rand(1, 1, 5, 4, 4, dtype=torch.float64))
    with pytest.raises(InferenceError, match="engine=torch, openvino or auto"):
        build_inferer(make_net(1, 1, 4), InferenceOptions(stream=True, engine="compile", device="cpu"))


def test_auto_picks_openvino_or_falls_back_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    net = make_net(1, 2, 4)
    lines: list[str] = []
    if engines.engine_available("openvino"):
        run = build_inferer(net, InferenceOptions(stream=True, engine="auto", device="cpu"), log=lines.append).runner
        assert isinstance(run, BlockStreamingMDCSRN) and run.name == "block-stream[openvino]" and run.slab == 16
        assert lines == []
    monkeypatch.setattr(engines, "engine_available", lambda name: name in ("torch", "compile"))
    run = build_inferer(net, InferenceOptions(stream=True, engine="auto", slab=5, device="cpu"), log=lines.append).runner
    assert isinstance(run, StreamingMDCSRN) and run.slab == 5
    assert len(lines) == 1 and "OpenVINO is not installed" in lines[0]
    with pytest.raises(InferenceError, match="openvino"):
        build_inferer(net, InferenceOptions(stream=True, engine="openvino", device="cpu"))


def test_best_offset_minimises_the_slabs() -> None:
    # brute force over the shift of the slab grid
    for depth, slab, lags in ((181, 24, [0, 4, 8, 12]), (20, 7, [0, 3]), (5, 16, [0, 2, 4])):
        c = B.best_offset(depth, slab, lags)
        count = [sum(-(-(depth + lag + s) // slab) for lag in lags) for s in range(slab)]
        assert count[c] == min(count) and 0 <= c < slab


def test_infer_cli_stream_engines_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    importlib.import_module("openvino")
    ckpt = write_tiny_checkpoint(tmp_path / "model.ckpt")
    outputs = {}
    for name, extra in (
        ("plain", ["engine=torch", "patches.size=[40,48,40]", "patches.margin=0"]),  # one patch: the plain pass
        ("torch", ["stream=true", "engine=torch", "slab=4"]),
        ("openvino", ["stream=true", "engine=openvino", "slab=6"]),
        ("auto", ["stream=true", "engine=auto"]),
    ):
        target = tmp_path / f"{name}.nii.gz"
        code, out, err = run_cli(
            monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={target}", f"ckpt={ckpt}",
            "progress=false", *extra,
        )
        assert code == 0, err
        assert Path(json.loads(out.strip().splitlines()[-1])["outputs"][0]) == target
        outputs[name] = np.asarray(nib.load(target).dataobj, dtype=np.float32)
    scale = float(np.abs(outputs["plain"]).max())
    for name in ("torch", "openvino", "auto"):
        assert np.abs(outputs[name] - outputs["plain"]).max() < 1e-5 * scale, name
    code, _, err = run_cli(
        monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={tmp_path / 'x.nii.gz'}", f"ckpt={ckpt}",
        "stream=true", "engine=onnxruntime",
    )
    assert code == 2 and "engine=torch, openvino or auto" in err and len(err.strip().splitlines()) == 1
