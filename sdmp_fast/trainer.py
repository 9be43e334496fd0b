"""The lean SDMP trainer: MoCo v3 and DINO, SDMP on or off through the same code.

One optimiser step (``Trainer.train_step``):
  MoCo v3  base encoder fwd+bwd on [x1, x2m] (queries q1, q2m), momentum encoder fwd on [x1, x2, x1m]
           (keys k1, k2, k1m), loss = source + mix_weight * (mix_source + mix_mix) (sdmp.md §3); the views swap
           roles at random each step (host-side generator, checkpointed). SDMP off: base on [x1, x2], momentum
           on [x1, x2], loss = ctr(q1, k2) + ctr(q2, k1) (plain symmetric MoCo v3). Under DDP the keys are
           all-gathered without gradient and the per-rank flip of sdmp.md §2 indexes them.
  DINO     student on 2 global + clean local + mixed local crops, teacher on the clean and the mixed global
           crops, loss = sdmp_dino_terms (sdmp.md §4); the center is an EMA of the clean teacher outputs,
           all-reduced across ranks. SDMP off: the student sees all local crops clean, no teacher mixed crops.
Then gradient norm (for DINO each parameter's gradient clipped on its own, as DINO's clip_gradients), a
device-side non-finite flag, fused AdamW (which skips its update when the flag is set, via its ``found_inf``
input), decoupled weight decay, EMA update, metric accumulation.

No host synchronisation in the steady state: lr / weight decay / momentum are host floats computed from the
step number; the loss terms, gradient norm and non-finite flags accumulate on the device and are read every
``log_every`` steps (one ``.tolist()``), before every checkpoint and at the end. Consequently a NaN/inf is
*detected* up to ``log_every - 1`` steps after it happened; the flagged step's update is skipped on the device
at once, and since every checkpoint write is preceded by a read, no checkpoint is ever written after a flagged
step under ``nan_policy=stop``.

Staged input pipeline (CUDA): batch i+1 is moved to the GPU on a side stream while step i computes; before
use the compute stream waits on the copy stream and the batch's tensors are ``record_stream``-ed onto the
compute stream (so the caching allocator does not recycle them while step i+1 still reads them).
Optional ``torch.compile`` of the encoders, and optional whole-step CUDA-graph capture (single process):
the step runs on static buffers; lr, weight decay and EMA keep rate live in device scalars refreshed with
``fill_`` before each replay. Steps run eagerly (on the same static buffers) until the graph can be captured
once and replayed unchanged: after 3 warm-up steps, the DINO frozen-prototype period and the teacher
temperature warm-up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sdmp_fast import checkpoint as ckpt
from sdmp_fast import losses as ref_losses
from sdmp_fast.batch import SDMPBatch
from sdmp_fast.config import TrainConfig, check_gpu_exists, check_gpu_per_rank, mismatches
from sdmp_fast.models import (DINO, MoCoV3, backbone_spec, create_backbone, ema_update_, param_groups)
from sdmp_fast.schedules import Schedules

__all__ = ["Trainer", "NonFiniteError", "resolve_device", "build_recipe", "build_loader", "build_model",
           "term_names", "loss_functions"]


class NonFiniteError(RuntimeError):
    """A loss term or the gradient became NaN/inf (message names the step and the terms)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def build_recipe(cfg: TrainConfig):
    from sdmp_fast.pipelines.recipes import make_recipe

    if cfg.method == "mocov3":
        recipe = make_recipe("byol2", size=cfg.img_size, mix=cfg.sdmp, interpolation=cfg.interpolation)
    else:
        recipe = make_recipe("dino", global_size=cfg.img_size, local_size=cfg.local_size, n_local=cfg.n_local,
                             interpolation=cfg.interpolation,
                             n_local_mixed=cfg.n_local_mixed if cfg.sdmp else 0, mix=cfg.sdmp)
    mix = dataclasses.replace(recipe.mix, alpha=float(cfg.alpha), methods=tuple(cfg.mix_methods))
    return dataclasses.replace(recipe, mix=mix).validate()


def build_loader(cfg: TrainConfig, recipe, device: torch.device, rank: int = 0, world_size: int = 1,
                 synthetic_length: int = 1000):
    if cfg.loader == "synthetic":
        from sdmp_fast.synthetic import SyntheticLoader

        return SyntheticLoader(recipe, cfg.batch_size, device=device, seed=cfg.seed, shard_id=rank,
                               length=synthetic_length)
    from sdmp_fast.pipelines.base import make_loader

    return make_loader(cfg.loader, cfg.data, recipe, cfg.batch_size, device=device, shard_id=rank,
                       num_shards=world_size, shuffle=True, drop_last=True, seed=cfg.seed,
                       num_workers=cfg.num_workers, **cfg.loader_options)


def build_model(cfg: TrainConfig) -> Tuple[nn.Module, Dict]:
    """The method's model on the CPU, initialised from ``cfg.seed`` (identical on every rank)."""
    spec = backbone_spec(cfg.arch, cfg.img_size, cfg.patch_size, cfg.depth, cfg.embed_dim, cfg.num_heads,
                         dynamic_img_size=cfg.method == "dino")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(spec, cfg.drop_path_rate or 0.0)  # the trained encoder's; its EMA copy has none
        if cfg.method == "mocov3":
            model = MoCoV3(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.freeze_patch_embed,
                           predictor_last_bn=cfg.moco_predictor_bn)
        else:
            model = DINO(backbone, cfg.dino_out_dim, cfg.dino_hidden_dim, cfg.dino_bottleneck_dim,
                         norm_last_layer=cfg.dino_norm_last_layer, use_bn_in_head=cfg.dino_head_bn)
    return model, spec


def term_names(cfg: TrainConfig) -> Tuple[str, ...]:
    if cfg.method == "mocov3":
        return ("source", "mix_source", "mix_mix") if cfg.sdmp else ("source", "source_sym")
    return ("dino", "mix_source", "mix_teacher") if cfg.sdmp else ("dino",)


