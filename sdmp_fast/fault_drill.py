"""Fault drill: kill -9 a training run at random moments (during steps and during checkpoint writes), resume it,
and check that the resumed run ends with exactly the parameters, optimiser state and DINO center of an
uninterrupted run (CPU, deterministic settings).

    python -m sdmp_fast.fault_drill --trials 10            # prints "10/10 resumes matched"

Runs are forked from this process after torch is imported (no interpreter start-up per run, so a trial costs
about a second); each child runs `sdmp-fast train` in-process with one thread. Checkpoint writes are slowed by
SDMP_DEBUG_SAVE_SLEEP in the killed runs so that a fair share of the kills land mid-write (the drill reports how
many left a partial temporary file behind). Exit status 0 only when every resume matched.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional

TINY = ["--arch", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2",
        "--embed-dim", "64", "--num-heads", "2", "--proj-hidden-dim", "128", "--proj-dim", "64",
        "--dino-out-dim", "256", "--dino-hidden-dim", "128", "--dino-bottleneck-dim", "64", "--local-size", "16",
        "--n-local", "4", "--n-local-mixed", "2", "--progress", "off", "--tensorboard", "off", "--deterministic"]


def _fork_train(argv: List[str], env: Dict[str, str], log_path: str) -> int:
    """Fork a child that runs `sdmp-fast train argv` and exits with its code; returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(env)
        import torch

        torch.set_num_threads(1)
        from sdmp_fast import cli

        code = cli.main(["train"] + argv)
    except BaseException as e:  # noqa: BLE001 - the child must never return into the parent's code
        print(f"fault drill child: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _wait_first_checkpoint(pid: int, ck_dir: str, timeout: float = 300.0) -> Optional[int]:
    """Poll until ``ck_dir`` holds a complete checkpoint; returns the exit code if the child ended first."""
    from sdmp_fast.checkpoint import list_checkpoints

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if list_checkpoints(ck_dir):
            return None
        time.sleep(0.005)
    return None


def _final_state(out: str):
    from sdmp_fast import checkpoint as ckpt

    found = ckpt.load_latest(ckpt.checkpoint_dir(out))
    return None if found is None else found[1]


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def run_drill(trials: int = 10, steps: int = 24, save_every: int = 3, method: str = "mocov3",
              loader: str = "synthetic", data: Optional[str] = None, batch_size: int = 8, seed: int = 0,
              workdir: Optional[str] = None, save_sleep: float = 0.05, log=print) -> int:
    """Returns the number of trials whose resumed run matched the uninterrupted one."""
    import timm  # noqa: F401  (imported before forking so children start warm)
    import torch  # noqa: F401
    import sdmp_fast.pipelines.base  # noqa: F401
    import sdmp_fast.trainer  # noqa: F401

    work = workdir or tempfile.mkdtemp(prefix="sdmp-drill-")
    os.makedirs(work, exist_ok=True)
    # on the CPU, where bit-exact resumes are promised (a GPU's backward uses atomics); torch-gpu refuses an
    # explicit --device cpu and takes the CPU by itself where CUDA is not available
    device = [] if loader == "torch-gpu" else ["--device", "cpu"]
    argv = TINY + device + ["--method", method, "--loader", loader, "--batch-size", str(batch_size),
                            "--steps", str(steps), "--save-every", str(save_every), "--log-every", str(save_every),
                            "--seed", str(seed), "--lr", "1e-3"]
    if data:
        argv += ["--data", data]
    rng = random.Random(seed)
    ref_out = os.path.join(work, "reference")
    pid = _fork_train(argv + ["--out", ref_out], {}, os.path.join(work, "reference.log"))
    ended = _wait_first_checkpoint(pid, os.path.join(ref_out, "checkpoints"))  # its exit code if it ended first
    t0 = time.perf_counter()
    code = _wait(pid) if ended is None else ended
    duration = time.perf_counter() - t0  # from the first checkpoint to the end of the run
    if code != 0:
        raise RuntimeError(f"fault drill: the reference run failed (exit {code}); see {work}/reference.log")
    killed_env = {"SDMP_DEBUG_SAVE_SLEEP": str(save_sleep)}
    # the killed runs are slower (sleep per save): stretch the window accordingly
    window = duration + (steps // save_every) * save_sleep
    results = []
    for t in range(trials):
        out = os.path.join(work, f"trial{t}")
        ck = os.path.join(out, "checkpoints")
        pid = _fork_train(argv + ["--out", out], killed_env, os.path.join(work, f"trial{t}.log"))
        ended = _wait_first_checkpoint(pid, ck)
        if ended is None:
            time.sleep(rng.uniform(0.0, 0.9) * window)
            os.kill(pid, signal.SIGKILL)
            status = _wait(pid)
        else:
            status = ended
        partial = os.path.isdir(ck) and any(n.startswith(".tmp-") for n in os.listdir(ck))
        from sdmp_fast.checkpoint import list_checkpoints

        done = list_checkpoints(ck)
        at = done[-1][0] if done else 0
        code = _wait(_fork_train(argv + ["--out", out, "--resume"], {}, os.path.join(work, f"trial{t}.resume.log")))
        results.append((t, status, at, partial, code, out))
    ref = _final_state(ref_out)
    matched = 0
    for t, status, at, partial, code, out in results:
        state = _final_state(out) if code == 0 else None
        ok = state is not None and all(_same(ref[k], state[k]) for k in ("step", "model", "optimizer", "epoch",
                                                                            "position"))
        matched += ok
        how = "killed" if status == -signal.SIGKILL else f"exited {status} before the kill"
        log(f"trial {t}: {how}, last complete checkpoint step {at}, partial write left behind: "
            f"{'yes' if partial else 'no'}, resume exit {code}, parameters {'MATCH' if ok else 'DIFFER'}")
    log(f"{matched}/{trials} resumes matched (uninterrupted run: {duration:.1f} s, work dir {work})")
    return matched


def add_arguments(ap) -> None:
    ap.add_argument("--trials", type=int, default=10, help="kill -9 + resume trials (default 10)")
    ap.add_argument("--steps", type=int, default=24, help="steps of each run (default 24)")
    ap.add_argument("--save-every", type=int, default=3, help="checkpoint interval (default 3)")
    ap.add_argument("--method", choices=("mocov3", "dino"), default="mocov3")
    ap.add_argument("--loader", default="synthetic", help="synthetic (default), memory (with --data fashion-mnist), "
                                                          "or a file loader with --data DIR (e.g. dali)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary directory)")


def main(args) -> int:
    if args.trials < 1 or args.steps < 2 or args.save_every < 1:
        raise ValueError("trials/steps/save_every: need trials >= 1, steps >= 2, save_every >= 1")
    matched = run_drill(args.trials, args.steps, args.save_every, args.method, args.loader, args.data,
                        seed=args.seed, workdir=args.workdir)
    return 0 if matched == args.trials else 1


if __name__ == "__main__":
    _ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(_ap)
    sys.exit(main(_ap.parse_args()))
