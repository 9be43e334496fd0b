"""Data sets the package ships or builds: Debian's Fashion-MNIST (the demo data) and small generated
ImageFolder trees for tests. Nothing here downloads anything."""
from __future__ import annotations

import gzip
import os
from typing import Tuple

import numpy as np
import torch

FASHION_MNIST_DIR = os.environ.get("SDMP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _read_idx(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: install Debian's dataset-fashion-mnist (make setup does) or set SDMP_FASHION_MNIST")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST's train (60k) or test (10k) split."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    images = _read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def make_synthetic_image_folder(out_dir: str, num_classes: int = 3, per_class: int = 8, size=(40, 48),
                                fmt: str = "jpg", seed: int = 0) -> str:
    """A tiny ImageFolder of random-colour RGB images with shapes on them (tests)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = os.path.join(out_dir, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            h, w = size
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            draw.ellipse([x0, y0, x0 + w // 2, y0 + h // 2], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            img.save(os.path.join(d, f"{i:04d}.{fmt}"), quality=90)
    return out_dir
