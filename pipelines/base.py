"""What every loader shares: the data listing, the epoch/shard sampler, batch assembly with mixing, and the
``make_loader`` entry point. Backends import their heavy dependency lazily, so this module needs torch only.

Epoch semantics (all backends): the epoch's order is a permutation seeded by (seed, epoch); shard r of W takes
``perm[r::W]`` (disjoint, covering); with drop_last each shard keeps floor(len/B) full batches of
floor(N/W)-long shards (equal step counts on every rank, as DDP needs); without it the last batch may be short
and shards may differ by one batch (every sample exactly once: for evaluation, not for DDP training). A pass
without ``set_epoch`` since the previous one runs the next epoch (``EpochSampler.begin_pass``).
A short odd last batch cannot be batch-flip mixed: its mixed views are copies with lam = 1, which every SDMP
loss treats as "no mixing" (c = 0), so the loss stays consistent.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import operator
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.kernels import mix_views  # fused CUDA kernel on GPU views; the reference (same draws) elsewhere
from sdmp_fast.mixing import method_ids, draw_mix_params

from .image_bytes import max_pixels
from .recipes import Recipe, make_recipe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")
_EXTENSIONS_LOWER = tuple(sorted({e.lower() for e in IMAGE_EXTENSIONS}))


@dataclass(frozen=True)
class ImageList:
    """Files and labels of a data set, from an ImageFolder tree or a file list."""
    files: Tuple[str, ...]
    labels: Tuple[int, ...]
    classes: Tuple[str, ...]
    root: str

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """Digest of the files (relative to the root) and labels, in order: what a resume compares to know it
        reads the same samples in the same order (a moved data set keeps its digest)."""
        import hashlib

        h = hashlib.sha1()
        for f, label in zip(self.files, self.labels):
            h.update(f"{os.path.relpath(f, self.root)}\t{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def list_images(data: Union[str, os.PathLike, "ImageList"], check_files: bool = True) -> ImageList:
    """An ImageFolder tree (root/class/.../img.jpg), a flat folder of images (unlabeled: label -1, what SSL
    data often is), or a text file list ("relative/or/absolute/path label" lines, label optional).

    Class folders are walked recursively, following links, in sorted order, as torchvision's ImageFolder does,
    except that hidden entries (".name": .ipynb_checkpoints, macOS "._x.jpg" forks) are skipped and a folder
    reached twice through links is read once. Raises ValueError naming the path when it is missing, unreadable
    or holds no images; warns when images at the top level sit beside class folders (they are not read). Empty
    class folders are kept as classes (their index stays stable) but hold no samples. ``check_files``: a file
    list none of 8 entries spread over it exists is refused (``as_lightly`` reads only the names: False).
    """
    if isinstance(data, ImageList):
        return data
    path = os.fspath(data)
    if not os.path.exists(path):
        raise ValueError(f"data: {path!r} does not exist")
    if os.path.isfile(path):
        return _read_file_list(path, check_files)
    entries = _listdir(path)
    classes = sorted(d for d in entries if os.path.isdir(os.path.join(path, d)))
    loose = [n for n in entries if _is_image_name(n) and n not in classes]  # a folder "x.jpg" is a class
    if not classes:
        if not loose:
            raise ValueError(f"data: {path!r} has no class sub-folders and no image files "
                             f"({', '.join(IMAGE_EXTENSIONS[:5])}, ...): expected root/class/img or root/img")
        return ImageList(tuple(os.path.join(path, n) for n in sorted(loose)), (-1,) * len(loose), (), path)
    files, labels = [], []
    # folders are read once across classes: a link inside one class folder to another (cat/more_dogs -> ../dog)
    # or to the root would list the same images under two labels. Class folders belong to their class only.
    walk = _FolderWalk(path)
    for label, found in enumerate(walk.images_by_class([os.path.join(path, c) for c in classes])):
        files += found
        labels += [label] * len(found)
    walk.warn_skipped()
    if not files:
        raise ValueError(f"data: {path!r} holds no image files in its class folders "
                         f"({', '.join(IMAGE_EXTENSIONS[:5])}, ...)"
                         + (f"; its {len(loose)} image(s) at the top level are not read when it has sub-folders"
                            if loose else ""))
    if loose:
        warnings.warn(f"data: {path!r} has class folders {classes[:4]}{'...' if len(classes) > 4 else ''} and "
                      f"{len(loose)} image(s) at the top level, which are not read (ImageFolder layout); for an "
                      f"unlabeled flat folder, move the sub-folders out", RuntimeWarning, stacklevel=2)
    return ImageList(tuple(files), tuple(labels), tuple(classes), path)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_EXTENSIONS_LOWER)


def _listdir(folder: str) -> List[str]:
    """Entries of ``folder`` but hidden ones; ValueError naming it when it cannot be read."""
    try:
        return [n for n in os.listdir(folder) if not n.startswith(".")]
    except OSError as e:
        raise ValueError(f"data: cannot read the folder {folder!r} ({e.strerror})") from None


def _folder_id(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class _FolderWalk:
    """Walks class folders following links, reading each folder once over the whole tree. Real paths first:
    every class folder's own tree without following links, then the links met there (and class folders that
    are links), in order, following links from there on. A folder reached a second time (a link loop, a link
    into another class's folder or to the root, two links to one folder) is not read again; those paths are
    named in one warning (``warn_skipped``)."""

    def __init__(self, root: str):
        self.read = {_folder_id(root): root}  # folder id -> the path it was read under (the root: never read)
        self.skipped: List[Tuple[str, str]] = []  # (path not read, the path of the same folder)

    def images_by_class(self, class_folders: Sequence[str]) -> List[List[str]]:
        """Image files of each class folder, each in sorted (root, name) order as ImageFolder's."""
        found: List[List[Tuple[str, List[str]]]] = [[] for _ in class_folders]
        links: List[Tuple[int, str]] = []  # (class, path) of links, read after every real folder
        for k, folder in enumerate(class_folders):
            if os.path.islink(folder):
                links.append((k, folder))
            else:
                self._walk(folder, found[k], links, k)
        for k, path in links:
            self._walk(path, found[k], None, k)
        return [[os.path.join(root, n) for root, names in sorted(f) for n in names] for f in found]

    def _walk(self, top: str, found, links: Optional[list], k: int) -> None:
        """Reads ``top``'s tree into ``found``; with ``links`` (real folders only) links are collected there
        instead of followed."""
        def unreadable(err: OSError):
            raise ValueError(f"data: cannot read the folder {err.filename!r} ({err.strerror})")

        for root, dirs, names in os.walk(top, followlinks=links is None, onerror=unreadable):
            fid = _folder_id(root)
            first = self.read.get(fid)
            if first is not None:
                self.skipped.append((root, first))
                dirs[:] = []
                continue
            self.read[fid] = root
            # sorted: which path of a folder reached twice is read does not depend on the listing order
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if links is not None:
                linked = [d for d in dirs if os.path.islink(os.path.join(root, d))]
                links += [(k, os.path.join(root, d)) for d in linked]
                dirs[:] = [d for d in dirs if d not in linked]
            found.append((root, sorted(n for n in names if _is_image_name(n))))

    def warn_skipped(self) -> None:
        if self.skipped:
            shown = "; ".join(f"{p!r} (the folder {q!r})" for p, q in self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            warnings.warn(f"data: {len(self.skipped)} folder(s) reached a second time through links are read once, "
                          f"under their real path or first link: {shown}{more}", RuntimeWarning, stacklevel=3)


def _resolve(base: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(base, name)


def _looks_like_a_label(token: str) -> bool:
    """A number that is not an integer ("2.0", "1e3"): a mistyped label rather than the end of a file name."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def _read_file_list(path: str, check_files: bool = True) -> ImageList:
    if _is_image_name(os.path.basename(path)):  # an image whose bytes happen to decode as text is no file list
        raise ValueError(f"data: {path!r} is an image file, not a folder or a text file list ('path [label]' "
                         f"lines); an image folder is given as its directory")
    base = os.path.dirname(os.path.abspath(path))
    files, labels, names = [], [], []
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"data: cannot read the file list {path!r} ({e.strerror or e})") from None
    not_a_list = (f"data: {path!r} is a file but not a text file list ('path [label]' lines); an image folder is "
                  f"given as its directory, a .beton with the ffcv loader")
    if b"\0" in raw:  # binary (a .beton, an archive); text in any encoding holds no NUL byte, UTF-16 aside
        raise ValueError(not_a_list)
    # -sig: a BOM (Windows editors) is no part of the first path. Bytes that are not UTF-8 are either names the
    # file system holds so (Latin-1 file names, kept as os.listdir gives them: surrogateescape) or no text at
    # all: the files' existence below tells which
    try:
        text, utf8 = raw.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        text, utf8 = raw.decode("utf-8-sig", errors="surrogateescape"), False
    lines = re.split(r"\r\n|\r|\n", text)  # the line ends open() knows; str.splitlines also splits at \x0c, \x85...
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            name, label = (parts[0], int(parts[1])) if len(parts) == 2 else (parts[0], -1)
        except ValueError:  # no integer label: the whole line is the path (names may hold spaces)
            name, label = line, -1
            if _looks_like_a_label(parts[-1]) and not os.path.exists(_resolve(base, name)):
                raise ValueError(f"data: file list {path!r}, line {lineno}: label {parts[-1]!r} is not an "
                                 f"integer class index (lines are 'path [label]')") from None
        files.append(_resolve(base, name))
        names.append(name)
        labels.append(label)
    if not files:
        raise ValueError(not_a_list if not utf8 else f"data: file list {path!r} names no images")
    # a list written from another folder (find data ... > lists/train.txt) names paths that are not there: said
    # now, not after an epoch of skipped files. 8 entries spread over the list (a stat each, over NFS too): a
    # list with some files gone is still read (the loaders skip and name them)
    sample = sorted({k * len(files) // 8 for k in range(8)})
    if check_files and not any(os.path.exists(files[k]) for k in sample):
        missing = (f"none of the {len(sample)} files tried exists ({names[0]!r} is read as {files[0]!r}); "
                   f"relative paths are read from the list's own folder {base!r}")
        raise ValueError(f"data: file list {path!r}: {missing}" if utf8 else
                         f"{not_a_list} (it is not UTF-8; read as a list, {missing})")
    n_cls = max(labels) + 1 if max(labels) >= 0 else 0
    return ImageList(tuple(files), tuple(labels), tuple(str(i) for i in range(n_cls)), base)


def dist_shard() -> Tuple[int, int]:
    """(shard_id, num_shards): torch.distributed's rank and world size when it is initialised, else torchrun's
    RANK / WORLD_SIZE (a loader built before init_process_group must still take its own shard), else (0, 1) --
    with a warning when WORLD_SIZE says there are other processes. A loader sharded this way follows the process
    group once it is initialised (``SampledLoader._follow_dist``): Lightning's launcher sets no RANK, and its
    rank 0 makes the loader before the other processes even exist."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1:
        if rank.isdigit() and int(rank) < int(world):
            return int(rank), int(world)
        if rank:
            raise ValueError(f"RANK={rank!r} is not a rank of WORLD_SIZE={world} (0..{int(world) - 1}); pass "
                             f"shard_id and num_shards, or fix the environment")
        warnings.warn(f"make_loader: WORLD_SIZE={world} but no RANK and no initialised torch.distributed: the "
                      f"loader reads the whole data set until torch.distributed is initialised (it takes its shard "
                      f"then, at its first len / set_epoch / iter); pass shard_id and num_shards to shard it now",
                      RuntimeWarning, stacklevel=3)
    return 0, 1


def whole_number(name: str, value, low: Optional[int] = None, hint: str = "", high: Optional[int] = None) -> int:
    """``value`` as a Python int: numpy / torch integers too (a seed or shard id from ``np.arange``), whose own
    arithmetic would overflow in the seed mixing; bools (numpy's and torch's too), floats and strings are refused
    naming ``name``."""
    try:
        number = None if _is_bool(value) else operator.index(value)
    except TypeError:
        number = None
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        want = "an integer" if low is None else f"an integer >= {low}"
        want += f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}: must be {want}{hint}, got {value!r}")
    return number


def _is_bool(value) -> bool:
    """True / False in any dress: operator.index takes numpy's bool_ and a 0-dim torch bool tensor as 0 / 1."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


# Upper bounds of the counts a loader takes. Past them a setting is a typo or a unit mix-up, and torch, DALI or
# FFCV would not refuse it: 10**9 DataLoader workers fork until the machine gives out, a prefetch_factor of 10**9
# spins in DataLoader's start-up loop (prefetch_factor x workers index puts), and DALI starts 10**9 threads.
MAX_WORKERS = 1024
MAX_THREADS = 1024
MAX_BATCHES_AHEAD = 64  # each holds whole batches in (pinned or device) memory; the backends' defaults are 2-3
OPTION_MAX = {"prefetch_factor": MAX_BATCHES_AHEAD, "prefetch": MAX_BATCHES_AHEAD,
              "prefetch_queue_depth": MAX_BATCHES_AHEAD, "batches_ahead": MAX_BATCHES_AHEAD,
              "num_threads": MAX_THREADS, "read_threads": MAX_THREADS}


class EpochSampler:
    """Deterministic per-epoch, per-shard sample order (see the module docstring for the exact rules)."""

    def __init__(self, num_samples: int, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        batch_size = whole_number("batch_size", batch_size, 1)
        shard_id, num_shards = whole_number("shard_id", shard_id, 0), whole_number("num_shards", num_shards, 1)
        seed = whole_number("seed", seed)
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._passes = 0  # passes begun (begin_pass)
        self._epoch_set = False  # set_epoch called since the last pass began
        if drop_last and self.shard_size() < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is larger than this shard's {self.shard_size()} samples "
                f"({num_samples} samples over {num_shards} shards) with drop_last: an epoch would be empty")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True

    def reshard(self, shard_id: int, num_shards: int) -> None:
        """Another shard of the same data, the epoch and pass bookkeeping kept (checked as in the constructor)."""
        shard_id, num_shards = whole_number("shard_id", shard_id, 0), whole_number("num_shards", num_shards, 1)
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        old = self.shard_id, self.num_shards
        self.shard_id, self.num_shards = shard_id, num_shards
        if self.drop_last and self.shard_size() < self.batch_size:
            self.shard_id, self.num_shards = old
            raise ValueError(
                f"batch_size {self.batch_size} is larger than shard {shard_id}'s {self.num_samples // num_shards} "
                f"samples ({self.num_samples} samples over {num_shards} shards) with drop_last: an epoch would be "
                f"empty")

    def begin_pass(self) -> int:
        """The epoch a loader's new pass runs (every backend's ``__iter__`` starts with it): ``set_epoch``'s, or,
        when it was not called since the last pass, the next one. A loop that never calls set_epoch (lightly's
        examples, single-GPU moco-v3) then gets a new order, new augmentations and new mixing every pass, as from
        a DataLoader with shuffle=True, instead of the first epoch again and again; one that calls it every
        epoch (DistributedSampler's pattern, the trainer) gets exactly the epochs it asks for."""
        if self._passes and not self._epoch_set:
            self.epoch += 1
        self._passes += 1
        self._epoch_set = False
        return self.epoch

    def upcoming_epoch(self) -> int:
        """The epoch the next pass begun will run (``begin_pass``'s rule, without beginning it)."""
        return self.epoch + 1 if self._passes and not self._epoch_set else self.epoch

    def shard_size(self) -> int:
        if self.drop_last:
            return self.num_samples // self.num_shards
        return len(range(self.shard_id, self.num_samples, self.num_shards))

    def __len__(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """This shard's sample indices for ``epoch`` (default: the current one), truncated to whole batches with
        drop_last."""
        if self.shuffle:
            epoch = self.epoch if epoch is None else epoch
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        if self.drop_last:
            perm = perm[: self.shard_size() * self.num_shards]
        mine = perm[self.shard_id:: self.num_shards]
        if self.drop_last:
            mine = mine[: len(self) * self.batch_size]
        return mine

    def batches(self) -> List[torch.Tensor]:
        mine = self.indices()
        return list(mine.split(self.batch_size)) if mine.numel() else []  # an empty shard has no batch


def usable_cores() -> int:
    """The cores this process may run on: a container's CPU set, not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_threads(num_workers: Optional[int]) -> int:
    """Threads of a loader whose workers are threads (DALI, FFCV, the solo-learn-style baseline): ``num_workers``,
    0 being one (a DataLoader's 0: no parallel workers, not every core), None every usable core."""
    return usable_cores() if num_workers is None else max(1, int(num_workers))


def make_generator(seed: int, epoch: int, shard_id: int, device) -> torch.Generator:
    """Generator for augmentation/mixing randomness, distinct per (seed, epoch, shard), on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + epoch) * 1_009 + shard_id) % 2**63)  # any seed (unchanged below ~9e9)
    return g


def assemble_batch(views: Sequence[torch.Tensor], labels: torch.Tensor, indices: torch.Tensor,
                   recipe: Recipe, generator: Optional[torch.Generator]) -> SDMPBatch:
    """Apply the recipe's batch-flip mixing to augmented views (on their device) and build the SDMPBatch."""
    views = list(views)
    mix = recipe.mix
    if not mix.enabled or not mix.mixed_views:
        return SDMPBatch(views, labels, indices)
    n = labels.shape[0]
    sources = [views[i] for i in mix.mixed_views]
    dev = views[0].device
    if _draws_mixing(recipe, n):
        lam, method = draw_mix_params(n, mix.alpha, mix.methods, generator, dev, mix.per_batch)
        mixed, lams = mix_views(sources, lam, method, generator, method_ids(mix.methods))
    else:  # short odd last batch: no partner for the middle image; lam = 1 means "unmixed" to every loss
        mixed = [s.clone() for s in sources]
        lams = [torch.ones(n, device=dev)] * len(sources)
        method = torch.zeros(n, dtype=torch.long, device=dev)
    return SDMPBatch(views, labels, indices, mixed, tuple(mix.mixed_views), lams[0], method, list(lams))


def _draws_mixing(recipe: Recipe, n: int) -> bool:
    """Whether ``assemble_batch`` draws mixing parameters for a batch of ``n`` (a short odd last batch: none)."""
    return recipe.mix.enabled and bool(recipe.mix.mixed_views) and n >= 2 and n % 2 == 0


def skip_batch_draws(recipe: Recipe, n: int, generator: Optional[torch.Generator], device,
                     crops: bool = True) -> None:
    """Draw and drop what a batch of ``n`` samples draws from ``generator`` on the device ops' path: each view's
    crop boxes (``crops``: False where the decoder crops, as FFCV's) and augmentation, then the mixing."""
    from .device_ops import skip_view_draws

    skip_view_draws(n, recipe, generator, device, crops)
    skip_mixing_draws(recipe, n, generator, device)


def skip_mixing_draws(recipe: Recipe, n: int, generator: Optional[torch.Generator], device) -> None:
    """Draw from ``generator`` exactly what ``assemble_batch`` draws for a batch of ``n`` samples of ``recipe``
    (lam and method, then one box position per mixed view), and drop it: a loader that skips a batch without
    reading it leaves its mixing generator where the batch would have left it."""
    from sdmp_fast.mixing import draw_box

    if not _draws_mixing(recipe, n):
        return
    mix = recipe.mix
    lam, method = draw_mix_params(n, mix.alpha, mix.methods, generator, device, mix.per_batch)
    views = recipe.expanded_views()
    for j in mix.mixed_views:
        draw_box(lam, method, views[j].size, views[j].size, generator)


class EmptyEpochError(ValueError):
    """An epoch of a loader gave no batch (every file undecodable, or fewer samples than one batch)."""

    def __init__(self, epoch: int):
        super().__init__(f"epoch {epoch} gave no batch (every file undecodable? see the loader's warnings)")
        self.epoch = epoch


def resume_batches(loader, epoch: int = 0, position: int = 0) -> Iterator[Tuple[int, int, SDMPBatch]]:
    """(epoch, index in epoch, batch) from batch ``position`` of ``epoch`` on, across epochs for ever: the loop of a
    training run that starts (0, 0) or resumes where its checkpoint stopped, in any trainer.

    The first ``position`` batches of the epoch are read and dropped (a loader with ``skip_batches(k)`` skips
    them itself). Every loader draws its randomness from (seed, epoch, shard) -- DALI's random ops from the
    state its ``load_state_dict`` restored -- so the batches that follow are the ones the interrupted run would
    have seen. Raises EmptyEpochError when an epoch gives no batch (it would loop over empty epochs for ever)."""
    if epoch < 0 or position < 0:
        raise ValueError(f"resume_batches: epoch and position must be >= 0, got {epoch}, {position}")
    start = position
    while True:
        loader.set_epoch(epoch)
        i = start
        for batch in pass_from(loader, start):
            yield epoch, i, batch
            i += 1
        if i == 0:
            raise EmptyEpochError(epoch)
        epoch, start = epoch + 1, 0


def pass_from(loader, start: int) -> Iterator[SDMPBatch]:
    """A new pass of ``loader`` (its epoch as set) from batch ``start`` on: the loader's ``skip_batches`` skips
    the earlier ones unread; a loader without it (DALI) reads and drops them, so its random state goes on as in
    a whole pass."""
    skip_to = getattr(loader, "skip_batches", None)
    if start and callable(skip_to):
        skip_to(start)  # before iter: it belongs to the next pass begun
        return iter(loader)
    return itertools.islice(iter(loader), start, None)


@runtime_checkable
class SDMPLoader(Protocol):
    """What make_loader returns: an iterable of SDMPBatch with a length and a per-epoch reshuffle."""

    def __iter__(self) -> Iterator[SDMPBatch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class SampledLoader:
    """The SDMPLoader bookkeeping every backend shares: ``self.sampler`` (an EpochSampler) sets the length and
    the epoch, ``self.log`` (a SkipLog, where the backend decodes files) lists what was skipped."""

    sampler: EpochSampler
    _shard_from_dist = False  # make_loader took the shard from dist_shard(): follow the process group once it exists

    def __len__(self) -> int:
        self._follow_dist()
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self._follow_dist()
        self.sampler.set_epoch(epoch)

    def _follow_dist(self) -> None:
        """A loader made without shard_id takes torch.distributed's rank and world size when the process group
        exists by its first len / set_epoch / iter (checked until then): Lightning (solo-learn's trainer) makes
        the loader in rank 0 before it starts the other processes and initialises the group, so at construction
        rank 0 saw one process and would have read every shard."""
        if not self._shard_from_dist or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if (rank, world) != (self.sampler.shard_id, self.sampler.num_shards):
            self.sampler.reshard(rank, world)  # a shard too small for a batch raises here, and again at every call
            self.shard_id = rank
            self._resharded()
        self._shard_from_dist = False  # only once followed: a process group's ranks do not change

    def _resharded(self) -> None:
        """Backend state derived from the shard (the generators read ``shard_id`` at each pass): none here."""

    @property
    def skipped(self) -> List[str]:
        """Every file skipped so far (undecodable), in the order first met."""
        log = getattr(self, "log", None)
        return log.paths if log is not None else []

    def close(self) -> None:
        """Release what the loader holds between passes (worker processes, threads, pipelines) now instead of
        when it is collected; iterating again starts them anew. Every backend has it, so code that closes a
        loader (an adapter's ``close()``, a ``with`` block) works whichever backend it was given."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def superseded_pass(backend: str) -> RuntimeError:
    """The error of a pass resumed after a newer one began, in a loader whose passes share one reader (a
    DataLoader's persistent workers, a DALI pipeline): going on would mix the two passes' batches."""
    return RuntimeError(
        f"{backend} loader: a new pass (iter(loader)) began while this one was still being read; the passes "
        "share one reader, so this one cannot go on. Finish or drop a pass before starting the next, or use a "
        "second loader (the memory and torch-gpu loaders' passes are independent)")


class SkippingLoader(SampledLoader):
    """A SampledLoader whose pass can start at a later batch of its epoch without preparing the batches before
    (``skip_batches``, which ``resume_batches`` calls). A backend implements ``_run_pass(skip)``, a generator
    that starts at batch ``skip`` and leaves the generators it draws from where the skipped batches would have
    left them (``skip_batch_draws``); one that can do so only in some settings says so in ``_skips_unread``,
    and the batches it cannot skip are read and dropped here."""

    _skip = 0

    def skip_batches(self, k: int) -> None:
        """The next pass begun (``iter(loader)``) starts at batch ``k`` of its epoch, as a whole pass yields it;
        the passes after it are whole. Set before ``iter``, so a wrapper whose ``__iter__`` is a generator (it
        calls ``iter`` on this loader only at its first ``next``) passes the skip on. Backend-specific rules:
        the class's ``_run_pass``."""
        if int(k) < 0:
            raise ValueError(f"skip_batches: k must be >= 0, got {k}")
        self._skip = int(k)

    def __iter__(self) -> Iterator[SDMPBatch]:
        self._follow_dist()
        skip, self._skip = self._skip, 0
        if not skip or self._skips_unread():
            return self._run_pass(skip)
        return itertools.islice(self._run_pass(0), skip, None)  # read and dropped

    def _skips_unread(self) -> bool:
        """Whether ``_run_pass`` can skip batches unread in this loader's settings."""
        return True

    def _run_pass(self, skip: int) -> Iterator[SDMPBatch]:
        raise NotImplementedError


# name -> "module:Class"; modules are imported only when chosen, so a missing DALI/FFCV breaks nothing else.
BACKENDS = {
    "torchvision": "sdmp_fast.pipelines.torchvision_loader:TorchvisionLoader",
    "torch-gpu": "sdmp_fast.pipelines.torch_gpu:TorchGPULoader",
    "dali": "sdmp_fast.pipelines.dali:DaliLoader",
    "ffcv": "sdmp_fast.pipelines.ffcv_loader:FFCVLoader",
    "memory": "sdmp_fast.pipelines.memory:MemoryLoader",
}
# the third-party package a backend reads with, and the extra that installs it (pyproject.toml)
BACKEND_PACKAGES = {"dali": ("nvidia.dali", "dali"), "ffcv": ("ffcv", "ffcv")}


def _check_backend_package(backend: str) -> None:
    """A backend whose package is not installed is a ModuleNotFoundError naming it and its pip extra, before
    any data is read (it was a traceback from the first batch, or from FFCV's import)."""
    if backend not in BACKEND_PACKAGES:
        return
    package, extra = BACKEND_PACKAGES[backend]
    try:
        found = importlib.util.find_spec(package) is not None  # finds it without importing it (FFCV's is slow)
    except (ImportError, ValueError):  # a parent package missing, or a blocked / half-imported module
        found = False
    if not found:
        raise ModuleNotFoundError(f"the {backend} loader needs {package}, which is not installed here: "
                                  f"pip install 'sdmp-fast[{extra}]'", name=package)


def backend_option_defaults(backend: str) -> Dict[str, object]:
    """The defaults of a backend's constructor arguments (its own options among them); {} for a name that is not
    a backend or whose module cannot be imported here (FFCV not installed)."""
    spec = BACKENDS.get(backend)
    if spec is None:
        return {}
    module_name, cls_name = spec.split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        return {}
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_backend_options(backend: str, cls, options: dict) -> None:
    """An option the backend does not take is a ValueError naming it and what the backend takes (rather than a
    TypeError from deep inside the constructor); recipe settings such as the crop size belong to the recipe."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    common = set(inspect.signature(make_loader).parameters)
    by_name = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    own = sorted(n for n, p in params.items() if p.kind in by_name and n not in common | {"self", "data"})
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise ValueError(f"{backend} loader: unknown option(s) {', '.join(unknown)}; it takes "
                         f"{', '.join(own) or 'none'} besides make_loader's own (recipe settings such as size "
                         f"go to the recipe: make_recipe(name, size=...))")
    for name, value in options.items():
        _check_option_type(backend, name, value, params[name].annotation)


def _check_option_type(backend: str, name: str, value, annotation) -> None:
    """A backend option's value against its annotation (bool, int, dict; Optional: None too, and an int >= 0,
    0 or None being the default): a bad one was an AssertionError / TypeError deep in the constructor or in the
    DataLoader it makes, or was silently read ("off" as True)."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = "Optional" in ann or "None" in ann
    if value is None and optional:
        return
    if "bool" in ann:
        ok, want = isinstance(value, bool), "True or False"
    elif "int" in ann and "float" not in ann:
        low, high = 0 if optional else 1, OPTION_MAX.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high or value)
        want = f"an integer >= {low}" + (f" and <= {high}" if high else "")
    elif "dict" in ann:
        ok, want = isinstance(value, dict), "a dict"
    else:
        return
    if not ok:
        raise ValueError(f"{backend} loader: {name}: expected {want}{' or None' if optional else ''}, "
                         f"got {value!r}")


def _loader_device(device) -> torch.device:
    """``device`` (None: cuda when available, else cpu), refused with a ValueError naming it when it names a CUDA
    card this process cannot see (torch's own error came at the first tensor made there)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a device, {device!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} asked for, but this process sees no CUDA device "
                             f"(torch.cuda.is_available() is False)")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ValueError(f"device: {device} asked for, but this process sees {n} CUDA device(s) "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return device


def make_loader(backend: str, data, recipe: Union[str, Recipe] = "byol2", batch_size: int = 256, *,
                device: Optional[Union[str, torch.device]] = None, shard_id: Optional[int] = None,
                num_shards: Optional[int] = None, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                dtype: Optional[torch.dtype] = None, num_workers: Optional[int] = None,
                **backend_options) -> SDMPLoader:
    """One interface for every backend. ``device=None`` picks cuda when available, else cpu. Shards default to
    torch.distributed's rank / world size. Settings are validated here, before any data is read."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown loader backend {backend!r}; choose among {', '.join(BACKENDS)}")
    if not isinstance(recipe, Recipe):
        recipe = make_recipe(recipe)
    recipe.validate()
    max_pixels()  # a bad SDMP_MAX_IMAGE_PIXELS is named now, not as every file "undecodable" later
    batch_size = whole_number("batch_size", batch_size, 1)
    seed = whole_number("seed", seed)
    if recipe.mix.enabled and batch_size % 2:
        raise ValueError(f"batch_size {batch_size}: batch-flip mixing needs an even batch size "
                         f"(the middle image would be its own partner)")
    if (shard_id is None) != (num_shards is None):
        raise ValueError(f"shard_id / num_shards: give both or neither (got shard_id={shard_id}, "
                         f"num_shards={num_shards}; neither: torch.distributed's rank and world size)")
    auto_shard = shard_id is None
    if auto_shard:
        shard_id, num_shards = dist_shard()
    shard_id, num_shards = whole_number("shard_id", shard_id, 0), whole_number("num_shards", num_shards, 1)
    if shard_id >= num_shards:
        raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: the views are normalised floats: a floating torch dtype (float32, bfloat16, "
                         f"float16, ...; None: float32), got {dtype!r}")
    if num_workers is not None:
        num_workers = whole_number("num_workers", num_workers, 0, " (None: the backend's default)", MAX_WORKERS)
    device = _loader_device(device)
    module_name, cls_name = BACKENDS[backend].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        _check_backend_package(backend)  # FFCV's module imports FFCV: name the package and its extra
        raise
    _check_backend_options(backend, cls, backend_options)
    _check_backend_package(backend)  # DALI's imports DALI at its first batch, inside a run that wrote its --out
    loader = cls(data, recipe, batch_size, device=torch.device(device), shard_id=shard_id, num_shards=num_shards,
                 shuffle=shuffle, drop_last=drop_last, seed=seed, dtype=dtype, num_workers=num_workers,
                 **backend_options)
    loader._shard_from_dist = auto_shard
    return loader
