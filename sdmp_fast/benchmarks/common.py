"""Shared benchmark plumbing: device description, timing helpers and the one JSON format.

JSON: {"device": str, "date": str, "command": str, "records": [...]}; each benchmark defines its record keys.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch


def check_counts(args, **minimums: int) -> None:
    """ValueError naming the option when an integer setting of ``args`` is below its minimum (None: its default
    applies, not checked): bad counts fail before anything runs instead of as failed rows or tracebacks."""
    for name, lo in minimums.items():
        v = getattr(args, name, None)
        if v is not None and v < lo:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {lo}, got {v}")


def device_description() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def write_results(path: Optional[str], records: List[Dict], command: str, interrupted: bool = False,
                  fresh: bool = False) -> Dict:
    """Write the shared bench JSON atomically (tmp + rename); returns the document, with ``"json"``: the file
    written (None if none), which is not in the file. An interrupted run's rows go beside ``path``
    (:func:`interrupted_path`, the document says ``"interrupted": true``): a complete earlier result at ``path``
    is never replaced by part of a run. ``fresh`` (a default name, not the user's --json): an existing file is
    kept and the rows go to ``NAME-2.json``, ``NAME-3.json``, ... (two runs on one card model on one day, on two
    nodes of a shared checkout or one after another, each keep their file)."""
    doc = {"device": device_description(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command, "records": records}
    if interrupted:  # stopped before any row: nothing worth a file
        doc["interrupted"] = True
        path = interrupted_path(path) if (path and records) else None
    written = write_json(path, doc, fresh) if path else None
    doc["json"] = written
    return doc


EXIT_INTERRUPTED = 130  # as the trainer (and a shell) report Ctrl-C


def interrupted_path(path: str) -> str:
    """bench/results/losses-x.json -> bench/results/losses-x.interrupted.json"""
    stem, ext = os.path.splitext(path)
    return f"{stem}.interrupted{ext or '.json'}"


def rows_until_interrupted(parts: Iterable[Callable[[], List[Dict]]]) -> Tuple[List[Dict], bool]:
    """Run each part (an op, a case, a mode: a callable returning its rows) in turn; Ctrl-C stops the loop and
    keeps the rows of the parts that finished, instead of losing the whole run's (a part cut short gives none:
    its rows would be timed against baselines it never measured). Returns (rows, interrupted)."""
    rows: List[Dict] = []
    try:
        for part in parts:
            rows += part()
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): keeping the {len(rows)} rows measured so far", file=sys.stderr, flush=True)
        return rows, True
    return rows, False


def report_interrupted(doc: Dict, kind: str) -> int:
    """The closing line of a bench interrupted before it could write its --json, and its exit status."""
    where = f"wrote them to {doc['json']}" if doc.get("json") else "nothing written"
    print(f"bench {kind}: interrupted with {len(doc['records'])} rows measured; {where} (a complete earlier "
          f"result keeps its own file)", file=sys.stderr)
    return EXIT_INTERRUPTED


def check_output_path(option: str, path: Optional[str]) -> None:
    """An output the run will write (--json, --png), checked before anything is timed: found unwritable at the
    end, it cost every row measured (the table of some commands is printed only after it)."""
    if not path:
        return
    from sdmp_fast.paths import why_not_creatable

    if os.path.isdir(path):
        raise ValueError(f"{option}: {path!r} is a folder; give a file name")
    problem = why_not_creatable(path)
    if problem:
        raise ValueError(f"{option}: cannot write {path!r}: {problem}")


def write_json(path: str, doc: Dict, fresh: bool = False) -> str:
    """Atomic write (tmp + rename): a reader never sees half a file, an interrupted run leaves the old one.
    ``fresh``: never replaces a file; the first free name of ``path``, ``STEM-2.EXT``, ``STEM-3.EXT``, ... is
    taken (created exclusively, so two runs at once never pick the same). Returns the path written."""
    from sdmp_fast.paths import write_replacing

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fresh:
        stem, ext = os.path.splitext(path)
        for i in itertools.count(1):
            candidate = path if i == 1 else f"{stem}-{i}{ext}"
            try:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            path = candidate  # reserved: empty until the rename below, which follows at once
            break
    try:
        write_replacing(path, lambda f: json.dump(doc, f, indent=2), "--json (the table printed above)")
    except BaseException:
        if fresh:  # no empty file left for a reader to choke on
            from sdmp_fast.paths import discard

            discard(path)
        raise
    return path


def cuda_time_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of ``fn`` in ms, CUDA-event timed on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device=None) -> Optional[float]:
    """Peak device memory (MiB) one call of ``fn`` allocates beyond what was allocated before it, from the CUDA
    caching allocator's statistics; None off CUDA (CPU allocations are not counted by torch). A CUDA-graph replay
    allocates nothing (its memory was taken at capture): measure the eager call."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> Optional[float]:
    """Measured device-to-device copy bandwidth (read + write counted), the card's practical HBM ceiling."""
    if not torch.cuda.is_available():
        return None
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_time_ms(lambda: b.copy_(a), warmup=3, iters=10)
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def print_table(rows: List[Dict], columns: List[str]) -> None:
    widths = [max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)
