"""FFCV backend: a .beton (from `sdmp-fast convert`) decoded and random-resized-cropped by FFCV's compiled
(numba) pipeline, the rest of the recipe (flip, colour jitter, grayscale, blur, solarize, normalize) and the
batch-flip mixing done by our device ops on ``device``. Crops are resampled by FFCV's own resizer (OpenCV's area
interpolation, an antialiased shrink) whatever the recipe's ``interpolation``: FFCV's compiled pipeline has no
other (the other backends follow the recipe, bicubic by default).

Decoding: by default one FFCV decoder (``MultiCropDecoder``) decodes each image ONCE and cuts every view's
random resized crop from it into one flat uint8 row per sample; the views are reshaped out of that row on the
device (views, no copy). FFCV's stock way, one ``RandomResizedCropRGBImageDecoder`` pipeline per view reading
the same field (``multi_crop=False``), decodes the JPEG once per view and keeps a full-resolution scratch
buffer per view and batch slot: 10 decodes per sample for DINO's 2+8 crops.

Epochs: the FFCV Loader is built (and its numba code compiled, 10-40 s) once. Each epoch's exact order comes
from ``EpochSampler`` (same shuffle / shard / drop-last rules as every backend) and is handed to FFCV's
SEQUENTIAL traversal order, so changing epoch never recompiles. The multi-crop decoder seeds numba's RNG per
sample from (seed, epoch, index) before drawing its crops, so an epoch's crops do not depend on the run, the
thread or the epochs before (FFCV's stock decoders, ``multi_crop=False``, keep FFCV's unseeded draws).

FFCV has no blur / solarize / hue / grayscale op, and its NormalizeImage placed after ToTensor hangs: the
FFCV part of the pipeline therefore ends at uint8 (ToTensor, ToDevice) and everything else is ours.

Re-creating loaders: numba never frees compiled code, so every FFCV Loader built grows the process for good
(~16 MB measured, ~28 MB with ``multi_crop=False``) besides costing the compile. A closed (or collected)
FFCVLoader parks its compiled FFCV Loader, and the next FFCVLoader with the same file and settings takes it
back: a loader made per evaluation or per sweep point then costs neither. Each parked Loader is owned by one
FFCVLoader at a time, and only once its epoch thread has exited; at most ``PARKED_MAX`` are kept (the batch
buffers belong to each epoch, not to the Loader).
"""
from __future__ import annotations

import collections
import contextlib
import os
import queue
import time
import warnings
from dataclasses import replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sdmp_fast.batch import SDMPBatch, exact_device

from .base import (EpochSampler, SkippingLoader, assemble_batch, loader_threads, make_generator, skip_batch_draws,
                   superseded_pass)
from .recipes import Recipe, ViewSpec
from .skips import SKIPPED_LIST_HEADER, unescape_name

REQUIRED_FIELDS = ("image", "label", "index")
PARKED_MAX = 4
# settings key -> idle FFCV Loader; no lock: __del__ may park from inside a gc pass run while this thread is
# in the middle of taking one, and single dict operations are atomic under the GIL
_PARKED: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def _park(key, loader) -> None:
    _PARKED.pop(key, None)
    _PARKED[key] = loader
    while len(_PARKED) > PARKED_MAX:
        _PARKED.popitem(last=False)


def _drain(q) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


@contextlib.contextmanager
def kept_torch_threads():
    """Leave torch's intra-op thread count of the calling thread as it was around FFCV calls: FFCV's
    ``Compiler.set_num_threads`` also calls ``torch.set_num_threads`` -- at ``import ffcv`` (1 thread), in every
    ``Loader()`` and ``iter(loader)`` (its ``num_workers``) -- so building an FFCV loader with num_workers=1 left
    the caller's model (a CPU training step, the next backend of a benchmark) on one thread for good. FFCV's
    epoch thread sets its own numba / torch threads, which are per thread (OpenMP)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def stop_epoch(epoch, timeout: float = 30.0) -> bool:
    """Stop FFCV's epoch thread (an ``EpochIterator``) for good; True once it has exited.

    FFCV's own ``close()`` only sets a flag that the thread reads when its output queue is full, and the thread
    ends each epoch with a blocking ``put(None)``: an epoch left after its last batches were queued keeps a
    thread (and its batch buffers) forever. Draining the queue until the thread exits avoids that; an
    end-of-epoch marker is left so that a consumer still holding the epoch ends it instead of waiting.
    """
    epoch.close()
    deadline = time.monotonic() + timeout
    while epoch.is_alive() and time.monotonic() < deadline:
        _drain(epoch.output_queue)
        epoch.join(0.05)
    _drain(epoch.output_queue)
    if epoch.is_alive():
        return False
    epoch.output_queue.put_nowait(None)
    return True


def epoch_crop_seed(seed: int, epoch: int) -> int:
    """What the multi-crop decoder's per-sample crop seeds derive from in ``epoch`` (with the sample index)."""
    return (seed * 1_000_003 + epoch) % 2**63


