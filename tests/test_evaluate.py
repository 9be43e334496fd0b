"""Frozen-feature evaluation (weighted k-NN, linear probe), `sdmp-fast eval` errors and `sdmp-fast plot`."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from sdmp_fast import cli
from sdmp_fast.evaluate import (extract_features, knn_classify, knn_predict, linear_probe, raw_pixel_knn,
                                to_float_images)
from sdmp_fast.plot import loss_terms, plot_run, read_metrics


def _clusters(n_per_class=100, num_classes=4, dim=16, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_separable_is_perfect():
    xtr, ytr = _clusters(seed=0)
    xte, yte = _clusters(n_per_class=50, seed=0)  # same centres, fresh noise draw
    xte = xte + 0.01 * torch.randn(xte.shape, generator=torch.Generator().manual_seed(1))
    assert knn_classify(xtr, ytr, xte, yte, k=20, T=0.07) == 1.0


def test_knn_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(3000, 8, generator=g), torch.randn(2000, 8, generator=g)
    ytr, yte = torch.randint(0, 10, (3000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    acc = knn_classify(xtr, ytr, xte, yte, k=20)
    assert abs(acc - 0.1) < 0.03  # 10 classes: chance is 10%, 3 sigma of 2000 draws is ~2 points


def test_knn_weighted_vote_matches_hand_computation():
    # One query at angle 0; train points at angles 0.1 (class 0), 0.5 and 0.6 (class 1), 3.0 (class 0).
    # k=3 keeps the first three. Class 0 has one close neighbour, class 1 two farther ones.
    ang = torch.tensor([0.1, 0.5, 0.6, 3.0])
    train = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.0], [2.0], [3.0], [1.0]])  # norms ignored
    ytr = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[5.0, 0.0]])
    sims = torch.tensor([math.cos(0.1), math.cos(0.5), math.cos(0.6)])
    for T in (0.07, 1.0):
        w = (sims / T).exp()
        expect = 0 if w[0] > w[1] + w[2] else 1
        assert knn_predict(train, ytr, q, k=3, T=T).item() == expect
    # T = 0.07: exp(0.995/0.07) ~ 1.5e6 beats exp(0.878/.07) + exp(0.825/.07) ~ 4.1e5: the close one wins;
    # T = 1: 2.70 vs 2.41 + 2.28 = 4.69: the majority wins. Pin both (the weighting, not just argmax of counts).
    assert knn_predict(train, ytr, q, k=3, T=0.07).item() == 0
    assert knn_predict(train, ytr, q, k=3, T=1.0).item() == 1
    # k=1 is nearest-neighbour regardless of T
    assert knn_predict(train, ytr, q, k=1, T=1.0).item() == 0


def test_knn_chunking_does_not_change_predictions():
    xtr, ytr = _clusters(n_per_class=60, spread=1.0, seed=3)
    xte, _ = _clusters(n_per_class=30, spread=1.0, seed=4)
    a = knn_predict(xtr, ytr, xte, k=7, chunk=17)
    b = knn_predict(xtr, ytr, xte, k=7, chunk=100000)
    assert torch.equal(a, b)


def test_knn_rejects_bad_settings():
    x, y = _clusters()
    with pytest.raises(ValueError, match="k"):
        knn_classify(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, T=0.0)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adamw"])
def test_linear_probe_learns_separable_set(optimizer):
    # Linearly separable but not cluster-shaped: the class is the sign pattern of two coordinates, with a
    # large nuisance scale on the other coordinates (standardisation must handle it).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 6, generator=g)
    x[:, 2:] *= 100.0
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    x[:, :2] += torch.sign(x[:, :2]) * 0.5  # margin
    acc = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], optimizer=optimizer,
                       epochs=50 if optimizer == "lbfgs" else 20, batch_size=100)
    assert acc >= 0.98


def test_linear_probe_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = torch.randint(0, 4, (2000,), generator=g)
    assert linear_probe(x[:1500], y[:1500], x[1500:], y[1500:]) < 0.35


class _MeanPixels(nn.Module):
    """A fixed 'backbone': per-channel means of a 2x2 grid (records the input it was given)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)  # in_chans probe only
        self.seen = None

    def forward(self, x):
        self.seen = x
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_extract_features_batches_resizes_and_normalises():
    imgs = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    m = _MeanPixels().train()
    f, y = extract_features(m, imgs, torch.arange(10), img_size=16, mean=(0.5,), std=(0.25,), batch_size=3)
    assert f.shape == (10, 12) and f.dtype == torch.float32 and torch.equal(y, torch.arange(10))
    assert m.training  # mode restored
    assert m.seen.shape == (1, 3, 16, 16)  # last batch of 10 by 3
    ref = to_float_images(imgs, 16, 3, (0.5,), (0.25,))
    assert torch.allclose(f, nn.functional.adaptive_avg_pool2d(ref, 2).flatten(1), atol=1e-5)


