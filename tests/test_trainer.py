"""Trainer: configuration errors, SDMP on/off through one code path, NaN policy, metrics, backbone export,
signals, and (on a GPU) pipeline == eager, CUDA graph == eager, no host sync in the steady state."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sdmp_fast import cli
from sdmp_fast.config import TrainConfig
from sdmp_fast.runlog import read_metrics
from sdmp_fast.trainer import NonFiniteError, Trainer

TINY = ["--arch", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2",
        "--embed-dim", "64", "--num-heads", "2", "--proj-hidden-dim", "128", "--proj-dim", "64",
        "--dino-out-dim", "256", "--dino-hidden-dim", "128", "--dino-bottleneck-dim", "64", "--local-size", "16",
        "--n-local", "4", "--n-local-mixed", "2", "--progress", "off", "--tensorboard", "off"]
TINY_KW = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
               proj_hidden_dim=128, proj_dim=64, dino_out_dim=256, dino_hidden_dim=128, dino_bottleneck_dim=64,
               local_size=16, n_local=4, n_local_mixed=2, progress=False, tensorboard=False)


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(TINY_KW, loader="synthetic", batch_size=8, steps=6, log_every=2, save_every=0, lr=1e-3,
                deterministic=True, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base).resolve().validate()


def test_a_run_after_a_deterministic_one_does_not_inherit_strict_mode(tmp_path):
    """torch's deterministic mode is process-wide: a --deterministic Trainer turns it on, the next Trainer without
    it turns it off again (on a GPU, DINO's position-embedding backward raises in strict mode); a user's own
    setting, made outside any Trainer, is left alone."""
    from sdmp_fast.trainer import set_deterministic

    before = torch.are_deterministic_algorithms_enabled()
    try:
        Trainer(tiny_cfg(tmp_path, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        Trainer(tiny_cfg(tmp_path, deterministic=False))
        assert not torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)  # the user's
        set_deterministic(False, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def run_cli(argv, capsys=None):
    code = cli.main(["train"] + list(argv))
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


# ------------------------------------------------------------------------------------------- config errors

@pytest.fixture
def image_dir(tmp_path):
    from sdmp_fast.data import make_synthetic_image_folder

    return make_synthetic_image_folder(str(tmp_path / "imgs"), num_classes=2, per_class=4, size=(20, 20))


BAD_SETTINGS = [
    (["--batch-size", "7"], "batch_size"),
    (["--method", "dino", "--batch-size", "5"], "batch_size"),
    (["--arch", "no_such_vit"], "arch"),
    (["--arch", "resnet18"], "arch"),
    (["--alpha", "-1"], "alpha"),
    (["--momentum", "1.5"], "momentum"),
    (["--momentum-end", "1.5"], "momentum_end"),
    (["--drop-path-rate", "1"], "drop_path_rate"),
    (["--img-size", "30"], "img_size"),
    (["--mix-methods", "mixup,blend"], "mix_methods"),
    (["--cuda-graphs", "--device", "cpu"], "cuda_graphs"),
    (["--steps", "5", "--epochs", "2"], "steps"),
    (["--warmup-steps", "10"], "warmup_steps"),
    (["--method", "dino", "--tau-t-warmup-steps", "5"], "tau_t_warmup_steps"),  # was cut to the run, silently
    (["--lr", "0"], "lr"),
    (["--n-local-mixed", "9", "--method", "dino"], "n_local_mixed"),
    (["--n-local", "-1", "--method", "dino"], "n_local"),  # was reported under n_local_mixed
    (["--batch-size", "abc"], "batch_size"),
    (["--dist-timeout", "1e10"], "dist_timeout"),  # passed, then overflowed in torch's timeouts or hung silently
    (["--tau", "1e-300"], "tau"),  # passed "> 0", then 0 in fp32: a NaN loss at step 1 blamed on the lr
    (["--method", "dino", "--tau-t", "1e-45"], "tau_t"),
]


@pytest.mark.parametrize("extra,setting", BAD_SETTINGS)
def test_bad_setting_is_named_and_out_untouched(tmp_path, capsys, extra, setting):
    out = tmp_path / "out"
    argv = TINY + ["--loader", "synthetic", "--steps", "5", "--out", str(out)]
    # later options win in argparse: the bad value overrides the good default above
    code, err = run_cli(argv + extra, capsys)
    assert code == 2
    assert f"error: {setting}:" in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra,setting", [(["--warmup-steps", "8"], "warmup_steps"),
                                           (["--method", "dino", "--tau-t-warmup-steps", "9"], "tau_t_warmup_steps")])
def test_a_warmup_longer_than_an_epochs_run_is_named_and_out_untouched(tmp_path, capsys, extra, setting, image_dir):
    """With --epochs the run's length is known once the loader is built (8 images, batch 2: 4 steps an epoch): a
    longer warm-up was cut to the run in silence (the lr peaking at the last step), as --steps refuses it."""
    out = tmp_path / "out"
    argv = TINY + ["--loader", "torchvision", "--data", image_dir, "--batch-size", "2", "--num-workers", "0",
                   "--epochs", "2", "--out", str(out)]
    code, err = run_cli(argv + extra, capsys)
    assert code == 2 and f"error: {setting}:" in err and "a run of 8 steps (2 epochs)" in err, err
    assert not out.exists()


def test_bad_sdmp_kernels_env_is_named_and_out_untouched(tmp_path, capsys, monkeypatch):
    """SDMP_KERNELS=off stopped the run at the first batch's mixing, after --out was created."""
    monkeypatch.setenv("SDMP_KERNELS", "off")
    out = tmp_path / "out"
    code, err = run_cli(TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8", "--steps", "2",
                                "--out", str(out)], capsys)
    assert code == 2
    assert "error: SDMP_KERNELS='off'" in err, err
    assert not out.exists()


def test_argparse_rejects_unknown_choices(tmp_path):
    for extra in (["--method", "simclr"], ["--loader", "nope"], ["--nan-policy", "ignore"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--out", str(tmp_path / "o"), "--steps", "2"] + extra)
        assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_data_errors(tmp_path, capsys, image_dir):
    out = tmp_path / "out"
    base = TINY + ["--steps", "2", "--out", str(out)]
    code, err = run_cli(base + ["--loader", "torchvision", "--data", str(tmp_path / "missing")], capsys)
    assert code == 2 and "error: data:" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(base + ["--loader", "torchvision", "--data", str(tmp_path / "empty")], capsys)
    assert code == 2 and "error: data:" in err and "empty" in err
    code, err = run_cli(base + ["--loader", "torchvision"], capsys)
    assert code == 2 and "error: data:" in err
    assert not out.exists()


def test_data_with_nothing_decodable_is_an_error_not_a_hang(tmp_path, capsys):
    bad = tmp_path / "bad" / "c0"
    bad.mkdir(parents=True)
    for k in range(3):
        (bad / f"{k}.jpg").write_bytes(b"junk")
    code, err = run_cli(TINY + ["--loader", "torchvision", "--data", str(tmp_path / "bad"), "--batch-size", "2",
                                "--steps", "4", "--num-workers", "0", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "error: data: epoch 0 of the torchvision loader" in err and "no batch" in err
    # the failed start left only its start files: the rerun on fixed data needs no --resume
    assert sorted(os.listdir(tmp_path / "o")) == [".lock", "config.yaml", "metrics.jsonl"]
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "1", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "1", "--out", str(tmp_path / "other")], capsys)
    assert code == 2 and "is not empty and holds no run (notes.txt)" in err
    # with --resume too (elastic runs pass it from the first attempt): it went on, writing its config.yaml over
    # the folder's own
    (tmp_path / "other" / "config.yaml").write_text("dataset: theirs\n")
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "1", "--resume", "--out",
                                str(tmp_path / "other")], capsys)
    assert code == 2 and "is not empty and holds no run (notes.txt)" in err
    assert sorted(os.listdir(tmp_path / "other")) == ["config.yaml", "notes.txt"]
    assert (tmp_path / "other" / "config.yaml").read_text() == "dataset: theirs\n"
    # --resume on what a run killed before its first metrics record leaves (TensorBoard's tb/ made at the start,
    # a config.yaml.tmp.<pid> of a process killed while writing it): a fresh start, as without --resume
    for resume in (["--resume"], []):
        o2 = tmp_path / f"o2{'-resume' if resume else ''}"
        (o2 / "tb").mkdir(parents=True)
        for name in (".lock", "metrics.jsonl", "config.yaml", "config.yaml.tmp.123"):
            (o2 / name).write_text("")
        code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "1", "--out", str(o2)] + resume, capsys)
        assert code == 0, err


def test_out_that_cannot_be_written_is_named_before_anything_runs(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "2", "--out", str(tmp_path / "afile" / "run")],
                        capsys)
    assert code == 2 and "error: out:" in err and "is a file" in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "2", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "error: out: cannot write in" in err and not (tmp_path / "run").exists()


def test_resume_refuses_when_no_checkpoint_can_be_read(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--loader", "synthetic", "--steps", "4", "--save-every", "2", "--log-every", "2", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    ckpts = sorted((out / "checkpoints").iterdir())
    for c in ckpts:
        c.write_bytes(c.read_bytes()[:100])  # every checkpoint truncated
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.warns(UserWarning):
        code, err = run_cli(args + ["--resume"], capsys)
    assert code == 1 and "no checkpoint of" in err and "nothing was changed" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the run is untouched


def test_resume_with_another_world_size_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2)
    tr = Trainer(cfg)
    state = tr.state_dict()
    state["world_size"] = 2
    with pytest.raises(ValueError, match=r"resume: the checkpoint was made by 2 process\(es\), this run has 1"):
        Trainer(cfg).load_state_dict(state)


