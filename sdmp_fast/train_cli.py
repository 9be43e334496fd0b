"""`sdmp-fast train`: pretrain a ViT with SDMP-MoCo v3 or SDMP-DINO.

    sdmp-fast train --config run.yaml --batch-size 128 --out runs/a      # YAML settings, CLI overrides
    torchrun --nproc_per_node 8 -m sdmp_fast.cli train ...               # DDP (NCCL on GPU, gloo on CPU)

Order of work: merge and validate every setting (errors name the setting), check --out, build loader and
model (data errors surface here), load the checkpoint when resuming, and only then create/touch --out.
Everything the run writes lives under --out: config.yaml, metrics.jsonl, checkpoints/, backbone.pt (+ .json),
tb/ (TensorBoard), .cache/ (torch.compile caches).

Exit codes: 0 finished, or stopped by SIGTERM after saving a checkpoint (resumable with --resume);
130 stopped by SIGINT (Ctrl-C) after saving a checkpoint; 2 bad configuration or input; 3 non-finite
loss/gradient under --nan-policy stop; 1 other failures (e.g. a checkpoint that could not be written).
A second Ctrl-C aborts at once.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import sys
from typing import Tuple

__all__ = ["add_arguments", "main", "EXIT_SIGINT", "EXIT_NONFINITE"]

EXIT_SIGINT = 130
EXIT_NONFINITE = 3


def add_arguments(parser) -> None:
    from sdmp_fast.config import add_config_arguments

    add_config_arguments(parser)


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


# what a run writes before its first metrics record: TensorBoard's tb/ at its start, a config.yaml.tmp.<pid> or
# metrics.jsonl.tmp.<pid> of a process killed while replacing the file
_START_FILES = {"config.yaml", "metrics.jsonl", ".lock", ".cache", "tb"}
_START_FILE_PATTERN = r"config\.\d+\.yaml|(config\.yaml|metrics\.jsonl)\.tmp\.\d+"


def _check_out(cfg) -> None:
    """Read-only checks of --out (nothing is created here)."""
    out = cfg.out
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    metrics = os.path.join(out, "metrics.jsonl")
    holds_run = bool(entries & {"checkpoints", "backbone.pt"}) or (os.path.isfile(metrics) and
                                                                   os.path.getsize(metrics) > 0)
    if holds_run and not cfg.resume:
        if _has_checkpoint_files(out) or _lost_checkpoints(out, entries, cfg):
            raise ValueError(f"out: {out!r} already holds a run; pass --resume to continue it or choose "
                             f"another --out")
        raise ValueError(f"out: {out!r} holds a run that stopped before its first checkpoint "
                         f"({', '.join(_run_output(out, entries)) or 'no step recorded'}); pass --resume to "
                         f"start it again from step 0 (its metrics.jsonl is replaced) or choose another --out")
    if entries and not holds_run:
        # a folder of other things: refused with or without --resume (elastic runs pass --resume from the first
        # attempt, and a --resume that finds no checkpoint starts afresh, writing its config.yaml over theirs).
        # Only the start files of a run that stopped before its first step (bad data, say) are replaced.
        others = sorted(e for e in entries - _START_FILES if not re.fullmatch(_START_FILE_PATTERN, e))
        if others:
            raise ValueError(f"out: {out!r} is not empty and holds no run ({', '.join(others[:5])}"
                             f"{', ...' if len(others) > 5 else ''}); choose an empty or new folder")
    if cfg.resume and not _has_checkpoint_files(out):
        # nothing to resume from: starting afresh truncates metrics.jsonl and overwrites backbone.pt. Fine for a
        # run killed before its first checkpoint (its records are redone); refused where checkpoints were lost
        held = _run_output(out, entries)
        if held and _lost_checkpoints(out, entries, cfg):
            raise ValueError(f"out: {out!r} holds a run's output ({', '.join(held)}) but no checkpoint in "
                             f"{os.path.join(out, 'checkpoints')!r} to resume from; nothing was changed: restore "
                             f"the checkpoints, or choose another --out to train afresh")
    # the nearest existing folder must take new files: found now, not as a traceback after the model is built
    from sdmp_fast.paths import why_not_creatable

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} is a file, not a folder")
    problem = why_not_creatable(os.path.join(out, "metrics.jsonl"))
    if problem:
        raise ValueError(f"out: cannot write in {out!r}: {problem}")


def _checkpoint_names(out: str) -> list:
    """The complete checkpoints' file names in --out, sorted (checkpoint.list_checkpoints' names, without importing
    torch before the settings are checked)."""
    d = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(d) if re.fullmatch(r"ckpt-\d{9}\.pt", n)) if os.path.isdir(d) else []


def _recheck_out(cfg, seen: list) -> None:
    """Under the lock: --out as it was checked and read before the build (which may take minutes: a large image
    listing, DALI). Another run that started on the same --out, trained and let go of the lock meanwhile would
    otherwise be overwritten (its metrics truncated, its checkpoints mixed with these)."""
    now = _checkpoint_names(cfg.out)
    if now != seen:
        raise ValueError(f"out: another run wrote checkpoints to {cfg.out!r} while this one was being set up "
                         f"({', '.join(sorted(set(now) - set(seen))) or 'some removed'}); nothing was changed: "
                         f"start again (with --resume to continue that run) or choose another --out")
    try:
        _check_out(cfg)
    except ValueError as e:
        raise ValueError(f"{e} (written by another run while this one was being set up; nothing was changed)") \
            from None


def _has_checkpoint_files(out: str) -> bool:
    return bool(_checkpoint_names(out))


def _lost_checkpoints(out: str, entries, cfg) -> bool:
    """Whether --out shows a run that had written a checkpoint (now gone): its backbone.pt, or metrics at or
    past the earlier run's save_every or its last step (from its config.yaml; the new settings if unreadable)."""
    if "backbone.pt" in entries:
        return True
    last, recorded = _metrics_summary(out)
    if recorded:  # since 2026-11-29 a record says so, a signal's save (no save_every step) too
        return True
    if last <= 0:
        return False
    if any(re.fullmatch(r"config\.\d+\.yaml", e) for e in entries):
        return True  # kept by a resume with other settings: that resume had a checkpoint
    import yaml

    # the trainer writes a save step's metrics record after the checkpoint: a record at or past a save step (or at
    # the last step) means a checkpoint was written. A first save that failed left no record of its step
    save_every, total = cfg.save_every, None
    try:
        with open(os.path.join(out, "config.yaml"), encoding="utf-8") as fh:
            saved = yaml.safe_load(fh)
        if isinstance(saved, dict):
            save_every = saved.get("save_every", save_every)
            total = saved.get("steps")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        pass
    if isinstance(save_every, int) and save_every > 0 and last >= save_every:
        return True
    return isinstance(total, int) and last >= total


