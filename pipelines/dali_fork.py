"""DALI pipelines across ``os.fork``: a forked child never tears down a pipeline it inherited.

A DALI pipeline's executor and worker threads live only in the process that built it. A forked child (a torch
DataLoader worker, a ``multiprocessing`` pool on Linux's default start method) gets a copy of every pipeline
object but none of those threads; when the child's garbage collector meets a pipeline that had become garbage in
the parent (a loader dropped inside a reference cycle, not collected yet), or when the child exits normally and
DALI's atexit hook shuts its pipelines down, the C++ destructor waits on condition variables whose waiters exist
only in the parent: the child hangs for ever. Seen as a torchvision loader's DataLoader worker stuck in
``dali::exec2::Executor2::~Impl`` after a DALI loader of the same process had been dropped, which stalled the
epoch and, at exit, the whole process.

``install()`` registers fork hooks: the parent's garbage collector is paused over the fork (so the child runs no
collection before the hook below), and in the child every live DALI pipeline's backend gets one reference that is
never released and is detached from its Python object, so neither its ``__del__`` nor DALI's atexit hook reaches
the destructor. The child cannot use an inherited pipeline anyway (its threads are gone); the memory is the
parent's copy-on-write pages. Only ``os.fork`` runs these hooks; spawn and forkserver children inherit nothing.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
from typing import List

_installed = False
_gc_was_enabled: List[bool] = []


def detach_inherited_pipelines() -> int:
    """In a forked child: keep every DALI pipeline backend alive for good and detach it from its Python object.
    Returns how many were detached."""
    module = sys.modules.get("nvidia.dali.pipeline")
    if module is None:  # DALI never imported: no pipeline exists
        return 0
    detached = 0
    for ref in list(getattr(module.Pipeline, "_pipes", ())):
        pipe = ref()
        backend = getattr(pipe, "_pipe", None) if pipe is not None else None
        if backend is None:
            continue
        # a reference no container holds: interpreter shutdown, which clears module globals, cannot drop it
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(backend))
        pipe._pipe = None
        detached += 1
    return detached


def _before_fork() -> None:
    _gc_was_enabled.append(gc.isenabled())
    gc.disable()


def _restore_gc() -> None:
    if _gc_was_enabled and _gc_was_enabled.pop():
        gc.enable()


def _after_fork_in_child() -> None:
    try:
        detach_inherited_pipelines()
    finally:
        _restore_gc()


def install() -> None:
    """Register the fork hooks once per process (idempotent)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_before_fork, after_in_parent=_restore_gc, after_in_child=_after_fork_in_child)
    _installed = True
