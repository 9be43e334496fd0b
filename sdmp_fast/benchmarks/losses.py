"""`sdmp-fast bench losses`: the fused SDMP loss kernels against eager PyTorch and torch.compile of the reference.

One run times forward + backward (``torch.autograd.grad`` w.r.t. the logits, so no gradient accumulation is
timed) of each op with every implementation on the same inputs:

* ``two_hot_ce``: SDMP-MoCo soft-label CE on [n, N] logits (default n = 1024 local queries, N = 4096 keys):
  ``kernel`` (sdmp_fast.kernels), ``eager`` / ``compile`` (the reference, logsumexp + two gathers), and
  ``eager_dense`` (F.cross_entropy against a dense [n, N] label matrix, built outside the timed region).
* ``moco_terms``: the three SDMP-MoCo terms from [n, d] projections (matmuls included).
* ``dino``: SDMP-DINO loss over clean + mixed student crops, K prototypes (default 256 images, 6 clean + 4 mixed
  crops = 10 student crops, 2 teacher crops, K = 65,536, bf16).

``kernel_graph`` rows replay the kernel's forward + backward from a CUDA graph: the GPU time without Python
launch overhead, which at these sizes can exceed the GPU work of the eager ``kernel`` call.

``gb_per_s`` divides the *least* traffic the op needs (read the logits once, write their gradient once; for
DINO also read the teacher logits once) by the time, and ``pct_of_copy`` compares it with the measured
device-to-device copy bandwidth. On a CPU-only machine sizes shrink and kernel rows are reported unavailable.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sdmp_fast import losses
from sdmp_fast.kernels.selfcheck import env
from sdmp_fast.benchmarks.common import (check_counts, check_output_path, copy_bandwidth_gbps, cuda_time_ms,
                                         device_description, peak_memory_mb, print_table, report_interrupted,
                                         rows_until_interrupted, write_json, write_results)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ["op", "impl", "status", "ms", "gb_per_s", "pct_of_copy", "speedup_vs_eager", "speedup_vs_compile",
           "speedup_vs_eager_dense", "peak_mb", "mem_vs_eager", "shape"]


def device_tag(device: torch.device) -> str:
    from sdmp_fast.benchmarks.loaders import device_tag as tag
    return tag(device)


def default_json_path(name: str, device: torch.device) -> str:
    return os.path.join("bench", "results", f"{name}-{device_tag(device)}-{_dt.date.today():%Y%m%d}.json")


def add_arguments(p) -> None:
    p.add_argument("--ops", default="two_hot_ce,moco_terms,dino", help="comma list: two_hot_ce, moco_terms, dino")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="logits dtype")
    p.add_argument("--moco-n", type=int, default=None, help="local queries (default 1024 on GPU, 64 on CPU)")
    p.add_argument("--moco-keys", type=int, default=None, help="keys N (default 4096 on GPU, 256 on CPU)")
    p.add_argument("--moco-dim", type=int, default=256, help="projection dim for moco_terms")
    p.add_argument("--dino-batch", type=int, default=None, help="images (default 256 on GPU, 8 on CPU)")
    p.add_argument("--dino-k", type=int, default=None, help="prototypes K (default 65536 on GPU, 1024 on CPU)")
    p.add_argument("--dino-crops", default="6,4", help="clean,mixed student crops (the first 2 clean are global)")
    p.add_argument("--teacher-crops", type=int, default=2)
    p.add_argument("--teacher-mixed", action="store_true",
                   help="also feed the teacher's mixed global crops (eq. 8 with a mixed teacher)")
    p.add_argument("--dino-variants", default="",
                   help="extra CUDA-graph kernel rows for DINO, comma-separated launch configurations: 'cluster' "
                        "(one-read forward, sm_90) with 'tfold' (teacher statistics in the clusters) and 'cpipe' "
                        "(next rows loaded during a round), 'fused' / 'unfused', gN pairs per group of the fused "
                        "forward, chN pairs per chunk, kbN columns and pwN warps per pair block, joined by '+' "
                        "(e.g. 'cluster,cluster+tfold+cpipe,fused+g8,ch16')")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--profile", action="store_true",
                   help="also print the per-kernel device time of the DINO loss under --profile-configs "
                        "(torch.profiler)")
    p.add_argument("--profile-configs", default="default,fused,cluster,cluster+tfold+cpipe",
                   help="launch configurations --profile times: 'default' or a --dino-variants entry, comma-separated")
    p.add_argument("--json", default=None, help="output JSON (default bench/results/losses-<device>-<date>.json)")
    p.add_argument("--merge-into", default=None, metavar="JSON",
                   help="also add this run's variant rows (kernel_graph_*) to the records of an earlier run's JSON, "
                        "their speed-ups recomputed against that run's eager / compile rows (a risky variant can "
                        "then run in its own process without losing the other rows if it fails or hangs)")


def _grad_step(fn: Callable, inputs: List[torch.Tensor]) -> Callable[[], object]:
    """fwd + bwd of fn(*inputs) -> scalar, gradients w.r.t. the inputs that require grad."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = fn(*inputs)
        return torch.autograd.grad(out, leaves)
    return step


