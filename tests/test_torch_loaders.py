"""torchvision, torch-gpu (on the CPU) and memory backends: shapes / dtypes / ranges for both recipes, mixing,
exact epochs, shards, bad files, configuration errors."""
import io
import math
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sdmp_fast.data import make_synthetic_image_folder
from sdmp_fast.pipelines.base import list_images, make_loader
from sdmp_fast.pipelines.recipes import byol2, dino
from sdmp_fast.pipelines.torch_gpu import _Bad, _Encoded, decode_cpu, exif_orientation, orient, read_sample

N_IMAGES = 18  # 3 classes x 6
BACKENDS = ("torchvision", "torch-gpu", "memory")
RECIPES = {"byol2": byol2(size=32), "dino": dino(global_size=32, local_size=16, n_local=3, n_local_mixed=2)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_image_folder(str(tmp_path_factory.mktemp("tiny")), num_classes=3, per_class=6,
                                       size=(40, 48))


@pytest.fixture(scope="module")
def arrays(folder):
    """The same images as one channels-last uint8 tensor, for the memory backend."""
    images = list_images(folder)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in images.files])
    return torch.from_numpy(pixels), torch.tensor(images.labels)


def _loader(backend, folder, arrays, recipe="byol2", batch_size=4, **kw):
    data = arrays if backend == "memory" else folder
    kw.setdefault("num_workers", 2 if backend == "torch-gpu" else 0)
    kw.setdefault("shard_id", 0)
    kw.setdefault("num_shards", 1)
    rec = RECIPES[recipe] if isinstance(recipe, str) else recipe
    return make_loader(backend, data, rec, batch_size, device="cpu", seed=3, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_views_shapes_dtypes_ranges_and_mixing(backend, recipe, folder, arrays):
    rec = RECIPES[recipe]
    dtype = torch.bfloat16 if recipe == "dino" else None
    loader = _loader(backend, folder, arrays, recipe, batch_size=6, dtype=dtype)
    assert len(loader) == N_IMAGES // 6
    batch = next(iter(loader))
    lo = min((0 - m) / s for m, s in zip(rec.mean, rec.std)) - 0.02
    hi = max((1 - m) / s for m, s in zip(rec.mean, rec.std)) + 0.02
    specs = rec.expanded_views()
    assert len(batch.views) == len(specs) and batch.batch_size == 6
    for v, spec in zip(batch.views + batch.mixed_views, specs + tuple(specs[j] for j in batch.mixed_from)):
        assert v.shape == (6, 3, spec.size, spec.size) and v.dtype == (dtype or torch.float32)
        assert lo <= v.float().min() and v.float().max() <= hi and torch.isfinite(v.float()).all()
    assert batch.labels.dtype == torch.long and ((0 <= batch.labels) & (batch.labels < 3)).all()
    # mixing: the configured views get mixed copies; lam in [0, 1]; a mixed image differs where lam < 1
    assert batch.mixed_from == rec.mix.mixed_views
    assert ((0 <= batch.lam) & (batch.lam <= 1)).all()
    for mixed, j in zip(batch.mixed_views, batch.mixed_from):
        changed = (mixed.float() - batch.views[j].float()).flatten(1).abs().amax(1) > 1e-3
        assert torch.equal(changed, batch.lam < 0.999)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_epochs_cover_every_sample_exactly_once(backend, folder, arrays):
    loader = _loader(backend, folder, arrays, batch_size=4, drop_last=False)
    assert len(loader) == 5  # 18 = 4 + 4 + 4 + 4 + 2
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen = torch.cat([b.indices for b in batches]).tolist()
        assert sorted(seen) == list(range(N_IMAGES))
        orders.append(seen)
    assert orders[0] != orders[1]  # set_epoch reshuffles


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_shards_are_disjoint_and_cover_the_set(backend, folder, arrays):
    shards = [torch.cat([b.indices for b in _loader(backend, folder, arrays, batch_size=4, drop_last=False,
                                                    shard_id=r, num_shards=2)]).tolist() for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N_IMAGES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_larger_than_the_data_with_drop_last_is_a_clear_error(backend, folder, arrays):
    with pytest.raises(ValueError, match="batch_size 64 is larger than"):
        _loader(backend, folder, arrays, batch_size=64, drop_last=True)


def test_torchvision_augmentation_does_not_depend_on_worker_count(folder, arrays):
    a, b = (next(iter(_loader("torchvision", folder, arrays, batch_size=6, num_workers=w))) for w in (0, 2))
    assert torch.equal(a.indices, b.indices)
    for x, y in zip(a.views + a.mixed_views, b.views + b.mixed_views):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torchvision", "torch-gpu"])
def test_default_workers_count_the_cores_this_process_may_use(backend, folder, monkeypatch):
    """num_workers=None took os.cpu_count(): the host's cores, not a container's CPU set (as DALI and FFCV
    count them), so these loaders oversubscribed a CPU-limited container and the loader bench gave the
    torchvision baseline more workers than the GPU loaders."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    loader = make_loader(backend, folder, byol2(size=16), 4, device="cpu", shard_id=0, num_shards=1)
    assert loader.num_workers == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_leaves_the_global_rng_alone(backend, workers, folder, arrays):
    """The training step draws stochastic depth from the global RNG: a pass that drew from it (the DataLoader's
    worker base seed) shifted every later mask of a resumed run, which starts its pass after restoring it."""
    loader = _loader(backend, folder, arrays, recipe="dino", num_workers=workers)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    for epoch in range(2):
        loader.set_epoch(epoch)
        next(iter(loader))
        list(loader)
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------- bad files
def _jpeg_bytes(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(folder, tmp_path_factory):
    """13 decodable files (JPEG, grayscale PNG, 16-bit PNG, CMYK JPEG, EXIF-rotated JPEG) + 3 bad ones: 16 files,
    4 full batches of 4, so every batch stays even once its bad files are skipped."""
    root = str(tmp_path_factory.mktemp("messy"))
    shutil.copytree(folder, root, dirs_exist_ok=True)
    for name in sorted(os.listdir(os.path.join(root, "class2"))):
        os.remove(os.path.join(root, "class2", name))  # keep 12 good JPEGs in class0/1
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(os.path.join(root, "class2", "gray.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    with open(os.path.join(root, "class2", "rotated.jpg"), "wb") as f:
        f.write(_jpeg_bytes(rgb, exif=exif))
    bad = {
        "class2/empty.jpg": b"",
        "class2/notes.jpg": b"these are not pixels\n",
        "class2/truncated.jpg": _jpeg_bytes(rgb)[:300],
    }
    for rel, data in bad.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    os.remove(os.path.join(root, "class0", "0005.jpg"))
    for name in ("0004.jpg", "0005.jpg"):
        os.remove(os.path.join(root, "class1", name))
    # 9 JPEGs + gray.png + rotated.jpg + deep.png + cmyk.jpg = 13 good
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(os.path.join(root, "class1", "deep.png"))
    Image.fromarray(rgb).convert("CMYK").save(os.path.join(root, "class1", "cmyk.jpg"))
    return root, sorted(os.path.join(root, rel) for rel in bad)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["torchvision", "torch-gpu"])
def test_bad_files_are_skipped_counted_and_named(backend, messy_folder, arrays):
    root, bad = messy_folder
    files = list_images(root).files
    assert len(files) == 16
    loader = _loader(backend, root, arrays, batch_size=4, drop_last=False, num_workers=2)
    with pytest.warns(RuntimeWarning, match=r"skipped 3 undecodable file\(s\)") as record:
        batches = list(loader)
    # the loader's own warning, not whatever else the pass raised (Python 3.12 warns on fork with threads running)
    message = next(str(w.message) for w in record if "undecodable" in str(w.message))
    assert all(os.path.basename(p) in message for p in bad)
    assert sorted(loader.skipped) == bad
    seen = torch.cat([b.indices for b in batches]).tolist()
    assert len(seen) == len(set(seen)) == 13 - loader.log.trimmed
    assert not {files[i] for i in seen} & set(bad)
    assert all(b.batch_size % 2 == 0 for b in batches)  # mixing keeps even batches
    for b in batches:
        assert all(torch.isfinite(v).all() for v in b.views + b.mixed_views)


def _count_reads(backend, monkeypatch):
    """The files a loader of ``backend`` opens to decode, in a list (the workers' reading function, wrapped)."""
    from sdmp_fast.pipelines import torch_gpu as tg
    from sdmp_fast.pipelines import torchvision_loader as tvl

    opened = []
    module, name = (tvl, "open_rgb") if backend == "torchvision" else (tg, "read_sample")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda path, *a: opened.append(path) or real(path, *a))
    return opened


SKIPPING = ("torchvision", "torch-gpu")  # the backends with skip_batches


@pytest.mark.timeout(120)
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("backend", SKIPPING)
def test_skip_batches_resumes_a_pass_without_reading_the_skipped(backend, messy_folder, arrays, recipe,
                                                                 drop_last, monkeypatch):
    """A resumed run's pass (resume_batches) from batch 2 of epoch 1 yields what the whole pass yields from
    there, bad files included; with drop_last (training's setting) the skipped batches' files are not read."""
    from sdmp_fast.pipelines import resume_batches

    root, _ = messy_folder
    whole = _loader(backend, root, arrays, recipe, batch_size=4, drop_last=drop_last, num_workers=2)
    whole.set_epoch(1)
    with pytest.warns(RuntimeWarning):
        ref = list(whole)[2:]
    opened = _count_reads(backend, monkeypatch)
    resumed = _loader(backend, root, arrays, recipe, batch_size=4, drop_last=drop_last,
                      num_workers=1 if backend == "torch-gpu" else 0)
    batches = resume_batches(resumed, 1, 2)
    got = [next(batches) for _ in ref]
    assert [(e, i) for e, i, _ in got] == [(1, i) for i in range(2, 2 + len(ref))]
    for (_, _, b), r in zip(got, ref):
        assert torch.equal(b.indices, r.indices) and torch.equal(b.lam, r.lam)
        for x, y in zip(b.views + b.mixed_views, r.views + r.mixed_views):
            assert torch.equal(x, y)
    # drop_last: batches 2 and 3 (8 files) plus a probe of the skipped ones for a decodable file; else everything
    assert 8 + 2 <= len(opened) < 16 if drop_last else len(opened) == 16
    assert next(batches)[:2] == (2, 0)  # and on into the next epoch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", SKIPPING)
def test_skip_counts_only_the_batches_a_whole_pass_yields(backend, tmp_path, arrays):
    """Batches of 2 where most files are junk: some batches have no decodable file and a whole pass drops them;
    a resume at every position still yields the whole pass's batches (the skip probes each batch)."""
    from sdmp_fast.pipelines import resume_batches

    root = make_synthetic_image_folder(str(tmp_path / "d"), num_classes=2, per_class=10, size=(24, 24))
    for c in range(2):
        for i in range(6):
            with open(os.path.join(root, f"class{c}", f"{i:04d}.jpg"), "wb") as f:
                f.write(b"junk")

    def passes(loader, epoch=0, position=0, count=None):
        gen = resume_batches(loader, epoch, position)
        return [(e, i, b.indices.tolist(), b.lam.tolist(), b.views[0].sum().item())
                for (e, i, b), _ in zip(gen, range(count))]

    with pytest.warns(RuntimeWarning):
        whole = _loader(backend, root, arrays, batch_size=2)
        n0 = len([b for b in whole])
        assert n0 < len(whole)  # the data really has batches without a decodable file
        ref = passes(_loader(backend, root, arrays, batch_size=2), count=n0 + 3)
        for k in range(1, n0):
            assert passes(_loader(backend, root, arrays, batch_size=2), 0, k, count=3) == ref[k:k + 3], k


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_memory_skip_batches_resumes_a_pass(folder, arrays, recipe, drop_last):
    """The memory backend's resumed pass equals the whole pass from there, a short last batch included."""
    from sdmp_fast.pipelines import resume_batches

    ref = list(_loader("memory", folder, arrays, recipe, batch_size=4, drop_last=drop_last))
    for k in range(1, len(ref)):
        got = resume_batches(_loader("memory", folder, arrays, recipe, batch_size=4, drop_last=drop_last), 0, k)
        for r in ref[k:]:
            _, _, b = next(got)
            assert torch.equal(b.indices, r.indices) and torch.equal(b.lam, r.lam)
            assert all(torch.equal(x, y) for x, y in zip(b.views + b.mixed_views, r.views + r.mixed_views))


@pytest.mark.parametrize("backend", SKIPPING + ("memory",))
def test_skip_applies_to_the_next_pass_begun_only(backend, folder, arrays):
    """skip_batches(k) belongs to the next pass begun (iter), which starts at batch k; an abandoned skipped pass
    leaves the next one whole; the last call before iter wins."""
    ref = [b.indices.tolist() for b in _loader(backend, folder, arrays, batch_size=4)]
    loader = _loader(backend, folder, arrays, batch_size=4)
    loader.skip_batches(2)
    it = iter(loader)
    assert next(it).indices.tolist() == ref[2]  # a resumed pass, abandoned after one batch (still referenced)
    loader.set_epoch(0)
    assert [b.indices.tolist() for b in loader] == ref
    loader.skip_batches(3)
    loader.skip_batches(1)
    loader.set_epoch(0)
    assert [b.indices.tolist() for b in loader] == ref[1:]
    with pytest.raises(ValueError, match="k must be >= 0"):
        loader.skip_batches(-1)


@pytest.mark.parametrize("backend", SKIPPING + ("memory",))
def test_resume_through_adapters_yields_the_whole_pass_batches(backend, folder, arrays):
    """resume_batches over an adapter (whose __iter__ is a generator: it begins the loader's pass only at its
    first next) skips exactly as over the bare loader: solo-learn's (indices, views, labels) from batch 2 on."""
    from sdmp_fast.pipelines import adapters, resume_batches

    ref = [b.indices.tolist() for b in _loader(backend, folder, arrays, batch_size=4)]
    for wrap in (adapters.as_solo_learn, lambda ld: adapters.as_dataloader(adapters.as_solo_learn(ld))):
        got = resume_batches(wrap(_loader(backend, folder, arrays, batch_size=4)), 0, 2)
        assert [(e, i, out[0].tolist()) for (e, i, out), _ in zip(got, range(len(ref) - 1))] == \
            [(0, i, ref[i]) for i in range(2, len(ref))] + [(1, 0, [b.indices.tolist() for b in _epoch1(
                backend, folder, arrays)][0])]


def _epoch1(backend, folder, arrays):
    loader = _loader(backend, folder, arrays, batch_size=4)
    loader.set_epoch(1)
    return list(loader)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,workers", [("torchvision", 0), ("torchvision", 2), ("dali", None),
                                             ("torch-gpu", None), ("memory", None)])
