"""A ready GPU check: ``nox -s gpu`` or ``python -m mdcsrn_lightning.benchmark.gpu_check``.

On one NVIDIA GPU, in a few minutes, it checks that training and inference run there and
times them at the paper's sizes, then prints ONE markdown table (check | status | figure):

* ``device``: the GPU, torch/CUDA versions, what ``trainer.precision=auto`` picks there;
* ``fit bf16-mixed``, ``fit torch.compile``, ``fit DDP 1 device``: short ``mdcsrn-train``
  runs (the quickstart data with a b4u4 k12 model; each in a fresh process, as a user runs
  it): finite loss after every step asked for;
* ``engine <name>``: every inference engine of
  :class:`~mdcsrn_lightning.inference.options.InferenceOptions` (and bf16 autocast,
  channels_last_3d) on one 64^3 block of b8u4 against the plain reference generator, each an
  inferer of :func:`~mdcsrn_lightning.inference.build.build_inferer`; the CPU-only runtimes
  (ONNX Runtime, OpenVINO) are reported as skipped on CUDA;
* ``stream exact``: the streamed whole-volume pass (``stream=true engine=torch``) equals the
  plain forward pass (float32, TF32 off) on that block;
* ``volume <model> ...``: b4u4 and b8u4 on one 320x320x256 volume, the paper's 70^3 patches
  with a margin of 3 (fp32 and bf16; the fp32 row's figure puts the paper's GTX 1080 Ti time
  beside it, see docs/performance.md) and the exact streamed pass (``mdcsrn-infer stream=true``);
* ``train step <model> ...``: one Adam step at the paper's batch (6 of 40^3), eager
  reference, fp32, channels_last, bf16 autocast, channels_last+bf16, timed in alternating
  rounds (:func:`mdcsrn_lightning.benchmark.tasks.train_task`).

Exit status: 0 when every check passed (or was skipped with its reason), 1 when one failed,
77 (``SKIPPED``) when no CUDA GPU is visible: the check then prints why and runs nothing
(``nox -s gpu`` turns that into a skipped session, so CI without a GPU does not fail).

``--device cpu --tiny`` runs the same logic on the CPU at toy sizes (b1u2 k4, a 24^3
volume, batch 1 of 16^3): the tests use it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mdcsrn_lightning.benchmark.curves import read_curve
from mdcsrn_lightning.benchmark.measure import PeakMemory, alternate, summarize
from mdcsrn_lightning.benchmark.settings import ENGINE_NAMES, build_net
from mdcsrn_lightning.benchmark.tasks import infer_task, train_task

__all__ = ["CHECKS", "SKIPPED", "Row", "Sizes", "gpu_unavailable_reason", "main", "markdown_table", "run_checks"]

#: exit status when no CUDA GPU is visible (the automake/ctest convention for "skipped")
SKIPPED = 77
CHECKS = ("device", "fit", "compile", "ddp", "engines", "stream", "volume", "train")
Status = Literal["ok", "FAIL", "skipped"]
Log = Callable[[str], None]


def _model(blocks: int, units: int, k: int) -> dict[str, Any]:
    return {"_target_": "mdcsrn_lightning.models.mdcsrn.MDCSRN", "num_blocks": blocks, "units_per_block": units,
            "growth_rate": k}


@dataclass(frozen=True)
class Sizes:
    """What the check runs: models by name, the volume, the training batch, the fits."""

    models: dict[str, dict[str, Any]]
    engine_model: str
    block: int
    volume: tuple[int, int, int]
    patch: int
    margin: int
    slab: int
    train_batch: tuple[int, int]
    fit_steps: int
    fit_overrides: tuple[str, ...]
    repeats: int


#: the paper's sizes: b4u4 and b8u4 (k=12), a 320x320x256 HCP volume, 70^3 patches with a
#: margin of 3, batch 6 of 40^3; fits of 24 steps on the quickstart data with b4u4
FULL = Sizes(
    models={"b4u4": _model(4, 4, 12), "b8u4": _model(8, 4, 12)},
    engine_model="b8u4",
    block=64,
    volume=(320, 320, 256),
    patch=70,
    margin=3,
    slab=32,
    train_batch=(6, 40),
    fit_steps=24,
    fit_overrides=("depth=b4u4", "width=k12"),
    repeats=2,
)
#: toy sizes for a CPU dry run of the same logic (tests)
TINY = Sizes(
    models={"b1u2": _model(1, 2, 4)},
    engine_model="b1u2",
    block=16,
    volume=(24, 24, 24),
    patch=16,
    margin=3,
    slab=8,
    train_batch=(1, 16),
    fit_steps=3,
    fit_overrides=(
        "depth=b1u2", "width=k4", "data.source.resolution=2", "data.patch_size=8", "data.samples_per_volume=2",
        "data.batch_size=2", "data.queue_length=8",
    ),
    repeats=1,
)


@dataclass
class Row:
    check: str
    status: Status
    figure: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def cell(self) -> str:
        return f"**{self.status}**" if self.status == "FAIL" else self.status


def gpu_unavailable_reason() -> str | None:
    """Why the check cannot run on a GPU here, or ``None`` when a CUDA GPU is visible."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU (driver missing or none visible)"
    return None


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| check | status | figure |", "|---|---|---|"]
    for row in rows:
        figure = row.figure.replace("|", "/").replace("\n", " ")
        lines.append(f"| {row.check} | {row.cell} | {figure} |")
    return "\n".join(lines) + "\n"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- device
