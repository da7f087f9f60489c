"""The file layer of inference (``mdcsrn-infer``): collect the inputs, plan the outputs, check
everything before writing anything, build the inferer once, then per input: to the fine grid
-> divided by its own scale -> the inferer -> multiplied back -> optional data consistency ->
NIfTI. It calls the inferer and nothing below it; the path and its guarantees (read once,
bounded memory, nothing written on a bad input): ``docs/inference.md`` ("Files").
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mdcsrn_lightning.atomic import remove_stale_temps
from mdcsrn_lightning.checkpoints import TrainedModel, load_trained_model, no_checkpoint
from mdcsrn_lightning.release import RELEASED_COARSE_WEIGHTS, RELEASED_THICK_WEIGHTS
from mdcsrn_lightning.data.degradation import data_consistency as _data_consistency
from mdcsrn_lightning.data.degradation import degrade as _degrade
from mdcsrn_lightning.data.degradation import fine_shape, kspace_truncate, lr_shape, to_fine_grid
from mdcsrn_lightning.data.slices import slice_consistency as _slice_consistency
from mdcsrn_lightning.data.intensity import InputScaleRule, input_scale, trained_input_scale
from mdcsrn_lightning.data.volume_io import (
    LoadedVolume,
    VolumeHeader,
    available_memory,
    check_not_constant,
    collect_inputs,
    load_volume,
    read_header,
    volume_stem,
)
from mdcsrn_lightning import __version__
from mdcsrn_lightning.inference import bids as _bids
from mdcsrn_lightning.inference.adapt import AdaptingInferer, check_patch_fits, pair_shape, save_adapted
from mdcsrn_lightning.inference.plane_data import check_plane_fits, plane_layout
from mdcsrn_lightning.inference.planes import PlaneAdaptingInferer
from mdcsrn_lightning.inference.permuted import pair_factors
from mdcsrn_lightning.inference.base import InferenceError, Inferer, predict_volume_std
from mdcsrn_lightning.inference.messages import info
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.ensemble import symmetry_plane
from mdcsrn_lightning.data.volume_write import NiftiError, check_free_path, check_output_path, is_nifti_path, write_like, write_refined
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.inference.patches import resolve_device
from mdcsrn_lightning.inference.thick import ThickPlan, describe_scan, plan_thick, thick_axis
from mdcsrn_lightning.inference.sidecars import (
    check_distinct,
    file_record,
    request_record,
    sidecar_path,
    std_path,
    write_json_file,
    write_output_set,
)

__all__ = [
    "MEMORY_BUDGET",
    "FileSettings",
    "Prediction",
    "plan_outputs",
    "predict",
    "predict_file",
    "resolve_data_consistency",
    "resolve_memory_budget",
    "resolve_upsample",
]


# Bytes of checked input data :func:`predict` may hold between the checks and the writes
# (``None``: :func:`resolve_memory_budget`'s default, min(4 GiB, a quarter of the available memory)).
MEMORY_BUDGET: int | None = None


@dataclass
class Prediction:
    """What :func:`predict_file` did, for logs and the CLI's JSON line."""

    input: str
    output: str
    shape: tuple[int, ...]
    scale: float
    seconds: float
    degraded: bool = False
    upsampled: list[float] | None = None
    data_consistency: bool = False
    std: str | None = None
    sidecar: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass(frozen=True)
class FileSettings:
    """What every file of one request shares (see :func:`predict_file`).

    ``factors``: the k-space reduction of ``degrade`` and of the data-consistency band of a
    fine-grid input; ``interpolation``: how the network's fine-grid input is (or was) made
    from the coarse grid; ``upsample``: the input is on a coarse matrix with these factors,
    brought to the fine grid (``upsample_shape``, default ``M * f``) and written there;
    ``rule``: the checkpoint's input scale rule (``"none"``: raw intensities);
    ``uncertainty``: a standard-deviation map ``<out>_std.nii.gz`` is written beside each output
    (:func:`~.sidecars.std_path`); ``provenance``: ``<out>.json`` is written beside each output.
    ``auto``: ``upsample=auto`` was asked, by ``checkpoint`` (named when a scan does not fit
    it); ``thick_axis``: the network's thick axis when that checkpoint was trained on thick
    slices (each input is then a thick-slice scan, ``inference/thick.py``);
    ``unadapted_consistency``: the data consistency of a file whose adaptation kept the
    checkpoint (``auto`` under the plane network: the checkpoint's own record; ``None``: as
    ``data_consistency``).
    """

    degrade: bool = False
    factors: tuple[float, ...] = (2.0, 2.0, 1.0)
    interpolation: str = "linear"
    upsample: tuple[float, ...] | None = None
    upsample_shape: tuple[int, ...] | None = None
    data_consistency: bool = False
    overwrite: bool = False
    rule: InputScaleRule = "lr_p99.9"
    auto: bool = False
    checkpoint: str = ""
    thick_axis: int | None = None
    slice_profile: str = "boxcar"
    unadapted_consistency: bool | None = None
    uncertainty: bool = False
    provenance: bool = False


