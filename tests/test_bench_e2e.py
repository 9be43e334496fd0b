"""`sdmp-fast bench e2e` runs the trainer from a loader and from synthetic device data and writes the shared JSON."""
import json

from sdmp_fast import cli

from test_trainer import TINY

MEMORY = ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8"]


def e2e(*extra) -> int:
    """`sdmp-fast bench e2e` of the tiny ViT on Fashion-MNIST from memory, with ``extra`` options."""
    return cli.main(["bench", "e2e"] + TINY + MEMORY + list(extra))


def test_bench_e2e_writes_ratios(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert e2e("--steps", "2", "--warmup", "1", "--modes", "eager", "--json", str(out)) == 0
    doc = json.loads(out.read_text())
    runs = {(r["run"], r["mode"]): r for r in doc["records"]}
    assert set(runs) == {("e2e", "eager"), ("synthetic", "eager")}
    for r in runs.values():
        assert r["img_per_s"] > 0 and r["loss"] > 0
    assert runs[("synthetic", "eager")]["ratio_to_synthetic_same_mode"] == 1.0
    for r in runs.values():  # TINY cuts the ViT down: the record says so, not just the arch name
        assert r["backbone"]["depth"] == int(TINY[TINY.index("--depth") + 1]) and 0 < r["backbone_params_m"] < 1
    assert runs[("e2e", "eager")]["ratio_to_synthetic_same_mode"] > 0
    for r in runs.values():  # memory is measured beside speed on a GPU; on the CPU the columns say nothing
        assert "peak_mem_gb" in r and "mem_vs_synthetic_eager" in r and r["peak_mem_gb"] is None
    printed = capsys.readouterr().out
    assert "ratio_to_synthetic_same_mode" in printed and "peak_mem_gb" in printed


def test_bench_e2e_runs_a_mode_given_twice_once(tmp_path, capsys):
    """--modes eager,eager ran the synthetic baseline twice, the first row's ratio against the second run."""
    out = tmp_path / "e2e.json"
    assert e2e("--steps", "1", "--warmup", "0", "--modes", "eager,eager", "--json", str(out)) == 0
    runs = [(r["run"], r["mode"]) for r in json.loads(out.read_text())["records"]]
    assert sorted(runs) == [("e2e", "eager"), ("synthetic", "eager")]


def test_bench_e2e_refuses_an_unwritable_json_before_running(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = e2e("--steps", "1", "--modes", "eager", "--json", str(afile / "e.json"))
    assert code == 2 and "--json: cannot write" in capsys.readouterr().err


def test_bench_e2e_with_epochs_names_steps(tmp_path, capsys):
    code = cli.main(["bench", "e2e"] + TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8",
                                               "--epochs", "1", "--modes", "eager", "--json", str(tmp_path / "e.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "Traceback" not in err
    assert not (tmp_path / "e.json").exists()


def test_bench_e2e_refuses_a_mode_it_cannot_run_before_anything_runs(tmp_path, capsys, monkeypatch):
    """graphs without a GPU was refused only after the end-to-end, eager and compile runs had taken their time;
    an empty --modes ran no baseline at all (every ratio None)."""
    import torch

    from sdmp_fast.benchmarks import e2e

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(e2e, "_run", lambda *a, **k: ran.append(a) or {})
    common = ["bench", "e2e"] + TINY + ["--loader", "memory", "--data", "fashion-mnist", "--batch-size", "8",
                                        "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "e.json")]
    assert cli.main(common + ["--modes", "eager,graphs"]) == 2
    err = capsys.readouterr().err
    assert "--modes graphs: cuda_graphs: CUDA graphs need a GPU" in err and "Traceback" not in err
    assert cli.main(common + ["--modes", ","]) == 2
    assert "--modes: no step mode in ','" in capsys.readouterr().err
    assert not ran and not (tmp_path / "e.json").exists()


def test_bench_e2e_names_its_default_file_by_card_and_date(tmp_path, capsys, monkeypatch):
    """The default was bench/results/e2e.json: each run overwrote the last one's numbers, whatever the card."""
    import datetime
    import os

    monkeypatch.chdir(tmp_path)
    args = TINY + ["--loader", "synthetic", "--batch-size", "8", "--steps", "1", "--warmup", "0", "--modes", "eager"]
    assert cli.main(["bench", "e2e"] + args) == 0
    name = f"e2e-cpu{os.cpu_count()}-{datetime.date.today():%Y%m%d}.json"
    doc = json.loads((tmp_path / "bench" / "results" / name).read_text())
    assert [r["device"] for r in doc["records"]] == ["cpu"]
    assert not (tmp_path / "bench" / "results" / "e2e.json").exists()
    # a second run on that card that day (another node of the same model on a shared checkout, or a rerun)
    # replaced the first one's file: it now keeps it and takes the next free name
    first = (tmp_path / "bench" / "results" / name).read_bytes()
    capsys.readouterr()
    assert cli.main(["bench", "e2e"] + args) == 0
    second = tmp_path / "bench" / "results" / name.replace(".json", "-2.json")
    assert (tmp_path / "bench" / "results" / name).read_bytes() == first
    assert json.loads(second.read_text())["records"] and f"wrote {os.path.join('bench', 'results', second.name)}" \
        in capsys.readouterr().out


def test_ctrl_c_keeps_the_finished_runs_beside_an_earlier_result(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the synthetic baseline lost the e2e run already timed; now it is written beside --json."""
    from sdmp_fast.benchmarks import e2e as bench_e2e

    real = bench_e2e._run

    def run(cfg, steps, warmup, run, mode):
        if run == "synthetic":
            raise KeyboardInterrupt
        return real(cfg, steps, warmup, run, mode)

    monkeypatch.setattr(bench_e2e, "_run", run)
    out = tmp_path / "e2e.json"
    out.write_text('{"earlier": "complete run"}')
    assert e2e("--steps", "1", "--warmup", "0", "--modes", "eager", "--json", str(out)) == 130
    assert json.loads(out.read_text()) == {"earlier": "complete run"}
    part = json.loads((tmp_path / "e2e.interrupted.json").read_text())
    assert part["interrupted"] is True and [r["run"] for r in part["records"]] == ["e2e"]
    assert part["records"][0]["img_per_s"] > 0 and part["records"][0]["ratio_to_synthetic_same_mode"] is None
