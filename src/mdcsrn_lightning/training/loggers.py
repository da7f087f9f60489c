"""The dashboards beside the CSV logger: W&B, TensorBoard and MLflow (Lightning's own loggers).

What a run is called and grouped as (:class:`RunIdentity`) is decided once by the CLI and
handed to every logger whose config leaves it null (:func:`identity_arguments`). A W&B run
keeps its id in ``<run>/wandb_run.json``; a run resumed from a checkpoint of that folder
continues the same W&B run (``resume="allow"``, which Lightning's ``WandbLogger`` passes).
Panels and the test results go to each logger in the form its dashboard shows
(:func:`log_panel`, :func:`log_test_results`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from mdcsrn_lightning.atomic import write_json
from mdcsrn_lightning.training.run_checks import RunConfigError

__all__ = [
    "WANDB_RUN_FILE",
    "LocalMLFlowLogger",
    "RunIdentity",
    "identity_arguments",
    "log_panel",
    "log_test_results",
    "metrics_table",
    "new_wandb_id",
    "read_wandb_id",
    "write_wandb_run",
]

WANDB_RUN_FILE = "wandb_run.json"
# metrics.json keys shown as one number per run (W&B summary, MLflow metrics, TensorBoard scalars)
_RUN_NUMBERS = ("params", "seconds_per_volume")
_TABLE_METRICS = ("psnr", "ssim", "nrmse")


@dataclass(frozen=True)
class RunIdentity:
    """What a run is, for the dashboards.

    Args:
        name: says what the run is: ``<group or experiment>/<what differs>``, e.g. ``table1_exp3/b8u4``.
        group: the sweep this run belongs to (W&B group, MLflow experiment); ``None`` for a lone run.
        job_type: ``train`` (L1) or ``gan`` (WGAN-GP).
        tags: the paper's row, e.g. ``("b8u4",)``.
        experiment: the MLflow experiment: the group, else the task name (``train``, ``quickstart``).
    """

    name: str
    group: str | None
    job_type: str
    tags: tuple[str, ...]
    experiment: str


class LocalMLFlowLogger(MLFlowLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.MLFlowLogger` on a local store with no server.

    MLflow 3 refuses its plain-folder backend; the store is a SQLite database
    (``<store>/mlflow.db``) and an artifact folder (``<store>/artifacts``), which
    ``mlflow ui --backend-store-uri sqlite:///<store>/mlflow.db`` serves.

    Args:
        store: folder of the local store (created); unused when a tracking URI is given.
        tracking_uri: a tracking server or database; ``None``: ``$MLFLOW_TRACKING_URI``, else ``store``.
        run_dir: this run's folder, kept as the tag ``run_dir``; parameters whose value is a
            path inside it (checkpoint folder, split file) are left out, since they differ
            between every two runs and would bury the parameters that do in MLflow's comparison.
        experiment_name, run_name, tags, log_model, **kwargs: as for ``MLFlowLogger``.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: bool = False,
        run_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._run_dir = str(Path(run_dir).resolve()) if run_dir else None
        if self._run_dir:
            tags = {**(tags or {}), "run_dir": self._run_dir}
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if tracking_uri is None:
            if store is None or str(store) == "":
                raise ValueError("LocalMLFlowLogger: give store (a folder) or tracking_uri")
            root = Path(store).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
            # only used when this run creates the experiment; later runs find it
            kwargs.setdefault("artifact_location", (root / "artifacts").as_uri())
            # the client creates the database (schema migrations) on first use: parallel sweep
            # jobs (hydra/launcher=parallel) starting on a new store take turns
            lock = _flocked(root / ".create.lock")
        with lock:
            super().__init__(
                experiment_name=experiment_name or "mdcsrn-lightning",
                run_name=run_name,
                tracking_uri=tracking_uri,
                tags=tags,
                log_model=log_model,
                **kwargs,
            )

    def log_hyperparams(self, params: Mapping[str, Any] | Any) -> None:
        if self._run_dir and isinstance(params, Mapping):
            params = self._without_run_paths(params)
        super().log_hyperparams(params)

    def _without_run_paths(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self._without_run_paths(v) if isinstance(v, Mapping) else v
                for k, v in params.items() if not self._inside_run_dir(v)}

    def _inside_run_dir(self, value: Any) -> bool:
        if not isinstance(value, str) or os.sep not in value or self._run_dir is None:
            return False
        return value == self._run_dir or str(Path(value).resolve()).startswith(self._run_dir + os.sep)


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- identity
def identity_arguments(
    logger_class: type, identity: RunIdentity, wandb_id: str | None = None, run_dir: str | None = None
) -> dict[str, Any]:
    """Constructor arguments that carry ``identity`` to a logger of ``logger_class``.

    The caller passes only those its config leaves null (a user's explicit name wins).
    Loggers with no notion of names (CSV, TensorBoard: the run folder names them) get none.
    """
    if issubclass(logger_class, WandbLogger):
        return {"name": identity.name, "group": identity.group, "job_type": identity.job_type,
                "tags": list(identity.tags), "id": wandb_id}
    if issubclass(logger_class, MLFlowLogger):
        tags = {"group": identity.group or "", "job_type": identity.job_type, "row": ",".join(identity.tags)}
        arguments: dict[str, Any] = {"experiment_name": identity.experiment, "run_name": identity.name, "tags": tags}
        if run_dir and issubclass(logger_class, LocalMLFlowLogger):
            arguments["run_dir"] = run_dir
        return arguments
    return {}


def new_wandb_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, as W&B draws them (36^8 ids)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_wandb_id(folders: Iterable[str | os.PathLike[str]]) -> str | None:
    """The W&B run id recorded in the first of ``folders`` that holds ``wandb_run.json``.

    Raises:
        RunConfigError: the file exists but holds no id (one line naming it).
    """
    for folder in folders:
        path = Path(folder) / WANDB_RUN_FILE
        if not path.is_file():
            continue
        try:
            run_id = json.loads(path.read_text(encoding="utf-8")).get("id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise RunConfigError(f"{path}: not a W&B run record ({exc}); delete it to start a new W&B run") from None
        if not isinstance(run_id, str) or not run_id:
            raise RunConfigError(f"{path}: no W&B run id in it; delete it to start a new W&B run")
        return run_id
    return None


def write_wandb_run(folder: str | os.PathLike[str], run_id: str, identity: RunIdentity, project: str | None) -> Path:
    """Record the W&B run of this run folder (read back by :func:`read_wandb_id` on resume)."""
    return write_json(Path(folder) / WANDB_RUN_FILE, {
        "id": run_id, "project": project, "name": identity.name, "group": identity.group,
        "job_type": identity.job_type, "tags": list(identity.tags),
    })


# ---------------------------------------------------------------------------- panels and results
def log_panel(loggers: Sequence[Logger], path: Path, key: str, caption: str, step: int) -> None:
    """A slice panel (PNG at ``path``) to every dashboard: W&B image, TensorBoard image, MLflow artifact."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            from matplotlib.image import imread

            image = imread(path)[..., :3]  # (H, W, 3) in [0, 1]; the alpha channel is opaque
            logger.experiment.add_image(f"{key}/{caption}", image, global_step=step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="panels")


def metrics_table(methods: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[Any]]]:
    """``metrics.json``'s methods as table columns and rows (mean and std of each metric)."""
    columns = ["method", "n_subjects"] + [f"{m}{s}" for m in _TABLE_METRICS for s in ("", "_std")]
    rows = [[name, int(row.get("n_subjects", 0))] + [float(row[c]) for c in columns[2:]] for name, row in methods.items()]
    return columns, rows


