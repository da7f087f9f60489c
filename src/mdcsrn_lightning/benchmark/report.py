"""Markdown tables of ``mdcsrn-bench`` results (for the README / docs/performance.md)."""

from __future__ import annotations

import platform
from typing import Any

import torch

__all__ = ["machine", "markdown"]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": _cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("onnxruntime", "openvino"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return info


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count()


def _f(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt)


def _mem(row: dict[str, Any]) -> str:
    if "peak_rss_mb" in row:
        inc = row.get("rss_increase_mb")
        return f"{row['peak_rss_mb']:.0f}" + (f" (+{inc:.0f})" if inc is not None else "")
    if "peak_cuda_allocated_mb" in row:
        return f"{row['peak_cuda_allocated_mb']:.0f}"
    return row.get("memory_error", "-")


def markdown(result: dict[str, Any]) -> str:
    task = result.get("task")
    if task == "infer":
        return _infer(result)
    if task == "train":
        return _train(result)
    if task == "queue":
        return _queue(result)
    if task == "volume":
        return _volume(result)
    if task == "data":
        return _data(result)
    return ""


def _infer(r: dict[str, Any]) -> str:
    gemm = r.get("gemm", {})
    head = (
        f"Inference, {r.get('model_name', '')} eval, input {r['batch']}x1x{'x'.join(map(str, r['size']))}, "
        f"{r['device']}, {r['threads']} threads; conv work {r['conv_gflop']:.1f} GFLOP per pass; "
        f"GEMM peak ({gemm.get('n')}^2 fp32 matmul, same run) {gemm.get('gflops_peak')} GFLOP/s "
        f"(median {gemm.get('gflops_median')}).\n\n"
    )
    lines = [
        "| engine | median s | min s | Mvox/s | conv GFLOP/s | % of GEMM peak | speed-up vs reference | max abs diff vs reference | peak memory MB (increase) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in r.get("engines", {}).items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row['seconds_median']:.3f} | {row['seconds_min']:.3f} | {row['mvox_per_s']:.4f} | "
            f"{row['gflops']:.1f} | {100 * row['peak_share']:.0f}% | {_f(row.get('speedup_vs_reference'), '.2f')}x | "
            f"{row['max_abs_diff']:.1e} | {_mem(row)} |"
        )
    return head + "\n".join(lines) + "\n"


