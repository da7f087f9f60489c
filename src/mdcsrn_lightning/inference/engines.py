"""Inference engines: the same generator run by eager torch, torch.compile, ONNX Runtime or OpenVINO.

Every engine is a callable ``(B, C, D, H, W) float32 tensor -> (B, C, D, H, W) float32
tensor`` with ``.name``, ``.device`` and ``receptive_field_radius()``, so it plugs into
:func:`~mdcsrn_lightning.inference.patches.super_resolve` in place of the network. All run
the generator in eval mode (BatchNorm with running statistics) in float32 and give the
eager output within 1e-4.

=============  ===============================  ==========================================
engine         needs                            notes
=============  ===============================  ==========================================
``torch``      (base install)                   eager, any device
``compile``    (base install; a C++ compiler    ``torch.compile`` (inductor); the first
               on CPU)                          call per input shape compiles
``onnxruntime``  ``pip install "mdcsrn-lightning[onnx]"``  CPU; ONNX export with
               (onnx, onnxruntime)              dynamic batch and spatial axes
``openvino``   ``pip install "mdcsrn-lightning[openvino]"``  CPU; compiled once per
               (openvino)                       input shape, float32 precision hint
                                                (the default on CPUs with AMX is bf16)
``auto``                                        the first available of ``AUTO_RANKING``
                                                (CPU), ``torch`` on CUDA
=============  ===============================  ==========================================

``AUTO_RANKING`` is the order measured by ``mdcsrn-bench`` (figures: docs/performance.md): OpenVINO > ONNX Runtime > torch.compile > eager.

Exported files: :func:`export` writes ``.onnx`` (ONNX) or ``.xml``/``.bin`` (OpenVINO IR)
with dynamic batch and spatial axes; :func:`load_engine` runs such a file. The exported
graph is :func:`~mdcsrn_lightning.models.mdcsrn.lean_forward` (compressors and
reconstruction as sums of per-piece 1x1x1 convs, no level concatenations): the same
function, faster in both runtimes and leaner in memory. Pure torch plus
the optional runtimes: no Lightning, Hydra or checkpoints here.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from mdcsrn_lightning.models.mdcsrn import is_mdcsrn, lean_forward

__all__ = [
    "AUTO_RANKING",
    "ENGINES",
    "Engine",
    "EngineUnavailable",
    "LeanGraph",
    "export_graph",
    "available_engines",
    "build_engine",
    "engine_available",
    "export",
    "export_onnx",
    "export_openvino",
    "load_engine",
    "resolve_engine_name",
]

ENGINES = ("torch", "compile", "onnxruntime", "openvino")
AUTO_RANKING = ("openvino", "onnxruntime", "compile", "torch")
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
INPUT_NAME, OUTPUT_NAME = "lr", "sr"
OPSET = 17


class EngineUnavailable(RuntimeError):
    """The engine's runtime is not installed (the message says which extra to install)."""


class Engine(Protocol):
    name: str
    device: torch.device

    def __call__(self, x: Tensor) -> Tensor: ...

    def receptive_field_radius(self) -> int: ...


def engine_available(name: str) -> bool:
    """Whether ``name``'s runtime can be imported here (no import is done)."""
    if name in ("torch", "compile"):
        return True
    if name == "onnxruntime":
        return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    if name == "openvino":
        return importlib.util.find_spec("openvino") is not None
    raise ValueError(f"unknown engine {name!r}; choose one of {ENGINES + ('auto',)}")


def available_engines() -> list[str]:
    return [e for e in ENGINES if engine_available(e)]


