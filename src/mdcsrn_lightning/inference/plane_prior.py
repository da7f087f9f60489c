"""The plane network's prior (``adapt.prior``): a :class:`~mdcsrn_lightning.models.plane_net.PlaneNet`
trained across scans on thick-slice pairs, where per-scan adaptation starts instead of from scratch.

A small scan holds few planes (anatomical.nii: 33x41x25), and a fresh network memorises them
before it has learned what thick slices do. The prior learns that once, from several volumes,
slice factors and noise levels (:func:`train_prior`: each volume's
:func:`~.plane_data.plane_stacks` for each factor, its inputs noise-matched as adaptation's are);
adaptation then fits it to the scan (:mod:`.planes`). The released prior
(``release/planenet_thick_prior.pt``) is written by ``scripts/train_plane_prior.py`` from the
ICBM 2009c T1/T2 training slabs and the 2 mm planes of ITK's real 2x2x3 mm scan. Below
:mod:`.planes`. Pure torch/numpy.
"""

from __future__ import annotations

import functools
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.inference.adapt import train_step, use_bf16
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.inference.options import AdaptOptions
from mdcsrn_lightning.inference.plane_data import (
    PlaneLayout,
    Stack,
    pair_noise,
    plane_batch,
    plane_layout,
    plane_stacks,
)
from mdcsrn_lightning.models.plane_net import PlaneNet
from mdcsrn_lightning.release import RELEASED_PLANE_PRIOR

__all__ = ["PRIOR_FORMAT", "PRIOR_SIGMAS", "PriorPairs", "load_prior", "prior_pairs", "save_prior", "train_prior"]

#: the ``format`` key of a saved prior
PRIOR_FORMAT = "mdcsrn-plane-prior/1"
#: white-noise std added to each training volume (one drawn per volume and factor), in units of
#: its 99.9th percentile (the network's input scale): the scans adaptation meets are noisy
PRIOR_SIGMAS = (0.0, 0.015, 0.03, 0.045)


@dataclass(frozen=True)
class PriorPairs:
    """One training volume's pairs for one slice factor: what :func:`~.plane_data.plane_batch` takes."""

    stacks: list[Stack]
    options: AdaptOptions
    floors: list[float]
    noise: list[torch.Tensor]
    thick_length: int

    @functools.cached_property
    def layout(self) -> PlaneLayout:
        """Where its planes lie (:func:`~.plane_data.plane_layout`), worked out once."""
        return plane_layout(self.options)

    def crop(self, rng: np.random.Generator) -> Stack:
        """One random ``(1, 1, patch, patch)`` pair (nothing held out)."""
        empty = (self.thick_length, self.thick_length)
        return plane_batch(self.stacks, self.layout, empty, self.options, self.floors, rng, noise=self.noise)


def prior_pairs(volume: np.ndarray, factor: int, sigma: float, patch: int, rng: np.random.Generator) -> PriorPairs:
    """``volume`` (``(X, Y, Z)``, in the network's input units) plus white noise of std ``sigma``,
    as a thick-slice scan along axis 2 would be adapted to: pairs from its planes ``(Z; X, Y)``,
    each in-plane axis in turn cut into boxcar slices of ``factor`` voxels and brought back by the
    cubic B-spline (the released thick weights' degradation), the inputs noise-matched."""
    noisy = (volume + sigma * rng.standard_normal(volume.shape)).astype(np.float32)
    options = replace(AdaptOptions(factors=(1.0, 1.0, float(factor)), interpolation="cubic", slice_factor=factor,
                                   rotations=0, noise=True).resolved("planes"), patch=patch, batch=1)
    stacks = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in plane_stacks(noisy, options)]
    _, noise = pair_noise(noisy, options)
    return PriorPairs(stacks, options, [0.5 * float(y.mean()) for _, y in stacks], noise, noisy.shape[2])


