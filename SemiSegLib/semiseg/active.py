"""Active learning: how uncertain a prediction is, and which unlabeled volumes to label next.

Voxel maps (all in [0, 1], from softmax probabilities ``(C, ...)``, channel 0 = background):

* ``entropy``: the entropy of the mean softmax normalised by ``log C`` (0 = one class certain, 1 = every
  class equally likely); the usual uncertainty of segmentation active learning (Settles, *Active Learning
  Literature Survey*, 2009, §3.1; Gal et al., *Deep Bayesian Active Learning with Image Data*, ICML 2017).
* ``margin``: ``1 − (p₁ − p₂)``, one minus the gap between the two most likely classes (Scheffer et al. 2001).
* ``teacher-disagreement``: the total-variation distance ``½ Σ_c |p_student − p_teacher|`` between the
  student and its EMA teacher (the disagreement Mean Teacher / UA-MT train against).
* ``mc-dropout``: the mutual information between the prediction and the weights under Monte Carlo dropout
  (BALD: ``H(mean_t p_t) − mean_t H(p_t)`` over ``T`` passes with the network's dropout active, normalised by
  ``log C``; Gal et al., ICML 2017; Houlsby et al., arXiv 1112.5745): what the passes disagree on, not the
  uncertainty each pass has. Every SemiSeg network has dropout, so every model has this map.

Volume score (:func:`volume_score`): the mean of the map over the *region of interest*: voxels predicted
as foreground, dilated by one voxel (their boundary, where a model hesitates, belongs to them), plus every
voxel whose uncertainty is at least 0.5 (a structure the model half-sees but does not predict still
counts). Background far from any structure, certain and usually most of the volume, is left out so it
does not drown the score; a volume with no such voxel scores 0.

Suggestion (:func:`rank_candidates`): candidates sorted by score (highest first; ``random`` draws the
order from the seed), then picked greedily: a candidate whose thumbnail (:func:`thumbnail`) has a cosine
similarity above ``1 − diversity`` with an already picked one is passed over while others remain, so the
K picks are not K near-duplicates; ``diversity 0`` turns this off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import SemiSegError

STRATEGIES = ("entropy", "margin", "teacher-disagreement", "mc-dropout", "random")
MAPS = tuple(s for s in STRATEGIES if s != "random")  # the voxel maps `segment --uncertainty` writes
MC_PASSES = 8                   # dropout passes of ``mc-dropout``
DEFAULT_DIVERSITY = 0.05        # cosine above 0.95 = a near-duplicate of a volume already picked
UNCERTAIN_VOXEL = 0.5           # voxels at least this uncertain always belong to the scored region
THUMBNAIL_SHAPE = (16, 16, 8)   # the descriptor the diversity compares (x, y, z)


# ------------------------------------------------------------------------------------------ voxel maps
def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """``−Σ p log p / log C`` per voxel of ``probs`` (C, ...), float32 in [0, 1]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    h = -(p * np.log(p)).sum(0) / math.log(p.shape[0])
    return np.clip(h, 0.0, 1.0).astype(np.float32)


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 − (p₁ − p₂)``: one minus the gap between the two most likely classes, float32 in [0, 1]."""
    top2 = np.sort(np.asarray(probs, dtype=np.float32), axis=0)[-2:]
    return (1.0 - (top2[1] - top2[0])).astype(np.float32)


def disagreement(probs_a: np.ndarray, probs_b: np.ndarray) -> np.ndarray:
    """Total-variation distance ``½ Σ_c |a − b|`` per voxel, float32 in [0, 1]."""
    return (0.5 * np.abs(np.asarray(probs_a, np.float32) - np.asarray(probs_b, np.float32)).sum(0)).astype(np.float32)


def mutual_information(pass_probs: list[np.ndarray]) -> np.ndarray:
    """BALD per voxel of ``T`` stochastic passes' softmax maps (each (C, ...)): entropy of their mean minus
    the mean of their entropies, over ``log C``, float32 in [0, 1] (0 when the passes agree)."""
    mean_entropy = sum(normalized_entropy(p).astype(np.float64) for p in pass_probs) / len(pass_probs)
    mean = sum(np.asarray(p, np.float64) for p in pass_probs) / len(pass_probs)
    return np.clip(normalized_entropy(mean) - mean_entropy, 0.0, 1.0).astype(np.float32)


def map_name(uncertainty) -> str | None:
    """The map a request names: ``True`` = ``entropy``, false/None = none, else one of :data:`MAPS`."""
    if uncertainty is True:
        return "entropy"
    if not uncertainty:
        return None
    if uncertainty not in MAPS:
        raise SemiSegError(f"unknown uncertainty map '{uncertainty}'; available: {', '.join(MAPS)}")
    return uncertainty


def uncertainty_map(strategy: str, probs: np.ndarray, teacher_probs: np.ndarray | None = None,
                    pass_probs: list[np.ndarray] | None = None) -> np.ndarray:
    """The voxel map a strategy ranks by (``random`` and ``entropy``: the entropy map)."""
    if strategy == "mc-dropout":
        if not pass_probs:
            raise SemiSegError("mc-dropout needs the probabilities of the dropout passes")
        return mutual_information(pass_probs)
    if strategy == "margin":
        return margin_uncertainty(probs)
    if strategy == "teacher-disagreement":
        if teacher_probs is None:
            raise SemiSegError("teacher-disagreement needs the EMA teacher's probabilities")
        return disagreement(probs, teacher_probs)
    return normalized_entropy(probs)


# ------------------------------------------------------------------------------------------ volume scores
def scored_region(umap: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Predicted foreground dilated by one voxel (full connectivity), plus voxels with u ≥ 0.5."""
    fg = np.asarray(labels) > 0
    if fg.any():
        fg = ndimage.binary_dilation(fg, structure=np.ones((3,) * fg.ndim, dtype=bool))
    return fg | (np.asarray(umap) >= UNCERTAIN_VOXEL)


