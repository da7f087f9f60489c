"""Interpolation baselines for thick-slice scans: what a thick-slice model must beat.

For each volume, slice thickness (mm) and axis: boxcar thick slices (``data/slices.py``;
thickness = mm / voxel size, spacing = that rounded half up, in fine voxels) -> back to the
fine grid by nearest, linear, cubic B-spline (:func:`~mdcsrn_lightning.data.slices.slices_to_fine`)
and sinc (FFT zero-padding, :func:`sinc_to_fine`) -> PSNR / SSIM against the HR
(``evaluation/metrics.py``: HR's 99.9th percentile, foreground slices), over the fine grid the
slices cover (``n * spacing`` voxels along the axis), in slices across an in-plane axis (each
slice holds the thick axis, where thick slices show).

    python scripts/thick_slice_baselines.py s1 anatomical --mm 3 4 5 --json out.json
    python scripts/thick_slice_baselines.py s1 anatomical --mm 3 4 5 --axes 2 --ckpt released=<thick.ckpt>

``--ckpt name=path`` adds a row per thick-slice checkpoint: the thick slices saved as a NIfTI
scan (slice spacing as its voxel size along the axis, slice centres at the fine voxels'
centre, as :func:`thick_affine`) and super-resolved by ``mdcsrn-infer``'s Python API
(``predict``, ``upsample=auto``), scored on the same fine grid; ``--adapt-minutes M`` adds each checkpoint with ``adapt=true``
for ``M`` minutes.

``s1``: pycortex S1 (``mdcsrn-data path s1``); ``anatomical``: nibabel's test
``anatomical.nii``; any other argument is a volume file. A developer's measurement (its
results: README / docs/inference.md), not part of the installed package.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft

from mdcsrn_lightning.data import slices
from mdcsrn_lightning.data.fetch import data_path
from mdcsrn_lightning.data.volume_io import load_volume
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.inference.files import predict
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions

__all__ = ["baselines", "sinc_to_fine", "thick_scan"]

METHODS = ("nearest", "linear", "cubic", "sinc")


def sinc_to_fine(coarse: np.ndarray, spacing: int, axis: int) -> np.ndarray:
    """``n`` slice samples -> ``n * spacing`` fine voxels by FFT zero-padding (periodic sinc), float32.

    The padded inverse FFT samples slice coordinate ``j / s``; a phase ramp shifts it by
    ``(s - 1) / 2`` fine voxels, so fine voxel ``x`` is read at ``(x - (s - 1) / 2) / s`` like
    :func:`~mdcsrn_lightning.data.slices.slices_to_fine`. An even ``n``'s Nyquist bin is split
    between ``+n/2`` and ``-n/2``.
    """
    arr = np.moveaxis(np.asarray(coarse, dtype=np.float64), axis, 0)
    n, s = arr.shape[0], int(spacing)
    size = n * s
    spectrum = scipy.fft.fft(arr, axis=0) * s  # ifft divides by n * s, fft summed n points
    padded = np.zeros((size,) + arr.shape[1:], dtype=np.complex128)
    freqs = np.round(scipy.fft.fftfreq(n, d=1.0 / n)).astype(int)
    for i, f in enumerate(freqs):
        if n % 2 == 0 and abs(f) == n // 2 and s > 1:
            padded[f % size] += spectrum[i] / 2
            padded[-f % size] += spectrum[i] / 2
        else:
            padded[f % size] += spectrum[i]
    shift = (s - 1) / 2.0
    ramp = np.exp(-2j * np.pi * scipy.fft.fftfreq(size) * shift)
    out = scipy.fft.ifft(padded * ramp.reshape((size,) + (1,) * (arr.ndim - 1)), axis=0).real
    return np.moveaxis(out, 0, axis).astype(np.float32)


def _scored(volume: np.ndarray, ref: np.ndarray, metric_axis: int) -> dict[str, float]:
    """PSNR (dB, 2 decimals) / SSIM (4) of ``volume`` against ``ref``, slices across ``metric_axis``."""
    m = slice_metrics(volume, ref, axis=metric_axis)
    return {"psnr": round(m["psnr"], 2), "ssim": round(m["ssim"], 4)}


def thick_affine(affine: np.ndarray, axis: int, spacing: int) -> np.ndarray:
    """The thick scan's affine: slice ``k`` is centred on fine voxels ``k*s .. k*s + s - 1``."""
    grid = np.eye(4)
    grid[axis, axis] = spacing
    grid[axis, 3] = (spacing - 1) / 2
    return affine @ grid


