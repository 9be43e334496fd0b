"""`sdmp-fast bench loaders` end to end on a tiny photo set (CPU), and its JSON / PNG outputs."""
import json
import os

import pytest
import torch
from PIL import Image

from sdmp_fast.benchmarks import loaders as bench
from sdmp_fast.benchmarks.make_data import make_data
from sdmp_fast.cli import main as cli_main
from sdmp_fast.pipelines import base
from sdmp_fast.pipelines.recipes import byol2

REQUIRED = {"backend", "recipe", "batch_size", "img_per_s", "ratio_vs_torchvision", "ratio_vs_synthetic",
            "batches", "device", "status", "reason"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("bench") / "photos"), num_images=16, classes=2, seed=0)


@pytest.mark.timeout(240)
def test_bench_loaders_end_to_end_writes_json_png_and_reports_missing_backends(photos, tmp_path, monkeypatch,
                                                                            capsys):
    # A backend whose module cannot be imported must be reported, not crash the run.
    monkeypatch.setitem(base.BACKENDS, "broken", "sdmp_fast.pipelines.no_such_backend:Loader")
    out = tmp_path / "res" / "loaders.json"
    rc = cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision,broken", "--recipe", "byol2",
                   "--size", "32", "--batch-size", "4", "--warmup", "1", "--batches", "3", "--num-workers", "0",
                   "--device", "cpu", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"device", "date", "command", "records"} and "bench loaders" in doc["command"]
    recs = {r["backend"]: r for r in doc["records"]}
    assert set(recs) == {"torchvision", "broken"}
    for r in recs.values():
        assert REQUIRED <= set(r)
        assert r["recipe"] == "byol2" and r["batch_size"] == 4 and r["device"] == "cpu"
    tv = recs["torchvision"]
    assert tv["status"] == "ok", tv["reason"]
    assert tv["img_per_s"] > 0 and tv["ratio_vs_torchvision"] == pytest.approx(1.0) and tv["batches"] == 3
    assert tv["samples"] == 12 and tv["views"] == [[3, 32, 32]] * 2 and tv["num_mixed_views"] == 2
    assert tv["cpu_cores"] > 0 and tv["cpu_ms_per_img"] > 0  # decoding in this process (no workers)
    assert tv["ratio_vs_synthetic"] is None  # defined on a GPU only
    assert tv["interpolation"] == "bicubic, antialiased"
    assert len(tv["rounds_img_per_s"]) == 2 and tv["img_per_s"] in tv["rounds_img_per_s"]
    broken = recs["broken"]
    assert broken["status"] == "unavailable" and "no_such_backend" in broken["reason"]
    assert broken["img_per_s"] is None and broken["ratio_vs_torchvision"] is None
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.size[0] > 200
    printed = capsys.readouterr().out
    assert "torchvision" in printed and "unavailable" in printed


def test_bench_runs_on_across_epochs_and_counts_samples():
    class TwoBatchLoader:
        """2 batches per epoch: timing 5 must cross epochs via set_epoch."""
        def __init__(self):
            self.epochs = []

        def __len__(self):
            return 2

        def set_epoch(self, e):
            self.epochs.append(e)

        def __iter__(self):
            from sdmp_fast.batch import SDMPBatch
            for _ in range(2):
                yield SDMPBatch([torch.zeros(6, 3, 8, 8)], torch.zeros(6, dtype=torch.long), torch.arange(6))

    loader = TwoBatchLoader()
    rec = bench.time_batches(bench.endless_batches(loader), warmup=2, count=5, device=torch.device("cpu"))
    assert rec["samples"] == 30 and rec["img_per_s"] > 0 and loader.epochs == [0, 1, 2, 3]


def _sleepy_batches(seconds_per_batch):
    import time

    from sdmp_fast.batch import SDMPBatch
    while True:
        time.sleep(seconds_per_batch)
        yield SDMPBatch([torch.zeros(4, 3, 8, 8)], torch.zeros(4, dtype=torch.long), torch.arange(4))


