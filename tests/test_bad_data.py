"""The bad-data zoo through every backend: one ImageFolder holding every kind of file a crawl of millions of
images contains (truncated / corrupt / zero-byte / non-image files, PNG, grayscale, CMYK, 16-bit, an
EXIF-rotated photo, an image smaller than the crop, a very large one, an empty class folder).

For each backend an epoch must finish (the timeout catches hangs), every decodable image must come out exactly
once, and every undecodable one must be skipped, counted and named (``loader.skipped`` and the epoch-end
warning; for FFCV, `sdmp-fast convert`'s summary and ``.skipped.txt`` sidecar, read back by ``loader.skipped``).

The order is unshuffled and the files are laid out so that every batch loses an even number of files: the
rule that drops one more decodable sample to keep a mixed batch even (``skips.py``) then never fires, and
"exactly once" can be checked exactly (``trimmed == 0``).

A JPEG whose headers are intact but whose scan data is garbage (``40_scrambled.jpg``) is decodable or not
depending on the decoder (libjpeg warns and fills garbage pixels, or stops at the bad marker): it must be
either used once or skipped and named, never both and never a crash. Which backend did what is recorded in
the test's output (``-rP``).
"""
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdmp_fast.pipelines.base import list_images, make_loader, resume_batches
from sdmp_fast.pipelines.recipes import byol2

BATCH = 4
RECIPE = byol2(size=16)
PHOTO = (40, 48)  # h, w of the ordinary photos
LARGE = (3000, 4000)
HUGE = (8000, 8000)

# Undecodable by every decoder; they sit two per batch (see the module docstring).
BAD = ("c1_odd/10_truncated.jpg", "c1_odd/12_corrupt.jpg", "c1_odd/20_empty.jpg", "c1_odd/22_notes.jpg")
MAYBE = "c1_odd/40_scrambled.jpg"
ROTATED = "c1_odd/30_rotated.jpg"
DEEP = "c1_odd/23_deep16.png"


def _gradient(h, w, lo=30, hi=170):
    """Gray uint8 [h, w] brightening top to bottom: any crop of it, resized, flipped, jittered (monotone per
    pixel) or blurred still brightens downwards, which is how the orientation check reads it."""
    return np.broadcast_to(np.linspace(lo, hi, h, dtype=np.float64)[:, None], (h, w)).round().astype(np.uint8)


def _photo(h, w, seed):
    """RGB [h, w, 3] with texture in every crop: a gradient with a per-image tint and a little noise."""
    rng = np.random.default_rng(seed)
    base = _gradient(h, w).astype(np.int16)[..., None] + rng.integers(-40, 40, 3, dtype=np.int16)
    noise = rng.integers(-12, 12, (h, w, 1), dtype=np.int16) if h * w <= 1 << 20 else 0
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _jpeg(arr_or_image, **kw) -> bytes:
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _write(root, rel, data: bytes):
    with open(os.path.join(root, rel), "wb") as f:
        f.write(data)


