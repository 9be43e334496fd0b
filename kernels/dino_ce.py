"""Fused SDMP-DINO soft-target cross-entropy (sdmp.md §4) as graph-capturable custom ops.

``sdmp_dino_terms`` here has the signature and result of :func:`sdmp_fast.losses.sdmp_dino_terms` (the
reference, re-exported as ``sdmp_dino_terms_ref``). On a device with the kernels it runs:

* ``sdmp_fast::dino_fwd``: teacher (max, log-sum) per row and the center statistic in one read of the
  teacher logits, then the loss terms from one read of the student logits. Teacher probabilities, the
  lam-mixed source target and the c-weighted mix-teacher target are built once per (pair of partner rows,
  column block) in shared memory, never as [B, K] tensors. When the student logits need a gradient, the
  forward also writes the gradient of ``terms.sum()`` (upstream gradient 1 per term) in a second pass over the
  logits. ``SDMP_DINO_FUSED=1`` does both passes in one launch, each pair's gradient right after its statistics
  (re-read mostly from L2); on an H100 it measured slower than the two launches, so it is not the default.
  ``SDMP_DINO_CLUSTER=1`` (sm_90, K <= 16 x 4,096): one thread-block cluster per pair of partner rows keeps its
  column slices in registers and shared memory and exchanges the row statistics through distributed shared
  memory, so the student logits are read once and the gradient written once (``=require``: an error instead of
  the fallback). Checked on CPU against the reference through the emulated build; not yet timed on a GPU, so
  opt-in.
* backward: ``sdmp_fast::dino_grad_fixup_`` keeps that gradient when the upstream gradients are all 1 (the
  usual ``loss.backward()``), rescales it in place when they are all equal (e.g. a loss scaler) and recomputes
  it otherwise -- decided on the device, no host synchronisation. Without a precomputed gradient (torch.compile
  tracing, ``SDMP_DINO_PRECOMPUTE_GRAD=0``) ``sdmp_fast::dino_grad`` computes it from the saved statistics.

A second backward through one graph (after ``backward(retain_graph=True)``, e.g. one term's after another's)
computes the gradient from the saved statistics: the precomputed one was handed on by the first. Under
torch.compile and under saved-tensor hooks (activation checkpointing, save_on_cpu) none is precomputed.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from sdmp_fast import losses

from . import _ext

__all__ = ["sdmp_dino_terms", "sdmp_dino_terms_ref", "sdmp_dino_terms_and_center",
           "sdmp_dino_terms_and_center_ref", "dino_center_mean_ref"]

sdmp_dino_terms_ref = losses.sdmp_dino_terms
MAX_TEACHER_CROPS = 4
TensorOrSeq = Union[Tensor, Sequence[Tensor]]


def dino_center_mean_ref(teacher_clean: TensorOrSeq) -> Tensor:
    """Mean of the clean teacher logits over crops and batch (fp32 [K]): the batch statistic of the DINO center."""
    t = losses._stack(teacher_clean).detach()
    return losses._upcast(t).reshape(-1, t.shape[-1]).mean(0)


def sdmp_dino_terms_and_center_ref(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam,
                                   tau_s: float = 0.1, tau_t: float = 0.04, mix_weight: float = 0.5):
    terms = sdmp_dino_terms_ref(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam, tau_s,
                                tau_t, mix_weight)
    return terms, dino_center_mean_ref(teacher_clean)


# ------------------------------------------------------------------------------------------------ custom ops

@torch.library.custom_op("sdmp_fast::dino_fwd", mutates_args=())
def _dino_fwd(s_clean: Tensor, s_mixed: Optional[Tensor], t_clean: Tensor, t_mixed: Optional[Tensor],
              center: Tensor, lam: Optional[Tensor], tau_s: float, tau_t: float, mix_weight: float,
              grad_clean: bool, grad_mixed: bool, fused: bool, group_pairs: int
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(terms [4] = dino, mix_source, mix_teacher, loss; center_mean [K]; row_stat [V*B, 4]; lse_t [2TB, 2];
    grad_clean; grad_mixed)."""
    return tuple(_ext.require(s_clean).dino_fwd(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t,
                                                mix_weight, grad_clean, grad_mixed, fused, group_pairs))


def _num_mixed(s_mixed: Optional[Tensor]) -> int:
    return 0 if s_mixed is None else s_mixed.shape[0]


