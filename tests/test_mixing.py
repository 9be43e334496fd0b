"""Pins the batch-flip mixing semantics (sdmp.md §1)."""
import pytest
import torch

from sdmp_fast import mixing
from sdmp_fast.mixing import (CUTMIX, MIXUP, RESIZEMIX, draw_mix_params, mix_views, sample_beta, sdmp_mix)


def constant_batch(n, c=3, h=16, w=12, dtype=torch.float64):
    v = torch.arange(1, n + 1, dtype=dtype) * 10.0  # image i filled with v_i, all distinct
    return v[:, None, None, None].expand(n, c, h, w).contiguous(), v


@pytest.mark.parametrize("method", ["mixup", "cutmix", "resizemix"])
def test_constant_colour_lam_is_exact_for_both_views(method):
    n = 8
    x1, v = constant_batch(n)
    x2, _ = constant_batch(n)
    g = torch.Generator().manual_seed(0)
    (m1, m2), lam, meth = sdmp_mix([x1, x2], alpha=1.0, methods=(method,), generator=g)
    assert lam.dtype == torch.float32 and meth.dtype == torch.int64 and lam.shape == (n,)
    assert (meth == ("mixup", "cutmix", "resizemix").index(method)).all()
    vp = v.flip(0)
    for m in (m1, m2):
        assert m.shape == x1.shape
        if method == "mixup":
            expected = lam.double()[:, None, None, None] * v[:, None, None, None] \
                + (1 - lam.double())[:, None, None, None] * vp[:, None, None, None]
            torch.testing.assert_close(m, expected.expand_as(m), rtol=1e-6, atol=1e-6)
        else:
            # bilinear resizing of a constant image is constant up to float rounding
            from_partner = ((m - vp[:, None, None, None]).abs() < 1e-9).double().mean(dim=(1, 2, 3))
            from_self = ((m - v[:, None, None, None]).abs() < 1e-9).double().mean(dim=(1, 2, 3))
            torch.testing.assert_close(from_partner, 1 - lam.double(), rtol=0, atol=1e-7)
            torch.testing.assert_close(from_self + from_partner, torch.ones(n, dtype=torch.float64))


def test_views_share_lam_method_and_box_size_but_not_position():
    n = 64
    x, _ = constant_batch(n, h=32, w=32)
    g = torch.Generator().manual_seed(1)
    (m1, m2), lam, meth = sdmp_mix([x, x.clone()], methods=("cutmix",), generator=g)
    own = x[:, :1, :, :]
    box1, box2 = (m1[:, :1] != own), (m2[:, :1] != own)
    assert torch.equal(box1.sum(dim=(1, 2, 3)), box2.sum(dim=(1, 2, 3)))
    assert not torch.equal(box1, box2)  # positions are drawn per view


def test_partner_is_read_from_the_unmixed_batch():
    n = 6
    x, v = constant_batch(n)
    g = torch.Generator().manual_seed(2)
    lam = torch.full((n,), 0.25)
    meth = torch.full((n,), MIXUP)
    (m,), _ = mix_views([x], lam, meth, g)
    # if a mixed image had been used as a source, the second half would see blended partners
    expected = 0.25 * v + 0.75 * v.flip(0)
    torch.testing.assert_close(m[:, 0, 0, 0], expected)
    torch.testing.assert_close(x[:, 0, 0, 0], v)  # input untouched


def test_resizemix_pastes_the_whole_partner_resized():
    n = 2
    h = w = 16
    x = torch.zeros(n, 1, h, w, dtype=torch.float64)
    # partner of sample 0 is sample 1: a left/right half pattern
    x[1, 0, :, w // 2:] = 1.0
    lam = torch.tensor([0.75, 1.0])
    (m,), (lam_eff,) = mix_views([x], lam, torch.tensor([RESIZEMIX, RESIZEMIX]), torch.Generator().manual_seed(3))
    assert lam_eff[0].item() == pytest.approx(0.75)
    box = m[0, 0]
    # the 8x8 box holds the partner downscaled by 2: left half 0, right half 1
    pasted = (box == 1.0).sum().item()
    assert pasted == 8 * 4
    assert lam_eff[1].item() == 1.0 and torch.equal(m[1], x[1])


def test_method_mixture_and_per_batch_mode():
    g = torch.Generator().manual_seed(4)
    lam, meth = draw_mix_params(3000, 1.0, generator=g)
    counts = torch.bincount(meth, minlength=3).double() / 3000
    assert (counts - 1 / 3).abs().max() < 0.04
    lam, meth = draw_mix_params(8, 1.0, ("cutmix", "resizemix"), generator=g, per_batch=True)
    assert (lam == lam[0]).all() and (meth == meth[0]).all() and meth[0] in (CUTMIX, RESIZEMIX)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_moments(alpha):
    s = sample_beta(alpha, 200_000, torch.Generator().manual_seed(5)).double()
    var = 1.0 / (4 * (2 * alpha + 1))
    assert (s >= 0).all() and (s <= 1).all()
    assert abs(s.mean().item() - 0.5) < 0.005
    assert abs(s.var().item() - var) < 0.05 * var + 1e-3


def test_seeded_generator_reproduces():
    x = torch.randn(8, 3, 10, 10)
    a = sdmp_mix([x], generator=torch.Generator().manual_seed(7))
    b = sdmp_mix([x], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a[0][0], b[0][0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("n", [1, 3, 7])
def test_odd_batch_names_batch_size(n):
    with pytest.raises(ValueError, match=f"batch size {n}"):
        sdmp_mix([torch.zeros(n, 3, 8, 8)])


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'mosaic'"):
        sdmp_mix([torch.zeros(2, 3, 8, 8)], methods=("mixup", "mosaic"))


def test_gradients_flow_through_mixing():
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, 0.6, 0.5, 0.9])
    meth = torch.tensor([MIXUP, CUTMIX, RESIZEMIX, MIXUP])

    def f(x):
        return mix_views([x], lam, meth, torch.Generator().manual_seed(8))[0][0]

    assert torch.autograd.gradcheck(f, (x,))


def test_mixed_resolution_views():
    g = torch.Generator().manual_seed(9)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 12, 12)]
    mixed, lam, _ = sdmp_mix(views, generator=g)
    assert [m.shape for m in mixed] == [v.shape for v in views]


