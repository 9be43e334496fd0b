"""`sdmp-fast bench mixing`: the fused batch-flip mixing kernel against the reference and a plain copy.

Mixes all views of a batch (default two 256 x 3 x 224 x 224 fp32 views) with given per-sample lam / method /
boxes -- the deterministic part, ``apply_mix`` -- and times:

* ``kernel``: ``sdmp_fast.kernels.apply_mix_views`` (one launch for all views);
* ``eager`` / ``compile``: ``sdmp_fast.mixing.apply_mix`` per view, eager and under torch.compile;
* ``copy``: ``out.copy_(view)`` for every view: the same bytes read and written, the floor to compare with;
* ``kernel_graph`` / ``copy_graph``: the same two captured in a CUDA graph, i.e. device time alone. Each plain
  row is timed call by call, so it also holds the host time before the launch (Python and argument checks,
  ~0.05 ms for the kernel): that is what an ungraphed loop pays, the graph rows what a graphed step pays;
* ``kernel_graph_pN`` (``--mix-variants p2,p4``): the graph row with N packs of pixels per thread
  (``SDMP_MIX_PACKS``), a launch configuration to tune; ``kernel_graph_staged`` (``staged``): resizemix box
  pixels resampled in lane order through a per-warp shared-memory stage (``SDMP_MIX_STAGED=1``).

Cases: ``uniform`` (methods drawn uniformly, the SDMP default), ``mixup``, ``cutmix``, ``resizemix`` (every
sample with the one method). ``gb_per_s`` counts one read and one write of every view; ``vs_copy`` is the time
over the copy's time (the issue's target: kernel within 1.5x of the copy); graph rows are compared with
``copy_graph``.
"""
from __future__ import annotations

import functools
import traceback
from typing import Dict, List

import torch

from sdmp_fast import mixing
from sdmp_fast.benchmarks.common import (check_counts, check_output_path, copy_bandwidth_gbps, cuda_time_ms,
                                         device_description, peak_memory_mb, print_table, report_interrupted,
                                         rows_until_interrupted, write_results)
from sdmp_fast.benchmarks.losses import DTYPES, default_json_path, graph_step
from sdmp_fast.kernels.selfcheck import env

CASES = {"uniform": mixing.METHODS, "mixup": ("mixup",), "cutmix": ("cutmix",), "resizemix": ("resizemix",)}
COLUMNS = ["case", "impl", "status", "ms", "gb_per_s", "pct_of_copy", "vs_copy", "speedup_vs_eager",
           "speedup_vs_compile", "peak_mb", "mem_vs_eager", "shape"]


def add_arguments(p) -> None:
    p.add_argument("--batch-size", type=int, default=None, help="samples (default 256 on GPU, 8 on CPU)")
    p.add_argument("--sizes", default=None, help="view sizes, comma list (default '224,224' on GPU, '64,64' on CPU)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--cases", default="uniform,mixup,resizemix", help=f"comma list among {', '.join(CASES)}")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--mix-variants", default="", help="extra graph rows with other launch configurations, comma "
                   "list of pN (N = 1, 2, 4 packs of pixels per thread, SDMP_MIX_PACKS) and staged (resizemix "
                   "resampled in lane order through shared memory, SDMP_MIX_STAGED=1)")
    p.add_argument("--json", default=None, help="output JSON (default bench/results/mixing-<device>-<date>.json)")


def view_sizes(args, device) -> List[int]:
    """--sizes (or the device's default) as integers >= 1; else a ValueError naming the option."""
    text = args.sizes or ("224,224" if device.type == "cuda" else "64,64")
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes: expected a comma list of view sizes >= 1, got {text!r}")
    return sizes


def _views_and_params(args, device, dtype, methods):
    n = args.batch_size or (256 if device.type == "cuda" else 8)
    sizes = view_sizes(args, device)
    g = torch.Generator(device=device).manual_seed(0)
    views = [torch.randn(n, args.channels, s, s, device=device, generator=g).to(dtype) for s in sizes]
    lam, method = mixing.draw_mix_params(n, 1.0, methods, g, device)
    boxes = []
    for v in views:
        h, w = v.shape[-2:]
        cut_h, cut_w = mixing.box_size(lam, h, w)
        y0, x0 = mixing.box_position(cut_h, cut_w, h, w, g)
        boxes.append((y0, x0, cut_h, cut_w))
    return views, lam, method, boxes