def resolve_engine_name(name: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> the best engine available for ``device``; others are checked and returned."""
    name = str(name)
    dev = torch.device(device)
    if name == "auto":
        if dev.type != "cpu":
            return "torch"
        return next(e for e in AUTO_RANKING if engine_available(e))
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES + ('auto',)}, got {name!r}")
    if not engine_available(name):
        raise EngineUnavailable(
            f"engine={name} needs its runtime: pip install 'mdcsrn-lightning[{_EXTRA[name]}]'"
        )
    if name in ("onnxruntime", "openvino") and dev.type != "cpu":
        raise ValueError(f"engine={name} runs on the CPU here; use device=cpu or engine=torch|compile")
    return name


def _radius(net: Any) -> int:
    fn = getattr(net, "receptive_field_radius", None)
    if fn is None:
        raise AttributeError(f"{type(net).__name__} has no receptive_field_radius(); give the margin explicitly")
    return int(fn())


def _optional_radius(net: Any) -> int | None:
    """``net``'s receptive-field radius, or ``None`` where it has none."""
    try:
        return _radius(net)
    except AttributeError:
        return None


# --------------------------------------------------------------------------- torch engines
class TorchEngine:
    """Eager torch, ``inference_mode``, on the module's device."""

    name = "torch"

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    def receptive_field_radius(self) -> int:
        return _radius(self.net)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.net(x.to(self.device, torch.float32))


class CompileEngine(TorchEngine):
    """``torch.compile`` (inductor, weights frozen) of the lean graph (:class:`LeanGraph`).
    Each new input shape compiles once (static shapes: patch inference sees few distinct
    shapes, and static kernels are the fast ones)."""

    name = "compile"

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu", mode: str | None = None) -> None:
        super().__init__(net, device)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        # the lean graph compiles to faster code than the concatenating one (docs/performance.md)
        self.compiled = torch.compile(export_graph(self.net), mode=mode, dynamic=False)

    def __call__(self, x: Tensor) -> Tensor:
        import torch._inductor.config as inductor_config

        # freezing: the eval-mode weights become constants (inductor folds and pre-packs them)
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x.to(self.device, torch.float32))


# --------------------------------------------------------------------------- export
class LeanGraph(nn.Module):
    """``net``'s eval forward as :func:`~mdcsrn_lightning.models.mdcsrn.lean_forward`: the
    graph that is exported. Same function and weights (shared, not copied); no level
    concatenations, whose Concat copies slow OpenVINO down (docs/performance.md)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.in_channels = int(getattr(net, "in_channels", 1))

    def receptive_field_radius(self) -> int:
        return _radius(self.net)

    def forward(self, x: Tensor) -> Tensor:
        return lean_forward(self.net, x)


def export_graph(net: nn.Module) -> nn.Module:
    """What gets exported/compiled: :class:`LeanGraph` for an mDCSRN, else ``net`` itself."""
    if is_mdcsrn(net):
        return LeanGraph(net)
    return net


def _example(net: nn.Module) -> Tensor:
    channels = int(getattr(net, "in_channels", 1))
    return torch.rand(1, channels, 12, 12, 12)


def export_onnx(net: nn.Module, path: str | os.PathLike[str], opset: int = OPSET) -> Path:
    """Write ``net`` (eval mode, float32) as ONNX with dynamic batch and spatial axes."""
    if not engine_available("onnxruntime"):
        raise EngineUnavailable("ONNX export needs onnx: pip install 'mdcsrn-lightning[onnx]'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = net.training
    net = net.eval().cpu()
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
            torch.onnx.export(
                export_graph(net),
                (_example(net),),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=opset,
                do_constant_folding=True,
            )
        import onnx

        model = onnx.load(str(path))
        for key, value in _metadata(net).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(path))
    finally:
        net.train(was_training)
    return path


def _metadata(net: nn.Module) -> dict[str, str]:
    """What an exported file needs to be used alone: the patch margin for exact output."""
    meta = {"producer": "mdcsrn-lightning", "in_channels": str(int(getattr(net, "in_channels", 1)))}
    radius = _optional_radius(net)
    if radius is not None:
        meta["receptive_field_radius"] = str(radius)
    return meta


def _convert_openvino(net: nn.Module) -> Any:
    """``net``'s export graph (eval mode, CPU) as an in-memory OpenVINO model; ``net``'s
    train/eval mode is restored afterwards (it stays on the CPU)."""
    import openvino as ov

    was_training = net.training
    net = net.eval().cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ov.convert_model(export_graph(net), example_input=_example(net))
    finally:
        net.train(was_training)


def export_openvino(net: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``net`` as OpenVINO IR (``path`` = ``.xml``; the weights go to ``.bin`` beside it)."""
    if not engine_available("openvino"):
        raise EngineUnavailable("OpenVINO export needs openvino: pip install 'mdcsrn-lightning[openvino]'")
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        path = path.with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _convert_openvino(net)
    channels = int(getattr(net, "in_channels", 1))
    model.reshape({model.inputs[0]: ov.PartialShape([-1, channels, -1, -1, -1])})
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


