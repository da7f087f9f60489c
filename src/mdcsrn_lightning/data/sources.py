"""Where volumes come from: a folder of NIfTI files, or the MNI152 template inside nilearn.

A *source* names subjects and loads, per subject, one HR volume ``(X, Y, Z)`` with its
affine and, optionally, an LR volume on the same grid:

- most sources give only the HR; the data module degrades it (once, cached);
- a source whose LR must come from a larger whole gives the LR itself through
  :meth:`VolumeSource.degraded` (the embedded template: the k-space truncation is a
  whole-volume operation, so the template is degraded once and HR and LR are cut into the
  same slabs afterwards);
- a source with LR files of its own gives them through :meth:`VolumeSource.load`
  (:class:`GlobSource` with ``lr_pattern``).

Every problem with a volume is a :class:`VolumeError` (a ``ValueError``) with one line that
names the file and the problem. Constructing a source never touches the disk; the first
:meth:`~VolumeSource.subject_ids` call does (so configs can be instantiated anywhere).
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from mdcsrn_lightning.atomic import is_temp_name
from mdcsrn_lightning.data import degradation

# the one volume reader and its error (re-exported here: other modules import them from sources)
from mdcsrn_lightning.data.volume_io import (
    VolumeError,
    header_voxel_sizes,
    is_dicom_series,
    load_volume,
    volume_stem,
    volume_token,
)

__all__ = [
    "MNI152_FILENAME",
    "EmbeddedMNI152Source",
    "GlobSource",
    "SubjectVolumes",
    "VolumeError",
    "VolumeSource",
    "check_patch_fits",
    "mni152_template_path",
    "load_volume",
]

MNI152_FILENAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class SubjectVolumes:
    """One subject as loaded from a source.

    Attributes:
        name: subject id.
        hr: ``(X, Y, Z)`` float32, finite, raw intensities.
        affine: ``(4, 4)`` voxel -> world matrix of the HR grid.
        lr: ``(X, Y, Z)`` float32 on the HR grid, or ``None``: the data module degrades ``hr``.
        scale: intensity reference for normalisation (the data module divides by it), or
            ``None``: the HR's own 99.9th percentile.
        location: file path (or description) used in error messages.
    """

    name: str
    hr: np.ndarray
    affine: np.ndarray
    lr: np.ndarray | None = None
    scale: float | None = None
    location: str = ""


def check_patch_fits(shape: Sequence[int], patch_size: Sequence[int], location: str) -> None:
    """Raise :class:`VolumeError` if a volume of ``shape`` is smaller than a patch along any axis."""
    if any(s < p for s, p in zip(shape, patch_size)):
        raise VolumeError(
            f"{location}: volume shape {tuple(int(s) for s in shape)} is smaller than the patch size "
            f"{tuple(int(p) for p in patch_size)} along at least one axis"
        )


def _file_token(path: str) -> str:
    # a file's path, size and mtime; every file's for a DICOM series folder
    return volume_token(path)


class VolumeSource(ABC):
    """Names subjects and loads their volumes. Subclasses keep construction disk-free."""

    @abstractmethod
    def subject_ids(self) -> list[str]:
        """Sorted, unique subject ids. Raises :class:`VolumeError` for a missing/empty source."""

    @abstractmethod
    def location(self, subject_id: str) -> str:
        """A file path (or description) naming the subject's data, for messages."""

    @abstractmethod
    def cache_token(self, subject_id: str) -> str:
        """A string that changes whenever the subject's data changes (path + size + mtime)."""

    @abstractmethod
    def load(self, subject_id: str) -> SubjectVolumes:
        """Load and validate the subject (HR, affine and, if the source has them, LR files)."""

    def degraded(
        self,
        subject_id: str,
        factors: Sequence[float],
        interpolation: degradation.Interpolation,
    ) -> np.ndarray | None:
        """LR for sources that must degrade a larger whole; ``None``: degrade ``load().hr``."""
        return None

    def hr_path(self, subject_id: str) -> str | None:
        """A NIfTI file the HR can be re-read from lazily (``None``: keep it in memory)."""
        return None

    def lr_path(self, subject_id: str) -> str | None:
        """A NIfTI file holding the subject's LR, if the source has one."""
        return None

    def forced_sets(self) -> dict[str, str]:
        """Subjects whose set is fixed by the source (``{id: "train"|"val"|"eval"|"test"}``).

        They bypass the seeded split: e.g. a real person's scan held out for testing, or
        slabs of one brain kept in one set each. Default: none.
        """
        return {}

    def split_groups(self) -> dict[str, str] | None:
        """``{id: group}``: subjects that must land in one set of the split (the sessions of
        one person), or ``None``: every subject stands alone. The seeded split then counts
        groups, not ids (see ``data/split.py``)."""
        return None

    def sampling_groups(self) -> dict[str, tuple[str, float]] | None:
        """``{id: (group, weight)}``: each group's expected share of training patches, or
        ``None``: every training subject is drawn equally often (see ``MixSource``)."""
        return None