def test_a_pass_begun_under_a_running_one(backend, workers, folder, arrays):
    """``next(iter(loader))`` inside an epoch loop (to log one batch): where passes share one reader (a
    DataLoader's persistent workers, a DALI pipeline) the outer pass is stopped with an error instead of going
    on with the new pass's batches; elsewhere (torchvision without workers too) both passes run whole."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    kw = {} if workers is None else {"num_workers": workers}
    loader = _loader(backend, folder, arrays, batch_size=4, shuffle=False, **kw)
    outer = iter(loader)
    first = next(outer)
    peek = next(iter(loader))
    if backend == "dali" or workers:
        with pytest.raises(RuntimeError, match="new pass"):
            next(outer)
        assert [b.indices.tolist() for b in loader][0] == first.indices.tolist()  # a new pass runs whole
    else:
        rest = [b.indices.tolist() for b in outer]
        assert [first.indices.tolist()] + rest == [b.indices.tolist() for b in _loader(
            backend, folder, arrays, batch_size=4, shuffle=False, **kw)]
    assert peek.indices.tolist() == first.indices.tolist()


def test_exif_orientation_and_odd_formats_decode_upright_rgb(messy_folder):
    root, _ = messy_folder
    raw = open(os.path.join(root, "class2", "rotated.jpg"), "rb").read()
    assert exif_orientation(raw) == 6
    assert exif_orientation(open(list_images(root).files[0], "rb").read()) == 1
    data = lambda name: torch.frombuffer(bytearray(open(os.path.join(root, name), "rb").read()),  # noqa: E731
                                         dtype=torch.uint8)
    assert decode_cpu(data("class2/rotated.jpg")).shape == (3, 20, 30)  # stored 30x20, displayed 20x30
    deep = decode_cpu(data("class1/deep.png"))
    assert deep.dtype == torch.uint8 and deep.shape == (3, 30, 20) and deep.float().std() > 10
    assert decode_cpu(data("class2/gray.png")).shape == (3, 30, 20)
    dark = io.BytesIO()  # full-range 16-bit, all values <= 255: near black, not scaled as if 8-bit
    Image.fromarray(np.full((4, 5), 200, dtype=np.uint16)).save(dark, format="PNG")
    dark = torch.frombuffer(bytearray(dark.getvalue()), dtype=torch.uint8)
    assert decode_cpu(dark).unique().tolist() == [1]
    assert decode_cpu(data("class1/cmyk.jpg")).shape == (3, 30, 20)


def test_torch_gpu_reads_every_listed_format_and_skips_a_png_with_a_bad_checksum(tmp_path):
    """BMP / TIFF / PNM / PNG decode as the torchvision backend's PIL does; a PNG whose compressed data is
    zeroed (IEND intact) is skipped and named: torchvision.io's libpng path crashed the process on it."""
    rng = np.random.default_rng(0)
    pixels = {}
    for ext in ("bmp", "tiff", "ppm", "png", "webp"):
        pixels[ext] = rng.integers(0, 256, (18, 26, 3), dtype=np.uint8)
        Image.fromarray(pixels[ext]).save(tmp_path / f"img.{ext}", **({"lossless": True} if ext == "webp" else {}))
    buf = io.BytesIO()
    Image.fromarray(pixels["png"]).save(buf, format="PNG")
    bad = bytearray(buf.getvalue())
    bad[60:200] = bytes(140)
    (tmp_path / "corrupt.png").write_bytes(bytes(bad))
    for ext, want in pixels.items():
        got = read_sample(str(tmp_path / f"img.{ext}"), gpu_jpeg=True)
        assert isinstance(got, torch.Tensor) and torch.equal(got, torch.from_numpy(want).permute(2, 0, 1)), ext
    assert isinstance(read_sample(str(tmp_path / "corrupt.png"), gpu_jpeg=False), _Bad)
    loader = make_loader("torch-gpu", str(tmp_path), byol2(size=16), 2, device="cpu", drop_last=False,
                         shard_id=0, num_shards=1)
    with pytest.warns(RuntimeWarning, match=r"skipped 1"):
        assert sum(b.batch_size for b in loader) == 5 - loader.log.trimmed  # mixing keeps batches even
    assert [os.path.basename(f) for f in loader.skipped] == ["corrupt.png"]


