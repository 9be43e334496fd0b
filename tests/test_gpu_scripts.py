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
    # the loader's host side alone, with 1 and 4 read threads: far above what DALI's CPU mode decodes
    assert [recs[f"feed-only-t{t}"]["read_threads"] for t in (1, 4)] == [1, 4]
    assert min(recs[f"feed-only-t{t}"]["img_per_s"] for t in (1, 4)) > 5 * recs["byol2-mix"]["img_per_s"]
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


def test_gpu_dali_rejects_an_unknown_configuration(bench_scripts, capsys):
    gpu_dali, _ = bench_scripts
    assert gpu_dali.main(["--device", "cpu", "--configs", "byol2-fast,byol2-mix-nearest"]) == 2
    assert "unknown configs ['byol2-fast', 'byol2-mix-nearest']" in capsys.readouterr().err
