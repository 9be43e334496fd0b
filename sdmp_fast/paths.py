"""Checks that a file or folder can be created, made before the work that would write it (not after it)."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["why_not_creatable"]


def why_not_creatable(path: str) -> Optional[str]:
    """Why ``path`` (not yet there) cannot be created, or None: its nearest existing ancestor must be a folder this
    user may write in. Read-only: nothing is created."""
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"the folder {probe!r} is read-only or not this user's"
    return None
