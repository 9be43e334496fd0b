"""The pipelines the issues' anchors were measured with, rebuilt so that a benchmark times them beside ours in
the same run (the anchors themselves come from another day and machine: only a same-run ratio means anything).

- ``dali-solo-learn``: a DALI pretraining pipeline in the style of solo-learn's ``solo/data/dali_dataloader.py``
  (the "DALI solo-learn-style two-view" anchor, 16,103 img/s on an H100; with the ``dino`` recipe the
  "DALI DINO 2x224 + 8x96" one, 3,740 img/s): DALI's own file reader (shuffled, sharded), one decode per image
  (``mixed`` on a GPU), then per view of the recipe a random resized crop (cubic interpolation as solo-learn's,
  unless the recipe asks for bilinear, so that a comparison is filter for filter) and every
  probabilistic augmentation computed for all samples and chosen per sample by a coin flip (solo-learn's
  ``Mux``: ``c * augmented + !c * original``), grayscale as a colour conversion concatenated to 3 channels,
  Gaussian blur with a 23-tap window and sigma U(blur_sigma) (solo-learn's fixed window, at every view size),
  solarize by arithmetic, then crop-mirror-normalize with a random mirror. No mixing. The recipe's sizes,
  scales and probabilities are used, so it runs the same augmentation as the loader it is compared with.
- ``decode-only``: nvJPEG batch decode of in-memory JPEG bytes (``torchvision.io.decode_jpeg`` on the GPU,
  the "nvJPEG decode alone" anchor, 21,688 img/s): no reading, no augmentation. The ceiling of any loader that
  decodes every image once. GPU only.

Each baseline is an endless iterator of ``SDMPBatch`` (no mixed views), so ``loaders.time_batches`` times it
exactly like a loader.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.pipelines.base import loader_threads

BASELINES = ("dali-solo-learn", "decode-only")
SOLO_LEARN_BLUR_WINDOW = 23


def _mux(flag, augmented, original):
    """solo-learn's Mux: both branches are computed for every sample, the coin picks one per sample."""
    return flag * augmented + (flag ^ True) * original


def _solo_learn_view(images, spec, mean, std, gpu: bool, out_dtype):
    from nvidia.dali import fn, types

    def coin(p):
        c = fn.random.coin_flip(probability=float(p), dtype=types.BOOL)
        return c.gpu() if gpu else c

    interp = types.INTERP_CUBIC if spec.interpolation == "bicubic" else types.INTERP_LINEAR
    v = fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.scale),
                               random_aspect_ratio=list(spec.ratio), interp_type=interp)
    if spec.jitter_p > 0:
        def factor(a):
            return fn.random.uniform(range=[max(0.0, 1.0 - a), 1.0 + a]) if a > 0 else 1.0
        hue = fn.random.uniform(range=[-360.0 * spec.hue, 360.0 * spec.hue]) if spec.hue > 0 else 0.0
        jittered = fn.color_twist(v, brightness=factor(spec.brightness), contrast=factor(spec.contrast),
                                  saturation=factor(spec.saturation), hue=hue)
        v = _mux(coin(spec.jitter_p), jittered, v)
    if spec.grayscale_p > 0:
        gray = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
        v = _mux(coin(spec.grayscale_p), fn.cat(gray, gray, gray, axis=2), v)
    if spec.blur_p > 0:
        lo, hi = spec.blur_sigma
        sigma = fn.random.uniform(range=[0.0, 1.0]) * (hi - lo) + lo
        blurred = fn.gaussian_blur(v, window_size=[SOLO_LEARN_BLUR_WINDOW, SOLO_LEARN_BLUR_WINDOW], sigma=sigma)
        v = _mux(coin(spec.blur_p), blurred, v)
    if spec.solarize_p > 0:
        v = _mux(coin(spec.solarize_p), _mux(v >= 128, 255 - v, v), v)
    mirror = fn.random.coin_flip(probability=float(spec.hflip_p))
    return fn.crop_mirror_normalize(v, mirror=mirror, dtype=out_dtype, output_layout="CHW",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])