def _metrics_summary(out: str) -> Tuple[int, bool]:
    """(the last step metrics.jsonl records, whether a record follows a checkpoint: ``"checkpoint": true``);
    (0, False) without the file or when it is unreadable."""
    metrics = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return 0, False
    from sdmp_fast.runlog import iter_records

    last, recorded = 0, False
    try:
        for _, r in iter_records(metrics):
            step = r.get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                last = max(last, step)
            recorded = recorded or r.get("checkpoint") is True
    except (OSError, UnicodeDecodeError):
        return 0, False
    return last, recorded


def _last_step(out: str) -> int:
    """The last step metrics.jsonl records (0: none, or the file is unreadable)."""
    return _metrics_summary(out)[0]


def _run_output(out: str, entries) -> list:
    """What of a run's output --out holds (backbone.pt, metrics.jsonl records past step 0), for messages."""
    held = ["backbone.pt"] if "backbone.pt" in entries else []
    last = _last_step(out)
    if last > 0:
        held.append(f"metrics.jsonl up to step {last}")
    return held


_ENV_SET_BY_US = {}  # TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR values an earlier run in this process set


def _compile_cache_env(out: str) -> dict:
    """Point torch.compile's caches into ``out/.cache`` unless the user chose a place. Returns the variables'
    previous values (for restoring). ``import timm`` (in cfg.validate) already ran torch's cache_dir(), which
    writes its default (/tmp/torchinductor_<user>) into TORCHINDUCTOR_CACHE_DIR: that value, or one an earlier
    in-process run set, is not the user's choice and is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = os.path.abspath(os.path.join(out, ".cache"))
    previous = {}
    for var, sub, default in (("TORCHINDUCTOR_CACHE_DIR", "inductor", os.path.abspath(default_cache_dir())),
                              ("TRITON_CACHE_DIR", "triton", None)):
        now = os.environ.get(var)
        if now is not None and now != default and now != _ENV_SET_BY_US.get(var):
            continue  # the user's own setting
        previous[var] = now
        os.environ[var] = _ENV_SET_BY_US[var] = os.path.join(cache, sub)
    return previous


def _restore_env(previous: dict) -> None:
    for var, value in previous.items():
        if os.environ.get(var) != _ENV_SET_BY_US.get(var):
            continue  # changed since: leave it
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def _lock_out(out: str):
    """An exclusive lock on ``out/.lock`` (:func:`sdmp_fast.paths.lock_exclusive`): a second run (a resume
    started while the first still runs) would write the same checkpoints and metrics. Released by the OS when
    the process ends, however it ends."""
    from sdmp_fast.paths import LockHeld, lock_exclusive

    path = os.path.join(out, ".lock")
    try:
        return lock_exclusive(path)
    except LockHeld:
        raise ValueError(f"out: {out!r} is being written by another sdmp-fast train process (its .lock is "
                         f"held); wait for it to end or stop it first") from None
    except OSError as e:
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise ValueError(f"out: cannot open {path!r} ({e.strerror}): it belongs to another user's run? "
                             f"choose another --out") from None
        raise ValueError(f"out: cannot lock {path!r} ({e.strerror}): the file system of --out takes no POSIX "
                         f"locks (NFS without lockd?), or this user may not write there; choose another "
                         f"--out") from None


def _same_settings(old_text: str, new: dict) -> bool:
    """Whether a saved config.yaml holds the settings of ``new``, apart from ``resume`` (a run's first resume
    turns it on) and the spelling of ``out`` (runs/a, runs/a/, ./runs/a are the same folder)."""
    import yaml

    try:
        old = yaml.safe_load(old_text)
    except yaml.YAMLError:
        return False
    if not isinstance(old, dict):
        return False

    def norm(d):
        d = {k: v for k, v in d.items() if k != "resume"}
        if isinstance(d.get("out"), str):
            d["out"] = os.path.normpath(d["out"])
        return d

    a, b = norm(old), norm(new)
    if isinstance(a.get("out"), str) and isinstance(b.get("out"), str) and \
            os.path.realpath(a["out"]) == os.path.realpath(b["out"]):
        a["out"] = b["out"]
    return a == b


def _write_config(cfg, out: str, resumes_a_checkpoint: bool) -> None:
    """config.yaml of this run. A resume from a checkpoint with other settings keeps the earlier ones as
    config.<k>.yaml (which also tells _lost_checkpoints that a checkpoint existed); a run started again from
    step 0 (none to resume) replaces the abandoned run's config, as it replaces its metrics."""
    import yaml

    from sdmp_fast.paths import discard, os_error_reason

    path = os.path.join(out, "config.yaml")
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    keep_as = None
    if os.path.isfile(path):
        with open(path) as fh:
            old = fh.read()
        if old == text or _same_settings(old, cfg.to_dict()):
            return
        if resumes_a_checkpoint:  # other settings (more steps, another lr): the earlier ones stay, config.<k>.yaml
            k = 1
            while os.path.exists(os.path.join(out, f"config.{k}.yaml")):
                k += 1
            keep_as = os.path.join(out, f"config.{k}.yaml")
    # the new file is written in full before the earlier one moves aside (renames need no space): a full disk
    # left the run with no config.yaml, its earlier one renamed, and a temporary file nothing removed
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        discard(tmp)
        kept = "the earlier one is unchanged" if os.path.isfile(path) else "none was written"
        raise OSError(e.errno, f"config: could not write it ({os_error_reason(e)}); {kept}; nothing was "
                               f"trained", path) from None
    if keep_as:
        os.replace(path, keep_as)
    os.replace(tmp, path)


