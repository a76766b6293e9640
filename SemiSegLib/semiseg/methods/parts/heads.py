"""Per-pixel MLP heads of SS-Net and CAML: Linear → BN1d → ReLU → Linear on feature vectors."""
from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Sequential):
    """``Linear(cin, hidden) → BN1d → ReLU → Linear(hidden, cout)`` (projection / prediction heads)."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


def pixels_to_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B·prod(S), C), channel-last rows for per-pixel heads."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])
