"""Each batched device op against torchvision.transforms.v2.functional with the same per-sample parameters."""
import dataclasses
import itertools
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from sdmp_fast.pipelines import device_ops as D
from sdmp_fast.pipelines.recipes import ViewSpec, byol2, dino


def _images(n=6, h=40, w=52, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ crops
def test_crop_boxes_inside_and_respect_scale_ratio():
    n = 4000
    hs = torch.randint(100, 600, (n,), generator=_gen(1))
    ws = (hs * (0.8 + 0.45 * torch.rand(n, generator=_gen(2)))).long()  # aspect inside ratio: fallback = whole
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    b = D.random_resized_crop_boxes(hs, ws, scale, ratio, _gen(3)).double()
    y, x, h, w = b.unbind(1)
    assert b.dtype == torch.float64 and torch.equal(b, b.round())
    assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y + h <= hs).all() and (x + w <= ws).all()
    # rounding w, h to whole pixels moves area and aspect by at most half a pixel per side
    area = (h * w) / (hs * ws)
    slack_area = (h + w + 1) / (2 * hs * ws) * 2
    assert (area >= scale[0] - slack_area).all() and (area <= scale[1] + slack_area).all()
    aspect = w / h
    assert (aspect >= ratio[0] * (1 - 1 / h) * (1 - 1 / w) - 1e-9).all()
    assert (aspect <= ratio[1] * (1 + 1 / h) * (1 + 1 / w) + 1e-9).all()


def test_crop_boxes_distribution_matches_torchvision():
    n, hgt, wid = 3000, 375, 500
    ours = D.random_resized_crop_boxes(torch.full((n,), hgt), torch.full((n,), wid), generator=_gen(0))
    rrc = T.RandomResizedCrop(224)
    torch.manual_seed(0)
    img = torch.zeros(3, hgt, wid)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                        for p in (rrc.make_params([img]) for _ in range(n))], dtype=torch.float32)
    for col in range(4):  # means agree within 4 standard errors
        se = math.sqrt((ours[:, col].var() + ref[:, col].var()).item() / n)
        assert abs(ours[:, col].mean() - ref[:, col].mean()).item() < 4 * se, col


def test_crop_boxes_central_fallback_like_torchvision():
    # a 4 x 400 strip: no try can fit a crop of aspect <= 4/3 and area >= 8%, so torchvision falls back
    b = D.random_resized_crop_boxes(torch.tensor([4, 400]), torch.tensor([400, 4]), generator=_gen())
    assert b.tolist() == [[0.0, 197.0, 4.0, 5.0], [197.0, 0.0, 5.0, 4.0]]


def _tv_resized_crop(img01, box, size, interpolation):
    """torchvision's resized_crop of a float image in [0, 1], as a uint8 image's would be clamped."""
    y, x, h, w = (int(v) for v in box)
    out = TF.resized_crop(img01, y, x, h, w, [size, size], interpolation=TF.InterpolationMode(interpolation),
                          antialias=False)
    return out.clamp(0, 1) if interpolation == "bicubic" else out


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [16, 33, 64])  # downscale, odd, upscale
def test_crop_resize_matches_torchvision_resized_crop(size, interpolation):
    x8 = torch.randint(0, 256, (5, 3, 40, 52), dtype=torch.uint8, generator=_gen())
    boxes = D.random_resized_crop_boxes(torch.full((5,), 40), torch.full((5,), 52), generator=_gen(1))
    boxes[0] = torch.tensor([40 - 7, 52 - 9, 7, 9])  # touching the bottom-right corner
    boxes[1] = torch.tensor([0, 0, 2, 3])  # fewer pixels than taps: every cubic tap clamps
    for images in (x8, x8.float() / 255):
        out = D.crop_resize(images, boxes, size, interpolation)
        assert out.dtype == torch.float32 and out.shape == (5, 3, size, size)
        for i in range(5):
            ref = _tv_resized_crop(x8[i].float() / 255, boxes[i], size, interpolation)
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_bicubic_crops_differ_from_bilinear_and_stay_in_range():
    # a hard edge: bicubic rings (clamped to [0, 1]), bilinear does not
    x8 = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    x8[..., 4:] = 255
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    cubic, linear = D.crop_resize(x8, box, 29, "bicubic"), D.crop_resize(x8, box, 29, "bilinear")
    assert (cubic - linear).abs().max() > 0.02
    assert cubic.min() >= 0 and cubic.max() <= 1
    with pytest.raises(ValueError, match="interpolation"):
        D.crop_resize(x8, box, 29, "nearest")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_resize_padded_batch_ignores_padding(interpolation):
    a = torch.randint(0, 256, (3, 30, 20), dtype=torch.uint8, generator=_gen(0))
    b = torch.randint(0, 256, (3, 24, 41), dtype=torch.uint8, generator=_gen(1))
    batch = torch.zeros(2, 3, 30, 41, dtype=torch.uint8)
    batch[0, :, :30, :20], batch[1, :, :24, :41] = a, b
    boxes = torch.tensor([[10.0, 5.0, 20.0, 15.0], [0.0, 0.0, 24.0, 41.0]])  # both reach their image's edge
    out = D.crop_resize(batch, boxes, 48, interpolation)
    packed = D._crop_resize_multi(D.PackedImages.from_list([a, b]), boxes[:, None], 48, interpolation)
    for i, img in enumerate((a, b)):
        ref = _tv_resized_crop(img.float() / 255, boxes[i], 48, interpolation)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[i], ref, atol=1e-5, rtol=0)