def build_zoo(root: str):
    """(root, files in list order, set of always-undecodable paths). Order (shuffle off, batches of 4):
    [4 photos] [truncated gray corrupt cmyk] [empty png notes deep16] [rotated tiny large photo]
    [scrambled photo huge]: two bad files in each of batches 1 and 2, the maybe-file in a last batch of 3.

    Batch 1 is the case that lost samples in DALI: the byte sniff drops the truncated file, the feeder trimmed
    the odd three to two (cmyk out) before DALI failed on the corrupt one, and the re-fed batch then lost gray
    too -- two decodable files gone where none had to be."""
    for d in ("c0_photos", "c1_odd", "c2_empty"):
        os.makedirs(os.path.join(root, d))
    h, w = PHOTO
    for k in range(4):
        _write(root, f"c0_photos/{k:02d}.jpg", _jpeg(_photo(h, w, k)))
    whole = _jpeg(_photo(h, w, 10))
    scan = whole.index(b"\xff\xda")  # start of scan: the headers before it are intact
    _write(root, BAD[0], whole[: len(whole) // 2])  # cut short: no end-of-image marker
    # a JPEG signature and JFIF header, then garbage (no 0xFF: no marker, no frame) and an end marker: passes
    # every byte sniff, so the decoders themselves must reject it
    junk = np.random.default_rng(1).integers(0, 255, 600, dtype=np.uint8)
    _write(root, BAD[1], whole[:20] + bytes(junk) + b"\xff\xd9")
    _write(root, BAD[2], b"")
    _write(root, BAD[3], b"a text file with a .jpg name\n" * 20)
    garbage = bytes(np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8))
    _write(root, MAYBE, whole[: scan + (len(whole) - scan) // 2] + garbage + b"\xff\xd9")

    _write(root, "c1_odd/11_gray.jpg", _jpeg(_photo(h, w, 11)[..., 0]))
    _write(root, "c1_odd/13_cmyk.jpg", _jpeg(Image.fromarray(_photo(h, w, 13)).convert("CMYK")))
    Image.fromarray(_photo(h, w, 21)).save(os.path.join(root, "c1_odd/21_photo.png"))
    deep = (_gradient(h, w).astype(np.uint16) * 257)  # 16-bit: PIL's plain convert would clip it to white
    Image.fromarray(deep).save(os.path.join(root, DEEP))
    assert Image.open(os.path.join(root, DEEP)).mode.startswith("I")
    # EXIF orientation 6 ("rotate 90 clockwise to display"): stored 60 wide x 40 tall with the gradient running
    # left to right, displayed 40 wide x 60 tall with it running top to bottom
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(_gradient(60, 40), k=1))  # [40, 60]: gradient along x
    _write(root, ROTATED, _jpeg(np.repeat(stored[..., None], 3, axis=2), exif=exif))
    _write(root, "c1_odd/31_tiny.jpg", _jpeg(_photo(7, 5, 31)))  # 5 wide x 7 tall: smaller than every crop
    _write(root, "c1_odd/32_large.jpg", _jpeg(_photo(*LARGE, 32)))
    _write(root, "c1_odd/33_photo.jpg", _jpeg(_photo(h, w, 33)))
    _write(root, "c1_odd/41_photo.jpg", _jpeg(_photo(h, w, 41)))
    _write(root, "c1_odd/42_huge.jpg", _jpeg(_photo(*HUGE, 42)))

    images = list_images(root)
    assert images.classes == ("c0_photos", "c1_odd", "c2_empty") and len(images) == 19
    bad = {os.path.join(root, rel) for rel in BAD}
    maybe = os.path.join(root, MAYBE)
    for start in range(0, len(images), BATCH):  # the layout promise of the docstring
        chunk = images.files[start:start + BATCH]
        assert sum(f in bad for f in chunk) % 2 == 0 and (maybe not in chunk or len(chunk) == 3)
    return root, images.files, bad


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(str(tmp_path_factory.mktemp("zoo") / "data"))


@pytest.fixture(scope="module")
def zoo_beton(zoo, tmp_path_factory):
    """The zoo converted once by `sdmp-fast convert` (python API)."""
    pytest.importorskip("ffcv", reason="ffcv is not installed")
    from sdmp_fast.pipelines import convert as conv

    root, _, _ = zoo
    out = str(tmp_path_factory.mktemp("zoo_beton") / "zoo.beton")
    return conv.convert(root, out, max_side=64, workers=2, progress=False)


# ------------------------------------------------------------------------------------------------ helpers
def _upright_score(view: torch.Tensor) -> float:
    """> 1 when a [3, H, W] view brightens along its height (the gradient stands up), < 1 along its width."""
    x = view.float().mean(0)
    rows, cols = x.mean(1), x.mean(0)
    return float((rows.max() - rows.min()) / (cols.max() - cols.min() + 1e-3))


def _loader(backend, data, device, **kw):
    return make_loader(backend, data, RECIPE, BATCH, device=device, shard_id=0, num_shards=1, shuffle=False,
                       drop_last=False, seed=5, num_workers=2, **kw)


def _run_epoch(loader):
    """(batches, skip warnings) of one epoch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    return batches, [str(w.message) for w in caught if "undecodable" in str(w.message)]


BACKENDS = [
    pytest.param("torchvision", "cpu", id="torchvision-cpu"),
    pytest.param("torch-gpu", "cpu", id="torch-gpu-cpu"),
    pytest.param("dali", "cpu", id="dali-cpu"),
    pytest.param("ffcv", "cpu", id="ffcv-cpu"),
] + [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda)
     for b in ("torchvision", "torch-gpu", "dali", "ffcv")]
NEEDS = {"dali": "nvidia.dali", "ffcv": "ffcv"}


@pytest.mark.timeout(150)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizer (test_ffcv)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zoo_epoch_uses_every_decodable_file_once_and_names_the_rest(backend, device, zoo, request):
    if backend in NEEDS:
        pytest.importorskip(NEEDS[backend], reason=f"{NEEDS[backend]} is not installed")
    root, files, bad = zoo
    maybe = os.path.join(root, MAYBE)
    if backend == "ffcv":
        summary = request.getfixturevalue("zoo_beton")
        skipped_by_convert = {p for p, _ in summary.skipped}
        assert bad <= skipped_by_convert <= bad | {maybe}
        assert summary.written == len(files) - len(skipped_by_convert) and summary.num_classes == 3
        report = summary.report()
        assert all(os.path.basename(p) in report for p in skipped_by_convert)
        with open(summary.skipped_list) as f:
            header, *lines = f.read().splitlines()  # a header line, then "path<TAB>reason" lines
        assert header.startswith("# sdmp-fast convert") and {ln.split("\t")[0] for ln in lines} == skipped_by_convert
        stored = [f for f in files if f not in skipped_by_convert]  # .beton index -> source file
        loader = _loader(backend, summary.out, device)
    else:
        loader = _loader(backend, root, device)
        stored = list(files)

    for epoch in range(2):  # the second epoch meets the bad files again (DALI: as already-known bad ones)
        loader.set_epoch(epoch)
        batches, skip_warnings = _run_epoch(loader)
        skipped = set(loader.skipped)
        assert bad <= skipped <= bad | {maybe}, sorted(skipped)
        decoded = set(files) - skipped
        used = [stored[i] for b in batches for i in b.indices.cpu().tolist()]
        assert len(used) == len(set(used)) and set(used) == decoded  # each decodable file exactly once
        if backend != "ffcv":
            assert loader.log.trimmed == 0
            assert len(skip_warnings) == 1 and f"skipped {len(skipped)} undecodable" in skip_warnings[0]
            assert all(os.path.basename(p) in skip_warnings[0] for p in skipped)
        for b in batches:
            n = b.batch_size
            assert [tuple(v.shape) for v in b.views + b.mixed_views] == [(n, 3, 16, 16)] * 4
            assert all(v.device.type == device and torch.isfinite(v).all() for v in b.views + b.mixed_views)
            assert b.lam.shape == (n,) and ((b.lam >= 0) & (b.lam <= 1)).all()
        views0 = {stored[i]: b.views[0][k] for b in batches for k, i in enumerate(b.indices.cpu().tolist())}
        # EXIF orientation honoured: view 0 (no solarize in BYOL's first view) of the rotated photo brightens
        # downwards; ignoring EXIF would make it brighten sideways (score << 1)
        assert _upright_score(views0[os.path.join(root, ROTATED)]) > 3
        # 16-bit PNG scaled to 8 bits, not clipped to a white (constant) image
        assert views0[os.path.join(root, DEEP)].float().std() > 0.05
    print(f"{backend}/{device}: {os.path.basename(maybe)} "
          f"{'skipped: ' + loader.log.reasons[maybe] if backend != 'ffcv' and maybe in skipped else ''}"
          f"{'skipped by convert' if backend == 'ffcv' and maybe in skipped else ''}"
          f"{'decoded (garbage pixels)' if maybe in decoded else ''}")


def test_empty_class_folder_keeps_its_label_slot(zoo, tmp_path):
    root, files, _ = zoo
    images = list_images(root)
    assert images.classes[-1] == "c2_empty" and 2 not in images.labels
    os.makedirs(tmp_path / "only_empty" / "nothing")  # nothing but an empty class: a clear error, not a hang
    with pytest.raises(ValueError, match="holds no image files"):
        list_images(tmp_path / "only_empty")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["torchvision", "torch-gpu", "dali"])
def test_drop_last_batches_keep_their_size_on_every_rank_despite_bad_files(backend, tmp_path):
    # DDP needs every rank to take len(loader) batches of equal size (MoCo's key all_gather, the step count):
    # with drop_last the slots of skipped files are refilled with the batch's decodable samples
    if backend in NEEDS:
        pytest.importorskip(NEEDS[backend], reason=f"{NEEDS[backend]} is not installed")
    root = str(tmp_path / "messy")
    for c in range(2):
        os.makedirs(os.path.join(root, f"c{c}"))
    for k in range(26):
        _write(root, f"c{k % 2}/{k:02d}.jpg", _jpeg(_photo(*PHOTO, seed=k)))
    bad = {"c0/02.jpg": b"", "c1/05.jpg": _jpeg(_photo(*PHOTO, seed=5))[:300], "c0/08.jpg": b"not an image",
           "c1/13.jpg": b"\xff\xd8\xff garbage"}
    for rel, data in bad.items():
        _write(root, rel, data)
    files = list_images(root).files
    bad_paths = {os.path.join(root, rel) for rel in bad}
    filled = 0
    for shard in range(2):
        loader = make_loader(backend, root, RECIPE, BATCH, device="cpu", shard_id=shard, num_shards=2, shuffle=True,
                             drop_last=True, seed=1, num_workers=2)
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches, _ = _run_epoch(loader)
            assert [b.batch_size for b in batches] == [BATCH] * len(loader) == [BATCH] * (13 // BATCH)
            used = {files[i] for b in batches for i in b.indices.tolist()}
            assert not used & bad_paths
            for b in batches:
                assert b.lam.shape == (BATCH,) and len(b.mixed_views) == 2
                idx = b.indices.tolist()  # a refilled repeat is never its own batch-flip partner
                assert all(idx[i] != idx[-1 - i] for i in range(len(idx))), idx
        assert set(loader.skipped) <= bad_paths
        assert loader.log.trimmed == 0
        filled += loader.log.filled
    assert filled > 0  # the refill was exercised


def test_refilled_slots_never_pair_a_sample_with_itself():
    """sdmp.md section 1: image i is mixed with image n-1-i, never with itself. The refill repeats the decodable
    samples (each at least once, the decoded ones first, in order) so that no slot's partner holds its sample."""
    from sdmp_fast.pipelines.skips import settle

    assert settle(7, 8, fill=True, keep_even=True) == [0, 1, 2, 3, 4, 5, 6, 1]  # the plain cycle put 0 at slot 7
    for size in range(2, 41, 2):
        for decoded in range(2, size + 1):
            pos = settle(decoded, size, fill=True, keep_even=True)
            assert len(pos) == size and pos[:decoded] == list(range(decoded))
            assert all(pos[i] != pos[size - 1 - i] for i in range(size)), (decoded, size, pos)
    assert settle(1, 4, fill=True, keep_even=True) == [0, 0, 0, 0]  # one decodable sample: nothing else to pair


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["torchvision", "torch-gpu", "dali"])
def test_a_sharded_drop_last_batch_with_no_decodable_file_is_an_error_not_a_short_rank(backend, tmp_path):
    # Such a batch cannot be refilled from itself; left out, its rank would take len(loader) - 1 batches and
    # stall the other ranks at their next collective. Unsharded, it is left out as before.
    if backend in NEEDS:
        pytest.importorskip(NEEDS[backend], reason=f"{NEEDS[backend]} is not installed")
    root = str(tmp_path / "data")
    os.makedirs(os.path.join(root, "c0"))
    for k in range(8):  # unshuffled, 2 shards of 4: shard 0 takes 0, 2, 4, 6 -> batches (0, 2) and (4, 6)
        _write(root, f"c0/{k:02d}.jpg", _jpeg(_photo(*PHOTO, seed=k)))
    for k in (4, 5, 6):
        _write(root, f"c0/{k:02d}.jpg", b"not an image")
    make = lambda **kw: make_loader(backend, root, RECIPE, 2, device="cpu", shuffle=False, drop_last=True,  # noqa: E731
                                    num_workers=2, **kw)
    shard0 = make(shard_id=0, num_shards=2)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=r"shard 0 of 2.*none of the 2 files.*04\.jpg.*06\.jpg"):
            for b in shard0:
                seen.append(b.indices.tolist())
        assert seen == [[0, 2]]  # the batches before it come out first
        resumed = resume_batches(make(shard_id=0, num_shards=2), 0, 2)  # a resume past it meets it too
        with pytest.raises(ValueError, match=r"shard 0 of 2.*none of the 2 files"):  # (probed unread or read)
            next(resumed)
        assert [b.indices.tolist() for b in make(shard_id=1, num_shards=2)] == [[1, 3], [7, 7]]  # 5 refilled
        alone = make(shard_id=0, num_shards=1)  # one process: the batch (4, 5) is left out, as before
        assert [b.indices.tolist() for b in alone] == [[0, 1], [2, 3], [7, 7]]


