"""``trainer.precision=auto``: bf16-mixed where the machine runs bfloat16 natively, else 32-true."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.training import precision as prec
from mdcsrn_lightning.training.precision import resolve_precision


def _cpu(monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx: bool, onednn: bool = True) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", 32, "64-true"])
def test_an_explicit_precision_is_never_changed(explicit, monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, avx512_bf16=True, amx=True)
    assert resolve_precision(explicit, "cpu") == (explicit, "set explicitly")


@pytest.mark.parametrize(
    "avx512_bf16,amx,onednn,expected,reason",
    [
        (True, False, True, "bf16-mixed", "AVX-512 BF16"),
        (False, True, True, "bf16-mixed", "AMX"),
        (False, False, True, "32-true", "emulated"),
        (True, True, False, "32-true", "no oneDNN"),
    ],
)
def test_auto_on_cpu_follows_native_bf16(avx512_bf16, amx, onednn, expected, reason, monkeypatch) -> None:
    _cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, onednn=onednn)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("cpu", "auto"):  # auto without a GPU is the CPU
        chosen, why = resolve_precision("auto", accelerator)
        assert chosen == expected and reason in why


@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_cuda_asks_for_native_bf16(native, expected, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: dict[str, object] = {}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked["including_emulation"] = including_emulation
        return native if not including_emulation else True  # emulation "supports" it everywhere

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 0) if native else (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    for accelerator in ("gpu", "cuda", "auto"):
        chosen, why = resolve_precision("auto", accelerator)
        assert chosen == expected and "Some GPU" in why
    assert asked["including_emulation"] is False
    assert resolve_precision("auto", "mps")[0] == "32-true"


def test_default_trainer_is_auto(train_cfg) -> None:
    for group in ("cpu", "gpu", "ddp"):
        assert train_cfg(f"trainer={group}", tiny=False).trainer.precision == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_mdcsrn_train_resolves_auto_logs_why_and_resumes(native, train_cfg, monkeypatch, caplog) -> None:
    # the capability check decides; the run trains, logs one line, and its last.ckpt resumes
    # under the other precision (bf16-mixed keeps float32 weights and optimizer state)
    monkeypatch.setattr(prec, "cpu_bf16_support", lambda: (native, "stubbed capability"))
    caplog.set_level(logging.INFO)
    first = train_cfg("test=false", run="first")
    metrics = train(first)
    expected = "bf16-mixed" if native else "32-true"
    assert first.trainer.precision == expected
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    lines = [r.getMessage() for r in caplog.records if "trainer.precision=auto" in r.getMessage()]
    assert lines == [f"trainer.precision=auto -> {expected}: stubbed capability (set trainer.precision=32-true to override)"]
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["state_dict"].values())

    other = "32-true" if native else "bf16-mixed"
    second = train_cfg("test=false", "trainer.max_epochs=2", f"ckpt_path={last}", f"trainer.precision={other}", run="second")
    train(second)
    assert second.trainer.precision == other
    resumed = torch.load(Path(second.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert (resumed["global_step"], resumed["epoch"]) == (4, 1)


def test_validation_and_test_score_the_float32_model_under_bf16_autocast() -> None:
    # Lightning runs validation/test inside the precision plugin's autocast; the scores (and the
    # checkpoint chosen by them) must be those of the model as mdcsrn-infer runs it: float32
    import torchio as tio

    from mdcsrn_lightning.models import MDCSRN
    from mdcsrn_lightning.training.l1_module import L1Module

    torch.manual_seed(0)
    module = L1Module(MDCSRN(1, 2, 4), optimizer=torch.optim.Adam, metric_axis=2).eval()
    lr = torch.rand(1, 1, 12, 12, 12)
    batch = {"lr": {tio.DATA: lr}, "hr": {tio.DATA: (lr + 0.05).clamp(0, 1)}}
    with torch.no_grad():
        expected = module.net(lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = module.net(lr)
            rows, _, sr = module._evaluate_batch(batch)
    assert sr.dtype == torch.float32 and torch.equal(sr, expected)
    assert (bf16.float() - expected).abs().max() > 1e-4  # autocast would have changed the scores
    assert rows[0]["mse"] == pytest.approx(float(((expected - batch["hr"][tio.DATA]) ** 2).mean()), rel=1e-6)
