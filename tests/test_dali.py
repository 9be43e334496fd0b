"""DALI backend (CPU mode in CI; the GPU-mode checks are marked cuda): shapes, dtypes and value ranges of both
recipes, mixing, exact epochs and shards, bad files skipped and named, and the CPU mixer equal to
assemble_batch."""
import io
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from sdmp_fast.data import make_synthetic_image_folder  # noqa: E402
from sdmp_fast.pipelines.base import assemble_batch, make_generator, make_loader  # noqa: E402
from sdmp_fast.pipelines.image_bytes import sniff_image  # noqa: E402
from sdmp_fast.pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD, byol2, dino  # noqa: E402

N_CLASSES, PER_CLASS = 3, 8
N = N_CLASSES * PER_CLASS
# Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std] per channel.
LO = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HI = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_image_folder(str(tmp_path_factory.mktemp("dali") / "data"), N_CLASSES, PER_CLASS)


def small_dino(**kw):
    return dino(global_size=32, local_size=16, n_local=4, n_local_mixed=2, **kw)


def dali(folder, recipe, batch_size=8, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("num_shards", 1)
    kw.setdefault("shard_id", 0)
    return make_loader("dali", folder, recipe, batch_size, **kw)


def check_batch(batch, recipe, n, dtype=torch.float32, device="cpu", mixed=True):
    sizes = [v.size for v in recipe.expanded_views()]
    assert [tuple(v.shape) for v in batch.views] == [(n, 3, s, s) for s in sizes]
    for v in batch.views + batch.mixed_views:
        assert v.dtype == dtype and v.device.type == device
        f = v.float()
        assert torch.isfinite(f).all()
        assert f.min() >= LO - 0.02 and f.max() <= HI + 0.02
        assert f.std() > 0.05  # real image content, not a constant
    assert batch.labels.dtype == torch.int64 and batch.indices.dtype == torch.int64
    assert batch.labels.shape == batch.indices.shape == (n,)
    assert batch.mixed_from == recipe.mix.mixed_views
    assert len(batch.mixed_views) == len(recipe.mix.mixed_views)
    for j, src in enumerate(batch.mixed_from):
        assert batch.mixed_views[j].shape == batch.views[src].shape
        assert torch.equal(batch.mixed_views[j], batch.views[src]) != mixed  # mixing changed the images
    assert batch.lam.shape == (n,) and batch.lam.dtype == torch.float32
    assert ((batch.lam >= 0) & (batch.lam <= 1)).all()
    assert (batch.lam < 1).any() == mixed
    assert set(batch.method.tolist()) <= {0, 1, 2}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe,dtype", [(byol2(size=32), None), (small_dino(), torch.bfloat16)],
                         ids=["byol2", "dino-bf16"])
