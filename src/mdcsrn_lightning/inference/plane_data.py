"""The plane network's data, scores and application (``adapt.network=planes``; trained by
:mod:`.planes`): where its planes lie (:func:`plane_layout`), the scan's own 2D pairs
(:func:`plane_stacks`), random crops of them (:func:`plane_batch`), held-out scores of the
network and of the checkpoint (:func:`plane_score`, :func:`checkpoint_score`), and the network
run on the planes that hold a degraded axis (:func:`apply_planes`, :class:`PlaneInferer`).
Below :mod:`.planes` and :mod:`.adapt`, whose training loop calls :func:`plane_batch` and
:func:`plane_score`. Pure torch/numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor, nn

from mdcsrn_lightning.data.degradation import degrade
from mdcsrn_lightning.data.slices import slice_degrade
from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference.holdout import (
    holdout_slab,
    start_outside,
    validation_crop,
)
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions
from mdcsrn_lightning.inference.patches import PatchInferer, checked_volume
from mdcsrn_lightning.inference.plane_noise import noise_stacks, noisy, scan_noise

__all__ = [
    "FLIPS",
    "ONE_AXIS_EPOCHS",
    "PLANE_PATCH",
    "PLANE_ROTATIONS",
    "PlaneInferer",
    "PlaneLayout",
    "Stack",
    "apply_planes",
    "check_plane_fits",
    "checkpoint_score",
    "degrade_axis",
    "fitted",
    "held_out_planes",
    "pair_noise",
    "plane_batch",
    "plane_layout",
    "plane_score",
    "plane_slab",
    "plane_stacks",
    "pooled_psnr",
    "rotations_that_fit",
    "stack_bytes",
    "turned",
]

Stack = tuple[Tensor, Tensor]
Order = tuple[int, int, int]
#: the largest square training crop (``adapt.patch``) the plane network takes when none is given
PLANE_PATCH = 48
#: ``adapt.epochs`` when none is given and every training plane restores the same axis: such a
#: network learns that axis's look, and on a small scan (33x41x25) it memorises it within a few
#: hundred passes while its held-out pairs (the same axis) still improve; chosen on a 2 mm crop
#: of the ICBM 2009c template (peak near 185 passes), not on the scans the results are reported on
ONE_AXIS_EPOCHS = 200.0
#: ``adapt.rotations`` when none is given and both axes of every training plane are sharp (one
#: degraded axis, as for thick slices): the pairs also come from copies of the scan turned in
#: that plane by ``k * 180 / (n + 1)`` degrees, ``k = 1..n``. A small, noisy scan's few planes are
#: otherwise memorised early (noise and all); chosen on a noisy 2 mm crop of the ICBM template,
#: not on the scans the results are reported on
PLANE_ROTATIONS = 5


@dataclass(frozen=True)
class PlaneLayout:
    """Where the plane network's planes lie in a scan (the network's axis order), each plane kind
    as a ``(stack, H, W)`` axis order: ``train``, the pairs' planes (H at full resolution, degraded
    by the pairs; W in the state the application's W has); ``apply``, the planes it is run on
    (H a degraded axis); ``hold``: the axis of the held-out slab; ``factor``: the scan's (fine
    voxels per slice, or the k-space factor of every degraded axis)."""

    train: tuple[Order, ...]
    apply: tuple[Order, ...]
    hold: int
    factor: float

    @property
    def hold_in_planes(self) -> bool:
        """Whether the held-out slab cuts across training planes (then a training crop must fit
        beside it) rather than only between them."""
        return self.hold in _plane_axes(self)


def plane_layout(options: AdaptOptions) -> PlaneLayout:
    """The planes for ``options``' checkpoint. One degraded axis ``t`` (thick slices, or k-space
    ``1x1xf``): pairs from the planes of the two full axes, each in turn degraded, and the planes
    ``(t, a)`` stacked along ``b`` and ``(t, b)`` along ``a``. Two degraded axes ``d0, d1``
    (k-space ``fxfx1``): pairs from the planes ``(s, d)`` of the full axis ``s``, ``s`` degraded
    (the other axis already is), run on the planes ``(d0, d1)`` and ``(d1, d0)``, where the other
    axis is degraded too, as in training. ``ValueError``: no full axis, or unequal factors."""
    if options.slice_factor is not None:
        degraded, factor = (options.slice_axis,), float(options.slice_factor)
    else:
        degraded = tuple(ax for ax, f in enumerate(options.factors) if f > 1)
        factors = sorted({options.factors[ax] for ax in degraded})
        if not degraded or len(degraded) == 3:
            raise ValueError(f"adapt.network=planes needs an axis at full resolution and one degraded, "
                             f"got factors {list(options.factors)}")
        if len(factors) > 1:
            raise ValueError(f"adapt.network=planes needs one factor on every degraded axis, got factors "
                             f"{list(options.factors)}; give adapt.network=checkpoint")
        factor = factors[0]
    full = tuple(ax for ax in range(3) if ax not in degraded)
    if len(full) == 2:
        (t,), (a, b) = degraded, full
        return PlaneLayout(train=((t, a, b), (t, b, a)), apply=((b, t, a), (a, t, b)), hold=t, factor=factor)
    (s,), (d0, d1) = full, degraded
    return PlaneLayout(train=((d1, s, d0), (d0, s, d1)), apply=((s, d0, d1), (s, d1, d0)), hold=d0, factor=factor)


def degrade_axis(volume: np.ndarray, axis: int, options: AdaptOptions, factor: float) -> np.ndarray:
    """``volume`` degraded along ``axis`` only, as the checkpoint's scans are along theirs: thick
    slices of ``factor`` fine voxels (its profile), or k-space truncation by ``factor``; back onto
    the fine grid by its interpolation."""
    if options.slice_factor is not None:
        f = int(factor)
        return slice_degrade(volume, f, f, axis, options.slice_profile,  # type: ignore[arg-type]
                             options.interpolation)  # type: ignore[arg-type]
    factors = [1.0, 1.0, 1.0]
    factors[axis] = factor
    return degrade(volume, factors, options.interpolation)  # type: ignore[arg-type]


def plane_stacks(scan: np.ndarray, options: AdaptOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each training order ``(stack, H, W)`` of :func:`plane_layout`: ``(input, target)``
    stacks of shape ``(n_stack, n_H, n_W)``, ``scan`` degraded along ``H`` and ``scan``; then the
    same for each of ``options.rotations`` copies of ``scan`` turned in the training planes
    (:func:`turned`), in that order (stack ``i`` has order ``layout.train[i % len(layout.train)]``).
    The stacks are transposed views (crops are all that is read from them): per copy, the copy
    and one degraded array per distinct ``H`` (:func:`stack_bytes`)."""
    layout = plane_layout(options)
    target = np.asarray(scan, dtype=np.float32)
    turns = int(options.rotations or 0)
    stacks = []
    for k in range(turns + 1):
        view = target if k == 0 else turned(target, layout.train[0][1:], 180.0 * k / (turns + 1))
        degraded: dict[int, np.ndarray] = {}
        for order in layout.train:
            if order[1] not in degraded:
                degraded[order[1]] = degrade_axis(view, order[1], options, layout.factor)
            stacks.append((np.transpose(degraded[order[1]], order), np.transpose(view, order)))
    return stacks  # type: ignore[return-value]


