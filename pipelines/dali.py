"""DALI backend: the recipe's views decoded and augmented by NVIDIA DALI, then batch-flip mixed.

Data flow per batch: EpochSampler's order (exact epochs, shards, drop_last) -> a reader thread pool loads
the files' bytes and sniffs them (``image_bytes.py``) -> DALI's ``external_source`` -> one decode per image
-> every view's per-sample augmentation (``dali_ops.py``) -> torch tensors -> mixing -> SDMPBatch.

GPU mode (``device="cuda[:i]"``): decoding is ``mixed`` (nvJPEG, and the hardware JPEG decoder where the card
has one), every augmentation runs on that GPU, outputs come back bound to torch's current stream as
zero-copy DLPack tensors (no host synchronisation per batch), and ``assemble_batch`` mixes on the device.
CPU mode (``device="cpu"``): ``device_id=None``, every op on DALI's CPU thread pool, the same recipe; mixing
by ``assemble_batch`` (its per-sample host path on CPU tensors).

Resuming: DALI's random ops keep their state from epoch to epoch, so a new pipeline at epoch e would draw other
crops and colours than the one that ran epochs 0..e-1. ``state_dict()`` holds DALI's own checkpoints (pipelines
are built with ``enable_checkpointing``) of the state at the start of the recent epochs, taken once per epoch;
``load_state_dict()`` makes the loader build its pipeline from the one of the epoch it starts next. Sample order
and mixing draws follow (seed, epoch, shard) and need no state. The trainer keeps this state in its checkpoints.

Mixing in the graph (``mix_in_graph=True``; issue 3 asks for both placements to be timed): the per-sample
mixing parameters (lam, method, box sizes, per-view box positions) are drawn on the host by ``dali_mix.draw_mix``
with the same calls, in the same order, as ``assemble_batch`` (so in CPU mode, with the same seed, both options
give the same batches), fed with the batch's images as small per-sample arrays, and DALI mixes the pixels
(``fn.permute_batch`` for the partner, arithmetic for mixup, ``fn.multi_paste`` / ``fn.resize`` for cutmix and
resizemix, a DALI ``if`` per sample so each sample pays only for its own method). The mixed views come out of
the pipeline beside the clean ones and ``assemble_batch`` is not called. With mixing disabled (or no mixed
view) the option changes nothing. Batches re-fed after a file failed inside DALI draw again from where they
first drew, so a bad file found mid-epoch (in the first run, and anew in a resumed one) leaves the draws alone.

Why ``external_source`` and not DALI's file reader: the reader pads and shards by its own rules, while feeding
the order ourselves gives EpochSampler's exact semantics and lets a bad file be dropped before DALI sees it.

Bad data: zero-byte, truncated, non-image files, named pipes and images over the shared pixel limit
(``image_bytes.max_pixels``, read from the header) are caught by the byte sniff; a file that passes the sniff but
still fails inside DALI fails its whole batch, so the loader decodes that batch's files one by one with a probe
decoder, marks the culprits, rebuilds the pipeline and feeds the rest again. Skipped files are counted and
named (``loader.skipped``, one warning at each epoch's end); with drop_last the batch keeps its size (the
skipped slots refilled with repeats of its decodable samples), else it shrinks, staying even under mixing
(``skips.py``).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from sdmp_fast.batch import SDMPBatch, exact_device

from .base import (EpochSampler, SampledLoader, assemble_batch, list_images, loader_threads, make_generator,
                   superseded_pass)
from .image_bytes import image_format, read_encoded
from .recipes import Recipe
from .skips import SkipLog, UndecodableBatchError, settle, short_reason

@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch's CPU ops on ``n`` intra-op threads inside the block (restored after)."""
    was = torch.get_num_threads()
    if n == was:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


def one_torch_thread():
    """Run torch's CPU ops single-threaded inside the block (restored after).

    Per-sample ops on one image are too small to gain from intra-op threads, and while a loader's own worker
    threads (DALI's) keep every core busy, OpenMP's fork/join barriers stall for milliseconds per op."""
    return torch_threads(1)


_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
_READ_CHUNK = 32  # files per reader task: amortises the thread-pool hand-off


