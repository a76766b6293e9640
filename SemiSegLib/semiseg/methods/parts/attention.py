"""AGP's attention-guided perturbations (AIGC-Match ``AIGCmatch.py``): parameter-free attention maps, the
attention-shaped mix mask (AttCutMix) and the attention-guided feature noise (AttFeaPerb).

Attention / energy of a feature tensor F (B, C, *S): ``A(F) = mean_c F²`` (B, *S).

- Decoder attention score of the weak view (eval mode, no grad): ``S = norm(A(up-block 4)) +
  up(norm(A(up-block 1)))`` with ``norm`` a min–max over the **whole batch tensor** (the code's
  behaviour; ``per_image`` is a named deviation) and ``up`` bilinear (align_corners=False) to the
  image size; S ∈ [0, 2]. Masks ``M_k = [S > t_k]`` with t = (0.3, 0.1) for the two strong views.
- AttCutMix: ``x_k = u_w·(1 − M_k) + s′_k·M_k`` (``paste_region="high_attention"``, the code) or the
  complement (``"low_attention"``, a reading of the paper's prose).
- AttFeaPerb on every encoder feature E_l with energy e_l = A(E_l) (absolute, not normalised):
  weak (target) ``E + κ·[e ≤ 0.5]·ε`` and strong ``E + (20 + κ·[e > 0.5])·ε`` with ε ~ N(0, 0.1²),
  κ = 1 − (1 − it/T)^0.9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Channel mean of squared activations, (B, C, *S) -> (B, *S), computed in float32."""
    return features.float().pow(2).mean(1)


def minmax(a: torch.Tensor, norm: str = "batch") -> torch.Tensor:
    """Min–max normalisation of (B, *S): ``batch`` over the whole tensor (AGP code), ``image`` per image.
    A constant map becomes 0 (the code divides 0 by 0, giving NaN, i.e. empty masks)."""
    if norm == "batch":
        lo, hi = a.min(), a.max()
    elif norm == "image":
        dims = tuple(range(1, a.dim()))
        lo, hi = a.amin(dims, keepdim=True), a.amax(dims, keepdim=True)
    else:
        raise ValueError(f"unknown attention normalisation '{norm}' (batch, image)")
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def resize_map(a: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear (2D) / trilinear (3D) resize of a (B, *S) map, align_corners=False."""
    if tuple(a.shape[1:]) == tuple(size):
        return a
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(a.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False).squeeze(1)


def decoder_attention_score(deep: torch.Tensor, shallow: torch.Tensor, size: tuple[int, ...],
                            norm: str = "batch") -> torch.Tensor:
    """``S = up(norm(A(shallow))) + up(norm(A(deep)))`` (B, *size): ``deep`` = output of the first
    up-block (128 ch at 1/8 size), ``shallow`` = output of the last up-block (16 ch, full size).
    As the code: normalise first, then resize."""
    return resize_map(minmax(attention_map(shallow), norm), size) + resize_map(minmax(attention_map(deep), norm), size)


def threshold_masks(score: torch.Tensor, thresholds: tuple[float, ...]) -> list[torch.Tensor]:
    """``[score > t]`` for each threshold (strict, on float32 as the code's ``torch.where(S > t, 1, 0)``)."""
    return [score > t for t in thresholds]


def paste_region(mask: torch.Tensor, direction: str = "high_attention") -> torch.Tensor:
    """Where the other image is pasted: the thresholded region (``high_attention``, code) or its
    complement (``low_attention``)."""
    if direction == "high_attention":
        return mask
    if direction == "low_attention":
        return ~mask
    raise ValueError(f"unknown paste region '{direction}' (high_attention, low_attention)")


def mix_images(base: torch.Tensor, pasted: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) images: ``pasted`` inside ``region`` (B, *S), ``base`` elsewhere (exact copies)."""
    return torch.where(region.unsqueeze(1), pasted, base)


def kappa_schedule(step: int, total: int, power: float = 0.9) -> float:
    """AGP's κ = 1 − (1 − it/T)^0.9: 0 at the start, 1 at the end of training."""
    return 1.0 - (1.0 - min(max(step, 0), total) / total) ** power


def high_energy(features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, 1, *S) bool: positions whose energy ``A(F)`` exceeds the absolute threshold."""
    return (attention_map(features) > threshold).unsqueeze(1)


def _noise(features: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn(features.shape, device=features.device, dtype=torch.float32)
    return torch.randn(features.shape, generator=generator, dtype=torch.float32).to(features.device)


def weak_feature_noise(features: torch.Tensor, kappa: float, std: float = 0.1, threshold: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """AttFeaPerb weak: ``E + κ·[A(E) ≤ t]·ε``, ε ~ N(0, std²): noise only on low-energy positions."""
    low = ~high_energy(features, threshold)
    return features.float() + _noise(features, generator) * std * kappa * low


def strong_feature_noise(features: torch.Tensor, kappa: float, std: float = 0.1, scale: float = 20.0,
                         threshold: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """AttFeaPerb strong: ``E + (scale + κ·[A(E) > t])·ε``, ε ~ N(0, std²): std 2.0 everywhere plus
    0.1κ on high-energy positions with the code's values."""
    high = high_energy(features, threshold)
    return features.float() + _noise(features, generator) * std * (scale + kappa * high)
