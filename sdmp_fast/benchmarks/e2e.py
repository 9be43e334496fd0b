"""`sdmp-fast bench e2e`: end-to-end training images/sec from files with the chosen loader, and in the same run
the same trainer fed synthetic data already on the device (the model-only ceiling) in each step mode (eager,
torch.compile, CUDA graphs). Prints the table and the ratios; JSON (benchmarks.common format) to
bench/results/e2e-<device>-<date>.json or --json.

    sdmp-fast bench e2e --loader dali --data /data/imagenet/train --arch vit_small_patch16_224 \
        --batch-size 256 --steps 100 --modes eager,compile

Timing: ``--warmup`` steps first (compilation, graph capture, loader start-up), then ``--steps`` timed steps
ending with a device synchronisation; img/s counts source images (batch size x world size) per second, as the
trainer's metrics do; the bench itself runs one process (world size 1, no process group: under torchrun every
rank would time its own single-process run and write the same JSON). The end-to-end run uses the step mode
given by --compile / --cuda-graphs; its ratio_to_synthetic_same_mode needs that mode in --modes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict

__all__ = ["add_arguments", "main", "time_trainer"]

MODES = ("eager", "compile", "graphs")


def add_arguments(p) -> None:
    from sdmp_fast.config import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before timing (default 10)")
    p.add_argument("--modes", default="eager,compile",
                   help="step modes of the synthetic runs: eager, compile, graphs (GPU) (default eager,compile)")
    p.add_argument("--skip-e2e", action="store_true", help="only the synthetic (model-only) runs")
    p.add_argument("--json", default=None,
                   help="results file (default bench/results/e2e-<device>-<date>.json; '' to skip)")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(trainer, steps: int, warmup: int) -> Dict:
    """Run warmup + steps through the trainer's own staged loop (no checkpoints, metrics read once at the
    end); returns img/s over the timed steps, the final mean loss and the timed steps' peak device memory."""
    import torch

    from sdmp_fast.trainer import _Stager

    stager = _Stager(trainer.device)
    it = trainer.batches()
    e, i, b = next(it)
    nxt = (e, i, stager.stage(b))
    t0 = None
    for k in range(warmup + steps):
        if k == warmup:
            trainer.read_metrics()  # also a host sync: the timed window starts on an idle device
            _sync(trainer.device)
            if trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.device)
            t0 = time.perf_counter()
        e, i, b = nxt
        trainer.train_step(stager.wait(b))
        trainer.mark_done(e, i)
        if k + 1 < warmup + steps:
            e, i, b = next(it)
            nxt = (e, i, stager.stage(b))
    metrics = trainer.read_metrics()
    _sync(trainer.device)
    dt = time.perf_counter() - t0
    # the steady state's peak device memory (model, optimiser, activations, staged batches; None on CPU)
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**30 if trainer.device.type == "cuda" else None
    return {"img_per_s": steps * trainer.global_batch / dt, "step_ms": 1e3 * dt / steps, "loss": metrics["loss"],
            "peak_mem_gb": peak}


def _mode_cfg(cfg, steps: int, warmup: int, mode: str):
    """The validated config of one timed run in step ``mode``. Steady-state steps: no teacher-temperature
    warm-up and no frozen DINO prototypes (with a synthetic epoch spanning the whole run they would be frozen
    throughout), both of which keep a graphs run eager and would put the capture inside the timed window."""
    cfg = dataclasses.replace(cfg, compile=mode == "compile", cuda_graphs=mode == "graphs",
                              steps=warmup + steps, epochs=None, warmup_steps=None, tau_t_warmup_steps=0,
                              freeze_last_layer_epochs=0)
    cfg.validate()
    return cfg


def _backbone_params_m(trainer) -> float:
    """Millions of parameters of the trained ViT: with "backbone" (its timm spec, --depth / --embed-dim /
    --num-heads overrides included) a record tells a ViT-S from a cut-down model of the same arch name."""
    return round(sum(p.numel() for p in trainer.model.backbone.parameters()) / 1e6, 3)


