"""Two-hot soft-label cross-entropy (SDMP-MoCo, sdmp.md §3) as a graph-capturable custom op.

Layering as in flash-attn: CUDA kernel (csrc/two_hot_ce) -> ``torch.library`` custom ops ``sdmp_fast::two_hot_ce``
(+ fake, + autograd) and ``sdmp_fast::two_hot_ce_bwd`` -> the public functions below, which take exactly the
reference signatures and fall back to the references (``*_ref``) off-GPU or when the kernels are unavailable.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sdmp_fast import losses
from sdmp_fast.losses import flip_indices, mix_coefficient, mix_mix_weights

from . import _ext

__all__ = ["two_hot_cross_entropy", "two_hot_cross_entropy_ref", "sdmp_moco_terms", "sdmp_moco_terms_ref",
           "two_hot_ce"]

two_hot_cross_entropy_ref = losses.two_hot_cross_entropy
sdmp_moco_terms_ref = losses.sdmp_moco_terms


@torch.library.custom_op("sdmp_fast::two_hot_ce", mutates_args=())
def _two_hot_ce(logits: Tensor, index_a: Tensor, index_b: Tensor, weight_a: Tensor, weight_b: Tensor,
                logit_div: float, out_scale: float) -> Tuple[Tensor, Tensor]:
    """(loss [n] fp32, lse [n] fp32): loss = out_scale * two-hot CE of logits / logit_div."""
    return tuple(_ext.require(logits).two_hot_ce_fwd(logits, index_a, index_b, weight_a, weight_b, logit_div,
                                                     out_scale))


@_two_hot_ce.register_fake
def _two_hot_ce_fake(logits, index_a, index_b, weight_a, weight_b, logit_div, out_scale):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("sdmp_fast::two_hot_ce_bwd", mutates_args=())
def _two_hot_ce_bwd(grad_loss: Tensor, logits: Tensor, lse: Tensor, index_a: Tensor, index_b: Tensor,
                    weight_a: Tensor, weight_b: Tensor, logit_div: float, out_scale: float) -> Tensor:
    return _ext.require(logits).two_hot_ce_bwd(grad_loss, logits, lse, index_a, index_b, weight_a, weight_b,
                                               logit_div, out_scale)


@_two_hot_ce_bwd.register_fake
def _two_hot_ce_bwd_fake(grad_loss, logits, lse, index_a, index_b, weight_a, weight_b, logit_div, out_scale):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, index_a, index_b, weight_a, weight_b, logit_div, out_scale = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse
    ctx.save_for_backward(logits, lse, index_a, index_b, weight_a, weight_b)
    ctx.scales = (logit_div, out_scale)


def _backward(ctx, grad_loss, _grad_lse):
    logits, lse, index_a, index_b, weight_a, weight_b = ctx.saved_tensors
    logit_div, out_scale = ctx.scales
    if grad_loss is None:
        return (None,) * 7
    if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
        return _ext.double_backward(
            ctx, 7, {0: logits, 3: weight_a, 4: weight_b},
            lambda: out_scale * two_hot_cross_entropy_ref(logits / logit_div, index_a, index_b, weight_a, weight_b),
            grad_loss)
    grad_loss = grad_loss.float()
    g_logits = g_wa = g_wb = None
    if ctx.needs_input_grad[0]:
        bwd = _ext.route(_two_hot_ce_bwd, "two_hot_ce_bwd", logits, grad_loss)
        g_logits = bwd(grad_loss, logits, lse, index_a, index_b, weight_a, weight_b, logit_div, out_scale)
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:  # d loss / d w = out_scale * (lse - x[target])
        x = (logits.detach() / logit_div).float()
        g = grad_loss * out_scale
        g_wa = g * (lse - x.gather(1, index_a[:, None]).squeeze(1))
        g_wb = g * (lse - x.gather(1, index_b[:, None]).squeeze(1))
    return g_logits, None, None, g_wa, g_wb, None, None


_two_hot_ce.register_autograd(_backward, setup_context=_setup_context)


_two_hot_ce_eager = _ext.eager_function("two_hot_ce_fwd", _setup_context, _backward)


def two_hot_ce(logits: Tensor, index_a: Tensor, index_b: Tensor, weight_a: Tensor, weight_b: Tensor,
               logit_div: float = 1.0, out_scale: float = 1.0) -> Tensor:
    """Kernel entry: out_scale * two_hot_cross_entropy(logits / logit_div, ...) per row, fp32 [n].

    ``logits / logit_div`` is evaluated like PyTorch on CUDA (fp32 reciprocal, rounded to the logits dtype),
    inside the kernel: MoCo passes the raw cosine logits with logit_div = tau and out_scale = 2 * tau.
    """
    if logits.stride(-1) != 1:  # .contiguous() keeps e.g. a [n, 1] column of stride (1, n): torch deems it contiguous
        logits = logits.clone(memory_format=torch.contiguous_format)
    args = (logits, index_a.long().contiguous(), index_b.long().contiguous(), weight_a.float().contiguous(),
            weight_b.float().contiguous(), float(logit_div), float(out_scale))
    return (_two_hot_ce_eager.apply if _ext.direct(*args[:5]) else _two_hot_ce)(*args)[0]


def _use_kernel(logits: Tensor) -> bool:
    return (logits.dim() == 2 and logits.shape[1] > 0 and logits.shape[0] <= _ext.MAX_INT32
            and _ext.kernel_ok(logits))


def two_hot_cross_entropy(logits: Tensor, index_a: Tensor, index_b: Tensor, weight_a: Tensor,
                          weight_b: Tensor) -> Tensor:
    """Per-row -(w_a log p[a] + w_b log p[b]), p = softmax(logits); fp32 [n] (see losses.two_hot_cross_entropy).

    Kernel: one pass over each row forward, one read + one gradient write backward. An out-of-range index gives
    a NaN loss (checking it would need a host synchronisation); the reference raises instead.
    """
    weight_a, weight_b = losses.check_two_hot_inputs(logits, index_a, index_b, weight_a, weight_b)
    if not _use_kernel(logits) or _ext.transformed(logits, index_a, index_b, weight_a, weight_b):
        return two_hot_cross_entropy_ref(logits, index_a, index_b, weight_a, weight_b)
    return two_hot_ce(logits, index_a, index_b, weight_a, weight_b)


def sdmp_moco_terms(q1: Tensor, q2m: Tensor, k1: Tensor, k2: Tensor, k1m: Tensor, lam: Tensor, tau: float = 0.2,
                    rank: int = 0, world_size: int = 1) -> Dict[str, Tensor]:
    """The three SDMP-MoCo v3 terms (see losses.sdmp_moco_terms), the cross-entropies on the fused kernel.

    The 1/tau of the logits and the 2*tau of MoCo v3 are applied inside the kernel (no extra pass over the
    [n, N] logits); keys may be local [n, d] or all-gathered [world_size * n, d] with the per-rank offsets.
    """
    lam = losses.check_moco_inputs(q1, q2m, k1, k2, k1m, lam)
    if not _ext.kernel_ok(q1, q2m, k1, k2, k1m) or q1.shape[0] == 0 or _ext.transformed(q1, q2m, k1, k2, k1m, lam):
        return sdmp_moco_terms_ref(q1, q2m, k1, k2, k1m, lam, tau, rank, world_size)
    n = q1.shape[0]
    r = losses._key_offset(n, k1.shape[0], rank, world_size)
    own, partner = flip_indices(n, r, q1.device)
    lam32 = lam.float()
    ones, zeros = torch.ones_like(lam32), torch.zeros_like(lam32)
    w1, w2 = mix_mix_weights(mix_coefficient(lam32))
    qn1, qn2 = F.normalize(q1, dim=1), F.normalize(q2m, dim=1)

    def ce(q: Tensor, k: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
        cosine = q @ F.normalize(k, dim=1).t()
        return two_hot_ce(cosine, own, partner, wa, wb, logit_div=tau, out_scale=2.0 * tau).mean()

    return {"source": ce(qn1, k2, ones, zeros), "mix_source": ce(qn2, k1, lam32, 1 - lam32),
            "mix_mix": ce(qn2, k1m, w1, w2)}
