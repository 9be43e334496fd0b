"""Training configuration: one dataclass, filled from defaults < YAML file (yaml.safe_load) < command line,
then validated as a whole *before* any data is read, any model is built or anything under ``out`` is touched.

Every error is a ValueError whose message starts with the setting's name, e.g. ``batch_size: ...``.
``None`` defaults are method-dependent and resolved by ``resolve()`` (MoCo v3 / DINO paper values).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["TrainConfig", "METHODS", "LOADERS", "load_config", "add_config_arguments", "config_from_args",
           "RESUME_MUST_MATCH"]

METHODS = ("mocov3", "dino")
LOADERS = ("dali", "ffcv", "torchvision", "torch-gpu", "memory", "synthetic")
MIX_METHODS = ("mixup", "cutmix", "resizemix")
INTERPOLATIONS = ("bicubic", "bilinear")  # pipelines.recipes.INTERPOLATIONS (kept here: no torch import)

# Method defaults (MoCo v3 ViT recipe; DINO ViT-S recipe), used where the user left a setting unset.
METHOD_DEFAULTS = {
    "mocov3": {"base_lr": 1.5e-4, "min_lr": 0.0, "weight_decay": 0.1, "weight_decay_end": None, "momentum": 0.99,
               "mix_weight": 1.0, "clip_grad": 0.0, "drop_path_rate": 0.0, "freeze_last_layer_epochs": 0},
    "dino": {"base_lr": 5e-4, "min_lr": 1e-6, "weight_decay": 0.04, "weight_decay_end": 0.4, "momentum": 0.996,
             "mix_weight": 0.5, "clip_grad": 3.0, "drop_path_rate": 0.1, "freeze_last_layer_epochs": 1},
}

# make_loader's arguments the trainer fills itself: not loader_options
TRAINER_LOADER_ARGS = ("backend", "data", "recipe", "batch_size", "device", "shard_id", "num_shards", "shuffle",
                       "drop_last", "seed", "num_workers")
# loader options that change only how fast batches come (not their pixels or random draws): a resume may change
# them, as it may change num_workers
THROUGHPUT_LOADER_OPTIONS = ("prefetch_factor", "prefetch", "num_threads", "read_threads", "prefetch_queue_depth",
                             "batches_ahead", "os_cache")

# Settings a --resume must agree on with the checkpoint (they change the model, the data order or the math).
RESUME_MUST_MATCH = ("method", "sdmp", "arch", "img_size", "patch_size", "depth", "embed_dim", "num_heads",
                     "local_size", "n_local", "n_local_mixed", "batch_size", "seed", "proj_hidden_dim", "proj_dim",
                     "dino_out_dim", "dino_hidden_dim", "dino_bottleneck_dim", "dino_head_bn", "freeze_patch_embed", "loader",
                     "alpha", "mix_methods", "mix_weight", "tau", "interpolation", "drop_path_rate",
                     "dino_norm_last_layer", "loader_options", "moco_predictor_bn")
# What a checkpoint written before a setting existed ran with, where that differs from today's default.
SETTING_BEFORE_IT_EXISTED = {"interpolation": "bilinear",  # crops were resized bilinearly until 2026-11-27
                             "drop_path_rate": 0.0,  # no stochastic depth until 2026-11-27
                             "loader_options": {},  # no backend options from the trainer until 2026-11-28
                             "moco_predictor_bn": False}  # MoCo v3's predictor ended without BN until 2026-11-30


def _f(default, help_, choices=None, **meta):
    return field(default=default, metadata={"help": help_, "choices": choices, **meta})


@dataclass
class TrainConfig:
    # what to train
    method: str = _f("mocov3", "SSL method", METHODS)
    sdmp: bool = _f(True, "SDMP mixing and its loss terms on/off (off = the same code path minus mixing)",
                    kind="onoff")
    arch: str = _f("vit_small_patch16_224", "timm ViT name (never pretrained)")
    img_size: int = _f(224, "input (global crop) size")
    patch_size: int = _f(16, "ViT patch size")
    depth: Optional[int] = _f(None, "override the ViT depth (small CPU models)")
    embed_dim: Optional[int] = _f(None, "override the ViT width")
    num_heads: Optional[int] = _f(None, "override the ViT head count")
    drop_path_rate: Optional[float] = _f(None, "stochastic depth of the trained encoder only, never of its EMA copy "
                                               "(DINO 0.1 on the student, MoCo v3 0)")
    local_size: int = _f(96, "DINO local crop size")
    n_local: int = _f(8, "DINO local crops per image")
    n_local_mixed: int = _f(4, "DINO local crops replaced by mixed local crops (SDMP on)")
    # data
    loader: str = _f("torchvision", "loader backend ('synthetic': random tensors already on the device, 1000 batches an epoch)", LOADERS)
    data: Optional[str] = _f(None, "ImageFolder dir (or a flat folder of unlabeled images) / .beton / 'fashion-mnist' (memory loader)")
    num_workers: Optional[int] = _f(None, "loader worker processes / threads")
    loader_options: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the loader backend's own options, passed to make_loader: key=value,... (values read as YAML) or a "
                "YAML mapping, e.g. mix_in_graph=true,prefetch_queue_depth=3 or '{decoder_options: "
                "{hw_decoder_load: 0.9}}' for dali, prefetch_factor=4 for torchvision", "choices": None,
        "kind": "options"})
    interpolation: str = _f("bicubic", "how crops are resized to the view size (BYOL / DINO / solo-learn: bicubic; "
                            "FFCV always uses its own area resize)", INTERPOLATIONS)
    batch_size: int = _f(256, "batch size per process (global batch = batch_size x world size)")
    # how long
    steps: Optional[int] = _f(None, "total optimiser steps (a resumed run stops at the same total)")
    epochs: Optional[int] = _f(None, "total epochs (alternative to --steps)")
    # optimisation
    lr: Optional[float] = _f(None, "peak learning rate (default: base_lr x global batch / 256)")
    base_lr: Optional[float] = _f(None, "learning rate per 256 images (MoCo v3 1.5e-4, DINO 5e-4)")
    min_lr: Optional[float] = _f(None, "final learning rate of the cosine (MoCo v3 0, DINO 1e-6)")
    warmup_steps: Optional[int] = _f(None, "linear lr warm-up steps (default 10%% of the run)")
    weight_decay: Optional[float] = _f(None, "weight decay (MoCo v3 0.1, DINO 0.04)")
    weight_decay_end: Optional[float] = _f(None, "final weight decay of the cosine (DINO 0.4; MoCo v3: "
                                              "= --weight-decay, constant)")
    momentum: Optional[float] = _f(None, "EMA keep rate at step 0, cosine to momentum_end (MoCo v3 0.99, DINO 0.996)")
    momentum_end: float = _f(1.0, "final EMA keep rate (1 as in the papers; = --momentum keeps it constant)")
    clip_grad: Optional[float] = _f(None, "gradient clipping: each parameter tensor's gradient norm capped at this "
                                           "value on its own, as DINO's clip_gradients; 0 = off (DINO 3.0)")
    # SDMP
    mix_weight: Optional[float] = _f(None, "weight of the mixed-loss terms (MoCo v3 1.0 per Algorithm 1, DINO 0.5)")
    alpha: float = _f(1.0, "Beta(alpha, alpha) of the mixing lambda")
    mix_methods: Tuple[str, ...] = _f(MIX_METHODS, "mixing methods drawn per sample (comma-separated)",
                                      kind="list")
    # method details
    tau: float = _f(0.2, "MoCo v3 temperature")
    proj_hidden_dim: int = _f(4096, "MoCo v3 projector / predictor hidden width")
    proj_dim: int = _f(256, "MoCo v3 output dim")
    freeze_patch_embed: bool = _f(True, "MoCo v3 frozen random patch embedding", kind="onoff")
    moco_predictor_bn: bool = _f(True, "MoCo v3: the predictor ends in an affine-free BatchNorm, as MoCo v3's ViT "
                                       "model (off: its ResNet one; runs before 2026-11-30)", kind="onoff")
    dino_out_dim: int = _f(65536, "DINO prototypes K")
    dino_hidden_dim: int = _f(2048, "DINO head hidden width")
    dino_bottleneck_dim: int = _f(256, "DINO head bottleneck")
    dino_head_bn: bool = _f(False, "DINO: BatchNorm in the head's hidden layers (DINO's use_bn_in_head; SyncBN "
                                   "across GPUs)", kind="onoff")
    dino_norm_last_layer: bool = _f(True, "DINO: prototype layer with its weight-norm gain fixed at 1 (DINO's "
                                          "norm_last_layer; DINO sets it off for ViT-S/16, on for ViT-B)", kind="onoff")
    tau_s: float = _f(0.1, "DINO student temperature")
    tau_t: float = _f(0.04, "DINO teacher temperature at step 0")
    tau_t_end: float = _f(0.07, "DINO teacher temperature after warm-up")
    tau_t_warmup_steps: Optional[int] = _f(None, "DINO teacher temperature warm-up steps (default 30%% of the run)")
    center_momentum: float = _f(0.9, "DINO center EMA")
    freeze_last_layer_epochs: Optional[int] = _f(None, "DINO: keep the prototype layer frozen for this many epochs "
                                                       "(DINO's freeze_last_layer: 1)")
    # engineering
    out: Optional[str] = _f(None, "run directory (metrics.jsonl, config.yaml, checkpoints/); nothing is "
                                  "written elsewhere")
    resume: bool = _f(False, "continue from the last complete checkpoint in --out", kind="flag")
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32", ("auto", "bf16", "fp32"))
    compile: bool = _f(False, "torch.compile the encoders", kind="flag")
    cuda_graphs: bool = _f(False, "capture the whole training step in a CUDA graph (GPU only)", kind="flag")
    kernels: str = _f("auto", "fused SDMP loss kernels when sdmp_fast.kernels provides them", ("auto", "off"))
    deterministic: bool = _f(False, "deterministic algorithms (bit-exact resume on CPU; on a GPU, ops without "
                             "a deterministic version warn)", kind="flag")
    log_every: int = _f(10, "steps between metrics reads (the only host syncs; also the NaN detection delay)")
    save_every: int = _f(1000, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(3, "checkpoints kept (oldest deleted)")
    nan_policy: str = _f("stop", "non-finite loss/gradient: stop the run, or skip the step", ("stop", "skip"))
    dist_timeout: float = _f(300.0, "seconds before a collective with a dead peer fails (at most 1e8)")
    progress: bool = _f(True, "tqdm progress bar", kind="onoff")
    tensorboard: bool = _f(True, "TensorBoard events in out/tb when tensorboard is importable", kind="onoff")

    # ------------------------------------------------------------------------------------------ derived
    def resolve(self) -> "TrainConfig":
        """Fill method-dependent defaults (returns a new config; call after merging sources)."""
        c = dataclasses.replace(self)
        for k, v in METHOD_DEFAULTS.get(c.method, {}).items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.weight_decay_end is None:
            c.weight_decay_end = c.weight_decay
        return c

    def to_dict(self) -> Dict[str, Any]:
        """Primitives only (YAML / checkpoint friendly)."""
        d = dataclasses.asdict(self)
        d["mix_methods"] = list(self.mix_methods)
        return d

    # ------------------------------------------------------------------------------------------ validation
    def check_warmups(self, total_steps: int) -> None:
        """Warm-ups given in steps must end inside the run (``total_steps``: --steps, or --epochs times the
        loader's batches, known once the loader is built): a longer one was cut to the run in silence, the lr
        peaking at the last step, DINO's teacher temperature never reaching tau_t_end."""
        checks = [("warmup_steps", self.warmup_steps, "warm-up steps leave nothing of")]
        if self.method == "dino":
            checks.append(("tau_t_warmup_steps", self.tau_t_warmup_steps,
                           f"teacher-temperature warm-up steps (tau_t {self.tau_t} -> tau_t_end {self.tau_t_end}) "
                           f"do not end inside"))
        for name, value, what in checks:
            if value is not None and value >= total_steps:
                epochs = f" ({self.epochs} epochs)" if self.steps is None and self.epochs else ""
                raise ValueError(f"{name}: {value} {what} a run of {total_steps} steps{epochs}; give fewer")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad setting. Cheap: no data read, no model built, nothing written."""
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ValueError(f"{name}: {msg}")

        def positive_int(name, allow_none=False, minimum=1):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, name,
                 f"must be an integer >= {minimum}, got {v!r}")

        def number(name, lo=None, hi=None, lo_open=False, allow_none=True):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), name,
                 f"must be a finite number, got {v!r}")
            if lo is not None:
                need(v > lo if lo_open else v >= lo, name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None:
                need(v <= hi, name, f"must be <= {hi}, got {v}")

        need(self.method in METHODS, "method", f"unknown method {self.method!r}; choose among {', '.join(METHODS)}")
        need(self.loader in LOADERS, "loader", f"unknown loader {self.loader!r}; choose among {', '.join(LOADERS)}")
        need(self.interpolation in INTERPOLATIONS, "interpolation",
             f"must be {' or '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        need(isinstance(self.arch, str) and bool(self.arch), "arch", f"must be a timm model name, got {self.arch!r}")
        import timm

        need(timm.is_model(self.arch), "arch", f"unknown timm model {self.arch!r} (e.g. vit_small_patch16_224, "
                                               f"vit_base_patch16_224, vit_tiny_patch16_224)")
        need("vit" in self.arch or "deit" in self.arch, "arch",
             f"{self.arch!r} is not a Vision Transformer; sdmp-fast trains timm ViTs (vit_*, deit_*)")
        for name in ("img_size", "patch_size", "local_size", "batch_size", "log_every", "keep_checkpoints",
                     "proj_hidden_dim", "proj_dim", "dino_out_dim", "dino_hidden_dim", "dino_bottleneck_dim"):
            positive_int(name)
        for name in ("depth", "embed_dim", "num_heads", "steps", "epochs", "num_workers", "warmup_steps",
                     "tau_t_warmup_steps"):
            positive_int(name, allow_none=True, minimum=0 if name in ("num_workers", "warmup_steps",
                                                                      "tau_t_warmup_steps") else 1)
        positive_int("save_every", minimum=0)
        positive_int("n_local", minimum=0)  # before n_local_mixed's check, which would name the wrong setting
        positive_int("n_local_mixed", minimum=0)
        positive_int("freeze_last_layer_epochs", allow_none=True, minimum=0)
        positive_int("seed", minimum=0)
        need(self.seed < 2**32, "seed", f"must be < 2**32 (torch, numpy and DALI seeds), got {self.seed}")
        need(self.img_size >= 8, "img_size", f"must be >= 8, got {self.img_size}")
        need(self.img_size % self.patch_size == 0, "img_size",
             f"{self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim is not None and self.num_heads is not None:
            need(self.embed_dim % self.num_heads == 0, "embed_dim",
                 f"{self.embed_dim} is not divisible by num_heads {self.num_heads}")
        # how long
        need(self.steps is not None or self.epochs is not None, "steps", "give --steps N or --epochs N")
        need(self.steps is None or self.epochs is None, "steps",
             f"--steps {self.steps} and --epochs {self.epochs} both given; give one")
        # optimisation numbers
        number("lr", 0, lo_open=True)
        number("base_lr", 0, lo_open=True)
        number("min_lr", 0)
        number("weight_decay", 0)
        number("weight_decay_end", 0)
        number("momentum", 0, 1)
        number("momentum_end", 0, 1, allow_none=False)
        number("clip_grad", 0)
        number("mix_weight", 0)
        number("drop_path_rate", 0, 1)
        if self.drop_path_rate is not None:
            need(self.drop_path_rate < 1, "drop_path_rate",
                 f"must be < 1 (1 drops every block), got {self.drop_path_rate}")
        number("alpha", 0, lo_open=True, allow_none=False)
        # temperatures divide the logits: 1e-300 passed "> 0" and is 0 in fp32 (a NaN loss at step 1, blamed on the
        # lr); a bound far below any real temperature that keeps logits / tau finite in fp32
        for name in ("tau", "tau_s", "tau_t", "tau_t_end"):
            number(name, 1e-30, allow_none=False)
        number("center_momentum", 0, 1, allow_none=False)
        # above ~1e8 s (3 years) torch's timedelta / socket timeouts overflow or wrap: a crash or a silent hang
        number("dist_timeout", 0, 1e8, lo_open=True, allow_none=False)
        if self.steps is not None:
            self.check_warmups(self.steps)
        # SDMP
        need(isinstance(self.mix_methods, (list, tuple)) and len(self.mix_methods) > 0, "mix_methods",
             "at least one of mixup, cutmix, resizemix")
        for m in self.mix_methods:
            need(m in MIX_METHODS, "mix_methods", f"unknown mixing method {m!r}; choose among {', '.join(MIX_METHODS)}")
        if self.sdmp:
            need(self.batch_size % 2 == 0, "batch_size",
                 f"{self.batch_size} is odd: SDMP pairs image i with n-1-i, so the per-process batch must be even "
                 f"(the middle image would be its own partner); use an even batch or --sdmp off")
        if self.method == "mocov3":
            need(self.batch_size >= 2, "batch_size", "MoCo v3's BatchNorm heads need at least 2 images per batch")
        if self.method == "dino":
            need(self.local_size % self.patch_size == 0, "local_size",
                 f"{self.local_size} is not a multiple of patch_size {self.patch_size}")
            if self.sdmp:  # plain DINO makes no mixed crop: its n_local_mixed is unused, not checked
                need(0 <= self.n_local_mixed <= self.n_local, "n_local_mixed",
                     f"must be in [0, n_local={self.n_local}], got {self.n_local_mixed}")
                need(self.n_local_mixed >= 1, "n_local_mixed", "SDMP-DINO needs at least one mixed local crop")
        need(self.nan_policy in ("stop", "skip"), "nan_policy", f"choose stop or skip, got {self.nan_policy!r}")
        need(self.precision in ("auto", "bf16", "fp32"), "precision", f"choose auto, bf16 or fp32, got {self.precision!r}")
        need(self.kernels in ("auto", "off"), "kernels", f"choose auto or off, got {self.kernels!r}")
        from sdmp_fast.kernels._ext import enabled as kernels_enabled

        kernels_enabled()  # a bad $SDMP_KERNELS (the loaders' mixing reads it too): an error now, before --out
        # device and conflicting options
        dev = self.device
        need(dev == "auto" or dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()),
             "device", f"expected auto, cpu, cuda or cuda:N, got {dev!r}")
        world = os.environ.get("WORLD_SIZE", "1").strip()
        check_gpu_per_rank(dev, int(world) if world.isdigit() else 1)
        if dev.startswith("cuda") or self.cuda_graphs:
            import torch

            if not torch.cuda.is_available():
                need(not self.cuda_graphs, "cuda_graphs", "CUDA graphs need a GPU and none is available")
                need(False, "device", f"{dev!r} asked for but CUDA is not available")
        if self.cuda_graphs:
            need(dev != "cpu", "cuda_graphs", "conflicts with --device cpu (CUDA graphs need a GPU)")
        need(not (self.loader == "torch-gpu" and dev == "cpu"), "loader",
             "torch-gpu augments on the GPU: it conflicts with --device cpu")
        # data and output
        need(isinstance(self.loader_options, dict) and all(isinstance(k, str) for k in self.loader_options),
             "loader_options", f"expected a mapping of option names to values, got {self.loader_options!r}")
        need(not (self.loader == "synthetic" and self.loader_options), "loader_options",
             "the synthetic loader takes no options")
        taken = sorted(set(self.loader_options) & set(TRAINER_LOADER_ARGS))
        need(not taken, "loader_options", f"{', '.join(taken)} set by the trainer itself (from --batch-size, "
                                          f"--num-workers, --seed, --device, --data and the recipe settings)")
        if self.loader == "memory":
            need(self.data is not None, "data", "the memory loader needs --data (e.g. fashion-mnist)")
        elif self.loader != "synthetic":
            need(bool(self.data), "data", f"the {self.loader} loader needs --data DIR")
            need(os.path.exists(self.data), "data", f"{self.data!r} does not exist")
            if os.path.isdir(self.data):
                with os.scandir(self.data) as it:
                    need(any(True for _ in it), "data", f"{self.data!r} is an empty directory")
        need(bool(self.out), "out", "give --out DIR (the run directory)")
        need(not os.path.isfile(self.out), "out", f"{self.out!r} is a file, expected a directory")
        return self


def check_gpu_per_rank(device: str, world_size: int) -> None:
    """Several processes need one GPU each: an explicit cuda:N would put them all on card N."""
    if world_size > 1 and device.startswith("cuda:"):
        raise ValueError(f"device: {device} would put all {world_size} ranks on one GPU; use cuda (or auto): each "
                         f"rank takes the GPU of its LOCAL_RANK")


def check_gpu_exists(device, world_size: int = 1, local_rank: int = 0) -> None:
    """The card a rank resolved to (cuda:LOCAL_RANK under torchrun) must be visible: with more processes per node
    than GPUs torch.cuda.set_device failed with a bare "invalid device ordinal" traceback."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        who = f"LOCAL_RANK {local_rank} needs {device}" if world_size > 1 else str(device)
        raise ValueError(f"device: {who} but this node shows {n} GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run at most {n} process(es) per "
                         f"node (torchrun --nproc_per_node {n})")


def _parse_onoff(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("on", "true", "yes", "1"):
        return True
    if s in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on/off, got {v!r}")


def _split_top_level(text: str) -> List[str]:
    """``text`` split at the commas outside brackets and braces: "a=[1, 2],b={c: 1, d: 2}" -> two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def parse_options(name: str, value: Any) -> Dict[str, Any]:
    """A mapping of options: YAML's own, or from the command line "k=v,k=v" (each value read as YAML: true, 3,
    0.9, [1, 2]) or a YAML flow mapping "{k: v, ...}" (for nested values). null / "" is no options."""
    import yaml

    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.startswith("{"):
                value = yaml.safe_load(text)
            else:
                value = {}
                for item in _split_top_level(text):
                    key, eq, raw = item.partition("=")
                    if not eq or not key.strip() or not raw.strip():
                        raise ValueError(f"expected key=value pairs separated by commas (or a YAML mapping "
                                         f"'{{key: value}}'), got {item.strip()!r} in {text!r}")
                    value[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"{name}: not YAML: {text!r} ({e})") from None
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping of option names to values, got {value!r}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """YAML / CLI value -> the field's type, with an error naming the setting."""
    if f.metadata.get("kind") == "options":  # null: no options
        return parse_options(name, value)
    if value is None:  # YAML null: only where "unset" means something (the Optional settings)
        if f.default is None or "Optional" in str(f.type):
            return None
        raise ValueError(f"{name}: null is not a value of this setting (default {f.default!r}); leave it out instead")
    kind = f.metadata.get("kind")
    try:
        if kind in ("onoff", "flag"):
            return _parse_onoff(value)
        if kind == "list":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(s).strip() for s in items if str(s).strip())
        default = f.default
        ftype = str(f.type)
        if "int" in ftype and "float" not in ftype:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if "float" in ftype:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if "str" in ftype or isinstance(default, str):
            if isinstance(value, bool):  # YAML 1.1 reads on / off / yes / no as booleans
                return "on" if value else "off"
            return str(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config(path: str) -> Dict[str, Any]:
    """A YAML mapping of settings (yaml.safe_load: a config file cannot construct objects)."""
    import yaml

    if os.path.isdir(path):
        raise ValueError(f"config: {path!r} is a folder, expected a YAML file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path!r} is not valid YAML ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"config: {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of settings, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        name = str(k).replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"config: unknown setting {k!r} in {path!r}")
        out[name] = v
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, default None (so the merge knows what the command line set)."""
    parser.add_argument("--config", default=None, help="YAML file of settings (command-line options override it)")
    for f in dataclasses.fields(TrainConfig):
        kind, help_ = f.metadata.get("kind"), f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = ",".join(default)
        if kind == "onoff":  # shown as the value the option takes, not Python's True / False
            default = "on" if default else "off"
        if kind == "options":
            default = "none"
        help_ = f"{help_} (default: {default})"
        if kind == "flag":
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_)
        elif kind == "onoff":
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar="{on,off}", help=help_)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, choices=f.metadata.get("choices"),
                                help=help_)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < --config YAML < command line; then method defaults. Not validated yet."""
    values: Dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config(args.config))
    cli = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if cli.get("method") not in (None, values.get("method")) and values.get("method") in METHOD_DEFAULTS:
        _drop_other_method_defaults(values, args.config, cli["method"])
    # --steps on the command line replaces a config file's epochs (and vice versa): not a conflict.
    if "steps" in cli:
        values.pop("epochs", None)
    if "epochs" in cli:
        values.pop("steps", None)
    if "weight_decay" in cli and "weight_decay_end" not in cli and _derived_decay_end(values, cli):
        values.pop("weight_decay_end")  # derived again from the new --weight-decay (MoCo v3: constant)
    values.update(cli)
    kwargs = {k: _coerce(k, v, FIELDS[k]) for k, v in values.items()}
    return TrainConfig(**kwargs).resolve()


def _derived_decay_end(values: Dict[str, Any], cli: Dict[str, Any]) -> bool:
    """Whether a config file's weight_decay_end is the one ``resolve`` derived from its weight_decay (a run's
    config.yaml holds it filled in): for a method whose end defaults to the start (MoCo v3's constant decay),
    equal to the file's weight_decay. Kept, a new --weight-decay would decay along a cosine to the old value."""
    method = cli.get("method", values.get("method", FIELDS["method"].default))  # the method this run uses
    derived = METHOD_DEFAULTS.get(method, {}).get("weight_decay_end", None) is None
    return derived and "weight_decay_end" in values and values["weight_decay_end"] == values.get("weight_decay")


def _drop_other_method_defaults(values: Dict[str, Any], path: str, method: str) -> None:
    """A run's config.yaml holds its method's defaults filled in: reused with another --method, they would train
    DINO with MoCo v3's lr, decay, clipping... Settings there equal to the file's method's defaults are left out
    (the new method's defaults apply), with a warning naming them."""
    import warnings

    old, given = values["method"], dict(values)
    dropped = []
    for k, default in METHOD_DEFAULTS[old].items():
        if k not in given:
            continue
        if default is None:  # resolved from another setting (weight_decay_end = weight_decay)
            default = given.get("weight_decay") if k == "weight_decay_end" else None
        if given[k] == default:
            dropped.append(f"{k} {values.pop(k)}")
    if dropped:
        warnings.warn(f"config: {path!r} is a {old} config, trained here with --method {method}: its {old} defaults "
                      f"({', '.join(dropped)}) are left out so that {method}'s apply; give them on the command "
                      f"line to keep them", UserWarning)


def config_from_dict(d: Dict[str, Any]) -> TrainConfig:
    """Rebuild a config stored in a checkpoint / config.yaml (unknown keys from newer versions ignored)."""
    kwargs = {k: _coerce(k, v, FIELDS[k]) for k, v in d.items() if k in FIELDS}
    return TrainConfig(**kwargs)


def _loader_option_defaults(loader: Optional[str]) -> Dict[str, Any]:
    from sdmp_fast.pipelines.base import backend_option_defaults

    return backend_option_defaults(loader) if loader else {}


def significant_loader_options(options: Optional[Dict[str, Any]], loader: Optional[str]) -> Dict[str, Any]:
    """The loader options that change what is trained: throughput-only options and options spelt out at the
    backend's default (= not given) are left out."""
    own = _loader_option_defaults(loader)
    return {o: v for o, v in (options or {}).items()
            if o not in THROUGHPUT_LOADER_OPTIONS and not (o in own and own[o] == v)}


def mismatches(saved: Dict[str, Any], current: TrainConfig) -> List[str]:
    """Settings that differ between a checkpoint's config and the current one, among RESUME_MUST_MATCH."""
    cur = current.to_dict()
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    bad = []
    for k in RESUME_MUST_MATCH:
        # a setting newer than the checkpoint had its default then (or what the code did before it existed)
        a, b = saved.get(k, SETTING_BEFORE_IT_EXISTED.get(k, defaults.get(k))), cur.get(k)
        if k == "n_local_mixed" and not cur.get("sdmp") and not saved.get("sdmp", True):
            continue  # plain DINO makes no mixed crop
        if k == "moco_predictor_bn" and cur.get("method") != "mocov3":
            continue  # no predictor: a DINO run from before the setting existed resumes as it is
        if k == "loader_options":  # throughput-only options may change; an option at its default = not given
            a, b = (significant_loader_options(d, cur.get("loader")) for d in (a, b))
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a or []), list(b or [])
        if a != b:
            bad.append(f"{k} (checkpoint {a!r}, now {b!r})")
    return bad


def device_setting(name: Optional[str]) -> str:
    """``--device`` as a torch device string: cpu, cuda or cuda:N (None / auto: cuda when available); anything
    else, or cuda without a GPU, is a ValueError naming the setting (the show and eval commands)."""
    import torch

    dev = "auto" if name is None else str(name).strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name!r} but no CUDA GPU is available (use --device cpu)")
        if ":" in dev and int(dev[5:]) >= torch.cuda.device_count():
            raise ValueError(f"--device: {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev
