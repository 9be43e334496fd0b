"""Adapters: any sdmp-fast loader (an iterable of SDMPBatch with ``__len__`` / ``set_epoch``) in the batch
format another SSL trainer's loop expects, so a user swaps our loader in with a couple of lines. Every adapter
forwards ``len()`` and ``set_epoch()``; batches stay where the loader put them (already on the GPU for the
device backends), so the trainer's own ``.cuda(non_blocking=True)`` calls become no-ops.

DINO (``main_dino.py``) / MoCo v3 (``main_moco.py``): ``for images, _ in data_loader`` ::

    from sdmp_fast.pipelines import make_loader, adapters
    data_loader = adapters.as_dino(make_loader("dali", "/data/train", "dino", batch_size=64))
    for it, (images, _) in enumerate(data_loader): ...   # images = [global0, global1, local0, ...]

SDMP: ``with_mix_info=True`` appends the mixed views after the clean ones and yields a third item,
``{"lam", "method", "mixed_from", "num_clean", "indices", "mixed_lam"}`` (the last batch's info is also
``.mix_info``) ::

    for images, labels, mix in adapters.as_mocov3(loader, with_mix_info=True):
        clean, mixed = images[:mix["num_clean"]], images[mix["num_clean"]:]   # mixed[j] from clean[mixed_from[j]]

solo-learn (``[indexes, [crops...], targets]``, what its training_step unpacks) ::

    train_loader = adapters.as_solo_learn(make_loader("dali", "/data/train", "byol2", batch_size=256))
    trainer.fit(model, train_loader)   # training_step: indexes, crops, targets = batch

Stock solo-learn methods unpack three items and assert ``len(crops) == num_crops``: keep the default there. An
SDMP method of your own takes ``with_mix_info=True``'s fourth item (``indexes, crops, targets, mix = batch``;
not ``.mix_info``, which Lightning's prefetch makes one batch ahead of the step).

lightly (``MultiViewCollate``'s ``(views, targets, filenames)``; file names are relative to the data root when
the loader knows its file list or ``data=`` is given -- for an FFCV ``.beton``, the folder it was converted
from, less the files convert skipped -- else the dataset index as a string) ::

    for views, targets, fnames in adapters.as_lightly(loader, data="/data/train"):
        x0, x1 = views

A torch ``DataLoader`` look-alike (``len(dl.dataset)``, ``dl.batch_size``, ``dl.sampler.set_epoch(e)``,
``dl.drop_last``), wrapping a loader or any adapter above ::

    dl = adapters.as_dataloader(adapters.as_dino(loader))
    dl.sampler.set_epoch(epoch); for images, _ in dl: ...
"""
from __future__ import annotations

import operator
import os
import warnings
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from sdmp_fast.batch import SDMPBatch

from .base import EpochSampler, list_images, pass_from

__all__ = ["as_dino", "as_mocov3", "as_solo_learn", "as_lightly", "as_dataloader", "mix_info",
           "BatchAdapter", "DataLoaderLike"]


def mix_info(batch: SDMPBatch) -> Dict[str, Any]:
    """What an SDMP loss needs besides the images: per-sample lam and method, which clean view each mixed view
    came from, where the mixed views start in the appended list, and the dataset indices. ``mixed_lam``: lam
    per mixed view (exact for each size; ``lam`` is the first mixed view's)."""
    return {"lam": batch.lam, "method": batch.method, "mixed_from": tuple(batch.mixed_from),
            "num_clean": len(batch.views), "indices": batch.indices, "mixed_lam": list(batch.mixed_lam)}


def _images(batch: SDMPBatch, append_mixed: bool) -> List[torch.Tensor]:
    return list(batch.views) + (list(batch.mixed_views) if append_mixed else [])


def _check_loader(who: str, loader):
    """``loader`` itself when it can be one (iterable; a loop that needs no len, lightly's, may wrap one without);
    a path or None is a ValueError saying so (``as_dino("/data/train")`` had len 11, the string's, which DINO's
    schedules took, and failed at the first set_epoch with "'str' object has no attribute 'set_epoch'")."""
    if loader is None or isinstance(loader, (str, bytes, os.PathLike)):
        raise ValueError(f"{who}: expected a loader (make_loader(backend, data, recipe, batch_size) or a torch "
                         f"DataLoader), got {loader!r}")
    if not hasattr(type(loader), "__iter__"):
        raise ValueError(f"{who}: expected a loader (an iterable of batches), got a {type(loader).__name__}")
    return loader


