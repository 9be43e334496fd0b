"""The GPU session's scripts, smoke-tested on the CPU: a GPU session is rare and short, so a script that breaks
there wastes it. bench/gpu_dali.py runs its configurations (the anchors' baselines included) in DALI's CPU mode
and bench/session_table.py prints their ratios."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench_scripts(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    for name in ("gpu_dali", "session_table"):
        sys.modules.pop(name, None)
    import gpu_dali
    import session_table
    return gpu_dali, session_table


@pytest.mark.timeout(300)
def test_gpu_dali_runs_baselines_beside_the_loader_and_the_table_prints_ratios(bench_scripts, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from sdmp_fast.benchmarks.make_data import make_data

    gpu_dali, session_table = bench_scripts
    data = make_data(str(tmp_path / "photos"), num_images=16, classes=2, seed=0)
    out = tmp_path / "out"
    rc = gpu_dali.main(["--device", "cpu", "--data", data, "--batch-size", "4", "--dino-batch-size", "4",
                        "--warmup", "1", "--batches", "2", "--threads", "1", "--out", str(out),
                        "--configs", "decode-only,feed-only,byol2-sololearn,byol2-mix,byol2-nomix-bilinear"])
    assert rc == 0
    recs = {r["config"]: r for r in json.loads((out / "gpu_dali.json").read_text())["records"]}
    assert "CUDA" in recs["decode-only"]["error"]  # nvJPEG: GPU only
    # the loader's host side alone, with 1 and 4 read threads (its rate against decoding is the bench's to
    # print: timing is not asserted in a unit test)
    assert [recs[f"feed-only-t{t}"]["read_threads"] for t in (1, 4)] == [1, 4]
    assert all(recs[f"feed-only-t{t}"]["img_per_s"] > 0 for t in (1, 4))
    assert recs["byol2-sololearn"]["baseline"] and recs["byol2-sololearn"]["img_per_s"] > 0
    # each row names the dtype it emitted: the baseline's float16 beside the loader's bfloat16 (default --dtype)
    assert recs["byol2-sololearn"]["dtype"] == "float16" and recs["byol2-mix"]["dtype"] == "bfloat16"
    assert recs["byol2-mix"]["img_per_s"] > 0 and recs["byol2-mix"]["interpolation"] == "bicubic"
    assert recs["byol2-mix"]["cpu_cores"] > 0 and recs["byol2-sololearn"]["cpu_cores"] > 0  # CPU the loader took
    assert recs["byol2-nomix-bilinear"]["img_per_s"] > 0 and recs["byol2-nomix-bilinear"]["interpolation"] == "bilinear"
    capsys.readouterr()
    assert session_table.main(str(out)) == 0
    table = capsys.readouterr().out
    ratio = recs["byol2-mix"]["img_per_s"] / recs["byol2-sololearn"]["img_per_s"]
    assert f"{ratio:5.2f}x" in table and "decode-only" in table and "FAILED" in table


def test_gpu_dali_rejects_an_unknown_configuration(bench_scripts, capsys, tmp_path):
    gpu_dali, _ = bench_scripts
    assert gpu_dali.main(["--device", "cpu", "--configs", "byol2-fast,byol2-mix-nearest"]) == 2
    assert "unknown configs ['byol2-fast', 'byol2-mix-nearest']" in capsys.readouterr().err
    # an unknown recipe: was a ValueError traceback when its turn came, after the configurations before it
    assert gpu_dali.main(["--device", "cpu", "--data", str(tmp_path), "--configs", "byol2-mix,simclr-mix"]) == 2
    assert "unknown configs ['simclr-mix']" in capsys.readouterr().err


def test_session_table_keeps_the_loader_apart_from_the_batch_size(bench_scripts, tmp_path, capsys):
    """The e2e rows' loader column was 10 wide: "torchvision" (the smoke test's loader without DALI) ran into
    "B=16"."""
    _, session_table = bench_scripts
    recs = [{"run": "e2e", "mode": "eager", "loader": "torchvision", "batch_size": 16, "img_per_s": 647.0,
             "ratio_to_synthetic_same_mode": 0.84},
            {"run": "synthetic", "mode": "eager", "loader": "synthetic", "batch_size": 16, "img_per_s": 770.0,
             "ratio_to_synthetic_same_mode": None}]
    (tmp_path / "e2e_vit_s.json").write_text(json.dumps({"records": recs}))
    assert session_table.main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "torchvision B=16" in out and "ratio 0.84" in out and ">= 3,400: MISS" in out
    assert "synthetic   B=16        770" in out  # no ratio: the row still prints


def test_session_table_sets_each_loader_row_against_the_baseline_of_its_own_crop_filter(bench_scripts, tmp_path,
                                                                                        capsys):
    """byol2-mix-bilinear was divided by the bicubic byol2-sololearn row: a ratio across two resize filters."""
    _, session_table = bench_scripts
    recs = [{"config": "byol2-sololearn", "recipe": "byol2", "interpolation": "bicubic", "baseline": True,
             "batch_size": 256, "img_per_s": 1000.0},
            {"config": "byol2-mix", "recipe": "byol2", "interpolation": "bicubic", "mixing": True,
             "batch_size": 256, "img_per_s": 1500.0},
            {"config": "byol2-mix-bilinear", "recipe": "byol2", "interpolation": "bilinear", "mixing": True,
             "batch_size": 256, "img_per_s": 1700.0},
            {"config": "decode-only", "recipe": None, "interpolation": None, "baseline": True, "batch_size": 256,
             "img_per_s": 5000.0},
            {"config": "mix-only-byol2", "batch_size": 256, "img_per_s": 9000.0}]
    (tmp_path / "gpu_dali.json").write_text(json.dumps({"records": recs}))
    assert session_table.main(str(tmp_path)) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    assert " 1.50x" in lines["byol2-mix"]
    assert "x " not in lines["byol2-mix-bilinear"].split("B=256")[1].split(">=")[0]  # no bicubic baseline: no ratio
    assert "x" not in lines["mix-only-byol2"].split("B=256")[1]


def test_a_bare_machine_imports_the_package_from_the_repository_root(tmp_path):
    """Without `pip install -e .` (a GPU machine where it cannot build): bench/steps.sh's shim was shadowed by the
    repository's own sdmp_fast/ (first on sys.path for `python -c` / `-m` run from the root), so gpu_session.sh
    stopped at "FATAL: sdmp_fast does not import"; bench/gpu_dali.py mapped sdmp_fast.pipelines but not the
    sdmp_fast.kernels that pipelines.base imports."""
    import subprocess

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # hide the editable install: the package is not installed
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable, BUDGET_S="60", PYTHONPATH=str(site))
    env.pop("PYTHONSAFEPATH", None)
    check = "import sdmp_fast.pipelines, sdmp_fast.kernels, sdmp_fast.cli"

    def bash(script):
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    r = bash(f'"{sys.executable}" -c "{check}"')
    assert r.returncode != 0 and "sdmp_fast.pipelines" in r.stderr  # the set-up really hides the install
    r = bash(f'. bench/steps.sh && use_shim "{tmp_path}/shim" > /dev/null && "{sys.executable}" -c "{check}" '
             f'&& "{sys.executable}" -m sdmp_fast.cli bench --help > /dev/null')
    assert r.returncode == 0, r.stderr
    r = bash(f'"{sys.executable}" -c "import sys; sys.path.insert(0, \'bench\'); import gpu_dali; {check}"')
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["gpu_session.sh", "gpu_kernels.sh", "steps.sh"])
def test_the_session_scripts_parse(script):
    """A syntax error found on the GPU machine costs the session (the full CPU smoke test of gpu_session.sh:
    bench/README.md)."""
    import subprocess

    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
