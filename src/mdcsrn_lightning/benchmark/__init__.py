"""``mdcsrn-bench`` as a library: side-by-side inference engines, training steps, the patch
queue, the exact whole-volume pass and the data pipeline at cohort scale (see :mod:`.tasks`); markdown tables in :mod:`.report`."""

from __future__ import annotations

from mdcsrn_lightning.benchmark.data_bench import data_task
from mdcsrn_lightning.benchmark.measure import PeakMemory, conv_macs_per_voxel, gemm_gflops
from mdcsrn_lightning.benchmark.report import machine, markdown
from mdcsrn_lightning.benchmark.tasks import infer_task, queue_task, train_task, volume_task

__all__ = [
    "PeakMemory",
    "conv_macs_per_voxel",
    "data_task",
    "gemm_gflops",
    "infer_task",
    "machine",
    "markdown",
    "queue_task",
    "train_task",
    "volume_task",
]