@_dino_fwd.register_fake
def _dino_fwd_fake(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight, grad_clean,
                   grad_mixed, fused, group_pairs):
    sc, b, k = s_clean.shape
    sm, t = _num_mixed(s_mixed), t_clean.shape[0]
    f32 = dict(dtype=torch.float32)
    g_clean = torch.empty_like(s_clean) if grad_clean else s_clean.new_empty(0)
    g_mixed = torch.empty_like(s_mixed) if (grad_mixed and sm > 0) else s_clean.new_empty(0)
    return (s_clean.new_empty(4, **f32), s_clean.new_empty(k, **f32), s_clean.new_empty((sc + sm) * b, 4, **f32),
            s_clean.new_empty(2 * t * b, 2, **f32), g_clean, g_mixed)


@torch.library.custom_op("sdmp_fast::dino_grad", mutates_args=())
def _dino_grad(g_terms: Tensor, s_clean: Tensor, s_mixed: Optional[Tensor], t_clean: Tensor,
               t_mixed: Optional[Tensor], center: Tensor, lam: Optional[Tensor], row_stat: Tensor, lse_t: Tensor,
               tau_s: float, tau_t: float, mix_weight: float, grad_clean: bool, grad_mixed: bool
               ) -> Tuple[Tensor, Tensor]:
    return tuple(_ext.require(s_clean).dino_grad(g_terms, s_clean, s_mixed, t_clean, t_mixed, center, lam, row_stat,
                                                 lse_t, tau_s, tau_t, mix_weight, grad_clean, grad_mixed))


@_dino_grad.register_fake
def _dino_grad_fake(g_terms, s_clean, s_mixed, t_clean, t_mixed, center, lam, row_stat, lse_t, tau_s, tau_t,
                    mix_weight, grad_clean, grad_mixed):
    g_clean = torch.empty_like(s_clean) if grad_clean else s_clean.new_empty(0)
    g_mixed = torch.empty_like(s_mixed) if (grad_mixed and _num_mixed(s_mixed) > 0) else s_clean.new_empty(0)
    return g_clean, g_mixed


@torch.library.custom_op("sdmp_fast::dino_grad_fixup_", mutates_args=("grad_clean", "grad_mixed"))
def _dino_grad_fixup(grad_clean: Tensor, grad_mixed: Tensor, g_terms: Tensor, s_clean: Tensor,
                     s_mixed: Optional[Tensor], t_clean: Tensor, t_mixed: Optional[Tensor], center: Tensor,
                     lam: Optional[Tensor], row_stat: Tensor, lse_t: Tensor, tau_s: float, tau_t: float,
                     mix_weight: float) -> None:
    _ext.require(s_clean).dino_grad_fixup(grad_clean, grad_mixed, g_terms, s_clean, s_mixed, t_clean, t_mixed,
                                          center, lam, row_stat, lse_t, tau_s, tau_t, mix_weight)


@_dino_grad_fixup.register_fake
def _dino_grad_fixup_fake(grad_clean, grad_mixed, g_terms, s_clean, s_mixed, t_clean, t_mixed, center, lam,
                          row_stat, lse_t, tau_s, tau_t, mix_weight):
    return None


def _setup_context(ctx, inputs, output):
    (s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight, grad_clean, grad_mixed, _fused,
     _group_pairs) = inputs
    _, center_mean, row_stat, lse_t, g_clean, g_mixed = output
    ctx.mark_non_differentiable(center_mean, row_stat, lse_t, g_clean, g_mixed)
    # No zero-filled gradients for the outputs the loss does not use: for g_clean / g_mixed those would be two
    # full [V, B, K] fills per backward (~0.1 ms at 10 x 256 x 65,536 on an H100, measured).
    ctx.set_materialize_grads(False)
    ctx.scalars = (tau_s, tau_t, mix_weight)
    ctx.save_for_backward(s_clean, s_mixed, t_clean, t_mixed, center, lam, row_stat, lse_t)
    # The forward's gradient buffers are not saved tensors: the first backward corrects them in place and hands
    # them on, then lets go of them; a second one through the same graph (after backward(retain_graph=True))
    # finds None and computes the gradient from the saved statistics, as it would without them.
    # Nothing else holds them (``_run`` drops them), so their in-place correction cannot be seen elsewhere.
    ctx.grad_buffers = (g_clean, g_mixed) if (grad_clean or grad_mixed) else None