@pytest.mark.parametrize("text,message", [
    ("sdmp: null\n", "sdmp: null is not a value of this setting"),  # trained with SDMP off before
    ("device: null\n", "device: null is not a value of this setting"),
    ("lr: .inf\n", "lr: must be a finite number"),
    ("seed: 100000000000\n", "seed: must be < 2**32"),  # overflowed in the loader's generator after out/ was made
    ("kernels: on\n", "kernels: choose auto or off, got 'on'"),  # YAML's on / off are booleans
])
def test_yaml_nulls_and_infinities_are_named(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "2", "--config", str(cfg),
                                "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_loader_options_reach_the_backend(tmp_path, capsys, image_dir):
    """--loader-options: the backend's own options from the trainer, as key=value pairs or a YAML mapping (also
    from a config file); checked by make_loader against what the backend takes before --out is touched."""
    import argparse

    from sdmp_fast.config import config_from_args
    from sdmp_fast.train_cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    parse = lambda *a: config_from_args(p.parse_args(list(a) + ["--out", "x"]))  # noqa: E731
    assert parse("--loader-options", "prefetch_factor=4,mix-in-graph=true,decoder_options={hw_decoder_load: 0.9}"
                 ).loader_options == {"prefetch_factor": 4, "mix_in_graph": True,
                                      "decoder_options": {"hw_decoder_load": 0.9}}
    assert parse("--loader-options", "{a: [1, 2], b: null}").loader_options == {"a": [1, 2], "b": None}
    # commas inside brackets belong to the value
    assert parse("--loader-options", "a=[1, 2],decoder_options={hw_decoder_load: 0.9, use_fast_idct: true}"
                 ).loader_options == {"a": [1, 2], "decoder_options": {"hw_decoder_load": 0.9, "use_fast_idct": True}}
    assert parse("--loader-options", " ").loader_options == {}
    with pytest.raises(ValueError, match="loader_options: expected key=value pairs .*got 'a='"):
        parse("--loader-options", "a=")
    f = tmp_path / "c.yaml"
    f.write_text("loader_options:\n  prefetch_factor: 3\n")
    assert parse("--config", str(f)).loader_options == {"prefetch_factor": 3}
    f.write_text("loader_options: null\n")
    assert parse("--config", str(f)).loader_options == {}
    f.write_text("loader_options: [1, 2]\n")
    with pytest.raises(ValueError, match="loader_options: expected a mapping of option names to values"):
        parse("--config", str(f))
    assert parse().loader_options == {}
    # reach the loader: torchvision's own prefetch_factor, and an unknown option named with what it takes
    cfg = tiny_cfg(tmp_path, loader="torchvision", data=image_dir, num_workers=1,
                   loader_options={"prefetch_factor": 3})
    assert Trainer(cfg).loader._loader.prefetch_factor == 3
    argv = TINY + ["--loader", "torchvision", "--data", image_dir, "--steps", "2", "--out", str(tmp_path / "o")]
    code, err = run_cli(argv + ["--loader-options", "prefetch_facto=3"], capsys)
    assert code == 2 and "unknown option(s) prefetch_facto; it takes prefetch_factor" in err
    code, err = run_cli(argv + ["--loader-options", "prefetch_factor=0"], capsys)  # was the DataLoader's assert
    assert code == 2 and "torchvision loader: prefetch_factor: expected an integer >= 1 and <= 64, got 0" in err
    # counts past any machine's needs: the run spun in DataLoader's start-up (prefetch_factor) or forked until
    # the machine gave out (num_workers), with its config.yaml and metrics.jsonl already written
    code, err = run_cli(argv + ["--loader-options", "prefetch_factor=1000000000"], capsys)
    assert code == 2 and "prefetch_factor: expected an integer >= 1 and <= 64, got 1000000000" in err
    code, err = run_cli(argv + ["--num-workers", "100000"], capsys)
    assert code == 2 and "num_workers: must be an integer >= 0 and <= 1024" in err
    for opts, message in (("seed=3", "loader_options: seed set by the trainer itself"),
                          ("oops", "loader_options: expected key=value pairs"),
                          ("{a: [1", "loader_options: not YAML")):
        code, err = run_cli(argv + ["--loader-options", opts], capsys)
        assert code == 2 and message in err, err
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "2", "--out", str(tmp_path / "o"),
                                "--loader-options", "a=1"], capsys)
    assert code == 2 and "loader_options: the synthetic loader takes no options" in err
    assert not (tmp_path / "o").exists()


def test_a_run_config_reused_with_another_method_takes_that_method_s_defaults(tmp_path):
    """A run's config.yaml holds its method's defaults filled in: reused with --method dino it trained DINO with
    MoCo v3's lr, decay, clipping, no drop path, no frozen prototypes. A value set apart from them stays."""
    import argparse

    import yaml

    from sdmp_fast.config import METHOD_DEFAULTS, TrainConfig, config_from_args
    from sdmp_fast.train_cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    moco = TrainConfig(method="mocov3", out="x", steps=10).resolve().to_dict()
    moco["clip_grad"] = 1.0  # the user's own choice, not MoCo v3's default
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(moco, sort_keys=False))
    with pytest.warns(UserWarning, match=r"mocov3 config, trained here with --method dino: .*base_lr 0.00015"):
        got = config_from_args(p.parse_args(["--config", str(f), "--method", "dino", "--out", "x"]))
    dino = METHOD_DEFAULTS["dino"]
    assert (got.base_lr, got.weight_decay, got.weight_decay_end, got.momentum, got.drop_path_rate,
            got.freeze_last_layer_epochs) == (dino["base_lr"], dino["weight_decay"], dino["weight_decay_end"],
                                              dino["momentum"], dino["drop_path_rate"], dino["freeze_last_layer_epochs"])
    assert got.clip_grad == 1.0
    same = config_from_args(p.parse_args(["--config", str(f), "--method", "mocov3", "--out", "x"]))
    assert same.base_lr == METHOD_DEFAULTS["mocov3"]["base_lr"] and same.clip_grad == 1.0



@pytest.mark.parametrize("given", [["--embed-dim", "64"], ["--num-heads", "5"]])
def test_a_width_or_head_count_alone_that_does_not_fit_the_arch_is_named(tmp_path, capsys, given):
    """--embed-dim without --num-heads (or the reverse) against the arch's own other value: timm's bare
    AssertionError ("dim should be divisible by num_heads"), exit 1, named nothing."""
    out = tmp_path / "out"
    arch = ["--arch", "vit_small_patch16_224"] if given[0] == "--embed-dim" else ["--arch", "vit_tiny_patch16_224"]
    code, err = run_cli(arch + given + ["--depth", "1", "--img-size", "32", "--patch-size", "8", "--loader",
                                        "synthetic", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                                        "--progress", "off", "--tensorboard", "off", "--out", str(out)], capsys)
    name = given[0][2:].replace("-", "_")
    assert code == 2 and f"error: {name}: timm cannot build" in err and "together" in err, err
    assert not out.exists()


def test_plain_dino_does_not_check_or_match_the_mixed_crop_count():
    """--sdmp off makes no mixed crop: n_local_mixed (default 4) above --n-local was refused, and a resume compared
    it with the checkpoint's."""
    from sdmp_fast.config import mismatches

    plain = dict(TINY_KW, method="dino", n_local=1, steps=2, out="x", loader="synthetic")
    cfg = TrainConfig(**dict(plain, sdmp=False)).resolve().validate()
    saved = dict(cfg.to_dict(), n_local_mixed=3)
    assert mismatches(saved, cfg) == []
    assert mismatches(dict(saved, sdmp=True), cfg) == ["sdmp (checkpoint True, now False)",
                                                       "n_local_mixed (checkpoint 3, now 2)"]
    with pytest.raises(ValueError, match="n_local_mixed: must be in"):
        TrainConfig(**plain).resolve().validate()


def test_a_reused_moco_config_with_a_new_weight_decay_keeps_it_constant(tmp_path):
    """A run's config.yaml holds weight_decay_end filled in (= its weight_decay for MoCo v3): reused with
    --weight-decay 0.02, the decay went along a cosine back to the old 0.1. A weight_decay_end set apart from
    the decay, or DINO's own, stays."""
    import argparse

    import yaml

    from sdmp_fast.config import config_from_args
    from sdmp_fast.train_cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    f = tmp_path / "config.yaml"
    for method, saved_end, want_end in (("mocov3", None, 0.02), ("mocov3", 0.3, 0.3), ("dino", None, 0.4)):
        saved = TrainConfig(method=method, out="x", steps=10, weight_decay_end=saved_end).resolve().to_dict()
        f.write_text(yaml.safe_dump(saved, sort_keys=False))
        got = config_from_args(p.parse_args(["--config", str(f), "--weight-decay", "0.02", "--out", "x"]))
        assert (got.weight_decay, got.weight_decay_end) == (0.02, want_end), (method, saved_end)
        same = config_from_args(p.parse_args(["--config", str(f), "--out", "x"]))
        assert same.weight_decay_end == saved["weight_decay_end"]
    # the method the run uses decides: a file without one, trained as DINO (whose end is its own), keeps its end
    f.write_text("weight_decay: 0.1\nweight_decay_end: 0.1\n")
    got = config_from_args(p.parse_args(["--config", str(f), "--method", "dino", "--weight-decay", "0.05",
                                         "--out", "x"]))
    assert (got.weight_decay, got.weight_decay_end) == (0.05, 0.1)


