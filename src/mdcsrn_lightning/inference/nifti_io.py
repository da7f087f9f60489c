"""Read and write NIfTI volumes for inference: checked on the way in, atomic on the way out.

Reading (:func:`read_volume`) turns every problem into one :class:`NiftiError` whose
message is ``"<file>: <problem>"`` (missing, not NIfTI, not 3D, 4D with more than one
volume, NaN/Inf, complex/RGB data). Writing (:func:`write_like`) keeps the geometry of a
reference image exactly: the header is a copy of the input's (affine, qform and sform with
their codes, voxel sizes, units, dim) and only the data type (float32) and the intensity
scaling fields (``scl_slope``/``scl_inter``/``cal_min``/``cal_max``) change. The file is
written under a temporary name in the target folder and moved into place, so an
interrupted run never leaves half a file; an existing file is replaced only with
``overwrite=True`` and the input file is never replaced at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mdcsrn_lightning.atomic import atomic_path
from mdcsrn_lightning.data.sources import VolumeError

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiError",
    "NiftiVolume",
    "check_output_path",
    "is_nifti_path",
    "nifti_stem",
    "read_volume",
    "refined_header",
    "write_like",
    "write_refined",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
_IMAGE_TYPES = (nib.Nifti1Image, nib.Nifti2Image)


class NiftiError(VolumeError):
    """A volume that cannot be read or written; the message is ``"<file>: <problem>"``.

    A :class:`~mdcsrn_lightning.data.sources.VolumeError` (so a ``ValueError``), like every
    other bad-volume error of the package.
    """


@dataclass
class NiftiVolume:
    """A checked 3D volume and the image it came from.

    Attributes:
        data: ``(X, Y, Z)`` float32 array, the stored values with the header's
            ``scl_slope``/``scl_inter`` applied (the real intensities).
        image: the loaded nibabel image (header and affine of the file).
        path: where it was read from.
        shape: the file's own data shape, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, 1)``:
            :func:`write_like` writes the same shape back.
    """

    data: np.ndarray
    image: nib.Nifti1Image
    path: Path
    shape: tuple[int, ...]


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """``True`` for names ending in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike[str]) -> str:
    """``"scan.nii.gz" -> "scan"``, ``"scan.nii" -> "scan"``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_volume(path: str | os.PathLike[str]) -> NiftiVolume:
    """Load one NIfTI file as a checked ``(X, Y, Z)`` float32 volume.

    Accepted: 3D data, or more dimensions when every one past the third is 1 (a 4D file
    holding a single volume). Everything else raises :class:`NiftiError`.
    """
    path = Path(path)
    if not path.exists():
        raise NiftiError(f"{path}: no such file")
    if path.is_dir():
        raise NiftiError(f"{path}: is a folder, not a NIfTI file")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad file
        raise NiftiError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(image, _IMAGE_TYPES):
        raise NiftiError(f"{path}: not a NIfTI file (nibabel reads it as {type(image).__name__})")
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        raise NiftiError(f"{path}: not 3D (shape {shape})")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        if len(shape) == 4:
            raise NiftiError(f"{path}: 4D with {shape[3]} volumes (shape {shape}); give one 3D volume")
        raise NiftiError(f"{path}: not 3D (shape {shape})")
    if min(shape[:3]) < 1:
        raise NiftiError(f"{path}: empty volume (shape {shape})")
    dtype = image.get_data_dtype()
    if dtype.names is not None or np.issubdtype(dtype, np.complexfloating):
        raise NiftiError(f"{path}: data type {dtype} is not a real scalar (RGB or complex data)")
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape[:3])
    except Exception as exc:
        raise NiftiError(f"{path}: data cannot be read ({type(exc).__name__}: {exc})") from exc
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum() - n_nan)
        raise NiftiError(f"{path}: contains {n_nan} NaN and {n_inf} Inf voxels")
    return NiftiVolume(data=data, image=image, path=path, shape=shape)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protect: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Check that ``output`` may be written; raise :class:`NiftiError` if not.

    ``output`` must end in ``.nii``/``.nii.gz``, must not be (or resolve to) any path in
    ``protect`` (the inputs), and must not exist unless ``overwrite``.
    """
    output = Path(output)
    if not is_nifti_path(output):
        raise NiftiError(f"{output}: output must end in .nii or .nii.gz")
    for p in protect:
        p = Path(p)
        if output.resolve() == p.resolve() or _same_file(output, p):
            raise NiftiError(f"{output}: is the input file; refusing to overwrite an input")
    if output.is_dir():
        raise NiftiError(f"{output}: is a folder")
    if output.exists() and not overwrite:
        raise NiftiError(f"{output}: already exists; pass overwrite=true to replace it")
    return output