def _train(r: dict[str, Any]) -> str:
    out = []
    for run in r.get("runs", []):
        out.append(
            f"Training step (Adam, L1), {r.get('model_name', '')}, batch {run['batch']} of {run['patch']}^3, "
            f"{r['device']}, {r['threads']} threads.\n"
        )
        out.append("| setting | median s/step | min s/step | patches/s | speed-up vs reference | peak memory MB (increase) | peak vs reference |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, row in run["settings"].items():
            if "skipped" in row:
                out.append(f"| {name} | skipped: {row['skipped']} | | | | | |")
                continue
            out.append(
                f"| {name} | {row['seconds_median']:.2f} | {row['seconds_min']:.2f} | {row['patches_per_s']:.3f} | "
                f"{_f(row.get('speedup_vs_reference'), '.2f')}x | {_mem(row)} | {_f(row.get('peak_vs_reference'), '.0%')} |"
            )
        out.append("")
    if r.get("curves"):
        out.append(_curves(r["curves"]))
    return "\n".join(out)


def _curves(c: dict[str, Any]) -> str:
    """The same training run per precision: loss windows, validation PSNR, held-out test PSNR."""
    runs = c.get("runs", {})
    names = list(runs)
    extra = (" " + " ".join(c["overrides"])) if c.get("overrides") else ""
    out = [
        f"Accuracy: `mdcsrn-train experiment={c['experiment']}{extra}` once per precision (same seed), "
        f"training L1 loss averaged over {c['window']}-step windows.\n",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for name in names:
        if "error" in runs[name]:
            out.append(f"| {name} | failed: {runs[name]['error']} |" + " |" * (len(names) - 1))
    ok = [n for n in names if "error" not in runs[n]]
    if not ok:
        return "\n".join(out) + "\n"

    def cells(fn: Any) -> str:
        return " | ".join(fn(runs[n]) if n in ok else "-" for n in names)

    windows = max(len(runs[n]["loss_windows"]) for n in ok)
    for i in range(windows):
        w = next(runs[n]["loss_windows"][i] for n in ok if i < len(runs[n]["loss_windows"]))
        out.append(f"| train loss, steps {w['steps_from']}-{w['steps_to']} | " + cells(
            lambda r, i=i: f"{r['loss_windows'][i]['mean']:.5f}" if i < len(r["loss_windows"]) else "-") + " |")
    val_steps = sorted({int(s) for n in ok for s, _ in runs[n]["val_psnr"]})
    for step in val_steps:
        out.append(f"| val PSNR (dB) at step {step} | " + cells(
            lambda r, step=step: next((f"{v:.3f}" for s, v in r["val_psnr"] if int(s) == step), "-")) + " |")
    out.append("| **test PSNR (dB), held out** | " + cells(lambda r: f"**{r['test_psnr']:.3f}**") + " |")
    out.append("| test SSIM | " + cells(lambda r: f"{r['test_ssim']:.4f}") + " |")
    out.append(f"| test PSNR minus {names[0]} (dB) | " + cells(lambda r: _f(r.get("psnr_diff_vs_first"), "+.3f")) + " |")
    out.append("| best interpolation baseline (PSNR dB) | " + cells(
        lambda r: f"{r['best_baseline']} {r['best_baseline_psnr']:.3f}" if r.get("best_baseline") else "-") + " |")
    out.append("| steps | " + cells(lambda r: str(r["steps"])) + " |")
    out.append(f"| run wall time s (fit, validation, test; speed-up vs {names[0]}) | " + cells(
        lambda r: f"{r['seconds']:.0f} ({_f(r.get('seconds_vs_first'), '.2f')}x)") + " |")
    return "\n".join(out) + "\n"


def _queue(r: dict[str, Any]) -> str:
    q = r["queue"]
    lines = [
        f"Patch queue (SRDataModule, {q['patch_size']}^3 patches, batch {q['batch_size']}, queue {q['queue_length']}, "
        f"{q['num_workers']} workers) vs a b4u4 training step, {r['device']}, {r['threads']} threads.\n",
        "| what | patches/s |",
        "|---|---:|",
        f"| queue delivers ({q['patches']} patches, {q['seconds']:.1f} s, first batch {q['first_batch_seconds']:.1f} s) | {q['patches_per_s']:.1f} |",
    ]
    for name, row in r.get("consume", {}).items():
        lines.append(f"| training step consumes ({name}, {row['seconds_per_step']:.2f} s/step) | {row['patches_per_s']:.3f} |")
    ratio = r.get("ratio_vs_fastest_step")
    if ratio:
        lines.append(f"| **ratio** (queue / fastest step) | **{ratio:.0f}x** |")
    return "\n".join(lines) + "\n"


def _volume(r: dict[str, Any]) -> str:
    s = r.get("stream", {})
    lines = [
        f"Exact whole-volume inference, {r.get('model_name', '')}, {'x'.join(map(str, r['shape']))} volume "
        f"(receptive field radius {r['receptive_field_radius']}; the plain pass's reconstruction input alone is "
        f"{r['plain_reconstruction_input_gb']} GB), {r['device']}, {r['threads']} threads.\n",
        "| pass | seconds | Mvox/s | peak RSS MB | max abs diff |",
        "|---|---:|---:|---:|---:|",
    ]
    if "error" in s:
        lines.append(f"| streamed (slab {r['slab']}) | failed: {s['error']} | | | |")
        return "\n".join(lines) + "\n"
    lines.append(
        f"| streamed whole volume (slab {r['slab']}) | {s['seconds']:.0f} | {s['mvox_per_s']:.3f} | {s['peak_rss_mb']:.0f} | "
        f"{r.get('crops_max_abs_diff', float('nan')):.1e} vs plain reference on {len(r.get('crops', []))} crops of {r.get('crops', [{}])[0].get('crop', '-')}^3 |"
    )
    for key, label in (("block", "block-streamed, {engine} (slab {slab})"), ("engine_patches", "patches {size}, margin=auto, openvino")):
        row = r.get(key)
        if not row:
            continue
        name = label.format(engine=row.get("options", {}).get("engine", "?"), slab=row.get("block_slab"),
                            size="x".join(map(str, row.get("patch_size", []))))
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {row['seconds']:.0f} ({row['speedup_vs_stream']:.2f}x) | {row['mvox_per_s']:.3f} | "
            f"{row['peak_rss_mb']:.0f} | {row['crops_max_abs_diff']:.1e} vs plain reference on crops; "
            f"{row['max_abs_diff_vs_stream']:.1e} vs streamed |"
        )
    p = r.get("patches")
    if p and "error" not in p:
        lines.append(
            f"| patches {'x'.join(map(str, p['patch_size']))}, margin=auto ({p['margin']}) | {p['seconds']:.0f} | "
            f"{r['shape'][0] * r['shape'][1] * r['shape'][2] / p['seconds'] / 1e6:.3f} | {p['peak_rss_mb']:.0f} | "
            f"{p['max_abs_diff_vs_stream']:.1e} vs streamed |"
        )
    elif p:
        lines.append(f"| patches, margin=auto | failed: {p['error']} | | | |")
    return "\n".join(lines) + "\n"


def _data(r: dict[str, Any]) -> str:
    runs = r.get("runs", [])
    ok = [x for x in runs if "error" not in x]
    first = ok[0] if ok else {}
    shape = "x".join(map(str, r.get("volume_shape", []))) or "?"
    lines = [
        f"Data pipeline at cohort scale: {r['root']} ({shape} volumes; one subject's HR + LR in float32 "
        f"S = {first.get('subject_mb', '-')} MB), {first.get('patch_size', '-')}^3 patches, batch {first.get('batch_size', '-')}, "
        f"queue {first.get('queue_length', '-')}, {first.get('samples_per_volume', '-')} patches per subject; "
        f"{r['device']}, {r['threads']} threads. Each N in a fresh process, from an empty disk cache. `new`: the "
        "data module (memory-mapped crops; batched augmentation run on the CPU device in the timed loop); "
        "`today`: the pipeline before it; `raw`: HR + LR crops copied out of memory maps (this machine's limit); "
        "`monai`: MONAI's CacheDataset + RandSpatialCropSamplesd + ThreadDataLoader on the same files. "
        "Supply / GPU: patches/s over the **estimated** GPU demand below.\n",
        "| N (train) | setup s/subject | cache MB/subject | setup peak RSS MB (bound) | path | augment | sampler | "
        "workers | page cache | **patches/s** | x today | x MONAI | supply / GPU (est.) | main peak RSS MB (bound) |",
        "|---|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        n = run.get("subjects", "?")
        if "error" in run:
            lines.append(f"| {n} | failed: {run['error']} |" + " |" * 12)
            continue
        bounds = {c["what"]: c["bound_mb"] for c in run["rss_checks"]}
        head = (
            f"| {n} ({run['split'].get('train', '-')}) | {run['setup_seconds_per_subject']:.1f} | "
            f"{run['cache_mb_per_subject']:.0f} | {run['setup_peak_rss_mb']:.0f} ({bounds['setup']:.0f}) |"
        )
        for i, q in enumerate(run["queue"]):
            lead = head if i == 0 else "| | | | |"
            name = f"{q['path']} {q['augment']} {q['sampler']} w={q['workers']}" + (" cold" if q.get("cache") == "cold" else "")
            name += " loader only" if q.get("device_step", True) is False else ""
            bound = bounds.get(name)
            peak = q.get("main_peak_rss_mb")
            mem = "" if peak is None else f"{peak:.0f}" + (f" ({bound:.0f})" if bound is not None else "")
            what = q["path"] + (f" ({q['subjects']} subjects)" if q["path"] == "monai" else "")
            what += " (loader only)" if q.get("device_step", True) is False else ""
            lines.append(
                f"{lead} {what} | {q['augment']} | {q['sampler']} | {q['workers']} | {q.get('cache', 'warm')} | "
                f"**{q['patches_per_s']:.1f}** | {_f(q.get('vs_today'), '.1f')} | {_f(q.get('vs_monai'), '.1f')} | "
                f"{_f(q.get('supply_over_gpu_estimate'), '.2f')} | {mem} |"
            )
    d = r.get("demand")
    if d:
        name = r.get("model_name", "generator")
        lines.append(
            f"| **demand** | {name} training step, batch {d['batch']} of {d['patch']}^3 "
            f"({d['step_tflop']} TFLOP) | | | | | | | CPU measured: {d['cpu_seconds_per_step']:.2f} s/step | "
            f"{d['cpu_patches_per_s']:.2f} | | | | |"
        )
        lines.append(
            f"| **demand** | same step on a GPU, **estimate** (conv FLOPs at an assumed "
            f"{d['gpu_assumed_tflops']:g} TFLOP/s) | | | | | | | {d['gpu_seconds_per_step_estimate']:.3f} s/step | "
            f"{d['gpu_patches_per_s_estimate']:.0f} | | | | |"
        )
    flat = r.get("rss_flat_in_n")
    if flat:
        queue = (
            f"queue {flat['queue_spread_mb']:.0f} MB over N = {flat['queue_compared']}"
            if flat["queue_spread_mb"] is not None else "queue: fewer than two N fill the queue, not compared"
        )
        lines.append(
            f"\nPeak RSS spread over N: setup {flat['setup_spread_mb']:.0f} MB, {queue}; limit max(S, 32 MB) "
            f"= {max(flat['subject_mb'], 32):.0f} MB: {'flat' if flat['flat'] else 'NOT flat'} in N. "
            f"Every peak within its bound: {'yes' if flat['all_within_bound'] else 'NO'} (bounds: benchmark/data_bench.py)."
        )
    return "\n".join(lines) + "\n"
