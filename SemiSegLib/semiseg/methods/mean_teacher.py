"""Mean Teacher (Tarvainen & Valpola 2017) as in SSL4MIS ``code/train_mean_teacher_2D.py``.

``L = sup(labeled) + λ(t)·mean((softmax s_u − softmax t_u)²)``, the EMA teacher seeing the unlabeled
batch plus clamped Gaussian noise; λ(t) = weight·sigmoid_rampup(it // 150, R).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..schedules import consistency_weight
from . import register_method
from .base import Method
from .common import SupervisedOptions, labeled_loss, teacher_noise
from .reference import ACDC_VAL, Note, Reference


@dataclass
class Options(SupervisedOptions):
    consistency: float = field(default=0.1, metadata={"help": "maximum consistency weight λ"})
    rampup_iterations: int = field(default=30000, metadata={
        "help": "sigmoid ramp-up length in iterations (lineage: R·150; ACDC R=200 → 30000, LA R=40 → 6000); capped to the "
                "run's iterations"})
    consistency_delay: int = field(default=1000, metadata={
        "help": "consistency forced to 0 before this iteration (SSL4MIS 2D: 1000; 3D: 0)"})
    noise_std: float = field(default=0.1, metadata={"help": "teacher input noise std"})
    noise_clip: float = field(default=0.2, metadata={"help": "teacher input noise clamp"})


PRESETS = {
    "acdc": {},
    "la": {"rampup_iterations": 6000, "consistency_delay": 0},
    "3d": {"rampup_iterations": 6000, "consistency_delay": 0},
    "phantom": {"rampup_iterations": 200, "consistency_delay": 50},
}


REFERENCE = Reference(
    paper="Tarvainen & Valpola, NeurIPS 2017, as ported by SSL4MIS",
    code="HiLab-git/SSL4MIS code/train_mean_teacher_2D.py, code/networks/unet.py",
    runs={"2d": {"upsampling": "bilinear"},
          "acdc": {"consistency": 0.1, "rampup_iterations": 30000, "consistency_delay": 1000, "iterations": 30000,
                   "labeled_batch": 12, "unlabeled_batch": 12, "lr_schedule": "poly"}},
    protocol={"acdc": ACDC_VAL},
    notes=(Note("3D (LA): UA-MT's recipe without the uncertainty mask", "no plain 3D Mean Teacher script exists "
                "in the LA lineage (yulequan/UA-MT has none)"),))


@register_method("mean_teacher")
class MeanTeacher(Method):
    description = "Mean Teacher: EMA teacher, MSE consistency on noisy unlabeled inputs."
    Options = Options
    option_presets = PRESETS
    reference = REFERENCE
    uses_teacher = True

    def teacher_probs(self, u: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.teacher(u + teacher_noise(u, self.options.noise_std, self.options.noise_clip)).float(), 1)

    def weight(self, step: int) -> float:
        o = self.options
        if step < o.consistency_delay:
            return 0.0
        return consistency_weight(step, o.consistency, self.ramp_length(o.rampup_iterations))

    def losses(self, batch, step):
        logits = self.student(batch.image)
        nl = batch.n_labeled
        sup = labeled_loss(logits[:nl], batch.labeled_label, self.options, self.ctx.dim)
        target = self.teacher_probs(batch.unlabeled_image)
        cons = ((torch.softmax(logits[nl:].float(), 1) - target) ** 2).mean()
        w = self.weight(step)
        return {"loss": sup + w * cons, "sup": sup.detach(), "consistency": cons.detach(),
                "consistency_weight": torch.tensor(w)}