class _KeeperMethod:
    """``keeper.<name>(...)``, holding the keeper weakly. A bound method stored on the wrapper itself (the
    keeper of its own position) made a reference cycle: a dropped adapter and its loader lived on until the
    cyclic collector ran, and with them the loader's worker processes, threads, FFCV's compiled pipeline and
    DALI's device memory (a torchvision loader's collection then stalled 10 s and left its workers' temp dirs)."""

    __slots__ = ("_keeper", "_name")

    def __init__(self, keeper, name: str):
        self._keeper, self._name = weakref.ref(keeper), name

    def __reduce__(self):  # pickle (Lightning's ddp_spawn) and deepcopy: the copy's own keeper, held weakly again
        return _KeeperMethod, (self._keeper(), self._name)

    def __call__(self, *args, **kwargs):
        keeper = self._keeper()
        if keeper is None:
            raise ReferenceError(f"{self._name.lstrip('_')}: the adapter that kept this loader's position is gone")
        return getattr(keeper, self._name)(*args, **kwargs)


class _Wrapper:
    """What every wrapper of a loader forwards: len, set_epoch and any attribute it does not define itself
    (``.batch_size``, ``.recipe``, ``.mix_info``, ``.skipped`` ...).

    Over an sdmp-fast loader it is also resumable mid-epoch (``state_dict`` / ``load_state_dict``, the protocol
    Lightning checks to restore a loader, as torchdata's StatefulDataLoader): the state holds the epoch and the
    batches of it handed out so far (and the DALI loader's own state); after ``load_state_dict`` the next pass
    begins with the batch after them, the one the interrupted run would have trained on next. A caller that
    reads ahead must save its state before (Lightning reads no batch ahead of a loader that has a length)."""

    loader: Any
    _resume: Optional[Dict[str, int]] = None  # from load_state_dict: where the next pass of that epoch begins
    _at: Optional[List[int]] = None  # [epoch, batches handed out] of the pass being read

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if self._position_keeper() is self:  # the position of another epoch is not this one's: state_dict() said
            self._at = None                   # the last pass's after an early end or a whole pass, which a resume
            if self._resume is not None and self._resume["epoch"] != epoch:  # then continued, not this epoch
                self._resume = None
        own = getattr(self.loader, "set_epoch", None)
        if callable(own):
            own(epoch)
            return
        # a torch DataLoader has no set_epoch: its sampler may (DistributedSampler), as Lightning and DINO call it;
        # a sampler without one (RandomSampler) has nothing to set, and Lightning skips it too
        sampler_set = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if callable(sampler_set):
            sampler_set(epoch)

    def __getattr__(self, name):  # only reached for attributes not found on the wrapper itself
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    # -- mid-epoch resume: kept by the wrapper of the loader itself; wrappers of wrappers pass it on ---------
    def _position_keeper(self) -> Optional["_Wrapper"]:
        inner = self.loader
        if isinstance(inner, _Wrapper):
            return inner._position_keeper()
        return self if isinstance(getattr(inner, "sampler", None), EpochSampler) else None

    def _init_position(self) -> None:
        """Called once ``self.loader`` is set. Over an sdmp-fast loader, ``state_dict`` / ``load_state_dict`` are
        the position's, set on the instance; over another loader (a torch DataLoader) the wrapper has none, so
        Lightning does not take it for a loader it can restore (its check would find a method on the class even
        where the wrapped loader has none)."""
        keeper = self._position_keeper()
        if keeper is not None:
            self.state_dict = _KeeperMethod(keeper, "_state")
            self.load_state_dict = _KeeperMethod(keeper, "_load_state")

    def _state(self) -> Dict[str, Any]:
        """``{"epoch", "batches", "num_batches", "shard", "loader"}``: the pass being read (or the position
        loaded and not yet used, or the start of the next pass when none was begun)."""
        sampler = self.loader.sampler
        if self._resume is not None:
            epoch, done = self._resume["epoch"], self._resume["batches"]
        elif self._at is not None:
            epoch, done = self._at
        else:
            epoch, done = sampler.upcoming_epoch(), 0
        own = getattr(self.loader, "state_dict", None)
        return {"epoch": int(epoch), "batches": int(done), "num_batches": len(self.loader),
                "shard": [sampler.shard_id, sampler.num_shards], "loader": own() if callable(own) else None}

    def _load_state(self, state: Dict[str, Any]) -> None:
        keys = ("epoch", "batches", "num_batches", "shard", "loader")
        own = getattr(self.loader, "load_state_dict", None)
        if isinstance(state, dict) and "dali_epoch_starts" in state and callable(own):
            own(state)  # the DALI loader's own state_dict(), as the adapters forwarded before they kept a position
            return
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ValueError(f"load_state_dict: not an sdmp-fast adapter state_dict() (expected the keys {keys}, "
                             f"got {list(state)[:6] if isinstance(state, dict) else type(state).__name__})")
        epoch, done, total = (state[k] for k in ("epoch", "batches", "num_batches"))
        if not all(isinstance(v, int) and v >= 0 for v in (epoch, done, total)):
            raise ValueError(f"load_state_dict: epoch, batches and num_batches must be integers >= 0, got "
                             f"{epoch!r}, {done!r}, {total!r}")
        if total != len(self.loader):
            raise ValueError(f"load_state_dict: the state was saved by a loader of {total} batches per epoch, this "
                             f"one makes {len(self.loader)} (another data set, batch size or number of ranks): its "
                             f"position would name other batches")
        sampler = self.loader.sampler
        if state["loader"] is not None and callable(own):
            if list(state["shard"]) == [sampler.shard_id, sampler.num_shards]:
                own(state["loader"])
            else:  # Lightning saves rank 0's state only; DALI's random state is per shard
                warnings.warn(f"load_state_dict: the loader state was saved by shard {state['shard'][0]} of "
                              f"{state['shard'][1]}, this loader reads shard {sampler.shard_id} of "
                              f"{sampler.num_shards}: its position is kept, its random state is not restored "
                              f"(crops and colours will differ from the saved run's)")
        self._at = None
        if done >= total:  # the saved pass was whole: the next one is the next epoch
            self._resume = None
            self.loader.set_epoch(epoch + 1)
        else:
            self._resume = {"epoch": epoch, "batches": done} if done else None
            self.loader.set_epoch(epoch)

    def _batches(self) -> Iterator:
        """A pass of the wrapped loader, begun at the first ``next`` (not at ``iter``: Lightning calls iter()
        once to check a loader and drops it), from the position ``load_state_dict`` gave for its epoch."""
        if self._position_keeper() is not self:
            yield from self.loader
            return
        base = self.loader
        epoch = base.sampler.upcoming_epoch()
        skip = self._resume["batches"] if self._resume is not None and self._resume["epoch"] == epoch else 0
        self._resume = None
        self._at = at = [epoch, skip]
        for batch in pass_from(base, skip):
            at[1] += 1
            yield batch


