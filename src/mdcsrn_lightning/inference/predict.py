"""File-level inference: NIfTI in, NIfTI out, with a generator read from a checkpoint.

One scan's path: NIfTI file -> checked ``(X, Y, Z)`` float32 (:mod:`.nifti_io`) ->
optionally degraded first (``degrade=True``: an HR scan for experiments) -> divided by its
own 99.9th percentile -> patch-wise generator (:func:`.patches.super_resolve`) ->
multiplied back by the same number -> float32 NIfTI with the input's header and geometry.

**Intensity normalisation.** Training divides each subject's HR *and* LR by the HR's
99.9th percentile, so the network sees intensities of about ``[0, 1]``. A scan given for
inference has no HR, so it is divided by its *own* 99.9th percentile, and the output is
multiplied by that number again: the SR lands on the input's intensity scale. (For an LR
made from an HR the two percentiles are close; k-space truncation smooths the brightest
voxels a little, so the LR's is a bit lower.)

**Grid.** The network does not change the grid: the input must already be on the grid
the output should have (an LR acquisition reconstructed or interpolated onto the fine
grid, as the training LR is). Output voxel sizes are the input's.

Every problem is an :class:`InferenceError` (or :class:`~.nifti_io.NiftiError`) with one
line ``"<file>: <problem>"``. Everything that can be checked is checked before the first
file is written: the checkpoint, every input, every output path.
"""

from __future__ import annotations

import glob as _glob
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mdcsrn_lightning.atomic import remove_stale_temps
from mdcsrn_lightning.data.degradation import degrade as _degrade
from mdcsrn_lightning.data.volume_io import check_not_constant, is_volume_path
from mdcsrn_lightning.release import RELEASED_WEIGHTS
from mdcsrn_lightning.inference.nifti_io import (
    check_output_path,
    is_nifti_path,
    nifti_stem,
    read_volume,
    write_like,
)
from mdcsrn_lightning.inference.patches import super_resolve
from mdcsrn_lightning.training.checkpoint import CheckpointError, load_generator, read_checkpoint

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
    "trained_data_settings",
]

# With no ckpt given: the weights released with the package (release/MODEL_CARD.md).
DEFAULT_CHECKPOINT: str | None = str(RELEASED_WEIGHTS)
_GLOB_CHARS = set("*?[")


class InferenceError(ValueError):
    """A bad inference request; the message is one line, ``"<file>: <problem>"``."""


@dataclass
class PatchOptions:
    """How the generator is run over a volume.

    The first fields are :func:`.patches.super_resolve`'s (``patch_size`` and ``margin``
    also take ``"auto"``). ``engine``: ``torch`` (default), ``compile``, ``onnxruntime``,
    ``openvino`` or ``auto`` (:mod:`.engines`). ``stream=True`` replaces the patches by the
    exact streamed whole-volume pass (:mod:`.streaming`, torch only) computing ``slab``
    slices per step.
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
    slab: int = 16

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


@dataclass
class Prediction:
    """What :func:`predict_file` did, for logs and the CLI's JSON line."""

    input: str
    output: str
    shape: tuple[int, ...]
    scale: float
    seconds: float
    degraded: bool = False
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
    out = {k: hp[k] for k in ("factors", "interpolation", "normalize") if k in hp}
    if out:
        return out
    config = Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(config), resolve=False).get("data") or {}  # type: ignore[union-attr]
    except Exception:  # an unreadable run config is no reason to fail inference
        return {}
    return {k: data[k] for k in ("factors", "interpolation", "normalize") if k in data}


