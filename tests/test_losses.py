"""Pins the SDMP loss semantics to the numbers of sdmp.md §5 (float64)."""
import math

import pytest
import torch

from sdmp_fast import losses

from sdmp_fast.losses import (flip_indices, mix_coefficient, mix_mix_weights, sdmp_dino_terms,
                              sdmp_moco_loss, sdmp_moco_terms, two_hot_cross_entropy, moco_logits,
                              soft_target_cross_entropy, dino_center_update)

D = torch.float64


@pytest.mark.parametrize("lam_i,lam_p,c,w1,w2", [
    (1, 1, 0, 1, 0), (0.5, 0.5, 1, 0.5, 0.5), (0.3, 0.7, 1, 0.5, 0.5), (0.8, 0.6, 0.6, 0.625, 0.375),
    (0.9, 0.9, 0.2, 0.833333, 0.166667), (0.2, 0.5, 0.7, 0.588235, 0.411765)])
def test_mix_coefficient_table(lam_i, lam_p, c, w1, w2):
    got = mix_coefficient(torch.tensor([lam_i], dtype=D), torch.tensor([lam_p], dtype=D))
    assert got.item() == pytest.approx(c, abs=1e-12)
    a, b = mix_mix_weights(got)
    assert a.item() == pytest.approx(w1, abs=1e-6) and b.item() == pytest.approx(w2, abs=1e-6)


def test_mix_coefficient_bounds_and_symmetry():
    lam = torch.rand(1000, dtype=D, generator=torch.Generator().manual_seed(0))
    c = mix_coefficient(lam)
    assert (c >= 0).all() and (c <= 1 + 1e-12).all()
    torch.testing.assert_close(c, c.flip(0))


def _q(rows):
    return torch.tensor(rows, dtype=D)


def test_lam_one_is_plain_moco():
    k = torch.eye(4, dtype=D)
    t = sdmp_moco_terms(k, k, k, k, k, torch.ones(4, dtype=D))
    expected = 0.4 * math.log(1 + 3 * math.exp(-5))
    assert expected == pytest.approx(0.0080049, abs=1e-7)
    for name in ("source", "mix_source", "mix_mix"):
        assert t[name].item() == pytest.approx(expected, abs=1e-6)


def test_half_half_case():
    k = torch.eye(4, dtype=D)
    q = k + k.flip(0)  # q_i = e_i + e_(3-i)
    t = sdmp_moco_terms(q, q, k, k, k, torch.full((4,), 0.5, dtype=D))
    assert t["mix_source"].item() == pytest.approx(0.2887495, abs=1e-6)
    assert t["mix_mix"].item() == pytest.approx(0.2887495, abs=1e-6)  # c = 1 -> weights 1/2, 1/2


def test_unequal_lam_case_paper_form_not_log_of_mixture():
    k = torch.eye(4, dtype=D)
    q = 0.8 * k + 0.2 * k.flip(0)
    lam = torch.tensor([0.8, 0.6, 0.6, 0.8], dtype=D)
    torch.testing.assert_close(mix_coefficient(lam), torch.tensor([0.4, 0.8, 0.8, 0.4], dtype=D))
    t = sdmp_moco_terms(q, q, k, k, k, lam)
    assert t["source"].item() == pytest.approx(0.0164374, abs=1e-6)
    assert t["mix_source"].item() == pytest.approx(0.4530016, abs=1e-6)
    assert t["mix_mix"].item() == pytest.approx(0.5477059, abs=1e-6)
    # the log-of-mixture form (the reference code's defect) gives different numbers
    p = torch.softmax(moco_logits(q, k, 0.2), 1)
    own, partner = flip_indices(4)
    wrong = -torch.log(lam * p[own, own] + (1 - lam) * p[own, partner]).mean() * 0.4
    assert wrong.item() == pytest.approx(0.1584436, abs=1e-6)
    assert abs(wrong.item() - t["mix_source"].item()) > 0.2


