"""Batched view augmentation on the tensors' device, shared by every backend that augments after decoding
(torch-gpu, memory, FFCV).

Each op is vectorised over the batch with per-sample parameters: no per-sample Python loop, no host
synchronisation (no ``.item()``, no boolean indexing), randomness only from the ``torch.Generator`` passed in
(it must live on the images' device). Like ``sdmp_fast.mixing``, the random draw (``draw_augment_params``) is
split from the deterministic application (``apply_augment``), so each op can be checked against
``torchvision.transforms.v2.functional`` with the same per-sample parameters (tests/test_device_ops.py does).

Semantics per op (torchvision v2 functional on float images in [0, 1]):
- crop boxes: ``RandomResizedCrop.make_params`` (10 tries, then the central-crop fallback), all tries drawn at
  once and the first valid one kept.
- crop_resize: ``resized_crop(..., interpolation, antialias=False)`` with the view's interpolation: bilinear
  (4 taps) or bicubic (16 taps, ATen's a = -0.75, result clamped to [0, 1] as a uint8 image's is), half-pixel
  centres, taps clamped to the crop box. It does NOT antialias (torchvision's default for tensors does): a crop
  shrunk by more than ~2x aliases a little, as in FFCV/timm GPU pipelines; the trade is a gather of the taps
  straight from the uint8 pixels.
- colour jitter: ``ColorJitter`` factors (uniform in [max(0, 1-b), 1+b], hue in [-h, h]) applied in a
  per-sample random order, like torchvision's ``randperm(4)`` per image.
- grayscale: ``rgb_to_grayscale(num_output_channels=3)``; blur: ``gaussian_blur`` (reflect padding), one
  sigma ~ U(blur_sigma) per sample, kernel ``blur_kernel_size(size, spec.blur_kernel)`` (BYOL's 10% of the side,
  odd: 23 at 224, 9 at 96; the dino recipe's "pil" also covers +-3 sigma: 13 at 96); solarize:
  ``solarize(threshold=0.5)``; flip: ``hflip``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .recipes import Recipe, ViewSpec, blur_kernel_size  # noqa: F401  (blur_kernel_size: part of this module's API)

__all__ = ["random_resized_crop_boxes", "crop_resize", "PackedImages", "AugmentParams", "draw_augment_params",
           "apply_augment", "augment", "normalize", "make_views", "skip_view_draws", "blur_kernel_size", "hflip", "color_jitter",
           "adjust_hue", "grayscale", "gaussian_blur", "solarize", "SOLARIZE_THRESHOLD"]

_CROP_TRIES = 10
SOLARIZE_THRESHOLD = 0.5
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------- crops
def random_resized_crop_boxes(heights: torch.Tensor, widths: torch.Tensor,
                              scale: Tuple[float, float] = (0.08, 1.0),
                              ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes [n, 4] float32 (y0, x0, h, w) in whole pixels.

    All 10 tries are drawn at once and the first that fits is kept; samples where none fits take
    torchvision's central-crop fallback. ``heights``/``widths`` [n] are each image's true size (a padded batch
    passes the unpadded sizes).
    """
    dev = heights.device
    hgt = heights.to(torch.float64)
    wid = widths.to(device=dev, dtype=torch.float64)
    n = hgt.shape[0]
    u = torch.rand(n, _CROP_TRIES, 4, generator=generator, device=dev, dtype=torch.float64)
    area = (hgt * wid)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= wid[:, None]) & (h > 0) & (h <= hgt[:, None])
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # first fitting try (0 when none fits: unused)

    def pick(t):
        return t.gather(1, first).squeeze(1)

    h_t, w_t = pick(h), pick(w)
    y_t = torch.minimum(torch.floor(pick(u[..., 2]) * (hgt - h_t + 1)), hgt - h_t)  # randint(0, H - h + 1)
    x_t = torch.minimum(torch.floor(pick(u[..., 3]) * (wid - w_t + 1)), wid - w_t)

    in_ratio = wid / hgt
    r_min, r_max = min(ratio), max(ratio)
    h_f = torch.where(in_ratio < r_min, torch.round(wid / r_min), hgt)
    w_f = torch.where(in_ratio > r_max, torch.round(hgt * r_max), wid)
    y_f = torch.floor((hgt - h_f) / 2)
    x_f = torch.floor((wid - w_f) / 2)

    found = fits.any(1)
    box = torch.stack([torch.where(found, y_t, y_f), torch.where(found, x_t, x_f),
                       torch.where(found, h_t, h_f), torch.where(found, w_t, w_f)], dim=1)
    return box.float()


