"""Frozen-feature evaluation: weighted k-NN (DINO protocol) and a linear probe, plus `sdmp-fast eval`.

k-NN (Caron et al. 2021, `eval_knn.py`): features L2-normalised, cosine similarity to every training
feature, the k nearest vote for their class with weight exp(sim / T) (k = 20, T = 0.07). The similarity
matrix is computed in test chunks, so 10k x 60k never sits in memory at once and stays a few seconds on a CPU.

Linear probe: logistic regression on standardised frozen features (train-set mean / std), full-batch L-BFGS
with an L2 penalty by default (deterministic, a few seconds for 60k x 192 features), or minibatch AdamW.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdmp_fast.config import device_setting

# The trainer's recipes normalise with ImageNet statistics (grey images are expanded to RGB first); checkpoints
# record the pair they used, and `sdmp-fast eval` takes it from there.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------

def model_in_chans(model: nn.Module) -> int:
    """Input channels the backbone expects: those of its first convolution (ViT patch embedding), else 3."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return m.in_channels
    return 3


def to_float_images(images_uint8: torch.Tensor, img_size: int, in_chans: int, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W], [N, H, W, C] or [N, C, H, W] -> normalised float [N, in_chans, img_size, img_size]."""
    x = images_uint8
    if x.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8 pixels, got {x.dtype}")
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    elif x.dim() != 4:
        raise ValueError(f"images: expected [N, H, W] or [N, H, W, C] / [N, C, H, W], got shape {tuple(x.shape)}")
    x = x.float().div_(255)
    if x.shape[1] != in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1)
        elif in_chans == 1:  # RGB into a grey model: ITU-R 601 luma
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"images have {x.shape[1]} channels, the model expects {in_chans}")
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(_per_channel(mean, in_chans), device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(_per_channel(std, in_chans), device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _per_channel(v: Sequence[float], c: int) -> Tuple[float, ...]:
    v = tuple(float(a) for a in v)
    if len(v) == c:
        return v
    if len(v) == 1:
        return v * c
    if c == 1:
        return (sum(v) / len(v),)
    raise ValueError(f"mean/std has {len(v)} values for {c} channels")


def _pooled(out) -> torch.Tensor:
    """Backbone output -> [B, D]: first element of tuples/dicts; token maps are pooled (mean over tokens)."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 3:
        out = out.mean(1)
    elif out.dim() == 4:
        out = out.mean((2, 3))
    return out


