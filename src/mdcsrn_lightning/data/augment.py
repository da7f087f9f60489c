"""Training augmentation: what ``augment=none|paper|realistic`` does to a training subject.

- ``none``: nothing.
- ``paper``: random flips and 90-degree rotations of every patch in the degraded plane,
  identical for LR and HR (the data module's per-patch transform; the LR is degraded once).
- ``realistic``: the paper's, plus, per subject each time the queue loads it, TorchIO
  transforms of the **HR before it is degraded** (small affine and elastic deformation,
  bias field, gamma, Rician noise at a random SNR); then :class:`DegradeSample` degrades
  that HR with the run's factors and interpolation and divides HR and LR by
  :func:`~mdcsrn_lightning.data.intensity.input_scale` of the new LR. LR and HR stay one
  acquisition: the noise is in the HR and reaches the LR through the degradation, never
  added to the LR alone. Validation and test subjects are never augmented.

At HCP size (320x320x256) augmenting and re-degrading the whole head is slow (docs/data.md).
``roi`` (see :class:`RandomRegion`) does it on a random box of ``R + 2 m`` voxels around a
random foreground voxel instead, then drops the margin ``m``, where the k-space
truncation's ringing from the box's cut faces and the affine's padding live; the queue
samples its patches inside the remaining ``R^3``. In that mode HR and LR keep the subject's
whole-volume unit (the ROI's own 99.9th percentile would give a region-dependent scale that
inference, which measures the whole LR, never applies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.sizes import triple

__all__ = [
    "AUTO_ROI",
    "AUTO_ROI_MIN_RATIO",
    "REALISTIC_DEFAULTS",
    "ROI_OPTIONS",
    "AugmentName",
    "AugmentOn",
    "DegradeSample",
    "PatchAugment",
    "RandomRegion",
    "RandomRicianNoise",
    "RandomRot90",
    "Rot90",
    "realistic_hr_transform",
    "realistic_roi",
]

AugmentName = Literal["none", "paper", "realistic"]
#: where the training batches are augmented: on the training device after the transfer
#: (``on_after_batch_transfer``), or in the loader on the CPU
AugmentOn = Literal["device", "loader"]

# Mild on purpose: the HR must still look like a plausible scan of a head.
REALISTIC_DEFAULTS: dict[str, Any] = {
    "affine_p": 0.5,  # probability of a small affine
    "degrees": 5.0,  # rotation range (+-, degrees)
    "scales": 0.05,  # scaling range (+- fraction)
    "elastic_p": 0.25,  # probability of an elastic deformation
    "elastic_displacement": 2.0,  # mm, maximum control-point displacement
    "bias_p": 0.5,
    "bias_coefficients": 0.3,  # TorchIO RandomBiasField's polynomial coefficient range
    "gamma_p": 0.5,
    "log_gamma": 0.2,  # gamma = exp(U(-0.2, 0.2))
    "noise_p": 0.8,
    "snr": [8.0, 60.0],  # mean foreground signal / noise sigma, drawn log-uniformly
    "roi": "auto",  # null: whole volume; [R, R, R] (or R): a random region; "auto": see realistic_roi
    "roi_margin": 16,  # voxels cut off each face after the degradation (see RandomRegion)
}
#: the options that choose the region, not a TorchIO transform
ROI_OPTIONS = ("roi", "roi_margin")
#: ``roi="auto"``: edge of the region, used only on volumes with at least
#: ``AUTO_ROI_MIN_RATIO`` times the voxels of the box (``R + 2 m`` per axis)
AUTO_ROI = 96
AUTO_ROI_MIN_RATIO = 8.0


class Rot90(tio.SpatialTransform):
    """Rotate every image of a subject by ``k * 90`` degrees in the plane of two spatial axes.

    Images are ``(C, X, Y, Z)``; spatial ``axes=(0, 1)`` rotate ``X`` into ``Y``. Affines are
    left alone (only patches are rotated, whose world position no one reads).
    """

    def __init__(self, k: int, axes: tuple[int, int] = (0, 1), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a, b = (int(x) for x in axes)
        if a == b or not {a, b} <= {0, 1, 2}:
            raise ValueError(f"axes must be two different spatial axes in (0, 1, 2), got {axes!r}")
        self.k = int(k) % 4
        self.axes = (a, b)
        self.args_names = ["k", "axes"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        dims = (self.axes[0] + 1, self.axes[1] + 1)
        for image in self.get_images(subject):
            image.set_data(torch.rot90(image.data, self.k, dims).contiguous())
        return subject

    def is_invertible(self) -> bool:
        return True

    def inverse(self) -> Rot90:
        return Rot90(-self.k, self.axes)


class RandomRot90(RandomTransform, tio.SpatialTransform):
    """Random ``k * 90`` degree rotation (``k`` uniform in 0..3) per plane, the same for all images.

    ``tio.Lambda`` cannot do this: it calls its function once per image, so a random angle
    would differ between ``lr`` and ``hr``. Draws from torch's RNG (seeded by
    ``seed_everything``).
    """

    def __init__(self, planes: Sequence[tuple[int, int]] = ((0, 1),), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planes = [tuple(int(x) for x in p) for p in planes]
        for p in self.planes:
            if len(p) != 2 or p[0] == p[1] or not set(p) <= {0, 1, 2}:
                raise ValueError(f"each plane must be two different axes in (0, 1, 2), got {planes!r}")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for plane in self.planes:
            k = int(torch.randint(0, 4, (1,)).item())
            if k:
                subject = Rot90(k, plane, **self._get_base_args())(subject)
        return subject


class RandomRicianNoise(RandomTransform, tio.IntensityTransform):
    """Magnitude-image noise: ``|x + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma^2)``.

    ``sigma = mean foreground signal / SNR`` with the SNR drawn log-uniformly from
    ``snr``; the foreground is the voxels above 5% of the 99.9th percentile (the metrics'
    rule). MR magnitude images have Rician, not Gaussian, noise: it lifts the background
    above zero, as in a real scan. Draws from torch's RNG.
    """

    def __init__(self, snr: Sequence[float] = (8.0, 60.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        lo, hi = (float(s) for s in snr)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"snr must be two finite numbers 0 < low <= high, got {snr!r}")
        self.snr = (lo, hi)
        self.args_names = ["snr"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        u = float(torch.rand(1).item())
        snr = math.exp(math.log(self.snr[0]) + u * (math.log(self.snr[1]) - math.log(self.snr[0])))
        for image in self.get_images(subject):
            data = image.data.float()
            fg = data > 0.05 * torch.quantile(data.flatten()[:: max(1, data.numel() // 1_000_000)], 0.999)
            sigma = float(data[fg].mean()) / snr if fg.any() else 0.0
            real = data + sigma * torch.randn_like(data)
            imag = sigma * torch.randn_like(data)
            image.set_data(torch.sqrt(real * real + imag * imag))
        return subject


def realistic_hr_transform(options: Mapping[str, Any] | None = None) -> tio.Compose:
    """The HR-only part of ``augment=realistic`` (``options`` override :data:`REALISTIC_DEFAULTS`)."""
    opts = dict(REALISTIC_DEFAULTS)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise ValueError(f"unknown augment_options {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(options or {})
    for key in ("affine_p", "elastic_p", "bias_p", "gamma_p", "noise_p"):
        if not 0.0 <= float(opts[key]) <= 1.0:
            raise ValueError(f"augment_options.{key} must be a probability in [0, 1], got {opts[key]!r}")
    realistic_roi(opts, (1, 1, 1))  # checks roi / roi_margin (the patch is checked by the data module)
    hr = ["hr"]
    return tio.Compose(
        [
            tio.RandomAffine(scales=float(opts["scales"]), degrees=float(opts["degrees"]), p=float(opts["affine_p"]),
                             include=hr, default_pad_value="minimum"),
            tio.RandomElasticDeformation(max_displacement=float(opts["elastic_displacement"]),
                                         p=float(opts["elastic_p"]), include=hr),
            tio.RandomBiasField(coefficients=float(opts["bias_coefficients"]), p=float(opts["bias_p"]), include=hr),
            # gamma acts on the ~[0, 1] scale (the subject is normalised); negatives are clipped by TorchIO
            tio.RandomGamma(log_gamma=float(opts["log_gamma"]), p=float(opts["gamma_p"]), include=hr),
            RandomRicianNoise(snr=tuple(opts["snr"]), p=float(opts["noise_p"]), include=hr),
        ]
    )


def realistic_roi(
    options: Mapping[str, Any] | None, patch_size: Sequence[int]
) -> tuple[tuple[int, int, int] | None, int, float | None]:
    """``(size, margin, min_ratio)`` of ``augment_options.roi`` / ``roi_margin`` for patches ``patch_size``.

    ``roi``: ``None`` (the whole volume, each load), ``R`` or ``[Rx, Ry, Rz]`` (a random
    region, each edge ``>=`` the patch edge), or ``"auto"`` (missing = ``"auto"``): edges
    ``max(AUTO_ROI, patch edge)``, used only on a volume with at least ``AUTO_ROI_MIN_RATIO``
    times the box's voxels (HCP's 320x320x256 has 12.5x a 128^3 box; a 1 mm head of 197x233x189
    only 4x, so it keeps today's whole-volume path). ``min_ratio`` is ``None`` for an explicit
    size (always a region where the volume allows).
    """
    opts = dict(options or {})
    roi = opts.get("roi", REALISTIC_DEFAULTS["roi"])
    margin = opts.get("roi_margin", REALISTIC_DEFAULTS["roi_margin"])
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"augment_options.roi_margin must be an int >= 0 (voxels), got {margin!r}")
    patch = tuple(int(p) for p in patch_size)
    if roi is None:
        return None, int(margin), None
    if roi == "auto":
        return tuple(max(AUTO_ROI, p) for p in patch), int(margin), AUTO_ROI_MIN_RATIO  # type: ignore[return-value]
    try:
        size = triple(roi, "augment_options.roi")  # "auto" handled above: any string is refused
    except ValueError:
        raise ValueError(f"augment_options.roi must be null, 'auto', an int >= 1 or 3 ints >= 1, got {roi!r}") from None
    if any(r < p for r, p in zip(size, patch)):
        raise ValueError(f"augment_options.roi {list(size)} must be >= the patch size {list(patch)} on every axis")
    return size, int(margin), None  # type: ignore[return-value]


class RandomRegion(RandomTransform, tio.Transform):
    """Apply ``transform`` to a random region only: crop ``size + 2 margin``, transform, drop the margin.

    Images ``(C, X, Y, Z)`` -> ``(C, Rx, Ry, Rz)``. Per axis the box is ``size + 2 margin``
    long, centred on a random foreground voxel (``hr > 0.05 x metric_scale``, the metrics'
    rule; drawn by rejection from 4096 uniform voxels, uniform if none is foreground) and
    shifted to lie inside the volume; after ``transform`` the margin is cropped away, so
    the region never includes the volume's outer ``margin`` voxels. An axis shorter than
    ``size + 2 margin`` is kept whole (no crop, no margin: exactly as without a region).
    ``grid`` (per axis; the degradation's factors, rounded): the box starts on a multiple of
    it and is a multiple of it long, so that the region's LR samples sit where the whole
    volume's do (an odd shift with factor 2 interpolates between other samples: 1% RMS
    error at any margin on an HCP head). ``tio.Crop`` moves the affines with the crops.
    With ``min_ratio``, a volume with fewer
    than ``min_ratio`` times the box's voxels gets ``whole_transform`` (default ``transform``)
    on the whole volume instead. Draws from torch's RNG.
    """

    def __init__(
        self,
        size: Sequence[int],
        margin: int,
        transform: tio.Transform,
        whole_transform: tio.Transform | None = None,
        min_ratio: float | None = None,
        grid: Sequence[int] = (1, 1, 1),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size must be 3 ints >= 1, got {size!r}")
        self.grid = tuple(int(g) for g in grid)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be 3 ints >= 1, got {grid!r}")
        if int(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.margin = int(margin)
        self.transform = transform
        self.whole_transform = whole_transform if whole_transform is not None else transform
        self.min_ratio = min_ratio
        self.args_names = ["size", "margin", "transform", "whole_transform", "min_ratio", "grid"]

    def boxes(self, shape: Sequence[int], centre: Sequence[int]) -> tuple[list[int], list[int]]:
        """TorchIO croppings ``(x0, x1, y0, y1, z0, z1)`` (voxels off each face) of the box and,
        inside the box, of its margin, for a box around ``centre`` in a volume ``shape``."""
        outer: list[int] = []
        inner: list[int] = []
        for n, r, c, g in zip(shape, self.size, centre, self.grid):
            m = self.margin
            length = -(-(r + 2 * m) // g) * g  # a whole number of LR voxels
            if n < length:
                outer += [0, 0]
                inner += [0, 0]
                continue
            lo = min(max(int(c) - r // 2 - m, 0), n - length) // g * g  # on the whole volume's LR grid
            outer += [lo, n - lo - length]
            inner += [m, length - r - m]
        return outer, inner

    def _centre(self, subject: tio.Subject) -> list[int]:
        hr = subject["hr"].data[0]
        shape = hr.shape
        if "metric_scale" in subject:
            reference = float(subject["metric_scale"])
        else:
            reference = float(torch.quantile(hr.flatten()[:: max(1, hr.numel() // 1_000_000)].float(), 0.999))
        idx = [torch.randint(0, n, (4096,)) for n in shape]
        fg = (hr[idx[0], idx[1], idx[2]] > 0.05 * reference).nonzero().flatten()
        k = int(fg[0]) if fg.numel() else 0
        return [int(i[k]) for i in idx]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        shape = subject.spatial_shape
        box = [min(n, -(-(r + 2 * self.margin) // g) * g) for n, r, g in zip(shape, self.size, self.grid)]
        if self.min_ratio is not None and math.prod(shape) < self.min_ratio * math.prod(box):
            return self.whole_transform(subject)
        outer, inner = self.boxes(shape, self._centre(subject))
        subject = tio.Crop(outer, copy=False)(subject)  # only the box is loaded and copied on
        subject = self.transform(subject)
        return tio.Crop(inner, copy=False)(subject)


class DegradeSample(tio.Transform):
    """Replace ``lr`` by the degradation of ``hr``; divide both by ``input_scale`` of the new LR.

    Images ``(1, X, Y, Z)``. The subject's ``input_scale`` is multiplied by the new scale and
    its ``metric_scale`` becomes the augmented HR's 99.9th percentile in the new unit. With
    ``foreground_threshold`` the subject's ``fg_threshold`` (for the label sampler) is reset
    to that fraction of the new HR's 99.9th percentile. ``renormalize=False`` (a region of a
    volume, :class:`RandomRegion`) keeps the subject's unit and bookkeeping: only ``lr`` changes.
    """

    def __init__(
        self,
        factors: Sequence[float],
        interpolation: degradation.Interpolation,
        foreground_threshold: float | None = None,
        renormalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.factors = tuple(float(f) for f in factors)
        self.interpolation = interpolation
        self.foreground_threshold = foreground_threshold
        self.renormalize = bool(renormalize)
        self.args_names = ["factors", "interpolation", "foreground_threshold", "renormalize"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        hr_image = subject["hr"]
        hr = hr_image.data[0].numpy().astype(np.float32, copy=False)
        # Looked up through the module so that tests can check the call.
        lr = degradation.degrade(hr, factors=self.factors, interpolation=self.interpolation)
        if not self.renormalize:
            subject["lr"].set_data(torch.from_numpy(lr)[None])
            return subject
        scale = input_scale(lr, location=str(subject.get("name", "training subject")))
        hr_image.set_data(torch.from_numpy(np.divide(hr, scale, dtype=np.float32))[None])
        lr_t = torch.from_numpy(np.divide(lr, scale, dtype=np.float32))[None]
        subject["lr"].set_data(lr_t)
        hr_reference = float(np.percentile(hr, 99.9))
        # The subject's bookkeeping (see SRDataModule._subject) follows the new unit.
        if "input_scale" in subject:
            subject["input_scale"] = float(subject["input_scale"]) * scale
        if "metric_scale" in subject:  # the augmented HR's own reference, in the new unit
            subject["metric_scale"] = hr_reference / scale
        if self.foreground_threshold is not None and "fg_threshold" in subject:
            subject["fg_threshold"] = float(self.foreground_threshold) * hr_reference / scale
        return subject


class PatchAugment:
    """The training batch's augmentation, batched, on whatever device the batch is on.

    ``paper`` (``flip_axes``/``planes``): per patch, random flips and 90-degree rotations,
    identical for ``lr`` and ``hr``. ``realistic``: first
    :class:`~mdcsrn_lightning.data.batched_augment.BatchedRealistic` turns the HR regions
    ``batch["hr"]`` ``(B, 1, *region)`` (cut by the sampler with a margin) into augmented,
    re-degraded ``lr``/``hr`` patches ``(B, 1, *patch)``, then the paper's. Random parameters come
    from a CPU generator seeded per batch by one draw from torch's global RNG, so
    ``seed_everything`` fixes them and a resume (which restores that RNG) continues them.
    """

    def __init__(
        self,
        flip_axes: Sequence[int],
        planes: Sequence[tuple[int, int]],
        realistic: Any | None = None,
    ) -> None:
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.planes = [tuple(int(a) for a in p) for p in planes]
        self.realistic = realistic

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from mdcsrn_lightning.data.batched_augment import batched_flip_rot90

        generator = torch.Generator().manual_seed(int(torch.randint(0, 1 << 62, (1,)).item()))
        hr = batch["hr"][tio.DATA]
        if self.realistic is not None:
            spacing = torch.as_tensor(batch["spacing"], dtype=torch.float32).reshape(-1, 3)
            lr, hr = self.realistic(hr, spacing, generator)
            batch["lr"] = {tio.DATA: lr}
        else:
            lr = batch["lr"][tio.DATA]
        if self.flip_axes:
            lr, hr = batched_flip_rot90(lr, hr, self.flip_axes, self.planes, generator)
        batch["lr"][tio.DATA], batch["hr"][tio.DATA] = lr, hr
        return batch
