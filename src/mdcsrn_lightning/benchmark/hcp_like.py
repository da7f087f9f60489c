"""An HCP-layout folder of full-size synthetic heads, for benchmarks and one slow test.

    <root>/<subject>/unprocessed/3T/T1w_MPR1/<subject>_3T_T1w_MPR1.nii.gz

Each subject is ``shape`` (default 320x320x256, the paper's HCP grid) at ``spacing`` mm
(0.7), int16 like a scanner's T1w, made from a 1 mm template (the MNI152 2009a shipped
in nilearn, and/or the ICBM 2009c T1 of ``mdcsrn-data fetch icbm152_t1``) by one
trilinear resampling through a random warp: a random affine (rotation, anisotropic scale,
translation) composed with a smooth random displacement (a few random long-wave sinusoids
per axis, evaluated where needed, so nothing is upsampled), then a smooth multiplicative
bias field, a gamma change, Rician noise and a random gain. All draws come from one
``torch.Generator`` seeded by ``(seed, index)``: the same subject is always the same file,
two subjects never are. The output grid is filled in slabs along the last axis, so memory
stays at the output volume plus one slab's coordinates (~0.4 GB at full size).

Never shipped as data: these are smooth template deformations, not anatomy. Cost and disk
use on the 2-core box are in ``docs/performance.md`` ("HCP-size data").

Writes are atomic (a killed run leaves no half-written volume) and the generation is
idempotent: subjects already present are skipped. ``<root>/hcp_like.json`` records the
settings; a second call with other settings on the same root is refused, so one folder
never mixes two recipes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from mdcsrn_lightning.atomic import atomic_path, write_json

__all__ = [
    "HCP_SHAPE",
    "HCP_SPACING",
    "TemplateName",
    "hcp_path",
    "make_hcp_like",
    "make_subject",
    "subject_ids",
]

HCP_SHAPE: tuple[int, int, int] = (320, 320, 256)
HCP_SPACING = 0.7
TemplateName = Literal["mni152", "icbm152_t1"]
SETTINGS_FILE = "hcp_like.json"
_RECIPE_VERSION = 1  # bump when a subject drawn from the same settings would change
_SLAB = 32  # output slices (last axis) resampled at once: bounds the coordinate tensors


def subject_ids(n: int, first: int = 100000) -> list[str]:
    """HCP-like 6-digit ids: ``["100000", "100001", ...]``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return [f"{first + i:06d}" for i in range(n)]


def hcp_path(root: str | Path, subject: str) -> Path:
    """``<root>/<subject>/unprocessed/3T/T1w_MPR1/<subject>_3T_T1w_MPR1.nii.gz``."""
    return Path(root) / subject / "unprocessed" / "3T" / "T1w_MPR1" / f"{subject}_3T_T1w_MPR1.nii.gz"


@lru_cache(maxsize=2)
def _template(name: TemplateName, data_dir: str | None) -> tuple[torch.Tensor, np.ndarray]:
    """``((1, 1, X, Y, Z) float32 scaled to its 99.9th percentile = 1, (4, 4) affine)``."""
    from mdcsrn_lightning.data.fetch import data_path
    from mdcsrn_lightning.data.sources import mni152_template_path
    from mdcsrn_lightning.data.volume_io import load_volume

    path = mni152_template_path() if name == "mni152" else str(data_path(name, data_dir))
    loaded = load_volume(path)
    data, affine = loaded.data, loaded.affine
    data = data / np.float32(np.percentile(data, 99.9))
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None], affine


