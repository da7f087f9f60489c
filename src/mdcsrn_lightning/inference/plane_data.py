"""The plane network's data, scores and application (``adapt.network=planes``; trained by
:mod:`.planes`): the scan's in-plane pairs (:func:`plane_stacks`), random crops of them
(:func:`plane_batch`), held-out scores of the network and of the checkpoint
(:func:`plane_score`, :func:`checkpoint_score`), and the network run on the planes that hold the
thick axis (:func:`apply_planes`, :class:`PlaneInferer`). Below :mod:`.planes` and
:mod:`.adapt`, whose training loop calls :func:`plane_batch` and :func:`plane_score`. Pure torch/numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mdcsrn_lightning.data.slices import slice_degrade
from mdcsrn_lightning.inference.adapt import validation_crop
from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions
from mdcsrn_lightning.inference.patches import PatchInferer, checked_volume

__all__ = [
    "PlaneInferer",
    "Stack",
    "apply_planes",
    "check_plane_fits",
    "checkpoint_score",
    "held_out_planes",
    "plane_batch",
    "plane_score",
    "plane_stacks",
    "pooled_psnr",
]

Stack = tuple[Tensor, Tensor]


def _inplane(slot: int) -> tuple[int, int]:
    a, b = (ax for ax in range(3) if ax != slot)
    return a, b


def plane_stacks(scan: np.ndarray, options: AdaptOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each in-plane axis ``a`` of ``scan`` (the network's axis order, thick axis in
    ``options.slice_axis``): ``(input, target)`` stacks of shape ``(n_thick, n_a, n_b)``, the
    in-plane slices with thick slices simulated along ``a`` (their first axis), and the slices."""
    if options.slice_factor is None:
        raise ValueError("plane_stacks needs options.slice_factor (a thick-slice checkpoint)")
    slot, f = options.slice_axis, int(options.slice_factor)
    target = np.asarray(scan, dtype=np.float32)
    stacks = []
    for a, b in (_inplane(slot), _inplane(slot)[::-1]):
        degraded = slice_degrade(target, f, f, a, options.slice_profile,  # type: ignore[arg-type]
                                 options.interpolation)  # type: ignore[arg-type]
        stacks.append(tuple(np.ascontiguousarray(np.transpose(v, (slot, a, b))) for v in (degraded, target)))
    return stacks  # type: ignore[return-value]


def check_plane_fits(shape: Sequence[int], options: AdaptOptions) -> int:
    """The number of in-plane slices held out; a scan whose in-plane size is below the patch, or
    whose thick axis holds no slice beside the held-out ones, is one line."""
    options = options.resolved("planes")
    slot, patch = options.slice_axis, int(options.patch)  # type: ignore[arg-type]
    small = [ax for ax in _inplane(slot) if shape[ax] < patch]
    if small:
        raise InferenceError(f"adapt=true: the scan {list(shape)} is smaller than adapt.patch={patch} along "
                             f"in-plane axis {small[0]}; give a smaller patch")
    held = max(1, round(options.holdout * shape[slot]))
    if shape[slot] - held < 1:
        raise InferenceError(f"adapt=true: thick axis {slot} of the scan {list(shape)} has no slice to train on "
                             f"beside the {held} held out (adapt.holdout={options.holdout})")
    return held


@torch.no_grad()
def apply_planes(net: nn.Module, volume: np.ndarray | Tensor, slot: int, bf16: bool = False,
                 batch: int = 8) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(X, Y, Z)`` float32: the mean over the two in-plane axes ``b`` of ``net``
    run on the planes ``(slot, b)`` (the thick axis first, as in training), one per voxel of the
    third axis, ``batch`` planes at a time on ``net``'s device."""
    vol = checked_volume(volume)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    total = torch.zeros_like(vol)
    for keep, across in (_inplane(slot), _inplane(slot)[::-1]):
        order = (across, slot, keep)
        planes = vol.permute(*order).contiguous()
        out = torch.empty_like(planes)
        for i in range(0, planes.shape[0], batch):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out[i:i + batch] = net(planes[i:i + batch, None].to(device)).float()[:, 0].cpu()
        total += out.permute(*np.argsort(order).tolist())
    net.train(was_training)
    return (total / 2).numpy()


