"""LCC: low-confidence consistency and class separation (Gao & Yu, ISBP 2023).

RECONSTRUCTED IMPLEMENTATION: no public code exists. Built from the paper's abstract plus SS-Net,
which the paper reportedly follows; every guessed value is an option ([INF] in the card).

- Mean-teacher framework: EMA teacher (α = 0.99, SSL4MIS formula, updated by the loop after every
  step) sees the unlabeled batch plus ``clamp(N(0, 0.1²), ±0.2)`` noise.
- Low-confidence mask on unlabeled pixels: ``L = [max_k p_t,k < τ]``, τ = 0.9 (guess); or an
  entropy mask with UA-MT's ramped threshold (``--mask entropy``, low confidence = entropy at or
  above ``(base + (1 − base)·ramp(it, max_it))·ln 2``).
- ``L_lcc = Σ L·‖p_s − p_t‖² / (C·Σ L + 1e-8)`` on softmax probabilities, teacher detached.
- SS-Net's class separation (memory of correctly predicted labeled foreground from the student,
  learned selectors, 1 − cos pull): labeled pixels with GT; unlabeled pixels with the teacher's
  argmax, restricted to ``sep_pixels`` = low_conf (abstract's wording, default) | all (SS-Net) |
  high_conf.
- ``L = L_sup + λ(t)·[L_lcc + 0.1·(L_sep_l + L_sep_u)]`` with SS-Net's weights and ramp.
The student is evaluated and saved.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import argmax
from . import register_method
from .common import teacher_noise
from .parts.confidence import confidence_mask, entropy_mask, low_confidence_consistency
from .ss_net import RECIPE as SSNET_RECIPE, RampOptions, SeparationMethod, SSNetSupervisedOptions
from .parts.prototypes import SeparationOptions
from .reference import Note, Reference
from .ua_mt import uncertainty_threshold


@dataclass
class Options(SeparationOptions, RampOptions, SSNetSupervisedOptions):
    tau: float = field(default=0.9, metadata={
        "help": "[reconstruction, guessed] confidence threshold τ: unlabeled pixels with teacher max probability "
                "below τ are 'low confidence' (sweep 0.8/0.9/0.95)"})
    mask: str = field(default="confidence", metadata={
        "help": "[reconstruction] low-confidence criterion: confidence (max prob < τ, the abstract's wording) or "
                "entropy (teacher entropy ≥ UA-MT's ramped threshold, our option)", "choices": ["confidence", "entropy"]})
    entropy_threshold_base: float = field(default=0.75, metadata={
        "help": "[reconstruction] entropy mask threshold start, as a fraction of ln 2 (UA-MT schedule)"})
    sep_pixels: str = field(default="low_conf", metadata={
        "help": "[reconstruction] unlabeled pixels in the separation term: low_conf (abstract's wording), all "
                "(SS-Net), high_conf", "choices": ["low_conf", "all", "high_conf"]})
    pseudo_labels: str = field(default="teacher", metadata={
        "help": "[reconstruction, guessed] unlabeled pseudo-labels for separation: teacher argmax or student argmax",
        "choices": ["teacher", "student"]})
    noise_std: float = field(default=0.1, metadata={"help": "[reconstruction] teacher input noise std (SSL4MIS MT)"})
    noise_clip: float = field(default=0.2, metadata={"help": "[reconstruction] teacher input noise clamp (SSL4MIS MT)"})


_LA = {"consistency": 1.0, "rampup_iterations": 6000}
_PHANTOM = {"consistency": 0.1, "rampup_iterations": 300}
PRESETS = {"acdc": {}, "2d": {}, "la": _LA, "3d": _LA, "phantom": _PHANTOM}


REFERENCE = Reference(
    paper="Gao & Yu, ISBP 2023, DOI 10.1109/ISBP57705.2023.10061306 (abstract only)",
    code="none public; reconstructed on SS-Net's code (ycwu1997/SS-Net)",
    runs={"2d": {"upsampling": "bilinear"}},
    notes=(Note("the whole method: thresholds, pixel subsets and weights are inferred from the abstract and SS-Net",
                "no code or full text was available"),))


@register_method("lcc")
class LCC(SeparationMethod):
    description = ("LCC (Gao & Yu, ISBP 2023), RECONSTRUCTED implementation (no public code; from the abstract + "
                   "SS-Net): mean-teacher consistency and prototype class separation on low-confidence pixels only.")
    Options = Options
    option_presets = PRESETS
    reference = REFERENCE
    recipe = SSNET_RECIPE  # [INF] the SS-Net training recipe for both datasets
    uses_teacher = True
    # `semiseg bench`, ACDC 128x128 4+4, bf16, 2 CPU threads: 0.276 s/it against Mean Teacher's 0.141 (3.5)
    step_cost = 7.0

    def low_confidence(self, teacher_probs: torch.Tensor, step: int) -> torch.Tensor:
        """(B, 1, *S) float mask, 1 = low confidence (takes part)."""
        o = self.options
        if o.mask == "confidence":
            return confidence_mask(teacher_probs, o.tau)
        if o.mask == "entropy":
            return entropy_mask(teacher_probs, uncertainty_threshold(step, self.ctx.iterations, o.entropy_threshold_base))
        raise ValueError(f"unknown low-confidence mask '{o.mask}' (confidence, entropy)")

    def unlabeled_terms(self, logits_u: torch.Tensor, embedding_u: torch.Tensor, teacher_probs: torch.Tensor,
                        step: int) -> dict[str, torch.Tensor]:
        """Consistency and separation on the unlabeled part, given the teacher's probabilities."""
        o = self.options
        low = self.low_confidence(teacher_probs, step)
        student_probs = torch.softmax(logits_u.float(), 1)
        cons = low_confidence_consistency(student_probs, teacher_probs, low)
        source = teacher_probs if o.pseudo_labels == "teacher" else student_probs.detach()
        pseudo = argmax(source, 1)
        keep = {"low_conf": low[:, 0] > 0, "high_conf": low[:, 0] == 0, "all": None}[o.sep_pixels]
        sep_u = self.separation.term(embedding_u, pseudo, keep)
        return {"consistency": cons, "sep_u": sep_u, "low_conf_fraction": low.mean().detach()}

    def losses(self, batch, step):
        o = self.options
        x = batch.image
        nl = batch.n_labeled
        logits, feats = self.student(x, return_features=True)
        emb = feats.embedding
        self.separation.check(emb)
        label = batch.labeled_label
        sup = self.supervised(logits[:nl], label)
        with torch.no_grad():
            pred_l = argmax(logits[:nl], 1)
            u = batch.unlabeled_image
            teacher_probs = torch.softmax(self.teacher(u + teacher_noise(u, o.noise_std, o.noise_clip)).float(), 1)
        n_mem = self.separation.update_memory(emb[:nl], pred_l, label)
        sep_l = self.separation.term(emb[:nl], label)
        un = self.unlabeled_terms(logits[nl:], emb[nl:], teacher_probs, step)
        w = self.weight(step)
        loss = sup + w * (un["consistency"] + o.sep_weight * (sep_l + un["sep_u"]))
        return {"loss": loss, "sup": sup.detach(), "consistency": un["consistency"].detach(),
                "sep_l": sep_l.detach(), "sep_u": un["sep_u"].detach(), "consistency_weight": torch.tensor(w),
                "low_conf_fraction": un["low_conf_fraction"], "memory_candidates": torch.tensor(float(n_mem))}
