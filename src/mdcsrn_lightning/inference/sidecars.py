"""The files ``mdcsrn-infer`` writes beside each output: the provenance record ``<out>.json``
(what made the output: package version, checkpoint and its sha256, release record, settings,
inferer, timings) and the names of the standard-deviation map of ``uncertainty=true``.

Paths are checked before anything is written (:func:`~mdcsrn_lightning.data.volume_write.check_free_path`, :func:`check_distinct`);
JSON files are written like the volumes: a temporary file renamed into place, never replacing
a file without ``overwrite``; :func:`write_output_set` writes one output with its side files,
all or none. The file layer (:mod:`.files`) calls these.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdcsrn_lightning import __version__
from mdcsrn_lightning.atomic import atomic_path, publish_new
from mdcsrn_lightning.checkpoints import TrainedModel
from mdcsrn_lightning.data.volume_io import LoadedVolume
from mdcsrn_lightning.data.volume_write import (
    NIFTI_SUFFIXES,
    NiftiError,
)

__all__ = ["check_distinct", "file_record", "file_sha256", "json_safe", "request_record",
           "sidecar_path", "std_path", "write_json_file", "write_output_set"]


def _split_suffix(path: Path) -> tuple[str, str]:
    """``("sr", ".nii.gz")`` for ``sr.nii.gz``; the suffix as written (its case kept)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return path.stem, path.suffix


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """The provenance record of ``output``: ``sr.nii.gz`` -> ``sr.json`` (a BIDS sidecar's name)."""
    output = Path(output)
    return output.with_name(_split_suffix(output)[0] + ".json")


def std_path(output: str | os.PathLike[str]) -> Path:
    """The standard-deviation map of ``output``: ``sr.nii.gz`` -> ``sr_std.nii.gz``; a BIDS
    derivative name keeps its form: ``..._desc-sr_T1w.nii.gz`` -> ``..._desc-srstd_T1w.nii.gz``."""
    output = Path(output)
    stem, suffix = _split_suffix(output)
    if "_desc-sr_" in f"{stem}_" and stem.startswith("sub-"):
        parts = [("desc-srstd" if part == "desc-sr" else part) for part in stem.split("_")]
        return output.with_name("_".join(parts) + suffix)
    return output.with_name(f"{stem}_std{suffix}")


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, paths and other objects as strings: what ``json`` writes."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json_file(path: str | os.PathLike[str], record: Mapping[str, Any], *, overwrite: bool) -> Path:
    """Write ``record`` as indented JSON to ``path`` atomically; without ``overwrite`` an existing
    file is never replaced (:func:`~mdcsrn_lightning.atomic.publish_new`: one-line error)."""
    path = Path(path)
    text = json.dumps(json_safe(record), indent=2) + "\n"
    publish = atomic_path if overwrite else publish_new
    try:
        with publish(path) as tmp:
            tmp.write_text(text)
    except FileExistsError as exc:
        raise NiftiError(str(exc)) from None
    return path


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The sha256 of the file's bytes, hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def request_record(model: TrainedModel, settings: Mapping[str, Any], options: Mapping[str, Any],
                   inferer: str) -> dict[str, Any]:
    """What every output of one request shares: the package, the checkpoint (path, sha256 of
    its bytes, release record, architecture), the file settings (degradation factors and the
    axes they reduce, upsample, degrade, data consistency), uncertainty, the inferer's name
    and its options."""
    factors = [float(f) for f in (settings.get("upsample") or settings.get("factors") or ())]
    return {
        "package": {"name": "mdcsrn-lightning", "version": __version__},
        "checkpoint": {"path": str(Path(model.path).resolve()), "sha256": file_sha256(model.path),
                       "release": dict(model.release), "net_config": dict(model.net_config),
                       "data": dict(model.data)},
        "degradation": {"factors": factors, "axes": [i for i, f in enumerate(factors) if f > 1],
                        "interpolation": settings.get("interpolation"), "input_scale_rule": settings.get("rule")},
        "degrade": bool(settings.get("degrade")),
        "upsample": settings.get("upsample"),
        "upsample_shape": settings.get("upsample_shape"),
        "data_consistency": bool(settings.get("data_consistency")),
        "uncertainty": bool(options.get("uncertainty")),
        "inferer": {"name": inferer, "options": dict(options)},
    }


def file_record(record: Mapping[str, Any], src: Path, output: Path, has_std: bool, seconds: float) -> dict[str, Any]:
    """The request's record plus this file's input, output, std map and seconds."""
    return {**record, "input": str(src.resolve()), "output": str(output.resolve()),
            "std": str(std_path(output).resolve()) if has_std else None, "seconds": round(seconds, 3)}


def check_distinct(outputs: Sequence[Path], *, std: bool, sidecar: bool) -> None:
    """No two files of one request share a name (``a.nii.gz``'s std map and an input ``a_std.nii.gz``'s output)."""
    seen: set[Path] = set()
    for dst in outputs:
        for path in (dst, std_path(dst) if std else None, sidecar_path(dst) if sidecar else None):
            if path is None:
                continue
            if path in seen:
                raise NiftiError(f"{path}: two outputs of this request would share this name; rename an input")
            seen.add(path)


def write_output_set(write: Callable[..., Path], output: Path, sr: np.ndarray, std: np.ndarray | None,
                     like: LoadedVolume, record: Mapping[str, Any] | None, *, overwrite: bool) -> list[Path]:
    """Write the output, its std map and its provenance record with ``write`` (a writer of
    :mod:`~mdcsrn_lightning.data.volume_write`) and :func:`write_json_file`, each atomically, the
    record last; if one fails (disk full, an interrupt), those of this set already written are removed."""
    written: list[Path] = []
    try:
        written.append(write(output, sr, like, overwrite=overwrite))
        if std is not None:
            written.append(write(std_path(output), std, like, overwrite=overwrite,
                                 description="mdcsrn-lightning SR std (uncertainty)"))
        if record is not None:
            written.append(write_json_file(sidecar_path(output), record, overwrite=overwrite))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
