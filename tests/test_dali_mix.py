"""DALI backend with ``mix_in_graph=True``: the graph's mixed views equal ``apply_mix`` on the same clean views
with the same host-drawn parameters (each method forced, and all three), the reported lam / method are the
draws', DINO's local boxes use their own size, a CPU loader gives the same batches as the default path
(assemble_batch) with the same seed, the option is a no-op without mixing, and the bench label.

Tolerances: cutmix and copies are bit-exact (pastes); mixup 1e-5 (DALI's fused arithmetic vs torch's separate
ops); resizemix 1e-4 (DALI's bilinear resize vs ``F.grid_sample`` with float32 grid coordinates).
"""
import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from sdmp_fast.data import make_synthetic_image_folder  # noqa: E402
from sdmp_fast.mixing import CUTMIX, MIXUP, RESIZEMIX, apply_mix, box_lam, box_size  # noqa: E402
from sdmp_fast.pipelines.base import make_loader  # noqa: E402
from sdmp_fast.pipelines.dali_mix import COPY  # noqa: E402
from sdmp_fast.pipelines.recipes import byol2, dino  # noqa: E402

N = 21  # 3 classes x 7: batches of 8, 8 and an odd 5 without drop_last
TOL = {MIXUP: 1e-5, CUTMIX: 0.0, RESIZEMIX: 1e-4, COPY: 0.0}
ALL = ("mixup", "cutmix", "resizemix")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_image_folder(str(tmp_path_factory.mktemp("dalimix") / "data"), 3, 7, size=(30, 36))


def small_byol2(methods=ALL, **kw):
    r = byol2(size=24, **kw)
    return replace(r, mix=replace(r.mix, methods=methods))


def small_dino(methods=ALL, **kw):
    r = dino(global_size=24, local_size=12, n_local=3, n_local_mixed=2, **kw)
    return replace(r, mix=replace(r.mix, methods=methods))


def loader(folder, recipe, device="cpu", **kw):
    kw.setdefault("drop_last", False)
    return make_loader("dali", folder, recipe, 8, device=device, shard_id=0, num_shards=1, seed=5,
                       num_workers=2, **kw)


def check_graph_mixing(dl, recipe, forced=None):
    """Every batch of one epoch: mixed views == apply_mix(clean view, the batch's draw), lam/method reported."""
    sizes = [v.size for v in recipe.expanded_views()]
    seen_ops = set()
    for batch in dl:
        draw = dl.last_mix
        n = batch.batch_size
        assert batch.mixed_from == recipe.mix.mixed_views
        assert torch.equal(batch.lam.cpu(), draw.lam) and torch.equal(batch.method.cpu(), draw.method)
        raw_lam = draw.raw_lam
        if n % 2:  # odd last batch: no partner, unmixed copies with lam 1 (assemble_batch's rule)
            assert (batch.lam == 1).all() and (batch.method == MIXUP).all()
            assert all(torch.equal(m, batch.views[j]) for m, j in zip(batch.mixed_views, batch.mixed_from))
            continue
        if forced is not None:
            assert (draw.method == forced).all()
        for k, j in enumerate(batch.mixed_from):
            # bf16 / fp16 loaders: DALI mixes float32 and the loader rounds; the reference mixes rounded views
            eps = torch.finfo(batch.views[j].dtype).eps if batch.views[j].dtype != torch.float32 else 0.0
            src = batch.views[j].float()
            y0, x0, ch, cw = (t.to(src.device) for t in draw.boxes[k])
            assert torch.equal(torch.stack([ch, cw]).cpu(), torch.stack(box_size(raw_lam, sizes[j], sizes[j])))
            assert ((y0 >= 0) & (y0 + ch <= sizes[j]) & (x0 >= 0) & (x0 + cw <= sizes[j])).all()
            method = draw.method.to(src.device)
            ref = apply_mix(src, raw_lam.to(src.device), method, y0, x0, ch, cw)
            got = batch.mixed_views[k].float()
            ops = draw.ops(k)
            for i in range(n):
                op = int(ops[i])
                seen_ops.add(op)
                tol = TOL[op] + eps * 2 * src.abs().max().item()
                err = (got[i] - ref[i]).abs().max().item()
                assert err <= tol, (f"view {j} sample {i} op {op}: max error {err}", tol)
            # the lam of every mixed view is its own area-corrected one; the batch reports the first view's
            lam_k = torch.where(draw.method == MIXUP, raw_lam, box_lam(ch.cpu(), cw.cpu(), sizes[j], sizes[j]))
            assert torch.equal(batch.mixed_lam[k].cpu(), lam_k) and torch.equal(draw.lams[k], lam_k)
            if k == 0:
                assert torch.equal(batch.lam.cpu(), lam_k)
    return seen_ops