def test_cpu_cost_counts_the_loader_worker_processes():
    """cpu_cores / cpu_ms_per_img: the CPU a loader spends, its worker processes included (a DataLoader's main
    process mostly waits while its workers decode)."""
    import subprocess
    import sys

    pytest.importorskip("psutil")
    idle = bench.time_batches(_sleepy_batches(0.1), warmup=1, count=5, device=torch.device("cpu"))
    assert idle["cpu_cores"] < 0.2 and idle["cpu_ms_per_img"] == pytest.approx(
        1e3 * idle["cpu_cores"] * idle["seconds"] / idle["samples"])
    worker = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a busy child, as a decoding worker
    try:
        busy = bench.time_batches(_sleepy_batches(0.1), warmup=1, count=5, device=torch.device("cpu"))
    finally:
        worker.kill()
        worker.wait()
    assert busy["cpu_cores"] > 0.3  # one core while it ran (less on a loaded 2-core machine)
    assert busy["cpu_ms_per_img"] > idle["cpu_ms_per_img"] + 10


def test_synthetic_source_has_the_recipe_shapes_and_mixing():
    recipe = byol2(size=16)
    batch = next(bench.synthetic_batches(recipe, 4, torch.device("cpu"), None, seed=0))
    assert [tuple(v.shape) for v in batch.views] == [(4, 3, 16, 16)] * 2
    assert len(batch.mixed_views) == 2 and batch.lam.shape == (4,)


