"""The DALI graph of a Recipe: decode each image once, then derive every view from it with per-sample
randomness drawn inside DALI (``fn.random.*``).

Per view (BYOL / DINO order): random resized crop (the view's interpolation: DALI's cubic or linear, antialiased
when shrinking) -> colour jitter and grayscale (one ``color_twist``: grayscale is saturation 0) -> Gaussian
blur (per-sample sigma, cut where every backend cuts it: recipes.blur_kernel_size) -> solarize -> flip +
normalise + HWC->CHW + cast (one ``crop_mirror_normalize``). Flip commutes with the pixel-wise and symmetric ops before it,
so it rides along with the normalisation for free. With ``photometric="torch"`` a view is its crop alone
(HWC->CHW uint8), and the loader applies the rest with ``device_ops`` (torchvision's exact colour jitter).

An augmentation that a sample does not draw (blur with p 0.1, solarize with p 0.2) is skipped in one of two ways:
``conditionals=True`` splits the batch with DALI's ``if`` (only drawn samples are processed: the cheapest on
CPU, where every pass over the pixels costs), ``conditionals=False`` runs the op on every sample with identity
parameters (blur window 1, solarize threshold above 255: one fused kernel per op, best on the GPU).

With ``mix_in_graph`` the pipeline also batch-flip mixes the views (``dali_mix.py``) from host-drawn
parameters fed with the images.

Only this module, ``pipelines/dali_mix.py`` and ``pipelines/dali.py`` import nvidia.dali.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from nvidia.dali import fn, pipeline_def, types
import nvidia.dali.math as dmath

from . import dali_fork
from .recipes import Recipe, ViewSpec, blur_kernel_size

dali_fork.install()  # a forked child (a DataLoader worker) must never tear down a pipeline it inherited

_INTERP_TYPES = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}


def _coin(p: float):
    """Per-sample Bernoulli(p) node; the Python constants True / None when p is 1 / 0 (no node at all)."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return None
    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _jitter_factor(amount: float, flag):
    """torchvision ColorJitter's factor U[max(0, 1 - a), 1 + a] where ``flag`` drew jitter, else 1."""
    if amount <= 0 or flag is None:
        return 1.0
    u = fn.random.uniform(range=[max(0.0, 1.0 - amount), 1.0 + amount])
    return u if flag is True else 1.0 + flag * (u - 1.0)


def colour(v, spec: ViewSpec):
    """Colour jitter (brightness, contrast, saturation, hue; applied with jitter_p) and grayscale (grayscale_p)
    as one per-sample ``color_twist`` with float output, clamped to [0, 255] like torchvision's clamping jitter.
    Differences from torchvision: the four jitter ops are applied in a fixed order with one clamp at the end,
    contrast pivots on mid-grey instead of the image mean, and grayscale uses the YIQ luma. Returns None when
    the view has no colour augmentation."""
    jit, gray = _coin(spec.jitter_p), _coin(spec.grayscale_p)
    if jit is None and gray is None:
        return None
    brightness = _jitter_factor(spec.brightness, jit)
    contrast = _jitter_factor(spec.contrast, jit)
    saturation = _jitter_factor(spec.saturation, jit)
    hue = 0.0
    if spec.hue > 0 and jit is not None:
        hue = fn.random.uniform(range=[-360.0 * spec.hue, 360.0 * spec.hue])  # degrees
        hue = hue if jit is True else jit * hue
    if gray is True:
        saturation = 0.0
    elif gray is not None:
        saturation = saturation * (1 - gray)
    # float output: DALI's uint8 colour-twist output path costs 3x the float one on CPU; the clamp is cheap.
    v = fn.color_twist(v, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                       dtype=types.FLOAT)
    return dmath.clamp(v, 0.0, 255.0)


def _on(device: str, node):
    """Move a per-sample CPU scalar next to a GPU operand of an arithmetic expression."""
    return node.gpu() if device == "gpu" else node


def _blur(v, sigma, window=None):
    kw = {} if window is None else {"window_size": window}
    return fn.gaussian_blur(v, sigma=sigma, dtype=types.FLOAT, **kw)


def _solarize(v):
    """x >= 128 -> 255 - x on float pixels in [0, 255]."""
    return v + (v >= 128.0) * (255.0 - 2.0 * v)


