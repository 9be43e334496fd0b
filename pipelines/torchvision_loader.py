"""The classic reference pipeline users compare against: a torch DataLoader whose worker processes open each
file with PIL and run torchvision.transforms (v2) per view on the CPU, pinned batches moved to the device, and
the batch-flip mixing done there by ``assemble_batch``.

Per view (fields of the recipe's ViewSpec, in BYOL's order): RandomResizedCrop (the view's interpolation, PIL's
bicubic or bilinear, antialiased),
RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur(kernel
``blur_kernel_size``)), RandomSolarize(128), then to float and Normalize. Each sample's augmentation is seeded
from (seed, epoch, index), so results do not depend on the number of workers.

Order, shards and drop-last come from EpochSampler (the DataLoader's batch_sampler). Undecodable files are
skipped and counted (see ``skips.py``): ``loader.skipped`` lists them and each epoch ends with a warning naming
them.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import threading
import time
import weakref
from typing import Iterator, List, Optional, Sequence

import torch

from sdmp_fast.batch import SDMPBatch

from .base import (EpochSampler, SkippingLoader, assemble_batch, list_images, make_generator, skip_mixing_draws,
                   superseded_pass, usable_cores)
from .device_ops import blur_kernel_size
from .image_bytes import pil_rgb
from .recipes import Recipe, ViewSpec
from .skips import SkipLog, short_reason

def open_rgb(path: str):
    """Fully decoded, upright 8-bit RGB PIL image; raises on anything undecodable (``image_bytes.open_image``:
    also a zero-byte file, a named pipe, an image over the pixel limit)."""
    return pil_rgb(path)


def _undecodable(path: str) -> Optional[str]:
    """Why a worker's ``open_rgb`` would skip the file (the same call, so the same verdict); None if it decodes."""
    try:
        open_rgb(path)
    except Exception as e:  # noqa: BLE001 - as ViewDataset: any failure means "skipped"
        return short_reason(e)
    return None


def view_transform(spec: ViewSpec, mean: Sequence[float], std: Sequence[float]):
    """torchvision.transforms.v2 pipeline (PIL in, normalised float tensor out) for one ViewSpec."""
    from torchvision.transforms import v2 as T

    ops = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                               interpolation=T.InterpolationMode(spec.interpolation), antialias=True)]
    if spec.hflip_p > 0:
        ops.append(T.RandomHorizontalFlip(spec.hflip_p))
    if spec.jitter_p > 0 and (spec.brightness or spec.contrast or spec.saturation or spec.hue):
        ops.append(T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                                 p=spec.jitter_p))
    if spec.grayscale_p > 0:
        ops.append(T.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        k = blur_kernel_size(spec.size, spec.blur_kernel, spec.blur_sigma[1])
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=spec.solarize_p))  # uint8 PIL: >= 128 <=> >= 0.5
    ops += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


class _Bad:
    """A sample that failed to decode (picklable: it travels back from the worker process)."""
    __slots__ = ("path", "reason")

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT and others' SIGTERM to the main process, and still obey their parent's.

    A scheduler's SIGTERM (SLURM preemption) and a terminal's Ctrl-C reach the whole process group: workers that
    died of it made the main process raise "DataLoader worker ... killed by signal" in the middle of its
    graceful stop, with no checkpoint written. Ignoring SIGTERM outright would also ignore the parent's own
    ``terminate()`` (DataLoader's shutdown of a stuck worker, and multiprocessing's at exit, which then waits
    for ever), so SIGTERM is blocked and read by a thread that exits when the parent sent it (torch's own rule
    for workers) and drops it otherwise. Workers also exit once the parent is gone (torch's watchdog). A worker
    stuck in native code that holds the GIL cannot run that thread: ``kill_workers_that_ignore_terminate``
    kills it when the parent exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    inherited = _temp_dir()  # a forked worker starts with its parent's: that one is not the worker's to remove
    # blocked before the thread starts: threads made later (this one, OpenMP's) inherit the mask, so SIGTERM
    # only ever reaches the sigwaitinfo below
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def obey_parent_only() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                own = _temp_dir()
                if own and own != inherited:
                    shutil.rmtree(own, ignore_errors=True)
                os._exit(0)

    threading.Thread(target=obey_parent_only, name="sdmp-worker-sigterm", daemon=True).start()


def _temp_dir() -> Optional[str]:
    """multiprocessing's temporary folder of this process (``pymp-*``, made on first use: a worker's holds the
    socket through which it hands batches over). A worker stopped by SIGTERM ends with ``os._exit``, which skips
    the clean-up that removes it: every worker left one in $TMPDIR, run after run, so it removes its own first."""
    from multiprocessing import process

    try:
        return process.current_process()._config.get("tempdir")
    except AttributeError:  # another multiprocessing than CPython 3.8-3.13's
        return None


def kill_workers_that_ignore_terminate(grace: float = 2.0) -> int:
    """At exit: terminate this process's DataLoader workers set up by ``ignore_stop_signals``, then kill those
    still alive after ``grace`` seconds. Returns how many had to be killed.

    Their SIGTERM watcher is a Python thread, so it needs the GIL to exit: a worker stuck in native code that
    holds the GIL (seen: a DALI pipeline's destructor waiting for threads that exist only in the parent) never
    obeys ``terminate()``, and multiprocessing's own exit hook, which joins every child after terminating it,
    then waited for ever: the epoch's hang became a process that never exited (a CI run killed after 90 min).
    Registered at import, so it runs before multiprocessing's hook (atexit runs last-registered first)."""
    ours = [p for p in list(_WORKERS) if p.is_alive()]
    for p in ours:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in ours:
        p.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in ours if p.is_alive()]
    if stuck and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler raises for a worker killed by a signal: it would end this hook after one kill
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in stuck:
        p.kill()
    for p in stuck:
        p.join(5)
    return len(stuck)


