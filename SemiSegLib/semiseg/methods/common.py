"""Pieces shared by several methods."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses import supervised_loss


def teacher_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """Mean Teacher input noise ``clamp(N(0, std²), -clip, clip)`` (SSL4MIS / UA-MT)."""
    return torch.clamp(torch.randn_like(x) * std, -clip, clip)


@dataclass
class SupervisedOptions:
    sup_loss: str = field(default="half_ce_dice", metadata={
        "help": "supervised loss: half_ce_dice = ½(CE+Dice) (SSL4MIS, UA-MT), dice (SS-Net, CAML), ce_plus_dice (ICL)",
        "choices": ["half_ce_dice", "dice", "ce_plus_dice"]})
    dice: str = field(default="auto", metadata={
        "help": "Dice form: multiclass (all classes incl. background, SSL4MIS 2D), foreground (UA-MT 3D), binary "
                "(SS-Net/CAML 3D: non-squared, smooth 1e-8); auto by dimension (multiclass 2D, foreground 3D)",
        "choices": ["auto", "multiclass", "foreground", "binary"]})


def labeled_loss(logits: torch.Tensor, label: torch.Tensor, opts, dim: int) -> torch.Tensor:
    dice = opts.dice if opts.dice != "auto" else ("multiclass" if dim == 2 else "foreground")
    return supervised_loss(logits, label, opts.sup_loss, dice)
