"""`sdmp-fast show` draws a legible PNG grid: views and mixed views of one batch."""
import pytest
import torch
from PIL import Image

from sdmp_fast.cli import main as cli_main
from sdmp_fast.data import make_synthetic_image_folder
from sdmp_fast.pipelines.base import assemble_batch
from sdmp_fast.pipelines.recipes import byol2, dino
from sdmp_fast.pipelines.show import plot_batch, to_display


def test_to_display_undoes_the_recipe_normalisation():
    r = byol2()
    x = torch.rand(2, 3, 4, 4)
    normed = (x - torch.tensor(r.mean).view(1, 3, 1, 1)) / torch.tensor(r.std).view(1, 3, 1, 1)
    assert torch.allclose(to_display(normed, r.mean, r.std), x.permute(0, 2, 3, 1), atol=1e-6)


def test_plot_batch_has_one_row_per_view_and_mixed_view(tmp_path):
    r = dino(global_size=32, local_size=16, n_local=2, n_local_mixed=1)
    views = [torch.randn(4, 3, v.size, v.size) for v in r.expanded_views()]
    batch = assemble_batch(views, torch.zeros(4, dtype=torch.long), torch.arange(4), r, torch.Generator())
    small = plot_batch(batch, r, str(tmp_path / "a.png"), max_samples=2)
    full = plot_batch(batch, r, str(tmp_path / "b.png"))
    with Image.open(small) as a, Image.open(full) as b:
        assert a.format == b.format == "PNG"
        # 4 clean + 3 mixed rows in both; columns = samples shown.
        assert a.size[1] == b.size[1] and b.size[0] > a.size[0]


@pytest.mark.timeout(180)
def test_show_command_writes_a_png_from_a_real_loader(tmp_path, capsys):
    make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(64, 80))
    out = tmp_path / "grid.png"
    rc = cli_main(["show", "--data", str(tmp_path / "data"), "--backend", "torchvision", "--recipe", "byol2",
                   "--batch-size", "4", "--out", str(out), "--device", "cpu", "--num-workers", "0"])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400
    assert "mixed=2" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_show_command_passes_the_backends_own_options(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(64, 80))
    base = ["show", "--data", str(tmp_path / "data"), "--backend", "dali", "--batch-size", "4", "--device", "cpu"]
    assert cli_main(base + ["--out", str(tmp_path / "a.png"), "--loader-options", "photometric=torch"]) == 0
    assert "mixed=2" in capsys.readouterr().out and (tmp_path / "a.png").is_file()
    assert cli_main(base + ["--out", str(tmp_path / "b.png"), "--loader-options", "photometric=exact"]) == 2
    assert "photometric" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "c.png"), "--loader-options", "seed=3"]) == 2
    assert "--loader-options: seed set by show itself" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_image_out_path_names_the_file_actually_written(tmp_path):
    from sdmp_fast.plot import image_out_path

    assert image_out_path(str(tmp_path / "curvesX"), "curves.png") == str(tmp_path / "curvesX.png")
    assert image_out_path(str(tmp_path), "grid.png") == str(tmp_path / "grid.png")
    assert image_out_path(str(tmp_path / "new") + "/", "grid.png") == str(tmp_path / "new" / "grid.png")
    assert image_out_path(str(tmp_path / "a.png"), "grid.png") == str(tmp_path / "a.png")
    assert image_out_path(str(tmp_path / "a.pdf"), "grid.png") == str(tmp_path / "a.pdf")
    with pytest.raises(ValueError, match="--out"):
        image_out_path(str(tmp_path / "a.txt"), "grid.png")


def test_plot_command_prints_the_path_it_wrote(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for s in range(1, 4):
            fh.write(json.dumps({"step": s, "loss": 2.0 - 0.1 * s, "source": 1.0, "img_per_s": 10.0}) + "\n")
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "curvesX")]) == 0
    assert (tmp_path / "curvesX.png").is_file() and not (tmp_path / "curvesX").exists()
    assert f"wrote {tmp_path / 'curvesX.png'}" in capsys.readouterr().out
    outdir = tmp_path / "pics"
    outdir.mkdir()
    assert cli_main(["plot", str(run), "--out", str(outdir)]) == 0
    assert (outdir / "curves.png").is_file()
    assert f"wrote {outdir / 'curves.png'}" in capsys.readouterr().out