def _dino_terms_and_center_ref(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam,
                               tau_s=0.1, tau_t=0.04, mix_weight=0.5):
    terms = ref_losses.sdmp_dino_terms(student_clean, student_mixed, teacher_clean, teacher_mixed, center, lam,
                                       tau_s, tau_t, mix_weight)
    t = teacher_clean.detach().float()
    return terms, t.reshape(-1, t.shape[-1]).mean(0)


_DETERMINISTIC_BY_US = False  # whether a Trainer turned torch's process-wide deterministic mode on


def set_deterministic(on: bool, device: torch.device) -> None:
    """torch's deterministic mode for a run: on when asked; off again when asked not to and an earlier Trainer of
    this process turned it on (a run after a --deterministic one, in tests or sweeps, must not inherit strict
    mode: on a GPU DINO's bicubic position-embedding backward then raises), a user's own setting left alone.
    On a GPU some ops have no deterministic backward: warn there instead of stopping the run; bit-exact resume
    is promised on CPU, where every op used is deterministic."""
    global _DETERMINISTIC_BY_US
    if on:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        _DETERMINISTIC_BY_US = True
    elif _DETERMINISTIC_BY_US:
        torch.use_deterministic_algorithms(False)
        _DETERMINISTIC_BY_US = False


def loss_functions(cfg: TrainConfig, device: torch.device) -> Tuple[Callable, Callable, str]:
    """(moco_terms, dino_terms_and_center, name): the fused kernels of sdmp_fast.kernels (same signatures as the
    references in sdmp_fast.losses) on a GPU when they are importable, else the references. The DINO function
    returns (terms, batch mean of the clean teacher logits) so the kernel's teacher pass feeds the center."""
    moco, dino_fn, name = ref_losses.sdmp_moco_terms, _dino_terms_and_center_ref, "reference"
    if cfg.method == "mocov3" and not cfg.sdmp:  # plain MoCo v3: F.cross_entropy, no fused op to run
        return moco, dino_fn, "reference (plain MoCo v3 cross-entropy)"
    if cfg.kernels == "auto" and device.type == "cuda":
        try:
            from sdmp_fast import kernels
        except Exception:  # a broken build must not stop training: the reference path is exact
            kernels = None
        if kernels is not None and not kernels.available(device):
            # built (or loaded) here, not on the first step: the log and bench JSON then say what really runs
            name = f"reference (kernels unavailable: {kernels.build_error() or 'disabled'})"
        elif kernels is not None:
            k_moco = getattr(kernels, "sdmp_moco_terms", None)
            k_dino = getattr(kernels, "sdmp_dino_terms_and_center", None)
            if callable(k_moco) or callable(k_dino):
                name = "kernels"
            moco = k_moco if callable(k_moco) else moco
            dino_fn = k_dino if callable(k_dino) else dino_fn
    return moco, dino_fn, name


@torch.no_grad()
def _teacher_entropies(teacher_logits: torch.Tensor, center: torch.Tensor, tau_t) -> torch.Tensor:
    """[mean entropy of P_t per sample, entropy of P_t averaged over the batch] in nats, on the device."""
    p = ref_losses.dino_teacher_probs(teacher_logits, center, tau_t).reshape(-1, teacher_logits.shape[-1])
    per_sample = -torch.special.xlogy(p, p).sum(-1).mean()
    m = p.mean(0)
    return torch.stack([per_sample, -torch.special.xlogy(m, m).sum()])


def _moco_ctr(q: torch.Tensor, k: torch.Tensor, tau: float, rank: int) -> torch.Tensor:
    """MoCo v3's contrastive loss (times 2*tau) of local queries against (all-gathered) keys."""
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + rank * n
    return F.cross_entropy(ref_losses.moco_logits(q, k, tau), labels) * (2.0 * tau)


