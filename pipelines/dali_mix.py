"""Batch-flip mixing inside the DALI graph: the ``mix_in_graph=True`` option of the DALI backend.

The random draws stay on the host and follow ``assemble_batch`` call for call (``draw_mix``): per batch
``draw_mix_params`` (lam, method), then per mixed view ``draw_box`` (the box draw every mixing path shares),
from the same CPU ``torch.Generator``. They reach the graph as per-sample scalars and tiny int arrays through the pipeline's
``external_source`` (no per-pixel host traffic); the pixels are mixed by DALI ops on the views' device:

- partner: ``fn.permute_batch`` with indices n-1-i (the unmixed view, never a mixed one);
- mixup: ``lam * x + (1 - lam) * partner`` (one arithmetic kernel);
- cutmix: one ``fn.multi_paste``: the own image whole, then the partner's box at the same place (a later
  region wins where they overlap: DALI's CPU and GPU kernels both paste in order);
- resizemix: ``fn.resize`` of the whole partner to the box (bilinear, half-pixel centres, no antialias:
  ``F.grid_sample``'s ``align_corners=False`` rule that ``apply_mix`` uses), then the same paste.

Each sample takes only its own method: a DALI ``if`` on the per-sample op id splits the batch, so no sample
pays for a blend, a paste and a resize. A box of zero area (lam close to 1) and an odd batch (no partner) take
a fourth branch that passes the view through unchanged (lam = 1 is reported for those).

``multi_paste`` takes HWC images and our views are CHW: a view is relabelled as the HWC image [3H, W, 1] of
its channel planes stacked (``fn.reshape``, metadata only) and the box is pasted once per plane (regions
1..3). Frames-as-channels (FHWC) would be simpler but DALI 2.4's CPU ``multi_paste`` fails on sequences with
several inputs. ``resize`` takes CHW as is. ``multi_paste`` has no float16 kernel, so with fp16 output the
views are mixed in float32 and cast at the end (``build_pipeline`` does that).

Host cost: ``draw_mix`` is about 1 ms per batch (byol2 B=256, dino B=128, one thread), run in the feeding
callback; the loader runs it with one torch thread (OpenMP barriers stall while DALI's threads hold the
cores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from nvidia.dali import fn, types

from sdmp_fast.mixing import MIXUP, CUTMIX, RESIZEMIX, draw_box, draw_mix_params

from .recipes import Recipe

COPY = 3  # graph-only op id: the view passes through (empty box: drawn method, lam 1; odd batch: mixup, lam 1)
CHANNELS = 3  # the decoder's RGB output

# Feed layout per batch: flip indices [n], raw lam [n]; then per mixed view: op id [n], paste anchors
# [n, 4, 2] (out, and in for cutmix), resizemix in-anchors [n, 4, 2], paste shapes [n, 4, 2], box size [n, 2]
# (float: resize's ``size``).
_SHARED = ((types.INT32, 0), (types.FLOAT, 0))
_PER_VIEW = ((types.INT32, 0),) + ((types.INT32, 2),) * 3 + ((types.FLOAT, 1),)
_PER_VIEW_FEEDS = len(_PER_VIEW)


@dataclass
class MixDraw:
    """One batch's host-drawn mixing: what the SDMPBatch reports (``lam``, ``method``) and what the graph is
    fed (``feeds``, in the order of :func:`feed_types`). ``boxes`` keeps each mixed view's
    (y0, x0, cut_h, cut_w) for inspection and tests, ``lams`` its area-corrected lam (``lam`` is the first)."""
    lam: torch.Tensor
    method: torch.Tensor
    feeds: List[np.ndarray]
    boxes: List[tuple]
    lams: List[torch.Tensor]

    @property
    def raw_lam(self) -> torch.Tensor:
        """The Beta draws before area correction (what mixup blends with)."""
        return torch.from_numpy(self.feeds[1])

    def ops(self, k: int) -> torch.Tensor:
        """Graph op ids of mixed view ``k`` (MIXUP / CUTMIX / RESIZEMIX / COPY)."""
        return torch.from_numpy(self.feeds[2 + _PER_VIEW_FEEDS * k]).long()


def feed_types(num_mixed: int):
    """(dtypes, ndims) of the extra external_source outputs for ``num_mixed`` mixed views."""
    spec = _SHARED + _PER_VIEW * num_mixed
    return [d for d, _ in spec], [k for _, k in spec]


def _view_feeds(op, y0, x0, cut_h, cut_w, size: int) -> List[np.ndarray]:
    """Paste regions on the planes image [3 * size, size, 1]: region 0 is the own image whole, region 1 + c
    the box of channel plane c (rows c * size + y0 ...)."""
    n = op.shape[0]
    y0, x0, ch, cw = (t.numpy().astype(np.int32) for t in (y0, x0, cut_h, cut_w))
    planes = np.arange(CHANNELS, dtype=np.int32)[None, :]
    anchors = np.zeros((n, 1 + CHANNELS, 2), np.int32)
    anchors[:, 1:, 0] = planes * size + y0[:, None]
    anchors[:, 1:, 1] = x0[:, None]
    resize_anchors = np.zeros((n, 1 + CHANNELS, 2), np.int32)
    resize_anchors[:, 1:, 0] = planes * size  # the resized partner, padded to the view's size (mix_view)
    shapes = np.empty((n, 1 + CHANNELS, 2), np.int32)
    shapes[:, 0] = (CHANNELS * size, size)
    shapes[:, 1:, 0], shapes[:, 1:, 1] = ch[:, None], cw[:, None]
    box = np.stack([ch, cw], 1).astype(np.float32)
    return [op.numpy().astype(np.int32), anchors, resize_anchors, shapes, box]


def draw_mix(n: int, recipe: Recipe, generator: torch.Generator) -> MixDraw:
    """The mixing of one batch of ``n`` samples, drawn on the host with ``generator`` (a CPU generator).

    Same calls in the same order as ``assemble_batch`` + ``mix_views``, so with an equal generator state the
    draws are equal; the reported lam is the first mixed view's area-corrected lam, as there. An odd ``n``
    (a short last batch) draws nothing and reports lam = 1, method = mixup (unmixed), as there."""
    mix, specs = recipe.mix, recipe.expanded_views()
    flip = np.arange(n - 1, -1, -1, dtype=np.int32)
    if n < 2 or n % 2:
        lam = torch.ones(n)
        method = torch.zeros(n, dtype=torch.long)
        zero = torch.zeros(n, dtype=torch.long)
        feeds = [flip, lam.numpy()]
        for j in mix.mixed_views:
            feeds += _view_feeds(torch.full((n,), COPY), zero, zero, zero, zero, specs[j].size)
        k = len(mix.mixed_views)
        return MixDraw(lam, method, feeds, [(zero, zero, zero, zero)] * k, [lam] * k)
    lam, method = draw_mix_params(n, mix.alpha, mix.methods, generator, "cpu", mix.per_batch)
    feeds, boxes, lams = [flip, lam.numpy().astype(np.float32)], [], []
    for j in mix.mixed_views:
        s = specs[j].size
        (y0, x0, cut_h, cut_w), lam_eff = draw_box(lam, method, s, s, generator)
        op = torch.where((method != MIXUP) & (cut_h * cut_w == 0), COPY, method)
        feeds += _view_feeds(op, y0, x0, cut_h, cut_w, s)
        boxes.append((y0, x0, cut_h, cut_w))
        lams.append(lam_eff)
    return MixDraw(lams[0], method, feeds, boxes, lams)


def _as_planes(view, shape):
    """CHW -> an HWC image [C * H, W, 1] of the channel planes stacked (metadata only): the HWC-only
    multi_paste then pastes one region per plane."""
    return fn.reshape(view, shape=shape, layout="HWC")


def _paste(view, part, in_anchors, out_anchors, shapes, size: int):
    """The own view whole, then ``part``'s region per channel plane on top; CHW out (every branch of the
    conditional must give the same layout)."""
    planes = [CHANNELS * size, size]
    out = fn.multi_paste(_as_planes(view, planes + [1]), part, part, part, in_anchors=in_anchors,
                         out_anchors=out_anchors, shapes=shapes, output_size=planes)
    return fn.reshape(out, shape=[CHANNELS, size, size], layout="CHW")


def mix_view(view, flip, lam, feeds, *, size: int, gpu: bool):
    """The mixed copy of one CHW float view, per sample by its op id (see the module docstring)."""
    op, anchors, resize_anchors, shapes, box = feeds
    partner = fn.permute_batch(view, indices=flip)  # whole batch, before the split: p(i) = n-1-i
    if op == MIXUP:
        w = lam.gpu() if gpu else lam
        out = w * view + (1.0 - w) * partner
    elif op == CUTMIX:
        part = _as_planes(partner, [CHANNELS * size, size, 1])
        out = _paste(view, part, anchors, anchors, shapes, size)
    elif op == RESIZEMIX:
        small = fn.resize(partner, size=box, interp_type=types.INTERP_LINEAR, antialias=False)
        # padded to the view's size: DALI's GPU multi_paste takes every input's row pitch from input 0's
        # shape (multipaste.cu, 2024), so an input of another width would be read with the wrong pitch
        part = _as_planes(fn.pad(small, axis_names="HW", shape=[size, size]), [CHANNELS * size, size, 1])
        out = _paste(view, part, resize_anchors, anchors, shapes, size)
    else:
        out = view
    return out


def mix_views(views: Sequence, feeds: Sequence, recipe: Recipe, *, gpu: bool) -> list:
    """Mixed copies of ``recipe.mix.mixed_views`` of ``views`` (CHW float DataNodes), from the fed params."""
    flip, lam = feeds[0], feeds[1]
    specs = recipe.expanded_views()
    out = []
    for k, j in enumerate(recipe.mix.mixed_views):
        per_view = feeds[2 + _PER_VIEW_FEEDS * k: 2 + _PER_VIEW_FEEDS * (k + 1)]
        out.append(mix_view(views[j], flip, lam, per_view, size=specs[j].size, gpu=gpu))
    return out
