"""WGAN-GP module: schedule in the loop, counters in checkpoints, init from L1, DDP, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchio as tio
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from mdcsrn_lightning.checkpoints import CheckpointError
from mdcsrn_lightning.models.discriminator import Discriminator3D
from mdcsrn_lightning.models.mdcsrn import MDCSRN
from mdcsrn_lightning.training.gan_schedule import GanSchedule, next_update
from mdcsrn_lightning.training.wgan_module import WGANGPModule

from .conftest import TINY

NET_CONFIG = {
    "_target_": "mdcsrn_lightning.models.mdcsrn.MDCSRN",
    "num_blocks": 1,
    "units_per_block": 2,
    "growth_rate": 4,
    "reconstruction": "direct",
    "global_residual": False,
    "memory_efficient": False,
}
# a critic small enough for 8^3 patches: 2 stride-2 convs, pooled to 1^3
TINY_D = ["module.discriminator.channels=[4,8]", "module.discriminator.pooled_size=1", "module.discriminator.dense_features=8"]
# end to end: C | CG | CG | CCG | CG | CCG ...; 4 slabs of the 2 mm template (1 per set),
# 3 batches of 2 patches per epoch, full epochs (the queue is drained at every epoch end)
E2E = [
    "loss=wgan_gp",
    *TINY_D,
    "module.critic_warmup_steps=1",
    "module.critic_per_generator=1",
    "module.burst_every=2",
    "module.burst_steps=1",
    "data.source.num_slabs=4",
    "data.samples_per_volume=6",
    "data.queue_length=12",
    "trainer.limit_train_batches=null",
]


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def make_module(**kwargs) -> WGANGPModule:
    torch.manual_seed(0)
    args = {
        "net": MDCSRN(num_blocks=1, units_per_block=2, growth_rate=4),
        "discriminator": Discriminator3D(channels=(4, 8), pooled_size=1, dense_features=8),
        "optimizer": adam(1e-3),
        "critic_optimizer": adam(1e-3),
        "net_config": dict(NET_CONFIG),
        "critic_warmup_steps": 3,
        "critic_per_generator": 2,
        "burst_every": 2,
        "burst_steps": 1,
        "max_generator_steps": 1000,
        "metric_axis": 2,  # no data module here to take the slice axis from
    }
    args.update(kwargs)
    if "init_ckpt" not in args:
        args["init_ckpt"] = None
    with pytest.warns(UserWarning, match="init_ckpt is null") if args["init_ckpt"] is None else nullcontext():
        return WGANGPModule(**args)


class Patches(Dataset):
    """Random (lr, hr) pairs of size^3 in TorchIO's batch layout."""

    def __init__(self, n: int, size: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.hr = torch.rand(n, 1, size, size, size, generator=g)
        self.lr = self.hr + 0.1 * torch.randn(n, 1, size, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.hr)

    def __getitem__(self, i: int):
        return {"lr": {tio.DATA: self.lr[i]}, "hr": {tio.DATA: self.hr[i]}}


def fit(module: WGANGPModule, batches: int, callbacks=(), val: int = 0, **trainer_kwargs) -> L.Trainer:
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 1.0 if val else 0,
        "num_sanity_val_steps": 0,
        "callbacks": list(callbacks),
    }
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    val_loader = DataLoader(Patches(val, size=12), batch_size=1) if val else None
    trainer.fit(module, DataLoader(Patches(2 * batches), batch_size=2), val_loader)
    return trainer


