"""The one place where the inference strategy and engine are chosen: :func:`build_inferer`
(which options give which inferer on which device: ``docs/inference.md``)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn

from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference import engines
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.inference.patches import PatchInferer, resolve_device
from mdcsrn_lightning.inference.exact import ExactInferer, SlabRunner
from mdcsrn_lightning.inference.ensemble import EnsembleInferer
from mdcsrn_lightning.inference.adapt import AdaptingInferer
from mdcsrn_lightning.inference.planes import PlaneAdaptingInferer

__all__ = ["build_inferer"]

_DEFAULT_SLAB = 16


def _info(message: str) -> None:
    print(f"mdcsrn: {message}", file=sys.stderr, flush=True)


def build_inferer(
    net: nn.Module, options: InferenceOptions | None = None, *, log: Callable[[str], None] = _info,
    plane: tuple[int, int] = (0, 1),
) -> Inferer:
    """The inferer that ``options`` ask for, running ``net``: patches
    (:class:`~.patches.PatchInferer`, the network or an engine built from it once) or, with
    ``stream=true``, the exact whole-volume pass (eager slab streaming: any device;
    OpenVINO block streaming: CPU; ``auto``: OpenVINO where installed, else eager).
    ``uncertainty=true`` wraps that inferer in :class:`~.ensemble.EnsembleInferer` (the mean
    over the symmetries of ``plane``, the degradation's, :func:`~.ensemble.symmetry_plane`, and
    its standard deviation). ``adapt`` (:class:`~.options.AdaptOptions`):
    :class:`~.adapt.AdaptingInferer`, which fine-tunes a copy of ``net`` on each volume, then
    runs the patches with it (with ``uncertainty=true``, over the symmetries of ``plane``).

    Built once per model: engines are exported and compiled here, not per volume.

    Raises:
        InferenceError: a combination that cannot run here (one line).
        ValueError: a device this machine does not have.
    """
    options = options or InferenceOptions()
    device = resolve_device(options.device)
    if options.adapt is not None:
        return _adapting(net, options, plane)
    inferer: Inferer
    if options.stream:
        inferer = ExactInferer(_exact_runner(net, options, device, log), progress=options.progress)
    else:
        inferer = PatchInferer(_patch_runner(net, options, device), options)
    return EnsembleInferer(inferer, plane) if options.uncertainty else inferer


def _patch_runner(net: nn.Module, options: InferenceOptions, device: torch.device) -> nn.Module | Callable:
    """``net`` itself (engine ``torch``; ``auto`` with ``bn_mode=train``) or an engine built from it."""
    engine = options.engine
    if engine == "torch" or (engine == "auto" and options.bn_mode != "eval"):
        return net
    if options.bn_mode != "eval":
        raise InferenceError(f"engine={engine}: bn_mode=train needs engine=torch")
    try:
        return engines.build_engine(net, engine, device)
    except (ImportError, RuntimeError) as exc:  # a missing runtime, a failed export
        raise InferenceError(f"engine={engine}: {exc}") from exc


def _exact_runner(net: nn.Module, options: InferenceOptions, device: torch.device,
                  log: Callable[[str], None]) -> SlabRunner:
    """The exact whole-volume pass for ``options.engine`` on ``device``."""
    from mdcsrn_lightning.inference.block_stream import BlockStreamingMDCSRN
    from mdcsrn_lightning.inference.streaming import StreamingMDCSRN

    if options.bn_mode != "eval":
        raise InferenceError("stream=true needs bn_mode=eval (batch statistics cannot be streamed)")
    engine = options.engine
    if engine == "openvino" and device.type != "cpu":
        raise InferenceError(f"stream=true engine=openvino runs on the CPU, not device={device}")
    if device.type != "cpu":
        engine = "torch"  # the eager pass is the GPU path
    elif engine == "auto":
        engine = "openvino" if engines.engine_available("openvino") else "torch"
        if engine == "torch":
            log("stream=true engine=auto: OpenVINO is not installed, using the eager streamed pass "
                "(pip install 'mdcsrn-lightning[openvino]' for a faster exact pass)")
    if engine not in ("torch", "openvino"):
        raise InferenceError(f"stream=true: runs engine=torch, openvino or auto, got engine={engine}")
    if engine == "openvino" and not engines.engine_available("openvino"):
        raise InferenceError("stream=true engine=openvino needs: pip install 'mdcsrn-lightning[openvino]'")
    slab = _DEFAULT_SLAB if options.slab is None else options.slab
    try:
        net = net.to(device)
        if engine == "torch":
            return StreamingMDCSRN(net, slab)
        return BlockStreamingMDCSRN(net, slab)
    except (TypeError, ValueError) as exc:  # not an mDCSRN, blocks of several layouts
        raise InferenceError(f"stream=true: {exc}") from None


def _adapting(net: nn.Module, options: InferenceOptions, plane: tuple[int, int]) -> Inferer:
    """The patch pass (engine torch) on a copy of ``net`` whose weights each volume's fine-tuning
    replaces, or (``adapt.network=planes``) a plane network trained on each volume with that pass
    as the fallback; with ``uncertainty=true``, averaged over the symmetries of ``plane`` once adapted."""
    assert options.adapt is not None
    for refused, why in ((options.stream, "stream=true"),
                         (options.engine not in ("torch", "auto"), f"engine={options.engine}"),
                         (options.bn_mode != "eval", "bn_mode=train")):
        if refused:
            raise InferenceError(f"adapt=true runs the patch pass with engine=torch and bn_mode=eval; not with {why}")
    adapt = options.adapt.resolved()
    ensemble = plane if options.uncertainty else None
    work = copy.deepcopy(net)
    inner = PatchInferer(work, options)
    if adapt.network == "planes":
        return PlaneAdaptingInferer(inner, work, adapt, progress=options.progress, ensemble=ensemble)
    return AdaptingInferer(inner, work, adapt, progress=options.progress, ensemble=ensemble)