def train_prior(volumes: Sequence[np.ndarray], factors: Sequence[Sequence[int]], *, steps: int | None = None,
                minutes: float | None = None, patch: int = 32, batch: int = 16, lr: float = 5e-4,
                sigmas: Sequence[float] = PRIOR_SIGMAS, seed: int = 0,
                progress: bool = False) -> tuple[PlaneNet, dict[str, Any]]:
    """``(prior, record)``: a fresh :class:`PlaneNet` trained with L1 and Adam (``lr``) on ``batch``
    random ``patch``-square crops per step, each from a random one of the :func:`prior_pairs` of
    every volume (``(X, Y, Z)``, any intensity scale: divided by its 99.9th percentile, as the
    file layer divides a scan) for each of its ``factors``, with a noise std drawn from ``sigmas``;
    until ``steps`` or ``minutes``, whichever ends first. ``ValueError``: no budget, a factor
    below 2, or a volume whose planes are smaller than ``patch``."""
    if steps is None and minutes is None:
        raise ValueError("train_prior: give steps or minutes")
    if len(volumes) != len(factors) or not volumes:
        raise ValueError(f"train_prior: one list of factors per volume, got {len(volumes)} volumes and "
                         f"{len(factors)} lists")
    rng = np.random.default_rng(seed)
    pairs = []
    for i, (volume, fs) in enumerate(zip(volumes, factors)):
        if min(volume.shape[:2]) < patch:
            raise ValueError(f"train_prior: volume {i} {list(volume.shape)} is smaller than patch={patch} in its planes")
        bad = [f for f in fs if isinstance(f, bool) or not isinstance(f, int) or f < 2]
        if bad or not fs:
            raise ValueError(f"train_prior: factors of volume {i} must be integers >= 2, got {list(fs)}")
        scaled = np.asarray(volume, dtype=np.float32) / input_scale(volume, f"train_prior volume {i}")
        pairs += [prior_pairs(scaled, f, float(rng.choice(sigmas)), patch, rng) for f in fs]
    torch.manual_seed(seed)
    net = PlaneNet().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    bf16 = use_bf16(torch.device("cpu"))
    from tqdm.auto import tqdm  # comes with lightning

    bar = tqdm(total=steps, disable=None if progress else True, desc="plane prior", unit="step")
    start, done, loss = time.perf_counter(), 0, float("nan")
    while (steps is None or done < steps) and (minutes is None or time.perf_counter() - start < 60 * minutes):
        crops = [pairs[int(rng.integers(len(pairs)))].crop(rng) for _ in range(batch)]
        loss = train_step(net, optimizer, torch.cat([x for x, _ in crops]), torch.cat([y for _, y in crops]), bf16)
        done += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    bar.close()
    record = {"steps": done, "seconds": round(time.perf_counter() - start, 1), "last_loss": round(loss, 5),
              "patch": patch, "batch": batch, "lr": lr, "seed": seed, "sigmas": [float(s) for s in sigmas],
              "factors": [list(fs) for fs in factors], "precision": "bf16" if bf16 else "32"}
    return net.eval(), record


def save_prior(net: PlaneNet, record: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``net`` (its size and weights) and ``record`` to ``path`` whole: a temporary file
    beside it, then renamed, so an interrupted write leaves no half-written prior."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": PRIOR_FORMAT, "config": {"channels": net.channels, "blocks": net.blocks},
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "record": record}, tmp)
    os.replace(tmp, path)
    return path


def load_prior(path: str | os.PathLike[str] = RELEASED_PLANE_PRIOR) -> tuple[PlaneNet, dict[str, Any]]:
    """``(network, record)`` from a :func:`save_prior` file (weights only: nothing in it runs);
    :class:`~.base.InferenceError` naming the file if it is missing or not a prior."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: the plane prior is missing (adapt.prior); give adapt.prior=false")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != PRIOR_FORMAT:
            raise ValueError(f"no format {PRIOR_FORMAT!r}")
        net = PlaneNet(**saved["config"])
        net.load_state_dict(saved["state_dict"])
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        # a truncated file, another kind of checkpoint, mismatched weights
        raise InferenceError(f"{path}: not a plane prior ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return net, dict(saved.get("record", {}))
