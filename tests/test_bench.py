"""`mdcsrn-bench`: the JSON line users and the README rely on."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mdcsrn_lightning.benchmark import conv_macs_per_voxel, infer_task, markdown, queue_task, train_task
from mdcsrn_lightning.benchmark.measure import PeakMemory, alternate
from mdcsrn_lightning.cli.bench import bench
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.models import MDCSRN


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
    # the top-level figures are the best engine's
    assert result["seconds_median"] == result["engines"][result["best_engine"]]["seconds_median"]


# ---------------------------------------------------------------------- side-by-side tasks
TINY_MODEL = {"_target_": "mdcsrn_lightning.models.mdcsrn.MDCSRN", "num_blocks": 1, "units_per_block": 2, "growth_rate": 4}


def test_conv_macs_count_every_conv_weight_per_voxel() -> None:
    # b8u4 k=12: stem 648, 8 blocks of 53,424, compressors 52,416, reconstruction 600
    assert conv_macs_per_voxel(MDCSRN(8, 4, 12)) == 648 + 8 * 53_424 + 52_416 + 600
    with pytest.raises(ValueError, match="grid size"):
        conv_macs_per_voxel(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3)))


def test_alternate_rotates_the_order_and_peak_memory_sees_an_allocation() -> None:
    calls: list[str] = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
    assert calls == ["a", "b", "b", "a"] and len(times["a"]) == 2
    # a fresh anonymous mapping, every page written: new resident memory whatever the
    # allocator holds (torch's allocator may reuse free memory left by earlier tests)
    with PeakMemory("cpu") as mem:
        block = mmap.mmap(-1, 64 << 20)
        for offset in range(0, 64 << 20, 4096):
            block[offset] = 1
        block.close()
    assert mem.increase >= 60 << 20


def test_infer_task_compares_engines_with_the_reference() -> None:
    result = infer_task(
        TINY_MODEL, engines=["reference", "torch", "stream:3", "onnxruntime"], size=[6, 7, 8], repeats=2,
        memory="inprocess", device="cpu", log=lambda _: None,
    )
    rows = result["engines"]
    assert result["gemm"]["gflops_peak"] > 0 and result["conv_gflop"] > 0
    for name in ("reference", "torch", "stream:3"):
        row = rows[name]
        assert row["max_abs_diff"] < 1e-5 and row["seconds_min"] > 0 and 0 < row["peak_share"] < 1
        assert {"speedup_vs_reference", "mvox_per_s", "gflops", "peak_rss_mb", "rss_increase_mb"} <= set(row)
    assert rows["reference"]["speedup_vs_reference"] == 1.0
    # onnxruntime is in the `test` extra: a skipped engine is a failure here
    assert "skipped" not in rows["onnxruntime"] and rows["onnxruntime"]["max_abs_diff"] < 1e-4
    assert result["best_engine"] in rows
    table = markdown(result)
    assert table.count("\n| ") >= 5 and "% of GEMM peak" in table


def test_every_bench_engine_name_is_one_set_of_inference_options() -> None:
    from mdcsrn_lightning.benchmark.settings import INFER_SETTINGS, infer_options

    size = [6, 7, 8]
    for name in INFER_SETTINGS:
        network, options = infer_options(name, size, "cpu", slab=3)
        assert network in ("plain", "reference", "channels_last") and options.device == "cpu", name
        if options.stream:
            assert (options.engine, options.slab) == ("torch", 3), name
        else:  # one patch covering the input: one forward pass of the network
            assert (options.patch_size, options.margin) == (size, 0), name
    assert infer_options("stream:5", size, "cpu")[1].slab == 5
    assert infer_options("stream:whole", size, "cpu")[1].slab == 6
    assert infer_options("stream", size, "cpu", slab=None)[1].slab == 6
    assert infer_options("bf16", size, "cpu")[1].precision == "bf16"
    assert infer_options("openvino", size, "cpu")[1].engine == "openvino"
    assert infer_options("reference", size, "cpu")[0] == "reference"
    with pytest.raises(ValueError, match="unknown inference setting 'block:openvino'"):
        infer_options("block:openvino", size, "cpu")


def test_the_benchmark_builds_inference_only_through_build_inferer() -> None:
    """No benchmark module imports a strategy or engine module of inference/ itself."""
    import ast
    from pathlib import Path

    import mdcsrn_lightning.benchmark as bench_pkg

    allowed = {"mdcsrn_lightning.inference.build", "mdcsrn_lightning.inference.options",
               "mdcsrn_lightning.inference.base", "mdcsrn_lightning.inference.patches"}  # patches: resolve_device
    found = {}
    for path in Path(bench_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mdcsrn_lightning.inference"):
                names = {a.name for a in node.names}
                if node.module not in allowed or (node.module.endswith("patches") and names != {"resolve_device"}):
                    found[path.name] = (node.module, sorted(names))
            elif isinstance(node, ast.Import) and any(a.name.startswith("mdcsrn_lightning.inference") for a in node.names):
                found[path.name] = [a.name for a in node.names]
    assert not found, found
    assert not (Path(bench_pkg.__file__).parent / "runners.py").exists()


def test_train_task_times_each_option_against_the_reference() -> None:
    result = train_task(
        TINY_MODEL, settings=["reference", "torch", "channels_last", "memory_efficient"], batches=[[2, 8]],
        repeats=1, memory="inprocess", device="cpu", log=lambda _: None,
    )
    run = result["runs"][0]
    assert (run["batch"], run["patch"]) == (2, 8)
    for row in run["settings"].values():
        assert row["seconds_median"] > 0 and row["patches_per_s"] > 0 and "peak_rss_mb" in row
    # which setting is fastest depends on the machine's load: only that one is named
    assert run["best_setting"] in run["settings"]
    assert "| memory_efficient |" in markdown(result)
    with pytest.raises(ValueError, match="unknown training option"):
        train_task(TINY_MODEL, settings=["fp8"], batches=[[1, 4]], repeats=1, memory="none", device="cpu")


def test_queue_task_measures_delivery_against_consumption() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "data.source.resolution=2", "data.source.num_slabs=6", "data.patch_size=8", "data.samples_per_volume=2",
            "data.batch_size=2", "data.queue_length=4",
        ])
    data = OmegaConf.to_container(cfg.data, resolve=False)
    result = queue_task(data, TINY_MODEL, batches=3, consume_settings=["torch"], consume_repeats=1, device="cpu", log=lambda _: None)
    assert result["queue"]["patches"] == 6 and result["queue"]["patches_per_s"] > 0
    assert result["consume"]["torch"]["patches_per_s"] > 0 and result["ratio_vs_fastest_step"] > 0
    assert "queue delivers" in markdown(result)


@pytest.mark.slow
def test_cli_prints_a_table_then_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.bench", "depth=b1u2", "width=k4", "bench.size=[6,6,6]",
         "bench.repeats=1", "bench.engines=[reference,torch]", "bench.memory=subprocess", "bench.device=cpu"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "| reference |" in proc.stdout and result["engines"]["torch"]["peak_rss_mb"] > 50
    assert result["machine"]["torch"] == torch.__version__


# ---------------------------------------------------------------------- lean training options
def test_channels_last_and_memory_efficient_fit(train_cfg) -> None:
    from mdcsrn_lightning.cli.train import train

    cfg = train_cfg("module.channels_last=true", "model.memory_efficient=true", "trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.slow
def test_compile_fit(train_cfg) -> None:
    from mdcsrn_lightning.cli.train import train

    cfg = train_cfg("module.compile=true", "trainer.fast_dev_run=true", "test=false")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.slow
def test_volume_task_streams_exactly_and_checks_itself(tmp_path) -> None:
    from mdcsrn_lightning.benchmark import volume_task

    result = volume_task(
        TINY_MODEL, shape=[22, 20, 18], slab=4, crop=14, device="cpu", workdir=str(tmp_path), log=lambda _: None,
        block_engine="openvino", block_slab=5, engine_patches=[12, 12, 12],
    )
    assert result["receptive_field_radius"] == 3
    assert result["stream"]["peak_rss_mb"] > 50 and result["stream"]["seconds"] > 0
    assert result["crops_max_abs_diff"] < 1e-5
    assert result["patches"]["max_abs_diff_vs_stream"] < 1e-5 and result["patches"]["margin"] == 3
    # the block-streamed OpenVINO pass and margin=auto patches fed to OpenVINO, side by side
    for key in ("block", "engine_patches"):
        row = result[key]
        assert row["crops_max_abs_diff"] < 1e-5 and row["max_abs_diff_vs_stream"] < 1e-5, key
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 50 and row["speedup_vs_stream"] > 0
    # every row is described by the InferenceOptions its fresh process built the inferer from
    opts = {key: result[key]["options"] for key in ("stream", "block", "engine_patches", "patches")}
    assert (opts["stream"]["stream"], opts["stream"]["engine"], opts["stream"]["slab"]) == (True, "torch", 4)
    assert (opts["block"]["stream"], opts["block"]["engine"], opts["block"]["slab"]) == (True, "openvino", 5)
    assert (opts["engine_patches"]["engine"], opts["engine_patches"]["margin"]) == ("openvino", "auto")
    assert opts["patches"]["margin"] == "auto" and opts["patches"]["patch_size"] == result["patches"]["patch_size"]
    assert all(result[key]["inferer"] for key in opts)
    table = markdown(result)
    assert "streamed whole volume" in table and "block-streamed, openvino (slab 5)" in table
    assert "patches 12x12x12, margin=auto, openvino" in table


# ---------------------------------------------------------------------- fp32 vs bf16-mixed curves
def test_curves_table_puts_precisions_side_by_side(tmp_path) -> None:
    from mdcsrn_lightning.benchmark.curves import _windows, read_curve

    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text(
        "epoch,step,train/loss,val/psnr\n0,0,0.5,\n0,1,0.3,\n0,1,,30.5\n1,2,0.2,\n1,3,0.1,\n1,3,,31.25\n"
    )
    curve = read_curve(csv_file)
    assert curve == {"train/loss": [[0, 0.5], [1, 0.3], [2, 0.2], [3, 0.1]], "val/psnr": [[1, 30.5], [3, 31.25]]}
    assert [w["mean"] for w in _windows(curve["train/loss"], 2)] == pytest.approx([0.4, 0.15])
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_curve(tmp_path / "missing.csv")

    def run(psnr: float, seconds: float) -> dict:
        return {"seconds": seconds, "steps": 4, "loss_windows": _windows(curve["train/loss"], 2),
                "val_psnr": curve["val/psnr"], "test_psnr": psnr, "test_ssim": 0.9, "best_baseline": "zero_filled",
                "best_baseline_psnr": 34.0}

    runs = {"32-true": run(35.0, 100.0), "bf16-mixed": run(34.95, 50.0)}
    runs["bf16-mixed"].update(psnr_diff_vs_first=-0.05, seconds_vs_first=2.0)
    runs["32-true"].update(psnr_diff_vs_first=0.0, seconds_vs_first=1.0)
    table = markdown({"task": "train", "device": "cpu", "threads": 2, "runs": [],
                      "curves": {"experiment": "quickstart", "overrides": [], "window": 2, "runs": runs}})
    assert "| | 32-true | bf16-mixed |" in table
    assert "| train loss, steps 0-1 | 0.40000 | 0.40000 |" in table
    assert "| val PSNR (dB) at step 3 | 31.250 | 31.250 |" in table
    assert "| **test PSNR (dB), held out** | **35.000** | **34.950** |" in table
    assert "| test PSNR minus 32-true (dB) | +0.000 | -0.050 |" in table
    assert "| run wall time s (fit, validation, test; speed-up vs 32-true) | 100 (1.00x) | 50 (2.00x) |" in table


@pytest.mark.slow
def test_precision_curves_train_the_same_run_in_each_precision(tmp_path) -> None:
    from mdcsrn_lightning.benchmark.curves import precision_curves

    tiny = ["depth=b1u2", "width=k4", "data.source.resolution=2", "data.patch_size=8", "data.samples_per_volume=2",
            "data.batch_size=2", "data.queue_length=8", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
            f"paths.root_dir={tmp_path}"]
    result = precision_curves(["32-true", "bf16-mixed"], overrides=tiny, window=2, workdir=str(tmp_path / "runs"))
    runs = result["runs"]
    assert list(runs) == ["32-true", "bf16-mixed"] and all("error" not in r for r in runs.values()), runs
    for precision, r in runs.items():
        assert r["steps"] == 6 and len(r["val_psnr"]) == 2 and r["seconds"] > 0  # 3 steps per epoch, 2 epochs
        assert r["best_baseline"] == "zero_filled" and abs(r["test_psnr"] - r["best_baseline_psnr"]) < 20
        assert (tmp_path / "runs" / precision / "checkpoints" / "last.ckpt").is_file()
    assert runs["32-true"]["psnr_diff_vs_first"] == 0.0
    assert runs["bf16-mixed"]["psnr_diff_vs_first"] == runs["bf16-mixed"]["test_psnr"] - runs["32-true"]["test_psnr"]
    # the two runs differ only in precision: same seed, same data, so the first step's loss agrees closely
    first = [r["loss_windows"][0]["mean"] for r in runs.values()]
    assert abs(first[0] - first[1]) < 0.05 * first[0]
