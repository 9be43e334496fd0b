"""`make demo` (foundation stage): mix real Fashion-MNIST images and write a PNG grid with each mixed image's
method and lambda, plus the SDMP-MoCo loss terms on those images. The trainer issue replaces this with a
short pretraining + k-NN evaluation."""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from sdmp_fast.data import load_fashion_mnist
from sdmp_fast.losses import sdmp_moco_terms
from sdmp_fast.mixing import METHODS, sdmp_mix


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    images, labels = load_fashion_mnist("train")
    x = images[: args.n].float().div(255)[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(args.seed)
    (mixed,), lam, method = sdmp_mix([x], generator=g)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "mixed_views.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, args.n, figsize=(1.6 * args.n, 3.6))
    for i in range(args.n):
        axes[0, i].imshow(x[i].permute(1, 2, 0).numpy())
        axes[0, i].set_title(f"#{i}", fontsize=8)
        axes[1, i].imshow(mixed[i].clamp(0, 1).permute(1, 2, 0).numpy())
        axes[1, i].set_title(f"{METHODS[int(method[i])]} λ={lam[i]:.2f}\nwith #{args.n - 1 - i}", fontsize=7)
    for a in axes.flat:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    feats = x.flatten(1)
    terms = sdmp_moco_terms(feats, mixed.flatten(1), feats, feats, mixed.flatten(1), lam)
    print(f"wrote {path}")
    print("SDMP-MoCo terms on raw pixels:", {k: round(v.item(), 4) for k, v in terms.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
