"""`sdmp-fast make-data`: N decodable photo JPEGs of about 500x375, deterministic per seed, idempotent."""
import hashlib
import os

import pytest
from PIL import Image

from sdmp_fast.benchmarks.make_data import STAMP, load_photos, make_data
from sdmp_fast.pipelines.base import list_images


def _digest(root):
    h = hashlib.sha256()
    for f in list_images(root).files:
        h.update(os.path.relpath(f, root).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


@pytest.mark.timeout(120)
def test_make_data_writes_n_decodable_photo_jpegs_deterministically(tmp_path):
    a = make_data(str(tmp_path / "a"), num_images=20, classes=4, seed=3)
    images = list_images(a)
    assert len(images) == 20 and len(images.classes) == 4
    assert sorted(set(images.labels)) == [0, 1, 2, 3]
    for f in images.files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
            assert max(w, h) == 500 and 320 <= min(w, h) <= 400
            im.load()  # decodes fully
    assert _digest(a) == _digest(make_data(str(tmp_path / "b"), num_images=20, classes=4, seed=3))
    assert _digest(a) != _digest(make_data(str(tmp_path / "c"), num_images=20, classes=4, seed=4))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no partial folder left behind


@pytest.mark.timeout(120)
def test_a_damaged_set_is_built_again_not_reported_complete(tmp_path, capsys):
    """The stamp alone said "already holds N images" after a class folder was deleted or a file cut short."""
    import shutil

    out = str(tmp_path / "set")
    make_data(out, num_images=8, classes=4, seed=0)
    whole = _digest(out)
    shutil.rmtree(os.path.join(out, sorted(d for d in os.listdir(out) if not d.startswith("."))[0]))
    capsys.readouterr()
    make_data(out, num_images=8, classes=4, seed=0, quiet=False)
    assert "2 of its 8 images are missing; building it again" in capsys.readouterr().out
    assert _digest(out) == whole and len(list_images(out)) == 8
    victim = list_images(out).files[3]
    with open(victim, "r+b") as f:
        f.truncate(100)
    make_data(out, num_images=8, classes=4, seed=0, quiet=False)
    assert "bytes, not the" in capsys.readouterr().out and _digest(out) == whole
    make_data(out, num_images=8, classes=4, seed=0, quiet=False)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_make_data_is_idempotent_and_guards_foreign_folders(tmp_path):
    out = str(tmp_path / "set")
    make_data(out, num_images=6, classes=2, seed=0)
    stamp_mtime = os.path.getmtime(os.path.join(out, STAMP))
    make_data(out, num_images=6, classes=2, seed=0)  # complete stamp: nothing rewritten
    assert os.path.getmtime(os.path.join(out, STAMP)) == stamp_mtime
    with pytest.raises(ValueError, match="other settings"):
        make_data(out, num_images=8, classes=2, seed=0)
    make_data(out, num_images=8, classes=2, seed=0, force=True)
    assert len(list_images(out)) == 8
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not build"):
        make_data(str(foreign), num_images=4, classes=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_photos_load_offline_in_colour():
    photos = load_photos()
    names = [n for n, _ in photos]
    assert len(photos) >= 5 and "astronaut" in names and "coffee" in names
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype.name == "uint8" for _, p in photos)


def test_exported_photos_render_the_same_set(tmp_path, monkeypatch):
    """A machine without scikit-image (SDMP_PHOTOS_DIR) builds a byte-identical benchmark set."""
    from sdmp_fast.benchmarks.make_data import PHOTOS_ENV, export_photos

    export_photos(str(tmp_path / "photos"))
    make_data(str(tmp_path / "ref"), num_images=6, classes=3)
    monkeypatch.setenv(PHOTOS_ENV, str(tmp_path / "photos"))
    assert [n for n, _ in load_photos()] == [n for n, _ in _skimage_photos(monkeypatch)]
    make_data(str(tmp_path / "exported"), num_images=6, classes=3)
    ref, exported = list_images(str(tmp_path / "ref")).files, list_images(str(tmp_path / "exported")).files
    assert len(ref) == 6
    for a, b in zip(ref, exported):
        assert open(a, "rb").read() == open(b, "rb").read(), b
    monkeypatch.setenv(PHOTOS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="SDMP_PHOTOS_DIR"):
        load_photos()


def _skimage_photos(monkeypatch):
    from sdmp_fast.benchmarks.make_data import PHOTOS_ENV

    with monkeypatch.context() as m:
        m.delenv(PHOTOS_ENV)
        return load_photos()


def test_make_data_settings_and_a_linked_out_dir(tmp_path):
    with pytest.raises(ValueError, match="--classes: 8 class folders for 3 images"):
        make_data(str(tmp_path / "few"), num_images=3)
    with pytest.raises(ValueError, match="--seed: must be >= 0"):
        make_data(str(tmp_path / "neg"), num_images=2, classes=1, seed=-1)
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)  # e.g. a scratch folder linked into the project
    make_data(str(tmp_path / "link"), num_images=2, classes=1)
    assert (tmp_path / "link").is_symlink() and len(list_images(str(target))) == 2


