"""Measuring tools of ``mdcsrn-bench``: memory, GEMM peak, conv FLOPs, alternating timing."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "PeakMemory",
    "alternate",
    "conv_macs_per_voxel",
    "gemm_gflops",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "run_probe",
    "summarize",
]

MB = 1 << 20


# --------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS of this process (since start, or since :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover
    return usage if sys.platform == "darwin" else usage * 1024  # pragma: no cover


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False


class PeakMemory:
    """Peak memory of a code block: CPU peak RSS (reset first where Linux allows), or on CUDA
    ``torch.cuda.max_memory_allocated``. ``before``, ``peak`` and ``increase`` in bytes."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.before = self.peak = 0
        self.exact = True

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.exact = reset_peak_rss()
            self.before = rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes()

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.before)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        kind = "cuda_allocated" if self.device.type == "cuda" else "rss"
        return {
            f"{prefix}peak_{kind}_mb": round(self.peak / MB, 1),
            f"{prefix}{kind}_increase_mb": round(self.increase / MB, 1),
        }


# --------------------------------------------------------------------------- compute
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(n: int = 2048, repeats: int = 3, device: torch.device | str = "cpu") -> float:
    """Best GFLOP/s of an ``n x n`` float32 matmul (``2 n^3`` FLOPs) over ``repeats`` tries."""
    dev = torch.device(device)
    a = torch.rand(n, n, device=dev)
    b = torch.rand(n, n, device=dev)
    a @ b  # warm-up (thread pool, cuBLAS handle)
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def conv_macs_per_voxel(net: nn.Module) -> int:
    """Multiply-accumulates of all convs per input voxel, for a net of size-preserving convs.

    A stride-1 conv with "same" padding does ``C_out * C_in/groups * prod(kernel)`` MACs
    per voxel, the number of elements of its weight. (mDCSRN: only such convs; ~481k MACs
    per voxel for b8u4 k=12, ~225k for b4u4.) BN, ELU, additions are not counted.
    """
    total = 0
    for m in net.modules():
        if isinstance(m, nn.Conv3d):
            if m.stride != (1, 1, 1) or any(2 * p + 1 != k for p, k in zip(m.padding, m.kernel_size)):  # type: ignore[arg-type]
                raise ValueError(f"conv_macs_per_voxel: {m} does not keep the grid size")
            total += m.weight.numel()
    return total


# --------------------------------------------------------------------------- timing
def alternate(
    runners: dict[str, Callable[[], Any]],
    repeats: int,
    between: Callable[[int], None] | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each runner over ``repeats`` rounds; each round runs every runner once, in
    turn (the order rotates per round), so slow drifts of the machine hit all alike.
    ``between(round)`` runs before each round (e.g. a GEMM-peak probe)."""
    dev = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        if between is not None:
            between(r)
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            _sync(dev)
            start = time.perf_counter()
            runners[name]()
            _sync(dev)
            times[name].append(time.perf_counter() - start)
            if log is not None:
                log(f"round {r + 1}/{repeats} {name}: {times[name][-1]:.3f} s")
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {"seconds_median": statistics.median(times), "seconds_min": min(times), "repeats": len(times)}


# --------------------------------------------------------------------------- probes
def run_probe(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one setting in a fresh Python process (``python -m mdcsrn_lightning.benchmark.probe``)
    and return its JSON line: peak memory of a fresh process is not biased by earlier
    settings. A failure is returned as ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "mdcsrn_lightning.benchmark.probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"probe exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])