def _source_taps(start: torch.Tensor, length: torch.Tensor, size: int, limit):
    """Bilinear taps of a half-pixel-centre resize of [start, start+length) to ``size`` samples.

    Mirrors ATen's upsample_bilinear2d (align_corners=False): src = (i + 0.5) * length / size - 0.5, clamped to
    the crop. ``limit`` (int, or a tensor broadcastable to start) is the image side. Returns (lo index, hi index,
    weight of hi), each [..., size].
    """
    i = torch.arange(size, device=start.device, dtype=torch.float32)
    local = (i + 0.5) * (length[..., None] / size) - 0.5
    local = torch.minimum(local.clamp_min(0.0), (length[..., None] - 1.0).clamp_min(0.0))
    src = start[..., None] + local
    lo = torch.floor(src)
    frac = src - lo
    lo = lo.long().clamp_min(0)
    if isinstance(limit, torch.Tensor):
        last = (limit - 1)[..., None]
        lo = torch.minimum(lo, last)
        hi = torch.minimum(lo + 1, last)  # weight is 0 whenever hi would step past the crop
    else:
        lo = lo.clamp_max(limit - 1)
        hi = (lo + 1).clamp_max(limit - 1)
    return lo, hi, frac


@dataclass
class PackedImages:
    """A batch of differently sized RGB uint8 images back to back in one flat buffer, each channels-last
    (H, W, 3), so no padding is stored (one 8000 x 8000 image does not blow up a whole batch)."""
    data: torch.Tensor  # uint8 [total]
    offsets: torch.Tensor  # [n] int64: first byte of each image
    heights: torch.Tensor  # [n] int64
    widths: torch.Tensor  # [n] int64

    @classmethod
    def from_list(cls, images: Sequence[torch.Tensor], device=None) -> "PackedImages":
        """From [3, H, W] uint8 tensors (what torchvision.io decodes), on ``device`` (default: the images')."""
        if len(images) == 0:
            raise ValueError("PackedImages: no images")
        for j, t in enumerate(images):
            if t.dim() != 3 or t.shape[0] != 3 or t.dtype != torch.uint8:
                raise ValueError(f"PackedImages: image {j} must be uint8 [3, H, W], got {t.dtype} "
                                 f"{tuple(t.shape)}")
        device = torch.device(device) if device is not None else images[0].device
        sizes = [t.numel() for t in images]
        starts = [0]
        for sz in sizes[:-1]:
            starts.append(starts[-1] + sz)
        meta = torch.tensor([starts, [t.shape[1] for t in images], [t.shape[2] for t in images]],
                            dtype=torch.int64)
        meta = meta.to(device, non_blocking=True)
        flat = [t.permute(1, 2, 0).reshape(-1) for t in images]
        on_host = [j for j, t in enumerate(flat) if t.device.type == "cpu"]
        if device.type == "cuda" and on_host:
            # CPU-decoded images (PNGs, files nvJPEG refused) go over in one copy from pinned memory: a copy
            # from pageable memory may make the host wait for the step already queued on the stream
            staged = torch.cat([flat[j] for j in on_host]).pin_memory().to(device, non_blocking=True)
            for j, part in zip(on_host, staged.split([flat[j].numel() for j in on_host])):
                flat[j] = part
        data = torch.cat([t.to(device, non_blocking=True) for t in flat])
        return cls(data, meta[0], meta[1], meta[2])

    def __len__(self) -> int:
        return int(self.offsets.shape[0])


_CUBIC_A = -0.75  # ATen's upsample_bicubic2d (PIL's bicubic uses -0.5)


