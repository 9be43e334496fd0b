"""Multi-process training through torchrun (gloo on CPU): DDP + all-gathered MoCo keys + all-reduced DINO center
keep both ranks' parameters identical, the loaders' shards are disjoint, and a rank that dies makes the run
fail within a bounded time instead of hanging."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_trainer import TINY, _env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "sdmp_fast.cli", "train"]


def _torchrun(tmp_path, argv, timeout, **env):
    t0 = time.time()
    p = subprocess.run(TORCHRUN + argv, env=_env(tmp_path, **env), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return p.returncode, p.stdout, time.time() - t0


def _is_buffer_stat(name: str) -> bool:
    # BatchNorm running statistics are per-rank by design (they never feed the training loss)
    return "running_" in name or "num_batches_tracked" in name


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", ["mocov3", "dino"])
def test_two_ranks_keep_identical_parameters(tmp_path, method):
    out = tmp_path / "out"
    argv = TINY + ["--method", method, "--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8",
                   "--steps", "4", "--log-every", "2", "--save-every", "0", "--lr", "1e-3", "--out", str(out),
                   "--dist-timeout", "60"]
    code, text, _ = _torchrun(tmp_path, argv, 200, SDMP_DEBUG_DUMP=1)
    assert code == 0, text[-4000:]
    r0 = torch.load(out / "debug-rank0.pt", weights_only=True)
    r1 = torch.load(out / "debug-rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 4
    compared = 0
    for k, v in r0["model"].items():
        if _is_buffer_stat(k):
            continue
        assert torch.equal(v, r1["model"][k]), k
        compared += 1
    assert compared > 20
    if method == "dino":
        assert r0["model"]["center"].abs().sum() > 0  # the all-reduced center moved, identically on both ranks
    # the two shards are disjoint: each rank trained on its own samples
    assert len(r0["indices"]) == len(r1["indices"]) == 32
    assert not set(r0["indices"].tolist()) & set(r1["indices"].tolist())
    assert (out / "checkpoints" / "ckpt-000000004.pt").exists()


@pytest.mark.timeout(120)
def test_dead_rank_fails_the_run_within_bounded_time(tmp_path):
    out = tmp_path / "out"
    argv = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "200", "--log-every", "5",
                   "--save-every", "0", "--out", str(out), "--dist-timeout", "20"]
    # the bound is the subprocess timeout (a hang raises TimeoutExpired), not a wall-clock assertion: a rank
    # left waiting on a dead peer must end with the run, not sit out NCCL's default 10 minutes
    code, text, _ = _torchrun(tmp_path, argv, 100, SDMP_FAULT_EXIT_STEP=3, SDMP_FAULT_RANK=1)
    assert code != 0, text[-4000:]
    assert re.search(r"exit ?code\s*:?\s*17\b", text), text[-4000:]  # torchrun names the dead rank's own code


def _start_ranks(tmp_path, argvs, **env):
    """One `sdmp-fast train` process per rank, each with its own argv (what torchrun cannot do: e.g. two nodes
    whose --out is the same path on each node's own disk) and its own pid (a signal to one rank only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, argv in enumerate(argvs):
        e = _env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, LOCAL_RANK=rank,
                 WORLD_SIZE=len(argvs), **env)
        procs.append(subprocess.Popen([sys.executable, "-m", "sdmp_fast.cli", "train"] + argv, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish_ranks(procs, timeout):
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def _ranks(tmp_path, argvs, timeout, **env):
    return _finish_ranks(_start_ranks(tmp_path, argvs, **env), timeout)


@pytest.mark.timeout(120)
def test_a_lock_file_rank_0_cannot_open_stops_every_rank_with_its_reason(tmp_path):
    """--out/.lock that rank 0 cannot open (another user's run, here a folder in its place): its OSError escaped
    the check the ranks share, so rank 0 died with a traceback and rank 1 with gloo's "connection closed by
    peer" (under NCCL it would have waited for --dist-timeout)."""
    out = tmp_path / "out"
    (out / ".lock").mkdir(parents=True)
    argv = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "2", "--save-every", "0",
                   "--dist-timeout", "20", "--out", str(out)]
    codes, texts = _ranks(tmp_path, [argv, argv], 100)
    assert codes == [2, 2], texts
    for text in texts:
        assert f"out: cannot lock {str(out / '.lock')!r}" in text, text[-3000:]
        assert "Traceback" not in text


@pytest.mark.timeout(120)
def test_ranks_that_find_different_checkpoints_refuse_to_resume(tmp_path):
    """Every rank reads --out itself. Where the ranks do not see the same files (node-local disks, a partial copy)
    rank 0 resumed at its checkpoint's step while rank 1 started afresh: they trained on with different models,
    optimiser states and step counts, and rank 0 exported a backbone and exited 0. Now the run stops before
    anything is written, on every rank, naming what each rank found."""
    from sdmp_fast import checkpoint as ckpt
    from sdmp_fast.trainer import Trainer
    from test_trainer import tiny_cfg

    common = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "6", "--log-every", "2",
                     "--save-every", "0", "--lr", "1e-3", "--dist-timeout", "20", "--deterministic", "--resume"]
    outs = [tmp_path / "node0", tmp_path / "node1"]
    cfg = tiny_cfg(tmp_path, steps=6, out=str(outs[0]))
    state = Trainer(cfg).state_dict()  # a checkpoint of a 2-process run at step 2, on node 0's disk only
    state.update(step=2, position=2, world_size=2, rng=state["rng"] * 2)
    ckpt.save_checkpoint(state, ckpt.checkpoint_dir(str(outs[0])), 2)
    before = sorted(p.name for p in outs[0].rglob("*"))
    codes, texts = _ranks(tmp_path, [common + ["--out", str(o)] for o in outs], 100)
    assert codes == [2, 2], texts
    for text in texts:
        assert "resume: the ranks found different checkpoints" in text, text[-3000:]
        assert "rank 0: ckpt-000000002.pt" in text and "rank 1: none" in text
    assert sorted(p.name for p in outs[0].rglob("*")) == before  # nothing written
    assert not outs[1].exists()


