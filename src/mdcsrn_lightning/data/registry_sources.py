"""Sources made of named data files (``data/fetch.py`` keys), e.g. pycortex's S1 or the ICBM 2009c T1/T2.

One file is one subject, or ``num_slabs`` subjects when it is cut into contiguous slabs
along ``axis`` (a single real scan must still give train/val/test sets). Slabs are cut
along the axis the factors leave alone, so degrading a slab equals cutting the degraded
whole; when that axis *is* degraded the whole volume is degraded once and then cut.

``slab_roles`` fixes the set of every slab (``["train", "val", "test"]``: slab 1 trains,
slab 2 validates, slab 3 tests, for every file alike), so the T1 and T2 of one template
never put the same anatomy into two sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.fetch import LOCAL_FILES, REGISTRY_FILES, data_path
from mdcsrn_lightning.data.sources import SubjectVolumes, VolumeSource, _file_token, load_volume
from mdcsrn_lightning.data.split import SPLIT_NAMES

__all__ = ["FileSource", "LOW_RES_ONLY", "foreground_extent", "slab_edges"]

# Files acquired at low resolution: no HR exists, so they cannot train or be scored.
LOW_RES_ONLY = frozenset({"itk_lowres"})


def foreground_extent(volume: np.ndarray, axis: int, level: float = 0.05, fraction: float = 0.10) -> tuple[int, int]:
    """``[start, stop)`` along ``axis`` of the slices where >= ``fraction`` of the voxels exceed
    ``level`` times the 99.9th percentile (the metrics' foreground rule); whole axis if none."""
    other = tuple(a for a in range(3) if a != axis)
    share = (volume > level * float(np.percentile(volume, 99.9))).mean(axis=other)
    kept = np.flatnonzero(share >= fraction)
    if kept.size == 0:
        return 0, volume.shape[axis]
    return int(kept[0]), int(kept[-1]) + 1


def slab_edges(start: int, stop: int, num_slabs: int) -> list[tuple[int, int]]:
    """``num_slabs`` contiguous ``[a, b)`` ranges covering ``[start, stop)``; sizes differ by <= 1."""
    edges = [start + int(round(i * (stop - start) / num_slabs)) for i in range(num_slabs + 1)]
    return list(zip(edges[:-1], edges[1:]))


class FileSource(VolumeSource):
    """Data files named by key (``s1``, ``icbm152_t1``, ``nibabel_anatomical``, ...), fetched on first use.

    Args:
        files: keys of :data:`~mdcsrn_lightning.data.fetch.REGISTRY_FILES` or ``LOCAL_FILES``.
        num_slabs: subjects per file (contiguous slabs along ``axis``; 1 = the whole file).
        axis: axis along which files are cut.
        crop: cut the slabs from the foreground slices only (air-only slabs cannot be scored).
        slab_roles: ``num_slabs`` set names (train/val/eval/test) fixing each slab's set, or
            ``None``: the seeded split decides.
        data_dir: the fetch cache (default ``$MDCSRN_DATA_DIR`` or ``~/.cache/mdcsrn-lightning/data``).

    Subject ids: the key, or ``<key>_slab<i>of<n>``. Volumes are the files' intensities
    as float32 (uint8 scans included); the affine of a slab is shifted to its first voxel.
    """

    def __init__(
        self,
        files: Sequence[str],
        num_slabs: int = 1,
        axis: int = 2,
        crop: bool = True,
        slab_roles: Sequence[str] | None = None,
        data_dir: str | None = None,
    ) -> None:
        if isinstance(files, str) or not files:
            raise ValueError(f"files must be a non-empty list of data keys, got {files!r}")
        keys = [str(f) for f in files]
        for key in keys:
            if key in LOW_RES_ONLY:
                raise ValueError(
                    f"{key} was acquired at low resolution and has no HR: it cannot train or be scored; "
                    f"super-resolve it with `mdcsrn-infer input=$(mdcsrn-data path {key}) ...`"
                )
            if key not in REGISTRY_FILES and key not in LOCAL_FILES:
                raise ValueError(f"unknown data key {key!r}; known: {', '.join([*REGISTRY_FILES, *LOCAL_FILES])}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"files must not repeat a key, got {keys}")
        if isinstance(num_slabs, bool) or not isinstance(num_slabs, int) or num_slabs < 1:
            raise ValueError(f"num_slabs must be an int >= 1, got {num_slabs!r}")
        if axis not in (0, 1, 2) or isinstance(axis, bool):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        roles = None if slab_roles is None else [str(r) for r in slab_roles]
        if roles is not None and (len(roles) != num_slabs or not set(roles) <= set(SPLIT_NAMES)):
            raise ValueError(f"slab_roles must name one of {SPLIT_NAMES} per slab ({num_slabs}), got {slab_roles!r}")
        self.files = keys
        self.num_slabs = num_slabs
        self.axis = int(axis)
        self.crop = bool(crop)
        self.slab_roles = roles
        self.data_dir = data_dir
        self._volume: tuple[str, np.ndarray, np.ndarray] | None = None  # the last file read
        self._lr: dict[tuple[str, tuple[float, ...], str], np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FileSource(files={self.files!r}, num_slabs={self.num_slabs}, axis={self.axis})"

    # ---------------------------------------------------------------- ids
    def _slab_id(self, key: str, index: int) -> str:
        return key if self.num_slabs == 1 else f"{key}_slab{index + 1}of{self.num_slabs}"

    def subject_ids(self) -> list[str]:
        return sorted(self._slab_id(k, i) for k in self.files for i in range(self.num_slabs))

    def _parse(self, subject_id: str) -> tuple[str, int]:
        for key in self.files:
            for i in range(self.num_slabs):
                if self._slab_id(key, i) == subject_id:
                    return key, i
        raise KeyError(f"unknown subject {subject_id!r} in {self!r}")

    def forced_sets(self) -> dict[str, str]:
        if self.slab_roles is None:
            return {}
        return {self._slab_id(k, i): self.slab_roles[i] for k in self.files for i in range(self.num_slabs)}

    # ---------------------------------------------------------------- files
    def path(self, key: str) -> str:
        """The file of ``key`` (fetched into the cache on first use)."""
        return str(data_path(key, self.data_dir))

    def _read(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if self._volume is None or self._volume[0] != key:
            loaded = load_volume(self.path(key))
            data, affine = loaded.data, loaded.affine
            self._volume = (key, data, affine)
        return self._volume[1], self._volume[2]

    def _bounds(self, key: str, index: int) -> tuple[int, int]:
        data, _ = self._read(key)
        lo, hi = foreground_extent(data, self.axis) if self.crop else (0, data.shape[self.axis])
        if self.num_slabs > hi - lo:
            raise ValueError(f"{self.path(key)}: num_slabs={self.num_slabs} exceeds its {hi - lo} slices along axis {self.axis}")
        return slab_edges(lo, hi, self.num_slabs)[index]

    def _cut(self, volume: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
        sl = [slice(None)] * 3
        sl[self.axis] = slice(*bounds)
        return np.ascontiguousarray(volume[tuple(sl)])

    def location(self, subject_id: str) -> str:
        key, index = self._parse(subject_id)
        if self.num_slabs == 1:
            return self.path(key)
        start, stop = self._bounds(key, index)
        return f"{self.path(key)} [slab {index + 1}/{self.num_slabs}: indices {start}:{stop} along axis {self.axis}]"

    def cache_token(self, subject_id: str) -> str:
        key, index = self._parse(subject_id)
        return f"file-source|{key}|{self.num_slabs}|{self.axis}|{self.crop}|{index}|{_file_token(self.path(key))}"

    def hr_path(self, subject_id: str) -> str | None:
        key, _ = self._parse(subject_id)
        return self.path(key) if self.num_slabs == 1 else None

    def load(self, subject_id: str) -> SubjectVolumes:
        key, index = self._parse(subject_id)
        data, affine = self._read(key)
        if self.num_slabs == 1:
            return SubjectVolumes(name=subject_id, hr=data, affine=affine, location=self.path(key))
        bounds = self._bounds(key, index)
        offset = np.zeros(3)
        offset[self.axis] = bounds[0]
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
        return SubjectVolumes(
            name=subject_id, hr=self._cut(data, bounds), affine=shifted, location=self.location(subject_id)
        )

    def degraded(
        self, subject_id: str, factors: Sequence[float], interpolation: degradation.Interpolation
    ) -> np.ndarray | None:
        key, index = self._parse(subject_id)
        if self.num_slabs == 1 or float(factors[self.axis]) == 1.0:
            return None  # degrading the slab itself is exact: no FFT runs along the cut axis
        lr_key = (key, tuple(float(f) for f in factors), str(interpolation))
        if lr_key not in self._lr:
            self._lr[lr_key] = degradation.degrade(self._read(key)[0], factors=lr_key[1], interpolation=interpolation)
        return self._cut(self._lr[lr_key], self._bounds(key, index))

