"""Whole-volume super-resolution by patches (paper 4.1 "SR Generation").

The volume is cut into overlapping patches with TorchIO's :class:`~torchio.GridSampler`
(``patch_overlap = 2 * margin``), each patch goes through the generator, and
:class:`~torchio.GridAggregator` puts the outputs back together:

* ``overlap_mode="crop"`` (default, the paper's way: 70^3 patches, margin 3, "merged
  without averaging"): each output patch loses ``margin`` voxels on every face that lies
  inside the volume and is pasted as is. Faces on the volume border are kept, and the
  volume is **not** padded: a border patch is then computed exactly as the whole-volume
  pass computes the border, with the convolutions' own zero padding applied to every
  layer. (Padding the *input* with zeros would not do that: the first layer turns the
  zeros into non-zero features, which the second layer then sees where the whole-volume
  pass sees zero padding.) So with ``margin >= net.receptive_field_radius()``, BN in eval
  mode and float32, the result equals one forward pass over the whole volume (no seams).
  With the paper's margin 3 and a deeper net, patch faces inside the volume see less
  context than the whole-volume pass; that is the paper's trade-off.
* ``"average"`` / ``"hann"``: overlapping outputs are blended with equal / Hann weights.

``margin="auto"`` is the network's receptive-field radius (``1 + b*u`` for mDCSRN: 17 for
b4u4, 33 for b8u4), so the patch output equals the whole-volume pass exactly; patches must
then be larger than ``2 * radius`` along every axis the volume is cut. ``patch_size="auto"``
picks the largest cube that fits in half of the free memory of the device (CUDA: free
memory; CPU: ``MemAvailable``), from an estimate of the generator's activation memory per
voxel (:func:`bytes_per_voxel`). For an exact result with little memory on any volume, see
also :mod:`mdcsrn_lightning.inference.streaming` (no patches at all).

``net`` may be an ``nn.Module`` or any callable engine from
:mod:`mdcsrn_lightning.inference.engines` (ONNX Runtime, OpenVINO, torch.compile): a
callable ``(B, C, D, H, W) tensor -> tensor`` with a ``device`` attribute (CPU if absent).

Any volume shape works: along an axis shorter than the patch, the patch is the whole axis
(one patch, no overlap).

``bn_mode="train"`` runs BatchNorm with the statistics of each batch of patches instead
of the running averages (the paper did this at test time with batch 1). It works on a
copy of the network, so the caller's running statistics are not touched.

Pure torch/TorchIO/numpy: no files, no Lightning, no Hydra.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch import nn

from mdcsrn_lightning.inference.base import Inferer
from mdcsrn_lightning.inference.options import BNMode, InferenceOptions, OverlapMode

__all__ = [
    "OverlapMode",
    "BNMode",
    "PatchInferer",
    "auto_patch_size",
    "bytes_per_voxel",
    "checked_volume",
    "free_memory_bytes",
    "grid_for",
    "resolve_device",
    "resolve_margin",
    "super_resolve",
]

_OVERLAP_MODES = ("crop", "average", "hann")
_BN_MODES = ("eval", "train")
_PRECISIONS = {"32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * 3
    else:
        out = tuple(int(v) for v in value)  # type: ignore[union-attr]
        if len(out) != 3:
            raise ValueError(f"{name} must be one integer or three, got {value!r}")
    return out  # type: ignore[return-value]


def grid_for(
    shape: Sequence[int], patch_size: int | Sequence[int] = 70, margin: int | Sequence[int] = 3
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The ``(patch_size, patch_overlap)`` that :func:`super_resolve` hands to the GridSampler.

    Per axis: the patch is clamped to the volume; where one patch covers the axis the
    overlap is 0, otherwise ``2 * margin`` (which must be smaller than the patch).
    """
    if len(shape) != 3:
        raise ValueError(f"need a 3D shape, got {tuple(shape)}")
    size = _triple(patch_size, "patch_size")
    mar = _triple(margin, "margin")
    if min(size) < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size!r}")
    if min(mar) < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    patch, overlap = [], []
    for n, p, m in zip(shape, size, mar):
        p = min(p, int(n))
        o = 0 if p == n else 2 * m
        if o >= p:
            raise ValueError(
                f"patch size {p} leaves nothing inside a margin of {m} on each side; "
                f"use patches larger than 2 * margin = {2 * m}"
            )
        patch.append(p)
        overlap.append(o)
    return tuple(patch), tuple(overlap)  # type: ignore[return-value]


