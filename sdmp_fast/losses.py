"""Reference (plain PyTorch) SDMP losses: the definitions the fused CUDA kernels must match.

MoCo v3 side (sdmp.md §3): soft-label cross-entropies over the keys with two non-zero targets per row, the own
key and the partner's key; computed from log-sum-exp and two gathers, never from a dense [n, N] label matrix.
DINO side (sdmp.md §4): dense soft-target cross-entropies between centred/sharpened teacher distributions and
student log-softmax over K prototypes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .mixing import check_lam_range, values_checkable

__all__ = ["mix_coefficient", "mix_mix_weights", "flip_indices", "two_hot_cross_entropy",
           "soft_target_cross_entropy", "moco_logits", "sdmp_moco_terms", "sdmp_moco_loss",
           "dino_teacher_probs", "dino_center_update", "sdmp_dino_terms"]


def mix_coefficient(lam: torch.Tensor, lam_partner: Optional[torch.Tensor] = None) -> torch.Tensor:
    """c_i = min(lam_i, 1 - lam_p) + min(1 - lam_i, lam_p): how much image i and its partner's mixed image share.

    lam_partner defaults to ``lam.flip(0)`` (the batch-flip partner). Always 0 <= c <= 1 and c_i = c_p.
    """
    lam_p = lam.flip(0) if lam_partner is None else lam_partner
    return torch.minimum(lam, 1 - lam_p) + torch.minimum(1 - lam, lam_p)


def mix_mix_weights(c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights of the own and the partner's mixed key in the mix-mix term: 1/(1+c), c/(1+c)."""
    return 1.0 / (1.0 + c), c / (1.0 + c)


