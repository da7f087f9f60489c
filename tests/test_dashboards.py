"""Runs you can compare in a dashboard: W&B (offline, resumable), TensorBoard, MLflow.

W&B's offline files are read back through W&B's own CLI (``wandb leet inspect --json``, which
prints the records of a run's ``.wandb`` log) and the media files it writes; MLflow through its
Python API; TensorBoard through its event reader. Never through W&B's private modules.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

import mdcsrn_lightning
from mdcsrn_lightning.cli.run_identity import run_identity
from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.training.loggers import WANDB_RUN_FILE, RunIdentity, identity_arguments, read_wandb_id
from mdcsrn_lightning.training.run_checks import RunConfigError

from .conftest import TINY, compose_train

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TESTS = Path(__file__).parent


# -------------------------------------------------------------------- W&B offline files
def _wandb_records(offline_run: Path) -> list[dict[str, Any]]:
    """Every record of an offline run's ``.wandb`` log, as W&B's CLI prints them."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_run)],
                          capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _wandb_summary(offline_run: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(offline_run)],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(proc.stdout)["summary"]


def _of_type(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r[kind] for r in records if r.get("type") == kind]


def _train_steps(records: list[dict[str, Any]]) -> list[int]:
    """``trainer/global_step`` (the x axis of every W&B chart) of the rows holding ``train/loss``."""
    return [int(h["item"]["trainer/global_step"]) for h in _of_type(records, "history") if "train/loss" in h["item"]]


def test_wandb_resumed_run_continues_the_same_run_with_panels_table_and_summary(train_cfg, tmp_path: Path) -> None:
    first = train_cfg("logger=wandb", "tags=[b1u2k4]", run="first")
    train(first)
    first_dir = Path(first.paths.output_dir)
    recorded = json.loads((first_dir / WANDB_RUN_FILE).read_text())
    (offline,) = (first_dir / "wandb").glob("offline-run-*")
    assert offline.name.endswith(f"-{recorded['id']}")
    records = _wandb_records(offline)

    (run,) = _of_type(records, "run")
    assert run["run_id"] == recorded["id"]
    assert run["display_name"] == recorded["name"] and run["display_name"].startswith("train/depth=b1u2,width=k4,")
    assert run["job_type"] == "train" and run["tags"] == ["b1u2k4"] and "run_group" not in run
    # the resolved config (no interpolation left) and the parameter count
    config: dict[str, Any] = {}
    for update in _of_type(records, "config"):
        config.update(update["update"])
    metrics = json.loads((first_dir / "metrics.json").read_text())
    assert config["model"]["growth_rate"] == 4 and config["params"] == metrics["params"]
    assert config["callbacks"]["model_checkpoint"]["dirpath"] == str(first_dir / "checkpoints")

    # panels as images (validation and test), the test table, the numbers in the summary
    media = offline / "files" / "media"
    assert len(list((media / "images" / "val").glob("panel_*.png"))) == 1
    assert len(list((media / "images" / "test").glob("panel_*.png"))) == 1
    (table_file,) = (media / "table" / "test").glob("metrics_*.table.json")
    table = json.loads(table_file.read_text())
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert set(rows) == set(metrics["methods"]) == {"model", "trilinear"}
    for name, row in rows.items():
        assert row["psnr"] == pytest.approx(metrics["methods"][name]["psnr"], rel=1e-9)
        assert row["ssim_std"] == pytest.approx(metrics["methods"][name]["ssim_std"], abs=1e-12)
    summary = _wandb_summary(offline)
    assert summary["params"] == metrics["params"] == 2457
    assert summary["seconds_per_volume"] == pytest.approx(metrics["seconds_per_volume"], rel=1e-9)
    assert summary["test/model/psnr"] == pytest.approx(metrics["methods"]["model"]["psnr"], rel=1e-9)
    steps_first = _train_steps(records)
    assert steps_first == [0, 1]

    # resumed into another folder: the same W&B run, its steps after the first run's
    last = first_dir / "checkpoints" / "last.ckpt"
    second = train_cfg("logger=wandb", "tags=[b1u2k4]", "trainer.max_epochs=2", f"ckpt_path={last}", run="second")
    train(second)
    second_dir = Path(second.paths.output_dir)
    assert json.loads((second_dir / WANDB_RUN_FILE).read_text())["id"] == recorded["id"]
    (resumed,) = (second_dir / "wandb").glob("offline-run-*")
    records = _wandb_records(resumed)
    (run,) = _of_type(records, "run")
    assert run["run_id"] == recorded["id"] and run["resume"] is True
    assert _train_steps(records) == [2, 3]


def test_a_new_run_in_a_new_folder_gets_a_new_wandb_id(train_cfg) -> None:
    ids = []
    for run in ("a", "b"):
        cfg = train_cfg("logger=wandb", "trainer.limit_train_batches=1", "test=false", run=run)
        train(cfg)
        ids.append(json.loads((Path(cfg.paths.output_dir) / WANDB_RUN_FILE).read_text())["id"])
    assert ids[0] != ids[1] and all(len(i) == 8 and i.isalnum() and i.islower() for i in ids)