def _backward(ctx, g_terms, *_unused):
    s_clean, s_mixed, t_clean, t_mixed, center, lam, row_stat, lse_t = ctx.saved_tensors
    tau_s, tau_t, mix_weight = ctx.scalars
    buffers, ctx.grad_buffers = ctx.grad_buffers, None
    need_clean, need_mixed = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_terms is None:  # the loss terms were not used (grads are not materialised)
        return (None,) * 13
    if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again

        def terms():
            ref = sdmp_dino_terms_ref(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight)
            return torch.stack([ref[k] for k in ("dino", "mix_source", "mix_teacher", "loss")])

        return _ext.double_backward(ctx, 13, {0: s_clean, 1: s_mixed}, terms, g_terms)
    g = (g_terms[:3] + g_terms[3]).float().contiguous()  # loss = dino + mix_source + mix_teacher
    if buffers is not None:
        g_clean, g_mixed = buffers
        fixup = _ext.route(_dino_grad_fixup, "dino_grad_fixup", s_clean, g, g_clean)
        fixup(g_clean, g_mixed, g, s_clean, s_mixed, t_clean, t_mixed, center, lam, row_stat, lse_t, tau_s, tau_t,
              mix_weight)
    else:
        grad = _ext.route(_dino_grad, "dino_grad", s_clean, g)
        g_clean, g_mixed = grad(g, s_clean, s_mixed, t_clean, t_mixed, center, lam, row_stat, lse_t, tau_s, tau_t,
                                mix_weight, need_clean, need_mixed)
    grad_clean = g_clean if need_clean and g_clean.numel() > 0 else None
    grad_mixed = g_mixed if need_mixed and g_mixed.numel() > 0 else None
    return (grad_clean, grad_mixed) + (None,) * 11


_dino_fwd.register_autograd(_backward, setup_context=_setup_context)


_dino_fwd_eager = _ext.eager_function("dino_fwd", _setup_context, _backward)


# ------------------------------------------------------------------------------------------------ public API

def _env_int(name: str, default: int, choices: Optional[Tuple[int, ...]] = None, low: int = 0) -> int:
    """A tuning variable: unset -> default, else an integer (among choices / >= low) or a ValueError naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or (choices is not None and value not in choices) or value < low:
        want = " or ".join(map(str, choices)) if choices is not None else f"an integer >= {low}"
        raise ValueError(f"{name}={text!r}: expected {want}")
    return value


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private: absent -> assume none
    return top is not None and top(False) is not None


def _precompute_grad() -> bool:
    if not _env_int("SDMP_DINO_PRECOMPUTE_GRAD", 1, (0, 1)):
        return False
    # Under torch.compile the backward graph would have to mutate a buffer it holds: use the functional path.
    # Under saved-tensor hooks (activation checkpointing, save_on_cpu) too: the precomputed gradient is held
    # outside them ([V, B, K], as large as the logits), where they would drop or offload what the op saves.
    return not torch.compiler.is_compiling() and not _saved_tensor_hooks_active()


def _fused_launch() -> Tuple[bool, int]:
    # Default: separate statistics and gradient launches. The single-launch forward (SDMP_DINO_FUSED=1) was
    # measured slower on an H100 (0.94-1.02 ms vs 0.80-0.87 ms at 10 x 256 x 65,536, three runs, 2026-11-26).
    return bool(_env_int("SDMP_DINO_FUSED", 0, (0, 1))), _env_int("SDMP_DINO_GROUP_PAIRS", 4, low=1)


def _prepare(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam):
    """Stacked, contiguous kernel inputs, or None when the reference must run. Inputs that do not fit raise the
    reference's errors (``losses.check_dino_inputs``) on every route."""
    s_clean, t_clean = losses._stack(student_clean, "student_clean"), losses._stack(teacher_clean, "teacher_clean")
    s_mixed = losses._stacked_mixed(student_mixed, "student_mixed")
    t_mixed = losses._stacked_mixed(teacher_mixed, "teacher_mixed")
    lam = losses.check_dino_inputs(s_clean, s_mixed, t_clean, t_mixed, center, lam)
    big = [x for x in (s_clean, s_mixed, t_clean, t_mixed) if x is not None]
    if not _ext.kernel_ok(*big, center) or _ext.transformed(*big, center, lam):
        return None
    if any(x.dtype != s_clean.dtype for x in big):
        # the common autocast case of a student in bf16 beside an fp32 EMA teacher: said, not silently slower
        # (not while compiling: dynamo cannot trace warnings.warn under fullgraph)
        if not torch.compiler.is_compiling():
            warnings.warn(f"sdmp_dino_terms: the logits come in {sorted({str(x.dtype) for x in big})}; the fused "
                          f"kernel takes one dtype, so the PyTorch reference runs (cast the teacher's logits to "
                          f"the student's {s_clean.dtype}, or run the teacher under the same autocast)",
                          stacklevel=3)
        return None
    if t_clean.shape[0] > MAX_TEACHER_CROPS:
        return None
    sc, b, k = s_clean.shape
    t = t_clean.shape[0]
    rows = (sc + (0 if s_mixed is None else s_mixed.shape[0])) * b
    if b > _ext.MAX_PAIRED_BATCH or rows > _ext.MAX_INT32 or (b + 1) // 2 * -(-k // 256) > _ext.MAX_INT32:
        return None  # beyond the launch limits (sizes no GPU holds today; the extension counts rows and units in int32)
    if losses.dino_pair_count(sc, 0 if s_mixed is None else s_mixed.shape[0], t) == 0:
        return None  # no pair: let the reference produce its NaN
    # center [1, K] is DINO's own layout (a registered buffer), [K] the mean's: both are read as [K]
    lam32 = lam.detach().float().contiguous() if s_mixed is not None else None
    return (s_clean.contiguous(), None if s_mixed is None else s_mixed.contiguous(), t_clean.detach().contiguous(),
            None if t_mixed is None else t_mixed.detach().contiguous(),
            center.detach().float().reshape(k).contiguous(), lam32)