def resolve_margin(net: object, margin: int | Sequence[int] | str) -> int | Sequence[int]:
    """``"auto"`` -> ``net.receptive_field_radius()`` (exact patches); anything else as given."""
    if isinstance(margin, str):
        if margin != "auto":
            raise ValueError(f"margin must be an integer, three integers or 'auto', got {margin!r}")
        radius = getattr(net, "receptive_field_radius", None)
        if radius is None:
            raise ValueError(f"margin='auto' needs a network with receptive_field_radius(); {type(net).__name__} has none")
        return int(radius())
    return margin


def bytes_per_voxel(net: object, batch_size: int = 1) -> int:
    """Estimated peak activation bytes per input voxel of one float32 eval forward pass.

    mDCSRN: the reconstruction's input concatenation plus the list of levels it is made
    from (``2 * width``), plus a block's working set (its features, a unit's normalised
    copies); other networks: 256 float32 channels.
    """
    inner = getattr(net, "net", net)  # engines keep the module as .net
    if all(hasattr(inner, a) for a in ("num_blocks", "units_per_block", "growth_rate")):
        k, b, u = int(inner.growth_rate), int(inner.num_blocks), int(inner.units_per_block)  # type: ignore[attr-defined]
        block = 2 * k + u * k
        width = 2 * k + b * block
        channels = 2 * width + 4 * block + 8 * k
    else:
        channels = 256
    return 4 * channels * max(1, int(batch_size))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free memory; on CPU ``MemAvailable`` (Linux), else 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_patch_size(
    net: object,
    margin: int | Sequence[int] = 3,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    fraction: float = 0.5,
    multiple: int = 8,
    maximum: int = 256,
) -> int:
    """The patch edge for ``patch_size="auto"``: the largest cube (a multiple of ``multiple``,
    at most ``maximum``) whose estimated activations fit ``fraction`` of the free memory.

    Raises if that cube leaves nothing inside ``2 * margin``.
    """
    dev = torch.device(device)
    budget = fraction * free_memory_bytes(dev)
    edge = int((budget / bytes_per_voxel(net, batch_size)) ** (1 / 3))
    edge = min(int(maximum), edge - edge % multiple)
    need = 2 * max(_triple(margin, "margin")) + 1
    if edge < need:
        raise ValueError(
            f"patch_size=auto: only {edge}^3 patches fit in {budget / 2**30:.1f} GiB, and a margin of "
            f"{max(_triple(margin, 'margin'))} needs more than {need - 1}; give patch_size and a smaller margin, "
            "or use the streaming whole-volume pass"
        )
    return edge


def checked_volume(volume: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """``volume`` as a detached float32 ``(X, Y, Z)`` tensor on ``device``; raises unless it is
    3D and finite."""
    vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (X, Y, Z), got shape {tuple(vol.shape)}")
    vol = vol.detach().to(torch.float32)
    if not torch.isfinite(vol).all():
        raise ValueError("volume contains NaN or Inf")
    return vol.to(device)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; anything else as given.

    Raises:
        ValueError: ``"device=<value>: ..."``, an unknown device name or one this machine
            does not have (``cuda`` without a CUDA GPU, ``cuda:3`` with two GPUs, ``mps``...).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device}: unknown device; use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device}: no CUDA GPU is available here (torch {torch.__version__}); use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device}: unsupported device type {dev.type!r}; use auto, cpu or cuda")
    return dev


def _prepare_net(net: nn.Module, bn_mode: BNMode, device: torch.device) -> nn.Module:
    if bn_mode not in _BN_MODES:
        raise ValueError(f"bn_mode must be one of {_BN_MODES}, got {bn_mode!r}")
    if not isinstance(net, nn.Module):  # an engine: eval-mode BN is baked in
        if bn_mode != "eval":
            raise ValueError(f"bn_mode=train needs the torch engine; {getattr(net, 'name', type(net).__name__)} runs eval-mode BatchNorm")
        return net
    if bn_mode == "train":
        net = copy.deepcopy(net)  # batch statistics must not leak into the caller's buffers
    net = net.to(device).eval()
    if bn_mode == "train":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    return net


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm  # comes with lightning

    # disable=None: shown only on a terminal (no bar noise in logs and pipes)
    return tqdm(total=total, disable=None if enabled else True, desc=desc, unit="patch", file=sys.stderr, leave=False)


def _patch_edge(net: object, patch_size: int | Sequence[int] | str | None, margin: int | Sequence[int],
                device: torch.device, batch_size: int) -> int | Sequence[int]:
    """``patch_size`` as given; ``"auto"``/``None``: :func:`auto_patch_size`."""
    if patch_size is not None and not isinstance(patch_size, str):
        return patch_size
    if patch_size not in (None, "auto"):
        raise ValueError(f"patch_size must be an integer, three integers or 'auto', got {patch_size!r}")
    return auto_patch_size(net, margin, device, batch_size)


