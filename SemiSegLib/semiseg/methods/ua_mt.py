"""UA-MT, uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019; ``yulequan/UA-MT``).

The teacher's epistemic uncertainty from T stochastic passes (dropout on, fresh input noise each,
run as T/2 passes of the doubled batch as in the code; ``mc_copies_per_pass 0``: all T in one pass)
masks the consistency to voxels with entropy below
``H(t) = (0.75 + 0.25·sigmoid_rampup(it, max_it))·ln 2``; consistency = Σ m·(s − t)² / (2·Σ m + 1e-16).
The ln 2 and the "2" are kept for every class count, as in the code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..schedules import sigmoid_rampup
from . import register_method
from .mean_teacher import PRESETS as MT_PRESETS, MeanTeacher, Options as MTOptions
from .common import labeled_loss, teacher_noise
from .reference import ACDC_VAL, LA_FINAL, Differs, Reference


@dataclass
class Options(MTOptions):
    consistency_delay: int = field(default=0, metadata={
        "help": "consistency forced to 0 before this iteration (UA-MT has none, in 2D and 3D; its Mean Teacher "
                "sibling in SSL4MIS 2D waits 1000)"})
    mc_passes: int = field(default=8, metadata={"help": "T, stochastic teacher passes for the uncertainty (even)"})
    threshold_base: float = field(default=0.75, metadata={"help": "uncertainty threshold start, as a fraction of ln 2"})
    mc_copies_per_pass: int = field(default=2, metadata={
        "help": "unlabeled-batch copies per teacher forward: 2 = the code's T/2 passes of the doubled batch; 0 = all "
                "T in one forward (ours: same dropout and noise draws per copy, BatchNorm's batch statistics pool T "
                "noisy copies instead of 2; ACDC 12+12 on one CPU thread: 3-20 percent less CPU time per iteration, "
                "1.6-2 GB more peak memory)"})


def uncertainty_threshold(step: int, iterations: int, base: float = 0.75) -> float:
    return (base + (1 - base) * sigmoid_rampup(step, iterations)) * math.log(2)


def masked_consistency(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UA-MT: ``Σ m·(s − t)² / (2·Σ m + 1e-16)`` with m (B, 1, *S) broadcast over channels."""
    dist = (student_probs - teacher_probs) ** 2
    return (mask * dist).sum() / (2 * mask.sum() + 1e-16)


def predictive_entropy(probs_t: torch.Tensor) -> torch.Tensor:
    """(T, B, C, *S) softmax samples -> (B, 1, *S) entropy of the mean, ``-Σ p̄ log(p̄ + 1e-6)``."""
    mean = probs_t.mean(0)
    return -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)


# Mean Teacher's presets without its 2D delay; LA: UA-MT's 6000-iteration run (the threshold ramp spans the run)
PRESETS = {p: {**v, "consistency_delay": 0} for p, v in MT_PRESETS.items()}
RECIPE = {"la": {"iterations": 6000, "lr_schedule": "step"}}
REFERENCE = Reference(
    paper="Yu et al., MICCAI 2019",
    code="yulequan/UA-MT code/train_LA_meanteacher_certainty_unlabel.py (LA); HiLab-git/SSL4MIS "
         "code/train_uncertainty_aware_mean_teacher_2D.py (2D)",
    runs={"2d": {"upsampling": "bilinear", "consistency_delay": 0, "mc_copies_per_pass": 2},
          "acdc": {"iterations": 30000, "rampup_iterations": 30000, "labeled_batch": 12, "unlabeled_batch": 12},
          "la": {"iterations": 6000, "rampup_iterations": 6000, "lr_schedule": "step", "consistency_delay": 0,
                 "labeled_batch": 2, "unlabeled_batch": 2, "mc_copies_per_pass": 2}},
    protocol={"acdc": ACDC_VAL, "la": LA_FINAL})


@register_method("ua_mt")
class UAMT(MeanTeacher):
    description = "UA-MT: Mean Teacher with consistency only where the teacher's MC-dropout entropy is low."
    step_cost = 7.5  # Mean Teacher + T = 8 teacher forwards of the unlabeled half
    Options = Options
    option_presets = PRESETS
    recipe = RECIPE
    reference = REFERENCE

    def mc_probs(self, u: torch.Tensor) -> torch.Tensor:
        """(T, B, C, *S) teacher softmax samples, each copy of ``u`` with its own noise and dropout masks,
        ``mc_copies_per_pass`` copies per forward (fewer, larger passes cost less per image on a CPU)."""
        o = self.options
        per_pass = max(o.mc_copies_per_pass, 0) or o.mc_passes
        outs = []
        with torch.no_grad():
            for first in range(0, o.mc_passes, per_pass):
                copies = u.repeat(min(per_pass, o.mc_passes - first), *([1] * (u.dim() - 1)))
                outs.append(torch.softmax(self.teacher(copies + teacher_noise(copies, o.noise_std, o.noise_clip)).float(), 1))
        b = u.shape[0]
        return torch.cat(outs).reshape(o.mc_passes, b, *outs[0].shape[1:])

    def losses(self, batch, step):
        o = self.options
        logits = self.student(batch.image)
        nl = batch.n_labeled
        sup = labeled_loss(logits[:nl], batch.labeled_label, o, self.ctx.dim)
        u = batch.unlabeled_image
        target = self.teacher_probs(u)
        uncertainty = predictive_entropy(self.mc_probs(u))
        mask = (uncertainty < uncertainty_threshold(step, self.ctx.iterations, o.threshold_base)).float()
        cons = masked_consistency(torch.softmax(logits[nl:].float(), 1), target, mask)
        w = self.weight(step)
        return {"loss": sup + w * cons, "sup": sup.detach(), "consistency": cons.detach(),
                "consistency_weight": torch.tensor(w), "certain_fraction": mask.mean().detach()}