class GradientSpy(Callback):
    """Before every optimizer step: which optimizer, and which parameters hold gradients."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        opt_g, _ = trainer.optimizers
        kind = "generator" if optimizer is opt_g else "critic"
        g_grads = [p.grad is not None for p in pl_module.net.parameters()]
        d_grads = [p.grad is not None for p in pl_module.discriminator.parameters()]
        if kind == "critic":  # SR was computed without grad: the generator is not in the graph
            assert not any(g_grads) and all(d_grads)
        else:  # the critic's requires_grad was off: no critic weight gradients at all
            assert all(g_grads) and not any(d_grads)
        self.steps.append(kind)


# --------------------------------------------------------------------------- the loop
def test_updates_follow_the_schedule_one_per_step() -> None:
    module = make_module()
    spy = GradientSpy()
    trainer = fit(module, batches=14, callbacks=[spy])
    schedule = GanSchedule(3, 2, 2, 1)
    expected, c, g = [], 0, 0
    for _ in range(14):
        kind = next_update(c, g, schedule)
        expected.append(kind)
        c, g = (c + 1, g) if kind == "critic" else (c, g + 1)
    assert spy.steps == expected
    # CCC CCG CCG C CCG CCG -> 10 critic, 4 generator updates
    assert "".join(s[0].upper() for s in spy.steps) == "CCCCCGCCGCCCGC"
    assert (module.critic_steps, module.generator_steps) == (c, g) == (11, 3)
    assert trainer.global_step == 14  # Lightning counts the steps of both optimizers
    for key in ("train/d_loss", "train/gp", "train/g_loss", "train/l1", "train/adv", "train/critic_steps", "train/generator_steps"):
        assert key in trainer.callback_metrics, key
    assert trainer.callback_metrics["train/generator_steps"] == 3


def test_warmup_trains_the_critic_alone() -> None:
    """Critic-only steps change nothing of the generator: weights, BN running statistics, counters."""
    module = make_module(critic_warmup_steps=100)
    g0 = {k: v.clone() for k, v in module.net.state_dict().items()}
    assert any("running_mean" in k for k in g0) and any("num_batches_tracked" in k for k in g0)
    d0 = [p.detach().clone() for p in module.discriminator.parameters()]
    fit(module, batches=3)
    assert (module.critic_steps, module.generator_steps) == (3, 0)
    assert module.net.state_dict().keys() == g0.keys()
    for k, v in g0.items():
        assert torch.equal(module.net.state_dict()[k], v), k
    assert any(not torch.equal(p, q) for p, q in zip(module.discriminator.parameters(), d0))


def test_generator_steps_still_update_its_batchnorm_statistics() -> None:
    """Only critic steps keep the buffers: the generator's own updates move them (C CG CG)."""
    module = make_module(critic_warmup_steps=1, critic_per_generator=1, burst_steps=0)
    tracked = [m for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    fit(module, batches=5)
    assert (module.critic_steps, module.generator_steps) == (3, 2)
    assert all(int(m.num_batches_tracked) == 2 for m in tracked)
    assert all(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in tracked)


def test_stops_at_max_generator_steps() -> None:
    module = make_module(critic_warmup_steps=1, critic_per_generator=1, burst_steps=0, max_generator_steps=2)
    trainer = fit(module, batches=20, max_epochs=3)
    assert (module.critic_steps, module.generator_steps) == (3, 2)  # C CG CG, then stop
    assert trainer.global_step == 5 and trainer.should_stop


def test_bf16_mixed_on_cpu() -> None:
    module = make_module(critic_warmup_steps=1, critic_per_generator=1, burst_steps=0)
    trainer = fit(module, batches=5, precision="bf16-mixed")
    assert (module.critic_steps, module.generator_steps) == (3, 2)  # C CG CG
    for key in ("train/d_loss", "train/gp", "train/g_loss"):
        value = trainer.callback_metrics[key]
        assert torch.isfinite(value), key
    assert trainer.callback_metrics["train/gp"].dtype == torch.float32


# --------------------------------------------------------------------------- checkpoints
def test_counters_are_saved_and_restored() -> None:
    module = make_module()
    module.critic_steps, module.generator_steps = 12345, 678
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["gan_schedule"] == {"critic_steps": 12345, "generator_steps": 678}
    assert ckpt["net_config"] == NET_CONFIG
    other = make_module()
    other.on_load_checkpoint(ckpt)
    assert (other.critic_steps, other.generator_steps) == (12345, 678)


def test_rng_states_roundtrip_and_restore_only_when_fitting() -> None:
    import random

    from mdcsrn_lightning.training.rng_state import get_rng_states, set_rng_states

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    states = get_rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(4), np.random.seed(4), random.seed(4)
    set_rng_states(states)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]

    module = make_module()
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert "rng_states" in ckpt
    before = torch.get_rng_state()
    module.on_load_checkpoint(ckpt)  # no trainer fitting: counters only, the RNGs stay
    assert torch.equal(torch.get_rng_state(), before)


def _l1_checkpoint(path: Path, net: MDCSRN, config: dict) -> Path:
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "net_config": config}, path)
    return path


