"""BIDS-derivative outputs of ``mdcsrn-infer bids=true``.

An input named like a BIDS raw file, ``sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz]``,
gives ``<out>/sub-<label>/[ses-<label>/]<datatype>/sub-<label>[_ses-<label>]..._desc-sr_<suffix>.nii.gz``
(its entities and suffix kept, ``desc-sr`` last; an input's own ``desc`` is replaced; the
datatype folder is the input's own when it is a BIDS datatype, else ``anat``), and the
derivative dataset has ``<out>/dataset_description.json``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdcsrn_lightning.inference.base import InferenceError

__all__ = ["BIDS_VERSION", "bids_output", "dataset_description", "description_path", "plan_bids_outputs"]

BIDS_VERSION = "1.9.0"
_DATATYPES = frozenset({"anat", "func", "dwi", "fmap", "perf", "pet", "meg", "eeg", "ieeg", "beh", "micr", "nirs", "motion"})
_NAME = re.compile(r"^(sub-[A-Za-z0-9]+)((?:_[A-Za-z]+-[A-Za-z0-9]+)*)_([A-Za-z0-9]+)\.nii(\.gz)?$", re.IGNORECASE)


def _entities(path: Path) -> tuple[list[tuple[str, str]], str]:
    """``([(key, value), ...], suffix)`` of a BIDS-like file name, else one-line :class:`InferenceError`."""
    found = _NAME.match(path.name)
    if found is None or path.is_dir():
        raise InferenceError(
            f"{path}: not a BIDS-like name (expected sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz], "
            "e.g. sub-01_ses-1_T1w.nii.gz); bids=true needs BIDS inputs")
    pairs = [tuple(part.split("-", 1)) for part in (found.group(1) + found.group(2)).split("_")]
    return [(k, v) for k, v in pairs], found.group(3)  # type: ignore[misc]


def bids_output(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """The derivative path of the BIDS input ``path`` under ``root`` (see the module docstring)."""
    path = Path(path)
    entities, suffix = _entities(path)
    kept = [(k, v) for k, v in entities if k != "desc"] + [("desc", "sr")]
    name = "_".join(f"{k}-{v}" for k, v in kept) + f"_{suffix}.nii.gz"
    values = dict(entities)
    folder = Path(root) / f"sub-{values['sub']}"
    if "ses" in values:
        folder = folder / f"ses-{values['ses']}"
    datatype = path.parent.name if path.parent.name in _DATATYPES else "anat"
    return folder / datatype / name


def plan_bids_outputs(inputs: Sequence[Path], output: str | os.PathLike[str]) -> list[Path]:
    """Every input's derivative path under the folder ``output``; a file there, a NIfTI name for
    ``output``, a non-BIDS input or two inputs with one derivative name are refused (one line)."""
    root = Path(output).expanduser()
    if root.exists() and not root.is_dir() or root.name.lower().endswith((".nii", ".nii.gz")):
        raise InferenceError(f"{root}: bids=true writes a derivative dataset; give output=<folder>")
    planned = [bids_output(p, root) for p in inputs]
    if len(set(planned)) != len(planned):
        raise InferenceError(f"{root}: two inputs give one derivative name; give distinctly named BIDS files")
    return planned


def description_path(root: str | os.PathLike[str]) -> Path:
    """``<root>/dataset_description.json``."""
    return Path(root).expanduser() / "dataset_description.json"


def dataset_description(version: str) -> dict[str, Any]:
    """The derivative dataset's ``dataset_description.json`` contents."""
    return {
        "Name": "mdcsrn-lightning super-resolution",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "mdcsrn-lightning",
            "Version": version,
            "Description": "mDCSRN 3D MRI super-resolution (desc-sr: the super-resolved image; "
                           "desc-srstd: its test-time ensemble standard deviation)",
        }],
    }
