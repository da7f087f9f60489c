"""How wide the margin of ``augment_options.roi`` must be: region LR vs whole-volume LR.

For one volume and no random transform, the LR of a region made as :class:`RandomRegion`
makes it (crop ``R + 2 m`` around a random foreground voxel -> degrade -> crop ``m``) is
compared with the same voxels of the whole volume's degradation, for several margins
``m``: the largest and the RMS difference over the region, relative to the whole LR's
99.9th percentile, the worst over ``boxes`` random regions (the same centres for every m).

    python scripts/roi_margin.py <volume.nii.gz> --roi 96 --margins 0 8 16 24 32

A developer's measurement (its results: docs/performance.md), not part of the installed
package; it imports the package, so run it where ``mdcsrn_lightning`` is installed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.augment import DegradeSample, RandomRegion
from mdcsrn_lightning.data.sources import load_volume

__all__ = ["margin_errors", "region_offset"]


def region_offset(whole_affine: np.ndarray, region_affine: np.ndarray) -> tuple[int, int, int]:
    """Voxel index, in the whole volume, of a cropped region's first voxel (from the two affines)."""
    ijk = np.linalg.solve(np.asarray(whole_affine, dtype=np.float64), np.asarray(region_affine, dtype=np.float64)[:, 3])
    return tuple(int(round(v)) for v in ijk[:3])  # type: ignore[return-value]


def margin_errors(
    hr: np.ndarray,
    affine: np.ndarray,
    roi: Sequence[int],
    margins: Sequence[int],
    boxes: int = 4,
    factors: Sequence[float] = (2, 2, 1),
    interpolation: degradation.Interpolation = "linear",
    seed: int = 0,
    whole_lr: np.ndarray | None = None,
    aligned: bool = True,
) -> list[dict[str, Any]]:
    """Per margin: ``max_rel`` / ``rms_rel`` (worst over ``boxes`` regions), relative to the whole LR's 99.9th pct.

    ``aligned=False`` places the box on any voxel instead of the LR grid (to show why it must not).
    ``hr`` is ``(X, Y, Z)``; every region is checked against ``whole_lr`` (default: ``degrade(hr)``).
    """
    lr = degradation.degrade(hr, factors, interpolation) if whole_lr is None else whole_lr
    ref = float(np.percentile(lr, 99.9))
    rows = []
    for m in margins:
        worst_max = worst_rms = 0.0
        seconds = 0.0
        torch.manual_seed(seed)  # the same centres for every margin
        for _ in range(boxes):
            subject = tio.Subject(
                hr=tio.ScalarImage(tensor=torch.from_numpy(hr)[None], affine=affine),
                lr=tio.ScalarImage(tensor=torch.zeros((1, *hr.shape)), affine=affine),
                metric_scale=float(np.percentile(hr, 99.9)),
            )
            start = time.perf_counter()
            grid = [max(1, round(f)) for f in factors] if aligned else [1, 1, 1]
            out = RandomRegion(roi, m, DegradeSample(factors, interpolation, renormalize=False), grid=grid)(subject)
            seconds += time.perf_counter() - start
            x, y, z = region_offset(affine, out["lr"].affine)
            got = out["lr"].data[0].numpy()
            want = lr[x : x + got.shape[0], y : y + got.shape[1], z : z + got.shape[2]]
            diff = np.abs(got.astype(np.float64) - want) / ref
            worst_max = max(worst_max, float(diff.max()))
            worst_rms = max(worst_rms, float(np.sqrt(np.mean(diff**2))))
        rows.append({"margin": int(m), "max_rel": worst_max, "rms_rel": worst_rms, "seconds_per_region": seconds / boxes})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("volume")
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 8, 16, 24, 32])
    ap.add_argument("--boxes", type=int, default=4)
    ap.add_argument("--unaligned", action="store_true", help="boxes on any voxel, not on the LR grid")
    args = ap.parse_args(argv)
    loaded = load_volume(args.volume)
    hr, affine = loaded.data, loaded.affine
    hr = np.asarray(hr, dtype=np.float32)
    start = time.perf_counter()
    lr = degradation.degrade(hr)
    whole_s = time.perf_counter() - start
    rows = margin_errors(hr, affine, [args.roi] * 3, args.margins, args.boxes, whole_lr=lr, aligned=not args.unaligned)
    print(json.dumps({"volume": args.volume, "shape": list(hr.shape), "roi": args.roi, "boxes": args.boxes,
                      "whole_degrade_seconds": whole_s, "rows": rows}, indent=1))
    print("| margin m | box | max diff / LR p99.9 | RMS diff / LR p99.9 | s per region |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        b = args.roi + 2 * r["margin"]
        print(f"| {r['margin']} | {b}^3 | {r['max_rel']:.2e} | {r['rms_rel']:.2e} | {r['seconds_per_region']:.2f} |")


if __name__ == "__main__":
    main()
