"""Lightning's CSV logger, made safe for full disks and resumed runs.

Lightning's writer appends to ``metrics.csv`` in place (a full disk leaves a truncated
file), rewrites it in place when a new column appears, and deletes it when a run resumes in
the same folder (earlier rows lost). :class:`SafeCSVLogger` keeps every row in memory, and
each flush rewrites the whole file atomically (:func:`mdcsrn_lightning.atomic.atomic_path`):
the file on disk is always a complete earlier or later version. A run resumed in the same
folder starts from the rows already there; rows at or after the step it resumes from (logged
by the interrupted run after its checkpoint) are replaced by the new ones.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from mdcsrn_lightning.atomic import WriteError, atomic_path, write_text

__all__ = ["SafeCSVLogger", "SafeExperimentWriter"]

log = logging.getLogger(__name__)


class SafeExperimentWriter(ExperimentWriter):
    """``metrics.csv`` and ``hparams.yaml`` written atomically; earlier rows kept on resume."""

    def __init__(self, log_dir: str) -> None:
        self._rows: list[dict[str, Any]] = []
        self._resumed = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; we read it instead (a resume keeps its rows)
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            self._rows = [dict(r) for r in reader]
            self.metrics_keys = sorted(reader.fieldnames or [])
        self._resumed = bool(self._rows)

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(str(tmp), self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        if self._resumed:
            # the interrupted run logged steps after its checkpoint: the resumed run redoes them
            first = min(int(m.get("step", 0)) for m in self.metrics)
            self._rows = [r for r in self._rows if not r.get("step") or int(float(r["step"])) < first]
            self._resumed = False
        self._record_new_keys()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows + self.metrics)
        write_text(self.metrics_file_path, text.getvalue())
        self._rows += self.metrics  # only once the file holds them
        self.metrics = []


class SafeCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` with :class:`SafeExperimentWriter` (same arguments)."""

    @property
    def experiment(self) -> SafeExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            from lightning.pytorch.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank > 0:
                return super().experiment  # type: ignore[return-value]  # a dummy on other ranks
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = SafeExperimentWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]

    def finalize(self, status: str) -> None:
        try:
            super().finalize(status)
        except WriteError as exc:
            if status != "failed":
                raise
            # the run already failed (often for the same full disk): do not mask that error
            log.warning("metrics not flushed: %s", exc)
