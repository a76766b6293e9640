"""SS-Net's inter-class separation (SS-Net ``code/utils/feature_memory.py``, from SemiSeg-Contrastive by Alonso et al.): the
projection / prediction / selector heads, the per-class feature memory and the separation loss.
Shared by ``ss_net`` and ``lcc``.

Memory update (every iteration, SS-Net ``feature_memory.py``):
- candidates are labeled pixels predicted correctly *and* as foreground (``pred == gt`` and
  ``pred > 0``), so background is never stored (``memory[0]`` stays empty);
- they are projected with the projection head in eval mode under no_grad;
- per foreground class with candidates: more than ``per_class`` (32) of them are ranked by
  ``σ(selector_c(f))`` and sorted **ascending**, and the first ``per_class`` are kept (``lowest``, the
  code's behaviour despite its "highest" comment; ``highest`` is the evident intent); otherwise all
  are kept. The class's memory is replaced (no momentum). A class with no candidate this iteration
  keeps its previous memory, as in the code (``when_empty="clear"`` empties it instead).

Separation loss for features (after the projection and prediction heads) with labels:
for each class c whose memory has at least 2 entries and that has at least 2 features,
``loss_c = mean_ij w_i v_j (1 − cos(f_i, m_j))`` with ``w_i = σ(sel_c(f_i.detach()))`` rescaled to mean 1;
``L = Σ_c loss_c / C`` (C counts background). Column weights ``v_j``: in the code the memory
selector's weights are permuted to a row before the "rescale to mean 1", so each becomes
``v_j / v_j = 1`` (``memory_weights="code"``: all ones, the memory selectors have no effect);
``memory_weights="rescaled"`` applies ``σ(sel_mem_c(m̂_j))`` rescaled to mean 1, the evident intent.
The loss only pulls features toward their class memory; there is no repulsive term.

The double sum is computed as ``Σ_i w_i (Σ_j v_j − f̂_i·Σ_j v_j m̂_j) / (M·N)``, equal to the code's
``M×N`` weighted distance matrix mean but without materialising it (memory: O(M) not O(M·N)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import MLPHead, pixels_to_rows


def make_selector(feat_dim: int) -> nn.Sequential:
    """SS-Net's selector MLP: ``Linear(d, d) → BN1d → LeakyReLU(0.2) → Linear(d, 1)`` (a score logit)."""
    return nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.BatchNorm1d(feat_dim),
                         nn.LeakyReLU(0.2, inplace=True), nn.Linear(feat_dim, 1))


class SeparationHeads(nn.Module):
    """Projection ``Linear(e, d) → BN1d → ReLU → Linear(d, d)``, prediction ``Linear(d, d) → … → Linear(d, d)``
    and, per class (background included, as in the code, though class 0 is never used), a feature
    selector and a memory selector. Training-only: never part of the saved inference network."""

    def __init__(self, num_classes: int, embedding_dim: int = 16, feat_dim: int = 32):
        super().__init__()
        self.projection = MLPHead(embedding_dim, feat_dim, feat_dim)
        self.prediction = MLPHead(feat_dim, feat_dim, feat_dim)
        self.selectors = nn.ModuleList(make_selector(feat_dim) for _ in range(num_classes))
        self.memory_selectors = nn.ModuleList(make_selector(feat_dim) for _ in range(num_classes))

    def project_eval(self, rows: torch.Tensor) -> torch.Tensor:
        """The projection head in eval mode (running BN statistics), no_grad: the memory's features."""
        was_training = self.projection.training
        self.projection.eval()
        try:
            with torch.no_grad():
                return self.projection(rows)
        finally:
            self.projection.train(was_training)

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """Projection then prediction head (train mode): the features the separation loss pulls."""
        return self.prediction(self.projection(rows))


