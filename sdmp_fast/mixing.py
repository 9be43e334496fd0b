"""Intra-batch ("batch-flip") mixing of SDMP (sdmp.md §1).

Image i is mixed with its partner n-1-i, read from the *unmixed* batch (``x.flip(0)``). Each sample draws its
own lambda ~ Beta(alpha, alpha) and its own method among mixup / cutmix / resizemix. For the box methods lambda
is recomputed from the pixels actually pasted, so the returned lambda is exactly the fraction of the image that
still comes from sample i. Every view of an image gets the same lambda, method and box size; box positions are
drawn per view.

Everything is vectorised tensor math on the views' device: no per-sample Python loop and no host
synchronisation, so it can run on a side stream or inside a CUDA graph. Randomness comes only from the
``torch.Generator`` passed in (it must live on the views' device).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .batch import exact_device

__all__ = ["METHODS", "method_ids", "sample_beta", "draw_mix_params", "box_size", "box_position",
           "box_lam", "draw_box", "apply_mix", "mix_view", "mix_view_per_sample", "mix_views", "sdmp_mix", "check_batch_size",
           "check_view", "check_per_sample", "check_lam_range", "check_mix_inputs"]

METHODS: Tuple[str, ...] = ("mixup", "cutmix", "resizemix")
MIXUP, CUTMIX, RESIZEMIX = 0, 1, 2
# Candidates per sample for the Marsaglia-Tsang gamma sampler. Acceptance is >= 95% per candidate for
# shape >= 1 (we boost shape < 1 to shape + 1), so 16 candidates all failing has probability < 1e-20.
_GAMMA_CANDIDATES = 16


def method_ids(methods: Sequence[str]) -> Tuple[int, ...]:
    """Names -> ids, validated (error names the unknown method)."""
    if isinstance(methods, str):
        methods = (methods,)
    if len(methods) == 0:
        raise ValueError("methods: at least one of mixup, cutmix, resizemix is required")
    ids = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown mixing method {m!r}; choose among {', '.join(METHODS)}")
        ids.append(METHODS.index(m))
    return tuple(dict.fromkeys(ids))


def check_batch_size(n: int) -> None:
    if n < 2 or n % 2:
        raise ValueError(
            f"batch size {n}: batch-flip mixing pairs image i with n-1-i, so the (per-rank) batch size must be "
            f"even and >= 2 (with an odd batch the middle image would be its own partner)")


def _log_gamma_sample(shape: float, n: int, generator, device) -> torch.Tensor:
    """log of Gamma(shape, 1) samples, vectorised Marsaglia-Tsang with a fixed number of candidates."""
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    z = torch.randn(_GAMMA_CANDIDATES, n, generator=generator, device=device, dtype=torch.float64)
    u = torch.rand(_GAMMA_CANDIDATES, n, generator=generator, device=device, dtype=torch.float64)
    v = (1.0 + c * z) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
    first = ok.to(torch.int8).argmax(0)  # first accepted candidate (0 if none: probability < 1e-20)
    log_g = torch.log(d * v.clamp_min(1e-300)).gather(0, first[None]).squeeze(0)
    if boost:  # Gamma(a) = Gamma(a + 1) * U^(1/a)
        u2 = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        log_g = log_g + torch.log(u2.clamp_min(1e-300)) / shape
    return log_g


def sample_beta(alpha: float, n: int, generator: Optional[torch.Generator] = None,
                device=None) -> torch.Tensor:
    """n samples of Beta(alpha, alpha) as float32, drawn from ``generator`` only (capturable, no sync)."""
    if not alpha > 0:
        raise ValueError(f"alpha: must be > 0, got {alpha}")
    g1 = _log_gamma_sample(float(alpha), n, generator, device)
    g2 = _log_gamma_sample(float(alpha), n, generator, device)
    return torch.sigmoid(g1 - g2).float()  # g1 / (g1 + g2) in log space: no 0/0 for tiny alpha


@functools.lru_cache(maxsize=32)
def _method_id_tensor(ids: Tuple[int, ...], device: Optional[torch.device]) -> torch.Tensor:
    # made once per (ids, device): torch.tensor(list, device="cuda") is a blocking copy from pageable memory,
    # which would wait for the whole stream (the trainer's step) on every batch and cannot be graph-captured
    return torch.tensor(ids, dtype=torch.long, device=device)


def draw_mix_params(n: int, alpha: float = 1.0, methods: Sequence[str] = METHODS,
                    generator: Optional[torch.Generator] = None, device=None,
                    per_batch: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (or, with per_batch, one shared) raw lambda [n] float32 and method id [n] int64."""
    check_batch_size(n)
    ids = _method_id_tensor(method_ids(methods), None if device is None else exact_device(device))
    draws = 1 if per_batch else n
    lam = sample_beta(alpha, draws, generator, device)
    pick = torch.randint(0, ids.numel(), (draws,), generator=generator, device=device)
    method = ids[pick]
    if per_batch:
        lam, method = lam.expand(n).contiguous(), method.expand(n).contiguous()
    return lam, method