def test_total_loss_weighting():
    k = torch.eye(4, dtype=D)
    t = sdmp_moco_terms(k, k, k, k, k, torch.ones(4, dtype=D))
    assert sdmp_moco_loss(t, 0.5).item() == pytest.approx(2 * t["source"].item(), rel=1e-12)


def test_two_hot_matches_dense_soft_target():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 11, dtype=D, generator=g)
    a = torch.tensor([0, 3, 5, 10, 2, 2])
    b = torch.tensor([1, 3, 4, 0, 9, 7])
    wa = torch.rand(6, dtype=D, generator=g)
    wb = 1 - wa
    dense = torch.zeros(6, 11, dtype=D)
    dense[torch.arange(6), a] += wa
    dense[torch.arange(6), b] += wb
    torch.testing.assert_close(two_hot_cross_entropy(logits, a, b, wa, wb),
                               soft_target_cross_entropy(logits, dense))


def test_moco_terms_gradcheck():
    g = torch.Generator().manual_seed(2)
    q1, q2m, k1, k2, k1m = (torch.randn(4, 5, dtype=D, generator=g, requires_grad=True) for _ in range(5))
    lam = torch.rand(4, dtype=D, generator=g)

    def f(q1, q2m, k1, k2, k1m):
        return sdmp_moco_loss(sdmp_moco_terms(q1, q2m, k1, k2, k1m, lam))

    assert torch.autograd.gradcheck(f, (q1, q2m, k1, k2, k1m))


def test_two_rank_mean_equals_single_process():
    """Per-rank flip (sdmp.md §2): each rank mixes locally, keys are all-gathered in rank order."""
    g = torch.Generator().manual_seed(3)
    n, d, world = 4, 8, 2
    q1, q2m, k1, k2, k1m = (torch.randn(world * n, d, dtype=D, generator=g) for _ in range(5))
    lam = torch.rand(world * n, dtype=D, generator=g)
    per_rank = []
    for r in range(world):
        s = slice(r * n, (r + 1) * n)
        t = sdmp_moco_terms(q1[s], q2m[s], k1, k2, k1m, lam[s], rank=r, world_size=world)
        per_rank.append(sdmp_moco_loss(t))
    # single process over all 2n samples with the same per-rank partner map
    own = torch.arange(world * n)
    partner = torch.cat([flip_indices(n, r)[1] for r in range(world)])
    lam_p = lam[partner]
    c = mix_coefficient(lam, lam_p)
    w1, w2 = mix_mix_weights(c)
    ones = torch.ones_like(lam)
    single = 0.4 * (two_hot_cross_entropy(moco_logits(q1, k2, 0.2), own, partner, ones, 0 * ones).mean()
                    + two_hot_cross_entropy(moco_logits(q2m, k1, 0.2), own, partner, lam, 1 - lam).mean()
                    + two_hot_cross_entropy(moco_logits(q2m, k1m, 0.2), own, partner, w1, w2).mean())
    assert torch.stack(per_rank).mean().item() == pytest.approx(single.item(), abs=1e-12)


def test_bad_key_count_names_shapes():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="all-gathered"):
        sdmp_moco_terms(q, q, torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3), torch.ones(4),
                        rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------- DINO

def _plain_dino(student, teacher, center, tau_s, tau_t):
    """DINO's own DINOLoss.forward (facebookresearch/dino), written out independently."""
    p_t = torch.softmax((teacher - center) / tau_t, -1)
    total, n = 0.0, 0
    for iq in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v == iq:
                continue
            total = total + torch.sum(-p_t[iq] * torch.log_softmax(student[v] / tau_s, -1), -1).mean()
            n += 1
    return total / n