def _uniform(gen: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(3, 3)`` rotation from three angles (radians) about x, y, z."""
    out = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles.tolist()):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


class _Waves:
    """A smooth random field ``R^3 -> R^C``: ``sum_k a_k sin(w_k . p + phi_k)`` (p in mm)."""

    def __init__(self, gen: torch.Generator, channels: int, terms: int, wavelength: tuple[float, float], amplitude: float) -> None:
        direction = torch.randn(terms, 3, generator=gen, dtype=torch.float64)
        direction /= direction.norm(dim=1, keepdim=True)
        length = _uniform(gen, *wavelength, terms, 1)
        self.omega = (2 * math.pi * direction / length).float()  # (K, 3)
        self.phase = _uniform(gen, 0, 2 * math.pi, terms).float()  # (K,)
        # amplitudes so that the field's standard deviation is about `amplitude` per channel
        self.amp = (torch.randn(terms, channels, generator=gen, dtype=torch.float64) * amplitude * math.sqrt(2 / terms)).float()

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` mm -> ``(..., C)``."""
        return torch.sin(points @ self.omega.T + self.phase) @ self.amp


def make_subject(
    index: int,
    seed: int = 0,
    shape: Sequence[int] = HCP_SHAPE,
    spacing: float = HCP_SPACING,
    templates: Sequence[TemplateName] = ("mni152",),
    data_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Subject ``index``: ``((X, Y, Z) int16, (4, 4) affine with voxel size spacing)``.

    Deterministic in ``(seed, index)`` and the other arguments; see the module docstring.
    """
    shape = _check_shape(shape)
    if not (isinstance(spacing, (int, float)) and 0 < spacing < 10):
        raise ValueError(f"spacing must be a number of mm in (0, 10), got {spacing!r}")
    templates = _check_templates(templates)
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (1 << 62))
    volume, t_affine = _template(templates[int(index) % len(templates)], data_dir)
    t_shape = volume.shape[2:]
    centre = torch.as_tensor(t_affine[:3, :3] @ ((np.asarray(t_shape) - 1) / 2) + t_affine[:3, 3])

    # output grid: `spacing` mm, centred on the template's centre (world mm)
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = centre.numpy() - spacing * (np.asarray(shape) - 1) / 2

    # world (output) -> world (template): p' = centre + A (p - centre) + t, then the warp
    linear = _rotation(_uniform(gen, -0.14, 0.14, 3)) @ torch.diag(_uniform(gen, 0.92, 1.08, 3))
    shift = _uniform(gen, -5.0, 5.0, 3)
    warp = _Waves(gen, 3, terms=6, wavelength=(40.0, 120.0), amplitude=2.5)  # mm
    bias = _Waves(gen, 1, terms=4, wavelength=(150.0, 400.0), amplitude=0.15)  # log gain
    gamma = float(torch.exp(0.12 * torch.randn(1, generator=gen, dtype=torch.float64)))
    sigma = float(_uniform(gen, 0.01, 0.03, 1))  # Rician noise, relative to the 99.9th percentile
    gain = float(_uniform(gen, 700.0, 1100.0, 1))  # int16 units of the template's 99.9th percentile
    noise_seed = int(torch.randint(0, 1 << 62, (1,), generator=gen))

    # world (template) -> normalised grid_sample coordinates (align_corners=True: -1..1 = first..last voxel)
    inv = torch.as_tensor(np.linalg.inv(t_affine))
    to_index = inv[:3, :3].float()
    to_index_shift = inv[:3, 3].float()
    size = torch.tensor([float(n - 1) for n in t_shape])
    world_to_template = (linear.float(), (centre + shift).float(), centre.float())

    axes = [torch.arange(n, dtype=torch.float32) * spacing + float(out_affine[i, 3]) for i, n in enumerate(shape)]
    out = torch.empty(shape, dtype=torch.float32)
    noise = torch.Generator().manual_seed(noise_seed)
    for z0 in range(0, shape[2], _SLAB):
        z1 = min(shape[2], z0 + _SLAB)
        p = torch.stack(torch.meshgrid(axes[0], axes[1], axes[2][z0:z1], indexing="ij"), dim=-1)  # (X, Y, z, 3) mm
        a, target_centre, source_centre = world_to_template
        q = (p + warp(p) - source_centre) @ a.T + target_centre
        idx = q @ to_index.T + to_index_shift  # template voxel indices (i, j, k)
        grid = (2 * idx / size - 1).flip(-1)  # grid_sample wants (k, j, i) for a (D=X, H=Y, W=Z) volume
        slab = F.grid_sample(volume, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        slab = slab.clamp_min_(0).pow_(gamma) * torch.exp(bias(p)[..., 0])
        n1 = torch.randn(slab.shape, generator=noise) * sigma
        n2 = torch.randn(slab.shape, generator=noise) * sigma
        out[:, :, z0:z1] = torch.sqrt((slab + n1) ** 2 + n2**2)
    data = (out * gain).round_().clamp_(0, 32767).to(torch.int16).numpy()
    return data, out_affine


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    vals = tuple(shape)
    if len(vals) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2 for v in vals):
        raise ValueError(f"shape must be 3 ints >= 2, got {shape!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def _check_templates(templates: Sequence[TemplateName]) -> tuple[TemplateName, ...]:
    names = tuple(templates) if not isinstance(templates, str) else (templates,)
    allowed = get_args(TemplateName)
    if not names or any(t not in allowed for t in names):
        raise ValueError(f"templates must be a non-empty list of {allowed}, got {templates!r}")
    return names  # type: ignore[return-value]


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def make_hcp_like(
    root: str | Path,
    n: int,
    shape: Sequence[int] = HCP_SHAPE,
    spacing: float = HCP_SPACING,
    seed: int = 0,
    templates: Sequence[TemplateName] = ("mni152",),
    data_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Write subjects ``0..n-1`` under ``root`` (skipping those already there).

    Returns ``{"paths": [...], "made": k, "skipped": m, "seconds_per_subject": s, "bytes": b}``
    (``seconds_per_subject`` over the subjects made now; ``bytes``: the n volume files).

    Raises:
        ValueError: bad arguments, or ``root`` made earlier with other settings (the
            message names ``<root>/hcp_like.json``).
    """
    ids = subject_ids(n)
    shape = _check_shape(shape)
    templates = _check_templates(templates)
    root = Path(root)
    settings = {
        "recipe": _RECIPE_VERSION, "shape": list(shape), "spacing": float(spacing), "seed": int(seed),
        "templates": list(templates),
    }
    record = root / SETTINGS_FILE
    if record.is_file():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{record}: unreadable ({exc}); remove it or pick another root") from None
        if old != settings:
            raise ValueError(f"{record}: this folder was made with {old}, not {settings}; pick another root")
    else:
        write_json(record, settings)
    paths, made, seconds = [], 0, 0.0
    for i, sid in enumerate(ids):
        path = hcp_path(root, sid)
        paths.append(path)
        if path.is_file():
            continue
        start = time.perf_counter()
        data, affine = make_subject(i, seed, shape, spacing, templates, data_dir)
        _write_nifti(path, data, affine)
        seconds += time.perf_counter() - start
        made += 1
        if log is not None:
            log(f"{path}: {time.perf_counter() - start:.1f} s ({i + 1}/{n})")
    return {
        "paths": [str(p) for p in paths],
        "made": made,
        "skipped": len(ids) - made,
        "seconds_per_subject": seconds / made if made else None,
        "bytes": sum(p.stat().st_size for p in paths),
    }