def flip_indices(n: int, rank: int = 0, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global key indices of each local sample and of its partner under the per-rank flip (sdmp.md §2)."""
    i = torch.arange(n, device=device)
    return rank * n + i, rank * n + (n - 1 - i)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _one_per_row(name: str, t: torch.Tensor, n: int, device: torch.device, single_ok: bool) -> torch.Tensor:
    """``t`` as [n] on ``device`` or a ValueError naming it; with ``single_ok`` a single value (0-dim or [1]) is
    expanded to every row, as :func:`check_moco_inputs` does for lam (metadata only: no host sync)."""
    if single_ok and not isinstance(t, torch.Tensor):  # a Python number: "a single one", as lam may be
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if single_ok and t.dim() <= 1 and t.numel() == 1:
        t = t.reshape(()).expand(n)
    if tuple(t.shape) != (n,):
        what = "one per row or a single one" if single_ok else "one per row"
        raise ValueError(f"{name}: expected [{n}] ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, the logits on {device}: every input must be on one device")
    return t


def check_two_hot_inputs(logits, index_a, index_b, weight_a, weight_b) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shapes and devices of :func:`two_hot_cross_entropy`'s inputs, checked alike by the reference and the
    kernel (so that code passing on a CPU does not fail on a GPU); returns the weights as [n]."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [n, N], got shape {tuple(logits.shape)}")
    n, dev = logits.shape[0], logits.device
    _one_per_row("index_a", index_a, n, dev, False)
    _one_per_row("index_b", index_b, n, dev, False)
    return _one_per_row("weight_a", weight_a, n, dev, True), _one_per_row("weight_b", weight_b, n, dev, True)


def two_hot_cross_entropy(logits: torch.Tensor, index_a: torch.Tensor, index_b: torch.Tensor,
                          weight_a: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """Per-row -(w_a log p[a] + w_b log p[b]), p = softmax(logits) over the last dim; returns [n] in fp32.

    The paper's soft-label CE (a weighted sum of log-probabilities), not -log(w_a p[a] + w_b p[b]). logits
    [n, N]; indices [n]; weights [n] or a single one for every row.
    """
    weight_a, weight_b = check_two_hot_inputs(logits, index_a, index_b, weight_a, weight_b)
    x = _upcast(logits)
    lse = torch.logsumexp(x, dim=-1)
    la = x.gather(1, index_a[:, None]).squeeze(1)
    lb = x.gather(1, index_b[:, None]).squeeze(1)
    wa, wb = weight_a.to(x.dtype), weight_b.to(x.dtype)
    return (wa + wb) * lse - _weighted(wa, la) - _weighted(wb, lb)


def _weighted(w: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """w * logit, where a masked (-inf) logit of weight 0 is not read (0 x -inf is NaN): SDMP-MoCo's source term
    (weights 1, 0) over keys with a masked column stays finite."""
    return torch.where((w == 0) & (logit == float("-inf")), torch.zeros_like(logit), w * logit)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row -sum target * log_softmax(logits), in fp32 for half inputs; returns [n]."""
    x = _upcast(logits)
    return -(target.to(x.dtype) * F.log_softmax(x, dim=-1)).sum(-1)


def moco_logits(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """normalize(q) @ normalize(k).T / tau (MoCo v3's contrastive logits)."""
    return F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / tau


def _key_offset(n: int, num_keys: int, rank: int, world_size: int) -> int:
    if num_keys == n:
        return 0  # local keys: this rank's samples only
    if num_keys == n * world_size:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        return rank
    hint = (f"; all-gathered keys need world_size={num_keys // n} and this rank" if world_size == 1 and num_keys % n == 0
            else "")
    raise ValueError(f"keys: expected {n} (local) or {n * world_size} (all-gathered over world_size="
                     f"{world_size}) rows, got {num_keys}{hint}")


def check_unpaired_middle(lam: torch.Tensor) -> None:
    """An odd batch's middle image is its own batch-flip partner (sdmp.md §1): it can only be an unmixed copy,
    lam = 1, as the loaders hand out in a short odd last batch (drop_last=False). Any other lam there would
    quietly turn its mixed terms into plain ones, so it is refused where that costs no sync (a CPU lam)."""
    n = lam.shape[0]
    if n % 2 == 0 or not values_checkable(lam):
        return
    if float(lam[n // 2]) != 1.0:
        raise ValueError(f"lam: batch size {n} is odd, so image {n // 2} is its own batch-flip partner and must be "
                         f"unmixed (lam 1), got {float(lam[n // 2])}; mix an even batch (sdmp.md §1)")


def check_moco_inputs(q1, q2m, k1, k2, k1m, lam) -> torch.Tensor:
    """Shapes of the SDMP-MoCo inputs (metadata only: no host sync), an error naming the argument that is off;
    returns lam as [n] (a single lam, one for the whole batch, is expanded). lam's range [0, 1] is checked where
    that costs no sync (a CPU lam, see mixing.check_lam_range): outside it the targets are no distribution."""
    if q1.dim() != 2:
        raise ValueError(f"q1: expected queries [n, d], got shape {tuple(q1.shape)}")
    n, d = q1.shape
    if tuple(q2m.shape) != (n, d):
        raise ValueError(f"q2m: expected the shape of q1 {(n, d)}, got {tuple(q2m.shape)}")
    for name, k in (("k1", k1), ("k2", k2), ("k1m", k1m)):
        if k.dim() != 2 or k.shape[1] != d or k.shape[0] != k1.shape[0]:
            raise ValueError(f"{name}: expected keys [N, {d}] with the N of k1 ({k1.shape[0]}), got "
                             f"{tuple(k.shape)}")
    if not isinstance(lam, torch.Tensor):  # a single Python number, as DINO's lam may be
        lam = torch.as_tensor(lam, dtype=torch.float32, device=q1.device)
    if lam.numel() == 1:
        lam = lam.reshape(()).expand(n)
    if tuple(lam.shape) != (n,):
        raise ValueError(f"lam: expected one lam per query [{n}] (or a single one), got {tuple(lam.shape)}")
    for name, t in (("q2m", q2m), ("k1", k1), ("k2", k2), ("k1m", k1m), ("lam", lam)):
        if t.device != q1.device:
            raise ValueError(f"{name}: on {t.device}, q1 on {q1.device}: every input must be on one device")
    check_lam_range(lam)
    check_unpaired_middle(lam)
    return lam


def sdmp_moco_terms(q1: torch.Tensor, q2m: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                    k1m: torch.Tensor, lam: torch.Tensor, tau: float = 0.2, rank: int = 0,
                    world_size: int = 1) -> Dict[str, torch.Tensor]:
    """The three SDMP-MoCo v3 terms (sdmp.md §3), each a scalar already multiplied by 2*tau.

    q1 = f(x1), q2m = f(x2m) (queries, local [n, d]); k1, k2, k1m = momentum-encoder keys, either local [n, d]
    or all-gathered [world_size * n, d] in rank order. Sample i's own key is ``rank*n + i``, its partner's
    ``rank*n + n-1-i`` (per-rank flip); lam [n] is local.
      source     = CE(q1 vs k2, own)
      mix_source = soft CE(q2m vs k1; lam own, 1-lam partner)
      mix_mix    = soft CE(q2m vs k1m; 1/(1+c) own, c/(1+c) partner)
    """
    lam = check_moco_inputs(q1, q2m, k1, k2, k1m, lam)
    n = q1.shape[0]
    r = _key_offset(n, k1.shape[0], rank, world_size)
    own, partner = flip_indices(n, r, q1.device)
    scale = 2.0 * tau
    ones, zeros = torch.ones_like(lam), torch.zeros_like(lam)
    w1, w2 = mix_mix_weights(mix_coefficient(lam))
    source = two_hot_cross_entropy(moco_logits(q1, k2, tau), own, partner, ones, zeros)
    mix_source = two_hot_cross_entropy(moco_logits(q2m, k1, tau), own, partner, lam, 1 - lam)
    mix_mix = two_hot_cross_entropy(moco_logits(q2m, k1m, tau), own, partner, w1, w2)
    return {"source": source.mean() * scale, "mix_source": mix_source.mean() * scale,
            "mix_mix": mix_mix.mean() * scale}


def sdmp_moco_loss(terms: Dict[str, torch.Tensor], mix_weight: float = 1.0) -> torch.Tensor:
    """source + mix_weight * (mix_source + mix_mix); Algorithm 1 uses mix_weight = 1 (reference code 0.5)."""
    return terms["source"] + mix_weight * (terms["mix_source"] + terms["mix_mix"])


# ----------------------------------------------------------------------------------------------- DINO side

def dino_teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, tau_t: float) -> torch.Tensor:
    """P_t = softmax((t - center) / tau_t), fp32, no gradient (the teacher is an EMA, never trained)."""
    t = _upcast(teacher_logits.detach())
    return F.softmax((t - center.to(t.dtype)) / tau_t, dim=-1)


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9,
                       batch_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """New center = m * center + (1 - m) * mean of the clean teacher outputs (returns a new tensor).

    ``batch_mean`` lets a distributed caller pass the all-reduced mean instead.
    """
    if batch_mean is None:
        batch_mean = _upcast(teacher_logits.detach()).reshape(-1, teacher_logits.shape[-1]).mean(0)
    return center * momentum + batch_mean * (1 - momentum)


def _stack(x: Union[torch.Tensor, Sequence[torch.Tensor]], name: str = "crops") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    crops = list(x)
    shapes = {tuple(c.shape) for c in crops}
    if len(shapes) > 1:  # torch.stack's own error named no argument
        raise ValueError(f"{name}: every crop's logits must have one shape [B, K], got "
                         f"{[tuple(c.shape) for c in crops]}")
    return torch.stack(crops)


def check_dino_inputs(s_clean: torch.Tensor, s_mixed: Optional[torch.Tensor], t_clean: torch.Tensor,
                      t_mixed: Optional[torch.Tensor], center: torch.Tensor,
                      lam: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Shapes and devices of :func:`sdmp_dino_terms`' (stacked) inputs, an error naming the argument that is off,
    checked alike by the reference and the kernel (metadata only: no host sync). Returns lam as [B] (a single
    lam is expanded), or None without mixed crops. A CPU lam must lie in [0, 1] (mixing.check_lam_range), and
    in an odd batch the middle image's lam must be 1 (:func:`check_unpaired_middle`)."""
    if s_clean.dim() != 3:
        raise ValueError(f"student_clean: expected [crops, B, K] (or a list of [B, K]), got {tuple(s_clean.shape)}")
    _, b, k = s_clean.shape
    for name, t in (("teacher_clean", t_clean), ("student_mixed", s_mixed), ("teacher_mixed", t_mixed)):
        if t is None:
            continue
        if t.dim() != 3 or tuple(t.shape[1:]) != (b, k):
            raise ValueError(f"{name}: expected [crops, {b}, {k}] (B and K of student_clean), got {tuple(t.shape)}")
        if t.device != s_clean.device:
            raise ValueError(f"{name}: on {t.device}, student_clean on {s_clean.device}: every input must be on "
                             f"one device")
    if t_clean.shape[0] < 1:
        raise ValueError("teacher_clean: no teacher crop")
    if t_mixed is not None and t_mixed.shape[0] != t_clean.shape[0]:
        raise ValueError(f"teacher_mixed: {t_mixed.shape[0]} crops, teacher_clean {t_clean.shape[0]}: one mixed "
                         f"teacher crop per clean one")
    if tuple(center.shape) not in ((k,), (1, k)):
        raise ValueError(f"center: expected [{k}] or [1, {k}] (K of the logits), got {tuple(center.shape)}")
    if center.device != s_clean.device:
        raise ValueError(f"center: on {center.device}, student_clean on {s_clean.device}")
    if s_mixed is None:
        return None
    if lam is None:
        raise ValueError("lam: the mixed crops' lam [B] is needed with student_mixed")
    if not isinstance(lam, torch.Tensor):
        lam = torch.as_tensor(lam, dtype=torch.float32, device=s_clean.device)
    if lam.dim() <= 1 and lam.numel() == 1:
        lam = lam.reshape(()).expand(b)
    if tuple(lam.shape) != (b,):
        raise ValueError(f"lam: expected one per image [{b}] (or a single one), got {tuple(lam.shape)}")
    if lam.device != s_clean.device:
        raise ValueError(f"lam: on {lam.device}, student_clean on {s_clean.device}: every input must be on one device")
    check_lam_range(lam)
    check_unpaired_middle(lam)
    return lam


def dino_pair_count(n_clean: int, n_mixed: int, n_teacher: int) -> int:
    """(teacher, student) pairs :func:`sdmp_dino_terms` averages over: every teacher crop with every student crop,
    but not with its own view (the first n_teacher clean crops are the teacher's)."""
    return n_teacher * n_clean - min(n_teacher, n_clean) + n_teacher * n_mixed


def _stacked_mixed(x, name: str = "mixed crops") -> Optional[torch.Tensor]:
    return _stack(x, name) if x is not None and len(x) > 0 else None


def _added(total: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x if total is None else total + x


def sdmp_dino_terms(student_clean, student_mixed, teacher_clean, teacher_mixed, center: torch.Tensor,
                    lam: Optional[torch.Tensor], tau_s: float = 0.1, tau_t: float = 0.04,
                    mix_weight: float = 0.5) -> Dict[str, torch.Tensor]:
    """SDMP-DINO loss terms (sdmp.md §4, eq. 6-9).

    student_clean  [Sc, B, K] logits of the clean crops; crops 0..T-1 are the global crops the teacher saw.
    student_mixed  [Sm, B, K] logits of the mixed (local) crops, or None / empty.
    teacher_clean  [T, B, K] teacher logits of the clean global crops (T = 2).
    teacher_mixed  [T, B, K] teacher logits of the same global crops mixed with the same lam, or None.
    lam            [B] area-corrected lam of the mixed student crops (partner = batch flip, local to the rank);
                   the trainer passes the mixed local crops' own lam (eq. 7 exact), which the mixed teacher
                   global crops share up to box rounding (sdmp.md: "mixed with the same lam").

    Choices the paper leaves open, made here:
      * every (teacher global crop, student crop) pair counts once, same-view clean pairs excluded (DINO);
      * a mixed student crop pairs with every teacher global crop; its pair loss is
        mix_weight * (source-teacher H, eq. 7) + mix_weight * (mix-teacher H, eq. 8);
      * the sum is divided by the total number of pairs (clean + mixed), as DINO averages its pairs.
    With mix_weight = 0.5 and lam = 1 (mixed crops identical to clean ones, c = 0) each mixed pair equals the
    plain DINO pair, so the loss is exactly DINO over all crops. Without teacher_mixed the source-teacher
    term takes the whole pair weight (2 * mix_weight).
    Returns {"dino", "mix_source", "mix_teacher", "loss"} with loss = dino + mix_source + mix_teacher.
    """
    s_clean, t_clean = _stack(student_clean, "student_clean"), _stack(teacher_clean, "teacher_clean")
    s_mixed = _stacked_mixed(student_mixed, "student_mixed")
    t_mixed = _stacked_mixed(teacher_mixed, "teacher_mixed")
    lam = check_dino_inputs(s_clean, s_mixed, t_clean, t_mixed, center, lam)
    n_teacher = t_clean.shape[0]
    p_t = dino_teacher_probs(t_clean, center, tau_t)  # [T, B, K]
    dino_sum, n_pairs = None, 0  # None: no pair yet (a Python 0.0 start upsets torch.func's jacrev)
    for iq in range(n_teacher):
        for v in range(s_clean.shape[0]):
            if v == iq:
                continue
            dino_sum = _added(dino_sum, soft_target_cross_entropy(s_clean[v] / tau_s, p_t[iq]).mean())
            n_pairs += 1
    src_sum, mix_sum = None, None
    dtype = _upcast(s_clean).dtype
    if s_mixed is not None:
        lam_ = lam.to(dtype)[:, None]
        w_src = mix_weight if t_mixed is not None else 2.0 * mix_weight
        if t_mixed is not None:
            p_tm = dino_teacher_probs(t_mixed, center, tau_t)
            w1, w2 = mix_mix_weights(mix_coefficient(lam.to(dtype)))
        for iq in range(n_teacher):
            source_target = lam_ * p_t[iq] + (1 - lam_) * p_t[iq].flip(0)  # eq. 7
            for m in range(s_mixed.shape[0]):
                logits = s_mixed[m] / tau_s
                src_sum = _added(src_sum, w_src * soft_target_cross_entropy(logits, source_target).mean())
                if t_mixed is not None:  # eq. 8; one log-softmax shared by both targets
                    target = w1[:, None] * p_tm[iq] + w2[:, None] * p_tm[iq].flip(0)
                    mix_sum = _added(mix_sum, mix_weight * soft_target_cross_entropy(logits, target).mean())
                n_pairs += 1
    # A term with no pair is a zero in the students' graph (a sum of no element, never 0 * an inf logit): every
    # term is differentiable as the kernel's are, so terms["mix_teacher"].backward() without mixed teacher crops
    # gives zero gradients. Only such terms carry it: it would add a zero gradient to every backward.
    sums = [dino_sum, src_sum, mix_sum]
    if any(x is None for x in sums):
        zero = s_clean[..., :0].sum(dtype=dtype)
        if s_mixed is not None:
            zero = zero + s_mixed[..., :0].sum(dtype=dtype)
        sums = [zero if x is None else x for x in sums]
    terms = {name: x / n_pairs for name, x in zip(("dino", "mix_source", "mix_teacher"), sums)}
    terms["loss"] = terms["dino"] + terms["mix_source"] + terms["mix_teacher"]
    return terms