def log_test_results(loggers: Sequence[Logger], result: Mapping[str, Any], files: Sequence[Path], step: int) -> None:
    """The test split's results (``metrics.json`` as ``result``) to every dashboard.

    W&B: a Table ``test/metrics`` and ``params``, ``seconds_per_volume`` and each method's
    ``test/<method>/<metric>`` in the run summary. MLflow: the same numbers as metrics, and
    ``files`` (``metrics.json``) as artifacts. TensorBoard: the numbers as
    scalars and the table as text.
    """
    columns, rows = metrics_table(result["methods"])
    numbers = {k: float(result[k]) for k in _RUN_NUMBERS if result.get(k) is not None}
    per_method = {f"test/{name}/{m}": float(row[m]) for name, row in result["methods"].items()
                  for m in _TABLE_METRICS if m in row}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test/metrics", columns=columns, data=rows)
            logger.experiment.summary.update({**numbers, **per_method})
        elif isinstance(logger, MLFlowLogger):
            logger.log_metrics({**numbers, **per_method}, step=step)
            for path in files:
                if Path(path).is_file():
                    logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, TensorBoardLogger):
            logger.log_metrics({**numbers, **per_method}, step=step)
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "\n".join("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |"
                             for r in rows)
            logger.experiment.add_text("test/metrics", header + body, global_step=step)
            logger.experiment.flush()  # after the trainer's finalize: nothing else writes these to disk
