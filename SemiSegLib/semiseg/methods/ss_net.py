"""SS-Net: exploring smoothness and class separation (Wu et al., MICCAI 2022; ``ycwu1997/SS-Net``).

One network, no teacher. ``L = Dice(labeled) + λ(t)·[L_lds + 0.1·(L_sep_l + L_sep_u)]`` with
``λ(t) = c·sigmoid_rampup(it // 150, R)``:
- ``L_lds``: VAT smoothness on the whole batch (labeled + unlabeled), ``parts/vat.py``;
- ``L_sep_l`` / ``L_sep_u``: pull of every labeled (GT) / unlabeled (argmax pseudo-label) pixel's
  projected+predicted embedding toward the per-class memory of correctly predicted labeled
  foreground features, weighted by learned selectors, ``parts/prototypes.py``.
CE is not in the loss (the code computes it but never adds it); ``--sup-loss`` changes that.

Recipes: ACDC (2D UNet upsampling B ``bilinear``, lr 0.01 constant, c = 0.1, R = 200 → 30000
iterations, ε = 6, 4-class soft-Dice VAT distance) and LA (3D V-Net, step lr, c = 1.0, R = 40 → 6000
iterations, ε = 10, binary-Dice VAT distance); ξ = 10 in both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses import supervised_loss
from ..ops import argmax
from ..schedules import consistency_weight
from . import register_method
from .reference import ACDC_VAL, HONEST, Differs, Reference
from .base import Method
from .parts.prototypes import PrototypeSeparation, SeparationOptions, embedding_channels
from .parts.vat import DISTANCES, vat_loss


@dataclass
class SSNetSupervisedOptions:
    sup_loss: str = field(default="dice", metadata={
        "help": "supervised loss: dice (SS-Net code: CE is computed but not added), half_ce_dice = ½(CE+Dice), "
                "ce_plus_dice", "choices": ["dice", "half_ce_dice", "ce_plus_dice"]})
    dice: str = field(default="auto", metadata={
        "help": "Dice form: multiclass (SS-Net 2D DiceLoss: all classes incl. background, squared denominators, "
                "smooth 1e-10), binary (SS-Net 3D Binary_dice_loss on each foreground channel, plain sums, 1e-8), "
                "foreground (UA-MT squared, 1e-5); auto = multiclass in 2D, binary in 3D",
        "choices": ["auto", "multiclass", "binary", "foreground"]})


def ssnet_supervised_loss(logits: torch.Tensor, label: torch.Tensor, kind: str, dice: str, dim: int) -> torch.Tensor:
    """The SS-Net lineage's supervised loss: ``auto`` Dice is the 2D multi-class form with
    SS-Net's smoothing 1e-10, or the 3D binary form (1e-8)."""
    form = dice if dice != "auto" else ("multiclass" if dim == 2 else "binary")
    return supervised_loss(logits, label, kind, form, smooth=1e-10 if form == "multiclass" else None)


@dataclass
class RampOptions:
    consistency: float = field(default=0.1, metadata={
        "help": "maximum unsupervised weight c in λ(t) = c·sigmoid_rampup(it // 150, R) (SS-Net: ACDC 0.1, LA 1.0)"})
    rampup_iterations: int = field(default=30000, metadata={
        "help": "ramp-up length in iterations, R·150 (SS-Net: ACDC R=200 → 30000, LA R=40 → 6000); capped to the run's "
                "iterations"})


