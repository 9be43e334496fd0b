"""`sdmp-fast make-data OUT_DIR`: a benchmark ImageFolder of realistic photo JPEGs, built offline.

Loader throughput depends on what is decoded: JPEG size, entropy and chroma content. Flat synthetic shapes
decode several times faster than photos, so a loader benchmark on them flatters every backend. This command
takes the real photographs shipped inside scikit-image (no download), and writes random crops / rescales /
flips of them at about 500x375 (ImageNet's typical size, random aspect, some portrait), re-encoded as
baseline JPEG at quality 75-95 with 4:2:0 chroma, as ImageNet's files are.

Class c holds crops of photo ``c % len(photos)``, so labels mean something (k-NN can tell them apart).
Image i goes to class ``i % classes``; its randomness comes from ``(seed, i)`` only, so the set is identical
on every machine for a given seed. The tree is built in a temporary sibling folder and renamed into place:
a finished OUT_DIR has a stamp file, and running again with the same settings does nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from sdmp_fast.paths import remove_dead_temporaries

STAMP = ".sdmp-make-data.json"
# A machine without scikit-image (a bare GPU box) reads the same photos from PNGs exported where it is
# installed: lossless, so the rendered set is byte-identical.
PHOTOS_ENV = "SDMP_PHOTOS_DIR"
FORMAT_VERSION = 1
# scikit-image photographs that are part of its wheel (no pooch / network). Grayscale ones are kept as
# grey RGB images (ImageNet has some too); textures and synthetic drawings are left out.
COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "motorcycle_left", "motorcycle_right")
GRAY_PHOTOS = ("camera", "moon", "coins", "grass", "gravel", "brick")
LONG_SIDE = 500
ASPECT = (1.25, 1.5)        # long / short side: 500x400 .. 500x333, about 500x375
PORTRAIT_P = 0.2
CROP_AREA = (0.35, 1.0)     # fraction of the largest crop of the target aspect that fits the photo
QUALITY = (75, 95)


class PhotosUnavailable(RuntimeError):
    """No source photos: scikit-image missing, or SDMP_PHOTOS_DIR without exported photos."""


def load_photos() -> List[Tuple[str, np.ndarray]]:
    """The offline scikit-image photos as (name, HxWx3 uint8). Photos that need a download are skipped, so
    this never touches the network; raises PhotosUnavailable (a RuntimeError) when none loads (scikit-image
    missing)."""
    if os.environ.get(PHOTOS_ENV):
        return load_exported_photos(os.environ[PHOTOS_ENV])
    try:
        import skimage.data as skd
    except ImportError as e:
        raise PhotosUnavailable(f"make-data needs scikit-image (pip install 'sdmp-fast[bench]') or "
                                f"{PHOTOS_ENV}=DIR from `python -m sdmp_fast.benchmarks.make_data --export-photos "
                                f"DIR`") from e
    photos = []
    for name in COLOR_PHOTOS + GRAY_PHOTOS:
        try:
            if name.startswith("motorcycle_"):
                left, right, _ = skd.stereo_motorcycle()
                img = left if name.endswith("left") else right
            else:
                img = getattr(skd, name)()
        except Exception:  # a photo that needs pooch / a download in this scikit-image version
            continue
        img = np.asarray(img)
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos.append((name, np.ascontiguousarray(img[:, :, :3])))
    if not photos:
        raise PhotosUnavailable("make-data: no scikit-image photo could be loaded offline")
    return photos


def export_photos(out_dir: str) -> List[str]:
    """Write every offline scikit-image photo as ``<order>_<name>.png`` (for ``SDMP_PHOTOS_DIR``)."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, (name, img) in enumerate(load_photos()):
        paths.append(os.path.join(out_dir, f"{k:02d}_{name}.png"))
        Image.fromarray(img).save(paths[-1], optimize=True)
    return paths


def load_exported_photos(photo_dir: str) -> List[Tuple[str, np.ndarray]]:
    """The photos written by :func:`export_photos`, in their original order."""
    from PIL import Image

    names = sorted(f for f in os.listdir(photo_dir) if f.endswith(".png")) if os.path.isdir(photo_dir) else []
    if not names:
        raise PhotosUnavailable(f"{PHOTOS_ENV}={photo_dir}: no exported .png photos there")
    return [(f[3:-4], np.asarray(Image.open(os.path.join(photo_dir, f)).convert("RGB"))) for f in names]


