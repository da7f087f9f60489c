"""Evaluation library and the `mdcsrn-eval` command (paper Tables 2-3 on HR references)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from torch import nn

from mdcsrn_lightning.cli import eval as eval_cli
from mdcsrn_lightning.data.degradation import degrade
from mdcsrn_lightning.evaluation.evaluate import (
    BASELINES,
    CheckpointMethod,
    Reference,
    baseline_names,
    checkpoint_methods,
    evaluate,
    markdown_report,
    references_from_files,
    write_outputs,
)
from mdcsrn_lightning.evaluation.metrics import slice_metrics
from tests.test_inference import run_cli, write_tiny_checkpoint

# SPEC: the MNI152 2009a template, 2x2x1, slice-wise in the degraded plane.
SPEC_PSNR = {"nearest": 28.78, "trilinear": 31.56, "tricubic": 33.12, "zero_filled": 34.53}


def phantom_hr(shape=(28, 30, 16), seed=0) -> np.ndarray:
    """A smooth 'head' with three tissue intensities and some texture, raw scale ~0..800."""
    grid = np.indices(shape).astype(np.float64)
    centre = (np.array(shape, dtype=np.float64) - 1) / 2
    r = np.sqrt(sum(((g - c) / (s / 2)) ** 2 for g, c, s in zip(grid, centre, shape)))
    vol = np.select([r < 0.45, r < 0.7, r < 0.9], [0.9, 0.55, 0.25], 0.0)
    rng = np.random.default_rng(seed)
    vol = vol * (1 + 0.05 * rng.standard_normal(shape)) * (r < 0.9)
    return (800.0 * np.clip(vol, 0, None)).astype(np.float32)


def write_phantom(path: Path, seed: int = 0) -> Path:
    affine = np.diag([1.1, 0.9, 2.0, 1.0])
    nib.save(nib.Nifti1Image(phantom_hr(seed=seed), affine), str(path))
    return path


def test_baseline_names() -> None:
    assert baseline_names(["linear", "cubic", "nearest", "zero_filled", "trilinear"]) == [
        "trilinear", "tricubic", "nearest", "zero_filled",
    ]
    with pytest.raises(ValueError, match="unknown method"):
        baseline_names(["bicubic_magic"])


def test_evaluate_library_on_phantoms(tmp_path: Path) -> None:
    refs = [Reference(name=f"s{i}", hr=phantom_hr(seed=i)) for i in range(2)]
    identity = CheckpointMethod(name="identity", net=nn.Identity(), input_interpolation="linear")
    result = evaluate(
        refs, ["nearest", "linear", "cubic", "zero_filled"], [identity], factors=(2, 2, 1),
        perceptual=["niqe", "piqe", "ma", "pi"], panel_dir=tmp_path / "panels",
    )
    methods = ["nearest", "trilinear", "tricubic", "zero_filled", "identity"]
    assert list(result.summary) == methods
    # Per subject: exactly slice_metrics of the degraded volume (SPEC protocol), averaged.
    hr0 = refs[0].hr
    expected = slice_metrics(degrade(hr0, (2, 2, 1), "cubic"), hr0, axis=2)
    row = next(r for r in result.rows if r["subject"] == "s0" and r["method"] == "tricubic")
    assert row["psnr"] == pytest.approx(expected["psnr"]) and row["ssim"] == pytest.approx(expected["ssim"])
    # A checkpoint that returns its input sees the same linear LR, normalised and restored.
    for key in ("psnr", "ssim", "nrmse"):
        assert result.summary["identity"][key] == pytest.approx(result.summary["trilinear"][key], rel=1e-5)
    assert result.summary["nearest"]["n_subjects"] == 2
    # Perceptual: PIQE for every method and the HR; NIQE cannot run on 28x30 slices; Ma, PI stated.
    assert set(result.perceptual) == {*methods, "HR"}
    assert all("piqe" in s and "niqe" not in s for s in result.perceptual.values())
    text = " ".join(result.statements)
    assert "Ma (NRQM): cannot be computed offline" in text and "PI: cannot be computed offline" in text
    assert "NIQE: not computed" in text
    # Segmentation: the stand-in, one row per method.
    assert set(result.segmentation) == set(methods)
    assert result.segmentation["identity"]["dice"][0] == pytest.approx(result.segmentation["trilinear"]["dice"][0])
    assert all(0.0 < s["dice"][0] <= 1.0 for s in result.segmentation.values())
    assert [Path(p).name for p in result.panels] == ["s0.png", "s1.png"] and all(Path(p).stat().st_size > 0 for p in result.panels)

    report = markdown_report(result)
    assert "| trilinear |" in report and "stand-in" in report and "HighRes3DNet" in report
    files = write_outputs(result, tmp_path / "out")
    with open(files["per_subject_csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (len(methods) + 1)  # + the HR's perceptual row per subject
    with open(files["summary_csv"]) as fh:
        summary = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(summary["nearest"]["psnr"]) == pytest.approx(result.summary["nearest"]["psnr"])
    payload = json.loads(Path(files["json"]).read_text())
    assert payload["means"]["zero_filled"]["psnr"] == pytest.approx(result.summary["zero_filled"]["psnr"])
    assert payload["perceptual_availability"]["ma"] is not None
    assert "stand-in" in payload["segmentation"]["label"]
    assert Path(files["report"]).read_text().startswith("### Reference metrics")


def test_checkpoint_methods_read_names_and_interpolation(tmp_path: Path) -> None:
    run = tmp_path / "myrun" / "checkpoints"
    run.mkdir(parents=True)
    a = write_tiny_checkpoint(run / "last.ckpt", datamodule_hyper_parameters={"interpolation": "cubic", "factors": [2, 2, 1]})
    b = write_tiny_checkpoint(tmp_path / "last.ckpt")
    methods = checkpoint_methods([a, b])
    assert [m.name for m in methods] == ["myrun/last", "last"]
    assert [m.input_interpolation for m in methods] == ["cubic", "linear"]
    forced = checkpoint_methods([a, a], input_interpolation="zero_filled", names=["x", "x"])
    assert [m.name for m in forced] == ["x", "x#2"] and forced[0].input_interpolation == "zero_filled"


def test_eval_cli_on_files_with_a_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    f1, f2 = write_phantom(tmp_path / "a.nii.gz", 0), write_phantom(tmp_path / "b.nii.gz", 1)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        monkeypatch, capsys, eval_cli,
        f"inputs=[{f1},{f2}]", "methods=[trilinear,zero_filled]", f"ckpts=[{ckpt}]", "ckpt_names=[tiny]",
        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", "perceptual=[piqe,ma,pi]", "patches.size=16",
    )
    assert code == 0, err
    means = json.loads(stdout.strip().splitlines()[-1])
    assert list(means) == ["trilinear", "zero_filled", "tiny"]
    assert set(means["tiny"]) == {"psnr", "ssim", "nrmse"}
    assert "| zero_filled |" in stdout and "Ma (NRQM): cannot be computed offline" in stdout
    for name in ("report.md", "per_subject.csv", "summary.csv", "results.json", "panels/a.png", "panels/b.png"):
        assert (out / name).is_file(), name


def test_eval_cli_bad_requests(tmp_path: Path, monkeypatch, capsys) -> None:
    run_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{tmp_path / 'missing.nii.gz'}]", run_dir)
    assert code == 2 and err.strip() == f"mdcsrn-eval: error: {tmp_path / 'missing.nii.gz'}: no such file or folder"
    f1 = write_phantom(tmp_path / "a.nii.gz")
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{f1}]", "methods=[magic]", run_dir)
    assert code == 2 and "unknown method 'magic'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, run_dir)
    assert code == 2 and "inputs" in err
    (tmp_path / "bad.ckpt").write_text("nope")
    code, _, err = run_cli(monkeypatch, capsys, eval_cli, f"inputs=[{f1}]", f"ckpts=[{tmp_path / 'bad.ckpt'}]", run_dir)
    assert code == 2 and str(tmp_path / "bad.ckpt") in err


def test_eval_cli_on_a_data_config_test_split(tmp_path: Path, monkeypatch, capsys) -> None:
    """data=embedded: the template's test slab (2 mm), degraded whole and cut, as in training."""
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        monkeypatch, capsys, eval_cli,
        "data=embedded", "data.source.resolution=2", "data.source.num_slabs=4", "data.patch_size=8",
        f"data.split_file={tmp_path / 'split.json'}", f"paths.log_dir={tmp_path / 'logs'}",
        "methods=[nearest,trilinear]", "perceptual=[]", "segmentation=false", "panels=false",
        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert code == 0, err
    means = json.loads(stdout.strip().splitlines()[-1])
    assert means["trilinear"]["psnr"] > means["nearest"]["psnr"]
    payload = json.loads((out / "results.json").read_text())
    from mdcsrn_lightning.data.split import read_split

    test_names = read_split(tmp_path / "split.json")["test"]
    assert test_names and sorted({r["subject"] for r in payload["per_subject"]}) == sorted(test_names)