@dataclass
class Options(SeparationOptions, RampOptions, SSNetSupervisedOptions):
    vat_xi: float = field(default=10.0, metadata={"help": "ξ, power-iteration step on the unit direction (SS-Net: 10)"})
    vat_eps: float = field(default=6.0, metadata={
        "help": "ε ('magnitude'), adversarial perturbation norm per sample (SS-Net: ACDC 6, LA 10)"})
    vat_power_iterations: int = field(default=1, metadata={"help": "power iterations (SS-Net: ip = 1)"})
    vat_distance: str = field(default="auto", metadata={
        "help": "VAT distance: soft_dice (2D code: all-class soft Dice), binary_dice (3D code: Binary_dice_loss on "
                "the full C-channel tensors); auto by dimension", "choices": ["auto", "soft_dice", "binary_dice"]})
    vat_freeze_target_bn: bool = field(default=False, metadata={
        "help": "also freeze BN running statistics in the VAT target pass (the code does not: it is a plain "
                "train-mode forward; the perturbed passes are always frozen)"})
    vat_reuse_target: bool = field(default=True, metadata={
        "help": "one forward fewer (ours): the VAT target p is the main forward's detached prediction instead of a "
                "second train-mode forward of the same batch. Same distribution of p (its own dropout masks in the "
                "code, the main pass's here), so the same expected gradient; BatchNorm running statistics get one "
                "update per step instead of two. Not with vat_grad_early or vat_freeze_target_bn"})
    vat_grad_early: bool = field(default=False, metadata={
        "help": "memory saving (ours): run VAT before the main forward and fold its parameter gradient into a "
                "carrier term, so its graph is freed before the main graph exists. Same loss value and gradients "
                "up to rounding; random draws come in another order than the code's"})


_ACDC = {}
_LA = {"consistency": 1.0, "rampup_iterations": 6000, "vat_eps": 10.0}
# the built-in phantom's 600-iteration runs: full weight after 300 iterations (ours)
_PHANTOM = {"consistency": 0.1, "rampup_iterations": 300}
PRESETS = {"acdc": _ACDC, "2d": _ACDC, "la": _LA, "3d": _LA, "phantom": _PHANTOM}
# training recipe (TrainConfig) per preset: SS-Net's 2D UNet (the network's default bilinear upsampling)
# trains with a constant lr (``train_ss_2d.py``), its 3D V-Net with the step schedule (``train_ss_3d.py``)
RECIPE = {"acdc": {"lr_schedule": "constant"},
          "la": {"lr_schedule": "step"}}


REUSE = ("speed: one forward fewer; the VAT target is the main forward's detached prediction (same distribution; "
         "BatchNorm running statistics update once per step instead of twice)")
REFERENCE = Reference(
    paper="Wu et al., MICCAI 2022, arXiv 2203.01324",
    code="ycwu1997/SS-Net code/train_ss_2d.py, code/train_ss_3d.py, code/utils/losses.py, code/test_LA.py",
    runs={"2d": {"upsampling": "bilinear", "vat_reuse_target": False},
          "acdc": {"lr_schedule": "constant", "iterations": 30000, "labeled_batch": 12, "unlabeled_batch": 12,
                   "consistency": 0.1, "rampup_iterations": 30000, "vat_eps": 6.0, "sup_loss": "dice"},
          "la": {"lr_schedule": "step", "iterations": 15000, "labeled_batch": 2, "unlabeled_batch": 2,
                 "consistency": 1.0, "rampup_iterations": 6000, "vat_eps": 10.0, "vat_reuse_target": False}},
    protocol={"acdc": ACDC_VAL,
              "la": {"selection": "test", "val_every": 200, "val_from": 2000, "lcc": True, "empty": "zero"}},
    differs={"vat_reuse_target": Differs(True, REUSE),
             "la:selection": Differs("final", HONEST), "la:val_every": Differs(0, HONEST),
             "la:val_from": Differs(0, HONEST),
             "la:lcc": Differs(False, "SemiSeg reports the network's own output; LCC is a post-processing choice")})


