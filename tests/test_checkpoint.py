"""Checkpoints: atomic writes, keep-last-K, disk full, weights_only safety, RNG round trip, and resume that
reproduces an uninterrupted run bit for bit (in-process, after kill -9 of a CLI run, and the fault drill)."""
from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sdmp_fast import checkpoint as ckpt
from sdmp_fast.trainer import Trainer

from test_trainer import TINY, _env, tiny_cfg


def _state(step):
    return {"format": ckpt.FORMAT_VERSION, "step": step, "w": torch.full((4,), float(step))}


def test_atomic_names_keep_last_k_and_stale_tmp(tmp_path):
    d = str(tmp_path / "ck")
    os.makedirs(d)
    stale = os.path.join(d, ".tmp-ckpt-000000007-999.pt")
    open(stale, "wb").write(b"half a checkpoint")
    for s in (1, 2, 3, 4):
        ckpt.save_checkpoint(_state(s), d, s, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [3, 4]
    assert sorted(os.listdir(d)) == ["ckpt-000000003.pt", "ckpt-000000004.pt"]  # the stale tmp is gone
    path, st = ckpt.load_latest(d)
    assert path.endswith("ckpt-000000004.pt") and st["step"] == 4


def test_pruning_after_a_resume_from_an_older_checkpoint_keeps_the_good_ones(tmp_path):
    """A --resume that could not read the newest checkpoint (ckpt-6) went back to ckpt-4 and saved ckpt-5: the
    unreadable ckpt-6 counted among the newest, so keep=1 pruned ckpt-4 and the new ckpt-5 and kept only it."""
    d = str(tmp_path / "ck")
    for s in (2, 4):
        ckpt.save_checkpoint(_state(s), d, s, keep=3)
    open(os.path.join(d, "ckpt-000000006.pt"), "wb").write(b"PK\x03\x04 truncated")
    ckpt.save_checkpoint(_state(5), d, 5, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [5, 6]  # the later, unreadable one is left, uncounted
    with pytest.warns(UserWarning, match="cannot read"):
        path, st = ckpt.load_latest(d)
    assert st["step"] == 5
    ckpt.save_checkpoint(_state(7), d, 7, keep=1)  # past it: the normal rule again
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [7]


def test_a_failed_save_names_the_previous_checkpoint_file(tmp_path):
    """A folder of the new checkpoint's name blocked the save, and the message called that folder "the previous
    checkpoint ... intact"."""
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(_state(2), d, 2)
    os.mkdir(os.path.join(d, "ckpt-000000004.pt"))
    with pytest.raises(ckpt.CheckpointError, match=r"could not write step 4 .*the earlier checkpoints are "
                                                   r"untouched \(newest: .*ckpt-000000002.pt\)"):
        ckpt.save_checkpoint(_state(4), d, 4)


def test_resume_ignores_partial_files(tmp_path):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(_state(3), d, 3)
    open(os.path.join(d, ".tmp-ckpt-000000006-123.pt"), "wb").write(b"\x00" * 100)  # killed mid-write
    assert ckpt.latest_checkpoint(d).endswith("ckpt-000000003.pt")
    # a complete-looking name whose content is damaged (storage lost data): reported, previous used
    open(os.path.join(d, "ckpt-000000009.pt"), "wb").write(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="cannot read"):
        path, st = ckpt.load_latest(d)
    assert st["step"] == 3


def test_disk_full_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(_state(5), d, 5)
    before = open(os.path.join(d, "ckpt-000000005.pt"), "rb").read()

    def full_disk(state, fh):
        fh.write(b"x" * 1000)  # part of the file made it before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write step 6 .*disk full.*untouched "
                                                   r"\(newest: .*ckpt-000000005.pt\)"):
        ckpt.save_checkpoint(_state(6), d, 6)
    assert os.listdir(d) == ["ckpt-000000005.pt"]
    assert open(os.path.join(d, "ckpt-000000005.pt"), "rb").read() == before
    assert ckpt.load_latest(d)[1]["step"] == 5


def test_disk_full_inside_torch_save_is_a_checkpoint_error(tmp_path, monkeypatch):
    # a real torch.save whose file fills up after 100 kB: its zip writer turns the OSError into a RuntimeError
    # ("unexpected pos"), which escaped as a traceback with the temporary file left behind
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(_state(5), d, 5)

    class FillsUp(io.RawIOBase):
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(b)

    monkeypatch.setattr(ckpt, "_write", lambda state, fh: torch.save(state, FillsUp(fh)))
    big = dict(_state(6), blob=torch.zeros(200_000))
    with pytest.raises(ckpt.CheckpointError, match=r"could not write step 6 .*disk full.*untouched "
                                                   r"\(newest: .*ckpt-000000005.pt\)"):
        ckpt.save_checkpoint(big, d, 6)
    assert os.listdir(d) == ["ckpt-000000005.pt"]


def test_disk_full_during_training_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from sdmp_fast import cli

    out = tmp_path / "out"
    calls = {"n": 0}
    real = ckpt._write

    def fill_on_second(state, fh):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state, fh)

    monkeypatch.setattr(ckpt, "_write", fill_on_second)
    code = cli.main(["train"] + TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "6",
                                        "--save-every", "2", "--log-every", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "could not write step 4" in err and "disk full" in err and "untouched (newest: " in err and "ckpt-000000002.pt)" in err
    assert ckpt.load_latest(str(out / "checkpoints"))[1]["step"] == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("SDMP_EVIL_MARKER", "/nonexistent/x"),))