_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # the worker processes of TorchvisionLoader's DataLoaders
atexit.register(kill_workers_that_ignore_terminate)


class ViewDataset(torch.utils.data.Dataset):
    """Item (index, epoch) -> (list of view tensors, label, index), or _Bad."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], recipe: Recipe, seed: int):
        self.files, self.labels, self.seed = files, labels, seed
        self.transforms = [view_transform(v, recipe.mean, recipe.std) for v in recipe.expanded_views()]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, epoch = item
        path = self.files[index]
        try:
            img = open_rgb(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; any of them means "skip this file"
            return _Bad(path, short_reason(e))
        # per-sample seed: the same augmentation whatever the worker count; fork_rng keeps the caller's RNG
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63)
            views = [t(img) for t in self.transforms]
        return views, self.labels[index], index


def collate_views(samples):
    """Stack the decodable samples; the undecodable ones come back as (path, reason) pairs."""
    good = [s for s in samples if not isinstance(s, _Bad)]
    bad = [(s.path, s.reason) for s in samples if isinstance(s, _Bad)]
    if not good:
        return None, None, None, bad
    views = [torch.stack([s[0][v] for s in good]) for v in range(len(good[0][0]))]
    labels = torch.tensor([s[1] for s in good], dtype=torch.long)
    indices = torch.tensor([s[2] for s in good], dtype=torch.long)
    return views, labels, indices, bad


class _EpochBatches:
    """EpochSampler as a DataLoader batch_sampler: lists of (index, epoch), read in the main process, so
    set_epoch takes effect with persistent workers too. ``start``: the pass begins at that batch."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler
        self.start = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        start, self.start = self.start, 0  # one pass's: a pass abandoned early leaves no offset behind
        for b in self.sampler.batches()[start:]:
            yield [(i, epoch) for i in b.tolist()]


def settle_batch(views: List[torch.Tensor], labels: torch.Tensor, indices: torch.Tensor, skipped: int,
                 recipe: Recipe, drop_last: bool, log: SkipLog):
    """A batch that lost ``skipped`` files, refilled (drop_last) or kept even for mixing (see skips.settle)."""
    n = labels.shape[0]
    pos = log.settle(n, n + skipped, fill=drop_last, keep_even=recipe.mix.enabled)
    if len(pos) == n:
        return views, labels, indices
    at = torch.tensor(pos, dtype=torch.long)
    return [v[at] for v in views], labels[at], indices[at]