# ------------------------------------------------------------------------ inputs/outputs
def _output_name(path: Path) -> str:
    """The output file name of an input in a collection: its own name, ``.nii.gz`` for a
    DICOM series folder and for MGH/Analyze files (the output is always NIfTI)."""
    return path.name if is_nifti_path(path) else f"{volume_stem(path)}.nii.gz"


# volume and image file types a user may name as output but that are not written (NIfTI is):
# without this refusal output=sr.mgz would become a folder sr.mgz/ holding a NIfTI
_NOT_WRITTEN_SUFFIXES = frozenset({
    ".mgz", ".mgh", ".img", ".hdr", ".gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".ima", ".png", ".jpg",
    ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".npz", ".h5", ".hdf5", ".mat", ".vtk", ".zip",
})


def plan_outputs(inputs: Sequence[Path], output: str | os.PathLike[str], is_collection: bool) -> list[Path]:
    """Output path of each input.

    One file in: ``output`` is the file to write (or, if it is an existing folder or has
    no ``.nii``/``.nii.gz`` suffix, the folder to write ``<name>_sr.nii.gz`` into); a name
    with another volume or image extension (``sr.mgz``, ``sr.png``) is refused. A
    folder/glob in: ``output`` is a folder and each output keeps its input's file name
    (``<name>.nii.gz`` for a DICOM series folder or an ``.mgz``/``.img`` file).
    """
    out = Path(output).expanduser()
    if not is_collection and is_nifti_path(out) and not out.is_dir():
        return [out]
    if not out.is_dir() and out.suffix.lower() in _NOT_WRITTEN_SUFFIXES:
        raise InferenceError(
            f"{out}: outputs are written as NIfTI only, not {out.suffix}; give output=<name>.nii.gz "
            "(or a folder name without a file extension)"
        )
    if out.exists() and not out.is_dir():
        raise InferenceError(f"{out}: output for several inputs must be a folder, and this is a file")
    if not is_collection:
        return [out / f"{volume_stem(inputs[0])}_sr.nii.gz"]
    planned = [out / _output_name(p) for p in inputs]
    if len(set(planned)) != len(planned):
        raise InferenceError(f"{out}: two inputs share a file name; give a folder of distinctly named files")
    return planned


# ------------------------------------------------------------------------ request
# a model with no recorded factors: resolve_upsample then only parses the value
_NO_FACTORS = TrainedModel(path=Path("-"), net=None, net_config={})  # type: ignore[arg-type]

def _no_upsample(upsample: str | Sequence[float] | None) -> bool:
    """Whether ``upsample=`` asks for nothing (the input is on the fine grid)."""
    return upsample is None or (isinstance(upsample, str) and upsample.strip().lower() in ("", "none", "null", "false"))


def resolve_upsample(upsample: str | Sequence[float] | None, model: TrainedModel) -> tuple[float, float, float] | None:
    """The coarse-to-fine factors of ``upsample=`` (``None``: the input is on the fine grid).

    ``"auto"``: the factors the checkpoint was trained with. Explicit factors must equal
    them when the checkpoint records them (the network learnt one degradation).
    """
    if _no_upsample(upsample):
        return None
    trained = model.factors
    if isinstance(upsample, str):
        if upsample.strip().lower() != "auto":
            raise InferenceError(f"upsample: expected [fx,fy,fz], auto or null, got {upsample!r}")
        if trained is None:
            raise InferenceError(f"{model.path}: records no training factors; give upsample=[fx,fy,fz] instead of auto")
        return trained
    try:
        fs = tuple(float(f) for f in upsample)
    except (TypeError, ValueError):
        raise InferenceError(f"upsample: expected three factors >= 1, got {upsample!r}") from None
    if len(fs) != 3 or any(not np.isfinite(f) or f < 1 for f in fs):
        raise InferenceError(f"upsample: expected three factors >= 1, got {list(upsample)}")
    if trained is not None and fs != trained:
        raise InferenceError(
            f"{model.path}: trained with factors {list(trained)}, not upsample={list(fs)}; use upsample=auto "
            "or a checkpoint trained for these factors"
        )
    return fs  # type: ignore[return-value]


