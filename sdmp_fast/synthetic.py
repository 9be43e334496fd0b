"""``synthetic`` source: random views already on the device, the model-only ceiling for benchmarks.

A small pool of batches is generated once (with the recipe's batch-flip mixing applied by the same
``assemble_batch`` every loader uses) and cycled, so the loader costs nothing per step.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.pipelines.base import assemble_batch, make_generator
from sdmp_fast.pipelines.recipes import Recipe

__all__ = ["SyntheticLoader"]


class SyntheticLoader:
    """``length`` batches per epoch, drawn from a pool of ``pool`` pre-generated device batches."""

    def __init__(self, recipe: Recipe, batch_size: int, *, device, seed: int = 0, shard_id: int = 0,
                 length: int = 1000, pool: int = 2, dtype: Optional[torch.dtype] = None):
        recipe.validate()
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.recipe, self.batch_size, self.length = recipe, batch_size, int(length)
        self.device = torch.device(device)
        self.epoch = 0
        g = make_generator(seed, 0, shard_id, self.device)
        self._pool: List[SDMPBatch] = []
        for i in range(pool):
            views = [torch.randn(batch_size, 3, v.size, v.size, generator=g, device=self.device)
                     for v in recipe.expanded_views()]
            labels = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            idx = torch.arange(i * batch_size, (i + 1) * batch_size, device=self.device)
            batch = assemble_batch(views, labels, idx, recipe, g)
            self._pool.append(batch.to(self.device, dtype=dtype) if dtype is not None else batch)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[SDMPBatch]:
        for i in range(self.length):
            yield self._pool[i % len(self._pool)]
