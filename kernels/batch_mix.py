"""Fused batch-flip mixing (sdmp.md §1) as a graph-capturable custom op.

``sdmp_fast::batch_mix`` mixes every sample of up to 8 views in one launch, each sample with its own method
(mixup / cutmix / resizemix), reading partners from the unmixed input. The public functions take the
reference signatures of :mod:`sdmp_fast.mixing` and fall back to it (``*_ref``) off-GPU, for dtypes other than
fp32/fp16/bf16 and when the images require a gradient (the op has no backward: mixing is data preparation).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sdmp_fast import mixing
from sdmp_fast.mixing import CUTMIX, MIXUP, RESIZEMIX, box_lam, box_position, box_size, check_batch_size

from . import _ext

__all__ = ["apply_mix", "apply_mix_ref", "apply_mix_views", "mix_views", "mix_views_ref", "MAX_VIEWS_PER_LAUNCH"]

apply_mix_ref = mixing.apply_mix
mix_views_ref = mixing.mix_views
MAX_VIEWS_PER_LAUNCH = 8
_ALL = (MIXUP, CUTMIX, RESIZEMIX)


@torch.library.custom_op("sdmp_fast::batch_mix", mutates_args=())
def _batch_mix(xs: List[Tensor], lam: Tensor, method: Tensor, y0: List[Tensor], x0: List[Tensor],
               cut_h: List[Tensor], cut_w: List[Tensor], allow_resize: bool) -> List[Tensor]:
    return list(_ext.require(xs[0]).batch_mix_views(xs, lam, method, y0, x0, cut_h, cut_w, allow_resize))


@_batch_mix.register_fake
def _batch_mix_fake(xs, lam, method, y0, x0, cut_h, cut_w, allow_resize):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _use_kernel(xs: Sequence[Tensor], *others: Tensor) -> bool:
    if not xs or any(x.dim() != 4 or x.requires_grad and torch.is_grad_enabled() for x in xs):
        return False
    if _ext.transformed(*xs, *others):  # torch.func / forward AD: the op has no formulas for them
        return False
    if any(x.dtype != xs[0].dtype or x.shape[0] != xs[0].shape[0] for x in xs):
        return False
    n = xs[0].shape[0]
    if n > _ext.MAX_PAIRED_BATCH or any(x[0].numel() > _ext.MAX_INT32 for x in xs if n):
        return False  # beyond the launch limits
    return xs[0].is_floating_point() and _ext.kernel_ok(*xs)


def _ints(t: Tensor) -> Tensor:
    return t.long().contiguous()


def apply_mix_views(xs: Sequence[Tensor], lam: Tensor, method: Tensor, y0: Sequence[Tensor], x0: Sequence[Tensor],
                    cut_h: Sequence[Tensor], cut_w: Sequence[Tensor],
                    method_set: Sequence[int] = _ALL) -> List[Tensor]:
    """apply_mix for several views (sizes may differ) sharing lam/method, in one launch per 8 views."""
    xs = list(xs)
    if not (len(y0) == len(x0) == len(cut_h) == len(cut_w) == len(xs)):
        raise ValueError(f"apply_mix_views: {len(xs)} views but {len(y0)}/{len(x0)}/{len(cut_h)}/{len(cut_w)} "
                         f"y0/x0/cut_h/cut_w")
    for k, (x, a, b, c, d) in enumerate(zip(xs, y0, x0, cut_h, cut_w)):  # the reference's checks, on every route
        mixing.check_mix_inputs(f"apply_mix (view {k})", x, lam, method, a, b, c, d)
    if not _use_kernel(xs, lam, method):
        return [apply_mix_ref(x, lam, method, a, b, c, d, method_set) for x, a, b, c, d in zip(xs, y0, x0, cut_h, cut_w)]
    lam32, meth = lam.float().contiguous(), _ints(method)
    out: List[Tensor] = []
    for s in range(0, len(xs), MAX_VIEWS_PER_LAUNCH):
        e = s + MAX_VIEWS_PER_LAUNCH
        views = [x.contiguous() for x in xs[s:e]]
        mix = _ext.route(_batch_mix, "batch_mix_views", *views)  # no autograd: eager calls go direct
        out += list(mix(views, lam32, meth, [_ints(t) for t in y0[s:e]], [_ints(t) for t in x0[s:e]],
                        [_ints(t) for t in cut_h[s:e]], [_ints(t) for t in cut_w[s:e]], RESIZEMIX in method_set))
    return out


def apply_mix(x: Tensor, lam: Tensor, method: Tensor, y0: Tensor, x0: Tensor, cut_h: Tensor, cut_w: Tensor,
              method_set: Sequence[int] = _ALL) -> Tensor:
    """Deterministic mixing of one view, exactly :func:`sdmp_fast.mixing.apply_mix` (same signature)."""
    return apply_mix_views([x], lam, method, [y0], [x0], [cut_h], [cut_w], method_set)[0]


def mix_views(views: Sequence[Tensor], lam: Tensor, method: Tensor, generator: Optional[torch.Generator] = None,
              method_set: Sequence[int] = _ALL, per_sample: Optional[bool] = None) -> Tuple[List[Tensor], List[Tensor]]:
    """:func:`sdmp_fast.mixing.mix_views` (same signature) with all views mixed in one kernel launch.

    Box positions are drawn from ``generator`` view by view exactly as the reference does, so the same generator
    state gives the same mixed views and lams. Where the kernel cannot run (CPU tensors, ``per_sample=True``,
    ...) this is the reference itself.
    """
    views = list(views)
    if per_sample or not _use_kernel(views, lam, method):
        return mix_views_ref(views, lam, method, generator, method_set, per_sample)
    for v in views:
        check_batch_size(v.shape[0])
        mixing.check_per_sample(v.shape[0], lam, method, v.device)
    boxes, lams = [], []
    for v in views:
        _, _, h, w = v.shape
        cut_h, cut_w = box_size(lam, h, w)
        y0, x0 = box_position(cut_h, cut_w, h, w, generator)
        boxes.append((y0, x0, cut_h, cut_w))
        lams.append(torch.where(method == MIXUP, lam.float(), box_lam(cut_h, cut_w, h, w)))
    mixed = apply_mix_views(views, lam, method, *[[b[i] for b in boxes] for i in range(4)], method_set=method_set)
    return mixed, lams