def test_bad_settings_are_one_clear_error(photos, tmp_path, capsys):
    common = ["bench", "loaders", "--data", photos, "--json", str(tmp_path / "x.json"), "--device", "cpu"]
    assert cli_main(common + ["--backends", "torchvision,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert cli_main(common + ["--backends", "torchvision", "--num-workers", "-1"]) == 2
    assert "--num-workers: must be >= 0" in capsys.readouterr().err
    assert cli_main(common + ["--backends", "torchvision", "--num-workers", "100000"]) == 2  # forked them
    assert "--num-workers: must be >= 0 and <= 1024" in capsys.readouterr().err
    assert cli_main(["bench", "loaders", "--data", str(tmp_path / "missing"), "--device", "cpu",
                     "--backends", "torchvision"]) == 2
    assert "does not exist" in capsys.readouterr().err
    base = ["bench", "loaders", "--data", photos, "--json", str(tmp_path / "x.json"), "--backends", "torchvision"]
    assert cli_main(base + ["--device", "gpu"]) == 2
    assert "--device: expected cpu, cuda, cuda:N or auto, got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # was torch's "Found no NVIDIA driver" traceback
        assert cli_main(base + ["--device", "cuda"]) == 2
        assert "--device: 'cuda' but no CUDA GPU is available" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.json")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "3"], "--batch-size: batch-flip mixing pairs image i with n-1-i"),  # was rows "unavailable"
    (["--batch-size", "64"], "--batch-size 64: larger than the 16 images of --data"),  # was rows "unavailable"
    (["--size", "0"], "--size: must be >= 8"),  # 0 quietly ran the recipe's size
    (["--max-side", "-1"], "--max-side: must be >= 0"),
])
def test_settings_every_loader_refuses_fail_before_an_earlier_json_is_overwritten(photos, tmp_path, capsys, argv,
                                                                                   message):
    out = tmp_path / "x.json"
    out.write_text("earlier run")
    assert cli_main(["bench", "loaders", "--data", photos, "--json", str(out), "--device", "cpu",
                     "--backends", "torchvision,dali", "--warmup", "1", "--batches", "1"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert out.read_text() == "earlier run" and not (tmp_path / "x.png").exists()


def test_an_odd_batch_is_fine_for_the_baselines_alone(photos):
    """dali-solo-learn and decode-only do not mix: an odd batch is no error before they run."""
    class Args:
        data, backends, recipe, size, interpolation, batch_size, warmup, batches = photos, "decode-only", "byol2", \
            None, "bicubic", 3, 0, 1
        num_workers, device, dtype, repeats, seed, max_side, cache, verbose = 0, "cpu", "float32", 1, 0, 512, None, False
        json = png = None
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        Args.json = os.path.join(d, "x.json")
        doc = bench.run(Args)
    assert [r["status"] for r in doc["records"]] == ["unavailable"]  # nvJPEG: GPU only; but no settings error


def test_default_json_path_names_recipe_device_and_date():
    path = bench.default_json_path("dino", torch.device("cpu"))
    assert path.startswith(os.path.join("bench", "results", "loaders-dino-cpu")) and path.endswith(".json")


@pytest.mark.timeout(240)
def test_anchor_baselines_run_beside_the_loaders(photos, tmp_path):
    """The solo-learn-style DALI pipeline is timed in the same run and every record gets its ratio to it;
    nvJPEG decode-only is named unavailable without CUDA."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "loaders.json"
    rc = cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision,dali-solo-learn,decode-only",
                   "--size", "32", "--batch-size", "4", "--warmup", "1", "--batches", "3", "--num-workers", "1",
                   "--device", "cpu", "--json", str(out)])
    assert rc == 0
    recs = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    solo, tv = recs["dali-solo-learn"], recs["torchvision"]
    assert solo["status"] == "ok", solo["reason"]
    assert solo["samples"] == 12 and solo["views"] == [[3, 32, 32]] * 2 and solo["num_mixed_views"] == 0
    assert solo["ratio_vs_solo_learn"] == pytest.approx(1.0)
    assert solo["num_workers"] == 1 and tv["num_workers"] == 1  # the threads / workers each one ran
    assert tv["ratio_vs_solo_learn"] == pytest.approx(tv["img_per_s"] / solo["img_per_s"])
    assert recs["decode-only"]["status"] == "unavailable" and "CUDA" in recs["decode-only"]["reason"]


def test_a_solo_learn_run_that_cannot_decode_its_first_batch_failed_and_was_not_unavailable(tmp_path):
    """DALI runs the first batch while its iterator is made: a file it cannot decode there was reported as a
    pipeline that could not be built ("unavailable", as a missing library) instead of a failed run."""
    pytest.importorskip("nvidia.dali")
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    for i in range(4):  # a JPEG start marker, then noise: listed as JPEGs, undecodable
        (folder / f"x{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
    out = tmp_path / "loaders.json"
    assert cli_main(["bench", "loaders", "--data", str(tmp_path / "data"), "--backends", "dali-solo-learn",
                     "--batch-size", "4", "--warmup", "1", "--batches", "1", "--num-workers", "1", "--device", "cpu",
                     "--json", str(out)]) == 0
    rec, = json.loads(out.read_text())["records"]
    assert rec["status"] == "failed" and "decoders.image" in rec["reason"], rec


def test_solo_learn_baseline_applies_the_recipe_augmentations(photos):
    """Coin-flip selection as solo-learn's Mux: grayscale with p 1 greys every view, p 0 none."""
    pytest.importorskip("nvidia.dali")
    import dataclasses

    from sdmp_fast.benchmarks.baselines import make_baseline

    def first_view(gray_p):
        r = byol2(size=32, mix=False)
        r = dataclasses.replace(r, views=tuple(dataclasses.replace(v, grayscale_p=gray_p, jitter_p=0.0)
                                               for v in r.views))
        batches = make_baseline("dali-solo-learn", base.list_images(photos), r, 8, torch.device("cpu"),
                                num_threads=1)
        v = next(batches).views[0]
        batches.close()
        mean = torch.tensor(r.mean).view(1, 3, 1, 1)
        std = torch.tensor(r.std).view(1, 3, 1, 1)
        return v * std + mean  # back to [0, 1] pixels

    gray, colour = first_view(1.0), first_view(0.0)
    assert (gray[:, 0] - gray[:, 1]).abs().max() < 1e-4 and (gray[:, 1] - gray[:, 2]).abs().max() < 1e-4
    assert (colour[:, 0] - colour[:, 2]).abs().amax(dim=(1, 2)).min() > 0.05


def test_solo_learn_baseline_refuses_data_smaller_than_a_batch(photos):
    """DALI's reader drops the partial batch: an endless iterator over no batch would spin forever."""
    pytest.importorskip("nvidia.dali")
    from sdmp_fast.benchmarks.baselines import make_baseline

    with pytest.raises(ValueError, match="16 images over 1 shard"):
        make_baseline("dali-solo-learn", base.list_images(photos), byol2(size=32), 32, torch.device("cpu"))


def test_decode_only_batches_count_every_image(photos):
    """The nvJPEG baseline's batch loop, run with torchvision's CPU decoder: batch_size images per batch, cycling
    over the bytes read once."""
    from torchvision.io import read_file

    from sdmp_fast.benchmarks.baselines import _decoded_batches

    data = [read_file(f) for f in base.list_images(photos).files[:5]]
    batches = _decoded_batches(data, 4, torch.device("cpu"))
    sizes = [next(batches) for _ in range(3)]
    assert [b.batch_size for b in sizes] == [4, 4, 4]
    v = sizes[0].views[0]
    assert v.shape[0] == 4 and v.shape[1] == 3 and v.dtype == torch.uint8 and v.shape[2] > 32
    bench.time_batches(batches, 1, 2, torch.device("cpu"))  # what bench loaders does with it


def test_default_backends_include_the_anchor_pipelines():
    cpu = bench.default_backends(torch.device("cpu")).split(",")
    assert cpu[:2] == ["torchvision", "dali-solo-learn"] and "dali" in cpu and "decode-only" not in cpu
    assert bench.default_backends(torch.device("cuda")).split(",")[-1] == "decode-only"


def test_a_backend_failing_in_a_later_round_is_reported_failed(monkeypatch):
    """--repeats: a backend that fails in round 2 after an ok round 1 is a failed record naming the round, not
    round 1's img/s as if every round had run."""
    from types import SimpleNamespace

    calls = {"n": 0}

    def flaky(backend, args, recipe, images, device, dtype):
        calls["n"] += 1
        if calls["n"] == 1:
            return {"backend": backend, "status": "ok", "reason": None, "img_per_s": 50.0, "samples": 8,
                    "seconds": 0.16}
        return {"backend": backend, "status": "failed", "reason": "RuntimeError: worker died"}

    monkeypatch.setattr(bench, "run_backend", flaky)
    (rec,), _ = bench.measure_rounds(["torchvision"], SimpleNamespace(repeats=3), None, None, torch.device("cpu"), None)
    assert calls["n"] == 2  # not retried after the failure
    assert rec["status"] == "failed" and "round 2 of 3" in rec["reason"] and "worker died" in rec["reason"]
    assert "img_per_s" not in rec and rec["rounds_img_per_s"] == [50.0]


@pytest.mark.parametrize("speeds,reported", [([30.0, 10.0], 10.0), ([40.0, 10.0, 30.0, 20.0], 20.0),
                                             ([30.0, 10.0, 20.0], 20.0)])
def test_the_reported_round_is_the_median_and_the_slower_middle_of_an_even_count(monkeypatch, speeds, reported):
    """--repeats 2 reported the faster round (the upper middle): a benchmark's median must not be its best."""
    from types import SimpleNamespace

    left = list(speeds)
    monkeypatch.setattr(bench, "run_backend", lambda *a: {"backend": a[0], "status": "ok", "reason": None,
                                                          "img_per_s": left.pop(0), "samples": 8, "seconds": 1})
    (rec,), _ = bench.measure_rounds(["torchvision"], SimpleNamespace(repeats=len(speeds)), None, None,
                                     torch.device("cpu"), None)
    assert rec["img_per_s"] == reported and rec["rounds_img_per_s"] == speeds


def test_records_name_the_resize_filter_each_backend_applies():
    """The JSON tells a bicubic run from a bilinear one, and FFCV's own resizer / the device ops' missing
    antialiasing from the recipe's filter (the README's 'Crops are resized as ...')."""
    assert bench.resize_filter("dali", "bilinear") == "bilinear, antialiased"
    assert bench.resize_filter("dali-graphmix", "bicubic") == "bicubic, antialiased"
    assert bench.resize_filter("torch-gpu", "bicubic") == "bicubic, no antialiasing"
    assert bench.resize_filter("ffcv", "bicubic").startswith("area")
    assert bench.resize_filter("decode-only", "bicubic") is None and bench.resize_filter("synthetic", "x") is None


@pytest.mark.timeout(240)
def test_ffcv_record_says_how_many_images_its_beton_stores_downscaled(photos, tmp_path):
    """FFCV decodes the .beton, whose longest sides --max-side caps (512 by default): the photos (~500 px) are
    all at a 64 px cap, none at the default cap, and --max-side 0 keeps them all."""
    pytest.importorskip("ffcv")
    images = base.list_images(photos)
    for max_side, at_cap in ((64, 16), (512, 0), (0, 0)):
        path = bench.beton_for(photos, images, str(tmp_path), max_side, workers=1)
        assert bench.beton_note(path, max_side) == {"max_side": max_side, "jpeg_quality": 90, "at_max_side": at_cap}


@pytest.mark.timeout(240)
def test_torchvision_is_timed_over_whole_rounds_of_its_workers(photos, tmp_path):
    """DataLoader workers each prepare a whole batch in step, so batches arrive in groups of num_workers: a timed
    count that splits a group times batches already waiting without the time they took (20 batches from 16
    workers: 13 waiting, 25% over the true rate). --batches 3 with 2 workers times 4."""
    assert bench.whole_rounds("torchvision", 16, 20) == 32 and bench.whole_rounds("torchvision", 4, 8) == 8
    assert bench.whole_rounds("dali", 4, 5) == 5 and bench.whole_rounds("torchvision", 1, 5) == 5
    out = tmp_path / "tv.json"
    assert cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision", "--size", "32",
                     "--batch-size", "2", "--warmup", "1", "--batches", "3", "--num-workers", "2",
                     "--device", "cpu", "--json", str(out)]) == 0
    tv, = json.loads(out.read_text())["records"]
    assert tv["status"] == "ok", tv["reason"]
    assert tv["num_workers"] == 2 and tv["batches"] == 4 and tv["samples"] == 8


