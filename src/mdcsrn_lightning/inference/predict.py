"""File-level inference: a scan in (NIfTI, ``.mgz``, Analyze, DICOM series folder), NIfTI out,
with a generator read from a checkpoint.

One scan's path: volume file or series folder -> checked ``(X, Y, Z)`` float32 (:mod:`.nifti_io`) ->
on the fine grid (as it is; or brought there from a coarse matrix, ``upsample=``; or, for
experiments, an HR degraded first, ``degrade=True``) -> divided by its own 99.9th
percentile -> patch-wise generator (:func:`.patches.super_resolve`) -> multiplied back by
the same number -> optionally k-space data consistency -> float32 NIfTI.

**Intensity normalisation.** One rule for training, evaluation and inference
(:func:`~mdcsrn_lightning.data.intensity.input_scale`): the network's input is divided
by its own 99.9th percentile and the output multiplied back, so the SR lands on the
input's intensity scale. The checkpoint records the rule (``input_scale``); a model
trained with ``normalize=none`` gets raw intensities, and an older checkpoint (trained
with the HR's percentile) is run under this rule with a one-line warning.

**Grid.** Two kinds of input (SPEC: real inputs come on two kinds of grid):

- the fine matrix (``upsample=None``): the LR is already on the grid the output should
  have (a scanner's zero-filled reconstruction, or an interpolated one). Output geometry
  is the input's, header copied.
- a coarse matrix (``upsample=[fx, fy, fz]`` or ``"auto"``: the factors the checkpoint
  was trained with; others are refused): the scan is brought onto the fine grid exactly
  the way training made the network's input
  (:func:`~mdcsrn_lightning.data.degradation.to_fine_grid` with the checkpoint's
  ``interpolation``), of size ``M * f`` per axis or ``upsample_shape``. The output's
  qform and sform are the input's times ``diag(M / N)`` (voxel sizes divided by the
  factors, fine voxel ``i * f`` on coarse voxel ``i``, the degradation's sampling
  convention), codes kept: it overlays the input in a viewer.

**Data consistency** (``data_consistency=True``): the output's central, measured band of
k-space is replaced by the input's
(:func:`~mdcsrn_lightning.data.degradation.data_consistency`): by the coarse input's own
spectrum for ``upsample``, else by the fine-grid input's (made with the checkpoint's
interpolation, or ``degrade_interpolation`` with ``degrade=True``).

Every problem is an :class:`InferenceError` (or :class:`~.nifti_io.NiftiError`) with one
line ``"<file>: <problem>"``. Everything that can be checked is checked before the first
file is written: the checkpoint, every input, every output path.
"""

from __future__ import annotations

import glob as _glob
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from mdcsrn_lightning.atomic import remove_stale_temps
from mdcsrn_lightning.checkpoints import CheckpointError, load_generator, read_checkpoint
from mdcsrn_lightning.data.degradation import data_consistency as _data_consistency
from mdcsrn_lightning.data.degradation import degrade as _degrade
from mdcsrn_lightning.data.degradation import fine_shape, lr_shape, to_fine_grid
from mdcsrn_lightning.data.intensity import InputScaleRule, input_scale, trained_input_scale
from mdcsrn_lightning.data.volume_io import check_not_constant, dicom_series_ids, is_dicom_series, is_volume_path
from mdcsrn_lightning.release import RELEASED_WEIGHTS
from mdcsrn_lightning.inference.nifti_io import (
    check_output_path,
    is_nifti_path,
    nifti_stem,
    read_volume,
    write_like,
    write_refined,
)
from mdcsrn_lightning.inference.patches import super_resolve

__all__ = [
    "DEFAULT_CHECKPOINT",
    "InferenceError",
    "PatchOptions",
    "collect_inputs",
    "plan_outputs",
    "predict",
    "predict_file",
    "predict_volume",
    "resolve_checkpoint",
    "resolve_upsample",
    "trained_data_settings",
]

