"""Tensor operations whose plain PyTorch form is slow on the CPU."""
from __future__ import annotations

import torch


def argmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.argmax(dim)`` computed as ``t.max(dim).indices``: the same indices (the first maximal value's on
    ties), but PyTorch's CPU argmax over a dimension that is not the innermost in memory (the class axis of a
    contiguous batch of logits) takes a slow path: 290 ms vs 11 ms for (24, 4, 256, 256) over dim 1 on 2 cores."""
    return t.max(dim).indices