def test_init_from_l1_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5)
    pretrained = MDCSRN(num_blocks=1, units_per_block=2, growth_rate=4)
    ckpt = _l1_checkpoint(tmp_path / "l1.ckpt", pretrained, dict(NET_CONFIG))
    module = make_module(init_ckpt=str(ckpt))
    for k, v in pretrained.state_dict().items():
        assert torch.equal(module.net.state_dict()[k], v)
        assert torch.equal(module.l1_net.state_dict()[k], v)  # the frozen L1 copy
    assert not any(p.requires_grad for p in module.l1_net.parameters())
    module.train()
    assert module.net.training and not module.l1_net.training


def test_init_ckpt_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        make_module(init_ckpt=str(tmp_path / "missing.ckpt"))
    other = {**NET_CONFIG, "growth_rate": 8}
    ckpt = _l1_checkpoint(tmp_path / "k8.ckpt", MDCSRN(num_blocks=1, units_per_block=2, growth_rate=8), other)
    with pytest.raises(CheckpointError, match="another architecture.*growth_rate"):
        make_module(init_ckpt=str(ckpt))


def test_ddp_ignores_exactly_the_critic_and_the_frozen_copy() -> None:
    module = make_module()
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert ignored <= names
    assert ignored == {n for n in names if n.startswith(("discriminator.", "l1_net."))}
    assert any(n.startswith("net.") for n in names - ignored)


# --------------------------------------------------------------------------- validation
def test_em_distance_crops() -> None:
    module = make_module(em_patch_size=6, em_crops=3)
    hr = torch.rand(1, 1, 10, 9, 4)
    seen = []
    real_forward = module.discriminator.forward

    def spy(x):
        seen.append(tuple(x.shape))
        return real_forward(x)

    module.discriminator.forward = spy
    module.eval()
    assert module.em_distance(hr, hr.clone()) == pytest.approx(0.0, abs=1e-6)
    assert seen == [(6, 1, 6, 6, 4)]  # 3 crops of HR and 3 of SR, clamped to the depth 4
    starts = module._crop_starts((10, 9, 4), (6, 6, 4), index=7)
    assert starts[0] == (2, 1, 0) and starts == module._crop_starts((10, 9, 4), (6, 6, 4), index=7)
    sr = torch.zeros_like(hr)
    assert module.em_distance(hr, sr) != 0.0
    big = make_module(discriminator=Discriminator3D(channels=(2, 2, 2), pooled_size=2, dense_features=4))
    with pytest.raises(ValueError, match="minimum input 9"):
        big.em_distance(hr, sr)


def test_validation_logs_em_distance_and_the_monitor(tmp_path: Path) -> None:
    class Record(Callback):
        def __init__(self) -> None:
            self.seen: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            m = trainer.callback_metrics
            self.seen.append({k: float(m[k]) for k in ("val/em_distance", "val/em_distance_gan", "val/psnr")})
            self.seen[-1]["generator_steps"] = pl_module.generator_steps

    record = Record()
    # epoch 0: C C (warm-up only), epoch 1: C G
    module = make_module(critic_warmup_steps=2, critic_per_generator=1, em_patch_size=8, em_crops=2)
    fit(module, batches=2, val=1, max_epochs=2, callbacks=[record], default_root_dir=tmp_path)
    warmup, gan = record.seen
    assert (warmup["generator_steps"], gan["generator_steps"]) == (0, 1)
    assert np.isfinite(warmup["val/em_distance"])
    assert warmup["val/em_distance_gan"] == float("inf")  # warm-up only: not a candidate
    assert gan["val/em_distance_gan"] == gan["val/em_distance"]
    assert (tmp_path / "panels" / "val_epoch001.png").is_file()  # LR | SR | GAN-SR | HR | error