def graph_step(step: Callable) -> Callable[[], object]:
    """step (fwd + bwd) captured in a CUDA graph: replays time the GPU work without Python launch overhead
    (the kernels are capturable; this is how a CUDA-graphed training step runs them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _time(step: Callable, args) -> float:
    return cuda_time_ms(step, warmup=args.warmup, iters=args.iters)


def _record(op: str, impl: str, shape: str, min_bytes: int, ms: Optional[float], status: str = "ok",
            reason: str = "", copy_gbps: Optional[float] = None) -> Dict:
    gbps = (min_bytes / (ms * 1e-3) / 1e9) if ms else None
    return {"op": op, "impl": impl, "status": status, "ms": ms, "gb_per_s": gbps, "min_bytes": min_bytes,
            "pct_of_copy": (100.0 * gbps / copy_gbps) if (gbps and copy_gbps) else None, "shape": shape,
            "reason": reason}


def _run_impls(op: str, shape: str, min_bytes: int, impls: Dict[str, Callable[[], Callable]], args,
               copy_gbps: Optional[float]) -> List[Dict]:
    """Times each implementation; a factory that raises is reported (unavailable / failed) with the reason."""
    rows = []
    for impl, factory in impls.items():
        try:
            step = factory()
            if step is None:
                rows.append(_record(op, impl, shape, min_bytes, None, "unavailable", _unavailable_reason(), copy_gbps))
                continue
            ms = _time(step, args)
            rows.append(_record(op, impl, shape, min_bytes, ms, copy_gbps=copy_gbps))
            # a graph replay allocates nothing (its pool was taken at capture): the eager rows carry the memory
            rows[-1]["peak_mb"] = None if "_graph" in impl else peak_memory_mb(step)
        except Exception as e:  # noqa: BLE001 - a failing implementation must not hide the others
            traceback.print_exc()
            rows.append(_record(op, impl, shape, min_bytes, None, "failed", f"{type(e).__name__}: {e}"[:300], copy_gbps))
        print(f"  {op:<11} {impl:<12} {rows[-1]['status']:<11} {rows[-1]['ms'] or float('nan'):8.3f} ms", flush=True)
    _add_speedups(rows)
    return rows


def _unavailable_reason() -> str:
    import sdmp_fast.kernels as K
    if not torch.cuda.is_available():
        return "no CUDA device (kernels run on CUDA tensors only)"
    return f"kernels not built: {K.build_error() or 'disabled (SDMP_KERNELS=0)'}"


def _add_speedups(rows: List[Dict]) -> None:
    base = {r["impl"]: r["ms"] for r in rows if r["ms"]}
    mem = {r["impl"]: r.get("peak_mb") for r in rows if r.get("peak_mb")}
    for r in rows:
        for ref in ("eager", "compile", "eager_dense", "eager_dense_graph"):
            r[f"speedup_vs_{ref}"] = (base[ref] / r["ms"]) if (r["ms"] and ref in base and r["impl"] != ref) else None
        # memory next to speed: the peak the op allocates over what the eager reference allocates
        r.setdefault("peak_mb", None)
        r["mem_vs_eager"] = r["peak_mb"] / mem["eager"] if (r["peak_mb"] and "eager" in mem) else None


def _kernels_ready(device: torch.device) -> bool:
    import sdmp_fast.kernels as K
    return device.type == "cuda" and K.available(device)


# ------------------------------------------------------------------------------------------------------ ops

def moco_sizes(args, device) -> Tuple[int, int]:
    """(queries n, keys N) of two_hot_ce / moco_terms: the options or the device's defaults."""
    return args.moco_n or (1024 if device.type == "cuda" else 64), args.moco_keys or (4096 if device.type == "cuda" else 256)