def stack_bytes(shape: Sequence[int], options: AdaptOptions) -> int:
    """Bytes that each turned copy adds to :func:`plane_stacks` for a scan of ``shape``: the copy
    and its degraded arrays, float32."""
    distinct = len({order[1] for order in plane_layout(options).train})
    return 4 * math.prod(int(n) for n in shape) * (1 + distinct)


def rotations_that_fit(shape: Sequence[int], options: AdaptOptions, free_bytes: int, fraction: float = 0.5) -> int:
    """The most turned copies, up to ``options.rotations``, whose stacks (:func:`stack_bytes`) plus
    one copy's turning take at most ``fraction`` of ``free_bytes``; may be 0."""
    per_copy = stack_bytes(shape, options)
    turning = 8 * math.prod(int(n) for n in shape)  # scipy's spline coefficients, float64, one copy at a time
    room = int((fraction * free_bytes - turning) // per_copy)
    return max(0, min(int(options.rotations or 0), room))


def pair_noise(scan: np.ndarray, options: AdaptOptions) -> tuple[float | None, list[Tensor]]:
    """``(sigma, noise)``: with ``options.noise`` (:func:`fitted`'s), ``scan``'s noise std from its
    training planes (:func:`~.plane_noise.scan_noise`) and, for each of the scan's training orders,
    the noise that brings its pairs' inputs to it (:func:`~.plane_noise.noise_stacks`); else
    ``(None, [])``."""
    if not options.noise:
        return None, []
    layout = plane_layout(options)
    sigma = scan_noise(scan, layout.train[0][1:])
    rng = np.random.default_rng(options.seed)
    shaped = [degrade_axis(rng.standard_normal([scan.shape[ax] for ax in order]).astype(np.float32), 1, options,
                           layout.factor) for order in layout.train]
    return sigma, noise_stacks(shaped, sigma)


def turned(scan: np.ndarray, axes: Sequence[int], degrees: float) -> np.ndarray:
    """``scan`` turned by ``degrees`` in the plane of ``axes`` about its centre, same shape (cubic
    B-spline; what leaves the grid is lost, what enters is 0), float32."""
    return scipy.ndimage.rotate(scan, degrees, axes=tuple(axes), reshape=False, order=3, mode="constant",
                                cval=0.0).astype(np.float32)


def _plane_axes(layout: PlaneLayout) -> set[int]:
    return {ax for order in layout.train for ax in order[1:]}


def fitted(shape: Sequence[int], options: AdaptOptions) -> AdaptOptions:
    """``options`` resolved for ``planes`` and a scan of ``shape``: ``patch`` (when not given) the
    largest square up to :data:`PLANE_PATCH` that the training planes hold beside the held-out
    slab; ``epochs`` (when not given) :data:`ONE_AXIS_EPOCHS` where every training plane restores
    the same axis (one axis at full resolution, as for 2x2x1), else no limit; ``rotations`` (when
    not given) :data:`PLANE_ROTATIONS` where both axes of the training planes are sharp, else 0;
    ``noise`` (when not given) on where they are, else off; ``prior`` (when not given) on where
    they are and the pairs are thick slices (what the prior was trained on), else off. Rotations,
    noise or the prior asked for where a training plane has a degraded axis are one line."""
    options = options.resolved("planes")
    layout = plane_layout(options)
    if options.patch is None:
        room = [shape[ax] - (_held(shape, options, layout) if ax == layout.hold else 0) for ax in _plane_axes(layout)]
        options = replace(options, patch=max(1, min(PLANE_PATCH, *room)))
    one_axis = len({h for _, h, _ in layout.train}) == 1  # then W is degraded too: no plane is sharp both ways
    if options.epochs is None and one_axis:
        options = replace(options, epochs=ONE_AXIS_EPOCHS)
    if options.rotations is None:
        options = replace(options, rotations=0 if one_axis else PLANE_ROTATIONS)
    if options.noise is None:
        options = replace(options, noise=not one_axis)
    if options.prior is None:
        options = replace(options, prior=not one_axis and options.slice_factor is not None)  # trained on slices
    for name, asked in (("rotations", options.rotations), ("noise", options.noise), ("prior", options.prior)):
        if asked and one_axis:
            raise InferenceError(f"adapt=true: adapt.{name}={asked} needs training planes sharp along both axes (one "
                                 f"degraded axis); factors {list(options.factors)} leave one axis sharp; give "
                                 f"adapt.{name}={0 if name == 'rotations' else 'false'}")
    return options


def _held(shape: Sequence[int], options: AdaptOptions, layout: PlaneLayout) -> int:
    return max(1, round(options.holdout * shape[layout.hold]))


def check_plane_fits(shape: Sequence[int], options: AdaptOptions) -> int:
    """The number of slices held out (along the layout's ``hold`` axis); a scan whose training
    planes are below the patch, or that holds no training plane or patch beside the held-out
    slab, is one line."""
    options = fitted(shape, options)
    layout, patch = plane_layout(options), int(options.patch)  # type: ignore[arg-type]
    small = sorted(ax for ax in _plane_axes(layout) if shape[ax] < patch)
    if small:
        raise InferenceError(f"adapt=true: the scan {list(shape)} is smaller than adapt.patch={patch} along "
                             f"axis {small[0]} of its training planes; give a smaller patch")
    held = _held(shape, options, layout)
    need = patch if layout.hold_in_planes else 1
    if shape[layout.hold] - held < need:
        raise InferenceError(f"adapt=true: axis {layout.hold} of the scan {list(shape)} holds no "
                             f"{'patch' if need > 1 else 'slice'} to train on beside the {held} held out "
                             f"(adapt.holdout={options.holdout})")
    return held


def plane_slab(scan: np.ndarray, options: AdaptOptions) -> tuple[int, int]:
    """``(start, stop)`` along the layout's ``hold`` axis of the slab held out for self-validation
    (:func:`~.holdout.holdout_slab`: on the anatomy, leaving a training patch on one side where the
    slab crosses the training planes); ``options``: :func:`fitted`'s."""
    layout = plane_layout(options)
    held = check_plane_fits(scan.shape, options)
    side = int(options.patch) if layout.hold_in_planes else 1  # type: ignore[arg-type]
    return holdout_slab(torch.from_numpy(np.moveaxis(np.asarray(scan), layout.hold, 0)), held, side)


#: the flips of a plane (of a ``(N, H, W)`` stack's last two dims) that :func:`apply_planes` averages
#: over with ``flips``: each keeps which axis is degraded and how (the slices' grid, the k-space
#: band and both interpolations are symmetric), so each is a valid view of the plane; with the
#: stack axis, which a 2D network does not see, they cover all 8 flips of the volume's axes
FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (1, 2))