# With no ckpt given: the weights released with the package (release/MODEL_CARD.md).
DEFAULT_CHECKPOINT: str | None = str(RELEASED_WEIGHTS)
_GLOB_CHARS = set("*?[")
# What inference needs to know about how the checkpoint's training data was made.
_DATA_KEYS = ("factors", "interpolation", "normalize", "input_scale")


class InferenceError(ValueError):
    """A bad inference request; the message is one line, ``"<file>: <problem>"``."""


@dataclass
class PatchOptions:
    """How the generator is run over a volume.

    The first fields are :func:`.patches.super_resolve`'s (``patch_size`` and ``margin``
    also take ``"auto"``). ``engine``: ``torch`` (default), ``compile``, ``onnxruntime``,
    ``openvino`` or ``auto`` (:mod:`.engines`). ``stream=True`` replaces the patches by the
    exact whole-volume pass, ``slab`` slices at a time (``None``: the path's default): with
    ``engine=torch`` the eager streamed pass (:mod:`.streaming`), with ``openvino`` the
    block-streamed one (:mod:`.block_stream`, ~2.5x faster), with ``auto`` OpenVINO where
    installed (on the CPU), else the eager pass.
    """

    patch_size: int | Sequence[int] | str = 70
    margin: int | Sequence[int] | str = 3
    overlap_mode: str = "crop"
    batch_size: int = 1
    bn_mode: str = "eval"
    device: str = "auto"
    precision: str = "32"
    progress: bool = False
    engine: str = "torch"
    stream: bool = False
    slab: int | None = None

    def kwargs(self) -> dict[str, Any]:
        """The :func:`.patches.super_resolve` keyword arguments."""
        out = asdict(self)
        for key in ("engine", "stream", "slab"):
            out.pop(key)
        return out


def prepare_runner(net: nn.Module, options: PatchOptions | None = None) -> Any:
    """What runs the patches: ``net`` itself (engine ``torch``, or streaming) or an engine built
    from it once (exported on the fly for ONNX Runtime / OpenVINO)."""
    options = options or PatchOptions()
    if options.stream and isinstance(net, nn.Module):
        return _exact_runner(net, options)
    if options.stream or str(options.engine) == "torch" or not isinstance(net, nn.Module):
        return net
    from mdcsrn_lightning.inference.engines import build_engine
    from mdcsrn_lightning.inference.patches import resolve_device

    device = resolve_device(options.device)
    name = str(options.engine)
    if name != "auto" and options.bn_mode != "eval":
        raise InferenceError(f"engine={name}: bn_mode=train needs engine=torch")
    if name == "auto" and options.bn_mode != "eval":
        return net
    return build_engine(net, name, device)


def _exact_runner(net: nn.Module, options: PatchOptions) -> Any:
    """``stream=true``: the exact whole-volume runner for ``options.engine`` (built once,
    compiled once per volume shape)."""
    from mdcsrn_lightning.inference.block_stream import exact_engine_runner
    from mdcsrn_lightning.inference.patches import resolve_device

    if options.bn_mode != "eval":
        raise InferenceError("stream=true needs bn_mode=eval (batch statistics cannot be streamed)")
    device = resolve_device(options.device)
    engine = str(options.engine)
    if engine == "openvino" and device.type != "cpu":
        raise InferenceError(f"stream=true engine=openvino runs on the CPU, not device={device}")
    try:
        return exact_engine_runner(net.to(device), "torch" if device.type != "cpu" else engine, options.slab, log=_info)
    except (TypeError, ValueError) as exc:
        raise InferenceError(f"stream=true: {exc}") from None


def _info(message: str) -> None:
    print(f"mdcsrn: {message}", file=sys.stderr, flush=True)


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
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


# ------------------------------------------------------------------------ checkpoint
def resolve_checkpoint(ckpt: str | os.PathLike[str] | None) -> Path:
    """The checkpoint to use: ``ckpt`` if given, else the released weights."""
    if ckpt is None or str(ckpt).strip() in ("", "None", "null"):
        if DEFAULT_CHECKPOINT is None:
            raise InferenceError("ckpt: no checkpoint given; pass ckpt=path/to/model.ckpt")
        return Path(DEFAULT_CHECKPOINT)
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise InferenceError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise InferenceError(f"{path}: is a folder, not a checkpoint file")
    return path


