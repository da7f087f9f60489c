"""`mdcsrn-export`: a checkpoint's generator as ONNX or OpenVINO IR; the last stdout line is JSON.

    mdcsrn-export ckpt=<run>/checkpoints/last.ckpt format=onnx out=model.onnx
    mdcsrn-export ckpt=model.ckpt format=openvino out=model.xml

The exported graph has dynamic batch and spatial axes (any patch or volume size) and
carries the receptive-field radius as metadata (``patches.margin=auto`` works with it).
With ``check=true`` (default) the file is run once and compared with eager torch. The files
(the ``.xml`` with its ``.bin`` for OpenVINO) are written into a hidden temporary folder beside
the output and published together once whole (``atomic.atomic_files``): a full disk or a
read-only folder leaves nothing under the final names. A bad request or a failed write prints
one line ``mdcsrn-export: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.atomic import WriteError, atomic_files
from mdcsrn_lightning.cli.infer import fail
from mdcsrn_lightning.cli.overrides import one_line_override_errors
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.inference.engines import EngineUnavailable, load_engine
from mdcsrn_lightning.models.export import export
from mdcsrn_lightning.checkpoints import load_trained_model
from mdcsrn_lightning.inference.base import InferenceError

PROG = "mdcsrn-export"
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


def _outputs(cfg: DictConfig, ckpt: Path, fmt: str) -> list[Path]:
    """The files the export writes: ``model.onnx``, or ``model.xml`` and its ``model.bin``."""
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.with_suffix(SUFFIX[fmt])
    if fmt == "openvino":
        out = out.with_suffix(".xml")
        return [out, out.with_suffix(".bin")]
    return [out]


def _check(net: Any, written: Path, size: list[int]) -> float:
    """Largest difference between the exported file and eager torch on one random input."""
    x = torch.rand(1, int(getattr(net, "in_channels", 1)), *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = net.eval()(x)
    return float((load_engine(written)(x) - expected).abs().max())


def export_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Export as configured; the files appear whole and together, or not at all."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise InferenceError("ckpt: required (ckpt=path/to/model.ckpt)")
    fmt = str(cfg.format)
    if fmt not in SUFFIX:
        raise InferenceError(f"format={fmt}: choose onnx or openvino")
    model = load_trained_model(cfg.ckpt)
    net, config, ckpt = model.net, model.net_config, model.path
    outputs = _outputs(cfg, ckpt, fmt)
    result: dict[str, Any] = {"checkpoint": str(ckpt), "format": fmt, "output": str(outputs[0]), "net_config": config}
    if fmt == "openvino":
        result["weights"] = str(outputs[1])
    radius = getattr(net, "receptive_field_radius", None)
    if radius is not None:
        result["receptive_field_radius"] = int(radius())
    with atomic_files(list(outputs), overwrite=bool(cfg.overwrite)) as temps:
        try:
            written = export(net, temps[0], fmt)
        except EngineUnavailable as exc:
            raise InferenceError(str(exc)) from exc
        except RuntimeError as exc:  # the exporters' C++ writers (disk full, ...) raise RuntimeError
            detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise InferenceError(f"{outputs[0]}: cannot write ({detail[:200]})") from None
        if cfg.check:
            result["check_max_abs_diff"] = _check(net, written, [int(s) for s in cfg.check_size])
    return result


@one_line_override_errors(PROG)
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        summary = export_checkpoint(cfg)
    except (InferenceError, ValueError, FileNotFoundError, FileExistsError, WriteError) as exc:
        fail(str(exc), PROG)
    except OSError as exc:  # any other failed write: one line naming the file
        fail(f"{getattr(exc, 'filename', '') or cfg.get('out') or 'output'}: {exc.strerror or exc}", PROG)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