def test_recipe_shapes_dtypes_ranges_and_mixing(folder, recipe, dtype):
    loader = dali(folder, recipe, dtype=dtype)
    assert len(loader) == N // 8
    batches = list(loader)
    assert len(batches) == len(loader)
    for b in batches:
        check_batch(b, recipe, 8, dtype or torch.float32)
        assert torch.equal(b.labels, b.indices // PER_CLASS)  # class folders hold consecutive indices
    # Per-sample randomness: two views of one image differ, and so do the same view of different images.
    b = batches[0]
    assert not torch.equal(b.views[0], b.views[1])


@pytest.mark.timeout(120)
def test_two_epochs_cover_every_sample_once_without_drop_last(folder):
    loader = dali(folder, byol2(size=32), batch_size=10, drop_last=False)
    assert len(loader) == 3  # 10 + 10 + 4
    orders, held = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = []
        for b in loader:
            batches.append(b)
            held.append((b, [v.clone() for v in b.views]))
        assert [b.batch_size for b in batches] == [10, 10, 4]
        seen = torch.cat([b.indices for b in batches])
        assert sorted(seen.tolist()) == list(range(N))
        orders.append(seen.tolist())
    assert orders[0] != orders[1]  # reshuffled per epoch
    # Views are zero-copy DALI buffers: later batches must not overwrite the ones a caller still holds.
    assert all(torch.equal(v, c) for b, copies in held for v, c in zip(b.views, copies))
    # An epoch abandoned after one batch does not leak into the next one.
    next(iter(loader))
    seen = torch.cat([b.indices for b in loader])
    assert sorted(seen.tolist()) == list(range(N))


@pytest.mark.timeout(120)
def test_two_shards_are_disjoint_and_cover(folder):
    seen = []
    for rank in range(2):
        loader = dali(folder, byol2(size=32, mix=False), batch_size=4, shard_id=rank, num_shards=2,
                      drop_last=False, seed=3)
        assert len(loader) == 3
        seen.append(torch.cat([b.indices for b in loader]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N))


def _jpeg_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_bad_files_are_skipped_named_and_odd_formats_decode(folder, tmp_path):
    from PIL import Image

    root = str(tmp_path / "bad")
    shutil.copytree(folder, root)
    good = open(os.path.join(root, "class0", "0000.jpg"), "rb").read()
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8))
    bad = {
        # intact header and end marker, garbage scan data: passes the sniff, fails inside DALI
        os.path.join(root, "class0", "corrupt.jpg"): good[: len(good) // 2] + garbage + b"\xff\xd9",
        os.path.join(root, "class1", "truncated.jpg"): good[: len(good) // 2],
        os.path.join(root, "class1", "empty.jpg"): b"",
        os.path.join(root, "class2", "notes.jpg"): b"this is a text file, not an image\n" * 10,
    }
    for path, data in bad.items():
        with open(path, "wb") as f:
            f.write(data)
    odd = {  # must decode to RGB and be used
        "gray.png": lambda p: Image.fromarray(np.full((30, 40), 90, np.uint8)).save(p),
        "cmyk.jpg": lambda p: open(p, "wb").write(_jpeg_bytes(Image.new("CMYK", (40, 30), (10, 200, 30, 40)))),
        "rgba.png": lambda p: Image.new("RGBA", (40, 30), (200, 20, 30, 128)).save(p),
    }
    for name, write in odd.items():
        write(os.path.join(root, "class2", name))

    loader = dali(root, byol2(size=32), batch_size=8, drop_last=False)
    files = loader.images.files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    for b in batches:  # an odd last batch (nothing skipped in it) is left unmixed, as in every backend
        check_batch(b, byol2(size=32), b.batch_size, mixed=b.batch_size % 2 == 0)
    assert sorted(loader.skipped) == sorted(bad)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and all(os.path.basename(p) in messages[0] for p in bad)
    assert "DALI decode failed (jpeg data)" in messages[0]  # the garbage-scan file: the format DALI was given
    used = [files[i] for b in batches for i in b.indices.tolist()]
    assert len(used) == len(set(used))
    assert not set(used) & set(bad)
    # every decodable file is used, except the few dropped to keep mixed batches even (counted)
    decodable = len(files) - len(bad)
    assert len(used) == decodable - loader.log.trimmed and loader.log.trimmed <= len(bad)
    # a second epoch skips the known-bad files without failing again, and names them again
    trimmed = loader.log.trimmed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader.set_epoch(1)
        n2 = sum(b.batch_size for b in loader)
    assert n2 == decodable - (loader.log.trimmed - trimmed)
    assert sorted(loader.skipped) == sorted(bad)
    assert any("skipped 4" in str(w.message) for w in caught)


@pytest.mark.timeout(60)
def test_sniff_rejects_what_no_decoder_can_use():
    from PIL import Image

    assert sniff_image(_jpeg_bytes(Image.new("RGB", (8, 8)))) is None
    assert sniff_image(b"") == "empty file"
    assert "not an image" in sniff_image(b"hello world")
    assert "truncated" in sniff_image(_jpeg_bytes(Image.new("RGB", (64, 64)))[:-10])


@pytest.mark.timeout(60)
def test_bad_settings_are_named(folder):
    with pytest.raises(ValueError, match="dtype"):
        dali(folder, byol2(size=32), dtype=torch.int8)
    with pytest.raises(ValueError, match="prefetch_queue_depth"):
        dali(folder, byol2(size=32), prefetch_queue_depth=0)
    # a misspelt decoder option is named when the loader is made, not at its first batch inside DALI's traceback
    with pytest.raises(ValueError, match="decoder_options: 'hw_decoder_laod' .*hw_decoder_load"):
        dali(folder, byol2(size=32), decoder_options={"hw_decoder_laod": 0.9})
    with pytest.raises(ValueError, match="decoder_options: 'output_type'"):  # the loader's own
        dali(folder, byol2(size=32), decoder_options={"output_type": 0})
    with pytest.raises(ValueError, match="decoder_options: expected a dict"):
        dali(folder, byol2(size=32), decoder_options=["use_fast_idct"])
    with pytest.raises(ValueError, match="decoder_options .*hw_decoder_load.*refuses a value.*'x'"):
        dali(folder, byol2(size=32), decoder_options={"hw_decoder_load": "x"})


def _recording_crops(monkeypatch):
    """Patch DaliLoader._augment to keep a copy of the uint8 crops each batch hands it."""
    from sdmp_fast.pipelines.dali import DaliLoader

    seen, real = [], DaliLoader._augment

    def recording(self, crops, generator):
        seen.append([c.clone() for c in crops])
        return real(self, crops, generator)

    monkeypatch.setattr(DaliLoader, "_augment", recording)
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", [byol2(size=32), small_dino()], ids=["byol2", "dino"])
def test_photometric_torch_is_device_ops_on_the_graphs_crops(folder, recipe, monkeypatch):
    """photometric='torch': the DALI graph only crops (uint8 CHW); flip, colour jitter, grayscale, blur, solarize
    and normalisation are device_ops' (each checked against torchvision in test_device_ops.py), one batch per
    view spec, drawn from the epoch's generator before the mixing."""
    from sdmp_fast.pipelines import device_ops

    seen = _recording_crops(monkeypatch)
    batches = list(dali(folder, recipe, photometric="torch", seed=3))
    assert len(seen) == len(batches) == N // 8
    gen = make_generator(3, 0, 0, "cpu")
    for b, crops in zip(batches, seen):
        check_batch(b, recipe, 8)
        assert [(c.dtype, tuple(c.shape)) for c in crops] == \
            [(torch.uint8, (8, 3, v.size, v.size)) for v in recipe.expanded_views()]
        views, k0 = [], 0
        for spec in recipe.views:
            x = torch.cat(crops[k0:k0 + spec.count]).float() / 255
            k0 += spec.count
            views += device_ops.normalize(device_ops.augment(x, spec, gen), recipe.mean, recipe.std).split(8)
        want = assemble_batch(views, b.labels, b.indices, recipe, gen)
        for got, exp in zip(b.views + b.mixed_views, want.views + want.mixed_views):
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
        assert torch.equal(b.lam, want.lam) and torch.equal(b.method, want.method)


@pytest.mark.timeout(120)
def test_photometric_torch_crops_do_not_depend_on_the_colour_settings(folder, monkeypatch):
    """In photometric='torch' mode the graph holds no colour op: a recipe without any photometric augmentation
    gets the very same crops (DALI's crop randomness is untouched), and its views are those crops normalised."""
    import dataclasses

    plain = byol2(size=32)
    bare_views = tuple(dataclasses.replace(v, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, hflip_p=0.0)
                       for v in plain.views)
    bare = dataclasses.replace(plain, views=bare_views).without_mixing()
    seen = _recording_crops(monkeypatch)
    list(dali(folder, plain, photometric="torch", seed=5))
    n_plain = len(seen)
    bare_batches = list(dali(folder, bare, photometric="torch", seed=5))
    for a, b in zip(seen[:n_plain], seen[n_plain:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for batch, crops in zip(bare_batches, seen[n_plain:]):
        for view, crop in zip(batch.views, crops):
            mean = torch.tensor(plain.mean).view(1, 3, 1, 1)
            std = torch.tensor(plain.std).view(1, 3, 1, 1)
            torch.testing.assert_close(view, (crop.float() / 255 - mean) / std, rtol=0, atol=1e-5)


def test_photometric_setting_is_checked(folder):
    with pytest.raises(ValueError, match="photometric: 'dali' .* or 'torch' .*got 'exact'"):
        dali(folder, byol2(size=32), photometric="exact")
    with pytest.raises(ValueError, match="photometric='torch' cannot go with mix_in_graph=True"):
        dali(folder, byol2(size=32), photometric="torch", mix_in_graph=True)
    # without mixing, mix_in_graph changes nothing (the plain pipeline): nothing to refuse then
    assert not dali(folder, byol2(size=32).without_mixing(), photometric="torch", mix_in_graph=True).mix_in_graph


@pytest.mark.timeout(60)
def test_decoder_options_reach_the_decoder(folder):
    plain = dali(folder, byol2(size=32))
    loader = dali(folder, byol2(size=32), decoder_options={"use_fast_idct": True})
    check_batch(next(iter(loader)), byol2(size=32), 8)
    assert b"use_fast_idct" in loader._pipeline().serialize()
    assert b"use_fast_idct" not in plain._pipeline().serialize()


@pytest.mark.cuda
@pytest.mark.timeout(180)
@pytest.mark.parametrize("recipe,dtype,photometric", [(byol2(size=32), torch.float16, "dali"),
                                                      (small_dino(), torch.bfloat16, "dali"),
                                                      (small_dino(), torch.float16, "torch")],
                         ids=["byol2-fp16", "dino-bf16", "dino-fp16-torchphoto"])
def test_gpu_mode(folder, recipe, dtype, photometric):
    loader = dali(folder, recipe, batch_size=8, device="cuda", drop_last=False, dtype=dtype, photometric=photometric)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        for b in batches[:-1]:
            check_batch(b, recipe, 8, dtype, device="cuda")
        assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(N))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["mocov3", "dino"])
def test_resume_in_a_later_epoch_is_bit_exact(folder, tmp_path, method):
    """A run stopped in its second epoch and resumed in a new Trainer (a new DALI pipeline) ends with the
    uninterrupted run's parameters: DALI's augmentations follow (seed, epoch, shard), not the epochs the
    process ran before (they used to carry the random state over from epoch 0)."""
    from test_trainer import tiny_cfg

    from sdmp_fast import checkpoint as ckpt
    from sdmp_fast.trainer import Trainer

    cfg = tiny_cfg(tmp_path, method=method, loader="dali", data=folder, device="cpu", steps=5, log_every=5,
                   num_workers=2)
    assert len(Trainer(cfg).loader) == N // 8  # 3 steps per epoch: step 4 is batch 1 of epoch 1
    ref = Trainer(cfg)
    ref.fit(str(tmp_path / "ref"))
    first = Trainer(cfg)
    first.total_steps = 4
    first.fit(str(tmp_path / "run"))
    resumed = Trainer(cfg)
    _, state = ckpt.load_latest(ckpt.checkpoint_dir(str(tmp_path / "run")))
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (1, 1)
    resumed.fit(str(tmp_path / "run"))
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device,photometric", [("cpu", "dali"), ("cpu", "torch"),
                                                pytest.param("cuda", "dali", marks=pytest.mark.cuda)])