def _cubic_taps(start: torch.Tensor, length: torch.Tensor, size: int, limit):
    """Bicubic taps of a half-pixel-centre resize of [start, start+length) to ``size`` samples, as ATen's
    upsample_bicubic2d (align_corners=False) computes them: src = (i + 0.5) * length / size - 0.5 (not clamped),
    taps floor(src) - 1 .. floor(src) + 2 clamped to the crop, Keys weights with a = -0.75. Returns (indices
    [..., size, 4] int64, weights [..., size, 4] float32)."""
    i = torch.arange(size, device=start.device, dtype=torch.float32)
    src = (i + 0.5) * (length[..., None] / size) - 0.5
    base = torch.floor(src)
    t = (src - base)[..., None]
    local = base[..., None] + torch.arange(-1, 3, device=start.device, dtype=torch.float32)
    local = torch.minimum(local.clamp_min(0.0), (length[..., None, None] - 1.0).clamp_min(0.0))
    idx = (start[..., None, None] + local).long().clamp_min(0)
    if isinstance(limit, torch.Tensor):
        idx = torch.minimum(idx, (limit - 1)[..., None, None])
    else:
        idx = idx.clamp_max(limit - 1)
    a = _CUBIC_A
    near = torch.cat([t, 1.0 - t], -1)          # distances to the two inner taps
    far = near + 1.0                             # ... and to the two outer ones
    w_near = ((a + 2.0) * near - (a + 3.0)) * near * near + 1.0
    w_far = ((a * far - 5.0 * a) * far + 8.0 * a) * far - 4.0 * a
    weights = torch.stack([w_far[..., 0], w_near[..., 0], w_near[..., 1], w_far[..., 1]], -1)
    return idx, weights


def _resample_crops(fetch, boxes: torch.Tensor, size: int, hgt, wid, interpolation: str) -> torch.Tensor:
    """Shared body: boxes [n, k, 4]; ``fetch(rows, cols)`` returns the float pixels [n, C, k, S, S] at integer
    rows [n, k, S] x cols [n, k, S]. Returns [k * n, C, S, S] float32, view-major (crop j of sample i is row
    j * n + i), in the fetched pixels' units (bicubic not yet clamped)."""
    n, k = boxes.shape[:2]
    if interpolation == "bilinear":
        y_lo, y_hi, fy = _source_taps(boxes[..., 0], boxes[..., 2], size, hgt)  # [n, k, S]
        x_lo, x_hi, fx = _source_taps(boxes[..., 1], boxes[..., 3], size, wid)
        fx_ = fx.view(n, 1, k, 1, size)
        fy_ = fy.view(n, 1, k, size, 1)
        top = torch.lerp(fetch(y_lo, x_lo), fetch(y_lo, x_hi), fx_)
        bot = torch.lerp(fetch(y_hi, x_lo), fetch(y_hi, x_hi), fx_)
        out = torch.lerp(top, bot, fy_)
    elif interpolation == "bicubic":
        ys, wy = _cubic_taps(boxes[..., 0], boxes[..., 2], size, hgt)  # [n, k, S, 4]
        xs, wx = _cubic_taps(boxes[..., 1], boxes[..., 3], size, wid)
        out = None
        for a in range(4):  # rows, then columns within a row: ATen's order of accumulation
            row = None
            for b in range(4):
                term = fetch(ys[..., a], xs[..., b]).mul_(wx[..., b].view(n, 1, k, 1, size))
                row = term if row is None else row.add_(term)
            row.mul_(wy[..., a].view(n, 1, k, size, 1))
            out = row if out is None else out.add_(row)
    else:
        raise ValueError(f"interpolation: must be bilinear or bicubic, got {interpolation!r}")
    c = out.shape[1]
    return out.permute(2, 0, 1, 3, 4).reshape(k * n, c, size, size)