@torch.no_grad()
def extract_features(model: nn.Module, images_uint8: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     img_size: int = 28, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                     batch_size: int = 1024, device="cpu") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Frozen features of a backbone (eval mode, no_grad, batched on ``device``): (float32 [N, D] on the CPU,
    labels). Images are converted per batch (resize + normalise on the device), so memory stays at one batch.
    bf16 autocast on CUDA; fp32 on the CPU (CPU bf16 matmuls are slower on most hosts)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    in_chans = model_in_chans(model)
    feats = []
    use_amp = device.type == "cuda"
    for start in range(0, len(images_uint8), batch_size):
        chunk = images_uint8[start:start + batch_size].to(device, non_blocking=True)
        x = to_float_images(chunk, img_size, in_chans, mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            f = _pooled(model(x))
        feats.append(f.float().cpu())
    model.train(was_training)
    return torch.cat(feats), labels


def raw_pixel_features(images_uint8: torch.Tensor, img_size: Optional[int] = None) -> torch.Tensor:
    """Flattened pixels in [0, 1] (optionally resized): the feature-free k-NN baseline."""
    x = images_uint8.float().div(255)
    if x.dim() == 3:
        x = x[:, None]
    if img_size is not None and x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(1)


# ---------------------------------------------------------------------------------------------------------
# Classifiers on frozen features
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, k: int = 20,
                T: float = 0.07, num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN class predictions [M] (DINO protocol). Runs on the device of ``train_f``."""
    if k < 1:
        raise ValueError(f"knn k: must be >= 1, got {k}")
    if T <= 0:
        raise ValueError(f"knn temperature: must be > 0, got {T}")
    if train_f.shape[0] != train_y.shape[0]:
        raise ValueError(f"knn: {train_f.shape[0]} train features but {train_y.shape[0]} labels")
    k = min(k, train_f.shape[0])
    dev = train_f.device
    num_classes = int(train_y.max()) + 1 if num_classes is None else num_classes
    train_n = F.normalize(train_f.float(), dim=1)
    train_y = train_y.to(dev)
    preds = []
    for start in range(0, test_f.shape[0], chunk):
        q = F.normalize(test_f[start:start + chunk].to(dev).float(), dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=dev)
        # exp((sim - max) / T): DINO's exp(sim / T) up to a per-row factor, so the same vote, without its float32
        # overflow: at T <= ~0.011 every voting class scored inf and the argmax fell to the lowest class index
        votes.scatter_add_(1, train_y[idx], ((sim - sim[:, :1]) / T).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, T: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the weighted k-NN classifier."""
    num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    pred = knn_predict(train_f, train_y, test_f, k, T, num_classes, chunk)
    return (pred.cpu() == test_y.cpu()).float().mean().item()


def raw_pixel_knn(train_images: torch.Tensor, train_y: torch.Tensor, test_images: torch.Tensor,
                  test_y: torch.Tensor, k: int = 20, T: float = 0.07, img_size: Optional[int] = None) -> float:
    """k-NN accuracy on raw pixels: what a backbone has to beat to have learned anything useful."""
    return knn_classify(raw_pixel_features(train_images, img_size), train_y,
                        raw_pixel_features(test_images, img_size), test_y, k, T)


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 optimizer: str = "lbfgs", epochs: int = 100, weight_decay: float = 1e-4, lr: float = 1e-2,
                 batch_size: int = 1024, seed: int = 0, device=None) -> float:
    """Top-1 accuracy of multinomial logistic regression on standardised frozen features.

    ``lbfgs``: full batch, ``epochs`` = L-BFGS iterations, L2 penalty ``weight_decay`` / 2 * ||W||^2.
    ``adamw``: ``epochs`` passes of minibatch AdamW (cosine lr), decoupled weight decay on W.
    A feature constant over the training set is centred, not scaled (scale 1, as sklearn's StandardScaler): a
    tiny test-set variation of it, divided by a clamped ~0 deviation, swamped the logits.
    """
    if optimizer not in ("lbfgs", "adamw"):
        raise ValueError(f"linear probe optimizer: expected 'lbfgs' or 'adamw', got {optimizer!r}")
    dev = train_f.device if device is None else torch.device(device)
    mu = train_f.float().mean(0)
    sd = train_f.float().std(0, unbiased=False)  # one training sample: 0, not NaN
    sd = torch.where(sd > 1e-6 * mu.abs().clamp_min(1.0), sd, torch.ones_like(sd))
    xtr = ((train_f.float() - mu) / sd).to(dev)
    xte = ((test_f.float() - mu) / sd).to(dev)
    ytr, yte = train_y.to(dev), test_y.to(dev)
    num_classes = int(max(int(ytr.max()), int(yte.max()))) + 1
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes).to(dev)
    with torch.no_grad():  # seeded init, independent of the global RNG
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    with torch.enable_grad():
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=epochs, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(head(xtr), ytr) + 0.5 * weight_decay * head.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.AdamW([{"params": [head.weight]}, {"params": [head.bias], "weight_decay": 0.0}],
                                    lr=lr, weight_decay=weight_decay)
            steps_per_epoch = math.ceil(len(xtr) / batch_size)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
            for _ in range(epochs):
                perm = torch.randperm(len(xtr), generator=g).to(dev)
                for idx in perm.split(batch_size):
                    loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    with torch.no_grad():
        return (head(xte).argmax(1) == yte).float().mean().item()


# ---------------------------------------------------------------------------------------------------------
# Data and backbones for the CLI
# ---------------------------------------------------------------------------------------------------------