def test_a_run_on_an_oversubscribed_cpu_says_so(photos, tmp_path, monkeypatch, capsys):
    """The recorded 2026-11-26 CPU run (load 9-19 on 2 cores) put FFCV and torch-gpu at 0.5x torchvision: their
    CPU work runs on torch's intra-op threads, which stall on a busy machine. Such a run now warns."""
    def fake(backend, args, recipe, images, device, dtype):
        return {"backend": backend, "status": "ok", "reason": None, "img_per_s": 10.0, "samples": 4, "seconds": 0.4}

    monkeypatch.setattr(bench, "run_backend", fake)
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    common = ["bench", "loaders", "--data", photos, "--backends", "torchvision,ffcv", "--device", "cpu",
              "--batch-size", "4", "--json", str(tmp_path / "x.json")]
    monkeypatch.setattr(os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    assert cli_main(common) == 0
    err = capsys.readouterr().err
    assert "oversubscribed while torchvision, ffcv ran" in err
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 2.0))  # the run's own threads on 2 cores
    assert cli_main(common) == 0
    assert "oversubscribed" not in capsys.readouterr().err


def test_without_matplotlib_the_json_is_written_and_the_chart_left_out(photos, tmp_path, monkeypatch, capsys):
    """matplotlib is the [bench] extra: a core install timed every backend, wrote the JSON, then died in the
    chart with an ImportError traceback."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "x.json"
    assert cli_main(["bench", "loaders", "--data", photos, "--json", str(out), "--device", "cpu", "--backends",
                     "torchvision", "--size", "32", "--batch-size", "4", "--warmup", "1", "--batches", "1",
                     "--num-workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "no bar chart (matplotlib is not installed" in captured.err
    assert json.loads(out.read_text())["records"][0]["status"] == "ok" and not (tmp_path / "x.png").exists()


def test_a_backend_named_twice_is_timed_and_recorded_once(photos, tmp_path, monkeypatch):
    ran = []

    def fake(backend, args, recipe, images, device, dtype):
        ran.append(backend)
        return {"backend": backend, "status": "ok", "reason": None, "img_per_s": 10.0, "samples": 4, "seconds": 0.4}

    monkeypatch.setattr(bench, "run_backend", fake)
    out = tmp_path / "x.json"
    assert cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision,dali,torchvision",
                     "--device", "cpu", "--batch-size", "4", "--json", str(out)]) == 0
    assert ran == ["torchvision", "dali"]
    assert [r["backend"] for r in json.loads(out.read_text())["records"]] == ["torchvision", "dali"]


@pytest.mark.timeout(120)
def test_a_backend_whose_epochs_give_no_batch_fails_its_row_instead_of_looping(tmp_path, capsys):
    """Every file undecodable: each epoch gave no batch and the next epoch began, forever (a warning per epoch)."""
    bad = tmp_path / "bad" / "c"
    bad.mkdir(parents=True)
    for i in range(4):
        (bad / f"{i}.jpg").write_bytes(os.urandom(300))
    out = tmp_path / "r.json"
    rc = cli_main(["bench", "loaders", "--data", str(tmp_path / "bad"), "--backends", "torchvision", "--size", "32",
                   "--batch-size", "2", "--batches", "1", "--warmup", "1", "--num-workers", "0", "--device", "cpu",
                   "--json", str(out)])
    assert rc == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["status"] == "failed" and "gave no batch" in rec["reason"]


def test_bench_loaders_checks_its_outputs_and_backends_before_timing(photos, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["bench", "loaders", "--data", photos, "--size", "32", "--batch-size", "2", "--device", "cpu"]
    for extra, message in ((["--backends", "torchvision", "--json", str(afile / "r.json")], "--json: cannot write"),
                           (["--backends", "torchvision", "--json", str(tmp_path / "r.json"), "--png", str(tmp_path)],
                            "--png: "),
                           (["--backends", "memory"], "memory: reads a tensor or 'fashion-mnist'")):
        assert cli_main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_ctrl_c_keeps_the_rounds_that_finished_beside_an_earlier_result(photos, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a run lost every row measured so far; now they are written beside --json
    (``.interrupted.json``), an earlier complete result at --json is left as it was, and the exit status is 130."""
    def fake(backend, args, recipe, images, device, dtype):
        if backend == "ffcv":
            raise KeyboardInterrupt
        return {"backend": backend, "status": "ok", "reason": None, "img_per_s": 10.0, "samples": 4, "seconds": 0.4}

    monkeypatch.setattr(bench, "run_backend", fake)
    out = tmp_path / "x.json"
    out.write_text('{"earlier": "complete run"}')
    rc = cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision,ffcv,dali", "--device", "cpu",
                   "--batch-size", "4", "--json", str(out)])
    assert rc == 130
    assert json.loads(out.read_text()) == {"earlier": "complete run"}
    part = json.loads((tmp_path / "x.interrupted.json").read_text())
    assert part["interrupted"] is True and [r["backend"] for r in part["records"]] == ["torchvision"]
    assert part["records"][0]["img_per_s"] == 10.0 and part["records"][0]["ratio_vs_torchvision"] == 1.0
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.interrupted.png").exists()
    err = capsys.readouterr().err
    assert "interrupted" in err and "x.interrupted.json" in err