def load_model(ckpt: str | os.PathLike[str] | None) -> tuple[nn.Module, dict[str, Any], Path]:
    """``(generator, its config, checkpoint path)``; any problem is one :class:`InferenceError` line."""
    path = resolve_checkpoint(ckpt)
    try:
        net, config = load_generator(path)
    except CheckpointError as exc:
        raise InferenceError(str(exc)) from exc
    except Exception as exc:  # e.g. a net_config whose _target_ cannot be built
        raise InferenceError(f"{path}: cannot rebuild the generator ({type(exc).__name__}: {exc})") from exc
    return net.eval(), config, path


def resolve_data_consistency(value: bool | str, ckpt: str | os.PathLike[str]) -> bool:
    """``True``/``False`` as given; ``"auto"``: what the checkpoint recommends, else ``False``.

    A released checkpoint records the choice measured for it on held-out real scans
    (``checkpoint["release"]["data_consistency"]``, see ``release/MODEL_CARD.md``); any other
    checkpoint runs without the step unless asked, since whether it helps depends on how the
    model was trained.
    """
    if isinstance(value, bool):
        return value
    if str(value).lower() != "auto":
        raise InferenceError(f"data_consistency must be true, false or auto, got {value!r}")
    try:
        release = read_checkpoint(ckpt).get("release") or {}
    except CheckpointError as exc:
        raise InferenceError(str(exc)) from exc
    return bool(release.get("data_consistency", False)) if isinstance(release, dict) else False


def trained_data_settings(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The data settings a checkpoint was trained with (``factors``, ``interpolation``...), if known.

    Looked up in the checkpoint's ``datamodule_hyper_parameters`` (Lightning stores the
    data module's hyperparameters there), then in ``<run>/.hydra/config.yaml`` beside
    ``<run>/checkpoints/<file>.ckpt``; ``{}`` when neither has them.
    """
    try:
        checkpoint = read_checkpoint(ckpt)
    except CheckpointError:
        return {}
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    out = {k: hp[k] for k in _DATA_KEYS if k in hp}
    if out:
        return _checked_settings(out, f"{ckpt}: datamodule_hyper_parameters")
    config = Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        run_config = OmegaConf.load(config)
        data = run_config.get("data") if hasattr(run_config, "get") else None
    except Exception:  # an unreadable run config is no reason to fail inference
        return {}
    if not OmegaConf.is_dict(data):
        return {}
    found: dict[str, Any] = {}
    for key in _DATA_KEYS:
        if key not in data:
            continue
        try:  # an interpolation is resolved against the run config; one that fails is named
            value = OmegaConf.select(run_config, f"data.{key}", throw_on_resolution_failure=True)
        except Exception as exc:
            raw = OmegaConf.to_container(data, resolve=False).get(key)  # type: ignore[union-attr]
            raise InferenceError(f"{config}: data.{key}: {raw!r} cannot be resolved "
                                 f"({' '.join(str(exc).split()).split(' full_key:')[0][:160]})") from None
        found[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return _checked_settings(found, f"{config}: data")


def _checked_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse recorded data settings of the wrong type (``factors: "${...}"``), naming ``where`` and the key."""
    factors = settings.get("factors")
    if factors is not None and not (
        isinstance(factors, (list, tuple)) and len(factors) == 3
        and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)
    ):
        raise InferenceError(f"{where}.factors: {factors!r} is not three positive numbers")
    for key, value in settings.items():
        if key == "interpolation" and not isinstance(value, str) or isinstance(value, str) and "${" in value:
            raise InferenceError(f"{where}.{key}: {value!r} is not a valid setting")
    return settings


