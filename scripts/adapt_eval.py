"""What ``adapt=true`` (per-scan self-supervised fine-tuning) gains, on real scans never trained on.

For each HR scan: degrade it (the checkpoint's factors and interpolation, as ``degrade=true``),
then score against the HR (foreground slices along axis 2, as ``mdcsrn-eval``: mean PSNR/SSIM)
the network's input (the degraded scan), the unadapted model, and the model adapted for each
budget of minutes, applied in each order (``01``, ``10``, ``average``); every output after
data consistency (the checkpoint's band, as ``mdcsrn-infer data_consistency=true``).

    python scripts/adapt_eval.py --scan anatomical=<nibabel>/tests/data/anatomical.nii \\
        --scan s1=$(mdcsrn-data path s1) --crop 96 --minutes 2 5 --json adapt_eval.json

A developer's measurement (results: docs/inference.md "Adapting to a scan"), not part of the package.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdcsrn_lightning.checkpoints import load_trained_model
from mdcsrn_lightning.data.degradation import data_consistency, degrade
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.data.volume_io import load_volume
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.inference import adapt as adapt_mod
from mdcsrn_lightning.inference.adapt import fine_tune
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.options import (
    ADAPT_ORDERS,
    AdaptOptions,
    InferenceOptions,
)
from mdcsrn_lightning.inference.patches import PatchInferer
from mdcsrn_lightning.inference.permuted import apply_permuted
from mdcsrn_lightning.models.generators import generator_class


def centre_crop(volume: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return volume
    starts = [max(0, (n - size) // 2) for n in volume.shape]
    return volume[tuple(slice(s, s + min(size, n)) for s, n in zip(starts, volume.shape))]


def score(sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    m = slice_metrics(sr, hr, axis=2)
    return {"psnr": round(float(m["psnr"]), 3), "ssim": round(float(m["ssim"]), 4)}


def fresh(net_config: dict[str, Any], seed: int = 0) -> Any:
    """The checkpoint's architecture, newly initialised (``seed``)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in net_config.items() if k != "_target_"}
    return generator_class(net_config["_target_"])(**kwargs).eval()