def _seed_sample_crops():
    """numba function (address of an int64, sample index) -> None that seeds the calling thread's numba RNG from
    the int64 stored at the address (``epoch_crop_seed``, written by the loader before each epoch) and the
    index. FFCV's ``get_random_crop`` draws from numba's RNG, whose per-thread state is seeded from OS entropy:
    the crops then differed from run to run, and a resumed run could not see the interrupted run's crops.
    The value is read through its address because numba freezes the arrays a compiled function refers to."""
    from numba import carray, njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def as_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(address), codegen

    @njit(nogil=True)
    def seed_sample(address, index):
        x = np.uint64(carray(as_pointer(address), 1, np.int64)[0]) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64(index)  # splitmix64's finaliser: nearby (epoch, index) give unrelated seeds
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
        np.random.seed(np.uint32(x & np.uint64(0xFFFFFFFF)))

    return seed_sample


def _numba_max_threads() -> int:
    from numba import config

    return int(config.NUMBA_NUM_THREADS)


def _multi_crop_decoder_class():
    """Built on first use: importing ffcv pulls in numba and opencv."""
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    seed_sample = _seed_sample_crops()

    class MultiCropDecoder(SimpleRGBImageDecoder):
        """Decode each RGBImageField sample once; write V random resized crops (view v: ``sizes[v]`` square,
        area ``scales[v]``, aspect ``ratios[v]``) side by side into a uint8 row of sum(3 * size^2) bytes.
        The crops of sample i are drawn after seeding from (``crop_seed[0]``, i): the same in every run and
        whatever thread decodes the sample."""

        def __init__(self, sizes: Sequence[int], scales: Sequence[Tuple[float, float]],
                     ratios: Sequence[Tuple[float, float]]):
            super().__init__()
            self.sizes = np.asarray(sizes, dtype=np.int64)
            self.scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
            self.ratios = np.asarray(ratios, dtype=np.float64).reshape(-1, 2)
            self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes ** 2)]).astype(np.int64)
            self.crop_seed = np.zeros(1, dtype=np.int64)  # epoch_crop_seed(seed, epoch), set per epoch

        def declare_state_and_memory(self, previous_state):
            # uint64 against overflow of h * w * 3 on large images (as FFCV's own decoders do)
            max_h = np.uint64(self.metadata["height"].max())
            max_w = np.uint64(self.metadata["width"].max())
            out_shape = (int(self.offsets[-1]),)
            u8 = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
                    (AllocationQuery(out_shape, u8), AllocationQuery((max_h * max_w * np.uint64(3),), u8)))

        def generate_code(self) -> Callable:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            # Jitted afresh per loader, as FFCV does: numba 0.68 fails (KeyError) to find the overload of an
            # ``imdecode`` dispatcher reused by a second loader. Freeing one prints an ignored KeyError from
            # numba's finalizer (FFCV's stock decoders too): harmless noise.
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            sizes, offsets, scales, ratios = self.sizes, self.offsets, self.scales, self.ratios
            seed_address = self.crop_seed.ctypes.data  # the array lives as long as the decoder (and its Loader)
            n_views = len(sizes)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                                   False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    seed_sample(seed_address, batch_indices[dst_ix])
                    for v in range(n_views):
                        i, j, h, w = get_crop_c(height, width, scales[v], ratios[v])
                        s = sizes[v]
                        out = destination[dst_ix, offsets[v]: offsets[v + 1]].reshape(s, s, 3)
                        resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiCropDecoder


def read_beton(path) -> int:
    """Number of samples in the .beton at ``path``; ValueError naming it when it is not one of ours."""
    return _open_beton(path)[0]


