"""`sdmp-fast show`: draw one batch of a loader as a PNG grid, to see by eye that the recipe and the mixing are
right. Columns are samples; rows are the clean views, then the mixed views. Each mixed image is titled with
its method, its lambda (the share of the image that is still its own sample) and its batch-flip partner.

    sdmp-fast show --data /data/train --backend dali --recipe byol2 --batch-size 8 --out grid.png
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from sdmp_fast.batch import SDMPBatch
from sdmp_fast.config import device_setting, parse_options
from sdmp_fast.mixing import METHODS

from .recipes import Recipe, make_recipe

CELL_INCHES = 1.55


def to_display(images: torch.Tensor, mean, std) -> torch.Tensor:
    """[n, C, H, W] normalised images -> [n, H, W, 3] float in [0, 1] on the CPU (uint8 input: scaled only)."""
    x = images.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    else:
        x = x.float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def plot_batch(batch: SDMPBatch, recipe: Recipe, out: str, title: Optional[str] = None,
               max_samples: int = 8) -> str:
    """Write ``out`` (PNG) for ``batch``; returns the path actually written (an existing directory gets
    ``grid.png`` inside it, a path without a suffix gets ``.png``)."""
    from sdmp_fast.plot import image_out_path

    out = image_out_path(out, "grid.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(batch.batch_size, max_samples)
    full_n = batch.batch_size
    rows = [(f"view {j}\n{v.shape[-1]}px", v) for j, v in enumerate(batch.views)]
    rows += [(f"mixed\nfrom view {src}", v) for src, v in zip(batch.mixed_from, batch.mixed_views)]
    lam = batch.lam.detach().float().cpu() if batch.lam is not None else None
    # each mixed row labelled with its own view's lam where the batch has it (DINO's local crops round apart)
    row_lams = [t.detach().float().cpu() for t in batch.mixed_lam] or [lam] * len(batch.mixed_views)
    method = batch.method.detach().cpu() if batch.method is not None else None
    indices = batch.indices.detach().cpu()

    fig, axes = plt.subplots(len(rows), n, figsize=(CELL_INCHES * n + 0.9, (CELL_INCHES + 0.3) * len(rows) + 0.6),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        shown = to_display(images[:n], recipe.mean, recipe.std)
        mixed_row = r >= len(batch.views)
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(shown[i].numpy(), interpolation="nearest" if shown.shape[1] < 64 else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if mixed_row and lam is not None:
                partner = full_n - 1 - i
                ax.set_title(f"{METHODS[int(method[i])]} λ={float(row_lams[r - len(batch.views)][i]):.2f}\n"
                             f"with col {partner}"
                             + ("" if partner < n else " (not shown)"), fontsize=7, color="tab:red", pad=2)
            elif r == 0:
                ax.set_title(f"col {i}: #{int(indices[i])}", fontsize=7, pad=2)
            if i == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red" if mixed_row else "0.6")
    fig.suptitle(title or f"{recipe.name}: {len(batch.views)} views + {len(batch.mixed_views)} mixed, "
                 f"first {n} of {full_n} samples", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from sdmp_fast.plot import save_figure

    save_figure(fig, out, dpi=110 if len(rows) <= 6 else 80)  # tall DINO grids stay a few MB
    plt.close(fig)
    return out


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="ImageFolder tree or file list")
    p.add_argument("--backend", default="torchvision", help="loader backend (default torchvision)")
    p.add_argument("--recipe", default="byol2", help="byol2 or dino (default byol2)")
    p.add_argument("--batch-size", type=int, default=8, help="samples in the batch, even (default 8)")
    p.add_argument("--out", default="grid.png",
                   help="PNG path (default grid.png; a directory: DIR/grid.png; no suffix: .png is added)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--loader-options", default=None,
                   help="the backend's own options, as for `sdmp-fast train`: key=value,... (values read as YAML) or "
                        "a YAML mapping, e.g. photometric=torch or mix_in_graph=true for dali")


def main(args) -> int:
    from .base import make_loader

    import inspect

    device = device_setting(args.device)
    options = parse_options("--loader-options", getattr(args, "loader_options", None))
    own = sorted(set(options) & set(inspect.signature(make_loader).parameters))
    if own:
        raise ValueError(f"--loader-options: {', '.join(own)} set by show itself (from --seed, --device, "
                         f"--batch-size, ...): not a backend option")
    recipe = make_recipe(args.recipe)
    from sdmp_fast.plot import check_writable, image_out_path

    check_writable(image_out_path(args.out, "grid.png"))  # a bad --out fails before any data is read
    loader = make_loader(args.backend, args.data, recipe, args.batch_size, device=device, seed=args.seed,
                         num_workers=args.num_workers, num_shards=1, shard_id=0, **options)
    batches = iter(loader)
    try:
        batch = next(batches, None)
    finally:  # its workers shut down now, Ctrl-C included (at exit they were killed, leaving /tmp/pymp-* behind)
        close = getattr(batches, "close", None)
        if callable(close):
            close()
    if batch is None:
        raise ValueError(f"--data: {args.data!r} gave no batch of {args.batch_size} (no file decodes, or fewer "
                         f"decodable images than the batch size)")
    opts = "".join(f" · {k}={v}" for k, v in options.items())
    title = (f"{args.backend}{opts} · {recipe.name} · batch {batch.batch_size} · seed {args.seed}: "
             f"{len(batch.views)} views + {len(batch.mixed_views)} mixed (red)")
    out = plot_batch(batch, recipe, args.out, title=title, max_samples=args.batch_size)
    print(f"show: wrote {out} ({batch!r})")
    return 0
