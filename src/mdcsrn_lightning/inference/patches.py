"""Whole-volume super-resolution by patches (paper 4.1 "SR Generation"): TorchIO's
``GridSampler`` cuts, the network or an engine runs, ``GridAggregator`` merges.

The volume is not padded, so with ``margin >= receptive_field_radius()`` the result equals
one whole-volume pass; how margins, overlap modes and ``patch_size="auto"`` work:
``docs/inference.md``. Pure torch/TorchIO/numpy.
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
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.sizes import triple

__all__ = [
    "PatchInferer",
    "auto_patch_size",
    "bytes_per_voxel",
    "checked_volume",
    "free_memory_bytes",
    "grid_for",
    "progress_bar",
    "resolve_device",
    "resolve_margin",
    "super_resolve",
]

Runner = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def grid_for(
    shape: Sequence[int], patch_size: int | Sequence[int] = 70, margin: int | Sequence[int] = 3
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The GridSampler's ``(patch_size, patch_overlap)``: per axis the patch clamped to the
    volume, and an overlap of 0 where one patch covers the axis, else ``2 * margin``."""
    if len(shape) != 3:
        raise ValueError(f"need a 3D shape, got {tuple(shape)}")
    patch, overlap = [], []
    for n, p, m in zip(shape, triple(patch_size, "patch_size"), triple(margin, "margin", 0)):
        p = min(p, int(n))
        o = 0 if p == n else 2 * m
        if o >= p:
            raise ValueError(f"patch size {p} leaves nothing inside a margin of {m} on each side; "
                             f"use patches larger than 2 * margin = {2 * m}")
        patch.append(p)
        overlap.append(o)
    return tuple(patch), tuple(overlap)  # type: ignore[return-value]


def resolve_margin(net: object, margin: int | Sequence[int] | str) -> int | Sequence[int]:
    """``"auto"`` -> ``net.receptive_field_radius()`` (exact patches); anything else as given."""
    if not isinstance(margin, str):
        return margin
    radius = getattr(net, "receptive_field_radius", None)
    if radius is None:
        raise ValueError(f"margin='auto' needs a network with receptive_field_radius(); {type(net).__name__} has none")
    return int(radius())


def bytes_per_voxel(net: object, batch_size: int = 1) -> int:
    """Estimated peak activation bytes per input voxel of one float32 eval forward pass.

    mDCSRN: the reconstruction's input concatenation plus the levels it is made from
    (``2 * width``) plus a block's working set; other networks: 256 float32 channels.
    """
    inner = getattr(net, "net", net)  # engines keep the module as .net
    if all(hasattr(inner, a) for a in ("num_blocks", "units_per_block", "growth_rate")):
        k, b, u = int(inner.growth_rate), int(inner.num_blocks), int(inner.units_per_block)  # type: ignore[attr-defined]
        block = 2 * k + u * k
        channels = 2 * (2 * k + b * block) + 4 * block + 8 * k
    else:
        channels = 256
    return 4 * channels * max(1, int(batch_size))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free memory; on CPU ``MemAvailable`` (Linux), else 4 GiB."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 4 << 30


