"""FixMatch in UniMatch's medical setting (``LiheYoung/UniMatch`` ``more-scenarios/medical``): one strong view per unlabeled image with a
CutMix box pasted from a strong view of the mix batch, no feature stream: ``L = ½(L_x + L_s)``.

The shared core is ``parts/weak_strong.py``. The "FixMatch" rows of the UniMatch/AGP tables come from
UniMatch's ablation setup; this composition (one view, weight 1, τ = 0.95) is inferred from it
[inferred from the UniMatch ablations]. The V-Net (3D) variant is SemiSeg's own extension. Off the ACDC recipe the labeled,
weak and strong images go through one train-mode pass (``joint_forward``, FixMatch's own code): with UniMatch's
separate strong pass, BatchNorm let FixMatch collapse toward background on the phantom.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import register_method
from .reference import Note
from .parts.weak_strong import (NON_REFERENCE_DATA, family_reference, ConsistencyOptions, CutMixOptions, StrongAugOptions,
                                WeakStrongMethod)


@dataclass
class Options(CutMixOptions, StrongAugOptions, ConsistencyOptions):
    conf_thresh: float = field(default=0.95, metadata={
        "help": "confidence threshold τ: pseudo-labeled pixels below it are ignored (UniMatch's FixMatch 0.95)"})
    weight_strong: float = field(default=1.0, metadata={
        "help": "weight of the strong-view loss in L = ½(L_x + w_s·L_s) (1, inferred from UniMatch's ablation)"})
    joint_forward: bool = field(default=False, metadata={
        "help": "one train-mode forward of cat(labeled, weak, strong), so BatchNorm normalises every stream with "
                "the same batch statistics, as FixMatch's own code does. Off for the ACDC recipe (UniMatch's code: "
                "the strong view in a pass of its own), on for every other preset: there, with one labeled "
                "phantom volume, the separate pass let FixMatch drift to predicting background (validation Dice "
                "0.78 and 0.35 after 1600 iterations, seeds 1337 and 1) and the joint pass did not"})


@register_method("fixmatch")
class FixMatch(WeakStrongMethod):
    description = ("FixMatch (UniMatch medical setting): weak-view pseudo-labels (τ=0.95) supervise one strong "
                   "view (colour jitter, blur, CutMix from a mix batch); masked Dice. 3D: SemiSeg extension.")
    Options = Options
    reference = family_reference(
        "Sohn et al., NeurIPS 2020, in the medical setting of UniMatch (Yang et al., CVPR 2023)",
        "LiheYoung/UniMatch more-scenarios/medical (FixMatch = one strong view, no feature stream, as in its "
        "ablations), model/unet.py, configs/acdc.yaml", 0.95, joint_forward=False,
        extra_notes=(Note("off the ACDC data: one BatchNorm batch for labeled, weak and strong views (joint_forward)",
                          "measured on the phantom: the separate strong pass collapsed (BatchNorm statistics); "
                          "FixMatch's own code runs one batch", "--no-joint-forward"),))
    option_presets = {preset: dict(values, joint_forward=True) for preset, values in NON_REFERENCE_DATA.items()}
    # weak pass, one strong pass and the mix batch's forward: `semiseg bench`, ACDC 128x128
    # 4+4, bf16, 2 CPU threads: 0.207 s/it against Mean Teacher's 0.134 (3.5)
    step_cost = 5.5
    strong_views = 1
    feature_stream = False

    def train_passes(self, x, u_w, strong, step):
        if not self.options.joint_forward:
            return super().train_passes(x, u_w, strong, step)
        nl, nu = x.shape[0], u_w.shape[0]
        logits = self.student(torch.cat([x, u_w, *strong]))
        return logits[:nl], logits[nl:nl + nu], None, None, logits[nl + nu:].chunk(len(strong))
