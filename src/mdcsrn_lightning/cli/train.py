"""`mdcsrn-train`: fit a generator (L1 or WGAN-GP, chosen by `loss=`) from Hydra config.

    mdcsrn-train experiment=quickstart
    mdcsrn-train depth=b8u4 width=k12 data=hcp data.source.root=/data/HCP
    mdcsrn-train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mdcsrn_lightning.checkpoints import CheckpointError, read_checkpoint, unsafe_reason
from mdcsrn_lightning.cli.run_guard import created_run_folder
from mdcsrn_lightning.cli.run_identity import run_identity
from mdcsrn_lightning.cli.overrides import one_line_override_errors
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.data.fetch import FetchError
from mdcsrn_lightning.data.sources import VolumeError
from mdcsrn_lightning.data.split import SplitError
from mdcsrn_lightning.interrupts import Terminated, exit_code, terminate_as_exception
from mdcsrn_lightning.runlock import RunLockError, acquire_run_lock, is_global_zero, release_run_lock
from mdcsrn_lightning.training.loggers import (
    identity_arguments,
    new_wandb_id,
    read_wandb_id,
    write_wandb_run,
)
from mdcsrn_lightning.training.precision import resolve_precision
from mdcsrn_lightning.training.results import write_test_results
from mdcsrn_lightning.training.run_checks import (
    RunConfigError,
    check_callbacks,
    check_checkpoint_file,
    check_critic_patch,
    check_resume_fits,
    check_sync_batchnorm,
    check_trainer_options,
)

# ckpt_path values Lightning resolves itself (it loads those with weights_only=True too)
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, net: Any) -> L.LightningModule:
    """The LightningModule of ``cfg.module`` around ``net``.

    Built as a partial first: the generator's config is stored in the module (and so in
    every checkpoint) as plain data, which Hydra would otherwise instantiate.
    """
    # plain lists, not ListConfig (e.g. em_patch_size from data.patch_size): the module's
    # hparams go into checkpoints, which must load with weights_only
    factory = instantiate(cfg.module, _partial_=True, _convert_="all")
    return factory(net=net, net_config=OmegaConf.to_container(cfg.model, resolve=True))


def _resumed_run_folder(cfg: DictConfig) -> Path | None:
    """The run folder of ``ckpt_path`` (``<run>/checkpoints/<file>``), if one is resumed from a file."""
    resume = cfg.get("ckpt_path")
    if not resume or str(resume) in _LIGHTNING_CKPT_NAMES:
        return None
    return Path(resume).resolve().parent.parent


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Any]:
    """The loggers of ``cfg.logger``, named by :func:`run_identity` where their config leaves it null.

    A W&B logger gets the run id recorded in the run folder it resumes (or this one), else a
    new one, and the id is recorded in ``output_dir`` (``wandb_run.json``).
    """
    identity = run_identity(cfg)
    loggers = []
    for entry in (cfg.get("logger") or {}).values():
        if entry is None or "_target_" not in entry:
            continue
        cls = get_class(entry._target_)
        wandb_id = None
        if issubclass(cls, WandbLogger):
            previous = [f for f in (_resumed_run_folder(cfg), output_dir) if f is not None]
            wandb_id = entry.get("id") or read_wandb_id(previous) or new_wandb_id()
        extra = identity_arguments(cls, identity, wandb_id=wandb_id, run_dir=str(output_dir))
        loggers.append(instantiate(entry, **{k: v for k, v in extra.items() if entry.get(k) is None}))
        if wandb_id is not None and is_global_zero():
            write_wandb_run(output_dir, wandb_id, identity, entry.get("project"))
    return loggers


def _reuse_split_on_resume(cfg: DictConfig) -> None:
    """A resumed run keeps the split of the run it resumes (``<run>/split.json``)."""
    if not cfg.get("ckpt_path") or "split_file" not in cfg.data:
        return
    previous = Path(cfg.ckpt_path).resolve().parent.parent / "split.json"
    if previous.is_file():
        with open_dict(cfg):
            cfg.data.split_file = str(previous)


def _print_outputs(output_dir: Path, trainer: L.Trainer) -> None:
    ckpt = trainer.checkpoint_callback
    print(f"\nRun directory: {output_dir}")
    if ckpt is not None and ckpt.best_model_path:
        print(f"  best checkpoint: {ckpt.best_model_path}")
    for name in ("checkpoints/last.ckpt", "metrics.json", "panels/test.png", "split.json"):
        if (output_dir / name).exists():
            print(f"  {name}: {output_dir / name}")


def resolve_trainer_precision(cfg: DictConfig) -> None:
    """``trainer.precision=auto`` -> the precision this machine runs fastest safely (one info line)."""
    if "precision" not in cfg.trainer:
        return
    setting = cfg.trainer.precision
    precision, why = resolve_precision(setting, str(cfg.trainer.get("accelerator", "auto")))
    if str(setting) == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = precision
        rank_zero_info(f"trainer.precision=auto -> {precision}: {why} (set trainer.precision=32-true to override)")


def check_run_config(cfg: DictConfig) -> None:
    """What can be checked before anything is built or written; raises :class:`RunConfigError`.

    ``ckpt_path`` (an intact checkpoint archive), ``trainer.*`` option types and accelerator,
    ``trainer.sync_batchnorm`` (GPU only, not with ``model.memory_efficient``), the critic's
    minimum input against the patch sizes (``loss=wgan_gp``), callback classes, and every mandatory value
    (``???``) of the groups that will be built.
    """
    for group in ("data", "model", "module", "trainer"):
        if group in cfg:
            missing = sorted(OmegaConf.missing_keys(cfg[group]))
            if missing:
                key = missing[0] if missing[0].startswith(f"{group}.") else f"{group}.{missing[0]}"
                raise RunConfigError(f"{key}: required, give {key}=<value>")
    if cfg.get("ckpt_path") and str(cfg.ckpt_path) not in _LIGHTNING_CKPT_NAMES:
        check_checkpoint_file(cfg.ckpt_path)
    check_trainer_options(cfg.trainer)
    check_sync_batchnorm(cfg.trainer, cfg.get("model"))
    check_critic_patch(cfg)
    check_callbacks(cfg.get("callbacks"))


def train(cfg: DictConfig, state: dict[str, Any] | None = None) -> dict[str, float]:
    """Fit, then (``test=true``) score the best checkpoint on the test split.

    The run folder (``paths.output_dir``) is locked for this process first. ``state``, if
    given, receives the trainer (``state["trainer"]``) once it is built: the CLI reads
    ``global_step`` from it to tell a run refused before training from one that trained.
    """
    check_run_config(cfg)
    resolve_trainer_precision(cfg)
    if is_global_zero():
        acquire_run_lock(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    resume = cfg.get("ckpt_path")
    stored = None
    if resume and str(resume) not in _LIGHTNING_CKPT_NAMES:
        # refuse a bad or unsafe file (one line) before anything is built or trained; the
        # one read of it before Lightning's
        stored = read_checkpoint(resume)
    _reuse_split_on_resume(cfg)

    # plain lists, not ListConfig: checkpoints (datamodule hparams) must load with weights_only
    datamodule = instantiate(cfg.data, _convert_="all")
    net = instantiate(cfg.model)
    module = build_module(cfg, net)
    if stored is not None:
        check_resume_fits(module.state_dict(), stored, resume)
        del stored  # Lightning reads the file itself
    loggers = build_loggers(cfg, Path(cfg.paths.output_dir))
    run_config = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                  for k, v in cfg.items() if k != "hydra"}
    for logger in loggers:
        logger.log_hyperparams(run_config)
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=loggers)
    if state is not None:
        state["trainer"] = trainer
    try:
        # weights_only=True explicitly: torch's default can be switched off by an environment
        # variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD); an explicit True cannot
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        except pickle.UnpicklingError as exc:  # a file Lightning found itself (ckpt_path=last)
            raise CheckpointError(f"ckpt_path={resume}: {unsafe_reason(exc)}") from exc
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if trainer.is_global_zero:
                write_test_results(cfg, module, datamodule, Path(cfg.paths.output_dir), best, loggers=trainer.loggers)
        if trainer.is_global_zero:
            _print_outputs(Path(cfg.paths.output_dir), trainer)
    finally:
        # Hydra multiruns call train() once per job in one process: never merge W&B runs.
        import wandb

        if wandb.run is not None:
            wandb.finish()
    return metrics


def _one_line(exc: BaseException) -> str:
    """A config error as one line naming the key (Hydra and OmegaConf put it on other lines)."""
    if isinstance(exc, MissingMandatoryValue):
        key = exc.full_key or "?"
        return f"{key}: required, give {key}=<value>"
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{key}: {text}" if key else text
    text = " ".join(str(exc).split())
    if isinstance(exc, InstantiationException):
        # "Error in call to target 'X': TypeError(...) full_key: trainer" -> "trainer: ..."
        key = text.rsplit("full_key: ", 1)[1] if "full_key: " in text else "config"
        text = text.split(" full_key: ")[0]
        return f"{key}: cannot be built ({text})"
    return text


def _discard_unused_run_folder(cfg: DictConfig, state: dict[str, Any]) -> None:
    """Remove the run folder this process created if no training step ran (nothing to keep)."""
    trainer = state.get("trainer")
    if trainer is not None and trainer.global_step > 0:
        return
    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return
    if created_run_folder(folder):
        release_run_lock(folder)
        shutil.rmtree(folder, ignore_errors=True)


_USER_ERRORS = (
    VolumeError, SplitError, CheckpointError, RunConfigError, RunLockError, InstantiationException,
    OmegaConfBaseException, OSError, FetchError,
)


@one_line_override_errors("mdcsrn-train")
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    state: dict[str, Any] = {}
    try:
        with terminate_as_exception():
            metrics = train(cfg, state)
    except _USER_ERRORS as exc:
        # bad input, full disk, busy folder: one line naming the file or key, no traceback
        _discard_unused_run_folder(cfg, state)
        print(f"mdcsrn-train: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, Terminated) as exc:
        # checkpoints are written atomically: the last complete one is intact
        print(f"mdcsrn-train: interrupted ({exc or 'SIGINT'}); resume with ckpt_path=<run>/checkpoints/last.ckpt",
              file=sys.stderr, flush=True)
        raise SystemExit(exit_code(exc)) from None
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
