"""CAML's labeled-voxel memory bank and omni-correlation consistency (OCC) (CAML).

Semantics follow the reference (``utils/feature_memory.py``, ``utils/correlation.py``), with the bank on
the training device instead of host numpy arrays (no host round trips; same content and sampling rule).
"""
from __future__ import annotations

import torch
from torch import nn


class LabeledFeatureMemory(nn.Module):
    """One entry per labeled sample index: the projected features of the voxels that both branches
    predicted correctly in that sample's latest crop, stored detached and split by their true class.
    An entry is overwritten whenever its sample reappears. The bank is saved in ``state_dict`` (extra
    state) so a resumed run continues with the same memory; it is never part of the inference model."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.entries: dict[int, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def update(self, features: list[torch.Tensor], labels: list[torch.Tensor], indices: list[int]) -> None:
        """``features[i]`` (n_i, D) and ``labels[i]`` (n_i,) of labeled sample ``indices[i]``."""
        for f, y, k in zip(features, labels, indices):
            f = f.detach().float()
            self.entries[int(k)] = [f[y == c].contiguous() for c in range(self.num_classes)]

    def class_count(self, c: int) -> int:
        return sum(e[c].shape[0] for e in self.entries.values())

    @torch.no_grad()
    def sample(self, per_class: int) -> list[torch.Tensor | None]:
        """Per class: ``per_class`` stored features drawn uniformly without replacement from the union of
        all entries, or None when fewer are stored (that class is then left out of the correlation)."""
        out: list[torch.Tensor | None] = []
        keys = sorted(self.entries)
        for c in range(self.num_classes):
            parts = [self.entries[k][c] for k in keys if self.entries[k][c].shape[0]]
            n = sum(p.shape[0] for p in parts)
            if n < per_class or n == 0:
                out.append(None)
                continue
            pool = parts[0] if len(parts) == 1 else torch.cat(parts)
            pick = torch.randperm(n, device=pool.device)[:per_class]
            out.append(pool[pick])
        return out

    def get_extra_state(self):
        return {"num_classes": self.num_classes, "entries": self.entries}

    def set_extra_state(self, state) -> None:
        self.num_classes = int(state["num_classes"])
        self.entries = {int(k): list(v) for k, v in state["entries"].items()}


def correlation_matrix(features: torch.Tensor, confidence: torch.Tensor, label: torch.Tensor,
                       memory: list[torch.Tensor | None], num_classes: int, temperature: float = 0.1,
                       num_filtered: int = 12800) -> torch.Tensor | None:
    """Rows = for each class c, the (at most ``num_filtered``) most confident voxels predicted as c;
    columns = the sampled memory (classes with a sample, in class order). Returns
    ``softmax_row(g Mᵀ / T)`` with **no L2 normalisation** (as coded), or None when nothing is available
    (no memory class with more than one feature, or no class with more than one voxel)."""
    bank = [m for m in memory if m is not None and m.shape[0] > 1]
    if not bank:
        return None
    bank_t = torch.cat(bank).to(features.device, torch.float32).t()
    rows = []
    for c in range(num_classes):
        sel = (label == c).nonzero().squeeze(1)
        if sel.numel() <= 1:
            continue
        k = min(num_filtered, sel.numel())
        top = torch.topk(confidence[sel].float(), k).indices
        rows.append(features[sel[top]].float() @ bank_t)
    if not rows:
        return None
    return torch.softmax(torch.cat(rows) / temperature, dim=1)


def omni_correlation_loss(corr_a: torch.Tensor, corr_v: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_rows Σ_j −corr_a[j]·log(corr_v[j] + 1e-8)``: cross-entropy with branch A's correlation
    as the target; neither side detached (as coded)."""
    return (-corr_a * torch.log(corr_v + 1e-8)).sum(1).mean()
