"""``mdcsrn-bench bench.task=data``: the data pipeline at cohort scale (HCP-size volumes).

For each cohort size ``N`` (the first ``N`` subjects of a ``GlobSource`` folder, e.g. one
made by ``mdcsrn-data make-hcp``), in a **fresh process** (so peak RSS is not biased by an
earlier, larger ``N``):

1. ``setup()`` with an empty disk cache: seconds per subject (read, validate, degrade,
   measure the input scale, write the cached LR), the process's peak RSS, the cache's size
   per subject and the number of degradations run;
2. for each ``augment`` x ``num_workers``: a new data module on the *same* cache (its
   ``setup()`` must degrade nothing), then ``batches`` training batches from the TorchIO
   patch queue: the first batch's seconds (the queue's fill), patches/s after it, the main
   process's peak RSS during the queue and the largest queue worker's peak RSS.

Beside it, the demand of one training step of the configured generator at the data
config's batch and patch: measured here on the CPU, and estimated for a GPU from its conv
FLOPs (``3 x`` the forward's, at an *assumed* effective throughput, ``gpu_tflops``).

Memory bound (what "flat in N" means; checked per run in ``rss_checks``): with a disk cache
the data module keeps only metadata per subject (a few hundred bytes), so with
``S = 8 X Y Z`` bytes (one subject's HR + LR in float32) and ``Q`` the queue's patches
(``queue_length x 2 x P^3 x 4`` bytes), the main process's peak is at most

* setup: ``base + L`` with ``L = 8 S``, one subject's working set (the raw read, the
  float32 HR, the complex k-space of the two degraded axes, the interpolated LR; nothing
  is kept afterwards);
* queue: ``base + Q + (2 w + 1) S`` with ``w >= 1`` workers (the subject being sampled and
  up to ``prefetch_factor = 2`` loaded subjects per worker in shared memory; the loading
  itself happens in the workers), ``base + Q + S + L`` with ``w = 0`` (the main process
  loads each subject itself; with ``augment=realistic`` it also resamples and degrades it:
  there ``L = 16 S``, SimpleITK resampling in float64 before the degradation);

where ``base`` is the RSS before ``setup()`` (after loading the libraries the pipeline
uses) plus 32 MB of slack (allocator pools). None of these terms grows with ``N``; the
queue workers' own peaks (reported apart) are bounded alike by ``L`` plus what they hand
over. "Flat in N" (``rss_flat_in_n``): the peaks' spread over N stays below
``max(S, 32 MB)``: setup over every N, the queue over the N whose training set fills the
queue (``train x samples_per_volume >= queue_length``; with fewer the queue holds less).

The queue's rate is ``fill_patches_per_s``: the patches the first fill produced (loading
and sampling ``queue_length / samples_per_volume`` subjects, fewer if the training set is
smaller) over its seconds; ``patches_per_s`` after it mostly serves patches already queued
unless ``batches`` spans several queue lengths.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mdcsrn_lightning.benchmark.measure import MB, conv_macs_per_voxel, peak_rss_bytes, reset_peak_rss, rss_bytes, run_probe
from mdcsrn_lightning.benchmark.runners import build_net, make_train_step

__all__ = ["data_task", "measure_data", "subset_root"]

Log = Callable[[str], None]
GLOB_TARGET = "mdcsrn_lightning.data.sources.GlobSource"
#: added to every RSS bound and to the flatness test: allocator pools, lazily loaded code
SLACK_MB = 32.0
#: one subject's loading working set, in S: a degradation (setup; realistic reloads), and for
#: augment=realistic also TorchIO's affine/elastic resampling (SimpleITK, float64) before it
LOAD_PAPER = 8
LOAD_REALISTIC = 16
#: queue rows: ``realistic`` with its configured/default ``roi`` (``auto``: a 96^3 region at HCP
#: size), ``realistic_whole`` the same with ``roi=null`` (the whole volume, each load)
AUGMENT_ROWS = ("none", "paper", "realistic", "realistic_whole")


def _stderr(msg: str) -> None:
    print(f"[mdcsrn-bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- parent side
def subset_root(source_cfg: dict[str, Any], n: int, folder: Path) -> Path:
    """A folder of symlinks to the first ``n`` subject folders of ``source_cfg``'s root.

    The subject id of a ``GlobSource`` is its first path component (``id_depth=1``), so
    linking those folders gives a source of exactly those subjects.
    """
    from mdcsrn_lightning.data.sources import GlobSource

    root = Path(str(source_cfg["root"]))
    ids = GlobSource(str(root), str(source_cfg.get("pattern", "**/*.nii.gz"))).subject_ids()
    if len(ids) < n:
        raise ValueError(f"{root}: holds {len(ids)} subjects, bench.data.subjects asks for {n}")
    folder.mkdir(parents=True, exist_ok=True)
    for sid in ids[:n]:
        link = folder / sid
        if not link.exists():
            link.symlink_to((root / sid).resolve(), target_is_directory=True)
    return folder


def _demand(model_cfg: dict[str, Any], batch: int, patch: int, repeats: int, gpu_tflops: float, seed: int, log: Log) -> dict[str, Any]:
    """Seconds per training step (CPU, measured) and its GPU estimate from conv FLOPs."""
    net = build_net(model_cfg, seed, perturb_bn=False)
    macs = conv_macs_per_voxel(net) * batch * patch**3
    del net
    step = make_train_step("torch", model_cfg, batch, patch, torch.device("cpu"), seed)
    step()  # warm-up: Adam's state, allocator
    times = []
    for r in range(max(1, repeats)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        log(f"training step {r + 1}/{repeats}: {times[-1]:.2f} s")
    cpu_s = sorted(times)[len(times) // 2]
    step_flop = 3 * 2 * macs  # forward + backward (input and weight gradients) ~ 3x forward
    gpu_s = step_flop / (gpu_tflops * 1e12)
    return {
        "batch": batch,
        "patch": patch,
        "step_flop": step_flop,
        "step_tflop": round(step_flop / 1e12, 3),
        "cpu_seconds_per_step": cpu_s,
        "cpu_patches_per_s": batch / cpu_s,
        "gpu_assumed_tflops": gpu_tflops,
        "gpu_seconds_per_step_estimate": gpu_s,
        "gpu_patches_per_s_estimate": batch / gpu_s,
    }


def data_task(
    data_cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    *,
    subjects: Sequence[int] = (4, 16, 64),
    workers: Sequence[int] = (0, 1, 2),
    augments: Sequence[str] = ("paper", "realistic"),
    batches: int = 12,
    step_repeats: int = 2,
    gpu_tflops: float = 20.0,
    workdir: str | None = None,
    keep_cache: bool = False,
    threads: int | None = None,
    seed: int = 0,
    log: Log = _stderr,
) -> dict[str, Any]:
    """One fresh process per ``N`` (see the module docstring); returns a JSON-ready dict."""
    source = data_cfg.get("source") or {}
    if source.get("_target_") != GLOB_TARGET or source.get("root") in (None, "???"):
        raise ValueError(
            "bench.task=data needs a folder source: data=hcp data.source.root=<folder> "
            "(make one with: mdcsrn-data make-hcp <folder> --n 64)"
        )
    ns = [int(n) for n in subjects]
    if not ns or any(n < 4 for n in ns):
        raise ValueError(f"bench.data.subjects must be cohort sizes >= 4 (one per split set), got {list(subjects)}")
    ws = [int(w) for w in workers]
    if not ws or any(w < 0 for w in ws):
        raise ValueError(f"bench.data.workers must be ints >= 0, got {list(workers)}")
    if not augments or any(a not in AUGMENT_ROWS for a in augments):
        raise ValueError(f"bench.data.augments must be among {', '.join(AUGMENT_ROWS)}, got {list(augments)}")
    if int(batches) < 2:
        raise ValueError(f"bench.data.batches must be >= 2 (the first one fills the queue), got {batches}")
    if not (isinstance(gpu_tflops, (int, float)) and gpu_tflops > 0):
        raise ValueError(f"bench.data.gpu_tflops must be a number > 0, got {gpu_tflops!r}")
    base = Path(workdir or tempfile.mkdtemp(prefix="mdcsrn-bench-data-"))
    result: dict[str, Any] = {
        "task": "data",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "root": str(source["root"]),
        "pattern": source.get("pattern"),
        "runs": [],
    }
    for n in ns:
        folder = base / f"n{n}"
        cache = folder / "cache"
        if cache.exists():
            shutil.rmtree(cache)  # every N starts from an empty cache: setup() is measured whole
        cfg = json.loads(json.dumps(data_cfg))
        cfg["source"]["root"] = str(subset_root(source, n, folder / "subjects"))
        cfg["cache_dir"] = str(cache)
        cfg["split_file"] = str(folder / "split.json")
        spec = {
            "task": "data", "setting": f"N={n}", "data": cfg, "workers": ws, "augments": list(augments),
            "batches": int(batches), "seed": seed, "threads": threads,
        }
        log(f"N={n}: setup and queue in a fresh process")
        run = run_probe(spec)
        run["subjects"] = n
        if not keep_cache and cache.exists():
            shutil.rmtree(cache)
        result["runs"].append(run)
        if "error" in run:
            log(f"N={n}: {run['error']}")
    ok = [r for r in result["runs"] if "error" not in r]
    if ok:
        first = ok[0]
        result["volume_shape"] = first["volume_shape"]
        batch, patch = first["batch_size"], first["patch_size"]
        log(f"demand: {batch} x {patch}^3 training steps")
        result["demand"] = _demand(model_cfg, batch, patch, int(step_repeats), float(gpu_tflops), seed, log)
        result["rss_flat_in_n"] = _flat(ok)
    return result


def _flat(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS spread over N against ``max(S, 32 MB)``: ``setup`` over every N; the queue
    over the N whose training set fills the queue (a smaller one holds fewer subjects' patches)."""
    subject_mb = runs[0]["subject_mb"]
    limit = max(subject_mb, SLACK_MB)
    setup = [r["setup_peak_rss_mb"] for r in runs]
    full = [r for r in runs if r["split"].get("train", 0) * r["samples_per_volume"] >= r["queue_length"]]
    queue_spread = None
    if len(full) >= 2:
        queue_spread = 0.0
        for i in range(len(full[0]["queue"])):
            peaks = [r["queue"][i]["main_peak_rss_mb"] for r in full]
            queue_spread = max(queue_spread, max(peaks) - min(peaks))
    setup_spread = max(setup) - min(setup)
    return {
        "subject_mb": subject_mb,
        "setup_spread_mb": round(setup_spread, 1),
        "queue_spread_mb": None if queue_spread is None else round(queue_spread, 1),
        "queue_compared": [r["subjects"] for r in full],
        "flat": setup_spread < limit and (queue_spread is None or queue_spread < limit),
        "all_within_bound": all(c["within"] for r in runs for c in r["rss_checks"]),
    }


