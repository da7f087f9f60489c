"""The accuracy side of ``mdcsrn-bench bench.task=train``: the same training run under several
``trainer.precision`` values, same seed, side by side (loss curves, validation PSNR and the
held-out test scores), each run by ``mdcsrn-train`` in a fresh process."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["precision_curves", "read_curve"]

Log = Callable[[str], None]


def read_curve(metrics_csv: Path) -> dict[str, list[list[float]]]:
    """``{"train/loss": [[step, value], ...], "val/psnr": [...]}`` from a run's ``csv/metrics.csv``."""
    if not metrics_csv.is_file():
        raise FileNotFoundError(f"{metrics_csv}: no metrics file (did the run log with the CSV logger?)")
    curves: dict[str, list[list[float]]] = {"train/loss": [], "val/psnr": []}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            for key, points in curves.items():
                value = row.get(key)
                if value not in (None, ""):
                    points.append([int(row["step"]), float(value)])
    return curves


def _windows(points: Sequence[Sequence[float]], window: int) -> list[dict[str, float]]:
    """Mean of the logged values in consecutive ``window``-step windows (the noise of single
    batches hides the trend otherwise)."""
    out: dict[int, list[float]] = {}
    for step, value in points:
        out.setdefault(int(step) // window, []).append(float(value))
    return [
        {"steps_from": k * window, "steps_to": (k + 1) * window - 1, "mean": sum(v) / len(v), "n": len(v)}
        for k, v in sorted(out.items())
    ]


def precision_curves(
    precisions: Sequence[str] = ("32-true", "bf16-mixed"),
    *,
    experiment: str = "quickstart",
    overrides: Sequence[str] = (),
    window: int = 24,
    workdir: str | None = None,
    timeout: float = 7200,
    log: Log = lambda _: None,
) -> dict[str, Any]:
    """Train ``experiment`` once per precision, one after the other, and compare.

    Each run is ``python -m mdcsrn_lightning.cli.train experiment=<experiment>
    trainer.precision=<p> logger=csv trainer.log_every_n_steps=1 <overrides>`` in
    ``<workdir>/<p>`` (same seed: the config's). Returns per precision the wall seconds of the
    whole run (fit, validation, test), the training loss averaged over ``window``-step
    windows, the validation PSNR curve and the test split's scores from ``metrics.json``;
    ``psnr_diff_vs_first`` is each run's test PSNR minus the first precision's.
    """
    if not precisions:
        raise ValueError("precision_curves: give at least one precision")
    if int(window) < 1:
        raise ValueError(f"precision_curves: window must be >= 1, got {window}")
    root = Path(workdir or tempfile.mkdtemp(prefix="mdcsrn-bench-curves-"))
    runs: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        run_dir = root / precision
        cmd = [
            sys.executable, "-m", "mdcsrn_lightning.cli.train", f"experiment={experiment}",
            f"trainer.precision={precision}", "logger=csv", "trainer.log_every_n_steps=1",
            *overrides, f"hydra.run.dir={run_dir}",
        ]
        log(f"curves: {precision}: {' '.join(cmd[2:])}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            runs[precision] = {"error": f"timed out after {timeout:.0f} s"}
            continue
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            runs[precision] = {"error": f"mdcsrn-train exit {proc.returncode}: {tail[0][:300]}"}
            continue
        curve = read_curve(run_dir / "csv" / "metrics.csv")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        methods = metrics["methods"]
        baselines = {k: v for k, v in methods.items() if k != "model"}
        best = max(baselines, key=lambda k: baselines[k]["psnr"]) if baselines else None
        losses = curve["train/loss"]
        runs[precision] = {
            "run_dir": str(run_dir),
            "seconds": round(seconds, 1),
            "steps": int(losses[-1][0]) + 1 if losses else 0,
            "loss_windows": _windows(losses, int(window)),
            "val_psnr": curve["val/psnr"],
            "test_psnr": methods["model"]["psnr"],
            "test_ssim": methods["model"]["ssim"],
            "best_baseline": best,
            "best_baseline_psnr": baselines[best]["psnr"] if best else None,
        }
        log(f"curves: {precision}: {seconds:.0f} s, test PSNR {methods['model']['psnr']:.3f} dB")
    first = runs.get(precisions[0], {})
    for row in runs.values():
        if "test_psnr" in row and "test_psnr" in first:
            row["psnr_diff_vs_first"] = row["test_psnr"] - first["test_psnr"]
        if "seconds" in row and "seconds" in first:
            row["seconds_vs_first"] = first["seconds"] / row["seconds"] if row["seconds"] else math.nan
    return {"experiment": experiment, "overrides": list(overrides), "window": int(window), "runs": runs}