def evaluate(name: str, hr: np.ndarray, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = load_trained_model(args.ckpt)
    factors = list(model.factors or (2, 2, 1))
    lr = degrade(hr, factors=factors, interpolation=model.interpolation)  # type: ignore[arg-type]
    scale = input_scale(lr)
    x = lr / np.float32(scale)
    options = InferenceOptions(device="cpu", patch_size=args.infer_patch)
    dc = lambda out: data_consistency(out * np.float32(scale), lr, factors, model.interpolation)
    rows = [{"scan": name, "method": "input (degraded)", **score(lr, hr)}]
    start = time.perf_counter()
    rows.append({"scan": name, "method": "unadapted", **score(dc(PatchInferer(model.net, options)(x)), hr),
                 "seconds": round(time.perf_counter() - start, 1)})
    # the unadapted model in the adapted model's role (axis 0, then 1, in the full-resolution slot)
    rows.append({"scan": name, "method": "unadapted, permuted 01",
                 **score(dc(apply_permuted(PatchInferer(model.net, options), x, factors, "01")), hr)})
    print(json.dumps(rows[-3:]), flush=True)
    if args.baselines_only:
        return rows
    if args.network == "planes":
        return rows + planes_rows(name, hr, x, model, dc, args)
    for minutes in args.minutes:
        adapt = AdaptOptions(steps=args.max_steps, minutes=minutes, lr=args.lr, patch=args.patch, batch=args.batch,
                             factors=tuple(factors), interpolation=model.interpolation)  # type: ignore[arg-type]
        checked: list[Any] = []  # the adapted model the real-task check saw (scored here even when refused)
        check = adapt_mod.real_task_check
        def spy(net: Any, adapted: Any, *a: Any, _seen: list[Any] = checked, _check: Any = check, **k: Any) -> Any:
            _seen.append(copy.deepcopy(adapted))
            return _check(net, adapted, *a, **k)

        adapt_mod.real_task_check = spy
        try:
            net, record = fine_tune(fresh(model.net_config) if args.scratch else model.net, x, adapt, progress=False)
        finally:
            adapt_mod.real_task_check = check
        used = PatchInferer(net, options)
        out = apply_permuted(used, x, factors, adapt.order) if record.used == "adapted" else used(x)
        start_from = "a fresh network" if args.scratch else "the checkpoint"
        rows.append({"scan": name, "method": f"adapt=true from {start_from}, {minutes} min (used: {record.used})",
                     **score(dc(out), hr), **record.record()})
        print(json.dumps(rows[-1]), flush=True)
        for order in ADAPT_ORDERS if checked else ():
            out = apply_permuted(PatchInferer(checked[0], options), x, factors, order)
            rows.append({"scan": name, "method": f"adapted from {start_from}, {minutes} min, order {order}",
                         **score(dc(out), hr)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def planes_rows(name: str, hr: np.ndarray, x: np.ndarray, model: Any, dc: Any,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    """``adapt=true`` as ``mdcsrn-infer`` runs it by default (``adapt.network=planes``): one row per
    budget, each a fresh plane network; ``seconds``: adaptation and application together."""
    rows = []
    for minutes in args.minutes:
        adapt = AdaptOptions(steps=args.max_steps, minutes=minutes, patch=args.patch, network="planes",
                             factors=tuple(model.factors or (2, 2, 1)), interpolation=model.interpolation)
        inferer = build_inferer(model.net, InferenceOptions(device="cpu", patch_size=args.infer_patch, adapt=adapt))
        start = time.perf_counter()
        out = inferer(x)
        record = inferer.adaptation.record()
        rows.append({"scan": name, "method": f"adapt=true planes, {minutes} min (used: {record['used']})",
                     **score(dc(out), hr), "seconds_total": round(time.perf_counter() - start, 1), **record})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(json_files: list[Path], png: Path) -> None:
    """PSNR gain over the network's input against adaptation minutes, per scan and starting point
    (the ``average`` order), with the unadapted model as a dashed line."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for f in json_files for r in json.loads(Path(f).read_text())]
    scans = sorted({r["scan"] for r in rows})
    fig, axes = plt.subplots(1, len(scans), figsize=(5 * len(scans), 3.8), squeeze=False)
    for ax, scan in zip(axes[0], scans):
        mine = [r for r in rows if r["scan"] == scan]
        base = next(r["psnr"] for r in mine if r["method"] == "input (degraded)")
        unadapted = next(r["psnr"] for r in mine if r["method"] == "unadapted")
        ax.axhline(unadapted - base, ls="--", color="k", label="released model, unadapted")
        ax.axhline(0.0, ls=":", color="grey", label="input (zero-filled)")
        planes = sorted((r["seconds"] / 60, r["psnr"] - base) for r in mine if r["method"].startswith("adapt=true planes"))
        if planes:  # at the minutes it ran (a small scan stops at its epochs, well inside the budget)
            ax.plot(*zip(*planes), "s-", color="C2", label="adapt=true (default: the plane network; 2 threads)")
        for start in ("the checkpoint", "a fresh network"):
            pattern = re.compile(rf"adapted from {start}, ([0-9.]+) min, order average")
            points = sorted((float(m.group(1)), r["psnr"] - base) for r in mine if (m := pattern.fullmatch(r["method"])))
            if points:
                label = start.replace("the checkpoint", "the released model")
                ax.plot(*zip(*points), "o-", label=f"adapt.network=checkpoint, from {label}")
        ax.set(title=scan, xlabel="minutes of adaptation (threads and load: docs/inference.md)",
               ylabel="PSNR gain over the input (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", action="append", default=[], help="name=path of an HR scan")
    parser.add_argument("--plot", type=Path, nargs="+", default=None, help="JSON files of earlier runs: plot them")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--crop", type=int, default=None, help="centre crop edge for scans larger than it")
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: the released weights)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--lr", type=float, default=AdaptOptions.lr)
    parser.add_argument("--patch", type=int, default=AdaptOptions.patch)
    parser.add_argument("--batch", type=int, default=AdaptOptions.batch)
    parser.add_argument("--infer-patch", type=int, default=70)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--scratch", action="store_true", help="adapt a freshly initialised network instead")
    parser.add_argument("--network", choices=("checkpoint", "planes"), default="checkpoint",
                        help="planes: the default adapt=true (a fresh 2D network per budget)")
    parser.add_argument("--baselines-only", action="store_true", help="no adaptation: the input and unadapted rows")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png or Path("adapt_minutes.png"))
        return
    rows: list[dict[str, Any]] = []
    for item in args.scan:
        name, path = item.split("=", 1)
        hr = centre_crop(np.asarray(load_volume(path).data, dtype=np.float32), args.crop)
        rows += evaluate(name, hr, args)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"| {r['scan']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r.get('steps', '')} |")


if __name__ == "__main__":
    main()
