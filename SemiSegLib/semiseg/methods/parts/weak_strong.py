"""The weak-to-strong consistency core shared by FixMatch, UniMatch and AGP (UniMatch ``unimatch.py``, AIGC-Match ``AIGCmatch.py``).

One network is its own teacher (no EMA). Per step, with a labeled batch (x, y), an unlabeled batch
u and an independent unlabeled "mix" batch u′ (``extra_unlabeled_streams = 1``), all already through
the loop's weak ``RandomGenerator`` augmentation:

1. eval mode, no grad: ``q′ = f(u′_w)`` → pseudo-label ŷ′ = argmax, confidence c′ = max softmax;
2. strong views of u′ (colour jitter + blur, ``parts/strong_aug``) are pasted into a base image inside
   a per-image region M_k (a random CutMix box for FixMatch/UniMatch, an attention mask for AGP);
3. train mode: ``f(cat(x, u_w))`` gives the labeled and the weak predictions (and, for UniMatch/AGP,
   a feature-perturbed prediction decoded from the same encoder pass); ``f(cat(x_s1, x_s2))`` the
   strong ones (FixMatch's ``--joint-forward``: one pass over all of them);
4. targets: ŷ_w = argmax p_uw (detached) outside M_k and ŷ′ inside, with their confidences;
5. ``L = ½ [L_x + w_s·Σ_k L_sk + w_fp·L_fp]``, ``L_x = ½(CE + Dice)``, ``L_sk``/``L_fp`` the masked
   multi-class Dice ignoring every pixel whose confidence is below τ (``masked_dice``).

The recipe of this family (UniMatch ``configs/acdc.yaml``; ``FAMILY_RECIPE``): 12 labeled + 12
unlabeled + 12 mix per step, SGD lr 0.01 poly 0.9, the UniMatch UNet (bilinear upsampling, the
network's default: ``more-scenarios/medical/model/unet.py``), bilinear image resize and bilinear logit upsampling at inference, and the reference's
epoch-based length: 300 epochs of ⌊#unlabeled slices / 12⌋ iterations. SemiSeg trains on iterations, so
the ACDC recipe sets ``iterations = 300 × 98 = 29400`` for the preset's 7 labeled cases (1176 unlabeled
slices); with ``--labeled 3`` use ``--iterations 30900`` (1244 → 103 per epoch) and with ``--labeled 1``
``--iterations 31800`` (1280 → 106). The 3D variant on the V-Net (LA preset) is SemiSeg's own
extension: no paper runs this family in 3D.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...presets import PRESETS
from ...losses import dice_loss_multiclass
from ..base import Method
from ..common import SupervisedOptions, labeled_loss
from ..reference import HONEST, VAL_TEST, Differs, Note, Reference
from .attention import mix_images
from .strong_aug import StrongAugParams, cutmix_box, quantize_unit, strong_augment

# 300 epochs x floor(#unlabeled / 12) iterations (UniMatch/AGP), for the ACDC preset's 7 labeled cases
ACDC_EPOCHS = 300
ACDC_ITERATIONS = {1: 300 * (1280 // 12), 3: 300 * (1244 // 12), 7: 300 * (1176 // 12)}

FAMILY_RECIPE: dict[str, dict] = {
    "acdc": dict(resize="bilinear", labeled_batch=12, unlabeled_batch=12,
                 iterations=ACDC_ITERATIONS[7], lr=0.01, lr_schedule="poly"),
    "phantom": dict(resize="bilinear"),
    "generic2d": dict(resize="bilinear"),
}

# The reference's ``(img·255).astype(uint8)`` round trip of unlabeled images belongs to its [0, 1] ACDC files.
# On z-scored data it would be a per-image 256-level quantisation that labeled and validation images never
# get. Measured on the phantom (FixMatch, 1 labeled volume, seed 1337, 1600 it): with it the model came to
# predict background on the unlabeled images and ended at 0.20 validation Dice; without it, 0.78.
NON_REFERENCE_DATA: dict[str, dict] = {p: {"quantize": False} for p in PRESETS if p != "acdc"}


def family_reference(paper: str, code: str, conf_thresh: float, extra_notes: tuple = (), **acdc_options) -> Reference:
    """The reference record of FixMatch, UniMatch and AGP (one ACDC recipe and protocol, UniMatch's lineage)."""
    return Reference(
        paper=paper, code=code,
        runs={"2d": {"upsampling": "bilinear", "resize": "bilinear"},
              "acdc": dict(labeled_batch=12, unlabeled_batch=12, iterations=ACDC_ITERATIONS[7], lr=0.01,
                           lr_schedule="poly", quantize=True, conf_thresh=conf_thresh, **acdc_options)},
        protocol={"acdc": {"selection": "test", "val_every": ACDC_ITERATIONS[7] // ACDC_EPOCHS}},
        differs={"acdc:selection": Differs("val", HONEST),
                 "acdc:val_every": Differs(200, "the lineage's 200-iteration cadence on every ACDC run; the reference "
                                                "evaluates once per epoch (98 iterations at 7 labeled cases)")},
        notes=(VAL_TEST,
               Note("off the ACDC data: no uint8 quantisation of unlabeled images",
                    "measured on the phantom: with it FixMatch ended at 0.20 validation Dice, without 0.78",
                    "--quantize")) + extra_notes)


def masked_dice(probs: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """UniMatch's ``DiceLoss(..., ignore=(conf < τ))``: multi-class squared Dice (all classes, sums over
    the batch, smooth 1e-5) whose sums skip every pixel with confidence below τ. Such pixels contribute
    exactly zero to the loss and to its gradient."""
    return dice_loss_multiclass(probs, target, ignore=confidence < threshold)


def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, max softmax) of detached logits, in float32."""
    conf, label = torch.softmax(logits.detach().float(), 1).max(1)
    return label, conf


def mixed_targets(region: torch.Tensor, mix_label: torch.Tensor, mix_conf: torch.Tensor, label: torch.Tensor,
                  conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of a mixed strong view: the mix batch's pseudo-label and confidence inside ``region``,
    the weak view's outside."""
    return torch.where(region, mix_label, label), torch.where(region, mix_conf, conf)


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module):
    """Eval mode (BN running statistics, no dropout) and no grad, restoring the previous mode."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was)


def feature_dropout(features: torch.Tensor, p: float) -> torch.Tensor:
    """UniMatch's ``nn.Dropout2d(0.5)`` on an encoder feature (always active); Dropout3d for 3D features."""
    return (F.dropout2d if features.dim() == 4 else F.dropout3d)(features, p, training=True)


# ------------------------------------------------------------------------------------ options
@dataclass
class StrongAugOptions:
    jitter_p: float = field(default=0.8, metadata={
        "help": "probability of ColorJitter(brightness, contrast, saturation 0.5, hue 0.25) per strong view "
                "(UniMatch); on grey images saturation and hue are identities, as in PIL/torchvision"})
    brightness: float = field(default=0.5, metadata={"help": "ColorJitter brightness: factor ~ U(1 − b, 1 + b)"})
    contrast: float = field(default=0.5, metadata={"help": "ColorJitter contrast: factor ~ U(1 − c, 1 + c), around the mean grey level"})
    blur_p: float = field(default=0.5, metadata={"help": "probability of a Gaussian blur per strong view (UniMatch)"})
    blur_sigma_min: float = field(default=0.1, metadata={"help": "blur σ lower bound in pixels (σ ~ U(min, max))"})
    blur_sigma_max: float = field(default=2.0, metadata={"help": "blur σ upper bound in pixels"})
    intensity_range: str = field(default="auto", metadata={
        "help": "range mapped to 256 grey levels for the strong augmentation: unit = [0, 1] as UniMatch's ×255 "
                "(ACDC files), per_image = each image's min–max (SemiSeg's own, for z-scored data), "
                "auto = unit when the batch lies in [0, 1], else per_image",
        "choices": ["auto", "unit", "per_image"]})
    quantize: bool = field(default=True, metadata={
        "help": "quantise unlabeled views to 256 grey levels as UniMatch's uint8/PIL pipeline does "
                "(weak views included; labeled images are never quantised). On by default for the ACDC recipe "
                "(the reference's [0, 1] files); off for every other preset (phantom, LA, users' scans), where "
                "no uint8 round trip exists and it would set the unlabeled images apart from the labeled ones"})

    def strong_params(self) -> StrongAugParams:
        return StrongAugParams(self.jitter_p, self.brightness, self.contrast, self.blur_p, self.blur_sigma_min,
                               self.blur_sigma_max, self.intensity_range, self.quantize)


@dataclass
class CutMixOptions:
    cutmix_p: float = field(default=0.5, metadata={"help": "probability of a CutMix box per strong view (UniMatch)"})
    cutmix_area_min: float = field(default=0.02, metadata={"help": "CutMix box area, lower bound (fraction of the image)"})
    cutmix_area_max: float = field(default=0.4, metadata={"help": "CutMix box area, upper bound (fraction of the image)"})
    cutmix_ratio_min: float = field(default=0.3, metadata={"help": "CutMix box aspect ratio, lower bound"})
    cutmix_ratio_max: float = field(default=1 / 0.3, metadata={"help": "CutMix box aspect ratio, upper bound (1/0.3)"})


@dataclass
class ConsistencyOptions(SupervisedOptions):
    conf_thresh: float = field(default=0.95, metadata={
        "help": "confidence threshold τ: pseudo-labeled pixels below it are ignored (UniMatch 0.95, AGP 0.9)"})
    weight_strong: float = field(default=0.25, metadata={
        "help": "weight of each strong-view loss inside L = ½[L_x + w_s·Σ L_s + w_fp·L_fp] (UniMatch 0.25 per view)"})


# ------------------------------------------------------------------------------------ the core
class WeakStrongMethod(Method):
    """FixMatch-style single-network weak-to-strong consistency; subclasses choose the perturbations."""

    extra_unlabeled_streams = 1
    recipe = FAMILY_RECIPE
    option_presets = NON_REFERENCE_DATA
    strong_views: ClassVar[int] = 2          # 2 for UniMatch/AGP, 1 for FixMatch
    feature_stream: ClassVar[bool] = True    # UniMatch/AGP's feature-perturbation stream

    # -- hooks -------------------------------------------------------------------------------
    def teacher_pass(self, u_w: torch.Tensor, mix_w: torch.Tensor) -> dict:
        """Eval mode, no grad: pseudo-labels of the mix batch (and whatever the regions need)."""
        with eval_mode(self.student):
            label, conf = pseudo_label(self.student(mix_w))
        return {"mix_label": label, "mix_conf": conf}

    def mix_regions(self, u_w: torch.Tensor, teacher: dict) -> list[torch.Tensor]:
        """(B, *S) bool per strong view: where the mix image is pasted. Default: UniMatch's CutMix box."""
        o = self.options
        return [cutmix_box(u_w.shape[0], tuple(u_w.shape[2:]), o.cutmix_p, o.cutmix_area_min, o.cutmix_area_max,
                           o.cutmix_ratio_min, o.cutmix_ratio_max, device=u_w.device)
                for _ in range(self.strong_views)]

    def mix_bases(self, u_w: torch.Tensor) -> list[torch.Tensor]:
        """The images the mix content is pasted into. Default (UniMatch): strong views of u itself."""
        return [strong_augment(u_w, self.options.strong_params()) for _ in range(self.strong_views)]

    def main_pass(self, x: torch.Tensor, u_w: torch.Tensor, step: int):
        """Train mode on cat(x, u_w): (pred_x, pred_uw, pred_fp or None, fp_target (label, conf) or None).
        Default (UniMatch): one encoder pass, the decoder on cat(E, Dropout2d(0.5)(E)) per level."""
        nl = x.shape[0]
        feats = self.student.encode(torch.cat([x, u_w]))
        if not self.feature_stream:
            logits, _ = self.student.decode(feats)
            return logits[:nl], logits[nl:], None, None
        p = self.options.fp_dropout
        logits, _ = self.student.decode([torch.cat([f, feature_dropout(f, p)]) for f in feats])
        clean, perturbed = logits.chunk(2)
        pred_uw = clean[nl:]
        return clean[:nl], pred_uw, perturbed[nl:], pseudo_label(pred_uw)

    def train_passes(self, x: torch.Tensor, u_w: torch.Tensor, strong: list[torch.Tensor], step: int):
        """Train-mode predictions: (pred_x, pred_uw, pred_fp, fp_target, preds_s). Default (UniMatch's code):
        ``main_pass`` on cat(x, u_w), then the strong views in a pass (and BatchNorm batch) of their own."""
        pred_x, pred_uw, pred_fp, fp_target = self.main_pass(x, u_w, step)
        return pred_x, pred_uw, pred_fp, fp_target, self.student(torch.cat(strong)).chunk(len(strong))

    def extra_terms(self, step: int) -> dict:
        return {}

    # -- the step ----------------------------------------------------------------------------
    def losses(self, batch, step):
        o = self.options
        if not batch.extra_unlabeled:
            raise RuntimeError(f"{self.name} needs the mix stream (extra_unlabeled_streams = 1)")
        x, y = batch.labeled_image, batch.labeled_label
        u_w, mix_w = batch.unlabeled_image, batch.extra_unlabeled[0]
        if o.quantize:
            u_w, mix_w = quantize_unit(u_w, o.intensity_range), quantize_unit(mix_w, o.intensity_range)
        teacher = self.teacher_pass(u_w, mix_w)
        regions = self.mix_regions(u_w, teacher)
        bases = self.mix_bases(u_w)
        strong = [mix_images(base, strong_augment(mix_w, o.strong_params()), region)
                  for base, region in zip(bases, regions)]

        pred_x, pred_uw, pred_fp, fp_target, preds_s = self.train_passes(x, u_w, strong, step)

        label_w, conf_w = pseudo_label(pred_uw)
        sup = labeled_loss(pred_x, y, o, self.ctx.dim)
        loss_s = []
        for pred, region in zip(preds_s, regions):
            target, conf = mixed_targets(region, teacher["mix_label"], teacher["mix_conf"], label_w, conf_w)
            loss_s.append(masked_dice(torch.softmax(pred.float(), 1), target, conf, o.conf_thresh))
        total = sup + o.weight_strong * sum(loss_s)
        terms = {"sup": sup.detach(), "loss_s": (sum(loss_s) / len(loss_s)).detach(),
                 "mask_ratio": (conf_w >= o.conf_thresh).float().mean(),
                 "mix_fraction": torch.stack([r.float().mean() for r in regions]).mean()}
        if pred_fp is not None:
            loss_fp = masked_dice(torch.softmax(pred_fp.float(), 1), fp_target[0], fp_target[1], o.conf_thresh)
            total = total + o.weight_fp * loss_fp
            terms["loss_fp"] = loss_fp.detach()
        terms.update(self.extra_terms(step))
        return {"loss": 0.5 * total, **terms}