def _crop_resize_multi(images, boxes: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """images [n, C, H, W] tensor or PackedImages, boxes [n, k, 4] -> [k * n, C, size, size] float32 in [0, 1]
    (view-major). Gathers the taps straight from the (uint8) pixels: the full image is never converted to
    float."""
    n, k = boxes.shape[:2]
    if isinstance(images, PackedImages):
        boxes = boxes.to(device=images.data.device, dtype=torch.float32)
        pixels = images.data.view(-1, 3)  # one row per pixel
        first = (images.offsets // 3).view(n, 1, 1, 1)
        row_len = images.widths.view(n, 1, 1, 1)

        def fetch(rows, cols):
            idx = first + rows[..., :, None] * row_len + cols[..., None, :]  # [n, k, S, S]
            px = pixels.index_select(0, idx.reshape(-1)).view(n, k, size, size, 3)
            return px.permute(0, 4, 1, 2, 3).float()

        out = _resample_crops(fetch, boxes, size, images.heights.view(n, 1), images.widths.view(n, 1),
                              interpolation)
        out = out.mul_(1.0 / 255.0)
        return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out

    _, c, hgt, wid = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    flat = images.reshape(n, c, hgt * wid)

    def fetch(rows, cols):
        idx = (rows[..., :, None] * wid + cols[..., None, :]).reshape(n, 1, k * size * size)
        return torch.gather(flat, 2, idx.expand(n, c, -1)).view(n, c, k, size, size).float()

    out = _resample_crops(fetch, boxes, size, hgt, wid, interpolation)
    out = out if images.is_floating_point() else out.mul_(1.0 / 255.0)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Crop each image to its box (y0, x0, h, w) and resize it to size x size, float32 in [0, 1].

    ``images`` [n, C, H, W] uint8 (0..255) or float (0..1); a zero-padded batch of images of different sizes is
    fine (taps never leave the box). Matches ``torchvision...v2.functional.resized_crop(img, y0, x0, h, w,
    [size, size], interpolation, antialias=False)`` on the float image (``bicubic``: clamped to [0, 1]).
    """
    if images.dim() != 4:
        raise ValueError(f"crop_resize: images must be [n, C, H, W], got {tuple(images.shape)}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"crop_resize: boxes must be [n, 4] with n = {images.shape[0]}, got {tuple(boxes.shape)}")
    return _crop_resize_multi(images, boxes[:, None], size, interpolation)


# ------------------------------------------------------------------------------------- colour & filters
def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(-3)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1] broadcastable against x."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask, x), x.flip(-1), x)


def grayscale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(mask, x), _gray(x).expand_as(x), x)


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(_per_sample(mask, x) & (x >= threshold), 1.0 - x, x)


def _blend_step(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One brightness/contrast/saturation step, chosen per sample by ``op`` (0/1/2); inactive samples get
    factor 1, an exact identity (x * 1 + 0). torchvision: (x * f + other * (1 - f)).clamp(0, 1) with
    other = 0 (brightness), the grayscale image's mean (contrast), the grayscale image (saturation)."""
    f = torch.where(active, factor, torch.ones_like(factor))
    keep = 1.0 - f
    gray = _gray(x)  # [n, 1, H, W]
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    # other * (1 - f) with other picked per sample, as two per-sample scalars instead of a select
    w_gray = _per_sample(keep * (op == SATURATION), x)
    w_mean = _per_sample(keep * (op == CONTRAST), x)
    other = torch.addcmul(mean * w_mean, gray, w_gray)
    return torch.addcmul(other, x, _per_sample(f, x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift hue [n] in [-0.5, 0.5]: torchvision's adjust_hue (RGB -> HSV, h += hue mod 1,
    HSV -> RGB) to float rounding, in fewer passes. The shift leaves saturation and value alone, so the image
    goes straight back with the branchless HSV -> RGB form c = v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n_c + 6 h) mod 6, n = (5, 3, 1) for (r, g, b)."""
    r, g, b = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    delta = maxc - minc
    flat = delta == 0  # gray pixels: hue 0, saturation 0 (torchvision's eqc)
    sat = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    inv = torch.where(flat, torch.ones_like(delta), delta).reciprocal_()
    # hue in sextants, in [-1, 5): max == r first, then max == g, as torchvision resolves ties
    h6 = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 = (h6 + _per_sample(hue, h6) * 6.0).remainder_(6.0).unsqueeze(-3)
    k = (_hue_offsets(x.device) + h6).remainder_(6.0)  # [n, 3, H, W]
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    vs = (maxc * sat).unsqueeze(-3)
    return torch.addcmul(maxc.unsqueeze(-3), vs, ramp, value=-1.0)


@functools.lru_cache(maxsize=8)
def _hue_offsets(device: torch.device) -> torch.Tensor:
    # made once per device: no host->device copy per batch
    return torch.tensor([5.0, 3.0, 1.0], device=device).view(1, 3, 1, 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, mask: torch.Tensor,
                 with_hue: bool = True) -> torch.Tensor:
    """ColorJitter with per-sample factors [n, 4] (brightness, contrast, saturation, hue) applied in per-sample
    order [n, 4] (a permutation of 0..3 per row; op order[i, t] runs at step t) where mask [n] is set.

    A uniform permutation of 4 ops = a uniform order of the 3 blend ops and a uniform slot for hue, so this runs
    the 3 blend slots masked to "before hue", hue once, then the 3 slots masked to "after hue": 6 cheap blends
    and one HSV round trip instead of 4 HSV round trips. ``with_hue=False`` (hue range 0) skips the HSV trip.
    """
    rank = order.argsort(dim=1)  # rank[i, op] = step at which op runs
    blend_order = rank[:, :3].argsort(dim=1)  # the 3 blend ops in the order they run
    hue_slot = rank[:, HUE]  # number of blend ops before hue
    blend_factors = factors[:, :3].gather(1, blend_order)

    def blends(before_hue: bool, y: torch.Tensor) -> torch.Tensor:
        for j in range(3):
            active = mask & ((hue_slot > j) if before_hue else (hue_slot <= j))
            y = _blend_step(y, blend_order[:, j], blend_factors[:, j], active)
        return y

    if not with_hue:  # hue's slot only splits the blend order in two: without hue, run it straight
        for j in range(3):
            x = _blend_step(x, blend_order[:, j], blend_factors[:, j], mask)
        return x
    x = blends(True, x)
    x = torch.where(_per_sample(mask, x), adjust_hue(x, factors[:, HUE]), x)
    return blends(False, x)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[n, k] normalised 1-D Gaussian kernels, torchvision's _get_gaussian_kernel1d per sample."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel_size, device=sigma.device, dtype=torch.float32)
    return torch.softmax(-(t[None, :] / sigma[:, None].float()).pow(2), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample Gaussian blur (sigma [n]) with reflect padding: two separable passes, each one grouped conv
    over the n*C planes with that plane's own kernel."""
    n, c, hgt, wid = x.shape
    pad = kernel_size // 2
    kern = gaussian_kernels(sigma, kernel_size).to(x.dtype)  # [n, k] -> one row per plane, [n*C, k]
    kern = kern[:, None, :].expand(n, c, kernel_size).reshape(n * c, kernel_size)
    planes = x.reshape(1, n * c, hgt, wid)
    planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), kern.view(n * c, 1, 1, kernel_size),
                      groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), kern.view(n * c, 1, kernel_size, 1),
                      groups=n * c)
    out = planes.view(n, c, hgt, wid)
    return out if mask is None else torch.where(_per_sample(mask, x), out, x)