def load_eval_data(data: str, train_limit: int = 0, test_limit: int = 0, img_size: int = 64):
    """(train_images uint8, train_labels, test_images uint8, test_labels) of ``fashion-mnist`` or of a
    directory holding ImageFolder trees ``train/`` and ``val/`` (or ``test/``), whose images are read at
    ``img_size`` as DINO's evaluation reads them (short side resized to img_size * 256 / 224, centre crop).
    The limits keep the first samples of a fixed seeded shuffle, so every class is there in expectation."""
    if data in ("fashion-mnist", "fashion_mnist", "fmnist"):
        from sdmp_fast.data import load_fashion_mnist

        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
    else:
        if not os.path.isdir(data):
            raise ValueError(f"data: {data!r} is neither 'fashion-mnist' nor a directory")
        split = next((s for s in ("val", "test") if os.path.isdir(os.path.join(data, s))), None)
        if not os.path.isdir(os.path.join(data, "train")) or split is None:
            raise ValueError(f"data: {data!r} must hold ImageFolder trees train/ and val/ (or test/)")
        train_dir, test_dir = os.path.join(data, "train"), os.path.join(data, split)
        xtr, ytr, train_classes = _read_image_folder(train_dir, img_size)
        xte, yte, test_classes = _read_image_folder(test_dir, img_size)
        yte = _map_labels(yte, test_classes, train_classes, test_dir, train_dir, ytr)
    if train_limit < 0 or test_limit < 0:
        raise ValueError(f"--train-limit / --test-limit: must be >= 0 (0: all), got {train_limit} / {test_limit}")
    if train_limit:
        xtr, ytr = _balanced_subset(xtr, ytr, train_limit)
    if test_limit:  # the folders list their samples class by class: the first ones would be one class
        xte, yte = _balanced_subset(xte, yte, test_limit)
    return xtr, ytr, xte, yte


def _balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int):
    """The first n samples of a fixed seeded shuffle (a class-balanced sample in expectation)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    return x[perm], y[perm]


def _map_labels(labels: torch.Tensor, classes: Sequence[str], ref_classes: Sequence[str], folder: str,
                ref_folder: str, ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Labels indexing ``classes`` re-expressed as indices of ``ref_classes`` (classes are paired by name, not by
    folder position). A class holding images in ``folder`` but none in ``ref_folder`` (absent, or an empty
    folder there: ``ref_labels`` says which hold images) is a ValueError."""
    present = sorted(set(labels.tolist()))
    held = ref_classes if ref_labels is None else [ref_classes[i] for i in sorted(set(ref_labels.tolist()))]
    missing = [classes[i] for i in present if classes[i] not in held]
    if missing:
        raise ValueError(f"data: class folder(s) {missing[:5]}{'...' if len(missing) > 5 else ''} of {folder!r} "
                         f"have no images in {ref_folder!r} (its classes with images: {list(held)[:10]}"
                         f"{'...' if len(held) > 10 else ''}): k-NN / linear probe can only predict "
                         f"the training classes")
    lut = torch.tensor([ref_classes.index(c) if c in ref_classes else -1 for c in classes], dtype=torch.long)
    return lut[labels.long()] if len(labels) else labels.long()


def _read_image_folder(root: str, size: int = 64):
    """Small ImageFolder trees read into memory: (RGB uint8 [N, size, size, 3], labels [N], class names), each
    image resized (bicubic) so that its short side is size * 256 / 224, then centre-cropped to size x size, as
    DINO's k-NN and linear evaluations read ImageNet at 224.

    An eval set is read exactly: a file that cannot be decoded is a ValueError naming it (skipping it would
    silently change what the accuracy is measured on)."""
    import numpy as np

    from sdmp_fast.pipelines.base import list_images
    from sdmp_fast.pipelines.image_bytes import max_pixels, pil_rgb

    max_pixels()  # a bad SDMP_MAX_IMAGE_PIXELS is an error of its own, not "cannot decode" the first image
    lst = list_images(root)
    if not lst.classes:
        raise ValueError(f"data: {root!r} holds unlabeled images (no class folders): k-NN and the linear probe need "
                         f"ImageFolder trees root/class/img")
    imgs = []
    for f in lst.files:
        try:
            # as the training loaders read it: upright (EXIF), 16-bit / float modes rescaled, not clipped to white
            imgs.append(np.asarray(_resize_centre_crop(pil_rgb(f), size)))
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            raise ValueError(f"data: cannot decode the image {f!r} ({type(e).__name__}: {e}); remove or replace "
                             f"it") from None
    return torch.from_numpy(np.stack(imgs)), torch.tensor(lst.labels, dtype=torch.long), tuple(lst.classes)