def main(args) -> int:
    try:
        return _start(args)
    except _RankFailed as e:  # another rank's failure of no configuration kind (its own rank shows its traceback)
        print(f"sdmp-fast train: error: {e}", file=sys.stderr)
        return 1


def _checked_config(args):
    """The run's settings (command line over --config), validated, and --out checked (read-only)."""
    from sdmp_fast.config import config_from_args

    cfg = config_from_args(args)
    cfg.validate()
    _check_out(cfg)
    return cfg


def _start(args) -> int:
    rank, world, _ = _dist_env()
    store = None
    if world > 1 and not _dist_initialized():
        # every rank reads its own command line and --config and checks its --out: a rank that stopped here
        # alone left the others waiting --dist-timeout seconds in the rendezvous, then failing naming nothing
        cfg = problem = None
        try:
            cfg = _checked_config(args)
        except (ValueError, OSError) as e:
            problem = e
            print(f"sdmp-fast train: rank {rank} of {world}: {e} (telling the other ranks)", file=sys.stderr,
                  flush=True)
        try:
            store = _rendezvous(cfg.dist_timeout if cfg is not None else getattr(args, "dist_timeout", None))
        except Exception as e:  # noqa: BLE001 - the other ranks never came: this rank's own error first
            if problem is not None:
                raise problem from e
            raise
        _agree(_store_words(store, "settings", rank, world, problem), rank, world, problem)
    else:
        cfg = _checked_config(args)
    # keep torch.compile's caches inside --out (nothing written elsewhere); before any model is built
    env_before = _compile_cache_env(cfg.out) if cfg.compile else {}
    try:
        return _main(cfg, store)
    finally:
        _restore_env(env_before)


