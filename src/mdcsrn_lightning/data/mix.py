"""Several sources in one run, each with a weight and a role.

``MixSource({"s1": {"source": ..., "role": "test"}, "synth": {"source": ..., "weight": 2}})``:

- **ids** are ``<part>/<id>``, so they stay unique whatever the parts call their subjects;
- **role** ``split`` (default): the part's subjects go through the seeded, subject-wise
  split (or keep the sets the part itself fixes, e.g. ``FileSource.slab_roles``);
  ``train``/``val``/``eval``/``test``: every subject of the part goes to that set (a real
  person's scan held out of training entirely: ``role: test``);
- **weight** (``>= 0``): the part's expected share of the training patches, relative to the
  other parts' weights. The data module draws training subjects with replacement, each with
  probability ``weight / (number of the part's training subjects)`` normalised over all
  training subjects; an epoch still holds ``samples_per_volume`` patches per training
  subject. Equal weights give every *part* (not every subject) the same share: one real scan
  is not drowned by a hundred synthetic subjects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.sources import SubjectVolumes, VolumeSource

__all__ = ["MixPart", "MixSource", "Role"]

Role = Literal["split", "train", "val", "eval", "test"]


@dataclass(frozen=True)
class MixPart:
    """One part of a mix: a source, its weight and its role (see the module docstring)."""

    name: str
    source: VolumeSource
    weight: float = 1.0
    role: Role = "split"


def _part(name: str, spec: Mapping[str, Any] | MixPart) -> MixPart:
    if isinstance(spec, MixPart):
        part = spec
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"source", "weight", "role"}
        if unknown or "source" not in spec:
            raise ValueError(f"mix part {name!r} must have a source and optional weight/role, got keys {sorted(spec)}")
        part = MixPart(name=name, source=spec["source"], weight=spec.get("weight", 1.0), role=spec.get("role", "split"))
    else:
        raise ValueError(f"mix part {name!r} must be a mapping with a source, got {spec!r}")
    if not name or "/" in name:
        raise ValueError(f"mix part names must be non-empty and contain no '/', got {name!r}")
    if not isinstance(part.source, VolumeSource):
        raise ValueError(f"mix part {name!r}: source must be a VolumeSource, got {part.source!r}")
    w = part.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"mix part {name!r}: weight must be a finite number >= 0, got {w!r}")
    if part.role not in get_args(Role):
        raise ValueError(f"mix part {name!r}: role must be one of {get_args(Role)}, got {part.role!r}")
    return replace(part, name=name, weight=float(w))


class MixSource(VolumeSource):
    """Subjects of several sources under ``<part>/<id>`` ids, with per-part weights and roles.

    Args:
        sources: ``{name: {"source": VolumeSource, "weight": float, "role": Role}}`` (a Hydra
            dict, so one part can be changed on the command line:
            ``data.source.sources.s1.role=test``), or a list of :class:`MixPart`.
    """

    def __init__(self, sources: Mapping[str, Mapping[str, Any] | MixPart] | Sequence[MixPart]) -> None:
        if isinstance(sources, Mapping):
            parts = [_part(str(k), v) for k, v in sources.items() if v is not None]
        elif isinstance(sources, Sequence) and all(isinstance(p, MixPart) for p in sources):
            parts = [_part(p.name, p) for p in sources]
        else:
            raise ValueError(f"sources must be a mapping name -> {{source, weight, role}}, got {sources!r}")
        if not parts:
            raise ValueError("a mix needs at least one source")
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"mix part names must be unique, got {names}")
        self.parts = {p.name: p for p in parts}

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.name}={p.source!r} (weight {p.weight:g}, role {p.role})" for p in self.parts.values())
        return f"MixSource({inner})"

    def _split_id(self, subject_id: str) -> tuple[MixPart, str]:
        name, _, inner = subject_id.partition("/")
        if name not in self.parts or not inner:
            raise KeyError(f"unknown subject {subject_id!r} in {self!r}")
        return self.parts[name], inner

    def subject_ids(self) -> list[str]:
        return sorted(f"{p.name}/{sid}" for p in self.parts.values() for sid in p.source.subject_ids())

    def forced_sets(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in self.parts.values():
            if p.role == "split":
                out.update({f"{p.name}/{sid}": s for sid, s in p.source.forced_sets().items()})
            else:
                out.update({f"{p.name}/{sid}": p.role for sid in p.source.subject_ids()})
        return out

    def split_groups(self) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for p in self.parts.values():
            groups = p.source.split_groups() or {}
            out.update({f"{p.name}/{sid}": f"{p.name}/{g}" for sid, g in groups.items()})
        return out or None

    def sampling_groups(self) -> dict[str, tuple[str, float]]:
        return {f"{p.name}/{sid}": (p.name, p.weight) for p in self.parts.values() for sid in p.source.subject_ids()}

    def location(self, subject_id: str) -> str:
        part, inner = self._split_id(subject_id)
        return part.source.location(inner)

    def cache_token(self, subject_id: str) -> str:
        part, inner = self._split_id(subject_id)
        return f"mix|{part.name}|{part.source.cache_token(inner)}"

    def load(self, subject_id: str) -> SubjectVolumes:
        part, inner = self._split_id(subject_id)
        return replace(part.source.load(inner), name=subject_id)

    def degraded(
        self, subject_id: str, factors: Sequence[float], interpolation: degradation.Interpolation
    ) -> np.ndarray | None:
        part, inner = self._split_id(subject_id)
        return part.source.degraded(inner, factors, interpolation)

    def hr_path(self, subject_id: str) -> str | None:
        part, inner = self._split_id(subject_id)
        return part.source.hr_path(inner)

    def lr_path(self, subject_id: str) -> str | None:
        part, inner = self._split_id(subject_id)
        return part.source.lr_path(inner)