# ------------------------------------------------------------------------ inputs/outputs
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
        files = _volume_files(path.iterdir())
        if files:
            return files, True
        series = dicom_series_ids(path)
        if len(series) == 1:
            return [path], False
        if len(series) > 1:
            raise InferenceError(f"{path}: holds {len(series)} DICOM series; give the folder of one series")
        folders = sorted(p for p in path.iterdir() if p.is_dir() and is_dicom_series(p))
        if folders:
            return folders, True
        raise InferenceError(
            f"{path}: folder holds no .nii, .nii.gz, .mgz or .img volume files and no DICOM series"
        )
    if path.exists():
        return [path], False
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in _glob.glob(os.path.expanduser(text), recursive=True))
        found = _volume_files(matches) + [p for p in matches if p.is_dir() and is_dicom_series(p)]
        if not found:
            raise InferenceError(f"{text}: no volume files or DICOM series folders match this pattern")
        return sorted(found), True
    raise InferenceError(f"{path}: no such file or folder")


def _volume_files(paths: Any) -> list[Path]:
    files = sorted(Path(p) for p in paths if Path(p).is_file() and is_volume_path(p))
    # an Analyze pair is one volume: keep the .img, drop its .hdr
    images = {p.with_suffix(".img") for p in files if p.suffix.lower() == ".img"}
    return [p for p in files if not (p.suffix.lower() == ".hdr" and p.with_suffix(".img") in images)]


def _output_name(path: Path) -> str:
    """The output file name of an input in a collection: its own name, ``.nii.gz`` for a
    DICOM series folder and for MGH/Analyze files (the output is always NIfTI)."""
    return path.name if is_nifti_path(path) else f"{nifti_stem(path)}.nii.gz"


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
        return [out / f"{nifti_stem(inputs[0])}_sr.nii.gz"]
    planned = [out / _output_name(p) for p in inputs]
    if len(set(planned)) != len(planned):
        raise InferenceError(f"{out}: two inputs share a file name; give a folder of distinctly named files")
    return planned


# ------------------------------------------------------------------------ volumes
def resolve_upsample(
    upsample: str | Sequence[float] | None, settings: dict[str, Any], ckpt: str | os.PathLike[str]
) -> tuple[float, float, float] | None:
    """The coarse-to-fine factors of ``upsample=`` (``None``: the input is on the fine grid).

    ``"auto"``: the factors the checkpoint was trained with. Explicit factors must equal
    them when the checkpoint records them (the network learnt one degradation).
    """
    if upsample is None or (isinstance(upsample, str) and upsample.strip().lower() in ("", "none", "null", "false")):
        return None
    trained = settings.get("factors")
    trained_fs = tuple(float(f) for f in trained) if trained is not None else None
    if isinstance(upsample, str):
        if upsample.strip().lower() != "auto":
            raise InferenceError(f"upsample: expected [fx,fy,fz], auto or null, got {upsample!r}")
        if trained_fs is None:
            raise InferenceError(f"{ckpt}: records no training factors; give upsample=[fx,fy,fz] instead of auto")
        return trained_fs  # type: ignore[return-value]
    try:
        fs = tuple(float(f) for f in upsample)
    except (TypeError, ValueError):
        raise InferenceError(f"upsample: expected three factors >= 1, got {upsample!r}") from None
    if len(fs) != 3 or any(not np.isfinite(f) or f < 1 for f in fs):
        raise InferenceError(f"upsample: expected three factors >= 1, got {list(upsample)}")
    if trained_fs is not None and fs != trained_fs:
        raise InferenceError(
            f"{ckpt}: trained with factors {list(trained_fs)}, not upsample={list(fs)}; use upsample=auto "
            "or a checkpoint trained for these factors"
        )
    return fs  # type: ignore[return-value]