def _resize_centre_crop(im, size: int):
    """PIL image -> size x size: short side to round(size * 256 / 224) (bicubic, antialiased), centre crop,
    with torchvision's Resize(short) + CenterCrop(size) arithmetic on PIL images (DINO's evaluation transform):
    the long side truncated, int(short * long / short_side), the crop offset rounded, int(round(excess / 2))."""
    from PIL import Image

    short = max(size, round(size * 256 / 224))
    w, h = im.size
    if w <= h:
        rw, rh = short, int(short * h / w)
    else:
        rw, rh = int(short * w / h), short
    im = im.resize((rw, rh), Image.BICUBIC)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def load_backbone_for_eval(path: str, random_init: bool = False, seed: int = 0):
    """(backbone nn.Module, info dict with img_size / mean / std when the checkpoint records them).

    ``path`` is a checkpoint file or a run directory (its newest checkpoint). The trainer's loader does the
    reading; with ``random_init`` the same architecture is rebuilt from ``seed`` without loading the weights:
    the trainer builds its backbone first after seeding, so with the run's ``--seed`` this is exactly the
    run's initial backbone (the global RNG is left untouched)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path!r} does not exist (give a checkpoint file or a run directory)")
    from sdmp_fast import checkpoint as ckpt

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ckpt.load_backbone(path, random_init=random_init, with_info=True)


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="checkpoint file or run directory (its latest checkpoint)")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a dir with train/ and val/")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-t", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--linear", action="store_true", help="also run the linear probe")
    p.add_argument("--linear-optimizer", choices=("lbfgs", "adamw"), default="lbfgs")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--train-limit", type=int, default=0, help="use N training images (0: all)")
    p.add_argument("--test-limit", type=int, default=0, help="use N test images (0: all)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the checkpoint's architecture at random init (baseline)")
    p.add_argument("--seed", type=int, default=0,
                   help="--random-init weights from this seed (the run's --seed gives the run's own init)")
    p.add_argument("--raw-pixels", action="store_true", help="also report the raw-pixel k-NN baseline")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")


def evaluate_backbone(model: nn.Module, data, img_size: int, mean=DEFAULT_MEAN, std=DEFAULT_STD, k: int = 20,
                      T: float = 0.07, linear: bool = False, batch_size: int = 1024, device="cpu",
                      linear_kwargs: Optional[dict] = None) -> dict:
    """k-NN (and optionally linear-probe) accuracy of one backbone on (xtr, ytr, xte, yte), with timings."""
    xtr, ytr, xte, yte = data
    t0 = time.perf_counter()
    ftr, _ = extract_features(model, xtr, ytr, img_size, mean, std, batch_size, device)
    fte, _ = extract_features(model, xte, yte, img_size, mean, std, batch_size, device)
    for name, f in (("training", ftr), ("test", fte)):
        bad = int((~torch.isfinite(f)).any(1).sum())
        if bad:  # one NaN training feature takes every k-NN query's top slot: chance-level scores, silently
            raise ValueError(f"checkpoint: the backbone's features of {bad} of {len(f)} {name} images are not "
                             f"finite (NaN / inf): its weights are (a diverged run?), or the inputs overflow it")
    t1 = time.perf_counter()
    res = {"knn_top1": knn_classify(ftr.to(device), ytr, fte.to(device), yte, k, T),
           "feature_dim": ftr.shape[1], "extract_s": round(t1 - t0, 2),
           "extract_img_per_s": round((len(xtr) + len(xte)) / max(t1 - t0, 1e-9), 1)}
    res["knn_s"] = round(time.perf_counter() - t1, 2)
    if linear:
        t2 = time.perf_counter()
        res["linear_top1"] = linear_probe(ftr, ytr, fte, yte, device=device, **(linear_kwargs or {}))
        res["linear_s"] = round(time.perf_counter() - t2, 2)
    return res


def _check_args(args) -> str:
    """Options that need no model or data, checked before any work: ValueError naming the setting. Returns the
    device to use."""
    if not args.checkpoint:
        raise ValueError("--checkpoint: give a checkpoint file or a run directory")
    dev = device_setting(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.knn_k < 1:
        raise ValueError(f"--knn-k: must be >= 1, got {args.knn_k}")
    if not args.knn_t > 0:
        raise ValueError(f"--knn-t: must be > 0, got {args.knn_t}")
    if args.train_limit < 0:
        raise ValueError(f"--train-limit: must be >= 0 (0: all training images), got {args.train_limit}")
    if args.test_limit < 0:
        raise ValueError(f"--test-limit: must be >= 0 (0: all test images), got {args.test_limit}")
    if args.linear and args.linear_epochs < 1:
        raise ValueError(f"--linear-epochs: must be >= 1, got {args.linear_epochs}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size: must be >= 1, got {args.img_size}")
    if args.json:
        if os.path.isdir(args.json):
            raise ValueError(f"--json: {args.json!r} is a directory; give a file path")
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise ValueError(f"--json: the folder {parent!r} of {args.json!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"--json: the folder {parent!r} of {args.json!r} is not writable")
    return dev


def check_img_size(model: nn.Module, img_size: int) -> None:
    """ValueError naming --img-size when the backbone cannot take img_size x img_size inputs: a ViT with a fixed
    position embedding takes its own size only; a dynamic-size one a multiple of its patch size (sizes < 1 are
    refused earlier, by _check_args)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return
    size = tuple(getattr(pe, "img_size", None) or ())
    patch = tuple(getattr(pe, "patch_size", None) or ())
    dynamic = bool(getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False))
    if getattr(pe, "strict_img_size", False) and not dynamic and size:
        if (img_size, img_size) != size:
            raise ValueError(f"--img-size: the checkpoint's model takes {size[0]}x{size[1]} inputs only (fixed "
                             f"position embedding), got {img_size}; leave --img-size out to use its own size")
    elif patch and not getattr(pe, "dynamic_img_pad", False) and any(img_size % p for p in patch):
        raise ValueError(f"--img-size: must be a multiple of the model's patch size {patch[0]}, got {img_size}")