def test_config_file_that_is_a_folder_or_not_text_is_named(tmp_path, capsys):
    code, err = run_cli(TINY + ["--config", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is a folder, expected a YAML file" in err
    (tmp_path / "c.yaml").write_bytes(b"lr: \xff\xfe\n")
    code, err = run_cli(TINY + ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is not UTF-8 text" in err and "c.yaml" in err


def test_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "2", "--out", str(out)], capsys)
    assert code == 2 and "error: out:" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_yaml_config_overrides_and_safety(tmp_path, capsys):
    from sdmp_fast.config import config_from_args, load_config
    import argparse

    f = tmp_path / "c.yaml"
    f.write_text("method: dino\nbatch-size: 16\nsdmp: off\nepochs: 3\nmix_methods: [mixup, cutmix]\n")
    p = argparse.ArgumentParser()
    from sdmp_fast.train_cli import add_arguments
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(f), "--batch-size", "32", "--steps", "7", "--out", "x"]))
    assert (cfg.method, cfg.batch_size, cfg.sdmp, cfg.steps, cfg.epochs) == ("dino", 32, False, 7, None)
    f.write_text("kernels: off\n")  # YAML reads off as False: still the setting's "off"
    assert config_from_args(p.parse_args(["--config", str(f), "--out", "x"])).kernels == "off"
    assert cfg.mix_methods == ("mixup", "cutmix") and cfg.mix_weight == 0.5 and cfg.base_lr == 5e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: !!python/object/apply:os.system ['touch /tmp/sdmp_pwned']\n")
    with pytest.raises(ValueError, match="config"):
        load_config(str(bad))
    unknown = tmp_path / "u.yaml"
    unknown.write_text("bach_size: 8\n")
    with pytest.raises(ValueError, match="unknown setting 'bach_size'"):
        load_config(str(unknown))
    typed = tmp_path / "t.yaml"
    typed.write_text("batch_size: 8.5\n")
    with pytest.raises(ValueError, match="batch_size"):
        config_from_args(p.parse_args(["--config", str(typed), "--out", "x"]))


# ------------------------------------------------------------------------------------------- training paths

@pytest.mark.parametrize("method", ["mocov3", "dino"])
@pytest.mark.parametrize("sdmp", [True, False])
def test_methods_train_and_log(tmp_path, method, sdmp):
    cfg = tiny_cfg(tmp_path, method=method, sdmp=sdmp, steps=4, log_every=2)
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    assert tr.fit(cfg.out) == "done"
    after = tr.model.state_dict()
    trained = tr.module.backbone.blocks[0].attn.qkv.weight
    assert not torch.equal(before[[k for k in before if k.endswith("blocks.0.attn.qkv.weight")][0]],
                           after[[k for k in after if k.endswith("blocks.0.attn.qkv.weight")][0]])
    assert torch.isfinite(trained).all()
    if method == "dino":
        assert tr.model.center.abs().sum() > 0  # the center moved from the clean teacher outputs
    assert os.path.isfile(os.path.join(cfg.out, "backbone.pt"))


def test_sdmp_off_is_the_same_path_minus_mixing(tmp_path):
    on = Trainer(tiny_cfg(tmp_path, sdmp=True))
    off = Trainer(tiny_cfg(tmp_path, sdmp=False))
    b_on, b_off = next(iter(on.loader)), next(iter(off.loader))
    assert b_on.is_mixed and not b_off.is_mixed
    assert len(on.step_inputs(b_on, False)) == 5 and len(off.step_inputs(b_off, False)) == 2
    assert on.names == ("loss", "source", "mix_source", "mix_mix", "grad_norm")
    assert off.names == ("loss", "source", "source_sym", "grad_norm")
    # same model and optimiser construction either way
    assert [n for n, _ in on.model.named_parameters()] == [n for n, _ in off.model.named_parameters()]


def test_moco_step_loss_matches_reference(tmp_path):
    """The trainer's first-step terms equal sdmp_moco_terms on the same encoders and views."""
    from sdmp_fast.losses import sdmp_moco_terms

    cfg = tiny_cfg(tmp_path, steps=1, log_every=1)
    tr = Trainer(cfg)
    batch = next(iter(tr.loader))
    swap = bool(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(cfg.seed * 7919 + 17)).item())
    x1, x2, x1m, x2m, lam = tr.step_inputs(batch, swap)
    tr.model.train()
    with torch.no_grad():
        q1, q2m = tr.model.base(torch.cat([x1, x2m]), 2)
        k1, k2, k1m = tr.model.momentum(torch.cat([x1, x2, x1m]), 3)
    ref = sdmp_moco_terms(q1, q2m, k1, k2, k1m, lam, cfg.tau)
    tr.fit(cfg.out)
    rec = read_metrics(cfg.out)[0]
    for k in ("source", "mix_source", "mix_mix"):
        assert rec[k] == pytest.approx(ref[k].item(), rel=1e-5)
    assert rec["loss"] == pytest.approx(sum(ref[k].item() for k in ref), rel=1e-5)


def test_view_swap_is_random_and_reproducible(tmp_path):
    a = Trainer(tiny_cfg(tmp_path))
    draws = [bool(torch.randint(0, 2, (1,), generator=a.swap_gen).item()) for _ in range(32)]
    b = Trainer(tiny_cfg(tmp_path))
    assert draws == [bool(torch.randint(0, 2, (1,), generator=b.swap_gen).item()) for _ in range(32)]
    assert 4 < sum(draws) < 28


def test_metrics_jsonl_format(tmp_path):
    cfg = tiny_cfg(tmp_path, method="dino", steps=4, log_every=2)
    Trainer(cfg).fit(cfg.out)
    recs = read_metrics(cfg.out)
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        for k in ("step", "loss", "img_per_s", "lr", "dino", "mix_source", "mix_teacher", "grad_norm", "tau_t",
                  "epoch", "skipped", "teacher_entropy", "teacher_batch_entropy"):
            assert k in r, k
        assert r["img_per_s"] > 0 and r["loss"] > 0
        assert "max_mem_gb" not in r  # a GPU's peak memory; nothing to say on the CPU
        # entropies of softmax distributions over K = 256 prototypes; the batch mean is at least as spread out
        assert 0 <= r["teacher_entropy"] <= r["teacher_batch_entropy"] + 1e-5 <= math.log(256) + 1e-4


def test_teacher_entropies_match_definition():
    from sdmp_fast.trainer import _teacher_entropies

    g = torch.Generator().manual_seed(0)
    t, c = torch.randn(2, 6, 16, generator=g), torch.randn(1, 16, generator=g)
    h, hb = _teacher_entropies(t, c, 0.07).tolist()
    p = torch.softmax((t - c) / 0.07, dim=-1).reshape(-1, 16)
    assert h == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    m = p.mean(0)
    assert hb == pytest.approx(float(-(m * m.log()).sum()), rel=1e-5)
    uniform = _teacher_entropies(torch.zeros(2, 4, 16), torch.zeros(1, 16), 0.04)
    assert uniform.tolist() == pytest.approx([math.log(16)] * 2)


def test_schedules():
    from sdmp_fast.schedules import Schedules

    s = Schedules(total_steps=100, peak_lr=1.0, min_lr=0.1, warmup_steps=10, wd=0.04, wd_end=0.4, momentum=0.996,
                  tau_t=0.04, tau_t_end=0.07, tau_t_warmup_steps=30)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0) and s.lr(10) == pytest.approx(1.0)
    assert s.lr(100) == pytest.approx(0.1) and s.lr(55) == pytest.approx(0.55)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(100) == pytest.approx(0.4)
    assert s.ema_keep(0) == pytest.approx(0.996) and s.ema_keep(100) == pytest.approx(1.0)
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(15) == pytest.approx(0.055)
    assert s.teacher_temp(30) == s.teacher_temp(99) == pytest.approx(0.07)


def test_momentum_end_sets_final_ema_keep_rate(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, method="dino", momentum=0.99, steps=100))
    assert tr.schedules.ema_keep(100) == pytest.approx(1.0)          # default: cosine to 1 as in the papers
    const = Trainer(tiny_cfg(tmp_path, method="dino", momentum=0.99, momentum_end=0.99, steps=100))
    assert [const.schedules.ema_keep(s) for s in (0, 50, 100)] == pytest.approx([0.99] * 3)
    assert const.schedules.lr(50) == tr.schedules.lr(50)               # the other schedules are unchanged


def test_lr_scales_with_global_batch(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, lr=None, base_lr=1e-3, batch_size=16))
    assert tr.schedules.peak_lr == pytest.approx(1e-3 * 16 / 256)


def test_weight_decay_groups_follow_each_methods_reference_code(tmp_path):
    """DINO (utils.get_params_groups) decays every tensor but biases and 1-D ones, position embedding and class
    token included; MoCo v3 (AdamW over model.parameters(), as SDMP's code) decays every trainable parameter."""
    dino = Trainer(tiny_cfg(tmp_path, method="dino"))
    names = {id(p): n for n, p in dino.module.named_parameters()}
    decayed = {names[id(p)] for p in dino.decay_params}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.attn.qkv.weight",
            "head.mlp.0.weight", "head.last_layer.weight_v"} <= decayed
    for n, p in dino.module.named_parameters():
        if p.requires_grad and (n.endswith(".bias") or p.ndim == 1):
            assert n not in decayed, n
    moco = Trainer(tiny_cfg(tmp_path, method="mocov3"))
    trainable = [p for p in moco.module.parameters() if p.requires_grad]
    assert {id(p) for p in moco.decay_params} == {id(p) for p in trainable}
    assert not any(p.requires_grad for p in moco.module.backbone.patch_embed.parameters())  # frozen: no decay


def test_resume_of_a_checkpoint_with_the_earlier_weight_decay_groups_is_named(tmp_path):
    """Checkpoints written before the groups followed DINO / MoCo v3 hold other group sizes: a named error."""
    tr = Trainer(tiny_cfg(tmp_path, method="dino"))
    state = tr.state_dict()
    groups = state["optimizer"]["param_groups"]
    groups[1]["params"].append(groups[0]["params"].pop())  # e.g. pos_embed undecayed, as before
    with pytest.raises(ValueError, match="resume: the checkpoint's optimiser state does not fit"):
        Trainer(tiny_cfg(tmp_path, method="dino")).load_state_dict(state)


