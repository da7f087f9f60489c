"""Read a trained model back from a Lightning checkpoint of either module (L1 or WGAN-GP).

:func:`load_trained_model` reads a checkpoint once (one ``torch.load``) into a
:class:`TrainedModel`: the generator, its config, the data settings it was trained with
(factors, interpolation, input scale rule) and its release record. Every command takes what
it needs from there (``mdcsrn-infer``, ``mdcsrn-eval``, ``mdcsrn-export``, ``module.init_ckpt``).

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

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdcsrn_lightning.models.generators import generator_class
from mdcsrn_lightning.release import RELEASED_WEIGHTS


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
    """``(generator, net_config)`` of :func:`load_trained_model` (one read of the file)."""
    model = load_trained_model(path, expected_config)
    return model.net, model.net_config


def generator_from(checkpoint: Mapping[str, Any], path: str | Path,
                   expected_config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the generator from a checkpoint's contents (already read) and load its weights.

    With ``expected_config``, the stored architecture must match it (e.g. a GAN run that
    starts from an L1 checkpoint); a mismatch is a :class:`CheckpointError` naming both.
    """
    config = checkpoint.get("net_config")
    if not config:
        raise CheckpointError(f"{path}: no 'net_config' in the checkpoint; not written by mdcsrn-train")
    try:  # a foreign _target_ is refused as such, before any comparison
        generator_class(config.get("_target_") if isinstance(config, dict) else None)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if expected_config is not None:
        _check_same_architecture(config, expected_config, path)
    weights = generator_state(dict(checkpoint))
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