def main(args) -> int:
    device = _check_args(args)
    model, info = load_backbone_for_eval(args.checkpoint, random_init=args.random_init, seed=args.seed)
    img_size = args.img_size if args.img_size is not None else int(info.get("img_size", 28))
    check_img_size(model, img_size)
    mean, std = info.get("mean", DEFAULT_MEAN), info.get("std", DEFAULT_STD)
    data = load_eval_data(args.data, args.train_limit, args.test_limit, img_size)
    res = evaluate_backbone(model, data, img_size, mean, std, args.knn_k, args.knn_t, args.linear,
                            args.batch_size, device,
                            {"optimizer": args.linear_optimizer, "epochs": args.linear_epochs})
    k = min(args.knn_k, len(data[0]))  # what knn_predict uses: the whole training set when it holds fewer
    res.update(checkpoint=args.checkpoint, random_init=args.random_init, data=args.data, img_size=img_size,
               k=k, T=args.knn_t, n_train=len(data[0]), n_test=len(data[2]), device=str(device))
    if k < args.knn_k:
        res["k_asked"] = args.knn_k
    if args.raw_pixels:
        res["raw_pixel_knn_top1"] = raw_pixel_knn(data[0], data[1], data[2], data[3], args.knn_k, args.knn_t)
    tag = "random init" if args.random_init else "pretrained"
    asked = f", --knn-k {args.knn_k} > the {k} training images" if k < args.knn_k else ""
    print(f"{tag}: k-NN (k={k}{asked}, T={args.knn_t}) top-1 {100 * res['knn_top1']:.2f}% "
          f"on {res['n_test']} test / {res['n_train']} train images ({res['extract_s']} s features, "
          f"{res['knn_s']} s k-NN)")
    if "linear_top1" in res:
        print(f"{tag}: linear probe top-1 {100 * res['linear_top1']:.2f}% ({res['linear_s']} s)")
    if "raw_pixel_knn_top1" in res:
        print(f"raw pixels: k-NN top-1 {100 * res['raw_pixel_knn_top1']:.2f}%")
    if args.json:
        _write_json(args.json, res)
    return 0


def _write_json(path: str, res: dict) -> None:
    """Whole or not at all (``open(path, "w")`` emptied an earlier file before a write that could then fail)."""
    from sdmp_fast.paths import write_replacing

    write_replacing(path, lambda f: json.dump(res, f, indent=1), "--json (the results printed above)")