def test_stochastic_depth_in_the_student_only_dino_default(tmp_path):
    """DINO trains its student with drop_path_rate 0.1 and builds its teacher without; MoCo v3 uses none."""
    cfg = tiny_cfg(tmp_path, method="dino")
    assert cfg.drop_path_rate == 0.1
    tr = Trainer(cfg)
    rates = [m.drop_prob for m in tr.model.student.backbone.modules() if hasattr(m, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.1)  # timm: linear over the blocks, 0.1 in the last
    assert all(m.drop_prob == 0 for m in tr.model.teacher.modules() if hasattr(m, "drop_prob"))
    tr.model.train()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tr.model.teacher.backbone(x), tr.model.teacher.backbone(x))
        assert not torch.equal(tr.model.student.backbone(x), tr.model.student.backbone(x))
    moco = tiny_cfg(tmp_path, method="mocov3")
    assert moco.drop_path_rate == 0.0
    assert not any(getattr(m, "drop_prob", 0) for m in Trainer(moco).model.modules())
    one = Trainer(tiny_cfg(tmp_path, method="mocov3", drop_path_rate=0.2)).model
    assert any(getattr(m, "drop_prob", 0) for m in one.base.modules())
    assert not any(getattr(m, "drop_prob", 0) for m in one.momentum.modules())


def _first_step_grad_norms(tmp_path, **kw) -> dict:
    """Each trainable parameter's gradient norm as AdamW receives it at the first step."""
    tr = Trainer(tiny_cfg(tmp_path, method="dino", steps=2, **kw))
    seen, step = {}, tr.optimizer.step

    def spy(*a, **k):
        seen.update({n: p.grad.norm().item() for n, p in tr.module.named_parameters() if p.grad is not None})
        return step(*a, **k)

    tr.optimizer.step = spy
    tr.train_step(next(iter(tr.loader)))
    return seen


def test_gradient_clipping_is_per_parameter_as_dino(tmp_path):
    """DINO's utils.clip_gradients clips each parameter tensor's gradient to norm clip_grad on its own; a global
    clip_grad_norm_ at the same threshold scaled every gradient down (the global norm is far larger)."""
    raw = _first_step_grad_norms(tmp_path, clip_grad=0.0)
    clip = sorted(raw.values())[len(raw) // 2]  # half the tensors above it, half below
    clipped = _first_step_grad_norms(tmp_path, clip_grad=clip)
    assert clipped.keys() == raw.keys()
    for name, norm in raw.items():
        assert clipped[name] == pytest.approx(min(norm, clip), rel=1e-4, abs=1e-12), name


def test_dino_norm_last_layer_off_trains_the_prototype_gains(tmp_path):
    """DINO's --norm_last_layer false (its ViT-S/16 setting): weight_g is trained and, being 2-D, decayed."""
    on = Trainer(tiny_cfg(tmp_path, method="dino"))
    assert not on.model.student.head.last_layer.weight_g.requires_grad
    tr = Trainer(tiny_cfg(tmp_path, method="dino", dino_norm_last_layer=False, freeze_last_layer_epochs=0, steps=2))
    g = tr.model.student.head.last_layer.weight_g
    assert g.requires_grad and any(p is g for p in tr.decay_params)
    before = g.detach().clone()
    tr.train_step(next(iter(tr.loader)))
    assert not torch.equal(g, before)


def test_a_dino_run_shorter_than_the_frozen_prototype_period_warns(tmp_path):
    said = []
    Trainer(tiny_cfg(tmp_path, method="dino", steps=4), log=said.append)  # synthetic: one 4-step epoch
    assert any("prototype layer stays frozen for the whole run" in m for m in said), said
    said.clear()
    Trainer(tiny_cfg(tmp_path, method="dino", steps=4, freeze_last_layer_epochs=0), log=said.append)
    assert not any("frozen" in m for m in said)


def test_dino_last_layer_frozen_first_epoch(tmp_path):
    """DINO's default (freeze_last_layer 1): the prototypes take no update during the first epoch."""
    from sdmp_fast.synthetic import SyntheticLoader
    from sdmp_fast.trainer import build_recipe

    cfg = tiny_cfg(tmp_path, method="dino", steps=4)
    assert cfg.freeze_last_layer_epochs == 1 and tiny_cfg(tmp_path).freeze_last_layer_epochs == 0
    loader = SyntheticLoader(build_recipe(cfg), 8, device="cpu", length=2)
    tr = Trainer(cfg, loader=loader)
    w0 = tr.model.student.head.last_layer.weight_v.clone()
    it = iter(loader)
    tr.train_step(next(it))
    tr.train_step(next(it))
    assert torch.equal(tr.model.student.head.last_layer.weight_v, w0)  # frozen during epoch 0 (2 steps)
    tr.train_step(next(iter(loader)))
    assert not torch.equal(tr.model.student.head.last_layer.weight_v, w0)


# ------------------------------------------------------------------------------------------- NaN / inf

def test_nan_stops_with_step_and_term_keeping_last_good_checkpoint(tmp_path, monkeypatch):
    from sdmp_fast import checkpoint as ckpt

    monkeypatch.setenv("SDMP_DEBUG_NAN_STEP", "4")  # the 5th step's loss becomes NaN
    cfg = tiny_cfg(tmp_path, steps=10, log_every=3, save_every=3)
    tr = Trainer(cfg)
    with pytest.raises(NonFiniteError, match=r"non-finite loss and grad_norm at step 5 "):
        tr.fit(cfg.out)
    steps = [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoint_dir(cfg.out))]
    assert steps == [3]  # detected at the step-6 sync point, before that step's checkpoint
    assert tr.step == 6
    for v in tr.model.state_dict().values():
        assert torch.isfinite(v.float()).all()  # the flagged update was skipped on the device


def test_nan_skip_policy_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("SDMP_DEBUG_NAN_STEP", "2")
    cfg = tiny_cfg(tmp_path, steps=6, log_every=3, nan_policy="skip")
    tr = Trainer(cfg)
    assert tr.fit(cfg.out) == "done"
    recs = read_metrics(cfg.out)
    assert [r["skipped"] for r in recs] == [1, 0]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in recs)
    for r in recs:  # the skipped step's finite terms are not in the window's means either
        assert r["loss"] == pytest.approx(r["source"] + cfg.mix_weight * (r["mix_source"] + r["mix_mix"]))
    for v in tr.model.state_dict().values():
        assert torch.isfinite(v.float()).all()


def test_nan_step_leaves_model_and_optimizer_unchanged(tmp_path):
    """A flagged step changes nothing: parameters, Adam moments and step count, EMA, DINO center."""
    from sdmp_fast.synthetic import SyntheticLoader
    from sdmp_fast.trainer import build_recipe

    # prototypes not frozen in the first step (DINO's default one-epoch freeze): every parameter has its Adam state
    cfg = tiny_cfg(tmp_path, method="dino", steps=4, freeze_last_layer_epochs=0)
    loader = SyntheticLoader(build_recipe(cfg), 8, device="cpu", length=2)
    tr = Trainer(cfg, loader=loader)
    batch = next(iter(loader))
    tr.train_step(batch)
    model0 = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt0 = {id(p): {k: v.clone() for k, v in s.items()} for p, s in tr.optimizer.state.items()}
    bad = tr.step_inputs(batch, False)
    bad[0] = bad[0].clone()
    bad[0][0, 0, 0, 0] = float("inf")  # an inf pixel makes the loss and the gradient non-finite
    tr._step_body(bad, 1e-3, 0.04, 0.99, 0.04, False)
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, model0[k]), k
    assert {id(p) for p in tr.optimizer.state} == set(opt0)
    for p, s in tr.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt0[id(p)][k]), k
    tr.cfg.nan_policy = "skip"
    assert tr.read_metrics()["skipped"] == 1


# ------------------------------------------------------------------------------------------- export

