"""CAML: Correlation-Aware Mutual Learning (Gao et al., MICCAI 2023).

Reference: ``Herschel555/CAML`` (``train_caml.py``, ``CAML3d_v1``); the code's behaviour is the default:

* branch V = the student (V-Net, transposed-conv upsampling; the only part saved for inference);
  branch A = the same network with trilinear upsampling and cross-sample mutual attention (CMA) after
  encoder block four (``parts/cma.py``); both embed with x9 (16 channels);
* per branch a projection head Linear(16,32)-BN-ReLU-Linear(32,32) and a prediction head
  Linear(32,32)-BN-ReLU-Linear(32,32) (the embedding dim is 32: ``--embedding_dim 64`` never reaches
  the network in the reference);
* ``L = 0.5·L_s + λ_c(t)·L_c + λ_o(t)·L_o`` with
  - ``L_s = Dice(p_v[:nl], y) + Dice(p_a[:nl], y)``, binary Dice ``1 − (2Σpy + 1e-8)/(Σp + Σy + 1e-8)``
    on the foreground probability;
  - ``L_c = MSE(p_v, sharpen(p_a)) + MSE(p_a, sharpen(p_v))`` (T = 0.1, all samples, nothing detached);
  - ``L_o`` the omni-correlation consistency against a memory bank of labeled voxels that both branches
    predict correctly (projection heads in eval mode, features detached), 256 features per class,
    unlabeled voxels where the branches agree, top 12,800 per class by V's confidence, projection and
    prediction heads in train mode over *all* agreeing voxels (as coded: the top-12,800 filter comes after
    the heads, so BatchNorm statistics span every agreeing voxel), ``softmax(g Mᵀ / 0.1)`` without L2
    normalisation, cross-entropy with corr_a as the (not detached) target;
  - ``λ_c = 1.0·rampup``, ``λ_o = 0.05·rampup`` with ``sigmoid_rampup((it + 1) // 150, R)`` (the reference
    increments ``iter_num`` before computing the weights); R = 40/20/15 for 4/8/16 labels.
* Differences from the reference: the memory bank lives on the training device (the reference's host
  numpy bank is why its LA runs take 16-24 h; same content and sampling rule); random draws use torch's
  generator instead of Python's ``random``.
* 2D: SemiSeg's own extension (CAML was only run on LA): branch V = the UNet, branch A = the UNet with
  bilinear upsampling and the same CMA after its fourth encoder stage (128 channels, 1/8 resolution);
  its supervised Dice is the 2D lineage's multi-class Dice (MC-Net/SS-Net 2D) by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SemiSegError
from ..losses import dice_loss
from ..ops import argmax
from ..schedules import consistency_weight
from . import register_method
from .base import Method
from .parts.cma import build_auxiliary_branch
from .parts.correlation import LabeledFeatureMemory, correlation_matrix, omni_correlation_loss
from .parts.heads import MLPHead, pixels_to_rows
from .parts.sharpen import mutual_consistency
from .reference import LA_FINAL, Differs, Note, Reference

# the released runs' ramp lengths (R·150 iterations) by label count: 4 → R=40, 8 → R=20, 16 → R=15
RAMP_BY_LABELS = ((4, 6000), (8, 3000), (16, 2250))


def rampup_for_labels(labeled: int) -> int:
    """6000 up to 4 labeled volumes, 3000 up to 8, 2250 beyond (the bracket rule between the three
    published settings is SemiSeg's choice)."""
    for n, ramp in RAMP_BY_LABELS:
        if labeled <= n:
            return ramp
    return RAMP_BY_LABELS[-1][1]


@dataclass
class Options:
    sup_weight: float = field(default=0.5, metadata={"help": "weight of the supervised Dice of both branches (reference --lamda 0.5)"})
    consistency: float = field(default=1.0, metadata={"help": "maximum λ_c of the sharpened mutual consistency"})
    consistency_o: float = field(default=0.05, metadata={"help": "maximum λ_o of the omni-correlation consistency"})
    rampup_iterations: int = field(default=0, metadata={
        "help": "sigmoid ramp-up length in iterations for λ_c and λ_o (weight·sigmoid_rampup((it+1)//150, R)); "
                "0 = by label count as the released runs: 6000 (R=40) for 4 labeled, 3000 (R=20) for 8, "
                "2250 (R=15) for 16 (reference CLI default R=40)"})
    temperature: float = field(default=0.1, metadata={"help": "sharpening temperature T of the mutual consistency"})
    memory_per_class: int = field(default=256, metadata={"help": "memory features sampled per class each iteration (classes with fewer stored are skipped)"})
    num_filtered: int = field(default=12800, metadata={"help": "most confident agreeing unlabeled voxels kept per class for the correlation"})
    correlation_temperature: float = field(default=0.1, metadata={"help": "temperature of the correlation softmax (no L2 normalisation, as coded)"})
    embedding_dim: int = field(default=32, metadata={"help": "projection/prediction head width (code: 32; the paper's CLI 64 is never passed to the network)"})
    cma: str = field(default="intra+inter", metadata={
        "help": "cross-sample mutual attention in branch A: intra+inter (code, cma_type v2+), inter, intra, none (ablations)",
        "choices": ["intra+inter", "inter", "intra", "none"]})
    cma_dropout: float = field(default=0.5, metadata={"help": "dropout of the CMA transformer layers (code 0.5)"})
    dice: str = field(default="auto", metadata={
        "help": "supervised Dice (Dice only, as coded): binary = 1 − (2Σpy + 1e-8)/(Σp + Σy + 1e-8) on the foreground "
                "(CAML/SS-Net 3D; averaged over foreground classes if more), multiclass = SSL4MIS Dice over all classes "
                "(MC-Net/SS-Net 2D); auto = binary in 3D, multiclass in 2D (SemiSeg's 2D extension)",
        "choices": ["auto", "binary", "multiclass"]})
    memory_rows: str = field(default="as_coded", metadata={
        "help": "how branch A's labeled embeddings become memory rows: as_coded = the reference's "
                "view(-1, 16) of the channel-first tensor (train_caml.py permutes only branch V's), so each row of "
                "the A half is 16 consecutive values along the last spatial axis of one channel; it produced the "
                "published numbers. per_voxel = the 16 channels of each voxel (the evident intent)",
        "choices": ["as_coded", "per_voxel"]})
    aux_upsampling: str = field(default="auto", metadata={
        "help": "branch A upsampling: auto = trilinear (V-Net, as coded) / bilinear (UNet, SemiSeg's 2D extension)",
        "choices": ["auto", "trilinear", "bilinear", "transpose"]})


PRESETS = {
    "phantom": {"rampup_iterations": 60},
}


REFERENCE = Reference(
    paper="Gao et al., MICCAI 2023, arXiv 2307.06312",
    code="Herschel555/CAML code/train_caml.py, code/networks/VNet.py, code/utils/feature_memory.py, code/test_3d.py",
    runs={"la": {"iterations": 15000, "lr_schedule": "constant", "lr": 0.01, "labeled_batch": 2, "unlabeled_batch": 2,
                 "memory_rows": "as_coded", "embedding_dim": 32, "memory_per_class": 256, "num_filtered": 12800,
                 "seed": 3407}},
    protocol={"la": LA_FINAL},
    differs={"la:seed": Differs(1337, "the lineage's seed and the script's default (the released runs used 3407)")},
    notes=(Note("memory bank on the training device (host numpy arrays in the reference)",
                "speed (the reference's LA runs take 16-24 h); same content and sampling rule"),
           Note("2D (UNet) variant", "CAML was run on LA only: SemiSeg's extension")))


@register_method("caml")
class CAML(Method):
    description = ("CAML (MICCAI 2023): V-Net + auxiliary V-Net with cross-sample mutual attention, sharpened "
                   "mutual consistency and omni-correlation consistency on a labeled-voxel memory; inference "
                   "= branch V (a plain V-Net). The memory bank lives on the training device (the reference's is on "
                   "the host: same semantics). The 2D UNet variant is SemiSeg's own extension.")
    # two networks' passes plus the cross-sample attention: `semiseg bench`, ACDC 128x128 4+4, bf16, 2 CPU threads:
    # 0.495 s/it against Mean Teacher's 0.141 (3.5); on LA (112x112x80, 2+2) 8.27 s/it against 2.35
    step_cost = 12.0
    Options = Options
    option_presets = PRESETS
    reference = REFERENCE
    recipe = {"la": {"lr_schedule": "constant", "lr": 0.01, "iterations": 15000, "labeled_batch": 2,
                     "unlabeled_batch": 2},
              # 2D extension: branch V keeps MC-Net's first 2D decoder (transposed convolutions,
              # ``ycwu1997/MC-Net`` ``code/networks/unet.py``) so the two branches differ as in 3D
              **{p: {"upsampling": "transpose"} for p in ("acdc", "phantom", "generic2d")}}

    @classmethod
    def configure_options(cls, options: dict, cfg) -> dict:
        if not options.get("rampup_iterations"):
            options["rampup_iterations"] = rampup_for_labels(cfg.labeled or 4)
        return options

    def __init__(self, student, options: Options, ctx):
        super().__init__(student, options, ctx)
        o = options
        cfg = getattr(student, "config", {})
        if cfg.get("name") not in ("vnet", "unet"):
            raise SemiSegError(f"caml needs the vnet (3D) or unet (2D) network, not '{cfg.get('name')}'")
        up = o.aux_upsampling
        if up == "auto":
            up = "trilinear" if cfg["name"] == "vnet" else "bilinear"
        if cfg["name"] == "unet" and up == "trilinear":
            up = "bilinear"
        if cfg["name"] == "vnet" and up == "bilinear":
            up = "trilinear"
        self.branch_a = build_auxiliary_branch(student, up, o.cma, o.cma_dropout)
        emb = int(cfg["n_filters"]) if cfg["name"] == "vnet" else int(cfg["channels"][0])
        d = o.embedding_dim
        self.proj_v, self.pred_v = MLPHead(emb, d, d), MLPHead(d, d, d)
        self.proj_a, self.pred_a = MLPHead(emb, d, d), MLPHead(d, d, d)
        self.memory = LabeledFeatureMemory(ctx.num_classes)
        self.ramp = o.rampup_iterations or RAMP_BY_LABELS[0][1]

    # ---------------------------------------------------------------------------------------------
    def weights(self, step: int) -> tuple[float, float]:
        """(λ_c, λ_o) at 0-based ``step``: the reference computes them after ``iter_num += 1``."""
        o = self.options
        return (consistency_weight(step + 1, o.consistency, self.ramp),
                consistency_weight(step + 1, o.consistency_o, self.ramp))

    @classmethod
    def baseline_supervised_loss(cls, options: dict, dim: int) -> dict:
        kind = options.get("dice", "auto")
        return {"sup_loss": "dice", "dice": ("binary" if dim == 3 else "multiclass") if kind == "auto" else kind}

    def supervised(self, probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Binary Dice on the foreground (SS-Net/CAML ``Binary_dice_loss``: non-squared, smooth 1e-8), or
        the SSL4MIS multi-class Dice of the 2D lineage (MC-Net/SS-Net 2D) for the 2D extension."""
        kind = self.options.dice
        if kind == "auto":
            kind = "binary" if self.ctx.dim == 3 else "multiclass"
        return dice_loss(probs, label, kind)

    def memory_rows_a(self, emb: torch.Tensor) -> torch.Tensor:
        """Branch A's (1, C, *S) labeled embedding as (prod(S), C) rows, matched to voxels in order."""
        if self.options.memory_rows == "as_coded":
            return emb.reshape(-1, emb.shape[1])  # channel-first memory read C values at a time
        return pixels_to_rows(emb)

    @torch.no_grad()
    def update_memory(self, emb_v, emb_a, p_v, p_a, label, indices) -> torch.Tensor:
        """Store ½[proj_v(e_v) + proj_a(e_a)] (heads in eval mode) of the voxels both branches predict
        correctly (background included) for each labeled sample; returns the correctness mask."""
        correct = (argmax(p_v, 1) == label) & (argmax(p_a, 1) == label)
        heads = (self.proj_v, self.proj_a)
        modes = [h.training for h in heads]
        for h in heads:
            h.eval()
        feats, labels = [], []
        for i in range(label.shape[0]):
            m = correct[i].flatten()
            zv = self.proj_v(pixels_to_rows(emb_v[i:i + 1])[m].float())
            za = self.proj_a(self.memory_rows_a(emb_a[i:i + 1])[m].float())
            feats.append((zv + za) / 2)
            labels.append(label[i].flatten()[m])
        for h, was in zip(heads, modes):
            h.train(was)
        self.memory.update(feats, labels, indices)
        return correct

    def occ(self, emb_v, emb_a, p_v, p_a) -> torch.Tensor | None:
        """Omni-correlation consistency on the unlabeled voxels where both branches agree."""
        conf, lab_v = p_v.max(1)
        keep = (lab_v == argmax(p_a, 1)).flatten()
        if int(keep.sum()) < 2:  # train-mode BatchNorm needs two rows
            return None
        memory = self.memory.sample(self.options.memory_per_class)
        if all(m is None for m in memory):
            return None
        g_v = self.pred_v(self.proj_v(pixels_to_rows(emb_v)[keep]))
        g_a = self.pred_a(self.proj_a(pixels_to_rows(emb_a)[keep]))
        conf, lab = conf.flatten()[keep], lab_v.flatten()[keep]
        o, c = self.options, self.ctx.num_classes
        corr_v = correlation_matrix(g_v, conf, lab, memory, c, o.correlation_temperature, o.num_filtered)
        corr_a = correlation_matrix(g_a, conf, lab, memory, c, o.correlation_temperature, o.num_filtered)
        if corr_v is None or corr_a is None:
            return None
        return omni_correlation_loss(corr_a, corr_v)

    def losses(self, batch, step):
        o = self.options
        nl = batch.n_labeled
        x = batch.image
        logits_v, feats_v = self.student(x, return_features=True)
        logits_a, feats_a = self.branch_a(x, return_features=True)
        emb_v, emb_a = feats_v.embedding, feats_a.embedding
        p_v, p_a = torch.softmax(logits_v.float(), 1), torch.softmax(logits_a.float(), 1)
        y = batch.labeled_label
        sup = self.supervised(p_v[:nl], y) + self.supervised(p_a[:nl], y)
        cons = mutual_consistency(p_v, p_a, o.temperature)
        indices = batch.labeled_index.tolist() if batch.labeled_index is not None else list(range(nl))
        self.update_memory(emb_v[:nl], emb_a[:nl], p_v[:nl], p_a[:nl], y, indices)
        occ = self.occ(emb_v[nl:], emb_a[nl:], p_v[nl:], p_a[nl:]) if x.shape[0] > nl else None
        lc, lo = self.weights(step)
        loss = o.sup_weight * sup + lc * cons
        if occ is not None:
            loss = loss + lo * occ
        zero = torch.zeros((), device=x.device)
        return {"loss": loss, "sup": sup.detach(), "consistency": cons.detach(),
                "occ": occ.detach() if occ is not None else zero, "lambda_c": torch.tensor(lc),
                "lambda_o": torch.tensor(lo)}