_NO_DATASET = ("{}.dataset: the wrapped loader does not tell its sample count; use "
               "adapters.as_dataloader(adapter, dataset_size=...)")


class BatchAdapter(_Wrapper):
    """Wraps a loader; ``convert(batch)`` gives one batch in the target format. ``.sampler`` is a DataLoader's
    (``set_epoch``, ``len`` = samples of this shard, iterating gives them); ``len(.dataset)`` is the whole data
    set's sample count (solo-learn's DeepClusterV2 sizes its memory from ``trainer.train_dataloader.dataset``)."""

    _maker = "BatchAdapter"  # the function the user called, for error messages

    def __init__(self, loader, with_mix_info: bool = False, append_mixed: Optional[bool] = None):
        self.loader = _check_loader(self._maker, loader)
        self._init_position()
        self.with_mix_info = with_mix_info
        # Mixed views without their lam are unusable by any loss, so by default they come only with the info.
        self.append_mixed = with_mix_info if append_mixed is None else append_mixed
        self.mix_info: Optional[Dict[str, Any]] = None

    @property
    def sampler(self) -> "_SamplerView":
        return _SamplerView(self)

    @property
    def dataset(self):
        own = getattr(self.loader, "dataset", None)
        if own is not None:  # a torch DataLoader's, as_dataloader's: what the adapter forwarded before it had one
            return own
        size = _dataset_size(_base_loader(self.loader))
        if size is None:
            raise AttributeError(_NO_DATASET.format(type(self).__name__))
        return _DatasetView(size)

    def __getattr__(self, name):
        if name == "dataset":  # reached when the property above raised: keep its message, not the loader's
            raise AttributeError(_NO_DATASET.format(type(self).__name__))
        return super().__getattr__(name)

    def __iter__(self) -> Iterator:
        for batch in self._batches():
            if not isinstance(batch, SDMPBatch):
                raise TypeError(f"{type(self).__name__}: the wrapped loader yielded {type(batch).__name__}, "
                                f"expected SDMPBatch")
            self.mix_info = mix_info(batch)
            yield self.convert(batch)

    def convert(self, batch: SDMPBatch):
        raise NotImplementedError


