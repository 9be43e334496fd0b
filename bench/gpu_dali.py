"""DALI loader throughput on a GPU machine: byol2 with mixing (target >= 20,000 img/s on an H100), byol2
without mixing, DINO multi-crop, and the device-only mixing cost, each after warm-up, in one run. Mixing is
timed in both placements issue 3 compares: ``-mix`` (assemble_batch on DALI's output, torch ops on the same
stream) and ``-graphmix`` (inside the DALI graph, ``mix_in_graph=True``); ``-torchphoto`` times DALI
cropping with torchvision's exact colour ops applied after it (``photometric="torch"``). The anchors' pipelines run in the
same run (``sdmp_fast.benchmarks.baselines``): ``<recipe>-sololearn`` (solo-learn's DALI style, no mixing:
the 16,103 img/s byol2 and 3,740 img/s DINO anchors) and ``decode-only`` (nvJPEG alone, 21,688 img/s);
``feed-only`` times the loader's host side alone (its file reading, 1 and 4 threads), the ceiling it puts on
the loader's rows.

    PYTHONPATH=<dali wheel dir> python bench/gpu_dali.py --out $OUT [--data DIR] [--num-images 4096]

Builds a photo-like JPEG set (scikit-image photos, random crops ~500x375, q75-95, the same recipe as
`sdmp-fast make-data`, rendered with a process pool) unless --data is given. Prints one line per
configuration and writes the shared bench JSON (sdmp_fast.benchmarks.common.write_results) when --out/--json
is given. Images/sec counts samples (each sample = all its views, mixed ones included).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _map_subpackages() -> None:
    """Without `pip install -e .` (a bare GPU machine): sdmp_fast from ROOT, unless it imports already (installed,
    or bench/steps.sh's shim), and its subpackages sdmp_fast.pipelines / sdmp_fast.kernels from ROOT/pipelines and
    ROOT/kernels, as pyproject's package-dir maps them (pipelines.base imports sdmp_fast.kernels: mapping
    pipelines alone was not enough)."""
    try:
        import sdmp_fast
    except ImportError:
        sys.path.insert(0, ROOT)
        import sdmp_fast
    try:
        import sdmp_fast.kernels  # noqa: F401
        import sdmp_fast.pipelines  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name not in ("sdmp_fast.kernels", "sdmp_fast.pipelines"):
            raise
        sdmp_fast.__path__.append(ROOT)  # ROOT/kernels, ROOT/pipelines become sdmp_fast.kernels / .pipelines


_map_subpackages()

from sdmp_fast.pipelines.base import assemble_batch, make_generator, make_loader  # noqa: E402
from sdmp_fast.benchmarks.loaders import endless_batches, time_batches  # noqa: E402  (the loaders bench's timing)
from sdmp_fast.pipelines.recipes import INTERPOLATIONS, RECIPES, make_recipe  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _render_range(args):
    """Worker: render images [lo, hi) into out_dir/class/ (make_data's per-image recipe and seeding)."""
    out_dir, lo, hi, classes, seed = args
    from sdmp_fast.benchmarks.make_data import load_photos, render_image
    import numpy as np

    photos = load_photos()
    for i in range(lo, hi):
        c = i % classes
        data, _ = render_image(photos[c % len(photos)][1], np.random.default_rng([seed, i]))
        with open(os.path.join(out_dir, f"{c:03d}", f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
    return hi - lo


def build_jpegs(out_dir: str, num_images: int, classes: int = 16, seed: int = 0) -> str:
    stamp = os.path.join(out_dir, f".gpu_dali_{num_images}_{classes}_{seed}")
    if os.path.exists(stamp):
        return out_dir
    for c in range(classes):
        os.makedirs(os.path.join(out_dir, f"{c:03d}"), exist_ok=True)
    workers = max(1, (os.cpu_count() or 1))
    step = -(-num_images // workers)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_render_range, [(out_dir, lo, min(lo + step, num_images), classes, seed)
                                            for lo in range(0, num_images, step)]))
    open(stamp, "w").close()
    print(f"built {done} JPEGs in {out_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out_dir


def _round(x, digits: int = 2):
    return None if x is None else round(x, digits)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mixing_only(recipe, batch_size: int, dtype, dev: torch.device, iters: int = 50) -> float:
    """img/s of assemble_batch alone on device-resident views (the mixing share of the loader's budget)."""
    views = [torch.randn(batch_size, 3, v.size, v.size, device=dev, dtype=dtype or torch.float32)
             for v in recipe.expanded_views()]
    labels = torch.zeros(batch_size, dtype=torch.long, device=dev)
    idx = torch.arange(batch_size, device=dev)
    g = make_generator(0, 0, 0, dev)
    for _ in range(5):
        assemble_batch(views, labels, idx, recipe, g)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        assemble_batch(views, labels, idx, recipe, g)
    _sync(dev)
    return iters * batch_size / (time.perf_counter() - t0)


def time_feeding_only(data: str, batch_size: int, read_threads: int, batches: int) -> float:
    """The DALI loader's host side alone, img/s: its feeder (files read and sniffed on ``read_threads`` threads,
    one batch read ahead) handing out ``batches`` batches, with no DALI behind it: the ceiling the host puts on
    the loader (files in the page cache, as the timed rows read them after their warm-up)."""
    from sdmp_fast.pipelines.base import EpochSampler, list_images
    from sdmp_fast.pipelines.dali import _Feeder
    from sdmp_fast.pipelines.skips import SkipLog

    images = list_images(data)
    sampler = EpochSampler(len(images), batch_size, 0, 1, True, 0, True)
    if not len(sampler):
        raise ValueError(f"feed-only: {len(images)} images fill no batch of {batch_size}")
    feeder = _Feeder(images.files, SkipLog("dali", sampler), True, True, read_threads)
    try:
        samples, t0, epoch = 0, None, 0
        while t0 is None or samples < batches * batch_size:
            sampler.set_epoch(epoch)
            feeder.start([b.tolist() for b in sampler.batches()])
            while True:
                try:
                    data_, _ = feeder()
                except StopIteration:
                    break
                feeder.accept()
                if t0 is not None:
                    samples += len(data_)
            if t0 is None:  # the first pass warms the page cache
                t0 = time.perf_counter()
            epoch += 1
        return samples / (time.perf_counter() - t0)
    finally:
        feeder.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="ImageFolder of JPEGs (default: build one under --work)")
    p.add_argument("--work", default="/tmp/sdmp_gpu_dali", help="where the JPEG set is built")
    p.add_argument("--num-images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dino-batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="DALI num_threads (default: all cores)")
    p.add_argument("--hw-decoder-load", type=float, nargs="*", default=[None],
                   help="values of fn.decoders.image's hw_decoder_load to try (default: DALI's)")
    p.add_argument("--prefetch-queue-depth", type=int, nargs="*", default=[2],
                   help="values of DALI's prefetch_queue_depth to try (default 2)")
    p.add_argument("--configs", default="decode-only,feed-only,byol2-sololearn,byol2-mix,byol2-mix-bilinear,"
                                        "byol2-graphmix,byol2-torchphoto,byol2-nomix,dino-sololearn,dino-mix,"
                                        "dino-graphmix,dino-torchphoto,mix-only",
                   help="comma-separated <recipe>-<mix|graphmix|torchphoto|nomix|sololearn>[-bilinear] (crops "
                        "bicubic unless -bilinear; torchphoto: photometric='torch', torchvision-exact colour ops "
                        "after DALI's crops), decode-only, feed-only (the DALI loader's file reading alone, 1 and 4 "
                        "read threads) and mix-only")
    p.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a smoke test of this script)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON (e.g. $OUT)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    modes = ("mix", "graphmix", "torchphoto", "nomix", "sololearn")
    def parts(c):  # <recipe>-<mode>[-<interpolation>]
        name, _, rest = c.partition("-")
        mode, _, interp = rest.partition("-")
        return name, mode, interp or "bicubic"

    bad = [c for c in configs if c not in ("mix-only", "decode-only", "feed-only")
           and (parts(c)[0] not in RECIPES or parts(c)[1] not in modes or parts(c)[2] not in INTERPOLATIONS)]
    if bad:
        print(f"gpu_dali: unknown configs {bad} (expected <recipe>-mix|graphmix|torchphoto|nomix|sololearn"
              f"[-bilinear], "
              f"decode-only, feed-only or mix-only)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_dali: no CUDA device (--device cpu runs a smoke test)", file=sys.stderr)
        return 2

    data = args.data or build_jpegs(os.path.join(args.work, "jpegs"), args.num_images)
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, cores {os.cpu_count()}", flush=True)
    path = args.json or (os.path.join(args.out, "gpu_dali.json") if args.out else None)
    command = "python bench/gpu_dali.py " + " ".join(argv if argv is not None else sys.argv[1:])
    records = []

    def save():  # after every configuration: a later crash or the step's time limit keeps what was measured
        if path:
            from sdmp_fast.benchmarks.common import write_results
            write_results(path, records, command)

    def failed(label, bs, e):  # report and go on to the next configuration
        print(f"{label:28s} FAILED: {type(e).__name__}: {e}", flush=True)
        records.append({"config": label, "batch_size": bs, "error": f"{type(e).__name__}: {e}"})

    for config in configs:
        name, mode, interp = parts(config)
        if config == "feed-only":
            for threads in (1, 4):  # 4: the loader's default read threads on a GPU
                label = f"feed-only-t{threads}"
                try:
                    rate = time_feeding_only(data, args.batch_size, threads, args.batches)
                except Exception as e:  # noqa: BLE001
                    failed(label, args.batch_size, e)
                    continue
                records.append({"config": label, "batch_size": args.batch_size, "read_threads": threads,
                                "img_per_s": round(rate, 1)})
                print(f"{label:28s} B={args.batch_size:4d}  {rate:10.0f} img/s  (host side alone)", flush=True)
            save()
            continue
        if name == "mix":
            from sdmp_fast import kernels
            for rname in ("byol2", "dino"):
                recipe = make_recipe(rname)
                bs = args.batch_size if rname == "byol2" else args.dino_batch_size
                # the loaders' mixing: the fused kernel, and the vectorised PyTorch path it replaced
                for label, ctx in ((f"mix-only-{rname}", contextlib.nullcontext()),
                                   (f"mix-only-{rname}-torch", kernels.disabled())):
                    try:
                        with ctx:
                            rate = time_mixing_only(recipe, bs, dtype, device)
                    except Exception as e:  # noqa: BLE001
                        failed(label, bs, e)
                        continue
                    records.append({"config": label, "batch_size": bs, "img_per_s": round(rate, 1)})
                    print(f"{label:28s} B={bs:4d}  {rate:10.0f} img/s", flush=True)
            save()
            continue
        if name == "decode" or mode == "sololearn":  # the anchors' pipelines (baselines.py)
            from sdmp_fast.benchmarks.baselines import make_baseline
            from sdmp_fast.pipelines.base import list_images
            recipe = make_recipe(name if mode == "sololearn" else "byol2", interpolation=interp).without_mixing()
            bs = args.dino_batch_size if name == "dino" else args.batch_size
            t0 = time.perf_counter()
            try:
                batches = make_baseline("decode-only" if name == "decode" else "dali-solo-learn", list_images(data),
                                        recipe, bs, device, dtype, args.threads,
                                        max_files=(args.warmup + args.batches) * bs)
                timed = time_batches(batches, args.warmup, args.batches, device)
                batches.close()
            except Exception as e:  # noqa: BLE001
                failed(config, bs, e)
                save()
                continue
            records.append({"config": config, "recipe": None if name == "decode" else name, "mixing": False,
                            "interpolation": None if name == "decode" else interp,
                            "baseline": True, "batch_size": bs, "img_per_s": round(timed["img_per_s"], 1),
                            # what it emitted (DALI has no bfloat16: float16 where the loaders' rows say bfloat16)
                            "dtype": timed["out_dtype"],
                            "batches": args.batches, "gpu_used_mb": timed["gpu_used_mb"],
                            "cpu_cores": _round(timed["cpu_cores"]), "total_s": round(time.perf_counter() - t0, 1)})
            print(f"{config:28s} B={bs:4d}  {timed['img_per_s']:10.0f} img/s  (baseline, {args.batches} batches "
                  f"after {args.warmup} warm-up)", flush=True)
            save()
            continue
        recipe = make_recipe(name, interpolation=interp)
        if mode == "nomix":
            recipe = recipe.without_mixing()
        bs = args.batch_size if name == "byol2" else args.dino_batch_size
        for load, depth in [(ld, d) for ld in args.hw_decoder_load for d in args.prefetch_queue_depth]:
            opts = {"decoder_options": {"hw_decoder_load": load}} if load is not None else {}
            opts["prefetch_queue_depth"] = depth
            if mode == "graphmix":
                opts["mix_in_graph"] = True
            if mode == "torchphoto":
                opts["photometric"] = "torch"
            if args.threads:
                opts["num_threads"] = args.threads
            label = config + (f"-hw{load}" if load is not None else "") + (f"-q{depth}" if depth != 2 else "")
            t0 = time.perf_counter()
            loader = None
            try:
                loader = make_loader("dali", data, recipe, bs, device=device, dtype=dtype, shard_id=0, num_shards=1,
                                     **opts)
                timed = time_batches(endless_batches(loader), args.warmup, args.batches, device)
            except Exception as e:  # noqa: BLE001
                failed(label, bs, e)
                continue
            finally:
                del loader
                save()
            records.append({"config": label, "recipe": name, "interpolation": interp, "mixing": mode != "nomix",
                            "mix_in_graph": mode == "graphmix", "batch_size": bs,
                            "dtype": args.dtype, "img_per_s": round(timed["img_per_s"], 1), "batches": args.batches,
                            "gpu_used_mb": timed["gpu_used_mb"], "cpu_cores": _round(timed["cpu_cores"]),
                            "total_s": round(time.perf_counter() - t0, 1),
                            "options": {k: str(v) for k, v in opts.items()}})
            print(f"{label:28s} B={bs:4d}  {timed['img_per_s']:10.0f} img/s  ({args.batches} batches after "
                  f"{args.warmup} warm-up)", flush=True)
            save()

    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