def test_make_views_follow_the_recipe_interpolation():
    from sdmp_fast.pipelines.recipes import make_recipe

    x8 = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=_gen())
    out = {}
    for interp in ("bicubic", "bilinear"):
        recipe = make_recipe("byol2", size=24, interpolation=interp)
        recipe = dataclasses.replace(recipe, views=tuple(dataclasses.replace(
            v, hflip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0) for v in recipe.views))
        out[interp] = D.make_views(x8, None, None, recipe, _gen(3))[0]
    boxes = D.random_resized_crop_boxes(torch.full((4,), 40), torch.full((4,), 40), generator=_gen(3))
    for interp in out:
        ref = torch.stack([_tv_resized_crop(x8[i].float() / 255, boxes[i], 24, interp) for i in range(4)])
        ref = TF.normalize(ref, list(make_recipe("byol2").mean), list(make_recipe("byol2").std))
        torch.testing.assert_close(out[interp], ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- per-sample ops
def test_hflip_grayscale_solarize_match_torchvision():
    x = _images()
    mask = torch.tensor([True, False, True, True, False, True])
    flipped, gray, sol = D.hflip(x, mask), D.grayscale(x, mask), D.solarize(x, mask)
    for i in range(len(x)):
        m = bool(mask[i])
        torch.testing.assert_close(flipped[i], TF.hflip(x[i]) if m else x[i])
        torch.testing.assert_close(gray[i], TF.rgb_to_grayscale(x[i], num_output_channels=3) if m else x[i])
        torch.testing.assert_close(sol[i], TF.solarize(x[i], threshold=0.5) if m else x[i])


def test_gaussian_blur_matches_torchvision_per_sample_sigma():
    x = _images(h=32, w=32)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    mask = torch.tensor([True, True, True, True, True, False])
    for k in (3, 9, 23):
        out = D.gaussian_blur(x, sigma, k, mask)
        for i in range(len(x)):
            ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])]) if mask[i] else x[i]
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    assert D.blur_kernel_size(224) == 23 and D.blur_kernel_size(96) == 9 and D.blur_kernel_size(16) == 3
    # DINO's PIL blur is untruncated: +-3 sigma_max as well (13 taps for sigma 2), BYOL's 23 where wider
    assert D.blur_kernel_size(96, "pil") == 13 and D.blur_kernel_size(224, "pil") == 23
    assert D.blur_kernel_size(16, "pil", 1.0) == 7


def test_adjust_hue_matches_torchvision():
    x = _images()
    hue = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.3, 0.5])
    out = D.adjust_hue(x, hue)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], float(hue[i])), atol=1e-5, rtol=0)


def _jitter_ref(img, factors, order):
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order.tolist():
        img = fns[op](img, float(factors[op]))
    return img