class TorchvisionLoader(SkippingLoader):
    """Iterable of SDMPBatch on ``device``; see the module docstring. Options: ``prefetch_factor`` (batches
    each worker prepares ahead, default 2)."""

    def __init__(self, data, recipe: Recipe, batch_size: int, *, device=torch.device("cpu"), shard_id: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 dtype: Optional[torch.dtype] = None, num_workers: Optional[int] = None, prefetch_factor: int = 2):
        self.recipe = recipe.validate()
        self.images = list_images(data)
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype
        self.shard_id, self.seed = shard_id, seed
        self.sampler = EpochSampler(len(self.images), batch_size, shard_id, num_shards, shuffle, seed, drop_last)
        self.num_workers = min(usable_cores(), 16) if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {num_workers}")
        self.log = SkipLog("torchvision", self.sampler)
        dataset = ViewDataset(self.images.files, self.images.labels, self.recipe, seed)
        workers = self.num_workers > 0
        self._batches = _EpochBatches(self.sampler)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._batches, num_workers=self.num_workers,
            collate_fn=collate_views, pin_memory=self.device.type == "cuda", persistent_workers=workers,
            prefetch_factor=prefetch_factor if workers else None, worker_init_fn=ignore_stop_signals,
            # its own generator: each iter() draws the workers' base seed, which from the global RNG would shift
            # the training step's draws (stochastic depth) by one in a resumed run that starts its pass later
            generator=torch.Generator().manual_seed(seed))

    def close(self) -> None:
        """Stop the persistent worker processes now (a later pass starts new ones); a pass being read ends."""
        reader = getattr(getattr(self, "_loader", None), "_iterator", None)
        if reader is not None:
            self._pass = None  # a pass still held by the caller stops at its next batch (superseded)
            self._loader._iterator = None
            reader._shutdown_workers()

    def _skips_unread(self) -> bool:
        return self.sampler.drop_last  # without it batch sizes depend on the files: read and drop

    def _run_pass(self, skip: int) -> Iterator[SDMPBatch]:
        """One pass of the epoch; ``skip_batches(k)`` starts it at batch ``k`` without decoding the batches
        before. Each sample's augmentation is seeded by (seed, epoch, index), and the mixing draws of the
        skipped batches are drawn and dropped. With ``drop_last`` (training's setting) a batch keeps its size
        whatever files it lost, and a whole pass yields it unless none of its files decodes: each skipped
        batch is probed for one decodable file (one decode per batch instead of all), so such a batch is not
        counted, as the whole pass does not yield it. Without ``drop_last`` batch sizes depend on the files, so
        the first ``k`` batches are read and dropped instead."""
        epoch = self.sampler.begin_pass()
        token = self._pass = object()  # a later pass resets the DataLoader's iterator under this one
        gen = make_generator(self.seed, epoch, self.shard_id, self.device)
        if skip:
            self._batches.start = self._skip_unread(skip, gen)
        reader = iter(self._loader)
        _WORKERS.update(getattr(reader, "_workers", ()))  # see kill_workers_that_ignore_terminate
        while True:
            # checked before each read: a stale pass must not take the new one's batches (persistent workers:
            # one iterator for every pass; without workers each pass has its own and both may run)
            if self._pass is not token and self.num_workers > 0:
                raise superseded_pass("torchvision")
            try:
                views, labels, indices, bad = next(reader)
            except StopIteration:
                break
            for path, reason in bad:
                self.log.record(path, reason)
            if views is None:  # every file of the batch was undecodable
                self.log.check_empty_batch([path for path, _ in bad])
                continue
            views, labels, indices = settle_batch(views, labels, indices, len(bad), self.recipe,
                                                  self.sampler.drop_last, self.log)
            if labels.shape[0] == 0:
                continue
            views = [v.to(self.device, non_blocking=True) for v in views]
            if self.dtype is not None:
                views = [v.to(self.dtype) for v in views]
            yield assemble_batch(views, labels.to(self.device, non_blocking=True),
                                 indices.to(self.device, non_blocking=True), self.recipe, gen)
        self.log.end_epoch(epoch)

    def _skip_unread(self, k: int, gen: torch.Generator) -> int:
        """Sampler batches spanned by the first ``k`` batches a whole pass yields (those with a decodable file),
        their mixing draws drawn from ``gen``."""
        batches = self.sampler.batches()
        yielded = at = 0
        while yielded < k and at < len(batches):
            bad = []
            for i in batches[at].tolist():
                reason = _undecodable(self.images.files[i])
                if reason is None:  # one decodable file: a whole pass yields this batch
                    skip_mixing_draws(self.recipe, self.batch_size, gen, self.device)
                    yielded += 1
                    break
                bad.append((self.images.files[i], reason))
            else:  # none decodes: a whole pass leaves the batch out, or stops here when sharded
                self.log.record_empty_batch(bad)
            at += 1
        return at
