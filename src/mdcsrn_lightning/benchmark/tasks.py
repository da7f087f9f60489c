"""The ``mdcsrn-bench`` tasks: side-by-side inference engines, training steps, the patch
queue, and the exact whole-volume pass. Each returns a JSON-ready dict; tables in
:mod:`.report`.

Timing rule: every setting of a task is built in one process and timed in alternating
rounds (each round runs each setting once, the order rotating), so the ratios between
settings hold even on a shared, noisy machine. Memory is measured apart (``memory``):
``subprocess`` runs each setting in a fresh process (absolute peak RSS, not biased by the
other settings), ``inprocess`` reports the RSS increase during one call (CPU: peak reset
through ``/proc/self/clear_refs``), ``none`` skips it. On CUDA, memory is
``torch.cuda.max_memory_allocated`` in the process.

Every inference run is an inferer of :func:`~mdcsrn_lightning.inference.build.build_inferer`,
built from the :class:`~mdcsrn_lightning.inference.options.InferenceOptions` of its row
(:mod:`.settings`); measured figures: docs/performance.md.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdcsrn_lightning.benchmark.measure import (
    PeakMemory,
    alternate,
    conv_macs_per_voxel,
    gemm_gflops,
    run_probe,
    summarize,
)
from mdcsrn_lightning.benchmark.settings import (
    Unavailable,
    build_net,
    infer_inferer,
    make_input,
    make_train_step,
    options_dict,
    options_label,
    run_volumes,
)
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.models import count_parameters

__all__ = ["infer_task", "queue_task", "train_task", "volume_task"]

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"[mdcsrn-bench] {msg}", file=sys.stderr, flush=True)


def _memory(
    mode: str, spec: dict[str, Any], device: torch.device, call: Callable[[], Any], log: Log
) -> dict[str, Any]:
    if mode in ("none", None, False):
        return {}
    if mode == "subprocess" and device.type == "cpu":
        log(f"memory probe (fresh process): {spec['setting']}")
        result = run_probe(spec)
        if "error" in result:
            return {"memory_error": result["error"]}
        keys = ("peak_rss_mb", "rss_increase_mb", "setup_peak_rss_mb")
        return {k: result[k] for k in keys if k in result}
    if mode in ("inprocess", "subprocess"):
        with PeakMemory(device) as mem:
            call()
        return mem.as_dict()
    raise ValueError(f"bench.memory must be none, inprocess or subprocess, got {mode!r}")


# --------------------------------------------------------------------------- infer
def infer_task(
    model_cfg: dict[str, Any],
    *,
    engines: Sequence[str] = ("torch",),
    size: Sequence[int] = (32, 32, 32),
    batch: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "auto",
    memory: str = "inprocess",
    slab: int | None = 16,
    seed: int = 0,
    gemm_size: int = 2048,
    log: Log = _stderr,
) -> dict[str, Any]:
    """``batch`` volumes of ``size`` super-resolved by each setting, side by side.

    Each setting (:data:`~.settings.INFER_SETTINGS`) is an inferer made by
    :func:`~mdcsrn_lightning.inference.build.build_inferer` (:func:`~.settings.infer_options`:
    patch settings run each volume as one patch, i.e. one forward pass); each is checked
    against the plain reference generator's output."""
    from mdcsrn_lightning.inference.patches import resolve_device  # not at import: it loads TorchIO

    dev = resolve_device(device)
    net = build_net(model_cfg, seed).eval().to(dev)
    size = [int(s) for s in size]
    x = make_input(batch, size, seed)
    result = _infer_header(net, x, size, dev)
    macs = conv_macs_per_voxel(net) * result["voxels"]
    inferers, outputs, rows = _ready_inferers(engines, net, x, size, dev, slab, warmup, log)
    reference = outputs.get("reference")
    if reference is None:
        reference = run_volumes(infer_inferer("reference", net, size, dev), x)
    times, gemm_peak, result["gemm"] = _timed_rounds(inferers, x, int(repeats), int(gemm_size), dev, log)
    spec = {"task": "infer", "model": model_cfg, "seed": seed, "size": size, "batch": int(batch),
            "device": str(dev), "threads": torch.get_num_threads(), "slab": slab}
    for name, inferer in inferers.items():
        row = rows[name]
        row.update(_infer_figures(times, name, 2 * macs, gemm_peak, result["voxels"]))
        row["max_abs_diff"] = float(np.abs(outputs[name] - reference).max())
        row.update(_memory(memory, {**spec, "setting": name}, dev, lambda i=inferer: run_volumes(i, x), log))
    result["engines"] = rows
    _best_engine(result)
    return result