def test_state_dict_lets_a_new_loader_repeat_an_epoch(folder, device, photometric):
    """What a resumed run relies on: a new loader given state_dict() (taken mid-epoch 1, or at the end of epoch
    0) yields epoch 1 exactly as the loader that ran epoch 0 first; without it DALI's crops differ. With
    photometric='torch' the colour draws come from the epoch's generator, the crops still from DALI's state."""
    recipe = byol2(size=32)

    def dali(*a, **kw):
        return globals()["dali"](*a, device=device, photometric=photometric, **kw)

    ran = dali(folder, recipe, seed=3)
    list(ran)
    at_end_of_0 = ran.state_dict()
    ran.set_epoch(1)
    it = iter(ran)
    first = next(it)
    mid_1 = ran.state_dict()
    after = [first] + list(it)

    def epoch_1(state):
        fresh = dali(folder, recipe, seed=3)
        if state is not None:
            fresh.load_state_dict(state)
        fresh.set_epoch(1)
        return list(fresh)

    def same(a, b):
        return all(torch.equal(x.indices, y.indices) and torch.equal(x.lam, y.lam) and
                   all(torch.equal(u, v) for u, v in zip(x.views + x.mixed_views, y.views + y.mixed_views))
                   for x, y in zip(a, b))

    assert same(epoch_1(mid_1), after) and same(epoch_1(at_end_of_0), after)
    assert not same(epoch_1(None), after)  # DALI's random state really runs on from epoch to epoch
    # what a user's own trainer does (README): the state, then resume_batches from the next batch's position
    from sdmp_fast.pipelines import resume_batches
    fresh = dali(folder, recipe, seed=3)
    fresh.load_state_dict(mid_1)
    resumed = resume_batches(fresh, 1, 1)
    assert same([next(resumed)[2] for _ in after[1:]], after[1:]) and next(resumed)[:2] == (2, 0)
    pending = dali(folder, recipe, seed=3)
    pending.load_state_dict(mid_1)
    assert pending.state_dict() == mid_1  # a state loaded but not used yet is what a checkpoint must keep
    with pytest.warns(UserWarning, match="no DALI checkpoint for epoch 1"):
        fresh = dali(folder, recipe, seed=3)
        fresh.load_state_dict({"dali_epoch_starts": {7: mid_1["dali_epoch_starts"][1]}})
        fresh.set_epoch(1)
        list(fresh)
    with pytest.raises(ValueError, match="not a DALI loader state_dict"):
        fresh.load_state_dict({"epoch": 1})
    damaged = dali(folder, recipe, seed=3)  # bytes DALI cannot parse: said, and the epoch runs from a fresh state
    damaged.load_state_dict({"dali_epoch_starts": {1: b"not a DALI checkpoint"}})
    damaged.set_epoch(1)
    with pytest.warns(UserWarning, match="cannot restore the saved DALI state"):
        assert same(list(damaged), epoch_1(None))