# --------------------------------------------------------------------------- runtime engines
def _threads() -> int:
    return max(1, torch.get_num_threads())


class OnnxRuntimeEngine:
    """An ONNX file run by ONNX Runtime's CPU provider (dynamic shapes: one session for all)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], radius: int | None = None, threads: int | None = None) -> None:
        if not engine_available("onnxruntime"):
            raise EngineUnavailable("engine=onnxruntime needs: pip install 'mdcsrn-lightning[onnx]'")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting threads between calls: they would slow down whatever runs next
        # (patch I/O, other engines in a benchmark, other jobs on the machine)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")
        meta = self.session.get_modelmeta().custom_metadata_map
        if radius is None and "receptive_field_radius" in meta:
            radius = int(meta["receptive_field_radius"])
        self._radius = radius

    def receptive_field_radius(self) -> int:
        if self._radius is None:
            raise AttributeError(f"{self.path}: receptive field unknown; give the margin explicitly")
        return self._radius

    def __call__(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]
        return torch.from_numpy(out)


class OpenVinoEngine:
    """An OpenVINO model on the CPU in float32, compiled once per input shape (LRU of 8).

    Static shapes run faster than OpenVINO's dynamic-shape path, and patch inference sees
    only a few shapes (the patch and the clamped border patches).
    """

    name = "openvino"

    def __init__(
        self,
        model: Any,
        radius: int | None = None,
        threads: int | None = None,
        cache: int = 8,
        precision: str = "f32",
    ) -> None:
        if not engine_available("openvino"):
            raise EngineUnavailable("engine=openvino needs: pip install 'mdcsrn-lightning[openvino]'")
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(model)) if isinstance(model, (str, os.PathLike)) else model
        self.config = {
            "INFERENCE_PRECISION_HINT": precision,  # CPUs with AMX default to bf16
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or _threads()),
        }
        self.device = torch.device("cpu")
        if radius is None and self.model.has_rt_info(["mdcsrn", "receptive_field_radius"]):
            radius = int(self.model.get_rt_info(["mdcsrn", "receptive_field_radius"]).astype(str))
        self._radius = radius
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._cache = max(1, int(cache))

    def receptive_field_radius(self) -> int:
        if self._radius is None:
            raise AttributeError("OpenVINO model: receptive field unknown; give the margin explicitly")
        return self._radius

    def compiled_for(self, shape: tuple[int, ...]) -> Any:
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        model = self.model.clone()
        model.reshape({model.inputs[0]: list(shape)})
        compiled = self.core.compile_model(model, "CPU", self.config)
        self._compiled[shape] = compiled
        if len(self._compiled) > self._cache:
            self._compiled.popitem(last=False)
        return compiled

    def __call__(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        compiled = self.compiled_for(tuple(array.shape))
        out = compiled(array)[compiled.outputs[0]]
        return torch.from_numpy(np.array(out, copy=True))


# --------------------------------------------------------------------------- factory
def build_engine(net: nn.Module, name: str = "auto", device: torch.device | str = "cpu") -> Engine:
    """An engine running ``net`` (exported on the fly where needed: ONNX into a temp dir,
    OpenVINO in memory)."""
    name = resolve_engine_name(name, device)
    radius = _optional_radius(net)
    if name == "torch":
        return TorchEngine(net, device)
    if name == "compile":
        return CompileEngine(net, device)
    if name == "onnxruntime":
        folder = Path(tempfile.mkdtemp(prefix="mdcsrn-engine-"))
        return OnnxRuntimeEngine(export_onnx(net, folder / "model.onnx"), radius=radius)
    return OpenVinoEngine(_convert_openvino(net), radius=radius)


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