def test_backbone_export_loads_in_timm_and_load_backbone(tmp_path):
    import timm

    from sdmp_fast.checkpoint import load_backbone

    cfg = tiny_cfg(tmp_path, steps=2)
    tr = Trainer(cfg)
    tr.fit(cfg.out)
    info = json.load(open(os.path.join(cfg.out, "backbone.json")))
    spec = dict(info["backbone_spec"])
    m = timm.create_model(spec.pop("arch"), pretrained=False, num_classes=0, **spec)
    m.load_state_dict(torch.load(os.path.join(cfg.out, "backbone.pt"), weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    tr.model.base.backbone.eval()
    with torch.no_grad():
        ref = tr.model.base.backbone(x)
        assert torch.allclose(m(x), ref)
        for path in (cfg.out, os.path.join(cfg.out, "backbone.pt")):
            bb, meta = load_backbone(path, with_info=True)
            assert meta["img_size"] == 32 and len(meta["mean"]) == 3
            assert torch.allclose(bb(x), ref)
        rnd = load_backbone(cfg.out, random_init=True)
        assert not torch.allclose(rnd(x), ref)


# ------------------------------------------------------------------------------------------- subprocess runs

def _env(tmp_path, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path / "tmpdir"),
               HOME=str(tmp_path / "home"))
    (tmp_path / "tmpdir").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.timeout(180)
def test_sigterm_to_the_process_group_with_loader_workers_still_checkpoints(tmp_path):
    """SLURM's preemption SIGTERM (and a terminal's Ctrl-C) reaches the whole process group, DataLoader workers
    included: the run still stops cleanly with a checkpoint (dead workers used to crash it with "DataLoader
    worker ... killed by signal" before anything was saved)."""
    from sdmp_fast.data import make_synthetic_image_folder

    data = make_synthetic_image_folder(str(tmp_path / "data"), 2, 8)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdmp_fast.cli", "train"] + TINY + [
        "--loader", "torchvision", "--data", data, "--num-workers", "2", "--batch-size", "8", "--steps", "4000",
        "--log-every", "2", "--save-every", "0", "--out", str(out)]
    p = subprocess.Popen(argv, env=_env(tmp_path, SDMP_DEBUG_STEP_SLEEP=0.05), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "stopped by SIGTERM" in text, text[-3000:]
    assert os.listdir(out / "checkpoints")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, sig):
    """SIGHUP (the terminal of a run started without nohup closed) is taken as SIGTERM: it ended the run at once,
    without a checkpoint (every step since the last one lost)."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdmp_fast.cli", "train"] + TINY + [
        "--loader", "synthetic", "--batch-size", "8", "--steps", "400", "--log-every", "5", "--save-every", "0",
        "--out", str(out), "--deterministic"]
    work = tmp_path / "cwd"
    work.mkdir()
    # torch 2.14 makes its inductor cache directory when torchvision is imported (torch._dynamo.package, at
    # import): torch's own side effect, kept out of the check by pointing it elsewhere as a user's env would
    # (earlier tests in the suite set it in os.environ; run alone, this test found $TMPDIR/torchinductor_<user>)
    env = _env(tmp_path, SDMP_DEBUG_STEP_SLEEP=0.05, TORCHINDUCTOR_CACHE_DIR=tmp_path / "inductor")
    p = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(sig)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0, text
    assert "stopped by SIGTERM" in text
    from sdmp_fast.checkpoint import list_checkpoints

    (step, _), = list_checkpoints(str(out / "checkpoints"))
    assert 0 < step < 400
    assert not (out / "backbone.pt").exists()  # not finished: no final export
    # nothing was written outside --out: not in the working directory, TMPDIR or HOME
    assert os.listdir(work) == [] and os.listdir(tmp_path / "tmpdir") == [] and os.listdir(tmp_path / "home") == []
    assert sorted(os.listdir(out)) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl"]


# ------------------------------------------------------------------------------------------- GPU only

@pytest.mark.cuda
def test_staged_pipeline_equals_eager_and_no_steady_state_sync(tmp_path):
    """Host batches staged on a side stream give the same parameters as batches already on the GPU, and
    steady-state steps do not synchronise the host (torch.cuda.set_sync_debug_mode raises on a sync)."""
    from sdmp_fast.synthetic import SyntheticLoader
    from sdmp_fast.trainer import build_recipe

    cfg = tiny_cfg(tmp_path, device="cuda", precision="fp32", steps=6, log_every=6, deterministic=False)
    cpu_loader = SyntheticLoader(build_recipe(cfg), 8, device="cpu", length=6, pool=3)

    class HostLoader:  # yields host batches: the trainer stages them
        def __len__(self):
            return 6

        def set_epoch(self, e):
            pass

        def __iter__(self):
            return iter(cpu_loader)

    class DeviceLoader(HostLoader):
        def __iter__(self):
            return (b.to("cuda") for b in cpu_loader)

    a = Trainer(cfg, loader=HostLoader())
    a.fit(str(tmp_path / "a"))
    assert all(r["max_mem_gb"] > 0 for r in read_metrics(str(tmp_path / "a")))
    b = Trainer(cfg, loader=DeviceLoader())
    b.fit(str(tmp_path / "b"))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), k
    c = Trainer(cfg, loader=DeviceLoader())
    batches = [x.to("cuda") for x in cpu_loader]
    c.train_step(batches[0])
    c.train_step(batches[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches[2:]:
            c.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["mocov3", "dino"])
def test_cuda_graph_matches_eager(tmp_path, method):
    # no stochastic depth: a replay's random masks need not repeat the eager steps' draws
    cfg = tiny_cfg(tmp_path, method=method, device="cuda", precision="fp32", steps=8, log_every=4,
                   deterministic=False, drop_path_rate=0.0, freeze_last_layer_epochs=0)
    a = Trainer(cfg)
    a.fit(str(tmp_path / "a"))
    g = Trainer(TrainConfig(**{**cfg.to_dict(), "cuda_graphs": True}).resolve().validate())
    g.fit(str(tmp_path / "g"))
    assert g._graph is not None
    ma, mg = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "g"))
    for ra, rg in zip(ma, mg):
        assert rg["loss"] == pytest.approx(ra["loss"], rel=1e-3)
    for (k, va), vg in zip(a.model.state_dict().items(), g.model.state_dict().values()):
        assert torch.allclose(va.float(), vg.float(), atol=1e-4, rtol=1e-3), k


@pytest.mark.cuda
def test_cuda_graph_captures_while_another_thread_pins_memory(tmp_path):
    # a GPU loader keeps working in its own threads during the step the trainer captures (DataLoader's
    # pin-memory thread, DALI's executor): their cudaHostAlloc / event calls must neither fail nor wreck the
    # capture (the default "global" capture mode forbids them on every thread)
    import threading
    stop, errors = threading.Event(), []

    def pin_like_a_loader():
        try:
            side, held, i = torch.cuda.Stream(), [], 0
            while not stop.is_set():
                held.append(torch.empty(1 << (12 + i % 12)).pin_memory())  # cudaHostAlloc while sizes grow
                del held[:-8]
                with torch.cuda.stream(side):  # a copy out of pinned memory, then an event query
                    held[-1].to("cuda", non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(side)
                ev.query()
                i += 1
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    cfg = tiny_cfg(tmp_path, method="mocov3", device="cuda", precision="fp32", steps=8, log_every=4,
                   deterministic=False, drop_path_rate=0.0, cuda_graphs=True)
    worker = threading.Thread(target=pin_like_a_loader, daemon=True)
    worker.start()
    try:
        t = Trainer(cfg)
        t.fit(str(tmp_path / "g"))
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors, errors
    assert t._graph is not None
    assert all(math.isfinite(r["loss"]) for r in read_metrics(str(tmp_path / "g")))


@pytest.mark.cuda
def test_cuda_graph_captures_after_the_frozen_prototypes(tmp_path):
    # DINO's prototype layer gets its AdamW state on its first update: that must happen before the capture, or
    # every replay re-runs the state's zero-fills (the layer would never take more than one Adam step)
    cfg = tiny_cfg(tmp_path, method="dino", device="cuda", precision="fp32", steps=8, log_every=4,
                   deterministic=False, tau_t_warmup_steps=0, drop_path_rate=0.0)
    runs = []
    for graphs in (False, True):
        t = Trainer(TrainConfig(**{**cfg.to_dict(), "cuda_graphs": graphs}).resolve().validate())
        t.freeze_last_steps = 3
        t.fit(str(tmp_path / f"g{int(graphs)}"))
        runs.append(t)
    a, g = runs
    assert g._graph is not None
    for t in runs:
        steps = [float(st["step"]) for p, st in t.optimizer.state.items() if st]
        assert max(steps) == 8 and min(steps) == 5, steps  # the prototypes: 8 - 3 frozen steps
    for (k, va), vg in zip(a.model.state_dict().items(), g.model.state_dict().values()):
        assert torch.allclose(va.float(), vg.float(), atol=1e-4, rtol=1e-3), k


@pytest.mark.cuda
def test_cuda_graph_draws_new_stochastic_depth_masks_on_every_replay(tmp_path):
    # DINO's default stochastic depth inside the captured step: the masks come from the CUDA generator, which a
    # graph replay advances (fresh masks each step) instead of repeating the capture's draws
    cfg = tiny_cfg(tmp_path, method="dino", device="cuda", precision="fp32", steps=8, log_every=4,
                   deterministic=False, freeze_last_layer_epochs=0, cuda_graphs=True)
    assert cfg.drop_path_rate == 0.1  # DINO's default
    t = Trainer(cfg)
    t.fit(str(tmp_path / "g"))
    assert t._graph is not None
    assert all(math.isfinite(r["loss"]) for r in read_metrics(str(tmp_path / "g")))
    states = [torch.cuda.get_rng_state()]
    for _ in range(2):
        t._graph.replay()
        torch.cuda.synchronize()
        states.append(torch.cuda.get_rng_state())
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[1], states[2])


@pytest.mark.cuda
def test_cuda_rng_state_is_the_training_devices_only():
    from sdmp_fast import checkpoint as ckpt
    torch.cuda.init()
    state = ckpt.rng_state()
    assert len(state["cuda"]) == 1
    before = torch.rand(4, device="cuda")
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), before)


def test_explicit_gpu_index_refused_with_several_ranks(tmp_path, monkeypatch):
    import dataclasses
    cfg = dataclasses.replace(tiny_cfg(tmp_path), device="cuda:1")  # as if validated on a GPU machine
    with pytest.raises(ValueError, match="device: cuda:1 would put all 2 ranks on one GPU"):
        Trainer(cfg, rank=0, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the settings check says it first
    with pytest.raises(ValueError, match="device: cuda:1 would put all 2 ranks on one GPU"):
        cfg.validate()


def test_more_ranks_on_a_node_than_gpus_is_named(tmp_path, monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU node: rank 1 asked for cuda:1 and died in torch.cuda.set_device
    with "CUDA error: invalid device ordinal" and a traceback; now a settings error naming the device, LOCAL_RANK
    and the GPUs visible, before the card is touched."""
    import dataclasses

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) reached"))
    for device in ("auto", "cuda"):
        cfg = dataclasses.replace(tiny_cfg(tmp_path), device=device)
        with pytest.raises(ValueError, match=r"device: LOCAL_RANK 1 needs cuda:1 but this node shows 1 GPU"):
            Trainer(cfg, rank=1, world_size=2, local_rank=1)
    cfg = dataclasses.replace(tiny_cfg(tmp_path), device="cuda:2")  # one process, a card that is not there
    with pytest.raises(ValueError, match=r"device: cuda:2 but this node shows 1 GPU"):
        Trainer(cfg)


def test_interpolation_setting_reaches_the_recipe(tmp_path):
    import dataclasses

    from sdmp_fast.trainer import build_recipe

    cfg = tiny_cfg(tmp_path)
    assert {v.interpolation for v in build_recipe(cfg).views} == {"bicubic"}  # BYOL / DINO / solo-learn's
    for method in ("mocov3", "dino"):
        c = dataclasses.replace(cfg, method=method, interpolation="bilinear")
        assert {v.interpolation for v in build_recipe(c).views} == {"bilinear"}
    with pytest.raises(ValueError, match="interpolation: must be bicubic or bilinear, got 'area'"):
        dataclasses.replace(cfg, interpolation="area").validate()


