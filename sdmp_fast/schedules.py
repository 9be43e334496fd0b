"""Per-step schedules as pure functions of the optimiser step (so a resumed run needs no schedule state).

lr: linear warm-up to the peak over ``warmup_steps`` (step s at peak * (s + 1) / warmup_steps: the first step
trains, where the papers' first is at 0 or near it), then half-cosine to ``min_lr`` (MoCo v3, DINO).
weight decay: cosine from ``wd`` to ``wd_end`` (DINO 0.04 -> 0.4; MoCo v3 keeps it constant).
momentum / EMA keep rate: cosine from ``m`` to 1 (MoCo v3 0.99 -> 1, DINO 0.996 -> 1); the trainer's MoCo v3
update after step s uses the rate of s + 1, as MoCo v3's own update at the next iteration's start does.
DINO teacher temperature: linear warm-up ``tau_t`` -> ``tau_t_end`` over ``tau_t_warmup_steps``, then constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine", "Schedules"]


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), clamped outside [0, total]."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    peak_lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    wd: float = 0.0
    wd_end: float = 0.0
    momentum: float = 0.99
    tau_t: float = 0.04
    tau_t_end: float = 0.07
    tau_t_warmup_steps: int = 0
    momentum_end: float = 1.0  # the papers' keep rate ends at 1; = momentum keeps it constant (short runs)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        return cosine(step - self.warmup_steps, self.total_steps - self.warmup_steps, self.peak_lr, self.min_lr)

    def weight_decay(self, step: int) -> float:
        return cosine(step, self.total_steps, self.wd, self.wd_end)

    def ema_keep(self, step: int) -> float:
        return cosine(step, self.total_steps, self.momentum, self.momentum_end)

    def teacher_temp(self, step: int) -> float:
        if step < self.tau_t_warmup_steps:
            return self.tau_t + (self.tau_t_end - self.tau_t) * step / self.tau_t_warmup_steps
        return self.tau_t_end

    def at(self, step: int) -> dict:
        return {"lr": self.lr(step), "wd": self.weight_decay(step), "momentum": self.ema_keep(step),
                "tau_t": self.teacher_temp(step)}
