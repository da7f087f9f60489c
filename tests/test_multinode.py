"""Two "nodes" on localhost: `mdcsrn-train trainer=ddp trainer.num_nodes=2 trainer.devices=1`.

Each node is its own process, started as a user starts one per machine (``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``: Lightning's default environment) or by
``torchrun --nnodes=2``; gloo on CPU. Each rank writes ``<run>/ranks/rank<r>.json``
(``callbacks=[default,rank_record]``), which the tests read. Every launch is bounded by a
timeout that kills both processes, so a hang fails in minutes instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from mdcsrn_lightning.training.rank_record import tensor_digest
from mdcsrn_lightning.training.run_checks import RunConfigError, check_sync_batchnorm

from .conftest import TINY, compose_train

def multinode(test):
    """Two processes per launch: slow, and marked `multinode` (run by the default invocation)."""
    return pytest.mark.slow(pytest.mark.multinode(test))


# one launch of two processes (import ~5 s, a tiny fit ~5 s on 2 busy cores)
TIMEOUT_S = 240
# 6 slabs of the 2 mm template: 4 train (2 per rank), 1 val, 1 test; 2 batches of 2 per rank
# and epoch (the whole share, so each epoch sees every training subject once)
TWO_NODES = [
    *TINY, "data.split_fractions=[4,1,0,1]", "trainer.limit_train_batches=null", "test=false",
    "trainer=ddp", "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1",
    "callbacks=[default,rank_record]",
    # Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint is written
    "callbacks.model_checkpoint.save_top_k=-1",
]
# variables of other launchers that would make Lightning pick another cluster environment
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "NODE_RANK",
                  "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], cwd: Path,
                  timeout: float = TIMEOUT_S) -> list[str]:
    """Start every command at once, wait for all; on a failure or a timeout kill them all and fail
    with each one's output. Returns each process's output (stdout and stderr)."""
    logs = [cwd / f"process{i}.log" for i in range(len(commands))]
    procs = []
    for cmd, env, log in zip(commands, envs, logs):
        with open(log, "w") as fh:
            # own session: a kill reaches the process's children too (torchrun's workers)
            procs.append(subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    failed = ""
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            failed = f"timed out after {timeout:.0f} s"
            break
        if any(p.returncode not in (None, 0) for p in procs):
            time.sleep(20)  # let the other one report its side, then stop it
            failed = "a process failed"
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    if failed or any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- process {i} (rc {p.returncode}):\n{out[-3000:]}"
                           for i, (p, out) in enumerate(zip(procs, outputs)))
        pytest.fail(f"{failed or 'non-zero exit'}\n{report}")
    return outputs


def train_two_nodes(run_dir: Path, *overrides: str, cwd: Path) -> list[dict]:
    """`mdcsrn-train` once per node, NODE_RANK 0 and 1; returns the two rank records."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "mdcsrn_lightning.cli.train", *TWO_NODES, *overrides,
           f"hydra.run.dir={run_dir}", f"paths.cache_dir={cwd / 'cache'}"]
    envs = [clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r), WORLD_SIZE="2") for r in (0, 1)]
    run_processes([cmd, cmd], envs, cwd)
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def expected_shares(train: list[str], epoch: int, seed: int = 42) -> list[set[str]]:
    """Each rank's training subjects in ``epoch``, computed from torch's DistributedSampler directly."""
    shares = []
    for rank in (0, 1):
        sampler = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        shares.append({train[i] for i in sampler})
    return shares


