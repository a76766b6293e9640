"""Virtual adversarial training (Miyato et al.) as SS-Net's pixel-level smoothness term ``L_lds``
(SS-Net ``code/utils/losses.py`` VAT2d / VAT3d).

1. target ``p = softmax(f(x))`` under no_grad, in whatever mode the network is in (train mode in the
   training loop, so dropout is on, as in the code);
2. ``d ~ U(-0.5, 0.5)`` with the shape of ``x``, L2-normalised per sample over all pixels/voxels;
3. with BatchNorm running-statistic tracking switched off, one (or ``power_iterations``) power
   iteration ``d <- normalise(∇_d D(softmax f(x + ξ d), p))``;
4. ``L_lds = D(softmax f(x + ε d), p)``, still with BN tracking off.

The perturbed passes never change ``running_mean``, ``running_var`` or ``num_batches_tracked``
(tracking is switched off, the modules use batch statistics as in train mode). The target pass is a
plain train-mode forward, so, as in the code, it updates the running statistics like any forward
does; ``freeze_target_bn=True`` freezes it too (our option). The direction's gradient is taken with
``torch.autograd.grad`` with respect to ``d`` only, so no parameter gradient is accumulated (the
code's ``model.zero_grad()`` after the power iteration has the same net effect).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ...losses import dice_loss_multiclass

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Switch off running-statistics tracking of every BatchNorm that tracks them, restore on exit.

    In train mode such a BatchNorm normalises with the batch statistics and leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` untouched (SS-Net ``_disable_tracking_bn_stats``)."""
    switched = [m for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def l2_normalize_per_sample(d: torch.Tensor) -> torch.Tensor:
    """``d / (‖d_b‖₂ + 1e-8)`` with the norm over every element of each sample b (SS-Net ``_l2_normalize``)."""
    norm = d.flatten(1).norm(dim=1).reshape(-1, *([1] * (d.dim() - 1)))
    return d / (norm + 1e-8)


def soft_dice_distance(p_hat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """2D distance (SS-Net ``softDiceLoss``): mean over all classes of
    ``1 - (2Σ p̂p + 1e-10)/(Σ p̂² + Σ p² + 1e-10)``, sums over the whole batch, soft target."""
    return dice_loss_multiclass(p_hat, p, smooth=1e-10)


def binary_dice_distance(p_hat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """3D distance (SS-Net ``Binary_dice_loss`` on the full C-channel tensors):
    ``1 - (2Σ p̂p + 1e-8)/(Σ p̂ + Σ p + 1e-8)`` = ``1 - mean_voxels Σ_c p̂_c p_c`` up to the smoothing."""
    return 1 - (2 * (p_hat * p).sum() + 1e-8) / (p_hat.sum() + p.sum() + 1e-8)


DISTANCES: dict[str, Distance] = {"soft_dice": soft_dice_distance, "binary_dice": binary_dice_distance}


def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x).float(), dim=1)


def adversarial_direction(model: nn.Module, x: torch.Tensor, target: torch.Tensor, distance: Distance,
                          xi: float = 10.0, power_iterations: int = 1,
                          d: torch.Tensor | None = None) -> torch.Tensor:
    """The unit (per sample) direction found by ``power_iterations`` power iterations from a random
    ``U(-0.5, 0.5)`` start (or the given ``d``), BN running statistics frozen. Detached."""
    if d is None:
        d = torch.rand(x.shape, device=x.device, dtype=torch.float32).sub_(0.5)
    d = l2_normalize_per_sample(d.float())
    with frozen_bn_stats(model):
        for _ in range(power_iterations):
            d = d.detach().requires_grad_(True)
            dist = distance(_probs(model, x + xi * d.to(x.dtype)), target)
            (grad,) = torch.autograd.grad(dist, d)
            d = l2_normalize_per_sample(grad.detach().float())
    return d.detach()


def vat_loss(model: nn.Module, x: torch.Tensor, distance: Distance, xi: float = 10.0, eps: float = 6.0,
             power_iterations: int = 1, target: torch.Tensor | None = None,
             freeze_target_bn: bool = False) -> torch.Tensor:
    """SS-Net's ``L_lds``: ``D(softmax f(x + ε·d_adv), p)``; differentiable with respect to the model."""
    if target is None:
        with torch.no_grad(), (frozen_bn_stats(model) if freeze_target_bn else contextlib.nullcontext()):
            target = _probs(model, x)
    target = target.detach()
    d = adversarial_direction(model, x, target, distance, xi, power_iterations)
    with frozen_bn_stats(model):
        return distance(_probs(model, x + eps * d.to(x.dtype)), target)