@pytest.mark.parametrize("with_hue", [True, False])
def test_color_jitter_matches_torchvision_in_per_sample_order(with_hue):
    n = 24  # every permutation of the 4 ops once
    x = _images(n=n, h=12, w=10)

    order = torch.tensor(list(itertools.permutations(range(4))))
    g = _gen(5)
    factors = torch.stack([0.6 + 0.8 * torch.rand(n, generator=g), 0.6 + 0.8 * torch.rand(n, generator=g),
                           0.8 + 0.4 * torch.rand(n, generator=g), -0.1 + 0.2 * torch.rand(n, generator=g)], 1)
    if not with_hue:
        factors[:, 3] = 0.0
    mask = torch.rand(n, generator=g) < 0.8
    out = D.color_jitter(x, factors, order, mask, with_hue=with_hue)
    for i in range(n):
        ref = _jitter_ref(x[i], factors[i], order[i]) if mask[i] else x[i]
        if not with_hue and mask[i]:  # hue factor 0 is skipped by the batched op: drop it from the reference
            ref = _jitter_ref(x[i], factors[i], order[i][order[i] != 3])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_normalize_matches_torchvision():
    x = _images()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = D.normalize(x, mean, std)
    torch.testing.assert_close(out, TF.normalize(x, list(mean), list(std)), atol=1e-5, rtol=1e-5)
    assert D.normalize(x, mean, std, torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- composites
@pytest.mark.parametrize("blur_kernel, k", [("byol", 3), ("pil", 13)])
def test_apply_augment_equals_op_by_op_reference(blur_kernel, k):
    spec = ViewSpec(size=24, solarize_p=0.5, blur_p=0.5, blur_kernel=blur_kernel)
    x = _images(n=16, h=24, w=24)
    p = D.draw_augment_params(16, spec, _gen(9))
    out = D.apply_augment(x, p, spec)
    for i in range(16):
        ref = TF.hflip(x[i]) if p.flip[i] else x[i]
        if p.jitter[i]:
            ref = _jitter_ref(ref, p.factors[i], p.order[i])
        if p.gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if p.blur[i]:
            ref = TF.gaussian_blur(ref, [k, k], [float(p.sigma[i])])
        if p.solarize[i]:
            ref = TF.solarize(ref, 0.5)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_augment_params_follow_spec_ranges():
    spec = ViewSpec(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, blur_sigma=(0.1, 2.0))
    p = D.draw_augment_params(20000, spec, _gen(3))
    f = p.factors
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2
    assert f[:, 3].abs().max() <= 0.1 and p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    for name, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 1.0), ("solarize", 0.0)):
        assert abs(getattr(p, name).float().mean().item() - prob) < 0.02, name
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(20000, 4))
    first = torch.bincount(p.order[:, 0], minlength=4).float() / 20000  # each op first about 1/4 of the time
    assert (first - 0.25).abs().max() < 0.02


def test_augment_identity_when_every_probability_is_zero():
    spec = ViewSpec(hflip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    x = _images()
    assert torch.equal(D.augment(x, spec, _gen()), x)


def test_augment_range_dtype_and_determinism():
    spec = byol2(size=32).views[1]
    x = _images(n=8, h=32, w=32)
    a, b = D.augment(x, spec, _gen(4)), D.augment(x, spec, _gen(4))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, D.augment(x, spec, _gen(5)))
    h = D.augment(x.bfloat16(), spec, _gen(4))
    assert h.dtype == torch.bfloat16 and (h.float() - a).abs().max() < 0.02


@pytest.mark.parametrize("recipe", [byol2(size=32), dino(global_size=32, local_size=16, n_local=4,
                                                         n_local_mixed=2)], ids=["byol2", "dino"])
@pytest.mark.parametrize("channels", [1, 3])
def test_make_views_shapes_dtypes_ranges(recipe, channels):
    n = 6
    images = torch.zeros(n, channels, 40, 50, dtype=torch.uint8)
    images[:, :, :30, :44] = torch.randint(0, 256, (n, channels, 30, 44), dtype=torch.uint8, generator=_gen())
    hs, ws = torch.full((n,), 30), torch.full((n,), 44)
    views = D.make_views(images, hs, ws, recipe, _gen(), dtype=torch.bfloat16)
    specs = recipe.expanded_views()
    assert len(views) == len(specs)
    lo = min((0 - m) / s for m, s in zip(recipe.mean, recipe.std))
    hi = max((1 - m) / s for m, s in zip(recipe.mean, recipe.std))
    for v, spec in zip(views, specs):
        assert v.shape == (n, 3, spec.size, spec.size) and v.dtype == torch.bfloat16
        assert lo - 0.02 <= v.float().min() and v.float().max() <= hi + 0.02
    if len(views) > 3:  # repeated local crops are independent draws
        assert not torch.equal(views[2], views[3])