def resolve_data_consistency(value: bool | str, model: TrainedModel, planes: bool = False) -> bool:
    """``True``/``False`` as given; ``"auto"``: ``True`` under the plane network (``planes``:
    measured better with it; where its pairs are noise-matched, its output is a denoised estimate
    that the scan's measured data complete; ``docs/inference.md``), else what the checkpoint's release record
    recommends (measured on held-out real scans, ``release/MODEL_CARD.md``), else ``False``:
    whether the step helps depends on how the model was trained. Where self-validation keeps the
    checkpoint, ``auto`` is the checkpoint's (:attr:`FileSettings.unadapted_consistency`)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() != "auto":
        raise InferenceError(f"data_consistency must be true, false or auto, got {value!r}")
    return planes or model.recommends_data_consistency


def file_settings(
    model: TrainedModel,
    *,
    degrade: bool = False,
    factors: Sequence[float] | None = None,
    degrade_interpolation: str | None = None,
    upsample: str | Sequence[float] | None = None,
    upsample_shape: Sequence[int] | None = None,
    data_consistency: bool | Literal["auto"] = False,
    overwrite: bool = False,
    planes: bool = False,
) -> FileSettings:
    """The request's :class:`FileSettings`, the checkpoint's records filling what is not given
    (see :func:`predict`; ``planes``: ``adapt=true`` trains the plane network); the input scale
    rule is set after the inputs are checked."""
    thick = model.degradation == "slices"
    auto = isinstance(upsample, str) and upsample.strip().lower() == "auto"
    if thick:
        _check_thick_request(model, upsample, auto, degrade)
    ups = None if thick else resolve_upsample(upsample, model)
    if degrade and ups is not None:
        raise InferenceError("degrade=true and upsample exclude each other: degrade makes a fine-grid LR from an HR scan")
    if upsample_shape is not None and ups is None and not (thick and auto):
        raise InferenceError("upsample_shape: only with upsample=[...] or upsample=auto")
    interpolation = str(degrade_interpolation or model.interpolation) if degrade else model.interpolation
    return FileSettings(
        degrade=bool(degrade),
        factors=tuple(float(f) for f in (factors if factors is not None else model.factors or (2, 2, 1))),
        interpolation=interpolation,
        upsample=ups,
        upsample_shape=tuple(upsample_shape) if upsample_shape is not None else None,  # checked by fine_shape
        data_consistency=resolve_data_consistency(data_consistency, model, planes),
        overwrite=bool(overwrite),
        auto=auto,
        checkpoint=str(model.path),
        thick_axis=model.slice_axis if thick and auto else None,
        slice_profile=str((model.data.get("slices") or {}).get("profile", "boxcar")),
        unadapted_consistency=resolve_data_consistency(data_consistency, model) if planes else None,
    )


def _check_thick_request(model: TrainedModel, upsample: str | Sequence[float] | None, auto: bool,
                         degrade: bool) -> None:
    """What a checkpoint trained on thick slices refuses: explicit factors, ``degrade``."""
    where = f"{model.path}: trained on thick slices (degradation=slices)"
    if upsample is not None and not auto and resolve_upsample(upsample, _NO_FACTORS) is not None:
        raise InferenceError(f"{where}; use upsample=auto (the grid comes from the scan's voxel sizes), not "
                             f"upsample={upsample}")
    if degrade:
        raise InferenceError(f"{where}; degrade=true makes a k-space LR, not thick slices")


def resolve_memory_budget(budget: int | None = None) -> int:
    """Bytes of checked inputs :func:`predict` keeps in memory: ``budget``, else
    :data:`MEMORY_BUDGET`, else min(4 GiB, a quarter of ``MemAvailable``)."""
    if budget is None:
        budget = MEMORY_BUDGET
    if budget is None:
        return min(4 * 1024**3, available_memory() // 4)
    return max(0, int(budget))


def _thick_plan(src: Path, shape: Sequence[int], voxel_sizes: Sequence[float],
                settings: FileSettings) -> ThickPlan | None:
    """The thick-slice plan of one input (``None`` unless the checkpoint was trained on thick
    slices and ``upsample=auto``); a scan that does not fit the checkpoint is refused in one line."""
    if not settings.auto:
        return None
    if settings.thick_axis is None:
        if thick_axis(voxel_sizes) is not None:
            raise InferenceError(f"{settings.checkpoint}: trained on a k-space coarse matrix (factors "
                                 f"{list(settings.upsample or ())}), but {src} is a thick-slice scan "
                                 f"({describe_scan(voxel_sizes)}); use a checkpoint trained with degradation=slices")
        return None
    if thick_axis(voxel_sizes) is None:
        raise InferenceError(f"{settings.checkpoint}: trained on thick slices (degradation=slices), but {src} "
                             f"is not a thick-slice scan ({describe_scan(voxel_sizes)})")
    try:
        return plan_thick(shape, voxel_sizes, settings.thick_axis, settings.upsample_shape)
    except ValueError as exc:
        raise InferenceError(f"{src}: {exc}") from None


def _check_fine_shape(src: Path, shape: Sequence[int], settings: FileSettings,
                      voxel_sizes: Sequence[float] | None = None) -> None:
    if voxel_sizes is not None:
        _thick_plan(src, shape, voxel_sizes, settings)
    if settings.upsample is not None:
        try:
            fine_shape(tuple(shape), settings.upsample, settings.upsample_shape)
        except ValueError as exc:
            raise InferenceError(f"{src}: {exc}") from None


def pick_checkpoint(ckpt: str | os.PathLike[str] | None, headers: Sequence[VolumeHeader],
                    upsample: str | Sequence[float] | None) -> tuple[str | os.PathLike[str] | None,
                                                                   str | Sequence[float] | None]:
    """``(ckpt, upsample)`` to use. A given ``ckpt`` is kept. Without one, the released weights
    trained on what each route feeds: thick-slice scans (every input's voxel sizes: one axis >=
    1.5x the two in-plane ones, :func:`~.thick.thick_axis`) get the thick-slice weights with
    ``upsample=auto`` unless ``upsample`` names factors; a coarse matrix (``upsample`` set) the
    weights trained on zero-filled magnitude images; anything else the 2x2x1 weights (``None``).
    One info line names a pick other than the default; inputs mixing thick-slice and other scans
    (without factors) are one line."""
    if not no_checkpoint(ckpt):
        return ckpt, upsample
    wanted = not _no_upsample(upsample)
    explicit = wanted and not (isinstance(upsample, str) and upsample.strip().lower() == "auto")
    zooms = [tuple(h.image.header.get_zooms()[:3]) if h.image is not None else None for h in headers]
    thick = [z is not None and thick_axis(z) is not None for z in zooms]
    if explicit or not any(thick):
        if not wanted:
            return None, upsample
        info(f"no ckpt: upsample={upsample}: using the released coarse-matrix weights {_released(RELEASED_COARSE_WEIGHTS)}"
             " (trained on zero-filled magnitude images, what upsample= feeds)")
        return RELEASED_COARSE_WEIGHTS, upsample
    if not all(thick):
        i = thick.index(False)
        kind = describe_scan(zooms[i]) if zooms[i] is not None else "a DICOM series (voxel sizes not yet read)"
        raise InferenceError(f"{headers[i].path}: {kind}, beside thick-slice inputs ({headers[thick.index(True)].path});"
                             " without ckpt= each kind needs its own weights: run them separately or give ckpt=")
    info(f"no ckpt: {headers[0].path.name}: {describe_scan(zooms[0])}: using the released thick-slice weights "
         f"{_released(RELEASED_THICK_WEIGHTS)} with upsample=auto")
    return RELEASED_THICK_WEIGHTS, "auto"


def _released(path: Path) -> str:
    """``path``'s name; one line when the installation lacks it."""
    if not path.is_file():
        raise InferenceError(f"{path}: released weights missing from this installation; give ckpt=")
    return path.name


