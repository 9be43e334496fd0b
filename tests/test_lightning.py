"""Our loaders inside a real Lightning Trainer (what solo-learn and lightly train with): an adapter is a loader
Lightning restores, so a run resumed from a mid-epoch checkpoint trains on exactly the batches the uninterrupted
run trained on, with no "dataloader is not resumable" warning."""
import warnings

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from sdmp_fast.pipelines import adapters  # noqa: E402
from sdmp_fast.pipelines.base import make_loader  # noqa: E402
from sdmp_fast.pipelines.recipes import byol2  # noqa: E402


class Recorder(pl.LightningModule):
    """solo-learn's training_step unpacking; records what each step saw."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        indexes, crops, targets = batch
        self.seen.append((self.current_epoch, batch_idx, indexes.tolist(), crops[0].sum().item(),
                          crops[1].sum().item()))
        feats = crops[0].mean(dim=(2, 3)) - crops[1].mean(dim=(2, 3))
        return self.head(feats).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(backend, folder):
    if backend == "memory":
        images = torch.randint(0, 256, (24, 3, 20, 20), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        return adapters.as_solo_learn(make_loader("memory", (images, torch.arange(24) % 3), byol2(size=16), 4))
    if backend == "torchvision":  # DataLoader workers; the resumed pass skips the earlier batches unread
        return adapters.as_solo_learn(make_loader("torchvision", folder, byol2(size=16), 4, num_workers=2))
    # DALI: the adapter restores DALI's random state beside the position, then reads and drops
    return adapters.as_solo_learn(make_loader("dali", folder, byol2(size=16), 4, device="cpu", num_workers=1,
                                              shard_id=0, num_shards=1))


def _fit(loader, root, ckpt_path=None, **kw):
    model = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return model.seen, [str(w.message) for w in caught]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["memory", "torchvision", "dali"])
def test_lightning_resumes_an_adapter_mid_epoch_with_the_uninterrupted_runs_batches(tmp_path, backend):
    folder = str(tmp_path / "data")
    if backend != "memory":
        if backend == "dali":
            pytest.importorskip("nvidia.dali")
        from sdmp_fast.data import make_synthetic_image_folder

        make_synthetic_image_folder(folder, num_classes=2, per_class=12, size=(24, 24))
    whole, _ = _fit(_loader(backend, folder), tmp_path / "whole", max_epochs=3)
    assert len(whole) == 18 and [s[:2] for s in whole[5:7]] == [(0, 5), (1, 0)]
    ckpts = tmp_path / "ckpts"
    every = pl.callbacks.ModelCheckpoint(dirpath=str(ckpts), every_n_train_steps=8, save_top_k=-1)
    head, _ = _fit(_loader(backend, folder), tmp_path / "head", max_epochs=3, max_steps=8, callbacks=[every])
    assert head == whole[:8]
    saved = sorted(ckpts.glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=1-step=8.ckpt"], saved  # mid-epoch 1, after its 2nd batch
    tail, msgs = _fit(_loader(backend, folder), tmp_path / "tail", max_epochs=3, ckpt_path=str(saved[0]))
    assert not [m for m in msgs if "not resumable" in m], msgs
    assert [s[:2] for s in tail[:1]] == [(1, 2)]  # Lightning's batch_idx goes on from the checkpoint
    assert head + tail == whole


DDP_SCRIPT = r'''
import json, sys
import torch
import pytorch_lightning as pl
from sdmp_fast.pipelines import adapters
from sdmp_fast.pipelines.base import make_loader
from sdmp_fast.pipelines.recipes import byol2
from test_lightning import Recorder

mode, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
images = torch.randint(0, 256, (48, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
# made before Lightning initialises the process group: the loader takes its shard when it is first read
loader = adapters.as_solo_learn(make_loader("memory", (images, torch.arange(48) % 3), byol2(size=16), 4))
kw = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
          enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out, max_epochs=3)
if mode == "head":
    kw.update(max_steps=8, callbacks=[pl.callbacks.ModelCheckpoint(dirpath=out + "/ckpts", every_n_train_steps=8,
                                                                   save_top_k=-1)])
trainer = pl.Trainer(**kw)
model = Recorder()
trainer.fit(model, train_dataloaders=loader, ckpt_path=sys.argv[3] if mode == "tail" else None)
with open(f"{out}/{mode}-rank{trainer.global_rank}.json", "w") as f:
    json.dump(model.seen, f)
'''


@pytest.mark.timeout(400)
def test_lightning_ddp_shards_the_adapter_and_resumes_every_rank_mid_epoch(tmp_path):
    """Two processes under torchrun with Lightning's DDP strategy (solo-learn's multi-GPU set-up, gloo here):
    each rank reads its own shard of every epoch, and a run resumed from a mid-epoch checkpoint trains every
    rank on the batches the uninterrupted run trained it on."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))

    def launch(*args):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), *args], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-4000:]

    out = str(tmp_path)
    launch("whole", out)
    whole = [json.loads((tmp_path / f"whole-rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in range(3):
        shards = [{i for e, _, idx, *_ in w if e == epoch for i in idx} for w in whole]
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(48))
    launch("head", out)
    saved = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=1-step=8.ckpt"], saved
    launch("tail", out, str(saved[0]))
    for r in (0, 1):
        head = json.loads((tmp_path / f"head-rank{r}.json").read_text())
        tail = json.loads((tmp_path / f"tail-rank{r}.json").read_text())
        assert head == whole[r][:8] and tail[0][:2] == [1, 2]
        assert head + tail == whole[r]
