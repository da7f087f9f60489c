"""Per-scan adaptation with a 2D network (``adapt=true``; ``adapt.network=planes``, the default).

The scan is sharp along its full-resolution axes. Degrading one of them the way the scan's
degraded axes are degraded (thick slices of ``slice_factor`` fine voxels with the checkpoint's
profile, or k-space truncation by the checkpoint's factor; back onto the fine grid by its
interpolation) gives 2D pairs whose target is the scan's own plane (:func:`plane_stacks`). A
:class:`~mdcsrn_lightning.models.plane_net.PlaneNet` (fresh, or for thick slices the released
prior trained across scans, ``adapt.prior``, :mod:`.plane_prior`) learns to undo it
(:func:`train_planes`) and is run on the planes that hold a degraded axis, that axis first as in
training (:func:`apply_planes`). The planes are chosen so that the plane's other axis is in the
same state in training and application (:func:`plane_layout`): sharp for a thick-slice scan
(the in-plane slices; the two in-plane axes beside the thick axis, averaged), degraded for a
2x2x1 k-space scan (pairs from the planes of axis 2 and a degraded axis; run on the planes of
axes 0 and 1, once for each, their changes added). Where the training planes are sharp both
ways (thick slices), turned copies of the scan add pairs (``adapt.rotations``) and the pairs'
inputs, degraded twice, get noise that brings theirs to the scan's (``adapt.noise``,
:mod:`.plane_noise`); each plane's output is averaged over its flips (``adapt.flips``). A 3D network fine-tuned on such pairs cannot
match them: its third axis differs between the two. The thick-slice idea is SMORE's (Zhao et
al., IEEE TMI 2021), written here from the paper.

Self-validation: a slab along the first degraded axis, on the anatomy
(:func:`~.holdout.holdout_slab`), is held out of every training plane; every ``validate_every``
steps the network's PSNR on its pairs picks the best state (training stops after ``patience``
validations without a new best). The checkpoint's 3D generator is scored on the same held-out
pairs (:func:`~.plane_data.checkpoint_score`); if the plane network's best is not above it, the
checkpoint is used (one info line). Pure torch/numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from mdcsrn_lightning.inference.adapt import (
    Adaptation,
    epoch_capped,
    train_loop,
    train_step,
    use_bf16,
)
from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference.ensemble import EnsembleInferer
from mdcsrn_lightning.inference.messages import info
from mdcsrn_lightning.inference.options import AdaptOptions
from mdcsrn_lightning.inference.patches import checked_volume, free_memory_bytes
from mdcsrn_lightning.inference.plane_data import (
    PlaneInferer,
    checkpoint_score,
    fitted,
    held_out_planes,
    pair_noise,
    plane_batch,
    plane_layout,
    plane_score,
    plane_slab,
    plane_stacks,
    rotations_that_fit,
    stack_bytes,
)
from mdcsrn_lightning.inference.plane_prior import load_prior
from mdcsrn_lightning.models.plane_net import PlaneNet
from mdcsrn_lightning.release import RELEASED_PLANE_PRIOR

__all__ = ["PlaneAdaptingInferer", "train_planes"]

def train_planes(scan: np.ndarray, options: AdaptOptions, checkpoint: nn.Module, *,
                 device: torch.device | str = "cpu", progress: bool = True,
                 log: Callable[[str], None] = info) -> tuple[PlaneNet | None, Adaptation]:
    """``(plane network to use, what happened)``: a :class:`PlaneNet` (fresh, or the released
    prior with ``options.prior``, :mod:`.plane_prior`) trained on ``scan``'s
    :func:`plane_stacks` (``scan``: the fine grid, the network's axis order), at most
    ``options.steps`` steps and ``options.minutes``, the best held-out state kept; ``None`` (use
    ``checkpoint``, one info line) when it never beats ``checkpoint`` on the held-out slices."""
    asked = options.rotations
    options = fitted(scan.shape, options)
    if asked is None:  # the default, not a given setting: fewer turned copies where they would not fit
        options = _rotations_capped(scan.shape, options, log)
    device = torch.device(device)
    layout = plane_layout(options)
    slab = plane_slab(scan, options)
    stacks = [tuple(torch.from_numpy(v) for v in pair) for pair in plane_stacks(scan, options)]
    held_out = held_out_planes(stacks, layout, slab, int(options.patch))  # type: ignore[arg-type]
    sigma, noise = pair_noise(scan, options)
    training = sum(x.numel() for x, _ in stacks) * (1 - (slab[1] - slab[0]) / scan.shape[layout.hold])
    options = epoch_capped(options, training, int(options.patch) ** 2)  # type: ignore[arg-type]
    stride = max(1, round(layout.factor))  # one held-out plane per coarse sample
    bf16 = use_bf16(device)
    result = Adaptation(network="planes", precision="bf16" if bf16 else "32",
                        psnr_unadapted=checkpoint_score(checkpoint.to(device), held_out, stride, layout, options),
                        settings={"patch": options.patch, "epochs": options.epochs, "rotations": options.rotations,
                                  "noise": None if sigma is None else round(sigma, 6),
                                  "prior": RELEASED_PLANE_PRIOR.name if options.prior else None})
    result.psnr_adapted = -math.inf  # stop on the network's own best (a fresh one starts far below), compare at the end
    torch.manual_seed(options.seed)
    net = (load_prior()[0] if options.prior else PlaneNet()).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    floors = [0.5 * float(y.mean()) for _, y in stacks]
    # partials of lower modules' functions, so the loop in adapt.py never calls back into this file
    best = train_loop(functools.partial(train_step, net, optimizer, bf16=bf16), net,
                      functools.partial(plane_batch, stacks, layout, slab, options, floors, device=device, noise=noise),
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


def _rotations_capped(shape: tuple[int, ...], options: AdaptOptions, log: Callable[[str], None]) -> AdaptOptions:
    """``options`` with at most the turned copies whose pairs fit half the free memory
    (:func:`~.plane_data.rotations_that_fit`; one info line where that is fewer)."""
    free = free_memory_bytes(torch.device("cpu"))  # the pairs stay on the CPU; crops go to the device
    fit = rotations_that_fit(shape, options, free)
    if fit < int(options.rotations or 0):
        log(f"adapt: {fit} of {options.rotations} turned copies fit in half the free memory ({free / 2**30:.1f} GiB; "
            f"{stack_bytes(shape, options) / 2**30:.2f} GiB each); adapt.rotations={fit}")
        options = replace(options, rotations=fit)
    return options


class PlaneAdaptingInferer(Inferer):
    """``inferer(volume)``: train a plane network on ``volume`` (:func:`train_planes`), then run it
    (:class:`PlaneInferer`); when self-validation keeps the checkpoint, ``unadapted`` (the
    checkpoint's patch pass over ``checkpoint``) runs instead. The plane network's output is
    averaged over the scan's flips (``options.flips``), except with ``ensemble`` (a plane): then
    the plane's symmetries average it (:class:`~.ensemble.EnsembleInferer`) and :meth:`mean_std`
    reports their spread. :attr:`adaptation`: the last volume's."""

    def __init__(self, unadapted: Inferer, checkpoint: nn.Module, options: AdaptOptions, progress: bool = False,
                 log: Callable[[str], None] = info, ensemble: tuple[int, int] | None = None) -> None:
        self.options = options.resolved("planes")
        try:
            self.layout = plane_layout(self.options)
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
        # under an ensemble its symmetries do the averaging, so that their spread stays the network's
        flips = net is not None and self.options.flips and self.ensemble is None
        self.adaptation.settings["flips"] = flips  # as applied (the checkpoint's fallback pass has none)
        apply: Inferer = self.unadapted if net is None else PlaneInferer(
            net, self.layout, self.adaptation.precision == "bf16", flips=flips)
        if self.ensemble is None:  # not apply.mean_std: Inferer's default would re-enter base.py
            return apply(scan), None
        return EnsembleInferer(apply, self.ensemble).mean_std(scan)