def model_rows(coarse: np.ndarray, affine: np.ndarray, spacing: int, axis: int, ref: np.ndarray,
               metric_axis: int, ckpts: list[str], adapt_minutes: float | None = None,
               adapt_patch: int | None = None, adapt_extra: dict[str, Any] | None = None,
               ensemble: bool = False, consistency: bool = False) -> dict[str, Any]:
    """Each ``name=path`` checkpoint's output for the thick scan ``coarse``, scored against ``ref``
    (with ``ensemble``, also the mean over the in-plane symmetries, ``uncertainty=true``:
    ``<name> ensemble``; with ``adapt_minutes``, its output with ``adapt=true`` for that long:
    ``<name> adapted``, and with both, ``<name> adapted ensemble``; with ``consistency``, each
    also with the thick-slice data consistency of ``data_consistency=true``: ``... +dc``)."""
    import tempfile

    import nibabel

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "thick.nii.gz"
        nibabel.save(nibabel.Nifti1Image(coarse, thick_affine(affine, axis, spacing)), str(src))
        variants = [(InferenceOptions(device="cpu"), "")]
        if adapt_minutes is not None:
            adapt = AdaptOptions(minutes=adapt_minutes, steps=1_000_000, patch=adapt_patch, **(adapt_extra or {}))
            variants.append((InferenceOptions(device="cpu", adapt=adapt), " adapted"))
        if ensemble:
            variants += [(replace(options, uncertainty=True), f"{suffix} ensemble") for options, suffix in variants]
        runs = [(item.split("=", 1), options, suffix) for options, suffix in variants for item in ckpts]
        for (name, path), options, suffix in runs:
            start = time.perf_counter()
            result = next(iter(predict(src, Path(tmp) / f"{name}.nii.gz", path, options=options, upsample="auto",
                                       overwrite=True)))
            sr = load_volume(result.output).data
            if sr.shape != ref.shape:
                raise ValueError(f"{name}: output {sr.shape} is not the fine grid {ref.shape}")
            out[name + suffix] = {**_scored(sr, ref, metric_axis), "seconds": round(time.perf_counter() - start, 1)}
            if consistency:  # what data_consistency=true writes (the output's slices made the scan's)
                out[f"{name}{suffix} +dc"] = _scored(slices.slice_consistency(sr, coarse, spacing, axis), ref,
                                                     metric_axis)
            if "adapted" in suffix:
                record = json.loads((Path(tmp) / f"{name}.json").read_text())["adapt"]
                kept = ("steps", "used", "self_validation_psnr", "settings")
                out[name + suffix].update({k: record[k] for k in kept if k in record})
    return out