class SeparationMethod(Method):
    """Shared wiring of ss_net and lcc: the separation module, the supervised loss and the ramped weight."""

    def __init__(self, student, options, ctx):
        super().__init__(student, options, ctx)
        self.separation = PrototypeSeparation(ctx.num_classes, embedding_channels(student), options)

    @classmethod
    def baseline_supervised_loss(cls, options: dict, dim: int) -> dict:
        # the same kind and Dice form (the 2D Dice's smoothing, 1e-10 here vs 1e-5, is not carried over)
        form = options.get("dice", "auto")
        return {"sup_loss": options.get("sup_loss", "dice"),
                "dice": ("multiclass" if dim == 2 else "binary") if form == "auto" else form}

    def supervised(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return ssnet_supervised_loss(logits, label, self.options.sup_loss, self.options.dice, self.ctx.dim)

    def weight(self, step: int) -> float:
        o = self.options
        return consistency_weight(step, o.consistency, self.ramp_length(o.rampup_iterations))

    def on_start(self, log) -> None:
        o = self.options
        cap = f"at most {o.sep_max_pixels} pixels per term (sampled, our deviation)" if o.sep_max_pixels else \
            "every pixel (as the code; about 1 KB of activations per pixel, --sep-max-pixels bounds it)"
        log(f"{self.name}: separation terms on {cap}; memory {o.memory_per_class}/class, selection {o.memory_select}")


@register_method("ss_net")
class SSNet(SeparationMethod):
    description = ("SS-Net (MICCAI 2022): VAT smoothness + prototype class separation with a learned-selector "
                   "feature memory; single network, Dice-only supervision (code defaults).")
    # forward + backward, VAT power iteration and perturbed forward + backward: `semiseg bench`, ACDC 128x128
    # 4+4, bf16, 2 CPU threads: 0.396 s/it against Mean Teacher's 0.134 (3.5)
    step_cost = 10.0
    Options = Options
    option_presets = PRESETS
    recipe = RECIPE
    reference = REFERENCE

    def distance(self):
        o = self.options
        name = o.vat_distance if o.vat_distance != "auto" else ("soft_dice" if self.ctx.dim == 2 else "binary_dice")
        return DISTANCES[name]

    def vat_term(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        o = self.options
        return vat_loss(self.student, x, self.distance(), o.vat_xi, o.vat_eps, o.vat_power_iterations,
                        target=target, freeze_target_bn=o.vat_freeze_target_bn)

    def vat_term_early(self, x: torch.Tensor) -> torch.Tensor:
        """``L_lds`` with its graph already consumed: value ``L_lds``, gradient ``∇θ L_lds`` through a carrier
        ``Σ_p <p, g_p> − (same).detach()``, so the loop's backward gives the same parameter gradient."""
        lds = self.vat_term(x)
        params = [p for p in self.student.parameters() if p.requires_grad]
        grads = torch.autograd.grad(lds, params, allow_unused=True)
        carrier = sum((p * g.detach()).sum() for p, g in zip(params, grads) if g is not None)
        return lds.detach() + (carrier - carrier.detach())

    def losses(self, batch, step):
        o = self.options
        x = batch.image
        nl = batch.n_labeled
        lds = self.vat_term_early(x) if o.vat_grad_early else None
        logits, feats = self.student(x, return_features=True)
        emb = feats.embedding
        self.separation.check(emb)
        with torch.no_grad():
            pred = argmax(logits, 1)  # argmax of softmax = argmax of logits
        label = batch.labeled_label
        sup = self.supervised(logits[:nl], label)
        n_mem = self.separation.update_memory(emb[:nl], pred[:nl], label)
        sep_l = self.separation.term(emb[:nl], label)
        sep_u = self.separation.term(emb[nl:], pred[nl:]) if x.shape[0] > nl else sup.new_zeros(())
        if lds is None:
            reuse = o.vat_reuse_target and not o.vat_freeze_target_bn
            lds = self.vat_term(x, torch.softmax(logits.detach().float(), 1) if reuse else None)
        w = self.weight(step)
        loss = sup + w * (lds + o.sep_weight * (sep_l + sep_u))
        return {"loss": loss, "sup": sup.detach(), "lds": lds.detach(), "sep_l": sep_l.detach(),
                "sep_u": sep_u.detach(), "consistency_weight": torch.tensor(w),
                "memory_candidates": torch.tensor(float(n_mem))}