def predict_volume(
    net: nn.Module,
    lr: np.ndarray,
    options: PatchOptions | None = None,
    *,
    scale: float | None = None,
) -> np.ndarray:
    """``(X, Y, Z)`` LR on its own intensity scale -> SR on the same scale, float32.

    ``scale`` divides the input and multiplies the output; default: the LR's own
    :func:`~mdcsrn_lightning.data.intensity.input_scale`, the rule training used.
    """
    options = options or PatchOptions()
    if scale is None:
        scale = input_scale(lr)
    volume = np.asarray(lr, dtype=np.float32) / np.float32(scale)
    if options.stream:
        from mdcsrn_lightning.inference.block_stream import BlockStreamingMDCSRN, exact_super_resolve
        from mdcsrn_lightning.inference.streaming import StreamingMDCSRN

        runner = net if isinstance(net, (BlockStreamingMDCSRN, StreamingMDCSRN)) else None
        if runner is None:
            if not isinstance(net, nn.Module):
                raise InferenceError("stream=true needs the network itself, not an exported engine")
            runner = _exact_runner(net, options)
        sr = exact_super_resolve(runner, volume, progress=options.progress)
    else:
        sr = super_resolve(prepare_runner(net, options), volume, **options.kwargs())
    return (sr * np.float32(scale)).astype(np.float32, copy=False)


def predict_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    ckpt: str | os.PathLike[str] | None = None,
    *,
    net: nn.Module | None = None,
    options: PatchOptions | None = None,
    degrade: bool = False,
    factors: Sequence[float] = (2, 2, 1),
    interpolation: str = "linear",
    upsample: Sequence[float] | None = None,
    upsample_shape: Sequence[int] | None = None,
    data_consistency: bool = False,
    overwrite: bool = False,
    rule: InputScaleRule = "lr_p99.9",
) -> Prediction:
    """Super-resolve one NIfTI file into ``output`` (see the module docstring).

    Give either ``ckpt`` (read with :func:`~mdcsrn_lightning.checkpoints.load_generator`)
    or an already built ``net``.

    Args:
        degrade: the input is an HR scan, degraded first (``factors``, ``interpolation``)
            as the training data was: for experiments.
        factors: the k-space reduction of ``degrade`` and of the data-consistency band
            of a fine-grid input.
        interpolation: how the network's fine-grid input is (or was) made from the
            coarse grid: the checkpoint's training interpolation.
        upsample: the input is on a coarse matrix with these factors: brought to the
            fine grid (size ``upsample_shape``, default ``M * f``) and written there.
        data_consistency: put the input's measured k-space band back into the output.
        rule: the checkpoint's input scale rule (``"none"``: raw intensities).

    Nothing is written if anything fails.
    """
    if net is None:
        net, _, _ = load_model(ckpt)
        net = prepare_runner(net, options)
    if degrade and upsample is not None:
        raise InferenceError("degrade=true and upsample exclude each other: degrade makes a fine-grid LR from an HR scan")
    src = Path(input)
    volume = read_volume(src)
    check_output_path(output, overwrite=overwrite, protect=(src,))
    start = time.perf_counter()
    data = measured = volume.data
    band_factors = [float(f) for f in factors]
    try:
        if degrade:
            data = measured = _degrade(volume.data, factors=factors, interpolation=interpolation)  # type: ignore[arg-type]
        elif upsample is not None:
            band_factors = [float(f) for f in upsample]
            target = fine_shape(volume.data.shape, band_factors, upsample_shape)
            data = to_fine_grid(volume.data, band_factors, interpolation, target)  # type: ignore[arg-type]
        elif data_consistency and lr_shape(volume.data.shape, band_factors) == volume.data.shape:
            raise ValueError(f"factors {band_factors} leave every axis of shape {volume.data.shape} whole: no band to keep")
        scale = input_scale(data, str(src)) if rule != "none" else 1.0
    except ValueError as exc:
        message = str(exc)
        raise InferenceError(message if message.startswith(str(src)) else f"{src}: {message}") from None
    sr = predict_volume(net, data, options, scale=scale)
    if data_consistency:
        sr = _data_consistency(sr, measured, band_factors, interpolation)  # type: ignore[arg-type]
    if upsample is not None:
        written = write_refined(output, sr, volume, overwrite=overwrite)
    else:
        written = write_like(output, sr, volume, overwrite=overwrite)
    return Prediction(
        input=str(src),
        output=str(written),
        shape=tuple(sr.shape),
        scale=scale,
        seconds=time.perf_counter() - start,
        degraded=bool(degrade),
        upsampled=list(band_factors) if upsample is not None else None,
        data_consistency=bool(data_consistency),
    )


