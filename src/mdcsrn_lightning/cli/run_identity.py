"""What a training run is called in the dashboards, from its Hydra config and command line.

- A job of a sweep: ``<group or experiment or task>/<the overrides that vary in the sweep>``,
  an experiment row shown by its tag: ``+sweep=table1_exp3`` gives ``table1_exp3/b4u4``,
  ``table1_exp3/b6u4``, ``table1_exp3/b8u4``; ``-m depth=b1u2,b2u2`` gives ``train/depth=b1u2``.
- A lone run: ``<experiment or task>`` and its command-line overrides, e.g.
  ``quickstart`` or ``train/depth=b8u4,width=k8``.

The group is ``logger.wandb.group`` (set by the sweep files, read by ``mdcsrn-report`` too),
else ``<task>/<multirun folder name>`` for a multirun, else none.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.training.loggers import RunIdentity

# never part of a name: where things go, which dashboards, how Hydra runs, and keys that do
# not change what is trained (Hydra's own override_dirname exclusions are added to these)
_NOT_IN_NAME = ("hydra", "logger", "paths", "sweep", "hparams_search", "ckpt_path", "seed")
MAX_NAME = 120


def _key_and_text(override: str) -> tuple[str, str]:
    """``+depth=b8u4`` -> ``("depth", "b8u4")`` (the value as typed)."""
    (parsed,) = OverridesParser.create().parse_overrides([override])
    return parsed.key_or_group, parsed.input_line.partition("=")[2]


def _excluded(key: str, extra: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(f"{k}.") or key.startswith(f"{k}/") for k in (*_NOT_IN_NAME, *extra))


def _sweep_keys(hc: DictConfig) -> list[str]:
    """Keys that take several values in this multirun: the sweeper's params (sweep files,
    Optuna) and the command line's ``a,b`` overrides (in ``multirun.yaml``, written before the jobs)."""
    keys = [str(k) for k in (OmegaConf.select(hc, "sweeper.params") or {})]
    saved = Path(str(hc.sweep.dir)) / "multirun.yaml"
    if saved.is_file():
        task = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task") or []
        for parsed in OverridesParser.create().parse_overrides([str(o) for o in task]):
            if parsed.is_sweep_override() and parsed.key_or_group not in keys:
                keys.append(parsed.key_or_group)
    return keys


def _shorten(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 3] + "..."


def run_identity(cfg: DictConfig) -> RunIdentity:
    """The :class:`RunIdentity` of the run ``cfg`` describes (outside Hydra: the task name alone)."""
    task = str(cfg.get("task_name") or "train")
    tags = tuple(str(t) for t in (cfg.get("tags") or []))
    job_type = str(cfg.get("job_type") or "train")
    group = OmegaConf.select(cfg, "logger.wandb.group")
    group = str(group) if group else None
    if not HydraConfig.initialized():
        return RunIdentity(name=group or task, group=group, job_type=job_type, tags=tags, experiment=group or task)
    hc = HydraConfig.get()
    experiment = OmegaConf.select(hc, "runtime.choices.experiment")
    exclude = tuple(str(k) for k in (OmegaConf.select(hc, "job.config.override_dirname.exclude_keys") or []))
    overrides = dict(_key_and_text(str(o)) for o in (OmegaConf.select(hc, "overrides.task") or []))
    if hc.mode == RunMode.MULTIRUN:
        group = group or f"{task}/{Path(str(hc.sweep.dir)).name}"
        prefix = str(OmegaConf.select(cfg, "logger.wandb.group") or experiment or task)
        parts = []
        for key in _sweep_keys(hc):
            if key == "experiment":
                parts.append("-".join(tags) or str(experiment))
            elif key in overrides:
                parts.append(f"{key}={overrides[key]}")
        label = ",".join(parts) or str(hc.job.num)
    else:
        prefix = str(group or experiment or task)
        label = ",".join(f"{k}={v}" for k, v in overrides.items() if not _excluded(k, ("experiment", *exclude)))
    name = _shorten(f"{prefix}/{label}" if label else prefix)
    return RunIdentity(name=name, group=group, job_type=job_type, tags=tags, experiment=group or task)
