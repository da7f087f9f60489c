"""`mdcsrn-infer`: a scan in (NIfTI, .mgz, Analyze, DICOM series folder), super-resolved NIfTI
out; the last stdout line is JSON.

    mdcsrn-infer input=scan.nii.gz output=sr.nii.gz ckpt=model.ckpt
    mdcsrn-infer input=dicom/T1_MPRAGE output=sr.nii.gz ckpt=model.ckpt
    mdcsrn-infer input=scans/ output=sr/ ckpt=model.ckpt overwrite=true
    mdcsrn-infer input=hr.nii.gz output=sr.nii.gz ckpt=model.ckpt degrade=true
    mdcsrn-infer input=coarse.nii.gz output=sr.nii.gz upsample=auto data_consistency=true
    mdcsrn-infer input=scan.nii.gz output=sr.nii.gz uncertainty=true    # + sr_std.nii.gz
    mdcsrn-infer input=bids/sub-01/anat/sub-01_T1w.nii.gz output=derivatives/sr bids=true
    mdcsrn-infer input=scan.nii.gz output=sr.nii.gz adapt=true adapt_options.minutes=5

Every output gets its provenance record beside it (``sr.json``).

A bad request prints one line ``mdcsrn-infer: error: <file>: <problem>`` on stderr, exits
with status 2 and writes nothing. A write that fails late (disk full) is one such line too;
Ctrl-C / SIGTERM print one line and exit 130 / 143. No partial file is ever left.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.atomic import WriteError
from mdcsrn_lightning.cli.overrides import one_line_override_errors
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.data.sources import VolumeError
from mdcsrn_lightning.data.volume_io import set_max_voxels
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.inference.files import Prediction, predict
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions
from mdcsrn_lightning.interrupts import Terminated, exit_code, terminate_as_exception
from mdcsrn_lightning.checkpoints import CheckpointError

PROG = "mdcsrn-infer"


def fail(message: str, prog: str = PROG) -> None:
    """Print ``<prog>: error: <message>`` (one line) on stderr and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _required(cfg: DictConfig, key: str, example: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise InferenceError(f"{key}: required ({key}={example})")
    return cfg[key]


def _consistency(value: Any) -> bool | str:
    """``true``/``false`` as booleans; anything else (``auto``) is resolved against the checkpoint."""
    return value if isinstance(value, bool) else str(value)


def _numbers(value: Any) -> Any:
    """A Hydra list as a plain list; strings and ``None`` unchanged."""
    return list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else value


def _slab(value: Any) -> int | None:
    """``slab``: ``null``/``auto`` -> the exact path's default, else an integer >= 1."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InferenceError(f"slab: an integer >= 1 or auto, got {value!r}")
    return value


def inference_options(cfg: DictConfig) -> InferenceOptions:
    """The options object of ``cfg`` (``patches.*``, ``bn_mode``, ``device``, ``engine``, ``stream``...)."""
    p = cfg.patches

    def value(v: Any) -> Any:
        return v if v is None or isinstance(v, (int, str)) else [int(x) for x in v]

    size, margin = value(p.size), value(p.margin)
    return InferenceOptions(
        patch_size=size,
        margin=margin,
        overlap_mode=str(p.overlap_mode),  # type: ignore[arg-type]
        batch_size=int(p.batch_size),
        bn_mode=str(cfg.bn_mode),  # type: ignore[arg-type]
        device=str(cfg.device),
        precision=str(cfg.precision),
        progress=bool(cfg.get("progress", False)),
        engine=str(cfg.get("engine", "torch")),  # type: ignore[arg-type]
        stream=bool(cfg.get("stream", False)),
        slab=_slab(cfg.get("slab")),
        uncertainty=_flag(cfg, "uncertainty"),
        adapt=adapt_options(cfg),
    )


def adapt_options(cfg: DictConfig) -> AdaptOptions | None:
    """``adapt=true``: the ``adapt_options.*`` block as :class:`AdaptOptions`; ``None`` otherwise."""
    if not _flag(cfg, "adapt"):
        return None
    block = cfg.get("adapt_options") or {}
    values = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    known = {"steps", "epochs", "minutes", "lr", "patch", "batch", "seed", "holdout", "validate_every", "patience",
             "order", "save", "network", "flips", "rotations", "noise", "prior"}
    unknown = sorted(set(values) - known)  # type: ignore[arg-type]
    if unknown:
        raise InferenceError(f"adapt_options.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    for name in ("lr", "epochs"):
        if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):  # type: ignore[union-attr]
            values[name] = float(values[name])  # type: ignore[index]
    if values.get("order") is not None:  # type: ignore[union-attr]
        values["order"] = str(values["order"])  # type: ignore[index]  # a YAML 01 / 10 is read as a number
    return AdaptOptions(**values)  # type: ignore[arg-type]


def _flag(cfg: DictConfig, key: str) -> bool:
    """A boolean key (``true``/``false``); anything else is one line."""
    value = cfg.get(key, False)
    if not isinstance(value, bool):
        raise InferenceError(f"{key}: true or false, got {value!r}")
    return value


def infer(cfg: DictConfig) -> dict[str, Any]:
    """Run inference as configured; returns the JSON-ready summary."""
    set_max_voxels(cfg.get("max_voxels"))
    source = str(_required(cfg, "input", "scan.nii.gz"))
    target = str(_required(cfg, "output", "sr.nii.gz"))
    start = time.perf_counter()
    predictions = predict(
        source,
        target,
        cfg.get("ckpt"),
        options=inference_options(cfg),
        degrade=bool(cfg.degrade),
        factors=[float(f) for f in cfg.factors] if cfg.get("factors") is not None else None,
        degrade_interpolation=cfg.get("degrade_interpolation"),
        upsample=_numbers(cfg.get("upsample")),
        upsample_shape=_numbers(cfg.get("upsample_shape")),
        data_consistency=_consistency(cfg.get("data_consistency", "auto")),
        overwrite=bool(cfg.overwrite),
        bids=_flag(cfg, "bids"),
    )
    results: list[Prediction] = []
    for result in predictions:  # one file written per step
        print(f"wrote {result.output}  shape {list(result.shape)}  {result.seconds:.1f} s", flush=True)
        results.append(result)
    return {
        "outputs": [r.output for r in results],
        "std": [r.std for r in results if r.std is not None],
        "provenance": [r.sidecar for r in results if r.sidecar is not None],
        "inputs": [r.input for r in results],
        "checkpoint": results[0].extra.get("checkpoint") if results else None,
        "adapt": [r.extra["adapt"] for r in results if "adapt" in r.extra],
        "seconds": time.perf_counter() - start,
    }


def interrupted(exc: BaseException, prog: str = PROG) -> None:
    """Ctrl-C / SIGTERM: one line on stderr, exit 130 / 143 (temporary files are already gone)."""
    print(f"{prog}: interrupted ({exc or 'SIGINT'}); no partial file left", file=sys.stderr, flush=True)
    raise SystemExit(exit_code(exc))


@one_line_override_errors(PROG)
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="infer")
def main(cfg: DictConfig) -> None:
    try:
        with terminate_as_exception():
            summary = infer(cfg)
    except (InferenceError, VolumeError, CheckpointError) as exc:
        fail(str(exc))
    except ValueError as exc:  # a bad option value (overlap_mode, patch size, device...)
        fail(str(exc))
    except OSError as exc:  # disk full, read-only folder... while writing (one line, no partial file)
        fail(str(exc) if isinstance(exc, WriteError) else f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}")
    except (KeyboardInterrupt, Terminated) as exc:
        interrupted(exc)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