def _volume(name: str) -> tuple[np.ndarray, tuple[float, ...]]:
    if name == "s1":
        name = str(data_path("s1"))
    elif name == "anatomical":
        import nibabel

        name = str(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")
    vol = load_volume(name)
    return np.asarray(vol.data, dtype=np.float32), tuple(float(v) for v in vol.voxel_sizes), np.asarray(vol.image.affine)


def thick_scan(hr: np.ndarray, voxel_sizes: Sequence[float], mm: float,
               axis: int) -> tuple[float, int, np.ndarray, np.ndarray, int]:
    """``(thickness, spacing (fine voxels), thick slices, the HR on the grid they cover, the
    axis the scoring slices run across)`` for boxcar slices of ``mm`` along ``axis``; thickness =
    mm / voxel size, spacing = that rounded half up."""
    thickness = mm / voxel_sizes[axis]
    spacing = max(1, math.floor(thickness + 0.5))
    coarse = slices.thick_slices(hr, thickness, spacing, axis, "boxcar")
    ref = np.take(hr, range(coarse.shape[axis] * spacing), axis=axis)
    return thickness, spacing, coarse, ref, min(a for a in range(3) if a != axis)


def baselines(hr: np.ndarray, voxel_sizes: tuple[float, ...], mm: float, axis: int,
              affine: np.ndarray | None = None, ckpts: list[str] | None = None,
              adapt_minutes: float | None = None, adapt_patch: int | None = None,
              adapt_extra: dict[str, Any] | None = None, ensemble: bool = False,
              consistency: bool = False) -> dict[str, Any]:
    """PSNR / SSIM of each interpolation (and each of ``ckpts``; with ``consistency``, the cubic
    B-spline and each model also with the slices' data consistency) for ``mm`` slices along ``axis``."""
    thickness, spacing, coarse, ref, metric_axis = thick_scan(hr, voxel_sizes, mm, axis)
    row: dict[str, Any] = {"mm": mm, "axis": axis, "thickness_vox": thickness, "spacing_vox": spacing}
    for method in METHODS:
        if method == "sinc":
            fine = sinc_to_fine(coarse, spacing, axis)
        else:
            fine = slices.slices_to_fine(coarse, spacing, axis, method)  # type: ignore[arg-type]
        row[method] = _scored(fine, ref, metric_axis)
        if consistency and method == "cubic":
            row["cubic +dc"] = _scored(slices.slice_consistency(fine, coarse, spacing, axis), ref, metric_axis)
    if ckpts:
        row.update(model_rows(coarse, np.eye(4) if affine is None else affine, spacing, axis, ref, metric_axis, ckpts,
                              adapt_minutes, adapt_patch, adapt_extra, ensemble, consistency))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="+")
    parser.add_argument("--mm", type=float, nargs="+", default=[3.0, 4.0, 5.0])
    parser.add_argument("--axes", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ckpt", action="append", default=[], help="name=path of a thick-slice checkpoint")
    parser.add_argument("--adapt-minutes", type=float, default=None, help="also each checkpoint with adapt=true")
    parser.add_argument("--adapt-patch", type=int, default=None, help="default: the network's (adapt.network)")
    parser.add_argument("--adapt-network", default="auto", help="adapt.network: auto, checkpoint or planes")
    parser.add_argument("--adapt-lr", type=float, default=AdaptOptions.lr)
    parser.add_argument("--adapt-patience", type=int, default=AdaptOptions.patience)
    parser.add_argument("--adapt-rotations", type=int, default=None,
                        help="adapt.rotations (default: the plane network's, 5 for thick slices)")
    parser.add_argument("--adapt-no-flips", action="store_true", help="adapt.flips=false")
    parser.add_argument("--adapt-no-noise", action="store_true", help="adapt.noise=false (no noise matching)")
    parser.add_argument("--adapt-no-prior", action="store_true",
                        help="adapt.prior=false (the plane network from scratch, not from the released prior)")
    parser.add_argument("--ensemble", action="store_true",
                        help="also each checkpoint (and adapted one) averaged over the in-plane symmetries")
    parser.add_argument("--dc", action="store_true",
                        help="also the cubic B-spline and each model with data_consistency=true (the scan's slices kept)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for name in args.volumes:
        hr, sizes, affine = _volume(name)
        for mm in args.mm:
            for axis in args.axes:
                start = time.perf_counter()
                row = {"volume": name, **baselines(hr, sizes, mm, axis, affine, args.ckpt, args.adapt_minutes,
                                                   args.adapt_patch, {"lr": args.adapt_lr,
                                                                      "patience": args.adapt_patience,
                                                                      "network": args.adapt_network,
                                                                      "rotations": args.adapt_rotations,
                                                                      "flips": not args.adapt_no_flips,
                                                                      "noise": False if args.adapt_no_noise else None,
                                                                      "prior": False if args.adapt_no_prior else None},
                                                   args.ensemble, args.dc)}
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