# ------------------------------------------------------------------------------------------- learning (Must-show)

FMNIST = ["--loader", "memory", "--data", "fashion-mnist", "--save-every", "0", "--seed", "0"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_sdmp_moco_loss_falls_on_fashion_mnist(tmp_path):
    out = tmp_path / "moco"
    code = cli.main(["train"] + TINY + FMNIST + ["--method", "mocov3", "--batch-size", "32", "--steps", "40",
                                                 "--log-every", "10", "--lr", "2e-3", "--warmup-steps", "5",
                                                 "--out", str(out)])
    assert code == 0
    recs = read_metrics(str(out))
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert recs[-1]["loss"] < 0.97 * recs[0]["loss"], [r["loss"] for r in recs]
    assert recs[-1]["source"] < recs[0]["source"]


# The small-CPU SDMP-DINO setting of docs/training.md: BatchNorm in the head (DINO's use_bn_in_head) so the
# centred teacher starts near uniform instead of on a few prototypes, a constant sharp teacher (0.01), lr 5e-4
# (600 steps of it also lift k-NN 2.5-4.9 points over random init; measured, not tested here: too slow).
DINO_CPU = ["--method", "dino", "--batch-size", "32", "--n-local", "2", "--n-local-mixed", "1",
            "--dino-head-bn", "on", "--tau-t", "0.01", "--tau-t-end", "0.01", "--lr", "5e-4", "--log-every", "10",
            "--drop-path-rate", "0", "--freeze-last-layer-epochs", "0"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_sdmp_dino_loss_falls_on_fashion_mnist(tmp_path):
    out = tmp_path / "dino"
    code = cli.main(["train"] + TINY + FMNIST + DINO_CPU + ["--steps", "300", "--out", str(out)])
    assert code == 0
    recs = read_metrics(str(out))
    loss = [r["loss"] for r in recs]
    n = len(loss) // 5
    assert sum(loss[-n:]) < 0.85 * sum(loss[:n]), loss  # measured 0.68 (seed 0)
    for k in ("dino", "mix_source", "mix_teacher"):
        assert recs[-1][k] < recs[0][k], k
    ln_k = math.log(256)
    # learning, not collapse: teacher sharper than uniform, yet many prototypes in use across the batch
    assert recs[-1]["teacher_entropy"] < 0.6 * ln_k, recs[-1]
    assert recs[-1]["teacher_batch_entropy"] > 2.5, recs[-1]



def kernel_call_counter(monkeypatch) -> dict:
    """Counts the fused-loss kernel calls (a comparison with the reference proves nothing if the trainer quietly
    runs the reference)."""
    from sdmp_fast.kernels import dino_ce, two_hot_ce
    calls = {"dino": 0, "two_hot": 0}
    for mod, name, key in ((dino_ce, "_run", "dino"), (two_hot_ce, "two_hot_ce", "two_hot")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, fn=fn, key=key, **k: calls.__setitem__(key, calls[key] + 1)
                            or fn(*a, **k))
    return calls


def check_kernels_match_reference_in_training(tmp_path, monkeypatch, method, sdmp, device, **kw):
    cfg = tiny_cfg(tmp_path, method=method, sdmp=sdmp, device=device, precision="fp32", steps=2, log_every=1,
                   deterministic=False, **kw)
    ref = Trainer(TrainConfig(**{**cfg.to_dict(), "kernels": "off"}).resolve().validate())
    ref.fit(str(tmp_path / "ref"))
    calls = kernel_call_counter(monkeypatch)
    fused = Trainer(cfg)
    fused.fit(str(tmp_path / "fused"))
    if method == "mocov3" and not sdmp:  # plain MoCo v3 is F.cross_entropy: no fused op, and the log says so
        assert fused.loss_impl.startswith("reference (plain") and calls == {"dino": 0, "two_hot": 0}
    else:
        assert fused.loss_impl == "kernels" and calls["dino" if method == "dino" else "two_hot"] > 0, calls
    # step 1 from equal weights: rounding only; step 2 after one AdamW update, whose normalised steps turn
    # rounding differences of small gradients into larger ones (a few steps later grad norms drift by ~1%)
    recs = list(zip(read_metrics(str(tmp_path / "ref")), read_metrics(str(tmp_path / "fused"))))
    assert len(recs) == 2
    for (a, b), rel in zip(recs, (1e-4, 1e-3)):
        for k in ref.names + ("grad_norm",):
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-5), (b["step"], k)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["mocov3", "dino"])
def test_trainer_runs_the_fused_loss_kernels(tmp_path, monkeypatch, method):
    # The kernels' CPU emulation stands in for the GPU: the trainer's DINO center is [1, K] (DINO's layout),
    # which the kernel once refused, so every SDMP-DINO step silently ran the reference.
    import sdmp_fast.trainer as trainer_mod
    from sdmp_fast import kernels as K
    from sdmp_fast.kernels import _ext, build
    _ext.set_cpu_emulation(build.load_emulated())
    try:
        monkeypatch.setattr(trainer_mod, "loss_functions", lambda cfg, dev: (
            (K.sdmp_moco_terms, K.sdmp_dino_terms_and_center, "kernels") if cfg.kernels == "auto"
            else (trainer_mod.ref_losses.sdmp_moco_terms, trainer_mod._dino_terms_and_center_ref, "reference")))
        check_kernels_match_reference_in_training(tmp_path, monkeypatch, method, True, "cpu", batch_size=4)
    finally:
        _ext.set_cpu_emulation(None)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["mocov3", "dino"])
@pytest.mark.parametrize("sdmp", [True, False])
def test_fused_kernels_match_reference_losses_in_training(tmp_path, monkeypatch, method, sdmp):
    check_kernels_match_reference_in_training(tmp_path, monkeypatch, method, sdmp, "cuda")


def test_loss_impl_says_reference_when_the_kernels_cannot_serve(tmp_path, monkeypatch):
    # a GPU without a working kernel build trains on the references: the log and bench JSON must say so
    import sdmp_fast.kernels as K
    from sdmp_fast import trainer as trainer_mod
    monkeypatch.setattr(K, "available", lambda device=None: False)
    monkeypatch.setattr(K, "build_error", lambda: "RuntimeError: nvcc not found")
    moco, dino_fn, name = trainer_mod.loss_functions(tiny_cfg(tmp_path), torch.device("cuda"))
    assert name == "reference (kernels unavailable: RuntimeError: nvcc not found)"
    assert moco is trainer_mod.ref_losses.sdmp_moco_terms and dino_fn is trainer_mod._dino_terms_and_center_ref
    monkeypatch.setattr(K, "available", lambda device=None: True)
    assert trainer_mod.loss_functions(tiny_cfg(tmp_path), torch.device("cuda"))[2] == "kernels"


def _hold_lock(out, *, grandchild: bool = False) -> int:
    """Fork a process that takes ``out``'s run lock as `sdmp-fast train` does (and, with ``grandchild``, forks a
    child that lives on, as DataLoader workers do), then sleeps; returns its pid once the lock is held."""
    from sdmp_fast.train_cli import _lock_out

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            fh = _lock_out(str(out))  # noqa: F841 - held until this process ends
            if grandchild and os.fork() == 0:
                time.sleep(10)
                os._exit(0)
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)  # so that a child which failed before writing gives EOF instead of a hang
    got = os.read(ready_r, 1)
    os.close(ready_r)
    assert got == b"x", "the lock-holding child failed before taking the lock"
    return pid


