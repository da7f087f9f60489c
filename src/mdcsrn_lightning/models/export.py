"""The generator as a file: ONNX or OpenVINO IR with dynamic batch and spatial axes
(``mdcsrn-export``), and the in-memory graphs the engines compile.

What is exported is :func:`~.mdcsrn.lean_forward` (sums of per-piece 1x1x1 convs, no level
concatenations): the same function, faster in both runtimes and leaner in memory. Each file
records the receptive field radius, so a file alone can be run with exact patches.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdcsrn_lightning.models.mdcsrn import is_mdcsrn, lean_forward

__all__ = ["EngineUnavailable", "LeanGraph", "convert_openvino", "export", "export_graph", "export_onnx",
           "export_openvino", "receptive_field_radius", "require"]

INPUT_NAME, OUTPUT_NAME = "lr", "sr"
OPSET = 17
_EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}


class EngineUnavailable(RuntimeError):
    """A runtime is not installed (the message says which extra to install)."""


def require(module: str, what: str) -> None:
    """Raise :class:`EngineUnavailable` unless ``module`` can be imported (no import is done)."""
    if importlib.util.find_spec(module) is None:
        raise EngineUnavailable(f"{what} needs {module}: pip install 'mdcsrn-lightning[{_EXTRAS[module]}]'")


def receptive_field_radius(net: Any) -> int | None:
    """``net.receptive_field_radius()``, or ``None`` where it has none."""
    fn = getattr(net, "receptive_field_radius", None)
    return None if fn is None else int(fn())


class LeanGraph(nn.Module):
    """``net``'s eval forward as :func:`~.mdcsrn.lean_forward`, sharing ``net``'s weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.in_channels = int(getattr(net, "in_channels", 1))

    def receptive_field_radius(self) -> int:
        return int(self.net.receptive_field_radius())  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        return lean_forward(self.net, x)


def export_graph(net: nn.Module) -> nn.Module:
    """What gets exported or compiled: :class:`LeanGraph` for an mDCSRN, else ``net`` itself."""
    return LeanGraph(net) if is_mdcsrn(net) else net


def _example(net: nn.Module) -> Tensor:
    return torch.rand(1, int(getattr(net, "in_channels", 1)), 12, 12, 12)


def _metadata(net: nn.Module) -> dict[str, str]:
    meta = {"producer": "mdcsrn-lightning", "in_channels": str(int(getattr(net, "in_channels", 1)))}
    radius = receptive_field_radius(net)
    if radius is not None:
        meta["receptive_field_radius"] = str(radius)
    return meta


def export_onnx(net: nn.Module, path: str | os.PathLike[str], opset: int = OPSET) -> Path:
    """Write ``net`` (eval mode, float32) as ONNX with dynamic batch and spatial axes."""
    require("onnx", "ONNX export")
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = net.training
    net = net.eval().cpu()
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
            torch.onnx.export(export_graph(net), (_example(net),), str(path), dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=opset,
                              do_constant_folding=True)
        model = onnx.load(str(path))
        for key, value in _metadata(net).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(path))
    finally:
        net.train(was_training)
    return path


def convert_openvino(graph: nn.Module, example: Tensor | tuple[Tensor, ...]) -> Any:
    """``graph`` traced on ``example`` as an in-memory OpenVINO model (no file)."""
    require("openvino", "OpenVINO")
    import openvino as ov

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return ov.convert_model(graph, example_input=example)


def openvino_model(net: nn.Module) -> Any:
    """``net``'s export graph (eval mode, CPU) as an OpenVINO model; ``net``'s train/eval
    mode is restored afterwards (it stays on the CPU)."""
    was_training = net.training
    net = net.eval().cpu()
    try:
        return convert_openvino(export_graph(net), _example(net))
    finally:
        net.train(was_training)


def export_openvino(net: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``net`` as OpenVINO IR (``path`` = ``.xml``; the weights go to ``.bin`` beside it)."""
    model = openvino_model(net)
    import openvino as ov

    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.reshape({model.inputs[0]: ov.PartialShape([-1, int(getattr(net, "in_channels", 1)), -1, -1, -1])})
    for key, value in _metadata(net).items():
        model.set_rt_info(value, ["mdcsrn", key])
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def export(net: nn.Module, path: str | os.PathLike[str], format: str) -> Path:
    """Export ``net`` to ``format`` (``onnx`` or ``openvino``) at ``path``."""
    if format == "onnx":
        return export_onnx(net, path)
    if format == "openvino":
        return export_openvino(net, path)
    raise ValueError(f"format must be 'onnx' or 'openvino', got {format!r}")