def test_convert_workers_zero_counts_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """--workers 0 took os.cpu_count(): the host's cores, not a container's CPU set (64 processes on 2 cores)."""
    pytest.importorskip("ffcv")
    from sdmp_fast.data import make_synthetic_image_folder
    from sdmp_fast.pipelines import convert as convert_mod

    make_synthetic_image_folder(str(tmp_path / "d"), num_classes=2, per_class=2, size=(20, 20))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    seen = []

    def check_images(files, max_side, workers, progress):
        seen.append(workers)
        raise KeyboardInterrupt  # stop before writing anything

    monkeypatch.setattr(convert_mod, "check_images", check_images)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert(str(tmp_path / "d"), str(tmp_path / "x.beton"), progress=False)
    assert seen == [2] and not (tmp_path / "x.beton").exists()


_ORPHAN_SCRIPT = r"""
import os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from sdmp_fast.pipelines import convert as conv

pool = ProcessPoolExecutor(1, initializer=conv._exit_with_parent)
pid = pool.submit(os.getpid).result()
pool.submit(time.sleep, 600)
print(pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9 PID`: no cleanup of any kind
"""

_SIGTERM_SCRIPT = r"""
import os, signal, sys, time
from sdmp_fast.pipelines import convert as conv

told = []
signal.signal(signal.SIGTERM, lambda s, f: told.append(s))  # a host program's own handler
restore = conv._sigterm_unwinds()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("not unwound")
except conv._Terminated:
    print("unwound")
finally:
    restore()
os.kill(os.getpid(), signal.SIGTERM)  # delivered again, as convert does after its clean-up
time.sleep(0.1)
print("host handler", told)
"""


@pytest.mark.timeout(120)
def test_convert_workers_end_with_their_parent_and_a_sigterm_unwinds_it(tmp_path):
    """convert's checking and writing workers outlived a parent killed alone (kill PID, docker stop): blocked for
    ever, or writing the whole data set into a temporary nobody would rename."""
    import subprocess
    import sys
    import time

    out = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == -9, out.stderr
    worker = int(out.stdout.split()[0])

    def alive(pid: int) -> bool:  # a zombie (no init to reap it in some containers) has ended
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(worker):
        time.sleep(0.1)
    assert not alive(worker), "the worker outlived its parent"
    # SIGTERM while writing unwinds convert (the writer stops its processes, the temporaries go), then reaches
    # the handler that was there before (the default one ends the process; a host program's runs)
    out = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split("\n")[:2] == ["unwound", "host handler [15]"], out