def _infer_header(net: torch.nn.Module, x: torch.Tensor, size: list[int], dev: torch.device) -> dict[str, Any]:
    """The infer result's fields that do not depend on a setting."""
    voxels = x.numel()
    macs = conv_macs_per_voxel(net) * voxels
    return {
        "task": "infer",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "size": size,
        "batch": int(x.shape[0]),
        "voxels": voxels,
        "conv_gmacs": round(macs / 1e9, 3),
        "conv_gflop": round(2 * macs / 1e9, 3),
    }


def _ready_inferers(
    engines: Sequence[str], net: torch.nn.Module, x: torch.Tensor, size: list[int], dev: torch.device,
    slab: int | None, warmup: int, log: Log,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Each setting's inferer, built and warmed up (the first call's output kept), or a
    ``skipped`` row with the reason."""
    inferers: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in engines:
        start = time.perf_counter()
        try:
            inferer = infer_inferer(name, net, size, dev, slab)
            outputs[name] = run_volumes(inferer, x)
            for _ in range(max(0, int(warmup) - 1)):
                run_volumes(inferer, x)
        except Unavailable as exc:
            rows[name] = {"skipped": str(exc)}
            log(f"{name}: skipped ({exc})")
            continue
        inferers[name] = inferer
        rows[name] = {"setup_seconds": round(time.perf_counter() - start, 2)}
        log(f"{name}: ready in {rows[name]['setup_seconds']} s ({inferer.name})")
    return inferers, outputs, rows


def _timed_rounds(
    inferers: dict[str, Any], x: torch.Tensor, repeats: int, gemm_size: int, dev: torch.device, log: Log
) -> tuple[dict[str, list[float]], float, dict[str, Any]]:
    """Seconds of each inferer in alternating rounds (a GEMM-peak probe before each round), the
    GEMM peak and its summary."""
    gemm: list[float] = []

    def probe_gemm(_: int) -> None:
        gemm.append(gemm_gflops(gemm_size, device=dev))

    times = alternate({n: (lambda i=i: run_volumes(i, x)) for n, i in inferers.items()}, repeats, probe_gemm, dev, log)
    peak = max(gemm) if gemm else gemm_gflops(gemm_size, device=dev)
    median = statistics.median(gemm) if gemm else peak
    return times, peak, {"n": gemm_size, "gflops_peak": round(peak, 1), "gflops_median": round(median, 1)}


def _infer_figures(times: dict[str, list[float]], name: str, flop: int, gemm_peak: float, voxels: int) -> dict[str, Any]:
    """Timing, throughput, share of the GEMM peak and speed-up vs the reference of ``name``."""
    row: dict[str, Any] = dict(summarize(times[name]))
    med, best = row["seconds_median"], row["seconds_min"]
    row["mvox_per_s"] = voxels / med / 1e6
    row["gflops"] = flop / med / 1e9
    row["gflops_best"] = flop / best / 1e9
    row["peak_share"] = row["gflops"] / gemm_peak
    row["peak_share_best"] = row["gflops_best"] / gemm_peak
    ref_times = times.get("reference")
    if ref_times:
        row["speedup_vs_reference"] = statistics.median(ref_times) / med
        row["speedup_vs_reference_best"] = min(ref_times) / best
    return row


def _best_engine(result: dict[str, Any]) -> None:
    """The top-level figures: the fastest setting's (per-setting ones are under ``engines``)."""
    timed = {n: r for n, r in result["engines"].items() if "seconds_median" in r}
    if timed:
        best_name = min(timed, key=lambda n: timed[n]["seconds_median"])
        result["best_engine"] = best_name
        result["seconds_median"] = timed[best_name]["seconds_median"]
        result["seconds_min"] = timed[best_name]["seconds_min"]
        result["voxels_per_second"] = result["voxels"] / timed[best_name]["seconds_median"]