class _DinoAdapter(BatchAdapter):
    _maker = "as_dino / as_mocov3"

    def convert(self, batch: SDMPBatch):
        images = _images(batch, self.append_mixed)
        if self.with_mix_info:
            return images, batch.labels, self.mix_info
        return images, batch.labels


class _SoloLearnAdapter(BatchAdapter):
    _maker = "as_solo_learn"

    def convert(self, batch: SDMPBatch):
        out = [batch.indices, _images(batch, self.append_mixed), batch.labels]
        if self.with_mix_info:
            out.append(self.mix_info)
        return out


class _LightlyAdapter(BatchAdapter):
    _maker = "as_lightly"

    def __init__(self, loader, filenames: Optional[Sequence[str]] = None, **kw):
        super().__init__(loader, **kw)
        self.filenames = filenames

    def convert(self, batch: SDMPBatch):
        idx = batch.indices.tolist()  # one small host copy per batch, only this format needs it
        names = [self.filenames[i] for i in idx] if self.filenames is not None else [str(i) for i in idx]
        out = (_images(batch, self.append_mixed), batch.labels, names)
        return out + (self.mix_info,) if self.with_mix_info else out


def as_dino(loader, with_mix_info: bool = False, append_mixed: Optional[bool] = None) -> BatchAdapter:
    """``(list_of_views, labels)`` per batch, DINO's format; with ``with_mix_info`` the mixed views are appended
    and ``(views, labels, mix_info)`` is yielded. ``append_mixed`` overrides whether mixed views are appended."""
    return _DinoAdapter(loader, with_mix_info, append_mixed)


def as_mocov3(loader, with_mix_info: bool = False, append_mixed: Optional[bool] = None) -> BatchAdapter:
    """MoCo v3's ``images, _`` loop reads the same format as DINO's: ``images[0]``, ``images[1]`` are the views."""
    return _DinoAdapter(loader, with_mix_info, append_mixed)


def as_solo_learn(loader, with_mix_info: bool = False, append_mixed: Optional[bool] = None) -> BatchAdapter:
    """``[indexes, [crops...], targets]`` per batch (solo-learn), ``+ [mix_info]`` with ``with_mix_info`` (for an
    SDMP method's own training_step: stock methods unpack three items; see the module docstring)."""
    return _SoloLearnAdapter(loader, with_mix_info, append_mixed)


def _loader_files(loader):
    """The loader's ImageList, if it keeps one under a usual name."""
    for attr in ("images", "image_list", "data"):
        value = getattr(loader, attr, None)
        if value is not None and hasattr(value, "files") and hasattr(value, "root"):
            return value
    return None