def test_state_dict_taken_before_the_first_batch_loads_without_a_false_warning(folder):
    """A state_dict() taken before any epoch started (a checkpoint at step 0 of one's own trainer) holds no DALI
    checkpoint because there is nothing to restore yet: loading it warned that the saving run 'could not checkpoint'
    and that crops would differ, but the new loader repeats that run exactly."""
    recipe = byol2(size=32)
    before_any_batch = dali(folder, recipe, seed=3).state_dict()
    fresh = dali(folder, recipe, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(before_any_batch)
        got = list(fresh)
    ref = list(dali(folder, recipe, seed=3))
    assert len(got) == len(ref) > 0
    for x, y in zip(got, ref):
        assert torch.equal(x.indices, y.indices) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    # a state of a DALI that could not checkpoint (or one saved before the flag existed) still says so
    for state in ({"dali_epoch_starts": {}, "dali_checkpointing": False}, {"dali_epoch_starts": {}}):
        with pytest.warns(UserWarning, match="holds no DALI checkpoint"):
            dali(folder, recipe, seed=3).load_state_dict(state)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("drop_last,photometric", [(True, "dali"), (False, "dali"), (True, "torch")])
def test_state_dict_resume_is_exact_past_a_file_dali_cannot_decode(folder, tmp_path, drop_last, photometric):
    """A file that passes the byte sniff but fails inside DALI: the first run learns it in epoch 0 and skips it
    after; a resumed loader meets it again in epoch 1 and recovers. The recovery rebuilds the pipeline from
    DALI's state as of the last batch returned, so the resumed epoch still equals the first run's (it used to
    restart DALI's random state from the seed), and so does an epoch that recovered, compared with one that
    knew the file was bad."""
    root = str(tmp_path / "data")
    shutil.copytree(folder, root)
    good = open(os.path.join(root, "class0", "0000.jpg"), "rb").read()
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8))
    with open(os.path.join(root, "class1", "corrupt.jpg"), "wb") as f:
        f.write(good[: len(good) // 2] + garbage + b"\xff\xd9")
    recipe = byol2(size=32)

    def snap(b):
        return b.indices.clone(), [v.clone() for v in b.views + b.mixed_views]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x[0], y[0]) and all(torch.equal(u, v) for u, v in zip(x[1], y[1]))
                                        for x, y in zip(a, b))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped file's warning at each epoch end
        ran = dali(root, recipe, seed=3, drop_last=drop_last, photometric=photometric)
        list(ran)
        assert any(p.endswith("corrupt.jpg") for p in ran.skipped)
        ran.set_epoch(1)
        it = iter(ran)
        first = [snap(next(it))]
        mid_1 = ran.state_dict()
        e1 = first + [snap(b) for b in it]
        fresh = dali(root, recipe, seed=3, drop_last=drop_last, photometric=photometric)
        fresh.load_state_dict(mid_1)
        fresh.set_epoch(1)
        assert same([snap(b) for b in fresh], e1)
        assert any(p.endswith("corrupt.jpg") for p in fresh.skipped)  # it met the file anew and recovered