def _checked_header(header: VolumeHeader, dst: Path, settings: FileSettings,
                    protect: tuple[Path, ...]) -> VolumeHeader:
    """What can be checked without reading the voxel data (the header, read once by
    :func:`read_header`: readable, 3D, size, voxel sizes; the upsampled shape), and ``dst``."""
    check_output_path(dst, overwrite=settings.overwrite, protect=protect)
    if settings.uncertainty:
        check_output_path(std_path(dst), overwrite=settings.overwrite, protect=protect)
    if settings.provenance:
        check_free_path(sidecar_path(dst), overwrite=settings.overwrite, protect=protect)
    if header.image is not None:  # a DICOM series' shape is known once it is read
        _check_fine_shape(header.path, header.shape[:3], settings, tuple(header.image.header.get_zooms()[:3]))
    return header


def _checked_data(header: VolumeHeader, settings: FileSettings, normalize: bool) -> LoadedVolume:
    """``header``'s voxel data read and checked: finite, not constant, a scale to divide by."""
    volume = load_volume(header, error=NiftiError)
    check_not_constant(volume.data, str(header.path))
    if normalize:
        input_scale(volume.data, str(header.path))  # an all-zero or negative volume: fail now
    _check_fine_shape(header.path, volume.data.shape, settings, volume.voxel_sizes)
    return volume


