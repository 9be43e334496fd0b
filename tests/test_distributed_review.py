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