def test_unreadable_wandb_record_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / WANDB_RUN_FILE).write_text("{not json")
    with pytest.raises(RunConfigError, match=rf"^{tmp_path / WANDB_RUN_FILE}: not a W&B run record") as info:
        read_wandb_id([tmp_path / "missing", tmp_path])
    assert "\n" not in str(info.value)
    (tmp_path / WANDB_RUN_FILE).write_text('{"id": ""}')
    with pytest.raises(RunConfigError, match="no W&B run id"):
        read_wandb_id([tmp_path])
    assert read_wandb_id([tmp_path / "missing"]) is None


# -------------------------------------------------------------------- names, groups, job types
def test_sweep_job_is_named_by_its_row_and_grouped_by_the_sweep(tmp_path: Path) -> None:
    cfg = compose_train(["+sweep=table1_exp3", "experiment=table1_b8u4"], tmp_path / "run")
    assert run_identity(cfg) == RunIdentity(
        name="table1_exp3/b8u4", group="table1_exp3", job_type="train", tags=("b8u4",), experiment="table1_exp3"
    )


def test_command_line_sweep_is_named_by_what_varies(tmp_path: Path) -> None:
    sweep = tmp_path / "multiruns" / "2026-01-02_03-04-05_000006"
    sweep.mkdir(parents=True)
    # what Hydra writes before the jobs: the command line's overrides, sweeps unexpanded
    OmegaConf.save({"hydra": {"overrides": {"task": ["depth=b1u2", "width=k4,k8", "trainer.max_epochs=1"]}}},
                   sweep / "multirun.yaml")
    cfg = compose_train(["depth=b1u2", "width=k8", "trainer.max_epochs=1", "hydra.mode=MULTIRUN",
                         f"hydra.sweep.dir={sweep}"], tmp_path / "run")
    identity = run_identity(cfg)
    assert identity.name == "train/width=k8"
    assert identity.group == identity.experiment == "train/2026-01-02_03-04-05_000006"


@pytest.mark.parametrize(
    ("overrides", "name", "job_type"),
    [
        (["experiment=quickstart"], "quickstart", "train"),
        (["depth=b8u4", "width=k8", "seed=3", "logger=csv", "paths.root_dir=/x"], "train/depth=b8u4,width=k8", "train"),
        (["experiment=quickstart_gan"], "quickstart_gan", "gan"),
        (["loss=wgan_gp", "module.init_ckpt=null"], "train/loss=wgan_gp,module.init_ckpt=null", "gan"),
        ([], "train", "train"),
    ],
)
def test_lone_run_is_named_by_experiment_and_overrides(overrides: list[str], name: str, job_type: str,
                                                       tmp_path: Path) -> None:
    identity = run_identity(compose_train(overrides, tmp_path / "run"))
    assert (identity.name, identity.job_type, identity.group) == (name, job_type, None)
    assert identity.experiment == name.split("/")[0]