def _checked_inputs(headers: Sequence[VolumeHeader], settings: FileSettings, normalize: bool,
                    budget: int) -> list[LoadedVolume | None]:
    """Every input's data read and checked, in order. The checked volumes are kept while
    their total stays within ``budget`` bytes; from the first that would exceed it on, each is
    checked and dropped (``None``: read again for its prediction)."""
    held: list[LoadedVolume | None] = []
    total, full = 0, False
    for header in headers:
        volume = _checked_data(header, settings, normalize)
        full = full or total + volume.data.nbytes > budget
        if not full:
            total += volume.data.nbytes
        held.append(None if full else volume)
        del volume  # a dropped volume is freed before the next is read
    return held


# ------------------------------------------------------------------------ files
def predict_file(volume: LoadedVolume, output: str | os.PathLike[str], inferer: Inferer,
                 settings: FileSettings | None = None, record: dict[str, Any] | None = None) -> Prediction:
    """Super-resolve one read volume into ``output`` (see the module docstring); nothing is
    written if anything fails. With ``settings.uncertainty`` the inferer's standard deviation
    (times the same intensity scale; data consistency changes the mean only) is written to
    :func:`~.sidecars.std_path`; with ``settings.provenance``, ``record`` (the request's
    :func:`~.sidecars.request_record`) plus this file's paths and seconds to ``<out>.json``."""
    settings = settings or FileSettings()
    src = volume.path
    check_output_path(output, overwrite=settings.overwrite, protect=(src,))
    start = time.perf_counter()
    plan = _thick_plan(src, volume.data.shape, volume.voxel_sizes, settings)
    data, measured, band = _network_input(volume, settings, plan)
    try:
        scale = input_scale(data, str(src)) if settings.rule != "none" else 1.0
    except ValueError as exc:
        message = str(exc)
        raise InferenceError(message if message.startswith(str(src)) else f"{src}: {message}") from None
    sr, std = predict_volume_std(inferer, plan.to_model(data) if plan is not None else data, scale=scale)
    adaptation = inferer.adaptation if isinstance(inferer, (AdaptingInferer, PlaneAdaptingInferer)) else None
    consistency = settings.data_consistency
    if adaptation is not None and adaptation.used == "unadapted" and settings.unadapted_consistency is not None:
        consistency = settings.unadapted_consistency  # the checkpoint ran: auto is its own record's
    if record is not None and adaptation is not None:
        record = {**record, "adapt": adaptation.record(), "data_consistency": consistency}
    write: Callable[..., Path] = write_refined if settings.upsample is not None else write_like
    if plan is not None:  # the thick axis where the network had it in training, and back
        sr, std = plan.from_model(sr), None if std is None else plan.from_model(std)
        write = functools.partial(write_refined, offset=plan.offset())
        if consistency:  # the scan's slices, contiguous, of the checkpoint's profile
            sr = _slice_consistency(sr, measured, plan.factor, plan.axis, settings.slice_profile)  # type: ignore[arg-type]
    elif consistency:
        sr = _data_consistency(sr, measured, band, settings.interpolation)  # type: ignore[arg-type]
    if settings.uncertainty and std is None:
        raise InferenceError(f"{inferer.name}: uncertainty=true needs an inferer that reports a spread")
    seconds = time.perf_counter() - start
    if record is not None:
        record = file_record(record, src, Path(output), settings.uncertainty, seconds) if settings.provenance else None
    written = write_output_set(write, Path(output), sr, std if settings.uncertainty else None, volume, record,
                               overwrite=settings.overwrite)
    return Prediction(
        input=str(src),
        output=str(written[0]),
        shape=tuple(sr.shape),
        scale=scale,
        seconds=time.perf_counter() - start,
        degraded=settings.degrade,
        upsampled=list(band) if settings.upsample is not None or plan is not None else None,
        data_consistency=consistency,
        std=str(std_path(output)) if settings.uncertainty else None,
        sidecar=str(sidecar_path(output)) if record is not None else None,
        extra={"adapt": adaptation.record()} if adaptation is not None else {},
    )


