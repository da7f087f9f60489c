"""The wheel works without the repository: configs, sweeps and released weights are package data.

The slow test builds the wheel from the sources, installs it into an empty folder and runs
the commands from another empty folder, with only the installed copy of the package on the
path (the environment's other dependencies stay importable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mdcsrn_lightning
from mdcsrn_lightning.config import config_dir

PACKAGE = Path(mdcsrn_lightning.__file__).parent
REPO = PACKAGE.parent.parent


def test_config_dir_is_the_package_data_unless_overridden(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MDCSRN_CONFIG_DIR", raising=False)
    assert Path(config_dir()) == (PACKAGE / "conf").resolve()
    # MDCSRN_CONFIG_DIR: a folder of the user's own configs
    mine = tmp_path / "my_conf"
    shutil.copytree(PACKAGE / "conf", mine)
    monkeypatch.setenv("MDCSRN_CONFIG_DIR", str(mine))
    assert Path(config_dir()) == mine.resolve()
    monkeypatch.setenv("MDCSRN_CONFIG_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"empty: no Hydra configs \(train.yaml\) in MDCSRN_CONFIG_DIR"):
        config_dir()


def _source_copy(target: Path) -> Path:
    """What a wheel is built from (pyproject, README, src/), without build leftovers."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)
    shutil.copytree(REPO / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return target


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_wheel_installs_and_runs_without_the_repository(tmp_path: Path) -> None:
    if not (REPO / "pyproject.toml").is_file():
        pytest.fail(f"{REPO}: the package is not run from a source tree; this test builds the wheel from one")
    pip = [sys.executable, "-m", "pip"]
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MDCSRN_CONFIG_DIR")}
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(_source_copy(tmp_path / "source"))], tmp_path, base_env)
    (wheel,) = (tmp_path / "dist").glob("mdcsrn_lightning-*.whl")

    # the wheel holds every config, the sweep files and the released weights
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mdcsrn_lightning/{p.relative_to(PACKAGE).as_posix()}" for p in (PACKAGE / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {"mdcsrn_lightning/conf/sweep/table1.yaml", "mdcsrn_lightning/conf/sweep/table2.yaml"} <= names
    assert {f"mdcsrn_lightning/release/{name}" for name in (
        "mdcsrn_b2u4k8_realmix.ckpt", "mdcsrn_b2u4k8_realmix_magnitude.ckpt", "mdcsrn_b2u4k8_thick.ckpt",
        "MODEL_CARD.md", "MODEL_CARD_thick.md")} <= names

    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path, base_env)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**base_env, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    python = [sys.executable, "-m"]

    # the installed copy is the one imported, and it finds its own configs
    where = _run([sys.executable, "-c", "import mdcsrn_lightning.config as c; print(c.__file__); print(c.config_dir())"], work, env)
    module_file, conf = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(conf).is_relative_to(site)

    job = _run([*python, "mdcsrn_lightning.cli.train", "experiment=quickstart", "--cfg", "job"], work, env)
    assert "task_name: quickstart" in job.stdout and "interpolation: zero_filled" in job.stdout
    sweep = _run([*python, "mdcsrn_lightning.cli.train", "+sweep=table1", "--cfg", "hydra"], work, env)
    assert "experiment: table1_b1u16_r,table1_b4u4_r" in sweep.stdout and "mode: MULTIRUN" in sweep.stdout

    # the console script, with the weights shipped in the wheel
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(0, 100, (16, 16, 12)).astype(np.float32), np.diag([1, 1, 1.2, 1])), str(work / "in.nii.gz"))
    infer = _run([str(site / "bin" / "mdcsrn-infer"), "input=in.nii.gz", "output=out.nii.gz", "progress=false"], work, env)
    summary = json.loads(infer.stdout.strip().splitlines()[-1])
    assert Path(summary["checkpoint"]) == site / "mdcsrn_lightning" / "release" / "mdcsrn_b2u4k8_realmix.ckpt"
    out = nib.load(str(work / "out.nii.gz"))
    assert out.shape == (16, 16, 12) and np.allclose(out.affine, np.diag([1, 1, 1.2, 1]))
    assert np.isfinite(np.asarray(out.dataobj)).all()
    # nothing but the two volumes and the output's provenance in the working folder (no Hydra
    # outputs, no configs needed)
    assert sorted(p.name for p in work.iterdir()) == ["in.nii.gz", "out.json", "out.nii.gz"]
    record = json.loads((work / "out.json").read_text())
    assert Path(record["checkpoint"]["path"]) == Path(summary["checkpoint"]).resolve()

    # MDCSRN_CONFIG_DIR still overrides the shipped configs
    mine = tmp_path / "my_conf"
    shutil.copytree(site / "mdcsrn_lightning" / "conf", mine)
    (mine / "experiment" / "mine.yaml").write_text("# @package _global_\ntask_name: my_own\n")
    own = _run([*python, "mdcsrn_lightning.cli.train", "experiment=mine", "--cfg", "job"], work, {**env, "MDCSRN_CONFIG_DIR": str(mine)})
    assert "task_name: my_own" in own.stdout