@pytest.mark.timeout(300)
def test_fault_drill_kill9_resumes_match_with_the_dali_loader(folder, tmp_path):
    """kill -9 at random points (several epochs: 3 steps each), resume from the last complete checkpoint, same
    final parameters as the uninterrupted run. In a fresh interpreter: the drill forks its runs, and this test
    process already holds DALI's threads."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sdmp_fast.cli", "drill", "--trials", "3", "--loader", "dali", "--data", folder,
           "--steps", "12", "--save-every", "2", "--workdir", str(tmp_path / "drill")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3/3 resumes matched" in done.stdout


def test_crops_resize_with_the_recipe_interpolation(folder):
    """Same seed, so the same crop boxes: bicubic and bilinear views differ only by the resampling."""
    import dataclasses

    views = {}
    for interp in ("bicubic", "bilinear"):
        r = byol2(size=32, mix=False, interpolation=interp)
        r = dataclasses.replace(r, views=tuple(dataclasses.replace(
            v, hflip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0) for v in r.views))
        loader = dali(folder, r, seed=3)
        views[interp] = next(iter(loader)).views[0]
        loader.close()
    diff = (views["bicubic"] - views["bilinear"]).abs()
    assert diff.max() > 0.01  # another filter ...
    assert diff.mean() < 0.1 * views["bilinear"].std()  # ... on the same crops


def test_num_workers_zero_is_one_dali_thread_not_every_core(folder, monkeypatch):
    """num_workers=0 is one DALI thread, as in torch-gpu (it was `0 or cores`: every core, so
    `bench loaders --num-workers 0` gave torchvision no worker and DALI all of them)."""
    from sdmp_fast.pipelines.base import loader_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert dali(folder, byol2(size=32), num_workers=0).num_threads == 1
    assert dali(folder, byol2(size=32), num_workers=3).num_threads == 3
    assert dali(folder, byol2(size=32)).num_threads == 8
    assert dali(folder, byol2(size=32), num_workers=0, num_threads=2).num_threads == 2
    assert [loader_threads(n) for n in (0, 3, None)] == [1, 3, 8]  # the solo-learn-style baseline's


# A DALI loader is built, used, then (case) dropped inside a reference cycle the parent has not collected yet,
# and the process forks: the child collects it, or exits normally (DALI's atexit hook and interpreter shutdown),
# or the fork is a torchvision DataLoader worker whose reads run the collector. Run in a fresh interpreter so the
# fork happens outside pytest; the parent gives the child 30 s.
_FORK_SCRIPT = r"""
import gc, os, sys, time
from sdmp_fast.pipelines.base import make_loader
from sdmp_fast.pipelines.recipes import byol2
folder, case = sys.argv[1], sys.argv[2]
kw = dict(device="cpu", shard_id=0, num_shards=1, shuffle=False, drop_last=False)
loader = make_loader("dali", folder, byol2(size=16), 4, **kw)
next(iter(loader))
if case != "exit":
    gc.disable()  # as a parent that has not run its collector since the loader became garbage
    loader.cycle = loader
    del loader