def _run(prepared, tau_s, tau_t, mix_weight) -> Tuple[Tensor, Tensor]:
    s_clean, s_mixed, t_clean, t_mixed, center, lam = prepared
    grad_on = torch.is_grad_enabled() and _precompute_grad()
    grad_clean = grad_on and s_clean.requires_grad
    grad_mixed = grad_on and s_mixed is not None and s_mixed.requires_grad
    fused, group_pairs = _fused_launch()
    fwd = _dino_fwd_eager.apply if _ext.direct(s_clean, s_mixed, t_clean, t_mixed, center, lam) else _dino_fwd
    out = fwd(s_clean, s_mixed, t_clean, t_mixed, center, lam, float(tau_s), float(tau_t), float(mix_weight),
              grad_clean, grad_mixed, fused, group_pairs)
    return out[0], out[1]


def _terms_dict(terms: Tensor) -> Dict[str, Tensor]:
    # Tensors of their own, not views of ``terms`` (unbind's): autograd forbids changing a view of a custom op's
    # output in place, and ``loss /= accumulation_steps`` on the reference's terms works.
    return {name: terms[i].clone() for i, name in enumerate(("dino", "mix_source", "mix_teacher", "loss"))}


def sdmp_dino_terms(student_clean, student_mixed, teacher_clean, teacher_mixed, center: Tensor,
                    lam: Optional[Tensor], tau_s: float = 0.1, tau_t: float = 0.04,
                    mix_weight: float = 0.5) -> Dict[str, Tensor]:
    """SDMP-DINO loss terms, exactly :func:`sdmp_fast.losses.sdmp_dino_terms` (same arguments, same dict).

    Gradients flow to the student logits only (the teacher is an EMA: no gradient, as in the reference).
    Passing stacked tensors avoids a copy; sequences of [B, K] tensors are stacked first.
    """
    prepared = _prepare(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam)
    if prepared is None:
        return sdmp_dino_terms_ref(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam, tau_s,
                                   tau_t, mix_weight)
    return _terms_dict(_run(prepared, tau_s, tau_t, mix_weight)[0])


def sdmp_dino_terms_and_center(student_clean, student_mixed, teacher_clean, teacher_mixed, center: Tensor,
                               lam: Optional[Tensor], tau_s: float = 0.1, tau_t: float = 0.04,
                               mix_weight: float = 0.5) -> Tuple[Dict[str, Tensor], Tensor]:
    """(terms, batch mean of the clean teacher logits [K] fp32): the mean comes free with the kernel's teacher
    pass; feed it to ``losses.dino_center_update(center, None, batch_mean=...)`` (all-reduce it first when
    distributed)."""
    prepared = _prepare(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam)
    if prepared is None:
        return sdmp_dino_terms_and_center_ref(student_clean, student_mixed, teacher_clean, teacher_mixed, center,
                                              lam, tau_s, tau_t, mix_weight)
    terms, center_mean = _run(prepared, tau_s, tau_t, mix_weight)
    return _terms_dict(terms), center_mean


def cluster_launch_info(student_clean: Tensor, teacher_clean: Tensor) -> Optional[Dict[str, int]]:
    """How the cluster forward ($SDMP_DINO_CLUSTER) would launch for these stacked [crops, B, K] logits under the
    current $SDMP_DINO_* settings, or None where no extension serves them: ``blocks`` per cluster,
    ``smem_bytes`` and ``threads`` per block, ``resident_clusters`` the card holds at once (0: it cannot run here,
    -1: the emulated CPU build). The benchmark prints it beside the cluster rows: the occupancy behind their time
    (clusters of 16 blocks need a GPC with 16 free SMs)."""
    ext = _ext.extension_for(student_clean)
    if ext is None or student_clean.dim() != 3 or teacher_clean.dim() != 3:
        return None
    blocks, smem, threads, resident = ext.dino_cluster_info(student_clean, teacher_clean)
    return {"blocks": blocks, "smem_bytes": smem, "threads": threads, "resident_clusters": resident}
