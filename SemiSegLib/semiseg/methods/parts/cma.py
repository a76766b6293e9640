"""CAML's cross-sample mutual attention (CMA) and the auxiliary branch that carries it (CAML ``code/networks/VNet.py``).

CMA sits after the fourth encoder stage (128 channels; 14×14×10 = 1960 positions for a 112×112×80 V-Net
input) and is two post-norm ``nn.TransformerEncoderLayer(d, 4 heads, 4d feed-forward, dropout 0.5, ReLU)``:

* intra-sample: self-attention over the positions of each sample (sequence = positions);
* inter-sample: self-attention over the **batch axis** (sequence = the B samples), separately at each
  position, so unlabeled samples attend to labeled ones (CAML ``CAML3d_v1``: ``IntraSampleAttention`` then
  ``InterSampleAttention``, ``cma_type='v2+'``).

Both are active in training mode only; in eval mode CMA is the identity, so the auxiliary encoder equals
a plain encoder with the same weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ...networks import build_network


class CrossSampleMutualAttention(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, ff_ratio: int = 4, dropout: float = 0.5,
                 intra: bool = True, inter: bool = True):
        super().__init__()
        # batch_first=False as the reference: a (sequence, batch, dim) layout
        self.intra = nn.TransformerEncoderLayer(dim, heads, dim * ff_ratio, dropout) if intra else None
        self.inter = nn.TransformerEncoderLayer(dim, heads, dim * ff_ratio, dropout) if inter else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (self.intra is None and self.inter is None):
            return x
        b, c, *spatial = x.shape
        t = x.flatten(2).permute(2, 0, 1)            # (N, B, C): sequence = positions of one sample
        if self.intra is not None:
            t = self.intra(t)
        if self.inter is not None:
            t = self.inter(t.transpose(0, 1)).transpose(0, 1)  # (B, N, C): sequence = the batch axis
        return t.permute(1, 2, 0).reshape(b, c, *spatial)


CMA_STAGE = 3  # encoder index of "block four" (0-based): 128 channels at 1/8 resolution in both networks


def stage_channels(config: dict, stage: int = CMA_STAGE) -> int:
    if config["name"] == "vnet":
        return int(config["n_filters"]) * 2 ** stage
    return int(config["channels"][stage])


def build_auxiliary_branch(student: nn.Module, upsampling: str, mode: str = "intra+inter",
                           dropout: float = 0.5) -> nn.Module:
    """A network of the student's family and size with ``upsampling`` decoders and CMA appended to the
    fourth encoder stage (``encoder[3]`` is an ``nn.Sequential`` in both the V-Net and the UNet, so the
    plain network's parameter names are unchanged and CMA's live under ``encoder.3.<last>``)."""
    cfg = dict(student.config)
    name = cfg.pop("name")
    cfg["upsampling"] = upsampling
    net = build_network(name, **cfg)
    if mode != "none":
        cma = CrossSampleMutualAttention(stage_channels(student.config), 4, 4, dropout,
                                         intra="intra" in mode, inter="inter" in mode)
        net.encoder[CMA_STAGE].append(cma)
    return net
