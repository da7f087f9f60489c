"""Checks of a training request made before anything is built or written (one line each).

- :func:`check_checkpoint_file`: a resume checkpoint exists and is an intact PyTorch archive
  (zip structure and every member's CRC), without unpickling anything.
- :func:`check_trainer_options`: ``trainer.*`` values have the types ``lightning.Trainer``
  takes (``trainer.max_steps=abc`` names the key) and the accelerator exists here.
- :func:`check_sync_batchnorm`: ``trainer.sync_batchnorm=true`` only where it can work.
- :func:`check_critic_patch`: the WGAN-GP critic accepts the data's patches.
- :func:`check_callbacks`: every ``callbacks.*`` target is a Lightning ``Callback``.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdcsrn_lightning.checkpoints import archive_problem, describe_state_mismatch

__all__ = [
    "RunConfigError",
    "check_callbacks",
    "check_checkpoint_file",
    "check_critic_patch",
    "check_sync_batchnorm",
    "check_trainer_options",
    "critic_min_input",
]


class RunConfigError(ValueError):
    """A bad training option or file; the message is one line naming the key or file."""


def check_checkpoint_file(path: str | os.PathLike[str], key: str = "ckpt_path") -> Path:
    """Refuse a missing, empty, truncated or foreign file as a checkpoint (reads it, runs nothing).

    The archive check is :func:`~mdcsrn_lightning.checkpoints.archive_problem`, the one every
    command's checkpoint reader makes.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise RunConfigError(f"{key}={path}: no such checkpoint file")
    if p.is_dir():
        raise RunConfigError(f"{key}={path}: is a folder, not a checkpoint file")
    problem = archive_problem(p)  # the check every command's checkpoint reader makes
    if problem is not None:
        raise RunConfigError(f"{key}={path}: {problem}")
    return p


def critic_min_input(discriminator: Mapping[str, Any]) -> int:
    """Smallest patch side the critic config takes: ``2**L * (pooled_size - 1) + 1`` for L stride-2 convs.

    As :attr:`~mdcsrn_lightning.models.discriminator.Discriminator3D.min_input_size`, from the
    config alone (nothing is built).
    """
    return 2 ** _critic_strides(discriminator) * (int(discriminator.get("pooled_size", 3)) - 1) + 1


def _critic_strides(discriminator: Mapping[str, Any]) -> int:
    channels = discriminator.get("channels")
    return len(channels) if channels is not None else int(discriminator.get("num_blocks", 4))


