"""``mdcsrn-bench bench.task=data``: the data pipeline at cohort scale (HCP-size volumes).

For each cohort size ``N`` (the first ``N`` subjects of a ``GlobSource`` folder, e.g. one
made by ``mdcsrn-data make-hcp``), in a **fresh process** (so peak RSS is not biased by an
earlier, larger ``N``):

1. ``setup()`` with an empty disk cache: seconds per subject (read, validate, degrade,
   measure the input scale, write HR and LR as ``.npy``), peak RSS, cache MB per subject and
   the number of degradations run;
2. the machine's limit (``raw``): HR + LR patch crops copied out of the cache's memory maps,
   page cache warm, then cold (the files evicted with ``posix_fadvise(DONTNEED)``);
3. rows of patches/s, each a loader from its creation over ``batches`` batches (queue fills
   included): ``new`` (the data module: memory-mapped crops, batched augmentation run on the
   CPU device inside the timed loop) per ``augment`` x ``num_workers``; ``today`` (the pipeline
   before it, ``benchmark/legacy_queue.py``: whole-volume reads per subject load, per-patch
   TorchIO transforms, ``realistic`` on a 96^3 region with TorchIO) for the same augment, one
   queue fill long; the foreground (``label``) sampler beside the uniform one; ``new`` with a
   cold page cache; and ``monai``, MONAI's recommended fast path on the same files
   (``CacheDataset`` + ``RandSpatialCropSamplesd`` + ``ThreadDataLoader``).

Beside it, the demand of one training step of the configured generator at the data
config's batch and patch: measured here on the CPU, and estimated for a GPU from its conv
FLOPs (``3 x`` the forward's, at an *assumed* effective throughput, ``gpu_tflops``); every
row gets ``supply_over_gpu_estimate``, new rows ``vs_today`` and ``vs_monai``.

Memory bound (what "flat in N" means; checked per run in ``rss_checks``): the data module
keeps only metadata per subject, so with ``S = 8 X Y Z`` bytes (one subject's HR + LR in
float32) and ``Q`` the queue's patches (``queue_length x 2 x P^3 x 4`` bytes), the main
process's peak is at most

* setup: ``base + L`` with ``L = 8 S``, one subject's working set (the raw read, the
  float32 HR, the complex k-space of the two degraded axes, the interpolated LR);
* a queue row, new path: ``start + Q + (2 w + 1) S`` (mapped pages of the subjects being cut
  count as resident), ``+ S`` with ``augment=realistic`` (the batched augmentation's buffers);
* a queue row, today's path: ``start + Q + S + L`` with ``w = 0`` (``L = 16 S`` for
  ``realistic``: SimpleITK resampling in float64 before the degradation);

where ``base`` is the RSS before ``setup()`` and ``start`` the RSS when the row starts (what
earlier rows of the same process left to the allocator is not the row's), each plus 32 MB of
slack. None of these terms grows with ``N``. "Flat in N" (``rss_flat_in_n``): the peaks' spread over N stays below
``max(S, 32 MB)``: setup over every N, the queue rows over the N whose training set fills
the queue (``train x samples_per_volume >= queue_length``).
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
from mdcsrn_lightning.benchmark.settings import build_net, make_train_step

__all__ = ["data_task", "measure_data", "subset_root"]

Log = Callable[[str], None]
GLOB_TARGET = "mdcsrn_lightning.data.sources.GlobSource"
#: added to every RSS bound and to the flatness test: allocator pools, lazily loaded code
SLACK_MB = 32.0
#: one subject's loading working set, in S: a degradation (setup; realistic reloads), and for
#: augment=realistic also TorchIO's affine/elastic resampling (SimpleITK, float64) before it
LOAD_PAPER = 8
LOAD_REALISTIC = 16
#: the augment settings a run can compare
AUGMENT_ROWS = ("none", "paper", "realistic")


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
    today: bool = True,
    monai: bool = True,
    monai_subjects: int = 8,
    cold: bool = True,
    samplers: Sequence[str] = ("uniform", "label"),
    raw_pairs: int = 2000,
    log: Log = _stderr,
) -> dict[str, Any]:
    """One fresh process per ``N`` (see the module docstring); returns a JSON-ready dict."""
    source = data_cfg.get("source") or {}
    ns, ws = _check_task(source, subjects, workers, augments, batches, gpu_tflops, samplers)
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
            "batches": int(batches), "seed": seed, "threads": threads, "today": bool(today), "monai": bool(monai),
            "monai_subjects": int(monai_subjects), "cold": bool(cold), "samplers": list(samplers),
            "raw_pairs": int(raw_pairs),
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
        gpu = result["demand"]["gpu_patches_per_s_estimate"]
        for run in ok:
            for row in run["queue"]:
                row["supply_over_gpu_estimate"] = row["patches_per_s"] / gpu
        result["rss_flat_in_n"] = _flat(ok)
    return result


def _check_task(
    source: dict[str, Any], subjects: Sequence[int], workers: Sequence[int], augments: Sequence[str],
    batches: int, gpu_tflops: float, samplers: Sequence[str],
) -> tuple[list[int], list[int]]:
    """The task's arguments checked (one-line errors naming the key); the cohort sizes and workers."""
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
    if any(x not in ("uniform", "label") for x in samplers):
        raise ValueError(f"bench.data.samplers must be among uniform, label, got {list(samplers)}")
    if int(batches) < 2:
        raise ValueError(f"bench.data.batches must be >= 2 (the first one fills the queue), got {batches}")
    if not (isinstance(gpu_tflops, (int, float)) and gpu_tflops > 0):
        raise ValueError(f"bench.data.gpu_tflops must be a number > 0, got {gpu_tflops!r}")
    return ns, ws


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
        for i, row in enumerate(full[0]["queue"]):
            if row["path"] not in ("new", "today"):  # raw crops and MONAI's in-RAM cache: not the data module
                continue
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
    from mdcsrn_lightning.data.batched_augment import BatchedRealistic

    tiny = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    degradation.degrade(tiny)
    image = torch.from_numpy(tiny)[None]
    realistic_hr_transform()(tio.Subject(hr=tio.ScalarImage(tensor=image), lr=tio.ScalarImage(tensor=image.clone())))
    aug = BatchedRealistic(None, (2, 2, 1), "linear", (4, 4, 4), 2)
    aug(torch.rand(1, 1, *aug.region_size), torch.ones(1, 3), torch.Generator().manual_seed(0))


