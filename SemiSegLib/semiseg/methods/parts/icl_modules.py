"""ICL's SSPA / USCL modules (reference ``zhuye98/ICL`` ``code/networks/unet_icl.py``, ``InherentConsistent``).

One :class:`SemanticProxyModule` is one instance (SSPA or USCL). Per decoder scale s (d = 128/64/32,
heads = 8/4/2 for the UNet's F1/F2/F3):

* tokens ``T = LN(Conv1×1(F_s))`` flattened to N = h·w tokens (no patching);
* class cross-attention with the reference's reshapes: the projected queries (B, C, d) are *reshaped*
  (not transposed) to (B, heads, C, d/heads) and the pooled values reshaped back the same way, which
  mixes the class and head axes; the attention logits (B, heads, C, N) are permuted to (B, C, heads, N);
* doubled residuals as coded: ``Q″ = 2Q′ + MLP(LN(2Q′))`` (d → 4d → d, GELU) and
  ``A″ = 2A + MLP_N(LN_N(2A))`` with the MLP acting along the **token axis** N → N → N (``exact``), each
  residual branch under per-sample drop-path (0.02 in training);
* map head: A″ as (B·C, heads, h, w) → depthwise 3×3 → BN → ReLU → pointwise 1×1 → BN → ReLU →
  1×1 conv heads → 1, giving class-map logits (B, C, h, w);
* labelled mode chains the queries ``Q_{s+1} = Conv1d(d → d/2)(Q″_s)``; unlabelled mode (USCL) takes the
  batch-mean queries ``U_s`` exported by SSPA (not detached) at every scale, with no chaining.

``exact=False`` is SemiSeg's light variant (``icl_lite``, a deviation): the token-axis LN + N→N MLP is
replaced by a size-independent per-map normalisation and a depthwise 3×3 → GELU → 1×1 conv on the
(heads, h, w) map; everything else is identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ICL_CHANNELS = (128, 64, 32)
ICL_HEADS = (8, 4, 2)


class DropPath(nn.Module):
    """Per-sample stochastic depth (monai ``DropPath``: drop with probability p, rescale by 1/(1−p))."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Sequential):
    def __init__(self, cin: int, hidden: int):
        super().__init__(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, cin))