def test_show_command_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    for i in range(6):
        (bad / f"{i}.jpg").write_bytes(b"not a jpeg")
    base = ["show", "--data", str(tmp_path / "bad"), "--backend", "torchvision", "--batch-size", "2",
            "--num-workers", "0", "--out", str(tmp_path / "g.png")]
    with pytest.warns(RuntimeWarning):
        assert cli_main(base + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "Traceback" not in err
    assert cli_main(base + ["--device", "gpu"]) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(base + ["--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.timeout(180)
def test_show_command_out_without_suffix_or_a_folder(tmp_path, capsys):
    make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=(32, 40))
    base = ["show", "--data", str(tmp_path / "data"), "--backend", "torchvision", "--recipe", "byol2",
            "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--out"]
    assert cli_main(base + [str(tmp_path / "gridX")]) == 0
    assert (tmp_path / "gridX.png").is_file()
    assert f"wrote {tmp_path / 'gridX.png'}" in capsys.readouterr().out
    outdir = tmp_path / "pics"
    outdir.mkdir()
    assert cli_main(base + [str(outdir)]) == 0
    assert (outdir / "grid.png").is_file()
    assert f"wrote {outdir / 'grid.png'}" in capsys.readouterr().out


def _read_only(monkeypatch, folder):
    """chmod a-w ``folder``; as root (chmod does not stop root's writes) os.access is made to say so too."""
    import os

    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(folder) and mode & os.W_OK
                            else real(p, mode, *a, **k))


def test_plot_into_a_read_only_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "img_per_s": 10.0}) + "\n")
    _read_only(monkeypatch, run)
    try:
        assert cli_main(["plot", str(run)]) == 2
        err = capsys.readouterr().err
        assert "error: --out:" in err and str(run / "curves.png") in err and "read-only" in err, err
        assert "Traceback" not in err and not (run / "curves.png").exists()
        assert cli_main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0  # the way out works
    finally:
        run.chmod(0o755)


def test_show_into_a_read_only_folder_fails_before_reading_data(tmp_path, capsys, monkeypatch):
    from sdmp_fast.pipelines import base

    make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=2, size=(32, 40))
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)

    def no_loader(*a, **k):
        raise AssertionError("data read before --out was checked")

    monkeypatch.setattr(base, "make_loader", no_loader)
    try:
        assert cli_main(["show", "--data", str(tmp_path / "data"), "--device", "cpu", "--num-workers", "0",
                         "--out", str(ro / "g.png")]) == 2
        err = capsys.readouterr().err
        assert "error: --out:" in err and str(ro / "g.png") in err and "Traceback" not in err, err
    finally:
        ro.chmod(0o755)


def test_an_os_error_of_any_command_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """What no up-front check catches (a disk that fills, permissions changed meanwhile): exit 1, one line."""
    import errno

    from sdmp_fast import plot

    target = str(tmp_path / "run" / "curves.png")

    def fail(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", target)

    monkeypatch.setattr(plot, "plot_run", fail)
    assert cli_main(["plot", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"sdmp-fast plot: error: {target!r}: Permission denied"


def test_an_os_error_naming_no_file_and_no_full_disk_keeps_its_traceback(tmp_path, monkeypatch):
    """The one-line OSError exit is for the environment (a file, a full disk, permissions); anything else is a
    bug and surfaces with its traceback rather than as a bare message."""
    import errno

    from sdmp_fast import plot

    def bug(*a, **k):
        raise OSError("unexpected state")

    monkeypatch.setattr(plot, "plot_run", bug)
    with pytest.raises(OSError, match="unexpected state"):
        cli_main(["plot", str(tmp_path / "run")])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "plot_run", full)
    assert cli_main(["plot", str(tmp_path / "run")]) == 1


def test_an_os_error_of_the_environment_without_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    """Too many open files (DataLoader pipes), no memory to fork, a stale NFS handle: the environment, one line."""
    import errno

    from sdmp_fast import plot

    for err in (OSError(errno.EMFILE, "Too many open files"), ConnectionResetError("reset by peer")):
        monkeypatch.setattr(plot, "plot_run", lambda *a, _e=err, **k: (_ for _ in ()).throw(_e))
        assert cli_main(["plot", str(tmp_path / "run")]) == 1
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command", ["show", "plot"])
def test_a_failed_png_write_keeps_the_earlier_png(command, tmp_path, capsys, monkeypatch):
    """savefig wrote over the PNG in place: a full disk left the earlier one empty, with an error naming no
    file. Now it is replaced whole or not at all, and the error is one line naming it."""
    import errno
    import json

    import matplotlib.figure

    if command == "show":
        make_synthetic_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(64, 80))
        out = tmp_path / "grid.png"
        argv = ["show", "--data", str(tmp_path / "data"), "--backend", "torchvision", "--batch-size", "4",
                "--out", str(out), "--device", "cpu", "--num-workers", "0"]
    else:
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n"
                                                   for s in (1, 2, 3)))
        out = tmp_path / "curves.png"
        argv = ["plot", str(run), "--out", str(out)]
    assert cli_main(argv) == 0
    before = out.read_bytes()
    real = matplotlib.figure.Figure.savefig

    def full_disk(self, fname, **kw):
        real(self, fname, **kw)  # most of it went out before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert f"'{out}': figure: could not write it (disk full); the earlier file is unchanged" in err, err
    assert out.read_bytes() == before and not list(tmp_path.glob("*.tmp.*"))


def test_a_writer_s_own_error_leaves_no_temporary_file(tmp_path):
    """Only OSError removed the temporary file: matplotlib's own error (a .pgf without LaTeX) or Ctrl-C left it."""
    from sdmp_fast.paths import write_replacing

    for error in (RuntimeError("no LaTeX"), KeyboardInterrupt()):
        def write(fh):
            fh.write("part")
            raise error

        with pytest.raises(type(error)):
            write_replacing(str(tmp_path / "out.pgf"), write, "figure")
        assert list(tmp_path.iterdir()) == []
