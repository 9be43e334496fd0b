"""Which compiled extension (if any) serves a tensor: lazy CUDA build, warning once, CPU emulation for tests.

Importing this module builds nothing. The CUDA extension is built (or loaded from the cache) on the first call
that needs it for a CUDA tensor; a failure (no nvcc, compile error, ...) warns once and every public function
falls back to the PyTorch reference from then on.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Optional

import torch
from torch.autograd import forward_ad

_lock = threading.Lock()
_cuda_ext = None
_cuda_tried = False
_cuda_error: Optional[str] = None
_cpu_ext = None  # CPU emulation module (tests): serves CPU tensors when set
_enabled = True

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launch limits of the kernels (gridDim.y <= 65,535 pairs of partner rows; 32-bit row and in-sample counts):
# larger inputs run the reference, so code that runs on a CPU does not fail on a GPU (the extension refuses
# them too, naming the argument, for callers of the raw ops).
MAX_PAIRED_BATCH = 2 * 65535
MAX_INT32 = 2**31 - 1


def enabled() -> bool:
    """Kernels may be used ($SDMP_KERNELS=0 or set_enabled(False) forces the references). Any other value of
    $SDMP_KERNELS than 1 / 0 / unset is an error naming it (``false`` or ``off`` ran the kernels silently)."""
    setting = os.environ.get("SDMP_KERNELS", "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"SDMP_KERNELS={setting!r}: expected 1 (the kernels where they can run, the default) or 0 "
                         f"(every function runs its PyTorch reference)")
    return _enabled and setting != "0"


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled():
    """Context in which every public function runs its reference (the fused/plain toggle)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def cuda_extension():
    """The CUDA extension module, built on first use; None (after one warning) if it cannot be built."""
    global _cuda_ext, _cuda_tried, _cuda_error
    if _cuda_tried:
        return _cuda_ext
    with _lock:
        if not _cuda_tried:
            try:
                from .build import load
                _cuda_ext = load()
            except Exception as e:  # noqa: BLE001 - any build failure means "use the reference"
                _cuda_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                warnings.warn(f"sdmp_fast.kernels: CUDA kernels unavailable ({_cuda_error}); using the PyTorch "
                              f"reference implementations", RuntimeWarning, stacklevel=3)
            _cuda_tried = True
    return _cuda_ext


def build_error() -> Optional[str]:
    return _cuda_error


def set_cpu_emulation(ext) -> None:
    """Route CPU tensors to an emulated build (build.load_emulated()); None switches it off. Tests only."""
    global _cpu_ext
    _cpu_ext = ext


def extension_for(t: torch.Tensor):
    """The module that runs kernels on t's device, or None (reference path)."""
    if not enabled():
        return None
    if t.device.type == "cuda":
        return cuda_extension() if torch.cuda.is_available() else None
    if t.device.type == "cpu" and _cpu_ext is not None:
        return _cpu_ext
    return None


def require(t: torch.Tensor):
    """Inside a custom op implementation: the module for t (the public functions checked it exists)."""
    ext = extension_for(t)
    if ext is None:
        raise RuntimeError(f"sdmp_fast kernels: no compiled extension for a {t.device.type} tensor "
                           f"(call the public functions of sdmp_fast.kernels, which fall back to the references)")
    return ext


def direct(*tensors: Optional[torch.Tensor]) -> bool:
    """An eager call on plain tensors, which may go straight to the extension: the custom ops' dispatch costs
    ~20 us of Python per call (measured), a large share of an ungraphed step's host time. torch.compile, tensor
    subclasses (fake, functional) and torch.func transforms take the registered ops."""
    return not torch.compiler.is_compiling() and all(
        t is None or (type(t) is torch.Tensor and not _functorch_wrapped(t)) for t in tensors)


def _functorch_wrapped(t: torch.Tensor) -> bool:  # torch.func transforms wrap tensors (no storage of their own)
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def transformed(*tensors: Optional[torch.Tensor]) -> bool:
    """Any tensor under a torch.func transform (grad, vmap, jvp, jacfwd, ...) or carrying a forward-mode tangent
    (torch.autograd.forward_ad): the public functions then run the references. The ops' autograd formulas are
    reverse-mode only, so forward-mode AD saw constant outputs (zero tangents, silently) and the functorch
    transforms refused them."""
    if torch.compiler.is_compiling():  # dynamo cannot trace these checks; compiled code takes the registered ops
        return False
    return any(t is not None and (_functorch_wrapped(t) or forward_ad.unpack_dual(t).tangent is not None)
               for t in tensors)


def double_backward(ctx, n_grads: int, inputs, outputs, grad_outputs):
    """A backward called with create_graph=True (grad mode on inside a backward): the kernels' gradient has no
    graph of its own, so a Hessian-vector product or gradient penalty would silently lose the second-order
    terms. Instead the gradient comes from the reference recomputed on the saved inputs (those in
    ``inputs``: index -> tensor, the ones ``ctx.needs_input_grad`` asks for), differentiable twice."""
    want = {i: x for i, x in inputs.items() if ctx.needs_input_grad[i] and x is not None and x.requires_grad}
    grads = [None] * n_grads
    if want:
        got = torch.autograd.grad(outputs(), list(want.values()), grad_outputs, create_graph=True, allow_unused=True)
        for i, g in zip(want, got):
            grads[i] = g
    return tuple(grads)


def route(op, ext_name: str, *tensors: Optional[torch.Tensor]):
    """What runs a call without autograd: the extension's `ext_name` for a direct call (tensors[0] picks the
    extension), else the registered op."""
    return getattr(require(tensors[0]), ext_name) if direct(*tensors) else op


def eager_function(ext_name: str, setup_context, backward):
    """An autograd.Function running the extension's `ext_name` with a custom op's own setup_context / backward:
    the direct route for ops with gradients. Old style (ctx in forward): a separate setup_context costs ~13 us
    more per call in Function.apply (measured)."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out = tuple(getattr(require(inputs[0]), ext_name)(*inputs))
            setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{ext_name}"
    return EagerOp


def kernel_ok(*tensors: torch.Tensor) -> bool:
    """All tensors on one device that has an extension, floating ones in a kernel dtype."""
    if not tensors:
        return False
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if any(t.is_floating_point() and t.dtype not in KERNEL_DTYPES for t in tensors):
        return False
    return extension_for(tensors[0]) is not None
