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

from .conftest import TINY

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

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
