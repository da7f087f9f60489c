"""`mdcsrn-train`: fit a generator (L1 or WGAN-GP, chosen by `loss=`) from Hydra config.

    mdcsrn-train experiment=quickstart
    mdcsrn-train depth=b8u4 width=k12 data=hcp data.source.root=/data/HCP
    mdcsrn-train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mdcsrn_lightning.checkpoints import CheckpointError, read_checkpoint, unsafe_reason
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.data.sources import VolumeError
from mdcsrn_lightning.data.split import SplitError
from mdcsrn_lightning.training.results import write_test_results

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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then (``test=true``) score the best checkpoint on the test split."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    resume = cfg.get("ckpt_path")
    if resume and str(resume) not in _LIGHTNING_CKPT_NAMES:
        # refuse a bad or unsafe file (one line) before anything is built or trained
        read_checkpoint(resume)
    _reuse_split_on_resume(cfg)

    # plain lists, not ListConfig: checkpoints (datamodule hparams) must load with weights_only
    datamodule = instantiate(cfg.data, _convert_="all")
    net = instantiate(cfg.model)
    module = build_module(cfg, net)
    loggers = _instantiate_all(cfg.get("logger"))
    run_config = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                  for k, v in cfg.items() if k != "hydra"}
    for logger in loggers:
        logger.log_hyperparams(run_config)
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=loggers)
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
                write_test_results(cfg, module, datamodule, Path(cfg.paths.output_dir), best)
        if trainer.is_global_zero:
            _print_outputs(Path(cfg.paths.output_dir), trainer)
    finally:
        # Hydra multiruns call train() once per job in one process: never merge W&B runs.
        import wandb

        if wandb.run is not None:
            wandb.finish()
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (VolumeError, SplitError, CheckpointError) as exc:
        # bad input: one line naming the file and the problem, no traceback
        sys.exit(f"mdcsrn-train: error: {exc}")
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
