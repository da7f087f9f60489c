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
    return "\n".join(out)


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
        name = label.format(engine=str(row.get("setting", "")).split(":")[-1], slab=row.get("block_slab"),
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
