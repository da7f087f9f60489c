"""Train the plane network's prior (``adapt.prior``; ``inference/plane_prior.py``) and write it.

The training volumes are those of ``experiment=release_thick_cpu``'s ICBM part, training slabs
only: the ICBM 2009c T1 and T2 templates (``mdcsrn-data icbm152_t1`` / ``icbm152_t2``), cut
into 5 slabs along axis 2 over their foreground, slabs 1-3 kept (4 and 5 are that experiment's
validation and test slabs; pycortex S1 and nibabel's anatomical.nii, the scans results are
reported on, are in no part of it). Each is used at 1 mm with slices of 2-6 voxels and, as a
2x2x2 block mean, at 2 mm with slices of 2-3 voxels (thick slices of 2-6 mm, in voxels of either
size). ``--itk N`` adds ITK's real low-resolution scan (``mdcsrn-data itk_lowres``, 2x2x3 mm:
its 2 mm planes, slices of 2-3 voxels) N times, so that one real person's contrast and noise
weigh beside the two smooth templates; ``--synthetic N`` adds N synthetic subjects
(``data/synthetic.py``, seed ``SYNTHETIC_SEED``) as the templates are used.

    OMP_NUM_THREADS=2 python scripts/train_plane_prior.py --minutes 40 --itk 3 --out src/mdcsrn_lightning/release/planenet_thick_prior.pt

A developer's command (what it wrote: MODEL_CARD_thick.md "The plane prior"), not part of the
installed package.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from mdcsrn_lightning.data.fetch import data_path
from mdcsrn_lightning.data.registry_sources import foreground_extent, slab_edges
from mdcsrn_lightning.data.synthetic import SyntheticSource
from mdcsrn_lightning.data.volume_io import load_volume
from mdcsrn_lightning.inference.plane_prior import save_prior, train_prior

KEYS = ("icbm152_t1", "icbm152_t2")
TRAIN_SLABS = (0, 3)  # of 5 along axis 2, as experiment=release_thick_cpu's slab_roles
FACTORS_1MM = [2, 3, 4, 5, 6]
FACTORS_2MM = [2, 3]
SYNTHETIC_SEED = 7  # not the seeds of experiment=release_thick_cpu's subjects


def training_slabs(key: str) -> np.ndarray:
    """``key``'s volume, its training slabs only (float32)."""
    data = np.asarray(load_volume(str(data_path(key))).data, dtype=np.float32)
    lo, hi = foreground_extent(data, 2)
    edges = slab_edges(lo, hi, 5)
    return data[:, :, edges[TRAIN_SLABS[0]][0]:edges[TRAIN_SLABS[1] - 1][1]]


def block_mean(volume: np.ndarray) -> np.ndarray:
    """2x2x2 block mean (an odd last voxel dropped)."""
    x, y, z = (n // 2 for n in volume.shape)
    return volume[:2 * x, :2 * y, :2 * z].reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--itk", type=int, default=0, help="copies of ITK's real 2x2x3 mm scan (its 2 mm planes)")
    parser.add_argument("--synthetic", type=int, default=0, help="synthetic subjects, used as the templates are")
    args = parser.parse_args()
    volumes, factors, names = [], [], []
    sets = [(f"{key} slabs {TRAIN_SLABS[0] + 1}-{TRAIN_SLABS[1]} of 5 along axis 2", training_slabs(key)) for key in KEYS]
    if args.synthetic:
        source = SyntheticSource(num_subjects=args.synthetic, seed=SYNTHETIC_SEED, crop=(144, 176, 144))
        sets += [(f"synthetic {i}", source.render(i)[0]) for i in range(args.synthetic)]
    for name, slabs in sets:
        for volume, fs, mm in ((slabs, FACTORS_1MM, 1), (block_mean(slabs), FACTORS_2MM, 2)):
            volumes.append(volume)
            factors.append(fs)
            names.append(f"{name}, {mm} mm {list(volume.shape)}")
    if args.itk:  # axis 2 is its 3 mm slice axis: the planes (X, Y) are sharp at 2 mm
        itk = np.asarray(load_volume(str(data_path("itk_lowres"))).data, dtype=np.float32)
        volumes += [itk] * args.itk
        factors += [FACTORS_2MM] * args.itk
        names += [f"itk_lowres 2 mm planes {list(itk.shape)}"] * args.itk
    net, record = train_prior(volumes, factors, steps=args.steps, minutes=args.minutes, seed=args.seed, progress=True)
    record.update(volumes=names, command="python scripts/train_plane_prior.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    save_prior(net, record, args.out)
    print(args.out, record)


if __name__ == "__main__":
    main()