def _skipped_by_convert(files: Sequence[str], root: str, skipped: Sequence[str]) -> set:
    """The ``files`` (of the folder at ``root``) that ``convert`` left out of a .beton. Its list holds the paths
    it was given: relative to where it ran, or absolute, possibly before the data moved; so a skipped path names
    the file of the same path, else one of the same real path (links to one undecodable file are each skipped),
    else the file whose path below ``root`` is its longest tail ("a/b/x.jpg" of class a, not class b's
    "b/x.jpg", which is a tail too)."""
    by_path = {os.path.abspath(f): f for f in files}
    by_real: Dict[str, List[str]] = {}  # several files of one real path: links to one file, each listed
    for f in files:
        by_real.setdefault(os.path.realpath(f), []).append(f)
    by_rel = {os.path.relpath(f, root).replace(os.sep, "/"): f for f in files}
    gone = set()
    for p in skipped:
        f = by_path.get(os.path.abspath(p))  # convert lists absolute paths: the same path, where it still is
        if f is None or f in gone:
            f = next((g for g in by_real.get(os.path.realpath(p), ()) if g not in gone), None)
        if f is None:
            parts = os.path.normpath(p).replace(os.sep, "/").split("/")
            f = next((by_rel[t] for t in ("/".join(parts[k:]) for k in range(len(parts))) if t in by_rel), None)
        if f is not None:
            gone.add(f)
    return gone


def _relative_names(files: Sequence[str], root: str) -> List[str]:
    """Names relative to ``root`` (a folder, or a file list's own folder), or, when a file list names files
    outside its folder ("../images/a.jpg"), to the deepest folder holding them all."""
    names = [os.path.relpath(f, root) for f in files]
    if files and any(n == os.pardir or n.startswith(os.pardir + os.sep) for n in names):
        common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        names = [os.path.relpath(os.path.abspath(f), common) for f in files]
    return names


def as_lightly(loader, data=None, with_mix_info: bool = False,
               append_mixed: Optional[bool] = None) -> BatchAdapter:
    """``(views, targets, filenames)`` per batch, as lightly's MultiViewCollate gives. ``data`` (the folder or
    file list the loader reads) names the files; without it the loader's own file list is used if it exposes
    one, else the names are the dataset indices as strings. Names are relative to the folder, or for a file
    list to its own folder, or to the deepest folder holding all its files when some lie outside that."""
    base = _base_loader(_check_loader("as_lightly", loader))
    own = _loader_files(base)
    images = list_images(data, check_files=False) if data is not None else own
    names = None
    if images is not None:
        files = list(images.files)
        if data is not None and own is not None and \
                [os.path.realpath(f) for f in own.files] != [os.path.realpath(f) for f in files]:
            raise ValueError(f"as_lightly: data {data!r} lists other files, or the same in another order, than the "
                             f"loader reads ({len(files)} vs {len(own.files)}): its names would be other samples'; "
                             f"leave data out (the loader's own list names them)")
        from .ffcv_loader import FFCVLoader  # imports no ffcv

        if data is not None and (isinstance(base, FFCVLoader) or str(getattr(base, "path", "")).endswith(".beton")):
            # a .beton holds the folder's files in list order less those convert skipped: its index is there
            gone = _skipped_by_convert(files, images.root, base.skipped)
            files = [f for f in files if f not in gone]
        total = getattr(getattr(base, "sampler", None), "num_samples", None)
        if total is not None and total != len(files):
            raise ValueError(f"as_lightly: data {data!r} lists {len(files)} files but the loader reads {total} "
                             f"samples: pass the folder or file list the loader was made from")
        names = _relative_names(files, images.root)
    return _LightlyAdapter(loader, filenames=names, with_mix_info=with_mix_info, append_mixed=append_mixed)


class _SamplerView:
    """``dl.sampler``: ``set_epoch`` reaches the loader (torch's DistributedSampler pattern); iterating gives
    this shard's sample indices in the order the next pass will take them (the epoch set, or the one after the
    last pass when set_epoch was not called since) when the loader exposes its EpochSampler."""

    def __init__(self, owner: "DataLoaderLike"):
        self._owner = owner  # made on each access of owner.sampler, never stored there: no reference cycle

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def _sampler(self) -> Optional[EpochSampler]:
        base = _base_loader(self._owner.loader)
        follow = getattr(base, "_follow_dist", None)
        if callable(follow):  # the shard of a process group initialised since the loader was made
            follow()
        s = getattr(base, "sampler", None)
        return s if isinstance(s, EpochSampler) else None

    def __len__(self) -> int:
        s = self._sampler()
        if s is not None:
            return len(s.indices())
        return len(self._owner) * self._owner.batch_size

    def __iter__(self) -> Iterator[int]:
        s = self._sampler()
        if s is None:
            raise TypeError("this loader does not expose its sample order (no EpochSampler at .sampler)")
        return iter(s.indices(s.upcoming_epoch()).tolist())


