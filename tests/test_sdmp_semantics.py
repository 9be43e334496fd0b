"""sdmp.md pinned against independent loop implementations, with inputs chosen so that plausible wrong
implementations fail: asymmetric lam (a partner's lam taken for the own one), non-constant images (a CutMix box
read from another place of the partner), per-sample lam, several ranks with their key offsets, and the trainer's
DINO roles (which crops the student / teacher see, which lam the loss gets)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdmp_fast.losses import sdmp_dino_terms, sdmp_moco_terms
from sdmp_fast.mixing import CUTMIX, MIXUP, RESIZEMIX, draw_mix_params, mix_views

D = torch.float64


# ------------------------------------------------------------------------------ independent loop references

def _c(li: float, lp: float) -> float:
    return min(li, 1 - lp) + min(1 - li, lp)


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _moco_loop(q1, q2m, k1, k2, k1m, lam, tau, rank, world):
    """sdmp.md §3 for the queries of one rank, keys all-gathered in rank order; one sample at a time."""
    n, N = len(q1), len(k1)
    assert N == world * n

    def logp(q, keys):
        qn = F.normalize(q, dim=0)
        return _log_softmax([float(qn @ F.normalize(k, dim=0)) / tau for k in keys])

    out = {"source": 0.0, "mix_source": 0.0, "mix_mix": 0.0}
    for i in range(n):
        own, par = rank * n + i, rank * n + (n - 1 - i)
        li, lp = float(lam[i]), float(lam[n - 1 - i])
        c = _c(li, lp)
        out["source"] -= logp(q1[i], k2)[own]
        lq = logp(q2m[i], k1)
        out["mix_source"] -= li * lq[own] + (1 - li) * lq[par]
        lq = logp(q2m[i], k1m)
        out["mix_mix"] -= lq[own] / (1 + c) + c / (1 + c) * lq[par]
    return {k: v * 2 * tau / n for k, v in out.items()}


def _dino_loop(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight):
    """sdmp.md §4 with the choices losses.sdmp_dino_terms documents; H(a, b) = -sum a log b, row by row."""
    T, B = t_clean.shape[:2]
    pt = [[torch.softmax((t_clean[t, b] - center) / tau_t, 0) for b in range(B)] for t in range(T)]
    ptm = None if t_mixed is None else \
        [[torch.softmax((t_mixed[t, b] - center) / tau_t, 0) for b in range(B)] for t in range(T)]

    def H(a, logits):
        return -float((a * torch.log_softmax(logits / tau_s, 0)).sum())

    dino = src = mix = 0.0
    pairs = 0
    for t in range(T):
        for v in range(len(s_clean)):
            if v != t:
                dino += sum(H(pt[t][b], s_clean[v, b]) for b in range(B)) / B
                pairs += 1
        for m in range(0 if s_mixed is None else len(s_mixed)):
            for b in range(B):
                p, li = B - 1 - b, float(lam[b])
                w_src = mix_weight if ptm is not None else 2 * mix_weight
                src += w_src * H(li * pt[t][b] + (1 - li) * pt[t][p], s_mixed[m, b]) / B
                if ptm is not None:
                    c = _c(li, float(lam[p]))
                    mix += mix_weight * (H(ptm[t][b], s_mixed[m, b]) / (1 + c)
                                         + c / (1 + c) * H(ptm[t][p], s_mixed[m, b])) / B
            pairs += 1
    return {"dino": dino / pairs, "mix_source": src / pairs, "mix_teacher": mix / pairs,
            "loss": (dino + src + mix) / pairs}


# ------------------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("n", [2, 6])
def test_moco_terms_equal_the_loop_formula_on_every_rank(world, n):
    """Own key r*n+i, partner r*n+n-1-i, weights lam_i / 1-lam_i and 1/(1+c) / c/(1+c) with the partner's lam,
    times 2*tau: asymmetric lam (0 and 1 included) so lam_i and lam_p cannot be confused."""
    g = torch.Generator().manual_seed(10 * world + n)
    d = 5
    q1, q2m, k1, k2, k1m = (torch.randn(world * n, d, dtype=D, generator=g) for _ in range(5))
    lam = torch.rand(world * n, dtype=D, generator=g)
    lam[0], lam[-1] = 0.0, 1.0
    for r in range(world):
        s = slice(r * n, (r + 1) * n)
        got = sdmp_moco_terms(q1[s], q2m[s], k1, k2, k1m, lam[s], 0.2, r, world)
        want = _moco_loop(q1[s], q2m[s], k1, k2, k1m, lam[s], 0.2, r, world)
        for k in want:
            assert got[k].item() == pytest.approx(want[k], abs=1e-12), (r, k)


@pytest.mark.parametrize("sc,sm,teacher_mixed,mix_weight", [(6, 4, True, 0.5), (4, 2, True, 0.3), (3, 2, False, 0.5),
                                                             (2, 1, True, 0.5)])
def test_dino_terms_equal_the_loop_formula_with_asymmetric_lam(sc, sm, teacher_mixed, mix_weight):
    """Eq. 7 weighs the own teacher row by lam_i (not lam_p), eq. 8 uses c(lam_i, lam_p) on the mixed teacher rows;
    the teacher is the target (softmax over (t - center) / tau_t), the student the log-softmax over s / tau_s."""
    g = torch.Generator().manual_seed(sc * 10 + sm)
    B, K = 6, 9
    s_clean = torch.randn(sc, B, K, dtype=D, generator=g)
    s_mixed = torch.randn(sm, B, K, dtype=D, generator=g)
    t_clean = torch.randn(2, B, K, dtype=D, generator=g)
    t_mixed = torch.randn(2, B, K, dtype=D, generator=g) if teacher_mixed else None
    center = 0.3 * torch.randn(K, dtype=D, generator=g)
    lam = torch.tensor([0.9, 0.2, 0.55, 0.0, 1.0, 0.35], dtype=D)  # lam != lam.flip(0) everywhere
    got = sdmp_dino_terms(s_clean, s_mixed, t_clean, t_mixed, center, lam, 0.1, 0.05, mix_weight)
    want = _dino_loop(s_clean, s_mixed, t_clean, t_mixed, center, lam, 0.1, 0.05, mix_weight)
    for k in want:
        assert got[k].item() == pytest.approx(want[k], abs=1e-12), k


# ------------------------------------------------------------------------------------------------ mixing

def test_lam_is_drawn_per_sample():
    """Table 7: per-sample lam (and per-sample method); one lam per batch only with per_batch."""
    lam, meth = draw_mix_params(64, 1.0, generator=torch.Generator().manual_seed(0))
    assert len(set(lam.tolist())) == 64
    assert len(set(meth.tolist())) == 3
    lam, meth = draw_mix_params(64, 1.0, generator=torch.Generator().manual_seed(0), per_batch=True)
    assert len(set(lam.tolist())) == 1 and len(set(meth.tolist())) == 1


def _box(changed: torch.Tensor):
    """The rectangle [y0, y0+h) x [x0, x0+w) a boolean [H, W] mask is, or None when empty; fails if not one."""
    ys, xs = torch.nonzero(changed, as_tuple=True)
    if ys.numel() == 0:
        return None
    y0, x0 = int(ys.min()), int(xs.min())
    h, w = int(ys.max()) + 1 - y0, int(xs.max()) + 1 - x0
    assert changed[y0:y0 + h, x0:x0 + w].all() and int(changed.sum()) == h * w, "pasted region is not a box"
    return y0, x0, h, w


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("hw", [(13, 21), (20, 9), (16, 16)])
def test_box_methods_paste_the_partner_as_the_spec_says(per_sample, hw):
    """On random (non-constant) images: mixup blends with x_{n-1-i}; cutmix pastes x_p's pixels from the *same*
    place; resizemix pastes the *whole* x_p resized (bilinear, half-pixel centres) into the box; the box lies in
    the image, touches its borders sometimes, and lam is 1 - box area / (H W) exactly, for every view."""
    H, W = hw
    n = 8
    g = torch.Generator().manual_seed(H * W)
    touched = set()
    for trial in range(12):
        x = torch.rand(n, 3, H, W, dtype=D, generator=g)
        lam, meth = draw_mix_params(n, 1.0, generator=g)
        meth = torch.tensor([MIXUP, CUTMIX, RESIZEMIX, CUTMIX, RESIZEMIX, CUTMIX, RESIZEMIX, MIXUP])
        lam[1], lam[2] = 0.0, 0.0  # whole image replaced
        lam[3], lam[4] = 1.0, 1.0  # nothing pasted
        views, lams = mix_views([x, x.flip(3)], lam, meth, torch.Generator().manual_seed(trial),
                                per_sample=per_sample)
        assert torch.equal(lams[0], lams[1])
        for v, (src, m, lam_eff) in enumerate(zip([x, x.flip(3)], views, lams)):
            for i in range(n):
                p = n - 1 - i
                if meth[i] == MIXUP:
                    torch.testing.assert_close(m[i], lam[i].double() * src[i] + (1 - lam[i].double()) * src[p])
                    assert lam_eff[i] == lam[i]
                    continue
                box = _box((m[i] != src[i]).any(0))
                area = 0 if box is None else box[2] * box[3]
                assert lam_eff[i].item() == pytest.approx(1 - area / (H * W), abs=1e-7)
                assert abs(lam_eff[i].item() - lam[i].item()) < 2.0 / min(H, W)  # near the drawn lam
                if box is None:
                    continue
                y0, x0, h, w = box
                touched.update(k for k, hit in (("top", y0 == 0), ("left", x0 == 0), ("bottom", y0 + h == H),
                                                ("right", x0 + w == W)) if hit and area < H * W)
                inside = m[i, :, y0:y0 + h, x0:x0 + w]
                if meth[i] == CUTMIX:
                    assert torch.equal(inside, src[p, :, y0:y0 + h, x0:x0 + w])
                else:
                    resized = F.interpolate(src[p][None], size=(h, w), mode="bilinear", align_corners=False)[0]
                    torch.testing.assert_close(inside, resized, rtol=0, atol=1e-6)
            assert torch.equal(m[1], src[n - 2]) and lam_eff[1] == 0  # lam 0: all of the partner (cutmix)
            assert torch.equal(m[3], src[3]) and lam_eff[3] == 1  # lam 1: untouched
    assert touched == {"top", "left", "bottom", "right"}


# ------------------------------------------------------------------------------------------------ trainer

def test_trainer_dino_step_is_the_loop_formula_on_its_crops_with_the_local_crops_lam(tmp_path):
    """The student sees 2 global + clean local + mixed local crops, the teacher the clean and the mixed global
    crops; the loss's lam is the exact pasted-area lam of the mixed crops the student sees (the local ones,
    whose boxes round otherwise than the global crops')."""
    from test_trainer import tiny_cfg

    from sdmp_fast.runlog import read_metrics
    from sdmp_fast.trainer import Trainer

    cfg = tiny_cfg(tmp_path, method="dino", steps=1, log_every=1, drop_path_rate=0.0, freeze_last_layer_epochs=0)
    tr = Trainer(cfg)
    b = next(iter(tr.loader))
    n_clean = 2 + cfg.n_local - cfg.n_local_mixed
    assert b.mixed_from == (0, 1) + tuple(range(n_clean, 2 + cfg.n_local))
    local_lam = b.mixed_lam[2]
    assert all(torch.equal(lam, local_lam) for lam in b.mixed_lam[2:])
    assert not torch.equal(local_lam, b.lam)  # 16 px local boxes round otherwise than 32 px global ones
    # the local lam is what the student's mixed crops really hold
    for k in range(2, len(b.mixed_views)):
        v, m = b.views[b.mixed_from[k]], b.mixed_views[k]
        for i in range(b.batch_size):
            if b.method[i] != MIXUP:
                kept = (m[i] == v[i]).all(0).double().mean().item()
                assert kept == pytest.approx(local_lam[i].item(), abs=1e-6)
    B = b.batch_size
    tr.model.train()
    with torch.no_grad():
        s = tr.model.student(list(b.views[:n_clean]) + list(b.mixed_views[2:])).view(-1, B, cfg.dino_out_dim)
        t = tr.model.teacher(list(b.views[:2])).view(2, B, -1)
        tm = tr.model.teacher(list(b.mixed_views[:2])).view(2, B, -1)
    center = tr.model.center.reshape(-1).clone()
    tau_t = float(tr.schedules.teacher_temp(0))
    tr.fit(cfg.out)
    rec = read_metrics(cfg.out)[0]
    want = _dino_loop(s[:n_clean].double(), s[n_clean:].double(), t.double(), tm.double(), center.double(),
                      local_lam.double(), cfg.tau_s, tau_t, cfg.mix_weight)
    for k in ("dino", "mix_source", "mix_teacher", "loss"):
        assert rec[k] == pytest.approx(want[k], rel=2e-5), k