def test_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SDMP_EVIL_MARKER", str(marker))
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(_state(1), d, 1)
    torch.save({"format": 1, "step": 2, "payload": _Evil()}, os.path.join(d, "ckpt-000000002.pt"))
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(os.path.join(d, "ckpt-000000002.pt"))
    with pytest.warns(UserWarning):
        assert ckpt.load_latest(d)[1]["step"] == 1
    assert not marker.exists()


def test_training_checkpoint_is_weights_only_loadable(tmp_path):
    cfg = tiny_cfg(tmp_path, method="dino", steps=2, save_every=2)
    Trainer(cfg).fit(cfg.out)
    path = ckpt.latest_checkpoint(ckpt.checkpoint_dir(cfg.out))
    st = torch.load(path, weights_only=True)
    assert st["step"] == 2 and "center" in st["model"] and st["config"]["method"] == "dino"
    assert isinstance(st["rng"][0]["torch"], torch.Tensor)


def test_rng_state_round_trip():
    st = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("method,extra", [("mocov3", {}), ("dino", {}), ("dino", {"dino_head_bn": True}),
                                          ("dino", {"loader": "torchvision"})])
def test_resume_in_process_is_bit_exact(tmp_path, method, extra):
    if extra.get("loader") == "torchvision":  # its pass begins after the RNG restore; DINO's drop path draws from it
        from sdmp_fast.data import make_synthetic_image_folder

        extra = dict(extra, data=make_synthetic_image_folder(str(tmp_path / "data"), 2, 8), num_workers=0,
                     batch_size=4)
    cfg = tiny_cfg(tmp_path, method=method, steps=7, log_every=7, **extra)
    ref = Trainer(cfg)
    ref.fit(str(tmp_path / "ref"))

    first = Trainer(cfg)
    first.total_steps = 3  # an interrupted run: 3 steps then a checkpoint
    first.fit(str(tmp_path / "run"))
    resumed = Trainer(cfg)
    path, state = ckpt.load_latest(ckpt.checkpoint_dir(str(tmp_path / "run")))
    assert state["step"] == 3
    resumed.load_state_dict(state)
    resumed.fit(str(tmp_path / "run"))
    assert resumed.step == 7
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    ra, rb = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in ra:
        for k in ra[i]:
            assert torch.equal(ra[i][k], rb[i][k])