def _moco_step_on_rank(rank, world, port, run_dir):
    """One rank of a real gloo process group: the trainer's SDMP-MoCo loss on its first batch, then backward
    through DDP; saves its inputs, terms and averaged gradients for the parent to check."""
    import torch.distributed as dist

    from sdmp_fast.trainer import Trainer
    from test_trainer import tiny_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = Trainer(tiny_cfg(Path(run_dir), method="mocov3", steps=2), rank=rank, world_size=world)
        inputs = tr.step_inputs(next(iter(tr.loader)), False)
        loss, terms = tr._moco_loss(inputs, None)
        loss.backward()
        torch.save({"inputs": inputs, "state": tr.model.state_dict(), "terms": torch.stack(terms).detach(),
                    "grads": {n: p.grad for n, p in tr.module.named_parameters() if p.grad is not None}},
                   os.path.join(run_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _release_ddp_on_rank(rank, world, port, run_dir):
    """One rank: a trainer's release_ddp frees its DDP reducer; a Trainer whose construction fails after it built
    its DDP wrapper frees that reducer before the error leaves (the exception's frames keep the wrapper)."""
    import torch.distributed as dist
    import torch.nn.parallel as parallel

    from sdmp_fast.trainer import Trainer
    from test_trainer import tiny_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    built = []

    class Recorded(parallel.DistributedDataParallel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    found = {}
    try:
        cfg = tiny_cfg(Path(run_dir), method="mocov3", steps=2)
        parallel.DistributedDataParallel = Recorded
        tr = Trainer(cfg, rank=rank, world_size=world)
        found["before"] = "reducer" in built[0].__dict__
        tr.release_ddp()
        found["after"] = "reducer" in built[0].__dict__ or "logger" in built[0].__dict__
        found["plain"] = tr.train_module is tr.module and tr.fwd_student is tr.module

        def fail(self):
            raise ValueError("data: damaged")

        Trainer._data_identity, old = fail, Trainer._data_identity
        try:
            Trainer(cfg, rank=rank, world_size=world)
        except ValueError as e:
            found["failed"] = (str(e), len(built), "reducer" in built[1].__dict__)
        finally:
            Trainer._data_identity = old
        torch.save(found, os.path.join(run_dir, f"release{rank}.pt"))
    finally:
        parallel.DistributedDataParallel = Recorded.__mro__[1]
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_the_ddp_reducer_is_freed_before_the_process_group_is_destroyed(tmp_path):
    """On torch 2.11 a two-rank gloo run that stopped at a pre-flight check (exit 2) hung at exit about 1 run in
    5: the DDP reducer, freed after the process group's Python object, destroyed the group holding the GIL, and
    the join of gloo's worker threads waited for ever on one that needed the GIL to free a finished collective's
    tensors. `sdmp-fast train` now frees the reducer first (Trainer.release_ddp), also when the Trainer fails to
    build after its DDP wrapper."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_release_ddp_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        found = torch.load(tmp_path / f"release{r}.pt", weights_only=False)
        assert found["before"] and not found["after"] and found["plain"], found
        assert found["failed"] == ("data: damaged", 2, False), found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attempt", range(4))
def test_ranks_stopped_by_a_preflight_check_exit_every_time(tmp_path, attempt):
    """The exit-2 stop of the test below, again: the hang above struck about 1 run in 5 on torch 2.11."""
    test_ranks_that_find_different_checkpoints_refuse_to_resume(tmp_path)


@pytest.mark.timeout(120)
def test_two_process_sdmp_moco_uses_global_key_indices_and_ddp_averages_the_rank_losses(tmp_path):
    """sdmp.md §2 in a real 2-process run (gloo): each rank's terms are the reference terms of its local queries
    against the keys all-gathered in rank order, own key r*n+i, partner r*n+n-1-i; DDP's gradient is the gradient of
    the mean of the two ranks' losses. The single-process reference runs the heads per rank (their BatchNorm is
    per rank on the CPU: SyncBatchNorm needs a GPU)."""
    import socket

    import torch.multiprocessing as mp

    from sdmp_fast import losses
    from sdmp_fast.trainer import build_model
    from test_trainer import tiny_cfg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_moco_step_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    cfg = tiny_cfg(tmp_path, method="mocov3", steps=2)
    model, _ = build_model(cfg)
    model.load_state_dict(ranks[0]["state"])
    queries, keys = [], []
    for r in ranks:
        x1, x2, x1m, x2m, lam = r["inputs"]
        queries.append(model.base(torch.cat([x1, x2m]), 2) + [lam])
        with torch.no_grad():
            keys.append(model.momentum(torch.cat([x1, x2, x1m]), 3))
    k1, k2, k1m = (torch.cat([k[j] for k in keys]) for j in range(3))  # all-gathered, rank order
    assert not torch.equal(ranks[0]["inputs"][0], ranks[1]["inputs"][0])  # each rank has its own shard
    total = 0
    for r, (q1, q2m, lam) in enumerate(queries):
        t = losses.sdmp_moco_terms(q1, q2m, k1, k2, k1m, lam, cfg.tau, rank=r, world_size=2)
        torch.testing.assert_close(ranks[r]["terms"], torch.stack([t["source"], t["mix_source"], t["mix_mix"]]))
        total = total + losses.sdmp_moco_loss(t, cfg.mix_weight) / 2
    total.backward()
    params = dict(model.base.named_parameters())
    for name, g in ranks[0]["grads"].items():
        assert torch.equal(g, ranks[1]["grads"][name]), name  # DDP: one gradient on every rank
        torch.testing.assert_close(g, params[name].grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_the_same_exit_code(tmp_path, sig, code):
    """A Ctrl-C (or a kill) that reaches rank 1 only: both ranks stop at the same step after a checkpoint, and
    both exit with the signal's code. Rank 0 used to exit 0 beside rank 1's 130 and log "stopped by a signal"."""
    out = tmp_path / "out"
    argv = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "100000", "--log-every", "2",
                   "--save-every", "0", "--lr", "1e-3", "--dist-timeout", "30", "--out", str(out)]
    procs = _start_ranks(tmp_path, [argv, argv], SDMP_DEBUG_DUMP=1)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 100
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), _finish_ranks(procs, 10)
    procs[1].send_signal(sig)
    codes, texts = _finish_ranks(procs, 100)
    assert codes == [code, code], texts
    assert f"stopped by {sig.name} (on another rank)" in texts[0], texts[0][-3000:]
    steps = [torch.load(out / f"debug-rank{r}.pt", weights_only=True)["step"] for r in (0, 1)]
    assert steps[0] == steps[1] and steps[0] % 2 == 0, steps
    assert (out / "checkpoints" / f"ckpt-{steps[0]:09d}.pt").exists()
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["step"] == steps[0]
