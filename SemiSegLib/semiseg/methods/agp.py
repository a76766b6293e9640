"""AGP / AIGCMatch: attention-guided perturbation (Cheng et al., arXiv 2410.12419;
``Boomerangli/AIGC-Match`` ``AIGCmatch.py``, ``model/unet.py``).

UniMatch (``unimatch.py``) with both random perturbations driven by the model's own attention
(``parts/attention.py``):

- AttCutMix: the eval-mode decoder attention of u_w, ``S = norm(A(up4)) + up(norm(A(up1)))`` with a
  min–max over the whole batch, gives ``M_1 = [S > 0.3]`` and ``M_2 = [S > 0.1]``; the strong views of
  the mix batch are pasted into the **weak** view of u inside M_k (the code's direction,
  ``paste_region="high_attention"``); targets ŷ′/c′ inside M_k, ŷ_w/c_w outside. No CutMix box.
- AttFeaPerb: the feature-stream target is the train-mode prediction of u_w with weak noise
  ``E + κ·[A(E) ≤ 0.5]·ε`` on every encoder feature; the perturbed prediction decodes
  ``E + (20 + κ·[A(E) > 0.5])·ε`` (ε ~ N(0, 0.1²), κ = 1 − (1 − it/T)^0.9), decoded together with the
  clean features of cat(x, u_w) as UniMatch does.
- ``L = ½[L_x + ¼L_s1 + ¼L_s2 + ½L_fp]``, τ = 0.9, no ramp-up.

The weak-noise target pass runs in train mode (as the code) but under ``no_grad`` (the code only
detaches its output: same values, less memory). The mix-batch teacher and the attention pass share one
eval-mode forward of cat(u′_w, u_w) (eval-mode BN makes this identical to two passes). The V-Net (3D)
variant is SemiSeg's own extension: attention of the first and last decoder stages, trilinear resize.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import register_method
from .parts.attention import (decoder_attention_score, kappa_schedule, paste_region, strong_feature_noise,
                              threshold_masks, weak_feature_noise)
from .parts.weak_strong import (ConsistencyOptions, StrongAugOptions, WeakStrongMethod, eval_mode, family_reference,
                                pseudo_label)
from .parts.strong_aug import strong_augment
from .unimatch import FeatureStreamOptions


@dataclass
class Options(StrongAugOptions, FeatureStreamOptions, ConsistencyOptions):
    conf_thresh: float = field(default=0.9, metadata={
        "help": "confidence threshold τ (AGP code configs/acdc.yaml: 0.9; the paper's parent UniMatch used 0.95)"})
    threshold_s1: float = field(default=0.3, metadata={
        "help": "attention threshold of the first strong view's mask, M_1 = [S > t] on S ∈ [0, 2] (code 0.3)"})
    threshold_s2: float = field(default=0.1, metadata={
        "help": "attention threshold of the second strong view's mask, M_2 = [S > t] (code 0.1)"})
    paste_region: str = field(default="high_attention", metadata={
        "help": "where the mix image is pasted: high_attention = inside [S > t] (the code), low_attention = "
                "outside (one reading of the paper's prose)", "choices": ["high_attention", "low_attention"]})
    attention_norm: str = field(default="batch", metadata={
        "help": "min–max normalisation of the decoder attention: batch = over the whole batch tensor (code), "
                "image = per image (deviation: masks independent of batch composition)", "choices": ["batch", "image"]})
    mix_base: str = field(default="weak", metadata={
        "help": "image the attention-masked content is pasted into: weak = the weak view of u (AGP code), "
                "strong = a strong view of u (as UniMatch)", "choices": ["weak", "strong"]})
    energy_threshold: float = field(default=0.5, metadata={
        "help": "absolute encoder-energy threshold separating low/high-energy positions, mean_c E² > t (code 0.5)"})
    noise_std: float = field(default=0.1, metadata={"help": "std of the feature noise ε (code 0.1, absolute)"})
    strong_noise_scale: float = field(default=20.0, metadata={
        "help": "strong feature noise multiplier: E + (scale + κ·high)·ε, i.e. std 2.0 everywhere (code 20)"})
    kappa_power: float = field(default=0.9, metadata={"help": "κ = 1 − (1 − it/T)^power (code 0.9)"})


@register_method("agp")
class AGP(WeakStrongMethod):
    description = ("AGP/AIGCMatch: UniMatch with attention-guided perturbations: AttCutMix (decoder-attention "
                   "masks S>0.3, S>0.1) and AttFeaPerb (energy-guided feature noise, κ schedule), τ=0.9. "
                   "3D (V-Net): SemiSeg extension.")
    Options = Options
    reference = family_reference("Cheng et al., arXiv 2410.12419 (AIGCMatch)",
                                 "Boomerangli/AIGC-Match AIGCmatch.py, model/unet.py, configs/acdc.yaml", 0.9)
    strong_views = 2
    feature_stream = True
    # UniMatch's passes plus the attention maps: `semiseg bench`, ACDC 128x128
    # 4+4, bf16, 2 CPU threads: 0.383 s/it against Mean Teacher's 0.134 (3.5)
    step_cost = 10.0

    def kappa(self, step: int) -> float:
        return kappa_schedule(step, self.ctx.iterations, self.options.kappa_power)

    def teacher_pass(self, u_w, mix_w):
        o = self.options
        b = mix_w.shape[0]
        with eval_mode(self.student):
            logits, feats = self.student(torch.cat([mix_w, u_w]), return_features=True)
            label, conf = pseudo_label(logits[:b])
            score = decoder_attention_score(feats.decoder[0][b:], feats.decoder[-1][b:], tuple(u_w.shape[2:]),
                                            o.attention_norm)
        return {"mix_label": label, "mix_conf": conf, "score": score}

    def mix_regions(self, u_w, teacher):
        o = self.options
        masks = threshold_masks(teacher["score"], (o.threshold_s1, o.threshold_s2))
        return [paste_region(m, o.paste_region) for m in masks]

    def mix_bases(self, u_w):
        if self.options.mix_base == "weak":
            return [u_w] * self.strong_views
        return [strong_augment(u_w, self.options.strong_params()) for _ in range(self.strong_views)]

    def main_pass(self, x, u_w, step):
        o = self.options
        k = self.kappa(step)
        with torch.no_grad():  # train mode (dropout, BN batch statistics) as the code; target only
            feats = self.student.encode(u_w)
            target_logits, _ = self.student.decode(
                [weak_feature_noise(f, k, o.noise_std, o.energy_threshold) for f in feats])
        nl = x.shape[0]
        feats = self.student.encode(torch.cat([x, u_w]))
        logits, _ = self.student.decode(
            [torch.cat([f.float(), strong_feature_noise(f, k, o.noise_std, o.strong_noise_scale, o.energy_threshold)])
             for f in feats])
        clean, perturbed = logits.chunk(2)
        return clean[:nl], clean[nl:], perturbed[nl:], pseudo_label(target_logits)

    def extra_terms(self, step):
        return {"kappa": torch.tensor(self.kappa(step))}
