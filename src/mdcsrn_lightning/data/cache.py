"""The degraded-volume cache: each subject validated, degraded and measured once, written once.

Per subject (``key`` = hash of the source file's path, size and mtime, the factors and the
interpolation, and with ``degradation=slices`` the slice settings), in ``cache_dir``:

- ``<key>.hr.npy``, ``<key>.lr.npy``: the HR as read and its LR, raw intensities, float32,
  uncompressed ``.npy`` (opened as memory maps: a patch reads only its own pages);
- ``<key>.fg-<t>.npy`` (written when a foreground sampler asks): up to :data:`FG_POINTS`
  voxel coordinates ``(N, 3)`` int32 drawn from the HR's foreground (``hr > t x`` its
  99.9th percentile; the metrics' rule is ``t = 0.05``), the foreground sampler's patch centres;
- ``<key>.json``: shape, affine, voxel sizes, ``input_scale`` (the LR's 99.9th percentile,
  :func:`~mdcsrn_lightning.data.intensity.input_scale`), ``reference_scale`` (the HR's),
  written last: its presence marks a complete entry.

Without a ``cache_dir`` the same files go to a private temporary folder removed when the
cache is garbage-collected, so there is one reading path. Nothing is normalised on disk:
the divide by ``input_scale`` happens per patch (samplers) or per whole volume (val/test).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdcsrn_lightning.atomic import WriteError, atomic_path
from mdcsrn_lightning.data import degradation, intensity
from mdcsrn_lightning.data.slices import SliceDegradation
from mdcsrn_lightning.data.sources import VolumeError, VolumeSource, check_patch_fits

__all__ = ["CACHE_VERSION", "FG_POINTS", "CacheEntry", "SubjectCache"]

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the cached content or its layout changes
#: foreground coordinates kept per subject (a uniform draw among them is a uniform draw of the foreground)
FG_POINTS = 1 << 16


@dataclass(frozen=True)
class CacheEntry:
    """One prepared subject: metadata and the paths of its cached arrays (nothing held in memory)."""

    name: str
    location: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    input_scale: float  # the LR's (NaN if it has none): what input and target are divided by
    reference_scale: float  # the HR's: the metrics' intensity reference (raw units)
    hr_file: str
    lr_file: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes (mm) from the affine's columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def fg_file(self, threshold: float) -> str:
        return f"{self.hr_file[: -len('.hr.npy')]}.fg-{float(threshold):g}.npy"


def _atomic_save(path: Path, write: Callable[[Any], None]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w" if path.suffix == ".json" else "wb") as fh:
        write(fh)


class SubjectCache:
    """Prepares subjects of ``source`` for ``factors`` / ``interpolation`` into ``cache_dir``.

    Args:
        source: where the volumes come from.
        factors, interpolation: the degradation (part of every key).
        patch_size: every volume must be at least this large (checked before degrading).
        cache_dir: the folder; ``None``: a private temporary one, removed with this object.
        require_scale: a volume whose LR has no positive 99.9th percentile is an error
            (``normalize="percentile"``); otherwise its ``input_scale`` is NaN.
        slices: a thick-slice degradation instead of the k-space one (part of every key;
            a source's own LR is then not used).
    """

    def __init__(
        self,
        source: VolumeSource,
        factors: tuple[float, float, float],
        interpolation: degradation.Interpolation,
        patch_size: tuple[int, int, int],
        cache_dir: str | None,
        require_scale: bool,
        *,
        slices: SliceDegradation | None = None,
    ) -> None:
        self.source = source
        self.factors = factors
        self.interpolation = interpolation
        self.patch_size = patch_size
        self.require_scale = require_scale
        self.slices = slices
        if cache_dir is None:
            folder = tempfile.mkdtemp(prefix="mdcsrn-cache-")
            weakref.finalize(self, shutil.rmtree, folder, True)
            self.folder = Path(folder)
        else:
            self.folder = Path(cache_dir)
        self._entries: dict[str, CacheEntry] = {}

    def key(self, token: str) -> str:
        parts: list[Any] = [CACHE_VERSION, token, list(self.factors), self.interpolation]
        if self.slices is not None:  # k-space keys stay as they were
            parts.append(["slices", self.slices.record()])
        blob = json.dumps(parts)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def entry(self, name: str) -> CacheEntry:
        """The subject's entry, from the cache if it is complete and current, else made now."""
        if name in self._entries:
            return self._entries[name]
        try:
            token = self.source.cache_token(name)
        except OSError as exc:
            raise VolumeError(f"{self.source.location(name)}: cannot be read ({exc.strerror or exc})") from None
        key = self.key(token)
        entry = self._read(key, token, name) or self._make(name, key, token)
        self._entries[name] = entry
        return entry

    def foreground(self, entry: CacheEntry, threshold: float = 0.05) -> str:
        """Path of the subject's foreground coordinates (``hr > threshold x reference_scale``),
        written on first use."""
        path = Path(entry.fg_file(threshold))
        if not path.is_file():
            hr = np.load(entry.hr_file, mmap_mode="r")
            coords = np.argwhere(hr > threshold * entry.reference_scale).astype(np.int32)
            if len(coords) > FG_POINTS:  # a fixed subsample: the entry stays deterministic
                coords = coords[np.random.default_rng(0).choice(len(coords), FG_POINTS, replace=False)]
            self._write({path: lambda fh: np.save(fh, coords, allow_pickle=False)}, coords.nbytes)
        return str(path)

    # ------------------------------------------------------------------ reading
    def _read(self, key: str, token: str, name: str) -> CacheEntry | None:
        meta_path = self.folder / f"{key}.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("version") != CACHE_VERSION or meta.get("token") != token:
                return None
            entry = CacheEntry(
                name=name,
                location=str(meta.get("location", name)),
                shape=tuple(int(s) for s in meta["shape"]),  # type: ignore[arg-type]
                affine=np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4),
                input_scale=float(meta["input_scale"]),
                reference_scale=float(meta["reference_scale"]),
                hr_file=str(self.folder / f"{key}.hr.npy"),
                lr_file=str(self.folder / f"{key}.lr.npy"),
            )
            expected = 128 + 4 * math.prod(entry.shape)  # header + float32 data, at least
            for path in (entry.hr_file, entry.lr_file):
                if Path(path).stat().st_size < expected:
                    raise ValueError(f"{path} is shorter than a {entry.shape} float32 volume")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unusable cache entry (%s); recomputing", meta_path, exc)
            return None
        if self.require_scale and not (math.isfinite(entry.input_scale) and entry.input_scale > 0):
            return None  # the fresh pass raises the one-line error
        check_patch_fits(entry.shape, self.patch_size, entry.location)
        return entry

    # ------------------------------------------------------------------ making
    def _make(self, name: str, key: str, token: str) -> CacheEntry:
        src = self.source
        vol = src.load(name)
        hr = np.asarray(vol.hr, dtype=np.float32)
        location = vol.location or src.location(name)
        # Before the (costly) degradation: a volume too small for a patch is a config error.
        check_patch_fits(hr.shape, self.patch_size, location)
        lr = vol.lr if self.slices is None else self.slices(hr, name)
        if lr is None:
            lr = src.degraded(name, self.factors, self.interpolation)
        if lr is None:
            # Looked up through the module so that tests can count the calls.
            lr = degradation.degrade(hr, factors=self.factors, interpolation=self.interpolation)
        lr = np.asarray(lr, dtype=np.float32)
        if lr.shape != hr.shape:
            raise VolumeError(f"{location}: LR grid shape {lr.shape} does not match the HR grid {hr.shape}")
        # The input scale comes from the LR alone (at inference there is no HR to ask); measured
        # whatever `normalize` is, so that an entry serves both settings.
        try:
            input_scale = intensity.input_scale(lr, location)
        except ValueError as exc:
            if self.require_scale:
                raise VolumeError(str(exc)) from None
            input_scale = math.nan  # raw intensities need no scale
        reference_scale = float(vol.scale) if vol.scale is not None else float(np.percentile(hr, 99.9))
        if not (math.isfinite(reference_scale) and reference_scale > 0):
            raise VolumeError(
                f"{location}: 99.9th percentile of the HR intensities is {reference_scale:g}; cannot score "
                f"against an empty or negative volume"
            )
        affine = np.asarray(vol.affine, dtype=np.float64)
        meta = {
            "version": CACHE_VERSION, "name": name, "location": location, "token": token,
            "factors": list(self.factors), "interpolation": self.interpolation, "shape": list(hr.shape),
            "slices": None if self.slices is None else self.slices.record(),
            "affine": affine.tolist(), "input_scale": input_scale, "reference_scale": reference_scale,
        }
        hr_file, lr_file = self.folder / f"{key}.hr.npy", self.folder / f"{key}.lr.npy"
        self._write(
            {
                hr_file: lambda fh: np.save(fh, hr, allow_pickle=False),
                lr_file: lambda fh: np.save(fh, lr, allow_pickle=False),
                self.folder / f"{key}.json": lambda fh: json.dump(meta, fh),
            },
            hr.nbytes + lr.nbytes,
        )
        return CacheEntry(
            name=name, location=location, shape=hr.shape, affine=affine,  # type: ignore[arg-type]
            input_scale=input_scale, reference_scale=reference_scale, hr_file=str(hr_file), lr_file=str(lr_file),
        )

    def _write(self, files: dict[Path, Callable[[Any], None]], nbytes: int) -> None:
        """Each file atomically, in order (the metadata last); on a failure none of them is left
        behind and the error is one line naming the cache folder."""
        written: list[Path] = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path, write in files.items():
                _atomic_save(path, write)
                written.append(path)
        except OSError as exc:
            for path in written:  # complete but orphaned without the rest
                path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise WriteError(
                    f"{self.folder}: no space left on device for the degraded-volume cache (data.cache_dir; "
                    f"{nbytes / 1e6:.0f} MB per subject); free space there or point data.cache_dir elsewhere",
                    exc.errno,
                ) from None
            raise