# --------------------------------------------------------------------------- probe side
def _children_peak_mb() -> float:
    """Largest peak RSS (VmHWM) among this process's live children (the queue's workers)."""
    me = str(os.getpid())
    best = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = fh.read().rsplit(")", 1)[1].split()[1]
            if ppid != me:
                continue
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        best = max(best, int(line.split()[1]) / 1024)
        except (OSError, IndexError, ValueError):
            continue
    return best


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _warm_up() -> None:
    """Load the libraries the pipeline uses lazily (FFT, SimpleITK, TorchIO's transforms) on a
    tiny input, so that ``base`` (the RSS before ``setup()``) holds the code, not the data."""
    import numpy as np
    import torchio as tio

    from mdcsrn_lightning.data import degradation
    from mdcsrn_lightning.data.augment import realistic_hr_transform

    tiny = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    degradation.degrade(tiny)
    image = torch.from_numpy(tiny)[None]
    realistic_hr_transform()(tio.Subject(hr=tio.ScalarImage(tensor=image), lr=tio.ScalarImage(tensor=image.clone())))


def measure_data(spec: dict[str, Any]) -> dict[str, Any]:
    """The fresh-process half of :func:`data_task` (run by ``benchmark/probe.py``)."""
    from hydra.utils import instantiate

    from mdcsrn_lightning.data import degradation

    calls = [0]
    real = degradation.degrade

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    degradation.degrade = counting  # type: ignore[assignment]  # this process only
    cfg = spec["data"]
    dm = instantiate(cfg)
    _warm_up()
    calls[0] = 0
    base_rss = rss_bytes()
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    setup_peak = peak_rss_bytes()
    names = [n for s in dm.subjects.values() for n in s]
    shape = tuple(int(s) for s in dm._entries[names[0]].shape)
    voxels = math.prod(shape)
    subject_mb = 8 * voxels / MB
    patch = int(dm.patch_size[0])
    hp = dm.hparams
    queue_mb = int(hp.queue_length) * 2 * 4 * math.prod(dm.patch_size) / MB
    out: dict[str, Any] = {
        "setting": spec["setting"],
        "volume_shape": list(shape),
        "subject_mb": round(subject_mb, 1),
        "queue_patches_mb": round(queue_mb, 1),
        "split": {s: len(v) for s, v in dm.subjects.items()},
        "batch_size": int(hp.batch_size),
        "patch_size": patch,
        "samples_per_volume": int(hp.samples_per_volume),
        "queue_length": int(hp.queue_length),
        "base_rss_mb": round(base_rss / MB, 1),
        "setup_seconds": setup_s,
        "setup_seconds_per_subject": setup_s / len(names),
        "setup_degradations": calls[0],
        "setup_peak_rss_mb": round(setup_peak / MB, 1),
        "rss_after_setup_mb": round(rss_bytes() / MB, 1),
        "cache_bytes_per_subject": _dir_bytes(Path(cfg["cache_dir"])) // len(names),
        "cache_mb_per_subject": round(_dir_bytes(Path(cfg["cache_dir"])) / MB / len(names), 1),
        "queue": [],
    }
    base_mb = base_rss / MB + SLACK_MB
    checks = [{"what": "setup", "peak_mb": out["setup_peak_rss_mb"], "bound_mb": round(base_mb + LOAD_PAPER * subject_mb, 1)}]
    del dm
    gc.collect()
    for augment in spec["augments"]:
        for w in spec["workers"]:
            realistic = augment in ("realistic", "realistic_whole")
            c = dict(cfg, num_workers=int(w), augment="realistic" if realistic else augment)
            load = LOAD_REALISTIC if realistic else LOAD_PAPER
            if not realistic:
                c["augment_options"] = None
            elif cfg.get("augment") != "realistic":
                c["augment_options"] = None  # the package's defaults (data/augment.py)
            if augment == "realistic_whole":
                c["augment_options"] = {**(c["augment_options"] or {}), "roi": None}
            before = calls[0]
            dm = instantiate(c)
            start = time.perf_counter()
            dm.setup("fit")
            resetup = time.perf_counter() - start
            reused = calls[0] == before
            gc.collect()
            reset_peak_rss()
            level = rss_bytes()
            workers_peak = 0.0
            n, patches, epoch = 0, 0, 0
            first = steady_start = None
            produced = 0
            start = time.perf_counter()
            while n < int(spec["batches"]):
                dm.set_epoch(epoch)
                for batch in dm.train_dataloader():
                    n += 1
                    workers_peak = max(workers_peak, _children_peak_mb())
                    if first is None:
                        first = time.perf_counter() - start
                        steady_start = time.perf_counter()
                        # what the fill produced: this batch plus what waits in the queue
                        produced = int(batch["lr"]["data"].shape[0]) + len(dm.train_queue.patches_list)
                    else:
                        patches += int(batch["lr"]["data"].shape[0])
                    if n >= int(spec["batches"]):
                        break
                epoch += 1
            steady = time.perf_counter() - (steady_start or start)
            main_peak = peak_rss_bytes() / MB
            row = {
                "augment": augment,
                "num_workers": int(w),
                "resetup_seconds": round(resetup, 2),
                "cache_reused": reused,
                "first_batch_seconds": first,
                "fill_patches": produced,
                "fill_patches_per_s": produced / first if first else float("nan"),
                "patches": patches,
                "seconds": steady,
                "patches_per_s": patches / steady if steady > 0 else float("nan"),
                "main_peak_rss_mb": round(main_peak, 1),
                "rss_before_queue_mb": round(level / MB, 1),
                "worker_peak_rss_mb": round(workers_peak, 1) if w else None,
            }
            out["queue"].append(row)
            checks.append({
                "what": f"queue {augment} w={w}", "peak_mb": row["main_peak_rss_mb"],
                "bound_mb": round(base_mb + queue_mb + (2 * int(w) + 1) * subject_mb + (0 if w else load * subject_mb), 1),
            })
            del dm, batch
            gc.collect()
    for chk in checks:
        chk["within"] = chk["peak_mb"] <= chk["bound_mb"]
    out["rss_checks"] = checks
    return out
