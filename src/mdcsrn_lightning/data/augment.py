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

__all__ = [
    "REALISTIC_DEFAULTS",
    "AugmentName",
    "DegradeSample",
    "RandomRicianNoise",
    "realistic_hr_transform",
]

AugmentName = Literal["none", "paper", "realistic"]

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
}


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


class DegradeSample(tio.Transform):
    """Replace ``lr`` by the degradation of ``hr``; divide both by ``input_scale`` of the new LR.

    Images ``(1, X, Y, Z)``. The subject's ``input_scale`` is multiplied by the new scale and
    its ``metric_scale`` becomes the augmented HR's 99.9th percentile in the new unit. With
    ``foreground_threshold`` the subject's ``fg_threshold`` (for the label sampler) is reset
    to that fraction of the new HR's 99.9th percentile.
    """

    def __init__(
        self,
        factors: Sequence[float],
        interpolation: degradation.Interpolation,
        foreground_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.factors = tuple(float(f) for f in factors)
        self.interpolation = interpolation
        self.foreground_threshold = foreground_threshold
        self.args_names = ["factors", "interpolation", "foreground_threshold"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        hr_image = subject["hr"]
        hr = hr_image.data[0].numpy().astype(np.float32, copy=False)
        # Looked up through the module so that tests can check the call.
        lr = degradation.degrade(hr, factors=self.factors, interpolation=self.interpolation)
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
