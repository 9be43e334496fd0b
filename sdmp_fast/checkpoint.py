"""Checkpoints that lose nothing and never half-exist.

Write: the state goes to a temporary file in the checkpoint directory, is flushed and fsync'ed, then renamed
over the final name with os.replace (atomic on POSIX) and the directory is fsync'ed. A file named
``ckpt-<step>.pt`` is therefore always complete; a kill -9 mid-write leaves only a ``.tmp-*`` file, which
``--resume`` ignores and the next save removes. Old checkpoints are pruned only after the new one is durable.

Read: ``torch.load(weights_only=True)``: a checkpoint cannot run code. Everything in it is a tensor or a
primitive container: RNG states are stored as tensors, the config as a dict of primitives.

Export: ``backbone.pt`` is a plain timm state dict (``timm.create_model(arch, num_classes=0, ...)
.load_state_dict(torch.load(path))`` works); ``backbone.json`` beside it records how to rebuild the model.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from sdmp_fast.paths import discard, os_error_reason

__all__ = ["CheckpointError", "checkpoint_dir", "list_checkpoints", "latest_checkpoint", "save_checkpoint",
           "load_checkpoint", "load_latest", "rng_state", "set_rng_state", "export_backbone", "load_backbone",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (message names the file and what is intact)."""


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def _path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:09d}.pt")


def list_checkpoints(directory: str) -> List[Tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first. Temporary files are never listed."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str) -> Optional[str]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def _write(state: Dict[str, Any], fileobj) -> None:
    """Serialise ``state`` into an open file (a seam tests patch to simulate a full disk)."""
    torch.save(state, fileobj)


def _os_error(e: BaseException):
    """The OSError behind ``e`` (itself, or in its cause / context chain), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(directory: str) -> None:
    """Delete temporary files a killed writer left behind (they are never complete checkpoints)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".tmp-ckpt-"):
                try:
                    os.remove(os.path.join(directory, name))
                except OSError:
                    pass


def save_checkpoint(state: Dict[str, Any], directory: str, step: int, keep: int = 3) -> str:
    """Atomically write ``state`` as ``directory/ckpt-<step>.pt`` and keep the newest ``keep`` checkpoints.

    When the write fails (disk full, file-size limit, permissions; torch.save wraps most of these in a
    RuntimeError) the temporary file is removed, the earlier checkpoints are left untouched, and CheckpointError
    says so."""
    os.makedirs(directory, exist_ok=True)
    remove_stale_tmp(directory)
    final = _path(directory, step)
    tmp = os.path.join(directory, f".tmp-ckpt-{step:09d}-{os.getpid()}.pt")
    try:
        with open(tmp, "wb") as fh:
            _write(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        delay = float(os.environ.get("SDMP_DEBUG_SAVE_SLEEP", "0") or 0)
        if delay > 0:  # fault drills: widen the window in which a kill lands mid-write
            time.sleep(delay)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a failed write as a RuntimeError
        discard(tmp)
        # the newest earlier file (what blocked the save may be a folder of the new name); not read back here
        prev = next((p for s, p in reversed(list_checkpoints(directory)) if s < step and os.path.isfile(p)), None)
        kept = f"the earlier checkpoints are untouched (newest: {prev})" if prev else "no earlier checkpoint exists"
        cause = _os_error(e)
        if cause is None:
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = os_error_reason(cause)
        raise CheckpointError(f"checkpoint: could not write step {step} to {directory} ({reason}); {kept}") from e
    # Keep the newest `keep` of the steps up to this one. A checkpoint of a later step is one a --resume could not
    # read (it went back to an earlier one): counted among the newest, it pruned the good ones, this one included
    # with keep=1, and left only itself. It is left where it is, uncounted.
    upto = [p for s, p in list_checkpoints(directory) if s <= step]
    for old in upto[:-max(int(keep), 1)]:
        try:
            os.remove(old)
        except OSError:
            pass
    return final


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load with weights_only=True (no code can run); CheckpointError names the file when it is unreadable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated / corrupt / not a checkpoint
        raise CheckpointError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"checkpoint: {path} is not an sdmp-fast training checkpoint")
    return state


