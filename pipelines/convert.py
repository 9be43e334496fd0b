"""`sdmp-fast convert`: an ImageFolder tree (or a file list) into an FFCV .beton.

Fields: ``image`` (RGBImageField, JPEG / raw / a proportion of each, longest side capped), ``label`` and
``index`` (IntFields; ``index`` is the sample's position in the .beton, so the loader can report which samples
a batch holds). Three guarantees:

- Bad files never cost the conversion: every file is decoded once with PIL before writing (corrupt, truncated,
  zero-byte and non-image files fail here), skipped, counted, named in the printed summary and listed in
  ``OUT.skipped.txt`` (a header line, then one "path<TAB>reason" line each; a backslash, tab or line end in
  either is escaped as in a Python string). Grayscale / palette / CMYK / 16-bit / alpha / EXIF-rotated images are converted to upright
  8-bit RGB.
- Atomic output: the writer fills ``OUT.tmp-<pid>`` in OUT's directory and ``os.replace``s it at the end, so a
  partial file never sits under the final name and a previous OUT survives a failed run.
- No hang: FFCV's writer waits forever when a worker process dies; ours watches the workers and raises.
"""
from __future__ import annotations

import ctypes
import os
import queue
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import Process, Queue, Value
from typing import List, Optional, Sequence, Tuple

import numpy as np

from sdmp_fast.paths import LockHeld, discard, lock_exclusive, release_removing, sibling_lock_path

from .base import MAX_WORKERS, list_images, usable_cores
from .image_bytes import max_pixels, open_image, rgb8
from .skips import SKIPPED_LIST_HEADER, escape_name

FORMATS = ("jpg", "raw", "proportion")
DEFAULT_JPEG_QUALITY = 90  # of the stored JPEGs (--jpeg-quality)
MAX_STORED_SIDE = 65535  # FFCV stores width/height as uint16
SUMMARY_LISTED = 20      # bad files printed in full; the sidecar lists all of them


def add_arguments(parser) -> None:
    parser.add_argument("src", help="ImageFolder root (root/class/img.jpg), a flat folder of unlabeled "
                        "images (label -1) or a file list ('path label' lines)")
    parser.add_argument("out", help="output .beton path (its directory must exist)")
    parser.add_argument("--format", choices=FORMATS, default="jpg",
                        help="jpg: JPEG-compressed (small, decoded by FFCV); raw: uint8 pixels (largest, "
                             "fastest to read); proportion: a random --compress-probability share as JPEG")
    parser.add_argument("--max-side", type=int, default=512,
                        help="cap the longest side to this many pixels before storing (0: keep the original)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY)
    parser.add_argument("--compress-probability", type=float, default=0.5, help="for --format proportion")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: every core this process may use)")
    parser.add_argument("--chunk-size", type=int, default=100, help="samples per writer work item")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    summary = convert(args.src, args.out, fmt=args.format, max_side=args.max_side,
                      jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                      workers=args.workers, chunk_size=args.chunk_size, progress=not args.quiet)
    print(summary.report())
    return 0


