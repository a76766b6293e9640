"""Low-confidence pixel masks and the masked consistency of LCC (a reconstruction from the abstract).

``confidence_mask``: 1 where the (teacher's) maximum class probability is strictly below τ, so a
pixel at or above the threshold is excluded. ``entropy_mask``: 1 where the predictive entropy is at
or above a threshold (the complement of UA-MT's certain mask, our option). Masks are (B, 1, *S) floats.
"""
from __future__ import annotations

import torch


def max_confidence(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) probabilities -> (B, 1, *S) maximum class probability."""
    return probs.max(dim=1, keepdim=True).values


def confidence_mask(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Low-confidence mask ``[max_k p_k < τ]`` (pixels at or above τ are 0)."""
    return (max_confidence(probs) < tau).float()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, 1, *S) ``-Σ p log(p + 1e-6)`` (UA-MT's form)."""
    return -(probs * torch.log(probs + 1e-6)).sum(1, keepdim=True)


def entropy_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Low-confidence by entropy: ``[H(p) >= threshold]``."""
    return (entropy(probs) >= threshold).float()


def low_confidence_consistency(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                               mask: torch.Tensor) -> torch.Tensor:
    """``Σ L·‖p_s − p_t‖² / (C·Σ L + 1e-8)`` over (B, C, *S) probabilities, mask (B, 1, *S) broadcast over
    channels, teacher detached (the normalisation mirrors UA-MT's masked MSE; inferred).
    Pixels with L = 0 get exactly zero gradient."""
    num_classes = student_probs.shape[1]
    dist = (student_probs - teacher_probs.detach()) ** 2
    return (mask * dist).sum() / (num_classes * mask.sum() + 1e-8)
