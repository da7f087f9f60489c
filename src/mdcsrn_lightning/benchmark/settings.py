"""What ``mdcsrn-bench`` times, built alike in the benchmark process and in its memory probes:
the seeded generator, inference settings and training-step settings.

An inference setting is an :class:`~mdcsrn_lightning.inference.options.InferenceOptions` run
by the inferer :func:`~mdcsrn_lightning.inference.build.build_inferer` makes of it (the one
choice of strategy and engine); :func:`infer_options` is the one place where a
``bench.engines`` name becomes options.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from functools import partial
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from mdcsrn_lightning.inference.options import EngineName, InferenceOptions
from mdcsrn_lightning.models.reference import ReferenceMDCSRN

__all__ = [
    "ENGINE_NAMES",
    "INFER_SETTINGS",
    "TRAIN_OPTIONS",
    "Unavailable",
    "build_net",
    "infer_inferer",
    "infer_options",
    "make_input",
    "make_train_step",
    "options_dict",
    "options_label",
    "parse_train_setting",
    "run_volumes",
]

#: the engines of :class:`InferenceOptions` (``auto`` aside)
ENGINE_NAMES = tuple(e for e in get_args(EngineName) if e != "auto")
#: inference settings (``bench.engines``): the plain reference generator, the package's
#: generator run by each engine (``auto`` too), channels_last_3d eager, the exact streamed
#: whole-volume pass (``stream`` with the configured slab, ``stream:<slab>``, ``stream:whole``)
#: and bf16 autocast.
INFER_SETTINGS = ("reference", *ENGINE_NAMES, "channels_last", "stream", "bf16")
#: training options, combined with "+" (e.g. ``channels_last+memory_efficient``); "reference"
#: alone is the plain generator, "torch" the package's with no option.
TRAIN_OPTIONS = ("channels_last", "compile", "memory_efficient", "bf16")


class Unavailable(RuntimeError):
    """A setting that cannot run here (missing runtime, wrong device); the reason is the message."""


def build_net(model_cfg: dict[str, Any], seed: int = 0, perturb_bn: bool = True, **overrides: Any) -> nn.Module:
    """The generator of ``model_cfg`` with seeded weights; ``perturb_bn`` gives BatchNorm
    non-trivial running statistics and affine parameters (so eval mode is not the identity)."""
    torch.manual_seed(seed)
    cfg = dict(model_cfg)
    cfg.update(overrides)
    net = instantiate(cfg)
    if perturb_bn:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    n = m.num_features
                    m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                    if m.weight is not None:
                        m.weight.copy_(torch.rand(n, generator=gen) * 0.4 + 0.8)
                        m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return net


# --------------------------------------------------------------------------- inference
def make_input(batch: int, size: Sequence[int], seed: int) -> Tensor:
    """The infer input: ``batch`` volumes of ``size`` (a ``(batch, *size)`` CPU tensor), uniform
    in [0, 1), seeded ``seed + 3`` (the same in the benchmark process and in its memory probes)."""
    shape = (int(batch), 1, *(int(s) for s in size))
    return torch.rand(*shape, generator=torch.Generator().manual_seed(int(seed) + 3))[:, 0]


def infer_options(
    name: str, size: Sequence[int], device: torch.device | str, slab: int | None = 16
) -> tuple[str, InferenceOptions]:
    """``(network, options)`` of the ``bench.engines`` setting ``name`` on inputs of ``size``.

    ``network`` is ``plain`` (the package's generator), ``reference`` (the plain ``torch.cat``
    generator) or ``channels_last`` (the generator in channels_last_3d). Patch settings run the
    input as ONE patch (``patch_size=size``, ``margin=0``: one forward pass of the network);
    ``stream`` settings the exact whole-volume pass (``slab`` slices; ``None``/``whole``: all).
    """
    dev = str(device)
    one_patch: dict[str, Any] = {"patch_size": [int(s) for s in size], "margin": 0, "device": dev}
    if name in ("reference", "channels_last"):
        return name, InferenceOptions(engine="torch", **one_patch)
    if name == "bf16":
        return "plain", InferenceOptions(engine="torch", precision="bf16", **one_patch)
    if name == "stream" or name.startswith("stream:"):
        value = name.partition(":")[2] or slab
        whole = value is None or value in ("whole", "none", "None")
        return "plain", InferenceOptions(stream=True, engine="torch", slab=int(size[0]) if whole else int(value), device=dev)
    if name in get_args(EngineName):
        return "plain", InferenceOptions(engine=name, **one_patch)  # type: ignore[arg-type]
    raise ValueError(f"unknown inference setting {name!r}; choose from {INFER_SETTINGS} (stream:<slab>, stream:whole, auto)")


def options_label(options: InferenceOptions) -> str:
    """A row label of ``options``: the fields that differ from the defaults, e.g.
    ``stream=True engine=openvino slab=5``."""
    default = InferenceOptions()
    return " ".join(f"{f.name}={getattr(options, f.name)}" for f in fields(options)
                    if getattr(options, f.name) != getattr(default, f.name) and f.name != "device") or "defaults"


def _variant(net: nn.Module, network: str) -> nn.Module:
    if network == "reference":
        return ReferenceMDCSRN.from_mdcsrn(net).eval()  # on net's device
    if network == "channels_last":
        return copy.deepcopy(net).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    return net


def infer_inferer(name: str, net: nn.Module, size: Sequence[int], device: torch.device, slab: int | None = 16) -> Any:
    """The inferer of setting ``name`` (:func:`infer_options`), made by
    :func:`~mdcsrn_lightning.inference.build.build_inferer`; raises :class:`Unavailable`."""
    from mdcsrn_lightning.inference.build import build_inferer

    network, options = infer_options(name, size, device, slab)
    if options.precision == "bf16" and device.type == "cpu" and not torch.backends.mkldnn.is_available():  # pragma: no cover
        raise Unavailable("bf16 on CPU needs oneDNN")
    try:
        return build_inferer(_variant(net.eval().to(device), network), options, log=lambda _: None)
    except ValueError as exc:  # InferenceError: a runtime not installed, an engine off its device
        raise Unavailable(str(exc)) from exc


def run_volumes(inferer: Callable[[Tensor], np.ndarray], volumes: Tensor) -> np.ndarray:
    """``inferer`` on each volume of ``volumes`` (``(batch, *size)``), stacked."""
    return np.stack([inferer(v) for v in volumes])


def options_dict(options: InferenceOptions) -> dict[str, Any]:
    """``options`` as JSON-ready fields (a probe's spec, a result row)."""
    out = asdict(options)
    if not isinstance(out["patch_size"], (int, str)):
        out["patch_size"] = [int(p) for p in out["patch_size"]]
    return out


# --------------------------------------------------------------------------- training
def parse_train_setting(name: str) -> tuple[bool, set[str]]:
    """``"reference"`` -> (True, {}); ``"torch"`` -> (False, {}); ``"a+b"`` -> (False, {a, b})."""
    if name == "reference":
        return True, set()
    if name == "torch":
        return False, set()
    options = set(name.split("+"))
    unknown = options - set(TRAIN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)} in {name!r}; choose from {TRAIN_OPTIONS}")
    return False, options


