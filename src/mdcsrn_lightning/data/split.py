"""Subject-wise train/val/eval/test split, deterministic from a seed, written once and reused.

The paper splits 1113 HCP subjects 780/111/111/111 (train / validation / evaluation /
test); the same proportions are applied to any cohort. The split is by *subject*, so no
subject's voxels are ever seen in two sets.

Order comes from ``sha256(f"{seed}:{name}")`` rather than from a random generator, so it
does not depend on the order the names arrive in nor on numpy/Python RNG versions, and
adding a subject to the cohort moves no other subject between sets (except through the
set sizes changing).

A split written to a file is *read back and reused* when the file exists (a resumed run
keeps its split even if the seed or fractions in the config changed); it is validated
first: it must be a JSON object with the four lists, name only subjects the source has, and
name no subject twice.

**Groups.** A source may tie several subject ids to one person (``split_groups``: the
sessions of one BIDS subject). The seeded split then orders and counts *groups*, and every
id of a group lands in its group's set: the fractions apply to persons, and sessions of one
person never straddle train and test. An existing split file that puts one group's ids in
two sets is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from mdcsrn_lightning.atomic import write_json

__all__ = [
    "SPLIT_NAMES",
    "SplitError",
    "SplitName",
    "check_fractions",
    "load_or_create_split",
    "make_split",
    "read_split",
    "split_counts",
    "write_split",
]

log = logging.getLogger(__name__)

SplitName = Literal["train", "val", "eval", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "eval", "test")
_FORMAT = "mdcsrn-split/1"


class SplitError(ValueError):
    """A split cannot be made from these subjects, or a split file is unusable."""


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float, float]:
    """Validate ``(train, val, eval, test)`` weights: 4 finite numbers >= 0, train > 0."""
    try:
        fs = tuple(float(f) for f in fractions)
    except TypeError as exc:
        raise ValueError(f"split fractions must be 4 numbers (train, val, eval, test), got {fractions!r}") from exc
    if len(fs) != 4:
        raise ValueError(f"split fractions must be 4 numbers (train, val, eval, test), got {len(fs)}: {fractions!r}")
    if any(not (f >= 0.0) or f == float("inf") for f in fs):
        raise ValueError(f"split fractions must be finite and >= 0, got {fractions!r}")
    if fs[0] <= 0.0:
        raise ValueError(f"the train fraction must be > 0, got {fractions!r}")
    return fs  # type: ignore[return-value]


def split_counts(num_subjects: int, fractions: Sequence[float] = (780, 111, 111, 111)) -> dict[str, int]:
    """Set sizes for ``num_subjects`` subjects.

    ``fractions`` are relative weights (``(780, 111, 111, 111)`` and ``(0.7, 0.1, 0.1, 0.1)``
    are both fine). Every set with a non-zero weight gets at least one subject, the
    val/eval/test sizes are rounded, and train gets the rest: 1113 subjects ->
    780/111/111/111 exactly.

    Raises:
        SplitError: fewer subjects than sets with a non-zero weight.
    """
    fs = check_fractions(fractions)
    if num_subjects < 0:
        raise ValueError(f"num_subjects must be >= 0, got {num_subjects}")
    needed = sum(1 for f in fs if f > 0)
    if num_subjects < needed:
        raise SplitError(
            f"cannot split {num_subjects} subject(s) into {needed} non-empty sets "
            f"(fractions {tuple(fractions)}); need at least {needed} subjects"
        )
    total = sum(fs)
    others = [max(1, round(num_subjects * f / total)) if f > 0 else 0 for f in fs[1:]]
    # Rounding up small sets can leave train empty: take back from the largest set.
    while num_subjects - sum(others) < 1:
        i = max(range(3), key=lambda j: others[j])
        others[i] -= 1
    counts = [num_subjects - sum(others), *others]
    return dict(zip(SPLIT_NAMES, counts))


def _order_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def make_split(
    subjects: Sequence[str],
    fractions: Sequence[float] = (780, 111, 111, 111),
    seed: int = 42,
) -> dict[str, list[str]]:
    """Split subject ids into ``{"train", "val", "eval", "test"}`` lists (each sorted).

    Same names (in any order) + same seed -> same split.
    """
    names = [str(s) for s in subjects]
    dupes = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dupes:
        raise SplitError(f"subject ids must be unique, repeated: {dupes[:5]}")
    counts = split_counts(len(names), fractions)
    ordered = sorted(names, key=lambda n: _order_key(int(seed), n))
    out: dict[str, list[str]] = {}
    start = 0
    # val/eval/test first so their membership depends least on the cohort size.
    for split_name in ("val", "eval", "test", "train"):
        n = counts[split_name]
        out[split_name] = sorted(ordered[start : start + n])
        start += n
    return {k: out[k] for k in SPLIT_NAMES}


def write_split(path: str | os.PathLike[str], split: dict[str, list[str]], **meta: object) -> None:
    """Write ``split`` as JSON atomically (temp file in the same folder + ``os.replace``)."""
    payload: dict[str, object] = {"format": _FORMAT, **meta}
    payload["counts"] = {k: len(split[k]) for k in SPLIT_NAMES}
    payload.update({k: list(split[k]) for k in SPLIT_NAMES})
    write_json(path, payload, indent=1)  # creates the folder


def read_split(path: str | os.PathLike[str], known_subjects: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Read and validate a split file.

    Raises:
        SplitError: unreadable JSON, missing or malformed lists, a subject in two sets, or
            (when ``known_subjects`` is given) a subject the source does not have.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitError(f"{p}: split file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SplitError(f"{p}: split file is not readable JSON ({exc}); delete it to recompute the split") from None
    if not isinstance(raw, dict):
        raise SplitError(f"{p}: split file must hold a JSON object with lists {list(SPLIT_NAMES)}")
    split: dict[str, list[str]] = {}
    for name in SPLIT_NAMES:
        lst = raw.get(name)
        if not isinstance(lst, list) or not all(isinstance(s, str) for s in lst):
            raise SplitError(f"{p}: split file has no list of subject ids under {name!r}")
        split[name] = list(lst)
    if not split["train"]:
        raise SplitError(f"{p}: split file has an empty train set")
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for s in split[name]:
            if s in seen:
                raise SplitError(f"{p}: subject {s!r} is in both {seen[s]!r} and {name!r}")
            seen[s] = name
    if known_subjects is not None:
        known = set(known_subjects)
        unknown = sorted(s for s in seen if s not in known)
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise SplitError(
                f"{p}: split file names {len(unknown)} subject(s) the data source does not have "
                f"({shown}); was it written for other data? Delete it to recompute the split"
            )
    return split


def _check_groups(split: Mapping[str, Sequence[str]], groups: Mapping[str, str], where: str) -> None:
    """Refuse a split in which the ids of one group (one person) sit in two sets."""
    seen: dict[str, tuple[str, str]] = {}
    for set_name in SPLIT_NAMES:
        for sid in split.get(set_name, ()):
            group = groups.get(sid)
            if group is None:
                continue
            if group in seen and seen[group][1] != set_name:
                other, other_set = seen[group]
                raise SplitError(
                    f"{where}: {other!r} ({other_set}) and {sid!r} ({set_name}) belong to one subject "
                    f"{group!r} but sit in two sets; delete the file to recompute the split"
                )
            seen.setdefault(group, (sid, set_name))


def _split_by_group(
    free: Sequence[str], fractions: Sequence[float], seed: int, groups: Mapping[str, str]
) -> dict[str, list[str]]:
    """:func:`make_split` over the groups of ``free`` (an id without a group is its own group)."""
    members: dict[str, list[str]] = {}
    for sid in free:
        # a prefix keeps a lone id from colliding with a group name
        key = f"g:{groups[sid]}" if sid in groups else f"s:{sid}"
        members.setdefault(key, []).append(sid)
    by_group = make_split(sorted(members), fractions, seed)
    return {k: sorted(sid for key in by_group[k] for sid in members[key]) for k in SPLIT_NAMES}


def _split_with_forced(
    subjects: Sequence[str],
    fractions: Sequence[float],
    seed: int,
    forced: Mapping[str, str],
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    names = [str(s) for s in subjects]
    unknown = sorted(set(forced) - set(names))
    if unknown:
        raise SplitError(f"forced set for subject(s) the source does not have: {unknown[:3]}")
    bad = sorted({v for v in forced.values() if v not in SPLIT_NAMES})
    if bad:
        raise SplitError(f"forced sets must be one of {SPLIT_NAMES}, got {bad}")
    free = [n for n in names if n not in forced]
    check_fractions(fractions)
    if not free:
        split: dict[str, list[str]] = {k: [] for k in SPLIT_NAMES}
    elif groups:
        split = _split_by_group(free, fractions, seed, groups)
    else:
        split = make_split(free, fractions, seed)
    for name, set_name in forced.items():
        split[set_name].append(name)
    split = {k: sorted(v) for k, v in split.items()}
    if not split["train"]:
        raise SplitError(f"no training subject: every one of the {len(names)} subject(s) is forced into another set")
    return split


def load_or_create_split(
    subjects: Sequence[str],
    fractions: Sequence[float] = (780, 111, 111, 111),
    seed: int = 42,
    path: str | os.PathLike[str] | None = None,
    forced: Mapping[str, str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Reuse the split in ``path`` if it exists, otherwise make one (and write it if ``path``).

    Subjects the source has but an existing file does not list are left out of every set
    (with a warning): a resumed run must not see new subjects silently enter training.

    ``forced`` (``{id: set}``) places those subjects in their set directly; ``fractions``
    and ``seed`` split the others (none left is fine when every subject is forced).
    ``groups`` (``{id: group}``, e.g. the sessions of one person) keeps each group in one set
    (see the module docstring); a file that splits a group is refused.
    """
    if path is not None and Path(path).exists():
        split = read_split(path, known_subjects=subjects)
        if groups:
            _check_groups(split, groups, str(path))
        listed = {s for lst in split.values() for s in lst}
        missing = [s for s in subjects if s not in listed]
        if missing:
            log.warning(
                "%s: %d subject(s) of the source are in no set of this existing split and are not used "
                "(e.g. %s); delete the file to recompute the split",
                path,
                len(missing),
                missing[0],
            )
        return split
    split = _split_with_forced(subjects, fractions, seed, forced or {}, groups)
    if groups:
        _check_groups(split, groups, "the forced sets")  # a source that forces one person into two sets
    if path is not None:
        write_split(path, split, seed=int(seed), fractions=[float(f) for f in fractions])
    return split