def dino_crops(text: str) -> Tuple[int, int]:
    """--dino-crops 'clean,mixed': at least one clean crop, no negative count; else a ValueError naming it."""
    try:
        sc, sm = (int(x) for x in text.split(","))
    except ValueError:
        sc = sm = None
    if sc is None or sc < 1 or sm < 0:
        raise ValueError(f"--dino-crops: expected 'clean,mixed' crop counts (clean >= 1, mixed >= 0), got {text!r}")
    return sc, sm


def bench_two_hot(args, device, dtype, copy_gbps) -> List[Dict]:
    import sdmp_fast.kernels as K
    n, N = moco_sizes(args, device)
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, N, device=device, generator=g) * 5).to(dtype).requires_grad_(True)
    own, partner = losses.flip_indices(n, 0, device)
    lam = torch.rand(n, device=device, generator=g)
    dense = torch.zeros(n, N, device=device, dtype=torch.float32)
    dense.scatter_(1, own[:, None], lam[:, None]).scatter_add_(1, partner[:, None], (1 - lam)[:, None])
    min_bytes = 2 * logits.numel() * logits.element_size()
    shape = f"n={n} N={N} {str(dtype).replace('torch.', '')}"

    def ref_loss(x):
        return losses.two_hot_cross_entropy(x, own, partner, lam, 1 - lam).mean()

    def kernel():
        return _grad_step(lambda x: K.two_hot_cross_entropy(x, own, partner, lam, 1 - lam).mean(), [logits])

    impls = {
        "kernel": lambda: kernel() if _kernels_ready(device) else None,
        "kernel_graph": lambda: graph_step(kernel()) if _kernels_ready(device) else None,
        "eager": lambda: _grad_step(ref_loss, [logits]),
        "eager_dense": lambda: _grad_step(lambda x: F.cross_entropy(x.float(), dense), [logits]),
        # the same dense CE graph-captured: its device time alone, for a like-for-like ratio with kernel_graph
        "eager_dense_graph": lambda: graph_step(_grad_step(lambda x: F.cross_entropy(x.float(), dense), [logits]))
        if device.type == "cuda" else None,
    }
    if not args.no_compile:
        impls["compile"] = lambda: _grad_step(torch.compile(ref_loss), [logits])
    return _run_impls("two_hot_ce", shape, min_bytes, impls, args, copy_gbps)


