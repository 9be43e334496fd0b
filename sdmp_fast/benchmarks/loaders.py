"""`sdmp-fast bench loaders`: images/sec of every loader backend in one run, same recipe, same data, same batch.

A sample counts once however many views it has (img/s = samples/s, each sample = all its views, mixed ones
included). Each backend is built, warmed up for ``--warmup`` batches (worker start-up, pipeline build, JIT and
cuDNN autotune happen there), then timed over ``--batches`` batches (torchvision's: whole rounds of its
workers, ``whole_rounds``), running on across epochs (set_epoch) when the data set is smaller than that. On a
GPU the run also times a synthetic "data already on the device" source
(random device tensors of the recipe's shapes through the same ``assemble_batch`` mixing): the ceiling a loader
can approach, and the ratio every backend is reported against. FFCV reads a .beton: the data is converted first
(untimed) and cached under ``--cache`` (default: beside the JSON). A backend that cannot be imported or built
is reported as unavailable with the reason; one that fails while running is reported as failed (with
``--repeats``, a failure in any round makes the record failed). Each record also names what the backend really
ran: ``num_workers`` (its workers / threads), ``interpolation`` (its crop resize filter), ``beton`` (FFCV: the
.beton's size cap and JPEG quality) and ``load_avg_1m`` (a busy machine is warned about).

Variants (``VARIANTS``) are extra names for a backend with options, timed like any backend and recorded under
their own name: ``dali-graphmix`` is the DALI backend mixing inside its graph (``mix_in_graph=True``), to set
against ``dali`` (mixing by ``assemble_batch`` on DALI's output) in the same run; ``dali-torchphoto`` is DALI
decoding and cropping, then torchvision's exact colour ops by ``device_ops`` (``photometric="torch"``), to set
the price of that fidelity against ``dali``'s own colour ops.

Baselines (``baselines.BASELINES``) are the pipelines the issues' anchors were measured with, timed the same
way: ``dali-solo-learn`` (solo-learn's DALI pipeline style, no mixing; every record then also gets
``ratio_vs_solo_learn``) and ``decode-only`` (nvJPEG decode of in-memory bytes, GPU only).

    sdmp-fast make-data /data/photos --num-images 512
    sdmp-fast bench loaders --data /data/photos --backends torchvision,dali,ffcv,torch-gpu --batch-size 64
    sdmp-fast bench loaders --data /data/photos --backends dali,dali-graphmix
    sdmp-fast bench loaders --data /data/photos --backends dali-solo-learn,dali,decode-only
"""
from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import os
import re
import sys
import time
import traceback
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from sdmp_fast.benchmarks.baselines import BASELINES, make_baseline
from sdmp_fast.benchmarks.common import check_output_path, print_table, report_interrupted, write_results
from sdmp_fast.pipelines.base import MAX_WORKERS, loader_threads, usable_cores
from sdmp_fast.pipelines.convert import DEFAULT_JPEG_QUALITY

REFERENCE = "torchvision"
SYNTHETIC = "synthetic"
SOLO_LEARN = "dali-solo-learn"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name -> (backend, options): a backend run with options, recorded under its own name.
VARIANTS = {"dali-graphmix": ("dali", {"mix_in_graph": True}),
            "dali-torchphoto": ("dali", {"photometric": "torch"})}
COLUMNS = ["backend", "status", "img_per_s", "ratio_vs_torchvision", "ratio_vs_solo_learn", "ratio_vs_synthetic",
           "cpu_cores", "cpu_ms_per_img", "gpu_peak_mb", "gpu_used_mb", "batches", "startup_s", "reason"]