def write_like(
    output: str | os.PathLike[str],
    data: np.ndarray,
    like: NiftiVolume,
    *,
    overwrite: bool = False,
    description: str | None = "mdcsrn-lightning SR",
) -> Path:
    """Write ``data`` (``(X, Y, Z)``, same shape as ``like.data``) as float32 NIfTI with ``like``'s geometry.

    The header is ``like``'s, copied: affine, qform/sform and their codes, pixdim, units,
    dim (a ``(X, Y, Z, 1)`` input is written back as ``(X, Y, Z, 1)``) stay bit for bit.
    Changed: data type (float32), ``scl_slope``/``scl_inter`` (unset: the stored values
    are the intensities), ``cal_min``/``cal_max`` (0) and, unless ``None``, ``descrip``.

    Written to a temporary file beside ``output`` and renamed into place (atomic on one
    file system). Refuses to replace ``like.path`` or, without ``overwrite``, any
    existing file.
    """
    output = check_output_path(output, overwrite=overwrite, protect=(like.path,))
    arr = np.asarray(data)
    if arr.shape != like.data.shape:
        raise NiftiError(f"{output}: data shape {arr.shape} differs from the input's {like.data.shape}")
    return _write(output, arr, like, like.image.header.copy(), like.shape, overwrite=overwrite, description=description)


def refined_header(like: NiftiVolume, shape: Sequence[int]) -> tuple[nib.Nifti1Header, tuple[int, ...]]:
    """``like``'s header for a finer grid of ``shape`` covering the same field: ``(header, file shape)``.

    Voxel ``x`` of the fine grid sits at coarse voxel coordinate ``x * M / N`` (the
    degradation's sampling convention: coarse voxel ``i`` is fine voxel ``i * N / M``), so
    qform and sform are each right-multiplied by ``diag(M / N, 1)``: voxel sizes shrink by
    ``N / M``, fine voxel 0 stays at coarse voxel 0's centre, and both codes are kept.
    Trailing dimensions of size 1 (a ``(X, Y, Z, 1)`` file) are kept.
    """
    coarse = like.data.shape
    scale = np.diag([m / n for m, n in zip(coarse, shape)] + [1.0])
    header = like.image.header.copy()
    qform, qcode = header.get_qform(), int(header["qform_code"])
    sform, scode = header.get_sform(), int(header["sform_code"])
    file_shape = tuple(int(n) for n in shape) + tuple(like.shape[3:])
    header.set_data_shape(file_shape)
    zooms = list(header.get_zooms())
    zooms[:3] = [z * scale[ax, ax] for ax, z in enumerate(zooms[:3])]
    header.set_zooms(zooms)
    # Set even when a code is 0: the matrices then stay as unused as they were.
    header.set_qform(qform @ scale, code=qcode)
    header.set_sform(sform @ scale, code=scode)
    return header, file_shape


def write_refined(
    output: str | os.PathLike[str],
    data: np.ndarray,
    like: NiftiVolume,
    *,
    overwrite: bool = False,
    description: str | None = "mdcsrn-lightning SR",
) -> Path:
    """Write ``data`` (a finer grid than ``like``'s, same field of view) with :func:`refined_header`."""
    output = check_output_path(output, overwrite=overwrite, protect=(like.path,))
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise NiftiError(f"{output}: data must be 3D, got shape {arr.shape}")
    header, file_shape = refined_header(like, arr.shape)
    return _write(output, arr, like, header, file_shape, overwrite=overwrite, description=description)


def _write(
    output: Path,
    arr: np.ndarray,
    like: NiftiVolume,
    header: nib.Nifti1Header,
    file_shape: tuple[int, ...],
    *,
    overwrite: bool,
    description: str | None,
) -> Path:
    if not np.isfinite(arr).all():
        raise NiftiError(f"{output}: result contains NaN or Inf; nothing written")
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)
    header["cal_min"] = 0
    header["cal_max"] = 0
    if description is not None:
        header["descrip"] = description.encode("ascii", "replace")[:79]
    # affine=None: the image takes qform, sform and both codes from the copied header
    # unchanged (passing an affine would re-derive them).
    image = type(like.image)(arr.astype(np.float32).reshape(file_shape), None, header)

    with atomic_path(output) as tmp:
        nib.save(image, tmp)
        if output.exists() and not overwrite:  # appeared while we were writing
            raise NiftiError(f"{output}: already exists; pass overwrite=true to replace it")
    return output
