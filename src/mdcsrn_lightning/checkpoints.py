"""Read a generator back from a Lightning checkpoint of either module (L1 or WGAN-GP).

Below training, inference and evaluation (all three read checkpoints); above ``models``.

A checkpoint is data, never code: every file is read with ``torch.load(weights_only=True)``
(tensors, containers and plain Python values only; a pickle that would import or call
anything is refused with one line), and the generator is built only from the allow-list
:data:`~mdcsrn_lightning.models.generators.GENERATORS`, never from an arbitrary ``_target_``.

Every command reads checkpoints through :func:`read_checkpoint`: the file must be an intact
zip archive (an empty or truncated file, and any member whose CRC fails, are refused before
anything is unpickled) and its weights must be finite. :func:`load_generator` compares the
weight shapes that ``net_config`` implies (the generator built on the ``meta`` device, which
allocates nothing) with the stored tensors before building the real generator, so a small
file claiming a huge architecture is refused without allocating it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdcsrn_lightning.models.generators import generator_class


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or holds no generator we can rebuild."""


# torch's refusal names the global the pickle wanted: "...unsupported GLOBAL posix.system..."
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def unsafe_reason(exc: pickle.UnpicklingError) -> str:
    """One line for torch's (multi-line) refusal of a pickle: an unsafe one or a corrupt one."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    if found is None:  # not a request for code: a damaged or foreign file (torch chains the cause)
        cause = exc.__context__ or exc
        return f"not a readable PyTorch checkpoint ({type(cause).__name__}: {' '.join(str(cause).split())[:200]})"
    return (f"refused: not a plain-data checkpoint (it asks for {found.group(1)}; a checkpoint may hold "
            "only tensors and plain values, loading anything else could run code)")


def archive_problem(path: str | Path) -> str | None:
    """Why ``path`` is not an intact checkpoint archive (``None`` if it is); reads, runs nothing.

    ``torch.save`` writes a zip archive: an empty file, a truncated copy (its central directory
    is lost), a member whose CRC fails (a flipped bit) or a zip without ``data.pkl`` is named.
    """
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        return "empty file (0 bytes), not a checkpoint"
    with open(p, "rb") as fh:
        zip_start = fh.read(4) == b"PK\x03\x04"
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        if zip_start:
            return f"truncated or damaged checkpoint ({size} bytes; the zip archive is incomplete: {exc})"
        return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}; torch.save writes a zip archive)"
    except Exception as exc:  # zlib.error and friends: a damaged member
        return f"damaged checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    if damaged is not None:
        return f"damaged checkpoint (CRC error in {damaged}); the file changed after it was written"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "a zip file but not a PyTorch checkpoint (no data.pkl)"
    return None


def _non_finite(checkpoint: dict[str, Any]) -> str | None:
    """``"<n> non-finite values in <first key>"`` for the state dict's floating tensors, else ``None``."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return None
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    count = sum(int((~torch.isfinite(state[k])).sum()) for k in bad)
    more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    return f"{count} non-finite (NaN or Inf) weight value(s) in {bad[0]}{more}"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, read with ``weights_only=True``; any problem is one line.

    The one reader of checkpoints for every command: the archive is checked first
    (:func:`archive_problem`: empty, truncated, CRC), then unpickled as data only, then its
    weights are checked to be finite.

    Raises:
        CheckpointError: missing, empty, truncated or damaged file, not a PyTorch file, a
            pickle that needs anything beyond tensors and plain data (nothing of it is
            executed), or NaN/Inf weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    problem = archive_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {unsafe_reason(exc)}") from exc
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    problem = _non_finite(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; refused (a diverged run or a damaged file)")
    return checkpoint


def generator_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The generator's weights: the ``net.`` entries of the module's state dict."""
    state = checkpoint.get("state_dict", {})
    return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}


def build_generator(config: dict[str, Any]) -> nn.Module:
    """The generator ``config`` describes (``_target_`` plus keyword arguments).

    Only allow-listed classes are built, with plain keyword arguments: no Hydra
    instantiation (no ``_partial_``/``_args_``, no nested ``_target_``), so a stored config
    cannot reach any other callable. ``ValueError`` names what is refused.
    """
    if not isinstance(config, dict):
        raise ValueError(f"net_config must be a mapping, got {type(config).__name__}")
    cls = generator_class(config.get("_target_"))
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    for key, value in kwargs.items():
        if not isinstance(key, str) or key.startswith("_"):
            raise ValueError(f"net_config: key {key!r} is not a constructor argument of {cls.__name__}")
        if isinstance(value, dict):
            raise ValueError(f"net_config.{key}: a nested mapping; {cls.__name__} takes plain values")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # unknown or missing argument
        raise ValueError(f"net_config: {cls.__name__} cannot be built from {sorted(kwargs)} ({exc})") from exc


def load_generator(path: str | Path, expected_config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the generator from the config stored in the checkpoint and load its weights.

    With ``expected_config``, the stored architecture must match it (e.g. a GAN run that
    starts from an L1 checkpoint); a mismatch is a :class:`CheckpointError` naming both.
    """
    checkpoint = read_checkpoint(path)
    config = checkpoint.get("net_config")
    if not config:
        raise CheckpointError(f"{path}: no 'net_config' in the checkpoint; not written by mdcsrn-train")
    try:  # a foreign _target_ is refused as such, before any comparison
        generator_class(config.get("_target_") if isinstance(config, dict) else None)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if expected_config is not None:
        differ = {k for k in set(config) | set(expected_config) if config.get(k) != expected_config.get(k)}
        # options that do not change the weights may differ
        differ -= {"memory_efficient"}
        if differ:
            shown = sorted(differ)[:4]
            detail = ", ".join(f"{k}: checkpoint {_short(config.get(k))} vs config {_short(expected_config.get(k))}" for k in shown)
            if len(differ) > len(shown):
                detail += f", ... ({len(differ) - len(shown)} more)"
            raise CheckpointError(f"{path}: holds another architecture ({detail})")
    weights = generator_state(checkpoint)
    try:
        # on the meta device first: shapes only, nothing allocated (a 67 KB file may claim
        # an architecture of gigabytes); the real one is built once the shapes agree
        with torch.device("meta"):
            skeleton = build_generator(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    detail = describe_state_mismatch(skeleton.state_dict(), weights)
    if detail:  # torch's message would list every key (kilobytes): counts and the first few
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({detail})")
    net = build_generator(config)
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({str(exc).splitlines()[0]})") from None
    return net, config


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_state_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], shown: int = 3) -> str:
    """A short account of how two state dicts differ: counts and the first ``shown`` keys of each kind.

    ``""`` when the keys and shapes agree. Shapes are compared for tensors (``.shape``).
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    resized = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in found and hasattr(expected[k], "shape") and hasattr(found[k], "shape")
        and tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", resized)):
        if keys:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:shown])}{more})")
    return "; ".join(parts)


# What a released (slim) checkpoint keeps: enough to rebuild and run the generator and to
# know how its input was made; no optimizer state, no critic.
_SLIM_KEYS = ("net_config", "datamodule_hyper_parameters", "epoch", "global_step", "pytorch-lightning_version")


def slim_checkpoint(source: str | Path, target: str | Path, **metadata: Any) -> Path:
    """Write the generator part of a training checkpoint to ``target`` (for release).

    The result loads with :func:`load_generator` and ``torch.load(..., weights_only=True)``.
    """
    from mdcsrn_lightning.atomic import atomic_path

    checkpoint = read_checkpoint(source)
    slim = {k: checkpoint[k] for k in _SLIM_KEYS if k in checkpoint}
    slim["state_dict"] = {f"net.{k}": v for k, v in generator_state(checkpoint).items()}
    slim["release"] = dict(metadata)
    with atomic_path(target) as tmp:
        torch.save(slim, tmp)
    return Path(target)