@pytest.mark.timeout(120)
def test_torch_gpu_batched_jpeg_route_and_its_fallback(messy_folder):
    """The nvJPEG code path, run with decode_jpeg(list) on the CPU: routing, batching and per-file fallback."""
    root, bad = messy_folder
    path = lambda rel: os.path.join(root, rel)  # noqa: E731
    good = list_images(root).files[0]
    assert isinstance(read_sample(good, gpu_jpeg=True), _Encoded)
    assert isinstance(read_sample(good, gpu_jpeg=False), torch.Tensor)
    for rel in ("class2/rotated.jpg", "class2/gray.png"):  # EXIF-rotated / not JPEG: decoded in the thread
        assert isinstance(read_sample(path(rel), gpu_jpeg=True), torch.Tensor)
    for rel in ("class2/truncated.jpg", "class2/empty.jpg", "class2/notes.jpg"):
        assert isinstance(read_sample(path(rel), gpu_jpeg=True), _Bad)

    loader = make_loader("torch-gpu", root, RECIPES["byol2"], 4, device="cpu", drop_last=False, num_workers=2,
                         shard_id=0, num_shards=1)
    loader._gpu_jpeg = True
    with pytest.warns(RuntimeWarning, match=r"skipped 3"):
        batches = list(loader)
    assert sorted(loader.skipped) == bad and sum(b.batch_size for b in batches) == 13 - loader.log.trimmed
    # a corrupt JPEG that still looks whole (header, then the end marker) fails the batched call: every file
    # is then retried alone, so only that one is lost
    raw = open(good, "rb").read()
    whole, broken = (torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (raw, raw[:200] + b"\xff\xd9"))
    out = loader._decode_gpu([_Encoded(whole), _Encoded(broken), _Encoded(whole)])
    assert [type(o) for o in out] == [torch.Tensor, _Bad, torch.Tensor]
    assert torch.equal(out[0], decode_cpu(whole))