@pytest.mark.timeout(120)
@pytest.mark.parametrize("methods,forced", [(("mixup",), MIXUP), (("cutmix",), CUTMIX),
                                            (("resizemix",), RESIZEMIX), (ALL, None)],
                         ids=["mixup", "cutmix", "resizemix", "all"])
def test_graph_mixing_equals_apply_mix_byol2(folder, methods, forced):
    recipe = small_byol2(methods)
    dl = loader(folder, recipe, mix_in_graph=True)
    assert dl.mix_in_graph
    ops = check_graph_mixing(dl, recipe, forced)
    assert forced is None or forced in ops


@pytest.mark.timeout(120)
def test_extreme_lams_empty_and_full_boxes(folder):
    """Beta(0.02, 0.02) puts lam near 0 or 1: boxes of zero area (the pass-through branch) and whole-image
    boxes both occur, and still match apply_mix."""
    recipe = small_byol2(("cutmix", "resizemix"))
    recipe = replace(recipe, mix=replace(recipe.mix, alpha=0.02))
    dl = loader(folder, recipe, mix_in_graph=True, drop_last=True)
    ops, full = set(), 0
    for epoch in range(3):
        dl.set_epoch(epoch)
        ops |= check_graph_mixing(dl, recipe)
        full += int((dl.last_mix.boxes[0][2] == 24).sum())
    assert COPY in ops and full > 0


@pytest.mark.timeout(120)
def test_graph_mixing_equals_apply_mix_dino_globals_and_local_boxes(folder):
    recipe = small_dino()
    dl = loader(folder, recipe, mix_in_graph=True, dtype=torch.bfloat16)
    assert recipe.mix.mixed_views == (0, 1, 3, 4)  # two globals (24 px) and the last two locals (12 px)
    check_graph_mixing(dl, recipe)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", [small_byol2(), small_dino()], ids=["byol2", "dino"])
def test_cpu_loader_gives_the_default_paths_batches(folder, recipe):
    """Same seed: same clean views, same draws (lam, method), mixed views equal within the tolerances."""
    plain = list(loader(folder, recipe))
    graph = list(loader(folder, recipe, mix_in_graph=True))
    assert [b.batch_size for b in graph] == [8, 8, 5]
    for a, b in zip(plain, graph):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views))
        assert torch.equal(a.lam, b.lam) and torch.equal(a.method, b.method)
        assert len(a.mixed_lam) == len(b.mixed_lam) == len(a.mixed_views)
        assert all(torch.equal(u, v) for u, v in zip(a.mixed_lam, b.mixed_lam))
        assert a.mixed_from == b.mixed_from
        for u, v in zip(a.mixed_views, b.mixed_views):
            assert torch.allclose(u, v, rtol=0, atol=1e-4)


@pytest.mark.timeout(60)
def test_no_mixing_means_the_plain_path_and_bad_values_are_named(folder):
    for recipe in (small_byol2(mix=False), replace(small_byol2(), mix=replace(small_byol2().mix, mixed_views=()))):
        dl = loader(folder, recipe, mix_in_graph=True, drop_last=True)
        assert not dl.mix_in_graph
        b = next(iter(dl))
        assert b.mixed_views == [] and b.lam is None and len(b.views) == 2
    with pytest.raises(ValueError, match="mix_in_graph"):
        loader(folder, small_byol2(), mix_in_graph="yes")
    with pytest.raises(ValueError, match="even batch size"):
        make_loader("dali", folder, small_byol2(), 7, device="cpu", mix_in_graph=True)


