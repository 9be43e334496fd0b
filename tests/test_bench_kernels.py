"""`sdmp-fast bench losses` / `bench mixing` on CPU: every row present in the shared JSON (kernel and graph rows
"unavailable" without CUDA, never silently dropped), ratios against the right baseline, launch-variant syntax."""
import json

import pytest

from sdmp_fast import cli
from sdmp_fast.benchmarks.losses import dino_variant_env


def _records(path):
    return json.loads(path.read_text())["records"]


def test_dino_variant_syntax():
    assert dino_variant_env("fused+g8+kb1024") == (
        {"SDMP_DINO_FUSED": "1", "SDMP_DINO_GROUP_PAIRS": "8", "SDMP_DINO_BLOCK_COLS": "1024"}, "fused+g8+kb1024")
    assert dino_variant_env("2") == ({"SDMP_DINO_GROUP_PAIRS": "2", "SDMP_DINO_FUSED": "1"}, "gp2")  # groups: fused
    assert dino_variant_env("unfused+pw5")[0] == {"SDMP_DINO_FUSED": "0", "SDMP_DINO_PAIR_WARPS": "5"}
    assert dino_variant_env("cluster") == ({"SDMP_DINO_CLUSTER": "require"}, "cluster")
    assert dino_variant_env("cluster+tfold+cpipe") == (
        {"SDMP_DINO_CLUSTER": "require", "SDMP_DINO_CLUSTER_TEACHER": "1", "SDMP_DINO_CLUSTER_PIPELINE": "1"},
        "cluster+tfold+cpipe")
    assert dino_variant_env("ch16+kb1024")[0] == {"SDMP_DINO_CHUNK_PAIRS": "16", "SDMP_DINO_BLOCK_COLS": "1024"}
    with pytest.raises(ValueError, match="--dino-variants.*'kbx'"):
        dino_variant_env("fused+kbx")


def test_peak_memory_is_measured_on_cuda_only():
    import torch

    from sdmp_fast.benchmarks.common import peak_memory_mb

    assert peak_memory_mb(lambda: torch.empty(1 << 20), device="cpu") is None