def dali_error_reason(err: BaseException) -> str:
    """The line of a DALI error that says what went wrong (it follows "encountered:"), shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for k, line in enumerate(lines[:-1]):
        if line == "encountered:":
            return short_reason(RuntimeError(lines[k + 1])).removeprefix("RuntimeError: ")
    return short_reason(err)


def _quietly(build, **kw):
    """``build(**kw)`` without DALI's note that it cannot checkpoint a callable source (ours needs no state)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
        return build(**kw)


def _read_chunk(paths: Sequence[str]):
    return [read_encoded(p) for p in paths]


class _Fed(NamedTuple):
    """A batch DALI has taken: the sampler's ``indices``, the ``kept`` ones handed to DALI (refilled or kept
    even: skips.settle), and the skips (``bad`` indices, ``decoded`` files) that are logged only once DALI
    returns it: a batch re-fed after a failed run starts again from ``indices``. ``mix``: the
    ``dali_mix.MixDraw`` fed with it and ``mix_state`` the mixing generator's state before that draw
    (``mix_in_graph`` only)."""
    indices: List[int]
    kept: List[int]
    bad: List[int]
    decoded: int
    mix: object = None
    mix_state: Optional[torch.Tensor] = None


class _Feeder:
    """The pipeline's external_source callback: hands DALI one batch of encoded images per call.

    Holds the epoch's remaining batches (``pending``), the batches DALI has taken but whose outputs have not
    come back yet (``in_flight``, oldest first: the pipeline returns them in order), and reads one batch ahead
    on the thread pool so the file reads overlap DALI's work.
    """

    def __init__(self, files: Sequence[str], log: SkipLog, keep_even: bool, fill: bool, read_threads: int):
        self.files, self.log, self.keep_even, self.fill = files, log, keep_even, fill
        self.pending: Deque[List[int]] = collections.deque()
        self.in_flight: Deque[_Fed] = collections.deque()
        self.known_bad: Dict[int, str] = {}
        self.read_threads = max(1, read_threads)
        self._pool: Optional[ThreadPoolExecutor] = None  # started by the first read, stopped by shutdown()
        self._ahead = None  # (indices, indices being read, [futures]) of the batch read in advance
        self.draw_mix = None  # mix_in_graph: n -> dali_mix.MixDraw, drawn as each batch is fed
        self.mix_gen: Optional[torch.Generator] = None  # the generator draw_mix draws from
        self.error: Optional[Exception] = None  # a batch that may not be left out (check_empty_batch) ended feeding

    def start(self, batches: Sequence[List[int]], draw_mix=None, mix_gen: Optional[torch.Generator] = None) -> None:
        self.pending = collections.deque(batches)
        self.draw_mix, self.mix_gen = draw_mix, mix_gen
        self.in_flight.clear()
        self._ahead = None
        self.error = None

    def clear(self) -> None:
        """Stop feeding: DALI's next call ends the epoch."""
        self.start([])

    def requeue_in_flight(self) -> None:
        """After a failed run: everything DALI held, and the read-ahead batch, go back to the front, in order."""
        back = [fed.indices for fed in self.in_flight] + ([self._ahead[0]] if self._ahead is not None else [])
        self.pending.extendleft(reversed(back))
        if self.in_flight and self.in_flight[0].mix_state is not None:
            # the re-fed batches draw their mixing again: from where the first of them drew, so that the epoch's
            # draws do not depend on whether (and when) a bad file was found (a resumed run finds it anew)
            self.mix_gen.set_state(self.in_flight[0].mix_state)
        self.in_flight.clear()
        self._ahead = None

    def _submit(self):
        if not self.pending:
            return None
        indices = list(self.pending.popleft())
        todo = [i for i in indices if i not in self.known_bad]
        paths = [self.files[i] for i in todo]
        chunks = [paths[k:k + _READ_CHUNK] for k in range(0, len(paths), _READ_CHUNK)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="sdmp-dali-read")
        return indices, todo, [self._pool.submit(_read_chunk, chunk) for chunk in chunks]

    def __call__(self):
        while True:
            if self._ahead is None:
                self._ahead = self._submit()
            if self._ahead is None:
                raise StopIteration
            indices, todo, futures = self._ahead
            self._ahead = self._submit()  # next batch's reads start now, overlapping this one's decode
            reads = [r for f in futures for r in f.result()]
            data, kept = [], []
            for i, (buf, reason) in zip(todo, reads):
                if buf is None:
                    self.known_bad[i] = reason
                else:
                    data.append(buf)
                    kept.append(i)
            bad = [i for i in indices if i in self.known_bad]
            decoded = len(kept)
            if bad:  # refilled (drop_last) or kept even for mixing: see skips.py
                pos = settle(decoded, len(indices), fill=self.fill, keep_even=self.keep_even)
                data, kept = [data[p] for p in pos], [kept[p] for p in pos]
            if kept:
                mix = mix_state = None
                if self.draw_mix is not None:
                    mix_state = self.mix_gen.get_state() if self.mix_gen is not None else None
                    with one_torch_thread():  # tiny ops while DALI's threads hold the cores (see one_torch_thread)
                        mix = self.draw_mix(len(kept))
                self.in_flight.append(_Fed(indices, kept, bad, decoded, mix, mix_state))
                if mix is None:
                    return data, np.asarray(kept, dtype=np.int64)
                return (data, np.asarray(kept, dtype=np.int64), *mix.feeds)
            self._log(bad, decoded, 0)  # nothing for DALI to return: account for the batch now
            try:
                self.log.check_empty_batch([self.files[i] for i in indices])
            except UndecodableBatchError as e:  # raised by the loader once DALI has returned the batches before
                self.error = e
                self.pending.clear()
                self._ahead = None
                raise StopIteration from None

    def exhausted(self) -> bool:
        """Every batch of the epoch has been handed to DALI and returned."""
        return not self.pending and not self.in_flight and self._ahead is None and self.error is None

    def accept(self) -> _Fed:
        """DALI returned the oldest batch in flight: log its skips; its record (kept sample indices, mixing)."""
        fed = self.in_flight.popleft()
        self._log(fed.bad, fed.decoded, len(fed.kept))
        return fed

    def _log(self, bad: Sequence[int], decoded: int, used: int) -> None:
        for i in bad:
            self.log.record(self.files[i], self.known_bad[i])
        if bad:
            self.log.record_settled(decoded, used)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# what the loader passes to fn.decoders.image itself: a decoder option may not set them again
