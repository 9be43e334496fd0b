"""What a run writes about itself (rank 0 only): ``out/metrics.jsonl``, a tqdm bar, TensorBoard if importable.

metrics.jsonl: one JSON object per logged step, keys
  step (optimiser steps done, 1-based), epoch (fractional), loss, each loss term (MoCo: source, mix_source,
  mix_mix | source, source_sym; DINO: dino, mix_source, mix_teacher | dino), grad_norm, lr, wd, momentum,
  tau_t, teacher_entropy, teacher_batch_entropy (DINO), img_per_s (source images per second over the window, all ranks), skipped (non-finite steps in
  the window), time_s (seconds since the run (re)started).
Loss values are means over the steps of the window since the previous record. A resumed run first drops the
records written after the checkpoint it resumes from, so the file never holds the same step twice.
"""
from __future__ import annotations

import errno
import json
import math
import os
import sys
from typing import Dict, List, Optional

__all__ = ["RunLogger", "read_metrics", "iter_records", "truncate_metrics"]


def read_metrics(path: str):
    """All records of a metrics.jsonl (a run directory or the file); a torn line is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    return [rec for _, rec in iter_records(path)]


def iter_records(path: str):
    """(line, record) for every parseable record line of a metrics.jsonl; a torn line (a run killed mid-write)
    is skipped."""
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield line, rec


def truncate_metrics(path: str, last_step: int) -> List:
    """Keep only records with step <= last_step (atomic rewrite); a torn last line is dropped. Returns the steps
    of the records kept."""
    if not os.path.isfile(path):
        return []
    from sdmp_fast.paths import write_replacing

    kept, steps = [], []
    for line, rec in iter_records(path):
        if rec.get("step", 0) <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
            steps.append(rec.get("step"))
    if os.path.getsize(path) != sum(len(line.encode()) for line in kept):  # something to drop (a line, torn or not)
        write_replacing(path, lambda fh: fh.writelines(kept), "metrics (records after the checkpoint dropped)")
    return steps


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null marks "no finite value in this window"
    return v


class RunLogger:
    _console_gone = False  # the terminal or pipe of the console closed: nothing more is printed

    def __init__(self, out: str, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, log=print, resumed_record: Optional[Dict] = None):
        self.enabled, self.log = enabled, log
        self.bar = self.tb = self.fh = None
        if not enabled:
            return
        path = os.path.join(out, "metrics.jsonl")
        steps = truncate_metrics(path, initial_step)
        self.path = path
        self.fh = open(path, "ab", buffering=0)  # unbuffered: a failed write is seen (and undone) at once
        if resumed_record is not None and resumed_record.get("step") == initial_step and initial_step > 0:
            if initial_step not in steps:  # the run stopped between its last save and that step's record
                self._append((json.dumps({k: _clean(v) for k, v in resumed_record.items()}) + "\n").encode(),
                             initial_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: metrics.jsonl is the record
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=initial_step + 1)

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self._console(self.bar.update, n)

    def record(self, rec: Dict) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in rec.items()}
        self._append((json.dumps(rec) + "\n").encode(), rec.get("step"))
        if self.bar is not None:
            show = {k: rec[k] for k in ("loss", "img_per_s") if rec.get(k) is not None}
            show.update({k: v for k, v in rec.items() if k.startswith(("source", "mix_", "dino"))
                         and v is not None})
            self._console(self.bar.set_postfix,
                          {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in show.items()}, refresh=False)
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def _append(self, data: bytes, step) -> None:
        """Append one record line, whole or not at all: a failed write (disk full) truncates the file back to
        the records before it and is a CheckpointError naming the file."""
        if self.fh is None:
            return
        fd = self.fh.fileno()
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = self.fh.write(view)
                view = view[n:]
        except OSError as e:
            from sdmp_fast.checkpoint import CheckpointError

            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            fh, self.fh = self.fh, None
            try:
                fh.close()
            except OSError:
                pass
            reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise CheckpointError(f"metrics: could not write the record of step {step} to {self.path} ({reason}); "
                                  f"the records before it are intact") from e

    def write(self, msg: str) -> None:
        if not self.enabled or self._console_gone:
            return
        if self.bar is not None:
            self._console(self.bar.write, msg, file=sys.stderr)
        else:
            self._console(self.log, msg)

    def _console(self, action, *args, **kwargs) -> None:
        """A console write, best effort: a closed terminal (EIO) or pipe (`| head`, EPIPE) ends the console, not
        the run. The run died at its next line, before its checkpoint message, metrics record and export."""
        try:
            action(*args, **kwargs)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise
            self._console_gone, self.bar = True, None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.fh is not None:
            self.fh.close()
        self.bar = self.tb = self.fh = None