@pytest.mark.parametrize("sizes", [[40, 40], [32, 32, 16, 16]])
def test_host_per_sample_path_equals_vectorised(sizes):
    """Loaders on a CPU take the per-sample host path; it must equal the capturable apply_mix path."""
    n = 12
    views = [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate(sizes)]
    lam, meth = draw_mix_params(n, 1.0, generator=torch.Generator().manual_seed(1))
    meth[:3] = torch.tensor([MIXUP, CUTMIX, RESIZEMIX])
    ref, ref_lam = mix_views(views, lam, meth, torch.Generator().manual_seed(2), per_sample=False)
    fast, fast_lam = mix_views(views, lam, meth, torch.Generator().manual_seed(2), per_sample=True)
    for a, b, la, lb in zip(ref, fast, ref_lam, fast_lam):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        assert torch.equal(la, lb)


def test_host_and_vectorised_paths_agree_on_method_set_and_check_lengths():
    x = torch.rand(4, 3, 8, 8)
    lam, method = torch.full((4,), 0.5), torch.full((4,), RESIZEMIX)
    outs = [mix_views([x], lam, method, torch.Generator().manual_seed(1), (MIXUP, CUTMIX),
                             per_sample=host)[0][0] for host in (True, False)]
    torch.testing.assert_close(outs[0], outs[1])  # without resizemix in the set, both paste like cutmix
    for host in (True, False):
        with pytest.raises(ValueError, match=r"lam: expected one per sample \[4\], got \(2,\)"):
            mix_views([x], lam[:2], method[:2], torch.Generator(), per_sample=host)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_reduced_precision_mixup_blends_by_the_exact_lam(dtype, per_sample):
    """bf16 / fp16 views are blended in fp32 and rounded once, by the fp32 lam the loss is given. Rounding lam to
    the image dtype first mixed by another lam: with lam = 0.5009 an image of +1 and its partner of -1 gave 0
    instead of 2 lam - 1 = 0.0018 in bf16."""
    n = 4
    x = torch.ones(n, 3, 8, 8, dtype=dtype)
    x[n // 2:] = -1.0  # partner of image i (n-1-i) has the opposite sign
    lam = torch.tensor([0.5009, 0.25013, 0.7771, 0.5], dtype=torch.float32)
    method = torch.full((n,), MIXUP)
    out, lam_eff = mix_views([x], lam, method, torch.Generator().manual_seed(0), per_sample=per_sample)
    out = out[0]
    assert out.dtype == dtype and torch.equal(lam_eff[0], lam)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])
    exact = sign * (2 * lam.double() - 1)  # lam * s + (1 - lam) * (-s)
    expected = (exact.float().to(dtype))[:, None, None, None].expand_as(out)
    assert torch.equal(out, expected), (out[:, 0, 0, 0], expected[:, 0, 0, 0])
    assert out[0, 0, 0, 0] != 0
    # the general case: the fp32 blend rounded once
    g = torch.Generator().manual_seed(3)
    y = torch.randn(6, 3, 5, 7, generator=g).to(dtype)
    lam = torch.rand(6, generator=g)
    got = mix_views([y], lam, torch.full((6,), MIXUP), g, per_sample=per_sample)[0][0]
    lam4 = lam[:, None, None, None]
    assert torch.equal(got, (lam4 * y.float() + (1 - lam4) * y.flip(0).float()).to(dtype))


def test_mix_views_of_cpu_views_compiles_fullgraph():
    """On CPU views that need no gradient mix_views took the host per-sample path even under torch.compile, whose
    per-sample branch on each method is data-dependent: fullgraph=True failed ("Could not guard on
    data-dependent expression"). Compiling, it takes the vectorised path."""
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 8, 8, generator=g)]
    lam, method = torch.tensor([0.3, 0.6, 0.6, 0.3]), torch.tensor([0, 1, 1, 2])

    @torch.compile(backend="eager", fullgraph=True)
    def step(v):
        return mixing.mix_views(v, lam, method)

    out, lams = step(views)
    assert out[0].shape == views[0].shape and lams[0].shape == (4,)


def test_lam_or_method_on_another_device_or_an_unknown_method_is_named():
    """draw_mix_params without device= gives CPU lam / method: with GPU views the mixing failed deep inside with
    "Tensor on device cpu is not on the expected device" (meta stands in for the GPU here); an unknown method id
    was mixed as cutmix."""
    x = torch.randn(4, 3, 8, 8)
    lam, method = torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long)
    for name, bad in (("lam", (lam.to("meta"), method)), ("method", (lam, method.to("meta")))):
        with pytest.raises(ValueError, match=f"^{name}: on meta, the views on cpu"):
            mixing.mix_views([x], *bad)
    with pytest.raises(ValueError, match=r"method: ids \[5\] are none of MIXUP"):
        mixing.mix_views([x], lam, torch.tensor([0, 5, 5, 0]))


def test_sdmp_mix_names_itself_for_integer_views():
    with pytest.raises(TypeError, match=r"^sdmp_mix: view 1: views must be floating point"):
        sdmp_mix([torch.randn(4, 3, 8, 8), torch.zeros(4, 3, 8, 8, dtype=torch.uint8)])
