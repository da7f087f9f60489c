"""The coarse-matrix route (``upsample=``) against ``degrade=true``, on real scans never trained on.

For each HR scan and checkpoint, through ``mdcsrn-infer``'s Python API (``predict``):

- ``degrade=true`` on the HR scan (the fine-grid LR the checkpoint was trained on), and
- the coarse-matrix scan a scanner would write (the HR's central 2x2x1 k-space, inverse FFT,
  magnitude, on the coarse grid with its own affine) with ``upsample=auto``,

each with the checkpoint's data-consistency default, scored against the HR as ``mdcsrn-eval``
does (mean over slices along axis 2: PSNR in dB, SSIM), beside each route's own zero-filled
input (complex k-space zero-filled for ``degrade``, the magnitude image's for ``upsample``).

    python scripts/coarse_matrix_eval.py --scan s1=$(mdcsrn-data path s1) \\
        --scan anatomical=<nibabel>/tests/data/anatomical.nii --ckpt v2=<old.ckpt> --ckpt v3=<new.ckpt>

A developer's measurement (results: release/MODEL_CARD.md), not part of the package.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from mdcsrn_lightning.data.degradation import (
    degrade,
    kspace_truncate,
    lr_shape,
    to_fine_grid,
)
from mdcsrn_lightning.data.volume_io import load_volume
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from mdcsrn_lightning.inference.files import predict


def score(sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    m = slice_metrics(sr, hr, axis=2)
    return {"psnr": round(float(m["psnr"]), 3), "ssim": round(float(m["ssim"]), 4)}


def coarse_scan(hr_path: str, folder: Path) -> tuple[Path, np.ndarray]:
    """The HR's coarse-matrix magnitude image (2x2x1), saved with the coarse grid's affine."""
    image = nib.load(hr_path)
    hr = np.asarray(image.dataobj, dtype=np.float32)
    coarse = np.abs(kspace_truncate(hr, (2, 2, 1))).astype(np.float32)
    assert coarse.shape == lr_shape(hr.shape, (2, 2, 1))
    grid = np.diag([hr.shape[i] / coarse.shape[i] for i in range(3)] + [1.0])  # LR voxel i at HR i * N / M
    path = folder / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(coarse, image.affine @ grid), str(path))
    return path, hr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", action="append", required=True, help="name=path of an HR scan")
    parser.add_argument("--ckpt", action="append", required=True, help="name=path of a checkpoint")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for item in args.scan:
            name, path = item.split("=", 1)
            coarse, hr = coarse_scan(path, folder)
            inputs = {"degrade=true": degrade(hr, (2, 2, 1), "zero_filled"),
                      "upsample=auto": to_fine_grid(load_volume(coarse).data, (2, 2, 1), "zero_filled_magnitude",
                                                    hr.shape)}
            for route, fed in inputs.items():
                rows.append({"scan": name, "ckpt": "(the network input)", "route": route, **score(fed, hr)})
            for label, ckpt in (c.split("=", 1) for c in args.ckpt):
                for route, kwargs, src in (("degrade=true", {"degrade": True}, path),
                                           ("upsample=auto", {"upsample": "auto", "upsample_shape": hr.shape}, str(coarse))):
                    out = folder / f"{name}_{label}_{route[:3]}.nii.gz"
                    result = next(iter(predict(src, out, ckpt, data_consistency="auto", overwrite=True,
                                               provenance=False, **kwargs)))
                    sr = load_volume(result.output).data
                    assert sr.shape == hr.shape, (sr.shape, hr.shape)
                    rows.append({"scan": name, "ckpt": label, "route": route, **score(sr, hr)})
                    print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"| {r['scan']} | {r['ckpt']} | {r['route']} | {r['psnr']:.2f} | {r['ssim']:.4f} |")


if __name__ == "__main__":
    main()