def _network_input(volume: LoadedVolume, settings: FileSettings,
                   plan: ThickPlan | None = None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """``(network input on the fine grid, measured data for data consistency, band factors)``;
    a thick-slice scan (``plan``) is subdivided along its thick axis, in the scan's axis order."""
    data = measured = volume.data
    band = [float(f) for f in settings.factors]
    try:
        if plan is not None:
            data, band = plan.fine_input(volume.data, settings.interpolation), plan.factors  # type: ignore[arg-type]
        elif settings.degrade and settings.interpolation == "zero_filled_magnitude":
            # the coarse magnitude image a scanner stores: the measured band itself (as upsample= has
            # it), not read back off its zero-filled magnitude, whose final magnitude alters the band
            measured = kspace_truncate(volume.data, band)
            data = to_fine_grid(measured, band, "zero_filled_magnitude", volume.data.shape)
        elif settings.degrade:
            data = measured = _degrade(volume.data, factors=band, interpolation=settings.interpolation)  # type: ignore[arg-type]
        elif settings.upsample is not None:
            band = [float(f) for f in settings.upsample]
            target = fine_shape(volume.data.shape, band, settings.upsample_shape)
            data = to_fine_grid(volume.data, band, settings.interpolation, target)  # type: ignore[arg-type]
        elif settings.data_consistency and lr_shape(volume.data.shape, band) == volume.data.shape:
            raise ValueError(f"factors {band} leave every axis of shape {volume.data.shape} whole: no band to keep")
    except ValueError as exc:
        message = str(exc)
        raise InferenceError(message if message.startswith(str(volume.path)) else f"{volume.path}: {message}") from None
    return data, measured, band


def predict(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    ckpt: str | os.PathLike[str] | None = None,
    *,
    options: InferenceOptions | None = None,
    degrade: bool = False,
    factors: Sequence[float] | None = None,
    degrade_interpolation: str | None = None,
    upsample: str | Sequence[float] | None = None,
    upsample_shape: Sequence[int] | None = None,
    data_consistency: bool | Literal["auto"] = False,
    overwrite: bool = False,
    memory_budget: int | None = None,
    bids: bool = False,
    provenance: bool = True,
) -> Iterator[Prediction]:
    """Super-resolve a volume file or DICOM series folder, a folder of them or a glob into ``output``
    (inputs: :func:`collect_inputs`).

    ``factors=None``: the checkpoint's training factors, else ``(2, 2, 1)``.
    ``degrade_interpolation=None``: the checkpoint's interpolation (if recorded, else
    ``linear``), which ``upsample`` always uses. ``upsample``: :func:`resolve_upsample`;
    ``data_consistency``: :func:`resolve_data_consistency`. ``options.uncertainty``: a
    standard-deviation map beside each output (:func:`~.sidecars.std_path`). ``provenance``:
    ``<out>.json`` beside each output (:func:`~.sidecars.request_record`). ``bids=True``:
    ``output`` is a BIDS derivative folder (:mod:`.bids`; non-BIDS input names are refused).

    Checks first, writes after: the checkpoint is read, the options are checked against
    it, then every input's header (readable, 3D, size, voxel sizes) and every output path
    are checked, then every input's data is read and checked (finite, not constant, a
    scale to divide by), all before the first file is written, so a bad input anywhere
    means nothing is written.

    Memory stays bounded: checked volumes are kept for their prediction while their total
    stays within ``memory_budget`` bytes (``None``: :func:`resolve_memory_budget`, min(4 GiB, a
    quarter of the available memory)), so those files are read once. From the first input
    that would exceed it on, each input is read to check it, dropped, and read again for
    its prediction (read twice, checked both times).

    Everything is checked when ``predict`` is called; the returned iterator writes one file
    per step (and yields its :class:`Prediction`). A failure while writing (disk full)
    leaves the outputs already written, complete, and no partial file.
    """
    options = options or InferenceOptions()
    resolve_device(options.device)  # device=cuda without CUDA: fail now
    inputs, is_collection = collect_inputs(input)
    raw_headers = [read_header(src, error=NiftiError) for src in inputs]
    ckpt, upsample = pick_checkpoint(ckpt, raw_headers, upsample)
    model = load_trained_model(ckpt)
    settings = file_settings(model, degrade=degrade, factors=factors, degrade_interpolation=degrade_interpolation,
                             upsample=upsample, upsample_shape=upsample_shape, data_consistency=data_consistency,
                             overwrite=overwrite,
                             planes=options.adapt is not None and options.adapt.resolved().network == "planes")
    settings = replace(settings, uncertainty=options.uncertainty, provenance=bool(provenance))
    plane = _ensemble_plane(settings)
    outputs = _bids.plan_bids_outputs(inputs, output) if bids else plan_outputs(inputs, output, is_collection)
    check_distinct(outputs, std=settings.uncertainty, sidecar=settings.provenance)
    description = _bids.description_path(output) if bids else None
    if description is not None and not description.exists():
        check_free_path(description, overwrite=False, protect=tuple(inputs))
    normalize = model.data.get("normalize") != "none"
    options = _with_adapt(options, model, settings, inputs, outputs, raw_headers)
    headers = [_checked_header(h, dst, settings, tuple(inputs)) for h, dst in zip(raw_headers, outputs)]
    _check_adapt_shapes(headers, settings, options)
    held = _checked_inputs(headers, settings, normalize, resolve_memory_budget(memory_budget))
    for folder in {dst.parent for dst in outputs}:
        remove_stale_temps(folder)  # left by a killed run
    try:  # after the input checks, so that a bad request gives one line and no warning
        settings = replace(settings, rule=trained_input_scale(model.data, str(model.path)))
    except ValueError as exc:
        raise InferenceError(str(exc)) from None
    inferer = build_inferer(model.net, options, plane=plane)  # after the checks: a bad input fails before any export
    record = request_record(model, asdict(settings), asdict(options), inferer.name) if settings.provenance else None
    save = Path(options.adapt.save) if options.adapt is not None and options.adapt.save is not None else None
    return _predictions(model, headers, held, outputs, inferer, settings, normalize, record, description, save)


def _ensemble_plane(settings: FileSettings) -> tuple[int, int]:
    """The plane ``uncertainty=true`` averages over, in the network's axis order: the one whose
    symmetries keep the degradation's factors (one line when none does)."""
    if not settings.uncertainty:
        return (0, 1)
    try:
        return symmetry_plane(settings.factors)
    except ValueError as exc:
        raise InferenceError(f"uncertainty=true: {exc}") from None


def _one_slice_factor(headers: Sequence[VolumeHeader], settings: FileSettings) -> int:
    """The fine voxels per slice shared by every thick-slice input (their pairs' slices); one
    line when inputs differ (adapt them in separate runs) or none is a NIfTI thick-slice scan."""
    factors: dict[int, Path] = {}
    for header in headers:
        if header.image is None:
            continue
        plan = _thick_plan(header.path, header.shape, header.image.header.get_zooms()[:3], settings)
        if plan is not None:
            factors.setdefault(plan.factor, header.path)
    if len(factors) > 1:
        (f1, p1), (f2, p2) = list(factors.items())[:2]
        raise InferenceError(f"adapt=true: {p1} has {f1} fine voxels per slice, {p2} {f2}; adapt scans of different "
                             "slice thickness in separate runs")
    if not factors:
        raise InferenceError("adapt=true with a thick-slice checkpoint needs upsample=auto and a thick-slice NIfTI scan")
    return next(iter(factors))


def _with_adapt(options: InferenceOptions, model: TrainedModel, settings: FileSettings,
                inputs: Sequence[Path], outputs: Sequence[Path], headers: Sequence[VolumeHeader]) -> InferenceOptions:
    """``options.adapt`` completed with the checkpoint's factors and interpolation (the scan's
    own pairs are made as training made its input); what it cannot do is one line, now."""
    adapt = options.adapt
    if adapt is None:
        return options
    if model.degradation == "slices":
        adapt = replace(adapt, interpolation=model.interpolation, slice_factor=_one_slice_factor(headers, settings),
                        slice_profile=settings.slice_profile, slice_axis=model.slice_axis)
    else:
        adapt = replace(adapt, factors=tuple(model.factors or settings.factors), interpolation=model.interpolation)
        pair_factors(adapt.factors)
    adapt = adapt.resolved()
    if adapt.network == "planes":
        try:
            plane_layout(adapt)  # degraded axes of different factors: one line, with the checkpoint
        except ValueError as exc:
            raise InferenceError(f"{model.path}: adapt=true: {exc}") from None
    if adapt.save is not None and adapt.network == "planes":
        raise InferenceError(f"adapt.save={adapt.save}: the plane network (adapt.network=planes) is this scan's only "
                             "and is not a checkpoint; give adapt.network=checkpoint to save an adapted checkpoint")
    if adapt.save is not None:
        if len(inputs) != 1:
            raise InferenceError(f"adapt.save={adapt.save}: one input only (each scan gets its own adapted model)")
        check_free_path(Path(adapt.save), overwrite=settings.overwrite, protect=tuple(inputs))
        if Path(adapt.save).resolve() in {Path(o).resolve() for o in outputs}:
            raise InferenceError(f"adapt.save={adapt.save}: is the output; give another file name")
    return replace(options, adapt=adapt)


def _check_adapt_shapes(headers: Sequence[VolumeHeader], settings: FileSettings, options: InferenceOptions) -> None:
    """Each network input (the fine grid) holds adapt's patch and held-out slab (DICOM: checked when run)."""
    if options.adapt is None:
        return
    for header in headers:
        if header.image is None:
            continue
        shape = tuple(header.shape[:3])
        if settings.upsample is not None:
            shape = fine_shape(shape, settings.upsample, settings.upsample_shape)
        plan = _thick_plan(header.path, shape, header.image.header.get_zooms()[:3], settings)
        if plan is not None:  # the network's axis order: the thick axis in its slot
            shape = plan.model_shape
        try:
            if options.adapt.network == "planes":
                check_plane_fits(shape, options.adapt)
            else:
                check_patch_fits(pair_shape(shape, options.adapt), options.adapt)
        except InferenceError as exc:
            raise InferenceError(f"{header.path}: {exc}") from None


def _predictions(model: TrainedModel, headers: list[VolumeHeader], held: list[LoadedVolume | None],
                 outputs: list[Path], inferer: Inferer, settings: FileSettings, normalize: bool,
                 record: dict[str, Any] | None, description: Path | None,
                 save: Path | None = None) -> Iterator[Prediction]:
    if description is not None and not description.exists():  # the BIDS derivative's description, first
        try:
            write_json_file(description, _bids.dataset_description(__version__), overwrite=False)
        except NiftiError:  # another run wrote it meanwhile: theirs is as good
            pass
    for i, (header, dst) in enumerate(zip(headers, outputs)):
        volume = held[i] if held[i] is not None else _checked_data(header, settings, normalize)
        held[i] = None  # freed once written
        result = predict_file(volume, dst, inferer, settings, record)
        del volume
        result.extra["checkpoint"] = str(model.path)
        if save is not None:
            result.extra["adapted_checkpoint"] = str(_save_adapted(save, inferer, model, header.path, settings))
        yield result


def _save_adapted(path: Path, inferer: Inferer, model: TrainedModel, src: Path, settings: FileSettings) -> Path:
    """``adapt.save``: the model the scan was inferred with (adapted, or the unadapted one that
    self-validation kept), in the training checkpoints' format, with what it was adapted to."""
    assert isinstance(inferer, AdaptingInferer) and inferer.adaptation is not None
    adaptation, state = inferer.adaptation, inferer.adapted_state
    state = state if state is not None else model.net.state_dict()
    record = {"scan": str(Path(src).resolve()), "from": str(Path(model.path).resolve()),
              "degrade": settings.degrade, **adaptation.record()}
    check_free_path(path, overwrite=settings.overwrite, protect=(src,))
    return save_adapted(path, state, model.net_config, model.data, record)
