"""`mdcsrn-bench`: side-by-side benchmarks; a markdown table, then one JSON line (the last).

    mdcsrn-bench depth=b8u4 width=k12 bench.timing=false          # parameter count only
    mdcsrn-bench depth=b8u4 bench.size=[64,64,64] bench.engines=[reference,torch,compile,onnxruntime,openvino]
    mdcsrn-bench bench.task=train                                  # seconds per Adam step, options on/off
    mdcsrn-bench bench.task=train bench.train.curves.enabled=true  # + quickstart fp32 vs bf16-mixed curves
    mdcsrn-bench bench.task=queue                                  # TorchIO queue vs training step
    mdcsrn-bench depth=b8u4 bench.task=volume                      # exact 181x217x181 pass, peak RSS
    mdcsrn-bench depth=b8u4 data=hcp data.source.root=/data/hcp64 bench.task=data   # setup, cache, queue per N

Every setting of a task is timed in alternating rounds in one process (ratios hold on a
noisy machine); see :mod:`mdcsrn_lightning.benchmark.tasks`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.benchmark import data_task, infer_task, machine, markdown, queue_task, train_task, volume_task
from mdcsrn_lightning.benchmark.curves import precision_curves
from mdcsrn_lightning.cli.infer import fail
from mdcsrn_lightning.cli.overrides import one_line_override_errors
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.models import count_parameters

TASKS = ("infer", "train", "queue", "volume", "data")


def _model_name(model: dict[str, Any]) -> str:
    try:
        name = f"b{model['num_blocks']}u{model['units_per_block']} k={model['growth_rate']}"
        return name + ("-r" if model.get("reconstruction") == "conv" else "")
    except (KeyError, TypeError):
        return str(model.get("_target_", "generator"))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(cfg: DictConfig) -> dict[str, Any]:
    b = cfg.bench
    if b.task not in TASKS:
        raise ValueError(f"bench.task={b.task!r}: choose one of {TASKS}")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    torch.manual_seed(b.seed)
    net = instantiate(cfg.model)
    result: dict[str, Any] = {"model": model, "params": count_parameters(net)}
    result["params_M"] = round(result["params"] / 1e6, 2)
    del net
    if not b.timing:
        return result
    common = {"device": str(b.device), "seed": int(b.seed)}
    if b.task == "infer":
        out = infer_task(
            model, engines=list(b.engines), size=list(b.size), batch=int(b.batch), repeats=int(b.repeats),
            warmup=int(b.warmup), memory=str(b.memory), slab=b.slab, gemm_size=int(b.gemm_size), **common,
        )
    elif b.task == "train":
        if list(b.train.settings):
            out = train_task(
                model, settings=list(b.train.settings), batches=[list(x) for x in b.train.batches],
                repeats=int(b.repeats), warmup=int(b.warmup), memory=str(b.memory), **common,
            )
        else:  # bench.train.settings=[]: only the curves
            out = {"task": "train", "device": str(b.device), "threads": torch.get_num_threads(), "runs": []}
        c = b.train.get("curves")
        if c is not None and c.enabled:
            out["curves"] = precision_curves(
                [str(p) for p in c.precisions], experiment=str(c.experiment), overrides=[str(o) for o in c.overrides],
                window=int(c.window), workdir=c.workdir, log=_stderr,
            )
    elif b.task == "queue":
        data = OmegaConf.to_container(cfg.data, resolve=False)
        assert isinstance(data, dict)
        out = queue_task(
            data, model, batches=int(b.queue.batches), consume_settings=list(b.queue.consume_settings),
            consume_repeats=int(b.queue.consume_repeats), **common,
        )
    elif b.task == "data":
        data = OmegaConf.to_container(cfg.data, resolve=False)
        assert isinstance(data, dict)
        d = b.data
        out = data_task(
            data, model, subjects=list(d.subjects), workers=list(d.workers), augments=list(d.augments),
            batches=int(d.batches), step_repeats=int(d.step_repeats), gpu_tflops=float(d.gpu_tflops),
            workdir=d.workdir, keep_cache=bool(d.keep_cache), threads=b.threads, seed=int(b.seed),
            today=bool(d.today), monai=bool(d.monai), monai_subjects=int(d.monai_subjects), cold=bool(d.cold),
            samplers=list(d.samplers), raw_pairs=int(d.raw_pairs),
        )
    else:
        v = b.volume
        out = volume_task(
            model, shape=list(v.shape), slab=int(v.slab), crop=int(v.crop), patches_check=bool(v.patches_check),
            block_engine=v.get("block_engine"), block_slab=int(v.get("block_slab", 16)),
            engine_patches=list(v.engine_patches) if v.get("engine_patches") else None, workdir=v.workdir, **common,
        )
    result.update(out)
    result["model_name"] = _model_name(model)
    result["machine"] = machine()
    return result


@one_line_override_errors("mdcsrn-bench")
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        result = bench(cfg)
    except ValueError as exc:  # a bad bench.* value: one line, exit 2
        fail(str(exc), "mdcsrn-bench")
    table = markdown(result) if cfg.bench.timing else ""
    if table:
        print(table, flush=True)
        if cfg.bench.table:
            path = Path(str(cfg.bench.table))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
