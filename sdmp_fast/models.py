"""Models of the two SDMP methods, built on timm Vision Transformers (never pretrained: nothing is downloaded).

- ``create_backbone``: a timm ViT by name with ``num_classes=0`` (pooled features out), any size overrides.
- MoCo v3 (Chen et al. 2021): base encoder = backbone + 3-layer projector + 2-layer predictor (BN MLPs, hidden
  4096, out 256), momentum encoder = EMA copy of backbone + projector, optional frozen random patch embedding.
- DINO (Caron et al. 2021): student = backbone + DINOHead (3-layer MLP, L2-normalised bottleneck, weight-normed
  last layer over K = 65,536 prototypes), teacher = EMA copy, center buffer.
- Stochastic depth (``drop_path_rate``, DINO 0.1) only in the trained encoder: the EMA copies have none.

The projection heads run once per view (BN statistics per view, as both papers do); the backbone runs once
on all views of a resolution concatenated (it has no batch-dependent layers, so this is exact and faster).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["create_backbone", "build_mlp", "MoCoV3", "DINOHead", "MultiCropNet", "DINO", "ema_update_",
           "param_groups", "backbone_spec", "without_drop_path_"]


def backbone_spec(arch: str, img_size: int, patch_size: int, depth: Optional[int] = None,
                  embed_dim: Optional[int] = None, num_heads: Optional[int] = None,
                  dynamic_img_size: bool = False) -> Dict:
    """The keyword arguments that rebuild a backbone (stored in checkpoints, primitives only)."""
    spec = {"arch": arch, "img_size": int(img_size), "patch_size": int(patch_size),
            "dynamic_img_size": bool(dynamic_img_size)}
    for k, v in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
        if v is not None:
            spec[k] = int(v)
    return spec


def create_backbone(spec: Dict, drop_path_rate: float = 0.0) -> nn.Module:
    """timm ViT from a ``backbone_spec`` dict; pooled features of size ``model.num_features`` out. ``drop_path_rate``
    (stochastic depth, a training setting: not part of the spec) is timm's, linear over the blocks."""
    import timm

    spec = dict(spec)
    if drop_path_rate:
        spec["drop_path_rate"] = float(drop_path_rate)
    arch = spec.pop("arch")
    if not timm.is_model(arch):
        raise ValueError(f"arch: unknown timm model {arch!r} (e.g. vit_small_patch16_224, vit_base_patch16_224, "
                         f"vit_tiny_patch16_224)")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **spec)
    except TypeError as e:  # a non-ViT architecture does not take img_size / patch_size / depth ...
        raise ValueError(f"arch: {arch!r} is not a Vision Transformer taking {sorted(spec)} ({e})") from None
    except AssertionError as e:  # timm's own checks: "dim should be divisible by num_heads" when one is given alone
        given = [k for k in ("embed_dim", "num_heads") if k in spec]
        sizes = ", ".join(f"{k} {spec[k]}" for k in given)
        raise ValueError(f"{given[0] if len(given) == 1 else 'arch'}: timm cannot build {arch!r} with {sizes or spec}"
                         f" ({str(e) or 'a failed check'}): the arch's own width / head count may not fit it;"
                         f" give embed_dim and num_heads together (embed_dim a multiple of num_heads)") from None
    if not hasattr(model, "patch_embed"):
        raise ValueError(f"arch: {arch!r} has no patch embedding; sdmp-fast trains timm Vision Transformers")
    return model


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: (Linear no-bias, BN, ReLU) x (L-1), Linear no-bias, optional affine-free BN."""
    layers: List[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    """backbone -> projector (-> predictor), heads applied per view chunk."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: Optional[nn.Module] = None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x: torch.Tensor, num_views: int) -> List[torch.Tensor]:
        feats = self.backbone(x)
        out = []
        for f in feats.chunk(num_views):
            z = self.projector(f)
            out.append(self.predictor(z) if self.predictor is not None else z)
        return out