def test_raw_pixel_knn_separates_class_patterns():
    # class c = a bright 4x4 square in quadrant c of a noisy 8x8 image: raw pixels suffice
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(30)
    imgs = torch.randint(0, 60, (120, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        imgs[i, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 180
    assert raw_pixel_knn(imgs[:80], y[:80], imgs[80:], y[80:], k=5) == 1.0
    # and a shuffled training labelling is not learnable
    perm = torch.randperm(80, generator=g)
    assert raw_pixel_knn(imgs[:80], y[:80][perm], imgs[80:], y[80:], k=5) < 0.6


def test_eval_cli_errors_clearly_on_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope"
    rc = cli.main(["eval", "--checkpoint", str(missing), "--data", "fashion-mnist"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(missing) in err and "Traceback" not in err


def test_eval_cli_errors_on_run_dir_without_checkpoint(tmp_path, capsys):
    rc = cli.main(["eval", "--checkpoint", str(tmp_path)])
    assert rc == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step MoCo run on 64 Fashion-MNIST images (checkpoint + backbone.pt)."""
    from sdmp_fast.config import TrainConfig
    from sdmp_fast.data import load_fashion_mnist
    from sdmp_fast.pipelines.memory import MemoryLoader
    from sdmp_fast.trainer import Trainer, build_recipe

    out = str(tmp_path_factory.mktemp("evalrun") / "run")
    cfg = TrainConfig(arch="vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, embed_dim=32, num_heads=2,
                      proj_hidden_dim=64, proj_dim=32, loader="memory", data="fashion-mnist", batch_size=16,
                      steps=2, log_every=1, save_every=0, lr=1e-3, device="cpu", out=out, progress=False,
                      tensorboard=False).resolve().validate()
    x, y = load_fashion_mnist("train")
    tr = Trainer(cfg, loader=MemoryLoader((x[:64], y[:64]), build_recipe(cfg), 16, device=torch.device("cpu")))
    initial = copy.deepcopy(tr.model.backbone)
    tr.fit(out)
    return out, tr.model.backbone, initial


def test_eval_cli_on_a_run(tiny_run, tmp_path, capsys):
    run, backbone, initial = tiny_run
    js = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", run, "--train-limit", "300", "--test-limit", "100", "--linear",
            "--linear-epochs", "10", "--raw-pixels", "--device", "cpu", "--json", str(js)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "pretrained: k-NN" in text and "linear probe" in text and "raw pixels" in text
    res = json.loads(js.read_text())
    assert res["n_train"] == 300 and res["n_test"] == 100 and res["img_size"] == 28 and res["feature_dim"] == 32
    for key in ("knn_top1", "linear_top1", "raw_pixel_knn_top1"):
        assert 0.1 < res[key] <= 1.0  # 10 classes; all of these beat chance on Fashion-MNIST
    # the CLI evaluated the trained weights: same features as the in-memory backbone
    from sdmp_fast.data import load_fashion_mnist
    from sdmp_fast.evaluate import load_backbone_for_eval

    model, info = load_backbone_for_eval(run)
    x, _ = load_fashion_mnist("test")
    a, _ = extract_features(model, x[:8], None, 28, info["mean"], info["std"])
    b, _ = extract_features(backbone, x[:8], None, 28, info["mean"], info["std"])
    assert torch.allclose(a, b, atol=1e-5)
    # --random-init: same architecture, the run's own initial weights for the run's seed (0), others otherwise
    rnd, _ = load_backbone_for_eval(os.path.join(run, "backbone.pt"), random_init=True, seed=0)
    c, _ = extract_features(rnd, x[:8], None, 28, info["mean"], info["std"])
    d, _ = extract_features(initial, x[:8], None, 28, info["mean"], info["std"])
    assert c.shape == a.shape and not torch.allclose(a, c) and torch.equal(c, d)
    other, _ = load_backbone_for_eval(run, random_init=True, seed=1)
    assert not torch.allclose(extract_features(other, x[:8], None, 28)[0], d)
    assert cli.main(argv[:-2] + ["--random-init"]) == 0
    assert "random init: k-NN" in capsys.readouterr().out


def test_a_damaged_backbone_description_is_named(tiny_run, tmp_path):
    import shutil

    from sdmp_fast.evaluate import load_backbone_for_eval

    run, _, _ = tiny_run
    shutil.copy(os.path.join(run, "backbone.pt"), tmp_path / "backbone.pt")
    for text in ("{\n", '{"img_size": 28}'):
        (tmp_path / "backbone.json").write_text(text)
        with pytest.raises(ValueError, match="backbone.json .*is not a backbone description"):
            load_backbone_for_eval(str(tmp_path / "backbone.pt"))


def test_eval_data_from_image_folders(tmp_path):
    from sdmp_fast.data import make_synthetic_image_folder
    from sdmp_fast.evaluate import load_eval_data

    make_synthetic_image_folder(str(tmp_path / "train"), num_classes=3, per_class=4)
    make_synthetic_image_folder(str(tmp_path / "val"), num_classes=3, per_class=2, seed=1)
    xtr, ytr, xte, yte = load_eval_data(str(tmp_path))  # img_size 64 unless the model's is given
    assert xtr.shape == (12, 64, 64, 3) and xtr.dtype == torch.uint8 and xte.shape == (6, 64, 64, 3)
    assert sorted(set(ytr.tolist())) == [0, 1, 2] and len(yte) == 6
    with pytest.raises(ValueError, match="train/ and val/"):
        load_eval_data(str(tmp_path / "train"))
    flat = tmp_path / "flat"  # unlabeled images are a training set, not an evaluation set
    (flat / "val").mkdir(parents=True)
    for p in (tmp_path / "train" / "class0").iterdir():
        (flat / "val" / p.name).write_bytes(p.read_bytes())
    (flat / "train").symlink_to(tmp_path / "train")
    with pytest.raises(ValueError, match="unlabeled images"):
        load_eval_data(str(flat))


# ------------------------------------------------------------------------------------------------- plot

def _write_metrics(path, n=12, torn=False):
    with open(path, "w") as fh:
        for s in range(1, n + 1):
            rec = {"step": 10 * s, "epoch": s / 5, "loss": 5.0 - 0.1 * s, "source": 3.0 - 0.05 * s,
                   "mix_source": 1.5 - 0.03 * s, "mix_mix": 0.5 - 0.02 * s, "grad_norm": 1.0, "lr": 1e-3,
                   "wd": 0.1, "momentum": 0.99, "img_per_s": 100.0 + s, "skipped": 0, "time_s": float(s)}
            fh.write(json.dumps(rec) + "\n")
        if torn:
            fh.write('{"step": 130, "loss": 4.')


def test_plot_writes_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl", torn=True)
    assert loss_terms(read_metrics(str(run))) == ["source", "mix_source", "mix_mix"]
    assert len(read_metrics(str(run))) == 12  # torn last line skipped
    out = plot_run(str(run))
    assert out == str(run / "curves.png")
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 5000


def test_plot_draws_only_numbers_against_numeric_steps(tmp_path):
    """A record whose step is no number (a hand-edited or foreign line) was kept, and matplotlib drew the steps
    as categories; a bool loss (True is an int to Python) was drawn as 1.0."""
    from sdmp_fast.plot import _series

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl", n=3)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": "40", "loss": 1.0}) + "\n")
        fh.write(json.dumps({"step": True, "loss": 1.0}) + "\n")
        fh.write(json.dumps({"step": 50, "loss": True, "source": 2.0}) + "\n")
    recs = read_metrics(str(run))
    assert [r["step"] for r in recs] == [10, 20, 30, 50]
    assert _series(recs, "loss") == ([10, 20, 30], [4.9, 4.8, 4.7])
    assert _series(recs, "source")[0] == [10, 20, 30, 50]
    assert plot_run(str(run)) == str(run / "curves.png")


def test_plot_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl", n=3)
    png = tmp_path / "sub" / "c.png"
    assert cli.main(["plot", str(run), "--out", str(png)]) == 0
    assert png.is_file() and str(png) in capsys.readouterr().out


def test_plot_cli_missing_metrics(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_backbone_of_a_run_whose_newest_checkpoint_is_damaged(tiny_run, tmp_path):
    import shutil

    from sdmp_fast.checkpoint import load_backbone
    run, backbone, _ = tiny_run
    copy_run = tmp_path / "run"
    shutil.copytree(run, copy_run)
    ckpts = sorted((copy_run / "checkpoints").iterdir())
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:100])  # the newest checkpoint truncated
    with pytest.warns(UserWarning, match="trying"):
        model = load_backbone(str(copy_run))  # the next readable file serves: the same trained weights
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone.eval()(x), atol=1e-5)
    for p in list((copy_run / "checkpoints").iterdir()) + [copy_run / "backbone.pt"]:
        p.write_bytes(b"junk")
    with pytest.raises(ValueError, match="checkpoint: nothing readable"):
        load_backbone(str(copy_run))


# ------------------------------------------------------------------------------- eval: data and option checks

def _class_tree(root, classes, per_class=3, seed=0):
    """root/<name>/i.png: images distinct per class (a solid colour + noise), the same bytes for a given seed."""
    import numpy as np
    from PIL import Image

    for c in classes:
        d = root / c
        d.mkdir(parents=True)
        rng = np.random.default_rng(sum(map(ord, c)) * 7 + seed)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            px = np.clip(base + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype("uint8")
            Image.fromarray(px).save(d / f"{i}.png")


def test_eval_folders_are_read_as_dino_reads_them_and_limits_keep_every_class(tmp_path):
    """Read at the model's size: short side to size * 256 / 224, centre crop (not squashed to 64 px); the
    limits take a seeded shuffle (a folder lists its samples class by class)."""
    import numpy as np
    from PIL import Image

    from sdmp_fast.evaluate import load_eval_data, linear_probe

    for split, per in (("train", 3), ("val", 4)):
        for c in range(3):
            d = tmp_path / split / f"c{c}"
            d.mkdir(parents=True)
            for k in range(per):
                thirds = np.zeros((96, 288, 3), np.uint8)  # red | green | blue, a wide image
                thirds[:, :96, 0] = thirds[:, 96:192, 1] = thirds[:, 192:, 2] = 200 + 10 * c + k
                Image.fromarray(thirds).save(d / f"{k}.png")
    xtr, ytr, xte, yte = load_eval_data(str(tmp_path), img_size=32)
    assert xtr.shape == (9, 32, 32, 3) and xte.shape == (12, 32, 32, 3)
    # 96 x 288 -> 37 x 110 (short side 32 * 256 / 224 = 36.6), centre 32 x 32: the green third only (a squash
    # into a square would keep all three)
    assert xtr[..., 1].min() > 150 and xtr[..., 0].max() < 30 and xtr[..., 2].max() < 30
    _, _, xte2, yte2 = load_eval_data(str(tmp_path), test_limit=6, img_size=32)
    assert len(yte2) == 6 and len(set(yte2.tolist())) > 1  # not the first class's 6 images
    # one training sample: the linear probe's standardisation does not turn it into NaN
    f = torch.randn(5, 4)
    assert 0.0 <= linear_probe(f[:1], torch.tensor([0]), f[1:], torch.tensor([0, 1, 0, 1]), epochs=3) <= 1.0


def test_eval_data_pairs_classes_by_name(tmp_path):
    import shutil

    from sdmp_fast.evaluate import load_eval_data

    _class_tree(tmp_path / "train", ["a", "b", "c"])
    (tmp_path / "val").mkdir()
    for c in ("b", "c"):  # val lacks class a: b and c must keep train's indices 1 and 2, not become 0 and 1
        shutil.copytree(tmp_path / "train" / c, tmp_path / "val" / c)
    xtr, ytr, xte, yte = load_eval_data(str(tmp_path))
    assert ytr.tolist() == [0] * 3 + [1] * 3 + [2] * 3 and yte.tolist() == [1] * 3 + [2] * 3
    assert torch.equal(xte, xtr[3:])
    assert knn_classify(xtr.flatten(1).float(), ytr, xte.flatten(1).float(), yte, k=1) == 1.0
    # a val class that train lacks: a clear error naming it and both folders
    _class_tree(tmp_path / "val", ["zz"])
    with pytest.raises(ValueError, match="zz") as e:
        load_eval_data(str(tmp_path))
    assert str(tmp_path / "val") in str(e.value) and str(tmp_path / "train") in str(e.value)


def test_eval_cli_pairs_classes_by_name(tiny_run, tmp_path, capsys):
    import shutil

    run, _, _ = tiny_run
    _class_tree(tmp_path / "train", ["a", "b", "c"])
    (tmp_path / "val").mkdir()
    for c in ("b", "c"):
        shutil.copytree(tmp_path / "train" / c, tmp_path / "val" / c)
    js = tmp_path / "r.json"
    assert cli.main(["eval", "--checkpoint", run, "--data", str(tmp_path), "--knn-k", "1", "--device", "cpu",
                     "--json", str(js)]) == 0
    assert json.loads(js.read_text())["knn_top1"] == 1.0  # identical images, k=1: every one found


def test_eval_images_are_read_as_the_training_loaders_read_them(tmp_path):
    """16-bit PNGs are rescaled (PIL's convert("RGB") clipped them to white: k-NN at chance) and EXIF-rotated
    photos stand upright, as ``image_bytes.pil_rgb`` gives them to the training loaders."""
    import numpy as np
    from PIL import Image

    from sdmp_fast.evaluate import load_eval_data
    from sdmp_fast.pipelines.image_bytes import pil_rgb

    for split in ("train", "val"):
        for c, level in enumerate((8000, 30000)):  # 16-bit grey: 31 and 117 in 8 bits
            d = tmp_path / split / f"c{c}"
            d.mkdir(parents=True)
            Image.fromarray(np.full((40, 40), level, np.uint16)).save(d / "grey16.png")
            tall = np.zeros((48, 32, 3), np.uint8)  # stored 32 wide x 48 high, top half bright
            tall[:24] = 250
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90 degrees clockwise to view: the bright half ends up on the right
            Image.fromarray(tall).save(d / "rotated.jpg", exif=exif.tobytes(), quality=95)
    xtr, ytr, _, _ = load_eval_data(str(tmp_path), img_size=16)
    files = sorted((tmp_path / "train" / "c1").iterdir())
    for f, x in zip(files, xtr[ytr == 1]):
        want = np.asarray(pil_rgb(str(f)))
        if f.name == "grey16.png":
            assert abs(float(x.float().mean()) - 117) < 2 and abs(float(want.mean()) - 117) < 2, float(x.float().mean())
        else:
            assert want.shape[1] > want.shape[0]  # upright: wider than high
            assert x[:, -4:].float().mean() > 200 and x[:, :4].float().mean() < 50


def test_eval_data_undecodable_image_is_a_clear_error(tmp_path):
    from sdmp_fast.evaluate import load_eval_data

    _class_tree(tmp_path / "train", ["a", "b"])
    _class_tree(tmp_path / "val", ["a", "b"], seed=1)
    bad = tmp_path / "val" / "b" / "zz_broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode") as e:
        load_eval_data(str(tmp_path))
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("extra, setting", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--train-limit", "-5"], "--train-limit"),
    (["--test-limit", "-1"], "--test-limit"),
    (["--knn-k", "0"], "--knn-k"),
    (["--knn-t", "0"], "--knn-t"),
    (["--device", "gpu"], "--device"),
    (["--img-size", "0"], "--img-size"),
    (["--json", "DIR"], "--json"),
    (["--json", "DIR/missing/x.json"], "--json"),
])
def test_eval_cli_rejects_bad_options_before_any_work(extra, setting, tmp_path, capsys, monkeypatch):
    import sdmp_fast.evaluate as ev

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(ev, "load_backbone_for_eval", no_work)
    monkeypatch.setattr(ev, "load_eval_data", no_work)
    extra = [a.replace("DIR", str(tmp_path)) for a in extra]
    assert cli.main(["eval", "--checkpoint", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert setting in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_cli_rejects_cuda_without_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("size", [30, 64])
def test_eval_cli_rejects_img_size_the_model_cannot_take(size, tiny_run, capsys, monkeypatch):
    import sdmp_fast.evaluate as ev

    run, _, _ = tiny_run
    monkeypatch.setattr(ev, "load_eval_data", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data read")))
    assert cli.main(["eval", "--checkpoint", run, "--img-size", str(size), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--img-size" in err and "28" in err and "Traceback" not in err


def test_check_img_size_dynamic_model_needs_a_patch_multiple():
    from sdmp_fast.evaluate import check_img_size
    from sdmp_fast.models import create_backbone

    m = create_backbone(dict(arch="vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, embed_dim=32,
                             num_heads=2, dynamic_img_size=True))
    check_img_size(m, 35)
    with pytest.raises(ValueError, match="multiple of the model's patch size 7"):
        check_img_size(m, 30)


# ------------------------------------------------------------------------------------------ review 2026-11-29

def test_knn_small_temperature_votes_without_overflow():
    """exp(sim / T) overflowed float32 for T <= ~0.011: every voting class scored inf and the argmax fell to the
    lowest class index. Here the 19 nearest neighbours are class 1, one farther one class 0: class 1 at any T."""
    q = torch.tensor([[1.0, 0.0]])
    train = torch.cat([torch.tensor([[1.0, 0.33]]), torch.tensor([[1.0, 0.1]]).repeat(19, 1)])
    y = torch.tensor([0] + [1] * 19)
    for T in (0.07, 0.02, 0.011, 0.01, 0.005, 0.001):
        assert knn_predict(train, y, q, k=20, T=T).item() == 1, T
    # and the vote is DINO's weighted one: 3 class-0 neighbours outweigh 4 farther class-1 ones at small T only
    train = torch.tensor([[1.0, 0.05]] * 3 + [[1.0, 0.5]] * 4)
    y = torch.tensor([0] * 3 + [1] * 4)
    assert [knn_predict(train, y, q, k=7, T=T).item() for T in (10.0, 0.001)] == [1, 0]


def test_linear_probe_constant_training_feature_is_not_blown_up():
    """A feature constant over the training set was divided by a clamped 1e-6 deviation: a small test-set
    variation of it (1e-2) became 1e4 and swamped the logits (accuracy 0.25-0.75 on a separable set)."""
    x, y = _clusters(n_per_class=50, num_classes=4, spread=0.05)
    xte, yte = _clusters(n_per_class=20, num_classes=4, spread=0.05, seed=0)
    for v in (1e-2, 1.0):
        tr = torch.cat([x, torch.zeros(len(x), 1)], 1)
        te = torch.cat([xte, torch.full((len(xte), 1), v)], 1)
        for opt in ("lbfgs", "adamw"):
            assert linear_probe(tr, y, te, yte, optimizer=opt, epochs=30) == 1.0, (v, opt)


def test_eval_data_empty_training_class_folder_is_refused(tmp_path):
    """An empty train/<class>/ made its val class look predictable (classes were matched by name only)."""
    from sdmp_fast.evaluate import load_eval_data

    _class_tree(tmp_path / "train", ["a", "b"])
    (tmp_path / "train" / "c").mkdir()
    _class_tree(tmp_path / "val", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\['c'\] .* have no images in .*train.*classes with images: \['a', 'b'\]"):
        load_eval_data(str(tmp_path))


def test_eval_folder_images_resize_and_crop_as_torchvision(tmp_path):
    """DINO's evaluation transform is torchvision's Resize(short) + CenterCrop(size) on PIL images: the long side
    truncated, the crop offset rounded (round / floor differed by a pixel on some sizes)."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from sdmp_fast.evaluate import _resize_centre_crop

    rng = np.random.default_rng(0)
    for w, h in ((300, 257), (259, 256), (263, 256), (256, 300), (97, 41), (64, 64), (41, 97)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in (32, 224):
            short = round(size * 256 / 224)
            want = transforms.Compose([transforms.Resize(short, transforms.InterpolationMode.BICUBIC),
                                       transforms.CenterCrop(size)])(im)
            assert np.array_equal(np.asarray(_resize_centre_crop(im, size)), np.asarray(want)), (w, h, size)


def test_eval_cli_non_finite_features_are_an_error(tiny_run, tmp_path, capsys):
    """One NaN weight gave chance-level k-NN and linear scores, silently (NaN similarities rank first)."""
    import shutil

    run, _, _ = tiny_run
    shutil.copy(os.path.join(run, "backbone.json"), tmp_path / "backbone.json")
    sd = torch.load(os.path.join(run, "backbone.pt"), weights_only=True)
    sd["norm.weight"][0] = float("nan")
    torch.save(sd, tmp_path / "backbone.pt")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "backbone.pt"), "--train-limit", "40",
                     "--test-limit", "20", "--device", "cpu"]) == 2
    assert "features of 40 of 40 training images are not finite" in capsys.readouterr().err


def test_eval_cli_reports_the_k_it_used(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    js = tmp_path / "k.json"
    assert cli.main(["eval", "--checkpoint", run, "--train-limit", "12", "--test-limit", "5", "--knn-k", "1000",
                     "--device", "cpu", "--json", str(js)]) == 0
    assert "k-NN (k=12, --knn-k 1000 > the 12 training images" in capsys.readouterr().out
    res = json.loads(js.read_text())
    assert res["k"] == 12 and res["k_asked"] == 1000


def test_eval_cli_failed_json_write_keeps_the_earlier_file(tiny_run, tmp_path, capsys, monkeypatch):
    """open(path, "w") emptied an earlier results file before a write that then failed (disk full, a file size
    limit): it is kept whole now, and the error is one line naming the file."""
    import errno

    from sdmp_fast import evaluate

    run, _, _ = tiny_run
    js = tmp_path / "res.json"
    js.write_text('{"precious": 1}')

    def full(obj, fh, **kw):
        fh.write('{\n "knn_to')
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(evaluate.json, "dump", full)
    assert cli.main(["eval", "--checkpoint", run, "--train-limit", "12", "--test-limit", "5", "--device", "cpu",
                     "--json", str(js)]) == 1
    err = capsys.readouterr().err
    assert f"{js}': --json (the results printed above): could not write it (File too large); the earlier file is unchanged" in err
    assert js.read_text() == '{"precious": 1}' and os.listdir(tmp_path) == ["res.json"]


def test_foreign_checkpoints_are_named_as_such(tiny_run, tmp_path):
    """Official DINO's {'teacher', 'student'} file, a bare tensor, a 'format' dict without 'meta', another model's
    state dict beside a backbone.json: each was a misleading 'backbone.json is missing', a KeyError or a
    load_state_dict traceback."""
    import shutil

    from sdmp_fast.evaluate import load_backbone_for_eval

    run, _, _ = tiny_run
    d = tmp_path / "foreign"
    d.mkdir()
    for name, obj, message in (
            ("dino.pth", {"teacher": {"w": torch.zeros(1)}, "student": {}}, r"neither an sdmp-fast training "
             r"checkpoint nor an exported backbone.pt .*holds a dict \(keys \['student', 'teacher'\]\)"),
            ("t.pth", torch.zeros(3), "holds a Tensor"),
            ("f.pth", {"format": 1}, "has a 'format' key but not the rest of an sdmp-fast training checkpoint")):
        torch.save(obj, d / name)
        with pytest.raises(ValueError, match=message):
            load_backbone_for_eval(str(d / name))
    shutil.copy(os.path.join(run, "backbone.json"), d / "backbone.json")
    torch.save({"fc.weight": torch.zeros(2, 2)}, d / "other.pt")
    with pytest.raises(ValueError, match=r"the weights in .*other.pt do not fit the backbone it describes "
                                         r"\(vit_tiny_patch16_224\)"):
        load_backbone_for_eval(str(d / "other.pt"))


def test_ctrl_c_in_a_command_is_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C in convert, eval, show, make-data printed a 30-70 line traceback of wherever it hit."""
    from sdmp_fast import cli, plot

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "main", interrupted)
    assert cli.main(["plot", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "sdmp-fast plot: interrupted"


def test_the_console_command_ends_by_sigint_after_ctrl_c(tmp_path):
    """A shell stops `for x in ...; do sdmp-fast ...; done` only for a child killed by SIGINT: the command
    prints its one line, then ends by the signal (an exit code of 130 let the loop go on)."""
    import subprocess
    import sys

    script = ("import sdmp_fast.plot as p, sdmp_fast.cli as c\n"
              "def f(a): raise KeyboardInterrupt\n"
              "p.main = f\n"
              f"c.sys.argv = ['sdmp-fast', 'plot', {str(tmp_path)!r}]\n"
              "raise SystemExit(c.run())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == -2 and out.stderr.strip() == "sdmp-fast plot: interrupted", out