def test_dino_lam_one_reduces_to_plain_dino_over_all_crops():
    g = torch.Generator().manual_seed(4)
    B, K = 4, 16
    clean = torch.randn(6, B, K, dtype=D, generator=g)  # 2 global + 4 clean local
    mixed = torch.randn(4, B, K, dtype=D, generator=g)  # 4 "mixed" local crops, lam = 1 -> clean
    teacher = torch.randn(2, B, K, dtype=D, generator=g)
    center = torch.randn(K, dtype=D, generator=g) * 0.1
    t = sdmp_dino_terms(clean, mixed, teacher, teacher, center, torch.ones(B, dtype=D), 0.1, 0.04)
    ref = _plain_dino(torch.cat([clean, mixed]), teacher, center, 0.1, 0.04)
    assert t["loss"].item() == pytest.approx(ref.item(), abs=1e-12)
    no_mix = sdmp_dino_terms(clean, None, teacher, None, center, None, 0.1, 0.04)
    assert no_mix["loss"].item() == pytest.approx(_plain_dino(clean, teacher, center, 0.1, 0.04).item(),
                                                  abs=1e-12)


def test_dino_mixed_terms_match_equations():
    g = torch.Generator().manual_seed(5)
    B, K = 4, 8
    clean = torch.randn(2, B, K, dtype=D, generator=g)
    mixed = torch.randn(1, B, K, dtype=D, generator=g)
    teacher = torch.randn(2, B, K, dtype=D, generator=g)
    teacher_m = torch.randn(2, B, K, dtype=D, generator=g)
    center = torch.zeros(K, dtype=D)
    lam = torch.tensor([0.8, 0.6, 0.6, 0.8], dtype=D)
    t = sdmp_dino_terms(clean, mixed, teacher, teacher_m, center, lam, 0.1, 0.04, mix_weight=0.5)
    log_ps = torch.log_softmax(mixed[0] / 0.1, -1)
    pt, ptm = torch.softmax(teacher / 0.04, -1), torch.softmax(teacher_m / 0.04, -1)
    c = mix_coefficient(lam)
    n_pairs = 2 + 2  # (t0,s1), (t1,s0) clean; (t0,m0), (t1,m0) mixed
    src = sum((-(lam[:, None] * pt[i] + (1 - lam[:, None]) * pt[i].flip(0)) * log_ps).sum(-1).mean()
              for i in range(2))
    mix = sum(((-ptm[i] * log_ps).sum(-1) / (1 + c) + (-ptm[i].flip(0) * log_ps).sum(-1) * c / (1 + c)).mean()
              for i in range(2))
    assert t["mix_source"].item() == pytest.approx(0.5 * src.item() / n_pairs, abs=1e-12)
    assert t["mix_teacher"].item() == pytest.approx(0.5 * mix.item() / n_pairs, abs=1e-12)


def test_dino_gradcheck():
    g = torch.Generator().manual_seed(6)
    B, K = 2, 5
    clean = torch.randn(3, B, K, dtype=D, generator=g, requires_grad=True)
    mixed = torch.randn(2, B, K, dtype=D, generator=g, requires_grad=True)
    teacher = torch.randn(2, B, K, dtype=D, generator=g)
    teacher_m = torch.randn(2, B, K, dtype=D, generator=g)
    lam = torch.rand(B, dtype=D, generator=g)
    center = torch.zeros(K, dtype=D)
    f = lambda a, b: sdmp_dino_terms(a, b, teacher, teacher_m, center, lam, 0.1, 0.04)["loss"]  # noqa: E731
    assert torch.autograd.gradcheck(f, (clean, mixed))


@pytest.mark.parametrize("mixed_crops,teacher_mixed", [(0, False), (2, False), (2, True)])
def test_dino_every_term_is_differentiable_even_without_its_pairs(mixed_crops, teacher_mixed):
    """Each term can be backpropagated alone, as the kernel's can: a term without pairs (mix_source without
    mixed crops, mix_teacher without mixed teacher crops) is a zero in the students' graph with zero gradients,
    not a constant that makes ``backward()`` raise. An inf logit does not make it NaN."""
    g = torch.Generator().manual_seed(7)
    B, K = 4, 6
    clean = torch.randn(3, B, K, dtype=D, generator=g)
    clean[2, 0, 0] = float("inf")  # 0 * inf would be NaN: the zero must not be built from the logits' values
    clean.requires_grad_()
    mixed = torch.randn(mixed_crops, B, K, dtype=D, generator=g, requires_grad=True) if mixed_crops else None
    teacher = torch.randn(2, B, K, dtype=D, generator=g)
    teacher_m = torch.randn(2, B, K, dtype=D, generator=g) if teacher_mixed else None
    lam = torch.rand(B, dtype=D, generator=g) if mixed_crops else None
    terms = sdmp_dino_terms(clean, mixed, teacher, teacher_m, torch.zeros(K, dtype=D), lam)
    empty = {"mix_source"} if not mixed_crops else set()
    empty |= {"mix_teacher"} if not teacher_mixed else set()
    for name in ("mix_source", "mix_teacher"):
        assert terms[name].requires_grad, name
        grads = torch.autograd.grad(terms[name], [clean] + ([mixed] if mixed_crops else []), allow_unused=True,
                                    retain_graph=True)
        if name in empty:
            assert terms[name].item() == 0.0
            assert all(gr is None or not gr.any() for gr in grads), name


