"""The paper's tables as Hydra sweeps: baselines, experiment rows, sweep files, launchers, Optuna.

Composition tests run in-process (seconds); the multiruns are tiny subprocess runs (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.models import count_parameters

from .conftest import TINY, compose_train

CONF = Path(config_dir())
SWEEPS = CONF / "sweep"

# Table 2 "#parm" of the CNN baselines; ours within 10% (see models/baselines.py).
BASELINES = {"fsrcnn": 0.06e6, "srresnet": 2.01e6, "srdensenet": 0.39e6}

# experiment -> (W&B tag = the paper's row, #params in M to two decimals). The paper prints
# 0.22M for b4u4 in Table 1 and 0.23M in Table 2; the architecture has 228,961 (SPEC: 0.22-0.23M).
TABLE1 = {
    "table1_b1u16_r": ("b1u16-r", 0.35),
    "table1_b4u4_r": ("b4u4-r", 0.26),
    "table1_b1u12_r": ("b1u12-r", 0.25),
    "table1_b4u4": ("b4u4", 0.23),
    "table1_b6u4": ("b6u4", 0.35),
    "table1_b8u4": ("b8u4", 0.49),
    "table1_b4u4_k8": ("b4u4k8", 0.10),
    "table1_b4u4_k16": ("b4u4k16", 0.41),
    "table1_b8u4_k8": ("b8u4k8", 0.22),
}
TABLE2 = {
    "table2_fsrcnn": ("FSRCNN", 0.06),
    "table2_srresnet": ("SRResNet", 2.01),
    "table2_srdensenet": ("SRDenseNet", 0.39),
    "table2_b4u4": ("b4u4k12", 0.23),
    "table2_b6u4": ("b6u4k12", 0.35),
    "table2_b8u4": ("b8u4k12", 0.49),
}
# sweep -> its rows, in the paper's order
SWEEP_ROWS = {
    "table1_exp1": ["table1_b1u16_r", "table1_b4u4_r", "table1_b1u12_r"],
    "table1_exp2": ["table1_b4u4_r", "table1_b4u4"],
    "table1_exp3": ["table1_b4u4", "table1_b6u4", "table1_b8u4"],
    "table1_exp4": ["table1_b4u4_k8", "table1_b4u4", "table1_b4u4_k16"],
    "table1_exp5": ["table1_b4u4", "table1_b8u4_k8", "table1_b4u4_k16", "table1_b8u4"],
    "table1": list(TABLE1),
    "table2": list(TABLE2),
}


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tiny(*drop: str) -> list[str]:
    return [o for o in TINY if o.split("=")[0] not in drop]


# -------------------------------------------------------------------- models and rows
@pytest.mark.parametrize("model", list(BASELINES))
def test_baseline_models_compose_to_paper_sizes(model: str, train_cfg) -> None:
    cfg = train_cfg(f"model={model}", tiny=False)
    n = count_parameters(instantiate(cfg.model))
    paper = BASELINES[model]
    print(f"model={model}: {n:,} parameters ({n / 1e6:.3f}M; paper {paper / 1e6:.2f}M, {n / paper - 1:+.1%})")
    assert abs(n / paper - 1) <= 0.10


def test_srdensenet_growth_rate_follows_width(train_cfg) -> None:
    cfg = train_cfg("model=srdensenet", "width=k8", tiny=False)
    assert (cfg.model.num_blocks, cfg.model.units_per_block, cfg.model.growth_rate) == (8, 4, 8)


@pytest.mark.parametrize("experiment", [*TABLE1, *TABLE2])
def test_table_rows_compose_with_paper_sizes_and_row_tag(experiment: str, train_cfg) -> None:
    tag, params_m = {**TABLE1, **TABLE2}[experiment]
    cfg = train_cfg(f"experiment={experiment}", tiny=False)
    n = count_parameters(instantiate(cfg.model))
    if experiment in ("table2_srresnet", "table2_srdensenet"):
        assert abs(n / (params_m * 1e6) - 1) <= 0.10
    else:
        assert round(n / 1e6, 2) == params_m
    assert list(cfg.tags) == [tag] and list(cfg.logger.wandb.tags) == [tag]


def test_every_table_experiment_is_tested() -> None:
    files = {p.stem for p in (CONF / "experiment").glob("table*.yaml")}
    assert files == set(TABLE1) | set(TABLE2)


# -------------------------------------------------------------------- sweep files
def test_sweep_group_ships_real_files() -> None:
    # package data: a wheel keeps files, not links (the top-level `sweeps` link is for readers)
    assert not SWEEPS.is_symlink() and not any(p.is_symlink() for p in SWEEPS.glob("*.yaml"))
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == set(SWEEP_ROWS)


@pytest.mark.parametrize("sweep", list(SWEEP_ROWS))
def test_sweep_sets_rows_group_and_short_subdirs(sweep: str, tmp_path: Path) -> None:
    cfg = compose_train([f"+sweep={sweep}"], tmp_path / "run")
    assert cfg.hydra.mode.name == "MULTIRUN"
    rows = str(cfg.hydra.sweeper.params.experiment).split(",")
    assert rows == SWEEP_ROWS[sweep]
    assert cfg.logger.wandb.group == sweep
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}_${hydra:runtime.choices.experiment}"
    # every row is an experiment config; every experiment of a table is in its table sweep
    assert all((CONF / "experiment" / f"{r}.yaml").is_file() for r in rows)


def test_table1_sweep_is_the_union_of_its_experiments() -> None:
    union = {r for name, rows in SWEEP_ROWS.items() if name.startswith("table1_exp") for r in rows}
    assert union == set(SWEEP_ROWS["table1"])


def test_sweep_job_keeps_the_experiment_and_the_group(tmp_path: Path) -> None:
    """What one job of `+sweep=table2` composes to: the row's model, tag and the sweep's group."""
    cfg = compose_train(["+sweep=table2", "experiment=table2_srresnet"], tmp_path / "run")
    assert cfg.model._target_.endswith("SRResNet3D")
    assert list(cfg.tags) == ["SRResNet"] and cfg.logger.wandb.group == "table2"
    assert cfg.hydra.runtime.choices.experiment == "table2_srresnet"


# -------------------------------------------------------------------- launchers and Optuna
def test_slurm_launcher_writes_the_sbatch_we_expect(tmp_path: Path, monkeypatch) -> None:
    """Dry run: the plugin's own parameter mapping into submitit's sbatch text (no cluster)."""
    import submitit  # hydra-submitit-launcher's dependency, in the `test` extra: no skip
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_train(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4",
         "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        tmp_path / "run",
    )
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)
    # as SlurmLauncher.launch() maps them (hydra-submitit-launcher 1.2)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in ("submitit_folder", "max_num_timeout")}
    )
    sbatch = executor._executor._make_submission_file_text("python -m mdcsrn_lightning.cli.train", "0")
    print(sbatch)
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=600", "--partition=gpu"):
        assert f"#SBATCH {line}" in sbatch
    assert "srun" in sbatch


def test_optuna_search_space_and_metric(tmp_path: Path) -> None:
    import optuna  # noqa: F401  (hydra-optuna-sweeper's dependency, in the `test` extra: no skip)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    cfg = compose_train(["+hparams_search=optuna"], tmp_path / "run")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/psnr" and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    parser = OverridesParser.create()
    space = {
        o.key_or_group: create_optuna_distribution_from_override(o)
        for o in parser.parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    }
    lr, width = space["module.optimizer.lr"], space["width"]
    assert (lr.low, lr.high) == (1e-5, 1e-3) and type(lr).__name__ == "LogUniformDistribution"
    assert list(width.choices) == ["k8", "k12", "k16"]
    assert all((CONF / "width" / f"{k}.yaml").is_file() for k in width.choices)


@pytest.mark.slow
def test_cli_dry_run_of_optuna_on_slurm(tmp_path: Path) -> None:
    """`--cfg hydra`: what a user types to check a SLURM Optuna search before submitting."""
    proc = _run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.train", "+hparams_search=optuna", "hydra/launcher=slurm",
         "trainer=gpu", "--cfg", "hydra"],
        cwd=tmp_path, timeout=120,
    )
    hydra_cfg = yaml.safe_load(proc.stdout)["hydra"]
    assert hydra_cfg["launcher"]["_target_"].endswith("SlurmLauncher")
    assert hydra_cfg["launcher"]["gpus_per_node"] == "${trainer.devices}"
    assert hydra_cfg["sweeper"]["_target_"].endswith("OptunaSweeper")
    assert hydra_cfg["sweeper"]["params"]["width"] == "choice(k8, k12, k16)"
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


# -------------------------------------------------------------------- real multiruns (tiny)
def _check_jobs(sweep_dir: Path, n: int) -> list[dict]:
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [str(i) for i in range(n)]
    results = [json.loads((p / "metrics.json").read_text()) for p in jobs]
    assert all((p / "checkpoints" / "last.ckpt").is_file() for p in jobs)
    return results


# The repository's default sweep subdir (`<num>_<override_dirname>`) is longer than a file
# name may be with TINY's overrides (Errno 36); these runs use the job number alone.
SHORT_SUBDIR = "hydra.sweep.subdir=${hydra.job.num}"


@pytest.mark.slow
def test_basic_multirun_of_two_tiny_configs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.train", "-m", *_tiny("depth"), "depth=b1u2,b2u2",
         f"hydra.sweep.dir={sweep}", SHORT_SUBDIR],
        cwd=tmp_path,
    )
    results = _check_jobs(sweep, 2)
    assert [r["model_config"]["num_blocks"] for r in results] == [1, 2]
    assert (sweep / "multirun.yaml").is_file()


@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.train", "-m", "hydra/launcher=parallel",
         "hydra.launcher.n_jobs=2", *_tiny("depth"), "depth=b1u2,b2u2", f"hydra.sweep.dir={sweep}", SHORT_SUBDIR],
        cwd=tmp_path,
    )
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    results = _check_jobs(sweep, 2)
    assert [r["model_config"]["num_blocks"] for r in results] == [1, 2]