def _device_row(dev: torch.device) -> Row:
    from mdcsrn_lightning.benchmark.report import machine
    from mdcsrn_lightning.training.precision import resolve_precision

    auto, why = resolve_precision("auto", "gpu" if dev.type == "cuda" else "cpu")
    info = machine()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        what = (f"{props.name}, {_gb(props.total_memory)}, compute capability {props.major}.{props.minor}; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        what = f"{info['cpu']}, {info['logical_cpus']} CPUs; torch {torch.__version__} (CPU dry run)"
    return Row("device", "ok", f"{what}; trainer.precision=auto -> {auto} ({why})", {"machine": info, "auto": auto})


# --------------------------------------------------------------------------- fits
def _precision_used(output: str) -> str:
    """The precision a run trained in, from its log (``trainer.precision=auto -> X`` or Lightning's AMP line)."""
    auto = re.search(r"trainer\.precision=auto -> (\S+):", output)
    if auto:
        return f"{auto.group(1)} (auto)"
    if "Using bfloat16 Automatic Mixed Precision" in output:
        return "bf16-mixed"
    if "Using 16bit Automatic Mixed Precision" in output:
        return "16-mixed"
    return "32-true"


def _fit(
    name: str,
    overrides: Sequence[str],
    sizes: Sizes,
    dev: torch.device,
    workdir: Path,
    log: Log,
    timeout: float,
    expect: str | None = None,
) -> Row:
    """One short ``mdcsrn-train`` run in a fresh process; ok when every asked step logged a finite
    loss (and the run's output matches the regular expression ``expect``, if given)."""
    run_dir = workdir / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    accelerator = "gpu" if dev.type == "cuda" else "cpu"
    cmd = [
        sys.executable, "-m", "mdcsrn_lightning.cli.train", "experiment=quickstart", *sizes.fit_overrides,
        f"trainer.accelerator={accelerator}", f"trainer.max_steps={sizes.fit_steps}", "trainer.check_val_every_n_epoch=1",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "logger=csv", "test=false",
        f"paths.root_dir={workdir}", *overrides, f"hydra.run.dir={run_dir}",
    ]
    log(f"{name}: {' '.join(cmd[2:])}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "WANDB_SILENT": "true"})
    except subprocess.TimeoutExpired:
        return Row(name, "FAIL", f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "output.log").write_text(proc.stdout + proc.stderr)  # for a failed check's details
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return Row(name, "FAIL", f"mdcsrn-train exit {proc.returncode}: {tail[0][:300]} (log: {run_dir / 'output.log'})")
    if expect is not None and not re.search(expect, proc.stdout + proc.stderr):
        return Row(name, "FAIL", f"the run's log lacks {expect!r} (log: {run_dir / 'output.log'})")
    losses = {int(step): value for step, value in read_curve(run_dir / "csv" / "metrics.csv")["train/loss"]}
    used = _precision_used(proc.stderr + proc.stdout)
    detail = {"steps": len(losses), "seconds": seconds, "losses": losses, "precision": used}
    figure = f"{len(losses)} steps, last train/loss {losses[max(losses)]:.4g}, {seconds:.0f} s wall with start-up" if losses else ""
    if len(losses) != sizes.fit_steps:
        return Row(name, "FAIL", f"{len(losses)} of {sizes.fit_steps} steps logged a loss; {figure}", detail)
    bad = [s for s, v in losses.items() if not math.isfinite(v)]
    if bad:
        return Row(name, "FAIL", f"non-finite loss at steps {bad[:5]}; {figure}", detail)
    return Row(name, "ok", f"{figure}; precision {used}", detail)


# --------------------------------------------------------------------------- inference
#: eval-mode output tolerance against the plain reference on the engine block, TF32 off:
#: float32 engines (the engines' documented 1e-4), bf16 autocast
_TOL = {"bf16": 5e-2}
_TOL_FP32 = 1e-4


@contextmanager
def _true_float32() -> Iterator[None]:
    """TF32 off (cuDNN convolutions use it by default on Ampere and later, ~1e-3 off float32):
    the correctness checks compare true float32 results; the timings keep the defaults."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _engine_rows(sizes: Sizes, dev: torch.device, log: Log) -> list[Row]:
    name = sizes.engine_model
    settings = ["reference", *ENGINE_NAMES, "channels_last", "bf16"]
    size = [sizes.block] * 3
    with _true_float32():
        result = infer_task(sizes.models[name], engines=settings, size=size, repeats=sizes.repeats, warmup=1,
                            device=str(dev), memory="inprocess", log=log)
    ref = result["engines"]["reference"]
    rows = []
    for setting, row in result["engines"].items():
        check = f"engine {setting} ({name}, {sizes.block}³ block)"
        if "skipped" in row:
            rows.append(Row(check, "skipped", row["skipped"]))
            continue
        tol = _TOL.get(setting, _TOL_FP32)
        mem = row.get("peak_cuda_allocated_mb") or row.get("peak_rss_mb")
        figure = (f"{row['seconds_median']:.4f} s ({ref['seconds_median'] / row['seconds_median']:.2f}x the eager "
                  f"reference), max abs diff {row['max_abs_diff']:.1e} (tolerance {tol:g}, TF32 off), "
                  f"setup {row['setup_seconds']} s"
                  + (f", peak {mem:.0f} MB" if mem else ""))
        ok = row["max_abs_diff"] <= tol
        rows.append(Row(check, "ok" if ok else "FAIL", figure, row))
    return rows


def _stream_row(sizes: Sizes, dev: torch.device) -> Row:
    from mdcsrn_lightning.inference.build import build_inferer
    from mdcsrn_lightning.inference.options import InferenceOptions

    name = sizes.engine_model
    net = build_net(sizes.models[name], seed=0).eval().to(dev)
    x = torch.rand(1, 1, sizes.block, sizes.block, sizes.block, generator=torch.Generator().manual_seed(5)).to(dev)
    options = InferenceOptions(stream=True, engine="torch", slab=max(1, sizes.block // 4), device=str(dev))
    with _true_float32():
        with torch.inference_mode():
            plain = net(x)[0, 0].float().cpu().numpy()
        streamed = build_inferer(net, options)(x[0, 0])
    diff = float(np.abs(plain - streamed).max())
    figure = f"max abs diff {diff:.1e} vs the plain forward pass ({name}, {sizes.block}³, float32 without TF32; limit 1e-5)"
    return Row(f"stream exact ({name})", "ok" if diff <= 1e-5 else "FAIL", figure, {"max_abs_diff": diff})


_PAPER_SECONDS = {"b4u4": 12.54, "b8u4": 27.86}  # 320x320x256 on a GTX 1080 Ti (paper Table 1/2)


def _volume_rows(sizes: Sizes, dev: torch.device, log: Log) -> list[Row]:
    from mdcsrn_lightning.inference.build import build_inferer
    from mdcsrn_lightning.inference.options import InferenceOptions

    volume = np.random.default_rng(7).random(sizes.volume, dtype=np.float32)
    shape = "x".join(map(str, sizes.volume))
    voxels = int(np.prod(sizes.volume))
    rows: list[Row] = []
    patch_label = f"{sizes.patch}³ patches, margin {sizes.margin}"
    settings = {
        f"{patch_label}, fp32": InferenceOptions(patch_size=sizes.patch, margin=sizes.margin, device=str(dev)),
        f"{patch_label}, bf16": InferenceOptions(patch_size=sizes.patch, margin=sizes.margin, device=str(dev), precision="bf16"),
        f"exact, streamed (slab {sizes.slab})": InferenceOptions(stream=True, slab=sizes.slab, device=str(dev)),
    }
    for name, cfg in sizes.models.items():
        net = build_net(cfg, seed=0).eval().to(dev)
        runners: dict[str, Callable[[], Any]] = {
            label: (lambda inferer=build_inferer(net, options): inferer(volume)) for label, options in settings.items()
        }
        memory: dict[str, float] = {}
        failed: dict[str, str] = {}
        for label, run in list(runners.items()):
            log(f"volume {name} {shape} {label}: warm-up pass")
            try:
                with PeakMemory(dev) as mem:
                    out = run()
                if out.shape != tuple(sizes.volume) or not np.isfinite(out).all():
                    raise ValueError(f"output {out.shape}, finite: {bool(np.isfinite(out).all())}")
                memory[label] = mem.peak
            except Exception as exc:  # noqa: BLE001 - reported as the row's failure
                failed[label] = _one_line(exc)
                del runners[label]
        times = alternate(runners, sizes.repeats, None, dev, log)
        for label in [*runners, *failed]:
            check = f"volume {name} {shape}, {label}"
            if label in failed:
                rows.append(Row(check, "FAIL", failed[label]))
                continue
            stats = summarize(times[label])
            paper = _PAPER_SECONDS.get(name) if sizes.volume == (320, 320, 256) and "fp32" in label else None
            kind = "peak allocated" if dev.type == "cuda" else "peak RSS"
            figure = (f"{stats['seconds_median']:.2f} s (min {stats['seconds_min']:.2f}), "
                      f"{voxels / stats['seconds_median'] / 1e6:.2f} Mvox/s, {kind} {_gb(memory[label])}"
                      + (f"; paper, GTX 1080 Ti: {paper} s" if paper else ""))
            rows.append(Row(check, "ok", figure, {**stats, "peak_bytes": memory[label]}))
    return rows


# --------------------------------------------------------------------------- training step
_STEP_SETTINGS = ("reference", "torch", "channels_last", "bf16", "channels_last+bf16")


def _train_rows(sizes: Sizes, dev: torch.device, log: Log) -> list[Row]:
    batch, patch = sizes.train_batch
    rows = []
    for name, cfg in sizes.models.items():
        result = train_task(cfg, settings=_STEP_SETTINGS, batches=[(batch, patch)], repeats=max(2, sizes.repeats),
                            warmup=1, device=str(dev), memory="inprocess", log=log)
        settings = result["runs"][0]["settings"]
        fp32 = settings.get("torch", {}).get("seconds_median")
        for setting, row in settings.items():
            check = f"train step {name}, batch {batch} of {patch}³, {setting}"
            if "skipped" in row:
                rows.append(Row(check, "skipped", row["skipped"]))
                continue
            mem = row.get("peak_cuda_allocated_mb") or row.get("peak_rss_mb")
            figure = (f"{row['seconds_median']:.4f} s/step (min {row['seconds_min']:.4f}), {row['patches_per_s']:.1f} patches/s, "
                      f"{row.get('speedup_vs_reference', float('nan')):.2f}x the eager reference"
                      + (f", {fp32 / row['seconds_median']:.2f}x fp32" if fp32 and setting != "torch" else "")
                      + (f", peak {mem:.0f} MB" if mem else ""))
            rows.append(Row(check, "ok", figure, row))
    return rows


# --------------------------------------------------------------------------- driver
def run_checks(
    device: str = "cuda",
    tiny: bool = False,
    checks: Sequence[str] = CHECKS,
    repeats: int | None = None,
    workdir: str | None = None,
    fit_timeout: float = 600,
    log: Log | None = None,
) -> list[Row]:
    """Run ``checks`` on ``device`` and return the table's rows (a failed check is a row, not an
    exception). Raises ``ValueError`` for an unknown check or device."""
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; choose from {CHECKS}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    dev = torch.device(device)
    sizes = TINY if tiny else FULL
    if repeats is not None:
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        sizes = Sizes(**{**asdict(sizes), "repeats": int(repeats)})
    say: Log = log or (lambda m: print(f"[gpu-check] {m}", file=sys.stderr, flush=True))
    folder = Path(workdir or tempfile.mkdtemp(prefix="mdcsrn-gpu-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    fits: dict[str, tuple[str, list[str], str | None]] = {
        "fit": ("fit bf16-mixed", ["trainer.precision=bf16-mixed"], "Using bfloat16 Automatic Mixed Precision"),
        "compile": ("fit torch.compile", ["trainer.precision=bf16-mixed", "module.compile=true"], None),
        # precision left to auto: the row says what it picked; the process group must be set up
        "ddp": ("fit DDP, 1 device", ["trainer=ddp", "trainer.devices=1"], r"distributed_backend=\w+"),
    }
    rows: list[Row] = []
    for check in CHECKS:
        if check not in checks:
            continue
        start = time.perf_counter()
        say(f"--- {check}")
        try:
            if check == "device":
                rows.append(_device_row(dev))
            elif check in fits:
                name, overrides, expect = fits[check]
                rows.append(_fit(name, overrides, sizes, dev, folder, say, fit_timeout, expect))
            elif check == "engines":
                rows.extend(_engine_rows(sizes, dev, say))
            elif check == "stream":
                rows.append(_stream_row(sizes, dev))
            elif check == "volume":
                rows.extend(_volume_rows(sizes, dev, say))
            else:
                rows.extend(_train_rows(sizes, dev, say))
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            rows.append(Row(check, "FAIL", _one_line(exc)))
        say(f"{check}: {time.perf_counter() - start:.1f} s")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mdcsrn_lightning.benchmark.gpu_check",
        description="Check and time mdcsrn-lightning on one NVIDIA GPU; prints one markdown table.",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the check) or cpu (a dry run of its logic, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: b1u2 k4, 24^3 volume, batch 1 of 16^3")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per setting (default 2; tiny 1)")
    parser.add_argument("--workdir", default=None, help="folder for the fits' runs (default: a new temp folder)")
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    parser.add_argument("--json", default=None, help="also write every row with its details to this JSON file")
    parser.add_argument("--detect", action="store_true", help="only say whether a CUDA GPU is usable (exit 0 or 77)")
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]

    if args.device == "cuda":
        reason = gpu_unavailable_reason()
        if reason is not None:
            print(f"gpu check skipped: {reason}", flush=True)
            return SKIPPED
    if args.detect:
        print(f"cuda: {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "cpu", flush=True)
        return 0
    start = time.perf_counter()
    try:
        rows = run_checks(args.device, args.tiny, checks, args.repeats, args.workdir)
    except ValueError as exc:
        print(f"gpu check: error: {exc}", file=sys.stderr, flush=True)
        return 2
    seconds = time.perf_counter() - start
    table = markdown_table(rows)
    failed = [r.check for r in rows if r.status == "FAIL"]
    summary = (f"\n{len(rows)} checks in {seconds:.0f} s: {len(rows) - len(failed)} ok or skipped, "
               f"{len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "") + "\n")
    print(table + summary, flush=True)
    if args.table:
        Path(args.table).write_text(table + summary)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"seconds": seconds, "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
