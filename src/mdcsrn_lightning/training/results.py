"""After fit: the model beside the interpolation baselines on the test split, as files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torchio as tio
from omegaconf import DictConfig

from mdcsrn_lightning.atomic import write_json
from mdcsrn_lightning.evaluation.interpolation import interpolation_scores
from mdcsrn_lightning.evaluation.tables import markdown_table, summarise_methods
from mdcsrn_lightning.models import count_parameters
from mdcsrn_lightning.training.loggers import log_test_results


def write_test_results(
    cfg: DictConfig, module: Any, datamodule: Any, output_dir: Path, checkpoint: str, loggers: Sequence[Any] = ()
) -> Path:
    """Write ``metrics.json`` (model and baselines, mean +- std over test subjects), print a table,
    and hand the results to the dashboards among ``loggers`` (:func:`log_test_results`)."""
    per_method: dict[str, list[dict[str, float]]] = {"model": list(module.test_rows)}
    slices = getattr(datamodule, "slices", None)
    # the baselines re-degrade the HR in k-space: not the input of a thick-slice run
    # (its interpolation baselines: scripts/thick_slice_baselines.py)
    baselines = [] if slices is not None else list(cfg.get("baselines", []))
    for batch in datamodule.test_dataloader():
        for i in range(batch["hr"][tio.DATA].shape[0]):
            hr = batch["hr"][tio.DATA][i, 0].numpy()
            scores = interpolation_scores(
                hr, cfg.data.factors, baselines, module.metric_axis, module.metric_scale(batch, i)
            )
            for name, row in scores.items():
                per_method.setdefault(name, []).append(row)
    summary = summarise_methods(per_method)
    result = {
        "split": "test",
        "methods": summary,
        "params": count_parameters(module.net),
        # one whole-volume forward pass per test subject, on this run's device
        "seconds_per_volume": float(sum(r["seconds"] for r in module.test_rows) / max(len(module.test_rows), 1)),
        "volume_shape": list(datamodule.test_dataloader().dataset[0]["hr"].shape[1:]),
        "checkpoint": checkpoint,
        "panel": str(module.panel_dir() / "test.png"),
        "model_config": module.net_config,
        "factors": list(getattr(datamodule, "factors", cfg.data.factors)),
        "degradation": "slices" if slices is not None else "kspace",
        "slices": slices.record() if slices is not None else None,
        "input_interpolation": cfg.data.get("interpolation"),
    }
    path = output_dir / "metrics.json"
    write_json(path, result)
    print(f"\nTest split ({summary['model']['n_subjects']} subject(s)), slice-wise in the degraded plane:")
    print(markdown_table(summary))
    # the test panel already went to the dashboards as it was drawn (SRModule._log_panel)
    log_test_results(loggers, result, [path], step=int(module.global_step))
    return path