# --------------------------------------------------------------------------- configs
def test_configs_compose(train_cfg) -> None:
    cfg = train_cfg("loss=wgan_gp", tiny=False)
    m = cfg.module
    assert m._target_ == "mdcsrn_lightning.training.wgan_module.WGANGPModule"
    assert m.discriminator._target_.endswith("Discriminator3D")
    assert (m.critic_warmup_steps, m.critic_per_generator, m.burst_every, m.burst_steps) == (10000, 5, 500, 200)
    assert (m.max_generator_steps, m.adversarial_weight, m.gp_weight) == (200000, 0.1, 10.0)
    assert OmegaConf.is_missing(m, "init_ckpt")  # the paper starts from an L1 checkpoint
    assert train_cfg("loss=wgan_gp", "module.init_ckpt=null", tiny=False).module.init_ckpt is None
    assert m.optimizer.lr == 5e-6 and m.optimizer._partial_
    assert cfg.callbacks.model_checkpoint.monitor == "val/em_distance_gan" and cfg.callbacks.model_checkpoint.mode == "min"

    q = train_cfg("experiment=quickstart_gan", tiny=False)
    assert q.module._target_.endswith("WGANGPModule")
    # the GAN quickstart starts from the released L1 weights unless given a checkpoint
    from mdcsrn_lightning.release import RELEASED_WEIGHTS

    assert q.module.init_ckpt == str(RELEASED_WEIGHTS)
    assert q.module.critic_warmup_steps < 100 and q.module.max_generator_steps <= 50
    assert list(q.module.discriminator.channels) == [16, 32, 64, 128]
    # the quickstart's data and generator, so that its checkpoint fits
    base = train_cfg("experiment=quickstart", tiny=False)
    assert q.model == base.model and q.data.patch_size == base.data.patch_size
    d = Discriminator3D(**{k: v for k, v in OmegaConf.to_container(q.module.discriminator).items() if k != "_target_"})
    assert d.min_input_size <= q.data.patch_size


def test_em_distance_is_measured_on_the_critics_patch_size(train_cfg) -> None:
    """val/em_distance crops follow data.patch_size (the critic's training patches), an int or 3 ints."""
    from mdcsrn_lightning.cli.train import build_module

    for patch, expected in (("40", (40, 40, 40)), ("[24,24,16]", (24, 24, 16))):
        cfg = train_cfg("loss=wgan_gp", "module.init_ckpt=null", f"data.patch_size={patch}", tiny=False)
        assert OmegaConf.to_container(cfg.module, resolve=True)["em_patch_size"] == OmegaConf.to_container(
            cfg.data, resolve=True
        )["patch_size"]
        with pytest.warns(UserWarning, match="init_ckpt is null"):
            module = build_module(cfg, MDCSRN(num_blocks=1, units_per_block=2, growth_rate=4))
        assert module.em_patch_size == expected
        # plain data in the hparams: checkpoints load with weights_only
        assert type(module.hparams["em_patch_size"]) in (int, list)
    q = train_cfg("experiment=quickstart_gan", tiny=False)
    assert OmegaConf.to_container(q.module, resolve=True)["em_patch_size"] == q.data.patch_size == 24


def test_em_distance_crops_of_an_anisotropic_patch() -> None:
    module = make_module(em_patch_size=[6, 8, 4])
    seen = []
    real_forward = module.discriminator.forward
    module.discriminator.forward = lambda x: seen.append(tuple(x.shape)) or real_forward(x)
    module.eval()
    module.em_distance(torch.rand(1, 1, 10, 9, 12), torch.rand(1, 1, 10, 9, 12))
    assert seen == [(2, 1, 6, 8, 4)]
    with pytest.raises(ValueError, match="em_patch_size must be an int >= 1 or 3 ints"):
        WGANGPModule(net=module.net, discriminator=module.discriminator, optimizer=adam(1e-3),
                     critic_optimizer=adam(1e-3), em_patch_size=[6, 8])


# --------------------------------------------------------------------------- end to end
def _weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_cli_wgan_gp_from_l1_checkpoint(train_cfg, tmp_path: Path) -> None:
    from mdcsrn_lightning.cli.train import train

    l1 = train_cfg("data.source.num_slabs=4", "test=false", run="l1")
    train(l1)
    l1_ckpt = Path(l1.paths.output_dir) / "checkpoints" / "last.ckpt"

    cfg = train_cfg(*E2E, f"module.init_ckpt={l1_ckpt}", "trainer.max_epochs=2", run="gan")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    for key in ("val/em_distance", "val/em_distance_gan", "val/psnr", "val/ssim", "train/d_loss", "train/g_loss", "test/psnr", "test/em_distance"):
        assert key in metrics, key
    assert metrics["val/em_distance_gan"] == metrics["val/em_distance"]  # the generator was trained
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    c, g = last["gan_schedule"]["critic_steps"], last["gan_schedule"]["generator_steps"]
    assert c + g == last["global_step"] > 0 and g > 0
    assert list((out / "checkpoints").glob("epoch_*.ckpt")), "best checkpoint by val/em_distance"
    assert (out / "panels" / "test.png").is_file() and (out / "panels" / "val_epoch000.png").is_file()
    # the frozen L1 copy is the L1 run's generator
    l1_net = _weights(l1_ckpt, "net.")
    frozen = _weights(out / "checkpoints" / "last.ckpt", "l1_net.")
    assert all(torch.equal(frozen["l1_" + k], v) for k, v in l1_net.items())


