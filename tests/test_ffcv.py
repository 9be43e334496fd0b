"""`sdmp-fast convert` and the FFCV loader on a tiny generated ImageFolder with bad files in it.

FFCV compiles a numba pipeline per loader (seconds each on 2 cores): one .beton is converted per module and
only four loaders are built (two shards of byol2, DINO, FFCV's stock per-view decoders).
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="ffcv is not installed")

from PIL import Image  # noqa: E402

from sdmp_fast.data import make_synthetic_image_folder  # noqa: E402
from sdmp_fast.pipelines import convert as conv  # noqa: E402
from sdmp_fast.pipelines.base import list_images, make_loader  # noqa: E402
from sdmp_fast.pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD, make_recipe  # noqa: E402

BAD = ("class0/truncated.jpg", "class1/empty.jpg", "class1/notes.jpg")
BATCH = 6
SMALL_BYOL = dict(size=32)
SMALL_DINO = dict(global_size=32, local_size=16, n_local=4, n_local_mixed=2)
# A freed FFCV loader's numba ``imdecode`` dispatcher prints an ignored KeyError from numba's finalizer (FFCV's
# stock Loader does the same); pytest reports it as a warning against whichever test runs at that moment.
NUMBA_FINALIZER_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imgs"))
    make_synthetic_image_folder(root, num_classes=3, per_class=8, size=(40, 48))
    whole = open(os.path.join(root, "class0", "0000.jpg"), "rb").read()
    with open(os.path.join(root, BAD[0]), "wb") as f:
        f.write(whole[: len(whole) // 2])
    open(os.path.join(root, BAD[1]), "wb").close()
    with open(os.path.join(root, BAD[2]), "w") as f:
        f.write("not an image\n")
    gray = np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))
    Image.fromarray(gray, "L").save(os.path.join(root, "class2", "gray.png"))
    Image.new("RGB", (6, 5), (200, 30, 60)).save(os.path.join(root, "class2", "tiny.png"))  # < every crop
    return root


@pytest.fixture(scope="module")
def beton(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("beton") / "data.beton")
    summary = conv.convert(folder, out, max_side=64, workers=2, progress=False)
    return summary, out


def _stored_images(path):
    """Decode every stored JPEG straight from the file (no FFCV pipeline, so no numba compile)."""
    import cv2
    from ffcv.reader import Reader

    reader = Reader(path)
    raw = np.fromfile(path, dtype=np.uint8)
    size_of = {int(p): int(s) for _, p, s in reader.alloc_table}
    images = []
    for meta in reader.metadata["f0"]:
        ptr = int(meta["data_ptr"])
        bgr = cv2.imdecode(raw[ptr: ptr + size_of[ptr]], cv2.IMREAD_COLOR)
        images.append(bgr[:, :, ::-1])
    return reader, images


# ------------------------------------------------------------------------------------------------ convert

@pytest.mark.timeout(120)
def test_convert_reports_bad_files_and_keeps_the_good_ones(beton, folder):
    summary, out = beton
    bad = {os.path.join(folder, b) for b in BAD}
    assert {p for p, _ in summary.skipped} == bad
    report = summary.report()
    assert "skipped 3 file(s)" in report and all(p in report for p in bad)
    with open(out + ".skipped.txt") as f:
        header, *lines = f.read().splitlines()
    assert header.startswith("# sdmp-fast convert: skipped files") and {ln.split("\t")[0] for ln in lines} == bad

    listed = list_images(folder)
    good = [(f, l) for f, l in zip(listed.files, listed.labels) if f not in bad]
    reader, stored = _stored_images(out)
    assert reader.num_samples == summary.written == len(good) == 26
    np.testing.assert_array_equal(reader.metadata["f1"], [l for _, l in good])  # labels, in file order
    np.testing.assert_array_equal(reader.metadata["f2"], np.arange(len(good)))  # index = position
    for (path, _), img in zip(good, stored):
        src = conv.load_rgb(path)
        assert img.shape == src.shape  # all < max_side: stored at full size
        assert np.abs(img.astype(int) - src).mean() < 4, path  # one JPEG q90 re-encode away
    gray = stored[[p for p, _ in good].index(os.path.join(folder, "class2", "gray.png"))]
    assert np.abs(gray[..., 0].astype(int) - gray[..., 2]).max() <= 3  # grey stays grey in RGB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keep_previous", [False, True])
def test_convert_failure_leaves_no_partial_file(folder, beton, tmp_path, monkeypatch, keep_previous):
    out = tmp_path / "data.beton"
    previous = None
    if keep_previous:  # an earlier conversion's good file
        previous = open(beton[1], "rb").read()
        out.write_bytes(previous)
    real = conv._ImageDataset.__getitem__

    def dies_midway(self, i):  # the writer processes are forked: they see this patch
        if i == 7:
            raise RuntimeError("simulated failure while writing")
        return real(self, i)

    monkeypatch.setattr(conv._ImageDataset, "__getitem__", dies_midway)
    kept = "the earlier file is unchanged" if previous else "nothing was written there"
    with pytest.raises(OSError, match=rf"could not write it \(a writer process failed; the writer's traceback is "
                                      rf"printed above\); {kept}"):
        conv.convert(folder, str(out), max_side=64, workers=2, chunk_size=4, progress=False)
    if previous is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == previous
    assert os.listdir(tmp_path) == (["data.beton"] if previous else [])  # no temporary left behind


@pytest.mark.timeout(120)
def test_convert_removes_a_killed_runs_temporary(folder, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "data.beton"
    stale = tmp_path / f"data.beton.tmp-{int(dead.stdout)}"  # as a SIGKILLed conversion leaves it
    stale.write_bytes(b"partial")
    conv.convert(folder, str(out), max_side=64, workers=1, progress=False)
    assert not stale.exists() and out.exists()


@pytest.mark.timeout(120)
def test_a_convert_to_an_output_another_convert_is_writing_is_refused(beton, folder, tmp_path):
    """Two converts to one .beton each wrote the whole set, and the later swap could pair one run's .beton with
    the other's skipped list. The second is refused at once; the first's files stay as they are."""
    from test_paths import HOLDER

    out = tmp_path / "data.beton"
    previous = open(beton[1], "rb").read()
    out.write_bytes(previous)  # what the other convert is about to replace
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".data.beton.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="is being written by another sdmp-fast convert"):
            conv.convert(folder, str(out), max_side=64, workers=1, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert out.read_bytes() == previous and sorted(os.listdir(tmp_path)) == [".data.beton.lock",
                                                                                       "data.beton"]


def test_convert_bad_arguments_name_the_path(tmp_path, folder):
    with pytest.raises(ValueError, match="nowhere"):
        conv.convert(str(tmp_path / "nowhere"), str(tmp_path / "x.beton"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        conv.convert(str(tmp_path / "empty"), str(tmp_path / "x.beton"))
    with pytest.raises(ValueError, match="no_such_dir"):
        conv.convert(folder, str(tmp_path / "no_such_dir" / "x.beton"))
    with pytest.raises(ValueError, match="--max-side"):
        conv.convert(folder, str(tmp_path / "x.beton"), max_side=3)
    with pytest.raises(ValueError, match=r"--workers: expected >= 0 and <= 1024 \(0: every core\), got 100000"):
        conv.convert(folder, str(tmp_path / "x.beton"), workers=100000)  # forked them
    listing = tmp_path / "list.txt"
    listing.write_text(f"{list_images(folder).files[0]} 0\n")
    with pytest.raises(ValueError, match="out: .* is the source file list itself"):
        conv.convert(str(listing), str(listing))
    assert listing.read_text().endswith(" 0\n")
    listing.unlink()
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    # only an earlier .beton is replaced: a file of another kind at OUT was overwritten, a source image too
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    image = list_images(folder).files[0]
    before = open(image, "rb").read()
    for out in (str(notes), image):
        with pytest.raises(ValueError, match="out: .* exists and is not an FFCV .beton that convert may replace"):
            conv.convert(folder, out)
    assert notes.read_text() == "precious" and open(image, "rb").read() == before


def test_load_rgb_converts_modes_and_orientation(tmp_path):
    from PIL import Image

    def save(name, img, **kw):
        img.save(tmp_path / name, **kw)
        return str(tmp_path / name)

    arr16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)
    out = conv.load_rgb(save("g16.png", Image.fromarray(arr16)))
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_allclose(out[..., 1], np.rint(arr16 / 257.0), atol=1)  # rescaled, not clipped to white
    dark = conv.load_rgb(save("dark16.png", Image.fromarray(np.full((4, 5), 200, dtype=np.uint16))))
    assert dark.max() == 1  # full-range 16-bit whatever its maximum (was taken for 8-bit: 200)

    out = conv.load_rgb(save("cmyk.jpg", Image.new("CMYK", (30, 20), (0, 255, 255, 0)), quality=95))
    assert out.shape == (20, 30, 3) and out[..., 0].mean() > 200 and out[..., 1:].mean() < 60  # red

    pal = Image.new("P", (30, 20))
    pal.putpalette([0, 0, 255] * 256)
    assert conv.load_rgb(save("pal.png", pal))[..., 2].min() == 255

    rgba = Image.new("RGBA", (30, 20), (0, 255, 0, 128))
    assert conv.load_rgb(save("rgba.png", rgba)).shape == (20, 30, 3)

    wide = Image.new("RGB", (30, 20), (255, 255, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    out = conv.load_rgb(save("rot.jpg", wide, exif=exif.tobytes()))
    assert out.shape == (30, 20, 3)  # upright: portrait

    assert conv.check_image(save("tiny.png", Image.new("RGB", (1, 1))))[0] == (1, 1)
    # a side that --max-side would round to 0 pixels is a skip reason (FFCV's resizer failed the whole write)
    shape, reason = conv.check_image(save("strip.png", Image.new("RGB", (2000, 2))), 512)
    assert shape is None and "too thin" in reason and "--max-side" in reason
    assert conv.check_image(save("strip.png", Image.new("RGB", (2000, 2))))[0] == (2, 2000)  # no cap: kept
    # the pixel limit of every backend (Pillow's decompression-bomb limit, twice MAX_IMAGE_PIXELS, ~179 MP by
    # default, or SDMP_MAX_IMAGE_PIXELS): convert used to raise Pillow's for the whole process, so a .beton held
    # photos the other loaders skip; shown with a limit of 2,000 pixels instead of a 180 MP image
    default = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000
        shape, reason = conv.check_image(save("big.png", Image.new("RGB", (100, 60))), 50)
        assert shape is None and "too large (6,000 pixels, over the limit of 2,000 pixels" in reason and "SDMP_MAX_IMAGE_PIXELS" in reason
        assert Image.MAX_IMAGE_PIXELS == 1000
        assert conv.check_image(save("fits.png", Image.new("RGB", (50, 40))), 50)[0] == (40, 50)
    finally:
        Image.MAX_IMAGE_PIXELS = default


# ------------------------------------------------------------------------------------------------ loader

def _value_bounds():
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return lo.min() - 1e-3, hi.max() + 1e-3


def _check_batch(batch, recipe, labels_in_file):
    lo, hi = _value_bounds()
    n = batch.batch_size
    assert batch.indices.dtype == torch.int64 and batch.labels.dtype == torch.int64
    np.testing.assert_array_equal(batch.labels.numpy(), labels_in_file[batch.indices.numpy()])
    for v, spec in zip(batch.views, recipe.expanded_views()):
        assert v.shape == (n, 3, spec.size, spec.size)
        assert torch.isfinite(v.float()).all() and lo <= v.min() and v.max() <= hi
        assert v.float().std() > 0.05  # real image content, not a constant
    assert batch.mixed_from == recipe.mix.mixed_views
    assert len(batch.mixed_views) == len(recipe.mix.mixed_views)
    assert batch.lam.shape == (n,) and ((batch.lam >= 0) & (batch.lam <= 1)).all()


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_byol2_two_epochs_two_shards_exact(beton):
    _, path = beton
    from ffcv.reader import Reader

    labels = np.asarray(Reader(path).metadata["f1"])
    recipe = make_recipe("byol2", **SMALL_BYOL)
    loaders = [make_loader("ffcv", path, recipe, BATCH, device="cpu", shard_id=r, num_shards=2, shuffle=True,
                           drop_last=False, seed=3, num_workers=2) for r in range(2)]
    assert [len(ld) for ld in loaders] == [3, 3]  # 13 + 13 samples in batches of 6: 6+6+1 each
    orders = []
    for epoch in range(2):
        shards = []
        for ld in loaders:
            ld.set_epoch(epoch)
            got, n_batches = [], 0
            for batch in ld:
                _check_batch(batch, recipe, labels)
                if batch.batch_size % 2 == 0:  # a full even batch is mixed: mixed views differ where lam < 1
                    for j, src in enumerate(batch.mixed_from):
                        changed = (batch.mixed_views[j] - batch.views[src]).abs().flatten(1).amax(1) > 1e-4
                        assert changed[batch.lam < 0.999].all() and not changed[batch.lam >= 1].any()
                    assert (batch.lam < 1).any()
                got += batch.indices.tolist()
                n_batches += 1
            assert n_batches == len(ld)
            shards.append(got)
        assert not set(shards[0]) & set(shards[1])  # disjoint shards
        assert sorted(shards[0] + shards[1]) == list(range(len(labels)))  # covering, each sample once
        orders.append(shards[0])
    assert orders[0] != orders[1]  # set_epoch reshuffles


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_batches_kept_by_the_caller_stay_intact(beton):
    # FFCV reuses a ring of a few output slots: batches kept past it (list(loader)) once showed later batches'
    # labels and indices
    _, path = beton
    ld = make_loader("ffcv", path, make_recipe("byol2", **SMALL_BYOL), 2, device="cpu", shard_id=0, num_shards=1,
                     drop_last=False, seed=3, num_workers=2)
    kept = list(ld)
    assert len(kept) == 13  # 26 samples, more batches than FFCV's slots
    assert sorted(torch.cat([b.indices for b in kept]).tolist()) == list(range(26))
    outer = iter(ld)  # a pass begun under a running one: FFCV's slots are shared, so the outer one stops
    next(outer)
    next(iter(ld))
    with pytest.raises(RuntimeError, match="new pass"):
        next(outer)


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_crops_follow_seed_and_epoch_not_the_run(beton):
    """An epoch's batches (crops included) depend on (seed, epoch) only: a second loader, given the first one's
    compiled FFCV pipeline after numba's per-thread RNGs have moved on, repeats them (what a resumed run needs;
    FFCV's crop draws used to come from numba's entropy-seeded RNG)."""
    _, path = beton
    recipe = make_recipe("byol2", **SMALL_BYOL)

    def load(seed=3):
        return make_loader("ffcv", path, recipe, BATCH, device="cpu", shard_id=0, num_shards=1, drop_last=False,
                           seed=seed, num_workers=2)

    def epoch(ld, e):
        ld.set_epoch(e)
        return [(b.indices.clone(), [v.clone() for v in b.views + b.mixed_views]) for b in ld]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(va, vb))
                                        for (ia, va), (ib, vb) in zip(a, b))

    first = load()
    e0, e1 = epoch(first, 0), epoch(first, 1)
    compiled = first._loader
    first.close()  # parks the compiled Loader: the next one takes it over (no second numba compile)
    again = load()
    assert again._loader is compiled
    assert same(epoch(again, 1), e1) and same(epoch(again, 0), e0)
    # a sample's crops change from epoch to epoch (its views differ beyond the seeded flips and colours)
    crops0 = {int(i): v[0][k] for i_, v in e0 for k, i in enumerate(i_)}
    crops1 = {int(i): v[0][k] for i_, v in e1 for k, i in enumerate(i_)}
    assert sum(not torch.equal(crops0[i], crops1[i]) for i in crops0) == len(crops0)
    again.close()
    assert not same(epoch(load(seed=4), 1), e1)  # another seed, other batches


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
@pytest.mark.parametrize("drop_last", [True, False])
def test_ffcv_skip_batches_resumes_a_pass_without_decoding_the_skipped(beton, drop_last, monkeypatch):
    """resume_batches from batch 2 of epoch 1 yields the whole pass's batches from there (crops, colours, mixing
    bit for bit) and hands FFCV only the samples from batch 2 on; a skip past the end yields nothing."""
    from sdmp_fast.pipelines import resume_batches

    _, path = beton
    recipe = make_recipe("byol2", **SMALL_BYOL)
    ld = make_loader("ffcv", path, recipe, 4, device="cpu", shard_id=0, num_shards=1, drop_last=drop_last,
                     seed=3, num_workers=2)
    ld.set_epoch(1)
    ref = [(b.indices.clone(), b.lam.clone(), [v.clone() for v in b.views + b.mixed_views]) for b in ld][2:]
    got = resume_batches(ld, 1, 2)
    for indices, lam, views in ref:
        _, _, b = next(got)
        assert torch.equal(b.indices, indices) and torch.equal(b.lam, lam)
        assert all(torch.equal(x, y) for x, y in zip(b.views + b.mixed_views, views))
    assert len(ld._loader.traversal_order.indices) == len(ld.sampler.indices()) - 2 * 4
    assert next(got)[:2] == (2, 0)  # and on into the next epoch
    ld.skip_batches(len(ld))
    assert list(ld) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        ld.skip_batches(-1)
    ld.close()


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_dino_multicrop_bf16_raw_and_jpeg(folder, tmp_path):
    """DINO's 2 + 4 crops from one decode, from a .beton holding both raw and JPEG samples."""
    from ffcv.reader import Reader

    path = str(tmp_path / "mixed.beton")
    summary = conv.convert(folder, path, fmt="proportion", max_side=64, workers=2, progress=False)
    reader = Reader(path)
    assert set(reader.metadata["f0"]["mode"]) == {0, 1}  # FFCV's modes: 0 jpg, 1 raw
    labels = np.asarray(reader.metadata["f1"])
    recipe = make_recipe("dino", **SMALL_DINO)
    loader = make_loader("ffcv", path, recipe, BATCH, device="cpu", shard_id=0, num_shards=1, drop_last=True,
                         dtype=torch.bfloat16, num_workers=2)
    assert len(loader) == 26 // BATCH
    assert sorted(loader.skipped) == sorted(s for s, _ in summary.skipped)  # what convert left out
    batches = list(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        assert all(v.dtype == torch.bfloat16 for v in batch.views + batch.mixed_views)
        _check_batch(batch, recipe, labels)
        assert [v.shape[-1] for v in batch.views] == [32, 32, 16, 16, 16, 16]
    seen = torch.cat([b.indices for b in batches])
    assert seen.unique().numel() == seen.numel() == len(loader) * BATCH  # drop_last: whole batches only


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_stock_per_view_decoders_match_the_interface(beton):
    """multi_crop=False: FFCV's own RandomResizedCrop decoder, one pipeline per view on the same field."""
    _, path = beton
    from ffcv.reader import Reader

    labels = np.asarray(Reader(path).metadata["f1"])
    recipe = make_recipe("byol2", **SMALL_BYOL)
    loader = make_loader("ffcv", path, recipe, BATCH, device="cpu", shard_id=0, num_shards=1, drop_last=False,
                         shuffle=False, num_workers=2, multi_crop=False)
    seen = []
    for batch in loader:
        _check_batch(batch, recipe, labels)
        seen += batch.indices.tolist()
    assert seen == list(range(26))  # shuffle=False: file order


@NUMBA_FINALIZER_NOISE
def test_ffcv_loader_rejects_a_folder_and_a_foreign_file(folder, tmp_path):
    with pytest.raises(ValueError, match="sdmp-fast convert"):
        make_loader("ffcv", folder, "byol2", 4, device="cpu", shard_id=0, num_shards=1)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\0" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="junk.beton"):
            make_loader("ffcv", str(junk), "byol2", 4, device="cpu", shard_id=0, num_shards=1)


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
@pytest.mark.parametrize("multi_crop", [True, False])
def test_ffcv_reads_another_writers_beton_by_field_name(folder, tmp_path, multi_crop):
    """A .beton written by FFCV's own DatasetWriter with our fields in another order and one more field is read
    by name (FFCV returns the file's fields in stored order: the label was taken for the image, and an extra
    field for a view); fields of another type are refused naming them."""
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    files = [f for f in list_images(folder).files if not f.endswith(BAD)][:8]
    images = [conv.load_rgb(f) for f in files]

    class Samples:
        def __init__(self, make):
            self.make = make

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return self.make(i)

    path = str(tmp_path / "other.beton")
    fields = {"weight": FloatField(), "label": IntField(), "image": RGBImageField(write_mode="raw"),
              "image_1": IntField(), "index": IntField()}  # image_1: once the name of our second view's output
    DatasetWriter(path, fields, num_workers=1).from_indexed_dataset(
        Samples(lambda i: (0.5, 10 + i, images[i], 7, i)))
    recipe = make_recipe("byol2", **SMALL_BYOL)
    loader = make_loader("ffcv", path, recipe, 4, device="cpu", shard_id=0, num_shards=1, drop_last=False,
                         shuffle=False, num_workers=1, multi_crop=multi_crop)
    batches = list(loader)
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for b in batches:
        assert b.labels.tolist() == (b.indices + 10).tolist()
        _check_batch(b, recipe, np.arange(10, 18))
    loader.close()

    bad = str(tmp_path / "float_label.beton")
    DatasetWriter(bad, {"image": RGBImageField(write_mode="raw"), "label": FloatField(), "index": IntField()},
                  num_workers=1).from_indexed_dataset(Samples(lambda i: (images[i], 0.5, i)))
    with pytest.raises(ValueError, match="label is a FloatField, expected IntField"):
        make_loader("ffcv", bad, recipe, 4, device="cpu", shard_id=0, num_shards=1)


@pytest.mark.cuda
@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_loader_on_cuda(beton):
    _, path = beton
    recipe = make_recipe("byol2", **SMALL_BYOL)
    loader = make_loader("ffcv", path, recipe, BATCH, device="cuda", shard_id=0, num_shards=1,
                         dtype=torch.bfloat16, num_workers=2)
    for batch in loader:
        assert all(v.is_cuda and v.dtype == torch.bfloat16 for v in batch.views + batch.mixed_views)
        assert batch.labels.is_cuda and batch.indices.is_cuda and batch.lam.is_cuda


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_ffcv_num_workers_zero_is_one_thread_not_every_core(beton, monkeypatch):
    """num_workers=0 is one decoding thread, as in torch-gpu and DALI (it was `0 or cpu_count`: every core, so
    `bench loaders --num-workers 0` gave torchvision no worker and FFCV all of them)."""
    made = {}
    import ffcv.loader

    real = ffcv.loader.Loader

    def recording(*a, **kw):
        made["num_workers"] = kw["num_workers"]
        return real(*a, **kw)

    monkeypatch.setattr(ffcv.loader, "Loader", recording)
    _, path = beton
    # FFCV sets torch's threads to its num_workers (1 at import): the caller's setting is kept (a CPU training
    # step ran on one thread after a num_workers=1 FFCV loader was made)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        # numba takes at most cpu_count threads: more are capped, with a warning (was numba's ValueError)
        for workers, expected in ((0, 1), (None, os.cpu_count()), (os.cpu_count() + 1, os.cpu_count())):
            made.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loader = make_loader("ffcv", path, make_recipe("byol2", **SMALL_BYOL), BATCH, device="cpu",
                                     shard_id=0, num_shards=1, num_workers=workers, seed=workers or 0)
            capped = [w for w in caught if "NUMBA_NUM_THREADS" in str(w.message)]
            assert len(capped) == (workers == os.cpu_count() + 1)
            assert loader.num_workers == expected
            assert made.get("num_workers", expected) == expected  # a parked Loader of the same settings is reused
            assert torch.get_num_threads() == 3
            next(iter(loader))
            assert torch.get_num_threads() == 3
            loader.close()
    finally:
        torch.set_num_threads(before)


@pytest.mark.timeout(150)
def test_beton_fingerprint_follows_the_content_not_the_layout(beton, folder, tmp_path):
    """The .beton's digest (what a resume and the ranks compare) is kept by a copy and by a second conversion of
    the same folder with other workers, and changes with one image's pixels or one label."""
    import shutil

    from sdmp_fast.pipelines.ffcv_loader import beton_fingerprint

    _, path = beton
    digest = beton_fingerprint(path)
    shutil.copy(path, tmp_path / "copy.beton")
    assert beton_fingerprint(tmp_path / "copy.beton") == digest
    again = str(tmp_path / "again.beton")
    conv.convert(folder, again, max_side=64, workers=1, chunk_size=1, progress=False)
    assert beton_fingerprint(again) == digest

    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    first = changed / "class1" / "0001.jpg"
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first, quality=95)  # same size, other pixels
    conv.convert(str(changed), str(tmp_path / "changed.beton"), max_side=64, workers=1, progress=False)
    assert beton_fingerprint(tmp_path / "changed.beton") != digest

    relabeled = tmp_path / "relabeled"
    shutil.copytree(folder, relabeled)
    os.rename(relabeled / "class0", relabeled / "class3")  # same images: class0's come last, labels shift
    conv.convert(str(relabeled), str(tmp_path / "relabeled.beton"), max_side=64, workers=1, progress=False)
    assert beton_fingerprint(tmp_path / "relabeled.beton") != digest


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_resume_over_another_beton_warns(beton, folder, tmp_path):
    """A .beton had no identity: a resume over another .beton at the same path (re-converted from other data)
    went on silently with batches the interrupted run would never have seen, as the image-file loaders warn."""
    import shutil

    from test_trainer import tiny_cfg

    from sdmp_fast.pipelines.ffcv_loader import beton_fingerprint, read_beton
    from sdmp_fast.trainer import Trainer

    _, path = beton
    data = str(tmp_path / "data.beton")
    shutil.copy(path, data)
    first = Trainer(tiny_cfg(tmp_path, loader="ffcv", data=data, num_workers=1, steps=1))
    state = first.state_dict()
    assert state["data"] == {"files": read_beton(path), "sha1": beton_fingerprint(path)}
    first.loader.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        same = Trainer(tiny_cfg(tmp_path, loader="ffcv", data=data, num_workers=1, steps=1))
        same.load_state_dict(state)
        same.loader.close()
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    os.remove(changed / "class1" / "0002.jpg")
    shutil.copy(changed / "class1" / "0003.jpg", changed / "class1" / "0002.jpg")  # same count, other content
    conv.convert(str(changed), data, max_side=64, workers=1, progress=False)
    other = Trainer(tiny_cfg(tmp_path, loader="ffcv", data=data, num_workers=1, steps=1))
    with pytest.raises(RuntimeWarning, match="the data set is not the one the checkpoint was trained on"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            other.load_state_dict(state)
    other.loader.close()


@pytest.mark.timeout(150)
def test_beton_fingerprint_changes_with_the_labels_alone(beton, folder, tmp_path):
    """Same images in the same order, every label one higher (an empty class folder sorted first is a class):
    the relabeling case above also reorders the images, so a digest without the labels passed it."""
    import shutil

    from sdmp_fast.pipelines.ffcv_loader import beton_fingerprint

    _, path = beton
    shifted = tmp_path / "shifted"
    shutil.copytree(folder, shifted)
    os.mkdir(shifted / "a_empty")
    before, after = list_images(folder), list_images(str(shifted))
    assert [os.path.relpath(f, folder) for f in before.files] == [os.path.relpath(f, after.root) for f in after.files]
    assert [x + 1 for x in before.labels] == list(after.labels)
    conv.convert(str(shifted), str(tmp_path / "shifted.beton"), max_side=64, workers=1, progress=False)
    assert beton_fingerprint(tmp_path / "shifted.beton") != beton_fingerprint(path)


@pytest.mark.timeout(150)
def test_convert_lists_a_skipped_file_whose_name_is_not_utf8(tmp_path):
    """An undecodable file whose name is not UTF-8 (os.listdir gives its bytes as surrogates): convert wrote the
    .beton, then failed writing .skipped.txt (UnicodeEncodeError, no sidecar), so as_lightly(data=) refused the
    folder; the sidecar holds the name's own bytes and the loader reads it back as the listed file."""
    from sdmp_fast.pipelines import adapters

    root = tmp_path / "d"
    make_synthetic_image_folder(str(root), num_classes=2, per_class=3, size=(20, 20))
    bad = os.path.join(os.fsencode(str(root / "class0")), b"bad\xff.jpg")
    try:
        with open(bad, "wb") as f:
            f.write(b"not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    # names with a line end, a tab or a backslash: a raw one split the sidecar's "path<TAB>reason" line
    odd = [str(root / "class1" / name) for name in ("bad\nline.jpg", "tab\tbad.jpg", "back\\slash\\n.jpg")]
    for path in odd:
        open(path, "wb").close()
    out = str(tmp_path / "x.beton")
    summary = conv.convert(str(root), out, max_side=32, workers=1, progress=False)
    want = sorted([os.fsdecode(bad)] + odd)
    assert sorted(p for p, _ in summary.skipped) == want
    raw = open(out + ".skipped.txt", "rb").read()
    assert raw.split(b"\n")[1].startswith(bad + b"\t") and raw.count(b"\n") == 5
    assert b"bad\\nline.jpg\tValueError" in raw
    assert len(summary.report().splitlines()) == 2 + 4
    loader = make_loader("ffcv", out, make_recipe("byol2", size=16), 2, device="cpu", shard_id=0, num_shards=1,
                         num_workers=1)
    assert sorted(loader.skipped) == want
    names = adapters.as_lightly(loader, data=str(root)).filenames
    assert len(names) == 6 and not any("bad" in n for n in names)
    # a list written before names were escaped (no header line) is read as it is: raw names, one a line
    with open(out + ".skipped.txt", "wb") as f:
        f.write(b"/data/imgs\\new_set\\x.jpg\tValueError: zero-byte file\n")
    assert make_loader("ffcv", out, make_recipe("byol2", size=16), 2, device="cpu", shard_id=0, num_shards=1,
                       num_workers=1).skipped == ["/data/imgs\\new_set\\x.jpg"]


@pytest.mark.timeout(150)
@NUMBA_FINALIZER_NOISE
def test_a_beton_replaced_after_the_trainer_was_built_is_not_taken_for_its_data(beton, folder, tmp_path):
    """The .beton's identity is read when the Trainer is built: read at the first checkpoint instead, a file
    replaced in between was recorded as the data trained on."""
    import shutil

    from test_trainer import tiny_cfg

    from sdmp_fast.pipelines.ffcv_loader import beton_fingerprint
    from sdmp_fast.trainer import Trainer

    _, path = beton
    data = str(tmp_path / "data.beton")
    shutil.copy(path, data)
    trainer = Trainer(tiny_cfg(tmp_path, loader="ffcv", data=data, num_workers=1, steps=1))
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    os.remove(changed / "class1" / "0002.jpg")
    shutil.copy(changed / "class1" / "0003.jpg", changed / "class1" / "0002.jpg")
    conv.convert(str(changed), data, max_side=64, workers=1, progress=False)
    assert beton_fingerprint(data) != beton_fingerprint(path)
    assert trainer.state_dict()["data"]["sha1"] == beton_fingerprint(path)
    trainer.loader.close()


@pytest.mark.timeout(150)
def test_beton_fingerprint_names_a_file_whose_images_are_not_in_its_allocation_table(beton, tmp_path):
    """A damaged .beton (image pointers the allocation table does not hold) is a ValueError naming it, and the
    file is left as it was."""
    import shutil

    from ffcv.reader import Reader

    from sdmp_fast.pipelines.ffcv_loader import beton_fingerprint

    _, path = beton
    bad = str(tmp_path / "damaged.beton")
    shutil.copy(path, bad)
    reader = Reader(bad)
    table = np.array(reader.alloc_table)
    table["ptr"] += 1  # every image's pointer now falls between the table's entries
    with open(bad, "r+b") as f:
        f.seek(int(reader.header["alloc_table_ptr"]))
        f.write(table.tobytes())
    before = open(bad, "rb").read()
    with pytest.raises(ValueError, match=r"damaged\.beton' is damaged: an image's data is missing"):
        beton_fingerprint(bad)
    assert open(bad, "rb").read() == before


@pytest.mark.timeout(300)
def test_a_failed_conversion_keeps_the_earlier_beton_and_its_list_and_says_why(folder, tmp_path, monkeypatch, capsys):
    """The .beton was replaced before its list of skipped files was written: a failure there left the new .beton
    beside the earlier conversion's list (and a temporary file nothing removed). A writer process that died (a
    full disk, most often) was a traceback naming no file; FFCV's own OSError named none either."""
    import errno

    from sdmp_fast.cli import main as cli_main

    out = tmp_path / "data.beton"
    conv.convert(folder, str(out), max_side=64, workers=1, progress=False)
    before = {p: p.read_bytes() for p in (out, tmp_path / "data.beton.skipped.txt")}

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conv, "_write_text", full)
    assert cli_main(["convert", folder, str(out), "--max-side", "48", "--workers", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"'{out}': convert: could not write it (disk full); the earlier file is unchanged" in err, err
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(tmp_path)) == [
        "data.beton", "data.beton.skipped.txt"]
    # a writer process that died: its exit code is all this process sees; free space tells a full disk
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("Usage", (), {"free": 0})())
    e = conv._write_failed(conv.WriterDied("convert: a writer process failed (exit code 1)"), str(out), 1 << 20)
    assert e.errno == errno.ENOSPC and e.filename == str(out)
    assert "(disk full; the writer's traceback is printed above); the earlier file is unchanged" in e.strerror
