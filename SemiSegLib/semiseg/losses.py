"""Loss primitives of the literature (SSL4MIS ``code/utils/losses.py``, SS-Net ``code/utils/losses.py``), written
once and shared by every method."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *S) integer labels -> (B, C, *S) float one-hot."""
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()


def dice_loss_multiclass(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                         ignore: torch.Tensor | None = None) -> torch.Tensor:
    """SSL4MIS ``DiceLoss``: mean over *all* classes (background included) of
    ``1 - (2 Σ p y + s) / (Σ p² + Σ y² + s)``, sums over the whole batch.

    ``target`` is an integer label map (B, *S) or a soft target (B, C, *S).
    ``ignore`` (B, *S), 1 where a pixel is excluded (UniMatch's masked Dice).
    """
    num_classes = probs.shape[1]
    y = target.float() if target.dim() == probs.dim() else one_hot(target, num_classes)
    if ignore is not None:
        keep = (1 - ignore.float()).unsqueeze(1)
        probs, y = probs * keep, y * keep
    dims = [0] + list(range(2, probs.dim()))
    intersect = (probs * y).sum(dims)
    denom = (probs * probs).sum(dims) + (y * y).sum(dims)
    return (1 - (2 * intersect + smooth) / (denom + smooth)).mean()


def dice_loss_foreground(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                         squared: bool = True) -> torch.Tensor:
    """Dice on the foreground channels only, averaged over them (binary case = UA-MT's ``dice_loss``
    with squared denominators; ``squared=False`` is SS-Net/CAML's ``Binary_dice_loss`` with smooth 1e-8)."""
    num_classes = probs.shape[1]
    y = one_hot(target, num_classes)
    losses = []
    for c in range(1, num_classes):
        p, t = probs[:, c], y[:, c]
        if squared:
            denom = (p * p).sum() + (t * t).sum()
        else:
            denom = p.sum() + t.sum()
        losses.append(1 - (2 * (p * t).sum() + smooth) / (denom + smooth))
    return torch.stack(losses).mean()


DICE_SMOOTH = {"multiclass": 1e-5, "foreground": 1e-5, "binary": 1e-8}


def dice_loss(probs: torch.Tensor, label: torch.Tensor, form: str, smooth: float | None = None) -> torch.Tensor:
    """The Dice forms of the lineage: ``multiclass`` (SSL4MIS ``DiceLoss``, all classes, squared),
    ``foreground`` (UA-MT, foreground channels, squared) or ``binary`` (SS-Net/CAML ``Binary_dice_loss``,
    foreground channels, plain sums). ``smooth`` defaults to the form's constant (``DICE_SMOOTH``)."""
    if form not in DICE_SMOOTH:
        raise ValueError(f"unknown Dice form '{form}' (multiclass, foreground, binary)")
    smooth = DICE_SMOOTH[form] if smooth is None else smooth
    if form == "multiclass":
        return dice_loss_multiclass(probs, label, smooth=smooth)
    return dice_loss_foreground(probs, label, smooth=smooth, squared=form == "foreground")


def supervised_loss(logits: torch.Tensor, label: torch.Tensor, kind: str, dice: str = "multiclass",
                    smooth: float | None = None) -> torch.Tensor:
    """The supervised-loss conventions of the literature (½(CE + Dice): SSL4MIS, UA-MT, UniMatch; Dice only:
    SS-Net, MC-Net, CAML; CE + Dice: ICL).

    kind: ``half_ce_dice`` = ½(CE + Dice) (SSL4MIS, UA-MT, UniMatch); ``dice`` = Dice only (SS-Net, CAML);
    ``ce_plus_dice`` = CE + Dice (ICL).  dice: a form of ``dice_loss`` (multiclass, foreground, binary).
    """
    d = dice_loss(torch.softmax(logits.float(), dim=1), label, dice, smooth)
    if kind == "dice":
        return d
    ce = F.cross_entropy(logits.float(), label.long())
    if kind == "half_ce_dice":
        return 0.5 * (ce + d)
    if kind == "ce_plus_dice":
        return ce + d
    raise ValueError(f"unknown supervised loss '{kind}' (half_ce_dice, dice, ce_plus_dice)")
