"""The GPU check (`nox -s gpu`): its CPU dry run at toy sizes, its table, its exit statuses."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from mdcsrn_lightning.benchmark import gpu_check
from mdcsrn_lightning.benchmark.gpu_check import SKIPPED, main

ROOT = Path(__file__).resolve().parents[1]


def _table_rows(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| check | status | figure |"
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]]


def test_without_a_gpu_it_says_why_and_runs_nothing(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_checks", lambda *a, **k: pytest.fail("ran checks without a GPU"))
    assert main([]) == SKIPPED == 77
    out = capsys.readouterr().out
    assert out.startswith("gpu check skipped: ") and ("CPU-only build" in out or "sees no CUDA GPU" in out)
    assert main(["--detect"]) == SKIPPED


def test_a_failing_check_is_a_row_and_exit_1_while_the_others_still_run(monkeypatch, capsys, tmp_path) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check, "_stream_row", broken)
    code = main(["--device", "cpu", "--tiny", "--checks", "device,stream,volume", "--workdir", str(tmp_path)])
    rows = _table_rows(capsys.readouterr().out)
    assert code == 1
    by_check = {r[0]: r for r in rows}
    assert by_check["stream"][1:] == ["**FAIL**", "RuntimeError: CUDA error: an illegal memory access"]
    assert by_check["device"][1] == "ok" and "trainer.precision=auto -> " in by_check["device"][2]
    volume = [r for r in rows if r[0].startswith("volume b1u2 24x24x24")]
    assert [r[0].split(", ", 1)[1] for r in volume] == [
        "16³ patches, margin 3, fp32", "16³ patches, margin 3, bf16", "exact, streamed (slab 8)"]
    assert all(r[1] == "ok" and " s (min " in r[2] and "Mvox/s" in r[2] for r in volume)


def test_bad_arguments_are_one_line_errors(capsys) -> None:
    assert main(["--device", "cpu", "--tiny", "--checks", "device,warp"]) == 2
    assert "unknown check(s) ['warp']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        gpu_check.run_checks("cpu", tiny=True, checks=["device"], repeats=0)


def test_nox_has_a_gpu_session_that_skips_without_a_gpu() -> None:
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    sessions = {f.name: ast.get_source_segment((ROOT / "noxfile.py").read_text(), f)
                for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "gpu" in sessions and "mdcsrn_lightning.benchmark.gpu_check" in sessions["gpu"]
    assert "session.skip(" in sessions["gpu"] and "--detect" in sessions["gpu"]
    # the CI session does not run it
    assert "gpu_check" not in sessions["tests"]


@pytest.mark.slow
def test_cpu_dry_run_runs_every_check_and_prints_one_table(tmp_path, capsys) -> None:
    report = tmp_path / "rows.json"
    code = main(["--device", "cpu", "--tiny", "--workdir", str(tmp_path / "runs"), "--json", str(report),
                 "--table", str(tmp_path / "table.md")])
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    assert code == 0, out
    assert [r[:2] for r in _table_rows(out)] == [[r["check"], r["status"]] for r in rows]
    assert (tmp_path / "table.md").read_text() in out
    checks = [r["check"] for r in rows]
    expected = [
        "device", "fit bf16-mixed", "fit torch.compile", "fit DDP, 1 device",
        *[f"engine {e} (b1u2, 16³ block)" for e in ("reference", "torch", "compile", "onnxruntime", "openvino",
                                                   "channels_last", "bf16")],
        "stream exact (b1u2)",
        *[f"volume b1u2 24x24x24, {v}" for v in ("16³ patches, margin 3, fp32", "16³ patches, margin 3, bf16",
                                                 "exact, streamed (slab 8)")],
        *[f"train step b1u2, batch 1 of 16³, {s}" for s in ("reference", "torch", "channels_last", "bf16",
                                                              "channels_last+bf16")],
    ]
    assert checks == expected
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    detail = {r["check"]: r["detail"] for r in rows}
    # each fit trained every step asked for, in the precision asked for, with a finite loss
    for fit in ("fit bf16-mixed", "fit torch.compile", "fit DDP, 1 device"):
        assert detail[fit]["steps"] == 3 and len(detail[fit]["losses"]) == 3
    assert detail["fit bf16-mixed"]["precision"] == "bf16-mixed"
    assert detail["fit DDP, 1 device"]["precision"].endswith("(auto)")
    assert (tmp_path / "runs" / "fit_DDP__1_device" / "checkpoints" / "last.ckpt").is_file()
    # engines were compared with the reference; every timing ran
    assert detail["engine torch (b1u2, 16³ block)"]["max_abs_diff"] < 1e-5
    assert detail["engine compile (b1u2, 16³ block)"]["max_abs_diff"] < 1e-4
    assert detail["stream exact (b1u2)"]["max_abs_diff"] < 1e-5
    for check in expected[-8:]:
        assert detail[check]["seconds_median"] > 0
    assert detail["train step b1u2, batch 1 of 16³, bf16"]["patches_per_s"] > 0
