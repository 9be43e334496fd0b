"""Bookkeeping of undecodable files for the backends that decode files themselves (torchvision, torch-gpu).

A bad file (corrupt, truncated, zero-byte, not an image) never stops an epoch: the batch is built from the
samples that decoded, the file is recorded here, and at the end of each epoch one warning names that epoch's
skipped files. When skipping leaves a batch odd while batch-flip mixing is on, one decodable sample is dropped
too (counted as ``trimmed``) so every mixed batch keeps its even size.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, Tuple

WARN_LISTED = 10  # files named in full in one warning; the rest are counted


class SkipLog:
    def __init__(self, backend: str):
        self.backend = backend
        self.reasons: Dict[str, str] = {}  # every file ever skipped -> why (first reason seen)
        self.trimmed = 0
        self._epoch: List[Tuple[str, str]] = []
        self._epoch_trimmed = 0

    @property
    def paths(self) -> List[str]:
        return list(self.reasons)

    def record(self, path: str, reason: str) -> None:
        self.reasons.setdefault(path, reason)
        self._epoch.append((path, reason))

    def record_trim(self) -> None:
        self.trimmed += 1
        self._epoch_trimmed += 1

    def end_epoch(self, epoch: int) -> None:
        """Warn once about this epoch's skipped files (if any), then start counting afresh."""
        bad, trimmed = self._epoch, self._epoch_trimmed
        self._epoch, self._epoch_trimmed = [], 0
        if not bad:
            return
        listed = "; ".join(f"{p} ({r})" for p, r in bad[:WARN_LISTED])
        more = f"; and {len(bad) - WARN_LISTED} more" if len(bad) > WARN_LISTED else ""
        kept_even = (f"; {trimmed} decodable sample(s) left out to keep mixed batches even" if trimmed else "")
        warnings.warn(f"{self.backend} loader, epoch {epoch}: skipped {len(bad)} undecodable file(s): "
                      f"{listed}{more}{kept_even}", RuntimeWarning, stacklevel=3)


def short_reason(e: BaseException) -> str:
    """One line: exception type and message, without torchvision's "fn, /build/path/file.cpp:52, " prefix."""
    text = re.sub(r"^\w+, \S+\.cpp:\d+, ", "", str(e).replace("\n", " ").strip())
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 160 else text[:157] + "..."
