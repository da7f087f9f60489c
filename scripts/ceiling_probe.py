"""The ceiling of per-scan training: a model fine-tuned on one scan's own *true* pairs.

No user has these pairs (they need the scan's HR); a study uses them to bound, for that scan,
this architecture and this machine, what any per-scan adaptation (``adapt=true`` learns from
self-supervised pairs, never better informed than the true ones) can reach in a budget of
minutes. The model starts from a checkpoint (default: the released weights for the task) or
from scratch (``--fresh b,u,k``), is trained on random patches of the scan's degraded -> HR pair
(L1, Adam, bf16 where native, flips and the in-plane swap), and scored on the whole scan at
each ``--at`` minutes (the clock stops while it is scored):

- ``--task thick``: boxcar slices of ``--mm`` along axis 2 (thickness = spacing, as
  ``scripts/thick_slice_baselines.py``), the cubic B-spline back onto the fine grid as the
  input; scored in slices across axis 0 over the grid the slices cover; baseline: the cubic
  input (the best interpolation on these scans).
- ``--task kspace``: the checkpoint's k-space truncation (2x2x1, zero-filled); scored in slices
  along axis 2 after data consistency (as ``scripts/adapt_eval.py``); baseline: the
  zero-filled input.

    python scripts/ceiling_probe.py --scan s1 --task thick --mm 4 --at 4 8 12 16 20
    python scripts/ceiling_probe.py --scan anatomical --task kspace --patch 16 --at 2.5 5 7.5 10

A developer's measurement (results: docs/inference.md "How far per-scan training can go"), not
part of the package.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# sibling scripts: python puts the running script's folder (scripts/) on sys.path
from adapt_eval import centre_crop
from thick_slice_baselines import _volume, thick_scan

from mdcsrn_lightning.checkpoints import load_trained_model
from mdcsrn_lightning.cpu_features import cpu_bf16_support
from mdcsrn_lightning.data import slices
from mdcsrn_lightning.data.degradation import data_consistency, degrade
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.inference.adapt import _frozen_bn, train_step
from mdcsrn_lightning.inference.options import InferenceOptions
from mdcsrn_lightning.inference.patches import PatchInferer
from mdcsrn_lightning.models.mdcsrn import MDCSRN
from mdcsrn_lightning.release import RELEASED_THICK_WEIGHTS, RELEASED_WEIGHTS

Pair = tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], dict[str, float]]]


def scan(name: str, crop: int | None) -> tuple[np.ndarray, tuple[float, ...]]:
    """``(HR, voxel sizes in mm)`` of ``s1``, ``anatomical`` (nibabel's test scan) or a path
    (``thick_slice_baselines``' reader); its centre ``crop``^3 if given."""
    hr, voxel_sizes, _ = _volume(name)
    return np.ascontiguousarray(centre_crop(hr, crop or None)), voxel_sizes


def thick_pair(hr: np.ndarray, mm: float, voxel_sizes: Sequence[float]) -> Pair:
    """``(input, HR on the slices' grid, scorer)`` for boxcar slices of ``mm`` along axis 2
    (:func:`thick_slice_baselines.thick_scan`), the cubic B-spline back onto the fine grid."""
    _, spacing, coarse, ref, metric_axis = thick_scan(hr, voxel_sizes, mm, 2)
    ref = np.ascontiguousarray(ref)
    lr = slices.slices_to_fine(coarse, spacing, 2, "cubic")
    return lr, ref, lambda sr: slice_metrics(sr, ref, axis=metric_axis)


def kspace_pair(hr: np.ndarray, factors: list[float], interpolation: str) -> Pair:
    """``(zero-filled input, HR, scorer with data consistency)`` for the checkpoint's truncation."""
    lr = degrade(hr, factors=factors, interpolation=interpolation)  # type: ignore[arg-type]
    return lr, hr, lambda sr: slice_metrics(data_consistency(sr, lr, factors, interpolation), hr,  # type: ignore[arg-type]
                                            axis=2)


def batch(x: torch.Tensor, y: torch.Tensor, patch: int, size: int,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random patches; flips of any axis and the swap of axes 0, 1 keep both tasks' degradation."""
    xs, ys = [], []
    for _ in range(size):
        i, j, k = (int(rng.integers(0, n - patch + 1)) for n in x.shape)
        px, py = x[i:i + patch, j:j + patch, k:k + patch], y[i:i + patch, j:j + patch, k:k + patch]
        dims = [d for d in range(3) if rng.random() < 0.5]
        if dims:
            px, py = px.flip(dims), py.flip(dims)
        if rng.random() < 0.5:
            px, py = px.transpose(0, 1), py.transpose(0, 1)
        xs.append(px)
        ys.append(py)
    return torch.stack(xs)[:, None].contiguous(), torch.stack(ys)[:, None].contiguous()


def probe(net: torch.nn.Module, pair: Pair, args: argparse.Namespace) -> list[dict[str, Any]]:
    lr, hr, metrics = pair
    scale = input_scale(lr)
    x, y = (torch.from_numpy(np.ascontiguousarray(a / np.float32(scale))) for a in (lr, hr))
    infer = PatchInferer(net, InferenceOptions(device="cpu", patch_size=args.infer_patch))

    def row(minutes: float, steps: int, sr: np.ndarray) -> dict[str, Any]:
        m = metrics(sr)
        out = {"minutes": minutes, "steps": steps, "psnr": round(float(m["psnr"]), 3), "ssim": round(float(m["ssim"]), 4)}
        print(json.dumps(out), flush=True)
        return out

    rows = [row(-1.0, 0, lr), row(0.0, 0, infer(x.numpy()) * scale)]  # the input, then the starting model
    _frozen_bn(net)  # training mode, BatchNorm on its running statistics (as adapt=true trains)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    bf16 = cpu_bf16_support()[0]
    rng, spent, steps = np.random.default_rng(args.seed), 0.0, 0
    torch.manual_seed(args.seed)
    for at in sorted(args.at):
        start = time.perf_counter()
        while spent + time.perf_counter() - start < 60.0 * at:
            train_step(net, optimizer, *batch(x, y, args.patch, args.batch, rng), bf16)
            steps += 1
        spent += time.perf_counter() - start
        net.eval()
        rows.append(row(at, steps, infer(x.numpy()) * scale))
        _frozen_bn(net)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="s1", help="s1, anatomical or an HR file")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--task", choices=("thick", "kspace"), default="thick")
    parser.add_argument("--mm", type=float, default=4.0, help="thick: slice thickness = spacing (mm)")
    parser.add_argument("--ckpt", default=None, help="start from this checkpoint (default: the released weights)")
    parser.add_argument("--fresh", default=None, help="b,u,k: start from a new MDCSRN instead")
    parser.add_argument("--at", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="minutes at which to score")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--infer-patch", type=int, default=70)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_trained_model(args.ckpt or (RELEASED_THICK_WEIGHTS if args.task == "thick" else RELEASED_WEIGHTS))
    hr, voxel_sizes = scan(args.scan, args.crop)
    if args.task == "thick":
        pair = thick_pair(hr, args.mm, voxel_sizes)
    else:
        pair = kspace_pair(hr, list(model.factors or (2, 2, 1)), model.interpolation)
    net = model.net
    if args.fresh:
        b, u, k = (int(v) for v in args.fresh.split(","))
        torch.manual_seed(args.seed)
        net = MDCSRN(num_blocks=b, units_per_block=u, growth_rate=k, reconstruction="direct", global_residual=True)
    rows = probe(net, pair, args)
    record = {"scan": args.scan, "crop": args.crop, "task": args.task, "mm": args.mm if args.task == "thick" else None,
              "start": f"fresh {args.fresh}" if args.fresh else (args.ckpt or "released"),
              "parameters": sum(p.numel() for p in net.parameters()), "lr": args.lr, "patch": args.patch,
              "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