# ------------------------------------------------------------------------------------------------ memory
def test_memory_accepts_grayscale_tensors_and_fashion_mnist_names():
    imgs = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    loader = make_loader("memory", imgs, byol2(size=16), 4, device="cpu", shard_id=0, num_shards=1)
    batch = next(iter(loader))
    assert batch.views[0].shape == (4, 3, 16, 16) and (batch.labels == -1).all()
    with pytest.raises(ValueError, match="4 labels"):
        make_loader("memory", (imgs, torch.zeros(4)), byol2(size=16), 4, device="cpu", shard_id=0, num_shards=1)
    with pytest.raises(ValueError, match="fashion-mnist"):
        make_loader("memory", "cifar10", byol2(size=16), 4, device="cpu", shard_id=0, num_shards=1)
    if os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"):
        fm = make_loader("memory", "fashion-mnist:test", byol2(size=16), 8, device="cpu", shard_id=0,
                         num_shards=1)
        assert len(fm) == 10_000 // 8 and fm.images.shape == (10_000, 1, 28, 28)


@pytest.mark.parametrize("bad", [255.0, -0.5, float("nan")])
def test_memory_refuses_float_images_outside_0_1(bad):
    """Float pixels are 0..1: 0..255 data was clamped by the device ops into black-and-white views, silently."""
    imgs = torch.rand(6, 3, 12, 12)
    make_loader("memory", imgs, byol2(size=8), 2, device="cpu")  # in range: taken
    imgs[3, 1, 4, 4] = bad
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        make_loader("memory", imgs, byol2(size=8), 2, device="cpu")


