"""`mdcsrn-export`: a checkpoint's generator as ONNX or OpenVINO IR; the last stdout line is JSON.

    mdcsrn-export ckpt=<run>/checkpoints/last.ckpt format=onnx out=model.onnx
    mdcsrn-export ckpt=model.ckpt format=openvino out=model.xml

The exported graph has dynamic batch and spatial axes (any patch or volume size) and
carries the receptive-field radius as metadata (``patches.margin=auto`` works with it).
With ``check=true`` (default) the file is run once and compared with eager torch. A bad
request prints one line ``mdcsrn-export: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.cli.infer import fail
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.inference.engines import EngineUnavailable, export, load_engine
from mdcsrn_lightning.inference.predict import InferenceError, load_model

PROG = "mdcsrn-export"
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


def export_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise InferenceError("ckpt: required (ckpt=path/to/model.ckpt)")
    fmt = str(cfg.format)
    if fmt not in SUFFIX:
        raise InferenceError(f"format={fmt}: choose onnx or openvino")
    net, config, ckpt = load_model(cfg.ckpt)
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.with_suffix(SUFFIX[fmt])
    if fmt == "openvino" and out.suffix != ".xml":
        out = out.with_suffix(".xml")
    if out.exists() and not cfg.overwrite:
        raise InferenceError(f"{out}: exists; pass overwrite=true to replace it")
    try:
        written = export(net, out, fmt)
    except EngineUnavailable as exc:
        raise InferenceError(str(exc)) from exc
    result: dict[str, Any] = {"checkpoint": str(ckpt), "format": fmt, "output": str(written), "net_config": config}
    if fmt == "openvino":
        result["weights"] = str(written.with_suffix(".bin"))
    radius = getattr(net, "receptive_field_radius", None)
    if radius is not None:
        result["receptive_field_radius"] = int(radius())
    if cfg.check:
        size = [int(s) for s in cfg.check_size]
        x = torch.rand(1, int(getattr(net, "in_channels", 1)), *size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = net.eval()(x)
        got = load_engine(written)(x)
        result["check_max_abs_diff"] = float((got - expected).abs().max())
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        summary = export_checkpoint(cfg)
    except (InferenceError, ValueError, FileNotFoundError) as exc:
        fail(str(exc), PROG)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