def test_center_update():
    """An EMA: 0.9 of the old center (its history, not zero) plus 0.1 of the clean teacher outputs' mean, or of
    the all-reduced mean a distributed caller passes."""
    center = torch.tensor([1.0, -2.0, 4.0], dtype=D)
    t = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]], dtype=D)
    torch.testing.assert_close(dino_center_update(center, t, 0.9), torch.tensor([1.1, -1.6, 3.8], dtype=D))
    torch.testing.assert_close(dino_center_update(center, t, 0.5, batch_mean=torch.tensor([0.0, 2.0, 6.0], dtype=D)),
                               torch.tensor([0.5, 0.0, 5.0], dtype=D))


@pytest.mark.parametrize("impl", ["reference", "kernels"])
def test_moco_inputs_that_do_not_fit_are_named(impl):
    import sdmp_fast.kernels as K
    fn = sdmp_moco_terms if impl == "reference" else K.sdmp_moco_terms
    g = torch.Generator().manual_seed(0)
    q1, q2m = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    k1, k2, k1m = (torch.randn(8, 8, generator=g) for _ in range(3))
    lam = torch.rand(4, generator=g)
    with pytest.raises(ValueError, match=r"k2: expected keys \[N, 8\] with the N of k1 \(8\), got \(4, 8\)"):
        fn(q1, q2m, k1, k2[:4], k1m, lam, 0.2, 1, 2)  # was a silent NaN on the kernel path
    with pytest.raises(ValueError, match="q2m: expected the shape of q1"):
        fn(q1, q2m[:, :4], k1, k2, k1m, lam, 0.2, 1, 2)
    with pytest.raises(ValueError, match=r"lam: expected one lam per query \[4\]"):
        fn(q1, q2m, k1, k2, k1m, lam[:2], 0.2, 1, 2)
    one = fn(q1, q2m, k1, k2, k1m, lam[:1], 0.2, 1, 2)  # a single lam serves the whole batch
    full = fn(q1, q2m, k1, k2, k1m, lam[:1].expand(4), 0.2, 1, 2)
    assert all(torch.equal(one[k], full[k]) for k in one)


def test_an_odd_batch_is_taken_only_with_its_middle_image_unmixed():
    """An odd batch's middle image is its own batch-flip partner (sdmp.md §1): the loaders hand it out unmixed
    (lam 1, a short odd last batch); with any other lam its mixed terms silently became plain ones."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    s, t = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    for bad in (torch.tensor([1.0, 0.5, 0.2]), torch.tensor(0.7)):
        with pytest.raises(ValueError, match=r"batch size 3 is odd, so image 1 is its own batch-flip partner"):
            losses.sdmp_moco_terms(q, q, q, q, q, bad)
        with pytest.raises(ValueError, match=r"batch size 3 is odd"):
            losses.sdmp_dino_terms(s, s, t, t, torch.zeros(16), bad)
    ok = torch.tensor([0.3, 1.0, 0.6])
    assert torch.isfinite(losses.sdmp_moco_loss(losses.sdmp_moco_terms(q, q, q, q, q, ok)))
    assert torch.isfinite(losses.sdmp_dino_terms(s, s, t, t, torch.zeros(16), ok)["loss"])
    losses.sdmp_dino_terms(s, None, t, None, torch.zeros(16), None)  # plain DINO: no partners, any batch


def test_the_lam_checks_leave_tracing_and_vmap_alone():
    """The value checks on a CPU lam read it (bool / float): under fake tensors (make_fx, FakeTensorMode) and
    torch.func's vmap there is no value to read, and the traces failed on a data-dependent guard."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    lam = torch.rand(5, generator=g)
    lam[2] = 1.0

    def dino(s, t, lam):
        return losses.sdmp_dino_terms(s, s, t, t, torch.zeros(16), lam)["loss"]

    make_fx(dino, tracing_mode="fake")(s, t, lam)
    with FakeTensorMode() as mode:
        assert dino(mode.from_tensor(s), mode.from_tensor(t), mode.from_tensor(lam)).shape == ()
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    out = torch.func.vmap(lambda lam: losses.sdmp_moco_terms(q, q, q, q, q, lam)["mix_source"])(torch.rand(3, 4))
    assert out.shape == (3,)