def _mixing_lam(n: int, device, g) -> torch.Tensor:
    """One lam per image; in an odd batch the middle image, its own batch-flip partner, unmixed (lam 1), the only
    lam the losses take there (losses.check_unpaired_middle)."""
    lam = torch.rand(n, device=device, generator=g)
    if n % 2:
        lam[n // 2] = 1.0
    return lam


def bench_moco_terms(args, device, dtype, copy_gbps) -> List[Dict]:
    import sdmp_fast.kernels as K
    n, N = moco_sizes(args, device)
    world = N // n  # main() checked N is a multiple of n
    g = torch.Generator(device=device).manual_seed(1)
    mk = lambda rows, grad: torch.randn(rows, args.moco_dim, device=device, generator=g).to(dtype).requires_grad_(grad)  # noqa: E731
    q1, q2m = mk(n, True), mk(n, True)
    k1, k2, k1m = mk(n * world, False), mk(n * world, False), mk(n * world, False)
    lam = _mixing_lam(n, device, g)
    min_bytes = 3 * 2 * n * n * world * q1.element_size()  # three [n, N] logits read once, gradients written once
    shape = f"n={n} N={n * world} d={args.moco_dim} {str(dtype).replace('torch.', '')}"

    def ref(a, b):
        return losses.sdmp_moco_loss(losses.sdmp_moco_terms(a, b, k1, k2, k1m, lam, 0.2, world - 1, world))

    def kernel():
        return _grad_step(lambda a, b: losses.sdmp_moco_loss(K.sdmp_moco_terms(a, b, k1, k2, k1m, lam, 0.2, world - 1,
                                                                               world)), [q1, q2m])

    impls = {
        "kernel": lambda: kernel() if _kernels_ready(device) else None,
        "kernel_graph": lambda: graph_step(kernel()) if _kernels_ready(device) else None,
        "eager": lambda: _grad_step(ref, [q1, q2m]),
    }
    if not args.no_compile:
        impls["compile"] = lambda: _grad_step(torch.compile(ref), [q1, q2m])
    return _run_impls("moco_terms", shape, min_bytes, impls, args, copy_gbps)


def bench_dino(args, device, dtype, copy_gbps) -> List[Dict]:
    import sdmp_fast.kernels as K
    b = args.dino_batch or (256 if device.type == "cuda" else 8)
    k = args.dino_k or (65536 if device.type == "cuda" else 1024)
    sc, sm = dino_crops(args.dino_crops)
    t = args.teacher_crops
    g = torch.Generator(device=device).manual_seed(2)
    mk = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
    s_clean = mk(sc, b, k).requires_grad_(True)
    s_mixed = mk(sm, b, k).requires_grad_(True) if sm else None
    t_clean = mk(t, b, k)
    t_mixed = mk(t, b, k) if (sm and args.teacher_mixed) else None
    center = torch.randn(k, device=device, generator=g) * 0.1
    lam = _mixing_lam(b, device, g)
    elt = s_clean.element_size()
    student = (sc + sm) * b * k * elt
    teacher = (t + (t if t_mixed is not None else 0)) * b * k * elt
    min_bytes = 2 * student + teacher
    shape = f"B={b} K={k} student={sc}+{sm} teacher={t}{'+mixed' if t_mixed is not None else ''} " \
            f"{str(dtype).replace('torch.', '')}"
    inputs = [s_clean] + ([s_mixed] if s_mixed is not None else [])

    def wrap(fn):
        def loss(*xs):
            return fn(xs[0], xs[1] if len(xs) > 1 else None, t_clean, t_mixed, center, lam)["loss"]
        return loss

    impls = {
        "kernel": lambda: _grad_step(wrap(K.sdmp_dino_terms), inputs) if _kernels_ready(device) else None,
        "kernel_graph": lambda: graph_step(_grad_step(wrap(K.sdmp_dino_terms), inputs))
        if _kernels_ready(device) else None,
        "eager": lambda: _grad_step(wrap(losses.sdmp_dino_terms), inputs),
    }
    variant_envs = {}
    for variant in [v.strip() for v in args.dino_variants.split(",") if v.strip()]:
        # The launch configuration is read when the graph is captured: set it for the capture only.
        kv, name = dino_variant_env(variant)
        variant_envs[f"kernel_graph_{name}"] = kv

        def variant_step(kv=kv):
            if not _kernels_ready(device):
                return None
            with env(**kv):
                return graph_step(_grad_step(wrap(K.sdmp_dino_terms), inputs))
        impls[f"kernel_graph_{name}"] = variant_step
    if getattr(args, "profile", False) and _kernels_ready(device):
        profile_kernels("dino", profile_configs(args.profile_configs),
                        lambda: _grad_step(wrap(K.sdmp_dino_terms), inputs))
    if not args.no_compile:
        impls["compile"] = lambda: _grad_step(torch.compile(wrap(losses.sdmp_dino_terms)), inputs)
    rows = _run_impls("dino", shape, min_bytes, impls, args, copy_gbps)
    add_cluster_launch(rows, variant_envs, s_clean, t_clean)
    return rows


def add_cluster_launch(rows: List[Dict], variant_envs: Dict[str, Dict[str, str]], s_clean, t_clean) -> None:
    """Each cluster row gets its launch (blocks per cluster, shared memory, clusters resident at once): a cluster
    of 16 blocks needs a GPC with 16 free SMs, so the card may hold fewer clusters than it has GPCs, and the
    row's time reads differently with 6 or 8 of them."""
    from sdmp_fast.kernels.dino_ce import cluster_launch_info
    for r in rows:
        kv = variant_envs.get(r["impl"], {})
        if "SDMP_DINO_CLUSTER" not in kv:
            continue
        with env(**kv):
            info = cluster_launch_info(s_clean.detach(), t_clean)
        r["cluster_launch"] = info
        if info is not None:
            print(f"  dino        {r['impl']}: clusters of {info['blocks']} blocks x {info['threads']} threads, "
                  f"{info['smem_bytes'] / 1024:.0f} KiB shared memory per block, {info['resident_clusters']} "
                  f"clusters resident at once", flush=True)


# Launch configurations of the DINO loss as data: a named token sets one variable, a prefixed number another.
DINO_FLAG_TOKENS = {"unfused": ("SDMP_DINO_FUSED", "0"), "fused": ("SDMP_DINO_FUSED", "1"),
                    "cluster": ("SDMP_DINO_CLUSTER", "require"),  # require: an error where it cannot run
                    "tfold": ("SDMP_DINO_CLUSTER_TEACHER", "1"),  # teacher statistics inside the clusters
                    "cpipe": ("SDMP_DINO_CLUSTER_PIPELINE", "1")}  # clusters load the next rows during a round
DINO_NUMBER_TOKENS = {"": "SDMP_DINO_GROUP_PAIRS", "g": "SDMP_DINO_GROUP_PAIRS", "ch": "SDMP_DINO_CHUNK_PAIRS",
                      "kb": "SDMP_DINO_BLOCK_COLS", "pw": "SDMP_DINO_PAIR_WARPS"}


def dino_variant_env(variant: str):
    """('cluster' | 'tfold' | 'cpipe' | 'fused' | 'unfused' | N | gN | chN | kbN | pwN, joined by '+') ->
    (environment of the launch, row name): the one-read cluster forward (sm_90), with the teacher statistics
    folded in (tfold) and with the next rows loaded during each round (cpipe), the single-launch forward or not,
    N/gN pairs per group of the fused forward, chN pairs per chunk of the two-launch path, kbN columns and pwN
    warps per pair block (e.g. 'fused+g8+kb1024', 'ch16', 'cluster+tfold+cpipe')."""
    kv, names = {}, []
    for tok in (t.strip() for t in variant.split("+")):
        m = re.fullmatch(r"([a-z]*)(\d+)", tok)
        if tok in DINO_FLAG_TOKENS:
            key, value = DINO_FLAG_TOKENS[tok]
        elif m and m.group(1) in DINO_NUMBER_TOKENS:
            key, value = DINO_NUMBER_TOKENS[m.group(1)], m.group(2)
        else:
            raise ValueError(f"--dino-variants: cannot read {tok!r} in {variant!r} "
                             f"(cluster, tfold, cpipe, fused, unfused, N, gN, chN, kbN or pwN, joined by +)")
        kv[key] = value
        names.append("gp" + tok if tok.isdigit() else tok)
    if "SDMP_DINO_GROUP_PAIRS" in kv:  # groups exist only in the fused forward
        kv.setdefault("SDMP_DINO_FUSED", "1")
    return kv, "+".join(names)


def profile_configs(spec: str) -> Dict[str, Dict[str, str]]:
    """'default,fused,cluster+tfold' -> {name: environment}: 'default' is the launch with no setting changed."""
    configs = {}
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        if entry == "default":
            configs["kernel"] = {}
        else:
            try:
                kv, name = dino_variant_env(entry)
            except ValueError as e:
                raise ValueError(str(e).replace("--dino-variants", "--profile-configs", 1)) from None
            configs[name] = kv
    return configs


def profile_kernels(op: str, configs: Dict[str, Dict[str, str]], make_step: Callable[[], Callable]) -> None:
    """Per-kernel device time of one fwd+bwd under each launch configuration (torch.profiler, CUPTI): where the
    time goes, printed as a small table per configuration."""
    from torch.profiler import ProfilerActivity, profile
    for name, kv in configs.items():
        try:
            with env(**kv):
                step = make_step()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - e.g. the cluster forward on a card without clusters
            print(f"  profile {op} [{name}]: not run ({type(e).__name__}: {str(e).splitlines()[0][:160]})", flush=True)
            continue
        rows = []
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if t:
                rows.append((t / 5 / 1e3, evt.count // 5, evt.key))
        rows.sort(reverse=True)
        print(f"  profile {op} [{name}]: {sum(r[0] for r in rows):.3f} ms of kernels per fwd+bwd", flush=True)
        for ms, count, key in rows[:10]:
            print(f"    {ms:8.3f} ms  x{count:<3} {key[:110]}", flush=True)


OPS = {"two_hot_ce": bench_two_hot, "moco_terms": bench_moco_terms, "dino": bench_dino}


def main(args) -> int:
    check_counts(args, iters=1, warmup=0, moco_n=2, moco_keys=2, moco_dim=1, dino_batch=2, dino_k=1,
                 teacher_crops=1)
    ops = list(dict.fromkeys(o.strip() for o in args.ops.split(",") if o.strip()))  # one record per (op, impl)
    if not ops:  # nothing to time: an empty table crashed the report
        raise ValueError(f"--ops: no op in {args.ops!r}; choose among {', '.join(OPS)}")
    for o in ops:
        if o not in OPS:
            raise ValueError(f"--ops: unknown op {o!r}; choose among {', '.join(OPS)}")
    if "dino" in ops:
        sc, sm = dino_crops(args.dino_crops)
        t = args.teacher_crops
        if losses.dino_pair_count(sc, sm, t) == 0:  # DINO leaves out the same-view pairs: nothing to time
            raise ValueError(f"--dino-crops {args.dino_crops} with --teacher-crops {t}: no (teacher, student) pair "
                             f"to compute (a teacher crop is never paired with its own view); add crops")
    for variant in (v.strip() for v in args.dino_variants.split(",") if v.strip()):
        dino_variant_env(variant)  # bad input fails before anything runs
    profile_configs(args.profile_configs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, keys = moco_sizes(args, device)
    if "two_hot_ce" in ops and keys < n:  # own / partner key indices run up to n - 1: was an indexing traceback
        raise ValueError(f"--moco-keys: two_hot_ce needs at least --moco-n ({n}) keys, got {keys}")
    if "moco_terms" in ops and keys % n:  # the keys are all-gathered from N / n ranks: else a quietly other N
        raise ValueError(f"--moco-keys: moco_terms needs a multiple of --moco-n ({n}), got {keys}")
    dtype = DTYPES[args.dtype]
    path = args.json or default_json_path("losses", device)
    check_output_path("--json", path)
    if args.merge_into:
        check_output_path("--merge-into", args.merge_into)
        if os.path.exists(args.merge_into):  # no losses JSON, or another machine's: said now, not after the run
            theirs = read_losses_doc(args.merge_into).get("device")
            if theirs != device_description():
                raise ValueError(f"--merge-into: {args.merge_into!r} was measured on {theirs!r}, this run is on "
                                 f"{device_description()!r}: speed-ups across machines mean nothing")
    copy_gbps = copy_bandwidth_gbps()
    print(f"bench losses on {device_description()}; copy bandwidth "
          f"{'%.0f GB/s' % copy_gbps if copy_gbps else 'n/a (CPU)'}", flush=True)

    def op_rows(o: str) -> List[Dict]:
        rows = OPS[o](args, device, dtype, copy_gbps)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    records, interrupted = rows_until_interrupted(functools.partial(op_rows, o) for o in ops)
    for r in records:
        r["copy_gb_per_s"] = copy_gbps
    doc = write_results(path, records, getattr(args, "command_line", "sdmp-fast bench losses"), interrupted,
                        fresh=args.json is None)
    print_table(records, COLUMNS)
    if interrupted:  # part of a run: not merged into another run's file either
        return report_interrupted(doc, "losses")
    print(f"wrote {doc['json']}")
    if args.merge_into:
        added = merge_variant_rows(args.merge_into, doc)
        print(f"merged {added} variant rows into {args.merge_into}")
    return 0


def merge_variant_rows(main_path: str, extra: Dict) -> int:
    """Add the ``kernel_graph_*`` variant rows of ``extra`` (a bench document) to the JSON at ``main_path``:
    speed-ups recomputed against that file's eager / compile rows of the same op, and ``same_run_kernel_graph_ms``
    (the default launch timed in the variant's own process) kept beside, so the comparison with the default
    launch is also available within one process. Without the main file, ``extra`` becomes it. Returns the number
    of rows added."""
    rows = [dict(r, run="separate process", same_run_kernel_graph_ms=_ms(extra, r["op"], "kernel_graph"))
            for r in extra["records"] if r["impl"].startswith("kernel_graph_")]
    if not os.path.exists(main_path):
        main = {k: v for k, v in extra.items() if k != "json"}  # where extra was written: not part of a file
    else:
        main = read_losses_doc(main_path)
        if main.get("device") != extra.get("device"):
            raise ValueError(f"--merge-into: {main_path!r} was measured on {main.get('device')!r}, these rows on "
                             f"{extra.get('device')!r}: speed-ups across machines mean nothing (nothing merged)")
        for r in rows:
            theirs = {m.get("shape") for m in main["records"] if m["op"] == r["op"]}
            if theirs and r.get("shape") not in theirs:
                raise ValueError(f"--merge-into: {main_path!r} times {r['op']} at {', '.join(map(str, theirs))}, "
                                 f"these rows at {r.get('shape')}: give this run the same sizes and dtype "
                                 f"(nothing merged)")
        replaced = {(r["op"], r["impl"]) for r in rows}
        main["records"] = [r for r in main["records"] if (r["op"], r["impl"]) not in replaced] + rows
        for op in {r["op"] for r in rows}:
            _add_speedups([r for r in main["records"] if r["op"] == op])
        main["command"] = f"{main.get('command', '')}; merged: {extra.get('command', '')}"
    write_json(main_path, main)
    return len(rows)


def read_losses_doc(path: str) -> Dict:
    """A `bench losses` JSON (records with op / impl), or a ValueError naming the file and --merge-into."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"--merge-into: cannot read {path!r} as a bench JSON ({e})") from None
    records = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "op" in r and "impl" in r for r in records):
        raise ValueError(f"--merge-into: {path!r} is no `sdmp-fast bench losses` JSON (its records have no op / "
                         f"impl)")
    return doc


def _ms(doc: Dict, op: str, impl: str) -> Optional[float]:
    return next((r["ms"] for r in doc["records"] if r["op"] == op and r["impl"] == impl), None)
