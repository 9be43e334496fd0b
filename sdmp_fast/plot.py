"""`sdmp-fast plot RUN_DIR`: loss (with each loss term) and images/sec against the step, from
``RUN_DIR/metrics.jsonl``, as one two-panel PNG (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from sdmp_fast.runlog import read_metrics as runlog_records

# Keys of a metrics record that are not loss terms (schedules, bookkeeping, throughput).
NOT_LOSS_TERMS = {"step", "epoch", "loss", "img_per_s", "lr", "wd", "momentum", "tau_t", "skipped", "time_s",
                  "teacher_entropy", "teacher_batch_entropy",
                  "grad_norm"}


def image_out_path(out: str, default_name: str, setting: str = "--out") -> str:
    """The file an image for ``out`` is actually written to: an existing directory (or a path ending in a
    separator) gets ``default_name`` inside it, a path without a suffix gets ``.png`` (matplotlib would add it
    silently). A suffix matplotlib cannot write is a ValueError naming ``setting``."""
    out = os.fspath(out)
    if not out:
        raise ValueError(f"{setting}: empty path")
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return os.path.join(out, default_name)
    ext = os.path.splitext(out)[1]
    if not ext or ext == ".":
        return out.rstrip(".") + ".png"
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if ext[1:].lower() not in formats:
        raise ValueError(f"{setting}: {out!r} has suffix {ext!r}, which cannot be written as an image; use .png "
                         f"(or one of {', '.join(sorted(formats))})")
    return out


def check_writable(out: str, setting: str = "--out") -> None:
    """A ValueError naming ``setting`` when the image file ``out`` cannot be written (a read-only folder, a file
    where a folder should be): found before any work is done, not as an OSError after it."""
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise ValueError(f"{setting}: {out!r} is a folder, not an image file")
    if os.path.exists(out):
        if not os.access(out, os.W_OK):
            raise ValueError(f"{setting}: cannot write {out!r}: the file is read-only or not this user's")
        return
    from sdmp_fast.paths import why_not_creatable

    problem = why_not_creatable(out)
    if problem:
        raise ValueError(f"{setting}: cannot write {out!r}: {problem}")


def read_metrics(path: str) -> List[Dict]:
    """Records of ``path`` (a run directory or its metrics.jsonl). A torn last line (a run killed mid-write)
    is skipped; a file without a single record is an error naming it."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics: {path!r} does not exist (is it a run directory of sdmp-fast train?)")
    recs = [rec for rec in runlog_records(path) if _is_number(rec.get("step"))]
    if not recs:
        raise ValueError(f"metrics: {path!r} holds no records with a numeric 'step'")
    return recs


def _is_number(v) -> bool:
    """int or float, not bool (True is an int to Python, and would be drawn as 1.0)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def loss_terms(recs: List[Dict]) -> List[str]:
    """Numeric keys other than the total loss and bookkeeping, in first-seen order (source, mix_source, ...)."""
    names: List[str] = []
    for r in recs:
        for k, v in r.items():
            if k not in NOT_LOSS_TERMS and k not in names and _is_number(v):
                names.append(k)
    return names


def _series(recs: List[Dict], key: str):
    pts = [(r["step"], r[key]) for r in recs if _is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run: str, out: Optional[str] = None, title: Optional[str] = None) -> str:
    """Write the PNG (default ``RUN_DIR/curves.png``; an existing directory ``out`` gets ``curves.png`` inside it,
    an ``out`` without a suffix gets ``.png``) and return the path actually written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run)
    if out is None:
        out = os.path.join(run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run)), "curves.png")
    out = image_out_path(out, "curves.png")
    check_writable(out)  # before drawing: a read-only run folder is named, and --out is the way out
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = _series(recs, "loss")
    handles = []
    if steps:
        handles += ax_loss.plot(steps, loss, color="black", lw=2, label="loss (total, left axis)")
    terms = loss_terms(recs)
    # The total is a sum of terms, so it sits well above each of them: the terms get their own (right) axis,
    # otherwise their slopes flatten into lines at the bottom of the panel.
    ax_terms = ax_loss.twinx() if terms and steps else ax_loss
    for name in terms:
        s, v = _series(recs, name)
        handles += ax_terms.plot(s, v, lw=1.2, ls="--" if ax_terms is not ax_loss else "-",
                                 label=name + (" (right axis)" if ax_terms is not ax_loss else ""))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    if ax_terms is not ax_loss:
        ax_terms.set_ylabel("loss terms")
    ax_loss.set_title("loss and its terms")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(handles=handles, fontsize=8)
    s, v = _series(recs, "img_per_s")
    ax_speed.plot(s, v, color="tab:green", marker="o" if len(s) < 30 else None, ms=3)
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("images / s")
    ax_speed.set_title("throughput (per logging window)")
    ax_speed.set_ylim(bottom=0)
    ax_speed.grid(alpha=0.3)
    fig.suptitle(title or os.path.basename(os.path.normpath(run)), fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def save_figure(fig, out: str, **savefig_kw) -> None:
    """``fig.savefig(out)`` whole or not at all: savefig writes in place, so a full disk left an earlier PNG
    empty, with an error naming no file."""
    from sdmp_fast.paths import write_replacing

    fmt = os.path.splitext(out)[1].lstrip(".").lower() or "png"
    write_replacing(out, lambda fh: fig.savefig(fh, format=fmt, **savefig_kw), "figure", binary=True)


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="run directory (or its metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png; a directory: "
                   "DIR/curves.png; no suffix: .png is added)")
    p.add_argument("--title", default=None)


def main(args) -> int:
    path = plot_run(args.run_dir, args.out, args.title)
    print(f"wrote {path}")
    return 0