def predict(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    ckpt: str | os.PathLike[str] | None = None,
    *,
    options: PatchOptions | None = None,
    degrade: bool = False,
    factors: Sequence[float] | None = None,
    degrade_interpolation: str | None = None,
    upsample: str | Sequence[float] | None = None,
    upsample_shape: Sequence[int] | None = None,
    data_consistency: bool | Literal["auto"] = False,
    overwrite: bool = False,
    on_done: Any = None,
) -> list[Prediction]:
    """Super-resolve a volume file or DICOM series folder, a folder of them or a glob into ``output``
    (inputs: :func:`collect_inputs`).

    Checks first, writes after: the checkpoint is loaded, the options are checked against
    it, every input is read and checked and every output path is checked before the
    first file is written, so a bad input anywhere means nothing is written.
    ``factors=None``: the checkpoint's training factors, else ``(2, 2, 1)``.
    ``degrade_interpolation=None``: the interpolation the checkpoint was trained with (if
    recorded), else ``"linear"``; it is also how ``upsample`` reaches the fine grid (always
    the checkpoint's). ``upsample``: see :func:`resolve_upsample`. ``data_consistency``:
    see :func:`resolve_data_consistency`. ``on_done(prediction)`` is called after each file. A failure while
    writing (disk full) leaves the outputs already written, complete, and no partial file.
    """
    from mdcsrn_lightning.inference.patches import resolve_device

    resolve_device((options or PatchOptions()).device)  # device=cuda without CUDA: fail now
    net, _, ckpt_path = load_model(ckpt)
    settings = trained_data_settings(ckpt_path)
    ups = resolve_upsample(upsample, settings, ckpt_path)
    if degrade and ups is not None:
        raise InferenceError("degrade=true and upsample exclude each other: degrade makes a fine-grid LR from an HR scan")
    if upsample_shape is not None and ups is None:
        raise InferenceError("upsample_shape: only with upsample=[...] or upsample=auto")
    trained_interp = str(settings.get("interpolation") or "linear")
    interpolation = str(degrade_interpolation or trained_interp) if degrade else trained_interp
    if factors is None:
        factors = [float(f) for f in settings.get("factors") or (2, 2, 1)]
    data_consistency = resolve_data_consistency(data_consistency, ckpt_path)
    inputs, is_collection = collect_inputs(input)
    outputs = plan_outputs(inputs, output, is_collection)
    normalize = settings.get("normalize") != "none"
    # Every input is checked before anything is written (all or nothing for bad inputs):
    # readable, 3D, finite, positive voxel sizes, not constant, and a scale to divide by.
    for src, dst in zip(inputs, outputs):
        volume = read_volume(src)  # raises on a bad file before anything is written
        check_not_constant(volume.data, str(src))
        if normalize:
            input_scale(volume.data, str(src))  # an all-zero or negative volume: fail now
        check_output_path(dst, overwrite=overwrite, protect=tuple(inputs))
        if ups is not None:
            try:
                fine_shape(volume.data.shape, ups, upsample_shape)
            except ValueError as exc:
                raise InferenceError(f"{src}: {exc}") from None
    for folder in {dst.parent for dst in outputs}:
        remove_stale_temps(folder)  # left by a killed run
    try:  # after the input checks, so that a bad request gives one line and no warning
        rule = trained_input_scale(settings, str(ckpt_path))
    except ValueError as exc:
        raise InferenceError(str(exc)) from None
    try:  # after the checks: a bad input fails before any (slow) export
        runner = prepare_runner(net, options)  # exported once for all files
    except (ImportError, RuntimeError) as exc:
        raise InferenceError(f"engine={(options or PatchOptions()).engine}: {exc}") from exc
    results = []
    for src, dst in zip(inputs, outputs):
        result = predict_file(
            src,
            dst,
            net=runner,
            options=options,
            degrade=degrade,
            factors=factors,
            interpolation=interpolation,
            upsample=ups,
            upsample_shape=upsample_shape,
            data_consistency=data_consistency,
            overwrite=overwrite,
            rule=rule,
        )
        result.extra["checkpoint"] = str(ckpt_path)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results
