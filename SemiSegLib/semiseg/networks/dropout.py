"""Element-wise dropout with a faster mask on CPUs; ``nn.Dropout`` everywhere else.

Why: PyTorch draws a CPU dropout mask with ``bernoulli_``, one Mersenne-Twister draw per element on one
thread (~5 ns per element), which made the mask a fifth of a Mean Teacher step on a 2-core CPU (the UNet
drops out every encoder level, 73 M elements per step at the ACDC recipe). Here each 64-bit draw gives four
16-bit uniform lanes, and an element is kept when its lane clears ``round(p * 65536)``: the same
independent Bernoulli mask with the drop rate rounded to a multiple of 1/65536 (p = 0.05 becomes
0.0500031) and kept elements scaled by one over the kept fraction (inverted dropout), drawn from the
global CPU generator (``torch.manual_seed`` reproduces it). The backward keeps the boolean mask (1 byte
per element instead of a copy of the scaled mask). CUDA (fused kernel), other devices and
``torch.compile`` (which fuses dropout itself) use ``F.dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LANE_LEVELS = 1 << 16   # a 16-bit lane: the drop rate's resolution


def kept_fraction(p: float) -> float:
    """The keep probability the CPU mask has for drop rate ``p`` (``1 - p`` up to 1/65536)."""
    return 1.0 - round(p * LANE_LEVELS) / LANE_LEVELS


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its storage span exactly once (any dimension order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean mask laid out like ``x`` (same strides when ``x`` is dense), True with ``kept_fraction(p)``."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # 64 random bits each
    lanes = words.view(torch.int16)[:n]                      # uniform over [-32768, 32767]
    keep = lanes >= round(p * LANE_LEVELS) - LANE_LEVELS // 2
    if _dense(x):
        return keep.as_strided(x.shape, x.stride())
    return keep.view(x.shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the fast mask on CPU tensors."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    return _MaskedScale.apply(x, keep_mask(x, p), 1.0 / kept_fraction(p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same state dict) with the fast CPU mask of ``dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