@pytest.mark.timeout(120)
def test_bad_files_are_skipped_and_refed_batches_draw_what_they_drew(folder, tmp_path, monkeypatch):
    """A file that passes the byte sniff but fails inside DALI fails its batch: the loader finds it, rebuilds the
    pipeline and re-feeds; the re-fed batches draw their mixing again from where they first drew, so the epoch's
    draws are those of the default placement (which draws after DALI) and of a run that knew the file was bad (a
    resumed run finds it anew: before 2026-11-29 its batches were mixed otherwise than the interrupted run's)."""
    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    good = (root / "class0" / "0000.jpg").read_bytes()
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8))
    bad = {str(root / "class1" / "corrupt.jpg"): good[: len(good) // 2] + garbage + b"\xff\xd9",
           str(root / "class2" / "empty.jpg"): b""}
    for path, data in bad.items():
        with open(path, "wb") as f:
            f.write(data)
    recipe = small_byol2()
    dl = loader(str(root), recipe, mix_in_graph=True)
    recoveries = []
    real_recover = type(dl)._recover
    monkeypatch.setattr(type(dl), "_recover", lambda self, err: recoveries.append(err) or real_recover(self, err))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the end-of-epoch "skipped" warning
        check_graph_mixing(dl, recipe)
    assert sorted(dl.skipped) == sorted(bad)
    assert len(recoveries) == 1  # the corrupt JPEG failed inside DALI once, then was known
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in (0, 1):  # epoch 0 finds the file (a re-feed), epoch 1 knows it
            fresh, plain = loader(str(root), recipe, mix_in_graph=True), loader(str(root), recipe)
            fresh.set_epoch(epoch), plain.set_epoch(epoch)
            dl.set_epoch(epoch)
            got, want, again = list(fresh), list(plain), list(dl)
            assert [b.batch_size for b in got] == [b.batch_size for b in want] == [b.batch_size for b in again]
            for a, b, c in zip(got, want, again):
                assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, c.indices)
                assert torch.equal(a.lam, b.lam) and torch.equal(a.method, b.method)
                assert torch.equal(a.lam, c.lam) and torch.equal(a.method, c.method)


@pytest.mark.timeout(120)
def test_bench_loaders_times_dali_variants_beside_dali(folder, tmp_path, capsys):
    from sdmp_fast.cli import main as cli_main

    out = tmp_path / "loaders.json"
    rc = cli_main(["bench", "loaders", "--data", folder, "--backends", "dali,dali-graphmix,dali-torchphoto",
                   "--size", "24",
                   "--batch-size", "4", "--warmup", "1", "--batches", "2", "--num-workers", "1", "--device", "cpu",
                   "--json", str(out)])
    assert rc == 0
    recs = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert set(recs) == {"dali", "dali-graphmix", "dali-torchphoto"}
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 and r["num_mixed_views"] == 2 for r in recs.values())
    assert cli_main(["bench", "loaders", "--data", folder, "--backends", "dali-nope", "--device", "cpu",
                     "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown ['dali-nope']" in err and "dali-graphmix" in err and "dali-torchphoto" in err


@pytest.mark.cuda
@pytest.mark.timeout(180)
@pytest.mark.parametrize("recipe,dtype", [(small_byol2(), None), (small_byol2(), torch.float16),
                                          (small_dino(), torch.bfloat16)], ids=["byol2", "byol2-fp16", "dino-bf16"])
def test_gpu_graph_mixing_equals_apply_mix(folder, recipe, dtype):
    dl = loader(folder, recipe, device="cuda", mix_in_graph=True, dtype=dtype)
    for epoch in range(2):
        dl.set_epoch(epoch)
        check_graph_mixing(dl, recipe)
    b = next(iter(dl))
    assert all(v.device.type == "cuda" for v in b.views + b.mixed_views + [b.lam, b.method, b.indices])
    assert all(v.dtype == (dtype or torch.float32) for v in b.views + b.mixed_views)
