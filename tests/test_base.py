import os
import sys

import numpy as np
import pytest
import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.pipelines.base import EpochSampler, assemble_batch, list_images, make_loader
from sdmp_fast.pipelines.recipes import byol2, dino, make_recipe


@pytest.mark.parametrize("n,b,w", [(23, 4, 1), (23, 4, 2), (10, 3, 3), (7, 8, 1)])
def test_two_epochs_cover_every_sample_once_without_drop_last(n, b, w):
    for epoch in (0, 1):
        seen = []
        for r in range(w):
            s = EpochSampler(n, b, r, w, shuffle=True, seed=5, drop_last=False)
            s.set_epoch(epoch)
            batches = s.batches()
            assert len(batches) == len(s)
            seen += torch.cat(batches).tolist()
        assert sorted(seen) == list(range(n))


def test_drop_last_gives_equal_steps_per_rank_and_disjoint_shards():
    shards = [EpochSampler(103, 8, r, 2, seed=1, drop_last=True) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51 // 8
    a, b = (set(s.indices().tolist()) for s in shards)
    assert not a & b


def test_set_epoch_reshuffles_deterministically():
    s = EpochSampler(50, 5, seed=3)
    e0 = s.indices()
    s.set_epoch(1)
    e1 = s.indices()
    s.set_epoch(0)
    assert torch.equal(e0, s.indices()) and not torch.equal(e0, e1)


def test_batch_larger_than_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size 64 is larger"):
        EpochSampler(40, 64, drop_last=True)


def test_odd_last_batch_is_left_unmixed_with_lam_one():
    r = byol2(size=8)
    views = [torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    b = assemble_batch(views, torch.zeros(3, dtype=torch.long), torch.arange(3), r, torch.Generator())
    assert torch.equal(b.lam, torch.ones(3)) and torch.equal(b.mixed_views[0], views[0])


def test_every_mixed_view_reports_its_own_exact_lam():
    """DINO-like views of two sizes, constant colour per sample: in each mixed view the fraction of pixels that
    still hold the sample's own colour is exactly that view's ``mixed_lam``; ``lam`` is the first view's (the
    smaller view's box rounds differently)."""
    import dataclasses

    from sdmp_fast.pipelines.recipes import dino

    n = 64
    recipe = dino(global_size=32, local_size=18, n_local=2, n_local_mixed=1)
    recipe = dataclasses.replace(recipe, mix=dataclasses.replace(recipe.mix, methods=("cutmix", "resizemix")))
    colours = torch.arange(1, n + 1, dtype=torch.float32)  # sample i: colour i + 1, partner n - i: all distinct
    views = [colours[:, None, None, None].expand(n, 3, s, s).contiguous() for s in (32, 32, 18, 18)]
    b = assemble_batch(views, torch.zeros(n, dtype=torch.long), torch.arange(n), recipe,
                       torch.Generator().manual_seed(0))
    assert b.mixed_from == (0, 1, 3) and len(b.mixed_lam) == 3 and torch.equal(b.lam, b.mixed_lam[0])
    for mixed, lam in zip(b.mixed_views, b.mixed_lam):
        own = (mixed == colours[:, None, None, None]).flatten(1).double().mean(1)
        assert torch.equal(own.float(), lam)
    assert not torch.equal(b.mixed_lam[0], b.mixed_lam[2])  # 18 px boxes round otherwise than 32 px ones
    moved = b.to("cpu", dtype=torch.float16)
    assert len(moved.mixed_lam) == 3 and moved.mixed_lam[2].dtype == torch.float32


def test_recipes_validate_and_name_the_setting():
    assert dino(n_local=6, n_local_mixed=3).mix.mixed_views == (0, 1, 5, 6, 7)
    assert make_recipe("byol2", size=32).num_views == 2
    with pytest.raises(ValueError, match="recipe: unknown recipe 'simclr'"):
        make_recipe("simclr")
    from dataclasses import replace
    bad = replace(byol2(), views=(replace(byol2().views[0], scale=(0.5, 0.2)),))
    with pytest.raises(ValueError, match="scale"):
        bad.validate()
    # BYOL, DINO and solo-learn resize their crops bicubically: the recipes' default
    assert {v.interpolation for r in (byol2(), dino()) for v in r.views} == {"bicubic"}
    assert {v.interpolation for v in make_recipe("dino", interpolation="bilinear").views} == {"bilinear"}
    with pytest.raises(ValueError, match="view 0: interpolation must be one of bicubic, bilinear, got 'area'"):
        make_recipe("byol2", interpolation="area")
    # blur as each method's own code: BYOL's 10%-of-side kernel, DINO's untruncated PIL filter
    assert {v.blur_kernel for v in byol2().views} == {"byol"} and {v.blur_kernel for v in dino().views} == {"pil"}
    bad = replace(byol2(), views=(replace(byol2().views[0], blur_kernel="box"),))
    with pytest.raises(ValueError, match="view 0: blur_kernel must be one of byol, pil, got 'box'"):
        bad.validate()
    small = make_recipe("dino", local_size=12)  # 13 taps fit a 12 px crop (reflection pads by 6 < 12) ...
    wide = replace(small, views=small.views[:2] + (replace(small.views[2], blur_sigma=(0.1, 5.0)),))
    with pytest.raises(ValueError, match=r"view 2: a 'pil' blur of sigma up to 5.0 takes 31 taps, too wide for size 12"):
        wide.validate()  # ... 31 taps do not (was an error from the padding at the first batch)


def test_torchvision_views_resize_with_the_recipe_interpolation():
    from torchvision.transforms import v2 as T

    from sdmp_fast.pipelines.torchvision_loader import view_transform

    for interp in ("bicubic", "bilinear"):
        spec = make_recipe("byol2", interpolation=interp).views[0]
        rrc = [t for t in view_transform(spec, (0.5,) * 3, (0.5,) * 3).transforms
               if isinstance(t, T.RandomResizedCrop)]
        assert len(rrc) == 1 and rrc[0].interpolation == T.InterpolationMode(interp) and rrc[0].antialias



def test_torchvision_blur_kernel_follows_the_recipe():
    """DINO's 96 px local crops blur with 13 taps (sigma up to 2, untruncated as DINO's PIL filter); byol2 keeps
    BYOL's 10% of the side."""
    from torchvision.transforms import v2 as T

    from sdmp_fast.pipelines.torchvision_loader import view_transform

    def taps(spec):
        [blur] = [t for a in view_transform(spec, (0.5,) * 3, (0.5,) * 3).transforms if isinstance(a, T.RandomApply)
                  for t in a.transforms if isinstance(t, T.GaussianBlur)]
        return tuple(blur.kernel_size)

    local = dino().views[2]
    assert local.size == 96 and taps(local) == (13, 13)
    assert taps(dino().views[0]) == (23, 23)
    assert taps(make_recipe("byol2", size=96).views[0]) == (9, 9)


def test_list_images_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        list_images(tmp_path)
    listing = tmp_path / "list.txt"
    (tmp_path / "my photo 2.jpg").write_bytes(b"")
    listing.write_text("a.jpg 1\nmy photo 2.jpg\n")  # a name with spaces ending in a word: a path, label -1
    assert list_images(str(listing)).labels == (1, -1)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(ValueError, match=r"data: .*photo\.jpg' is an image file, not a folder or a text file list"):
        list_images(str(tmp_path / "photo.jpg"))
    (tmp_path / "text.png").write_text("a.jpg 1\n")  # an image name whose bytes read as text: not a file list
    with pytest.raises(ValueError, match=r"data: .*text\.png' is an image file"):
        list_images(str(tmp_path / "text.png"))
    (tmp_path / "blob.bin").write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(ValueError, match=r"data: .*blob\.bin' is a file but not a text file list"):
        list_images(str(tmp_path / "blob.bin"))
    listing.write_text("a.jpg 1\nb.jpg 2.0\n")
    with pytest.raises(ValueError, match=r"list\.txt'?, line 2: label '2\.0' is not an integer"):
        list_images(str(listing))


def test_a_file_list_saved_with_a_bom_keeps_its_first_entry(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("a.jpg 1\nb.jpg 0\n".encode("utf-8-sig"))  # Notepad's "UTF-8 with BOM"
    (tmp_path / "a.jpg").write_bytes(b"")
    got = list_images(str(listing))
    assert got.files == (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")) and got.labels == (1, 0)


def test_flat_folders_are_unlabeled_and_class_folders_are_walked_like_imagefolder(tmp_path):
    from PIL import Image

    def img(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)

    flat = tmp_path / "flat"
    for name in ("b.jpg", "a.png", "c.JPEG"):
        img(flat / name)
    (flat / "notes.txt").write_text("not an image")
    got = list_images(flat)
    assert [os.path.basename(f) for f in got.files] == ["a.png", "b.jpg", "c.JPEG"]
    assert got.labels == (-1, -1, -1) and got.classes == ()
    batch = next(iter(make_loader("memory", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "byol2", 2, device="cpu",
                                  shard_id=0, num_shards=1)))
    assert (batch.labels == -1).all()  # what an unlabeled source looks like downstream
    tree = tmp_path / "tree"
    for rel in ("cat/x.jpg", "cat/deeper/y.jpg", "dog/z.jpg", "dog/sub/more/w.jpg"):
        img(tree / rel)
    img(tree / "loose.jpg")  # ImageFolder reads class folders only
    with pytest.warns(RuntimeWarning, match="not read"):
        got = list_images(tree)
    rel = [os.path.relpath(f, tree) for f in got.files]
    assert rel == ["cat/x.jpg", "cat/deeper/y.jpg", "dog/z.jpg", "dog/sub/more/w.jpg"]
    assert got.labels == (0, 0, 1, 1) and got.classes == ("cat", "dog")
    import torchvision

    ref = torchvision.datasets.ImageFolder(str(tree))
    assert [p for p, _ in ref.samples] == list(got.files) and [c for _, c in ref.samples] == list(got.labels)
    # hidden entries are not data (torchvision would read them), links back into a class are read once
    img(tree / "cat" / ".ipynb_checkpoints" / "x-checkpoint.jpg")
    img(tree / ".thumbnails" / "t.jpg")
    (tree / "cat" / "._x.jpg").write_bytes(b"macOS resource fork")
    os.symlink(".", tree / "cat" / "again")
    os.symlink(".", tree / "cat" / "and_again")
    with pytest.warns(RuntimeWarning) as caught:
        again = list_images(tree)
    assert again.files == got.files and again.classes == ("cat", "dog")
    said = " | ".join(str(w.message) for w in caught)
    assert "1 image(s) at the top level, which are not read" in said
    assert "2 folder(s) reached a second time through links are read once" in said and "cat/and_again" in said
    img(flat / ".thumbnails" / "a.jpg")  # a hidden sub-folder leaves a flat folder flat
    assert list_images(flat).labels == (-1, -1, -1)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders and no image files"):
        list_images(tmp_path / "nothing")
    (tmp_path / "only_loose" / "empty_class").mkdir(parents=True)
    img(tmp_path / "only_loose" / "top.jpg")
    with pytest.raises(ValueError, match="1 image.s. at the top level are not read"):
        list_images(tmp_path / "only_loose")


def test_numpy_integer_seed_and_shard_are_the_same_as_python_ints():
    """A seed or shard id computed with numpy (np.arange(world)) gives the batches of the same Python int; numpy's
    own int64 arithmetic overflowed in the seed mixing at the first batch, with an error naming nothing."""
    np = pytest.importorskip("numpy")
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def first(seed, shard_id, num_shards):
        loader = make_loader("memory", images, byol2(size=8), 4, device="cpu", seed=seed, shard_id=shard_id,
                             num_shards=num_shards)
        return next(iter(loader))

    want, got = first(3, 1, 2), first(np.int64(3), np.int64(1), np.int32(2))
    torch.testing.assert_close(got.views, want.views, rtol=0, atol=0)
    torch.testing.assert_close(got.lam, want.lam, rtol=0, atol=0)
    for name, kw in (("seed", dict(seed=3.0)), ("seed", dict(seed=True)), ("shard_id", dict(shard_id=1.0)),
                     # a bool in numpy's or torch's dress was taken as 1 (operator.index takes them)
                     ("seed", dict(seed=np.bool_(True))), ("seed", dict(seed=torch.tensor(True))),
                     ("num_shards", dict(num_shards="2")), ("shard_id", dict(shard_id=2))):
        args = dict(seed=3, shard_id=1, num_shards=2) | kw
        with pytest.raises(ValueError, match=f"^{name}"):
            first(**args)
    with pytest.raises(ValueError, match="seed: must be an integer, got 3.0"):
        EpochSampler(16, 4, seed=3.0)


def test_make_loader_rejects_bad_settings_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown loader backend 'pil'"):
        make_loader("pil", tmp_path, "byol2", 8)
    with pytest.raises(ValueError, match="batch_size 7"):
        make_loader("torchvision", tmp_path, "byol2", 7)
    with pytest.raises(ValueError, match=r"dtype: .*torch\.uint8"):  # failed at the first batch before
        make_loader("torchvision", tmp_path, "byol2", 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="num_workers: .* -1"):
        make_loader("torchvision", tmp_path, "byol2", 8, num_workers=-1)
    with pytest.raises(ValueError, match=r"num_workers: must be an integer >= 0 and <= 1024 .*got 100000"):
        make_loader("torchvision", tmp_path, "byol2", 8, num_workers=100000)  # forked until the machine gave out
    # an option of another backend, or a recipe setting, named with what the backend takes (was a TypeError
    # from the constructor); tmp_path holds no image, so the check runs before any data is listed
    with pytest.raises(ValueError, match=r"torchvision loader: unknown option\(s\) size; it takes prefetch_factor .*"
                                         r"make_recipe\(name, size=\.\.\.\)"):
        make_loader("torchvision", tmp_path, "byol2", 8, size=32)
    with pytest.raises(ValueError, match=r"memory loader: unknown option\(s\) mix_in_graph, prefetch; it takes none"):
        make_loader("memory", "fashion-mnist", "byol2", 8, prefetch=4, mix_in_graph=True)
    # option values against the backend's annotations (were asserts / TypeErrors inside, or "off" read as True)
    for backend, opts, message in (
            ("torchvision", {"prefetch_factor": 0}, "torchvision loader: prefetch_factor: expected an integer >= 1"),
            ("torchvision", {"prefetch_factor": 2.5}, "prefetch_factor: expected an integer >= 1 and <= 64, got 2.5"),
            ("torch-gpu", {"prefetch": "x"}, "torch-gpu loader: prefetch: expected an integer >= 1 and <= 64, got 'x'"),
            ("dali", {"conditionals": "off"}, "dali loader: conditionals: expected True or False or None"),
            ("dali", {"read_threads": -3}, "dali loader: read_threads: expected an integer >= 0 and <= 1024 or None"),
            # past the bounds a count is a typo the backends do not refuse: a prefetch_factor of 10**9 spun in
            # DataLoader's start-up (after the trainer had written its run folder), DALI started 10**9 threads
            ("torchvision", {"prefetch_factor": 10**9}, r"prefetch_factor: expected an integer >= 1 and <= 64, "),
            ("torch-gpu", {"prefetch": 65}, r"prefetch: expected an integer >= 1 and <= 64, got 65"),
            ("dali", {"prefetch_queue_depth": 65}, r"prefetch_queue_depth: expected an integer >= 1 and <= 64"),
            ("dali", {"num_threads": 1025}, r"num_threads: expected an integer >= 0 and <= 1024 or None"),
            ("ffcv", {"batches_ahead": 65}, r"batches_ahead: expected an integer >= 1 and <= 64")):
        with pytest.raises(ValueError, match=message):
            make_loader(backend, tmp_path, "byol2", 8, device="cpu", **opts)
    with pytest.raises(ValueError, match="device: not a device, 'gpu'"):
        make_loader("torchvision", tmp_path, "byol2", 8, device="gpu")


def test_make_loader_names_a_cuda_device_it_cannot_see(tmp_path, monkeypatch):
    """A CUDA device that is not there is a ValueError naming `device` (it was torch's "Found no NVIDIA driver"
    or "invalid device ordinal" at the loader's first tensor on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("dali", "torch-gpu", "memory", "torchvision"):
        with pytest.raises(ValueError, match=r"device: cuda:1 asked for, but this process sees no CUDA device"):
            make_loader(backend, tmp_path, "byol2", 8, device="cuda:1")
    assert make_loader("memory", torch.zeros(8, 3, 8, 8, dtype=torch.uint8), "byol2", 8).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match=r"device: cuda:1 asked for, but this process sees 1 CUDA device\(s\) "
                                         r"\(CUDA_VISIBLE_DEVICES=3\)"):
        make_loader("torch-gpu", tmp_path, "byol2", 8, device="cuda:1")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loaders_mix_through_the_fused_kernel(monkeypatch):
    # Every loader's batch-flip mixing goes through sdmp_fast.kernels.mix_views: one launch for all views on a
    # GPU, the reference elsewhere, same draws either way. The kernels' CPU emulation stands in for the GPU.
    from sdmp_fast.kernels import _ext, batch_mix, build
    imgs = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    rec = dino(global_size=16, local_size=8, n_local=2, n_local_mixed=1)

    def batches():
        return list(make_loader("memory", imgs, rec, 4, device="cpu", shard_id=0, num_shards=1, seed=3))

    ref = batches()
    calls = []
    launch = batch_mix.apply_mix_views
    monkeypatch.setattr(batch_mix, "apply_mix_views", lambda *a, **k: calls.append(1) or launch(*a, **k))
    _ext.set_cpu_emulation(build.load_emulated())
    try:
        got = batches()
    finally:
        _ext.set_cpu_emulation(None)
    assert len(calls) == len(ref) == 2
    for a, b in zip(ref, got):
        for x, y in zip(a.views + a.mixed_views, b.views + b.mixed_views):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.lam, b.lam) and torch.equal(a.method, b.method)


@pytest.mark.cuda
def test_assemble_batch_on_cuda_never_syncs_with_the_host():
    dev = torch.device("cuda")
    rec = dino(global_size=32, local_size=16, n_local=2, n_local_mixed=1)
    views = [torch.rand(8, 3, s, s, device=dev) for s in (32, 32, 16, 16)]
    labels, idx = torch.zeros(8, dtype=torch.long, device=dev), torch.arange(8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    assemble_batch(views, labels, idx, rec, g)  # warm-up: cached constants, kernels built or loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = assemble_batch(views, labels, idx, rec, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batch.mixed_views) == 3 and batch.lam.is_cuda


def test_a_pass_without_set_epoch_runs_the_next_epoch():
    # lightly's examples and single-GPU moco-v3 never call set_epoch: each pass must still be a new epoch
    imgs = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    loader = make_loader("memory", imgs, byol2(size=8), 4, device="cpu", shard_id=0, num_shards=1, seed=2)
    first = [b.indices.tolist() for b in loader]
    second = [b.indices.tolist() for b in loader]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(16))
    loader.set_epoch(0)  # an explicit epoch wins: the first pass again, bit for bit
    again = list(loader)
    assert [b.indices.tolist() for b in again] == first
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader)).views[0], again[0].views[0])


def test_an_empty_shard_has_no_batch():
    s = EpochSampler(3, 2, shard_id=3, num_shards=4, drop_last=False)
    assert len(s) == 0 and s.batches() == []
    imgs = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    loader = make_loader("memory", imgs, byol2(size=8), 2, device="cpu", shard_id=3, num_shards=4, drop_last=False)
    assert len(loader) == 0 and list(loader) == []


def test_shards_from_torchrun_environment_before_init(monkeypatch):
    imgs = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    with pytest.raises(ValueError, match="shard_id / num_shards: give both or neither"):
        make_loader("memory", imgs, byol2(size=8), 2, device="cpu", shard_id=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # torchrun's variables; the process group is not initialised yet
    loader = make_loader("memory", imgs, byol2(size=8), 2, device="cpu")
    assert (loader.sampler.shard_id, loader.sampler.num_shards) == (1, 2)
    monkeypatch.delenv("RANK")
    with pytest.warns(RuntimeWarning, match="WORLD_SIZE=2 but no RANK.*until torch.distributed is initialised"):
        loader = make_loader("memory", imgs, byol2(size=8), 2, device="cpu")
    assert loader.sampler.num_shards == 1
    monkeypatch.setenv("RANK", "2")  # not a rank of WORLD_SIZE=2: an error, not a warning about a missing RANK
    with pytest.raises(ValueError, match=r"RANK='2' is not a rank of WORLD_SIZE=2"):
        make_loader("memory", imgs, byol2(size=8), 2, device="cpu")


def _no_launcher_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def _dali_loader_read_once(tmp_path):
    """A DALI loader made and read before any process group: its pipeline belongs to the single-process shard."""
    from sdmp_fast.data import make_synthetic_image_folder

    data = make_synthetic_image_folder(str(tmp_path / "d"), 2, 8)
    early = make_loader("dali", data, byol2(size=16), 4, device="cpu", num_workers=0, seed=4)
    started = iter(early)
    next(started)
    return data, early, started


def _fake_process_group(monkeypatch, rank, world):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["memory", "torchvision", "dali"])
def test_a_loader_made_before_the_process_group_takes_its_shard_once_it_exists(backend, monkeypatch, tmp_path):
    """Lightning (solo-learn's trainer): rank 0 makes the loader before the launcher starts the other processes
    (no RANK, no WORLD_SIZE, no process group), then the group is initialised: the loader's first len / set_epoch /
    iter after that follow it, and its batches are those of a loader made for that shard. A shard given
    explicitly stays."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from sdmp_fast.data import make_synthetic_image_folder

    _no_launcher_env(monkeypatch)
    data = make_synthetic_image_folder(str(tmp_path / "d"), 2, 8)
    if backend == "memory":
        data = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kw = dict(device="cpu", num_workers=0, seed=4)
    early = make_loader(backend, data, byol2(size=16), 4, **kw)
    given = make_loader(backend, data, byol2(size=16), 4, shard_id=0, num_shards=1, **kw)
    assert len(early) == 4
    _fake_process_group(monkeypatch, 1, 2)
    assert len(early) == 2 and (early.sampler.shard_id, early.sampler.num_shards) == (1, 2)
    assert len(given) == 4  # what the caller set is kept
    mine = make_loader(backend, data, byol2(size=16), 4, shard_id=1, num_shards=2, **kw)
    for epoch in range(2):
        early.set_epoch(epoch)
        mine.set_epoch(epoch)
        for a, b in zip(early, mine, strict=True):
            assert torch.equal(a.indices, b.indices)
            assert all(torch.equal(u, v) for u, v in zip(a.views + a.mixed_views, b.views + b.mixed_views))


def test_a_dataloader_view_of_a_loader_made_before_the_group_follows_it(monkeypatch):
    from sdmp_fast.pipelines import adapters

    _no_launcher_env(monkeypatch)
    imgs = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    dl = adapters.as_dataloader(adapters.as_dino(make_loader("memory", imgs, byol2(size=8), 4, device="cpu")))
    _fake_process_group(monkeypatch, 1, 2)
    assert len(dl.sampler) == 8 and list(dl.sampler)[:2] == list(
        EpochSampler(16, 4, 1, 2, seed=0).indices(0)[:2].tolist())  # Lightning reads the sampler first


def test_a_loader_already_read_follows_the_group_too_dali_rebuilding_its_pipeline(monkeypatch, tmp_path):
    pytest.importorskip("nvidia.dali")
    _no_launcher_env(monkeypatch)
    data, early, _ = _dali_loader_read_once(tmp_path)  # an epoch left early
    _fake_process_group(monkeypatch, 0, 2)
    early.set_epoch(0)
    mine = make_loader("dali", data, byol2(size=16), 4, device="cpu", num_workers=0, seed=4, shard_id=0,
                       num_shards=2)
    a, b = list(early), list(mine)
    assert len(a) == len(b) == 2
    assert all(torch.equal(x.views[0], y.views[0]) and torch.equal(x.indices, y.indices) for x, y in zip(a, b))


def test_a_shard_too_small_for_a_batch_fails_at_every_call_not_only_the_first(monkeypatch):
    """16 samples over 4 ranks leave 4 per shard, fewer than a batch of 6 with drop_last: the loader must not
    quietly go on reading the whole data set after the first call raised."""
    _no_launcher_env(monkeypatch)
    imgs = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    early = make_loader("memory", imgs, byol2(size=8), 6, device="cpu")
    assert len(early) == 2
    _fake_process_group(monkeypatch, 1, 4)
    for call in (len, lambda l: l.set_epoch(0), iter, len):
        with pytest.raises(ValueError, match="larger than shard 1"):
            call(early)
    assert (early.sampler.shard_id, early.sampler.num_shards) == (0, 1)


def test_a_dali_pass_begun_before_the_group_is_superseded_when_the_loader_follows_it(monkeypatch, tmp_path):
    pytest.importorskip("nvidia.dali")
    _no_launcher_env(monkeypatch)
    _, early, old = _dali_loader_read_once(tmp_path)
    _fake_process_group(monkeypatch, 0, 2)
    assert len(early) == 2  # follows the group: the old pass's pipeline is gone
    with pytest.raises(RuntimeError, match="new pass"):
        next(old)


class _CountingLoader:
    """Batches are (epoch, index) labels; epochs of ``per_epoch`` batches (0 = an empty epoch)."""

    def __init__(self, per_epoch=3, skip=False):
        self.per_epoch, self.epoch, self.reads = per_epoch, 0, 0
        if skip:
            self.skip_batches = self._skip
        self._from = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _skip(self, k):
        self._from = k

    def __iter__(self):
        start, self._from = self._from, 0
        for i in range(start, self.per_epoch):
            self.reads += 1
            t = torch.tensor([self.epoch, i])
            yield SDMPBatch([t[None].float()], t[:1], t[1:])


@pytest.mark.parametrize("skip", [False, True])
def test_resume_batches_continue_where_the_run_stopped(skip):
    from sdmp_fast.pipelines import resume_batches

    from itertools import islice

    ref = [(e, i, b.views[0].tolist()) for e, i, b in islice(resume_batches(_CountingLoader()), 8)]
    loader = _CountingLoader(skip=skip)
    resumed = [(e, i, b.views[0].tolist()) for e, i, b in islice(resume_batches(loader, 1, 2), 3)]
    assert resumed == ref[5:8] == [(1, 2, [[1.0, 2.0]]), (2, 0, [[2.0, 0.0]]), (2, 1, [[2.0, 1.0]])]
    assert loader.reads == (3 if skip else 5)  # without skip_batches the first 2 batches are read and dropped


def test_resume_batches_name_an_epoch_without_batches():
    from sdmp_fast.pipelines import EmptyEpochError, resume_batches

    with pytest.raises(EmptyEpochError, match="epoch 4 gave no batch"):
        next(resume_batches(_CountingLoader(per_epoch=0), 4))


def test_make_loader_names_the_extra_of_a_missing_backend_package(tmp_path, monkeypatch):
    """DALI or FFCV not installed: a ModuleNotFoundError naming the package and `pip install 'sdmp-fast[...]'`
    from make_loader (DALI's was a traceback from the first batch, after `sdmp-fast train` had written its --out)."""
    for backend, package in (("dali", "nvidia.dali"), ("ffcv", "ffcv")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, package, None)  # import -> ImportError, as where it is not installed
            with pytest.raises(ModuleNotFoundError, match=rf"the {backend} loader needs {package}, which is not "
                                                          rf"installed here: pip install 'sdmp-fast\[{backend}\]'"):
                make_loader(backend, tmp_path, "byol2", 8, device="cpu")
    # a bad option of the backend is still named first (it needs no DALI to be found)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "nvidia.dali", None)
        with pytest.raises(ValueError, match="dali loader: unknown option"):
            make_loader("dali", tmp_path, "byol2", 8, device="cpu", bogus=1)


def _img(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def test_a_folder_linked_from_another_class_is_read_once_under_its_own_class(tmp_path):
    """cat/more_dogs -> ../dog and a class 'all' -> the root listed dog's images three times under three labels
    (the folders seen were reset for each class)."""
    tree = tmp_path / "tree"
    for rel in ("cat/c.jpg", "dog/d.jpg", "dog/sub/e.jpg"):
        _img(tree / rel)
    os.symlink("../dog", tree / "cat" / "more_dogs")
    os.symlink(".", tree / "all")
    os.symlink("dog", tree / "hound")  # a second class folder that is the same folder
    with pytest.warns(RuntimeWarning, match=r"3 folder\(s\) reached a second time through links are read once"):
        got = list_images(tree)
    assert got.classes == ("all", "cat", "dog", "hound")
    rel = [(os.path.relpath(f, tree), y) for f, y in zip(got.files, got.labels)]
    assert rel == [("cat/c.jpg", 1), ("dog/d.jpg", 2), ("dog/sub/e.jpg", 2)]


def test_a_folder_named_like_an_image_is_a_class_not_a_loose_image(tmp_path):
    _img(tmp_path / "x.jpg" / "a.png")
    _img(tmp_path / "y" / "b.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned of "1 image(s) at the top level, which are not read"
        got = list_images(tmp_path)
    assert got.classes == ("x.jpg", "y") and got.labels == (0, 1)


def test_a_file_list_naming_files_that_are_not_utf8_is_read(tmp_path):
    name = "caf\xe9.png".encode("latin-1")
    try:
        with open(os.path.join(os.fsencode(str(tmp_path)), name), "wb") as f:
            f.write(b"x")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    (tmp_path / "list.txt").write_bytes(name + b" 0\n")
    got = list_images(str(tmp_path / "list.txt"))
    assert [os.fsencode(f) for f in got.files] == [os.path.join(os.fsencode(str(tmp_path)), name)]
    assert got.labels == (0,)


def test_a_file_list_whose_paths_are_not_there_is_refused_when_read(tmp_path):
    """A list written from another folder failed an epoch later with 'gave no batch'; the paths are now tried at
    once (its first few) and the error says where relative paths are read from."""
    (tmp_path / "data").mkdir()
    _img(tmp_path / "data" / "a.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("# made by find\ndata/a.png 0\n")
    with pytest.raises(ValueError, match=r"none of the 1 files tried exists \('data/a.png' is read as .*lists/data/"
                                         r"a.png'\); relative paths are read from the list's own folder"):
        list_images(str(tmp_path / "lists" / "train.txt"))
    # the names alone (as_lightly's data=: a .beton's source list, the images elsewhere) are not checked
    assert list_images(str(tmp_path / "lists" / "train.txt"), check_files=False).files[0].endswith("lists/data/a.png")
    (tmp_path / "lists" / "train.txt").write_text("../data/a.png 0\n")
    assert list_images(str(tmp_path / "lists" / "train.txt")).labels == (0,)
    # entries tried across the list: one whose first 8 files are gone is still read (the loaders name them)
    (tmp_path / "lists" / "train.txt").write_text("".join(f"../data/gone{k}.png\n" for k in range(8)) +
                                                  "../data/a.png\n" * 100)
    assert len(list_images(str(tmp_path / "lists" / "train.txt"))) == 108


def test_a_hand_built_recipe_is_checked_for_types_lengths_and_finite_values():
    """A recipe made with dataclasses.replace is no typed input: a zero std or a NaN jitter made inf / NaN views,
    a 1-tuple scale or a float count failed at the first batch naming nothing, mix.per_batch="no" was truthy."""
    from dataclasses import replace

    r = byol2(size=64)
    v = r.views[0]
    nan, inf = float("nan"), float("inf")
    for change, message in (
            (dict(std=(0.0, 0.224, 0.225)), r"std must be > 0 per channel"),
            (dict(mean=(0.5, 0.5)), r"mean must be 3 finite numbers, got \(0.5, 0.5\)"),
            (dict(mean=(nan, 0.4, 0.4)), r"mean must be 3 finite numbers"),
            (dict(views=(replace(v, brightness=nan), v)), r"view 0: brightness must be a finite number, got nan"),
            (dict(views=(replace(v, count=1.5), v)), r"view 0: count must be an integer >= 0, got 1.5"),
            (dict(views=(replace(v, count=True), v)), r"view 0: count must be an integer >= 0, got True"),
            (dict(views=(replace(v, ratio=(0.5, inf)), v)), r"view 0: ratio must be 2 finite numbers"),
            (dict(views=(replace(v, scale=(0.5,)), v)), r"view 0: scale must be 2 finite numbers, got \(0.5,\)"),
            (dict(views=(replace(v, blur_sigma=1.0), v)), r"view 0: blur_sigma must be 2 finite numbers, got 1.0"),
            (dict(views=(replace(v, hflip_p="0.5"), v)), r"view 0: hflip_p must be a finite number, got '0.5'"),
            (dict(mix=replace(r.mix, per_batch="no")), r"mix.per_batch must be True or False, got 'no'"),
            (dict(mix=replace(r.mix, mixed_views=(0.0,))), r"mix.mixed_views must be a tuple of view indices"),
            (dict(mix=replace(r.mix, alpha=inf)), r"mix.alpha must be a finite number, got inf")):
        with pytest.raises(ValueError, match=r"recipe 'byol2'.*" + message):
            replace(r, **change).validate()
        with pytest.raises(ValueError, match=message):  # make_loader checks it before reading anything
            make_loader("memory", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), replace(r, **change), 2, device="cpu",
                        shard_id=0, num_shards=1)
    fixed = replace(r, views=(replace(v, blur_sigma=(1.0, 1.0)), r.views[1]))
    assert fixed.validate() is fixed  # one sigma: taken, and every backend takes it (DALI's draw refused it)
    # what worked before stays taken: numpy counts and view indices, 0 / 1 for a switch
    assert make_recipe("byol2", mix=1).mix.enabled == 1
    assert make_recipe("dino", n_local=np.int64(6), n_local_mixed=3).num_views == 8
    assert replace(r, views=(replace(v, count=np.int64(2)),),
                   mix=replace(r.mix, mixed_views=tuple(np.arange(2)))).validate().num_views == 2


def test_real_paths_win_over_links_whatever_their_order(tmp_path):
    """cat/borrowed -> ../dog/puppies was walked (cat sorts first) before dog's own tree: the puppies were
    labelled cat and their real folder named as the duplicate. Real folders are now read first, links after."""
    tree = tmp_path / "tree"
    for rel in ("cat/c.jpg", "dog/d.jpg", "dog/puppies/p.jpg", "zeta/z.jpg"):
        _img(tree / rel)
    _img(tmp_path / "outside" / "o.jpg")
    os.symlink("../dog/puppies", tree / "cat" / "borrowed")
    os.symlink("zeta", tree / "alias")  # a class folder that is a link, sorting before its target
    os.symlink("../../outside", tree / "dog" / "more")  # a link out of the tree: read, under dog
    with pytest.warns(RuntimeWarning, match=r"2 folder\(s\) reached a second time .*cat/borrowed' \(the folder "
                                            r"'.*dog/puppies'\)"):
        got = list_images(tree)
    rel = [(os.path.relpath(f, tree), got.classes[y]) for f, y in zip(got.files, got.labels)]
    assert rel == [("cat/c.jpg", "cat"), ("dog/d.jpg", "dog"), ("dog/more/o.jpg", "dog"),
                   ("dog/puppies/p.jpg", "dog"), ("zeta/z.jpg", "zeta")]