def dali_solo_learn(images, recipe, batch_size: int, device: torch.device, dtype: Optional[torch.dtype] = None,
                    num_threads: Optional[int] = None, seed: int = 0, shard_id: int = 0,
                    num_shards: int = 1) -> Iterator[SDMPBatch]:
    """Endless batches of the solo-learn-style DALI pipeline for ``recipe`` (its mixing is ignored).
    ``images``: a ``pipelines.base.ImageList``. Output float32, or float16 when ``dtype`` is a 16-bit float
    (DALI has no bfloat16; solo-learn itself outputs float32)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    if len(images) // num_shards < batch_size:
        raise ValueError(f"dali-solo-learn: {len(images)} images over {num_shards} shard(s) fill no batch of "
                         f"{batch_size} (DALI's reader drops the partial last batch)")
    gpu = device.type == "cuda"
    pipe = solo_learn_pipeline(images, recipe, batch_size, gpu=gpu, device_id=(device.index or 0) if gpu else None,
                               dtype=dtype, num_threads=num_threads, seed=seed, shard_id=shard_id,
                               num_shards=num_shards)
    pipe.build()
    names = [f"view{j}" for j in range(len(recipe.expanded_views()))] + ["labels"]
    # The iterator runs the first batch as it is made: made at the first next(), a file DALI cannot decode is a
    # failed run (timed start-up), not a pipeline that could not be built ("unavailable")
    return _dali_batches(lambda: DALIGenericIterator(pipe, names, reader_name="Reader", auto_reset=True,
                                                     last_batch_policy=LastBatchPolicy.DROP), names)


def solo_learn_pipeline(images, recipe, batch_size: int, *, gpu: bool, device_id: Optional[int],
                        dtype: Optional[torch.dtype] = None, num_threads: Optional[int] = None, seed: int = 0,
                        shard_id: int = 0, num_shards: int = 1):
    """:func:`dali_solo_learn`'s pipeline, defined but not built (``gpu=True`` with ``device_id=None``: the GPU
    graph on a machine without CUDA, as ``pipelines.dali_ops.define_pipeline``)."""
    from nvidia.dali import fn, pipeline_def, types

    from sdmp_fast.pipelines import dali_fork
    dali_fork.install()
    out_dtype = types.FLOAT16 if dtype in (torch.float16, torch.bfloat16) else types.FLOAT
    views = recipe.expanded_views()

    @pipeline_def
    def solo_learn_style():
        jpegs, labels = fn.readers.file(files=list(images.files), labels=[max(0, int(y)) for y in images.labels],
                                        shard_id=shard_id, num_shards=num_shards, random_shuffle=True,
                                        name="Reader")
        decoded = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        outs = [_solo_learn_view(decoded, spec, recipe.mean, recipe.std, gpu, out_dtype) for spec in views]
        return (*outs, labels.gpu() if gpu else labels)

    return solo_learn_style(batch_size=batch_size, num_threads=loader_threads(num_threads), device_id=device_id,
                            seed=seed)


def _dali_batches(make_iterator, names) -> Iterator[SDMPBatch]:
    it = make_iterator()
    while True:
        for out in it:
            d = out[0]
            labels = d["labels"].view(-1).long()
            yield SDMPBatch(views=[d[n] for n in names[:-1]], labels=labels,
                            indices=torch.arange(labels.shape[0], device=labels.device))


def decode_only(images, batch_size: int, device: torch.device, max_files: int) -> Iterator[SDMPBatch]:
    """Endless batches of ``batch_size`` images decoded by nvJPEG from bytes read once into host memory (the
    first ``max_files`` JPEG files, cycled; other formats are left out). The decoded [3, H, W] uint8 images
    differ in size, so ``views[0]`` is the first of them broadcast over the batch."""
    from torchvision.io import read_file

    if device.type != "cuda":
        raise RuntimeError("decode-only times nvJPEG: it needs a CUDA device")
    data = []
    for f in images.files:
        raw = read_file(f)
        if raw.numel() > 2 and raw[0] == 0xFF and raw[1] == 0xD8:  # JPEG only: what nvJPEG decodes
            data.append(raw)
            if len(data) >= max(batch_size, max_files):
                break
    if not data:
        raise ValueError("decode-only: no JPEG file in the data set (nvJPEG decodes JPEG only)")
    return _decoded_batches(data, batch_size, device)


def _decoded_batches(data, batch_size: int, device: torch.device) -> Iterator[SDMPBatch]:
    from torchvision.io import decode_jpeg

    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    indices = torch.arange(batch_size, device=device)
    start = 0
    while True:
        chunk = [data[(start + k) % len(data)] for k in range(batch_size)]
        start = (start + batch_size) % len(data)
        decoded = decode_jpeg(chunk, device=device)
        # the images differ in size: views[0] is the first one broadcast over the batch (a view, no copy), so the
        # batch counts batch_size images and its shape names a decoded image's
        yield SDMPBatch(views=[decoded[0].unsqueeze(0).expand(batch_size, -1, -1, -1)], labels=labels,
                        indices=indices)


def make_baseline(name: str, images, recipe, batch_size: int, device: torch.device,
                  dtype: Optional[torch.dtype] = None, num_threads: Optional[int] = None, seed: int = 0,
                  max_files: int = 4096) -> Iterator[SDMPBatch]:
    if name == "dali-solo-learn":
        return dali_solo_learn(images, recipe, batch_size, device, dtype, num_threads, seed)
    if name == "decode-only":
        return decode_only(images, batch_size, device, max_files)
    raise ValueError(f"baseline: unknown {name!r}; choose among {', '.join(BASELINES)}")