@pytest.mark.slow
def test_resume_is_exact(train_cfg) -> None:
    """2 epochs in one go == 1 epoch, then resumed from last.ckpt for the second."""
    from mdcsrn_lightning.cli.train import train

    # save_top_k=-1: Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint is written
    common = [*E2E, "module.init_ckpt=null", "test=false", "callbacks.model_checkpoint.save_top_k=-1"]
    whole = train_cfg(*common, "trainer.max_epochs=2", run="whole")
    train(whole)
    first = train_cfg(*common, "trainer.max_epochs=1", run="first")
    train(first)
    last_first = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    second = train_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={last_first}", run="second")
    train(second)

    a = torch.load(Path(whole.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(Path(second.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["gan_schedule"] == b["gan_schedule"] == {"critic_steps": 4, "generator_steps": 2}
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "mdcsrn_lightning.cli.train", *TINY, *E2E, "module.init_ckpt=null", "test=false",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    c, g = last["gan_schedule"]["critic_steps"], last["gan_schedule"]["generator_steps"]
    assert g > 0 and c + g == last["global_step"]


DDP_SCRIPT = """
import functools, os, torch, torch.distributed as dist
import lightning as L
import numpy as np
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset
from mdcsrn_lightning.models.discriminator import Discriminator3D
from mdcsrn_lightning.models.mdcsrn import MDCSRN
from mdcsrn_lightning.training.callbacks import DistributedTeardown
from mdcsrn_lightning.training.wgan_module import WGANGPModule

class Batches(TensorDataset):
    def __getitem__(self, i):
        lr, hr = super().__getitem__(i)
        return {"lr": {"data": lr}, "hr": {"data": hr}}

class Check(Callback):
    def on_train_end(self, trainer, m):
        lines = []
        for name, mod in (("generator", m.net), ("critic", m.discriminator)):
            flat = torch.cat([p.detach().flatten() for p in mod.parameters()])
            out = [torch.zeros_like(flat) for _ in range(2)]
            dist.all_gather(out, flat)
            lines.append(f"rank{trainer.global_rank} {name} same={torch.equal(out[0], out[1])}")
        lines.append(f"rank{trainer.global_rank} steps={m.critic_steps},{m.generator_steps},{trainer.global_step}")
        # one file per rank: the two processes' stdout lines can interleave
        with open(f"result_rank{trainer.global_rank}.txt", "w") as fh:
            fh.write("\\n".join(lines) + "\\n")

torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # different initial weights per process
adam = functools.partial(torch.optim.Adam, lr=1e-2)
module = WGANGPModule(
    net=MDCSRN(1, 2, 4), discriminator=Discriminator3D(channels=(4, 8), pooled_size=1, dense_features=8),
    optimizer=adam, critic_optimizer=adam, critic_warmup_steps=1, critic_per_generator=1, burst_every=2, burst_steps=1,
)
hr = torch.rand(16, 1, 8, 8, 8)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[Check(), DistributedTeardown()],
)
trainer.fit(module, DataLoader(Batches(hr + 0.1 * torch.randn_like(hr), hr), batch_size=2, shuffle=True))
"""


@pytest.mark.slow
def test_ddp_keeps_both_networks_in_sync(tmp_path: Path) -> None:
    """Plain ddp (no find_unused_parameters); each process starts from other weights and sees other data."""
    script = tmp_path / "ddp_gan.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(line for f in tmp_path.glob("result_rank*.txt") for line in f.read_text().splitlines())
    # 16 samples, 2 processes, batch 2: 4 updates in each, C CG C
    assert results == [
        "rank0 critic same=True", "rank0 generator same=True", "rank0 steps=3,1,4",
        "rank1 critic same=True", "rank1 generator same=True", "rank1 steps=3,1,4",
    ], proc.stdout[-3000:]