def _check_same_architecture(config: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    differ = {k for k in set(config) | set(expected) if config.get(k) != expected.get(k)}
    differ -= {"memory_efficient"}  # options that do not change the weights may differ
    if differ:
        shown = sorted(differ)[:4]
        detail = ", ".join(f"{k}: checkpoint {_short(config.get(k))} vs config {_short(expected.get(k))}" for k in shown)
        if len(differ) > len(shown):
            detail += f", ... ({len(differ) - len(shown)} more)"
        raise CheckpointError(f"{path}: holds another architecture ({detail})")


# ------------------------------------------------------------------------ trained model
#: What inference needs to know about how a checkpoint's training data was made.
DATA_KEYS = ("factors", "interpolation", "normalize", "input_scale", "degradation", "slices")


@dataclass(frozen=True)
class TrainedModel:
    """Everything a command takes from one checkpoint, read once (:func:`load_trained_model`).

    ``net``: the generator in eval mode, on the CPU. ``data``: the recorded data settings
    (a subset of :data:`DATA_KEYS`: ``factors`` three numbers, ``interpolation``,
    ``normalize``, ``input_scale``, ``degradation`` (``kspace``/``slices``) and ``slices``
    (the thick-slice settings: ``thickness``, ``spacing``, ``profile``, ``axis``...)), ``{}``
    when none are known. ``release``: the release
    record of a released checkpoint (``data_consistency``, model card fields), else ``{}``.
    """

    path: Path
    net: nn.Module
    net_config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    release: dict[str, Any] = field(default_factory=dict)

    @property
    def factors(self) -> tuple[float, float, float] | None:
        """The training degradation's k-space factors, if recorded."""
        found = self.data.get("factors")
        return None if found is None else tuple(float(f) for f in found)  # type: ignore[return-value]

    @property
    def interpolation(self) -> str:
        """How the network's fine-grid input was made (``linear`` when not recorded)."""
        return str(self.data.get("interpolation") or "linear")

    @property
    def degradation(self) -> str:
        """How the training LR was made: ``"kspace"`` (also when not recorded) or ``"slices"``."""
        return str(self.data.get("degradation") or "kspace")

    @property
    def slice_axis(self) -> int:
        """The thick axis of a ``"slices"`` model's training input (2 when not recorded)."""
        return int((self.data.get("slices") or {}).get("axis", 2))

    @property
    def recommends_data_consistency(self) -> bool:
        """The release record's measured choice (``release/MODEL_CARD.md``); ``False`` otherwise."""
        return bool(self.release.get("data_consistency", False))


def no_checkpoint(ckpt: str | os.PathLike[str] | None) -> bool:
    """Whether ``ckpt`` names no checkpoint (``None``, or an empty/``None``/``null`` string from a command line)."""
    return ckpt is None or str(ckpt).strip() in ("", "None", "null")


def resolve_checkpoint(ckpt: str | os.PathLike[str] | None) -> Path:
    """The checkpoint to use: ``ckpt`` if given, else the released weights."""
    if no_checkpoint(ckpt):
        return Path(RELEASED_WEIGHTS)
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    return path


def load_trained_model(ckpt: str | os.PathLike[str] | None,
                       expected_config: dict[str, Any] | None = None) -> TrainedModel:
    """The :class:`TrainedModel` of ``ckpt`` (``None``: the released weights), from one
    :func:`read_checkpoint`; any problem is one :class:`CheckpointError` line."""
    path = resolve_checkpoint(ckpt)
    checkpoint = read_checkpoint(path)
    try:
        net, config = generator_from(checkpoint, path, expected_config)
    except CheckpointError:
        raise
    except Exception as exc:  # e.g. a constructor that refuses its arguments
        raise CheckpointError(f"{path}: cannot rebuild the generator ({type(exc).__name__}: {exc})") from exc
    release = checkpoint.get("release")
    return TrainedModel(path=path, net=net.eval(), net_config=config, data=data_settings(checkpoint, path),
                        release=dict(release) if isinstance(release, Mapping) else {})


def data_settings(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """The data settings a checkpoint was trained with (``factors``, ``interpolation``...), if known.

    Looked up in the checkpoint's ``datamodule_hyper_parameters`` (Lightning stores the
    data module's hyperparameters there), then in ``<run>/.hydra/config.yaml`` beside
    ``<run>/checkpoints/<file>.ckpt``; ``{}`` when neither has them.
    """
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    found = {k: hp[k] for k in DATA_KEYS if k in hp}
    if found:
        return _checked_settings(found, f"{path}: datamodule_hyper_parameters")
    config = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
    return _run_config_settings(config) if config.is_file() else {}


def _run_config_settings(config: Path) -> dict[str, Any]:
    """The :data:`DATA_KEYS` of a run's ``config.yaml`` ``data`` group, resolved; ``{}`` if unreadable."""
    from omegaconf import OmegaConf

    try:
        run_config = OmegaConf.load(config)
        data = run_config.get("data") if hasattr(run_config, "get") else None
    except Exception:  # an unreadable run config is no reason to fail inference
        return {}
    if not OmegaConf.is_dict(data):
        return {}
    found: dict[str, Any] = {}
    for key in (k for k in DATA_KEYS if k in data):
        try:  # an interpolation is resolved against the run config; one that fails is named
            value = OmegaConf.select(run_config, f"data.{key}", throw_on_resolution_failure=True)
        except Exception as exc:
            raw = OmegaConf.to_container(data, resolve=False).get(key)  # type: ignore[union-attr]
            raise CheckpointError(f"{config}: data.{key}: {raw!r} cannot be resolved "
                                  f"({' '.join(str(exc).split()).split(' full_key:')[0][:160]})") from None
        found[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return _checked_settings(found, f"{config}: data")


def _checked_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse recorded data settings of the wrong type (``factors: "${...}"``), naming ``where`` and the key."""
    factors = settings.get("factors")
    if factors is not None and not (
        isinstance(factors, (list, tuple)) and len(factors) == 3
        and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)
    ):
        raise CheckpointError(f"{where}.factors: {factors!r} is not three positive numbers")
    kind, slices = settings.get("degradation"), settings.get("slices")
    if kind is not None and kind not in ("kspace", "slices"):
        raise CheckpointError(f"{where}.degradation: {kind!r} is not kspace or slices")
    if kind == "slices" and not (isinstance(slices, Mapping) and slices.get("axis") in (0, 1, 2)):
        raise CheckpointError(f"{where}.slices: {slices!r} does not name the thick axis (0, 1 or 2)")
    for key, value in settings.items():
        if key == "interpolation" and not isinstance(value, str) or isinstance(value, str) and "${" in value:
            raise CheckpointError(f"{where}.{key}: {value!r} is not a valid setting")
    return settings


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
