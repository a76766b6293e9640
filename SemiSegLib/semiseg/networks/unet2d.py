"""2D UNet of the SSL4MIS lineage (``HiLab-git/SSL4MIS`` ``code/networks/unet.py``; 1,813,764 parameters
at 4 classes).

Upsampling variants (not numerically interchangeable, stored with the checkpoint):
- ``bilinear`` (the default): 1x1 conv then bilinear x2 with align_corners=True. Every 2D reference runs
  it: SSL4MIS's ``UpBlock`` defaults to ``bilinear=True`` and its ``Decoder`` never passes ``bilinear``
  (supervised, Mean Teacher, UA-MT); the copies in UniMatch ``more-scenarios/medical/model/unet.py``
  (FixMatch, UniMatch; its training log prints "Total params: 1.8M"), AIGC-Match ``model/unet.py`` (AGP),
  ICL ``code/networks/unet_icl.py``, SS-Net ``code/networks/unet.py`` are the same.
- ``transpose``: ConvTranspose2d k2 s2 (1,944,324 parameters), the branch SSL4MIS's ``UpBlock`` has but
  never selects; MC-Net's first 2D decoder uses it (``ycwu1997/MC-Net`` ``code/networks/unet.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_network
from .base import SegmentationNetwork
from .dropout import Dropout


class ConvBlock(nn.Sequential):
    """Conv-BN-LeakyReLU, dropout, Conv-BN-LeakyReLU. The activations work in place: no backward needs the
    BatchNorm outputs they overwrite (BatchNorm keeps its input; LeakyReLU with a positive slope
    differentiates from its output), so training keeps two activation tensors fewer per block for the same
    values and gradients."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01, inplace=True),
            Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01, inplace=True),
        )


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient (same layout as the forward input). The gradient
    reaching the upsampling through ``torch.cat`` is a channel slice of the concatenation's gradient, not
    dense in channels-last, and PyTorch's CPU bilinear backward then takes a generic path 3-5x slower than
    its dense one. Same values."""

    @staticmethod
    def forward(ctx, x):
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, upsampling: str):
        super().__init__()
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(cin, cskip, kernel_size=2, stride=2)
        elif upsampling == "bilinear":
            self.up = nn.Sequential(nn.Conv2d(cin, cskip, 1),
                                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
        else:
            raise ValueError(f"unknown UNet upsampling '{upsampling}' (transpose or bilinear)")
        self.conv = ConvBlock(2 * cskip, cout, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, _DenseGradient.apply(self.up(x))], dim=1))


@register_network("unet")
class UNet2D(SegmentationNetwork):
    dim = 2

    def __init__(self, in_channels: int = 1, num_classes: int = 4, upsampling: str = "bilinear",
                 channels: tuple[int, ...] = (16, 32, 64, 128, 256),
                 dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)):
        super().__init__()
        self.config = {"name": "unet", "in_channels": in_channels, "num_classes": num_classes,
                       "upsampling": upsampling, "channels": list(channels), "dropout": list(dropout)}
        self.num_classes = num_classes
        self.encoder = nn.ModuleList([ConvBlock(in_channels, channels[0], dropout[0])])
        for i in range(1, len(channels)):
            self.encoder.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(channels[i - 1], channels[i], dropout[i])))
        self.decoder = nn.ModuleList(
            UpBlock(channels[i], channels[i - 1], channels[i - 1], upsampling)
            for i in range(len(channels) - 1, 0, -1))
        self.out_conv = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats

    def _decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, decoded = feats[-1], []
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            x = block(x, skip)
            decoded.append(x)
        return self.out_conv(x), decoded