class ClassQueryAttention(nn.Module):
    """Reference ``Query_Attention`` (qkv bias, scale (d/heads)^-½), reshapes exactly as coded."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.fc_q = nn.Linear(dim, dim)
        self.fc_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        c, h = q.shape[1], self.heads
        q = self.fc_q(q).reshape(b, h, c, d // h)                        # reshape, no transpose (as coded)
        kv = self.fc_kv(x).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]                                               # (B, heads, N, d/heads)
        logits = (q @ k.transpose(-2, -1)) * self.scale                   # (B, heads, C, N)
        out = (logits.softmax(-1) @ v).reshape(b, c, d)                   # back without transpose (as coded)
        return self.proj(out), logits.permute(0, 2, 1, 3)                 # (B, C, d), (B, C, heads, N)


class TokenAxisMixer(nn.Module):
    """Exact: ``MLP_N(LN_N(a))`` along the token axis, N → N → N (``Class_Decoder.norm3/mlp2``)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(tokens)
        self.mlp = Mlp(tokens, tokens)

    def forward(self, a: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if a.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(f"the exact ICL token MLP was built for {self.norm.normalized_shape[0]} tokens, "
                             f"the features have {a.shape[-1]}")
        return self.mlp(self.norm(a))


class LightMapMixer(nn.Module):
    """SemiSeg's light replacement (a deviation): per-map normalisation over the tokens (no affine), then
    depthwise 3×3 → GELU → 1×1 conv over the (heads, h, w) map. Independent of the image size."""

    def __init__(self, heads: int):
        super().__init__()
        self.dw = nn.Conv2d(heads, heads, 3, padding=1, groups=heads)
        self.pw = nn.Conv2d(heads, heads, 1)

    def forward(self, a: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, c, h, n = a.shape
        x = F.layer_norm(a, (n,)).reshape(b * c, h, *hw)
        return self.pw(F.gelu(self.dw(x))).reshape(b, c, h, n)


class ClassDecoder(nn.Module):
    """Reference ``Class_Decoder`` with its doubled residuals."""

    def __init__(self, dim: int, heads: int, tokens: int | None, drop_path: float):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attn = ClassQueryAttention(dim, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.map_mixer = TokenAxisMixer(tokens) if tokens else LightMapMixer(heads)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, hw: tuple[int, int]):
        q, a = self.attn(self.norm_query(query), self.norm_tokens(tokens))
        q = q + self.drop_path(q)                          # Q + Q (as coded)
        q = q + self.drop_path(self.mlp(self.norm2(q)))
        a = a + self.drop_path(a)                          # A + A (as coded)
        a = a + self.drop_path(self.map_mixer(a, hw))
        return q, a


class ScaleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, tokens: int | None, drop_path: float):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.decoder = ClassDecoder(dim, heads, tokens, drop_path)
        self.separable = nn.Sequential(   # reference SeparableConv2d(relu_first=False), no conv bias
            nn.Conv2d(heads, heads, 3, padding=1, groups=heads, bias=False), nn.BatchNorm2d(heads),
            nn.ReLU(inplace=True), nn.Conv2d(heads, heads, 1, bias=False), nn.BatchNorm2d(heads),
            nn.ReLU(inplace=True))
        self.head = nn.Conv2d(heads, 1, 1)
        self.query_conv = nn.Conv1d(dim, dim // 2, 1)

    def forward(self, feat: torch.Tensor, query: torch.Tensor):
        b, _, h, w = feat.shape
        tokens = self.norm(self.proj(feat).flatten(2).transpose(1, 2))     # (B, N, d)
        q, a = self.decoder(query, tokens, (h, w))
        c, heads = a.shape[1], a.shape[2]
        maps = self.head(self.separable(a.reshape(b * c, heads, h, w))).reshape(b, c, h, w)
        return maps, q


class SemanticProxyModule(nn.Module):
    """One SSPA or USCL instance. ``token_counts`` = (N1, N2, N3) builds the exact module (token-axis MLPs
    bound to the training size); None builds the light variant."""

    def __init__(self, num_classes: int, token_counts: tuple[int, ...] | None = None,
                 channels: tuple[int, ...] = ICL_CHANNELS, heads: tuple[int, ...] = ICL_HEADS,
                 drop_path: float = 0.02):
        super().__init__()
        tokens = token_counts or (None,) * len(channels)
        self.blocks = nn.ModuleList(ScaleBlock(d, h, n, drop_path) for d, h, n in zip(channels, heads, tokens))
        self.query = nn.Parameter(torch.zeros(1, num_classes, channels[0]))  # Q0, zero-initialised

    def forward(self, feats: list[torch.Tensor], queries: list[torch.Tensor] | None = None):
        """Labelled mode (``queries`` None): start from Q0 and chain. Unlabelled mode: ``queries[s]`` at each
        scale. Returns the class maps per scale and the batch-mean refined queries U_s (not detached)."""
        maps, exported = [], []
        b = feats[0].shape[0]
        q = self.query.expand(b, -1, -1)
        last = len(self.blocks) - 1
        for s, (block, f) in enumerate(zip(self.blocks, feats)):
            qs = q if queries is None else queries[s].expand(b, -1, -1)
            m, q2 = block(f, qs)
            maps.append(m)
            exported.append(q2.mean(0, keepdim=True))
            if queries is None and s < last:  # the last chaining conv's output is unused (as coded)
                q = block.query_conv(q2.transpose(1, 2)).transpose(1, 2)
        return maps, exported


def token_counts_for(size: tuple[int, int]) -> tuple[int, int, int]:
    """Tokens of F1/F2/F3 (1/8, 1/4, 1/2 of the training size)."""
    h, w = size
    return tuple((h // f) * (w // f) for f in (8, 4, 2))


def expected_parameters(num_classes: int, token_counts: tuple[int, ...] | None,
                        channels: tuple[int, ...] = ICL_CHANNELS, heads: tuple[int, ...] = ICL_HEADS) -> int:
    """Closed form of one module's parameter count (its size), exact variant when
    ``token_counts`` is given: per scale 13.5d² + 18.5d + h² + 14h + 1 (+ 2N² + 4N for the token MLP and
    its LayerNorm), plus the C×d₀ query; light variant: + 9h + h + h² + h per scale instead."""
    total = num_classes * channels[0]
    for s, (d, h) in enumerate(zip(channels, heads)):
        total += (27 * d * d + 37 * d) // 2 + h * h + 14 * h + 1
        if token_counts:
            n = token_counts[s]
            total += 2 * n * n + 4 * n
        else:
            total += 10 * h + h * h + h
    return total
