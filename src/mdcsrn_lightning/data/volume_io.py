"""The one reader and validator of 3D volume files (training sources, evaluation, inference).

Formats: NIfTI (``.nii``, ``.nii.gz``), FreeSurfer MGH (``.mgz``) and Analyze
(``.img``/``.hdr``), read with nibabel, and a DICOM series: a *folder* holding the files of
one series, read with SimpleITK (GDCM sorts the slices by position) and turned into RAS
voxel data and affine by TorchIO's ``sitk_to_nib``, so orientation and spacing are the
scanner's; the loaded volume carries a NIfTI image with that affine (qform and sform code 1,
scanner) so that outputs are written as NIfTI with the same geometry. Every problem is one
:class:`VolumeError` line ``"<file>: <problem>"``:

- missing file, not readable by nibabel; a folder that is not one DICOM series (no DICOM
  files, several series, unevenly spaced or missing slices); a single ``.dcm`` file;
- not 3D (4D is accepted only when it holds one volume), empty, complex/RGB/non-numeric;
- NaN or Inf voxels;
- a zero, negative or non-finite voxel size in the header;
- more voxels than the size limit (:func:`max_voxels`; checked from the header's shape, or a
  DICOM series' first slice and slice count, before any voxel data is read or decompressed).

:func:`check_not_constant` is the extra check for a volume that will be normalised by its
own intensities (inference inputs, evaluation references): an all-zero or constant volume
is refused with its file name.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdcsrn_lightning.atomic import is_temp_name

__all__ = [
    "collect_inputs",
    "VOLUME_SUFFIXES",
    "LoadedVolume",
    "VolumeError",
    "VolumeHeader",
    "available_memory",
    "check_array",
    "check_not_constant",
    "check_voxel_sizes",
    "dicom_series_ids",
    "header_voxel_sizes",
    "is_dicom_series",
    "is_volume_path",
    "load_volume",
    "max_voxels",
    "read_header",
    "set_max_voxels",
    "volume_stem",
    "volume_token",
]

VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mgz", ".img", ".hdr")
_FORMAT = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".mgz": "MGH", ".img": "Analyze", ".hdr": "Analyze"}


class VolumeError(ValueError):
    """A volume (or a folder of them) cannot be used; the message names the file and the problem."""


def _suffix_of(path: str | os.PathLike[str]) -> str | None:
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def is_volume_path(path: str | os.PathLike[str]) -> bool:
    """``True`` for a volume file name we read (see ``VOLUME_SUFFIXES``), ``False`` for our own
    temporary files (``.<name>.<random>.part.nii.gz``, left by a killed writer)."""
    return _suffix_of(path) is not None and not is_temp_name(path)


def volume_stem(path: str | os.PathLike[str]) -> str:
    """``"scan.nii.gz" -> "scan"``, ``"scan.mgz" -> "scan"``; other names unchanged."""
    name = Path(path).name
    suffix = _suffix_of(name)
    return name[: -len(suffix)] if suffix else name


def _check_dims(shape: tuple[int, ...], location: str) -> None:
    """Refuse a shape that is not 3D, or 4D+ holding one volume (trailing sizes 1)."""
    if len(shape) == 3 or (len(shape) > 3 and all(s == 1 for s in shape[3:])):
        return
    if len(shape) == 4:
        raise VolumeError(f"{location}: 4D with {shape[3]} volumes (shape {shape}); expected one 3D volume")
    raise VolumeError(f"{location}: not 3D (shape {shape}); expected one 3D volume (X, Y, Z)")


def _squeeze_to_3d(data: np.ndarray, location: str) -> np.ndarray:
    _check_dims(tuple(data.shape), location)
    return data if data.ndim == 3 else data.reshape(data.shape[:3])


def check_array(data: Any, location: str) -> np.ndarray:
    """Check an array as a volume: real numeric, 3D (or 4D holding one volume), non-empty, finite.

    Returns:
        ``(X, Y, Z)`` float32, C-contiguous.
    """
    data = np.asanyarray(data)
    if data.dtype.names is not None or np.iscomplexobj(data):
        raise VolumeError(f"{location}: data type {data.dtype} is not a real scalar (RGB or complex data)")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise VolumeError(f"{location}: non-numeric data of dtype {data.dtype}")
    data = _squeeze_to_3d(data, location)
    if min(data.shape) < 1:
        raise VolumeError(f"{location}: empty volume (shape {data.shape})")
    out = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        nan = int(np.isnan(out).sum())
        inf = int(out.size - finite.sum() - nan)
        raise VolumeError(f"{location}: contains {nan} NaN and {inf} Inf voxel(s)")
    return np.ascontiguousarray(out)


# What one voxel of an input costs while it is read, checked, normalised, super-resolved and
# written (float64 decoding, float32 copies, the output volume): a generous estimate.
BYTES_PER_VOXEL = 32
_max_voxels: int | None = None  # None: from the available memory (set_max_voxels)


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``; physical memory where that is unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 64 * 1024**3


def set_max_voxels(limit: int | str | None) -> None:
    """Set the volume size limit (``max_voxels=``); ``None``/``"auto"``: from the available memory.

    Raises:
        ValueError: a limit that is not a positive integer (``"max_voxels=...: ..."``).
    """
    global _max_voxels
    if limit is None or str(limit).lower() in ("auto", "null", "none", ""):
        _max_voxels = None
        return
    try:
        value = int(float(limit)) if not isinstance(limit, bool) else 0
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"max_voxels={limit!r}: expected a positive number of voxels or auto")
    _max_voxels = value


def max_voxels() -> int:
    """The largest volume (in voxels) a file may claim: ``max_voxels=``, else available memory / 32 bytes."""
    return _max_voxels if _max_voxels is not None else max(1, available_memory() // BYTES_PER_VOXEL)


def check_volume_size(shape: tuple[int, ...], location: str) -> None:
    """Refuse a volume whose claimed shape holds more voxels than :func:`max_voxels`."""
    count = int(np.prod([int(s) for s in shape], dtype=np.float64)) if shape else 0
    limit = max_voxels()
    if count > limit:
        source = f"max_voxels={limit}" if _max_voxels is not None else "from the available memory; raise it with max_voxels=<n>"
        raise VolumeError(
            f"{location}: shape {tuple(int(s) for s in shape)} is {count:,} voxels, over the size limit of "
            f"{limit:,} voxels ({source}); nothing was decompressed"
        )


def check_voxel_sizes(sizes: Any, location: str) -> tuple[float, float, float]:
    """The first three voxel sizes (mm); refuses zero, negative or non-finite ones."""
    values = tuple(float(s) for s in tuple(sizes)[:3])
    if len(values) < 3 or not all(np.isfinite(v) and v > 0 for v in values):
        shown = tuple(round(v, 6) for v in values)
        raise VolumeError(f"{location}: voxel sizes {shown} in the header must be positive numbers")
    return values  # type: ignore[return-value]


def check_not_constant(data: np.ndarray, location: str) -> None:
    """Refuse an all-zero or constant volume (nothing to normalise by, nothing to super-resolve)."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if lo == hi:
        what = "all zero" if hi == 0 else f"constant ({hi:g} everywhere)"
        raise VolumeError(f"{location}: the volume is {what}")


