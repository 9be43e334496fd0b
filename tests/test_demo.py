"""Smoke test of `make demo`'s entry point with a tiny budget (the real demo is checked by hand, see
bench/results/demo-cpu-*.md): pretraining through the trainer, k-NN of pretrained and random-init backbones,
the table, and every file the demo promises."""
import json

import pytest

from sdmp_fast import demo


@pytest.mark.timeout(180)
def test_demo_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo_out"
    rc = demo.main(["--device", "cpu", "--steps", "3", "--batch-size", "16", "--train-limit", "512",
                    "--test-limit", "200", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pretrained" in text and "random init" in text and "raw pixels" in text
    res = json.loads((out / "results.json").read_text())
    (rec,) = res["records"]
    assert rec["steps"] == 3 and rec["batch_size"] == 16 and res["n_test"] == 200 and res["n_train"] == 512
    for key in ("pretrained_knn", "random_init_knn", "raw_pixel_knn"):
        value = rec[key] if key in rec else res[key]
        assert 10.0 <= value <= 100.0  # 10 balanced-ish classes: anything sane beats 10% chance here
    assert rec["train_img_per_s"] > 0
    for name in ("mixed_views.png", "loss_seed0.png", "run-seed0/metrics.jsonl", "run-seed0/backbone.pt"):
        assert (out / name).is_file(), name
    with open(out / "mixed_views.png", "rb") as fh:
        assert fh.read(4) == b"\x89PNG"


def test_demo_rejects_bad_seeds(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "a,b", "--out", str(tmp_path)])


def test_presets_are_valid_configs(tmp_path):
    for preset in demo.PRESETS:
        cfg = demo._config(preset, "cpu", 0, str(tmp_path / preset), {})
        assert cfg.method == "mocov3" and cfg.sdmp and cfg.loader == "memory"
        assert cfg.img_size % cfg.patch_size == 0
        assert not cfg.cuda_graphs  # forced off on the CPU


def test_cpu_threads_setting():
    assert demo.cpu_threads("3") == 3
    assert demo.cpu_threads("auto") >= 1
    with pytest.raises(ValueError, match="threads"):
        demo.cpu_threads("0")


def test_demo_bad_settings_are_one_argparse_line(tmp_path, capsys):
    """An odd --batch-size ended in a ValueError traceback from the config's validation."""
    out = tmp_path / "d"
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", "cpu", "--batch-size", "7", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: batch_size:" in err and "Traceback" not in err, err
    assert not out.exists()


def hold_lock_in_another_process(path):
    """A process that holds ``path``'s lock (paths.lock_exclusive) until killed; returns it once it holds it."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom sdmp_fast.paths import lock_exclusive\nfh = lock_exclusive(sys.argv[1])\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.timeout(60)
def test_a_demo_on_an_out_another_demo_is_writing_is_refused_and_deletes_nothing(tmp_path, capsys):
    """Two demos on one --out: the second deleted the first's run folder and results and trained into them, so
    one printed the other's losses and results.json mixed the two runs' settings."""
    out = tmp_path / "d"
    (out / "run-seed0").mkdir(parents=True)
    (out / "run-seed0" / "metrics.jsonl").write_text("{}\n")
    (out / "results.json").write_text("{}")
    holder = hold_lock_in_another_process(out / ".lock")
    try:
        with pytest.raises(SystemExit) as e:
            demo.main(["--device", "cpu", "--steps", "1", "--batch-size", "16", "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert e.value.code == 2
    assert "is being written by another demo or sdmp-fast train process" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}" and (out / "run-seed0" / "metrics.jsonl").is_file()


def test_an_out_this_user_cannot_create_is_one_line(tmp_path, capsys):
    """os.makedirs(--out) had no handler: a PermissionError traceback where every other command says one line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", "cpu", "--steps", "1", "--out", str(blocker / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out: cannot create" in err and "Traceback" not in err