@torch.no_grad()
def apply_planes(net: nn.Module, volume: np.ndarray | Tensor, layout: PlaneLayout, bf16: bool = False,
                 batch: int = 8, flips: bool = False) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(X, Y, Z)`` float32: ``net`` run on the planes of each ``layout.apply``
    order ``(stack, H, W)`` (the degraded axis ``H`` first, as in training), ``batch`` planes at a
    time on ``net``'s device; the volume plus, for each degraded axis, the mean change of the
    orders that restore it (thick slices: the mean of both; k-space: both axes' changes added).
    With ``flips``, each plane's output is the mean over its 4 :data:`FLIPS`, each flipped back
    (4 times the cost; then a flipped volume gives the flipped result)."""
    vol = checked_volume(volume)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    views = FLIPS if flips else ((),)
    changes: dict[int, list[Tensor]] = {}
    for order in layout.apply:
        planes = vol.permute(*order).contiguous()
        out = torch.zeros_like(planes)
        for dims in views:
            seen = torch.flip(planes, dims) if dims else planes
            for i in range(0, planes.shape[0], batch):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    restored = net(seen[i:i + batch, None].to(device)).float()[:, 0].cpu()
                out[i:i + batch] += torch.flip(restored, dims) if dims else restored
        changes.setdefault(order[1], []).append((out / len(views)).permute(*np.argsort(order).tolist()) - vol)
    net.train(was_training)
    return (vol + sum(torch.stack(c).mean(dim=0) for c in changes.values())).numpy()


def plane_batch(stacks: list[Stack], layout: PlaneLayout, slab: tuple[int, int], options: AdaptOptions,
                floors: list[float], rng: np.random.Generator, device: torch.device | str = "cpu",
                noise: Sequence[Tensor] = ()) -> Stack:
    """``batch`` random ``patch``-square crops of either stack that do not overlap the held-out
    ``slab`` along ``layout.hold``, each redrawn up to 10 times while its target's mean is below
    the stack's ``floors`` (air); with ``noise`` (one per training order, :func:`~.plane_noise.noise_stacks`),
    a crop of it added to each input on the slices' grid (:func:`~.plane_noise.noisy`); then
    flipped at random along each axis (flips keep which axis is degraded);
    ``(batch, 1, patch, patch)`` inputs and targets on ``device``."""
    p = int(options.patch)  # type: ignore[arg-type]
    step = int(layout.factor) if options.slice_factor is not None else 1
    xs, ys = [], []
    for _ in range(int(options.batch)):  # type: ignore[arg-type]
        s = int(rng.integers(len(stacks)))
        x, y = stacks[s]
        held = layout.train[s % len(layout.train)].index(layout.hold)
        for _ in range(10):
            i, h, w = (start_outside(n, length, slab, rng) if dim == held else int(rng.integers(0, n - length + 1))
                       for dim, (n, length) in enumerate(zip(x.shape, (1, p, p))))
            if float(y[i, h:h + p, w:w + p].mean()) >= floors[s]:
                break
        px, py = x[i, h:h + p, w:w + p], y[i, h:h + p, w:w + p]
        if noise:
            px = noisy(px, noise[s % len(noise)], h, step, rng)
        dims = [d for d in (0, 1) if rng.random() < 0.5]
        if dims:
            px, py = torch.flip(px, dims), torch.flip(py, dims)
        xs.append(px)
        ys.append(py)
    return torch.stack(xs)[:, None].to(device), torch.stack(ys)[:, None].to(device)


def held_out_planes(stacks: list[Stack], layout: PlaneLayout, slab: tuple[int, int], patch: int) -> list[Stack]:
    """Each stack's held-out ``slab`` along ``layout.hold``, its centre at most 2 * ``patch`` wide
    along the other two axes (the 3D fine-tuning's :func:`~.holdout.validation_crop`), as
    ``(stack, H, W)`` blocks; the scan's own stacks only (not turned copies)."""
    blocks = []
    for (x, y), order in zip(stacks[:len(layout.train)], layout.train):
        k = order.index(layout.hold)
        moved = validation_crop(x.movedim(k, 0), y.movedim(k, 0), slab, patch)
        blocks.append(tuple(v[0, 0].movedim(0, k) for v in moved))
    return blocks  # type: ignore[return-value]


def pooled_psnr(outputs: Sequence[Tensor], held: list[Stack]) -> float:
    """PSNR (dB, peak: the targets' maximum) of ``outputs`` against the held-out targets, pooled."""
    squared = sum(float(((o.float() - y) ** 2).sum()) for o, (_, y) in zip(outputs, held))
    mse = squared / sum(y.numel() for _, y in held)
    peak = max(float(y.max()) for _, y in held)  # adapt._psnr's formula; not called: adapt.train_loop calls this
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@torch.no_grad()
def plane_score(net: nn.Module, held: list[Stack], stride: int, bf16: bool) -> float:
    """The plane network's PSNR on every ``stride``-th held-out plane."""
    device = next(net.parameters()).device
    net.eval()
    outs = []
    for x, _ in held:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            outs.append(net(x[::stride, None].to(device)).float()[:, 0].cpu())
    net.train()
    return pooled_psnr(outs, [(x[::stride], y[::stride]) for x, y in held])


def checkpoint_score(checkpoint: nn.Module, held: list[Stack], stride: int, layout: PlaneLayout,
                     options: AdaptOptions) -> float:
    """The 3D generator's PSNR on the same planes: each held-out block ``(stack, H, W)`` as a
    volume with ``H`` in the slot of the first degraded axis (one patch holding it). A k-space
    checkpoint also restores its other degraded slot, which the target keeps degraded: its
    output is degraded again along the block's stack and W axes (the checkpoint's truncation),
    so that only its restoration of ``H`` is scored."""
    device = next(checkpoint.parameters()).device
    slot = layout.apply[0][1]
    outs = []
    for x, _ in held:
        volume = np.ascontiguousarray(np.moveaxis(x.numpy(), 1, slot))
        whole = PatchInferer(checkpoint.eval(), InferenceOptions(device=str(device), patch_size=list(volume.shape),
                                                                 margin=0))
        out = np.moveaxis(whole(volume), slot, 1)
        if options.slice_factor is None:
            out = degrade(out, (layout.factor, 1.0, layout.factor), options.interpolation)  # type: ignore[arg-type]
        outs.append(torch.from_numpy(out[::stride].copy()))
    return pooled_psnr(outs, [(x[::stride], y[::stride]) for x, y in held])


class PlaneInferer(Inferer):
    """``inferer(volume)``: :func:`apply_planes` with a trained plane network (``flips``: each
    plane averaged over its :data:`FLIPS`)."""

    def __init__(self, net: nn.Module, layout: PlaneLayout, bf16: bool = False, flips: bool = False) -> None:
        self.net, self.layout, self.bf16, self.flips = net, layout, bool(bf16), bool(flips)
        self.device = next(net.parameters()).device
        self.name = "planes"

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        return apply_planes(self.net, volume, self.layout, self.bf16, flips=self.flips)