@dataclass
class LoadedVolume:
    """A checked volume and the image it came from.

    Attributes:
        data: ``(X, Y, Z)`` float32, the stored values with the header's scaling applied.
        image: the nibabel image (header and affine of the file).
        path: where it was read from.
        shape: the file's own data shape, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, 1)``.
        voxel_sizes: the header's first three voxel sizes (all > 0).
    """

    data: np.ndarray
    image: Any
    path: Path
    shape: tuple[int, ...]
    voxel_sizes: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` float64 voxel -> world matrix (identity when the file has none)."""
        affine = getattr(self.image, "affine", None)
        return np.asarray(np.eye(4) if affine is None else affine, dtype=np.float64)


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume's header tells before any voxel data is read (:func:`read_header`).

    Attributes:
        path: the volume file or DICOM series folder.
        shape: the claimed data shape (a DICOM series: first slice's matrix x slice count).
        image: the nibabel image, its data not yet read (``None`` for a DICOM series folder,
            which :func:`load_volume` reads whole).
    """

    path: Path
    shape: tuple[int, ...]
    image: Any = None


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    # nibabel's own LoggingOutputSuppressor loses its handler; disabling the logger is enough
    log = logging.getLogger("nibabel.global")
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


# ------------------------------------------------------------------------ DICOM series
_DICOM_FILE_SUFFIXES = (".dcm", ".ima", ".dicom")
# slice positions may differ from an even spacing by this share of the spacing (DS rounding)
_SLICE_GAP_TOLERANCE = 0.01


@contextmanager
def _quiet_itk() -> Iterator[None]:
    # ITK prints warnings (non-uniform sampling, ...) to stderr itself; we check and report
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def dicom_series_ids(folder: str | os.PathLike[str]) -> list[str]:
    """The DICOM series UIDs of the files directly in ``folder`` (``[]``: no DICOM file there)."""
    import SimpleITK as sitk

    path = Path(folder)
    if not path.is_dir():
        return []
    with _quiet_itk():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def is_dicom_series(path: str | os.PathLike[str]) -> bool:
    """``True`` for a folder holding the files of exactly one DICOM series (one input volume)."""
    return len(dicom_series_ids(path)) == 1


def _check_slice_spacing(positions: list[np.ndarray], normal: np.ndarray, location: str) -> None:
    """Refuse a series whose slices are not evenly spaced along the slice normal (a missing slice)."""
    if len(positions) < 3:
        return
    along = np.sort(np.asarray([float(np.dot(p, normal)) for p in positions]))
    steps = np.diff(along)
    median = float(np.median(steps))
    if not median > 0:
        raise VolumeError(f"{location}: DICOM slices share one position (duplicate slices?)")
    worst = float(np.max(np.abs(steps - median)))
    if worst > _SLICE_GAP_TOLERANCE * median:
        raise VolumeError(
            f"{location}: DICOM slices are not evenly spaced (steps from {steps.min():.4g} to "
            f"{steps.max():.4g} mm; a missing slice?); cannot build one 3D grid"
        )


def _check_series_size(files: list[str], location: str, error: type[VolumeError]) -> tuple[int, ...] | None:
    """The series' claimed shape (first slice's matrix x slice count), checked against
    :func:`max_voxels` (``None``: the first slice's header is unreadable)."""
    import SimpleITK as sitk

    if not files:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
    except RuntimeError:
        return None  # the series reader names what is wrong with the file
    shape = (size[0], size[1], len(files) * (size[2] if len(size) > 2 else 1))
    try:
        check_volume_size(shape, location)
    except VolumeError as exc:
        raise error(str(exc)) from None
    return shape


def _dicom_files(path: Path, error: type[VolumeError]) -> list[str]:
    """The files of the one DICOM series in folder ``path``, sorted by GDCM."""
    import SimpleITK as sitk

    ids = dicom_series_ids(path)
    if not ids:
        raise error(f"{path}: is a folder holding no DICOM series (give a volume file or a DICOM series folder)")
    if len(ids) > 1:
        raise error(f"{path}: holds {len(ids)} DICOM series; give the folder of one series")
    with _quiet_itk():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))


def _load_dicom(path: Path, error: type[VolumeError]) -> LoadedVolume:
    """One DICOM series folder -> a checked volume with a NIfTI image of its RAS geometry."""
    import nibabel as nib
    import SimpleITK as sitk
    from torchio.data.io import sitk_to_nib

    location = str(path)
    files = _dicom_files(path, error)
    _check_series_size(files, location, error)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "unreadable")
        raise error(f"{location}: DICOM series not readable ({detail[:200]})") from None
    try:
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError(f"{location}: DICOM series with {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB?); expected grey values")
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        positions = []
        for i in range(len(files)):
            if reader.HasMetaDataKey(i, "0020|0032"):
                positions.append(np.asarray([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]))
        if len(positions) == len(files):
            _check_slice_spacing(positions, direction[:, 2], location)
        data, affine = sitk_to_nib(image, keepdim=True)  # (1, X, Y, Z) and the RAS affine
        volume = check_array(np.asarray(data)[0], location)
        sizes = check_voxel_sizes(image.GetSpacing(), location)
    except VolumeError as exc:
        raise error(str(exc)) from None
    nifti = nib.Nifti1Image(volume, affine)
    # DICOM positions are scanner coordinates: both codes say so
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_sform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    return LoadedVolume(data=volume, image=nifti, path=path, shape=tuple(volume.shape), voxel_sizes=sizes)


def volume_token(path: str | os.PathLike[str]) -> str:
    """A string that changes whenever the volume's data changes: path, size and mtime of the
    file, or of every file in a DICOM series folder."""
    p = Path(path)
    if p.is_dir():
        parts = [os.path.abspath(p)]
        for child in sorted(p.iterdir()):
            if child.is_file():
                st = child.stat()
                parts.append(f"{child.name}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)
    st = os.stat(p)
    return f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}"


# ------------------------------------------------------------------------ nibabel formats
def _open(path: Path, error: type[VolumeError]) -> Any:
    import nibabel as nib  # deferred: keeps `import mdcsrn_lightning.data.sources` light

    if not path.exists():
        raise error(f"{path}: no such file")
    if path.is_dir():
        raise error(f"{path}: is a folder, not a volume file")
    if path.name.lower().endswith(_DICOM_FILE_SUFFIXES):
        raise error(f"{path}: is one DICOM file; give the folder that holds the whole series")
    kind = _FORMAT.get(_suffix_of(path) or "", "NIfTI")
    try:
        # nibabel logs (to stderr) the header fields it "fixes" while loading, e.g. a zero
        # pixdim; we check what the file stores ourselves and report it as one line
        with _quiet_nibabel():
            return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{path}: not readable as {kind} ({detail})") from None


def _stored_voxel_sizes(image: Any) -> tuple[float, ...]:
    """The voxel sizes as stored in the file.

    nibabel "fixes" a zero or negative ``pixdim`` of a NIfTI/Analyze header while loading
    (with only a log message): read the header again unchecked to see what the file holds.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    header = image.header
    if isinstance(header, nib.analyze.AnalyzeHeader):
        holder = image.file_map.get("header") or image.file_map.get("image")  # .nii: one file
        if holder is not None and holder.filename:
            with ImageOpener(holder.filename) as fh:
                raw = type(header).from_fileobj(fh, check=False)
            return tuple(float(z) for z in raw["pixdim"][1:4])
    return tuple(float(z) for z in header.get_zooms()[:3])


def header_voxel_sizes(path: str | os.PathLike[str], error: type[VolumeError] = VolumeError) -> tuple[float, float, float]:
    """The checked voxel sizes of a volume file, from its header only (no voxel data read;
    a DICOM series folder is read whole: its slice spacing comes from the slice positions)."""
    path = Path(path)
    if path.is_dir():
        return load_volume(path, error).voxel_sizes
    try:
        return check_voxel_sizes(_stored_voxel_sizes(_open(path, error)), str(path))
    except VolumeError as exc:
        raise error(str(exc)) from None


def read_header(path: str | os.PathLike[str], error: type[VolumeError] = VolumeError) -> VolumeHeader:
    """Check what a volume's header claims, without reading its voxel data: readable, 3D (or
    4D holding one volume), within :func:`max_voxels`, positive voxel sizes (a NIfTI/MGH/Analyze
    file); one DICOM series within :func:`max_voxels` (a folder; its voxel sizes come from the
    slice positions, checked by :func:`load_volume`). Raises ``error`` (a :class:`VolumeError`)."""
    path = Path(path)
    if path.is_dir():
        files = _dicom_files(path, error)
        return VolumeHeader(path=path, shape=_check_series_size(files, str(path), error) or (0, 0, 0))
    image = _open(path, error)
    location = str(path)
    try:
        shape = tuple(int(s) for s in image.shape)
        check_volume_size(shape, location)  # the header's claim, before decompressing
        _check_dims(shape, location)
        check_voxel_sizes(_stored_voxel_sizes(image), location)
    except VolumeError as exc:
        raise error(str(exc)) from None
    return VolumeHeader(path=path, shape=shape, image=image)


def load_volume(source: str | os.PathLike[str] | VolumeHeader, error: type[VolumeError] = VolumeError) -> LoadedVolume:
    """Read and check one volume file or DICOM series folder (see the module docstring); raises
    ``error`` (a :class:`VolumeError`). ``source``: a path, or a :func:`read_header` of it
    (the file is then not opened again: only its voxel data is read)."""
    header = source if isinstance(source, VolumeHeader) else None
    path = header.path if header is not None else Path(source)  # type: ignore[arg-type]
    if path.is_dir():
        return _load_dicom(path, error)
    image = header.image if header is not None else _open(path, error)
    location = str(path)
    try:
        check_volume_size(tuple(image.shape), location)  # the header's claim, before decompressing
    except VolumeError as exc:
        raise error(str(exc)) from None
    try:
        shape = tuple(int(s) for s in image.shape)
        raw = np.asanyarray(image.dataobj)
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{location}: data cannot be read ({detail})") from None
    try:
        data = check_array(raw, location)
        sizes = check_voxel_sizes(_stored_voxel_sizes(image), location)
    except VolumeError as exc:
        raise error(str(exc)) from None
    return LoadedVolume(data=data, image=image, path=path, shape=shape, voxel_sizes=sizes)


# ------------------------------------------------------------------------ collections
_GLOB_CHARS = set("*?[")


def collect_inputs(spec: str | os.PathLike[str]) -> tuple[list[Path], bool]:
    """``(inputs, is_collection)`` for a volume file, a DICOM series folder, a folder of volumes
    or a glob pattern.

    The folder rule: a folder holding volume files (``.nii``, ``.nii.gz``, ``.mgz``,
    ``.img``/``.hdr``; not recursive) is a collection of them, sorted; otherwise a folder
    holding the files of one DICOM series is *one* input volume; otherwise its subfolders
    that each hold one DICOM series are a collection (a study exported as one folder per
    series). A glob (``*``, ``?``, ``[``) gives its matching volume files and DICOM series
    folders, sorted. Our own temporary files (``.<name>.<random>.part.nii.gz``) are never
    inputs. ``is_collection`` is ``True`` for a collection: the output is then a folder.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_inputs(path)
    if path.exists():
        return [path], False
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in _glob.glob(os.path.expanduser(text), recursive=True))
        found = _volume_files(matches) + [p for p in matches if p.is_dir() and is_dicom_series(p)]
        if not found:
            raise VolumeError(f"{text}: no volume files or DICOM series folders match this pattern")
        return sorted(found), True
    raise VolumeError(f"{path}: no such file or folder")


def _folder_inputs(path: Path) -> tuple[list[Path], bool]:
    files = _volume_files(path.iterdir())
    if files:
        return files, True
    series = dicom_series_ids(path)
    if len(series) == 1:
        return [path], False
    if len(series) > 1:
        raise VolumeError(f"{path}: holds {len(series)} DICOM series; give the folder of one series")
    folders = sorted(p for p in path.iterdir() if p.is_dir() and is_dicom_series(p))
    if folders:
        return folders, True
    raise VolumeError(f"{path}: folder holds no .nii, .nii.gz, .mgz or .img volume files and no DICOM series")


def _volume_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files = sorted(Path(p) for p in paths if Path(p).is_file() and is_volume_path(p))
    # an Analyze pair is one volume: keep the .img, drop its .hdr
    images = {p.with_suffix(".img") for p in files if p.suffix.lower() == ".img"}
    return [p for p in files if not (p.suffix.lower() == ".hdr" and p.with_suffix(".img") in images)]