@pytest.mark.parametrize("recipe", [byol2(size=32), dino(global_size=32, local_size=16, n_local=4,
                                                         n_local_mixed=2)], ids=["byol2", "dino"])
def test_skip_view_draws_leaves_the_generator_where_make_views_does(recipe):
    """A skipped batch draws what a decoded one draws, whatever its images' sizes (the resume of a pass)."""
    images = D.PackedImages.from_list([torch.zeros(3, 30 + i, 50 - 3 * i, dtype=torch.uint8) for i in range(6)])
    made, skipped = _gen(5), _gen(5)
    D.make_views(images, None, None, recipe, made)
    D.skip_view_draws(6, recipe, skipped)
    assert torch.equal(made.get_state(), skipped.get_state())
    assert torch.equal(torch.rand(4, generator=made), torch.rand(4, generator=skipped))


@pytest.mark.cuda
def test_make_views_on_cuda_never_syncs_with_the_host():
    dev = torch.device("cuda")
    recipe = dino(global_size=64, local_size=32, n_local=4, n_local_mixed=2)
    images = torch.randint(0, 256, (8, 3, 80, 96), dtype=torch.uint8, device=dev)
    hs = torch.full((8,), 80, device=dev)
    ws = torch.full((8,), 96, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    D.make_views(images, hs, ws, recipe, g)  # warm-up: the cached constants are made here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = D.make_views(images, hs, ws, recipe, g, dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = D.make_views(images.cpu(), hs.cpu(), ws.cpu(), recipe, _gen(), dtype=torch.bfloat16)
    assert [v.shape for v in views] == [v.shape for v in cpu]


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_packed_images_mix_gpu_decoded_and_cpu_decoded_images(device):
    # the torch-gpu loader's batches: nvJPEG's images already on the GPU, PNGs / refused JPEGs decoded on the CPU
    # (staged through pinned memory in one copy); order and bytes as in the all-CPU pack
    sizes = [(30, 20), (24, 41), (1, 1), (57, 9), (5, 6)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen(i)) for i, (h, w) in enumerate(sizes)]
    mixed = [t.cuda() if i % 2 else t for i, t in enumerate(imgs)]
    packed, ref = D.PackedImages.from_list(mixed, device), D.PackedImages.from_list(imgs)
    assert packed.data.is_cuda and packed.offsets.is_cuda
    assert torch.equal(packed.data.cpu(), ref.data)
    for got, want in ((packed.offsets, ref.offsets), (packed.heights, ref.heights), (packed.widths, ref.widths)):
        assert torch.equal(got.cpu(), want)


def test_packed_images_crop_like_the_padded_batch():
    sizes = [(30, 20), (24, 41), (1, 1), (57, 9)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen(i)) for i, (h, w) in enumerate(sizes)]
    packed = D.PackedImages.from_list(imgs)
    assert packed.data.numel() == sum(3 * h * w for h, w in sizes)
    padded = torch.zeros(4, 3, 57, 41, dtype=torch.uint8)
    for i, t in enumerate(imgs):
        padded[i, :, : t.shape[1], : t.shape[2]] = t
    boxes = D.random_resized_crop_boxes(packed.heights, packed.widths, generator=_gen(7))
    out = D._crop_resize_multi(packed, boxes[:, None], 24)
    torch.testing.assert_close(out, D.crop_resize(padded, boxes, 24), atol=1e-6, rtol=0)
    for i, t in enumerate(imgs):
        y, x, h, w = (int(v) for v in boxes[i])
        ref = TF.resized_crop(t.float() / 255, y, x, h, w, [24, 24], antialias=False)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    views = D.make_views(packed, None, None, byol2(size=16), _gen())
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2