def memory_candidates(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Labeled pixels that may enter the memory: correctly predicted foreground."""
    return (prediction == label) & (prediction > 0)


class FeatureMemory(nn.Module):
    """Per-class memory of at most ``per_class`` projected features. ``memory[c]`` is a (n, d) tensor or None.
    The memory travels in the method's state dict (``_extra_state``) so a resumed run continues exactly."""

    def __init__(self, num_classes: int, per_class: int = 32, select: str = "lowest", when_empty: str = "keep"):
        super().__init__()
        if select not in ("lowest", "highest"):
            raise ValueError(f"memory selection must be lowest or highest, not '{select}'")
        if when_empty not in ("keep", "clear"):
            raise ValueError(f"memory when_empty must be keep or clear, not '{when_empty}'")
        self.num_classes, self.per_class, self.select, self.when_empty = num_classes, per_class, select, when_empty
        self.memory: list[torch.Tensor | None] = [None] * num_classes
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows the method's device

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor,
               selectors: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """``features`` (n, d) projected candidates with their ``labels`` (n,); ``selectors[c]`` scores rows."""
        labels = labels.reshape(-1)
        for c in range(1, self.num_classes):  # background is never stored
            fc = features[labels == c]
            if fc.shape[0] == 0:
                if self.when_empty == "clear":
                    self.memory[c] = None
                continue
            if fc.shape[0] > self.per_class:
                rank = torch.sigmoid(selectors[c](fc).float())[:, 0]
                order = torch.sort(rank, descending=self.select == "highest", stable=True).indices
                fc = fc[order[:self.per_class]]
            self.memory[c] = fc.detach().float().clone()

    def get_extra_state(self):
        return {"memory": [None if m is None else m.detach().cpu() for m in self.memory]}

    def set_extra_state(self, state) -> None:
        self.memory = [None if m is None else m.to(self._anchor.device) for m in state["memory"]]

    def _apply(self, fn, recurse=True):  # existing entries follow .to(device) of the method
        self.memory = [None if m is None else fn(m) for m in self.memory]
        return super()._apply(fn, recurse)


def separation_loss(features: torch.Tensor, labels: torch.Tensor, memory: Sequence[torch.Tensor | None],
                    selectors: Sequence[Callable], memory_selectors: Sequence[Callable],
                    memory_weights: str = "code") -> torch.Tensor:
    """SS-Net ``contrastive_class_to_class_learned_memory`` (see the module docstring).

    ``features`` (M, d) after the projection and prediction heads, ``labels`` (M,), ``memory[c]`` (N_c, d).
    Returns ``Σ_c loss_c / C`` with C = ``len(memory)`` (background included)."""
    num_classes = len(memory)
    labels = labels.reshape(-1)
    loss = features.new_zeros(())
    for c in range(num_classes):
        mem = memory[c]
        if mem is None or mem.shape[0] <= 1:
            continue
        fc = features[labels == c]
        if fc.shape[0] <= 1:
            continue
        m_hat = F.normalize(mem.to(fc.dtype), dim=1)
        f_hat = F.normalize(fc, dim=1)
        w = torch.sigmoid(selectors[c](fc.detach()))[:, 0]  # detach: the selector learns, not the features
        w = w * (w.shape[0] / w.sum())
        if memory_weights == "code":
            v = torch.ones(m_hat.shape[0], device=fc.device, dtype=fc.dtype)
        elif memory_weights == "rescaled":
            v = torch.sigmoid(memory_selectors[c](m_hat))[:, 0]
            v = v * (v.shape[0] / v.sum())
        else:
            raise ValueError(f"memory_weights must be code or rescaled, not '{memory_weights}'")
        pulled = (v[:, None] * m_hat).sum(0)  # Σ_j v_j m̂_j
        loss = loss + (w * (v.sum() - f_hat @ pulled)).sum() / (fc.shape[0] * m_hat.shape[0])
    return loss / num_classes


def select_rows(embedding: torch.Tensor, keep: torch.Tensor | None = None, max_rows: int = 0) -> torch.Tensor | None:
    """Flat pixel indices of ``embedding`` (B, E, *S) taking part in a separation term: those where
    ``keep`` (B, *S) is true (all if None), then at most ``max_rows`` of them drawn uniformly without
    replacement (0 = no cap). None means "every pixel" (the faithful, unsampled case)."""
    n = embedding.shape[0] * embedding[0, 0].numel()
    idx = None if keep is None else keep.reshape(-1).nonzero().squeeze(1)
    count = n if idx is None else idx.numel()
    if max_rows and count > max_rows:
        pick = torch.randperm(count, device=embedding.device)[:max_rows]
        idx = pick if idx is None else idx[pick]
    return idx


def gather_rows(embedding: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(B, E, *S) -> (len(idx), E) rows at flat pixel indices (all pixels, channel-last, if None),
    without copying the whole embedding to channel-last first."""
    if idx is None:
        return pixels_to_rows(embedding)
    flat = embedding.flatten(2)  # (B, E, P), a view
    per = flat.shape[2]
    return flat[idx // per, :, idx % per]


@dataclass
class SeparationOptions:
    """Options of the separation term shared by ss_net and lcc (paper / code values by default)."""
    sep_weight: float = field(default=0.1, metadata={
        "help": "weight of the separation terms inside the ramped unsupervised weight (SS-Net code: 0.1)"})
    feat_dim: int = field(default=32, metadata={"help": "projection/prediction feature size (SS-Net: 32)"})
    memory_per_class: int = field(default=32, metadata={"help": "memory features kept per foreground class (SS-Net: 32)"})
    memory_select: str = field(default="lowest", metadata={
        "help": "which ranked features fill the memory: lowest (the code's ascending sort, inherited bug) or "
                "highest (the code comment's intent)", "choices": ["lowest", "highest"]})
    memory_weights: str = field(default="code", metadata={
        "help": "memory-side selector weights: code (each becomes v/v = 1 through a permute quirk, so the memory "
                "selectors have no effect) or rescaled (σ(sel_mem) rescaled to mean 1, the evident intent)",
        "choices": ["code", "rescaled"]})
    memory_when_empty: str = field(default="keep", metadata={
        "help": "a class with no correctly predicted labeled pixel this step: keep its previous memory (code) or clear it",
        "choices": ["keep", "clear"]})
    sep_max_pixels: int = field(default=0, metadata={
        "help": "cap on pixels per separation term (labeled, unlabeled), drawn uniformly each step; bounds memory on "
                "3D patches (the heads run per voxel, about 1 KB of activations each). 0 = every pixel (the code); "
                "a cap is our deviation (BN1d statistics and the loss are then estimated on the sample)"})


def embedding_channels(network: nn.Module, default: int = 16) -> int:
    """Channels of the network's embedding (last decoder feature): UNet ``channels[0]``, V-Net ``n_filters``."""
    cfg = getattr(network, "config", {}) or {}
    if cfg.get("channels"):
        return int(cfg["channels"][0])
    if cfg.get("n_filters"):
        return int(cfg["n_filters"])
    return default


class PrototypeSeparation(nn.Module):
    """The heads + memory wiring of SS-Net's separation term, written once for ss_net and lcc."""

    def __init__(self, num_classes: int, embedding_dim: int, opts: SeparationOptions):
        super().__init__()
        self.opts = opts
        self.embedding_dim = embedding_dim
        self.heads = SeparationHeads(num_classes, embedding_dim, opts.feat_dim)
        self.memory = FeatureMemory(num_classes, opts.memory_per_class, opts.memory_select, opts.memory_when_empty)

    def check(self, embedding: torch.Tensor) -> None:
        if embedding.shape[1] != self.embedding_dim:
            from ...errors import SemiSegError
            raise SemiSegError(f"the network's embedding has {embedding.shape[1]} channels, the separation heads "
                               f"expect {self.embedding_dim}")

    def update_memory(self, labeled_embedding: torch.Tensor, prediction: torch.Tensor, label: torch.Tensor) -> int:
        """Refill the memory from correctly predicted labeled foreground (projection head in eval mode).
        Returns the number of candidate pixels."""
        idx = memory_candidates(prediction, label).reshape(-1).nonzero().squeeze(1)
        rows = gather_rows(labeled_embedding.detach(), idx)
        feats = self.heads.project_eval(rows) if rows.shape[0] else rows.new_zeros((0, self.opts.feat_dim))
        self.memory.update(feats.float(), label.reshape(-1)[idx], self.heads.selectors)
        return int(idx.numel())

    def term(self, embedding: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Separation loss of the pixels of ``embedding`` (B, E, *S) with ``labels`` (B, *S), restricted to
        ``keep`` (B, *S) when given and capped at ``sep_max_pixels``. The heads see only the selected
        pixels, so pixels left out get exactly zero gradient (their BN1d statistics included)."""
        idx = select_rows(embedding, keep, self.opts.sep_max_pixels)
        rows = gather_rows(embedding, idx)
        if rows.shape[0] < 2:  # BN1d needs two rows; nothing to separate
            return embedding.new_zeros((), dtype=torch.float32)
        lab = labels.reshape(-1) if idx is None else labels.reshape(-1)[idx]
        feats = self.heads.embed(rows)
        return separation_loss(feats.float(), lab, self.memory.memory, self.heads.selectors,
                               self.heads.memory_selectors, self.opts.memory_weights)
