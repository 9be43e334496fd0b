"""Augmentation recipes as data (DALI `pipeline_def` spirit): every backend reads the same Recipe.

A Recipe is a tuple of ViewSpecs (each may repeat ``count`` times) plus the mixing spec. Backends must not
branch on the recipe *name*; they interpret the fields.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How a crop is resampled to the view size. BYOL, DINO and solo-learn resize their crops bicubically (MoCo v3
# bilinearly); bilinear is the cheaper choice where throughput matters more than fidelity.
INTERPOLATIONS = ("bicubic", "bilinear")
# How wide the Gaussian blur's kernel is (blur_kernel_size): BYOL's rule, or untruncated as PIL's
# GaussianBlur(radius=sigma) in DINO's and MoCo v3's augmentations.
BLUR_KERNELS = ("byol", "pil")


def blur_kernel_size(size: int, rule: str = "byol", sigma_max: float = 2.0) -> int:
    """Taps of the blur kernel (BLUR_KERNELS). "byol": 10% of the image side, made odd (23 at 224, 9 at 96), at
    least 3; "pil": also at least +-3 sigma_max, as PIL's untruncated filter (13 at 96 for sigma 2)."""
    taps = max(3, int(0.1 * size) // 2 * 2 + 1)
    if rule == "pil":
        taps = max(taps, 2 * math.ceil(3 * sigma_max) + 1)
    return taps


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view (BYOL / DINO style)."""
    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel: str = "byol"
    solarize_p: float = 0.0
    count: int = 1


@dataclass(frozen=True)
class MixSpec:
    """Batch-flip mixing: which (expanded) view indices get a mixed copy, and how lambda/method are drawn."""
    enabled: bool = True
    alpha: float = 1.0
    methods: Tuple[str, ...] = ("mixup", "cutmix", "resizemix")
    mixed_views: Tuple[int, ...] = (0, 1)
    per_batch: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str
    views: Tuple[ViewSpec, ...]
    mix: MixSpec = field(default_factory=MixSpec)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def expanded_views(self) -> Tuple[ViewSpec, ...]:
        """One ViewSpec per output view (``count`` expanded), in output order."""
        return tuple(v for spec in self.views for v in [spec] * spec.count)

    @property
    def num_views(self) -> int:
        return sum(v.count for v in self.views)

    def without_mixing(self) -> "Recipe":
        return replace(self, mix=replace(self.mix, enabled=False))

    def validate(self) -> "Recipe":
        """Raise ValueError naming the offending setting (cheap: run before any expensive work): types, tuple
        lengths and finiteness too, as a recipe built by hand or by ``dataclasses.replace`` is not typed-checked
        otherwise (a NaN jitter or a zero std made NaN / inf views, a 1-tuple scale an unpacking error)."""
        from sdmp_fast.mixing import method_ids

        where = f"recipe {self.name!r}"
        for name in ("mean", "std"):
            values = _reals(where, name, getattr(self, name), 3)
            if name == "std" and min(values) <= 0:
                raise ValueError(f"{where}: std must be > 0 per channel, got {self.std}")
        for j, v in enumerate(self.views):
            where = f"recipe {self.name!r} view {j}"
            if not (isinstance(v.size, int) and not isinstance(v.size, bool) and v.size >= 8):
                raise ValueError(f"{where}: size must be an integer >= 8, got {v.size!r}")
            for name in ("scale", "ratio", "blur_sigma"):
                _reals(where, name, getattr(v, name), 2)
            for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "brightness", "contrast",
                         "saturation", "hue"):
                _reals(where, name, (getattr(v, name),), 1)
            if not _is_int(v.count):
                raise ValueError(f"{where}: count must be an integer >= 0, got {v.count!r}")
            lo, hi = v.scale
            if not (0 < lo <= hi <= 1):
                raise ValueError(f"{where}: scale must satisfy 0 < min <= max <= 1, got {v.scale}")
            rlo, rhi = v.ratio
            if not (0 < rlo <= rhi):
                raise ValueError(f"{where}: ratio must satisfy 0 < min <= max, got {v.ratio}")
            if v.interpolation not in INTERPOLATIONS:
                raise ValueError(f"{where}: interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                 f"got {v.interpolation!r}")
            for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
                p = getattr(v, name)
                if not 0 <= p <= 1:
                    raise ValueError(f"{where}: {name} must be a probability in [0, 1], got {p}")
            if not (0 <= v.hue <= 0.5):
                raise ValueError(f"{where}: hue must be in [0, 0.5], got {v.hue}")
            for name in ("brightness", "contrast", "saturation"):
                if getattr(v, name) < 0:
                    raise ValueError(f"{where}: {name} must be >= 0, got {getattr(v, name)}")
            if v.blur_kernel not in BLUR_KERNELS:
                raise ValueError(f"{where}: blur_kernel must be one of {', '.join(BLUR_KERNELS)}, "
                                 f"got {v.blur_kernel!r}")
            if not (0 < v.blur_sigma[0] <= v.blur_sigma[1]):
                raise ValueError(f"{where}: blur_sigma must satisfy 0 < min <= max, got {v.blur_sigma}")
            taps = blur_kernel_size(v.size, v.blur_kernel, v.blur_sigma[1])
            if v.blur_p > 0 and taps // 2 >= v.size:  # the blur pads by reflection: less than the side
                raise ValueError(f"{where}: a {v.blur_kernel!r} blur of sigma up to {v.blur_sigma[1]} takes {taps} "
                                 f"taps, too wide for size {v.size} (at most {2 * v.size - 1}): lower blur_sigma "
                                 f"or set blur_p 0")
            if v.count < 0:
                raise ValueError(f"{where}: count must be >= 0, got {v.count}")
        if self.num_views < 1:
            raise ValueError(f"recipe {self.name!r}: no views")
        where = f"recipe {self.name!r}: mix"
        for name in ("enabled", "per_batch"):  # "no" would be truthy; 0 / 1 are taken (make_recipe(mix=1))
            if not (isinstance(getattr(self.mix, name), (bool, np.bool_)) or getattr(self.mix, name) in (0, 1)):
                raise ValueError(f"{where}.{name} must be True or False, got {getattr(self.mix, name)!r}")
        if not isinstance(self.mix.mixed_views, (tuple, list)) or not all(map(_is_int, self.mix.mixed_views)):
            raise ValueError(f"{where}.mixed_views must be a tuple of view indices, got {self.mix.mixed_views!r}")
        _reals(where[:-5], "mix.alpha", (self.mix.alpha,), 1)
        if self.mix.enabled:
            method_ids(self.mix.methods)
            if not self.mix.alpha > 0:
                raise ValueError(f"recipe {self.name!r}: mix.alpha must be > 0, got {self.mix.alpha}")
            bad = [i for i in self.mix.mixed_views if not 0 <= i < self.num_views]
            if bad:
                raise ValueError(f"recipe {self.name!r}: mix.mixed_views {bad} out of range for "
                                 f"{self.num_views} views")
        return self


def _is_int(value) -> bool:
    """A whole number, numpy's too (a count from np.arange); not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _reals(where: str, name: str, value, n: int) -> Tuple[float, ...]:
    """``value`` as n finite real numbers (a tuple or list of n; a bare number where n is 1), else a ValueError
    naming the setting."""
    items = value if n > 1 or isinstance(value, (tuple, list)) else (value,)
    ok = isinstance(items, (tuple, list)) and len(items) == n and all(
        isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
        and math.isfinite(x) for x in items)
    if not ok:
        shown = value[0] if n == 1 and isinstance(value, tuple) and len(value) == 1 else value
        want = "a finite number" if n == 1 else f"{n} finite numbers"
        raise ValueError(f"{where}: {name} must be {want}, got {shown!r}")
    return tuple(float(x) for x in items)


def byol2(size: int = 224, mix: bool = True, interpolation: str = "bicubic") -> Recipe:
    """BYOL's asymmetric two views (blur 1.0 / 0.1, solarize 0 / 0.2); both views get a mixed copy."""
    v1 = ViewSpec(size=size, blur_p=1.0, solarize_p=0.0, interpolation=interpolation)
    v2 = ViewSpec(size=size, blur_p=0.1, solarize_p=0.2, interpolation=interpolation)
    return Recipe("byol2", (v1, v2), MixSpec(enabled=mix, mixed_views=(0, 1)))


def dino(global_size: int = 224, local_size: int = 96, n_local: int = 8, n_local_mixed: int = 4,
         mix: bool = True, interpolation: str = "bicubic") -> Recipe:
    """DINO multi-crop: 2 global (scale 0.4-1) + n_local local (0.05-0.4). The two global crops (seen by the
    teacher) and the last n_local_mixed local crops (seen by the student) get mixed copies (Table 10 best:
    2 global + 4 clean local + 4 mixed local). Blur as DINO's PIL filter, untruncated on the 96 px crops too."""
    if not 0 <= n_local_mixed <= n_local:
        raise ValueError(f"n_local_mixed: must be in [0, n_local={n_local}], got {n_local_mixed}")
    g1 = ViewSpec(size=global_size, scale=(0.4, 1.0), blur_p=1.0, solarize_p=0.0, interpolation=interpolation,
                  blur_kernel="pil")
    g2 = ViewSpec(size=global_size, scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2, interpolation=interpolation,
                  blur_kernel="pil")
    loc = ViewSpec(size=local_size, scale=(0.05, 0.4), blur_p=0.5, count=n_local, interpolation=interpolation,
                   blur_kernel="pil")
    mixed = (0, 1) + tuple(range(2 + n_local - n_local_mixed, 2 + n_local))
    return Recipe("dino", (g1, g2, loc), MixSpec(enabled=mix, mixed_views=mixed))


RECIPES: Dict[str, object] = {"byol2": byol2, "dino": dino}


def make_recipe(name: str, **overrides) -> Recipe:
    """Build a named recipe; overrides go to its factory (size, n_local, mix, ...). Validated."""
    if isinstance(name, Recipe):
        return name.validate()
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; choose among {', '.join(RECIPES)}")
    try:
        return RECIPES[name](**overrides).validate()
    except TypeError as e:
        raise ValueError(f"recipe {name!r}: bad option ({e})") from None