def _target_size(rng: np.random.Generator) -> Tuple[int, int]:
    """(width, height) around 500x375."""
    short = int(round(LONG_SIDE / rng.uniform(*ASPECT)))
    return (short, LONG_SIDE) if rng.random() < PORTRAIT_P else (LONG_SIDE, short)


def render_image(photo: np.ndarray, rng: np.random.Generator) -> Tuple[bytes, Tuple[int, int]]:
    """One random crop of ``photo`` at the target aspect, resized, maybe flipped, JPEG-encoded."""
    from PIL import Image

    w, h = _target_size(rng)
    ph, pw = photo.shape[:2]
    # Largest crop of aspect w/h inside the photo, then a random fraction of its area.
    full_w = min(pw, ph * w / h)
    scale = np.sqrt(rng.uniform(*CROP_AREA))
    cw, ch = max(8, int(full_w * scale)), max(8, int(full_w * scale * h / w))
    cw, ch = min(cw, pw), min(ch, ph)
    x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    img = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)), subsampling="4:2:0")
    return buf.getvalue(), (w, h)


def _settings(num_images: int, classes: int, seed: int) -> Dict:
    return {"num_images": num_images, "classes": classes, "seed": seed, "version": FORMAT_VERSION}


def _damage(out_dir: str, stamp: Dict) -> Optional[str]:
    """What is wrong with a set whose stamp matches (a deleted class folder, a truncated or replaced file), or
    None when every image is where the stamp says and their total size is the stamp's."""
    photos, classes, n = stamp.get("photos") or [], stamp["classes"], stamp["num_images"]
    if not photos:
        return "its stamp lists no photos"
    names = [f"{c:03d}_{photos[c % len(photos)]}" for c in range(classes)]
    missing, total = 0, 0
    for i in range(n):
        try:
            total += os.stat(os.path.join(out_dir, names[i % classes], f"{i:06d}.jpg")).st_size
        except OSError:
            missing += 1
    if missing:
        return f"{missing} of its {n} images are missing"
    if stamp.get("bytes") not in (None, total):
        return f"its images hold {total} bytes, not the {stamp['bytes']} written"
    return None