@pytest.mark.cuda
def test_peak_memory_counts_what_a_call_allocates():
    import torch

    from sdmp_fast.benchmarks.common import peak_memory_mb

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    keep = []
    mb = peak_memory_mb(lambda: keep.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda")))
    assert 64 <= mb < 66
    assert peak_memory_mb(lambda: torch.empty(32 << 20, dtype=torch.uint8, device="cuda")) >= 32  # freed: peak


def test_bench_losses_rows_on_cpu(tmp_path):
    out = tmp_path / "losses.json"
    code = cli.main(["bench", "losses", "--no-compile", "--iters", "1", "--warmup", "1", "--ops", "two_hot_ce,dino",
                     "--dino-variants", "fused+g2", "--json", str(out)])
    assert code == 0
    rows = {(r["op"], r["impl"]): r for r in _records(out)}
    for key in [("two_hot_ce", "kernel_graph"), ("two_hot_ce", "eager_dense_graph"), ("dino", "kernel_graph_fused+g2")]:
        assert rows[key]["status"] == "unavailable" and "CUDA" in rows[key]["reason"]
    dense, two_hot = rows[("two_hot_ce", "eager_dense")], rows[("two_hot_ce", "eager")]
    assert dense["ms"] > 0 and two_hot["speedup_vs_eager_dense"] == pytest.approx(dense["ms"] / two_hot["ms"])
    assert all("peak_mb" in r and "mem_vs_eager" in r for r in rows.values())  # memory beside speed (GPU)


def test_bench_mixing_graph_rows_compare_with_graph_copy(tmp_path):
    out = tmp_path / "mixing.json"
    code = cli.main(["bench", "mixing", "--no-compile", "--iters", "1", "--warmup", "1", "--cases", "resizemix",
                     "--batch-size", "4", "--sizes", "16", "--mix-variants", "p2,p4,staged", "--json", str(out)])
    assert code == 0
    rows = {r["impl"]: r for r in _records(out)}
    assert set(rows) == {"copy", "kernel", "copy_graph", "kernel_graph", "eager", "kernel_graph_p2", "kernel_graph_p4",
                         "kernel_graph_staged"}
    assert rows["copy"]["vs_copy"] == 1.0
    assert rows["eager"]["vs_copy"] == pytest.approx(rows["eager"]["ms"] / rows["copy"]["ms"])
    assert all("peak_mb" in r and "mem_vs_eager" in r for r in rows.values())
    assert all(rows[k]["status"] == "unavailable" for k in ("kernel", "copy_graph", "kernel_graph", "kernel_graph_p4",
                                                            "kernel_graph_staged"))


def test_bench_mixing_shape_names_every_view_size(tmp_path):
    out = tmp_path / "mixing.json"
    assert cli.main(["bench", "mixing", "--no-compile", "--iters", "1", "--warmup", "0", "--cases", "mixup",
                     "--batch-size", "4", "--channels", "3", "--sizes", "16,9", "--json", str(out)]) == 0
    shapes = {r["shape"] for r in _records(out)}
    assert shapes == {"(4, 3, 16, 16) + (4, 3, 9, 9) float32"}, shapes  # was "2 x (4, 3, 16, 16)"


def test_bench_mixing_rejects_unknown_variant(tmp_path, capsys):
    out = tmp_path / "mixing.json"
    assert cli.main(["bench", "mixing", "--no-compile", "--mix-variants", "p3", "--json", str(out)]) == 2
    assert "--mix-variants: cannot read 'p3'" in capsys.readouterr().err
    assert not out.exists()  # rejected before anything ran


@pytest.mark.parametrize("argv,message", [
    (["bench", "losses", "--iters", "0"], "--iters: must be >= 1, got 0"),  # ran, wrote failed rows, exit 0
    (["bench", "losses", "--moco-n", "0"], "--moco-n: must be >= 2, got 0"),  # IndexError traceback
    (["bench", "mixing", "--batch-size", "-2"], "--batch-size: must be >= 2, got -2"),
    (["bench", "mixing", "--channels", "0"], "--channels: must be >= 1, got 0"),  # 0: rows of empty tensors
    (["bench", "mixing", "--channels", "-1"], "--channels: must be >= 1, got -1"),  # a traceback
])
def test_bench_counts_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "r.json"
    assert cli.main(argv + ["--json", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["bench", "losses", "--ops", ","], "--ops: no op in ','"),  # an empty table crashed print_table
    (["bench", "mixing", "--cases", ","], "--cases: no case in ','"),
    (["bench", "losses", "--dino-crops", "6,-1"], "--dino-crops: expected 'clean,mixed' crop counts"),  # traceback
    (["bench", "mixing", "--sizes", "64,abc"], "--sizes: expected a comma list of view sizes"),  # int() message
    (["bench", "losses", "--moco-n", "3", "--moco-keys", "7"],  # quietly benchmarked N = 6
     "--moco-keys: moco_terms needs a multiple of --moco-n (3), got 7"),
    (["bench", "losses", "--ops", "two_hot_ce", "--moco-n", "64", "--moco-keys", "32"],  # an IndexError traceback
     "--moco-keys: two_hot_ce needs at least --moco-n (64) keys, got 32"),
    (["bench", "losses", "--ops", "dino", "--dino-crops", "1,0", "--teacher-crops", "1"],  # rows "failed", exit 0
     "--dino-crops 1,0 with --teacher-crops 1: no (teacher, student) pair"),
])
def test_bench_list_options_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "r.json"
    assert cli.main(argv + ["--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_merge_into_refuses_rows_of_other_sizes_or_machines_and_files_that_are_no_bench_json(tmp_path, capsys):
    """Merged rows got speed-ups against the eager row of a 64x smaller bf16 problem, in silence; a loaders JSON
    gave a KeyError traceback after the run."""
    from sdmp_fast.benchmarks.losses import merge_variant_rows
    main = tmp_path / "losses.json"
    rec = lambda impl, shape: {"op": "dino", "impl": impl, "ms": 1.0, "status": "ok", "shape": shape}  # noqa: E731
    main.write_text(json.dumps({"device": "d", "records": [rec("eager", "B=2 K=64 bf16")]}))
    before = main.read_text()
    with pytest.raises(ValueError, match=r"times dino at B=2 K=64 bf16, these rows at B=16 K=4096 fp32"):
        merge_variant_rows(str(main), {"device": "d", "records": [rec("kernel_graph_fused", "B=16 K=4096 fp32")]})
    with pytest.raises(ValueError, match=r"measured on 'd', these rows on 'e'"):
        merge_variant_rows(str(main), {"device": "e", "records": [rec("kernel_graph_fused", "B=2 K=64 bf16")]})
    assert main.read_text() == before
    loaders = tmp_path / "loaders.json"
    loaders.write_text(json.dumps({"device": "d", "records": [{"backend": "dali", "img_per_s": 3.0}]}))
    out = tmp_path / "r.json"
    argv = ["bench", "losses", "--ops", "two_hot_ce", "--no-compile", "--iters", "1", "--warmup", "0", "--json",
            str(out), "--merge-into", str(loaders)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is no `sdmp-fast bench losses` JSON" in err and not out.exists()  # before anything ran


@pytest.mark.parametrize("cmd", [["losses", "--ops", "two_hot_ce"], ["mixing", "--cases", "mixup"]])
def test_an_output_that_cannot_be_written_is_named_before_anything_is_timed(tmp_path, capsys, cmd):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, message in ((afile / "r.json", "is a file, not a folder"), (tmp_path, "is a folder")):
        assert cli.main(["bench"] + cmd + ["--no-compile", "--iters", "1", "--json", str(path)]) == 2
        captured = capsys.readouterr()
        assert "--json: " in captured.err and message in captured.err, captured.err
        assert "copy bandwidth" not in captured.out  # nothing ran


def test_merge_variant_rows_recomputes_speedups_against_the_main_run(tmp_path):
    # bench/gpu_kernels.sh times the cluster DINO variants in a process of their own and merges their rows
    from sdmp_fast.benchmarks.losses import merge_variant_rows
    main = tmp_path / "losses.json"
    rec = lambda impl, ms, status="ok": {"op": "dino", "impl": impl, "ms": ms, "status": status}  # noqa: E731
    main.write_text(json.dumps({"device": "d", "date": "t", "command": "main", "records": [
        rec("eager", 10.0), rec("compile", 3.0), rec("kernel_graph", 0.8), rec("kernel_graph_cluster", None, "failed"),
        {"op": "two_hot_ce", "impl": "eager", "ms": 1.0, "status": "ok"}]}))
    extra = {"device": "d", "date": "t", "command": "cluster", "records": [
        rec("eager", 11.0), rec("kernel_graph", 0.82), rec("kernel_graph_cluster", 0.4),
        rec("kernel_graph_cluster+tfold", None, "failed")]}
    assert merge_variant_rows(str(main), extra) == 2
    doc = json.loads(main.read_text())
    rows = {(r["op"], r["impl"]): r for r in doc["records"]}
    assert len(doc["records"]) == 6  # the main run's stale cluster row replaced, not duplicated
    cluster = rows[("dino", "kernel_graph_cluster")]
    assert cluster["speedup_vs_compile"] == pytest.approx(3.0 / 0.4)
    assert cluster["speedup_vs_eager"] == pytest.approx(10.0 / 0.4)  # the main run's eager, not its own
    assert cluster["same_run_kernel_graph_ms"] == 0.82 and cluster["run"] == "separate process"
    assert rows[("dino", "kernel_graph_cluster+tfold")]["status"] == "failed"
    assert rows[("dino", "eager")]["ms"] == 10.0 and "merged: cluster" in doc["command"]
    # without a main file (its bench failed), the variant run's document becomes it
    alone = tmp_path / "alone.json"
    assert merge_variant_rows(str(alone), extra) == 2
    assert json.loads(alone.read_text())["records"] == extra["records"]


def test_bench_losses_rejects_unknown_profile_config(tmp_path, capsys):
    out = tmp_path / "losses.json"
    assert cli.main(["bench", "losses", "--profile-configs", "default,clustr", "--json", str(out)]) == 2
    assert "--profile-configs: cannot read 'clustr'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["bench", "losses", "--ops", "two_hot_ce,two_hot_ce", "--moco-n", "4", "--moco-keys", "8"],
    ["bench", "mixing", "--cases", "mixup,mixup", "--batch-size", "2", "--sizes", "8"],
])
def test_a_list_entry_given_twice_still_gives_one_record_per_op_and_impl(tmp_path, argv):
    out = tmp_path / "r.json"
    assert cli.main(argv + ["--no-compile", "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    pairs = [(r["op"], r["impl"]) for r in recs]
    assert len(pairs) == len(set(pairs)) and pairs


@pytest.mark.parametrize("cmd", ["losses", "mixing"])
def test_ctrl_c_keeps_the_rows_of_the_finished_parts_beside_an_earlier_result(tmp_path, monkeypatch, capsys, cmd):
    """Ctrl-C during a later op / case lost the rows of those already timed; now they are written beside --json
    (``.interrupted.json``, "interrupted": true), the earlier complete file is left as it was, exit status 130."""
    from sdmp_fast.benchmarks import losses as bench_losses
    from sdmp_fast.benchmarks import mixing as bench_mixing

    def stop(*args):
        raise KeyboardInterrupt

    if cmd == "losses":
        monkeypatch.setitem(bench_losses.OPS, "dino", stop)
        argv, key = ["--ops", "two_hot_ce,dino"], "op"
    else:
        real = bench_mixing.bench_case
        monkeypatch.setattr(bench_mixing, "bench_case", lambda c, *a: stop() if c == "cutmix" else real(c, *a))
        argv, key = ["--cases", "mixup,cutmix"], "op"
    out = tmp_path / "r.json"
    out.write_text('{"earlier": "complete run"}')
    assert cli.main(["bench", cmd, "--no-compile", "--iters", "1", "--warmup", "0", "--json", str(out)] + argv) == 130
    assert json.loads(out.read_text()) == {"earlier": "complete run"}
    part = json.loads((tmp_path / "r.interrupted.json").read_text())
    assert part["interrupted"] is True and part["records"]
    assert {r[key] for r in part["records"]} == ({"two_hot_ce"} if cmd == "losses" else {"mix_mixup"})
    assert "r.interrupted.json" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["losses", "mixing"])
def test_ctrl_c_before_any_row_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys, cmd):
    """Ctrl-C in the first op / case: the empty table crashed (TypeError, exit 1) and an empty file was left."""
    from sdmp_fast.benchmarks import losses as bench_losses
    from sdmp_fast.benchmarks import mixing as bench_mixing

    def stop(*args):
        raise KeyboardInterrupt

    if cmd == "losses":
        monkeypatch.setitem(bench_losses.OPS, "two_hot_ce", stop)
        argv = ["--ops", "two_hot_ce"]
    else:
        monkeypatch.setattr(bench_mixing, "bench_case", stop)
        argv = ["--cases", "mixup"]
    out = tmp_path / "r.json"
    assert cli.main(["bench", cmd, "--no-compile", "--iters", "1", "--json", str(out)] + argv) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert "nothing written" in capsys.readouterr().err