# ------------------------------------------------------------------------ inputs/outputs
def collect_inputs(spec: str | os.PathLike[str]) -> tuple[list[Path], bool]:
    """``(files, is_collection)`` for a NIfTI file, a folder of them or a glob pattern.

    A folder gives its volume files (``.nii``, ``.nii.gz``, ``.mgz``, ``.img``/``.hdr``;
    not recursive), sorted; a glob (``*``, ``?``, ``[``) gives its matching volume files,
    sorted. Our own temporary files (``.<name>.<random>.part.nii.gz``) are never inputs. ``is_collection`` is
    ``True`` for a folder or glob: the output is then a folder.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = _volume_files(path.iterdir())
        if not files:
            raise InferenceError(f"{path}: folder holds no .nii, .nii.gz, .mgz or .img volume files")
        return files, True
    if path.exists():
        return [path], False
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in _glob.glob(os.path.expanduser(text), recursive=True))
        files = _volume_files(matches)
        if not files:
            raise InferenceError(f"{text}: no NIfTI files match this pattern")
        return files, True
    raise InferenceError(f"{path}: no such file or folder")


def _volume_files(paths: Any) -> list[Path]:
    files = sorted(Path(p) for p in paths if Path(p).is_file() and is_volume_path(p))
    # an Analyze pair is one volume: keep the .img, drop its .hdr
    images = {p.with_suffix(".img") for p in files if p.suffix.lower() == ".img"}
    return [p for p in files if not (p.suffix.lower() == ".hdr" and p.with_suffix(".img") in images)]


def plan_outputs(inputs: Sequence[Path], output: str | os.PathLike[str], is_collection: bool) -> list[Path]:
    """Output path of each input.

    One file in: ``output`` is the file to write (or, if it is an existing folder or has
    no ``.nii``/``.nii.gz`` suffix, the folder to write ``<name>_sr.nii.gz`` into). A
    folder/glob in: ``output`` is a folder and each output keeps its input's file name.
    """
    out = Path(output).expanduser()
    if not is_collection and is_nifti_path(out) and not out.is_dir():
        return [out]
    if out.exists() and not out.is_dir():
        raise InferenceError(f"{out}: output for several inputs must be a folder, and this is a file")
    if not is_collection:
        return [out / f"{nifti_stem(inputs[0])}_sr.nii.gz"]
    planned = [out / p.name for p in inputs]
    if len(set(planned)) != len(planned):
        raise InferenceError(f"{out}: two inputs share a file name; give a folder of distinctly named files")
    return planned


# ------------------------------------------------------------------------ volumes
def normalisation_scale(volume: np.ndarray, percentile: float = 99.9, location: str = "volume") -> float:
    """The number a volume is divided by before the network: its ``percentile`` (99.9th)."""
    scale = float(np.percentile(volume, percentile))
    if not (np.isfinite(scale) and scale > 0):
        raise InferenceError(
            f"{location}: the {percentile}th percentile of the intensities is {scale:g}; "
            "cannot normalise an empty (all-zero) or negative volume"
        )
    return scale


def predict_volume(
    net: nn.Module,
    lr: np.ndarray,
    options: PatchOptions | None = None,
    *,
    scale: float | None = None,
    percentile: float = 99.9,
) -> np.ndarray:
    """``(X, Y, Z)`` LR on its own intensity scale -> SR on the same scale, float32.

    ``scale`` (default: the LR's own ``percentile``) divides the input and multiplies the
    output; pass the HR's 99.9th percentile to reproduce the training normalisation.
    """
    options = options or PatchOptions()
    if scale is None:
        scale = normalisation_scale(lr, percentile)
    volume = np.asarray(lr, dtype=np.float32) / np.float32(scale)
    if options.stream:
        if not isinstance(net, nn.Module):
            raise InferenceError("stream=true needs engine=torch (it runs the network layer by layer)")
        if options.bn_mode != "eval":
            raise InferenceError("stream=true needs bn_mode=eval (batch statistics cannot be streamed)")
        from mdcsrn_lightning.inference.streaming import stream_super_resolve

        sr = stream_super_resolve(net, volume, slab=int(options.slab), device=options.device, progress=options.progress)
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
    degrade_interpolation: str = "linear",
    overwrite: bool = False,
    percentile: float = 99.9,
    normalize: bool = True,
) -> Prediction:
    """Super-resolve one NIfTI file into ``output`` (see the module docstring).

    Give either ``ckpt`` (read with :func:`~mdcsrn_lightning.training.checkpoint.load_generator`)
    or an already built ``net``. ``degrade=True`` first degrades the input
    (``factors``, ``degrade_interpolation``) as the training data was: for experiments on
    HR scans. ``normalize=False`` feeds raw intensities (for a model trained with
    ``data.normalize=none``). Nothing is written if anything fails.
    """
    if net is None:
        net, _, _ = load_model(ckpt)
        net = prepare_runner(net, options)
    src = Path(input)
    volume = read_volume(src)
    check_output_path(output, overwrite=overwrite, protect=(src,))
    start = time.perf_counter()
    data = volume.data
    if degrade:
        data = _degrade(data, factors=factors, interpolation=degrade_interpolation)  # type: ignore[arg-type]
    scale = normalisation_scale(data, percentile, str(src)) if normalize else 1.0
    sr = predict_volume(net, data, options, scale=scale)
    written = write_like(output, sr, volume, overwrite=overwrite)
    return Prediction(
        input=str(src),
        output=str(written),
        shape=tuple(sr.shape),
        scale=scale,
        seconds=time.perf_counter() - start,
        degraded=bool(degrade),
    )


def predict(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    ckpt: str | os.PathLike[str] | None = None,
    *,
    options: PatchOptions | None = None,
    degrade: bool = False,
    factors: Sequence[float] = (2, 2, 1),
    degrade_interpolation: str | None = None,
    overwrite: bool = False,
    percentile: float = 99.9,
    on_done: Any = None,
) -> list[Prediction]:
    """Super-resolve a NIfTI file, a folder of them or a glob into ``output``.

    Checks first, writes after: the checkpoint is loaded, every input is read and checked
    (readable, 3D, finite, positive voxel sizes, not constant) and every output path is
    checked (free name, writable folder) before the first file is written, so a bad input
    anywhere means nothing is written. A failure while writing (disk full) leaves the
    outputs already written, complete, and no partial file. ``degrade_interpolation=None`` uses the
    interpolation the checkpoint was trained with (if recorded), else ``"linear"``; a
    checkpoint trained with ``data.normalize=none`` gets raw intensities.
    ``on_done(prediction)`` is called after each file.
    """
    from mdcsrn_lightning.inference.patches import resolve_device

    resolve_device((options or PatchOptions()).device)  # device=cuda without CUDA: fail now
    net, _, ckpt_path = load_model(ckpt)
    inputs, is_collection = collect_inputs(input)
    outputs = plan_outputs(inputs, output, is_collection)
    settings = trained_data_settings(ckpt_path)
    normalize = settings.get("normalize") != "none"
    # Every input is checked before anything is written (all or nothing for bad inputs):
    # readable, 3D, finite, positive voxel sizes, not constant, and a scale to divide by.
    for src, dst in zip(inputs, outputs):
        volume = read_volume(src)
        check_not_constant(volume.data, str(src))
        if normalize:
            normalisation_scale(volume.data, percentile, str(src))
        check_output_path(dst, overwrite=overwrite, protect=tuple(inputs))
    for folder in {dst.parent for dst in outputs}:
        remove_stale_temps(folder)  # left by a killed run
    try:  # after the checks: a bad input fails before any (slow) export
        runner = prepare_runner(net, options)  # exported once for all files
    except (ImportError, RuntimeError) as exc:
        raise InferenceError(f"engine={(options or PatchOptions()).engine}: {exc}") from exc
    if degrade and degrade_interpolation is None:
        degrade_interpolation = str(settings.get("interpolation") or "linear")
    results = []
    for src, dst in zip(inputs, outputs):
        result = predict_file(
            src,
            dst,
            net=runner,
            options=options,
            degrade=degrade,
            factors=factors,
            degrade_interpolation=degrade_interpolation or "linear",
            overwrite=overwrite,
            percentile=percentile,
            normalize=normalize,
        )
        result.extra["checkpoint"] = str(ckpt_path)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results