def device_tag(device: torch.device) -> str:
    """Short name for file names: the GPU model (``h100``) or ``cpu<cores>``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu{os.cpu_count()}"


def default_json_path(recipe: str, device: torch.device) -> str:
    date = _dt.date.today().strftime("%Y%m%d")
    return os.path.join("bench", "results", f"loaders-{recipe}-{device_tag(device)}-{date}.json")


def _data_key(data: str, images) -> str:
    """Identifies the data set's content cheaply (paths, sizes, mtimes), so a stale .beton is never reused."""
    h = hashlib.sha256(os.path.realpath(data).encode())
    for f in images.files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def beton_for(data: str, images, cache_dir: str, max_side: int, workers: int) -> str:
    """The .beton of ``data`` in ``cache_dir``, converted once (not timed by the benchmark)."""
    from sdmp_fast.pipelines.convert import convert

    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(data)) or "data"
    path = os.path.join(cache_dir, f"{name}-{_data_key(data, images)}-{max_side}.beton")
    if not os.path.exists(path):
        # a bench on another node of a shared checkout may be converting the same set: wait for it, then use its
        # .beton (convert itself refuses a second writer)
        from sdmp_fast.paths import lock_exclusive, release_removing, sibling_lock_path

        lock = lock_exclusive(sibling_lock_path(path) + ".bench", wait=True)
        try:
            if not os.path.exists(path):
                print(f"bench loaders: converting {data} to {path} (not timed)")
                convert(data, path, max_side=max_side, workers=workers, progress=False)  # its default JPEG quality
        finally:
            release_removing(lock)
    return path


def resize_filter(backend: str, interpolation: str) -> Optional[str]:
    """The crop resize filter ``backend`` really applies for the recipe's ``interpolation`` (README, Loaders): FFCV
    always resamples with its own resizer, the device ops do not antialias, PIL and DALI do; decode-only crops
    nothing."""
    backend = VARIANTS.get(backend, (backend, {}))[0]
    if backend in ("decode-only", SYNTHETIC):
        return None
    if backend == "ffcv":
        return "area (FFCV's OpenCV resizer, whatever --interpolation)"
    if backend in ("torch-gpu", "memory"):
        return f"{interpolation}, no antialiasing"
    return f"{interpolation}, antialiased"


def beton_note(path: str, max_side: int) -> Dict:
    """What the FFCV backend decodes instead of the source files: the .beton's JPEGs, re-encoded by ``convert``
    (its ``DEFAULT_JPEG_QUALITY``) with the longest side capped at ``max_side``. ``at_max_side`` counts the stored
    images whose longest side is the cap: the downscaled ones (which the other backends decode at their full
    size) and any of exactly that size."""
    from ffcv.reader import Reader

    reader = Reader(path)
    meta = reader.metadata[f"f{list(reader.handlers).index('image')}"]  # FFCV names the fields f0, f1, ...
    longest = np.maximum(meta["height"], meta["width"]) if len(meta) else np.zeros(0)
    return {"max_side": max_side, "jpeg_quality": DEFAULT_JPEG_QUALITY,
            "at_max_side": int((longest == max_side).sum()) if max_side else 0}


# backends that cannot read --data's image files (their row was always "unavailable")
NOT_FROM_FILES = {"memory": "reads a tensor or 'fashion-mnist', not image files; `bench e2e --loader memory` times it"}


def endless_batches(loader) -> Iterator:
    """Batches across epoch boundaries, reshuffling like a training loop does."""
    if len(loader) == 0:
        raise ValueError("the loader yields no batch per epoch (data smaller than the batch size?)")
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        got = 0
        for batch in loader:
            got += 1
            yield batch
        if got == 0:  # every file undecodable, say: the next epoch would give none either (was an endless loop)
            raise ValueError(f"epoch {epoch} gave no batch (every file undecodable?)")
        epoch += 1