def auto_patch_size(net: object, margin: int | Sequence[int] = 3, device: torch.device | str = "cpu",
                    batch_size: int = 1, fraction: float = 0.5, multiple: int = 8, maximum: int = 256) -> int:
    """The patch edge for ``patch_size="auto"``: the largest cube (a multiple of ``multiple``,
    at most ``maximum``) whose estimated activations fit ``fraction`` of the free memory.

    Raises if that cube leaves nothing inside ``2 * margin``.
    """
    budget = fraction * free_memory_bytes(torch.device(device))
    edge = int((budget / bytes_per_voxel(net, batch_size)) ** (1 / 3))
    edge = min(int(maximum), edge - edge % multiple)
    largest = max(triple(margin, "margin", 0))
    if edge < 2 * largest + 1:
        raise ValueError(
            f"patch_size=auto: only {edge}^3 patches fit in {budget / 2**30:.1f} GiB, and a margin of "
            f"{largest} needs more than {2 * largest}; give patch_size and a smaller margin, "
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


def _prepared(runner: Runner, bn_mode: str, device: torch.device) -> Runner:
    """The network in eval mode on ``device`` (``bn_mode=train``: a copy whose BatchNorm uses
    batch statistics, so the caller's running statistics are not touched); an engine as is."""
    if not isinstance(runner, nn.Module):  # an engine: eval-mode BN is baked in
        if bn_mode != "eval":
            raise ValueError(f"bn_mode=train needs the torch engine; {getattr(runner, 'name', type(runner).__name__)} "
                             "runs eval-mode BatchNorm")
        return runner
    net = (copy.deepcopy(runner) if bn_mode == "train" else runner).to(device).eval()
    for m in net.modules():
        if bn_mode == "train" and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return net


class PatchInferer(Inferer):
    """Patches of ``options`` run by ``runner``: the network (its device: ``options.device``)
    or an engine (:mod:`.engines`, its own device).

    ``inferer(volume)``: ``(X, Y, Z)`` on the network's intensity scale -> ``(X, Y, Z)`` float32.
    """

    def __init__(self, runner: Runner, options: InferenceOptions | None = None) -> None:
        self.options = options = options or InferenceOptions()
        self.source = runner  # what patch_size/margin "auto" are measured on
        if isinstance(runner, nn.Module):
            self.device, engine = resolve_device(options.device), "torch"
        else:
            self.device, engine = torch.device(getattr(runner, "device", "cpu")), getattr(runner, "name", None)
        self.runner = _prepared(runner, options.bn_mode, self.device)
        self.name = f"patches[{engine or type(runner).__name__}]"
        self.dtype = torch.bfloat16 if "bf" in str(options.precision) else torch.float32

    def _grid(self, shape: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        opts = self.options
        margin = resolve_margin(self.source, opts.margin)
        size = opts.patch_size
        if isinstance(size, str):  # "auto"
            size = auto_patch_size(self.source, margin, self.device, opts.batch_size)
        return grid_for(shape, size, margin)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.dtype is torch.float32:
            return self.runner(batch)
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            return self.runner(batch)

    def __call__(self, volume: np.ndarray | torch.Tensor) -> np.ndarray:
        vol = checked_volume(volume, "cpu")
        patch, overlap = self._grid(tuple(vol.shape))
        # padding_mode=None: border patches are not padded (the module docstring)
        sampler = tio.GridSampler(tio.Subject(image=tio.ScalarImage(tensor=vol[None])), patch_size=patch,
                                  patch_overlap=overlap, padding_mode=None)
        aggregator = tio.GridAggregator(sampler, overlap_mode=self.options.overlap_mode)
        locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.int64)
        data = sampler.subject["image"].data[0]  # unpadded: patches are sliced at the sampler's locations
        step = self.options.batch_size
        with progress_bar(len(locations), self.options.progress, "patch") as bar, torch.inference_mode():
            for start in range(0, len(locations), step):
                locs = locations[start : start + step]
                batch = torch.stack([data[i0:i1, j0:j1, k0:k1] for i0, j0, k0, i1, j1, k1 in locs.tolist()])
                aggregator.add_batch(self._run(batch[:, None].to(self.device)).float().cpu(), locs)
                bar.update(len(locs))
        return aggregator.get_output_tensor()[0].numpy().astype(np.float32, copy=False)


def progress_bar(total: int, enabled: bool, unit: str) -> Any:
    """A tqdm bar on stderr, shown only when ``enabled`` and on a terminal (no noise in logs)."""
    from tqdm.auto import tqdm  # comes with lightning

    return tqdm(total=total, disable=None if enabled else True, desc="mdcsrn SR", unit=unit, file=sys.stderr, leave=False)


def super_resolve(net: Runner, volume: np.ndarray | torch.Tensor, **options: Any) -> np.ndarray:
    """``PatchInferer(net, InferenceOptions(**options))(volume)``: ``(X, Y, Z)`` LR on the
    network's intensity scale -> ``(X, Y, Z)`` float32 SR (defaults: the paper's 70^3
    patches, margin 3, crop)."""
    return PatchInferer(net, InferenceOptions(**options))(volume)