def test_a_second_process_cannot_write_a_run_being_written(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    pid = _hold_lock(out)  # as a running `sdmp-fast train` holds it
    try:
        code, err = run_cli(TINY + ["--loader", "synthetic", "--steps", "2", "--out", str(out), "--resume"], capsys)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert code == 2 and "is being written by another sdmp-fast train process" in err
    assert (out / "config.yaml").read_text() == "{}\n"


def test_the_run_lock_dies_with_the_run_not_with_its_forked_workers(tmp_path):
    """kill -9 of a run whose forked children (DataLoader workers) outlive it for a while: the lock is free at
    once, so a resume started right away is not refused (with flock the workers kept it held)."""
    from sdmp_fast.train_cli import _lock_out

    out = tmp_path / "run"
    out.mkdir()
    pid = _hold_lock(out, grandchild=True)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    _lock_out(str(out)).close()  # the grandchild still sleeps; the lock went with its holder


def test_a_file_system_without_locks_is_named_not_taken_for_a_running_run(tmp_path, monkeypatch):
    import errno
    import fcntl

    from sdmp_fast.train_cli import _lock_out

    def no_locks(fh, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(ValueError, match="takes no POSIX locks") as err:
        _lock_out(str(tmp_path))
    assert "another sdmp-fast train process" not in str(err.value)


def test_a_resume_with_other_settings_keeps_the_earlier_config(tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    base = TINY + ["--loader", "synthetic", "--steps", "2", "--out", str(out)]
    assert run_cli(base + ["--lr", "0.001"], capsys)[0] == 0
    assert run_cli(base + ["--lr", "0.002", "--resume"], capsys)[0] == 0
    assert run_cli(base + ["--lr", "0.002", "--resume"], capsys)[0] == 0  # same settings: nothing new kept
    assert yaml.safe_load((out / "config.1.yaml").read_text())["lr"] == 0.001
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.002
    assert not (out / "config.2.yaml").exists()


def _files(out):
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_resume_of_a_finished_run_without_its_checkpoints_changes_nothing(tmp_path, capsys):
    """--resume with checkpoints/ deleted started afresh at step 0: metrics.jsonl truncated, backbone.pt
    overwritten. Refused (exit 2) before anything is written, naming --out and what it holds."""
    import shutil

    out = tmp_path / "run"
    args = TINY + ["--loader", "synthetic", "--steps", "2", "--log-every", "2", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    shutil.rmtree(out / "checkpoints")
    before = _files(out)
    code, err = run_cli(args + ["--resume"], capsys)
    assert code == 2 and "error: out:" in err and str(out) in err, err
    assert "backbone.pt" in err and "metrics.jsonl up to step 2" in err and "no checkpoint" in err
    assert _files(out) == before
    (out / "backbone.pt").unlink()  # metrics alone are a run's output too
    (out / "backbone.json").unlink()
    before = _files(out)
    code, err = run_cli(args + ["--resume"], capsys)
    assert code == 2 and "metrics.jsonl up to step 2" in err and "backbone.pt" not in err, err
    assert _files(out) == before


def test_resume_with_fewer_steps_than_the_checkpoint_is_named(tmp_path, capsys):
    """--resume --steps 2 on a run at step 4 said "done: 4 steps" and re-exported the backbone."""
    out = tmp_path / "run"
    base = TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8", "--log-every", "2",
                   "--out", str(out)]  # synthetic data: as many images as the steps need (steps/epoch would differ)
    assert run_cli(base + ["--steps", "4"], capsys)[0] == 0
    before = _files(out)
    code, err = run_cli(base + ["--steps", "2", "--resume"], capsys)
    assert code == 2 and "error: steps: 2 steps is below" in err and "(step 4)" in err, err
    assert _files(out) == before
    code, err = run_cli(base + ["--steps", "4", "--resume"], capsys)  # equal: nothing to train, still fine
    assert code == 0, err
    assert [r["step"] for r in read_metrics(str(out))] == [2, 4]


def test_a_first_resume_with_the_same_settings_keeps_no_earlier_config(tmp_path, capsys):
    """resume: false -> true (and out spelt with a trailing slash) is no change of settings: no config.1.yaml."""
    out = tmp_path / "run"
    base = TINY + ["--loader", "synthetic", "--steps", "2", "--log-every", "2"]
    assert run_cli(base + ["--out", str(out)], capsys)[0] == 0
    text = (out / "config.yaml").read_text()
    assert run_cli(base + ["--out", str(out), "--resume"], capsys)[0] == 0
    assert run_cli(base + ["--out", str(out) + "/", "--resume"], capsys)[0] == 0
    assert sorted(p.name for p in out.glob("config*.yaml")) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == text
    assert run_cli(base + ["--out", str(out), "--resume", "--lr", "0.002"], capsys)[0] == 0  # a real change
    assert (out / "config.1.yaml").read_text() == text


def test_compile_caches_go_under_out_although_timm_set_torchs_default(tmp_path, capsys, monkeypatch):
    """`import timm` (in cfg.validate) runs torch's cache_dir(), which writes /tmp/torchinductor_<user> into
    TORCHINDUCTOR_CACHE_DIR: a setdefault after it kept the caches outside --out. A value the user set stays."""
    import sdmp_fast.trainer as trainer_mod
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    seen = {}

    class Stop(ValueError):
        pass

    def fake_trainer(cfg, **kw):  # what a compile would use, read where the model would be built
        seen.update(inductor=os.environ.get("TORCHINDUCTOR_CACHE_DIR"), triton=os.environ.get("TRITON_CACHE_DIR"))
        seen["cache_dir"] = cache_dir()
        raise Stop("stopped before training")

    monkeypatch.setattr(trainer_mod, "Trainer", fake_trainer)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what import timm leaves behind
    out = tmp_path / "run"
    argv = TINY + ["--loader", "synthetic", "--steps", "2", "--compile", "--device", "cpu", "--out", str(out)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "stopped before training" in err, err
    cache = os.path.join(str(out), ".cache")
    assert seen["inductor"] == seen["cache_dir"] == os.path.join(cache, "inductor")
    assert seen["triton"] == os.path.join(cache, "triton")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()  # restored after the run
    assert "TRITON_CACHE_DIR" not in os.environ
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    code, err = run_cli(argv, capsys)
    assert code == 2 and seen["inductor"] == seen["cache_dir"] == mine


def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(tmp_path, capsys):
    """A run killed before its first checkpoint (metrics up to step 4 < save_every, a torn checkpoint .tmp) was
    refused both without --resume ("pass --resume") and with it ("restore the checkpoints"): stuck. --resume
    starts it again from step 0; a run that had checkpointed (backbone.pt there) is still refused."""
    import shutil

    import yaml

    out = tmp_path / "run"
    args = TINY + ["--loader", "synthetic", "--steps", "2", "--log-every", "1", "--save-every", "10",
                   "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    for name in os.listdir(out / "checkpoints"):
        os.unlink(out / "checkpoints" / name)
    (out / "checkpoints" / "ckpt-000000010.pt.tmp").write_bytes(b"torn")
    (out / "backbone.pt").unlink()
    (out / "backbone.json").unlink()
    config["steps"] = 500  # the killed run was to go on to 500 steps; it recorded 1, 2 and 4
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (1, 2, 4)))
    code, err = run_cli(args, capsys)  # without --resume: refused, saying what --resume will do
    assert code == 2 and "before its first checkpoint" in err and "metrics.jsonl up to step 4" in err, err
    code, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]  # the run's own records, the old ones replaced
    assert (out / "backbone.pt").exists()
    # the abandoned run's config is replaced, as its metrics: kept as config.1.yaml it said "a resume with a
    # checkpoint happened here", and this restart killed before its own first checkpoint was then stuck
    assert not (out / "config.1.yaml").exists() and yaml.safe_load((out / "config.yaml").read_text())["steps"] == 2
    shutil.rmtree(out / "checkpoints")
    (out / "backbone.pt").unlink()
    (out / "backbone.json").unlink()
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (1, 2, 4)))
    config["steps"] = 400  # killed again, before its first checkpoint; then restarted with other settings
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    code, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    for name in os.listdir(out / "checkpoints"):
        os.unlink(out / "checkpoints" / name)
    before = _files(out)
    code, err = run_cli(args + ["--resume"], capsys)  # checkpoints lost after a finished run: refused
    assert code == 2 and "no checkpoint" in err and "backbone.pt" in err, err
    assert _files(out) == before


def test_a_run_whose_first_checkpoint_write_failed_starts_again_on_resume(tmp_path, capsys, monkeypatch):
    """The save step's metrics record was written before its checkpoint: a first save that failed (disk full, a
    kill during it) left metrics at save_every and no checkpoint, which --resume took for lost checkpoints."""
    from sdmp_fast import checkpoint as ckpt

    out = tmp_path / "run"
    args = TINY + ["--loader", "synthetic", "--steps", "4", "--save-every", "2", "--log-every", "2",
                   "--out", str(out)]

    def full(*a, **k):
        raise ckpt.CheckpointError("checkpoint: could not write (disk full)")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_checkpoint", full)
        assert run_cli(args, capsys)[0] == 1
    assert [r["step"] for r in read_metrics(str(out))] == []  # the failed save step left no record
    code, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(str(out))] == [2, 4]


