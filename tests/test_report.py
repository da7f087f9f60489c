"""`mdcsrn-report`: paper tables and figures from run folders and sweeps (the CSV logger's files)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mdcsrn_lightning.cli.report import main as report_main
from mdcsrn_lightning.evaluation.report import (
    ReportError,
    build_report,
    find_runs,
    format_params,
)

BASELINES = {
    "nearest": {"psnr": 28.78, "psnr_std": 0.5, "ssim": 0.893, "ssim_std": 0.01, "nrmse": 0.2, "nrmse_std": 0.01, "n_subjects": 2},
    "trilinear": {"psnr": 31.56, "psnr_std": 0.5, "ssim": 0.908, "ssim_std": 0.01, "nrmse": 0.15, "nrmse_std": 0.01, "n_subjects": 2},
}


def scores(psnr: float) -> dict[str, float]:
    return {"psnr": psnr, "psnr_std": 0.8, "ssim": 0.94, "ssim_std": 0.006, "nrmse": 0.086, "nrmse_std": 0.0037, "n_subjects": 2}


def make_run(
    path: Path,
    *,
    tags: list[str] | None = None,
    overrides: list[str] | None = None,
    num: int = 0,
    group: str | None = "table1_exp3",
    psnr: float | None = 36.0,
    params: int = 228_961,
    baselines: dict | None = None,
    curve: list[tuple[int, float]] | None = None,
    panel: bool = True,
) -> Path:
    """A folder as `mdcsrn-train` writes it (only the files the report reads)."""
    (path / ".hydra").mkdir(parents=True)
    config = {"tags": tags or [], "logger": {"wandb": {"group": group}} if group else {"csv": {}}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    if psnr is not None:
        methods = {"model": scores(psnr), **(BASELINES if baselines is None else baselines)}
        metrics = {"split": "test", "methods": methods, "params": params, "seconds_per_volume": 12.5, "volume_shape": [64, 64, 32]}
        (path / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        (path / "csv").mkdir()
        with open(path / "csv" / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "step", "train/loss", "val/psnr"])
            for step, value in curve:
                writer.writerow([0, step, 0.1, ""])
                writer.writerow([0, step, "", value])
    if panel:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        (path / "panels").mkdir()
        plt.imsave(path / "panels" / "test.png", np.random.default_rng(num).random((40, 120)), cmap="gray")
    return path


def test_format_params_like_the_paper() -> None:
    assert [format_params(n) for n in (228_961, 353_761, 485_473, 2_087_371, 64_900)] == [
        "0.23M", "0.35M", "0.49M", "2.09M", "0.06M"
    ]
    assert format_params(4_200) == "0.0042M" and format_params(None) == "—"


def test_sweep_table_rows_baselines_once_and_files(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("{}")
    # job folders listed out of order on purpose: rows follow the job number
    make_run(sweep / "2_table1_b8u4", tags=["b8u4"], num=2, psnr=36.14, params=485_473, curve=[(10, 30.0), (20, 31.5)])
    make_run(sweep / "0_table1_b4u4", tags=["b4u4"], num=0, psnr=35.88, curve=[(10, 29.0), (20, 30.5)])
    make_run(sweep / "1_table1_b6u4", tags=["b6u4"], num=1, psnr=36.06, params=353_761, curve=[(10, 29.5)])

    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in lines[1:]]
    assert names == ["nearest", "trilinear", "b4u4", "b6u4", "b8u4"]  # baselines once, then runs
    assert "| b4u4 | 35.88 ± 0.80 | 0.9400 ± 0.0060 | 0.0860 ± 0.0037 | 0.23M | 12.50 |" in md
    assert "| nearest | 28.78 ± 0.50 | 0.8930 ± 0.0100 | 0.2000 ± 0.0100 | N/A | N/A |" in md
    assert "## table1_exp3" in md and "![val_psnr](val_psnr.png)" in md
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [r["row"] for r in rows] == names
    assert rows[2]["params"] == "228961" and float(rows[4]["psnr"]) == pytest.approx(36.14)
    assert (out / "val_psnr.png").stat().st_size > 1000
    assert (out / "panels.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "panels").iterdir()) == [
        "table1_exp3__b4u4.png", "table1_exp3__b6u4.png", "table1_exp3__b8u4.png"
    ]
    report = build_report([sweep])
    assert [r.curve for r in report.runs][0] == [(10, 29.0), (20, 30.5)]


def test_rows_named_by_differing_overrides_and_tables_by_group(tmp_path: Path) -> None:
    common = ["logger=csv", "data.patch_size=8"]
    make_run(tmp_path / "a" / "0", overrides=[*common, "module.optimizer.lr=0.001", "width=k8"], group="optuna")
    make_run(tmp_path / "a" / "1", overrides=[*common, "module.optimizer.lr=0.0001", "width=k8"], num=1, group="optuna")
    make_run(tmp_path / "b" / "run", tags=["b4u4"], group=None, panel=False)
    report = build_report([tmp_path / "a", tmp_path / "b"])
    assert [t.name for t in report.tables] == ["optuna", "runs"]
    models = [r.name for r in report.tables[0].rows if r.kind == "model"]
    assert models == ["module.optimizer.lr=0.001", "module.optimizer.lr=0.0001"]


def test_differing_baselines_are_listed_per_data_and_failed_runs_show_dashes(tmp_path: Path) -> None:
    other = {"nearest": {**BASELINES["nearest"], "psnr": 20.0}}
    make_run(tmp_path / "0", tags=["x"], baselines={"nearest": BASELINES["nearest"]})
    make_run(tmp_path / "1", tags=["y"], num=1, baselines=other)
    make_run(tmp_path / "2", tags=["z"], num=2, psnr=None)  # failed: no metrics.json
    md = build_report([tmp_path]).markdown()
    assert "| nearest (x) | 28.78" in md and "| nearest (y) | 20.00" in md
    assert "| z | — | — | — | — | — |" in md and "1 without results" in md


def test_missing_or_empty_paths_are_one_line_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(ReportError, match="no such file"):
        find_runs([tmp_path / "nope"])
    assert report_main([str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("mdcsrn-report: error:") and str(tmp_path) in message and "\n" not in message


# ------------------------------------------------------------------ W&B run folders
def test_wandb_folder_stands_for_the_run_around_it(tmp_path: Path) -> None:
    """W&B's own files are never parsed: its folder is read through the run's CSV and metrics.json."""
    run = make_run(tmp_path / "sweep" / "0_b4u4", tags=["b4u4"], curve=[(5, 30.0), (10, 31.0)])
    offline = run / "wandb" / "offline-run-20261126_000000-abc"
    offline.mkdir(parents=True)
    (offline / "run-abc.wandb").write_bytes(b":W&B\xe1\xbe\x00 not parsed")
    for given in (offline, run):
        (table,) = build_report([given]).tables
        (row,) = [r for r in table.rows if r.kind == "model"]
        assert (row.name, row.run.path, row.run.curve) == ("b4u4", run, [(5, 30.0), (10, 31.0)])
    # the run folder and its W&B folder are one run, not two
    assert len(find_runs([run, offline])) == 1


def test_wandb_folder_alone_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    offline = tmp_path / "offline-run-20261126_000000-abc"
    offline.mkdir()
    (offline / "run-abc.wandb").write_bytes(b":W&B")
    assert report_main([str(offline)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("mdcsrn-report: error: ") and str(offline) in message and "\n" not in message
    assert "outside an mdcsrn-train run folder" in message


# ------------------------------------------------------------------ end to end: Table 1 Exp. 3
@pytest.mark.slow
def test_table1_exp3_sweep_end_to_end_then_report(tmp_path: Path, capsys) -> None:
    """The real `+sweep=table1_exp3` (b4u4, b6u4, b8u4 at k=12), W&B offline, shortened to one
    training step on the 2 mm template in 12 slabs (5 slices: 8x8x4 patches), then the report."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "mdcsrn_lightning.cli.train", "+sweep=table1_exp3",
        "data.source.resolution=2", "data.source.num_slabs=12", "data.patch_size=[8,8,4]",
        "data.samples_per_volume=2", "data.batch_size=2", "data.queue_length=8",
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.log_every_n_steps=1",
        "test=true", f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_table1_b4u4", "1_table1_b6u4", "2_table1_b8u4"]

    # W&B logged beside the CSV logger, whose files the report reads
    for job in jobs:
        assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1
        assert (sweep / job / "csv" / "metrics.csv").is_file()

    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed)
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    for name, params in (("b4u4", "0.23M"), ("b6u4", "0.35M"), ("b8u4", "0.49M")):
        assert f"| {params} |" in rows[name]
    assert [n for n in rows if n in ("nearest", "trilinear", "tricubic", "zero_filled")] == [
        "nearest", "trilinear", "tricubic", "zero_filled"
    ]
    assert (out / "val_psnr.png").is_file() and (out / "panels.png").is_file()
    assert len(list((out / "panels").glob("table1_exp3__*.png"))) == 3

    # the W&B folders given instead stand for their runs: the same table
    via_wandb = build_report(sorted(sweep.glob("*/wandb/offline-run-*")))
    (table,) = via_wandb.tables
    assert table.name == "table1_exp3"
    models = [(r.name, format_params(r.params)) for r in table.rows if r.kind == "model"]
    assert models == [("b4u4", "0.23M"), ("b6u4", "0.35M"), ("b8u4", "0.49M")]
    assert via_wandb.markdown() == build_report([sweep]).markdown()