def box_size(lam: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer box side lengths covering about (1 - lam) of an H x W image (CutMix's sqrt rule)."""
    ratio = torch.sqrt((1.0 - lam.double()).clamp(0.0, 1.0))
    cut_h = torch.round(ratio * height).long().clamp(0, height)
    cut_w = torch.round(ratio * width).long().clamp(0, width)
    return cut_h, cut_w


def box_position(cut_h: torch.Tensor, cut_w: torch.Tensor, height: int, width: int,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uniform top-left corner with the box fully inside, so the pasted area is exactly cut_h * cut_w."""
    u = torch.rand(2, cut_h.shape[0], generator=generator, device=cut_h.device, dtype=torch.float64)
    y0 = torch.minimum((u[0] * (height - cut_h + 1)).long(), height - cut_h)
    x0 = torch.minimum((u[1] * (width - cut_w + 1)).long(), width - cut_w)
    return y0, x0


def box_lam(cut_h: torch.Tensor, cut_w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fraction of pixels left from the own image after pasting a cut_h x cut_w box."""
    return (1.0 - (cut_h * cut_w).double() / (height * width)).float()


def draw_box(lam: torch.Tensor, method: torch.Tensor, height: int, width: int,
             generator: Optional[torch.Generator] = None):
    """One view's boxes and the lam it really gets: ``((y0, x0, cut_h, cut_w), lam_eff)``, lam_eff being lam for
    mixup and the exact pasted-area fraction for cutmix / resizemix. Every mixing path (vectorised, per-sample,
    DALI graph) draws through here, so equal generator states give equal boxes."""
    cut_h, cut_w = box_size(lam, height, width)
    y0, x0 = box_position(cut_h, cut_w, height, width, generator)
    lam_eff = torch.where(method == MIXUP, lam.float(), box_lam(cut_h, cut_w, height, width))
    return (y0, x0, cut_h, cut_w), lam_eff


def _resized_partner(partner: torch.Tensor, y0, x0, cut_h, cut_w) -> torch.Tensor:
    """The whole partner bilinearly resized into each sample's box (values outside the box are unused).

    Output pixel y inside the box samples the partner at normalised coordinate (2(y - y0) + 1) / cut_h - 1,
    i.e. half-pixel-centre bilinear resize (F.interpolate(..., align_corners=False) semantics).
    """
    n, _, h, w = partner.shape
    dev = partner.device
    ch = cut_h.clamp_min(1).double()[:, None]
    cw = cut_w.clamp_min(1).double()[:, None]
    gy = (2.0 * (torch.arange(h, device=dev, dtype=torch.float64)[None] - y0[:, None]) + 1.0) / ch - 1.0
    gx = (2.0 * (torch.arange(w, device=dev, dtype=torch.float64)[None] - x0[:, None]) + 1.0) / cw - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [n, h, w, 2]
    work = partner if partner.dtype in (torch.float32, torch.float64) else partner.float()
    out = F.grid_sample(work, grid.to(work.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(partner.dtype)


def apply_mix(x: torch.Tensor, lam: torch.Tensor, method: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor,
              cut_h: torch.Tensor, cut_w: torch.Tensor,
              method_set: Sequence[int] = (MIXUP, CUTMIX, RESIZEMIX)) -> torch.Tensor:
    """Deterministic part of the mixing (the fused CUDA kernel computes exactly this).

    Sample i: mixup -> lam_i x_i + (1-lam_i) x_p; cutmix -> x_p's pixels inside the box [y0, y0+cut_h) x
    [x0, x0+cut_w) pasted at the same place; resizemix -> the whole x_p bilinearly resized to the box and pasted
    there. p = n-1-i, read from the unmixed x. ``method_set`` (static) skips the resize when it cannot occur.
    """
    check_mix_inputs("apply_mix", x, lam, method, y0, x0, cut_h, cut_w)
    _, _, h, w = x.shape
    partner = x.flip(0)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + cut_h)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + cut_w)[:, None, None]))[:, None]  # [n,1,H,W]
    paste = partner
    if RESIZEMIX in method_set:
        resized = _resized_partner(partner, y0, x0, cut_h, cut_w)
        paste = torch.where((method == RESIZEMIX)[:, None, None, None], resized, partner)
    boxed = torch.where(inside, paste, x)
    blended = _blend(x, partner, lam[:, None, None, None])
    return torch.where((method == MIXUP)[:, None, None, None], blended, boxed)


def _blend(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam x + (1 - lam) partner. In bf16 / fp16 it is computed in fp32 and rounded once, as the resize is:
    rounding lam to the image dtype first (about 1e-3 in bf16) mixed the pixels by another lam than the one the
    loss is given, and near lam = 0.5 the two rounded terms could cancel to 0."""
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    lam = lam.to(work)
    return (lam * x.to(work) + (1.0 - lam) * partner.to(work)).to(x.dtype)


def mix_view(x: torch.Tensor, lam: torch.Tensor, method: torch.Tensor,
             generator: Optional[torch.Generator] = None,
             method_set: Sequence[int] = (MIXUP, CUTMIX, RESIZEMIX)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mix one view [n, C, H, W] with its flipped self; returns (mixed, area-corrected lam [n]).

    ``lam`` and ``method`` come from :func:`draw_mix_params`; the box position is drawn here, per view.
    """
    check_view("mix_view", x)
    n, _, h, w = x.shape
    check_batch_size(n)
    check_per_sample(n, lam, method, x.device)
    (y0, x0, cut_h, cut_w), lam_eff = draw_box(lam, method, h, w, generator)
    return apply_mix(x, lam, method, y0, x0, cut_h, cut_w, method_set), lam_eff


def check_view(where: str, x: torch.Tensor) -> None:
    """A view to mix: floating point [n, C, H, W] (integer pixels would be blended and truncated)."""
    if not x.is_floating_point():
        raise TypeError(f"{where}: views must be floating point (normalised images), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{where}: expected a view of shape [n, C, H, W], got {tuple(x.shape)}")


def check_per_sample(n: int, lam: torch.Tensor, method: torch.Tensor,
                     device: Optional[torch.device] = None) -> None:
    """lam and method: one per sample, on the views' ``device`` (draw_mix_params without ``device=`` puts them
    on the CPU: GPU views then failed deep inside with "Tensor on device cpu is not on the expected device"),
    lam in [0, 1] and method a known id where reading them costs no sync."""
    for name, t in (("lam", lam), ("method", method)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name}: expected one per sample [{n}], got {tuple(t.shape)}")
        if device is not None and t.device != device:
            raise ValueError(f"{name}: on {t.device}, the views on {device}: draw it there "
                             f"(draw_mix_params(..., device=views[0].device)) or move it")
    check_lam_range(lam)
    check_method_ids(method)


def check_method_ids(method: torch.Tensor) -> None:
    """Every id one of MIXUP / CUTMIX / RESIZEMIX where reading them costs no sync (an unknown id was mixed as
    cutmix)."""
    if values_checkable(method) and method.numel() and not bool(((method >= MIXUP) & (method <= RESIZEMIX)).all()):
        bad = sorted(set(method.tolist()) - {MIXUP, CUTMIX, RESIZEMIX})
        raise ValueError(f"method: ids {bad} are none of MIXUP ({MIXUP}), CUTMIX ({CUTMIX}), RESIZEMIX ({RESIZEMIX}) "
                         f"(an unknown id was mixed as cutmix)")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether an input check may read ``t``'s values: a plain CPU tensor in eager code. A CUDA tensor's would cost
    a host sync (and break CUDA-graph capture); under torch.compile, in a fake / functional tensor subclass
    (make_fx, FakeTensorMode) or inside a torch.func transform (vmap) there are no values to read."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def check_lam_range(lam: torch.Tensor) -> None:
    """lam in [0, 1] (a mixup lam outside it extrapolates the pixels; a box lam is clamped). Checked where it
    costs no synchronisation (:func:`values_checkable`). On a GPU lam comes from draw_mix_params."""
    if not values_checkable(lam):
        return
    bad = ~((lam >= 0) & (lam <= 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"lam: every value must lie in [0, 1], got {float(lam[i])} for sample {i}")


def check_mix_inputs(where: str, x: torch.Tensor, lam: torch.Tensor, method: torch.Tensor, y0: torch.Tensor,
                     x0: torch.Tensor, cut_h: torch.Tensor, cut_w: torch.Tensor) -> None:
    """apply_mix's inputs, checked alike by the reference and the kernel: a floating [n, C, H, W] view with n even,
    and one value per sample on the view's device in each of lam, method and the box."""
    check_view(where, x)
    n = x.shape[0]
    check_batch_size(n)
    for name, t in (("lam", lam), ("method", method), ("y0", y0), ("x0", x0), ("cut_h", cut_h), ("cut_w", cut_w)):
        if tuple(t.shape) != (n,) or t.device != x.device:
            raise ValueError(f"{where}: {name} must be [{n}] on {x.device} (one per sample), got {tuple(t.shape)} "
                             f"on {t.device}")
    check_lam_range(lam)
    check_method_ids(method)


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


def mix_view_per_sample(x: torch.Tensor, lam: torch.Tensor, method: torch.Tensor,
                        generator: Optional[torch.Generator] = None,
                        method_set: Sequence[int] = (MIXUP, CUTMIX, RESIZEMIX)) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`mix_view` computed sample by sample on the host: same draws, same values, no autograd.

    apply_mix is branch-free for the GPU: every sample pays for the blend, the paste and a full resize of its
    partner. On a CPU those full-batch passes cost more than decoding and augmenting the images, while here a
    sample does only its own method. Reading the box sizes to Python syncs, which is free on a CPU.
    """
    check_view("mix_view_per_sample", x)
    n, _, h, w = x.shape
    check_batch_size(n)
    check_per_sample(n, lam, method, x.device)
    (y0, x0, cut_h, cut_w), lam_eff = draw_box(lam, method, h, w, generator)
    out = torch.empty_like(x)
    resize = RESIZEMIX in method_set  # as apply_mix: without it a resizemix id pastes like cutmix
    rows = zip(method.tolist(), y0.tolist(), x0.tolist(), cut_h.tolist(), cut_w.tolist())
    for i, (m, top, left, ch, cw) in enumerate(rows):
        own, partner = x[i], x[n - 1 - i]
        if m == MIXUP:
            out[i].copy_(_blend(own, partner, lam[i]))
            continue
        out[i].copy_(own)
        if ch == 0 or cw == 0:
            continue
        box = out[i, :, top:top + ch, left:left + cw]
        box.copy_(_resize_into_box(partner, ch, cw) if m == RESIZEMIX and resize
                  else partner[:, top:top + ch, left:left + cw])
    return out, lam_eff


def mix_views(views: Sequence[torch.Tensor], lam: torch.Tensor, method: torch.Tensor,
              generator: Optional[torch.Generator] = None,
              method_set: Sequence[int] = (MIXUP, CUTMIX, RESIZEMIX), per_sample: Optional[bool] = None):
    """Mix every view with the same per-sample lam/method; returns (mixed views, per-view lam list).

    ``per_sample=None`` picks the host per-sample path for CPU tensors that need no gradient (a data loader's
    case) and the vectorised, capturable :func:`apply_mix` otherwise; both give the same result.
    """
    out, lams = [], []
    for v in views:
        # not while compiling: the host path reads each sample's method (a data-dependent branch fullgraph refuses)
        host = per_sample if per_sample is not None else (v.device.type == "cpu" and not v.requires_grad
                                                          and not torch.compiler.is_compiling())
        if host:
            m, l_eff = mix_view_per_sample(v, lam, method, generator, method_set)
        else:
            m, l_eff = mix_view(v, lam, method, generator, method_set)
        out.append(m)
        lams.append(l_eff)
    return out, lams


def sdmp_mix(views: Sequence[torch.Tensor], alpha: float = 1.0, methods: Sequence[str] = METHODS,
             generator: Optional[torch.Generator] = None, per_batch: bool = False):
    """SDMP batch-flip mixing of all views of a batch.

    Returns ``(mixed_views, lam, method)``: lam float32 [n] (area-corrected, the fraction of each mixed image
    that comes from its own sample) and method int64 [n] (0 mixup, 1 cutmix, 2 resizemix). Views of equal size
    share the exact same lam; with views of different sizes (DINO global + local) box rounding can differ by a
    pixel row between sizes, and the lam returned is the first view's (``mix_views`` gives each view's).
    """
    if isinstance(views, torch.Tensor):
        views = [views]
    if len(views) == 0:
        raise ValueError("sdmp_mix: no views given")
    for j, v in enumerate(views):
        check_view(f"sdmp_mix: view {j}", v)  # named here, not by the internal function that would meet it
    n = views[0].shape[0]
    check_batch_size(n)
    for j, v in enumerate(views):
        if v.shape[0] != n:
            raise ValueError(f"sdmp_mix: view {j} has batch size {v.shape[0]}, view 0 has {n}")
    ids = method_ids(methods)
    lam, method = draw_mix_params(n, alpha, methods, generator, views[0].device, per_batch)
    mixed, lams = mix_views(views, lam, method, generator, ids)
    return mixed, lams[0], method
