"""Sharpening and the MC-Net-style mutual consistency of CAML (``Herschel555/CAML`` ``code/train_caml.py``)."""
from __future__ import annotations

import torch


def sharpen(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``p^(1/T) / (p^(1/T) + (1 − p)^(1/T))`` per channel (MC-Net / CAML ``sharpening``; T = 0.1)."""
    t = 1.0 / temperature
    a = p ** t
    return a / (a + (1.0 - p) ** t)


def mutual_consistency(p_v: torch.Tensor, p_a: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``mean((p_v − sharpen(p_a))²) + mean((p_a − sharpen(p_v))²)`` over every channel, voxel and
    sample, neither side detached (CAML ``loss_c``, ``losses.mse_loss`` = mean squared error)."""
    return ((p_v - sharpen(p_a, temperature)) ** 2).mean() + ((p_a - sharpen(p_v, temperature)) ** 2).mean()
