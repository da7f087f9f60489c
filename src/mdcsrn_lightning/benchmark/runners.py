"""What ``mdcsrn-bench`` times: inference engines and training-step settings, built alike in
the benchmark process and in its memory probes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from mdcsrn_lightning.models.reference import ReferenceMDCSRN

__all__ = [
    "INFER_SETTINGS",
    "TRAIN_OPTIONS",
    "Unavailable",
    "build_net",
    "make_infer_runner",
    "make_input",
    "make_train_step",
    "parse_train_setting",
]

#: inference settings: the plain reference, the package's generator run by each engine,
#: channels_last_3d eager, the streamed exact whole-volume pass (``stream`` with the
#: configured slab, ``stream:<slab>``, ``stream:whole``) and bf16 autocast.
INFER_SETTINGS = ("reference", "torch", "channels_last", "compile", "onnxruntime", "openvino", "stream", "bf16")
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
def make_input(net: nn.Module, batch: int, size: Sequence[int], seed: int, device: torch.device) -> Tensor:
    """The infer input: ``batch x net.in_channels x size``, uniform in [0, 1), seeded ``seed + 3``
    (the same tensor in the benchmark process and in its memory probes)."""
    shape = (int(batch), int(getattr(net, "in_channels", 1)), *(int(s) for s in size))
    return torch.rand(*shape, generator=torch.Generator().manual_seed(int(seed) + 3)).to(device)


def make_infer_runner(
    name: str, net: nn.Module, device: torch.device, slab: int | None = 16
) -> Callable[[Tensor], Tensor]:
    """A callable running ``net`` (eval) as setting ``name``; raises :class:`Unavailable`."""
    from mdcsrn_lightning.inference import engines

    net = net.eval().to(device)
    if name == "reference":
        ref = ReferenceMDCSRN.from_mdcsrn(net)  # on net's device, in eval mode like net

        def run_ref(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return ref(x)

        return run_ref
    if name == "channels_last":
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]

        def run_cl(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return cl(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()

        return run_cl
    if name == "stream" or name.startswith("stream:"):
        from mdcsrn_lightning.inference.streaming import StreamingMDCSRN

        if ":" in name:  # stream:16, stream:whole
            value = name.split(":", 1)[1]
            slab = None if value in ("whole", "none", "None") else int(value)
        return StreamingMDCSRN(net, slab)
    if name == "bf16":
        if device.type == "cpu" and not torch.backends.mkldnn.is_available():  # pragma: no cover
            raise Unavailable("bf16 on CPU needs oneDNN")

        def run_bf16(x: Tensor) -> Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return net(x).float()

        return run_bf16
    if name in engines.ENGINES:  # torch, compile, onnxruntime, openvino
        try:
            return engines.build_engine(net, name, device)
        except (engines.EngineUnavailable, ValueError) as exc:
            raise Unavailable(str(exc)) from exc
    raise ValueError(f"unknown inference setting {name!r}; choose from {INFER_SETTINGS}")


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