def super_resolve(
    net: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    volume: np.ndarray | torch.Tensor,
    *,
    patch_size: int | Sequence[int] | str | None = 70,
    margin: int | Sequence[int] | str = 3,
    overlap_mode: OverlapMode = "crop",
    batch_size: int = 1,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = "auto",
    precision: str = "32",
    progress: bool = False,
) -> np.ndarray:
    """``(X, Y, Z)`` LR volume on the HR grid -> ``(X, Y, Z)`` float32 SR volume.

    The volume must already be on the network's intensity scale (divided by its own 99.9th
    percentile, :func:`mdcsrn_lightning.data.intensity.input_scale`; :mod:`.predict` does this).

    Args:
        net: generator, ``(B, 1, D, H, W) -> (B, 1, D, H, W)``, or an engine
            (:mod:`.engines`).
        volume: 3D array or tensor.
        patch_size: patch edge (one int or three); clamped to the volume per axis.
            ``"auto"`` or ``None``: from free memory (:func:`auto_patch_size`).
        margin: voxels dropped (``crop``) or blended (``average``/``hann``) at inner patch
            faces; the GridSampler overlap is ``2 * margin``. ``"auto"``: the receptive
            field radius, so the result equals one whole-volume pass.
        overlap_mode: ``"crop"`` (paper), ``"average"`` or ``"hann"``.
        batch_size: patches per forward pass.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics).
        device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda:1"``, ...
        precision: ``"32"`` or ``"bf16"`` (autocast to bfloat16; on CUDA, or on CPU
            where slower but supported). The output is float32 either way.
        progress: show a progress bar on stderr.
    """
    if overlap_mode not in _OVERLAP_MODES:
        raise ValueError(f"overlap_mode must be one of {_OVERLAP_MODES}, got {overlap_mode!r}")
    if str(precision) not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vol = checked_volume(volume, "cpu")

    if isinstance(net, nn.Module):
        dev = resolve_device(device)
    else:
        dev = torch.device(getattr(net, "device", "cpu"))
    amp_dtype = _PRECISIONS[str(precision)]
    model = _prepare_net(net, bn_mode, dev)  # type: ignore[arg-type]
    margin = resolve_margin(net, margin)
    patch, overlap = grid_for(tuple(vol.shape), _patch_edge(net, patch_size, margin, dev, int(batch_size)), margin)

    subject = tio.Subject(image=tio.ScalarImage(tensor=vol[None]))
    # padding_mode=None: border patches are not padded (see the module docstring).
    sampler = tio.GridSampler(subject, patch_size=patch, patch_overlap=overlap, padding_mode=None)
    aggregator = tio.GridAggregator(sampler, overlap_mode=overlap_mode)
    locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.int64)
    # The sampler's own volume (unpadded, so identical to ``vol``): patches are sliced
    # from it at the sampler's locations, the same crops ``sampler[i]`` returns.
    data = sampler.subject["image"].data[0]

    bar = _progress(len(locations), progress, "mdcsrn SR")
    try:
        with torch.inference_mode():
            for start in range(0, len(locations), int(batch_size)):
                locs = locations[start : start + int(batch_size)]
                batch = torch.stack([data[i0:i1, j0:j1, k0:k1] for i0, j0, k0, i1, j1, k1 in locs.tolist()])
                batch = batch[:, None].to(dev)
                if amp_dtype is torch.float32:
                    out = model(batch)
                else:
                    with torch.autocast(device_type=dev.type, dtype=amp_dtype):
                        out = model(batch)
                aggregator.add_batch(out.float().cpu(), locs)
                bar.update(len(locs))
    finally:
        bar.close()
    return aggregator.get_output_tensor()[0].numpy().astype(np.float32, copy=False)


class PatchInferer(Inferer):
    """:func:`super_resolve` with ``options``' patch settings, the network or an engine
    (:mod:`.engines`) running the patches."""

    def __init__(self, runner: nn.Module | Callable[[torch.Tensor], torch.Tensor], options: InferenceOptions) -> None:
        self.runner = runner
        self.options = options
        engine = getattr(runner, "name", None) if not isinstance(runner, nn.Module) else "torch"
        self.name = f"patches[{engine or type(runner).__name__}]"
        if isinstance(runner, nn.Module):
            self.device = resolve_device(options.device)
        else:
            self.device = torch.device(getattr(runner, "device", "cpu"))

    def __call__(self, volume: np.ndarray | torch.Tensor) -> np.ndarray:
        return super_resolve(self.runner, volume, **self.options.kwargs())
