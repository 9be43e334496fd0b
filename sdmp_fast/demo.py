"""`make demo`: a short SDMP-MoCo v3 pretraining of a small ViT on Fashion-MNIST, then weighted k-NN on the
10,000 test images for the pretrained backbone and for the same backbone at its random initialisation.

    python -m sdmp_fast.demo                        # GPU if present, else the CPU preset
    python -m sdmp_fast.demo --seeds 0,1,2          # the margin check across seeds
    python -m sdmp_fast.demo --steps 3 --train-limit 512 --test-limit 500   # smoke test

Training goes through the trainer's Python API (``Trainer.fit``) with the in-memory loader: the whole data
set is one uint8 tensor on the device, views and SDMP mixing are made there. Writes into ``--out``
(default demo_out/): ``mixed_views.png`` (one batch: views + labelled mixed views), ``run-seed<S>/`` (the
trainer's run directory: metrics.jsonl, checkpoint, backbone.pt), ``loss_seed<S>.png`` and ``results.json``.

The CPU preset is calibrated for 2 cores (bench/results/demo-cpu-*.md): the issue's 12-layer ViT-Tiny at 32 px
/ patch 4 trains at ~18 img/s there and its k-NN falls below random init after the ~17 steps a few minutes
allow. A 6-block, 96-wide ViT on 28 px inputs with 7 px patches (16 tokens), batch 64, a 1024/256 projector and
lr 1e-3 runs 1,000 steps (~1 epoch) in the same time, with milder crops (scale 0.2-1) for 28 px clothes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

# What each preset changes in TrainConfig (anything not named keeps the trainer's MoCo v3 default).
PRESETS: Dict[str, Dict] = {
    # 2 CPU cores, < 10 minutes in all: 16 tokens of 7x7 px, 6 blocks of width 96, batch 64, ~1 epoch.
    "cpu": dict(arch="vit_tiny_patch16_224", img_size=28, patch_size=7, depth=6, embed_dim=96, num_heads=3,
                batch_size=64, steps=1000, lr=1e-3, warmup_steps=60, proj_hidden_dim=1024, proj_dim=256,
                weight_decay=0.1, momentum=0.99),
    # One GPU: ViT-Tiny at 32 px / patch 4 (65 tokens, the calibration model), batch 256; whole-step
    # CUDA graphs remove the launch overhead that bounds such a small model.
    "gpu": dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, batch_size=256, steps=800, lr=1.5e-3,
                warmup_steps=80, proj_hidden_dim=1024, proj_dim=256, weight_decay=0.1, momentum=0.99,
                cuda_graphs=True),
}
CROP_SCALE = {"cpu": (0.2, 1.0), "gpu": (0.2, 1.0)}


def demo_recipe(img_size: int, sdmp: bool = True, crop_scale=(0.2, 1.0)):
    """The trainer's two-view MoCo recipe (BYOL augmentations + batch-flip mixing of both views), with crops
    kept at >= 20% of a 28 px garment (BYOL's 8% leaves a few pixels of texture)."""
    from sdmp_fast.pipelines.recipes import make_recipe

    recipe = make_recipe("byol2", size=img_size, mix=sdmp)
    views = tuple(dataclasses.replace(v, scale=tuple(crop_scale)) for v in recipe.views)
    return dataclasses.replace(recipe, views=views).validate()


def _config(preset: str, device: str, seed: int, out: str, overrides: Dict):
    from sdmp_fast.config import TrainConfig

    settings = dict(PRESETS[preset])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings.get("warmup_steps") is not None and settings["warmup_steps"] >= settings["steps"]:
        settings["warmup_steps"] = max(settings["steps"] // 10, 0)
    if device == "cpu":
        settings["cuda_graphs"] = False
    cfg = TrainConfig(method="mocov3", sdmp=True, loader="memory", data="fashion-mnist", device=device, seed=seed,
                      out=out, progress=False, tensorboard=False, save_every=0, keep_checkpoints=1,
                      log_every=max(1, min(25, settings["steps"] // 20)), **settings)
    return cfg.resolve().validate()


def _mixed_views_png(loader, recipe, path: str) -> str:
    from sdmp_fast.pipelines.show import plot_batch

    batch = next(iter(loader))
    return plot_batch(batch, recipe, path, max_samples=8,
                      title=f"Fashion-MNIST, SDMP-MoCo views at {batch.views[0].shape[-1]} px: 2 views + mixed "
                            f"views (red: method, λ, batch-flip partner)")


def pretrain_and_evaluate(args, seed: int, data, device: torch.device, log=print) -> Dict:
    """One seed: pretrain, then k-NN of the trained and the initial backbone. Returns a result record."""
    from sdmp_fast.evaluate import extract_features, knn_classify
    from sdmp_fast.pipelines.memory import MemoryLoader
    from sdmp_fast.plot import plot_run
    from sdmp_fast.runlog import RunLogger
    from sdmp_fast.trainer import Trainer

    xtr, ytr, xte, yte, train_images = data
    run_dir = os.path.join(args.out, f"run-seed{seed}")
    if os.path.isdir(run_dir):  # a demo re-run starts over: the trainer refuses a non-empty --out
        import shutil

        shutil.rmtree(run_dir)
    cfg = _config(args.preset, device.type if device.type == "cpu" else str(device), seed, run_dir,
                  {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "warmup_steps": args.warmup_steps})
    recipe = demo_recipe(cfg.img_size, True, CROP_SCALE[args.preset])
    loader = MemoryLoader(train_images, recipe, cfg.batch_size, device=device, seed=seed)
    if seed == args.seed_list[0]:
        png = _mixed_views_png(MemoryLoader(train_images, recipe, 8, device=device, seed=seed), recipe,
                               os.path.join(args.out, "mixed_views.png"))
        log(f"wrote {png}")
    trainer = Trainer(cfg, loader=loader, log=lambda *a: None)
    initial = copy.deepcopy(trainer.model.backbone).eval()  # the same model at its random init
    log(f"seed {seed}: SDMP-MoCo {cfg.arch} depth {cfg.depth or 12} dim {cfg.embed_dim or 192} at {cfg.img_size} px "
        f"(patch {cfg.patch_size}) on {device}, {trainer.total_steps} steps of {cfg.batch_size} images ...")
    t0, c0 = time.perf_counter(), time.process_time()
    os.makedirs(run_dir, exist_ok=True)
    logger = RunLogger(run_dir, trainer.total_steps, 0, progress=not args.no_progress, tensorboard=False,
                       log=log)  # tqdm bar with img/s and the loss terms on stderr
    try:
        trainer.fit(run_dir, logger)
    finally:
        logger.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    train_cpu_s = time.process_time() - c0  # CPU seconds of all threads: tells a busy machine from a slow run
    images_seen = trainer.total_steps * cfg.batch_size
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    plot_run(run_dir, os.path.join(args.out, f"loss_seed{seed}.png"),
             title=f"demo seed {seed}: SDMP-MoCo {cfg.arch} {cfg.img_size}px on {device}")
    rec = {"seed": seed, "device": str(device), "steps": trainer.total_steps, "batch_size": cfg.batch_size,
           "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
           "train_img_per_s": round(images_seen / train_s, 1),
           "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"], "threads": torch.get_num_threads(),
           "config": {k: getattr(cfg, k) for k in PRESETS[args.preset]}}
    for name, model in (("pretrained", trainer.model.backbone), ("random_init", initial)):
        t1 = time.perf_counter()
        ftr, _ = extract_features(model, xtr, ytr, cfg.img_size, recipe.mean, recipe.std, args.eval_batch, device)
        fte, _ = extract_features(model, xte, yte, cfg.img_size, recipe.mean, recipe.std, args.eval_batch, device)
        acc = knn_classify(ftr.to(device), ytr, fte.to(device), yte, args.knn_k, args.knn_t)
        rec[f"{name}_knn"] = round(100 * acc, 2)
        rec[f"{name}_eval_s"] = round(time.perf_counter() - t1, 1)
    rec["margin"] = round(rec["pretrained_knn"] - rec["random_init_knn"], 2)
    log(f"seed {seed}: loss {rec['loss_first']:.3f} -> {rec['loss_last']:.3f}, {rec['train_img_per_s']} img/s; "
        f"k-NN pretrained {rec['pretrained_knn']:.2f}% vs random init {rec['random_init_knn']:.2f}%")
    return rec


def print_table(records: List[Dict], raw: Optional[float], n_test: int, n_bank: int, log=print) -> None:
    log("")
    log(f"weighted k-NN top-1 on {n_test} Fashion-MNIST test images ({n_bank}-image bank, k=20, T=0.07)")
    head = f"{'seed':>4}  {'pretrained':>10}  {'random init':>11}  {'margin':>7}  {'steps':>5}  {'train img/s':>11}  " \
           f"{'train s':>7}"
    log(head)
    log("-" * len(head))
    for r in records:
        log(f"{r['seed']:>4}  {r['pretrained_knn']:>9.2f}%  {r['random_init_knn']:>10.2f}%  {r['margin']:>+6.2f}  "
            f"{r['steps']:>5}  {r['train_img_per_s']:>11.1f}  {r['train_s']:>7.1f}")
    if raw is not None:
        log(f"raw pixels (no model): {raw:.2f}%")


def cpu_threads(setting: str = "auto") -> int:
    """Intra-op threads for the CPU run. With other processes on the cores, OpenMP's fork/join barriers stall
    on every one of the thousands of small ops per step: measured on the 2-core box at load average ~5, one
    thread trained at 160-180 img/s and two at 50-90 img/s. So ``auto`` keeps torch's default only while the
    1-minute load average is below half the cores."""
    if setting != "auto":
        n = int(setting)
        if n < 1:
            raise ValueError(f"--threads: must be >= 1 or 'auto', got {setting!r}")
        return n
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= 0.5 * cores
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy else torch.get_num_threads()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="demo_out", help="output directory (default demo_out/)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: gpu on CUDA, else cpu")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each a full pretraining + k-NN)")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's optimiser steps")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--train-limit", type=int, default=0,
                    help="pretrain on / use as k-NN bank the first N training images (0: all 60,000)")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on N test images (0: all 10,000)")
    ap.add_argument("--knn-k", type=int, default=20)
    ap.add_argument("--knn-t", type=float, default=0.07)
    ap.add_argument("--eval-batch", type=int, default=1024)
    ap.add_argument("--no-raw-pixels", action="store_true", help="skip the raw-pixel k-NN reference")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads; auto: all cores on an idle machine, 1 on a busy one (see cpu_threads)")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdmp_fast.demo", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    from sdmp_fast.data import load_fashion_mnist
    from sdmp_fast.evaluate import raw_pixel_knn

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        ap.error("--seeds: give at least one seed")
    if device.type == "cpu":
        try:
            torch.set_num_threads(cpu_threads(args.threads))
        except ValueError as e:
            ap.error(str(e))
    try:  # every setting checked before any data is read or anything written (each seed's config differs by seed)
        _config(args.preset, device.type if device.type == "cpu" else str(device), args.seed_list[0],
                os.path.join(args.out, f"run-seed{args.seed_list[0]}"),
                {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                 "warmup_steps": args.warmup_steps})
    except ValueError as e:
        ap.error(str(e))
    from sdmp_fast.paths import LockHeld, discard, lock_exclusive, os_error_reason

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:  # a folder this user may not write (a shared checkout's working directory): one line
        ap.error(f"--out: cannot create {args.out!r} ({os_error_reason(e)}); choose another --out")

    try:  # two demos on one --out deleted and mixed each other's run folders, checkpoints and results
        lock = lock_exclusive(os.path.join(args.out, ".lock"))  # noqa: F841 - held until this process ends
    except LockHeld:
        ap.error(f"--out: {args.out!r} is being written by another demo or sdmp-fast train process (its .lock is "
                 f"held); wait for it to end or choose another --out")
    except OSError as e:
        ap.error(f"--out: cannot lock {os.path.join(args.out, '.lock')!r} ({e.strerror}); choose another --out")
    # a rerun starts over (each seed's run folder is replaced): the earlier results.json goes first, so a rerun
    # stopped half-way never leaves results beside run folders that are no longer theirs
    discard(os.path.join(args.out, "results.json"))
    t_setup = time.perf_counter()
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if args.train_limit:
        xtr, ytr = xtr[: args.train_limit], ytr[: args.train_limit]
    if args.test_limit:
        xte, yte = xte[: args.test_limit], yte[: args.test_limit]
    data = (xtr, ytr, xte, yte, (xtr, ytr))
    if device.type == "cuda":  # the fused loss kernels JIT-build on first use: part of set-up, not of training
        t_k = time.perf_counter()
        try:
            from sdmp_fast import kernels

            ready = kernels.available(device)
        except Exception as e:  # a broken build only costs speed: the trainer falls back to the references
            ready = False
            print(f"fused kernels unavailable ({type(e).__name__}: {e})")
        print(f"fused loss kernels: {'ready' if ready else 'not used (reference losses)'} "
              f"({time.perf_counter() - t_k:.0f} s)")
    print(f"sdmp-fast demo: Fashion-MNIST {len(xtr)} train / {len(xte)} test images, preset {args.preset}, "
          f"device {device}, {torch.get_num_threads()} CPU thread(s), load average {_load():.1f} (set-up {time.perf_counter() - t_setup:.1f} s)")
    t_all = time.perf_counter()
    records = [pretrain_and_evaluate(args, s, data, device) for s in args.seed_list]
    raw = None
    if not args.no_raw_pixels:
        raw = round(100 * raw_pixel_knn(xtr.to(device), ytr, xte.to(device), yte, args.knn_k, args.knn_t), 2)
    print_table(records, raw, len(xte), len(xtr))
    total_s = time.perf_counter() - t_all
    print(f"total {total_s:.0f} s; loss curves: {args.out}/loss_seed*.png, views: {args.out}/mixed_views.png")
    from sdmp_fast.paths import write_replacing

    doc = {"preset": args.preset, "config": PRESETS[args.preset], "records": records, "raw_pixel_knn": raw,
           "n_train": len(xtr), "n_test": len(xte), "total_s": round(total_s, 1),
           "torch_threads": torch.get_num_threads(), "load_average_end": round(_load(), 2)}
    write_replacing(os.path.join(args.out, "results.json"), lambda fh: json.dump(doc, fh, indent=1),
                    "results (printed above)")
    return 0


def run_main() -> int:
    """``python -m sdmp_fast.demo`` (``make demo``): Ctrl-C is one line, not a traceback, and the process then
    ends by SIGINT, as a shell expects of an interrupted command."""
    try:
        return main()
    except KeyboardInterrupt:
        print("sdmp_fast.demo: interrupted", file=sys.stderr)
        from sdmp_fast.cli import die_of_sigint

        die_of_sigint()
        return 130


if __name__ == "__main__":
    raise SystemExit(run_main())