def _sigma(spec: ViewSpec):
    """Per-sample sigma ~ U(blur_sigma); a constant where the range is one value (DALI's uniform refuses an empty
    range)."""
    lo, hi = spec.blur_sigma
    return float(lo) if lo == hi else fn.random.uniform(range=[float(lo), float(hi)])


def _taps(spec: ViewSpec, sigma):
    """Per-sample kernel width: the view's (recipes.blur_kernel_size, as the other backends cut it: BYOL's 10% of
    the side, PIL's +-3 sigma_max), or DALI's own 2 ceil(3 sigma) + 1 where that is narrower. The tails past
    3 sigma hold 0.3% of the kernel, and a small sigma then costs fewer taps (7 instead of 23 at 224 px and sigma
    1); with DALI's width alone BYOL's cut kernel was not cut (13 taps instead of 9 at 96 px, sigma 2)."""
    taps = blur_kernel_size(spec.size, spec.blur_kernel, spec.blur_sigma[1])
    if isinstance(sigma, float):
        return min(taps, 2 * math.ceil(3.0 * sigma) + 1)
    return fn.cast(dmath.min(float(taps), 2.0 * dmath.ceil(3.0 * sigma) + 1.0), dtype=types.INT32)


def blur_all(v, spec: ViewSpec, device: str):
    """Gaussian blur with per-sample sigma ~ U(blur_sigma) over ``_taps``; samples that did not draw it get a
    1-tap window (identity)."""
    flag = _coin(spec.blur_p)
    if flag is None:
        return v
    sigma = _sigma(spec)
    taps = _taps(spec, sigma)
    if flag is True:
        return _blur(v, sigma, taps)
    window = fn.cast(flag * (taps - 1) + 1, dtype=types.INT32)
    return _blur(v, sigma, window)


def solarize_all(v, spec: ViewSpec, device: str):
    """Solarize where drawn: threshold 128 for drawn samples, 256 (never reached) for the rest."""
    flag = _coin(spec.solarize_p)
    if flag is None:
        return v
    if flag is True:
        return _solarize(v)
    threshold = _on(device, 256.0 - 128.0 * flag)
    return v + (v >= threshold) * (255.0 - 2.0 * v)


def crop_view(images, spec: ViewSpec):
    """The view's random resized crop: [S, S, 3] uint8 per sample."""
    return fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.scale),
                                  random_aspect_ratio=list(spec.ratio), antialias=True,
                                  interp_type=_INTERP_TYPES[spec.interpolation])


def augment_view(images, spec: ViewSpec, *, device: str, mean: Sequence[float], std: Sequence[float],
                 out_dtype, conditionals: bool, photometric: str = "dali"):
    """One view [3, S, S] per sample from decoded HWC uint8 images (see the module docstring for the order).

    Pixels are uint8 out of the crop, float in [0, 255] from the colour step on (float blur and arithmetic
    are cheaper in DALI than their uint8 forms), normalised by the final crop_mirror_normalize.
    ``photometric="torch"``: the crop alone, as CHW uint8 (flip, colour, blur, solarize and normalisation are
    left to ``device_ops`` after the pipeline)."""
    v = crop_view(images, spec)
    if photometric == "torch":
        return fn.transpose(v, perm=[2, 0, 1])
    coloured = colour(v, spec)
    v = fn.cast(v, dtype=types.FLOAT) if coloured is None else coloured
    if conditionals and 0 < spec.blur_p < 1:
        if fn.random.coin_flip(probability=float(spec.blur_p), dtype=types.BOOL):
            sigma = _sigma(spec)
            v = _blur(v, sigma, _taps(spec, sigma))
    else:
        v = blur_all(v, spec, device)
    if conditionals and 0 < spec.solarize_p < 1:
        if fn.random.coin_flip(probability=float(spec.solarize_p), dtype=types.BOOL):
            v = _solarize(v)
    else:
        v = solarize_all(v, spec, device)
    mirror = _coin(spec.hflip_p)
    mirror = 0 if mirror is None else (1 if mirror is True else fn.cast(mirror, dtype=types.INT32))
    return fn.crop_mirror_normalize(v, mirror=mirror, mean=[255.0 * m for m in mean],
                                    std=[255.0 * s for s in std], dtype=out_dtype, output_layout="CHW")


def build_pipeline(source: Callable, recipe: Recipe, **kw):
    """:func:`define_pipeline`, built (not run)."""
    pipe = define_pipeline(source, recipe, **kw)
    pipe.build()
    return pipe