def test_make_data_refuses_a_file_as_out_dir_and_leaves_no_tmp_folder(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        make_data(str(afile), num_images=2, classes=1)
    with pytest.raises(ValueError, match="not a folder"):
        make_data(str(afile / "sub"), num_images=2, classes=1)
    assert afile.read_text() == "not a folder"

    import sdmp_fast.benchmarks.make_data as md

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(md, "render_image", boom)  # any failure mid-build removes the temporary folder
    with pytest.raises(OSError, match="disk full"):
        make_data(str(tmp_path / "out"), num_images=2, classes=1)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_cli_make_data_without_photos_is_one_line(tmp_path, monkeypatch, capsys):
    """SDMP_PHOTOS_DIR without exported photos (or no scikit-image): exit 2 and one line naming the setting, not a
    RuntimeError traceback; nothing is created."""
    from sdmp_fast import cli
    from sdmp_fast.benchmarks.make_data import PHOTOS_ENV

    monkeypatch.setenv(PHOTOS_ENV, str(tmp_path / "nowhere"))
    assert cli.main(["make-data", str(tmp_path / "set"), "--num-images", "4", "--classes", "2"]) == 2
    err = capsys.readouterr().err
    nowhere = tmp_path / "nowhere"
    assert err.strip() == f"sdmp-fast make-data: error: {PHOTOS_ENV}={nowhere}: no exported .png photos there"
    assert not (tmp_path / "set").exists()


@pytest.mark.timeout(120)
def test_cli_prints_a_name_that_is_not_utf8_escaped_on_a_strict_stdout(tmp_path):
    """A path with bytes that are not UTF-8 (Python's surrogates) under a UTF-8 locale's strict stdout: the command
    did its work, then failed printing its summary (exit 2, "'utf-8' codec can't encode")."""
    import subprocess
    import sys

    out = os.path.join(os.fsencode(tmp_path), b"set\xff")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "sdmp_fast.cli", "make-data", os.fsdecode(out), "--num-images", "2",
                        "--classes", "1"], capture_output=True, env=env, timeout=100)
    assert r.returncode == 0, r.stderr
    assert b"set\\udcff" in r.stdout and len(list_images(os.fsdecode(out))) == 2


@pytest.mark.timeout(120)
def test_a_killed_rebuild_never_leaves_part_of_the_old_set_and_its_leftovers_go(tmp_path, monkeypatch):
    """The old set was deleted in place before the new one moved in: a kill in between left part of it under
    OUT_DIR without its stamp, which every rerun refused; a killed run's temporary folder was never removed."""
    import subprocess
    import sys

    import sdmp_fast.benchmarks.make_data as md

    out = str(tmp_path / "set")
    make_data(out, num_images=4, classes=2, seed=0, quiet=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    os.makedirs(f"{out}.tmp-{dead}/000_x")  # what a killed run leaves
    real_replace = os.replace
    calls = []

    def killed_at_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old set moved aside, the new one not yet in: the process dies here
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(md.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        make_data(out, num_images=6, classes=2, seed=0, force=True, quiet=True)
    monkeypatch.setattr(md.os, "replace", real_replace)
    assert len(list_images(out)) == 4 and os.path.exists(os.path.join(out, STAMP))  # the old set, whole
    assert sorted(os.listdir(tmp_path)) == ["set"]  # the dead run's temporary and this one's are gone
    make_data(out, num_images=6, classes=2, seed=0, force=True, quiet=True)
    assert len(list_images(out)) == 6 and sorted(os.listdir(tmp_path)) == ["set"]


@pytest.mark.timeout(240)
def test_two_make_data_at_once_with_other_settings_never_both_succeed(tmp_path):
    """Both checked the (missing) folder's settings at start, then each swapped its set in: both said ready, and
    the first job's benchmark read the other's images. Now one builds, the other waits for it and then finds a
    set with other settings (refused without --force)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "set"
    procs = [subprocess.Popen([sys.executable, "-m", "sdmp_fast.cli", "make-data", str(out), "--num-images", "48",
                               "--classes", "2", "--seed", str(seed)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (0, 1)]
    texts = [p.communicate(timeout=200)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], texts
    winner = codes.index(0)
    assert "holds a set made with other settings" in texts[1 - winner]
    assert json.loads((out / STAMP).read_text())["seed"] == winner
    assert len(list_images(str(out)).files) == 48


def test_a_finished_set_on_a_read_only_file_system_needs_no_lock(tmp_path, monkeypatch, capsys):
    """The lock beside OUT_DIR was taken before the 'nothing to do' check: a finished set on a read-only mount
    (a shared benchmark set) failed with 'Read-only file system' where it used to be found complete."""
    import errno

    from sdmp_fast import paths

    out = str(tmp_path / "set")
    make_data(out, num_images=4, classes=2, seed=0, quiet=True)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(paths, "lock_exclusive", read_only)
    assert make_data(out, num_images=4, classes=2, seed=0, quiet=False) == out
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(OSError, match="Read-only"):  # building does need it
        make_data(str(tmp_path / "other"), num_images=4, classes=2, seed=0, quiet=True)
