"""One benchmark setting in a fresh process, for its peak memory (peak RSS only grows).

    python -m mdcsrn_lightning.benchmark.probe '<json spec>'

The spec is written by :mod:`mdcsrn_lightning.benchmark.tasks`. The process builds the
setting, runs it once (warm-up: compilation, export, Adam's state), resets the peak RSS
(Linux), runs it once more and prints one JSON line: the peak RSS during the measured
call (the whole process: interpreter, torch, weights, data and the call's working memory),
its increase over the RSS before the call, and the peak while building and warming up.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch

from mdcsrn_lightning.benchmark.measure import MB, PeakMemory, peak_rss_bytes, rss_bytes
from mdcsrn_lightning.benchmark.settings import build_net, infer_inferer, make_input, make_train_step, run_volumes


def _volume_inferer(net: Any, spec: dict[str, Any]) -> Any:
    """The inferer of a ``bench.task=volume`` row: :func:`~mdcsrn_lightning.inference.build.build_inferer`
    on the options the spec carries (``spec["options"]``, the fields of an ``InferenceOptions``)."""
    from mdcsrn_lightning.inference.build import build_inferer
    from mdcsrn_lightning.inference.options import InferenceOptions

    return build_inferer(net, InferenceOptions(**spec["options"]))


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    task = spec["task"]
    if task == "data":  # its own measurements (setup, cache, queue): see data_bench.py
        from mdcsrn_lightning.benchmark.data_bench import measure_data

        return measure_data(spec)
    start_rss = rss_bytes()
    inferer_name: dict[str, str] = {}  # infer and volume: the inferer's own label
    if task == "infer":
        net = build_net(spec["model"], int(spec["seed"]))
        x = make_input(spec["batch"], spec["size"], spec["seed"])
        inferer = infer_inferer(spec["setting"], net, spec["size"], device, spec.get("slab"))
        for _ in range(int(spec.get("warmup", 1))):
            run_volumes(inferer, x)
        inferer_name["inferer"] = inferer.name

        def call() -> Any:
            return run_volumes(inferer, x)

    elif task == "train":
        step = make_train_step(spec["setting"], spec["model"], int(spec["batch"]), int(spec["patch"]), device, int(spec["seed"]))
        for _ in range(int(spec.get("warmup", 1))):
            step()
        call = step
    elif task == "volume":
        inferer = _volume_inferer(build_net(spec["model"], int(spec["seed"])).eval(), spec)
        volume = np.load(spec["input"], mmap_mode="r")
        inferer_name["inferer"] = inferer.name

        def call() -> Any:  # the first call compiles (OpenVINO): timed, as a user would wait
            return inferer(np.asarray(volume))

    else:
        raise ValueError(f"unknown probe task {task!r}")
    setup_peak = peak_rss_bytes()  # building, exporting, compiling, the warm-up call
    with PeakMemory(device) as mem:
        begin = time.perf_counter()
        output = call()
        seconds = time.perf_counter() - begin
    if task == "volume":  # written after the measured call: no file I/O in its time or memory
        np.save(spec["output"], output)
    out = {
        "setting": spec["setting"],
        **inferer_name,
        "seconds": seconds,
        "rss_at_start_mb": round(start_rss / MB, 1),
        **mem.as_dict(),
        "peak_reset": mem.exact,
    }
    if device.type == "cpu":
        out["setup_peak_rss_mb"] = round(setup_peak / MB, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(probe(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
    main()
