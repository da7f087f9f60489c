"""Volumes written atomically with the geometry of the scan they came from (NIfTI out, float32;
the header a copy of the input's but for the data type and scaling), output paths checked
before any computing, and :class:`NiftiError`, the one-line error of a bad inference volume.
The rules: ``docs/inference.md`` ("Files").
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from mdcsrn_lightning.atomic import atomic_path, describe_os_error, publish_new
from mdcsrn_lightning.data.volume_io import LoadedVolume, VolumeError

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiError",
    "NiftiVolume",
    "check_free_path",
    "check_output_path",
    "check_writable",
    "is_nifti_path",
    "refined_grid",
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


# the data module's checked volume: data, image, path, shape, voxel_sizes
NiftiVolume = LoadedVolume


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """``True`` for names ending in ``.nii`` or ``.nii.gz`` (case-insensitive): what we write."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


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
    return check_free_path(output, overwrite=overwrite, protect=protect)


def check_free_path(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protect: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Raise :class:`NiftiError` unless a file (of any kind: a volume, a JSON record) may be
    written at ``path``: not (a link to) any path in ``protect``, not a folder, free unless
    ``overwrite``, its folder writable (:func:`check_writable`)."""
    path = Path(path)
    for p in protect:
        p = Path(p)
        if path.resolve() == p.resolve() or _same_file(path, p):
            raise NiftiError(f"{path}: is the input file; refusing to overwrite an input")
    if path.is_dir():
        raise NiftiError(f"{path}: is a folder")
    if path.exists() and not overwrite:
        raise NiftiError(f"{path}: already exists; pass overwrite=true to replace it")
    check_writable(path)
    return path


def check_writable(output: str | os.PathLike[str]) -> None:
    """Raise :class:`NiftiError` unless a file can be created at ``output`` (before any computing).

    Checks the name's length, that no parent is a file, and writes (and removes) a probe file
    in the folder when it exists; a folder still to be created needs a writable ancestor.
    Disk space cannot be known in advance: a full disk fails at the write, with one line.
    """
    output = Path(output)
    limit = 255
    folder = output.parent
    probe_at = folder
    while not probe_at.exists():
        if probe_at.is_symlink():
            raise NiftiError(f"{output}: {probe_at} is a broken link")
        probe_at = probe_at.parent
    if not probe_at.is_dir():
        raise NiftiError(f"{output}: {probe_at} is a file, not a folder")
    try:
        limit = os.pathconf(probe_at, "PC_NAME_MAX")
    except (OSError, ValueError):
        pass
    # the temporary name adds a dot, 8 random characters and ".part<suffix>"
    if len(output.name.encode()) + 24 > limit:
        raise NiftiError(f"{output}: file name too long ({len(output.name.encode())} bytes; the limit here is {limit - 24})")
    if probe_at != folder:
        if not os.access(probe_at, os.W_OK | os.X_OK):
            raise NiftiError(f"{output}: cannot create the folder; {probe_at} is not writable")
        return
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    except OSError as exc:
        raise NiftiError(describe_os_error(output, exc)) from None
    os.close(fd)
    os.unlink(name)


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


def refined_grid(coarse: Sequence[int], shape: Sequence[int], offset: Sequence[float] | None = None) -> np.ndarray:
    """4x4 map from fine voxel coordinates to coarse ones: ``u = x * M / N + offset`` per axis."""
    scale = np.diag([m / n for m, n in zip(coarse[:3], shape[:3])] + [1.0])
    if offset is not None:
        scale[:3, 3] = [float(o) for o in offset]
    return scale


def refined_header(like: NiftiVolume, shape: Sequence[int],
                   offset: Sequence[float] | None = None) -> tuple[nib.Nifti1Header, tuple[int, ...]]:
    """``like``'s header for a finer grid of ``shape`` covering the same field: ``(header, file shape)``.

    Voxel ``x`` of the fine grid sits at coarse voxel coordinate ``x * M / N + offset``
    (:func:`refined_grid`), so qform and sform are each right-multiplied by that map: voxel
    sizes shrink by ``N / M`` and both codes are kept. ``offset=None`` (the coarse-matrix
    path, the k-space degradation's sampling: coarse voxel ``i`` is fine voxel ``i * N / M``):
    fine voxel 0 stays at coarse voxel 0's centre. A thick-slice scan's subdivision passes
    ``-(f - 1) / (2 f)`` on the thick axis (``inference/thick.py``): each slice's ``f`` fine
    voxels are centred on it. Trailing dimensions of size 1 (a ``(X, Y, Z, 1)`` file) are kept.
    """
    scale = refined_grid(like.data.shape, shape, offset)
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
    offset: Sequence[float] | None = None,
) -> Path:
    """Write ``data`` (a finer grid than ``like``'s, same field of view) with :func:`refined_header`
    (``offset``: the coarse voxel coordinate of fine voxel 0, see there)."""
    output = check_output_path(output, overwrite=overwrite, protect=(like.path,))
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise NiftiError(f"{output}: data must be 3D, got shape {arr.shape}")
    if isinstance(like.image, _IMAGE_TYPES):
        header, file_shape = refined_header(like, arr.shape, offset)
    else:  # MGH / Analyze: _write derives the NIfTI affine from the shapes
        header, file_shape = None, tuple(int(n) for n in arr.shape) + tuple(like.shape[3:])
    return _write(output, arr, like, header, file_shape, overwrite=overwrite, description=description, offset=offset)


def _write(
    output: Path,
    arr: np.ndarray,
    like: NiftiVolume,
    header: nib.Nifti1Header | None,
    file_shape: tuple[int, ...],
    *,
    overwrite: bool,
    description: str | None,
    offset: Sequence[float] | None = None,
) -> Path:
    if not np.isfinite(arr).all():
        raise NiftiError(f"{output}: result contains NaN or Inf; nothing written")
    values = arr.astype(np.float32).reshape(file_shape)
    if isinstance(like.image, _IMAGE_TYPES):
        assert header is not None
        header.set_data_dtype(np.float32)
        header.set_slope_inter(None, None)
        header["cal_min"] = 0
        header["cal_max"] = 0
        if description is not None:
            header["descrip"] = description.encode("ascii", "replace")[:79]
        # affine=None: the image takes qform, sform and both codes from the copied header
        # unchanged (passing an affine would re-derive them).
        image = type(like.image)(values, None, header)
    else:  # MGH / Analyze input: a NIfTI with its affine and voxel sizes (refined if finer)
        scale = refined_grid(like.data.shape, file_shape, offset)
        image = nib.Nifti1Image(values, like.affine @ scale)
        zooms = tuple(z * scale[i, i] for i, z in enumerate(like.voxel_sizes))
        image.header.set_zooms(zooms + tuple(image.header.get_zooms()[3:]))
        image.header.set_xyzt_units("mm")
        if description is not None:
            image.header["descrip"] = description.encode("ascii", "replace")[:79]

    # without overwrite, publish by hard link: the "does not exist" check and the
    # publication are one atomic step, so two writers cannot both win
    publish = atomic_path if overwrite else publish_new
    try:
        with publish(output) as tmp:
            nib.save(image, tmp)
    except FileExistsError as exc:
        raise NiftiError(str(exc)) from None
    return output