def read_stamp(out_dir: str):
    try:
        with open(os.path.join(out_dir, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_data(out_dir: str, num_images: int = 512, classes: int = 8, seed: int = 0, force: bool = False,
              quiet: bool = True) -> str:
    """Build the photo ImageFolder at ``out_dir`` (see the module docstring); returns ``out_dir``.

    Skips the work when ``out_dir`` already holds a finished set with the same settings. Refuses (ValueError)
    to touch a non-empty folder it did not make, or one made with other settings unless ``force``.
    """
    if num_images < 1:
        raise ValueError(f"--num-images: must be >= 1, got {num_images}")
    if classes < 1:
        raise ValueError(f"--classes: must be >= 1, got {classes}")
    if classes > num_images:
        raise ValueError(f"--classes: {classes} class folders for {num_images} images would leave some empty "
                         f"(an ImageFolder with empty classes); give at most --num-images classes")
    if seed < 0:
        raise ValueError(f"--seed: must be >= 0, got {seed}")
    # a link to a folder is the folder it names: the set is swapped in there, the link stays
    out_dir = os.path.realpath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"make-data: OUT_DIR {out_dir!r} exists and is not a folder; choose a new or empty folder")
    parent = os.path.dirname(out_dir)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise ValueError(f"make-data: OUT_DIR {out_dir!r} lies under {parent!r}, which is not a folder")
    # one make-data per OUT_DIR at a time: a second one checked the settings before the first swapped its set in,
    # then swapped its own over it (other settings, no --force); it waits, then finds the set ready or not
    if _complete(out_dir, num_images, classes, seed, quiet):  # a finished set (maybe read-only): no lock needed
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with _exclusive(out_dir, quiet):
        return _make_data_locked(out_dir, num_images, classes, seed, force, quiet)


def _complete(out_dir: str, num_images: int, classes: int, seed: int, quiet: bool) -> bool:
    """Whether ``out_dir`` holds the whole set of these settings (then said, unless ``quiet``)."""
    _, same, damage = _found(out_dir, _settings(num_images, classes, seed))
    if same and damage is None:
        _say_complete(out_dir, num_images, seed, quiet)
    return same and damage is None


def _say_complete(out_dir: str, num_images: int, seed: int, quiet: bool) -> None:
    if not quiet:
        print(f"make-data: {out_dir} already holds {num_images} images (seed {seed}); nothing to do")


def _found(out_dir: str, want: Dict) -> Tuple[Optional[Dict], bool, Optional[str]]:
    """(stamp, whether it has the settings ``want``, what is damaged in that set or None)."""
    stamp = read_stamp(out_dir)
    same = stamp is not None and {k: stamp.get(k) for k in want} == want
    return stamp, same, _damage(out_dir, stamp) if same else None


@contextlib.contextmanager
def _exclusive(out_dir: str, quiet: bool):
    from sdmp_fast.paths import LockHeld, lock_exclusive, release_removing, sibling_lock_path

    lock = sibling_lock_path(out_dir)
    try:
        fh = lock_exclusive(lock)
    except LockHeld:
        if not quiet:
            print(f"make-data: another make-data is writing {out_dir}; waiting for it", flush=True)
        fh = lock_exclusive(lock, wait=True)
    try:
        yield
    finally:
        release_removing(fh)


def _make_data_locked(out_dir: str, num_images: int, classes: int, seed: int, force: bool, quiet: bool) -> str:
    want = _settings(num_images, classes, seed)
    stamp, same, damage = _found(out_dir, want)  # read again under the lock: the make-data waited for built it?
    if same and damage is None:
        _say_complete(out_dir, num_images, seed, quiet)
        return out_dir
    if same:
        if not quiet:  # our own set, with these settings: rebuilt as it was (the images depend on (seed, i) only)
            print(f"make-data: {out_dir}: {damage}; building it again")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if stamp is None:
            raise ValueError(f"make-data: {out_dir!r} is a non-empty folder that make-data did not build; "
                             f"choose an empty or new OUT_DIR")
        if not force and not same:
            raise ValueError(f"make-data: {out_dir!r} holds a set made with other settings "
                             f"({ {k: stamp.get(k) for k in want} }); pass --force to rebuild it")

    photos = load_photos()
    tmp, old = f"{out_dir}.tmp-{os.getpid()}", f"{out_dir}.old-{os.getpid()}"
    remove_dead_temporaries(f"{out_dir}.tmp-", f"{out_dir}.old-")  # a killed run's (it cannot clean up)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        names = [f"{c:03d}_{photos[c % len(photos)][0]}" for c in range(classes)]
        for name in names:
            os.makedirs(os.path.join(tmp, name))
        t0, total_bytes = time.perf_counter(), 0
        for i in range(num_images):
            c = i % classes
            rng = np.random.default_rng([seed, i])
            data, _ = render_image(photos[c % len(photos)][1], rng)
            total_bytes += len(data)
            with open(os.path.join(tmp, names[c], f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump({**want, "photos": [p[0] for p in photos], "bytes": total_bytes}, f, indent=1)
        # Swap into place: a half-written set never sits under the final name, and the old set is moved aside
        # whole before it is deleted (deleted in place, a kill left part of it under OUT_DIR, without its stamp:
        # a folder every rerun refused)
        if os.path.isdir(out_dir):
            if os.listdir(out_dir):  # ours, with other settings (force was given), or damaged
                os.replace(out_dir, old)
            else:
                os.rmdir(out_dir)
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # any failure (a full disk, Ctrl-C, a bad path): no half-built folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.lexists(out_dir):
            os.replace(old, out_dir)  # the swap failed half-way: the old set goes back
        raise
    if not quiet:
        print(f"make-data: wrote {num_images} JPEGs in {classes} classes from {len(photos)} photos to {out_dir} "
              f"({total_bytes / num_images / 1e3:.0f} kB/image, {time.perf_counter() - t0:.1f} s)")
    return out_dir


def add_arguments(p) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (an ImageFolder tree)")
    p.add_argument("--num-images", type=int, default=512, help="number of JPEGs (default 512)")
    p.add_argument("--classes", type=int, default=8, help="number of class folders (default 8)")
    p.add_argument("--seed", type=int, default=0, help="the set is a pure function of the seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild a set made earlier with other settings")


def main(args) -> int:
    try:
        make_data(args.out_dir, args.num_images, args.classes, args.seed, force=args.force, quiet=False)
    except PhotosUnavailable as e:  # a setting or a package to fix: one line (the CLI's ValueError), no traceback
        raise ValueError(str(e)) from None
    return 0


if __name__ == "__main__":  # python -m sdmp_fast.benchmarks.make_data --export-photos DIR
    import argparse

    parser = argparse.ArgumentParser(description="export scikit-image's offline photos for SDMP_PHOTOS_DIR")
    parser.add_argument("--export-photos", metavar="DIR", required=True)
    written = export_photos(parser.parse_args().export_photos)
    print(f"wrote {len(written)} photos ({sum(os.path.getsize(p) for p in written) / 2**20:.1f} MiB)")
