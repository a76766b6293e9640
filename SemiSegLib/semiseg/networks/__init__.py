"""Network registry: one module per network, registered by name (``build_network("unet", ...)``).

Every network maps ``(B, in_channels, *spatial)`` to logits ``(B, num_classes, *spatial)`` and
exposes ``encode`` / ``decode`` so methods can tap or perturb features:
``forward(x, return_features=True)`` returns ``(logits, Features)`` (``base.SegmentationNetwork``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import SemiSegError
from .base import Features, SegmentationNetwork  # noqa: F401  (the contract every network follows)

NETWORKS: dict[str, Callable[..., nn.Module]] = {}
DOWNSAMPLINGS = 4                  # unet and vnet: 4 poolings
SIZE_DIVISOR = 2 ** DOWNSAMPLINGS  # so training sizes are multiples of 16


def bottleneck_values(patch, batch: int) -> int:
    """Values per channel at the 1/16 bottleneck for ``batch`` patches; BatchNorm in train mode needs 2."""
    return batch * math.prod(p // SIZE_DIVISOR for p in patch)


def register_network(name: str):
    def wrap(cls):
        NETWORKS[name] = cls
        return cls
    return wrap


def build_network(name: str, **kwargs) -> nn.Module:
    if name not in NETWORKS:
        raise SemiSegError(f"unknown network '{name}'; available: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name](**kwargs)


def default_upsampling(name: str) -> str:
    """The network's own default decoder upsampling (its constructor's), for configurations that leave it empty."""
    import inspect
    if name not in NETWORKS:
        raise SemiSegError(f"unknown network '{name}'; available: {', '.join(sorted(NETWORKS))}")
    param = inspect.signature(NETWORKS[name]).parameters.get("upsampling")
    return param.default if param is not None else ""


def channels_last_format(dim: int, device: torch.device | str) -> torch.memory_format | None:
    """The channels-last layout for a network of this dimensionality on this device, None where it is not used.
    NHWC (2D) on every device; NDHWC (3D) on CPUs and CUDA GPUs, where oneDNN and cuDNN run 3D convolutions
    faster in it; not on Apple's MPS, whose Conv3d takes NCDHW (pytorch/pytorch#141780 converts its input back).
    A layout only: the same computation up to rounding."""
    if dim == 2:
        return torch.channels_last
    return torch.channels_last_3d if torch.device(device).type in ("cpu", "cuda") else None


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


from . import unet2d, vnet3d  # noqa: E402,F401  (registration side effect)
