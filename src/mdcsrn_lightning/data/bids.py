"""Subjects from a BIDS dataset: ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]..._T1w.nii[.gz]``.

One subject id per scan (the file name without its suffix: ``sub-01_ses-pre_run-1``), and
every scan of one person in one split group (``sub-01``), so the seeded split counts persons
and the sessions of one person never straddle train and test (``data/split.py``).

``participants.tsv`` is optional. When present it must be a tab-separated table with a
``participant_id`` column; people it lists without a scan, and scans of people it does not
list, are reported in one warning each (BIDS validators flag both), and its rows are kept in
:attr:`BidsSource.participants` for reports.

Only the raw tree is read: ``derivatives/``, ``sourcedata/`` and anything not under
``sub-*`` are ignored.
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

from mdcsrn_lightning.data.sources import GlobSource, VolumeError

__all__ = ["BidsSource", "parse_bids_name"]

_ENTITY = re.compile(r"^(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)$")
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")


def parse_bids_name(name: str, suffix: str) -> dict[str, str] | None:
    """``"sub-01_ses-2_run-1_T1w.nii.gz"`` -> ``{"sub": "01", "ses": "2", "run": "1"}``.

    ``None`` when the name is not ``<entities>_<suffix>.nii[.gz]`` with ``sub`` first.
    """
    for ext in (".nii.gz", ".nii"):
        if name.endswith(f"_{suffix}{ext}"):
            stem = name[: -len(f"_{suffix}{ext}")]
            break
    else:
        return None
    entities: dict[str, str] = {}
    for part in stem.split("_"):
        match = _ENTITY.match(part)
        if match is None or match["key"] in entities:
            return None
        entities[match["key"]] = match["value"]
    if next(iter(entities), None) != "sub":
        return None
    return entities


class BidsSource(GlobSource):
    """Every ``<suffix>`` scan of a BIDS dataset's raw tree, grouped by person for the split.

    Args:
        root: the BIDS dataset folder (holding ``sub-*`` and, optionally, ``participants.tsv``).
        suffix: the BIDS suffix of the HR scans (``T1w``, ``T2w``, ``PDw``, ``FLAIR``).
        sessions: keep only these session labels (``["pre"]``), or ``None``: all sessions.

    Subject ids are the file names without ``_<suffix>.nii[.gz]`` (unique in a valid
    dataset); :meth:`split_groups` maps each to ``sub-<label>``. A file whose ``sub``/``ses``
    entities disagree with its folders is refused with one line naming it.
    """

    def __init__(self, root: str, suffix: str = "T1w", sessions: list[str] | None = None) -> None:
        if not isinstance(suffix, str) or not _LABEL.match(suffix):
            raise ValueError(f"suffix must be a BIDS suffix such as 'T1w', got {suffix!r}")
        if sessions is not None:
            sessions = [str(s) for s in sessions]
            bad = [s for s in sessions if not _LABEL.match(s)]
            if not sessions or bad:
                raise ValueError(f"sessions must be a non-empty list of session labels (no 'ses-' prefix), got {sessions!r}")
        # `**` covers both layouts (sub-*/anat and sub-*/ses-*/anat); _scan checks the folders
        super().__init__(root=root, pattern=f"sub-*/**/anat/sub-*_{suffix}.nii*", id_depth=None)
        self.suffix = suffix
        self.sessions = sessions
        self.participants: dict[str, dict[str, str]] = {}
        self._groups: dict[str, str] | None = None

    def __repr__(self) -> str:
        sessions = f", sessions={self.sessions!r}" if self.sessions else ""
        return f"BidsSource(root={self.root!r}, suffix={self.suffix!r}{sessions})"

    def _scan(self, root: str, pattern: str) -> dict[str, str]:
        base = Path(root)
        if not base.is_dir():
            raise VolumeError(f"{root}: BIDS root {'is not a folder' if base.exists() else 'not found'}")
        found: dict[str, str] = {}
        groups: dict[str, str] = {}
        for path in sorted(base.glob(pattern)):
            rel = path.relative_to(base).parts
            if not path.is_file() or not path.name.endswith((".nii", ".nii.gz")):
                continue
            if not (len(rel) == 3 or (len(rel) == 4 and rel[1].startswith("ses-"))) or rel[-2] != "anat":
                continue  # not sub-*/anat or sub-*/ses-*/anat: not part of the raw tree's layout
            entities = parse_bids_name(path.name, self.suffix)
            if entities is None:
                raise VolumeError(f"{path}: not a BIDS name (sub-<label>[_ses-<label>]..._{self.suffix}.nii[.gz])")
            folder_ses = rel[1][4:] if len(rel) == 4 else None
            if f"sub-{entities['sub']}" != rel[0] or entities.get("ses") != folder_ses:
                raise VolumeError(
                    f"{path}: entities sub-{entities['sub']}"
                    + (f"/ses-{entities['ses']}" if "ses" in entities else "")
                    + f" disagree with its folder {'/'.join(rel[:-2])}"
                )
            if self.sessions is not None and folder_ses not in self.sessions:
                continue
            sid = path.name[: -len(f"_{self.suffix}.nii.gz" if path.name.endswith(".gz") else f"_{self.suffix}.nii")]
            if sid in found:
                raise VolumeError(f"{path}: the same scan as {found[sid]} (.nii and .nii.gz); keep one")
            found[sid] = str(path)
            groups[sid] = rel[0]
        if not found:
            what = f" in sessions {self.sessions}" if self.sessions else ""
            raise VolumeError(f"{root}: no sub-*/[ses-*/]anat/*_{self.suffix}.nii[.gz] scans{what}")
        self._groups = groups
        self._read_participants(base, set(groups.values()))
        return found

    def _read_participants(self, base: Path, people: set[str]) -> None:
        path = base / "participants.tsv"
        if not path.is_file():
            return
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
                columns = list(rows[0]) if rows else []
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise VolumeError(f"{path}: not readable as a tab-separated table ({exc})") from None
        if rows and "participant_id" not in columns:
            raise VolumeError(f"{path}: no participant_id column (columns: {', '.join(columns) or 'none'})")
        self.participants = {str(r["participant_id"]).strip(): dict(r) for r in rows if r.get("participant_id")}
        listed = set(self.participants)
        unlisted = sorted(people - listed)
        if unlisted:
            warnings.warn(f"{path}: does not list {len(unlisted)} subject(s) with scans, e.g. {unlisted[0]}", stacklevel=3)
        without = sorted(listed - people)
        if without and self.sessions is None:
            warnings.warn(f"{path}: lists {len(without)} subject(s) without a {self.suffix} scan, e.g. {without[0]}", stacklevel=3)

    def split_groups(self) -> dict[str, str]:
        self._files()
        assert self._groups is not None
        return dict(self._groups)