# -------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_on_cuda(backend, folder, arrays, messy_folder):
    rec = RECIPES["dino"]
    data = arrays if backend == "memory" else folder
    loader = make_loader(backend, data, rec, 6, device="cuda", shard_id=0, num_shards=1, dtype=torch.bfloat16,
                         drop_last=False, num_workers=2)
    batches = list(loader)
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(N_IMAGES))
    assert all(v.is_cuda and v.dtype == torch.bfloat16 for v in batches[0].views + batches[0].mixed_views)
    if backend == "torch-gpu":  # nvJPEG path with bad files in the batch
        root, bad = messy_folder
        bad_loader = make_loader(backend, root, rec, 4, device="cuda", shard_id=0, num_shards=1, drop_last=False)
        with pytest.warns(RuntimeWarning, match="skipped 3"):
            list(bad_loader)
        assert sorted(bad_loader.skipped) == bad


@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_torch_gpu_skip_batches_on_cuda_matches_the_whole_pass(messy_folder, arrays, monkeypatch):
    """nvJPEG decode and CUDA generator: a pass resumed at batch 2 yields the whole pass's batches 2.. bit for bit,
    without reading the skipped batches' files (but one probe each)."""
    from sdmp_fast.pipelines import resume_batches

    root, _ = messy_folder
    rec = RECIPES["dino"]
    kw = dict(device="cuda", shard_id=0, num_shards=1, dtype=torch.bfloat16, seed=3)
    with pytest.warns(RuntimeWarning):
        ref = list(make_loader("torch-gpu", root, rec, 4, **kw))[2:]
    opened = _count_reads("torch-gpu", monkeypatch)
    got = resume_batches(make_loader("torch-gpu", root, rec, 4, **kw), 0, 2)
    for r in ref:
        _, _, b = next(got)
        assert torch.equal(b.indices, r.indices) and torch.equal(b.lam, r.lam)
        assert all(torch.equal(x, y) for x, y in zip(b.views + b.mixed_views, r.views + r.mixed_views))
    assert len(opened) < 16