def test_resume_warns_when_the_image_files_changed(tmp_path):
    """Same number of files (so the same steps per epoch), one renamed: the resume says the data changed; a
    data set moved elsewhere as a whole resumes silently."""
    import shutil
    import warnings

    from sdmp_fast.data import make_synthetic_image_folder

    data = make_synthetic_image_folder(str(tmp_path / "data"), 2, 4)
    cfg = tiny_cfg(tmp_path, loader="torchvision", data=data, num_workers=0, steps=1, log_every=1)
    first = Trainer(cfg)
    state = first.state_dict()
    assert state["data"]["files"] == 8
    moved = str(tmp_path / "moved")
    shutil.copytree(data, moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(tiny_cfg(tmp_path, loader="torchvision", data=moved, num_workers=0, steps=1)).load_state_dict(state)
    cls = os.path.join(moved, sorted(os.listdir(moved))[0])
    name = sorted(os.listdir(cls))[0]
    os.rename(os.path.join(cls, name), os.path.join(cls, "zz_" + name))
    with pytest.warns(RuntimeWarning, match="the data set is not the one the checkpoint was trained on"):
        Trainer(tiny_cfg(tmp_path, loader="torchvision", data=moved, num_workers=0, steps=1)).load_state_dict(state)


def test_resume_rejects_changed_settings(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2, save_every=2)
    Trainer(cfg).fit(cfg.out)
    _, state = ckpt.load_latest(ckpt.checkpoint_dir(cfg.out))
    other = Trainer(tiny_cfg(tmp_path, steps=2, alpha=0.5))
    with pytest.raises(ValueError, match=r"resume: .*alpha \(checkpoint 1.0, now 0.5\)"):
        other.load_state_dict(state)


def test_resume_settings_newer_than_the_checkpoint_take_their_default(tmp_path):
    from sdmp_fast.config import mismatches

    cfg = tiny_cfg(tmp_path, method="dino")
    saved = cfg.to_dict()
    del saved["dino_head_bn"]  # a checkpoint written before the setting existed
    assert mismatches(saved, cfg) == []
    with_bn = tiny_cfg(tmp_path, method="dino", dino_head_bn=True)
    assert mismatches(saved, with_bn) == ["dino_head_bn (checkpoint False, now True)"]



def test_resume_names_a_change_of_loader_options(tmp_path):
    """Backend options can change the decoded pixels (DALI's hardware vs CUDA decoder) or the random streams
    (DALI's conditionals): a resume must keep them; a checkpoint from before the setting ran with none."""
    from sdmp_fast.config import mismatches

    plain = dict(loader="memory", data="fashion-mnist")
    cfg = tiny_cfg(tmp_path, loader_options={"conditionals": True}, **plain)
    saved = cfg.to_dict()
    assert mismatches(saved, cfg) == []
    assert mismatches(saved, tiny_cfg(tmp_path, **plain)) == [
        "loader_options (checkpoint {'conditionals': True}, now {})"]
    # how fast batches come may change on a resume (as num_workers may), what they hold may not
    assert mismatches(saved, tiny_cfg(tmp_path, loader_options={"conditionals": True, "read_threads": 8,
                                                               "prefetch_queue_depth": 4}, **plain)) == []
    del saved["loader_options"]
    assert mismatches(saved, tiny_cfg(tmp_path, **plain)) == []


def test_resume_takes_a_loader_option_spelt_out_at_its_default(tmp_path):
    """An option given at the backend's own default is the run without it: a resume may add or drop it."""
    from sdmp_fast.config import mismatches

    from sdmp_fast.data import make_synthetic_image_folder

    dali = dict(loader="dali", data=make_synthetic_image_folder(str(tmp_path / "data"), 1, 2))
    saved = tiny_cfg(tmp_path, **dali).to_dict()
    assert mismatches(saved, tiny_cfg(tmp_path, loader_options={"photometric": "dali", "mix_in_graph": False},
                                      **dali)) == []
    assert mismatches(saved, tiny_cfg(tmp_path, loader_options={"photometric": "torch"}, **dali)) == [
        "loader_options (checkpoint {}, now {'photometric': 'torch'})"]
    spelt = tiny_cfg(tmp_path, loader_options={"photometric": "dali"}, **dali).to_dict()
    assert mismatches(spelt, tiny_cfg(tmp_path, **dali)) == []


def test_resume_names_a_change_of_crop_interpolation(tmp_path):
    from sdmp_fast.config import mismatches

    cfg = tiny_cfg(tmp_path)
    saved = cfg.to_dict()
    assert mismatches(saved, tiny_cfg(tmp_path, interpolation="bilinear")) == [
        "interpolation (checkpoint 'bicubic', now 'bilinear')"]
    del saved["interpolation"]  # written before the setting existed: its crops were bilinear
    assert mismatches(saved, cfg) == ["interpolation (checkpoint 'bilinear', now 'bicubic')"]
    assert mismatches(saved, tiny_cfg(tmp_path, interpolation="bilinear")) == []


def _run_cli(argv, tmp_path, **env):
    return subprocess.Popen([sys.executable, "-m", "sdmp_fast.cli", "train"] + argv, env=_env(tmp_path, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(300)
def test_kill9_then_resume_reproduces_uninterrupted_run(tmp_path):
    argv = TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8", "--steps", "30",
                   "--save-every", "4", "--log-every", "4", "--deterministic", "--lr", "1e-3"]
    ref = _run_cli(argv + ["--out", str(tmp_path / "ref")], tmp_path)
    run = _run_cli(argv + ["--out", str(tmp_path / "run")], tmp_path, SDMP_DEBUG_STEP_SLEEP=0.1)
    ck = str(tmp_path / "run" / "checkpoints")
    deadline = time.time() + 200
    while time.time() < deadline and not ckpt.list_checkpoints(ck) and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.45)  # mid-run, between checkpoints
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    killed_at = ckpt.list_checkpoints(ck)[-1][0]
    assert 0 < killed_at < 30
    assert ref.communicate(timeout=200)[0] is not None and ref.returncode == 0
    resumed = _run_cli(argv + ["--out", str(tmp_path / "run"), "--resume"], tmp_path)
    text = resumed.communicate(timeout=200)[0]
    assert resumed.returncode == 0, text
    assert f"resuming from {ck}/ckpt-{killed_at:09d}.pt at step {killed_at}" in text
    a = ckpt.load_latest(str(tmp_path / "ref" / "checkpoints"))[1]
    b = ckpt.load_latest(ck)[1]
    assert a["step"] == b["step"] == 30
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    steps = [r["step"] for r in __import__("sdmp_fast.runlog", fromlist=["x"]).read_metrics(str(tmp_path / "run"))]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no step logged twice after the resume


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fault_drill_all_resumes_match(tmp_path, capsys):
    from sdmp_fast.fault_drill import run_drill

    lines = []
    # the synthetic source keeps this fast; `python -m sdmp_fast.fault_drill --loader memory --data fashion-mnist`
    # runs the same drill through the in-memory Fashion-MNIST loader (its position replay is also covered above)
    matched = run_drill(trials=10, workdir=str(tmp_path / "drill"), log=lines.append)
    assert matched == 10, "\n".join(lines)
    assert lines[-1].startswith("10/10 resumes matched")


@pytest.mark.timeout(300)
def test_fault_drill_with_the_torchvision_loader_and_its_workers(tmp_path):
    """The kill -9 drill through the torchvision loader: its DataLoader workers are forked children that outlive
    a killed run for seconds; the resume started right after must neither be refused (run lock) nor differ."""
    from sdmp_fast.data import make_synthetic_image_folder

    data = make_synthetic_image_folder(str(tmp_path / "data"), 3, 8)
    cmd = [sys.executable, "-m", "sdmp_fast.cli", "drill", "--trials", "3", "--loader", "torchvision", "--data", data,
           "--steps", "12", "--save-every", "2", "--workdir", str(tmp_path / "drill")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "3/3 resumes matched" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_disk_full_while_exporting_the_backbone_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    """The final backbone.pt export ended in a raw OSError traceback and left backbone.pt.tmp.<pid> behind."""
    from sdmp_fast import cli

    real = torch.save

    def save(obj, f, *a, **k):
        if "backbone.pt.tmp" in str(getattr(f, "name", f)):
            f.write(b"x" * 1000)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    code = cli.main(["train"] + TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "2",
                                        "--log-every", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"could not write {out / 'backbone.pt'}" in err and "disk full" in err, err
    assert not [n for n in os.listdir(out) if ".tmp" in n] and not (out / "backbone.pt").exists()
    assert ckpt.load_latest(str(out / "checkpoints"))[1]["step"] == 2  # the run itself is safe


def test_disk_full_while_writing_metrics_keeps_the_earlier_records(tmp_path, monkeypatch, capsys):
    """A failed metrics.jsonl append was a raw OSError traceback (and could leave half a line)."""
    from sdmp_fast import cli, runlog

    class Full:  # metrics.jsonl on a disk that fills during the second record
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, data):
            self.n += 1
            if self.n == 2:
                self.fh.write(data[:7])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real_open = open
    monkeypatch.setattr(runlog, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    out = tmp_path / "out"
    code = cli.main(["train"] + TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "6",
                                        "--log-every", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{out / 'metrics.jsonl'}" in err and "step 4" in err and "disk full" in err, err
    assert (out / "metrics.jsonl").read_text().splitlines() and \
        [__import__("json").loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]


def test_a_failed_backbone_export_replaces_neither_file(tmp_path, monkeypatch):
    """backbone.pt was replaced before backbone.json was written: a full disk there left the new weights beside
    the description of an earlier step."""
    model = torch.nn.Linear(3, 2)
    ckpt.export_backbone(model, str(tmp_path), {"step": 2})
    before = {n: (tmp_path / n).read_bytes() for n in ("backbone.pt", "backbone.json")}
    with torch.no_grad():
        model.weight.add_(1.0)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.json, "dumps", full)
    with pytest.raises(ckpt.CheckpointError, match=r"backbone: could not write .*backbone.json \(disk full\); "
                                                   r"the earlier one is unchanged"):
        ckpt.export_backbone(model, str(tmp_path), {"step": 4})
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.pt"]
    monkeypatch.undo()
    ckpt.export_backbone(model, str(tmp_path), {"step": 4})
    assert '"step": 4' in (tmp_path / "backbone.json").read_text()
    assert torch.equal(torch.load(tmp_path / "backbone.pt", weights_only=True)["weight"], model.weight)


def test_a_full_disk_at_config_yaml_keeps_the_earlier_config(tmp_path, monkeypatch):
    """A resume with other settings moved config.yaml aside (config.1.yaml) before writing the new one: a full
    disk then left the run without a config.yaml, a temporary file nothing removed and an error naming no file."""
    from sdmp_fast import train_cli

    cfg = tiny_cfg(tmp_path, steps=4)
    out = str(tmp_path / "run")
    os.makedirs(out)
    train_cli._write_config(cfg, out, resumes_a_checkpoint=True)
    before = open(os.path.join(out, "config.yaml")).read()
    cfg.steps = 8

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_cli.os, "fsync", full)
    with pytest.raises(OSError, match=r"config: could not write it \(disk full\); the earlier one is unchanged") as e:
        train_cli._write_config(cfg, out, resumes_a_checkpoint=True)
    assert e.value.filename == os.path.join(out, "config.yaml")
    assert os.listdir(out) == ["config.yaml"] and open(os.path.join(out, "config.yaml")).read() == before
    monkeypatch.undo()
    train_cli._write_config(cfg, out, resumes_a_checkpoint=True)
    assert sorted(os.listdir(out)) == ["config.1.yaml", "config.yaml"]
    assert open(os.path.join(out, "config.1.yaml")).read() == before


def test_truncating_metrics_rewrites_only_what_changes_and_names_the_file_when_it_cannot(tmp_path, monkeypatch):
    from sdmp_fast import paths, runlog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3)))
    inode = os.stat(path).st_ino
    runlog.truncate_metrics(str(path), 3)  # nothing to drop: not rewritten (a full disk could not take a copy)
    assert os.stat(path).st_ino == inode

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paths.os, "fsync", full)
    with pytest.raises(OSError, match=r"metrics .*could not write it \(disk full\); the earlier file is unchanged"):
        runlog.truncate_metrics(str(path), 2)
    assert path.read_text().count("\n") == 3 and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_resume_appends_the_record_of_a_save_step_the_run_did_not_write(tmp_path, monkeypatch, capsys):
    """A run stopped between a checkpoint and that step's metrics record (a full disk at the record, a kill):
    the resume went on from the checkpoint and the record (loss, "checkpoint": true) was missing for good. The
    checkpoint now holds it, and the resume appends it."""
    import json

    from sdmp_fast import cli, runlog

    real = runlog.RunLogger._append

    def full_at_step_4(self, data, step):
        if step == 4:
            raise ckpt.CheckpointError("metrics: disk full (simulated)")
        return real(self, data, step)

    out = tmp_path / "out"
    argv = ["train"] + TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "6", "--log-every", "2",
                               "--save-every", "2", "--out", str(out)]
    monkeypatch.setattr(runlog.RunLogger, "_append", full_at_step_4)
    assert cli.main(argv) == 1
    assert [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))] == [2, 4]
    monkeypatch.undo()
    assert cli.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6] and all(r.get("checkpoint") for r in recs)
    assert all(isinstance(r["loss"], float) for r in recs)
    # a resume whose record is there appends nothing more
    assert cli.main(argv[:-2] + ["--steps", "8", "--out", str(out), "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