if case == "dataloader":
    import signal
    import sdmp_fast.pipelines.torchvision_loader as tl
    get = tl.ViewDataset.__getitem__
    tl.ViewDataset.__getitem__ = lambda self, item: (gc.collect(), get(self, item))[1]
    tv = make_loader("torchvision", folder, byol2(size=16), 4, num_workers=2, **kw)
    def hung(*_):
        raise TimeoutError("the epoch hung")
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    print("epoch", len(list(tv)), flush=True)
    sys.exit(0)
pid = os.fork()
if pid == 0:
    if case == "collected":
        gc.collect()
        os._exit(0)
    sys.exit(0)  # "exit": atexit hooks (DALI's shuts its pipelines down), then interpreter shutdown
t0 = time.time()
while time.time() - t0 < 30:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exited", status, flush=True)
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("child HUNG", flush=True)
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", ["collected", "exit", "dataloader"])
def test_a_forked_child_never_tears_down_an_inherited_dali_pipeline(folder, case, run_script):
    """The child's copy of a DALI pipeline has none of the parent's executor threads: destroying it waited for
    them for ever (a torchvision loader's DataLoader worker hung in ``Executor2::~Impl``, and with it the epoch
    and the process's exit). ``dali_fork`` keeps inherited pipelines alive and detached in the child."""
    returncode, out, err = run_script(_FORK_SCRIPT, folder, case, timeout=120)
    assert returncode == 0, err[-3000:]
    expected = f"epoch {N // 4}" if case == "dataloader" else "child exited 0"
    assert expected in out, out + err[-3000:]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("blur_p,conditionals,sigma", [(1.0, True, (3.0, 3.0)), (0.5, False, (3.0, 3.0)),
                                                       (0.5, True, (3.0, 3.0)), (1.0, True, (2.9999, 3.0)),
                                                       (0.5, False, (2.9999, 3.0))])