def volume_score(umap: np.ndarray, labels: np.ndarray) -> float:
    """Mean uncertainty over :func:`scored_region` (0 when the region is empty)."""
    region = scored_region(umap, labels)
    return float(np.asarray(umap, np.float64)[region].mean()) if region.any() else 0.0


def most_uncertain_slice(umap: np.ndarray) -> int:
    """Index, along the last array axis, of the slice with the highest mean uncertainty (first on ties)."""
    u = np.asarray(umap)
    if u.ndim < 3:
        return 0
    return int(np.argmax(u.reshape(-1, u.shape[-1]).mean(0)))


# ------------------------------------------------------------------------------------------ diversity
def thumbnail(image: np.ndarray, shape: tuple[int, ...] = THUMBNAIL_SHAPE) -> np.ndarray:
    """A small unit-norm descriptor of an image: z-scored, block-averaged to ``shape`` (linear zoom), the
    mean removed again and scaled to length 1, so the cosine of two thumbnails is their correlation."""
    a = np.asarray(image, dtype=np.float32)
    a = a if a.ndim == 3 else a.reshape(a.shape + (1,) * (3 - a.ndim))
    a = np.nan_to_num(a)
    a = (a - a.mean()) / (a.std() + 1e-6)
    t = ndimage.zoom(a, [s / n for s, n in zip(shape, a.shape)], order=1)
    t = t.ravel() - t.mean()
    n = np.linalg.norm(t)
    return (t / n if n > 0 else t).astype(np.float32)


@dataclass
class Candidate:
    name: str               # what the ranking shows: the input's path or case name
    score: float
    slice: int              # most uncertain slice along the last array axis
    descriptor: np.ndarray  # unit-norm thumbnail (diversity)


def rank_candidates(candidates: list[Candidate], n: int, strategy: str, seed: int = 0,
                    diversity: float = DEFAULT_DIVERSITY) -> list[dict]:
    """Every candidate in ranking order as ``{"input", "score", "picked", "slice"}``: the ``n`` picks first
    (by score, passing over near-duplicates of earlier picks while other candidates remain), then the rest
    by score. ``random``: scores drawn uniformly from ``seed`` (the comparison strategy)."""
    if strategy not in STRATEGIES:
        raise SemiSegError(f"unknown strategy '{strategy}'; available: {', '.join(STRATEGIES)}")
    if n < 1:
        raise SemiSegError(f"--n must be at least 1, not {n}")
    if not 0.0 <= diversity <= 1.0:
        raise SemiSegError(f"--diversity must be in [0, 1], not {diversity}")
    if strategy == "random":
        draws = np.random.default_rng(seed).random(len(candidates))
        candidates = [Candidate(c.name, float(d), c.slice, c.descriptor) for c, d in zip(candidates, draws)]
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].score)  # stable: input order on ties
    picked: list[int] = []
    passed: list[int] = []
    for i in order:
        if len(picked) == n:
            break
        similar = diversity > 0 and any(
            float(candidates[i].descriptor @ candidates[j].descriptor) > 1.0 - diversity for j in picked)
        (passed if similar else picked).append(i)
    picked += passed[:n - len(picked)]  # fewer distinct candidates than n: near-duplicates fill up
    rest = [i for i in order if i not in picked]
    return [{"input": candidates[i].name, "score": round(candidates[i].score, 6), "picked": i in picked,
             "slice": candidates[i].slice} for i in picked + rest]
