"""`mdcsrn-bench`: how big and how fast a generator is; the last stdout line is JSON.

    mdcsrn-bench depth=b8u4 width=k12
    mdcsrn-bench depth=b4u4 bench.size=[64,64,64] bench.repeats=5
    mdcsrn-bench model=mdcsrn_r depth=b1u16 bench.timing=false
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.models import count_parameters


def time_forward(net: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` eval forward passes (after ``warmup`` untimed ones)."""
    net.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            net(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def bench(cfg: DictConfig) -> dict[str, Any]:
    b = cfg.bench
    if b.task != "infer":
        raise ValueError(f"bench.task={b.task!r}: only 'infer' is implemented")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    torch.manual_seed(b.seed)
    net = instantiate(cfg.model)
    result: dict[str, Any] = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "params": count_parameters(net),
    }
    result["params_M"] = round(result["params"] / 1e6, 2)
    if b.timing:
        size = [int(s) for s in b.size]
        x = torch.rand(int(b.batch), 1, *size)
        times = time_forward(net, x, int(b.repeats), int(b.warmup))
        voxels = x.numel()
        result.update(
            {
                "size": size,
                "batch": int(b.batch),
                "threads": torch.get_num_threads(),
                "seconds_median": statistics.median(times),
                "seconds_min": min(times),
                "voxels_per_second": voxels / statistics.median(times),
            }
        )
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> None:
    print(json.dumps(bench(cfg)))


if __name__ == "__main__":
    main()