@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_gpu_decode_never_overwrites_memory_queued_work_still_reads(folder):
    # pytorch/vision#9606's reproduction: blocks freed while queued kernels still read them must not be handed
    # to the decoder (it writes from a stream that does not wait for the consumer's)
    loader = make_loader("torch-gpu", folder, RECIPES["byol2"], 4, device="cuda", shard_id=0, num_shards=1)
    encoded = [_Encoded(torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8))
               for f in loader.images.files[:8]]
    shapes = [tuple(t.shape) for t in loader._decode_gpu(encoded)]
    wrong = 0
    for _ in range(50):
        xs = [torch.ones(s, dtype=torch.uint8, device="cuda") for s in shapes]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # a long kernel, then reductions queued behind it
        sums = [x.sum(dtype=torch.int64) for x in xs]
        del xs  # freed on the current stream while the reductions are still queued
        loader._decode_gpu(encoded)
        torch.cuda.synchronize()
        wrong += sum(int(t) != math.prod(s) for t, s in zip(sums, shapes))
    assert wrong == 0


class _StuckAfterTwo(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i >= 2:
            time.sleep(60)  # a hung read
        return torch.zeros(1)


@pytest.mark.timeout(60)
def test_loader_workers_ignore_others_sigterm_but_obey_their_parent(tmp_path):
    """Workers set up by ignore_stop_signals survive a SIGTERM from another process (a scheduler's, sent to the
    process group) and still exit on their parent's terminate(): DataLoader's shutdown of a stuck worker ends
    in seconds instead of waiting for the hung read."""
    import signal
    import subprocess

    from sdmp_fast.pipelines.torchvision_loader import ignore_stop_signals

    dl = torch.utils.data.DataLoader(_StuckAfterTwo(), batch_size=1, num_workers=1,
                                     worker_init_fn=ignore_stop_signals)
    it = iter(dl)
    next(it)
    worker = it._workers[0]
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
    time.sleep(0.5)
    assert worker.is_alive()
    next(it)
    del it  # join 5 s, then terminate(): the parent's SIGTERM
    worker.join(10)
    assert not worker.is_alive()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the test process itself is untouched


_STUCK_WORKER_SCRIPT = r"""
import ctypes, signal, sys
import sdmp_fast.pipelines.torchvision_loader as tl
from sdmp_fast.pipelines.base import make_loader
from sdmp_fast.pipelines.recipes import byol2

def stuck(self, item):
    ctypes.PyDLL(None).sleep(3600)  # native code holding the GIL: PyDLL calls do not release it

def hung(*_):
    raise TimeoutError("the read hung")

tl.ViewDataset.__getitem__ = stuck
loader = make_loader("torchvision", sys.argv[1], byol2(size=16), 4, device="cpu", shard_id=0, num_shards=1,
                     num_workers=2)
signal.signal(signal.SIGALRM, hung)
signal.alarm(5)
try:
    next(iter(loader))
except TimeoutError:
    print("workers", *[p.pid for p in tl._WORKERS], flush=True)
"""


@pytest.mark.timeout(120)
def test_workers_stuck_holding_the_gil_are_killed_when_the_process_exits(folder, run_script):
    """A worker stuck in native code that holds the GIL cannot run its SIGTERM watcher: multiprocessing's exit
    hook (terminate, then join) waited for it for ever, so a hung epoch became a process that never exited."""
    returncode, out, err = run_script(_STUCK_WORKER_SCRIPT, folder, timeout=60)
    assert returncode == 0, err[-3000:]
    pids = [int(p) for p in out.split("workers", 1)[1].split()]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_orient_turns_images_as_pil_exif_transpose():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    methods = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}  # PIL's ImageOps.exif_transpose table
    img = torch.from_numpy(pixels).permute(2, 0, 1)
    assert torch.equal(orient(img, 1), img)
    for orientation, method in methods.items():
        want = np.array(Image.fromarray(pixels).transpose(method))
        assert torch.equal(orient(img, orientation).permute(1, 2, 0), torch.from_numpy(want)), orientation


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def test_exif_after_an_xmp_segment_or_a_fill_byte_still_turns_the_image(tmp_path):
    """torchvision's apply_exif_orientation reads a first APP1 segment only: a photo with XMP before EXIF came
    out on its side from torch-gpu, upright from PIL and DALI; a fill byte before a marker hid EXIF from the
    nvJPEG routing."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = _jpeg_bytes(rgb, exif=exif)
    xmp_first = plain[:2] + _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>") + plain[2:]
    padded = plain[:2] + b"\xff\xff" + plain[2:]
    end = 4 + int.from_bytes(plain[4:6], "big")  # after the first segment
    stray = plain[:end] + b"\x00\x00" + plain[end:]  # extraneous bytes: libjpeg skips them (a warning) and decodes
    want = decode_cpu(torch.frombuffer(bytearray(plain), dtype=torch.uint8))
    assert want.shape == (3, 20, 30)
    for data in (xmp_first, padded, stray):
        assert exif_orientation(data) == 6
        got = decode_cpu(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        assert torch.equal(got, want)
        path = tmp_path / "photo.jpg"
        path.write_bytes(data)
        assert torch.equal(read_sample(str(path), gpu_jpeg=False), want)
        assert np.array_equal(np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270)),
                              want.permute(1, 2, 0).numpy())  # PIL's decode of the same bytes, turned


def test_torch_gpu_refuses_a_decompression_bomb_from_its_header(tmp_path, monkeypatch):
    """A 1 kB JPEG claiming 60000 x 60000 pixels became a 10.8 GB tensor after 85 s (torchvision.io and nvJPEG
    have no limit of their own); now it is skipped, as the other backends skip it."""
    import struct

    monkeypatch.delenv("SDMP_MAX_IMAGE_PIXELS", raising=False)
    data = bytearray(_jpeg_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, 60000, 60000)
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    for gpu_jpeg in (False, True):
        got = read_sample(str(tmp_path / "bomb.jpg"), gpu_jpeg)
        assert isinstance(got, _Bad) and got.reason.startswith("too large (60000 x 60000"), got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["torchvision", "torch-gpu", "memory"])
def test_every_loader_closes_and_is_a_context_manager(backend, folder, arrays):
    """torchvision and memory loaders had no close(): an adapter's close() over them raised AttributeError, and
    the only way to stop torchvision's persistent workers was to drop every reference to the loader."""
    from sdmp_fast.pipelines import adapters

    data = arrays if backend == "memory" else folder
    with make_loader(backend, data, byol2(32), 4, device="cpu", num_workers=2) as loader:
        next(iter(loader))
        workers = list(getattr(getattr(loader, "_loader", None), "_iterator", None)._workers) \
            if backend == "torchvision" else []
    assert all(not w.is_alive() for w in workers) and len(workers) == (2 if backend == "torchvision" else 0)
    assert len(list(loader)) == len(loader)  # a later pass starts anew
    adapter = adapters.as_dino(loader)
    next(iter(adapter))
    adapter.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("parent_has_one", [False, True])
def test_a_process_that_exits_with_a_torchvision_loader_alive_leaves_no_temp_dirs(folder, tmp_path, parent_has_one):
    """At exit the workers are stopped by SIGTERM, which they obey with os._exit: that skipped multiprocessing's
    clean-up, and each worker left its pymp-* folder (with a socket in it) in $TMPDIR, run after run. A worker
    forked from a parent that had one already starts with the parent's: that one is the parent's to remove."""
    import subprocess
    import sys

    code = ("import sys, multiprocessing.util\nfrom sdmp_fast.pipelines.base import make_loader\n"
            "from sdmp_fast.pipelines.recipes import byol2\n"
            + ("multiprocessing.util.get_temp_dir()\n" if parent_has_one else "") +
            "loader = make_loader('torchvision', sys.argv[1], byol2(32), 4, device='cpu', num_workers=2)\n"
            "for batch in loader:\n    pass\nprint('exiting with the loader alive', flush=True)\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([sys.executable, "-c", code, folder], env=dict(os.environ, TMPDIR=str(tmp)),
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0 and "exiting" in p.stdout and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert [n for n in os.listdir(tmp) if n.startswith("pymp-")] == []