def test_ctrl_c_in_the_synthetic_baseline_keeps_the_loaders_rounds(photos, tmp_path, monkeypatch, capsys):
    """On a GPU the synthetic ceiling is timed after the loaders' rounds: Ctrl-C there lost every round."""
    import sdmp_fast.config as config

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "device_setting", lambda d: "cuda")  # as on a GPU machine
    monkeypatch.setattr(bench, "measure_rounds", lambda *a: ([{"backend": "torchvision", "status": "ok",
                                                               "reason": None, "img_per_s": 100.0, "samples": 8,
                                                               "seconds": 0.08}], False))
    monkeypatch.setattr(bench, "synthetic_batches", lambda *a: iter(()))
    monkeypatch.setattr(bench, "time_batches", stop)
    out = tmp_path / "x.json"
    assert cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision", "--batch-size", "4",
                     "--json", str(out)]) == 130
    part = json.loads((tmp_path / "x.interrupted.json").read_text())
    assert [r["backend"] for r in part["records"]] == ["torchvision"] and not out.exists()


def test_ctrl_c_before_any_round_exits_130_and_writes_nothing(photos, tmp_path, monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_backend", stop)
    assert cli_main(["bench", "loaders", "--data", photos, "--backends", "torchvision", "--device", "cpu",
                     "--batch-size", "4", "--json", str(tmp_path / "x.json")]) == 130
    assert list(tmp_path.iterdir()) == [] and "nothing written" in capsys.readouterr().err


def test_a_failed_json_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from sdmp_fast.benchmarks import common

    path = tmp_path / "b.json"
    path.write_text('{"old": 1}')

    def full(doc, fh, **kw):
        fh.write('{"rec')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.json, "dump", full)
    with pytest.raises(OSError, match=r"--json .*could not write it \(disk full\); the earlier file is unchanged"):
        common.write_json(str(path), {"records": []})
    assert path.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["b.json"]
