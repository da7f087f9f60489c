"""Inference engines: the generator run by eager torch, torch.compile, ONNX Runtime or OpenVINO.

Every engine is a callable ``(B, C, D, H, W) float32 tensor -> tensor`` with ``.name``,
``.device`` and ``receptive_field_radius()``, so it runs patches in place of the network.
All run eval-mode BatchNorm in float32 and give the eager output within 1e-4. What each
needs and ``AUTO_RANKING`` (the order ``mdcsrn-bench`` measured): ``docs/inference.md``.
Exported files (:mod:`mdcsrn_lightning.models.export`) run through :func:`load_engine`.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from mdcsrn_lightning.models.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    EngineUnavailable,
    export_graph,
    export_onnx,
    openvino_model,
    receptive_field_radius,
    require,
)

__all__ = ["AUTO_RANKING", "ENGINES", "Engine", "EngineUnavailable", "OpenVinoEngine", "build_engine",
           "engine_available", "load_engine", "resolve_engine_name"]

ENGINES = ("torch", "compile", "onnxruntime", "openvino")
AUTO_RANKING = ("openvino", "onnxruntime", "compile", "torch")


class Engine(Protocol):
    name: str
    device: torch.device

    def __call__(self, x: Tensor) -> Tensor: ...

    def receptive_field_radius(self) -> int: ...


def engine_available(name: str) -> bool:
    """Whether ``name``'s runtime can be imported here (no import is done)."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {ENGINES + ('auto',)}")
    needs = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}.get(name, ())
    return all(importlib.util.find_spec(m) is not None for m in needs)


def resolve_engine_name(name: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> the best engine available for ``device``; others are checked and returned."""
    name, dev = str(name), torch.device(device)
    if name == "auto":
        return "torch" if dev.type != "cpu" else next(e for e in AUTO_RANKING if engine_available(e))
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES + ('auto',)}, got {name!r}")
    if not engine_available(name):
        extra = "onnx" if name == "onnxruntime" else name
        raise EngineUnavailable(f"engine={name} needs its runtime: pip install 'mdcsrn-lightning[{extra}]'")
    if name in ("onnxruntime", "openvino") and dev.type != "cpu":
        raise ValueError(f"engine={name} runs on the CPU here; use device=cpu or engine=torch|compile")
    return name


class _Radius:
    """``receptive_field_radius()`` from a known value (an exported file's metadata)."""

    radius: int | None = None

    def receptive_field_radius(self) -> int:
        if self.radius is None:
            raise AttributeError(f"{self.name}: receptive field unknown; give the margin explicitly")  # type: ignore[attr-defined]
        return self.radius


class TorchEngine:
    """Eager torch, ``inference_mode``, on the module's device."""

    name = "torch"

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    def receptive_field_radius(self) -> int:
        return int(self.net.receptive_field_radius())  # type: ignore[operator]

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.net(x.to(self.device, torch.float32))


class CompileEngine(TorchEngine):
    """``torch.compile`` (inductor, weights frozen) of the lean export graph; each new input
    shape compiles once (static kernels are the fast ones)."""

    name = "compile"

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu", mode: str | None = None) -> None:
        super().__init__(net, device)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        self.compiled = torch.compile(export_graph(self.net), mode=mode, dynamic=False)

    def __call__(self, x: Tensor) -> Tensor:
        import torch._inductor.config as inductor_config

        # freezing: the eval-mode weights become constants (inductor folds and pre-packs them)
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x.to(self.device, torch.float32))


def _threads() -> int:
    return max(1, torch.get_num_threads())


class OnnxRuntimeEngine(_Radius):
    """An ONNX file run by ONNX Runtime's CPU provider (dynamic shapes: one session for all)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], radius: int | None = None, threads: int | None = None) -> None:
        require("onnxruntime", "engine=onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting threads between calls: they would slow down whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.radius = int(meta["receptive_field_radius"]) if radius is None and "receptive_field_radius" in meta else radius

    def __call__(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


class OpenVinoEngine(_Radius):
    """An OpenVINO model (file or in memory) on the CPU in float32, compiled once per set of
    input shapes (LRU of ``cache``): static shapes run faster than the dynamic path, and
    patches and slabs come in few shapes. ``engine(*inputs)``: the first output."""

    name = "openvino"

    def __init__(self, model: Any, radius: int | None = None, threads: int | None = None, cache: int = 8) -> None:
        require("openvino", "engine=openvino")
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(model)) if isinstance(model, (str, os.PathLike)) else model
        self.config = {
            "INFERENCE_PRECISION_HINT": "f32",  # CPUs with AMX default to bf16
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or _threads()),
        }
        self.device = torch.device("cpu")
        if radius is None and self.model.has_rt_info(["mdcsrn", "receptive_field_radius"]):
            radius = int(self.model.get_rt_info(["mdcsrn", "receptive_field_radius"]).astype(str))
        self.radius = radius
        self._compiled: OrderedDict[tuple[tuple[int, ...], ...], Any] = OrderedDict()
        self._cache = max(1, int(cache))

    def compiled_for(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        if shapes in self._compiled:
            self._compiled.move_to_end(shapes)
            return self._compiled[shapes]
        model = self.model.clone()
        model.reshape({port: list(s) for port, s in zip(model.inputs, shapes)})
        compiled = self._compiled[shapes] = self.core.compile_model(model, "CPU", self.config)
        if len(self._compiled) > self._cache:
            self._compiled.popitem(last=False)
        return compiled

    def __call__(self, *inputs: Tensor) -> Tensor:
        arrays = [np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()) for x in inputs]
        compiled = self.compiled_for(tuple(a.shape for a in arrays))
        return torch.from_numpy(np.array(compiled(arrays)[compiled.outputs[0]], copy=True))


def build_engine(net: nn.Module, name: str = "auto", device: torch.device | str = "cpu") -> Engine:
    """An engine running ``net`` (exported on the fly where needed: ONNX into a temp dir,
    OpenVINO in memory)."""
    name = resolve_engine_name(name, device)
    if name == "torch":
        return TorchEngine(net, device)
    if name == "compile":
        return CompileEngine(net, device)
    radius = receptive_field_radius(net)
    if name == "onnxruntime":
        folder = Path(tempfile.mkdtemp(prefix="mdcsrn-engine-"))
        return OnnxRuntimeEngine(export_onnx(net, folder / "model.onnx"), radius=radius)
    return OpenVinoEngine(openvino_model(net), radius=radius)


def load_engine(path: str | os.PathLike[str], radius: int | None = None) -> Engine:
    """An engine for an exported file: ``.onnx`` (ONNX Runtime) or ``.xml`` (OpenVINO)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: exported model not found")
    if p.suffix == ".onnx":
        return OnnxRuntimeEngine(p, radius=radius)
    if p.suffix == ".xml":
        return OpenVinoEngine(p, radius=radius)
    raise ValueError(f"{p}: not an exported model (.onnx or .xml)")