# ------------------------------------------------------------------------------------------ the recipe
@dataclass
class AugmentParams:
    """Per-sample parameters of one view's augmentation (all [n] or [n, 4], on the images' device)."""
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor  # brightness, contrast, saturation, hue
    order: torch.Tensor  # permutation of 0..3 per sample
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def draw_augment_params(n: int, spec: ViewSpec, generator: Optional[torch.Generator] = None,
                        device=None) -> AugmentParams:
    """All of a view's randomness in one draw (one kernel): flip, jitter on/off, 4 factors, 4 order keys,
    grayscale, blur on/off, sigma, solarize."""
    u = torch.rand(n, 14, generator=generator, device=device, dtype=torch.float32)
    ranges = [(max(0.0, 1 - spec.brightness), 1 + spec.brightness), (max(0.0, 1 - spec.contrast),
              1 + spec.contrast), (max(0.0, 1 - spec.saturation), 1 + spec.saturation), (-spec.hue, spec.hue)]
    s_lo, s_hi = spec.blur_sigma
    return AugmentParams(
        flip=u[:, 0] < spec.hflip_p,
        jitter=u[:, 1] < spec.jitter_p,
        factors=torch.stack([lo + (hi - lo) * u[:, 2 + j] for j, (lo, hi) in enumerate(ranges)], dim=1),
        order=u[:, 6:10].argsort(dim=1),
        gray=u[:, 10] < spec.grayscale_p,
        blur=u[:, 11] < spec.blur_p,
        sigma=s_lo + (s_hi - s_lo) * u[:, 12],
        solarize=u[:, 13] < spec.solarize_p,
    )