def _run(cfg, steps: int, warmup: int, label: str, mode: str) -> Dict:
    import torch

    from sdmp_fast.trainer import Trainer

    cfg = _mode_cfg(cfg, steps, warmup, mode)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    res = time_trainer(trainer, steps, warmup)
    rec = {"run": label, "mode": mode, "loader": cfg.loader, "method": cfg.method, "sdmp": cfg.sdmp,
           "arch": cfg.arch, "backbone": dict(trainer.spec), "backbone_params_m": _backbone_params_m(trainer),
           "img_size": cfg.img_size, "batch_size": cfg.batch_size, "steps": steps,
           "precision": "bf16" if trainer.amp_dtype is not None else "fp32", "loss_impl": trainer.loss_impl,
           "device": str(trainer.device)}
    rec.update(res)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


def main(args) -> int:
    from sdmp_fast.benchmarks.common import print_table, report_interrupted, rows_until_interrupted, write_results
    from sdmp_fast.config import config_from_args

    if getattr(args, "out", None) is None:
        args.out = os.path.join("bench", "results", "e2e-run")  # never written: the bench saves no checkpoint
    if args.steps is None and args.epochs is None:
        args.steps = 50
    cfg = config_from_args(args)
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))  # one row per mode
    if not modes:  # the synthetic runs are the baseline every ratio needs
        raise ValueError(f"--modes: no step mode in {args.modes!r}; choose among {', '.join(MODES)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown step mode {m!r}; choose among {', '.join(MODES)}")
    if cfg.steps is None:  # epochs given (flag or config file): an epoch's length depends on the data set
        raise ValueError(f"--steps: bench e2e times a fixed number of steps; give --steps N instead of --epochs "
                         f"(got epochs={cfg.epochs})")
    steps, warmup = cfg.steps, args.warmup
    if warmup < 0 or steps < 1:
        raise ValueError("steps/warmup: need steps >= 1 and warmup >= 0")
    cfg = dataclasses.replace(cfg, steps=None, epochs=1, save_every=0, resume=False, progress=False,
                              tensorboard=False)
    cfg_e2e_mode = "graphs" if cfg.cuda_graphs else ("compile" if cfg.compile else "eager")
    synth = dataclasses.replace(cfg, loader="synthetic", data=None, loader_options={})  # it takes none
    for m in modes:  # a mode this machine cannot run (graphs without a GPU) fails now, not after the others ran
        try:
            _mode_cfg(synth, steps, warmup, m)
        except ValueError as e:
            raise ValueError(f"--modes {m}: {e}") from None
    path = args.json
    if path is None:  # one file per card and day; an existing one is kept (common.write_json's fresh)
        from sdmp_fast.benchmarks.losses import default_json_path
        from sdmp_fast.trainer import resolve_device

        path = default_json_path("e2e", resolve_device(cfg.device))
    from sdmp_fast.benchmarks.common import check_output_path

    check_output_path("--json", path)  # before the runs: found unwritable at the end, it cost all of them
    parts = [] if args.skip_e2e or cfg.loader == "synthetic" else [(cfg, "e2e", cfg_e2e_mode)]
    parts += [(synth, "synthetic", m) for m in modes]
    records, interrupted = rows_until_interrupted(
        (lambda c=c, run=run, m=m: [_run(c, steps, warmup, run, m)]) for c, run, m in parts)
    by = {(r["run"], r["mode"]): r["img_per_s"] for r in records}
    mem = {(r["run"], r["mode"]): r.get("peak_mem_gb") for r in records}
    for r in records:
        ceiling = by.get(("synthetic", r["mode"]))
        r["ratio_to_synthetic_same_mode"] = r["img_per_s"] / ceiling if ceiling else None
        eager = by.get(("synthetic", "eager"))
        r["speedup_vs_synthetic_eager"] = r["img_per_s"] / eager if eager else None
        # memory beside speed: what the loader's device buffers and the step mode add to the model-only run
        base = mem.get(("synthetic", "eager"))
        r["mem_vs_synthetic_eager"] = r["peak_mem_gb"] / base if (r.get("peak_mem_gb") and base) else None
    print_table(records, ["run", "mode", "loader", "method", "sdmp", "arch", "batch_size", "precision",
                          "img_per_s", "step_ms", "ratio_to_synthetic_same_mode", "speedup_vs_synthetic_eager",
                          "peak_mem_gb", "mem_vs_synthetic_eager"])
    doc = write_results(path, records, getattr(args, "command_line", "sdmp-fast bench e2e"), interrupted,
                        fresh=args.json is None)
    if interrupted:
        return report_interrupted(doc, "e2e")
    if doc["json"]:
        print(f"wrote {doc['json']}")
    return 0