@dataclass
class ConvertSummary:
    out: str
    written: int
    num_classes: int
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    skipped_list: Optional[str] = None  # path of the sidecar, when anything was skipped

    def report(self) -> str:
        size_mb = os.path.getsize(self.out) / 2**20
        lines = [f"wrote {self.out}: {self.written} images, {self.num_classes} classes, {size_mb:.1f} MiB in "
                 f"{self.seconds:.1f} s ({self.written / max(self.seconds, 1e-9):.0f} img/s); "
                 f"skipped {len(self.skipped)} file(s)"]
        if self.skipped:
            lines.append(f"skipped files (all listed in {self.skipped_list}):")
            lines += [f"  {escape_name(path)}: {escape_name(reason)}" for path, reason in self.skipped[:SUMMARY_LISTED]]
            if len(self.skipped) > SUMMARY_LISTED:
                lines.append(f"  ... and {len(self.skipped) - SUMMARY_LISTED} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- image reading

def load_rgb(path: str, max_side: int = 0) -> np.ndarray:
    """Decode ``path`` fully into upright uint8 RGB [H, W, 3]; raises on anything undecodable.

    With ``max_side``, JPEGs are decoded at a reduced DCT scale that still covers ``max_side`` (FFCV then
    area-resizes to exactly max_side): much less work for large photos, same stored result size."""
    from PIL import ImageOps

    # the pixel limit of every backend (image_bytes.max_pixels: Pillow's ~179 MP unless SDMP_MAX_IMAGE_PIXELS
    # says otherwise), so a .beton holds the images the other loaders read
    with open_image(path) as im:
        if max_side:
            im.draft("RGB", (max_side, max_side))
        im.load()  # the full decode: truncated / corrupt data raises here
        im = ImageOps.exif_transpose(im)
        arr = np.asarray(rgb8(im), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"decoded to an unusable shape {arr.shape}")
    return arr


def stored_shape(shape: Tuple[int, int], max_side: int) -> Tuple[int, int]:
    """(h, w) after FFCV's resizer (longest side capped at max_side, never upscaled)."""
    h, w = shape
    if max_side and max(h, w) > max_side:
        r = max_side / max(h, w)
        return int(r * h), int(r * w)
    return h, w


def check_image(path: str, max_side: int = 0):
    """(stored (h, w), None) for a decodable image, (None, reason) otherwise. Never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning etc.: large is fine, only errors count
            arr = load_rgb(path, max_side)
        h, w = stored_shape(arr.shape[:2], max_side)
        if max(h, w) > MAX_STORED_SIDE:
            return None, f"{arr.shape[1]}x{arr.shape[0]} exceeds FFCV's {MAX_STORED_SIDE}-pixel limit (use --max-side)"
        if min(h, w) < 1:  # FFCV's resizer would make a 0-pixel side and fail the whole write
            return None, (f"{arr.shape[1]}x{arr.shape[0]} is too thin to store with its longest side capped at "
                          f"{max_side} (--max-side)")
        return (h, w), None
    except Exception as e:  # noqa: BLE001 - every failure is a skip reason, reported with its type
        return None, f"{type(e).__name__}: {e}"


def _check_star(args):
    return check_image(*args)


def check_images(files: Sequence[str], max_side: int, workers: int, progress: bool):
    """check_image over all files in ``workers`` processes, in order, with a progress bar."""
    from tqdm import tqdm

    work = [(f, max_side) for f in files]
    bar = dict(total=len(files), desc="checking", unit="img", disable=not progress, file=sys.stderr)
    if workers <= 1 or len(files) < 64:
        return [check_image(*w) for w in tqdm(work, **bar)]
    with ProcessPoolExecutor(max_workers=workers, initializer=_exit_with_parent) as pool:
        return list(tqdm(pool.map(_check_star, work, chunksize=max(1, min(256, len(work) // (8 * workers)))),
                         **bar))


def _exit_with_parent() -> None:
    """In a worker process: a thread that ends it once its parent is gone. A SIGTERM or SIGKILL sent to the
    parent alone (``kill PID``, ``docker stop``, systemd's KillMode=mixed) left the checking workers blocked
    for ever and the writers converting the whole data set into a temporary nobody would rename. The parent is
    whatever process started this one (convert's, or the fork server's under forkserver, which ends with it)."""
    import signal
    import threading

    parent = os.getppid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's _sigterm_unwinds, inherited by fork

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="sdmp-convert-orphan-watch", daemon=True).start()


def _writer_worker(work_fn, *args) -> None:
    _exit_with_parent()
    work_fn(*args)


class _ImageDataset:
    """What FFCV's writer workers index: (rgb uint8 [H, W, 3], label, index). Files were checked already;
    a file that changed since raises with its path (the writer then stops with an error, never hangs)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], max_side: int):
        self.files, self.labels, self.max_side = list(files), list(labels), max_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = load_rgb(self.files[i], self.max_side)
        except Exception as e:
            raise RuntimeError(f"{self.files[i]}: became unreadable during conversion ({e})") from e
        return image, int(self.labels[i]), int(i)


# ---------------------------------------------------------------------------------------------- writing

def _page_size(largest_hw: Tuple[int, int]) -> int:
    """FFCV pages must hold the largest sample whole; a raw 512x512 image is 0.75 MiB, a raw 4000x3000 36 MiB."""
    from ffcv.writer import MIN_PAGE_SIZE

    need = 3 * largest_hw[0] * largest_hw[1] + 65536
    size = 4 * MIN_PAGE_SIZE
    while size < need:
        size *= 2
    return size


class WriterDied(RuntimeError):
    """An FFCV writer process exited with an error (its own traceback went to stderr)."""