class MoCoV3(nn.Module):
    """``base``: backbone + projector + predictor (trained); ``momentum``: backbone + projector (EMA, no grad)."""

    def __init__(self, backbone: nn.Module, hidden_dim: int = 4096, out_dim: int = 256,
                 freeze_patch_embed: bool = True, predictor_last_bn: bool = True):
        super().__init__()
        d = backbone.num_features
        if freeze_patch_embed:  # MoCo v3 §4.2: a fixed random patch projection stabilises ViT training
            for p in backbone.patch_embed.parameters():
                p.requires_grad_(False)
        # MoCo v3's ViT predictor ends in an affine-free BN, as its projector does (only its ResNet one does not)
        self.base = _Encoder(backbone, build_mlp(3, d, hidden_dim, out_dim),
                             build_mlp(2, out_dim, hidden_dim, out_dim, last_bn=predictor_last_bn))
        self.momentum = _Encoder(without_drop_path_(copy.deepcopy(backbone)), copy.deepcopy(self.base.projector))
        for p in self.momentum.parameters():
            p.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        return self.base.backbone

    def ema_pairs(self):
        """(momentum param, base param) pairs the EMA updates (predictor has no momentum copy)."""
        base = dict(self.base.named_parameters())
        return [(p, base[n]) for n, p in self.momentum.named_parameters()]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row (DINO's last layer).

    Written out instead of torch.nn.utils.weight_norm so the state dict keys are stable across torch versions
    and the layer compiles without parametrisation hooks. With ``fix_norm`` g stays 1 (DINO's norm_last_layer).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's own init, as DINO's (its last layer is made after the head's trunc_normal(0.02) init): the
        # row norm of v sets how fast Adam turns a prototype, 1.8x faster with trunc_normal(0.02) at 256 inputs
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return F.linear(x, w)


class DINOHead(nn.Module):
    """3-layer GELU MLP -> bottleneck -> L2 normalise -> weight-normed linear over ``out_dim`` prototypes.

    ``use_bn`` puts BatchNorm after each hidden linear layer (DINO's ``use_bn_in_head``): the bottleneck
    outputs then start spread over the sphere instead of in one narrow cone, so the centred teacher starts
    near uniform rather than on a handful of prototypes (what small models on small images need)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: List[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


class MultiCropNet(nn.Module):
    """backbone + head over a list of crops: one backbone call per run of equal resolutions, one head call."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats))  # [num_crops * B, K], crop-major


class DINO(nn.Module):
    """``student`` (trained), ``teacher`` (EMA, no grad), ``center`` [1, K] (EMA of clean teacher outputs)."""

    def __init__(self, backbone: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, use_bn_in_head: bool = False):
        super().__init__()
        head = DINOHead(backbone.num_features, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer,
                        use_bn=use_bn_in_head)
        self.student = MultiCropNet(backbone, head)
        self.teacher = without_drop_path_(copy.deepcopy(self.student))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    def ema_pairs(self):
        return list(zip(self.teacher.parameters(), self.student.parameters()))


def without_drop_path_(module: nn.Module) -> nn.Module:
    """Stochastic depth off in an EMA copy (DINO builds its teacher without drop_path_rate; the copy is made of the
    student). Buffers and parameters are unchanged: only timm's DropPath modules' drop_prob."""
    for m in module.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return module


@torch.no_grad()
def ema_update_(targets: List[torch.Tensor], sources: List[torch.Tensor], keep) -> None:
    """targets = keep * targets + (1 - keep) * sources, as two multi-tensor kernels.

    ``keep`` may be a float or a 0-dim device tensor (no host sync, CUDA-graph capturable)."""
    if not targets:
        return
    torch._foreach_mul_(targets, keep)
    torch._foreach_add_(targets, torch._foreach_mul(sources, 1 - keep))


def param_groups(module: nn.Module, method: str = "dino") -> List[Dict]:
    """Trainable parameters split into decayed and not decayed, as each method's reference code splits them.

    DINO (``utils.get_params_groups``): biases and 1-D parameters (norms) are not decayed; every other tensor is,
    the position embedding and the class token included. MoCo v3 (``main_moco.py``: ``AdamW(model.parameters(),
    weight_decay=wd)``, as SDMP's code): every parameter is decayed."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = method != "mocov3" and (p.ndim <= 1 or name.endswith(".bias"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


def trainable(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [p for p in params if p.requires_grad]
