"""3D V-Net of the UA-MT / SS-Net lineage (about 9.44 M parameters) (SS-Net ``code/networks/VNet.py``).

Encoder stages of 1, 2, 3, 3, 3 convs (Conv3x3x3-BN-ReLU), strided-conv downsampling, transposed-conv
upsampling with *additive* skips, decoder stages of 3, 3, 2, 1 convs, 1x1x1 output conv.
Dropout3d(0.5) on the bottleneck and on the last decoder feature, active in train mode only.
``upsampling="trilinear"`` swaps the transposed convs for trilinear x2 + Conv3x3x3-BN-ReLU
(the auxiliary decoder of MC-Net / CAML).
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_network
from .base import SegmentationNetwork


def conv_stage(n: int, cin: int, cout: int) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def up(cin: int, cout: int, mode: str) -> nn.Sequential:
    if mode == "transpose":
        return nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
    if mode == "trilinear":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
                             nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
    raise ValueError(f"unknown V-Net upsampling '{mode}' (transpose or trilinear)")


@register_network("vnet")
class VNet3D(SegmentationNetwork):
    dim = 3

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                 upsampling: str = "transpose", dropout: float = 0.5):
        super().__init__()
        self.config = {"name": "vnet", "in_channels": in_channels, "num_classes": num_classes,
                       "n_filters": n_filters, "upsampling": upsampling, "dropout": dropout}
        self.num_classes = num_classes
        f = [n_filters * 2 ** i for i in range(5)]
        self.encoder = nn.ModuleList([conv_stage(1, in_channels, f[0])])
        for i, n in zip(range(1, 5), (2, 3, 3, 3)):
            self.encoder.append(nn.Sequential(down(f[i - 1], f[i]), conv_stage(n, f[i], f[i])))
        self.ups = nn.ModuleList(up(f[i], f[i - 1], upsampling) for i in range(4, 0, -1))
        self.stages = nn.ModuleList(conv_stage(n, f[i], f[i]) for i, n in zip(range(3, -1, -1), (3, 3, 2, 1)))
        self.dropout = nn.Dropout3d(dropout)
        self.out_conv = nn.Conv3d(f[0], num_classes, 1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        feats[-1] = self.dropout(feats[-1])
        return feats

    def _decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, decoded = feats[-1], []
        for upsample, stage, skip in zip(self.ups, self.stages, reversed(feats[:-1])):
            x = stage(upsample(x) + skip)
            decoded.append(x)
        decoded[-1] = self.dropout(decoded[-1])
        return self.out_conv(decoded[-1]), decoded