def plane_batch(stacks: list[Stack], rows: np.ndarray, options: AdaptOptions, floors: list[float],
                rng: np.random.Generator, device: torch.device | str = "cpu") -> Stack:
    """``batch`` random ``patch``-square crops of training slices ``rows`` (either stack), each
    redrawn up to 10 times while its target's mean is below the stack's ``floors`` (air), then
    flipped at random along each axis (flips keep which axis is degraded); ``(batch, 1, patch,
    patch)`` inputs and targets on ``device``."""
    p = int(options.patch)  # type: ignore[arg-type]
    xs, ys = [], []
    for _ in range(int(options.batch)):  # type: ignore[arg-type]
        s = int(rng.integers(len(stacks)))
        x, y = stacks[s]
        for _ in range(10):
            i = int(rows[rng.integers(len(rows))])
            h, w = (int(rng.integers(0, n - p + 1)) for n in x.shape[1:])
            if float(y[i, h:h + p, w:w + p].mean()) >= floors[s]:
                break
        px, py = x[i, h:h + p, w:w + p], y[i, h:h + p, w:w + p]
        dims = [d for d in (0, 1) if rng.random() < 0.5]
        if dims:
            px, py = torch.flip(px, dims), torch.flip(py, dims)
        xs.append(px)
        ys.append(py)
    return torch.stack(xs)[:, None].to(device), torch.stack(ys)[:, None].to(device)


def held_out_planes(stacks: list[Stack], slab: tuple[int, int], patch: int) -> list[Stack]:
    """Each stack's held-out ``slab`` of slices, their centre at most 2 * ``patch`` wide (the 3D
    fine-tuning's :func:`~.adapt.validation_crop`)."""
    return [tuple(v[0, 0] for v in validation_crop(x, y, slab, patch)) for x, y in stacks]  # type: ignore[misc]


def pooled_psnr(outputs: Sequence[Tensor], held: list[Stack]) -> float:
    """PSNR (dB, peak: the targets' maximum) of ``outputs`` against the held-out targets, pooled."""
    squared = sum(float(((o.float() - y) ** 2).sum()) for o, (_, y) in zip(outputs, held))
    mse = squared / sum(y.numel() for _, y in held)
    peak = max(float(y.max()) for _, y in held)  # adapt._psnr's formula; not called: adapt.train_loop calls this
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@torch.no_grad()
def plane_score(net: nn.Module, held: list[Stack], stride: int, bf16: bool) -> float:
    """The plane network's PSNR on every ``stride``-th held-out slice."""
    device = next(net.parameters()).device
    net.eval()
    outs = []
    for x, _ in held:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            outs.append(net(x[::stride, None].to(device)).float()[:, 0].cpu())
    net.train()
    return pooled_psnr(outs, [(x[::stride], y[::stride]) for x, y in held])


def checkpoint_score(checkpoint: nn.Module, held: list[Stack], stride: int, slot: int) -> float:
    """The 3D generator's PSNR on the same slices: each held-out slab (``(slices, a, b)``) as a
    volume with its degraded axis ``a`` in the thick ``slot``, one patch holding it."""
    device = next(checkpoint.parameters()).device
    outs = []
    for x, _ in held:
        volume = np.ascontiguousarray(np.moveaxis(x.numpy(), 1, slot))
        whole = PatchInferer(checkpoint.eval(), InferenceOptions(device=str(device), patch_size=list(volume.shape),
                                                                 margin=0))
        outs.append(torch.from_numpy(np.moveaxis(whole(volume), slot, 1)[::stride].copy()))
    return pooled_psnr(outs, [(x[::stride], y[::stride]) for x, y in held])


class PlaneInferer(Inferer):
    """``inferer(volume)``: :func:`apply_planes` with a trained plane network."""

    def __init__(self, net: nn.Module, slot: int, bf16: bool = False) -> None:
        self.net, self.slot, self.bf16 = net, int(slot), bool(bf16)
        self.device = next(net.parameters()).device
        self.name = "planes"

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        return apply_planes(self.net, volume, self.slot, self.bf16)