def bench_case(case: str, args, device, dtype, copy_gbps) -> List[Dict]:
    import sdmp_fast.kernels as K
    methods = CASES[case]
    ids = mixing.method_ids(methods)
    views, lam, method, boxes = _views_and_params(args, device, dtype, methods)
    nbytes = 2 * sum(v.numel() * v.element_size() for v in views)
    sizes = [tuple(v.shape) for v in views]
    shape = (f"{len(views)} x {sizes[0]}" if len(set(sizes)) == 1 else " + ".join(map(str, sizes))) + \
        f" {str(dtype).replace('torch.', '')}"
    outs = [torch.empty_like(v) for v in views]
    cols = [list(c) for c in zip(*boxes)]  # y0s, x0s, cut_hs, cut_ws

    def eager():
        return [mixing.apply_mix(v, lam, method, *b, ids) for v, b in zip(views, boxes)]

    def copy():
        return [o.copy_(v) for o, v in zip(outs, views)]

    def kernel():
        return K.apply_mix_views(views, lam, method, *cols, method_set=ids)

    on_gpu = device.type == "cuda"
    impls = {
        "copy": lambda: copy,
        "kernel": lambda: kernel if (on_gpu and K.available(device)) else None,
        "copy_graph": lambda: graph_step(copy) if on_gpu else None,
        "kernel_graph": lambda: graph_step(kernel) if (on_gpu and K.available(device)) else None,
        "eager": lambda: eager,
    }
    for variant in parse_mix_variants(getattr(args, "mix_variants", "")):
        settings = {"SDMP_MIX_STAGED": "1"} if variant == "staged" else {"SDMP_MIX_PACKS": variant[1:]}

        def variant_step(kv=settings):
            if not (on_gpu and K.available(device)):
                return None
            with env(**kv):  # the launch configuration is read when the graph is captured
                return graph_step(kernel)
        impls[f"kernel_graph_{variant}"] = variant_step
    if not args.no_compile:
        impls["compile"] = lambda: (lambda f: (lambda: [f(v, lam, method, *b, ids) for v, b in zip(views, boxes)]))(
            torch.compile(mixing.apply_mix))
    rows = []
    for impl, factory in impls.items():
        row = {"case": case, "impl": impl, "status": "ok", "ms": None, "shape": shape, "bytes": nbytes, "reason": ""}
        try:
            step = factory()
            if step is None:
                row.update(status="unavailable", reason="no CUDA device" if device.type != "cuda"
                           else f"kernels not built: {K.build_error()}")
            else:
                row["ms"] = cuda_time_ms(step, warmup=args.warmup, iters=args.iters)
                # a graph replay allocates nothing (its pool was taken at capture): the eager rows carry memory
                row["peak_mb"] = None if "_graph" in impl else peak_memory_mb(step)
        except Exception as e:  # noqa: BLE001 - report and go on with the other implementations
            traceback.print_exc()
            row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
        row["gb_per_s"] = nbytes / (row["ms"] * 1e-3) / 1e9 if row["ms"] else None
        row["pct_of_copy"] = 100.0 * row["gb_per_s"] / copy_gbps if (row["gb_per_s"] and copy_gbps) else None
        rows.append(row)
        print(f"  {case:<10} {impl:<8} {row['status']:<11} {row['ms'] or float('nan'):8.3f} ms", flush=True)
    ms = {r["impl"]: r["ms"] for r in rows if r["ms"]}
    eager_mb = next((r.get("peak_mb") for r in rows if r["impl"] == "eager"), None)
    for r in rows:
        r["op"] = f"mix_{case}"
        r.setdefault("peak_mb", None)
        r["mem_vs_eager"] = r["peak_mb"] / eager_mb if (r["peak_mb"] and eager_mb) else None
        base = "copy_graph" if "_graph" in r["impl"] else "copy"
        r["vs_copy"] = r["ms"] / ms[base] if (r["ms"] and base in ms) else None
        for ref in ("eager", "compile"):
            r[f"speedup_vs_{ref}"] = ms[ref] / r["ms"] if (r["ms"] and ref in ms and r["impl"] != ref) else None
    return rows


def parse_mix_variants(text: str) -> List[str]:
    """'p2,p4,staged' -> ['p2', 'p4', 'staged']: packs of pixels per thread of the mixing kernel
    (SDMP_MIX_PACKS), or resizemix resampled through the per-warp stage (SDMP_MIX_STAGED=1)."""
    out = []
    for tok in (t.strip() for t in (text or "").split(",")):
        if not tok:
            continue
        if tok not in ("p1", "p2", "p4", "staged"):
            raise ValueError(f"--mix-variants: cannot read {tok!r} (p1, p2 or p4: packs of pixels per thread; "
                             f"staged: SDMP_MIX_STAGED=1)")
        out.append(tok)
    return out


def main(args) -> int:
    check_counts(args, iters=1, warmup=0, batch_size=2, channels=1)
    parse_mix_variants(getattr(args, "mix_variants", ""))  # bad input fails before anything runs
    cases = list(dict.fromkeys(c.strip() for c in args.cases.split(",") if c.strip()))  # one record per (op, impl)
    if not cases:  # nothing to time: an empty table crashed the report
        raise ValueError(f"--cases: no case in {args.cases!r}; choose among {', '.join(CASES)}")
    for c in cases:
        if c not in CASES:
            raise ValueError(f"--cases: unknown case {c!r}; choose among {', '.join(CASES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    view_sizes(args, device)  # bad input fails before anything runs
    dtype = DTYPES[args.dtype]
    path = args.json or default_json_path("mixing", device)
    check_output_path("--json", path)
    copy_gbps = copy_bandwidth_gbps()
    print(f"bench mixing on {device_description()}; copy bandwidth "
          f"{'%.0f GB/s' % copy_gbps if copy_gbps else 'n/a (CPU)'}", flush=True)
    records, interrupted = rows_until_interrupted(functools.partial(bench_case, c, args, device, dtype, copy_gbps)
                                                  for c in cases)
    for r in records:
        r["copy_gb_per_s"] = copy_gbps
    doc = write_results(path, records, getattr(args, "command_line", "sdmp-fast bench mixing"), interrupted,
                        fresh=args.json is None)
    print_table(records, COLUMNS)
    if interrupted:
        return report_interrupted(doc, "mixing")
    print(f"wrote {doc['json']}")
    return 0