def _make_writer(path, fields, page_size, num_workers):
    """FFCV's DatasetWriter with a worker watchdog (its own loop spins forever when a worker dies)."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class SafeDatasetWriter(DatasetWriter):
        progress = True

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            processes = []
            try:
                workqueue: Queue = Queue()
                for todo in queue_content:
                    workqueue.put(todo)
                for _ in range(self.num_workers):
                    workqueue.put(None)
                allocations_queue: Queue = Queue()
                done_number = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                               done_number, allocations_queue, *extra_worker_args)
                processes = [Process(target=_writer_worker, args=(work_fn, *worker_args), daemon=True)
                             for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                allocation_list, pending, shown = [], len(processes), 0
                with tqdm(total=num_samples, desc="writing", unit="img", disable=not self.progress,
                          file=sys.stderr) as bar:
                    # Drain allocations while workers run (a child cannot exit with unread queue data).
                    while pending:
                        try:
                            allocation_list.extend(allocations_queue.get(timeout=0.1))
                            pending -= 1
                        except queue.Empty:
                            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                            if dead:
                                raise WriterDied(f"convert: a writer process failed (exit code {dead[0]}); "
                                                 f"its traceback is printed above")
                        bar.update(done_number.value - shown)
                        shown = done_number.value
                for p in processes:
                    p.join()
                self.finalize(allocation_list)
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SafeDatasetWriter(path, fields, page_size=page_size, num_workers=num_workers)


def _write_text(path: str, text: str) -> None:
    # a file name that is not UTF-8 (os.listdir gives its bytes as surrogates) is written back as those bytes
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_failed(e: BaseException, out: str, page_size: int) -> OSError:
    """One OSError naming ``out`` for a failed conversion (the CLI prints it as one line): a writer process's own
    error (disk full, most often) reaches this process only as its exit code, and FFCV's as a bare OSError."""
    import errno
    import shutil

    from sdmp_fast.paths import os_error_reason

    kept = "the earlier file is unchanged" if os.path.isfile(out) else "nothing was written there"
    if isinstance(e, OSError):
        return OSError(e.errno, f"convert: could not write it ({os_error_reason(e)}); {kept}", out)
    try:  # measured before the partial file is removed: a full disk shows as no room for another page
        full = shutil.disk_usage(os.path.dirname(out) or ".").free < 2 * page_size
    except OSError:
        full = False
    reason = "disk full" if full else "a writer process failed"
    return OSError(errno.ENOSPC if full else errno.EIO,
                   f"convert: could not write it ({reason}; the writer's traceback is printed above); {kept}", out)


class _Terminated(BaseException):
    """SIGTERM while writing: unwinds convert (the writer stops its processes and frees its shared memory, the
    temporaries are removed), then the signal is delivered again to the handler that was there before."""


def _sigterm_unwinds():
    """While writing: a SIGTERM (``kill PID``, a scheduler) raises ``_Terminated`` in the main thread. Returns
    the function that puts the earlier handler back. Elsewhere than in the main thread (signal handlers live
    there) nothing changes: the writers still end with the process (``_exit_with_parent``)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _remove_stale_temporaries(out: str) -> None:
    """``OUT.tmp-<pid>`` files left by a conversion that was killed (SIGKILL, power loss) are removed once
    their process is gone; a live conversion's temporary is left alone."""
    from sdmp_fast.paths import remove_dead_temporaries

    remove_dead_temporaries(out + ".tmp-", out + ".skipped.txt.tmp-")


def validate_options(src, out, fmt, max_side, jpeg_quality, compress_probability, workers, chunk_size) -> str:
    """Raise ValueError naming the setting, before any work. Returns the absolute output path."""
    max_pixels()  # SDMP_MAX_IMAGE_PIXELS
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (max_side == 0 or 8 <= max_side <= MAX_STORED_SIDE):
        raise ValueError(f"--max-side: expected 0 (keep) or 8..{MAX_STORED_SIDE}, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality: expected 1..100, got {jpeg_quality}")
    if not 0 <= compress_probability <= 1:
        raise ValueError(f"--compress-probability: expected a probability, got {compress_probability}")
    if not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers: expected >= 0 and <= {MAX_WORKERS} (0: every core), got {workers}")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size: expected >= 1, got {chunk_size}")
    out = os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise ValueError(f"out: {out!r} is a directory; give a file path such as {os.path.join(out, 'train.beton')}")
    if not os.path.isdir(os.path.dirname(out)):
        raise ValueError(f"out: directory {os.path.dirname(out)!r} does not exist")
    if not os.path.exists(os.fspath(src)):
        raise ValueError(f"src: {os.fspath(src)!r} does not exist")
    if os.path.exists(out) and os.path.samefile(out, os.fspath(src)):
        raise ValueError(f"out: {out!r} is the source file list itself; give the .beton another path")
    if os.path.exists(out):  # replaced at the end: only an earlier .beton, never a file of another kind
        from .ffcv_loader import _open_beton

        try:
            _open_beton(out)
        except ValueError:
            raise ValueError(f"out: {out!r} exists and is not an FFCV .beton that convert may replace; remove it "
                             f"first or choose another path") from None
    return out