def drop_page_cache(paths: Sequence[str]) -> None:
    """Evict ``paths`` from the page cache (``posix_fadvise(DONTNEED)``; clean pages only): the
    next reads come from the disk. The cold-cache rows use it."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _count_degradations() -> list[int]:
    from mdcsrn_lightning.data import degradation

    calls = [0]
    real = degradation.degrade

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    degradation.degrade = counting  # type: ignore[assignment]  # this process only
    return calls


def measure_data(spec: dict[str, Any]) -> dict[str, Any]:
    """The fresh-process half of :func:`data_task` (run by ``benchmark/probe.py``)."""
    from hydra.utils import instantiate

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    calls = _count_degradations()
    cfg = spec["data"]
    dm = instantiate(cfg)
    _warm_up()
    calls[0] = 0
    base_rss = rss_bytes()
    out = _setup_part(dm, cfg, calls)
    base_mb = base_rss / MB + SLACK_MB
    out["base_rss_mb"] = round(base_rss / MB, 1)
    checks = [{"what": "setup", "peak_mb": out["setup_peak_rss_mb"], "bound_mb": round(base_mb + LOAD_PAPER * out["subject_mb"], 1)}]
    train = [dm._entries[n] for n in dm.split["train"]]
    files = [f for e in train for f in (e.hr_file, e.lr_file)]
    del dm
    gc.collect()
    rows: list[dict[str, Any]] = [
        _raw_row(train, out["patch_size"], int(spec.get("raw_pairs", 2000)), cold=False),
    ]
    if spec.get("cold", True):
        drop_page_cache(files)
        rows.append(_raw_row(train, out["patch_size"], max(1, int(spec.get("raw_pairs", 2000)) // 4), cold=True))
    for row in _queue_rows(spec):
        if row.get("cache") == "cold":
            drop_page_cache([f for f in files] + [str(p) for p in Path(cfg["cache_dir"]).glob("*.fg-*.npy")])
        rows.append(_queue_row(cfg, row, calls))
        q = rows[-1]
        start_mb = q.pop("rss_before_mb") + SLACK_MB  # what earlier rows left allocated is not this row's
        checks.append({"what": _row_name(q), "peak_mb": q["main_peak_rss_mb"],
                       "bound_mb": round(start_mb + out["queue_patches_mb"] + q.pop("bound_extra") * out["subject_mb"], 1)})
    if spec.get("monai", True):
        rows.append(_monai_row(train, out, int(spec.get("monai_subjects", 8)), int(spec["batches"])))
    _ratios(rows)
    for chk in checks:
        chk["within"] = chk["peak_mb"] <= chk["bound_mb"]
    out["queue"] = rows
    out["rss_checks"] = checks
    return out


def _setup_part(dm: Any, cfg: dict[str, Any], calls: list[int]) -> dict[str, Any]:
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    names = [n for s in dm.subjects.values() for n in s]
    shape = tuple(int(s) for s in dm._entries[names[0]].shape)
    subject_mb = 8 * math.prod(shape) / MB
    hp = dm.hparams
    cache_bytes = _dir_bytes(Path(cfg["cache_dir"]))
    return {
        "setting": f"N={len(names)}",
        "volume_shape": list(shape),
        "subject_mb": round(subject_mb, 1),
        "queue_patches_mb": round(int(hp.queue_length) * 2 * 4 * math.prod(dm.patch_size) / MB, 1),
        "split": {s: len(v) for s, v in dm.subjects.items()},
        "batch_size": int(hp.batch_size),
        "patch_size": int(dm.patch_size[0]),
        "samples_per_volume": int(hp.samples_per_volume),
        "queue_length": int(hp.queue_length),
        "setup_seconds": setup_s,
        "setup_seconds_per_subject": setup_s / len(names),
        "setup_degradations": calls[0],
        "setup_peak_rss_mb": round(peak_rss_bytes() / MB, 1),
        "rss_after_setup_mb": round(rss_bytes() / MB, 1),
        "cache_bytes_per_subject": cache_bytes // len(names),
        "cache_mb_per_subject": round(cache_bytes / MB / len(names), 1),
    }


def _queue_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The queue rows of one N, in a fixed order (the flatness check compares rows by index)."""
    rows: list[dict[str, Any]] = []
    for augment in spec["augments"]:
        for w in spec["workers"]:
            rows.append({"path": "new", "augment": augment, "sampler": "uniform", "workers": int(w)})
        if augment == "realistic":  # what the loader must supply when the GPU augments
            rows.append({"path": "new", "augment": augment, "sampler": "uniform", "workers": 0, "device_step": False})
        if spec.get("today", True):
            rows.append({"path": "today", "augment": augment, "sampler": "uniform", "workers": 0})
    if "label" in spec.get("samplers", ["uniform", "label"]):
        rows.append({"path": "new", "augment": "paper", "sampler": "label", "workers": 0})
        if spec.get("today", True):
            rows.append({"path": "today", "augment": "paper", "sampler": "label", "workers": 0})
    if spec.get("cold", True):
        rows.append({"path": "new", "augment": "paper", "sampler": "uniform", "workers": 0, "cache": "cold"})
    return [{**r, "batches": int(spec["batches"])} for r in rows]


