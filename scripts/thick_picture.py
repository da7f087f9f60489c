"""A real thick-slice scan by eye: the cubic B-spline, the thick-slice model, ``adapt=true`` on it.

ITK's example T1 (``mdcsrn-data path itk_lowres``: 128x128x62 at 2x2x3 mm, no HR exists) is
super-resolved along its thick axis by ``mdcsrn-infer``'s Python API (``predict``,
``upsample=auto``: 2 fine voxels per 3 mm slice) with the given checkpoint, once as it is and
once with ``adapt=true`` (the default for a thick-slice checkpoint: the plane network,
``inference/planes.py``); the picture shows one slice across the thick axis (axes 0 and 2) of
each, beside the cubic B-spline of the same slices, all on the cubic's 99.9th percentile.

    python scripts/thick_picture.py --ckpt src/mdcsrn_lightning/release/mdcsrn_b2u4k8_thick.ckpt \\
        --png docs/img/thick_itk.png

A developer's picture (README "Thick slices"), not part of the package.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from mdcsrn_lightning.data.fetch import data_path
from mdcsrn_lightning.data.slices import slices_to_fine
from mdcsrn_lightning.data.volume_io import load_volume
from mdcsrn_lightning.evaluation.panels import save_panel
from mdcsrn_lightning.inference.files import predict
from mdcsrn_lightning.inference.options import AdaptOptions, InferenceOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--scan", default=None, help="default: ITK's 2x2x3 mm T1")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    src = Path(args.scan) if args.scan else data_path("itk_lowres")
    scan = load_volume(src)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for label, options in (("thick-slice model", InferenceOptions(device="cpu")),
                               (f"adapt=true: plane network ({args.minutes:g} min)",
                                InferenceOptions(device="cpu", adapt=AdaptOptions(minutes=args.minutes, steps=100000)))):
            result = next(iter(predict(src, Path(tmp) / "sr.nii.gz", args.ckpt, options=options, upsample="auto",
                                       overwrite=True, provenance=False)))
            outs[label] = load_volume(result.output).data
    f = next(iter(outs.values())).shape[2] // scan.data.shape[2]
    cubic = slices_to_fine(scan.data, f, 2, "cubic")
    scale = float(np.percentile(cubic, 99.9))
    y = cubic.shape[1] // 2
    images = {"cubic B-spline": cubic[:, y, :] / scale, **{k: v[:, y, :] / scale for k, v in outs.items()}}
    save_panel(args.png, {k: np.rot90(v) for k, v in images.items()},
               title=f"{src.name}: slice across the thick axis (2x2x3 mm -> 2x2x{3 / f:g} mm)")
    print(args.png)


if __name__ == "__main__":
    main()
