"""In-memory backend: the whole data set is one uint8 tensor moved to the device once; each batch is an
``index_select`` + ``device_ops.make_views`` + ``assemble_batch``, all on the device, with no host work per
batch beyond launching kernels. The fastest path for small data sets (Fashion-MNIST, CIFAR-sized arrays) and
what the CPU demo and trainer tests use.

``data``: ``(images, labels)`` (labels may be None -> -1), a bare images tensor, or the string
``"fashion-mnist"`` / ``"fashion-mnist:train"`` / ``"fashion-mnist:test"``. Images: uint8 [N, H, W]
(grayscale), [N, H, W, 3] (channels-last RGB), or [N, 1|3, H, W]; float images in [0, 1] are accepted too.
Grayscale stays one channel on the device and becomes RGB after cropping (3x less memory and traffic).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from sdmp_fast.batch import SDMPBatch, exact_device

from .base import EpochSampler, SkippingLoader, assemble_batch, make_generator, skip_batch_draws
from .device_ops import make_views
from .recipes import Recipe


def load_memory_data(data) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] contiguous, labels [N] int64) from any accepted ``data`` (module docstring)."""
    if isinstance(data, str):
        name, _, split = data.partition(":")
        if name != "fashion-mnist":
            raise ValueError(f"data: the memory backend takes an (images, labels) tuple, an images tensor or "
                             f"'fashion-mnist[:train|test]', got {data!r}")
        from sdmp_fast.data import load_fashion_mnist

        images, labels = load_fashion_mnist(split or "train")
    elif isinstance(data, torch.Tensor):
        images, labels = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
    else:
        raise ValueError(f"data: expected (images, labels), an images tensor or 'fashion-mnist[:split]', got "
                         f"{type(data).__name__}")
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"data: images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"data: images must be [N, H, W], [N, H, W, 3] or [N, 1|3, H, W], got "
                         f"{tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("data: no images")
    if images.is_floating_point():  # the device ops clamp to [0, 1]: 0..255 data would come out black and white
        lo, hi = float(images.min()), float(images.max())
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both
            raise ValueError(f"data: float images must lie in [0, 1], got values from {lo} to {hi} (pass uint8 "
                             f"0..255, or divide by 255)")
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.long)
    labels = torch.as_tensor(labels).long().view(-1)
    if labels.shape[0] != n:
        raise ValueError(f"data: {n} images but {labels.shape[0]} labels")
    return images.contiguous(), labels


class MemoryLoader(SkippingLoader):
    """Iterable of SDMPBatch; see the module docstring. ``num_workers`` is accepted and unused (no host
    work to parallelise)."""

    def __init__(self, data, recipe: Recipe, batch_size: int, *, device=torch.device("cpu"), shard_id: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 dtype: Optional[torch.dtype] = None, num_workers: Optional[int] = None):
        self.recipe = recipe.validate()
        images, labels = load_memory_data(data)
        self.batch_size, self.device, self.dtype = batch_size, exact_device(device), dtype
        self.shard_id, self.seed = shard_id, seed
        self.sampler = EpochSampler(images.shape[0], batch_size, shard_id, num_shards, shuffle, seed, drop_last)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)

    def _run_pass(self, skip: int) -> Iterator[SDMPBatch]:
        """One pass of the epoch; ``skip_batches(k)`` starts it at batch ``k``, the view and mixing draws of the
        batches before drawn and dropped (their number depends on the batch size only)."""
        gen = make_generator(self.seed, self.sampler.begin_pass(), self.shard_id, self.device)
        order = self.sampler.indices()
        for _ in range(min(skip, len(self))):
            n = min(self.batch_size, order.numel())
            skip_batch_draws(self.recipe, n, gen, self.device)
            order = order[n:]
        order = order.to(self.device, non_blocking=True)
        for idx in (order.split(self.batch_size) if order.numel() else ()):  # no host sync (shapes only)
            views = make_views(self.images.index_select(0, idx), None, None, self.recipe, gen, self.dtype)
            yield assemble_batch(views, self.labels.index_select(0, idx), idx, self.recipe, gen)