def default_backends(device: torch.device) -> str:
    """Every loader, beside the pipelines of the issues' anchors (nvJPEG decode-only needs a GPU)."""
    names = ["torchvision", "dali-solo-learn", "dali", "ffcv", "torch-gpu"]
    return ",".join(names + (["decode-only"] if device.type == "cuda" else []))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> Optional[float]:
    """CPU time (user + system) so far of this process (all its threads: DALI's, nvJPEG's, the readers') and of
    its child processes (DataLoader workers), live or already waited for; None without psutil. A child that has
    exited but is not yet waited for is missed until it is."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    done = os.times()  # children already waited for: a worker that exits in the window still counts
    total = sum(me.cpu_times()[:2]) + done.children_user + done.children_system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # gone meanwhile
            pass
    return total


def time_batches(batches: Iterator, warmup: int, count: int, device: torch.device) -> Dict:
    """Pull ``warmup`` then ``count`` batches; samples/s over the timed ones (device work included), and the
    CPU the loader spent on them: ``cpu_cores`` (CPU seconds per second, every process of the loader) and
    ``cpu_ms_per_img`` (what a GPU loader leaves to the rest of the job)."""
    t0 = time.perf_counter()
    first = next(batches)
    startup = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        next(batches)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = 0
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for _ in range(count):
        samples += next(batches).batch_size
    _sync(device)
    seconds = time.perf_counter() - t0
    cpu = None if cpu0 is None else cpu_seconds() - cpu0
    # device memory while timed: PyTorch's allocator peak (our buffers, decoded and augmented batches) and the
    # device's whole use at the end (also DALI's and nvJPEG's own pools, which PyTorch does not see)
    peak_mb = used_mb = None
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        free, total = torch.cuda.mem_get_info(device)
        used_mb = (total - free) / 2**20
    return {"img_per_s": samples / seconds, "seconds": seconds, "samples": samples, "startup_s": startup,
            "cpu_cores": None if cpu is None else cpu / seconds,
            "cpu_ms_per_img": None if cpu is None else 1e3 * cpu / samples,
            "gpu_peak_mb": peak_mb, "gpu_used_mb": used_mb,
            "views": [list(v.shape[1:]) for v in first.views], "num_mixed_views": len(first.mixed_views),
            "out_dtype": str(first.views[0].dtype).replace("torch.", ""), "out_device": str(first.labels.device)}


def synthetic_batches(recipe, batch_size: int, device: torch.device, dtype: Optional[torch.dtype],
                      seed: int) -> Iterator:
    """'Data already on the device': fresh random views of the recipe's shapes, mixed by assemble_batch."""
    from sdmp_fast.pipelines.base import assemble_batch, make_generator

    g = make_generator(seed, 0, 0, device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    indices = torch.arange(batch_size, device=device)
    shapes = [(batch_size, 3, v.size, v.size) for v in recipe.expanded_views()]
    while True:
        views = [torch.randn(s, generator=g, device=device, dtype=dtype or torch.float32) for s in shapes]
        yield assemble_batch(views, labels, indices, recipe, g)


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def run_backend(backend: str, args, recipe, images, device: torch.device, dtype) -> Dict:
    """One backend's record: built, warmed up and timed, or the reason it could not be."""
    from sdmp_fast.pipelines.base import make_loader

    record = {"backend": backend, "status": "ok", "reason": None}
    backend, options = VARIANTS.get(backend, (backend, {}))
    try:
        if backend in BASELINES:
            t0 = time.perf_counter()
            batches = make_baseline(backend, images, recipe, args.batch_size, device, dtype, args.num_workers,
                                    args.seed, max_files=(args.warmup + args.batches) * args.batch_size)
            built = time.perf_counter() - t0  # built eagerly: start-up = build + first batch, as for a loader
            record["num_workers"] = loader_threads(args.num_workers) if backend == SOLO_LEARN else None
            record = _timed(record, batches, args, device)
            if "startup_s" in record:
                record["startup_s"] += built
            return record
        data = args.data
        if backend == "ffcv":
            cache = args.cache or os.path.dirname(os.path.abspath(args.json))
            data = beton_for(args.data, images, cache, args.max_side, args.num_workers or usable_cores())
            record["beton"] = beton_note(data, args.max_side)
        loader = make_loader(backend, data, recipe, args.batch_size, device=device, shard_id=0, num_shards=1,
                             shuffle=True, drop_last=True, seed=args.seed, dtype=dtype, num_workers=args.num_workers,
                             **options)
    except Exception as e:  # missing library, unsupported device, conversion failure: report, go on
        record.update(status="unavailable", reason=_reason(e))
        if args.verbose:
            traceback.print_exc()
        return record
    # the workers / threads the loader actually runs (DALI's pool is num_threads)
    record["num_workers"] = getattr(loader, "num_workers", getattr(loader, "num_threads", args.num_workers))
    try:
        return _timed(record, endless_batches(loader), args, device, whole_rounds(backend, record["num_workers"],
                                                                                  args.batches))
    finally:
        del loader
        gc.collect()  # drop worker processes / DALI pipelines before the next backend starts


def whole_rounds(backend: str, workers: Optional[int], batches: int) -> int:
    """Timed batches for ``backend``: ``batches``, rounded up to whole rounds of the torchvision loader's workers.
    Its worker processes each prepare a whole batch, in step from their common start, so batches come in groups
    of ``workers``: a count that splits a group times a group's batches already waiting at the start without the
    time they took (20 batches from 16 workers in step: 13 free ones, 25% over the true rate)."""
    if backend != "torchvision" or not workers or workers < 2:
        return batches
    return -(-batches // workers) * workers


def _timed(record: Dict, batches: Iterator, args, device: torch.device, count: Optional[int] = None) -> Dict:
    """``record`` with the timing of ``count`` (default ``--batches``) of ``batches``, or status "failed" and
    the reason."""
    count = count or args.batches
    try:
        record.update(time_batches(batches, args.warmup, count, device))
        record["batches"] = count
    except Exception as e:
        record.update(status="failed", reason=_reason(e))
        if args.verbose:
            traceback.print_exc()
    finally:
        if hasattr(batches, "close"):
            batches.close()  # a generator's cleanup (DALI pipeline, device buffers) now, not at the next gc
        gc.collect()
    return record


def measure_rounds(backends: List[str], args, recipe, images, device: torch.device,
                   dtype) -> Tuple[List[Dict], bool]:
    """``--repeats`` rounds over the backends in turn (so a busy neighbour slows every backend alike, not just
    one); each backend's record keeps the median round (of an even count the slower middle one, so that two
    rounds report the worse, not the best) and every round's img/s. Ctrl-C ends the rounds early: the records
    are then those of the rounds that finished (a backend not reached has none); returns (records, interrupted)."""
    rounds: Dict[str, List[Dict]] = {b: [] for b in backends}
    interrupted = False
    try:
        for _ in range(args.repeats):
            for b in backends:
                if rounds[b] and rounds[b][-1]["status"] != "ok":
                    continue  # unavailable / failed once: not retried
                rec = run_backend(b, args, recipe, images, device, dtype)
                rec["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
                rounds[b].append(rec)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted (Ctrl-C): keeping the rounds that finished", file=sys.stderr, flush=True)
    records = []
    for b in (b for b in backends if rounds[b]):
        ok = sorted((r for r in rounds[b] if r["status"] == "ok"), key=lambda r: r["img_per_s"])
        if len(ok) == len(rounds[b]):
            rec = dict(ok[(len(ok) - 1) // 2])  # an even count: the slower middle round (2 rounds: not the best)
        else:  # a round that failed (or could not build) makes the backend's record that failure, not its ok rounds'
            rec = dict(rounds[b][-1])
            if args.repeats > 1:
                rec["reason"] = f"round {len(rounds[b])} of {args.repeats}: {rec['reason']}"
            for key in ("img_per_s", "seconds", "samples"):
                rec.pop(key, None)
        rec["rounds_img_per_s"] = [r["img_per_s"] for r in rounds[b] if r["status"] == "ok"]
        records.append(rec)
    return records, interrupted


def bar_chart(records: List[Dict], path: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["backend"] for r in records]
    values = [r.get("img_per_s") or 0.0 for r in records]
    fig, ax = plt.subplots(figsize=(1.3 * len(records) + 2.5, 4.2))
    # references and the anchors' pipelines grey, the synthetic ceiling purple, our loaders blue
    colors = ["0.55" if n == REFERENCE or n in BASELINES else "tab:purple" if n == SYNTHETIC else "tab:blue"
              for n in names]
    bars = ax.bar(names, values, color=colors)
    top = max(values) if any(values) else 1.0
    for bar, r in zip(bars, records):
        if r.get("img_per_s"):
            ratio = r.get("ratio_vs_torchvision")
            rate = r["img_per_s"]
            solo = r.get("ratio_vs_solo_learn") if r["backend"] != SOLO_LEARN else None
            label = ((f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}")
                     + (f"\n{ratio:.2f}x tv" if ratio is not None else "")
                     + (f"\n{solo:.2f}x solo-learn" if solo is not None else ""))
        else:
            label = r["status"]
            bar.set_height(top * 0.02)
            bar.set_hatch("//")
            bar.set_color("0.85")
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), label, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images/s (samples, all views)")
    ax.set_ylim(0, top * 1.22)
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from sdmp_fast.plot import save_figure

    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> Dict:
    from sdmp_fast.pipelines.base import BACKENDS, list_images
    from sdmp_fast.pipelines.recipes import make_recipe

    from sdmp_fast.config import device_setting

    device = torch.device(device_setting(args.device))  # ValueError naming --device (cuda without a GPU, ...)
    backends = list(dict.fromkeys(b.strip() for b in (args.backends or default_backends(device)).split(",")
                                  if b.strip()))  # a name given twice: still one record (and one round each)
    known = [b for b in list(BACKENDS) + list(VARIANTS) + list(BASELINES) if b not in NOT_FROM_FILES]
    unknown = [b for b in backends if b not in known]
    if unknown or not backends:
        why = (f" ({', '.join(f'{b}: {NOT_FROM_FILES[b]}' for b in unknown if b in NOT_FROM_FILES)})"
               if any(b in NOT_FROM_FILES for b in unknown) else "")
        raise ValueError(f"--backends: unknown {unknown or backends}{why}; choose among {', '.join(known)}")
    for name in ("batch_size", "batches", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.num_workers is not None and not 0 <= args.num_workers <= MAX_WORKERS:
        raise ValueError(f"--num-workers: must be >= 0 and <= {MAX_WORKERS} (0: none, or one thread where a loader "
                         f"needs one), got {args.num_workers}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: choose among {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.size is not None and args.size < 8:  # 0 used to mean the recipe's size, quietly
        raise ValueError(f"--size: must be >= 8 (omit it for the recipe's size), got {args.size}")
    if args.max_side < 0:
        raise ValueError(f"--max-side: must be >= 0 (0 keeps every image's size), got {args.max_side}")
    sizes = {"size" if args.recipe == "byol2" else "global_size": args.size} if args.size is not None else {}
    recipe = make_recipe(args.recipe, interpolation=getattr(args, "interpolation", "bicubic"), **sizes)
    images = list_images(args.data)  # ValueError naming --data when it is missing or empty
    # Settings every loader would refuse: one error now, not a JSON of "unavailable" rows written over an
    # earlier run's file (the baselines do not mix; decode-only cycles its files)
    loaders = [b for b in backends if b not in BASELINES]
    if loaders and recipe.mix.enabled and args.batch_size % 2:
        raise ValueError(f"--batch-size: batch-flip mixing pairs image i with n-1-i, so the loaders need an even "
                         f"batch size, got {args.batch_size}")
    if [b for b in backends if b != "decode-only"] and len(images) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size}: larger than the {len(images)} images of --data "
                         f"{args.data!r}, no batch would fill")
    dtype = DTYPES[args.dtype] if args.dtype != "float32" else None
    args.json_fresh = args.json is None  # a default name: an earlier file of that name is kept
    args.json = args.json or default_json_path(recipe.name, device)
    check_output_path("--json", args.json)
    check_output_path("--png", args.png)

    records, interrupted = measure_rounds(backends, args, recipe, images, device, dtype)
    if device.type == "cuda" and not interrupted:
        synth = {"backend": SYNTHETIC, "status": "ok", "reason": None, "batches": args.batches}
        try:
            synth.update(time_batches(synthetic_batches(recipe, args.batch_size, device, dtype, args.seed),
                                      args.warmup, args.batches, device))
            records.append(synth)
        except KeyboardInterrupt:  # the loaders' rounds are kept all the same
            interrupted = True
            print("\ninterrupted (Ctrl-C) in the synthetic baseline: keeping the loaders' rounds", file=sys.stderr,
                  flush=True)
    ref = next((r for r in records if r["backend"] == REFERENCE and r.get("img_per_s")), None)
    synth_rate = next((r["img_per_s"] for r in records if r["backend"] == SYNTHETIC), None)
    solo_rate = next((r["img_per_s"] for r in records if r["backend"] == SOLO_LEARN and r.get("img_per_s")), None)
    for r in records:
        rate = r.get("img_per_s")
        r.setdefault("img_per_s", None)
        r.setdefault("batches", 0)
        r.setdefault("num_workers", args.num_workers)
        r.update(recipe=recipe.name, interpolation=resize_filter(r["backend"], recipe.views[0].interpolation),
                 batch_size=args.batch_size, device=str(device),
                 warmup=args.warmup, num_images=len(images), dtype=args.dtype,
                 ratio_vs_torchvision=rate / ref["img_per_s"] if rate and ref else None,
                 ratio_vs_synthetic=rate / synth_rate if rate and synth_rate else None,
                 ratio_vs_solo_learn=rate / solo_rate if rate and solo_rate else None)
    doc = write_results(args.json, records, getattr(args, "command_line", "sdmp-fast bench loaders"), interrupted,
                        fresh=getattr(args, "json_fresh", False))
    png = None if interrupted else args.png or os.path.splitext(doc["json"])[0] + ".png"
    try:
        import matplotlib  # noqa: F401  (the [bench] extra; a core install still gets its JSON, not a traceback)
    except ImportError:
        if png:
            print("bench loaders: no bar chart (matplotlib is not installed: pip install 'sdmp-fast[bench]')",
                  file=sys.stderr)
        png = None
    if png:
        bar_chart(records, png, f"{recipe.name} · batch {args.batch_size} · {len(images)} images · "
                                f"{doc['device']} · {doc['date'][:10]}")
    doc["png"] = png
    return doc


def add_arguments(p) -> None:
    from sdmp_fast.pipelines.recipes import INTERPOLATIONS

    p.add_argument("--data", required=True, help="ImageFolder tree (see `sdmp-fast make-data`)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default torchvision,dali-solo-learn,dali,ffcv,torch-gpu, and "
                        "decode-only on a GPU: every loader beside the anchors' pipelines; also "
                        "dali-graphmix: DALI mixing inside its graph; dali-torchphoto: DALI crops, "
                        "torchvision-exact colour ops after it; baselines: dali-solo-learn, solo-learn's "
                        "DALI pipeline style without mixing, and decode-only, nvJPEG decode alone, GPU only)")
    p.add_argument("--recipe", default="byol2", choices=["byol2", "dino"])
    p.add_argument("--size", type=int, default=None, help="view size (global size for dino); default recipe's")
    p.add_argument("--interpolation", default="bicubic", choices=list(INTERPOLATIONS),
                   help="crop resize filter of the loaders' recipe (default bicubic, as BYOL / DINO / solo-learn; the "
                        "dali-solo-learn baseline follows it too)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per backend, start-up included (default 3; at least 1 is always taken)")
    p.add_argument("--batches", type=int, default=20,
                   help="timed batches per backend (default 20; torchvision's rounded up to whole rounds of its "
                        "workers)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="loader workers/threads (default: all cores; 0: torchvision in the main process, one "
                        "thread for the others)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="output image dtype: float32, bfloat16, float16")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all backends in turn; the median round is reported (of an even count the slower "
                        "middle one) (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=512,
                   help="longest side stored in the FFCV .beton (default 512, FFCV's ImageNet setting; larger "
                        "images are then decoded smaller by FFCV than by the others: the record's 'beton' counts "
                        "them; 0 keeps every image's size)")
    p.add_argument("--cache", default=None, help="folder for the FFCV .beton (default: beside the JSON)")
    p.add_argument("--json", default=None, help="default bench/results/loaders-<recipe>-<device>-<date>.json")
    p.add_argument("--png", default=None, help="bar chart (default: the JSON path with .png)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing backends")


def main(args) -> int:
    doc = run(args)
    print(f"{doc['device']}  ·  {doc['date']}")
    print_table(doc["records"], COLUMNS)
    for r in doc["records"]:
        if r.get("beton", {}).get("at_max_side"):
            print(f"note: {r['backend']} decodes a .beton whose longest sides are capped at --max-side "
                  f"{r['beton']['max_side']} ({r['beton']['at_max_side']} of {r['num_images']} images at the cap; "
                  f"the other backends decode the files at their own size)")
    if doc.get("interrupted"):
        return report_interrupted(doc, "loaders")
    busy = oversubscribed(doc["records"])
    if busy:
        print(f"warning: the CPU was oversubscribed while {', '.join(busy)} ran (1-minute load above twice the "
              f"{usable_cores()} usable cores; see load_avg_1m): the loaders whose CPU work runs on torch's "
              f"intra-op threads (ffcv, torch-gpu, memory on the CPU) then slow down several times more than "
              f"torchvision's worker processes and DALI (OpenMP's spin-waiting; OMP_WAIT_POLICY=PASSIVE in the "
              f"environment helps); compare them on an idle machine", file=sys.stderr)
    print(f"bench loaders: wrote {doc['json']}" + (f" and {doc['png']}" if doc["png"] else ""))
    return 0


def oversubscribed(records: List[Dict]) -> List[str]:
    """Backends timed while the 1-minute load average exceeded twice the usable cores (a busy shared machine:
    the run's own threads alone stay near the core count)."""
    return [r["backend"] for r in records if (r.get("load_avg_1m") or 0) > 2 * usable_cores()]
