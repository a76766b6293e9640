"""Labeled-only baseline (METHODS.md §6.1): the recipe with every unlabeled term switched off."""
from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from .base import Method
from .common import SupervisedOptions, labeled_loss


@dataclass
class Options(SupervisedOptions):
    pass


@register_method("supervised")
class Supervised(Method):
    description = "Labeled data only (the SupBaseline rows of the papers): ½(CE + Dice)."
    step_cost = 3.0  # forward + backward
    Options = Options
    uses_unlabeled = False

    def losses(self, batch, step):
        logits = self.student(batch.labeled_image)
        sup = labeled_loss(logits, batch.labeled_label, self.options, self.ctx.dim)
        return {"loss": sup, "sup": sup.detach()}
