"""Typed batch that every sdmp-fast loader yields (TorchRec style: it knows how to move)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import torch

__all__ = ["SDMPBatch", "exact_device"]


def exact_device(device) -> torch.device:
    """``device`` as a torch.device with a bare "cuda" resolved to the current card: streams, generators and
    caches made for it then stay on one card even if the current device changes later."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class SDMPBatch:
    """One batch of augmented views plus the batch-flip mixing that was applied to some of them.

    views:        clean views, each [n, C, H, W] (views may differ in size, e.g. DINO global/local crops).
    labels:       [n] int64 class labels (-1 where the data has none).
    indices:      [n] int64 dataset indices of the samples (for exact-epoch checks and solo-learn's format).
    mixed_views:  mixed versions of some views; ``mixed_views[j]`` is ``views[mixed_from[j]]`` mixed with
                  its batch-flipped partner (sample i with n-1-i). Empty when mixing is off.
    mixed_from:   which clean view each mixed view was made from.
    lam:          [n] float32 fraction of each mixed image that comes from its own sample (area-corrected),
                  of the first mixed view: every view of one size has the same.
    method:       [n] int64 mixing method per sample (0 mixup, 1 cutmix, 2 resizemix).
    mixed_lam:    the same per mixed view ([n] each), exact for views of other sizes too (DINO's local crops:
                  the box is sized from the same draw, so the pasted area rounds differently, by < 1.5 points).
                  Empty when the batch was built without it (then ``lam`` is every view's).
    """

    views: List[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    mixed_views: List[torch.Tensor] = field(default_factory=list)
    mixed_from: Tuple[int, ...] = ()
    lam: Optional[torch.Tensor] = None
    method: Optional[torch.Tensor] = None
    mixed_lam: List[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.mixed_views) != len(self.mixed_from):
            raise ValueError(
                f"SDMPBatch: {len(self.mixed_views)} mixed views but mixed_from has {len(self.mixed_from)} entries")
        if self.mixed_lam and len(self.mixed_lam) != len(self.mixed_views):
            raise ValueError(f"SDMPBatch: {len(self.mixed_views)} mixed views but {len(self.mixed_lam)} mixed_lam")
        n = self.labels.shape[0]
        for name, tensors in (("views", self.views), ("mixed_views", self.mixed_views)):
            for j, t in enumerate(tensors):
                if t.shape[0] != n:
                    raise ValueError(f"SDMPBatch: {name}[{j}] has batch size {t.shape[0]}, labels have {n}")

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_mixed(self) -> bool:
        return len(self.mixed_views) > 0

    def _tensors(self):
        yield from self.views
        yield from self.mixed_views
        yield from self.mixed_lam
        for t in (self.labels, self.indices, self.lam, self.method):
            if t is not None:
                yield t

    def _map(self, fn) -> "SDMPBatch":
        done = {}  # one result per tensor object: lam is mixed_lam[0] (one copy to move, still one after)

        def once(t):
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        opt = lambda t: None if t is None else once(t)  # noqa: E731
        return replace(
            self,
            views=[fn(v) for v in self.views],
            mixed_views=[fn(v) for v in self.mixed_views],
            labels=fn(self.labels),
            indices=fn(self.indices),
            lam=opt(self.lam),
            method=opt(self.method),
            mixed_lam=[once(t) for t in self.mixed_lam],
        )

    def to(self, device, non_blocking: bool = False, dtype: Optional[torch.dtype] = None) -> "SDMPBatch":
        """Move every tensor; ``dtype`` (e.g. torch.bfloat16) converts the image tensors only."""

        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        if dtype is not None:
            moved.views = [v.to(dtype) for v in moved.views]
            moved.mixed_views = [v.to(dtype) for v in moved.mixed_views]
        return moved

    def pin_memory(self) -> "SDMPBatch":
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the caching allocator these tensors are used on ``stream`` (they were made on another one),
        so their memory is not handed out again before that stream's work on them is done."""
        for t in self._tensors():
            if t.is_cuda:
                t.record_stream(stream)

    def num_images(self) -> int:
        """Images the model sees per sample-batch: used for images/sec accounting."""
        return self.batch_size

    def __repr__(self) -> str:  # short: batches are printed in logs
        shapes = ", ".join(str(tuple(v.shape)) for v in self.views)
        return (f"SDMPBatch(n={self.batch_size}, views=[{shapes}], mixed={len(self.mixed_views)} "
                f"from {self.mixed_from}, dtype={self.views[0].dtype if self.views else None}, "
                f"device={self.labels.device})")
