"""The core imports without the heavy optional backends (DALI, FFCV, numba)."""
import subprocess
import sys

import pytest

BLOCK = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ffcv', 'numba') or name.startswith('nvidia.dali'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
import sdmp_fast, sdmp_fast.pipelines, sdmp_fast.kernels, sdmp_fast.cli
from sdmp_fast.mixing import sdmp_mix
from sdmp_fast.losses import sdmp_moco_terms, mix_coefficient
from sdmp_fast.pipelines import make_loader, adapters
try:
    make_loader('dali', '/nonexistent', 'byol2', 8)
except ImportError as e:
    print('dali import error:', e)
except ValueError as e:
    print('value error:', e)
print('core ok')
"""


def test_core_imports_without_dali_and_ffcv():
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "core ok" in out.stdout


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "sdmp_fast.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "eval", "plot", "convert", "show", "make-data", "bench", "drill"):
        assert cmd in out.stdout


def test_train_help_shows_on_off_defaults_as_on_off():
    """--sdmp {on,off} and the other on/off options printed their default as Python's True / False."""
    import argparse

    from sdmp_fast.config import add_config_arguments

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    text = " ".join(p.format_help().split())
    for flag in ("--sdmp", "--freeze-patch-embed", "--dino-head-bn", "--progress", "--tensorboard"):
        h = next(a.help for a in p._actions if flag in a.option_strings)
        assert h.endswith("(default: on)") or h.endswith("(default: off)"), (flag, h)
    assert "minus mixing) (default: on)" in text
    assert "use_bn_in_head; SyncBN across GPUs) (default: off)" in text


def test_kernels_module_help_descriptions_are_whole_sentences():
    """python -m sdmp_fast.kernels.build / selfcheck / sdmp_fast.demo / fault_drill --help cut their description at
    the first line break, mid-sentence."""
    for mod, tail in (("sdmp_fast.kernels.build", "a compile check, and a CPU emulation."),
                      ("sdmp_fast.kernels.selfcheck", "Exit status 1 on any mismatch."),
                      ("sdmp_fast.demo", "for the same backbone at its random initialisation."),
                      ("sdmp_fast.fault_drill", "(CPU, deterministic settings).")):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert tail in " ".join(out.stdout.split()), out.stdout


def test_cli_names_the_extra_of_a_missing_optional_package(tmp_path, monkeypatch, capsys):
    """A command whose optional package is not installed (core `pip install -e .`) ends with one line naming it and
    the pip extra, exit 2, instead of a ModuleNotFoundError traceback; `train` before anything is written."""
    from sdmp_fast import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError, as where it is missing
        assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdmp-fast plot: error: ") and "matplotlib" in err and "pip install 'sdmp-fast[bench]'" in err
    assert len(err.strip().splitlines()) == 1, err
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "nvidia.dali", None)
        assert cli.main(["train", "--loader", "dali", "--data", str(tmp_path), "--arch", "vit_tiny_patch16_224",
                         "--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "32",
                         "--num-heads", "2", "--proj-hidden-dim", "32", "--proj-dim", "16", "--batch-size", "4",
                         "--steps", "2", "--device", "cpu", "--progress", "off", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the dali loader needs nvidia.dali, which is not installed here: pip install 'sdmp-fast[dali]'" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_missing_core_package_keeps_its_traceback(monkeypatch):
    """Only the optional extras' packages get the one-line message; anything else is a broken install."""
    from sdmp_fast import cli

    def broken(args):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr("sdmp_fast.plot.main", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["plot", "x"])