def _gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[n, d] per rank -> [world_size * n, d] in rank order, without gradient (MoCo v3's concat_all_gather)."""
    if world_size == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _debug_env() -> Dict[str, float]:
    """Fault-injection hooks for tests and the fault drill (all off unless the variables are set)."""
    def num(name, default=-1.0):
        try:
            return float(os.environ.get(name, default))
        except ValueError:
            return default
    return {"step_sleep": num("SDMP_DEBUG_STEP_SLEEP", 0.0), "exit_step": num("SDMP_FAULT_EXIT_STEP"),
            "exit_rank": num("SDMP_FAULT_RANK", 0.0), "nan_step": num("SDMP_DEBUG_NAN_STEP")}


class _Stager:
    """Moves host batches to the GPU on a side stream (TorchRec's copy stage); device batches pass through."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, batch: SDMPBatch) -> SDMPBatch:
        if self.stream is None or batch.labels.device == self.device:
            return batch
        with torch.cuda.stream(self.stream):
            if not batch.views[0].is_pinned():
                batch = batch.pin_memory()
            return batch.to(self.device, non_blocking=True)

    def wait(self, batch: SDMPBatch) -> SDMPBatch:
        if self.stream is not None and batch.labels.device == self.device:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            batch.record_stream(current)  # the copy was allocated on self.stream; now step i+1 reads it here
        return batch


class Trainer:
    """Builds loader, model and optimiser from a validated TrainConfig; ``fit()`` runs to ``total_steps``.

    ``rank`` / ``world_size`` follow torch.distributed (already initialised by the caller when > 1)."""

    def __init__(self, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 loader=None, log: Callable[[str], None] = print,
                 agree: Optional[Callable[[Optional[BaseException]], None]] = None):
        """``agree`` (several ranks): called with this rank's error of building the loader and model (or None)
        before the first collective (DDP's); it raises on every rank if one failed (``sdmp-fast train`` shares the
        errors over a gloo group), where a rank that stopped alone left the others waiting in DDP."""
        try:
            problem = None
            try:
                self._build(cfg, rank, world_size, local_rank, loader, log)
            except BaseException as e:  # noqa: BLE001 - raised below, by agree on every rank (Ctrl-C too)
                problem = e
            if agree is not None:
                agree(problem)
            if problem is not None:
                raise problem
            self._build_shared(cfg, world_size)
        except BaseException:
            self.release_ddp()  # a wrapper built before the error: the exception's frames would keep it
            raise

    def release_ddp(self) -> None:
        """Free the DDP wrapper's reducer now, before the process group is destroyed (``sdmp-fast train`` calls
        it when it ends; the trainer does not train after). The reducer holds the group in C++: freed after the
        group's Python object, it destroyed the group holding the GIL, which joins gloo's worker threads, and one
        of them could still need the GIL to free a finished collective's tensors. On torch 2.11 about 1 in 5
        two-rank CPU runs that stopped at a pre-flight check hung there for ever. Its reducer goes even where an
        exception's frames keep the wrapper itself alive."""
        ddp, module = getattr(self, "train_module", None), getattr(self, "module", None)
        if ddp is None or ddp is module:
            return
        self.train_module = self.fwd_student = module
        for name in ("logger", "reducer"):  # the C++ logger holds the reducer too
            ddp.__dict__.pop(name, None)

    def _build(self, cfg: TrainConfig, rank: int, world_size: int, local_rank: int, loader,
               log: Callable[[str], None]) -> None:
        self.cfg, self.rank, self.world_size, self.log = cfg, rank, world_size, log
        check_gpu_per_rank(cfg.device, world_size)
        self.device = resolve_device(cfg.device, local_rank)
        check_gpu_exists(self.device, world_size, local_rank)
        if cfg.deterministic:  # read when cuBLAS makes its first handle: before anything runs on the card
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_bf16 else None
        set_deterministic(cfg.deterministic, self.device)
        if cfg.cuda_graphs and world_size > 1:
            raise ValueError("cuda_graphs: whole-step capture is single-process only (DDP capture is not supported)")

        self.recipe = build_recipe(cfg)
        # synthetic epochs hold 1000 batches whatever --steps is: tied to --steps, a resume with more steps was
        # refused ("steps per epoch now ..."), and --epochs N meant N x 1000 steps anyway
        self.loader = loader if loader is not None else build_loader(cfg, self.recipe, self.device, rank,
                                                                      world_size)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size: {cfg.batch_size} per process leaves no full batch in an epoch")
        self.total_steps = int(cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch)
        if world_size == 1:  # with --epochs the run's length is known only now; several ranks check it once they
            cfg.check_warmups(self.total_steps)  # agree on their data (train_cli), else only some would raise
        self.global_batch = cfg.batch_size * world_size

        self.model, self.spec = build_model(cfg)
        # the global RNG draws the stochastic-depth masks: seeded from the run's seed, apart per rank (so two runs
        # of one config in a process train alike; a resume restores it from the checkpoint)
        torch.manual_seed(cfg.seed * 1009 + rank)
        self.model.to(self.device)
        names = ("base", "momentum") if cfg.method == "mocov3" else ("student", "teacher")
        # MoCo v3's heads always hold BatchNorm, DINO's with --dino-head-bn: synchronised across GPUs
        if world_size > 1 and self.device.type == "cuda" and (cfg.method == "mocov3" or cfg.dino_head_bn):
            for name in names:
                setattr(self.model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self.model, name)))
        self.module, self.target = (getattr(self.model, name) for name in names)
        self.train_module: nn.Module = self.module

    def _build_shared(self, cfg: TrainConfig, world_size: int) -> None:
        """The rest of the build, from the first collective on (DDP's)."""
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            import inspect

            # BN running statistics need no per-forward broadcast (they never feed the loss); the keyword was
            # renamed in newer torch releases
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
            self.train_module = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda"
                                    else None, **no_sync)
        self.fwd_student, self.fwd_target = self.train_module, self.target
        if cfg.compile:
            self.fwd_student = torch.compile(self.train_module)
            self.fwd_target = torch.compile(self.target)
        self.ema_targets = [t for t, _ in self.model.ema_pairs()]
        self.ema_sources = [s for _, s in self.model.ema_pairs()]

        groups = param_groups(self.module, cfg.method)
        self.decay_params = groups[0]["params"]
        self.trainable = [p for g in groups for p in g["params"]]
        self.last_layer_params = (list(self.model.student.head.last_layer.parameters())
                                  if cfg.method == "dino" else [])
        self.graph_mode = bool(cfg.cuda_graphs)
        peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * self.global_batch / 256
        # Decoupled weight decay is applied by us (p *= 1 - lr*wd, exactly AdamW's first operation) so that a
        # scheduled decay works inside a captured graph; AdamW itself runs with weight_decay=0.
        opt_lr = torch.tensor(peak_lr, device=self.device) if self.graph_mode else peak_lr
        self.optimizer = torch.optim.AdamW(groups, lr=opt_lr, weight_decay=0.0, fused=True,
                                           capturable=self.graph_mode)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(0.1 * self.total_steps))
        tau_warm = (cfg.tau_t_warmup_steps if cfg.tau_t_warmup_steps is not None
                    else int(round(0.3 * self.total_steps)))
        self.schedules = Schedules(self.total_steps, peak_lr, cfg.min_lr, min(warmup, self.total_steps),
                                   cfg.weight_decay, cfg.weight_decay_end, cfg.momentum, cfg.tau_t, cfg.tau_t_end,
                                   tau_warm, cfg.momentum_end)
        self.freeze_last_steps = (cfg.freeze_last_layer_epochs or 0) * self.steps_per_epoch
        if cfg.method == "dino" and self.freeze_last_steps >= self.total_steps:
            self.log(f"warning: the DINO prototype layer stays frozen for the whole run (freeze_last_layer_epochs="
                f"{cfg.freeze_last_layer_epochs}: {self.freeze_last_steps} steps of {self.steps_per_epoch}-step "
                f"epochs, the run has {self.total_steps}); --freeze-last-layer-epochs 0 trains it from the start")
        self.moco_terms_fn, self.dino_terms_fn, self.loss_impl = loss_functions(cfg, self.device)
        # DINO also logs the teacher's health: mean per-sample entropy of P_t (~0: sharp, ln K: uniform
        # collapse) and the entropy of its batch mean (~0 with a sharp P_t: one-prototype collapse)
        self.diag_names = ("teacher_entropy", "teacher_batch_entropy") if cfg.method == "dino" else ()
        self.names = ("loss",) + term_names(cfg) + ("grad_norm",) + self.diag_names

        # host state (checkpointed)
        self.step, self.epoch, self.position = 0, 0, 0
        self.swap_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
        # device state: non-finite flag and metric accumulators (read every log_every steps)
        dev = self.device
        self._found_inf = torch.zeros((), device=dev)
        self.optimizer.found_inf = self._found_inf
        self._acc = torch.zeros(len(self.names), device=dev, dtype=torch.float64)
        self._n_ok = torch.zeros((), device=dev, dtype=torch.float64)
        self._n_bad = torch.zeros((), device=dev, dtype=torch.float64)
        self._dev_step = torch.zeros((), device=dev, dtype=torch.float64)
        self._first_bad_step = torch.full((), -1.0, device=dev, dtype=torch.float64)
        self._first_bad_mask = torch.zeros(len(self.names), device=dev, dtype=torch.bool)
        # device scalars of the schedules (used by the graph path; the eager path passes floats)
        self._sched_t = {k: torch.zeros((), device=dev) for k in ("lr", "wd", "keep")}
        self._graph = None
        self._static: Optional[List] = None
        self._side_stream = None  # the eager warm-up steps' stream (_graph_step)
        self.stop_signal: Optional[int] = None  # set by the signal handler of this process
        self.agreed_stop_signal: Optional[int] = None  # what all ranks stop for (set at sync points)
        self.debug = _debug_env()
        self.skipped_total = 0
        self.resumed_record: Optional[Dict] = None  # set by load_state_dict
        self._data_id: Optional[Dict] = None
        # now, not at the first checkpoint: a file read later (a .beton replaced meanwhile) is not what is trained
        self._data_identity()
        self.meta = {"backbone_spec": self.spec, "method": cfg.method, "sdmp": cfg.sdmp,
                     "backbone_prefix": "base.backbone." if cfg.method == "mocov3" else "teacher.backbone.",
                     "mean": [float(v) for v in getattr(self.loader, "mean", self.recipe.mean)],
                     "std": [float(v) for v in getattr(self.loader, "std", self.recipe.std)],
                     "img_size": cfg.img_size, "patch_size": cfg.patch_size}

    # ----------------------------------------------------------------------------------------- contexts
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # inside a CUDA graph capture the autocast weight-cast cache must be off (cached casts are not replayed)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.graph_mode)

    # ----------------------------------------------------------------------------------------- inputs
    def step_inputs(self, batch: SDMPBatch, swap: bool) -> List[torch.Tensor]:
        """The flat list of tensors one step reads, in role order (the MoCo view swap is applied here)."""
        cfg = self.cfg
        if cfg.method == "mocov3":
            x1, x2 = batch.views[0], batch.views[1]
            if not cfg.sdmp:
                return [x2, x1] if swap else [x1, x2]
            if batch.lam is None or len(batch.mixed_views) < 2:
                raise ValueError("loader: SDMP-MoCo needs batches with mixed views of both views (sdmp on)")
            self._check_mixed_from(batch, (0, 1))
            x1m, x2m = batch.mixed_views[0], batch.mixed_views[1]
            return ([x2, x1, x2m, x1m] if swap else [x1, x2, x1m, x2m]) + [batch.lam]
        n_local = cfg.n_local
        if not cfg.sdmp:
            return list(batch.views[: 2 + n_local])
        n_clean = n_local - cfg.n_local_mixed
        if batch.lam is None or len(batch.mixed_views) != 2 + cfg.n_local_mixed:
            raise ValueError("loader: SDMP-DINO needs batches with mixed global and local crops (sdmp on)")
        self._check_mixed_from(batch, (0, 1) + tuple(range(2 + n_clean, 2 + n_local)))
        # The loss's lam is that of the mixed crops the *student* sees, the local ones (eq. 7: lam_i of x_i^m),
        # i.e. mixed_lam[2] (every local crop has one size, so one lam). batch.lam is the first mixed view's, a
        # global crop's: its box rounds otherwise (224 vs 96 px: up to ~1.2 points off the pasted area).
        lam = batch.mixed_lam[2] if batch.mixed_lam else batch.lam
        return list(batch.views[: 2 + n_clean]) + list(batch.mixed_views) + [lam]

    @staticmethod
    def _check_mixed_from(batch: SDMPBatch, expected: Tuple[int, ...]) -> None:
        """The mixed views are taken by position: a loader whose recipe mixed other views (a Trainer given its
        own loader) would train them in the wrong roles, silently."""
        if tuple(batch.mixed_from) != expected:
            raise ValueError(f"loader: batches mix views {tuple(batch.mixed_from)} (mixed_from) but this run's "
                             f"method and crops take mixed copies of views {expected}: make the loader with the "
                             f"run's recipe (its mix.mixed_views)")

    # ----------------------------------------------------------------------------------------- losses
    def _moco_loss(self, inputs: Sequence[torch.Tensor], tau_t) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        cfg, W, r = self.cfg, self.world_size, self.rank
        if cfg.sdmp:
            x1, x2, x1m, x2m, lam = inputs
            with self._autocast():
                q1, q2m = self.fwd_student(torch.cat([x1, x2m]), 2)
                with torch.no_grad():
                    k1, k2, k1m = self.fwd_target(torch.cat([x1, x2, x1m]), 3)
            n = k1.shape[0]
            keys = _gather_no_grad(torch.cat([k1, k2, k1m]), W).float()
            if W > 1:
                keys = keys.view(W, 3, n, -1)
                k1, k2, k1m = (keys[:, j].reshape(W * n, -1) for j in range(3))
            else:
                k1, k2, k1m = keys.chunk(3)
            terms = self.moco_terms_fn(q1.float(), q2m.float(), k1, k2, k1m, lam, cfg.tau, r, W)
            t = [terms["source"], terms["mix_source"], terms["mix_mix"]]
            return t[0] + cfg.mix_weight * (t[1] + t[2]), t
        x1, x2 = inputs
        with self._autocast():
            q1, q2 = self.fwd_student(torch.cat([x1, x2]), 2)
            with torch.no_grad():
                k1, k2 = self.fwd_target(torch.cat([x1, x2]), 2)
        n = k1.shape[0]
        keys = _gather_no_grad(torch.cat([k1, k2]), W).float()
        if W > 1:
            keys = keys.view(W, 2, n, -1)
            k1, k2 = (keys[:, j].reshape(W * n, -1) for j in range(2))
        else:
            k1, k2 = keys.chunk(2)
        t = [_moco_ctr(q1.float(), k2, cfg.tau, r), _moco_ctr(q2.float(), k1, cfg.tau, r)]
        return t[0] + t[1], t

    def _dino_loss(self, inputs: Sequence[torch.Tensor], tau_t) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        cfg = self.cfg
        if cfg.sdmp:
            n_clean = 2 + cfg.n_local - cfg.n_local_mixed
            *crops, lam = inputs
            clean, mixed = crops[:n_clean], crops[n_clean:]
            student_crops = clean + mixed[2:]
            teacher_crops = clean[:2] + mixed[:2]
        else:
            lam, clean, mixed = None, list(inputs), []
            student_crops, teacher_crops = clean, clean[:2]
        B = clean[0].shape[0]
        with self._autocast():
            s_out = self.fwd_student(student_crops)
            with torch.no_grad():
                t_out = self.fwd_target(teacher_crops)
        s_out = s_out.view(len(student_crops), B, -1)
        t_out = t_out.view(len(teacher_crops), B, -1)
        n_sc = len(clean)
        t_clean = t_out[:2]
        t_mixed = t_out[2:] if cfg.sdmp else None
        s_mixed = s_out[n_sc:] if cfg.sdmp else None
        center = self.model.center
        self._pending_diag = _teacher_entropies(t_clean, center, tau_t)
        terms, self._pending_center_mean = self.dino_terms_fn(s_out[:n_sc], s_mixed, t_clean, t_mixed, center, lam,
                                                              cfg.tau_s, tau_t, cfg.mix_weight)
        if cfg.sdmp:
            t = [terms["dino"], terms["mix_source"], terms["mix_teacher"]]
        else:
            t = [terms["dino"]]
        return terms["loss"], t

    # ----------------------------------------------------------------------------------------- one step
    def _step_body(self, inputs: Sequence[torch.Tensor], lr, wd, keep, tau_t, freeze_last: bool) -> None:
        """Forward, backward, update: device work only (capturable). lr/wd/keep: floats or 0-dim tensors."""
        cfg = self.cfg
        loss_fn = self._moco_loss if cfg.method == "mocov3" else self._dino_loss
        loss, terms = loss_fn(inputs, tau_t)
        if self.debug["nan_step"] >= 0 and not self.graph_mode and self.step == int(self.debug["nan_step"]):
            loss = loss * float("nan")  # fault injection (SDMP_DEBUG_NAN_STEP)
        loss.backward()
        if freeze_last:  # DINO: prototypes frozen during the first epoch(s): no gradient, no Adam update
            for p in self.last_layer_params:
                p.grad = None
        with torch.no_grad():
            self._update(loss, terms, lr, wd, keep)

    def _update(self, loss, terms, lr, wd, keep) -> None:
        """Gradient norm (clipped per parameter for DINO), non-finite flag, weight decay, AdamW, EMA, center,
        metrics."""
        cfg = self.cfg
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads))  # one norm per parameter tensor
        gnorm = torch.linalg.vector_norm(norms)  # logged: the global norm before clipping
        if cfg.clip_grad and cfg.clip_grad > 0:
            # DINO's utils.clip_gradients: each parameter tensor's gradient is clipped to norm clip_grad on its own
            # (not the global norm: at 3.0 that would shrink every step of a ViT's many-tensor gradient)
            torch._foreach_mul_(grads, list((cfg.clip_grad / (norms + 1e-6)).clamp(max=1.0).unbind()))
        diag = [self._pending_diag.float()] if self.diag_names else []
        vals = torch.cat([torch.stack([loss.detach().float()] + [t.detach().float() for t in terms] +
                                      [gnorm.float()])] + diag)
        nonfinite = ~torch.isfinite(vals)
        bad = nonfinite.any().float()
        if self.world_size > 1:  # every rank must skip (or not) the same step, or parameters would diverge
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._found_inf.copy_(bad)
        ok = 1.0 - bad
        # decoupled weight decay (AdamW's p *= 1 - lr*wd), skipped with the step when it is flagged
        decay = [p for p in self.decay_params if p.grad is not None]  # frozen (grad None) params: no decay
        torch._foreach_mul_(decay, 1.0 - (lr * wd) * ok)
        self.optimizer.step()  # fused AdamW: reads self._found_inf and skips the update when it is 1
        self.optimizer.zero_grad(set_to_none=not self.graph_mode)
        ema_update_(self.ema_targets, self.ema_sources, keep + (1.0 - keep) * bad)
        if cfg.method == "dino":
            mean = self._pending_center_mean
            if self.world_size > 1:
                dist.all_reduce(mean)
                mean = mean / self.world_size
            c = self.model.center
            new_c = ref_losses.dino_center_update(c, None, cfg.center_momentum, batch_mean=mean)
            c.copy_(torch.where(bad > 0, c, new_c))
        self._dev_step += 1
        # a skipped step adds none of its terms (its finite ones too): the window mean counts good steps only
        self._acc += torch.where(bad > 0, torch.zeros_like(vals), vals).double()
        self._n_ok += ok.double()
        self._n_bad += bad.double()
        record = (bad > 0) & (self._first_bad_step < 0)
        self._first_bad_step.copy_(torch.where(record, self._dev_step - 1, self._first_bad_step))
        self._first_bad_mask.copy_(torch.where(record, nonfinite, self._first_bad_mask))

    def ema_keep(self, step: int) -> float:
        """The EMA keep rate of the update after optimiser step ``step``. DINO updates its teacher right after the
        step with that step's momentum; MoCo v3 updates its momentum encoder at the start of the next iteration
        (in the forward, before the keys), with the next iteration's momentum m(step + 1), the same base weights
        blended in. Its update at iteration 0 is a no-op (the copy is fresh), so this is MoCo v3's exactly."""
        return self.schedules.ema_keep(step + 1 if self.cfg.method == "mocov3" else step)

    def train_step(self, batch: SDMPBatch) -> None:
        """One optimiser step on ``batch`` (already on the device); no host sync."""
        swap = bool(torch.randint(0, 2, (1,), generator=self.swap_gen).item()) if self.cfg.method == "mocov3" \
            else False
        inputs = self.step_inputs(batch, swap)
        s = self.schedules
        lr, wd, keep, tau_t = s.lr(self.step), s.weight_decay(self.step), self.ema_keep(self.step), \
            s.teacher_temp(self.step)
        freeze_last = self.step < self.freeze_last_steps
        for g in self.optimizer.param_groups:
            if self.graph_mode:
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        self.module.train()
        self.target.train()
        if not self.graph_mode:
            self._step_body(inputs, lr, wd, keep, tau_t, freeze_last)
        else:
            self._graph_step(inputs, lr, wd, keep, tau_t, freeze_last)
        self.step += 1

    # ----------------------------------------------------------------------------------------- CUDA graph
    def _graph_step(self, inputs, lr, wd, keep, tau_t, freeze_last) -> None:
        """Eager warm-up steps on static buffers (also the DINO frozen-prototype period), then one capture of
        the whole step; afterwards: copy the batch into the static buffers, refresh the schedule scalars,
        replay."""
        st = self._sched_t
        for name, v in (("lr", lr), ("wd", wd), ("keep", keep)):
            st[name].fill_(v)
        if self._static is None:
            self._static = [t.clone() for t in inputs]
            self._graph_warmup = 0
        for dst, src in zip(self._static, inputs):
            dst.copy_(src)
        # the teacher temperature is a float argument of the loss (kernels take it as a scalar): the graph is
        # captured once its warm-up is over, when it is constant
        args = (self._static, st["lr"], st["wd"], st["keep"], tau_t)
        if self._graph is not None:
            self._graph.replay()
            return
        # one side stream for every eager step: the caching allocator reuses a freed block only on the stream
        # that freed it, so a new stream per step would cache each step's activations apart
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        tau_warm = self.cfg.method == "dino" and self.step < self.schedules.tau_t_warmup_steps
        if freeze_last or tau_warm or self._graph_warmup < 3:
            with torch.cuda.stream(side):
                self._step_body(*args, freeze_last)
            torch.cuda.current_stream(self.device).wait_stream(side)
            # only steps that update every parameter count: the frozen DINO prototypes get their AdamW state
            # on their first update, which must not happen inside the capture (its zero-fills would be
            # recorded and replayed, wiping that state every step)
            self._graph_warmup = 0 if freeze_last else self._graph_warmup + 1
            return
        torch.cuda.synchronize(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture forbids unsafe CUDA calls on this thread only. In the default "global" mode a
        # loader's own threads (DataLoader's pin-memory thread pinning the next batch, DALI's prefetching
        # executor) would fail, or wreck the capture, with any cudaHostAlloc / event query made meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step_body(*args, False)
        self._graph = graph
        graph.replay()  # capture records without running: this replay is the step itself

    # ----------------------------------------------------------------------------------------- metrics
    def read_metrics(self) -> Dict[str, float]:
        """One host sync: the window's mean loss terms and the non-finite bookkeeping; resets the window."""
        flat = torch.cat([self._acc, self._n_ok[None], self._n_bad[None], self._first_bad_step[None],
                          self._first_bad_mask.double()]).tolist()
        k = len(self.names)
        acc, n_ok, n_bad, first_bad, mask = flat[:k], flat[k], flat[k + 1], flat[k + 2], flat[k + 3:]
        self._acc.zero_()
        self._n_ok.zero_()
        self._n_bad.zero_()
        out = {name: (a / n_ok if n_ok > 0 else float("nan")) for name, a in zip(self.names, acc)}
        out["skipped"] = int(n_bad)
        self.skipped_total += int(n_bad)
        if n_bad > 0 and self.cfg.nan_policy == "stop":
            which = [n for n, m in zip(self.names, mask) if m > 0.5]
            raise NonFiniteError(
                f"non-finite {' and '.join(which)} at step {int(first_bad) + 1} (of {self.total_steps}); that "
                f"step's update was skipped and the run stopped (nan_policy=stop, detected within log_every="
                f"{self.cfg.log_every} steps); the last checkpoint predates it. Lower the lr, check the data, or "
                f"use --nan-policy skip")
        if n_bad > 0:
            self._first_bad_step.fill_(-1)
        return out

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict:
        rng = ckpt.rng_state()
        rng["swap"] = self.swap_gen.get_state()
        loader_state = getattr(self.loader, "state_dict", None)
        if callable(loader_state):  # a stateful loader (DALI: its random state at recent epoch starts), per rank
            rng["loader"] = loader_state()
        if self.world_size > 1:
            ranks_rng: List = [None] * self.world_size
            dist.all_gather_object(ranks_rng, rng)
        else:
            ranks_rng = [rng]
        return {"format": ckpt.FORMAT_VERSION, "step": self.step, "epoch": self.epoch, "position": self.position,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "world_size": self.world_size, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": ranks_rng, "config": self.cfg.to_dict(),
                "meta": dict(self.meta, step=self.step), "skipped_total": self.skipped_total,
                "data": self._data_identity()}

    def load_state_dict(self, state: Dict) -> None:
        bad = mismatches(state["config"], self.cfg)
        if bad:
            raise ValueError(f"resume: the checkpoint was made with other settings: {'; '.join(bad)}")
        if state.get("world_size", self.world_size) != self.world_size:
            # the global batch (and the lr scaled with it), the shards and every rank's RNG state depend on it
            raise ValueError(f"resume: the checkpoint was made by {state['world_size']} process(es), this run has "
                             f"{self.world_size}: resume with the same number of processes")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"resume: {self.steps_per_epoch} steps per epoch now, {state['steps_per_epoch']} in "
                             f"the checkpoint (data or world size changed)")
        self.model.load_state_dict(state["model"])
        self.resumed_record = state.get("record")  # the checkpoint step's metrics record (RunLogger)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # other parameter groups: written before they followed DINO / MoCo v3 (2026-11-27)
            raise ValueError(f"resume: the checkpoint's optimiser state does not fit this version's parameter groups "
                             f"({e}); a checkpoint written before the weight-decay groups followed DINO / MoCo v3 "
                             f"(2026-11-27) cannot be resumed") from None
        self.optimizer.found_inf = self._found_inf
        for g in self.optimizer.param_groups:  # the checkpoint may come from a run in the other step mode
            g["capturable"] = self.graph_mode
            if self.graph_mode:
                g["lr"] = torch.tensor(float(g["lr"]), device=self.device)
        self._dev_step.fill_(int(state["step"]))
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.skipped_total = int(state.get("skipped_total", 0))
        then, now = state.get("data"), self._data_identity()
        if then is not None and now is not None and then != now:
            warnings.warn(f"resume: the data set is not the one the checkpoint was trained on ({then['files']} files "
                          f"then, {now['files']} now, or other names / labels / order / content): the batches from "
                          f"here on are not the ones the interrupted run would have seen", RuntimeWarning)
        rngs = state["rng"]
        mine = rngs[self.rank] if len(rngs) == self.world_size else rngs[0]
        ckpt.set_rng_state(mine)
        self.swap_gen.set_state(mine["swap"])
        load_loader = getattr(self.loader, "load_state_dict", None)
        if callable(load_loader):
            if mine.get("loader") is not None:
                load_loader(mine["loader"])
            else:
                warnings.warn("resume: the checkpoint holds no loader state (written before loaders had one): "
                              "the loader's own random state (DALI's) starts afresh, so augmentations differ")

    def _data_identity(self) -> Optional[Dict]:
        """{"files", "sha1"} of the loader's data: an image-file loader's list, a loader's own ``data_identity()``
        (FFCV: the .beton's content; None: it cannot tell); None for in-memory and synthetic data."""
        if self._data_id is None:  # a million paths hash in about a second: once per run (at __init__)
            own = getattr(self.loader, "data_identity", None)
            images = getattr(self.loader, "images", None)
            if callable(own):
                got = own()  # a loader of one's own that cannot tell returns None, as this method does
                self._data_id = dict(got) if got is not None else None
            elif hasattr(images, "fingerprint"):
                self._data_id = {"files": len(images), "sha1": images.fingerprint()}
        return self._data_id

    def save(self, out: str, record: Optional[Dict] = None) -> Optional[str]:
        """Checkpoint (rank 0 writes; all ranks take part in gathering RNG states). ``record``: the step's
        metrics record, kept in the checkpoint so that a resume can append it when the run stopped between the
        save and the record (a kill, a full disk): it was lost for good."""
        state = self.state_dict()
        if record is not None:
            state["record"] = {k: v for k, v in record.items() if v is None or isinstance(v, (bool, int, float, str))}
        path = None
        if self.rank == 0:
            path = ckpt.save_checkpoint(state, ckpt.checkpoint_dir(out), self.step, self.cfg.keep_checkpoints)
        if self.world_size > 1:
            dist.barrier()
        return path

    # ----------------------------------------------------------------------------------------- data
    def batches(self) -> Iterator[Tuple[int, int, SDMPBatch]]:
        """(epoch, index in epoch, batch) from the current (epoch, position) on, across epochs forever
        (``pipelines.resume_batches``: a resumed run re-reads and drops the first ``position`` batches of its
        epoch, and sees the batches the interrupted run would have seen)."""
        from sdmp_fast.pipelines.base import EmptyEpochError, resume_batches

        try:
            yield from resume_batches(self.loader, self.epoch, self.position)
        except EmptyEpochError as e:
            raise ValueError(f"data: epoch {e.epoch} of the {self.cfg.loader} loader over {self.cfg.data!r} gave no "
                             f"batch (every file undecodable? see the loader's warnings)") from None

    def mark_done(self, epoch: int, index: int) -> None:
        """Record that the batch (epoch, index) has been trained on (what a checkpoint resumes after)."""
        if index + 1 >= self.steps_per_epoch:
            self.epoch, self.position = epoch + 1, 0
        else:
            self.epoch, self.position = epoch, index + 1

    # ----------------------------------------------------------------------------------------- the loop
    def _agree_stop(self) -> bool:
        """Whether to stop now. One process: the signal flag. Several: any rank's flag, agreed through one
        all-reduce at sync points only (so a signal stops the run within log_every steps, on every rank at
        the same step)."""
        if self.world_size == 1:
            self.agreed_stop_signal = self.stop_signal
            return self.stop_signal is not None
        # the signal itself is agreed too, so that every rank reports it and exits with the same code: SIGINT on
        # any rank (a user's Ctrl-C) outranks a SIGTERM elsewhere (preemption)
        mine = {None: 0.0, signal.SIGINT: 2.0}.get(self.stop_signal, 1.0)
        t = torch.tensor([mine], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        agreed = int(t.item())
        self.agreed_stop_signal = (None, signal.SIGTERM, signal.SIGINT)[agreed]  # handlers cover these two
        return agreed > 0

    def fit(self, out: str, logger=None) -> str:
        """Train until ``total_steps`` ("done") or a stop signal ("signal", after a checkpoint). Metrics are
        read at sync points: every log_every steps, before each checkpoint, at the end."""
        from sdmp_fast.runlog import RunLogger

        own_logger = logger is None
        if own_logger:  # in-process use: metrics.jsonl only
            if self.rank == 0:
                os.makedirs(out, exist_ok=True)
            logger = RunLogger(out, self.total_steps, self.step, enabled=self.rank == 0, progress=False,
                               tensorboard=False, resumed_record=self.resumed_record)
        try:
            return self._fit(out, logger)
        finally:
            if own_logger:
                logger.close()

    def _fit(self, out: str, logger) -> str:
        cfg = self.cfg
        stager = _Stager(self.device)
        it = self.batches()
        t_start = t_last = time.perf_counter()
        step_last = self.step
        nxt = None
        if self.step < self.total_steps:
            e, i, b = next(it)
            nxt = (e, i, stager.stage(b))
        result = "done"
        dump = os.environ.get("SDMP_DEBUG_DUMP") == "1"  # tests: every rank dumps its parameters + indices
        seen: List[torch.Tensor] = []
        while self.step < self.total_steps:
            e, i, b = nxt
            b = stager.wait(b)
            if dump:
                seen.append(b.indices.cpu())
            self.train_step(b)
            self.mark_done(e, i)
            if self.step < self.total_steps:  # fetch + stage the next batch while this step computes
                e2, i2, b2 = next(it)
                nxt = (e2, i2, stager.stage(b2))
            logger.tick()
            self._debug_hooks()
            save_due = bool(cfg.save_every) and self.step % cfg.save_every == 0
            last = self.step >= self.total_steps
            sync = self.step % cfg.log_every == 0 or save_due or last or \
                (self.world_size == 1 and self.stop_signal is not None)
            if not sync:
                continue
            metrics = self.read_metrics()  # raises NonFiniteError (policy stop) before any checkpoint write
            stop = self._agree_stop() and not last
            now = time.perf_counter()
            rec = {"step": self.step, "epoch": round(self.epoch + self.position / self.steps_per_epoch, 4)}
            rec.update(metrics)
            if self.step > 0:  # the values the last step used (the EMA's keep rate is the trainer's, not at()'s)
                rec.update(self.schedules.at(self.step - 1), momentum=self.ema_keep(self.step - 1))
            if cfg.method != "dino":
                rec.pop("tau_t", None)
            rec["img_per_s"] = (self.step - step_last) * self.global_batch / max(now - t_last, 1e-9)
            rec["time_s"] = round(now - t_start, 3)
            if self.device.type == "cuda":  # the allocator's own counter: a host read, no device sync
                rec["max_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            t_last, step_last = now, self.step
            if save_due or last or stop:
                # before the step's record: a record at a save step then proves its checkpoint was written
                # (train --resume tells lost checkpoints from a first save that failed by it)
                rec["checkpoint"] = True  # written (save raises otherwise): a stop's save is no save_every step
                path = self.save(out, record=rec)
                if path and (stop or last):
                    logger.write(f"checkpoint: {path}")
            logger.record(rec)
            if metrics["skipped"]:
                logger.write(f"warning: {metrics['skipped']} step(s) with a non-finite loss/gradient skipped "
                             f"before step {self.step} (nan_policy=skip)")
            if stop:
                result = "signal"
                break
        self._report_skipped_files(ahead=self.step < self.total_steps)
        if dump:
            torch.save({"model": self.model.state_dict(), "indices": torch.cat(seen) if seen else torch.empty(0),
                        "step": self.step}, os.path.join(out, f"debug-rank{self.rank}.pt"))
        if result == "done" and self.rank == 0:
            bb = self.model.base.backbone if cfg.method == "mocov3" else self.model.teacher.backbone
            ckpt.export_backbone(bb, out, dict(self.meta, step=self.step))
        return result

    def _report_skipped_files(self, ahead: bool) -> None:
        """The loader warns of skipped files at the end of each epoch it finishes; the run's last epoch, cut short
        by total_steps or a signal (or ended at its last batch, before the loader's own report), is told here.
        ``ahead``: the loop had fetched the next batch (a stop signal), which is in epoch ``self.epoch``."""
        from sdmp_fast.pipelines.skips import SkipLog

        log = getattr(self.loader, "log", None)
        if isinstance(log, SkipLog):
            unfinished = ahead or self.position > 0
            log.end_epoch(self.epoch if unfinished else self.epoch - 1, unfinished=unfinished)

    def _debug_hooks(self) -> None:
        d = self.debug
        if d["step_sleep"] > 0:
            time.sleep(d["step_sleep"])
        if d["exit_step"] >= 0 and self.step == int(d["exit_step"]) and self.rank == int(d["exit_rank"]):
            os._exit(17)  # fault injection: this rank dies without cleanup (SDMP_FAULT_EXIT_STEP)