def test_trainer_moco_roles_follow_the_view_swap(tmp_path):
    """q1 = f(x1), q2m = f(x2m), keys f_k(x1), f_k(x2), f_k(x1m): when the views swap, the mixed views swap with
    them (x1m stays the mixed copy of whichever view plays x1), and both share one lam."""
    from test_trainer import tiny_cfg

    from sdmp_fast.trainer import Trainer

    tr = Trainer(tiny_cfg(tmp_path, steps=1))
    b = next(iter(tr.loader))
    assert b.mixed_from == (0, 1) and torch.equal(b.mixed_lam[0], b.mixed_lam[1])
    n = b.batch_size
    for swap in (False, True):
        x1, x2, x1m, x2m, lam = tr.step_inputs(b, swap)
        one, two = (1, 0) if swap else (0, 1)
        assert x1 is b.views[one] and x2 is b.views[two] and torch.equal(lam, b.mixed_lam[0])
        for clean, mixed in ((x1, x1m), (x2, x2m)):  # each mixed view is its clean view mixed with the flip
            for i in range(n):
                if b.method[i] == MIXUP:
                    torch.testing.assert_close(mixed[i], lam[i] * clean[i] + (1 - lam[i]) * clean[n - 1 - i])
                else:
                    kept = (mixed[i] == clean[i]).all(0).double().mean().item()
                    assert kept == pytest.approx(lam[i].item(), abs=1e-6)