# --------------------------------------------------------------------------- train
def train_task(
    model_cfg: dict[str, Any],
    *,
    settings: Sequence[str] = ("reference", "torch", "channels_last", "memory_efficient"),
    batches: Sequence[Sequence[int]] = ((6, 40), (1, 40)),
    repeats: int = 3,
    warmup: int = 1,
    device: str = "auto",
    memory: str = "subprocess",
    seed: int = 0,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Seconds per Adam step (L1 loss) of each setting at each ``(batch, patch)``."""
    from mdcsrn_lightning.inference.patches import resolve_device

    dev = resolve_device(device)
    result: dict[str, Any] = {"task": "train", "device": str(dev), "threads": torch.get_num_threads(), "runs": []}
    for batch, patch in batches:
        batch, patch = int(batch), int(patch)
        steps: dict[str, Callable[[], float]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for name in settings:
            start = time.perf_counter()
            try:
                step = make_train_step(name, model_cfg, batch, patch, dev, seed)
                for _ in range(max(1, int(warmup))):
                    step()
            except Unavailable as exc:
                rows[name] = {"skipped": str(exc)}
                continue
            steps[name] = step
            rows[name] = {"setup_seconds": round(time.perf_counter() - start, 2)}
            log(f"train {batch}x{patch}^3 {name}: ready in {rows[name]['setup_seconds']} s")
        times = alternate({n: s for n, s in steps.items()}, int(repeats), None, dev, log)
        ref = times.get("reference")
        for name, step in steps.items():
            row = rows[name]
            row.update(summarize(times[name]))
            row["patches_per_s"] = batch / row["seconds_median"]
            if ref:
                row["speedup_vs_reference"] = statistics.median(ref) / row["seconds_median"]
                row["speedup_vs_reference_best"] = min(ref) / row["seconds_min"]
            spec = {
                "task": "train", "setting": name, "model": model_cfg, "seed": seed, "batch": batch,
                "patch": patch, "device": str(dev), "threads": torch.get_num_threads(),
            }
            row.update(_memory(memory, spec, dev, step, log))
        del steps
        ref_peak = rows.get("reference", {}).get("peak_rss_mb") or rows.get("reference", {}).get("peak_cuda_allocated_mb")
        for row in rows.values():
            peak = row.get("peak_rss_mb") or row.get("peak_cuda_allocated_mb")
            if ref_peak and peak:
                row["peak_vs_reference"] = peak / ref_peak
            inc, ref_inc = row.get("rss_increase_mb"), rows.get("reference", {}).get("rss_increase_mb")
            if inc and ref_inc:
                row["increase_vs_reference"] = inc / ref_inc
        timed = {n: r for n, r in rows.items() if "seconds_median" in r and n != "reference"}
        run = {"batch": batch, "patch": patch, "settings": rows}
        if timed:
            run["best_setting"] = min(timed, key=lambda n: timed[n]["seconds_median"])
        result["runs"].append(run)
    return result


# --------------------------------------------------------------------------- queue
def queue_task(
    data_cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    *,
    batches: int = 40,
    consume_settings: Sequence[str] = ("torch", "channels_last+compile"),
    consume_repeats: int = 2,
    device: str = "auto",
    seed: int = 0,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Patches/s the TorchIO queue delivers vs patches/s a training step consumes."""
    from hydra.utils import instantiate

    from mdcsrn_lightning.inference.patches import resolve_device

    dev = resolve_device(device)
    cfg = dict(data_cfg)
    tmp = tempfile.mkdtemp(prefix="mdcsrn-bench-queue-")
    cfg["split_file"] = str(Path(tmp) / "split.json")
    cfg["cache_dir"] = None
    start = time.perf_counter()
    dm = instantiate(cfg)
    dm.prepare_data()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    log(f"queue: data module ready in {setup_s:.1f} s")
    n, delivered, first_batch_s, seconds = _deliver(dm, batches)
    hp = dm.hparams
    batch_size = int(hp.batch_size)
    patch = int(dm.patch_size[0])
    queue = {
        "setup_seconds": round(setup_s, 2),
        "batches": n,
        "patches": delivered,
        "seconds": seconds,
        "first_batch_seconds": first_batch_s,
        "patches_per_s": delivered / seconds,
        "batch_size": batch_size,
        "patch_size": patch,
        "samples_per_volume": hp.samples_per_volume,
        "queue_length": hp.queue_length,
        "num_workers": hp.num_workers,
    }
    log(f"queue: {delivered} patches in {seconds:.1f} s")
    train = train_task(
        model_cfg, settings=consume_settings, batches=[(batch_size, patch)], repeats=consume_repeats,
        warmup=1, device=str(dev), memory="none", seed=seed, log=log,
    )
    consume = {
        name: {"seconds_per_step": row["seconds_median"], "patches_per_s": row["patches_per_s"]}
        for name, row in train["runs"][0]["settings"].items()
        if "seconds_median" in row
    }
    fastest = max(consume.values(), key=lambda r: r["patches_per_s"]) if consume else None
    return {
        "task": "queue",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "queue": queue,
        "consume": consume,
        "ratio_vs_fastest_step": queue["patches_per_s"] / fastest["patches_per_s"] if fastest else None,
    }


def _deliver(dm: Any, batches: int) -> tuple[int, int, float | None, float]:
    """Draw ``batches`` training batches from ``dm`` (epochs as needed): batches, patches,
    seconds to the first batch, seconds in all."""
    delivered = 0
    first_batch_s = None
    epoch = 0
    start = time.perf_counter()
    n = 0
    while n < batches:
        dm.set_epoch(epoch) if hasattr(dm, "set_epoch") else None
        for batch in dm.train_dataloader():
            batch = dm.on_after_batch_transfer(batch, 0)  # augment_on=device: the device's step, on the CPU here
            delivered += int(batch["lr"]["data"].shape[0])
            n += 1
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - start
            if n >= batches:
                break
        epoch += 1
    return n, delivered, first_batch_s, time.perf_counter() - start


# --------------------------------------------------------------------------- volume
def _mni_volume(shape: Sequence[int], factors: Sequence[float]) -> np.ndarray:
    """The MNI152 template (nilearn wheel), degraded as the training LR, centre-cropped or
    zero-padded to ``shape``, divided by its 99.9th percentile."""
    from nilearn.datasets import load_mni152_template

    from mdcsrn_lightning.data.degradation import degrade

    hr = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.float32)
    src, dst = [], []
    for n, m in zip(hr.shape, out.shape):
        a = max(0, (n - m) // 2)
        b = max(0, (m - n) // 2)
        length = min(n, m)
        src.append(slice(a, a + length))
        dst.append(slice(b, b + length))
    out[tuple(dst)] = hr[tuple(src)]
    lr = np.asarray(degrade(out, factors=factors), dtype=np.float32)
    return lr / np.float32(np.percentile(lr, 99.9))


def volume_task(
    model_cfg: dict[str, Any],
    *,
    shape: Sequence[int] = (181, 217, 181),
    slab: int = 16,
    crop: int = 96,
    patches_check: bool = True,
    block_engine: str | None = "openvino",
    block_slab: int = 16,
    engine_patches: Sequence[int] | None = None,
    factors: Sequence[float] = (2, 2, 1),
    device: str = "cpu",
    seed: int = 0,
    workdir: str | None = None,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Exact whole-volume passes side by side, each in a fresh process (seconds including
    any compilation, peak RSS). Every run is an inferer made by
    :func:`~mdcsrn_lightning.inference.build.build_inferer` from the options of its row
    (:func:`_volume_options`): the eager streamed pass (``stream``: ``stream=true
    engine=torch``, ``slab``), the block-streamed pass (``block``: ``stream=true
    engine=<block_engine>``, ``block_slab`` slices per call; ``None`` skips it) and, with
    ``engine_patches`` (a patch size), patch inference with ``margin="auto"`` fed to the
    OpenVINO engine (``engine_patches``; the other exact design). Checks of each output:

    * ``crops``: the plain reference net on ``crop^3`` sub-volumes at two corners and the
      centre; inside each crop, voxels at least ``receptive_field_radius()`` from every
      face that lies inside the volume see exactly what the whole-volume pass sees, so
      there the two must agree (max abs difference reported);
    * ``patches``: eager patch inference with ``margin="auto"`` over the whole volume (patches
      of about half the volume plus the margin along each axis, overlapping along all three)
      against the streamed whole-volume output.
    """
    from mdcsrn_lightning.inference.patches import resolve_device

    dev = resolve_device(device)
    folder = Path(workdir or tempfile.mkdtemp(prefix="mdcsrn-bench-volume-"))
    folder.mkdir(parents=True, exist_ok=True)
    volume = _mni_volume(shape, factors)
    np.save(folder / "input.npy", volume)
    net = build_net(model_cfg, seed).eval()
    result = _volume_header(net, volume, dev, slab)
    radius = result["receptive_field_radius"]
    base = {"task": "volume", "model": model_cfg, "seed": seed, "device": str(dev),
            "threads": torch.get_num_threads(), "input": str(folder / "input.npy"), "slab": slab}
    rows = _volume_options(volume.shape, radius, str(dev), slab, block_engine, block_slab, engine_patches, patches_check)
    log(f"volume {list(volume.shape)}: streamed whole-volume pass (fresh process)")
    stream = _volume_probe(base, rows.pop("stream"), folder / "stream.npy")
    result["stream"] = stream
    if "error" in stream:
        return result
    macs = conv_macs_per_voxel(net) * volume.size
    stream["mvox_per_s"] = volume.size / stream["seconds"] / 1e6
    stream["gflops"] = 2 * macs / stream["seconds"] / 1e9
    out = np.load(folder / "stream.npy")
    crops = _Crops(net, volume, crop, radius, log)
    result["crops"] = crops.check(out, "stream")
    result["crops_max_abs_diff"] = max(c["max_abs_diff"] for c in result["crops"])
    patches = rows.pop("patches", None)
    for key, (options, extra) in rows.items():
        log(f"volume: {options_label(options)} (fresh process)")
        result[key] = _other_pass(base, (options, extra), folder / f"{key}.npy", stream, out, crops.check)
    if patches is not None:
        log(f"patch inference, margin=auto ({radius}), patches {patches[1]['patch_size']} (fresh process)")
        result["patches"] = _patches_pass(base, patches, folder / "patches.npy", out)
    return result


_Row = tuple[InferenceOptions, dict[str, Any]]


def _volume_options(
    shape: Sequence[int], radius: int, device: str, slab: int, block_engine: str | None, block_slab: int,
    engine_patches: Sequence[int] | None, patches_check: bool,
) -> dict[str, _Row]:
    """The volume task's rows: each one's options and the fields its result row repeats."""
    rows: dict[str, _Row] = {"stream": (InferenceOptions(stream=True, engine="torch", slab=int(slab), device=device), {})}
    if block_engine:
        options = InferenceOptions(stream=True, engine=block_engine, slab=int(block_slab), device=device)  # type: ignore[arg-type]
        rows["block"] = (options, {"block_slab": int(block_slab)})
    if engine_patches:
        patch = [int(p) for p in engine_patches]
        rows["engine_patches"] = (InferenceOptions(engine="openvino", patch_size=patch, margin="auto", device=device),
                                  {"patch_size": patch})
    if patches_check:
        patch = [min(int(n), math.ceil((int(n) + 2 * radius) / 2)) for n in shape]
        rows["patches"] = (InferenceOptions(engine="torch", patch_size=patch, margin="auto", device=device),
                           {"patch_size": patch, "margin": radius})
    return rows


def _volume_header(net: torch.nn.Module, volume: np.ndarray, dev: torch.device, slab: int) -> dict[str, Any]:
    """The volume result's fields that do not depend on a pass."""
    macs = conv_macs_per_voxel(net) * volume.size
    plain_bytes = 4 * volume.size * (net.reconstruction[0].in_channels)  # type: ignore[index]
    return {
        "task": "volume",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "shape": list(volume.shape),
        "params": count_parameters(net),
        "receptive_field_radius": int(net.receptive_field_radius()),  # type: ignore[operator]
        "slab": slab,
        "conv_gflop": round(2 * macs / 1e9, 1),
        "plain_reconstruction_input_gb": round(plain_bytes / 1e9, 1),
    }


def _volume_probe(base: dict[str, Any], row: _Row, output: Path) -> dict[str, Any]:
    """One pass in a fresh process: the inferer that ``row``'s options give, its output saved to ``output``."""
    options = row[0]
    result = run_probe({**base, "setting": options_label(options), "options": options_dict(options), "output": str(output)})
    if "error" not in result:
        result["options"] = options_dict(options)
    return result


def _other_pass(
    base: dict[str, Any], row: _Row, output: Path, stream: dict[str, Any], streamed: np.ndarray,
    crop_checks: Callable[[np.ndarray, str], list[dict[str, Any]]],
) -> dict[str, Any]:
    """A pass beside the streamed one: its time and its checks against the crops and the stream."""
    result = _volume_probe(base, row, output)
    if "error" in result:
        return result
    result.update(row[1])
    other = np.load(output)
    result["mvox_per_s"] = other.size / result["seconds"] / 1e6
    result["speedup_vs_stream"] = stream["seconds"] / result["seconds"]
    result["crops"] = crop_checks(other, output.stem)
    result["crops_max_abs_diff"] = max(c["max_abs_diff"] for c in result["crops"])
    result["max_abs_diff_vs_stream"] = float(np.abs(other - streamed).max())
    return result


def _patches_pass(base: dict[str, Any], row: _Row, output: Path, streamed: np.ndarray) -> dict[str, Any]:
    """margin=auto patches over the whole volume, checked against the streamed output."""
    result = _volume_probe(base, row, output)
    if "error" not in result:
        result.update(row[1])
        result["max_abs_diff_vs_stream"] = float(np.abs(np.load(output) - streamed).max())
    return result


class _Crops:
    """The plain reference net on ``crop^3`` sub-volumes at two corners and the centre, and the
    region of each crop where a whole-volume pass must agree with it."""

    def __init__(self, net: torch.nn.Module, volume: np.ndarray, crop: int, radius: int, log: Log) -> None:
        from mdcsrn_lightning.models.reference import ReferenceMDCSRN

        ref = ReferenceMDCSRN.from_mdcsrn(net).eval()
        self.crop, self.log = crop, log
        starts = [(0, 0, 0), tuple((n - crop) // 2 for n in volume.shape), tuple(n - crop for n in volume.shape)]
        self.plains = []
        for st in starts:
            sl = tuple(slice(s, s + crop) for s in st)
            with torch.inference_mode():
                plain = ref(torch.from_numpy(np.ascontiguousarray(volume[sl]))[None, None])[0, 0].numpy()
            inner = tuple(slice(0 if s == 0 else radius, crop if s + crop == n else crop - radius)
                          for s, n in zip(st, volume.shape))
            self.plains.append((st, sl, inner, plain))

    def check(self, output: np.ndarray, name: str) -> list[dict[str, Any]]:
        checks = []
        for st, sl, inner, plain in self.plains:
            diff = float(np.abs(plain[inner] - output[sl][inner]).max())
            checks.append({"crop_start": list(st), "crop": self.crop, "exact_region": [[i.start, i.stop] for i in inner],
                           "max_abs_diff": diff})
            self.log(f"{name}: crop at {st}: max abs diff {diff:.2e}")
        return checks
