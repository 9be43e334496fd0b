"""Self-check of the kernels against the references: input makers and checks shared by tests/test_kernels.py,
and ``python -m sdmp_fast.kernels.selfcheck``, a small fwd + bwd run of every op that bench/gpu_kernels.sh
runs under compute-sanitizer (small sizes keep the sanitizer quick). Exit status 1 on any mismatch.

Errors are relative (||a - b|| / ||b||): fp32 within 1e-5, half precision within 1e-2 (gradients 2e-2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

import torch

import sdmp_fast.kernels as K
from sdmp_fast import losses, mixing

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def moco_inputs(n, d, world_size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, q2m = (torch.randn(n, d, generator=g).to(device, dtype) for _ in range(2))
    k1, k2, k1m = (torch.randn(n * world_size, d, generator=g).to(device, dtype) for _ in range(3))
    lam = _lam(n, g, device)
    return q1, q2m, k1, k2, k1m, lam


def _lam(n, g, device):
    """Random lam with lam 1 (an unmixed sample) first and, in an odd batch, at the middle: that image is its own
    batch-flip partner, and the losses take it only unmixed (losses.check_unpaired_middle)."""
    lam = torch.rand(n, generator=g)
    lam[0] = 1.0
    if n % 2:
        lam[n // 2] = 1.0
    return lam.to(device)


def dino_inputs(sc, sm, t, b, k, dtype, device, teacher_mixed=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 1.5).to(device, dtype)  # noqa: E731
    s_clean, t_clean = mk(sc, b, k), mk(t, b, k)
    s_mixed = mk(sm, b, k) if sm else None
    t_mixed = mk(t, b, k) if (sm and teacher_mixed) else None
    center = (torch.randn(k, generator=g) * 0.3).to(device)
    lam = _lam(b, g, device)
    return s_clean, s_mixed, t_clean, t_mixed, center, lam


def mix_inputs(n, c, h, w, dtype, device, seed=0, methods=mixing.METHODS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(device, dtype)
    lam, method = mixing.draw_mix_params(n, 1.0, methods, g)
    method = torch.arange(n) % 3 if len(methods) == 3 else method  # every method present
    cut_h, cut_w = mixing.box_size(lam, h, w)
    y0, x0 = mixing.box_position(cut_h, cut_w, h, w, g)
    return [t.to(device) for t in (x, lam, method, y0, x0, cut_h, cut_w)]


@contextmanager
def env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------------------------------ shared checks

def check_two_hot(device, dtype, n, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, N, generator=g) * 3).to(device, dtype)
    ia = torch.randint(0, N, (n,), generator=g).to(device)
    ib = torch.randint(0, N, (n,), generator=g).to(device)
    wa, wb = torch.rand(n, generator=g).to(device), torch.rand(n, generator=g).to(device)
    up = torch.randn(n, generator=g).to(device)
    a, b = leaf(logits), leaf(logits)
    out = K.two_hot_cross_entropy(a, ia, ib, wa, wb)
    ref = K.two_hot_cross_entropy_ref(b, ia, ib, wa, wb)
    assert out.dtype == ref.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()
    assert rel_err(a.grad, b.grad) <= TOL[dtype]


def check_moco(device, dtype, n, d, world_size, rank):
    q1, q2m, k1, k2, k1m, lam = moco_inputs(n, d, world_size, dtype, device)
    qa, qb = leaf(q2m), leaf(q2m)
    got = K.sdmp_moco_terms(q1, qa, k1, k2, k1m, lam, 0.2, rank, world_size)
    ref = K.sdmp_moco_terms_ref(q1, qb, k1, k2, k1m, lam, 0.2, rank, world_size)
    for name in ("source", "mix_source", "mix_mix"):
        assert rel_err(got[name], ref[name]) <= TOL[dtype], name
    losses.sdmp_moco_loss(got).backward()
    losses.sdmp_moco_loss(ref).backward()
    assert rel_err(qa.grad, qb.grad) <= TOL[dtype] * (10 if dtype != torch.float32 else 1)


def check_dino(device, dtype, sc, sm, t, b, k, teacher_mixed=True, upstream="loss", seed=0):
    """Kernel terms, center statistic and student gradients vs the reference.

    upstream: "loss" (loss.backward(): the precomputed gradient is kept), "scaled" (all terms scaled alike:
    in-place rescale), "mixed" (different weights per term: recompute)."""
    s_clean, s_mixed, t_clean, t_mixed, center, lam = dino_inputs(sc, sm, t, b, k, dtype, device, teacher_mixed, seed)
    sca, scb, sma, smb = leaf(s_clean), leaf(s_clean), leaf(s_mixed), leaf(s_mixed)
    got, mean = K.sdmp_dino_terms_and_center(sca, sma, t_clean, t_mixed, center, lam)
    ref = K.sdmp_dino_terms_ref(scb, smb, t_clean, t_mixed, center, lam)
    assert set(got) == set(ref)
    for name in ref:
        assert torch.isfinite(got[name]), name
        assert abs(got[name].item() - ref[name].item()) <= TOL[dtype] * max(abs(ref[name].item()), 1e-3), name
    assert rel_err(mean, K.dino_center_mean_ref(t_clean)) <= 1e-6
    weights = {"loss": {"loss": 1.0}, "scaled": {"loss": 4.0},
               "mixed": {"dino": 0.5, "mix_source": 2.0, "mix_teacher": -1.0}}[upstream]
    sum(w * got[n] for n, w in weights.items()).backward()
    sum(w * ref[n] for n, w in weights.items()).backward()
    grad_tol = TOL[dtype] * (2 if dtype != torch.float32 else 1)
    assert sca.grad.dtype == dtype and torch.isfinite(sca.grad.float()).all()
    assert rel_err(sca.grad, scb.grad) <= grad_tol
    if sm:
        assert torch.isfinite(sma.grad.float()).all()
        assert rel_err(sma.grad, smb.grad) <= grad_tol


def check_dino_unpaired(device, dtype, k=64, seed=0):
    """One teacher crop: student crop 0 (the teacher's own view) is in no pair. A NaN and a -inf there must not
    reach the terms (the reference never reads that crop) and its gradient is zero."""
    s_clean, s_mixed, t_clean, t_mixed, center, lam = dino_inputs(2, 1, 1, 4, k, dtype, device, True, seed)
    s_clean[0, 1, 3], s_clean[0, 2, 5] = float("nan"), float("-inf")
    sca, scb, sma, smb = leaf(s_clean), leaf(s_clean), leaf(s_mixed), leaf(s_mixed)
    got = K.sdmp_dino_terms(sca, sma, t_clean, t_mixed, center, lam)
    ref = K.sdmp_dino_terms_ref(scb, smb, t_clean, t_mixed, center, lam)
    for name in ref:
        assert torch.isfinite(got[name]), name
        assert abs(got[name].item() - ref[name].item()) <= TOL[dtype] * max(abs(ref[name].item()), 1e-3), name
    got["loss"].backward()
    ref["loss"].backward()
    assert torch.equal(sca.grad[0], torch.zeros_like(sca.grad[0])), "crop 0's gradient is not zero"
    assert rel_err(sca.grad, scb.grad) <= TOL[dtype] and rel_err(sma.grad, smb.grad) <= TOL[dtype]


def check_mix(device, dtype, n, c, h, w, methods=mixing.METHODS):
    x, lam, method, y0, x0, ch, cw = mix_inputs(n, c, h, w, dtype, device, methods=methods)
    method_set = mixing.method_ids(methods)
    got = K.apply_mix(x, lam, method, y0, x0, ch, cw, method_set)
    ref = K.apply_mix_ref(x, lam, method, y0, x0, ch, cw, method_set)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(got.float()).all()
    # mixup is the fp32 blend rounded once, op for op as the reference: bit-exact in every dtype
    blend = method == mixing.MIXUP
    assert torch.equal(got[blend], ref[blend]), "mixup samples differ from the reference"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        boxed = method != mixing.MIXUP  # cutmix boxes and the untouched parts are copies: exact
        torch.testing.assert_close(got[boxed & (method != mixing.RESIZEMIX)], ref[boxed & (method != mixing.RESIZEMIX)],
                                   rtol=0, atol=0)
    else:
        assert rel_err(got, ref) <= TOL[dtype]


def run_suite(device: str = "cuda", quick: bool = False, cluster: str = "include") -> int:
    """Every op, fp32 and bf16, odd sizes, all gradient paths; returns the number of failed checks.

    cluster: "include", "skip" or "only" the checks of the thread-block-cluster DINO forward (sm_90), so a
    script can run that path, the newest one, in a process of its own first: a hang or a sticky CUDA error
    there then costs only its own checks."""
    checks = [
        ("two_hot fp32 37x1000", lambda: check_two_hot(device, torch.float32, 37, 1000)),
        ("two_hot bf16 33x4099", lambda: check_two_hot(device, torch.bfloat16, 33, 4099)),
        ("moco_terms fp32 world 2", lambda: check_moco(device, torch.float32, 8, 32, 2, 1)),
        ("dino fp32 sc3 sm2 b6 k1000", lambda: check_dino(device, torch.float32, 3, 2, 2, 6, 1000)),
        ("dino bf16 sc3 sm2 b6 k1024", lambda: check_dino(device, torch.bfloat16, 3, 2, 2, 6, 1024)),
        ("dino fp32 no teacher_mixed k999 b5", lambda: check_dino(device, torch.float32, 3, 0, 2, 5, 999, False)),
        ("dino fp32 one teacher crop, NaN / -inf in the unpaired crop", lambda: check_dino_unpaired(
            device, torch.float32)),
        ("mix fp32 6x3x13x16", lambda: check_mix(device, torch.float32, 6, 3, 13, 16)),
        ("mix bf16 6x3x9x9", lambda: check_mix(device, torch.bfloat16, 6, 3, 9, 9)),
        ("mix fp32 6x3x45x64 4 packs per thread", lambda: _with_env(
            dict(SDMP_MIX_PACKS=4), lambda: check_mix(device, torch.float32, 6, 3, 45, 64))),
        ("mix fp32 6x3x45x64 resizemix staged", lambda: _with_env(
            dict(SDMP_MIX_STAGED=1), lambda: check_mix(device, torch.float32, 6, 3, 45, 64))),
        ("mix bf16 4x3x17x48 resizemix staged 2 packs", lambda: _with_env(
            dict(SDMP_MIX_STAGED=1, SDMP_MIX_PACKS=2), lambda: check_mix(device, torch.bfloat16, 4, 3, 17, 48))),
    ]
    cluster_checks = []
    if device != "cuda" or torch.cuda.get_device_capability()[0] >= 9:  # thread-block clusters: sm_90
        # clusters of three blocks of columns and of 16 (the non-portable size K = 65,536 takes), the last block
        # partial (4,096 columns per block; 256 in the CPU emulation's 32-thread blocks)
        kv, k3, k16 = (dict(SDMP_DINO_CLUSTER="require"), 9000, 65528) if device == "cuda" else \
            (dict(SDMP_DINO_CLUSTER="require", SDMP_DINO_CLUSTER_THREADS=32), 600, 4088)
        cluster_checks.append((f"dino cluster bf16 sc3 sm2 b7 k{k3}", lambda: _with_env(
            kv, lambda: check_dino(device, torch.bfloat16, 3, 2, 2, 7, k3))))
        cluster_checks.append((f"dino cluster bf16 sc3 sm2 b3 k{k16}", lambda: _with_env(
            kv, lambda: check_dino(device, torch.bfloat16, 3, 2, 2, 3, k16))))
        cluster_checks.append(("dino cluster fp32 one teacher crop, NaN / -inf in the unpaired crop", lambda: _with_env(
            kv, lambda: check_dino_unpaired(device, torch.float32, k=k3 - k3 % 8))))
        cluster_checks.append((f"dino cluster pipelined + teacher statistics fp32 sc3 sm2 b3 k{k16}",
                               lambda: _with_env(dict(kv, SDMP_DINO_CLUSTER_TEACHER=1, SDMP_DINO_CLUSTER_PIPELINE=1),
                                                 lambda: check_dino(device, torch.float32, 3, 2, 2, 3, k16))))
    if not quick:
        for fused, pre in (("1", "1"), ("0", "1"), ("1", "0")):
            for up in ("loss", "scaled", "mixed"):
                checks.append((f"dino grad fused={fused} precompute={pre} upstream={up}",
                               lambda fused=fused, pre=pre, up=up: _with_env(
                                   dict(SDMP_DINO_FUSED=fused, SDMP_DINO_PRECOMPUTE_GRAD=pre, SDMP_DINO_GROUP_PAIRS=2),
                                   lambda: check_dino(device, torch.float32, 3, 2, 2, 10, 300, True, up, seed=4))))
    if cluster == "only":
        checks = cluster_checks
    elif cluster == "include":
        checks += cluster_checks
    failed = 0
    for name, fn in checks:
        t0 = time.time()
        try:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"ok    {name}  ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - a setting's error or a CUDA error fails this check, not the suite
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
    return failed


def _with_env(kv, fn):
    with env(**kv):
        return fn()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdmp_fast.kernels.selfcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one case per op (no gradient-path sweep)")
    ap.add_argument("--no-poison", action="store_true", help="leave outputs uninitialised (for initcheck)")
    ap.add_argument("--cluster", choices=("include", "skip", "only"), default="include",
                    help="the thread-block-cluster DINO checks (sm_90): with the others, not at all, or alone")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("selfcheck: no CUDA device", file=sys.stderr)
        return 2
    if not K.available():
        print(f"selfcheck: CUDA kernels unavailable: {K.build_error()}", file=sys.stderr)
        return 2
    if not args.no_poison:
        os.environ["SDMP_KERNELS_POISON"] = "1"
    if args.cluster == "only" and torch.cuda.get_device_capability()[0] < 9:
        print("selfcheck: no cluster checks (thread-block clusters need sm_90)", file=sys.stderr)
        return 3
    failed = run_suite("cuda", quick=args.quick, cluster=args.cluster)
    print(f"selfcheck: {'all ok' if failed == 0 else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