def load_latest(directory: str, map_location="cpu") -> Optional[Tuple[str, Dict[str, Any]]]:
    """(path, state) of the newest readable checkpoint, or None. A file that fails to load (only possible if
    the storage lost data after fsync) is reported and the one before it is used."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint")
    return None


# ------------------------------------------------------------------------------------------------ RNG states

def rng_state() -> Dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # the training device's state only: another machine may resume with fewer GPUs visible per process
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # one state: the current device's; several (older checkpoints: every visible GPU): this device's, if kept
        here = torch.cuda.current_device()
        if len(cuda) == 1 or here < len(cuda):
            torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[here])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


# ------------------------------------------------------------------------------------------------ backbone

def export_backbone(backbone: torch.nn.Module, out: str, info: Dict[str, Any]) -> str:
    """Write ``out/backbone.pt`` (a timm-loadable state dict, atomically) and ``out/backbone.json`` (info:
    backbone spec, mean/std, step)."""
    path = os.path.join(out, "backbone.pt")
    sd = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}

    def write_pt(fh):
        torch.save(sd, fh)

    def write_json(fh):
        fh.write(json.dumps(info, indent=1).encode())

    # both written before either replaces its earlier file: a full disk at backbone.json left the new weights
    # beside the description of an earlier step
    side = os.path.join(out, "backbone.json")
    tmp_pt = _write_atomic(path, write_pt, "backbone", replace=False)
    try:
        tmp_json = _write_atomic(side, write_json, "backbone", replace=False)
    except CheckpointError:
        discard(tmp_pt)
        raise
    os.replace(tmp_pt, path)
    os.replace(tmp_json, side)
    return path


def _write_atomic(path: str, write, what: str, replace: bool = True) -> str:
    """Write ``path`` through a temporary file + os.replace (``replace=False``: the caller replaces; the temporary
    file's name is returned). A failed write (disk full, no permission; torch.save wraps most of these in a
    RuntimeError) removes the temporary file, leaves any earlier ``path`` as it was and is a CheckpointError
    naming the file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        return tmp
    except (OSError, RuntimeError) as e:
        discard(tmp)
        cause = _os_error(e)
        if cause is None:
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = os_error_reason(cause)
        kept = "the earlier one is unchanged" if os.path.exists(path) else "none was written"
        raise CheckpointError(f"{what}: could not write {path} ({reason}); {kept}; the run's checkpoints are "
                              f"intact (`sdmp-fast train --resume` with the same settings exports it again)") from e


def _candidates(path: str) -> List[str]:
    """What load_backbone may read, best first: a run directory's checkpoints newest first, then its
    backbone.pt; a file alone."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint: {path!r} does not exist")
        return [path]
    found = [p for _, p in reversed(list_checkpoints(checkpoint_dir(path)) or list_checkpoints(path))]
    bb = os.path.join(path, "backbone.pt")
    found += [bb] if os.path.isfile(bb) else []
    if not found:
        raise FileNotFoundError(f"checkpoint: {path!r} holds no checkpoint and no backbone.pt")
    return found


def _load_first_readable(paths: List[str], map_location):
    """(path, state) of the first file of ``paths`` that loads; a damaged one is reported and the next tried."""
    errors = []
    for k, p in enumerate(paths):
        try:
            return p, torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated / corrupt / foreign: try the next one
            errors.append(f"{p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if k + 1 < len(paths):
                warnings.warn(f"checkpoint: {errors[-1]}; trying {paths[k + 1]}")
    raise ValueError(f"checkpoint: nothing readable ({'; '.join(errors)})")


def load_backbone(path: str, random_init: bool = False, with_info: bool = False, map_location="cpu"):
    """The pretrained backbone (timm ViT, eval mode, pooled features out) of a run directory, a training
    checkpoint or an exported backbone.pt (+ backbone.json). ``random_init`` rebuilds the same architecture
    without loading weights (the evaluation baseline). With ``with_info`` returns (model, info) where info has
    arch, img_size, patch_size, mean, std, method, step."""
    from sdmp_fast.models import create_backbone

    path, state = _load_first_readable(_candidates(path), map_location)
    if isinstance(state, dict) and "format" in state:  # training checkpoint
        try:
            info = dict(state["meta"])
            prefix = info["backbone_prefix"]
            weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"checkpoint: {path} has a 'format' key but not the rest of an sdmp-fast training "
                             f"checkpoint ({type(e).__name__}: {e})") from None
    elif not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        keys = f" (keys {sorted(map(str, state))[:6]})" if isinstance(state, dict) else ""
        raise ValueError(f"checkpoint: {path} is neither an sdmp-fast training checkpoint nor an exported "
                         f"backbone.pt (a state dict of tensors): it holds a {type(state).__name__}{keys}")
    else:  # exported backbone.pt: the info sits beside it
        side = os.path.join(os.path.dirname(os.path.abspath(path)), "backbone.json")
        if not os.path.isfile(side):
            raise FileNotFoundError(f"checkpoint: {side} (how to rebuild {path}) is missing")
        try:
            with open(side) as fh:
                info = json.load(fh)
            info["backbone_spec"]["arch"]
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"checkpoint: {side} (how to rebuild {path}) is not a backbone description "
                             f"({type(e).__name__}: {e})") from None
        weights = state
    model = create_backbone(info["backbone_spec"])
    if not random_init:
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError) as e:  # another model's weights (a backbone.pt beside another backbone.json)
            raise ValueError(f"checkpoint: the weights in {path} do not fit the backbone it describes "
                             f"({info['backbone_spec'].get('arch')}): {str(e).splitlines()[0]} "
                             f"{' '.join(str(e).split())[:400]}") from None
    model.eval()
    info.setdefault("img_size", info["backbone_spec"]["img_size"])
    info.setdefault("patch_size", info["backbone_spec"]["patch_size"])
    info.setdefault("arch", info["backbone_spec"]["arch"])
    info["path"] = path
    return (model, info) if with_info else model