def _smallest_side(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else min(int(v) for v in value)


def check_critic_patch(cfg: Mapping[str, Any]) -> None:
    """Refuse a WGAN-GP run whose critic cannot take the training patches (or the EM-distance crops).

    Checked from the config before anything is built: the critic needs every side of its input
    to be at least :func:`critic_min_input` (33 for the paper's critic, 4 stride-2 convs pooled
    to 3^3); ``experiment=quickstart`` trains on 24^3.
    """
    module = cfg.get("module") or {}
    discriminator = module.get("discriminator") if hasattr(module, "get") else None
    data = cfg.get("data") or {}
    if not discriminator or "patch_size" not in data:
        return
    minimum = critic_min_input(discriminator)
    pooled = discriminator.get("pooled_size", 3)
    for key, value in (("data.patch_size", data.get("patch_size")), ("module.em_patch_size", module.get("em_patch_size"))):
        if value is None or _smallest_side(value) >= minimum:
            continue
        shown = value if isinstance(value, (int, float)) else list(value)
        raise RunConfigError(
            f"{key}={shown}: smaller than the critic's minimum input of {minimum} per side "
            f"(module.discriminator: {_critic_strides(discriminator)} stride-2 convs, pooled_size={pooled}); give {key}>={minimum} or a critic that takes it "
            "(module.discriminator.pooled_size), or use experiment=quickstart_gan for the quickstart's data"
        )


def check_callbacks(callbacks: Mapping[str, Any] | None) -> None:
    """Refuse a ``callbacks.<name>._target_`` that cannot be imported or is a class but not a
    Lightning ``Callback`` (imports it, builds nothing)."""
    from hydra._internal.utils import _locate
    from lightning.pytorch import Callback

    for name, entry in (callbacks or {}).items():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            continue
        target = str(entry["_target_"])
        try:
            found = _locate(target)
        except ImportError as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise RunConfigError(f"callbacks.{name}._target_={target}: cannot be imported ({detail})") from None
        if isinstance(found, type) and not issubclass(found, Callback):
            raise RunConfigError(
                f"callbacks.{name}._target_={target}: not a Lightning Callback (a subclass of lightning.pytorch.Callback)")


def _allows_str(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(annotation))
    if origin is not None and origin is not typing.Union and str(origin) != "<class 'types.UnionType'>":
        return True  # containers, callables...: not ours to judge
    args = typing.get_args(annotation)
    if not args:
        return annotation not in (int, float, bool, type(None))
    return any(_allows_str(a) for a in args)


def check_trainer_options(options: Mapping[str, Any], prefix: str = "trainer") -> None:
    """Refuse a string where ``lightning.Trainer`` takes only numbers/bools, and a missing accelerator."""
    from lightning.pytorch import Trainer

    try:
        hints = typing.get_type_hints(Trainer.__init__)
    except Exception:  # unresolvable annotations: fall back to no type check
        hints = {}
    for key, value in options.items():
        if key.startswith("_") or not isinstance(value, str) or key not in hints:
            continue
        if not _allows_str(hints[key]):
            raise RunConfigError(f"{prefix}.{key}={value!r}: expected {_describe(hints[key])}")
    accelerator = str(options.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RunConfigError(f"{prefix}.accelerator={accelerator}: no CUDA GPU is available here; use trainer=cpu")


def check_sync_batchnorm(trainer: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> None:
    """Refuse ``trainer.sync_batchnorm=true`` where it fails or silently goes wrong.

    - On CPU: torch's ``SyncBatchNorm`` raises at the first training batch ("SyncBatchNorm
      layers only work with GPU modules"; checked with torch 2.13 and gloo).
    - With ``model.memory_efficient=true``: the checkpointed dense units recompute their
      BatchNorm in backward with ``F.batch_norm`` on the local batch (models/mdcsrn.py,
      ``_norm``), not with the synced statistics of the forward, so gradients would be
      computed from other activations than the forward's.
    """
    if not trainer.get("sync_batchnorm"):
        return
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "cpu" or accelerator == "auto" and not _cuda_available():
        raise RunConfigError(
            "trainer.sync_batchnorm=true: torch's SyncBatchNorm runs on GPUs only; on CPU leave it false "
            "(each rank then normalises with its own batch statistics)"
        )
    if model is not None and model.get("memory_efficient"):
        raise RunConfigError(
            "trainer.sync_batchnorm=true with model.memory_efficient=true: the recomputed BatchNorm of the "
            "checkpointed units uses local, not synced, batch statistics; set one of them to false"
        )


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _describe(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)


def check_resume_fits(model_state: Mapping[str, Any], checkpoint: Mapping[str, Any],
                      path: str | os.PathLike[str], key: str = "ckpt_path") -> None:
    """Refuse resuming from a checkpoint of another architecture (one line, not a 4 KB state-dict dump).

    ``checkpoint``: the file's contents, already read
    (:func:`~mdcsrn_lightning.checkpoints.read_checkpoint`: the one read before Lightning's).
    """
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, Mapping):
        raise RunConfigError(f"{key}={path}: no state_dict; not a checkpoint written by mdcsrn-train")
    differ = describe_state_mismatch(model_state, state)
    if differ:
        raise RunConfigError(f"{key}={path}: holds another architecture than this config: {differ}")