def checkpoint_digests(path: Path) -> dict[str, dict[str, str]]:
    """The weights' digests as RankRecord computes them, from rank 0's checkpoint (an independent read)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    out: dict[str, dict[str, str]] = {}
    for child in sorted({k.split(".", 1)[0] for k in state}):
        keys = [k for k in state if k.startswith(child + ".")]
        # parameters are the floating, non-buffer entries; BN buffers end in running_*/num_batches_tracked
        buffers = [k for k in keys if k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")]
        params = [k for k in keys if k not in buffers]
        out[child] = {"parameters": tensor_digest([state[k] for k in params]),
                      "buffers": tensor_digest([state[k] for k in buffers])}
    return out


def test_tensor_digest_tells_values_dtype_and_shape_apart() -> None:
    a = torch.arange(6, dtype=torch.float32)
    assert tensor_digest([a]) == tensor_digest([a.clone()])
    assert tensor_digest([a]) != tensor_digest([a.reshape(2, 3)]) != tensor_digest([a.double()])
    b = a.clone()
    b[3] = torch.nextafter(b[3], torch.tensor(10.0))  # one ulp
    assert tensor_digest([a]) != tensor_digest([b])
    assert tensor_digest([torch.tensor(3)]) != tensor_digest([torch.tensor(4)])  # 0-dim buffers too


def test_rank_record_composes_beside_the_default_callbacks(tmp_path: Path) -> None:
    cfg = compose_train(["callbacks=[default,rank_record]", "trainer=ddp", "trainer.num_nodes=2"], tmp_path / "run")
    assert {"model_checkpoint", "last_checkpoint", "distributed_teardown", "rank_record"} <= set(cfg.callbacks)
    assert cfg.callbacks.rank_record.dirpath == str(tmp_path / "run" / "ranks")
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.sync_batchnorm) == ("ddp", 2, False)


def test_sync_batchnorm_is_refused_on_cpu_and_with_memory_efficient_units(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(RunConfigError, match=r"^trainer.sync_batchnorm=true: torch's SyncBatchNorm runs on GPUs only"):
        check_sync_batchnorm({"sync_batchnorm": True, "accelerator": "cpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunConfigError, match="GPUs only"):
        check_sync_batchnorm({"sync_batchnorm": True, "accelerator": "auto"})
    with pytest.raises(RunConfigError, match="model.memory_efficient=true"):
        check_sync_batchnorm({"sync_batchnorm": True, "accelerator": "gpu"}, {"memory_efficient": True})
    check_sync_batchnorm({"sync_batchnorm": True, "accelerator": "gpu"}, {"memory_efficient": False})
    check_sync_batchnorm({"sync_batchnorm": False, "accelerator": "cpu"}, {"memory_efficient": True})
    # the CLI refuses it with one line before anything is built
    proc = subprocess.run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.train", *TINY, "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.sync_batchnorm=true", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env=clean_env(), cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mdcsrn-train: error: trainer.sync_batchnorm=true: ")
    assert not (tmp_path / "run" / "checkpoints").exists()


@multinode
def test_two_nodes_split_subjects_agree_on_weights_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ranks = train_two_nodes(run, "trainer.max_epochs=2", cwd=tmp_path)
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    train = json.loads((run / "split.json").read_text())["train"]
    assert len(train) == 4
    shares = {}
    for epoch in ("0", "1"):
        drawn = [set(r["epochs"][epoch]["subjects"]) for r in ranks]
        assert drawn[0].isdisjoint(drawn[1]), (epoch, drawn)
        assert drawn[0] | drawn[1] == set(train), (epoch, drawn)
        assert drawn == expected_shares(train, int(epoch)), f"epoch {epoch}: set_epoch did not reach the sampler"
        # every rank took its 2 batches of 2 patches, samples_per_volume=2 from each of its 2 subjects
        assert [sum(r["epochs"][epoch]["patches"].values()) for r in ranks] == [4, 4]
        shares[epoch] = drawn
    assert shares["0"] != shares["1"], "the shares must be reshuffled between epochs"

    # DDP averages gradients: the same weights on both ranks, and the ones rank 0 saved;
    # BN running statistics are the same too (DDP broadcasts rank 0's buffers at every forward)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert set(ranks[0]["weights"]) == {"net"}
    last = run / "checkpoints" / "last.ckpt"
    assert checkpoint_digests(last)["net"] == ranks[0]["weights"]["net"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4

    # resume both nodes from last.ckpt into a new run folder, one more epoch
    resumed = train_two_nodes(tmp_path / "resumed", "trainer.max_epochs=3", f"ckpt_path={last}", cwd=tmp_path)
    for r in resumed:
        assert list(r["epochs"]) == ["2"] and r["epochs"]["2"]["first_step"] == 4
        assert r["global_step"] == 6 and len(r["epochs"]["2"]["losses"]) == 2
        assert set(r["epochs"]["2"]["subjects"]) == expected_shares(train, 2)[r["global_rank"]]
    assert resumed[0]["weights"] == resumed[1]["weights"] != ranks[0]["weights"]
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"]) == (6, 2)


@multinode
def test_two_nodes_wgan_gp_keep_generator_and_critic_in_sync(tmp_path: Path) -> None:
    from .test_wgan_module import TINY_D

    run = tmp_path / "gan"
    ranks = train_two_nodes(
        run, "loss=wgan_gp", *TINY_D, "module.init_ckpt=null", "module.critic_warmup_steps=1",
        "module.critic_per_generator=1", "module.burst_every=2", "module.burst_steps=1", "trainer.max_epochs=2",
        cwd=tmp_path,
    )
    assert {"net", "discriminator"} <= set(ranks[0]["weights"]) and ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    saved = checkpoint_digests(run / "checkpoints" / "last.ckpt")
    for child, digests in ranks[0]["weights"].items():
        assert digests["parameters"] == ranks[1]["weights"][child]["parameters"], child
        assert digests == saved[child], child
    # measured: here the generator's BN running statistics end different on the two ranks
    # (with loss=l1 they ended equal); last.ckpt holds rank 0's, as asserted above
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    c, g = ckpt["gan_schedule"]["critic_steps"], ckpt["gan_schedule"]["generator_steps"]
    # 2 batches per epoch and rank, 2 epochs: C | CG | C (critic first, then 1:1 with bursts)
    assert ckpt["global_step"] == c + g == 4 and g >= 1
    for r in ranks:
        assert [set(e["subjects"]) for e in r["epochs"].values()] == [
            expected_shares(json.loads((run / "split.json").read_text())["train"], e)[r["global_rank"]] for e in (0, 1)
        ]


@multinode
def test_torchrun_two_nodes_on_localhost(tmp_path: Path) -> None:
    """The README's torchrun command, once per node (static rendezvous on node 0's address)."""
    port = str(free_port())
    run = tmp_path / "torchrun"
    cmds = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
         "--master_addr=127.0.0.1", f"--master_port={port}",
         "-m", "mdcsrn_lightning.cli.train", *TWO_NODES, "trainer.max_epochs=1",
         f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}"]
        for r in (0, 1)
    ]
    run_processes(cmds, [clean_env(), clean_env()], tmp_path)
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert set(ranks[0]["epochs"]["0"]["subjects"]).isdisjoint(ranks[1]["epochs"]["0"]["subjects"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# The same L1 fit on one process (batch 4) and on two nodes (batch 2 each) from the same
# initial weights over the same items: each global batch of the two nodes holds exactly the
# one process's batch. With BatchNorm frozen (normalising with its running statistics, an
# affine map) DDP must reproduce the one-process fit to float precision; with BatchNorm in
# training mode each node normalises with its own half-batch statistics, the one difference.
EQUIVALENCE_SCRIPT = """# usage: python equivalence.py OUT_DIR NUM_NODES BATCH_PER_NODE batch|frozen [sync]
import functools, json, os, sys
import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from mdcsrn_lightning.models.mdcsrn import MDCSRN
from mdcsrn_lightning.training.callbacks import DistributedTeardown
from mdcsrn_lightning.training.l1_module import L1Module
from mdcsrn_lightning.training.rank_record import RankRecord

