"""Labeled-only baseline (SSL4MIS ``code/train_fully_supervised_2D.py``, UA-MT ``code/train_LA.py``): the recipe with every unlabeled term switched off."""
from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from .base import Method
from .common import SupervisedOptions, labeled_loss
from .reference import ACDC_VAL, LA_FINAL, Differs, Reference

MATCHED = ("SemiSeg's baseline keeps the semi-supervised recipes' labeled batch and budget, so it differs from "
           "them only in the unlabeled terms")
REFERENCE = Reference(
    paper="the labeled-only rows of the lineage's tables (e.g. Wu et al., SS-Net, MICCAI 2022)",
    code="HiLab-git/SSL4MIS code/train_fully_supervised_2D.py (2D); yulequan/UA-MT code/train_LA.py (3D)",
    runs={"2d": {"upsampling": "bilinear"},
          "acdc": {"labeled_batch": 24, "iterations": 30000, "lr_schedule": "poly"},
          "la": {"labeled_batch": 4, "iterations": 6000, "lr_schedule": "step"}},
    protocol={"acdc": ACDC_VAL, "la": LA_FINAL},
    differs={"labeled_batch": Differs(12, MATCHED), "la:labeled_batch": Differs(2, MATCHED),
             "la:iterations": Differs(15000, MATCHED)})


@dataclass
class Options(SupervisedOptions):
    pass


@register_method("supervised")
class Supervised(Method):
    description = "Labeled data only (the SupBaseline rows of the papers): ½(CE + Dice)."
    step_cost = 3.0  # forward + backward
    Options = Options
    uses_unlabeled = False
    reference = REFERENCE

    def losses(self, batch, step):
        logits = self.student(batch.labeled_image)
        sup = labeled_loss(logits, batch.labeled_label, self.options, self.ctx.dim)
        return {"loss": sup, "sup": sup.detach()}
