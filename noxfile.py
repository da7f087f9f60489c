"""Sessions: `nox -s tests` (the suite), `nox -s demo` (the quickstart, L1 then GAN, on the embedded data),
`nox -s gpu` (the GPU check: one markdown table; skipped with its reason where no CUDA GPU is visible).

Torch: `MDCSRN_TORCH` picks the torch requirement (default `torch==2.13.0`; on a machine whose
pip finds a local CPU wheel of it, that wheel, otherwise PyPI's build for the platform, CUDA
on Linux). Set e.g. `MDCSRN_TORCH="torch>=2.4"` to take what pip resolves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("MDCSRN_TORCH", "torch==2.13.0")


def install(session: nox.Session, extras: str = "") -> None:
    # torch first, so the package's `torch>=2.4` is already met and pulls nothing bigger
    session.install(TORCH)
    session.install("-e", f".{extras}")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (slow end-to-end tests included; `-- -m "not slow"` to skip them)."""
    install(session, "[test]")
    # -s: after an OpenVINO model conversion, pytest's own captured-stderr buffer ends up closed
    # and a later in-process CLI test kills the session ("lost sys.stderr"); with capture off
    # every test passes (capsys/capfd still capture where a test asserts on output)
    session.run("pytest", "-q", "-ra", "-s", *session.posargs, env={"WANDB_SILENT": "true"})


@nox.session
def demo(session: nox.Session) -> None:
    """The quickstart on the embedded MNI152 data: L1 training, then WGAN-GP fine-tuning (CPU)."""
    install(session)
    run_dir = Path("logs", "demo", time.strftime("%Y-%m-%d_%H-%M-%S"))
    l1_dir, gan_dir = run_dir / "quickstart", run_dir / "quickstart_gan"
    session.run("mdcsrn-train", "experiment=quickstart", f"hydra.run.dir={l1_dir}", *session.posargs)
    best = sorted((l1_dir / "checkpoints").glob("epoch_*.ckpt"))[-1]
    session.run(
        "mdcsrn-train", "experiment=quickstart_gan", f"module.init_ckpt={best}", f"hydra.run.dir={gan_dir}",
        *session.posargs,
    )
    session.log(f"L1 model: {l1_dir} (metrics.json, panels/, checkpoints/); GAN fine-tuning: {gan_dir}")


@nox.session
def gpu(session: nox.Session) -> None:
    """The GPU check (`python -m mdcsrn_lightning.benchmark.gpu_check`): bf16-mixed, torch.compile and
    1-device DDP fits, the inference engines and the exact streamed pass, b4u4/b8u4 on a 320x320x256
    volume (every inference run an inferer of `build_inferer(net, InferenceOptions(...))`) and
    training steps at batch 6 of 40^3; one markdown table (its budget: docs/performance.md). Arguments after
    `--` go to the check (e.g. `nox -s gpu -- --table gpu.md --repeats 3`). Without a CUDA GPU the
    session is skipped with the reason (not a failure); `-- --device cpu --tiny` dry-runs it."""
    install(session)
    module = ("python", "-m", "mdcsrn_lightning.benchmark.gpu_check")
    if "--device" not in session.posargs:
        found = session.run(*module, "--detect", silent=True, success_codes=[0, 77]) or ""
        if not str(found).startswith("cuda:"):
            session.skip(str(found).strip() or "no CUDA GPU")
        session.log(str(found).strip())
    session.run(*module, *session.posargs)
