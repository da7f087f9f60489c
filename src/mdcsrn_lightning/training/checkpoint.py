"""Read a generator back from a Lightning checkpoint of either module (L1 or WGAN-GP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or holds no generator we can rebuild."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def generator_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The generator's weights: the ``net.`` entries of the module's state dict."""
    state = checkpoint.get("state_dict", {})
    return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_generator(path: str | Path, expected_config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the generator from the config stored in the checkpoint and load its weights.

    With ``expected_config``, the stored architecture must match it (e.g. a GAN run that
    starts from an L1 checkpoint); a mismatch is a :class:`CheckpointError` naming both.
    """
    checkpoint = read_checkpoint(path)
    config = checkpoint.get("net_config")
    if not config:
        raise CheckpointError(f"{path}: no 'net_config' in the checkpoint; not written by mdcsrn-train")
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
    net = instantiate(config)
    weights = generator_state(checkpoint)
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        from mdcsrn_lightning.training.run_checks import describe_state_mismatch

        # torch's message lists every key (kilobytes): counts and the first few instead
        detail = describe_state_mismatch(net.state_dict(), weights) or str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({detail})") from None
    return net, config


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
