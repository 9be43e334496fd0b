"""Bookkeeping of undecodable files for the backends that decode files themselves (torchvision, torch-gpu).

A bad file (corrupt, truncated, zero-byte, not an image) never stops an epoch: the file is recorded here, at the
end of each epoch one warning names that epoch's skipped files, and the batch is made of the samples that
decoded (``settle``):

- with drop_last (training; the trainer's and DDP's case) every batch keeps its size: the slots of the skipped
  files are refilled with repeats of the batch's decodable samples (counted as ``filled``), so every rank of a
  distributed run takes ``len(loader)`` batches of equal size (collectives such as MoCo's key all_gather need
  both) whatever files its shard holds;
- without it (exact epochs: every decodable file exactly once) the batch shrinks, and when that leaves it odd
  while batch-flip mixing is on one more decodable sample is dropped (counted as ``trimmed``).

A batch with no decodable file at all is skipped either way, except in a sharded pass with drop_last: there the
ranks step together, and a rank that yields one batch fewer than ``len(loader)`` would stall the others at their
next collective, so it stops with ``UndecodableBatchError`` naming the files instead.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, Sequence, Tuple

WARN_LISTED = 10  # files named in full in one warning; the rest are counted


class UndecodableBatchError(ValueError):
    """No file of a batch decodes in a sharded drop_last pass, where every shard must yield ``len(loader)``."""


class SkipLog:
    def __init__(self, backend: str, sampler=None):
        self.backend = backend
        self.sampler = sampler  # the loader's EpochSampler: drop_last and the shards (check_empty_batch)
        self.reasons: Dict[str, str] = {}  # every file ever skipped -> why (first reason seen)
        self.trimmed = 0  # decodable samples left out to keep mixed batches even (no drop_last)
        self.filled = 0  # slots refilled with repeats of decodable samples (drop_last)
        self._epoch: List[Tuple[str, str]] = []
        self._epoch_trimmed = 0
        self._epoch_filled = 0

    @property
    def paths(self) -> List[str]:
        return list(self.reasons)

    def record(self, path: str, reason: str) -> None:
        self.reasons.setdefault(path, reason)
        self._epoch.append((path, reason))

    def check_empty_batch(self, paths: Sequence[str]) -> None:
        """A batch none of whose files decodes is about to be left out: raise when that would leave this shard a
        batch short of the others (drop_last, several shards); the files are recorded already."""
        s = self.sampler
        if s is None or not s.drop_last or s.num_shards <= 1:
            return
        listed = "; ".join(f"{p} ({self.reasons.get(p, '?')})" for p in paths[:WARN_LISTED])
        more = f"; and {len(paths) - WARN_LISTED} more" if len(paths) > WARN_LISTED else ""
        raise UndecodableBatchError(
            f"{self.backend} loader, shard {s.shard_id} of {s.num_shards}, epoch {s.epoch}: none of the "
            f"{len(paths)} files of a batch decodes: {listed}{more}. With drop_last every shard yields len(loader) "
            "batches (DDP ranks step together: one batch short would stall the others at their next collective), "
            "so the batch cannot be left out: remove or replace these files")

    def record_empty_batch(self, bad: Sequence[Tuple[str, str]]) -> None:
        """A batch whose files all failed, as (path, reason), found by a probe (a resume's skipped batches): record
        them as a pass would, then ``check_empty_batch``."""
        for path, reason in bad:
            self.record(path, reason)
        self.check_empty_batch([path for path, _ in bad])

    def record_trim(self) -> None:
        self.trimmed += 1
        self._epoch_trimmed += 1

    def settle(self, decoded: int, size: int, *, fill: bool, keep_even: bool) -> List[int]:
        """``settle`` for a batch that goes out now, recorded (DALI records its batches when they come back)."""
        pos = settle(decoded, size, fill=fill, keep_even=keep_even)
        self.record_settled(decoded, len(pos))
        return pos

    def record_settled(self, decoded: int, used: int) -> None:
        """A batch of ``decoded`` decodable samples went out with ``used`` (see ``settle``)."""
        for _ in range(max(0, decoded - used)):
            self.record_trim()
        self.filled += max(0, used - decoded)
        self._epoch_filled += max(0, used - decoded)

    def end_epoch(self, epoch: int, unfinished: bool = False) -> None:
        """Warn once about this epoch's skipped files (if any), then start counting afresh. ``unfinished``: the
        reader stopped inside the epoch (a training run's last steps, a stop signal): what it skipped so far."""
        bad, trimmed, filled = self._epoch, self._epoch_trimmed, self._epoch_filled
        self._epoch, self._epoch_trimmed, self._epoch_filled = [], 0, 0
        if not bad:
            return
        listed = "; ".join(f"{p} ({r})" for p, r in bad[:WARN_LISTED])
        more = f"; and {len(bad) - WARN_LISTED} more" if len(bad) > WARN_LISTED else ""
        kept_even = (f"; {trimmed} decodable sample(s) left out to keep mixed batches even" if trimmed else "")
        refilled = (f"; {filled} slot(s) refilled with repeats of decodable samples of the same batch "
                    f"(drop_last keeps every batch at its size)" if filled else "")
        warnings.warn(f"{self.backend} loader, epoch {epoch}{' (unfinished)' if unfinished else ''}: skipped {len(bad)} undecodable file(s): "
                      f"{listed}{more}{kept_even}{refilled}", RuntimeWarning, stacklevel=3)


def settle(decoded: int, size: int, *, fill: bool, keep_even: bool) -> List[int]:
    """The samples a batch of ``size`` files of which ``decoded`` decoded goes out with, as positions into the
    decodable ones (module docstring): all of them when nothing was skipped; with ``fill`` (drop_last) repeats
    in order up to ``size``; else all, less the last one when ``keep_even`` (mixing on) and their number is odd.
    Nothing when nothing decoded."""
    if decoded == 0:
        return []
    if decoded == size:
        return list(range(decoded))
    if fill:
        return _refill(decoded, size)
    if keep_even and decoded % 2:
        return list(range(decoded - 1))
    return list(range(decoded))


def _refill(decoded: int, size: int) -> List[int]:
    """The decodable samples in order, then repeats of them up to ``size``, each repeat chosen so that the slot
    batch-flip mixing pairs it with (n-1-s) does not hold the same sample (sdmp.md section 1: an image is never its
    own partner); the next one in the cycle is taken where the plain cycle would repeat the partner. Only a batch
    with a single decodable sample pairs it with itself."""
    out = list(range(decoded))
    c = 0
    for s in range(decoded, size):
        partner = size - 1 - s
        if partner < s and out[partner] == c % decoded and decoded > 1:
            c += 1
        out.append(c % decoded)
        c += 1
    return out


def short_reason(e: BaseException) -> str:
    """One line: exception type and message, without torchvision's "fn, /build/path/file.cpp:52, " prefix."""
    text = re.sub(r"^\w+, \S+\.cpp:\d+, ", "", str(e).replace("\n", " ").strip())
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 160 else text[:157] + "..."


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}


# First line of a .skipped.txt whose names are escaped (``escape_name``); a list without it (written before
# 2026-11-30) holds raw names, read as they are.
SKIPPED_LIST_HEADER = "# sdmp-fast convert: skipped files, one 'path<TAB>reason' line each, backslash-escaped"


def escape_name(path: str) -> str:
    """``path`` for one field of a "path<TAB>reason" line: backslash, tab and line ends written as \\, \\t, \\n,
    \\r (a file name may hold any of them; a raw one split the line)."""
    return re.sub(r"[\\\t\n\r]", lambda m: _ESCAPES[m.group()], path)


def unescape_name(field: str) -> str:
    """The inverse of ``escape_name``."""
    return re.sub(r"\\[\\tnr]", lambda m: _UNESCAPES[m.group()], field)
