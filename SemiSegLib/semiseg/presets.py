"""Dataset recipes: the training settings each named dataset starts from, and the one list of the
datasets that keep their literature recipe.

``acdc`` follows SSL4MIS (Luo et al., github.com/HiLab-git/SSL4MIS, ``code/train_*_2D.py``: 256x256 slices,
batch 12+12, 30000 iterations, poly lr, validation every 200); ``la`` follows the LA lineage
(UA-MT, github.com/yulequan/UA-MT ``code/train_LA_meanteacher_certainty_unlabel.py`` and ``code/test_util.py``;
SS-Net, github.com/ycwu1997/SS-Net ``code/train_3d.py``: 112x112x80 patches, batch 2+2, 15000 iterations as
SS-Net/CAML/MC-Net+, lr x0.1 every 2500, the final model, sliding-window stride 18x18x4). The phantom preset is SemiSeg's own (small and fast); ``generic2d``/``generic3d`` are the
starting points for users' own scans, which the planning step (:mod:`semiseg.planning`) then adapts.

This module imports nothing from the rest of the engine, so methods and configuration can both read it.
"""
from __future__ import annotations

from typing import Any

# Datasets with a fixed recipe: planning (plan=auto) leaves them as they are, their classes are fixed
# (no --class-map) and their names select a preset. phantom is SemiSeg's own, treated like the literature's.
LITERATURE_DATASETS = ("acdc", "la", "phantom")

PRESETS: dict[str, dict[str, Any]] = {
    "acdc": dict(dim=2, labeled=7, patch_size=(256, 256), labeled_batch=12, unlabeled_batch=12, iterations=30000,
                 lr_schedule="poly", val_every=200, selection="val", network="unet"),
    "la": dict(dim=3, labeled=4, patch_size=(112, 112, 80), labeled_batch=2, unlabeled_batch=2, iterations=15000,
               lr_schedule="step", val_every=0, selection="final", network="vnet", stride=(18, 18, 4)),
    "phantom": dict(dim=2, labeled=4, patch_size=(96, 96), labeled_batch=4, unlabeled_batch=4, iterations=600,
                    lr_schedule="poly", lr=0.03, val_every=100, selection="val", network="unet"),
    "generic3d": dict(dim=3, labeled=0, patch_size=(96, 96, 64), labeled_batch=2, unlabeled_batch=2, iterations=6000,
                      lr_schedule="poly", val_every=500, selection="val", network="vnet", stride=(32, 32, 16),
                      foreground_share=0.33),
    "generic2d": dict(dim=2, labeled=0, patch_size=(256, 256), labeled_batch=12, unlabeled_batch=12, iterations=10000,
                      lr_schedule="poly", val_every=200, selection="val", network="unet", foreground_share=0.33),
}


def dataset_kind(data: str) -> str:
    """``acdc:PATH`` -> ``acdc``; a folder or CSV -> its path's first part (not a literature name)."""
    return data.split(":", 1)[0]


def is_literature(data: str) -> bool:
    return dataset_kind(data) in LITERATURE_DATASETS


def preset_for_data(data: str, dim: int = 0) -> str:
    kind = dataset_kind(data)
    if kind in LITERATURE_DATASETS:
        return kind
    return "generic2d" if dim == 2 else "generic3d"
