"""Dependency-light GPU backend: plain PyTorch + torchvision.io, no DALI/FFCV.

Per batch: a small thread pool reads the files' bytes (and, for the batches after it, keeps ``prefetch``
batches of reads in flight while the current one is augmented); JPEGs are decoded together by nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``); every view is cut, augmented and normalised by
``device_ops.make_views`` on the device from the unpadded packed batch, then batch-flip mixed by
``assemble_batch``. On ``device="cpu"`` (CI, machines without a GPU) the threads decode (libjpeg-turbo, PIL) and
the same device ops run on the CPU.

Decoded on the CPU (in the reading threads) even with a GPU: non-JPEG files (PNG, BMP, ...), JPEGs whose EXIF
orientation is not upright (nvJPEG ignores EXIF), JPEGs without an end-of-image marker (truncated: libjpeg
rejects them, so both devices skip the same files), and any file nvJPEG rejects (each retried alone): JPEGs
with libjpeg-turbo (turned upright by our own EXIF reader, which finds EXIF after an XMP segment too), every
other format with PIL (as the torchvision backend). Images whose header declares more pixels than
``image_bytes.max_pixels`` are skipped before any decode (torchvision.io and nvJPEG have no limit). A file
neither decoder can read is skipped, counted and named (``loader.skipped``, a warning at each epoch's end).
16-bit images are scaled to 8 bits; grayscale / CMYK / palette images come out RGB.
"""
from __future__ import annotations

import collections
import io
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sdmp_fast.batch import SDMPBatch, exact_device

from .base import (EpochSampler, SkippingLoader, assemble_batch, list_images, make_generator, skip_batch_draws,
                   usable_cores)
from .device_ops import PackedImages, make_views
from .image_bytes import jpeg_segments, pil_rgb, read_file_bytes, too_large
from .recipes import Recipe
from .skips import SkipLog, short_reason

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"


def exif_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) of a JPEG, 1 when it has none (walks the markers before the image data: the
    first APP1 segment holding EXIF, wherever it is, as PIL; an XMP segment may come first)."""
    for i, marker in jpeg_segments(data):
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            tiff = i + 10
            order = "big" if data[tiff:tiff + 2] == b"MM" else "little"
            ifd = tiff + int.from_bytes(data[tiff + 4:tiff + 8], order)
            for k in range(int.from_bytes(data[ifd:ifd + 2], order)):
                entry = ifd + 2 + 12 * k
                if int.from_bytes(data[entry:entry + 2], order) == 0x0112:
                    value = int.from_bytes(data[entry + 8:entry + 10], order)
                    return value if 1 <= value <= 8 else 1
            return 1
    return 1


def decode_cpu(data: torch.Tensor) -> torch.Tensor:
    """Encoded bytes -> upright uint8 [3, H, W]; raises on undecodable data. JPEGs go to libjpeg-turbo
    (torchvision.io), every other format to PIL: torchvision.io knows only PNG / WebP / GIF besides JPEG, and its
    libpng path crashes the process (SIGSEGV, nothing to catch) on a PNG with a bad data checksum."""
    import torchvision.io as tio

    if bytes(data[:3]) == _JPEG_MAGIC:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
            img = tio.decode_jpeg(data, mode=tio.ImageReadMode.RGB)
        # turned here, not by torchvision's apply_exif_orientation: that reads only a first APP1 segment, so a
        # photo whose XMP segment comes before its EXIF one stayed on its side (PIL, DALI and nvJPEG's route agree)
        img = orient(img, exif_orientation(data.numpy().tobytes()))
    else:
        from PIL import UnidentifiedImageError

        try:
            rgb = pil_rgb(io.BytesIO(data.numpy().tobytes()))
        except UnidentifiedImageError:  # its message names the BytesIO object, not the file
            raise ValueError("not an image PIL or libjpeg can read") from None
        img = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
        raise ValueError(f"decoded to an unusable {img.dtype} {tuple(img.shape)} image")
    return img


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] image turned upright for its EXIF orientation (1..8), as PIL's ImageOps.exif_transpose."""
    if orientation == 2:
        img = img.flip(-1)
    elif orientation == 3:
        img = img.flip(-1, -2)
    elif orientation == 4:
        img = img.flip(-2)
    elif orientation == 5:
        img = img.transpose(-1, -2)
    elif orientation == 6:
        img = img.rot90(-1, (-2, -1))
    elif orientation == 7:
        img = img.flip(-1, -2).transpose(-1, -2)
    elif orientation == 8:
        img = img.rot90(1, (-2, -1))
    return img.contiguous()


class _Bad:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class _Encoded:
    """JPEG bytes left for the batched GPU decode."""
    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