def test_blur_uses_the_recipe_kernel_width_and_takes_a_fixed_sigma(tmp_path, blur_p, conditionals, sigma):
    """DALI sized its blur window from each sigma (2 ceil(3 sigma) + 1: 19 taps at sigma 3) where every other
    backend cuts the kernel at the view's blur_kernel_size (BYOL's 10% of the side: 7 taps at 64 px), and a fixed
    sigma, blur_sigma=(s, s), which validate() takes, failed DALI's uniform draw. Whole-image views of square
    images (no crop randomness): each sample is either unblurred or blurred as torch's separable 7-tap filter."""
    import dataclasses

    from PIL import Image

    from sdmp_fast.pipelines import device_ops

    root = tmp_path / "steps"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        img = np.zeros((64, 64, 3), dtype=np.uint8)
        img[:, rng.integers(8, 56):] = 255  # a vertical step edge
        Image.fromarray(img).save(root / f"{k}.png")
    plain = dataclasses.replace(byol2(size=64).views[0], scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0, jitter_p=0,
                                grayscale_p=0, solarize_p=0, blur_p=0)
    blurred = dataclasses.replace(plain, blur_p=blur_p, blur_sigma=sigma)
    recipe = lambda v: dataclasses.replace(byol2(size=64, mix=False), views=(v,), mean=(0.0, 0.0, 0.0),  # noqa: E731
                                           std=(1.0, 1.0, 1.0))
    raw = next(iter(dali(str(root), recipe(plain), shuffle=False))).views[0]
    got = next(iter(dali(str(root), recipe(blurred), shuffle=False, conditionals=conditionals))).views[0]
    assert device_ops.blur_kernel_size(64, "byol") == 7
    want = device_ops.gaussian_blur(raw, torch.full((8,), 3.0), 7)
    err_blur = (got - want).abs().flatten(1).amax(1)
    err_raw = (got - raw).abs().flatten(1).amax(1)
    assert torch.all((err_blur < 2e-3) | (err_raw < 2e-3)), (err_blur, err_raw)
    n_blurred = int((err_blur < 2e-3).sum())
    assert n_blurred == 8 if blur_p == 1 else 0 < n_blurred < 8