class _DatasetView:
    """``dl.dataset``: only its length (the whole data set, every shard) is meaningful."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples


def _base_loader(loader):
    while isinstance(loader, _Wrapper):
        loader = loader.loader
    return loader


def _probe_int(loader, *attrs) -> Optional[int]:
    for attr in attrs:
        obj = loader
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            continue
        try:
            return len(obj) if not isinstance(obj, int) else obj
        except TypeError:
            continue
    return None


def _dataset_size(base) -> Optional[int]:
    """The whole data set's sample count (every shard), as the loader tells it; None when it does not. A torch
    DataLoader's ``.dataset``; a sampler's ``num_samples`` only when it is the whole set (an EpochSampler's): a
    torch DistributedSampler's is one replica's share, its ``.dataset`` the whole set."""
    sampler = getattr(base, "sampler", None)
    distributed = not isinstance(sampler, EpochSampler) and getattr(sampler, "num_replicas", None) is not None
    return _probe_int(base, "num_samples", "dataset", "sampler.dataset" if distributed else "sampler.num_samples",
                      "images", "image_list")


def _setting(name: str, given, known: Optional[int], what: str) -> Optional[int]:
    """``given`` (an as_dataloader argument): a positive integer, and the loader's own value when it tells one."""
    if given is None:
        return known
    try:  # numpy / torch integers too (a size computed with numpy), as before sizes were checked
        value = operator.index(given) if not isinstance(given, bool) else None
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"as_dataloader: {name} must be a positive integer, got {given!r}")
    given = value
    if known is not None and given != known:
        raise ValueError(f"as_dataloader: {name}={given} but the loader {what} {known}: leave {name} out (it is "
                         f"only for a loader that does not tell it)")
    return given


class DataLoaderLike(_Wrapper):
    """What training scripts read off a torch DataLoader: iteration, ``len``, ``.dataset`` (length),
    ``.batch_size``, ``.sampler.set_epoch``, ``.drop_last``, ``.num_workers``. Yields what the wrapped object
    yields (SDMPBatch for a bare loader, the adapter's format for an adapter)."""

    def __init__(self, loader, dataset_size: Optional[int] = None, batch_size: Optional[int] = None):
        self.loader = _check_loader("as_dataloader", loader)
        self._init_position()
        base = _base_loader(loader)
        self.batch_size = _setting("batch_size", batch_size, _probe_int(base, "batch_size", "sampler.batch_size"),
                                   "makes batches of")
        if self.batch_size is None:
            raise ValueError("as_dataloader: the loader exposes no batch_size; pass batch_size=")
        size = _setting("dataset_size", dataset_size, _dataset_size(base), "reads a data set of")
        self.dataset = _DatasetView(size if size is not None else len(loader) * self.batch_size)
        sampler = getattr(base, "sampler", None)
        self.drop_last = getattr(base, "drop_last", getattr(sampler, "drop_last", True))
        self.num_workers = getattr(base, "num_workers", 0) or 0
        self.pin_memory = False

    @property
    def sampler(self) -> _SamplerView:
        return _SamplerView(self)  # a view made per access: stored on self, it held self (a reference cycle)

    def __iter__(self):
        # a generator, as BatchAdapter's: iter(dl) alone begins no pass of the loader (Lightning calls iter() once
        # on a non-DataLoader to check it is iterable and drops it: DALI's eager pass began there, and consumed
        # the state load_state_dict restored; skip_batches(k) set before was consumed too)
        yield from self._batches()


def as_dataloader(loader, dataset_size: Optional[int] = None, batch_size: Optional[int] = None) -> DataLoaderLike:
    """A DataLoader-like view of a loader or an adapter (``dataset_size`` / ``batch_size`` only when the loader
    does not expose them)."""
    return DataLoaderLike(loader, dataset_size, batch_size)
