"""What every network is: ``encode`` (features, shallow to deep), ``decode`` (logits and decoder features,
deep to shallow), and ``forward`` = decode(encode(x)); subclasses write the stages as ``_encode`` / ``_decode``.

Methods call the stages on their own (UniMatch's feature perturbation, AGP), so ``compile()`` compiles them
as well as the module's call. With only the call compiled, a direct ``encode`` ran eager BatchNorm beside the
compiled one: eager BatchNorm saves its running statistics for backward, the compiled BatchNorm of a later
call in the same step updates them in place with a version bump, and backward failed with "modified by an
inplace operation" (UniMatch and FixMatch on ACDC with ``--compile``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Features:
    encoder: list[torch.Tensor] = field(default_factory=list)  # shallow to deep
    decoder: list[torch.Tensor] = field(default_factory=list)  # deep to shallow, last = embedding

    @property
    def embedding(self) -> torch.Tensor:
        """Last decoder feature before the output convolution (SS-Net's "embedding")."""
        return self.decoder[-1]


class SegmentationNetwork(nn.Module):
    # set by compile(): the stages compiled, as functions of the class called with the network (a deep copy
    # of the network then runs its own weights through them)
    _compiled_stages: dict = {}

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._compiled_stages.get("encode", type(self)._encode)(self, x)

    def decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._compiled_stages.get("decode", type(self)._decode)(self, feats)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        enc = self._encode(x)
        logits, dec = self._decode(enc)
        return (logits, Features(enc, dec)) if return_features else logits

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile`` (in place: parameter names unchanged), and the same for ``encode``/``decode``."""
        super().compile(*args, **kwargs)
        self._compiled_stages = {"encode": torch.compile(type(self)._encode, *args, **kwargs),
                                 "decode": torch.compile(type(self)._decode, *args, **kwargs)}