def test_user_names_win_and_wandb_gets_the_identity(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from mdcsrn_lightning.cli.train import build_loggers

    identity = RunIdentity(name="g/row", group="g", job_type="gan", tags=("row",), experiment="g")
    assert identity_arguments(WandbLogger, identity, wandb_id="abcd1234") == {
        "name": "g/row", "group": "g", "job_type": "gan", "tags": ["row"], "id": "abcd1234"}
    assert identity_arguments(CSVLogger, identity) == {}
    cfg = compose_train([*TINY, "logger=wandb", "logger.wandb.name=mine", "logger.wandb.group=team"], tmp_path / "r")
    (wandb_logger, _) = build_loggers(cfg, tmp_path / "r")
    assert wandb_logger._wandb_init["name"] == "mine" and wandb_logger._wandb_init["group"] == "team"
    assert wandb_logger._wandb_init["resume"] == "allow"
    assert json.loads((tmp_path / "r" / WANDB_RUN_FILE).read_text())["id"] == wandb_logger._wandb_init["id"]


@pytest.mark.parametrize("choice", ["all", "[wandb,mlflow]", "[tensorboard,mlflow]", "csv"])
def test_logger_choices_compose_and_keep_the_csv_logger(choice: str, tmp_path: Path) -> None:
    cfg = compose_train([f"logger={choice}"], tmp_path / "run")
    expected = {"all": ["wandb", "csv", "tensorboard", "mlflow"], "[wandb,mlflow]": ["wandb", "csv", "mlflow"],
                "[tensorboard,mlflow]": ["tensorboard", "csv", "mlflow"], "csv": ["csv"]}[choice]
    assert list(cfg.logger) == expected


def test_no_private_wandb_module_is_imported() -> None:
    """W&B's private modules (protobuf records, internal writers) change with every release."""
    forbidden = ("wandb.sdk.internal", "wandb.proto")
    offending = []
    for path in [*Path(mdcsrn_lightning.__file__).parent.rglob("*.py"), *TESTS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offending += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert not offending


# -------------------------------------------------------------------- a sweep in MLflow and TensorBoard
@pytest.fixture(scope="module")
def mlflow_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``-m width=k4,k8`` of the tiny run, logged to MLflow (shared store) and TensorBoard."""
    root = tmp_path_factory.mktemp("mlflow_sweep")
    tiny = [o for o in TINY if not o.startswith(("width=", "logger=", "trainer.max_epochs="))]
    cmd = [sys.executable, "-m", "mdcsrn_lightning.cli.train", "-m", *tiny, "width=k4,k8", "trainer.max_epochs=2",
           "logger=[mlflow,tensorboard]", f"hydra.sweep.dir={root / 'sweep'}", f"paths.log_dir={root / 'logs'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_sweep_in_mlflow_is_comparable_runs(mlflow_sweep: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_sweep / 'logs' / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train/sweep")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["train/width=k4", "train/width=k8"]
    for job, (name, growth) in enumerate((("train/width=k4", "4"), ("train/width=k8", "8"))):
        run, folder = runs[name], mlflow_sweep / "sweep" / str(job)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.tags["run_dir"] == str(folder.resolve()) and run.data.tags["group"] == "train/sweep"
        # params: the resolved config (run-folder paths left out) and the parameter count
        assert run.data.params["model/growth_rate"] == growth
        assert run.data.params["params"] == str(metrics["params"])
        assert not any(str(folder.resolve()) in v for v in run.data.params.values())
        # metrics: the test numbers of metrics.json and a validation curve over steps
        assert run.data.metrics["params"] == metrics["params"]
        assert run.data.metrics["seconds_per_volume"] == pytest.approx(metrics["seconds_per_volume"], rel=1e-9)
        for method, row in metrics["methods"].items():
            assert run.data.metrics[f"test/{method}/psnr"] == pytest.approx(row["psnr"], rel=1e-9)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [1, 3]
        # artifacts: metrics.json (the same file) and the panels
        assert {a.path for a in client.list_artifacts(run.info.run_id, "panels")} == {
            "panels/val_epoch000.png", "panels/val_epoch001.png", "panels/test.png"}
        local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
        assert json.loads(Path(local).read_text()) == metrics
    assert runs["train/width=k4"].data.metrics["params"] < runs["train/width=k8"].data.metrics["params"]


@pytest.mark.slow
def test_sweep_in_tensorboard_has_curves_panels_and_table(mlflow_sweep: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for job in ("0", "1"):
        events = EventAccumulator(str(mlflow_sweep / "sweep" / job / "tensorboard"),
                                  size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()
        assert {"train/loss", "val/psnr", "params", "test/model/psnr"} <= set(tags["scalars"])
        assert [e.step for e in events.Scalars("val/psnr")] == [1, 3]
        assert {"val/panel/val_epoch000", "val/panel/val_epoch001", "test/panel/test"} <= set(tags["images"])
        (image,) = events.Images("test/panel/test")
        assert image.width > 100 and image.height > 50
        (text,) = events.Tensors("test/metrics/text_summary")
        assert b"| model |" in text.tensor_proto.string_val[0]


# -------------------------------------------------------------------- the comparison in a real browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"chromium-{os.getpid()}-{time.monotonic_ns()}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", "--virtual-time-budget=20000"]
    try:
        return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
def test_mlflow_ui_compares_the_sweep_in_a_browser(mlflow_sweep: Path, tmp_path: Path) -> None:
    """`mlflow ui` on 127.0.0.1, its run-comparison page in headless Chromium: both runs shown.

    MDCSRN_SCREENSHOT_DIR=<folder> keeps the screenshot (docs/img/mlflow_compare.png in the README).
    """
    from matplotlib.image import imread
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_sweep / 'logs' / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("train/sweep")
    run_ids = sorted(r.info.run_id for r in client.search_runs([experiment.experiment_id]))
    port = _free_port()
    # one web worker and no background job runner (MLflow 3 starts several huey consumers):
    # the page is all we need; its own session, so that teardown ends every process it started
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env,
                              start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow ui exited"
            assert time.monotonic() < deadline, "mlflow ui did not answer on /health in 240 s"
            time.sleep(1)
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment.experiment_id])})
        page = f"{base}/#/compare-runs?{query}"
        dom = _chromium("--dump-dom", page).stdout
        assert "Comparing 2 Runs" in dom and "train/width=k4" in dom and "train/width=k8" in dom
        shot = tmp_path / "mlflow_compare.png"
        _chromium(f"--screenshot={shot}", "--window-size=1400,900", page)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    pixels = imread(shot)
    assert pixels.shape[:2] == (900, 1400) and float(np.std(pixels[..., :3])) > 0.05  # not a blank page
    keep = os.environ.get("MDCSRN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