def test_references_from_files_checks_every_file_first(tmp_path: Path) -> None:
    good = write_phantom(tmp_path / "good.nii.gz")
    (tmp_path / "bad.nii.gz").write_text("x")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        references_from_files([good, tmp_path / "bad.nii.gz"])
    refs = references_from_files([good])
    assert refs[0].name == "good" and refs[0].hr.shape == (28, 30, 16)


@pytest.mark.slow
def test_mni152_baselines_reproduce_spec(tmp_path: Path, monkeypatch, capsys) -> None:
    """`mdcsrn-eval inputs=[<MNI152 template>] methods=[...]` lands within 0.3 dB of SPEC."""
    from mdcsrn_lightning.data.sources import mni152_template_path

    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        monkeypatch, capsys, eval_cli,
        f"inputs=[{mni152_template_path()}]", "methods=[nearest,trilinear,tricubic,zero_filled]",
        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert code == 0, err
    means = json.loads(stdout.strip().splitlines()[-1])
    assert list(means) == list(SPEC_PSNR)
    for method, psnr in SPEC_PSNR.items():
        assert abs(means[method]["psnr"] - psnr) < 0.3, (method, means[method]["psnr"])
    assert means["zero_filled"]["ssim"] == pytest.approx(0.919, abs=0.01)
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["perceptual"]["HR"]) >= {"piqe"}
    assert (out / "panels" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.png").is_file()
    assert set(BASELINES) == set(SPEC_PSNR)


def test_eval_of_a_run_reproduces_its_metrics_json(train_cfg, tmp_path: Path, monkeypatch, capsys) -> None:
    """mdcsrn-eval on a training run's test split reports the numbers the run wrote.

    A slab of the embedded template is scored on the whole template's intensity scale in
    both (its own 99.9th percentile would shift every PSNR).
    """
    from hydra.core.global_hydra import GlobalHydra

    from mdcsrn_lightning.cli.train import train
    from tests.conftest import TINY

    cfg = train_cfg()
    train(cfg)
    run = Path(cfg.paths.output_dir)
    written = json.loads((run / "metrics.json").read_text())
    GlobalHydra.instance().clear()
    data = [o for o in TINY if o.startswith("data.") and not o.startswith(("data.samples", "data.batch", "data.queue"))]
    code, stdout, err = run_cli(
        monkeypatch, capsys, eval_cli,
        "data=embedded", *data, f"data.split_file={run / 'split.json'}", f"ckpts=[{written['checkpoint']}]",
        "ckpt_names=[model]", "methods=[trilinear]", "perceptual=[]", "segmentation=false", "panels=false",
        f"output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert code == 0, err
    means = json.loads(stdout.strip().splitlines()[-1])
    for method in ("model", "trilinear"):
        for metric in ("psnr", "ssim", "nrmse"):
            assert means[method][metric] == pytest.approx(written["methods"][method][metric], rel=1e-4), (method, metric)