def test_a_python_number_lam_or_weight_is_a_single_one():
    """A float lam (MoCo) or two-hot weight raised AttributeError ('float' object has no attribute 'numel'),
    where DINO took one and the docstrings promise 'a single one'."""
    g = torch.Generator().manual_seed(0)
    q1, q2m, k1, k2, k1m = (torch.randn(4, 8, generator=g) for _ in range(5))
    got = losses.sdmp_moco_terms(q1, q2m, k1, k2, k1m, 0.7, 0.2)
    want = losses.sdmp_moco_terms(q1, q2m, k1, k2, k1m, torch.tensor(0.7), 0.2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    logits, idx = torch.randn(4, 6, generator=g), torch.tensor([0, 1, 2, 3])
    assert torch.equal(losses.two_hot_cross_entropy(logits, idx, idx.flip(0), 0.25, 0.75),
                       losses.two_hot_cross_entropy(logits, idx, idx.flip(0), torch.tensor(0.25), torch.tensor(0.75)))


def test_all_gathered_keys_without_world_size_say_to_pass_it():
    q = torch.randn(4, 8)
    keys = torch.randn(8, 8)
    with pytest.raises(ValueError, match="all-gathered keys need world_size=2 and this rank"):
        losses.sdmp_moco_terms(q, q, keys, keys, keys, torch.full((4,), 0.5), 0.2)


def test_a_masked_two_hot_target_of_weight_zero_is_not_read():
    """SDMP-MoCo's source term has weights (1, 0) on (own, partner): a masked (-inf) partner key made it
    0 x -inf = NaN, although the row keeps finite entries and the target never reads that column."""
    logits = torch.tensor([[2.0, float("-inf"), 0.5], [1.0, 0.0, float("-inf")]], requires_grad=True)
    own, partner = torch.tensor([0, 0]), torch.tensor([1, 2])
    loss = losses.two_hot_cross_entropy(logits, own, partner, torch.ones(2), torch.zeros(2))
    want = -torch.log_softmax(logits.detach(), -1)[:, 0]
    assert torch.allclose(loss, want)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # a masked target that is read (weight > 0) is an infinite loss, as it should be
    assert torch.isinf(losses.two_hot_cross_entropy(logits.detach(), own, partner, torch.ones(2), torch.ones(2))).all()


def test_dino_crops_of_unequal_shape_are_named():
    """A list of crop logits with different batch sizes failed inside torch.stack, naming no argument."""
    k = 8
    with pytest.raises(ValueError, match=r"^student_clean: every crop's logits must have one shape"):
        sdmp_dino_terms([torch.randn(4, k), torch.randn(4, k), torch.randn(2, k)], None,
                        [torch.randn(4, k)] * 2, None, torch.zeros(k), None)
    with pytest.raises(ValueError, match=r"^teacher_mixed: every crop's"):
        sdmp_dino_terms(torch.randn(3, 4, k), torch.randn(2, 4, k), torch.randn(2, 4, k),
                        [torch.randn(4, k), torch.randn(4, k + 1)], torch.zeros(k), torch.full((4,), 0.5))
