"""``semiseg suggest``: rank unlabeled volumes by what labeling them would teach the model (the scores,
maps and picking rules are in :mod:`semiseg.active`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from .active import DEFAULT_DIVERSITY, STRATEGIES, Candidate, most_uncertain_slice, rank_candidates, thumbnail, \
    volume_score
from .data.volume import Volume
from .errors import SemiSegError
from .predict import Segmenter, expand_inputs


def suggest(segmenter: Segmenter, volumes: Iterable[tuple[str, Callable[[], Volume]]], n: int,
            strategy: str = "entropy", seed: int = 0, diversity: float = DEFAULT_DIVERSITY) -> list[dict]:
    """The ranking (:func:`semiseg.active.rank_candidates`) of ``volumes``, given as (name, loader) pairs.
    ``random`` runs no inference (its slice is the middle one); the others predict every volume once."""
    if strategy not in STRATEGIES:
        raise SemiSegError(f"unknown strategy '{strategy}'; available: {', '.join(STRATEGIES)}")
    if strategy == "teacher-disagreement" and segmenter.teacher is None:
        segmenter.load_teacher()  # one error line naming the model when it has no teacher, before any work
    candidates = []
    for name, load in volumes:
        vol = load()
        if strategy == "random":
            score, sl = 0.0, vol.array.shape[-1] // 2 if vol.array.ndim >= 3 else 0
        else:
            try:
                labels, umap = segmenter.uncertainty_on_grid(vol, strategy)
            except SemiSegError as e:
                raise SemiSegError(f"{name}: {e}") from None
            score, sl = volume_score(umap, labels), most_uncertain_slice(umap)
        candidates.append(Candidate(name, score, sl, thumbnail(vol.array)))
    if not candidates:
        raise SemiSegError("no volume to rank")
    return rank_candidates(candidates, n, strategy, seed, diversity)


def suggest_files(model: str | Path, inputs: list[str], n: int, strategy: str = "entropy", seed: int = 0,
                  diversity: float = DEFAULT_DIVERSITY, device: torch.device | str = "cpu") -> list[dict]:
    """:func:`suggest` over image files and folders (``--input``), each read as ``semiseg segment`` reads it."""
    from .data.io import read_volume
    seg = Segmenter(model, device)
    files = expand_inputs(inputs)
    return suggest(seg, [(str(f), (lambda f=f: read_volume(f))) for f in files], n, strategy, seed, diversity)


def format_ranking(ranking: list[dict], strategy: str) -> str:
    what = ("a uniform draw" if strategy == "random" else
            "mean uncertainty over the predicted structures and uncertain voxels")
    rows = [f"suggested by {strategy} (score: {what}; * = picked)", f"{'rank':>4}  {'score':>8}  {'slice':>5}  input"]
    for i, r in enumerate(ranking, 1):
        rows.append(f"{i:>4}{'*' if r['picked'] else ' '} {r['score']:>8.4f}  {r['slice']:>5}  {r['input']}")
    return "\n".join(rows)