class GlobSource(VolumeSource):
    """Every volume under ``root`` matching ``pattern`` (sorted), one subject per match.

    A match is a volume file (NIfTI, ``.mgz``, Analyze) or a folder holding one DICOM series
    (``pattern="*/T1_MPRAGE"``); both are read by the package's one reader
    (:func:`~mdcsrn_lightning.data.volume_io.load_volume`).

    The subject id is the first ``id_depth`` components of the path relative to ``root``
    (the file name loses its ``.nii``/``.nii.gz`` extension); ``id_depth=None`` uses the
    whole relative path. For the HCP layout
    ``<root>/<subject>/unprocessed/3T/T1w_MPR1/<subject>_3T_T1w_MPR1.nii.gz`` with
    ``pattern="*/unprocessed/3T/T1w_MPR1/*_3T_T1w_MPR1.nii.gz"`` the id is the subject
    folder; for a flat folder of files it is the file name. Two files mapping to one id is
    an error (two sessions of one subject must not be split apart silently).

    Args:
        root: folder to search.
        pattern: glob relative to ``root`` (``**`` recurses).
        id_depth: path components that form the id (``>= 1``), or ``None`` for all.
        lr_root: folder of LR files (default ``root``); only with ``lr_pattern``.
        lr_pattern: glob of LR files already on the HR grid; ids must match the HR ids
            one to one and every LR must have its HR's shape and affine. With it, no
            degradation is done.
    """

    def __init__(
        self,
        root: str,
        pattern: str = "**/*.nii.gz",
        id_depth: int | None = 1,
        lr_root: str | None = None,
        lr_pattern: str | None = None,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ValueError(f"root must be a non-empty path, got {root!r}")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern must be a non-empty glob, got {pattern!r}")
        if id_depth is not None and (not isinstance(id_depth, int) or id_depth < 1):
            raise ValueError(f"id_depth must be an int >= 1 or None, got {id_depth!r}")
        if lr_root is not None and lr_pattern is None:
            raise ValueError("lr_root is given but lr_pattern is not; give lr_pattern to pair LR files")
        self.root = str(root)
        self.pattern = pattern
        self.id_depth = id_depth
        self.lr_root = str(lr_root) if lr_root is not None else None
        self.lr_pattern = lr_pattern
        self._hr: dict[str, str] | None = None
        self._lr: dict[str, str] | None = None

    def __repr__(self) -> str:
        lr = f", lr_pattern={self.lr_pattern!r}" if self.lr_pattern else ""
        return f"GlobSource(root={self.root!r}, pattern={self.pattern!r}{lr})"

    def _id(self, rel: Path) -> str:
        parts = list(rel.parts)
        parts[-1] = volume_stem(parts[-1])
        if self.id_depth is not None:
            parts = parts[: self.id_depth]
        return "/".join(parts)

    def _scan(self, root: str, pattern: str) -> dict[str, str]:
        base = Path(root)
        if not base.exists():
            raise VolumeError(f"{root}: data root not found")
        if not base.is_dir():
            raise VolumeError(f"{root}: data root is not a folder")
        # our own temporary files (left by a killed writer) are never subjects
        files = sorted(
            p for p in base.glob(pattern)
            if (p.is_file() and not is_temp_name(p.name)) or (p.is_dir() and is_dicom_series(p))
        )
        if not files:
            raise VolumeError(f"{root}: no files match the pattern {pattern!r}")
        out: dict[str, str] = {}
        for f in files:
            sid = self._id(f.relative_to(base))
            if sid in out:
                raise VolumeError(
                    f"{f}: maps to subject id {sid!r} like {out[sid]} (id_depth={self.id_depth}); "
                    f"raise id_depth (None = whole relative path) or narrow the pattern"
                )
            out[sid] = str(f)
        return out

    def _files(self) -> tuple[dict[str, str], dict[str, str] | None]:
        if self._hr is None:
            hr = self._scan(self.root, self.pattern)
            lr = None
            if self.lr_pattern is not None:
                lr_root = self.lr_root or self.root
                lr = self._scan(lr_root, self.lr_pattern)
                only_hr = sorted(set(hr) - set(lr))
                only_lr = sorted(set(lr) - set(hr))
                if only_hr:
                    raise VolumeError(f"{hr[only_hr[0]]}: no LR file for subject {only_hr[0]!r} "
                                      f"under {lr_root} matching {self.lr_pattern!r}")
                if only_lr:
                    raise VolumeError(f"{lr[only_lr[0]]}: LR file of subject {only_lr[0]!r} has no HR file "
                                      f"under {self.root} matching {self.pattern!r}")
            _warn_mixed_spacing(hr, self.root)
            self._hr, self._lr = hr, lr
        assert self._hr is not None
        return self._hr, self._lr

    def subject_ids(self) -> list[str]:
        return sorted(self._files()[0])

    def _path(self, subject_id: str) -> str:
        hr, _ = self._files()
        try:
            return hr[subject_id]
        except KeyError:
            raise KeyError(f"unknown subject {subject_id!r} in {self!r}") from None

    def location(self, subject_id: str) -> str:
        return self._path(subject_id)

    def hr_path(self, subject_id: str) -> str | None:
        return self._path(subject_id)

    def lr_path(self, subject_id: str) -> str | None:
        _, lr = self._files()
        return None if lr is None else lr[subject_id]

    def cache_token(self, subject_id: str) -> str:
        token = _file_token(self._path(subject_id))
        lr = self.lr_path(subject_id)
        return token if lr is None else f"{token}||{_file_token(lr)}"

    def load(self, subject_id: str) -> SubjectVolumes:
        path = self._path(subject_id)
        loaded = load_volume(path)
        hr, affine = loaded.data, loaded.affine
        lr = None
        lr_file = self.lr_path(subject_id)
        if lr_file is not None:
            lr_loaded = load_volume(lr_file)
            lr, lr_affine = lr_loaded.data, lr_loaded.affine
            if lr.shape != hr.shape:
                raise VolumeError(
                    f"{lr_file}: LR grid shape {lr.shape} does not match the HR grid {hr.shape} of {path}"
                )
            if not np.allclose(lr_affine, affine, rtol=0.0, atol=1e-4):
                raise VolumeError(
                    f"{lr_file}: LR affine differs from the HR affine of {path} "
                    f"(max difference {np.abs(lr_affine - affine).max():.3g}); LR must lie on the HR grid"
                )
        return SubjectVolumes(name=subject_id, hr=hr, affine=affine, lr=lr, location=path)


def _warn_mixed_spacing(files: dict[str, str], root: str) -> None:
    """Warn once when the HR files differ in voxel size (a model learns one resolution).

    Reads headers only; a zero or negative voxel size is a :class:`VolumeError` here, before
    any training starts.
    """
    warn_mixed_voxel_sizes({path: header_voxel_sizes(path) for path in files.values()}, root,
                           "a model learns one resolution, resample them to one grid first", stacklevel=3)


def warn_mixed_voxel_sizes(sizes: dict[str, tuple[float, ...]], where: str, advice: str, stacklevel: int = 2) -> None:
    """One warning listing the voxel sizes (and a file of each) when ``sizes`` (path -> mm) differ."""
    counts: dict[tuple[float, ...], list[str]] = {}
    for path, voxel in sizes.items():
        counts.setdefault(tuple(round(s, 2) for s in voxel), []).append(path)
    if len(counts) > 1:
        listing = "; ".join(
            f"{'x'.join(f'{s:g}' for s in voxel)} mm: {len(paths)} file(s), e.g. {paths[0]}"
            for voxel, paths in sorted(counts.items(), key=lambda kv: -len(kv[1]))
        )
        warnings.warn(f"{where}: the volumes have {len(counts)} different voxel sizes ({listing}); {advice}",
                      stacklevel=stacklevel)


def mni152_template_path() -> str:
    """Path of the MNI152 2009a T1 template file shipped in the nilearn wheel."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise VolumeError(f"{MNI152_FILENAME}: nilearn is not installed (pip install nilearn)")
    path = Path(spec.origin).parent / "datasets" / "data" / MNI152_FILENAME
    if not path.is_file():
        raise VolumeError(f"{path}: MNI152 template not found in the installed nilearn")
    return str(path)


@lru_cache(maxsize=2)
def _template(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    loaded = load_volume(mni152_template_path())
    data, affine = loaded.data, loaded.affine
    if resolution == 2:
        # Exactly what nilearn.datasets.load_mni152_template(resolution=2) returns (up to
        # its rescale to [0, 1]): its cubic resampling onto the 2 mm grid that shares the
        # origin lands on every second voxel of an interpolating spline. Checked: max
        # difference 3e-16. Importing nilearn.datasets would cost ~1.4 s.
        data = np.ascontiguousarray(data[::2, ::2, ::2])
        affine = affine.copy()
        affine[:3, :3] *= 2.0
    data.flags.writeable = False  # shared by every caller
    return data, affine


@lru_cache(maxsize=2)
def _template_scale(resolution: int) -> float:
    return float(np.percentile(_template(resolution)[0], 99.9))


class EmbeddedMNI152Source(VolumeSource):
    """The MNI152 2009a T1 template from the nilearn wheel, cut into slabs (pseudo-subjects).

    Real data that needs nothing but ``pip install``: for the quickstart and the tests.
    **It is an average of 152 brains, much smoother than one person's scan**: a model
    trained on it alone learns to sharpen an average brain and need not improve a real
    single-subject T1 (measured here: it did not). Report its results as results on
    held-out slabs of the template, not as MRI super-resolution quality.

    One template cannot be split by subject, so it is cut into ``num_slabs`` contiguous,
    non-overlapping slabs along ``axis`` (default 2: the axis the default ``(2, 2, 1)``
    factors leave alone, so every slab holds whole slices of the degraded plane) and each
    slab is one subject. The LR is made from the *whole* template, once per
    ``(factors, interpolation)``, and then cut into the same slabs: k-space truncation is
    a whole-volume operation, so degrading slabs separately would differ.

    Grids: resolution 1 -> ``(197, 233, 189)`` at 1 mm; 2 -> ``(99, 117, 95)`` at 2 mm
    (every second voxel). Intensities are the file's uint8 values as float32; every slab is
    normalised by the whole template's 99.9th percentile (``SubjectVolumes.scale``).
    Each slab's affine is the template's, shifted to the slab's first voxel.

    With ``crop=True`` (default) the slabs are cut from the slices that hold head only: from
    the first to the last slice along ``axis`` in which >= 10% of the voxels exceed 5% of the
    99.9th percentile (the metrics' foreground rule). Otherwise the lowest slab at 1 mm is
    empty air, which no metric can score.

    Args:
        resolution: 1 or 2 (mm).
        num_slabs: number of pseudo-subjects (``>= 1``; 4 give one per set of a split).
        axis: axis along which the template is cut (0, 1 or 2).
        crop: cut the slabs from the foreground slices only (see above).
    """

    _SHAPES = {1: (197, 233, 189), 2: (99, 117, 95)}

    def __init__(self, resolution: Literal[1, 2] = 1, num_slabs: int = 4, axis: int = 2, crop: bool = True) -> None:
        if resolution not in (1, 2) or isinstance(resolution, bool):
            raise ValueError(f"resolution must be 1 or 2 (mm), got {resolution!r}")
        if axis not in (0, 1, 2) or isinstance(axis, bool):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        if not isinstance(num_slabs, int) or isinstance(num_slabs, bool) or num_slabs < 1:
            raise ValueError(f"num_slabs must be an int >= 1, got {num_slabs!r}")
        size = self._SHAPES[resolution][axis]
        if num_slabs > size:
            raise ValueError(f"num_slabs={num_slabs} exceeds the template's {size} slices along axis {axis}")
        self.resolution = int(resolution)
        self.num_slabs = num_slabs
        self.axis = axis
        self.crop = bool(crop)
        self._lr: dict[tuple[tuple[float, ...], str], np.ndarray] = {}

    def __repr__(self) -> str:
        return (
            f"EmbeddedMNI152Source(resolution={self.resolution}, num_slabs={self.num_slabs}, "
            f"axis={self.axis}, crop={self.crop})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the whole template at this resolution."""
        return self._SHAPES[self.resolution]

    def template(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole template: ``((X, Y, Z) float32 read-only, (4, 4) affine)``."""
        return _template(self.resolution)

    def extent(self) -> tuple[int, int]:
        """``[start, stop)`` along ``axis`` from which the slabs are cut (see ``crop``)."""
        if not self.crop:
            return 0, self.shape[self.axis]
        data = self.template()[0]
        other = tuple(a for a in range(3) if a != self.axis)
        fraction = (data > 0.05 * self.template_scale()).mean(axis=other)
        kept = np.flatnonzero(fraction >= 0.10)
        return int(kept[0]), int(kept[-1]) + 1

    def slab_bounds(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every slab along ``axis``; sizes differ by at most one."""
        lo, hi = self.extent()
        if self.num_slabs > hi - lo:
            raise ValueError(f"num_slabs={self.num_slabs} exceeds the {hi - lo} foreground slices along axis {self.axis}")
        edges = [lo + int(round(i * (hi - lo) / self.num_slabs)) for i in range(self.num_slabs + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def subject_ids(self) -> list[str]:
        n = self.num_slabs
        width = len(str(n))
        # Zero-padded so that sorted ids follow slab order.
        return [
            f"mni152_{self.resolution}mm_axis{self.axis}_slab{i + 1:0{width}d}of{n}" for i in range(n)
        ]

    def _index(self, subject_id: str) -> int:
        try:
            return self.subject_ids().index(subject_id)
        except ValueError:
            raise KeyError(f"unknown subject {subject_id!r} in {self!r}") from None

    def _cut(self, volume: np.ndarray, index: int) -> np.ndarray:
        start, stop = self.slab_bounds()[index]
        sl = [slice(None)] * 3
        sl[self.axis] = slice(start, stop)
        return np.ascontiguousarray(volume[tuple(sl)])

    def location(self, subject_id: str) -> str:
        start, stop = self.slab_bounds()[self._index(subject_id)]
        return (
            f"{mni152_template_path()} [{self.resolution} mm, slab {self._index(subject_id) + 1}/{self.num_slabs}: "
            f"indices {start}:{stop} along axis {self.axis}]"
        )

    def cache_token(self, subject_id: str) -> str:
        i = self._index(subject_id)
        return (
            f"embedded-mni152|{self.resolution}|{self.num_slabs}|{self.axis}|{self.crop}|{i}|"
            f"{_file_token(mni152_template_path())}"
        )

    def load(self, subject_id: str) -> SubjectVolumes:
        index = self._index(subject_id)
        data, affine = self.template()
        start, _ = self.slab_bounds()[index]
        offset = np.zeros(3)
        offset[self.axis] = start
        slab_affine = affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
        return SubjectVolumes(
            name=subject_id,
            hr=self._cut(data, index),
            affine=slab_affine,
            scale=self.template_scale(),
            location=self.location(subject_id),
        )

    def template_scale(self) -> float:
        """99.9th percentile of the whole template (one intensity reference for all slabs)."""
        return _template_scale(self.resolution)

    def degraded_template(
        self, factors: Sequence[float], interpolation: degradation.Interpolation = "linear"
    ) -> np.ndarray:
        """The whole template degraded once per ``(factors, interpolation)``; ``(X, Y, Z)`` float32."""
        key = (tuple(float(f) for f in factors), str(interpolation))
        if key not in self._lr:
            # Looked up through the module so that tests can count the calls.
            self._lr[key] = degradation.degrade(
                np.asarray(self.template()[0]), factors=key[0], interpolation=interpolation
            )
        return self._lr[key]

    def degraded(
        self,
        subject_id: str,
        factors: Sequence[float],
        interpolation: degradation.Interpolation,
    ) -> np.ndarray:
        return self._cut(self.degraded_template(factors, interpolation), self._index(subject_id))