class _RankFailed(RuntimeError):
    """Another rank failed at the start with an error of no configuration kind (a CUDA error, out of memory)."""


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rendezvous(seconds):
    """torchrun's (env://) rendezvous store; under torchrun's shared store, a prefix of its own per restart.

    torchrun shares its agent's store with the workers, and a restart (``--max-restarts``) reused the failed
    attempt's keys: gloo connected to the dead workers' addresses ("connectFullMesh failed ... Connection
    refused") and the restart failed (pytorch/pytorch#135712). The restart count is each node's own, so this
    holds on one node; several nodes need torchrun's store unshared (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a new
    store per attempt, no prefix). The process group and the start checks use this store."""
    import torch.distributed as dist

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        seconds = 300.0  # unset or not valid (the settings check reports it): the default
    timeout = datetime.timedelta(seconds=seconds)
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return store
    return dist.PrefixStore(f"sdmp_fast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _word(problem) -> str:
    return "" if problem is None else f"{type(problem).__name__}\0{problem}"


def _store_words(store, stage: str, rank: int, world: int, problem) -> list:
    """Every rank's word on ``stage`` through the store (before the process group exists)."""
    store.set(f"{stage}/{rank}", _word(problem))
    words = [store.get(f"{stage}/{r}").decode() for r in range(world)]
    if any(words):
        store.set(f"{stage}/read/{rank}", "1")
        if rank == 0:  # without torchrun rank 0 serves the store: stay until every rank has read it
            try:
                store.wait([f"{stage}/read/{r}" for r in range(world)], datetime.timedelta(seconds=30))
            except Exception:  # noqa: BLE001 - a rank that died meanwhile: nothing left to wait for
                pass
    return words


def _group_words(group, problem) -> list:
    """Every rank's word through a gloo group: a rank that dies meanwhile fails the others within seconds (a
    store read would wait for it --dist-timeout seconds)."""
    import torch.distributed as dist

    words = [None] * dist.get_world_size(group)
    dist.all_gather_object(words, _word(problem), group=group)
    return words


def _agree(words: list, rank: int, world: int, problem) -> None:
    """If a rank failed, every rank stops now: the failed rank with its own error, the others with the same kind
    of error (exit code) naming that rank and its reason."""
    from sdmp_fast.checkpoint import CheckpointError

    failed = [r for r, w in enumerate(words) if w]
    if not failed:
        return
    if problem is not None:
        raise problem
    kind, _, text = words[failed[0]].partition("\0")
    more = f" (ranks {', '.join(map(str, failed[1:]))} failed too)" if len(failed) > 1 else ""
    line = f"rank {failed[0]} of {world} could not start{more}: {text or kind}"
    if kind in ("ValueError", "FileNotFoundError"):
        raise ValueError(line)
    if kind == "CheckpointError":
        raise CheckpointError(line)
    raise _RankFailed(f"{line} ({kind})" if text else line)


def _main(cfg, store=None) -> int:

    import torch
    import torch.distributed as dist

    from sdmp_fast import checkpoint as ckpt
    from sdmp_fast.runlog import RunLogger
    from sdmp_fast.trainer import NonFiniteError, Trainer, resolve_device

    rank, world, local = _dist_env()
    if world > 1 and not dist.is_initialized():
        device = resolve_device(cfg.device, local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # NCCL: fail collectives on error instead of hanging; the timeout bounds the wait on a dead peer.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = datetime.timedelta(seconds=cfg.dist_timeout)
        if store is None:
            store = _rendezvous(cfg.dist_timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    # the start's later checks are agreed on over gloo (CPU objects; a dead rank is seen within seconds)
    group = dist.new_group(backend="gloo") if store is not None else None

    def agree(stage, problem):  # a rank's own error, or the first failed rank's, on every rank
        if group is not None:
            _agree(_group_words(group, problem), rank, world, problem)
        elif problem is not None:
            raise problem

    log = print if rank == 0 else (lambda *a, **k: None)
    env = os.environ
    if (store is not None and env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
            and int(env.get("GROUP_WORLD_SIZE", "1")) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        log("warning: torchrun --max-restarts over several nodes with torchrun's shared store: a restart would meet "
            "the failed attempt's keys (pytorch/pytorch#135712) and each node counts its restarts apart; launch "
            "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a new store per attempt) for restarts to resume")
    logger = trainer = None
    old_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        # data a node lacks, a model that does not fit on its GPU, ...: agreed on before DDP's first collective
        trainer = Trainer(cfg, rank=rank, world_size=world, local_rank=local, log=log,
                          agree=lambda problem: agree("build", problem))
        if world > 1:  # after Trainer: it sets each rank's CUDA device, which NCCL's all_gather_object uses
            _check_same_settings(cfg, world)
        seen = _checkpoint_names(cfg.out)  # compared under the lock: another run may write in the meantime
        problem = resumed_from = None
        try:
            resumed_from = _load_checkpoint(cfg, trainer) if cfg.resume else None
        except BaseException as e:  # noqa: BLE001 - as above; Ctrl-C too, so that the others do not wait for it
            problem = e
        agree("resume", problem)
        if world > 1:
            _check_same_data(trainer, world)
            _check_same_start(resumed_from, world)
            cfg.check_warmups(trainer.total_steps)  # the same on every rank now that they read the same data
        # ---- from here on --out is written
        problem = None
        if rank == 0:
            try:
                os.makedirs(cfg.out, exist_ok=True)
                lock = _lock_out(cfg.out)  # held until this process exits
                _recheck_out(cfg, seen)
            except ValueError as e:
                problem = str(e)
            except OSError as e:  # told to every rank, which would otherwise wait for rank 0 at the broadcast
                problem = f"out: cannot create {cfg.out!r} ({e.strerror})"
        if world > 1:  # every rank stops alike, none waits at a barrier rank 0 never reaches
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is not None:
            raise ValueError(problem)
        if rank == 0:
            _write_config(cfg, cfg.out, resumes_a_checkpoint=resumed_from is not None)
        if world > 1:
            dist.barrier()
            _check_out_shared(cfg.out, rank, world, log)
        logger = RunLogger(cfg.out, trainer.total_steps, trainer.step, enabled=rank == 0,
                           progress=cfg.progress, tensorboard=cfg.tensorboard, log=log,
                           resumed_record=trainer.resumed_record)
        where = f"resuming from {resumed_from} at step {trainer.step}" if resumed_from else "starting"
        logger.write(f"sdmp-fast train: {where}; {cfg.method} sdmp={'on' if cfg.sdmp else 'off'} {cfg.arch} "
                     f"on {trainer.device} x{world}, {trainer.total_steps} steps of {trainer.global_batch} images, "
                     f"{trainer.steps_per_epoch} steps/epoch, loss={trainer.loss_impl}")
        _install_signal_handlers(trainer)
        result = trainer.fit(cfg.out, logger)
        if result == "signal":
            sig = trainer.agreed_stop_signal  # the same on every rank, whichever rank got the signal
            name = signal.Signals(sig).name if sig else "a signal"
            where = "" if trainer.stop_signal == sig else " (on another rank)"
            logger.write(f"stopped by {name}{where} at step {trainer.step}; resume with --resume")
            return EXIT_SIGINT if sig == signal.SIGINT else 0
        logger.write(f"done: {trainer.step} steps; backbone exported to {os.path.join(cfg.out, 'backbone.pt')}")
        return 0
    except NonFiniteError as e:
        print(f"sdmp-fast train: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except ckpt.CheckpointError as e:
        print(f"sdmp-fast train: error: {e}", file=sys.stderr)
        return 1
    finally:
        _restore_signal_handlers(old_handlers)
        if logger is not None:
            logger.close()
        if world > 1 and dist.is_initialized():
            if trainer is not None:
                trainer.release_ddp()  # first: see release_ddp
            dist.destroy_process_group()


def _load_checkpoint(cfg, trainer):
    """Loads the latest checkpoint of --out into ``trainer``; returns its path, or None when there is none yet."""
    from sdmp_fast import checkpoint as ckpt

    found = ckpt.load_latest(ckpt.checkpoint_dir(cfg.out))
    if found is None and ckpt.list_checkpoints(ckpt.checkpoint_dir(cfg.out)):
        # not "no checkpoint yet": starting afresh would overwrite the run's metrics and checkpoints
        raise ckpt.CheckpointError(
            f"resume: no checkpoint of {ckpt.checkpoint_dir(cfg.out)!r} can be read (see the warnings "
            f"above); nothing was changed")
    if found is None:
        return None
    resumed_from, state = found
    trainer.load_state_dict(state)
    del state
    if trainer.step > trainer.total_steps:
        # training "backwards" is impossible; not an error would re-export the backbone and say "done"
        name = "steps" if cfg.steps is not None else "epochs"
        asked = (f"{cfg.steps} steps" if cfg.steps is not None
                 else f"{cfg.epochs} epochs = {trainer.total_steps} steps")
        raise ValueError(f"{name}: {asked} is below the step of the checkpoint {resumed_from} "
                         f"(step {trainer.step}); resume with --steps {trainer.step} or more; nothing "
                         f"was changed")
    return resumed_from


# settings a process may have of its own (paths on its node, its own workers and output); every other one must be
# the same on every rank
_PER_PROCESS_SETTINGS = ("out", "data", "num_workers", "progress", "tensorboard", "resume", "device", "dist_timeout",
                         "keep_checkpoints")


def _check_same_settings(cfg, world: int) -> None:
    """Every rank reads its own command line and --config file: where they differ (a config file edited on one node,
    an option forgotten in one launch line) the ranks silently trained on with different learning rates (their
    parameters drifting apart under DDP while rank 0 exported its own), took overlapping shards (another --seed), or
    stalled for --dist-timeout seconds at mismatched collectives (another --log-every / --save-every / --steps) and
    failed with a gloo message naming no setting. Stop before anything is written, naming the settings (a model
    of another shape already fails in DDP's construction, naming the parameters)."""
    import torch.distributed as dist

    from sdmp_fast.config import significant_loader_options

    mine = {k: v for k, v in cfg.to_dict().items() if k not in _PER_PROCESS_SETTINGS}
    mine["loader_options"] = significant_loader_options(mine.get("loader_options"), cfg.loader)
    found = [None] * world
    dist.all_gather_object(found, mine)
    differ = [k for k in mine if any(f.get(k) != mine[k] for f in found)]
    if differ:
        what = "; ".join(f"{k} (" + ", ".join(f"rank {r}: {f.get(k)!r}" for r, f in enumerate(found)) + ")"
                         for k in differ)
        raise ValueError(f"{differ[0]}: the ranks run with different settings: {what}; every rank must be started "
                         f"with the same options and --config file; nothing was changed")


def _check_same_data(trainer, world: int) -> None:
    """--data may be a path of each node's own disk: where the copies differ (another file count, other files) the
    ranks' shards of one permutation overlapped and missed samples silently, and with another number of steps
    per epoch a run by --epochs ended on one rank first and failed in a gloo message naming nothing. Stop here."""
    import torch.distributed as dist

    mine = {"steps_per_epoch": trainer.steps_per_epoch, "data": trainer._data_identity()}
    found = [None] * world
    dist.all_gather_object(found, mine)
    if any(f != mine for f in found):
        seen = ", ".join(f"rank {r}: {f['steps_per_epoch']} steps per epoch"
                         + (f", {f['data']['files']} files (sha1 {f['data']['sha1'][:12]})" if f["data"] else "")
                         for r, f in enumerate(found))
        raise ValueError(f"data: the ranks read different data ({seen}); every rank must read the same data set "
                         f"(the same files in the same order); nothing was changed")


def _check_same_start(resumed_from, world: int) -> None:
    """Every rank reads --out itself: where the ranks do not see the same files (node-local disks, a partial
    copy), one would resume from its checkpoint while another started afresh or from an older one, and they
    would train on with different models, optimiser states and step counts. Stop before anything is written."""
    import torch.distributed as dist

    mine = os.path.basename(resumed_from) if resumed_from else None
    found = [None] * world
    dist.all_gather_object(found, mine)
    if len(set(found)) > 1:
        seen = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(found))
        raise ValueError(f"resume: the ranks found different checkpoints in --out ({seen}); every rank must read "
                         f"the same --out (a shared file system); nothing was changed")


def _check_out_shared(out: str, rank: int, world: int, log) -> None:
    """Only rank 0 writes --out. Where it lies on each node's own disk the run trains to its end, but its
    checkpoints exist on rank 0's node only, and a --resume (or a torchrun restart) would stop, the ranks finding
    different checkpoints. Say so at the start: every rank reads back the config.yaml rank 0 has just written."""
    import torch.distributed as dist

    path = os.path.join(out, "config.yaml")

    def text():
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            return None

    box = [text() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    found = [None] * world
    dist.all_gather_object(found, box[0] is not None and text() == box[0])
    blind = [r for r, ok in enumerate(found) if not ok]
    if blind:
        log(f"warning: out: rank{'s' if len(blind) > 1 else ''} {', '.join(map(str, blind))} of {world} do"
            f"{'' if len(blind) > 1 else 'es'} not see the {path!r} rank 0 wrote (node-local disks?): checkpoints "
            f"are written by rank 0 only, so --resume and torchrun restarts need --out on a file system every "
            f"node shares")


def _restore_signal_handlers(old) -> None:
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def _install_signal_handlers(trainer) -> None:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit. A second SIGINT raises KeyboardInterrupt.
    SIGHUP (the terminal of a run started without nohup closed) is taken as SIGTERM: its default action ended
    the run at once, losing every step since the last checkpoint."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        if signum == signal.SIGHUP:
            signum = signal.SIGTERM
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if trainer.stop_signal is not None:  # a second SIGTERM: the step never ended (stuck): stop now
            raise SystemExit(128 + signum)
        trainer.stop_signal = signum

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, handler)