def _open_beton(path) -> Tuple[int, Tuple[str, ...]]:
    """(number of samples, the file's field names in their stored order) of the .beton at ``path``, checked:
    ValueError naming it when it is not one of ours (no file, not a .beton, a field missing or of another type).
    FFCV hands a batch's fields back in the file's order, so a .beton written by another tool with the same
    names in another order, or with more fields, is read by name, not by position."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"data: the ffcv backend reads a .beton file, {path!r} is a directory; "
                         f"convert it first: sdmp-fast convert {path} OUT.beton")
    if not os.path.isfile(path):
        raise ValueError(f"data: {path!r} does not exist")
    with kept_torch_threads():  # the first import of ffcv sets torch's threads to 1
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader

    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file fails in many ways inside numpy
        raise ValueError(f"data: {path!r} is not a readable FFCV .beton ({type(e).__name__}: {e})") from None
    missing = [f for f in REQUIRED_FIELDS if f not in reader.handlers]
    if missing:
        raise ValueError(f"data: {path!r} lacks the field(s) {missing}; write it with `sdmp-fast convert`")
    want = {"image": RGBImageField, "label": IntField, "index": IntField}
    wrong = [f"{name} is a {type(reader.handlers[name]).__name__}, expected {cls.__name__}"
             for name, cls in want.items() if not isinstance(reader.handlers[name], cls)]
    if wrong:
        raise ValueError(f"data: {path!r} has fields of other types than the ffcv loader reads ({'; '.join(wrong)}); "
                         f"write it with `sdmp-fast convert`")
    if reader.num_samples < 1:
        raise ValueError(f"data: {path!r} holds no samples")
    return int(reader.num_samples), tuple(reader.handlers)


def beton_fingerprint(path) -> str:
    """Digest of what the .beton at ``path`` holds, sample by sample in stored order: the label, the image's mode,
    width, height and stored length, and the leading bytes of up to 64 evenly spaced images. What a resume and
    the ranks of a run compare, as an image list's file names. Not where the writer placed each image in the file
    (convert's workers finish in any order), so converting the same folder again keeps the digest. Costs a read
    of the metadata (about 30 bytes a sample) and 64 small reads: no image is decoded."""
    import hashlib

    with kept_torch_threads():
        from ffcv.reader import Reader

    path = os.fspath(path)
    reader = Reader(path)
    names = list(reader.handlers)
    meta = reader.metadata
    image, label = meta[f"f{names.index('image')}"], meta[f"f{names.index('label')}"]
    alloc = reader.alloc_table
    by_ptr = np.argsort(alloc["ptr"], kind="stable")
    ptrs, sizes = alloc["ptr"][by_ptr], alloc["size"][by_ptr]
    at = np.minimum(np.searchsorted(ptrs, image["data_ptr"]), len(ptrs) - 1)
    if len(ptrs) == 0 or not np.array_equal(ptrs[at], image["data_ptr"]):
        raise ValueError(f"data: {path!r} is damaged: an image's data is missing from its allocation table")
    h = hashlib.sha1()
    for column in (label, image["mode"], image["width"], image["height"], sizes[at]):
        h.update(np.ascontiguousarray(column, dtype="<i8").tobytes())
    with open(path, "rb") as f:
        for i in np.unique(np.linspace(0, len(image) - 1, num=min(64, len(image))).astype(np.int64)):
            f.seek(int(image["data_ptr"][i]))
            h.update(f.read(int(min(sizes[at[i]], 4096))))
    return h.hexdigest()


class FFCVLoader(SkippingLoader):
    """Iterable of SDMPBatch over a .beton; see the module docstring. Options: ``multi_crop`` (default True:
    one decode per image), ``os_cache`` (FFCV: page cache vs process memory), ``batches_ahead``."""

    def __init__(self, data, recipe: Recipe, batch_size: int, *, device=torch.device("cpu"), shard_id: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 dtype: Optional[torch.dtype] = None, num_workers: Optional[int] = None,
                 multi_crop: bool = True, os_cache: bool = True, batches_ahead: int = 3):
        with kept_torch_threads():
            from ffcv.fields.basics import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import ToDevice, ToTensor

        from . import device_ops  # after the ffcv import: a missing ffcv is the error users should see first

        self._ops = device_ops
        self.path = os.fspath(data)
        self.num_samples, fields = _open_beton(self.path)
        self.recipe = recipe.validate()
        self.views: Tuple[ViewSpec, ...] = recipe.expanded_views()
        self.batch_size, self.device, self.dtype = batch_size, exact_device(device), dtype
        self.shard_id, self.seed = shard_id, seed
        self.sampler = EpochSampler(self.num_samples, batch_size, shard_id, num_shards, shuffle, seed, drop_last)
        if len(self.sampler) == 0:
            raise ValueError(f"data: {self.path!r} has {self.num_samples} samples, none for shard {shard_id} of "
                             f"{num_shards}")
        self.multi_crop = multi_crop
        workers = loader_threads(num_workers)  # FFCV's decoding threads
        numba_max = _numba_max_threads()
        if workers > numba_max:  # numba refuses more (ValueError "must be between 1 and N" from FFCV's Loader)
            warnings.warn(f"ffcv loader: num_workers={workers} decoding threads asked for, numba runs at most "
                          f"{numba_max} (NUMBA_NUM_THREADS, default: the CPU count): using {numba_max}",
                          RuntimeWarning, stacklevel=3)
            workers = numba_max
        self.num_workers = workers

        on_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        scalar = lambda: [IntDecoder(), ToTensor(), *on_device]  # noqa: E731
        # the file's other fields (another tool's .beton) are not decoded: FFCV would output them too
        pipelines = {**{f: None for f in fields if f not in REQUIRED_FIELDS}, "label": scalar(), "index": scalar()}
        stored = tuple(f for f in fields if f in REQUIRED_FIELDS)  # FFCV's output order: the file's fields first
        if multi_crop:
            decoder = _multi_crop_decoder_class()([v.size for v in self.views], [v.scale for v in self.views],
                                                  [v.ratio for v in self.views])
            self._offsets = decoder.offsets.tolist()
            pipelines["image"] = [decoder, ToTensor(), *on_device]
            self._outputs = stored
        else:
            from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
            from ffcv.pipeline import PipelineSpec
            from ffcv.transforms import ToTorchImage

            # the views' outputs are named apart from every field of the file (FFCV would put a pipeline named
            # like a field at that field's place)
            prefix = "sdmp_view_"
            while any(f.startswith(prefix) for f in fields):
                prefix = "_" + prefix
            names = ["image"] + [f"{prefix}{k}" for k in range(1, len(self.views))]
            self._view_outputs = names[1:]
            for name, v in zip(names, self.views):
                rrc = RandomResizedCropRGBImageDecoder((v.size, v.size), scale=v.scale, ratio=v.ratio)
                pipelines[name] = PipelineSpec("image", decoder=rrc,
                                               transforms=[ToTensor(), *on_device, ToTorchImage()])
            # FFCV orders outputs: the file's fields first, then the extra pipelines in insertion order.
            self._outputs = (*stored, *names[1:])
        self._at = {name: k for k, name in enumerate(self._outputs)}  # output name -> position in FFCV's tuple

        # Our sampler truncates with drop_last already: FFCV must keep every index it is given.
        first = self._epoch_order()
        self._epoch_thread = None  # FFCV's EpochIterator of the running (or last) epoch
        # What the compiled Loader depends on; the file's identity so a rewritten .beton is never read stale
        st = os.stat(self.path)
        self._key = (os.path.realpath(self.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, len(first),
                     batch_size, workers, str(self.device), multi_crop, os_cache, batches_ahead,
                     tuple((v.size, tuple(v.scale), tuple(v.ratio)) for v in self.views))
        self._loader = _PARKED.pop(self._key, None)
        if self._loader is None:
            with kept_torch_threads():
                self._loader = Loader(self.path, batch_size=batch_size, num_workers=workers,
                                      order=OrderOption.SEQUENTIAL, indices=first, pipelines=pipelines,
                                      drop_last=False, os_cache=os_cache, batches_ahead=batches_ahead)
            # the decoder whose compiled code reads it: kept with the Loader, which may be parked and reused
            self._loader.sdmp_crop_seed = decoder.crop_seed if multi_crop else None

    def data_identity(self) -> Dict[str, object]:
        """{"files", "sha1"} of the .beton's content (``beton_fingerprint``), as the image-file loaders' lists
        give: a resume over another .beton at the same path, or ranks reading different copies, are told."""
        return {"files": self.num_samples, "sha1": beton_fingerprint(self.path)}

    @property
    def skipped(self) -> List[str]:
        """Files `sdmp-fast convert` left out of this .beton as undecodable (from its ``.skipped.txt``)."""
        sidecar = self.path + ".skipped.txt"
        if not os.path.exists(sidecar):
            return []
        # as convert wrote it: any file name (its tabs and line ends escaped); newline="\n": a raw \r in an older
        # list's name is no line end
        with open(sidecar, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            lines = f.read().split("\n")
        escaped = lines[0] == SKIPPED_LIST_HEADER  # else an older list: raw names, one a line
        names = [line.split("\t", 1)[0] for line in lines[escaped:] if line.strip()]
        return [unescape_name(n) for n in names] if escaped else names

    def _epoch_order(self) -> np.ndarray:
        # One dtype every epoch: numba specialises the compiled pipeline on the index array's type.
        return self.sampler.indices().numpy().astype(np.uint64)

    def _uint8_groups(self, out):
        """(spec, uint8 [k * n, 3, S, S] on the device, view-major) per recipe view spec: the ``count`` views
        of one spec (DINO's local crops) are augmented as one batch, as device_ops.make_views does."""
        at = self._at
        n = out[at["label"]].shape[0]
        image = out[at["image"]]
        if not self.multi_crop:
            views = [image] + [out[at[name]] for name in self._view_outputs]
        k0 = 0
        for spec in self.recipe.views:
            k, s = spec.count, spec.size
            if k == 0:
                continue
            if self.multi_crop:  # the spec's k crops sit side by side in each sample's row
                a, b = self._offsets[k0], self._offsets[k0 + k]
                x = image[:, a:b].view(n, k, s, s, 3).permute(1, 0, 4, 2, 3)
            else:
                x = torch.stack(views[k0:k0 + k])
            k0 += k
            yield spec, x.to(self.device, non_blocking=True).reshape(k * n, 3, s, s)

    def __iter__(self) -> Iterator[SDMPBatch]:
        if self._loader is None:
            raise RuntimeError(f"FFCV loader over {self.path!r} is closed")
        return super().__iter__()

    def _skip_draws(self, k: int, order: np.ndarray, gen: torch.Generator) -> None:
        """What the first ``k`` batches of ``order`` draw from ``gen`` (augmentation per spec, then mixing)."""
        for b in range(min(k, len(self))):
            n = len(order[b * self.batch_size:(b + 1) * self.batch_size])
            skip_batch_draws(self.recipe, n, gen, self.device, crops=False)  # FFCV's decoder crops

    def _run_pass(self, skip: int) -> Iterator[SDMPBatch]:
        """One pass of the epoch; ``skip_batches(k)`` starts it at batch ``k`` without decoding the batches
        before: FFCV's traversal
        order starts at that batch's first sample, and the skipped batches' augmentation and mixing draws are
        drawn and dropped (their number depends on the batch size only). A .beton holds only decodable images
        (``convert`` left the others out), so batch sizes follow from the order alone, with or without
        drop_last. Crops are seeded per (seed, epoch, index), so a skipped batch leaves the later ones' crops as
        they were; FFCV's stock per-view decoders (``multi_crop=False``) draw crops unseeded either way."""
        self.sampler.begin_pass()
        token = self._pass = object()  # a later pass restarts FFCV's reusable batch buffers under this one
        order = self._epoch_order()
        gen = make_generator(self.seed, self.sampler.epoch, self.shard_id, self.device)
        if skip:
            self._skip_draws(skip, order, gen)
            order = order[skip * self.batch_size:]
            if len(order) == 0:  # skipped past the end: nothing for FFCV to start
                return
        # Never longer than the first epoch's order (EpochSampler), so FFCV's length computed at construction
        # stays right (a shorter, skipped one just ends sooner).
        self._loader.traversal_order.indices = order
        if self._loader.sdmp_crop_seed is not None:  # before FFCV's epoch thread starts decoding
            self._loader.sdmp_crop_seed[0] = epoch_crop_seed(self.seed, self.sampler.epoch)
        mean, std = self.recipe.mean, self.recipe.std
        with kept_torch_threads():
            epoch = self._epoch_thread = iter(self._loader)
        try:
            while True:
                if self._pass is not token:  # checked before each read (the buffers are the new pass's now)
                    raise superseded_pass("ffcv")
                out = next(epoch, None)
                if out is None:
                    break
                # copies: labels / indices are FFCV's reusable slots (already on the device when the pipeline
                # ends in ToDevice, where .to() returns them as they are), overwritten a few batches later
                labels = out[self._at["label"]].view(-1).to(self.device, non_blocking=True, copy=True)
                indices = out[self._at["index"]].view(-1).to(self.device, non_blocking=True, copy=True)
                views = []
                for spec, x in self._uint8_groups(out):
                    x = self._ops.augment(x.float().div_(255), spec, gen)
                    views += self._ops.normalize(x, mean, std).split(labels.shape[0])
                batch = assemble_batch(views, labels, indices, self.recipe, gen)
                yield batch.to(self.device, dtype=self.dtype) if self.dtype is not None else batch
        finally:
            # An epoch left early (break, exception) would keep FFCV's prefetch thread, its batch buffers and
            # memory mapping alive (for good when its last batches were already queued): stop it now.
            stop_epoch(epoch)

    def close(self) -> None:
        """Stop the running epoch and park the compiled FFCV Loader for the next FFCVLoader with the same
        settings (module docstring); iterating afterwards is an error."""
        loader, self._loader = getattr(self, "_loader", None), None
        if loader is None:
            return
        epoch, self._epoch_thread = self._epoch_thread, None
        if epoch is None or stop_epoch(epoch):  # a thread still running compiled code is not shared
            _park(self._key, loader)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: module globals may be gone already
            pass

    def __enter__(self) -> "FFCVLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
