"""Schedules of the literature (SSL4MIS ``code/utils/ramps.py`` and its training scripts): ramp-ups, learning
rates, EMA decay."""
from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - min(t, R)/R)^2)``; 1 when R = 0 (Laine & Aila, as in SSL4MIS)."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(step: int, weight: float, rampup_iterations: int, quantum: int = 150) -> float:
    """The lineage's ``weight * sigmoid_rampup(iter // 150, R)`` with the ramp given in iterations
    (R = rampup_iterations / quantum): the user-facing parameter is iterations, never the 150-units."""
    if rampup_iterations <= 0:
        return weight
    return weight * sigmoid_rampup(step // quantum, rampup_iterations / quantum)


def learning_rate(step: int, base_lr: float, schedule: str, max_iterations: int,
                  step_size: int = 2500, gamma: float = 0.1, power: float = 0.9) -> float:
    """poly: base·(1 - it/max)^0.9; step: base·0.1^floor(it/2500); constant: base."""
    if schedule == "poly":
        return base_lr * (1.0 - min(step, max_iterations) / max_iterations) ** power
    if schedule == "step":
        return base_lr * gamma ** (step // step_size)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule '{schedule}' (poly, step, constant)")


def ema_decay(step: int, decay: float) -> float:
    """SSL4MIS/UA-MT: ``alpha = min(1 - 1/(step + 1), decay)`` (fast start, then ``decay``)."""
    return min(1.0 - 1.0 / (step + 1), decay)