def test_resume_after_a_changed_save_every_still_refuses_when_checkpoints_were_lost(tmp_path, capsys):
    """config.yaml holds the last resume's save_every; an earlier config.<k>.yaml proves a resume, and so a
    checkpoint, happened: --resume without checkpoints must not restart over the run's metrics."""
    import shutil

    import yaml

    out = tmp_path / "run"
    base = TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8", "--log-every", "1",
                   "--out", str(out)]  # synthetic data would have as many steps per epoch as --steps
    assert run_cli(base + ["--steps", "2", "--save-every", "1"], capsys)[0] == 0
    assert run_cli(base + ["--steps", "3", "--save-every", "1000", "--resume"], capsys)[0] == 0
    assert (out / "config.1.yaml").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["steps"] = 500  # that resume was to go on to 500 steps and was killed at step 3
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(out / "checkpoints")
    (out / "backbone.pt").unlink()
    (out / "backbone.json").unlink()
    before = _files(out)
    code, err = run_cli(base + ["--steps", "500", "--save-every", "1000", "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err, err
    assert _files(out) == before


def test_ranks_whose_loader_options_differ_only_by_a_spelt_out_default_agree(monkeypatch):
    """One node's config spelling out a backend default (photometric: dali) is the same run (as the resume rule
    has it); another value is not."""
    import torch.distributed as dist

    from sdmp_fast.config import TrainConfig
    from sdmp_fast.train_cli import _check_same_settings

    def ranks(rank0, rank1):
        seen = []
        monkeypatch.setattr(dist, "all_gather_object", lambda found, mine: seen.append(mine) or found.__setitem__(
            slice(None), seen + [mine] * (len(found) - len(seen))))
        _check_same_settings(rank0, 1)  # rank 0's gathered settings
        _check_same_settings(rank1, 2)

    plain = TrainConfig(loader="dali", loader_options={})
    ranks(plain, TrainConfig(loader="dali", loader_options={"photometric": "dali", "mix_in_graph": False}))
    with pytest.raises(ValueError, match="loader_options: the ranks run with different settings"):
        ranks(plain, TrainConfig(loader="dali", loader_options={"photometric": "torch"}))


def test_a_loaders_own_data_identity_may_be_none(tmp_path):
    """A loader of one's own whose data_identity() cannot tell (None, as Trainer._data_identity returns for such
    data) was a TypeError ('NoneType' object is not iterable) at the first checkpoint, after training."""
    from sdmp_fast.synthetic import SyntheticLoader
    from sdmp_fast.trainer import build_recipe

    class Unknown(SyntheticLoader):
        def data_identity(self):
            return None

    cfg = tiny_cfg(tmp_path, steps=1)
    assert Trainer(cfg, loader=Unknown(build_recipe(cfg), 8, device="cpu", length=2)).state_dict()["data"] is None

    class Known(SyntheticLoader):
        def data_identity(self):
            return {"files": 16, "sha1": "ab" * 20}

    tr = Trainer(cfg, loader=Known(build_recipe(cfg), 8, device="cpu", length=2))
    assert tr.state_dict()["data"] == {"files": 16, "sha1": "ab" * 20}


def _tree(root):
    """{relative path: bytes} of every file under ``root``."""
    got = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                got[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return got


def test_a_run_that_another_run_wrote_during_the_build_is_left_alone(tmp_path, capsys, monkeypatch):
    """--out is checked before the (maybe minutes-long) build and locked after it: a second run started on the same
    fresh --out, that trained and let go of the lock meanwhile, was overwritten (metrics truncated, checkpoints
    mixed, backbone replaced). Now --out is checked again under the lock and nothing is written."""
    import shutil

    import sdmp_fast.trainer as trainer_mod
    from sdmp_fast import train_cli

    base = TINY + ["--loader", "synthetic", "--batch-size", "4", "--log-every", "1"]
    finished = tmp_path / "a"
    assert run_cli(base + ["--steps", "2", "--out", str(finished)], capsys)[0] == 0
    before = _tree(finished)
    out = tmp_path / "b"
    real_init = trainer_mod.Trainer.__init__

    def build_while_the_other_run_finishes(self, cfg, *a, **k):
        real_init(self, cfg, *a, **k)
        if not os.path.exists(cfg.out):
            shutil.copytree(finished, cfg.out)  # the other run, started on the same --out, is done

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", build_while_the_other_run_finishes)
    code, err = run_cli(base + ["--steps", "1", "--seed", "1", "--out", str(out)], capsys)
    assert code == 2 and "already holds a run" in err and "while this one was being set up" in err, err
    assert _tree(out) == before
    monkeypatch.setattr(trainer_mod.Trainer, "__init__", real_init)

    real_lock = train_cli._lock_out

    def lock_after_another_checkpoint(path):  # a resume that found ckpt 2: the other run saved step 3 meanwhile
        shutil.copy(os.path.join(path, "checkpoints", "ckpt-000000002.pt"),
                    os.path.join(path, "checkpoints", "ckpt-000000003.pt"))
        return real_lock(path)

    monkeypatch.setattr(train_cli, "_lock_out", lock_after_another_checkpoint)
    code, err = run_cli(base + ["--steps", "4", "--out", str(finished), "--resume"], capsys)
    assert code == 2 and "another run wrote checkpoints" in err and "ckpt-000000003.pt" in err, err
    after = _tree(finished)
    assert after.pop(os.path.join("checkpoints", "ckpt-000000003.pt")) and after == before


def test_a_synthetic_run_resumes_with_more_steps(tmp_path, capsys):
    """The synthetic loader's epoch was --steps batches long, so a resume with more steps was refused as a change
    of data ("steps per epoch now 3, 2 in the checkpoint")."""
    out = tmp_path / "run"
    base = TINY + ["--loader", "synthetic", "--batch-size", "4", "--log-every", "1", "--out", str(out)]
    assert run_cli(base + ["--steps", "2"], capsys)[0] == 0
    code, err = run_cli(base + ["--steps", "3", "--resume"], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]


def test_resume_over_a_signal_stopped_run_whose_checkpoints_were_lost_is_refused(tmp_path, capsys):
    """A signal's checkpoint falls on no save_every step (nor the last): once checkpoints/ was lost, --resume took
    the run for one stopped before its first checkpoint and started afresh over its metrics. The record written
    after each checkpoint now says so."""
    import shutil

    import yaml

    out = tmp_path / "run"
    base = TINY + ["--loader", "synthetic", "--batch-size", "4", "--log-every", "1", "--save-every", "0",
                   "--out", str(out)]
    assert run_cli(base + ["--steps", "2"], capsys)[0] == 0
    records = read_metrics(str(out))
    assert [r.get("checkpoint") for r in records] == [None, True]
    # as a run of 10 steps stopped by SIGTERM at step 2 leaves it: no backbone, a checkpoint, then it is lost
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump(dict(cfg, steps=10), sort_keys=False))
    for name in ("backbone.pt", "backbone.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints")
    before = _files(out)
    code, err = run_cli(base + ["--steps", "10", "--resume"], capsys)
    assert code == 2 and "but no checkpoint" in err, err
    assert _files(out) == before


# ------------------------------------------------------------------------ recipe fidelity (audit 2026-11-30)

def test_moco_predictor_ends_in_an_affine_free_batchnorm_as_moco_v3_vit(tmp_path):
    """MoCo v3's ViT model builds its predictor with _build_mlp(2, dim, mlp_dim, dim) (last_bn=True); only its
    ResNet one passes False, which is what this predictor copied."""
    pred = Trainer(tiny_cfg(tmp_path)).model.base.predictor
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not pred[-1].affine and pred[-1].num_features == pred[-2].out_features
    old = Trainer(tiny_cfg(tmp_path, moco_predictor_bn=False)).model.base.predictor
    assert [type(m).__name__ for m in old] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    # a checkpoint from before the setting existed was trained without it: resuming it names the setting
    from sdmp_fast.config import mismatches

    saved = tiny_cfg(tmp_path).to_dict()
    del saved["moco_predictor_bn"]
    assert mismatches(saved, tiny_cfg(tmp_path)) == ["moco_predictor_bn (checkpoint False, now True)"]
    assert mismatches(saved, tiny_cfg(tmp_path, moco_predictor_bn=False)) == []


@pytest.mark.parametrize("method", ["mocov3", "dino"])
def test_the_ema_update_uses_the_reference_s_momentum(method, tmp_path):
    """MoCo v3 updates its momentum encoder at the start of iteration s + 1 (in its forward, before the keys) with
    m(s + 1), blending in the base weights of after step s; the trainer updates right after step s, so it must
    use m(s + 1) (it used m(s): a (1 - m) up to 10% too large). DINO updates after the step with m(s)."""
    tr = Trainer(tiny_cfg(tmp_path, method=method, steps=4, momentum=0.9, freeze_last_layer_epochs=0))
    online = tr.model.base if method == "mocov3" else tr.model.student
    target = tr.model.momentum if method == "mocov3" else tr.model.teacher
    it = iter(tr.loader)
    for step in range(2):
        before = {n: p.detach().clone() for n, p in target.named_parameters()}
        tr.train_step(next(it))
        keep = tr.schedules.ema_keep(step + 1 if method == "mocov3" else step)
        assert keep != tr.schedules.ema_keep(step + 1 if method == "dino" else step)  # the test can tell them apart
        params = dict(online.named_parameters())
        for n, p in target.named_parameters():
            torch.testing.assert_close(p, keep * before[n] + (1 - keep) * params[n], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{n}: {m}")


def test_dino_prototypes_start_as_dinos_nn_linear_init():
    """DINO builds its weight-normed last layer after the head's trunc_normal(0.02) init, so v keeps nn.Linear's
    default init; with trunc_normal(0.02) its rows were 1.8x shorter and Adam turned the prototypes 1.8x faster."""
    from sdmp_fast.models import WeightNormLinear

    torch.manual_seed(0)
    v = WeightNormLinear(256, 512).weight_v
    torch.manual_seed(0)
    torch.testing.assert_close(v, torch.nn.Linear(256, 512, bias=False).weight, rtol=0, atol=0)
    assert v.norm(dim=1).mean().item() == pytest.approx(3 ** -0.5, rel=0.02)  # U(+-1/16) rows of 256: sqrt(1/3)


def test_a_dino_run_from_before_the_predictor_setting_resumes_as_it_is(tmp_path):
    """moco_predictor_bn (MoCo v3 only) counted False for every checkpoint without it: a DINO run from before it
    existed was refused ("moco_predictor_bn (checkpoint False, now True)"), torchrun's restarts included."""
    from sdmp_fast.config import mismatches

    saved = tiny_cfg(tmp_path, method="dino").to_dict()
    del saved["moco_predictor_bn"]
    assert mismatches(saved, tiny_cfg(tmp_path, method="dino")) == []


@pytest.mark.timeout(300)
def test_files_skipped_in_the_runs_last_epoch_are_reported(tmp_path):
    """The loaders warn of skipped files at the end of an epoch, which a run that stops inside one (or at its
    last batch, before the loader's next call) never reached: a run's bad files went unmentioned."""
    import warnings

    from sdmp_fast.data import make_synthetic_image_folder

    data = str(tmp_path / "data")
    make_synthetic_image_folder(data, num_classes=2, per_class=6, size=(36, 36))
    for k in range(4):
        open(os.path.join(data, f"class{k % 2}", f"bad{k}.jpg"), "wb").close()  # 16 files, 2 batches of 8
    for steps, said in ((2, "epoch 0: skipped 4 undecodable file(s)"), (1, "epoch 0 (unfinished): skipped")):
        tr = Trainer(tiny_cfg(tmp_path, loader="torchvision", data=data, num_workers=0, steps=steps,
                              out=str(tmp_path / f"run{steps}")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.fit(str(tmp_path / f"run{steps}"))
        told = [str(w.message) for w in caught if "undecodable" in str(w.message)]
        assert len(told) == 1 and said in told[0], told
        assert all(os.path.basename(p) in told[0] for p in tr.loader.log.paths)


def test_a_closed_console_ends_the_printing_not_the_run(tmp_path):
    """A closed terminal (EIO) or pipe (`train ... | head`, EPIPE) made the run's next console line raise: it died
    before its checkpoint message, its metrics record and its backbone export."""
    import errno
    import json

    from sdmp_fast.runlog import RunLogger

    printed = []

    def console(msg):
        if printed:
            raise OSError(errno.EPIPE, "Broken pipe")
        printed.append(msg)

    logger = RunLogger(str(tmp_path), 10, progress=False, tensorboard=False, log=console)
    logger.write("starting")
    logger.write("checkpoint: ...")  # the pipe is gone from here on
    logger.record({"step": 1, "loss": 1.5})
    logger.write("done")
    logger.close()
    assert printed == ["starting"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]

    def disk_error(msg):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "b").mkdir()
    with pytest.raises(OSError, match="No space"):  # anything else is still an error
        RunLogger(str(tmp_path / "b"), 10, progress=False, tensorboard=False, log=disk_error).write("x")
