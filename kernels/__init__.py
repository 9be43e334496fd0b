"""sdmp_fast.kernels: Triton-free CUDA C++ kernels for the SDMP losses and mixing, with reference fallbacks.

Public functions take exactly the signatures of the references in :mod:`sdmp_fast.losses` and
:mod:`sdmp_fast.mixing` and return the same results; each has a ``*_ref`` twin (the reference itself). On CUDA
tensors they run the kernels (JIT-built with nvcc/ninja on first use, cached in ``~/.cache/sdmp_fast_kernels``);
on CPU tensors, without nvcc, or if the build fails (one warning), they run the reference. Importing this
package never builds anything. ``SDMP_KERNELS=0`` or :func:`disabled` forces the references.

The kernels are ``torch.library`` custom ops (``sdmp_fast::two_hot_ce``, ``sdmp_fast::dino_fwd``,
``sdmp_fast::batch_mix``, ...) with fake implementations, so ``torch.compile`` traces through them, and they
launch on the current stream with caching-allocator memory only and no host synchronisation, so forward and
backward can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from ._ext import build_error, disabled, set_enabled
from .batch_mix import apply_mix, apply_mix_ref, apply_mix_views, mix_views, mix_views_ref
from .dino_ce import (dino_center_mean_ref, sdmp_dino_terms, sdmp_dino_terms_and_center,
                      sdmp_dino_terms_and_center_ref, sdmp_dino_terms_ref)
from .two_hot_ce import sdmp_moco_terms, sdmp_moco_terms_ref, two_hot_cross_entropy, two_hot_cross_entropy_ref

__all__ = ["available", "build_error", "disabled", "set_enabled",
           "two_hot_cross_entropy", "two_hot_cross_entropy_ref", "sdmp_moco_terms", "sdmp_moco_terms_ref",
           "sdmp_dino_terms", "sdmp_dino_terms_ref", "sdmp_dino_terms_and_center", "sdmp_dino_terms_and_center_ref",
           "dino_center_mean_ref", "apply_mix", "apply_mix_ref", "apply_mix_views", "mix_views", "mix_views_ref"]


def available(device=None) -> bool:
    """Whether the kernels serve tensors on ``device`` (default: the current CUDA device).

    On a CUDA machine the first call builds or loads the extension. False on CPU-only machines, with
    SDMP_KERNELS=0, or when the build failed (see :func:`build_error`).
    """
    from . import _ext
    if device is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    # no driver or no such GPU: nothing to serve (allocating the probe tensor there would raise)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        return False
    return _ext.extension_for(torch.empty(0, device=device)) is not None