def apply_augment(x: torch.Tensor, params: AugmentParams, spec: ViewSpec) -> torch.Tensor:
    """Deterministic part: flip, colour jitter, grayscale, blur, solarize (BYOL order; flip commutes with the
    rest). Ops whose probability is 0 in ``spec`` are skipped outright. Computes in float32 and returns
    ``x.dtype``."""
    out = x.float()
    if spec.hflip_p > 0:
        out = hflip(out, params.flip)
    if spec.jitter_p > 0 and (spec.brightness or spec.contrast or spec.saturation or spec.hue):
        out = color_jitter(out, params.factors, params.order, params.jitter, with_hue=spec.hue > 0)
    if spec.grayscale_p > 0:
        out = grayscale(out, params.gray)
    if spec.blur_p > 0:
        out = gaussian_blur(out, params.sigma, blur_kernel_size(x.shape[-1], spec.blur_kernel, spec.blur_sigma[1]),
                            params.blur)
    if spec.solarize_p > 0:
        out = solarize(out, params.solarize)
    return out.to(x.dtype)


def augment(x: torch.Tensor, spec: ViewSpec, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x [n, 3, S, S] float in [0, 1] -> augmented, same shape/dtype, in [0, 1]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"augment: expected RGB views [n, 3, S, S], got {tuple(x.shape)}")
    return apply_augment(x, draw_augment_params(x.shape[0], spec, generator, x.device), spec)


@functools.lru_cache(maxsize=32)
def _channel_constants(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device):
    # made once per device: no host->device copy per batch (keeps the op capturable)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    inv = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, inv


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(x - mean) / std per channel, returned as ``dtype`` (default: x's float dtype)."""
    m, inv = _channel_constants(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    out = (x.float() - m) * inv
    return out.to(dtype or (x.dtype if x.is_floating_point() else torch.float32))


def make_views(images: Union[torch.Tensor, PackedImages], heights: Optional[torch.Tensor],
               widths: Optional[torch.Tensor], recipe: Recipe, generator: Optional[torch.Generator] = None,
               dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """All views of a recipe from a batch of decoded images (crop_resize + augment + normalize).

    ``images``: [n, C, H, W] (C = 1 or 3; uint8 or float in [0, 1]; zero-padded when sizes differ) with
    heights/widths [n] the true sizes (None: the tensor's), or a PackedImages (its own sizes). Returns one
    [n, 3, S, S] tensor per ``recipe.expanded_views()`` entry, ``dtype`` (default float32). Repeated views of one
    spec (DINO's local crops) are cropped and augmented together as one larger batch.
    """
    if isinstance(images, PackedImages):
        n, device = len(images), images.data.device
        heights, widths = images.heights, images.widths
    else:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"make_views: images must be [n, 1 or 3, H, W], got {tuple(images.shape)}")
        n, device = images.shape[0], images.device
        if heights is None or widths is None:
            heights = torch.full((n,), images.shape[2], device=device)
            widths = torch.full((n,), images.shape[3], device=device)
    views: List[torch.Tensor] = []
    for spec in recipe.views:
        k = spec.count
        if k == 0:
            continue
        hs = heights.to(device).repeat(k)  # view-major: row j * n + i
        ws = widths.to(device).repeat(k)
        boxes = random_resized_crop_boxes(hs, ws, spec.scale, spec.ratio, generator)
        boxes = boxes.view(k, n, 4).transpose(0, 1)
        crops = _crop_resize_multi(images, boxes, spec.size, spec.interpolation)
        if crops.shape[1] == 1:
            crops = crops.expand(-1, 3, -1, -1)
        crops = normalize(augment(crops, spec, generator), recipe.mean, recipe.std, dtype)
        views.extend(crops.split(n))
    return views


def skip_view_draws(n: int, recipe: Recipe, generator: Optional[torch.Generator] = None, device=None,
                    crops: bool = True) -> None:
    """Draw from ``generator`` exactly what ``make_views`` draws for a batch of ``n`` images of ``recipe`` (the
    crop boxes' tries, then each view's augmentation; the number drawn depends on ``n`` only, not on the
    images), and drop it: a loader that skips a batch without decoding it leaves its generator where the batch
    would have left it. Calls the same draw functions, so the two cannot drift apart. ``crops=False``: what
    ``augment`` alone draws (views cropped by the decoder)."""
    for spec in recipe.views:
        m = n * spec.count
        if m == 0:
            continue
        if crops:
            ones = torch.ones(m, device=device, dtype=torch.int64)
            random_resized_crop_boxes(ones, ones, spec.scale, spec.ratio, generator)
        draw_augment_params(m, spec, generator, device)