def _row_name(row: dict[str, Any]) -> str:
    cold = " cold" if row.get("cache") == "cold" else ""
    loader_only = " loader only" if row.get("device_step", True) is False else ""
    return f"{row['path']} {row['augment']} {row['sampler']} w={row['workers']}{cold}{loader_only}"


def _queue_row(cfg: dict[str, Any], row: dict[str, Any], calls: list[int]) -> dict[str, Any]:
    """Patches/s of one loader from its creation: ``batches`` batches (``today``: enough for one
    queue fill and the start of the next), fills included."""
    from hydra.utils import instantiate

    from mdcsrn_lightning.benchmark.legacy_queue import legacy_loader

    c = dict(cfg, num_workers=row["workers"], augment=row["augment"],
             sampler="label" if row["sampler"] == "label" else "uniform")
    if row["augment"] != "realistic" or cfg.get("augment") != "realistic":
        c["augment_options"] = None
    before = calls[0]
    dm = instantiate(c)
    dm.setup("fit")
    reused = calls[0] == before  # a new data module on the same cache degrades nothing
    hp = dm.hparams
    today = row["path"] == "today"
    # today's path: one queue fill and the start of the next; new: the configured batches
    batches = math.ceil(hp.queue_length / hp.batch_size) + 1 if today else int(row["batches"])
    gc.collect()
    reset_peak_rss()
    level = rss_bytes()
    loader = legacy_loader(dm, row["augment"], row["workers"], c["augment_options"]) if today else dm.train_dataloader()
    # the training device's work, run on the CPU here (not for a loader-only row: what a GPU's loader supplies)
    augment = None if today or not row.get("device_step", True) else dm.batch_augment
    n = patches = 0
    first = None
    workers_peak = 0.0
    start = time.perf_counter()
    while n < batches:
        for batch in loader:
            if augment is not None:
                batch = augment(batch)
            n += 1
            patches += int(batch["hr"]["data"].shape[0])
            workers_peak = max(workers_peak, _children_peak_mb())
            if first is None:
                first = time.perf_counter() - start
            if n >= batches:
                break
    seconds = time.perf_counter() - start
    realistic = row["augment"] == "realistic"
    load = (LOAD_REALISTIC if realistic else LOAD_PAPER) if today else (1 if realistic else 0)
    result = {
        **row, "cache_reused": reused, "batches": n, "patches": patches, "seconds": seconds,
        "first_batch_seconds": first, "patches_per_s": patches / seconds,
        "main_peak_rss_mb": round(peak_rss_bytes() / MB, 1), "rss_before_mb": round(level / MB, 1),
        "worker_peak_rss_mb": round(workers_peak, 1) if row["workers"] else None,
        "bound_extra": (2 * row["workers"] + 1) + (0 if row["workers"] else load),
    }
    del dm, loader
    gc.collect()
    return result