def make_train_step(
    name: str,
    model_cfg: dict[str, Any],
    batch: int,
    patch: int,
    device: torch.device,
    seed: int = 0,
) -> Callable[[], float]:
    """One Adam step (lr 1e-4, L1 loss) of the L1 training module, configured as ``name``,
    on a fixed random batch of ``batch`` patches of ``patch^3``. Returns the loss."""
    from mdcsrn_lightning.training.l1_module import L1Module

    reference, options = parse_train_setting(name)
    if "bf16" in options and device.type == "cpu" and not torch.backends.mkldnn.is_available():  # pragma: no cover
        raise Unavailable("bf16 on CPU needs oneDNN")
    net = build_net(model_cfg, seed, perturb_bn=False, memory_efficient="memory_efficient" in options)
    if reference:
        net = ReferenceMDCSRN.from_mdcsrn(net)
    module = L1Module(
        net,
        optimizer=partial(torch.optim.Adam, lr=1e-4),
        channels_last="channels_last" in options,
        compile="compile" in options,
    ).to(device)
    module.setup("fit")
    module.train()
    optimizer = module.configure_optimizers()
    gen = torch.Generator().manual_seed(seed + 2)
    hr = torch.rand(batch, 1, patch, patch, patch, generator=gen).to(device)
    lr = (hr + 0.05 * torch.randn(hr.shape, generator=gen).to(device)).clamp_(0, 1)
    bf16 = "bf16" in options

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if bf16:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.l1_loss(module(lr).float(), hr)
        else:
            loss = F.l1_loss(module(lr), hr)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step
