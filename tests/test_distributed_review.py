"""Multi-process checks added in review: ranks started with different settings stop naming them, and the DINO
center / gradients of a real 2-process gloo group match a single-process computation of the same per-rank
batches (sdmp.md section 2)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from test_distributed import _ranks
from test_trainer import TINY


@pytest.mark.timeout(120)
def test_ranks_started_with_different_settings_stop_naming_them(tmp_path):
    """Each rank reads its own command line and --config file. A different --lr on one rank trained on with
    drifting parameters and exited 0 (rank 0 exported its own backbone); another --seed gave overlapping shards;
    another --log-every stalled both ranks for --dist-timeout seconds at mismatched collectives. Now every rank
    stops (exit 2) before anything is written, naming the settings and each rank's value; per-node settings
    (--out, --data, --num-workers) may differ."""
    common = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "4", "--log-every", "2",
                     "--save-every", "0", "--dist-timeout", "20"]
    outs = [tmp_path / "node0", tmp_path / "node1"]
    argvs = [common + ["--out", str(outs[0]), "--lr", "1e-3", "--num-workers", "1"],
             common + ["--out", str(outs[1]), "--lr", "3e-3", "--seed", "1", "--num-workers", "2"]]
    codes, texts = _ranks(tmp_path, argvs, 100)
    assert codes == [2, 2], texts
    for text in texts:
        assert "the ranks run with different settings" in text, text[-3000:]
        assert "lr (rank 0: 0.001, rank 1: 0.003)" in text and "seed (rank 0: 0, rank 1: 1)" in text
        assert "num_workers" not in text and "out (" not in text
    assert not outs[0].exists() and not outs[1].exists()


def _dino_step_on_rank(rank, world, port, run_dir, sdmp):
    import torch.distributed as dist

    from sdmp_fast.trainer import Trainer
    from test_trainer import tiny_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = Trainer(tiny_cfg(Path(run_dir), method="dino", sdmp=sdmp, steps=2, drop_path_rate=0.0,
                              freeze_last_layer_epochs=0), rank=rank, world_size=world)
        inputs = tr.step_inputs(next(iter(tr.loader)), False)
        tau_t = tr.schedules.teacher_temp(0)
        with torch.no_grad():  # a center with a history: its EMA must keep 0.9 of it, not start from nothing
            tr.model.center.copy_(torch.linspace(-1.0, 1.0, tr.model.center.numel()).reshape(tr.model.center.shape))
        state = {k: v.clone() for k, v in tr.model.state_dict().items()}
        loss, terms = tr._dino_loss(inputs, tau_t)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tr.module.named_parameters() if p.grad is not None}
        local_mean = tr._pending_center_mean.clone()
        with torch.no_grad():
            tr._update(loss, terms, 0.0, 0.0, 1.0)
        torch.save({"inputs": inputs, "state": state, "loss": loss.detach(), "grads": grads, "tau_t": tau_t,
                    "local_mean": local_mean, "center": tr.model.center.clone()},
                   os.path.join(run_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sdmp", [True, False])
def test_two_process_dino_center_is_the_global_mean_and_ddp_averages_the_rank_losses(tmp_path, sdmp):
    """DINO under DDP: each rank's loss is the single-process loss of its own batch (per-rank flip), the gradient
    is that of the mean of the ranks' losses, and the center moves by the mean of the clean teacher outputs over
    both ranks' batches, identically on both ranks."""
    import torch.multiprocessing as mp

    from sdmp_fast.trainer import Trainer
    from test_trainer import tiny_cfg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dino_step_on_rank, args=(2, port, str(tmp_path), sdmp), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["inputs"][0], ranks[1]["inputs"][0])
    tr = Trainer(tiny_cfg(tmp_path, method="dino", sdmp=sdmp, steps=2, drop_path_rate=0.0,
                          freeze_last_layer_epochs=0, out=str(tmp_path / "single")))
    tr.model.load_state_dict(ranks[0]["state"])
    total = 0
    for r in ranks:
        loss, _ = tr._dino_loss(r["inputs"], r["tau_t"])
        torch.testing.assert_close(loss.detach(), r["loss"])
        total = total + loss / 2
    total.backward()
    params = dict(tr.module.named_parameters())
    for name, g in ranks[0]["grads"].items():
        assert torch.equal(g, ranks[1]["grads"][name]), name
        torch.testing.assert_close(g, params[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    c0 = ranks[0]["state"]["center"]
    expected = 0.9 * c0.reshape(-1) + 0.1 * (ranks[0]["local_mean"] + ranks[1]["local_mean"]) / 2  # momentum 0.9
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    torch.testing.assert_close(ranks[0]["center"], expected.reshape(1, -1))
    assert not torch.allclose(ranks[0]["local_mean"], ranks[1]["local_mean"])  # the all-reduce matters


def _image_folder(root: Path, n: int) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(n)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        px = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(px).save(root / f"c{i % 2}" / f"img{i:03d}.png")
    return root


@pytest.mark.timeout(120)
def test_ranks_that_read_different_data_stop_naming_it(tmp_path):
    """--data may name each node's own copy: where the copies differ the ranks' shards overlapped silently, and a
    run by --epochs (here 4 vs 5 steps per epoch) ended on one rank first, the other failing in a gloo message
    naming nothing. Now every rank stops (exit 2) before anything is written; the same data under another path
    trains."""
    common = TINY + ["--loader", "torchvision", "--batch-size", "4", "--epochs", "1", "--num-workers", "0",
                     "--log-every", "2", "--save-every", "0", "--dist-timeout", "20"]
    a, b = _image_folder(tmp_path / "a", 37), _image_folder(tmp_path / "b", 40)
    outs = [tmp_path / "node0", tmp_path / "node1"]
    # a warm-up of 4 steps fits rank 1's 5-step run, not rank 0's 4: checked before the ranks agreed on their data,
    # rank 0 alone stopped (naming warmup_steps) while rank 1 waited for it in a collective
    warm = ["--warmup-steps", "4"]
    codes, texts = _ranks(tmp_path, [common + warm + ["--out", str(outs[0]), "--data", str(a)],
                                     common + warm + ["--out", str(outs[1]), "--data", str(b)]], 100)
    assert codes == [2, 2], texts
    for text in texts:
        assert "data: the ranks read different data" in text, text[-3000:]
        assert "rank 0: 4 steps per epoch, 37 files" in text and "rank 1: 5 steps per epoch, 40 files" in text
    assert not outs[0].exists()
    import shutil

    shutil.copytree(a, tmp_path / "a_copy")  # the same files under another root: fine
    codes, texts = _ranks(tmp_path, [common + ["--out", str(outs[0]), "--data", str(a)],
                                     common + ["--out", str(outs[1]), "--data", str(tmp_path / "a_copy")]], 100)
    assert codes == [0, 0], texts
    assert (outs[0] / "backbone.pt").exists()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("stage", ["settings", "config", "out", "build", "checkpoint"])
def test_a_rank_that_cannot_start_stops_every_rank_naming_it(tmp_path, stage):
    """A rank that stopped at its own checks (its --data missing, an unknown key in its --config, its --out
    holding another run: node-local paths), while building its loader (an empty copy of the data) or loading its
    checkpoint left the other ranks waiting --dist-timeout seconds in the rendezvous or in a collective, then
    failing with a store / gloo timeout naming nothing. Now every rank stops at once with the same exit code, the
    others naming the rank and its reason; nothing is written."""
    common = TINY + ["--loader", "torchvision", "--batch-size", "4", "--steps", "2", "--num-workers", "0",
                     "--log-every", "2", "--save-every", "0", "--dist-timeout", "90"]
    data = _image_folder(tmp_path / "data", 16)
    outs = [tmp_path / "node0", tmp_path / "node1"]
    bad, code = ["--data", str(data)], 2
    if stage == "settings":
        bad, why = ["--data", str(tmp_path / "missing")], f"data: '{tmp_path / 'missing'}' does not exist"
    elif stage == "config":
        (tmp_path / "run.yaml").write_text("batch_sise: 4\n")
        bad += ["--config", str(tmp_path / "run.yaml")]
        why = f"config: unknown setting 'batch_sise' in '{tmp_path / 'run.yaml'}'"
    elif stage == "out":
        outs[1].mkdir()
        (outs[1] / "notes.txt").write_text("someone else's")
        why = f"out: '{outs[1]}' is not empty and holds no run (notes.txt)"
    elif stage == "build":
        (tmp_path / "empty" / "cls").mkdir(parents=True)
        bad, why = ["--data", str(tmp_path / "empty")], f"data: '{tmp_path / 'empty'}' holds no image files"
    else:
        (outs[1] / "checkpoints").mkdir(parents=True)
        (outs[1] / "checkpoints" / "ckpt-000000002.pt").write_bytes(b"not a checkpoint")
        common += ["--resume"]
        code, why = 1, f"resume: no checkpoint of '{outs[1] / 'checkpoints'}' can be read"
    argvs = [common + ["--out", str(outs[0]), "--data", str(data)], common + ["--out", str(outs[1])] + bad]
    codes, texts = _ranks(tmp_path, argvs, 80)  # < --dist-timeout: a rank left waiting fails the test
    assert codes == [code, code], texts
    assert f"error: rank 1 of 2 could not start: {why}" in texts[0], texts[0][-3000:]
    assert f"error: {why}" in texts[1], texts[1][-3000:]
    assert not outs[0].exists()
    assert stage != "out" or sorted(os.listdir(outs[1])) == ["notes.txt"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["killed", "out of memory"])
def test_a_rank_lost_while_building_fails_the_others_within_seconds(tmp_path, how):
    """A rank killed while it builds its model (the OOM killer, a node lost) must not leave the others waiting
    --dist-timeout seconds for its word: they agree over gloo, which sees the dead peer at once; a rank whose
    build raised an error of no configuration kind (CUDA out of memory) ends every rank with exit code 1."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1' and os.environ.get('BUILD_FAULT'):\n"
        "    import sdmp_fast.trainer as t\n"
        "    def build_model(cfg):\n"
        "        if os.environ['BUILD_FAULT'] == 'killed':\n"
        "            os.kill(os.getpid(), 9)\n"
        "        raise RuntimeError('CUDA out of memory (simulated)')\n"
        "    t.build_model = build_model\n")
    common = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "2", "--log-every", "2",
                     "--save-every", "0", "--dist-timeout", "120"]
    path = os.pathsep.join([str(hook)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    argvs = [common + ["--out", str(tmp_path / f"node{r}")] for r in range(2)]
    codes, texts = _ranks(tmp_path, argvs, 80, PYTHONPATH=path, BUILD_FAULT=how)  # 80 s < --dist-timeout
    if how == "killed":
        assert codes[1] == -9 and codes[0] == 1, texts
        assert "Connection" in texts[0] or "peer" in texts[0], texts[0][-3000:]
    else:
        assert codes == [1, 1], texts
        assert "error: rank 1 of 2 could not start: CUDA out of memory (simulated) (RuntimeError)" in texts[0]
    assert not (tmp_path / "node0").exists()


@pytest.mark.timeout(300)
def test_a_torchrun_restart_resumes_the_run(tmp_path):
    """torchrun --max-restarts: the restarted workers met the failed attempt's keys in torchrun's shared store,
    and gloo connected to the dead worker's address ("connectFullMesh failed ... Connection refused"), failing
    most restarts (pytorch/pytorch#135712). Each attempt now has its own prefix of the store: rank 1 killed
    after the step-4 checkpoint, the restarted run resumes there and ends with the uninterrupted run's model."""
    import signal
    import subprocess
    import sys
    import time

    from test_trainer import _env

    argv = TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8", "--steps", "8",
                   "--log-every", "2", "--save-every", "4", "--lr", "1e-3", "--deterministic", "--resume",
                   "--dist-timeout", "60"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "sdmp_fast.cli", "train"]

    # the restarted rank 1 comes late to the rendezvous (as a slow node does), so rank 0 finds the failed
    # attempt's keys of rank 1 first where they are still there
    late = tmp_path / "late"
    late.mkdir()
    (late / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '1' and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0':\n"
        "    time.sleep(4)\n")

    def start(out, **env):
        path = os.pathsep.join([str(late)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        return subprocess.Popen(run + argv + ["--out", str(out)], env=_env(tmp_path, PYTHONPATH=path, **env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def rank1_of(agent_pid):  # the worker torchrun started with RANK=1
        for pid in os.listdir("/proc"):
            try:
                if (pid.isdigit() and int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == agent_pid
                        and "RANK=1" in open(f"/proc/{pid}/environ").read().split("\0")):
                    return int(pid)
            except OSError:
                continue
        return None

    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=200) == 0, ref.stdout.read()[-3000:]
    out = tmp_path / "run"
    p = start(out, SDMP_DEBUG_STEP_SLEEP=0.5)
    try:
        deadline = time.time() + 150
        while not (out / "checkpoints" / "ckpt-000000004.pt").exists() and p.poll() is None:
            assert time.time() < deadline, "no checkpoint at step 4"
            time.sleep(0.1)
        victim = rank1_of(p.pid)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        text = p.communicate(timeout=200)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, text[-4000:]
    assert "resuming from" in text and "ckpt-000000004.pt at step 4" in text, text[-4000:]
    a = torch.load(tmp_path / "ref" / "backbone.pt", weights_only=True)
    b = torch.load(out / "backbone.pt", weights_only=True)
    a, b = (x.get("state_dict", x) if isinstance(x, dict) else x for x in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.timeout(150)
def test_node_local_out_is_named_at_the_start(tmp_path):
    """Only rank 0 writes --out: with a folder on each node's own disk the run trained to its end in silence, and
    only a later --resume found that the other nodes had no checkpoint. Now rank 0 warns at the start; on a
    shared --out nothing is said."""
    common = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "2", "--log-every", "2",
                     "--save-every", "0", "--dist-timeout", "60"]
    outs = [tmp_path / "node0", tmp_path / "node1"]
    codes, texts = _ranks(tmp_path, [common + ["--out", str(outs[0])], common + ["--out", str(outs[1])]], 120)
    assert codes == [0, 0], texts
    assert f"warning: out: rank 1 of 2 does not see the '{outs[0] / 'config.yaml'}' rank 0 wrote" in texts[0]
    assert not outs[1].exists()
    shared = tmp_path / "shared"
    codes, texts = _ranks(tmp_path, [common + ["--out", str(shared)]] * 2, 120)
    assert codes == [0, 0], texts
    assert "does not see" not in texts[0] + texts[1]
