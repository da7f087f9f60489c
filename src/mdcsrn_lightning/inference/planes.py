"""Per-scan adaptation of a thick-slice scan with a 2D network (``adapt=true``, ``adapt.network=planes``,
the default for thick-slice checkpoints).

The scan's in-plane slices are sharp along both of their axes. Thick slices simulated along one
in-plane axis (the checkpoint's profile, ``slice_factor`` fine voxels per slice, back onto the
fine grid by its interpolation) give 2D pairs whose target is the slice itself
(:func:`plane_stacks`). A fresh :class:`~mdcsrn_lightning.models.plane_net.PlaneNet` learns to undo
them (:func:`train_planes`) and is applied to the planes that hold the thick axis, with the thick
axis as the plane's first axis as in training, beside each in-plane axis in turn; the two results
are averaged (:func:`apply_planes`). Training and application planes are of one kind (one axis
degraded, the other sharp), which a 3D network fine-tuned on in-plane pairs cannot have: its
third axis is the blurred thick axis in training. The idea is SMORE's (Zhao et al., IEEE TMI 2021),
written here from the paper.

Self-validation: a slab of in-plane slices along the thick axis, on the anatomy
(:func:`~.adapt.holdout_slab`), is held out; every ``validate_every`` steps the network's PSNR
on its pairs picks the best state (training stops after ``patience`` validations without a new
best). The checkpoint's 3D generator is scored on the same held-out pairs (their degraded axis
in its thick slot); if the plane network's best is not above it, the checkpoint is used (one
info line). Pure torch/numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mdcsrn_lightning.inference.adapt import (
    Adaptation,
    holdout_slab,
    train_loop,
    train_step,
    use_bf16,
)
from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference.ensemble import EnsembleInferer
from mdcsrn_lightning.inference.messages import info
from mdcsrn_lightning.inference.options import AdaptOptions
from mdcsrn_lightning.inference.patches import checked_volume
from mdcsrn_lightning.inference.plane_data import (
    PlaneInferer,
    check_plane_fits,
    checkpoint_score,
    held_out_planes,
    plane_batch,
    plane_score,
    plane_stacks,
)
from mdcsrn_lightning.models.plane_net import PlaneNet

__all__ = ["PlaneAdaptingInferer", "train_planes"]

def train_planes(scan: np.ndarray, options: AdaptOptions, checkpoint: nn.Module, *,
                 device: torch.device | str = "cpu", progress: bool = True,
                 log: Callable[[str], None] = info) -> tuple[PlaneNet | None, Adaptation]:
    """``(plane network to use, what happened)``: a fresh :class:`PlaneNet` trained on ``scan``'s
    :func:`plane_stacks` (``scan``: the fine grid, the network's axis order), at most
    ``options.steps`` steps and ``options.minutes``, the best held-out state kept; ``None`` (use
    ``checkpoint``, one info line) when it never beats ``checkpoint`` on the held-out slices."""
    options = options.resolved("planes")
    device = torch.device(device)
    held = check_plane_fits(scan.shape, options)
    stacks = [tuple(torch.from_numpy(v) for v in pair) for pair in plane_stacks(scan, options)]
    slab = holdout_slab(stacks[0][1], held, 1)
    rows = np.array([i for i in range(scan.shape[options.slice_axis]) if not slab[0] <= i < slab[1]])
    held_out = held_out_planes(stacks, slab, int(options.patch))  # type: ignore[arg-type]
    stride = int(options.slice_factor)  # type: ignore[arg-type]  # one held-out plane per thick slice
    bf16 = use_bf16(device)
    result = Adaptation(network="planes", precision="bf16" if bf16 else "32",
                        psnr_unadapted=checkpoint_score(checkpoint.to(device), held_out, stride, options.slice_axis))
    result.psnr_adapted = -math.inf  # a fresh network starts far below: stop on its own best, compare at the end
    torch.manual_seed(options.seed)
    net = PlaneNet().to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    floors = [0.5 * float(y.mean()) for _, y in stacks]
    # partials of lower modules' functions, so the loop in adapt.py never calls back into this file
    best = train_loop(functools.partial(train_step, net, optimizer, bf16=bf16), net,
                      functools.partial(plane_batch, stacks, rows, options, floors, device=device),
                      functools.partial(plane_score, net, held_out, stride, bf16), options, result, progress)
    if best is None or not result.psnr_adapted > result.psnr_unadapted:
        result.used = "unadapted"
        log(f"adapt: plane network at best {result.psnr_adapted:.2f} dB on the held-out slices after {result.steps} "
            f"steps, the checkpoint {result.psnr_unadapted:.2f} dB; using the checkpoint")
        return None, result
    net.load_state_dict(best)
    log(f"adapt: plane network, {result.steps} steps in {result.seconds:.0f} s (stopped by {result.stopped}), "
        f"held-out PSNR {result.psnr_unadapted:.2f} dB (checkpoint) -> {result.psnr_adapted:.2f} dB "
        f"(best at step {result.best_step})")
    return net.eval(), result


class PlaneAdaptingInferer(Inferer):
    """``inferer(volume)``: train a plane network on ``volume`` (:func:`train_planes`), then run it
    (:class:`PlaneInferer`); when self-validation keeps the checkpoint, ``unadapted`` (the
    checkpoint's patch pass over ``checkpoint``) runs instead. With ``ensemble`` (a plane), that
    application is averaged over the plane's symmetries (:class:`~.ensemble.EnsembleInferer`) and
    :meth:`mean_std` reports their spread. :attr:`adaptation`: the last volume's."""

    def __init__(self, unadapted: Inferer, checkpoint: nn.Module, options: AdaptOptions, progress: bool = False,
                 log: Callable[[str], None] = info, ensemble: tuple[int, int] | None = None) -> None:
        try:
            self.options = options.resolved("planes")
        except ValueError as exc:
            raise InferenceError(f"adapt=true: {exc}") from None
        self.unadapted, self.checkpoint, self.progress, self.log = unadapted, checkpoint, progress, log
        self.ensemble = ensemble
        self.device = unadapted.device
        self.name = "adapt[planes]" if ensemble is None else "ensemble[adapt[planes]]"
        self.adaptation: Adaptation | None = None

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        return self.mean_std(volume)[0]

    def mean_std(self, volume: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        scan = checked_volume(volume).numpy()  # float32 (X, Y, Z) on the CPU, finite
        net, self.adaptation = train_planes(scan, self.options, self.checkpoint, device=self.device,
                                            progress=self.progress, log=self.log)
        apply: Inferer = self.unadapted if net is None else PlaneInferer(net, self.options.slice_axis,
                                                                         self.adaptation.precision == "bf16")
        if self.ensemble is None:  # not apply.mean_std: Inferer's default would re-enter base.py
            return apply(scan), None
        return EnsembleInferer(apply, self.ensemble).mean_std(scan)
