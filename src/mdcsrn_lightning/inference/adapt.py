"""Per-scan self-supervised fine-tuning of the checkpoint before inference (``adapt=true``
with ``adapt.network=checkpoint``; the default, ``planes``, trains a 2D network instead: :mod:`.planes`).

A scan on the fine grid, degraded along the checkpoint's axes (axes 0 and 1 for 2x2x1), is
still at full resolution along the others (axis 2). Degrading it once more along that axis by
the in-plane factor (:func:`self_pairs`, the checkpoint's interpolation) gives a pair whose
target is the scan itself: a copy of the generator is fine-tuned on random patches of those
pairs (:func:`fine_tune`), a slab of them held out to check that it helps
(:func:`self_validate`). The adapted model restores the axis in the full-resolution slot, so
it is applied with each degraded axis swapped into that slot in turn (:func:`~.permuted.apply_permuted`).
The held-out pairs pick the best state, but they favour any adapted model (the unadapted one
was never trained for their slot); so the adapted model must also beat the unadapted one on
the real task one scale down (:func:`real_task_check`: the scan's centre degraded again by the
checkpoint's factors, restored as each model would be applied), or the unadapted one is used.

A thick-slice checkpoint (``options.slice_factor`` set) with ``adapt.network=checkpoint`` is
adapted the same way with pairs from an in-plane axis (:func:`thick_pairs`: thick slices simulated along the first
in-plane axis, swapped into the network's thick slot) and applied as it is (its thick slot
already holds the scan's thick axis). There the held-out pairs are the real task's own slot for
both models, so self-validation alone decides.

Built by :func:`~.build.build_inferer` (:class:`AdaptingInferer`); pure torch/numpy.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mdcsrn_lightning.cpu_features import cpu_bf16_support
from mdcsrn_lightning.data.degradation import data_consistency, degrade
from mdcsrn_lightning.data.slices import slice_degrade
from mdcsrn_lightning.inference.base import InferenceError, Inferer
from mdcsrn_lightning.inference.ensemble import EnsembleInferer
from mdcsrn_lightning.inference.holdout import (
    holdout_slab,
    start_outside,
    validation_crop,
)
from mdcsrn_lightning.inference.messages import info
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions
from mdcsrn_lightning.inference.patches import PatchInferer, checked_volume
from mdcsrn_lightning.inference.permuted import (
    PermutedInferer,
    apply_permuted,
    pair_factors,
)

__all__ = [
    "Adaptation",
    "AdaptingInferer",
    "check_patch_fits",
    "epoch_capped",
    "fine_tune",
    "real_task_check",
    "save_adapted",
    "self_pairs",
    "self_validate",
    "thick_pairs",
    "train_loop",
    "use_bf16",
]

# ------------------------------------------------------------------------ pairs
def self_pairs(scan: np.ndarray, factors: Sequence[float], interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """``(input, target)``: ``scan`` degraded along its full-resolution axis only, and ``scan``."""
    _, fs = pair_factors(factors)
    target = np.asarray(scan, dtype=np.float32)
    return degrade(target, fs, interpolation), target  # type: ignore[arg-type]


def thick_pairs(scan: np.ndarray, options: AdaptOptions) -> tuple[np.ndarray, np.ndarray]:
    """``(input, target)`` for a thick-slice checkpoint: ``scan`` (the network's axis order, its
    thick axis in ``options.slice_axis``) with thick slices of ``slice_factor`` fine voxels
    simulated along its first in-plane axis, and ``scan``, both with that axis swapped into the
    thick slot."""
    if options.slice_factor is None:
        raise ValueError("thick_pairs needs options.slice_factor")
    inplane, slot = _thick_swap(options)
    f = int(options.slice_factor)
    target = np.asarray(scan, dtype=np.float32)
    degraded = slice_degrade(target, f, f, inplane, options.slice_profile,  # type: ignore[arg-type]
                             options.interpolation)  # type: ignore[arg-type]
    return tuple(np.ascontiguousarray(np.swapaxes(a, inplane, slot)) for a in (degraded, target))  # type: ignore[return-value]


def _thick_swap(options: AdaptOptions) -> tuple[int, int]:
    """``(in-plane axis the pairs' slices are simulated along, the network's thick slot)``."""
    slot = options.slice_axis
    return min(ax for ax in range(3) if ax != slot), slot


def scan_pairs(scan: np.ndarray, options: AdaptOptions) -> tuple[np.ndarray, np.ndarray]:
    """The pairs :func:`fine_tune` learns from: :func:`thick_pairs` or :func:`self_pairs`."""
    if options.slice_factor is not None:
        return thick_pairs(scan, options)
    return self_pairs(scan, options.factors, options.interpolation)


def pair_shape(shape: Sequence[int], options: AdaptOptions) -> tuple[int, int, int]:
    """The shape of :func:`scan_pairs` for a scan of ``shape`` (the network's axis order)."""
    out = [int(n) for n in shape[:3]]
    if options.slice_factor is not None:
        inplane, slot = _thick_swap(options)
        out[inplane], out[slot] = out[slot], out[inplane]
    return tuple(out)  # type: ignore[return-value]


def check_patch_fits(shape: Sequence[int], options: AdaptOptions) -> int:
    """The held-out slab's thickness along axis 0; a scan too small for the patch (or for the
    patch plus the slab along axis 0) is one line."""
    options = options.resolved("checkpoint")
    small = [ax for ax, n in enumerate(shape) if n < options.patch]
    if small:
        raise InferenceError(f"adapt=true: the scan {list(shape)} is smaller than adapt.patch={options.patch} "
                             f"along axis {small[0]}; give a smaller patch")
    held = max(1, round(options.holdout * shape[0]))
    if shape[0] - held < options.patch:
        raise InferenceError(f"adapt=true: axis 0 of the scan {list(shape)} holds no {options.patch}-voxel patch "
                             f"beside the held-out slab of {held} (adapt.holdout={options.holdout}); give a smaller "
                             "patch or holdout")
    return held


# ------------------------------------------------------------------------ training
def _random_batch(x: Tensor, y: Tensor, slab: tuple[int, int], options: AdaptOptions,
                  rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random patches of the pairs that do not overlap the held-out ``slab`` along axis 0
    (patches start before it or after it, in proportion to the starts each side offers), each
    flipped at random along axes 0 and 1 (flips keep which axis is degraded)."""
    p = options.patch
    xs, ys = [], []
    for _ in range(options.batch):
        i = start_outside(x.shape[0], p, slab, rng)
        j, k = (int(rng.integers(0, n - p + 1)) for n in x.shape[1:])
        px, py = x[i:i + p, j:j + p, k:k + p], y[i:i + p, j:j + p, k:k + p]
        dims = [d for d in (0, 1) if rng.random() < 0.5]
        if dims:
            px, py = torch.flip(px, dims), torch.flip(py, dims)
        xs.append(px)
        ys.append(py)
    return torch.stack(xs)[:, None], torch.stack(ys)[:, None]


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, bf16: bool) -> float:
    """One L1 step (bf16 autocast where ``bf16``); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.l1_loss(net(x).float(), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def self_validate(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """PSNR (dB, peak: the target's maximum) of ``net(x)`` against ``y``, the held-out pairs."""
    was_training = net.training
    net.eval()
    out = net(x).float()
    net.train(was_training)
    return _psnr(float(torch.mean((out - y) ** 2)), float(y.max()))


def _psnr(mse: float, peak: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@dataclass
class Adaptation:
    """What :func:`fine_tune` did (recorded in the provenance and the adapted checkpoint)."""

    network: str = "checkpoint"
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"
    psnr_unadapted: float = 0.0
    psnr_adapted: float = 0.0
    best_step: int = 0
    used: str = "adapted"
    precision: str = "32"
    real_task_psnr: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready; ``settings`` (plane network): what it resolved for this scan, and whether its
        output was averaged over flips."""
        return {"network": self.network, "steps": self.steps, "seconds": round(self.seconds, 2), "stopped": self.stopped,
                "best_step": self.best_step, "used": self.used, "precision": self.precision,
                "self_validation_psnr": {"unadapted": round(self.psnr_unadapted, 4),
                                         "adapted": round(self.psnr_adapted, 4)},
                "real_task_psnr": {k: round(v, 4) for k, v in self.real_task_psnr.items()},
                **({"settings": dict(self.settings)} if self.settings else {})}


def _frozen_bn(net: nn.Module) -> nn.Module:
    """``net`` in training mode with its BatchNorm layers on their running statistics (a few
    patches per step are too few to re-estimate them)."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def epoch_capped(options: AdaptOptions, training_voxels: float, patch_voxels: int) -> AdaptOptions:
    """``options`` with ``steps`` cut to ``epochs`` passes over ``training_voxels`` (``batch``
    crops of ``patch_voxels`` a step; at least one step). The held-out pairs cannot see a network
    memorise a small scan: they test the axis it trains on, not the axes it is run on."""
    if options.epochs is None:
        return options
    cap = math.ceil(options.epochs * training_voxels / (int(options.batch) * patch_voxels))  # type: ignore[arg-type]
    return replace(options, steps=max(1, min(int(options.steps), cap)))  # type: ignore[arg-type]


def fine_tune(net: nn.Module, scan: np.ndarray, options: AdaptOptions, *, device: torch.device | str = "cpu",
              progress: bool = True, log: Callable[[str], None] = info,
              step: Callable[..., float] = train_step) -> tuple[nn.Module, Adaptation]:
    """``(model to use, what happened)``: a copy of ``net`` fine-tuned on ``scan``'s own pairs
    (:func:`scan_pairs`), at most ``options.steps`` steps and ``options.minutes``, validated on the
    held-out slab every ``validate_every`` steps (the best state kept, stopped after ``patience``
    validations without improvement); ``net`` itself when that never beats it (one info line)."""
    device = torch.device(device)
    options = options.resolved("checkpoint")
    held = check_patch_fits(pair_shape(scan.shape, options), options)
    x, y = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in scan_pairs(scan, options))
    slab = holdout_slab(y, held, options.patch)
    options = epoch_capped(options, x.numel() * (1 - held / x.shape[0]), options.patch ** 3)
    vx, vy = validation_crop(x, y, slab, options.patch)
    result = Adaptation(psnr_unadapted=self_validate(net.to(device), vx, vy))
    result.psnr_adapted = result.psnr_unadapted
    bf16 = use_bf16(device)
    result.precision = "bf16" if bf16 else "32"
    work = _frozen_bn(copy.deepcopy(net))
    optimizer = torch.optim.Adam(work.parameters(), lr=options.lr)
    best = train_loop(lambda bx, by: step(work, optimizer, bx, by, bf16), work,
                      lambda rng: _random_batch(x, y, slab, options, rng), lambda: self_validate(work, vx, vy),
                      options, result, progress)
    if best is None:
        result.used = "unadapted"
        log(f"adapt: self-validation PSNR {result.psnr_unadapted:.2f} dB unadapted, no better after {result.steps} "
            "steps; using the unadapted model")
        return net.eval(), result
    work.load_state_dict(best)
    work.eval()
    summary = (f"adapt: {result.steps} steps in {result.seconds:.0f} s (stopped by {result.stopped}), self-validation "
               f"PSNR {result.psnr_unadapted:.2f} -> {result.psnr_adapted:.2f} dB (best at step {result.best_step})")
    if options.slice_factor is not None:  # the held-out pairs were the real task's slot for both models
        log(summary)
        return work, result
    result.real_task_psnr = real_task_check(net, work, scan, options)
    before, after = result.real_task_psnr["unadapted"], result.real_task_psnr["adapted"]
    summary += f"; real task one scale down {before:.2f} -> {after:.2f} dB"
    if not after > before:
        result.used = "unadapted"
        log(f"{summary}: no better; using the unadapted model")
        return net.eval(), result
    log(summary)
    return work, result


def real_task_check(net: nn.Module, adapted: nn.Module, scan: np.ndarray, options: AdaptOptions,
                    size: int = 64) -> dict[str, float]:
    """PSNR (dB, peak: the crop's maximum) of each model on the real task one scale down: the
    scan's centre (at most ``size`` per axis) degraded again by the checkpoint's factors is the
    input, the crop the target; ``net`` applied as is, ``adapted`` by :func:`apply_permuted`
    (``options.order``); data consistency with the re-degraded crop after both."""
    starts = [max(0, (n - size) // 2) for n in scan.shape]
    crop = np.ascontiguousarray(scan[tuple(slice(a, a + min(size, n)) for a, n in zip(starts, scan.shape))],
                                dtype=np.float32)
    low = degrade(crop, options.factors, options.interpolation)  # type: ignore[arg-type]
    device = next(net.parameters()).device

    def whole(model: nn.Module) -> Inferer:  # one patch holding the whole crop
        return PatchInferer(model, InferenceOptions(device=str(device), patch_size=list(low.shape), margin=0))

    def psnr(out: np.ndarray) -> float:
        out = data_consistency(out, low, options.factors, options.interpolation)  # type: ignore[arg-type]
        return _psnr(float(np.mean((out.astype(np.float64) - crop) ** 2)), float(crop.max()))

    return {"unadapted": psnr(whole(net.eval())(low)),
            "adapted": psnr(apply_permuted(whole(adapted), low, options.factors, options.order))}


def use_bf16(device: torch.device) -> bool:
    """Whether adaptation trains under bf16 autocast: where the device computes bf16 natively."""
    return device.type == "cpu" and cpu_bf16_support()[0] or device.type == "cuda" and torch.cuda.is_bf16_supported()


def train_loop(run_step: Callable[[Tensor, Tensor], float], work: nn.Module,
               draw: Callable[[np.random.Generator], tuple[Tensor, Tensor]], validate: Callable[[], float],
               options: AdaptOptions, result: Adaptation, progress: bool) -> dict[str, Tensor] | None:
    """Steps on ``draw``'s batches until ``steps``, ``minutes`` or early stopping (``validate``:
    the held-out score, higher is better); the best validated state of ``work`` (``None``: none
    beat ``result.psnr_adapted``, the unadapted model's score). Fills ``result``."""
    from tqdm.auto import tqdm  # comes with lightning

    rng = np.random.default_rng(options.seed)
    torch.manual_seed(options.seed)
    start, best, waited = time.perf_counter(), None, 0
    limit = math.inf if options.minutes is None else 60.0 * options.minutes
    bar = tqdm(total=options.steps, disable=None if progress else True, desc="mdcsrn adapt", unit="step",
               file=sys.stderr, leave=False)
    with bar:
        while result.steps < options.steps:
            if time.perf_counter() - start >= limit:
                result.stopped = "minutes"
                break
            result.losses.append(run_step(*draw(rng)))
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            out_of_time = time.perf_counter() - start >= limit
            if result.steps % options.validate_every and result.steps < options.steps and not out_of_time:
                continue
            score = validate()
            _frozen_bn(work)
            if score > result.psnr_adapted:
                result.psnr_adapted, result.best_step, waited = score, result.steps, 0
                best = copy.deepcopy(work.state_dict())
            else:
                waited += 1
                if waited >= options.patience:
                    result.stopped = "early"
                    break
    result.seconds = time.perf_counter() - start
    return best


class AdaptingInferer(Inferer):
    """``inferer(volume)``: fine-tune a copy of the generator on ``volume`` (:func:`fine_tune`),
    then run ``inner`` with the adapted weights (a k-space checkpoint: by :func:`apply_permuted`;
    a thick-slice checkpoint: as it is); when self-validation keeps the unadapted model, ``inner``
    runs on ``volume`` as it is. With ``ensemble`` (a plane, :func:`~.ensemble.symmetry_plane`),
    that application is averaged over the plane's symmetries (:class:`~.ensemble.EnsembleInferer`;
    the fine-tuning runs once) and :meth:`mean_std` reports their spread.

    ``work`` is the module ``inner`` runs (its weights are replaced for each volume and reset
    before the next). :attr:`adaptation` and :attr:`adapted_state`: the last volume's.
    """

    def __init__(self, inner: Inferer, work: nn.Module, options: AdaptOptions, progress: bool = False,
                 log: Callable[[str], None] = info, ensemble: tuple[int, int] | None = None) -> None:
        if options.slice_factor is None:
            pair_factors(options.factors)  # no full-resolution axis: refused when built
        options = options.resolved("checkpoint")
        self.inner, self.work, self.options, self.progress, self.log = inner, work, options, progress, log
        self.ensemble = ensemble
        self.initial = copy.deepcopy(work.state_dict())
        self.name = f"adapt[{inner.name}]" if ensemble is None else f"ensemble[adapt[{inner.name}]]"
        self.device = inner.device
        self.adaptation: Adaptation | None = None
        self.adapted_state: dict[str, Tensor] | None = None

    def __call__(self, volume: np.ndarray | Tensor) -> np.ndarray:
        return self.mean_std(volume)[0]

    def mean_std(self, volume: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        scan = checked_volume(volume).numpy()  # float32 (X, Y, Z) on the CPU, finite
        self.work.load_state_dict(self.initial)
        model, self.adaptation = fine_tune(self.work, scan, self.options, device=self.device,
                                           progress=self.progress, log=self.log)
        self.adapted_state = None
        apply: Inferer = self.inner  # unadapted, or a thick-slice checkpoint (its slot holds the thick axis)
        if model is not self.work:
            self.adapted_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.work.load_state_dict(self.adapted_state)
            self.work.eval()
            if self.options.slice_factor is None:
                apply = PermutedInferer(self.inner, self.options.factors, self.options.order)
        try:
            if self.ensemble is None:  # not apply.mean_std: Inferer's default would re-enter base.py
                return apply(scan), None
            return EnsembleInferer(apply, self.ensemble).mean_std(scan)
        finally:
            self.work.load_state_dict(self.initial)


def save_adapted(path: str | Path, state: dict[str, Tensor], net_config: dict[str, Any], data: dict[str, Any],
                 record: dict[str, Any]) -> Path:
    """Write an adapted generator in the training checkpoints' format (``net.*`` weights,
    ``net_config``, the data settings), with ``record`` (what it was adapted to) as ``adapted``."""
    from mdcsrn_lightning.atomic import atomic_path

    checkpoint = {"state_dict": {f"net.{k}": v for k, v in state.items()}, "net_config": dict(net_config),
                  "datamodule_hyper_parameters": dict(data), "adapted": dict(record)}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