out, nodes, batch, bn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sync = len(sys.argv) > 5 and sys.argv[5] == "sync"

class Pairs(Dataset):
    # 32 fixed (LR, HR) pairs of 8^3; index i is the same pair in every process
    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.hr = torch.rand(32, 1, 8, 8, 8, generator=g)
        self.lr = self.hr + 0.2 * torch.randn(self.hr.shape, generator=g)
    def __len__(self):
        return len(self.hr)
    def __getitem__(self, i):
        return {"lr": {"data": self.lr[i]}, "hr": {"data": self.hr[i]}, "name": f"pair{i}"}

class FrozenBN(Callback):
    # BatchNorm normalising with its running statistics (an affine map: no batch dependence)
    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm3d):
                mod.eval()

class SaveWeights(Callback):
    def on_train_end(self, trainer, m):
        torch.save(m.net.state_dict(), os.path.join(out, f"weights_rank{trainer.global_rank}.pt"))

torch.manual_seed(0)  # the same initial weights in every run
module = L1Module(MDCSRN(num_blocks=1, units_per_block=2, growth_rate=4), optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
callbacks = [RankRecord(out), SaveWeights(), DistributedTeardown()] + ([FrozenBN()] if bn == "frozen" else [])
trainer = L.Trainer(
    accelerator="cpu", devices=1, num_nodes=nodes, strategy="ddp" if nodes > 1 else "auto", max_epochs=1,
    sync_batchnorm=sync, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, callbacks=callbacks, use_distributed_sampler=False,
)
# node r takes the items r, r+2, ... in order: each global batch of the two nodes holds the
# same items as the one process's batch
data = Pairs()
sampler = DistributedSampler(data, num_replicas=nodes, rank=int(os.environ.get("NODE_RANK", 0)), shuffle=False)
trainer.fit(module, DataLoader(data, batch_size=batch, sampler=sampler))
"""


def _fit_one_and_two_nodes(tmp_path: Path, bn: str) -> tuple[list[float], list[float], float, bool]:
    script = tmp_path / "equivalence.py"
    script.write_text(EQUIVALENCE_SCRIPT)
    one, two = tmp_path / f"one_{bn}", tmp_path / f"two_{bn}"
    port = str(free_port())
    cmds = [[sys.executable, str(script), str(one), "1", "4", bn]] + [[sys.executable, str(script), str(two), "2", "2", bn]] * 2
    envs = [clean_env()] + [clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r), WORLD_SIZE="2")
                            for r in (0, 1)]
    run_processes(cmds, envs, tmp_path)
    single = json.loads((one / "rank0.json").read_text())["epochs"]["0"]["losses"]
    halves = [json.loads((two / f"rank{r}.json").read_text())["epochs"]["0"]["losses"] for r in (0, 1)]
    # each node's loss is the mean over its half of the batch: the global loss is their mean
    ddp = [(a + b) / 2 for a, b in zip(*halves)]
    w1 = torch.load(one / "weights_rank0.pt", weights_only=True)
    w2 = [torch.load(two / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    params = [k for k in w1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    max_diff = max(float((w1[k] - w2[0][k]).abs().max()) for k in params)
    ranks_equal = all(torch.equal(w2[0][k], w2[1][k]) for k in params)
    return single, ddp, max_diff, ranks_equal


@multinode
def test_two_nodes_follow_the_one_process_loss_curve(tmp_path: Path) -> None:
    """Measured on the 2-core CPU box (b1u2 k4, 8 Adam steps of 4 items of 8^3, lr 1e-3):
    frozen BN: loss curves within 1.4e-7 relative, weights within 1.5e-8; BN in training
    mode: within 1.5e-4 relative (the per-node batch statistics), weights within 2e-3."""
    single, ddp, w_diff, ranks_equal = _fit_one_and_two_nodes(tmp_path, "frozen")
    assert len(single) == len(ddp) == 8 and ranks_equal
    assert single[-1] < 0.8 * single[0], "the fit must learn, or equal curves prove little"
    assert max(abs(a - b) / b for a, b in zip(ddp, single)) < 1e-5, (single, ddp)
    assert w_diff < 1e-6

    single, ddp, w_diff, ranks_equal = _fit_one_and_two_nodes(tmp_path, "batch")
    assert ranks_equal
    assert max(abs(a - b) / b for a, b in zip(ddp, single)) < 2e-3, (single, ddp)
    assert w_diff < 2e-2


@multinode
def test_two_slurm_tasks_on_localhost(tmp_path: Path) -> None:
    """What `hydra/launcher=slurm trainer.num_nodes=2 trainer.devices=1` gets from srun: one task
    per node with SLURM_* variables (Lightning's SLURMEnvironment checks them against the
    trainer: ntasks-per-node = devices, nnodes = num_nodes). The sbatch text itself is checked in
    tests/test_sweeps.py::test_slurm_launcher_writes_the_sbatch_we_expect."""
    port = str(free_port())
    run = tmp_path / "slurm"
    cmd = [sys.executable, "-m", "mdcsrn_lightning.cli.train", *TWO_NODES, "trainer.max_epochs=1",
           f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}"]
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mdcsrn", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_LOCALID": "0", "MASTER_PORT": port}
    envs = [clean_env(**slurm, SLURM_PROCID=str(r), SLURM_NODEID=str(r)) for r in (0, 1)]
    outputs = run_processes([cmd, cmd], envs, tmp_path)
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert set(ranks[0]["epochs"]["0"]["subjects"]).isdisjoint(ranks[1]["epochs"]["0"]["subjects"])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    # a layout that disagrees with the trainer stops with Lightning's message, not a hang
    bad = [clean_env(**{**slurm, "SLURM_NTASKS_PER_NODE": "2"}, SLURM_PROCID="0", SLURM_NODEID="0")]
    proc = subprocess.run([*cmd[:-2], f"hydra.run.dir={tmp_path / 'bad'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          env=bad[0], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "ntasks-per-node=2" in proc.stdout + proc.stderr, proc.stderr[-2000:]