def read_sample(path: str, gpu_jpeg: bool):
    """Thread-pool task: a decoded uint8 [3, H, W] tensor, _Encoded JPEG bytes (GPU decode), or _Bad."""
    try:
        raw = read_file_bytes(path)
        if not raw:
            return _Bad("zero-byte file")
        big = too_large(raw)  # torchvision.io and nvJPEG have no decompression-bomb limit of their own
        if big:
            return _Bad(big)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        # nvJPEG gets whole, upright JPEGs only: a file without its end-of-image marker (truncated) goes to
        # libjpeg, which rejects it, so both devices skip the same files
        if (gpu_jpeg and raw.startswith(_JPEG_MAGIC) and _JPEG_END in raw[-64:]
                and exif_orientation(raw) == 1):
            return _Encoded(data)
        return decode_cpu(data)
    except Exception as e:  # noqa: BLE001 - unreadable or undecodable: skip it, whatever the library raised
        return _Bad(short_reason(e))


class TorchGPULoader(SkippingLoader):
    """Iterable of SDMPBatch on ``device``; see the module docstring. Options: ``prefetch`` (batches of file
    reads kept in flight, default 2). ``num_workers`` is the number of reading/decoding threads (0: one; default
    min(cpu count, 16))."""

    def __init__(self, data, recipe: Recipe, batch_size: int, *, device=torch.device("cpu"), shard_id: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 dtype: Optional[torch.dtype] = None, num_workers: Optional[int] = None, prefetch: int = 2):
        self.recipe = recipe.validate()
        self.images = list_images(data)
        device = exact_device(device)  # nvJPEG, its stream and the generator want one fixed card
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.shard_id, self.seed = shard_id, seed
        self.sampler = EpochSampler(len(self.images), batch_size, shard_id, num_shards, shuffle, seed, drop_last)
        # 0 as in a DataLoader: no parallel reading (one thread, so reads still overlap the device work)
        self.num_workers = min(usable_cores(), 16) if num_workers is None else max(1, int(num_workers))
        if prefetch < 1:
            raise ValueError(f"prefetch: must be >= 1, got {prefetch}")
        self.prefetch = prefetch
        self.log = SkipLog("torch-gpu", self.sampler)
        self._gpu_jpeg = self.device.type == "cuda"
        self._pool: Optional[ThreadPoolExecutor] = None
        self._decode_stream = None  # made on first use (CUDA only)

    def close(self) -> None:
        """Stop the reading threads (a later iteration starts new ones)."""
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()

    def _submit(self, batch: torch.Tensor) -> List[Future]:
        """One task per thread-sized chunk of the batch (fewer hand-offs than one per file)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sdmp-torch-gpu-read")
        files = self.images.files
        idx = batch.tolist()
        step = max(1, -(-len(idx) // (2 * self.num_workers)))
        chunks = [idx[i:i + step] for i in range(0, len(idx), step)]
        return [self._pool.submit(lambda c=c: [read_sample(files[i], self._gpu_jpeg) for i in c]) for c in chunks]

    def _decode_gpu(self, encoded: Sequence[_Encoded]) -> List[object]:
        """nvJPEG decode on a stream of its own, then handed to the current stream.

        torchvision's CUDA decoder allocates its outputs on the current stream but writes them from another
        stream without waiting for the current one (pytorch/vision#9606), and nvJPEG's hardware engine may write
        before earlier work on its stream has run (meta-pytorch/torchcodec#1634): called on the training
        stream, it can be handed a block that queued kernels still read and overwrite it. On a stream that
        only decodes, every block it gets is free for good (record_stream keeps a block the consumer still
        uses out of the pool until the consumer's work is done)."""
        if self.device.type != "cuda":  # tests drive this path with torchvision's CPU decoder
            return self._decode_gpu_here(encoded)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        consumer = torch.cuda.current_stream(self.device)
        # no wait for the consumer: the inputs are host bytes, and waiting would serialise decoding behind the
        # training step already queued (the overlap this loader is for)
        with torch.cuda.stream(self._decode_stream):
            out = self._decode_gpu_here(encoded)
        consumer.wait_stream(self._decode_stream)
        for img in out:
            if isinstance(img, torch.Tensor) and img.is_cuda:
                img.record_stream(consumer)
        return out

    def _decode_gpu_here(self, encoded: Sequence[_Encoded]) -> List[object]:
        """Batched nvJPEG decode; if the batch fails, each file alone (nvJPEG, then libjpeg) so one bad file
        costs only itself."""
        import torchvision.io as tio

        rgb = tio.ImageReadMode.RGB
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(tio.decode_jpeg([e.data for e in encoded], mode=rgb, device=self.device))
            except RuntimeError:
                pass
            out: List[object] = []
            for e in encoded:
                try:
                    out.append(tio.decode_jpeg(e.data, mode=rgb, device=self.device))
                except RuntimeError:
                    try:
                        out.append(decode_cpu(e.data))
                    except Exception as err:  # noqa: BLE001
                        out.append(_Bad(short_reason(err)))
            return out

    def _decode_batch(self, batch: torch.Tensor, results: List[object]):
        encoded = [j for j, r in enumerate(results) if isinstance(r, _Encoded)]
        if encoded:
            for j, img in zip(encoded, self._decode_gpu([results[j] for j in encoded])):
                results[j] = img
        files, labels = self.images.files, self.images.labels
        keep, bad = [], []
        for j, r in enumerate(results):
            (bad if isinstance(r, _Bad) else keep).append(j)
        for j in bad:
            self.log.record(files[int(batch[j])], results[j].reason)
        indices = batch[keep] if bad else batch
        return [results[j] for j in keep], torch.tensor([labels[i] for i in indices.tolist()]), indices, bool(bad)

    def _skips_unread(self) -> bool:
        return self.sampler.drop_last  # without it batch sizes depend on the files: read and drop

    def _run_pass(self, skip: int) -> Iterator[SDMPBatch]:
        """One pass of the epoch; ``skip_batches(k)`` starts it at batch ``k`` without decoding the batches
        before: the view and mixing draws of the skipped batches are drawn from the pass's generator and dropped
        (their number depends on the batch size only). With ``drop_last`` (training's setting) a batch keeps its
        size whatever files it lost, and a whole pass yields it unless none of its files decodes: each skipped
        batch is probed, on the reading threads, for one file libjpeg/libpng decodes (one CPU decode per batch
        instead of the batch), so such a batch is not counted. On a GPU a batch whose only decodable files are
        JPEGs nvJPEG reads but libjpeg refuses would be miscounted (rare: corrupt files of both kinds in one
        batch and nothing else). Without ``drop_last`` batch sizes depend on the files, so the first ``k``
        batches are read and dropped instead."""
        epoch = self.sampler.begin_pass()
        gen = make_generator(self.seed, epoch, self.shard_id, self.device)
        batches = self.sampler.batches()
        if skip:
            batches = batches[self._skip_unread(batches, skip, gen):]
        inflight = collections.deque(self._submit(b) for b in batches[: self.prefetch])
        try:
            for b, batch in enumerate(batches):
                futures = inflight.popleft()
                if b + self.prefetch < len(batches):
                    inflight.append(self._submit(batches[b + self.prefetch]))
                results = [r for f in futures for r in f.result()]
                images, labels, indices, skipped_any = self._decode_batch(batch, results)
                if not images:
                    self.log.check_empty_batch([self.images.files[i] for i in batch.tolist()])
                    continue
                if skipped_any:  # refilled (drop_last) or kept even for mixing: see skips.py
                    pos = self.log.settle(len(images), len(batch), fill=self.sampler.drop_last,
                                          keep_even=self.recipe.mix.enabled)
                    if not pos:
                        continue
                    at = torch.tensor(pos, dtype=torch.long)
                    images, labels, indices = [images[p] for p in pos], labels[at], indices[at]
                packed = PackedImages.from_list(images, self.device)
                views = make_views(packed, None, None, self.recipe, gen, self.dtype)
                yield assemble_batch(views, labels.to(self.device, non_blocking=True),
                                     indices.to(self.device, non_blocking=True), self.recipe, gen)
        finally:
            for futures in inflight:  # an abandoned epoch: drop the reads nobody will use
                for f in futures:
                    f.cancel()
        self.log.end_epoch(epoch)

    def _skip_unread(self, batches: Sequence[torch.Tensor], k: int, gen: torch.Generator) -> int:
        """Sampler batches spanned by the first ``k`` batches a whole pass yields (those with a decodable file),
        their view and mixing draws drawn from ``gen``. Probes a few batches per thread at a time."""
        files = self.images.files

        def undecodable(batch: torch.Tensor) -> List[Tuple[str, str]]:
            """[] when a file of the batch decodes (a whole pass yields it), else every file and its reason."""
            bad = []
            for i in batch.tolist():
                sample = read_sample(files[i], False)
                if not isinstance(sample, _Bad):
                    return []
                bad.append((files[i], sample.reason))
            return bad

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sdmp-torch-gpu-read")
        count = at = 0
        while count < k and at < len(batches):
            probes = list(self._pool.map(undecodable, batches[at:at + min(k - count, 2 * self.num_workers)]))
            for bad in probes:  # the chunk is no longer than the batches still to count: no overshoot
                at += 1
                if not bad:
                    skip_batch_draws(self.recipe, self.batch_size, gen, self.device)
                    count += 1
                    continue
                self.log.record_empty_batch(bad)  # a whole pass leaves it out, or stops here when sharded
        return at