def convert(src, out, *, fmt: str = "jpg", max_side: int = 512, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            compress_probability: float = 0.5, workers: int = 0, chunk_size: int = 100,
            progress: bool = True) -> ConvertSummary:
    """Write ``src`` (ImageFolder root or file list) to the FFCV file ``out``; see the module docstring."""
    out = validate_options(src, out, fmt, max_side, jpeg_quality, compress_probability, workers, chunk_size)
    images = list_images(src)  # ValueError naming src when it is empty
    lock = _lock_output(out)
    try:
        return _convert_locked(images, out, fmt, max_side, jpeg_quality, compress_probability, workers,
                               chunk_size, progress)
    finally:
        release_removing(lock)


def _lock_output(out: str):
    """One convert per output at a time: two wrote the whole set each, and the later of the two swaps could pair
    one run's .beton with the other's skipped list (or fail on a list the other had just removed)."""
    try:
        return lock_exclusive(sibling_lock_path(out))
    except LockHeld:
        raise ValueError(f"out: {out!r} is being written by another sdmp-fast convert (its lock "
                         f"{sibling_lock_path(out)!r} is held); wait for it to end") from None
    except OSError as e:
        raise ValueError(f"out: cannot lock {sibling_lock_path(out)!r} ({e.strerror}): the folder of out takes no "
                         f"POSIX locks (NFS without lockd?) or this user may not write there") from None


def _convert_locked(images, out, fmt, max_side, jpeg_quality, compress_probability, workers, chunk_size,
                    progress) -> ConvertSummary:
    workers = workers or usable_cores()  # a container's CPU set, not the host's cores
    from .ffcv_loader import kept_torch_threads

    with kept_torch_threads():  # importing ffcv sets the caller's torch threads to 1 (FFCV's Compiler)
        from ffcv.fields import IntField, RGBImageField  # slow import (numba): before the clock starts

    t0 = time.perf_counter()

    checks = check_images(images.files, max_side, workers, progress)
    good = [i for i, (shape, _) in enumerate(checks) if shape is not None]
    # absolute: the list is read later from other folders (the FFCV loader, as_lightly)
    skipped = [(os.path.abspath(images.files[i]), reason) for i, (shape, reason) in enumerate(checks)
               if shape is None]
    if not good:
        raise ValueError(f"src: none of the {len(images)} files in {images.root!r} could be decoded "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    largest = max((checks[i][0] for i in good), key=lambda hw: hw[0] * hw[1])
    fields = {
        "image": RGBImageField(write_mode=fmt, max_resolution=max_side or None, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    dataset = _ImageDataset([images.files[i] for i in good], [images.labels[i] for i in good], max_side)
    _remove_stale_temporaries(out)
    sidecar = out + ".skipped.txt"
    tmp, sidecar_tmp = f"{out}.tmp-{os.getpid()}", f"{sidecar}.tmp-{os.getpid()}"
    page_size = _page_size(largest)
    restore = _sigterm_unwinds()
    terminated = False
    try:
        writer = _make_writer(tmp, fields, page_size, min(workers, len(good)))
        writer.progress = progress
        writer.from_indexed_dataset(dataset, chunksize=chunk_size)
        if skipped:  # written before either file is replaced
            _write_text(sidecar_tmp, SKIPPED_LIST_HEADER + "\n" +
                        "".join(f"{escape_name(p)}\t{escape_name(r)}\n" for p, r in skipped))
        discard(sidecar)  # gone first: a kill between the two swaps never pairs the new .beton with the earlier
        # conversion's list
        os.replace(tmp, out)
        if skipped:
            os.replace(sidecar_tmp, sidecar)
    except (OSError, WriterDied) as e:
        raise _write_failed(e, out, page_size) from None
    except _Terminated:
        terminated = True
    finally:
        restore()
        for t in (tmp, sidecar_tmp):
            if os.path.exists(t):
                os.remove(t)
    if terminated:  # cleaned up: now the signal, to the earlier handler (the default one ends the process)
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM)  # a handler that returned: convert did not finish
    return ConvertSummary(out, len(good), len(images.classes), skipped, time.perf_counter() - t0,
                          sidecar if skipped else None)