def define_pipeline(source: Callable, recipe: Recipe, *, batch_size: int, num_threads: int, device_id,
                    seed: int, prefetch_queue_depth: int = 2, fp16: bool = False, conditionals: bool = False,
                    gpu_indices: bool = False, decoder_options=None, mix_in_graph: bool = False,
                    photometric: str = "dali", gpu: Optional[bool] = None, **pipeline_kwargs):
    """The recipe's DALI pipeline, defined but not built.

    ``source`` is a batch-mode external_source callback returning ``(encoded_bytes_list, indices_int64)``;
    the pipeline's outputs are one CHW float (fp16 with ``fp16``) tensor list per expanded view, then the
    indices on the CPU (and, with ``gpu_indices``, on the GPU too). ``device_id=None`` puts every op on the
    CPU; otherwise decoding is ``mixed`` (nvJPEG and the hardware decoder where present) and all augmentation
    runs on that GPU.

    ``mix_in_graph`` (the recipe must mix at least one view): ``source`` also returns the
    ``dali_mix.MixDraw.feeds`` of the batch after the indices, and the mixed views (``recipe.mix.mixed_views``
    order) follow the clean views in the outputs. Views are then mixed in float32 (``multi_paste`` has no
    float16 kernel) and cast to fp16 at the end when ``fp16``. ``pipeline_kwargs`` go to the Pipeline
    (``enable_checkpointing``, ``checkpoint``).

    ``photometric="torch"``: every view comes out as its crop alone, CHW uint8 (no flip, colour, blur, solarize
    or normalisation: the loader applies ``device_ops``' torchvision-exact ones afterwards); not with
    ``mix_in_graph``, which would mix the views before their augmentation.

    ``gpu`` (default: ``device_id is not None``) places the ops; ``gpu=True`` with ``device_id=None`` defines the
    GPU graph on a machine without CUDA, where it cannot be built but DALI still checks it (the CPU tests do).
    """
    gpu = device_id is not None if gpu is None else gpu
    if photometric not in ("dali", "torch"):
        raise ValueError(f"photometric: 'dali' or 'torch', got {photometric!r}")
    if photometric == "torch" and mix_in_graph:
        raise ValueError("photometric='torch' with mix_in_graph: the graph would mix views before their "
                         "augmentation (torch's comes after the pipeline)")
    device = "gpu" if gpu else "cpu"
    out_dtype = types.FLOAT16 if fp16 else types.FLOAT
    decoder_options = dict(decoder_options or {})
    views = recipe.expanded_views()
    feed_dtypes, feed_ndims = [], []
    if mix_in_graph:
        from .dali_mix import feed_types, mix_views

        feed_dtypes, feed_ndims = feed_types(len(recipe.mix.mixed_views))

    @pipeline_def(enable_conditionals=conditionals or mix_in_graph)  # the mixing splits by method with ``if``
    def graph():
        encoded, indices, *mix_feeds = fn.external_source(
            source=source, num_outputs=2 + len(feed_dtypes), batch=True,
            dtype=[types.UINT8, types.INT64] + feed_dtypes, ndim=[1, 0] + feed_ndims)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   **decoder_options)
        view_dtype = types.FLOAT if mix_in_graph else out_dtype
        outs = [augment_view(images, spec, device=device, mean=recipe.mean, std=recipe.std, out_dtype=view_dtype,
                             conditionals=conditionals, photometric=photometric) for spec in views]
        if mix_in_graph:
            outs += mix_views(outs, mix_feeds, recipe, gpu=gpu)
            if fp16:
                outs = [fn.cast(o, dtype=types.FLOAT16) for o in outs]
        return (*outs, indices, indices.gpu()) if gpu_indices else (*outs, indices)

    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True, **pipeline_kwargs)


def build_probe_pipeline(device_id, decoder_options=None):
    """A one-image decoder with the main pipeline's decoder settings: tells which file of a failed batch is
    undecodable (the batched decoder reports an error for the batch, not the file)."""
    pipe = define_probe_pipeline(device_id, decoder_options)
    pipe.build()
    return pipe


def define_probe_pipeline(device_id, decoder_options=None, gpu: Optional[bool] = None):
    """:func:`build_probe_pipeline`'s pipeline, not built (``gpu`` as in :func:`define_pipeline`)."""
    gpu = device_id is not None if gpu is None else gpu
    decoder_options = dict(decoder_options or {})

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def probe():
        encoded = fn.external_source(name="probe_bytes", batch=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                 **decoder_options)

    return probe()