def _raw_row(entries: Sequence[Any], patch: int, pairs: int, cold: bool) -> dict[str, Any]:
    """The machine's limit: HR + LR ``patch^3`` crops copied out of memory maps (``np.array``)."""
    import numpy as np

    maps = [(np.load(e.hr_file, mmap_mode="r"), np.load(e.lr_file, mmap_mode="r")) for e in entries]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(pairs):
        hr, lr = maps[int(rng.integers(len(maps)))]
        i, j, k = (int(rng.integers(0, n - patch + 1)) for n in hr.shape)
        np.array(hr[i:i + patch, j:j + patch, k:k + patch])
        np.array(lr[i:i + patch, j:j + patch, k:k + patch])
    seconds = time.perf_counter() - start
    return {"path": "raw", "augment": "none", "sampler": "uniform", "workers": 0, "cache": "cold" if cold else "warm",
            "patches": pairs, "seconds": seconds, "patches_per_s": pairs / seconds}


def _monai_row(entries: Sequence[Any], out: dict[str, Any], limit: int, batches: int) -> dict[str, Any]:
    """MONAI's recommended fast patch pipeline on the same cached files: ``CacheDataset`` (whole
    volumes, divided by ``input_scale``, in RAM), ``RandSpatialCropSamplesd`` (the run's patches per
    subject), the paper's flips and rotations, ``ThreadDataLoader``; the first ``limit`` training
    subjects (the cache holds them whole)."""
    from monai.data import CacheDataset, ThreadDataLoader, set_track_meta
    from monai.transforms import (
        Compose, EnsureChannelFirstd, Lambda, LoadImaged, RandFlipd, RandRotate90d, RandSpatialCropSamplesd,
    )

    keys = ["hr", "lr"]
    items = [{"hr": e.hr_file, "lr": e.lr_file, "scale": e.input_scale} for e in entries[:limit]]
    patch, spv = out["patch_size"], out["samples_per_volume"]
    transform = Compose([
        LoadImaged(keys, reader="NumpyReader", image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        Lambda(lambda d: {**d, "hr": d["hr"] / d["scale"], "lr": d["lr"] / d["scale"]}),
        RandSpatialCropSamplesd(keys, roi_size=[patch] * 3, num_samples=spv, random_size=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=(0, 1)),
    ])
    reset_peak_rss()
    start = time.perf_counter()
    dataset = CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
    cache_s = time.perf_counter() - start
    set_track_meta(False)
    try:
        loader = ThreadDataLoader(dataset, batch_size=1, shuffle=True, num_workers=0)
        want = batches * out["batch_size"]
        patches = 0
        start = time.perf_counter()
        while patches < want:
            for batch in loader:
                patches += int(batch["hr"].shape[0])
                if patches >= want:
                    break
        seconds = time.perf_counter() - start
    finally:
        set_track_meta(True)
    return {"path": "monai", "augment": "paper", "sampler": "uniform", "workers": 0, "subjects": len(items),
            "cache_seconds": cache_s, "patches": patches, "seconds": seconds, "patches_per_s": patches / seconds,
            "main_peak_rss_mb": round(peak_rss_bytes() / MB, 1)}


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each ``new`` row's rate over the ``today`` row of the same augment and sampler (w = 0), and
    over MONAI's (``paper``)."""
    def rate(path: str, augment: str, sampler: str) -> float | None:
        for r in rows:
            key = (r["path"], r["augment"], r["sampler"], r["workers"], r.get("cache", "warm"), r.get("device_step", True))
            if key == (path, augment, sampler, 0, "warm", True):
                return r["patches_per_s"]
        return None

    for r in rows:
        if r["path"] != "new":
            continue
        today, monai = rate("today", r["augment"], r["sampler"]), rate("monai", r["augment"], r["sampler"])
        r["vs_today"] = r["patches_per_s"] / today if today else None
        r["vs_monai"] = r["patches_per_s"] / monai if monai else None