_DECODER_OWN = ("device", "output_type")


def check_decoder_options(options: Optional[dict]) -> dict:
    """``decoder_options`` as a dict whose names are all arguments of DALI's ``fn.decoders.image``: checked when
    the loader is made (DALI itself would say it at the first batch, deep in a traceback of the graph)."""
    if options is None or options == {}:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"decoder_options: a dict of fn.decoders.image arguments, got {type(options).__name__}")
    from nvidia.dali import backend

    known = set(backend.GetSchema("decoders__Image").GetArgumentNames()) - set(_DECODER_OWN)
    bad = [k for k in options if k not in known]
    if bad:
        raise ValueError(f"decoder_options: {', '.join(map(repr, bad))} not among the fn.decoders.image arguments "
                         f"a loader takes ({', '.join(_DECODER_OWN)} are the loader's own): {', '.join(sorted(known))}")
    from .dali_ops import define_probe_pipeline

    try:  # DALI converts and checks each value when a graph is defined: a one-op CPU graph, never built
        define_probe_pipeline(None, options).serialize()
    except Exception as e:  # noqa: BLE001 - DALI's own error types vary (TypeError, ValueError, RuntimeError)
        raise ValueError(f"decoder_options {options!r}: DALI refuses a value: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    return dict(options)


class DaliLoader(SampledLoader):
    """Iterable of SDMPBatch built by DALI (see the module docstring).

    Options (``make_loader(..., **options)``): ``num_threads`` (DALI's thread pool; default ``num_workers``, 0
    being one thread, or the usable CPU count), ``prefetch_queue_depth`` (batches DALI prepares ahead, default 2),
    ``read_threads`` (file-reading threads; default 1 on CPU, 4 on GPU), ``conditionals`` (split batches
    with DALI's ``if`` for the rarely drawn ops; default on CPU only), ``decoder_options`` (passed to
    ``fn.decoders.image``, e.g. ``{"hw_decoder_load": 0.9}`` or ``{"use_fast_idct": True}``),
    ``mix_in_graph`` (mix inside the DALI graph instead of by ``assemble_batch``; see the module docstring;
    ``last_mix`` then holds the last yielded batch's ``dali_mix.MixDraw``), ``photometric`` (``"dali"``, the
    default: DALI's own colour ops, fastest, with the deviations from torchvision listed in ``dali_ops.colour``;
    ``"torch"``: DALI decodes and crops, then flip, colour jitter, grayscale, blur, solarize and normalisation
    are ``device_ops``' torchvision-exact ones, as the torch-gpu, memory and FFCV loaders apply them, on the
    loader's device; not with ``mix_in_graph``).
    """

    def __init__(self, data, recipe: Recipe, batch_size: int, *, device=torch.device("cpu"), shard_id: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 dtype: Optional[torch.dtype] = None, num_workers: Optional[int] = None,
                 num_threads: Optional[int] = None, prefetch_queue_depth: int = 2,
                 read_threads: Optional[int] = None, conditionals: Optional[bool] = None,
                 decoder_options: Optional[dict] = None, mix_in_graph: bool = False, photometric: str = "dali"):
        self.recipe = recipe.validate()
        if not isinstance(mix_in_graph, bool):
            raise ValueError(f"mix_in_graph: must be True or False, got {mix_in_graph!r}")
        if photometric not in ("dali", "torch"):
            raise ValueError(f"photometric: 'dali' (DALI's colour ops) or 'torch' (torchvision-exact ones after "
                             f"DALI's crops), got {photometric!r}")
        self.photometric = photometric
        self._torch_threads = torch.get_num_threads()  # photometric="torch" on the CPU: whole-batch ops, every core
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: DALI loader emits float32, float16 or bfloat16 views, got {dtype}")
        if not isinstance(prefetch_queue_depth, int) or prefetch_queue_depth < 1:
            raise ValueError(f"prefetch_queue_depth: must be an integer >= 1, got {prefetch_queue_depth!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: DALI runs on cpu or cuda, got {self.device}")
        self.gpu = self.device.type == "cuda"
        self.device = exact_device(self.device)
        self.images = list_images(data)
        self.batch_size, self.dtype, self.seed, self.shard_id = batch_size, dtype, seed, shard_id
        self.sampler = EpochSampler(len(self.images), batch_size, shard_id, num_shards, shuffle, seed, drop_last)
        self.num_threads = int(num_threads or loader_threads(num_workers))
        if self.num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {self.num_threads}")
        self.prefetch_queue_depth = prefetch_queue_depth
        self.conditionals = (not self.gpu) if conditionals is None else bool(conditionals)
        self.decoder_options = check_decoder_options(decoder_options)
        # nothing to mix -> the plain pipeline, whatever was asked
        self.mix_in_graph = mix_in_graph and self.recipe.mix.enabled and bool(self.recipe.mix.mixed_views)
        if photometric == "torch" and self.mix_in_graph:
            raise ValueError("photometric='torch' cannot go with mix_in_graph=True: the graph would mix the views "
                             "before torch augments them (leave mix_in_graph off: the loader then mixes after)")
        self.last_mix = None
        self.log = SkipLog("dali", self.sampler)
        self._labels = torch.tensor(self.images.labels, dtype=torch.long, device=self.device)
        self._feeder = _Feeder(self.images.files, self.log, self.recipe.mix.enabled, self.sampler.drop_last,
                               read_threads if read_threads else (4 if self.gpu else 1))
        self._pipe = None
        self._probe = None
        self._active = False  # an epoch was started and not run to its end
        self._checkpointing = True  # build with DALI checkpointing (off if this DALI build refuses it)
        self._epoch_starts: Dict[int, bytes] = {}  # epoch -> DALI checkpoint of the state it started from
        self._restore: Dict[int, bytes] = {}  # the same, from load_state_dict, for the next epoch started

    # -- SDMPLoader protocol -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[SDMPBatch]:
        self._follow_dist()
        if self._active:
            self._drain()
        epoch = self.sampler.begin_pass()
        self._start_epoch(epoch)
        draw = mix_gen = None
        if self.mix_in_graph:  # host draws on a CPU generator; equal to assemble_batch's on a CPU loader
            from .dali_mix import draw_mix

            mix_gen = make_generator(self.seed, epoch, self.shard_id, "cpu")
            draw = functools.partial(draw_mix, recipe=self.recipe, generator=mix_gen)
        self._feeder.start([b.tolist() for b in self.sampler.batches()], draw, mix_gen)
        self._active = True
        self._pass = object()  # a later pass drains and restarts the pipeline under this one
        return self._epoch(epoch, make_generator(self.seed, epoch, self.shard_id, self.device), self._pass)

    def _resharded(self) -> None:
        """The pipeline's seed and its epoch-start checkpoints belong to the old shard: built anew."""
        if self._active:
            self._drain()
        self._pass = object()  # a pass begun on the old shard raises superseded_pass instead of ending early
        self._close_pipe()
        self._epoch_starts = {}

    # -- resumable state (torchdata's StatefulDataLoader names) ---------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """DALI checkpoints of the random state at the start of the last epochs started (and of the next one
        once its last batch has been returned): see the module docstring. Unlike torchdata's, it holds no
        position inside the epoch: after ``load_state_dict`` the epoch runs from its first batch, and a caller
        resuming mid-epoch drops the batches it had trained on (what the trainer does), which keeps the state
        independent of how far ahead the caller prefetches."""
        # dali_checkpointing: an empty dali_epoch_starts then means "no epoch started yet" (nothing to restore),
        # not "this DALI could not checkpoint"
        return {"dali_epoch_starts": {**self._epoch_starts, **self._restore},  # a loaded state not yet used too
                "dali_checkpointing": self._checkpointing}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take a ``state_dict()``: the next epoch started that it covers builds its pipeline from it."""
        starts = state.get("dali_epoch_starts") if isinstance(state, dict) else None
        if not isinstance(starts, dict) or not all(isinstance(e, int) and isinstance(c, (bytes, str))
                                                   for e, c in starts.items()):
            raise ValueError(f"load_state_dict: not a DALI loader state_dict() (got {type(state).__name__} "
                             f"{list(state)[:4] if isinstance(state, dict) else ''})")
        if self._active:
            self._drain()
        if not starts:  # nothing to restore: said unless the saving loader had started no epoch yet
            if not state.get("dali_checkpointing", False):  # absent: a state saved before 2026-11-29
                warnings.warn("DALI loader: the state loaded holds no DALI checkpoint (the run that saved it could "
                              "not checkpoint): crops and colours will differ from that run's")
        elif not self._checkpointing:
            warnings.warn("DALI loader: this DALI build cannot restore checkpoints: crops and colours will differ "
                          "from the saved run's")
        self._restore = dict(starts)

    # -- internals -----------------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        """Build (or restore) the pipeline for ``epoch`` and record the state it starts from."""
        if self._restore:
            have, self._restore = self._restore, {}
            restore = have.get(epoch)
            if restore is None:
                warnings.warn(f"DALI loader: the state loaded has no DALI checkpoint for epoch {epoch} (only "
                              f"{sorted(have)}): its crops and colours will differ from the first run's")
            else:
                self._close_pipe()
                self._pipeline(restore)
        self._epoch_starts = {e: c for e, c in self._epoch_starts.items() if e == epoch - 1}
        self._remember_start(epoch)

    def _remember_start(self, epoch: int) -> None:
        if not self._checkpointing:
            return
        try:  # DALI's state as of the last batch returned (not the ones it prefetched)
            self._epoch_starts[epoch] = self._pipeline().checkpoint()
        except RuntimeError as e:
            warnings.warn(f"DALI loader: checkpoint failed ({dali_error_reason(e)}): a resumed run will draw other "
                          f"crops and colours than the first run")
            self._checkpointing = False
            self._epoch_starts = {}

    def _pipeline(self, checkpoint: Optional[bytes] = None):
        if self._pipe is None:
            from .dali_ops import build_pipeline

            build = functools.partial(
                build_pipeline, self._feeder, self.recipe, batch_size=self.batch_size, num_threads=self.num_threads,
                device_id=self.device.index if self.gpu else None,
                seed=(self.seed * 1_000_003 + self.shard_id * 7_919) % (2**31 - 1),
                prefetch_queue_depth=self.prefetch_queue_depth, fp16=self.gpu and self.dtype == torch.float16,
                conditionals=self.conditionals, gpu_indices=self.gpu, decoder_options=self.decoder_options,
                mix_in_graph=self.mix_in_graph, photometric=self.photometric)
            self._pipe = self._build_checkpointing(build, checkpoint) if self._checkpointing else build()
        return self._pipe

    def _build_checkpointing(self, build, checkpoint: Optional[bytes]):
        """``build`` with DALI checkpointing, from ``checkpoint`` when given; falls back (with a warning) to a
        fresh state when the checkpoint cannot be restored, and to no checkpointing when DALI refuses it."""
        restore = {} if checkpoint is None else {"checkpoint": checkpoint}
        try:
            return _quietly(build, enable_checkpointing=True, **restore)
        except RuntimeError as e:
            if checkpoint is not None:  # another DALI version or recipe wrote it
                warnings.warn(f"DALI loader: cannot restore the saved DALI state ({dali_error_reason(e)}): this "
                              f"epoch's crops and colours will differ from the first run's")
                return self._build_checkpointing(build, None)
            warnings.warn(f"DALI loader: checkpointing unavailable ({dali_error_reason(e)}): a resumed run will draw "
                          f"other crops and colours than the first run")
            self._checkpointing = False
            return build()

    def _run(self):
        pipe = self._pipeline()
        if self.gpu:  # outputs bound to torch's stream: no host sync, consumers queue behind DALI's work
            return pipe.run(torch.cuda.current_stream(self.device))
        return pipe.run()

    def _epoch(self, epoch: int, generator: torch.Generator, token: object) -> Iterator[SDMPBatch]:
        while True:
            if self._pass is not token:
                raise superseded_pass("dali")
            try:
                outs = self._run()
            except StopIteration:
                break
            except RuntimeError as err:  # a file passed the sniff but DALI could not decode it
                self._recover(err)
                continue
            if self.gpu:
                yield self._batch(outs, generator, epoch)
            else:
                with one_torch_thread():  # DALI's threads hold the cores (see one_torch_thread)
                    batch = self._batch(outs, generator, epoch)
                yield batch
        self._pipe.reset()
        self._active = False
        self.log.end_epoch(epoch)
        if self._feeder.error is not None:
            err, self._feeder.error = self._feeder.error, None
            raise err

    def _batch(self, outs, generator: torch.Generator, epoch: int) -> SDMPBatch:
        n_views = self.recipe.num_views
        mixed_from = tuple(self.recipe.mix.mixed_views) if self.mix_in_graph else ()
        n_out = n_views + len(mixed_from)  # clean views, then the graph's mixed views
        indices_cpu = torch.from_dlpack(outs[n_out].as_tensor())
        fed = self._feeder.accept()
        if self._feeder.exhausted():  # the epoch's last batch: DALI's state is now the next epoch's start
            self._remember_start(epoch + 1)
        if indices_cpu.tolist() != fed.kept:  # the in-flight bookkeeping is what bad-file recovery relies on
            raise RuntimeError(f"DALI loader: batch order out of step (got {indices_cpu.tolist()[:4]}..., "
                               f"expected {fed.kept[:4]}...)")
        tensors = [torch.from_dlpack(o.as_tensor()) for o in outs[:n_out]]
        if self.photometric == "torch":
            tensors = self._augment(tensors, generator)
        indices = torch.from_dlpack(outs[n_out + 1].as_tensor()) if self.gpu else indices_cpu
        labels = self._labels[indices]
        if self.mix_in_graph:
            self.last_mix = fed.mix
            lams = list(torch.stack(fed.mix.lams).to(self.device, non_blocking=True).unbind(0))  # one copy
            method = fed.mix.method.to(self.device, non_blocking=True)
            batch = SDMPBatch(tensors[:n_views], labels, indices, tensors[n_views:], mixed_from, lams[0], method,
                              lams)
        else:
            batch = assemble_batch(tensors, labels, indices, self.recipe, generator)
        if self.dtype is not None and batch.views[0].dtype != self.dtype:
            batch.views = [v.to(self.dtype) for v in batch.views]
            batch.mixed_views = [v.to(self.dtype) for v in batch.mixed_views]
        return batch

    def _augment(self, crops: List[torch.Tensor], generator: torch.Generator) -> List[torch.Tensor]:
        """``photometric="torch"``: the graph's uint8 crops flipped, colour-jittered, ... and normalised by
        ``device_ops`` (draws from the epoch's generator before the mixing's); the ``count`` views of one spec
        (DINO's local crops) as one batch, as the FFCV and torch-gpu loaders do."""
        from . import device_ops

        views: List[torch.Tensor] = []
        k0 = 0
        # on the CPU the batch's ops are big enough for intra-op threads (2 cores: +23% img/s over one thread),
        # unlike the per-sample ops one_torch_thread is for
        with contextlib.nullcontext() if self.gpu else torch_threads(self._torch_threads):
            for spec in self.recipe.views:
                group, k0 = crops[k0:k0 + spec.count], k0 + spec.count
                if not group:
                    continue
                x = (torch.cat(group) if len(group) > 1 else group[0]).float().div_(255)
                x = device_ops.augment(x, spec, generator)
                views += device_ops.normalize(x, self.recipe.mean, self.recipe.std).split(group[0].shape[0])
        return views

    def _recover(self, err: RuntimeError) -> None:
        """Find the undecodable file(s) among the batches DALI held, mark them, rebuild and re-feed."""
        found = {}
        for fed in list(self._feeder.in_flight):  # the failed batch is the oldest one; look further if not
            for i in fed.kept:
                reason = self._probe_decode(self.images.files[i])
                if reason is not None:
                    found[i] = reason
            if found:
                break
        if not found:
            raise err
        self._feeder.known_bad.update(found)
        self._feeder.requeue_in_flight()
        state = None
        if self._checkpointing:  # the rebuilt pipeline goes on from DALI's state as of the last batch returned,
            try:                 # so a recovery draws what a run that knew the file was bad draws (and a resume)
                state = self._pipe.checkpoint()
            except RuntimeError:
                state = None
        self._close_pipe()
        if state is not None:
            self._pipeline(state)

    def _probe_decode(self, path: str) -> Optional[str]:
        """None when DALI's decoder (same device and settings) decodes ``path`` alone, else why not."""
        buf, reason = read_encoded(path)
        if buf is None:
            return reason
        from .dali_ops import build_probe_pipeline

        if self._probe is None:
            self._probe = build_probe_pipeline(self.device.index if self.gpu else None, self.decoder_options)
        try:
            self._probe.run(probe_bytes=[buf])
            return None
        except RuntimeError as e:
            self._probe = None  # a pipeline that raised is not reused
            # the format the bytes claim: DALI's message for a cut BMP / TIFF / WebP names only the sample number
            return f"DALI decode failed ({image_format(buf) or 'unknown'} data): " + dali_error_reason(e)

    def _drain(self) -> None:
        """Finish an epoch the caller stopped early: let DALI return what it holds, then reset it."""
        self._feeder.clear()
        if self._pipe is not None:
            try:
                while True:
                    self._run()
            except StopIteration:
                self._pipe.reset()
            except RuntimeError:
                self._close_pipe()
        self._active = False

    def _close_pipe(self) -> None:
        self._pipe = None  # DALI's pipeline shuts its threads down when collected

    def close(self) -> None:
        """Release DALI's pipelines (their worker threads and memory) and the file-reading threads now instead
        of at garbage collection. An epoch in progress ends; iterating again builds everything anew."""
        feeder = getattr(self, "_feeder", None)
        if feeder is not None:
            feeder.clear()
            feeder.shutdown()
        self._pipe = self._probe = None
        self._active = False

    def __del__(self):
        self.close()

    def __enter__(self) -> "DaliLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
