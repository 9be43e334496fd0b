"""Trainer.step_inputs takes a batch's mixed views by position: a batch whose mixed views come from other views
(a Trainer given a loader made with another recipe) is refused, naming both, instead of training them in the
wrong roles."""
import pytest
import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.config import TrainConfig
from sdmp_fast.trainer import Trainer

KW = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
          proj_hidden_dim=128, proj_dim=64, dino_out_dim=256, dino_hidden_dim=128, dino_bottleneck_dim=64,
          local_size=16, n_local=4, n_local_mixed=2, progress=False, tensorboard=False, loader="synthetic",
          batch_size=4, steps=1, save_every=0, lr=1e-3)
B = 4


def _batch(sizes, mixed_sizes, mixed_from):
    z = lambda s: torch.zeros(B, 3, s, s)  # noqa: E731
    return SDMPBatch([z(s) for s in sizes], torch.zeros(B, dtype=torch.long), torch.arange(B),
                     [z(s) for s in mixed_sizes], mixed_from, torch.full((B,), 0.7), torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("method,sizes,mixed_sizes,good,bad", [
    ("mocov3", [32, 32], [32, 32], (0, 1), (1, 0)),
    ("dino", [32, 32, 16, 16, 16, 16], [32, 32, 16, 16], (0, 1, 4, 5), (0, 1, 2, 3)),
])
def test_mixed_views_from_other_views_are_refused(tmp_path, method, sizes, mixed_sizes, good, bad):
    cfg = TrainConfig(**KW, method=method, out=str(tmp_path / "run")).resolve().validate()
    trainer = Trainer(cfg, log=lambda s: None)
    n = len(trainer.step_inputs(_batch(sizes, mixed_sizes, good), False))
    assert n == (5 if method == "mocov3" else 2 + 2 + 4 + 1)
    with pytest.raises(ValueError, match=r"mix views \(.*\) \(mixed_from\).*views \(0, 1"):
        trainer.step_inputs(_batch(sizes, mixed_sizes, bad), False)
