"""How well ``uncertainty=true``'s standard deviation ranks the error, on real scans never trained on.

For each HR scan: degrade it (the checkpoint's factors and interpolation, as ``degrade=true``),
super-resolve it once (the single pass) and over the symmetries of the degraded plane (the
ensemble: mean and std), both followed by data consistency when the checkpoint recommends it
(``mdcsrn-infer``'s default), and report over the foreground (HR > 10% of its 99th percentile):

- the seconds of both, and their ratio;
- Spearman's rank correlation of std vs |mean - HR|;
- the mean |mean - HR| in the 5% highest-std voxels vs in the rest;
- PSNR (peak: the HR's 99.9th percentile, over the foreground) of the degraded input (zero-filled),
  the single pass and the mean.

    python scripts/uncertainty_eval.py --scan s1=$(mdcsrn-data path s1) --crop 128 \
        --scan anatomical=<nibabel>/tests/data/anatomical.nii --png docs/img/uncertainty.png

A developer's measurement (results: README "Inference on your scans"), not part of the package.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from mdcsrn_lightning.checkpoints import TrainedModel, load_trained_model
from mdcsrn_lightning.data.degradation import data_consistency, degrade
from mdcsrn_lightning.data.intensity import input_scale
from mdcsrn_lightning.data.volume_io import load_volume
from mdcsrn_lightning.inference.base import predict_volume_std
from mdcsrn_lightning.inference.build import build_inferer
from mdcsrn_lightning.inference.options import InferenceOptions


def centre_crop(volume: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size``^3 region (each axis at most its own length); ``None``: the whole volume."""
    if size is None:
        return volume
    starts = [max(0, (n - size) // 2) for n in volume.shape]
    return volume[tuple(slice(s, s + min(size, n)) for s, n in zip(starts, volume.shape))]


def psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray, peak: float) -> float:
    mse = float(np.mean((x[mask].astype(np.float64) - ref[mask]) ** 2))
    return 10 * np.log10(peak**2 / mse)


def run(model: TrainedModel, hr: np.ndarray, options: InferenceOptions) -> dict[str, Any]:
    """Single pass and ensemble on the degraded ``hr``: the figures and the volumes for the picture."""
    factors = list(model.factors or (2, 2, 1))
    lr = degrade(hr, factors=factors, interpolation=model.interpolation)  # type: ignore[arg-type]
    scale = input_scale(lr)
    out: dict[str, Any] = {"input": lr}
    for label, uncertainty in (("single", False), ("ensemble", True)):
        inferer = build_inferer(model.net, replace(options, uncertainty=uncertainty))
        start = time.perf_counter()
        sr, std = predict_volume_std(inferer, lr, scale=scale)
        if model.recommends_data_consistency:
            sr = data_consistency(sr, lr, factors, model.interpolation)  # type: ignore[arg-type]
        out[label] = (sr, std, time.perf_counter() - start)
    return out


def figures(hr: np.ndarray, out: dict[str, Any]) -> dict[str, float]:
    single, _, t_single = out["single"]
    mean, std, t_mean = out["ensemble"]
    mask = hr > 0.1 * np.percentile(hr, 99)
    err = np.abs(mean - hr)[mask]
    s = std[mask]
    top = s >= np.percentile(s, 95)
    peak = float(np.percentile(hr, 99.9))
    return {
        "voxels": int(mask.sum()),
        "seconds_single": round(t_single, 1),
        "seconds_ensemble": round(t_mean, 1),
        "cost_ratio": round(t_mean / t_single, 2),
        "spearman_std_vs_error": round(float(spearmanr(s, err).statistic), 3),
        "error_top5pct_std": round(float(err[top].mean()) / peak, 4),
        "error_rest": round(float(err[~top].mean()) / peak, 4),
        "psnr_input": round(psnr(out["input"], hr, mask, peak), 2),
        "psnr_single": round(psnr(single, hr, mask, peak), 2),
        "psnr_mean": round(psnr(mean, hr, mask, peak), 2),
    }


def picture(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """Per scan, the middle slice across the last axis (the degraded plane): SR, std, |SR - HR|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3.1 * len(panels)), squeeze=False)
    for row, (name, hr, mean, std) in zip(axes, panels):
        z = hr.shape[2] // 2
        err = np.abs(mean - hr)[:, :, z]
        vmax = float(np.percentile(hr, 99.5))
        emax = float(np.percentile(err, 99.5))
        smax = float(np.percentile(std[:, :, z], 99.5))  # its own scale: the std is ~10x below the error
        for ax, image, title, cmap, top in ((row[0], mean[:, :, z], f"{name}: SR (ensemble mean)", "gray", vmax),
                                            (row[1], std[:, :, z], f"std (0 to {smax:.3g})", "magma", smax),
                                            (row[2], err, f"|SR - HR| (0 to {emax:.3g})", "magma", emax)):
            ax.imshow(np.rot90(image), cmap=cmap, vmin=0, vmax=top)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", action="append", required=True, help="name=path of an HR scan")
    parser.add_argument("--crop", type=int, default=None, help="central cube of this size (for scans larger than it)")
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: the released weights)")
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    model = load_trained_model(args.ckpt)
    options = InferenceOptions(device="cpu")
    results, panels = {}, []
    for item in args.scan:
        name, path = item.split("=", 1)
        hr = centre_crop(load_volume(path).data.astype(np.float32), args.crop)
        out = run(model, hr, options)
        results[name] = {"shape": list(hr.shape), **figures(hr, out)}
        print(json.dumps({name: results[name]}), flush=True)
        panels.append((name, hr, out["ensemble"][0], out["ensemble"][1]))
    if args.png is not None:
        picture(panels, args.png)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
