"""Batch-flip mixing for CPU tensors: the same result as ``assemble_batch``, at a fraction of the cost.

``sdmp_fast.mixing.apply_mix`` is written for the GPU: branch-free over the whole batch, it computes the
mixup blend, the cutmix paste and a full-image resize of every partner for every sample, then selects. On a
CPU those full-batch passes (and the float64 [n, H, W, 2] sampling grid) cost more than decoding and
augmenting the images. Here each sample does only its own method: a blend, or a copy plus a box paste (resized
into the box for resizemix), which is a small fraction of the passes.

The random draws (lambda, method, box size and position) are made by the same functions in the same order
from the same generator, and each pixel is computed by the same expression, so for a given generator state the
output equals ``assemble_batch``'s (tests/test_dali.py checks it).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.mixing import (CUTMIX, MIXUP, RESIZEMIX, box_lam, box_position, box_size, draw_mix_params,
                              method_ids)

from .base import assemble_batch
from .recipes import Recipe


@contextlib.contextmanager
def one_torch_thread():
    """Run torch's CPU ops single-threaded inside the block (restored after).

    Per-sample ops on one image are too small to gain from intra-op threads, and while a loader's own worker
    threads (DALI's) keep every core busy, OpenMP's fork/join barriers stall for milliseconds per op."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _resize_into_box(partner: torch.Tensor, cut_h: int, cut_w: int) -> torch.Tensor:
    """``partner`` [C, H, W] bilinearly resized to [C, cut_h, cut_w]: apply_mix's grid restricted to the box."""
    dev = partner.device
    gy = (2.0 * torch.arange(cut_h, device=dev, dtype=torch.float64) + 1.0) / cut_h - 1.0
    gx = (2.0 * torch.arange(cut_w, device=dev, dtype=torch.float64) + 1.0) / cut_w - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]  # [1, ch, cw, 2]
    work = partner if partner.dtype in (torch.float32, torch.float64) else partner.float()
    out = F.grid_sample(work[None], grid.to(work.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0].to(partner.dtype)


def mix_view_cpu(x: torch.Tensor, lam: torch.Tensor, method: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sdmp_fast.mixing.mix_view`` computed sample by sample (same draws, same values)."""
    n, _, h, w = x.shape
    cut_h, cut_w = box_size(lam, h, w)
    y0, x0 = box_position(cut_h, cut_w, h, w, generator)
    lam_x = lam.to(x.dtype)
    out = torch.empty_like(x)
    rows = zip(method.tolist(), y0.tolist(), x0.tolist(), cut_h.tolist(), cut_w.tolist())
    for i, (m, top, left, ch, cw) in enumerate(rows):
        own, partner = x[i], x[n - 1 - i]
        if m == MIXUP:
            torch.add(lam_x[i] * own, (1.0 - lam_x[i]) * partner, out=out[i])
            continue
        out[i].copy_(own)
        if ch == 0 or cw == 0:
            continue
        box = out[i, :, top:top + ch, left:left + cw]
        if m == RESIZEMIX:
            box.copy_(_resize_into_box(partner, ch, cw))
        elif m == CUTMIX:
            box.copy_(partner[:, top:top + ch, left:left + cw])
    lam_eff = torch.where(method == MIXUP, lam.float(), box_lam(cut_h, cut_w, h, w))
    return out, lam_eff


def assemble_batch_cpu(views: Sequence[torch.Tensor], labels: torch.Tensor, indices: torch.Tensor,
                       recipe: Recipe, generator: Optional[torch.Generator]) -> SDMPBatch:
    """``pipelines.base.assemble_batch`` for CPU tensors (see the module docstring)."""
    mix = recipe.mix
    n = labels.shape[0]
    if not mix.enabled or not mix.mixed_views or n < 2 or n % 2 or views[0].is_cuda:
        return assemble_batch(views, labels, indices, recipe, generator)  # nothing to speed up, or a GPU
    views = list(views)
    method_ids(mix.methods)  # validates, as assemble_batch does
    lam, method = draw_mix_params(n, mix.alpha, mix.methods, generator, views[0].device, mix.per_batch)
    mixed, lams = [], []
    for i in mix.mixed_views:
        m, lam_eff = mix_view_cpu(views[i], lam, method, generator)
        mixed.append(m)
        lams.append(lam_eff)
    return SDMPBatch(views, labels, indices, mixed, tuple(mix.mixed_views), lams[0], method)
