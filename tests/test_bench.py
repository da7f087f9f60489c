"""`mdcsrn-bench`: the JSON line users and the README rely on."""

from __future__ import annotations

import json
import subprocess
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mdcsrn_lightning.cli.bench import bench
from mdcsrn_lightning.config import config_dir


def run_cli(*overrides: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.bench", *overrides],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_prints_paper_b8u4_params_as_last_json_line() -> None:
    result = run_cli("depth=b8u4", "width=k12", "bench.timing=false")
    assert 485_000 <= result["params"] <= 495_000
    assert result["params_M"] == 0.49
    assert "seconds_median" not in result


def test_timing_reports_seconds_and_voxels_per_second() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("bench", overrides=["depth=b1u2", "width=k4", "bench.size=[6,7,8]", "bench.repeats=2"])
    result = bench(cfg)
    assert result["size"] == [6, 7, 8] and result["seconds_min"] > 0
    assert result["voxels_per_second"] == 6 * 7 * 8 / result["seconds_median"]
