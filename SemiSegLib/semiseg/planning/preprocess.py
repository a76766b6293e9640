"""Apply a plan to cases (normalise, re-index axes, resample), cached on disk.

Order per image: intensity normalisation on the original voxels (CT clip + dataset z-score, or MR
per-volume z-score), then the axis re-indexing of a 2D plan (slice axis last: a transpose with the
spacing and direction columns permuted alike, so the physical grid is unchanged), then resampling
to the target spacing (same physical extent, own direction). Labels: the same re-indexing, then
nearest or one-hot linear resampling (``auto``: nearest when no axis of this case is downsampled,
else one-hot linear).

Cache: one ``.npz`` per (case, role) under ``cache_dir``, keyed by the plan's preprocessing hash and
the case's source (path, size and modification time of its files), or, for cases without a file
(generated phantoms), a hash of the array content. A second run with the same plan reads the file
instead of resampling; any change of the plan's preprocessing fields or of the file changes the key.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..data.datasets import CaseRef, DataSplits
from ..data.transforms import normalize
from ..data.volume import Geometry, Volume
from ..errors import SemiSegError
from .plan import Plan
from .resample import resample_image, resample_label, target_grid


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEMISEG_CACHE") or Path.home() / ".cache" / "semiseg") / "preprocessed"


def _plan(plan) -> Plan:
    return plan if isinstance(plan, Plan) else Plan.from_dict(plan)


# ------------------------------------------------------------------------------------ steps
def normalize_intensities(array: np.ndarray, normalization: dict) -> np.ndarray:
    """``ct``: clip to [lo, hi], then (x - mean) / std with the dataset's foreground statistics;
    ``zscore`` (per volume) and ``none``: the engine's :func:`~semiseg.data.transforms.normalize`."""
    a = np.asarray(array, dtype=np.float32)
    scheme = normalization.get("scheme", "none")
    if scheme == "ct":
        lo, hi = normalization["clip"]
        return ((np.clip(a, lo, hi) - normalization["mean"]) / max(float(normalization["std"]), 1e-8)).astype(np.float32)
    if scheme in ("zscore", "none"):
        return normalize(a, scheme)
    raise SemiSegError(f"unknown normalisation scheme '{scheme}' in the plan")


def permute_volume(array: np.ndarray, geometry: Geometry, order) -> tuple[np.ndarray, Geometry]:
    """Re-index the array axes (new axis k = old axis order[k]); the physical grid is unchanged."""
    order = [int(a) for a in order]
    if order == [0, 1, 2]:
        return array, geometry
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)[:, order]
    sp = [geometry.spacing[a] for a in order]
    return np.ascontiguousarray(np.transpose(array, order)), Geometry(tuple(sp), tuple(geometry.origin),
                                                                      tuple(d.ravel().tolist()))


def reindexed_target_spacing(plan: Plan) -> list:
    """The plan's target spacing in the re-indexed axis order (None = keep)."""
    return [plan.target_spacing[a] for a in plan.axis_order]


def _as3d(a: np.ndarray) -> np.ndarray:
    return a if a.ndim == 3 else a[..., None]


def preprocess_image(volume: Volume, plan) -> Volume:
    """Normalised, re-indexed and resampled image on the plan's grid."""
    plan = _plan(plan)
    arr = normalize_intensities(_as3d(volume.array), plan.normalization)
    arr, g = permute_volume(arr, volume.geometry, plan.axis_order)
    if not volume.spacing_known:
        return Volume(arr, g, volume.name, False)
    tg, tshape = target_grid(g, arr.shape, reindexed_target_spacing(plan))
    return Volume(resample_image(arr, g, tg, tshape, plan.image_interpolation), tg, volume.name)


def label_interpolation_for(plan: Plan, geometry: Geometry) -> str:
    if plan.label_interpolation != "auto":
        return plan.label_interpolation
    down = any(t is not None and t > s * (1 + 1e-6) for t, s in zip(reindexed_target_spacing(plan), geometry.spacing))
    return "linear" if down else "nearest"


def preprocess_label(volume: Volume, plan) -> Volume:
    plan = _plan(plan)
    arr, g = permute_volume(_as3d(volume.array), volume.geometry, plan.axis_order)
    if not volume.spacing_known:
        return Volume(arr, g, volume.name, False)
    tg, tshape = target_grid(g, arr.shape, reindexed_target_spacing(plan))
    mode = label_interpolation_for(plan, g)
    return Volume(resample_label(arr, g, tg, tshape, mode), tg, volume.name)


def predict_on_original_grid(volume: Volume, plan, predict_array) -> np.ndarray:
    """Labels on ``volume``'s own grid: preprocessed as in training, ``predict_array(array)`` on the plan
    grid, restored with :func:`restore_label` (``semiseg segment`` and the final scores of planned runs)."""
    pre = preprocess_image(volume, plan)
    return restore_label(predict_array(pre.array), pre.geometry, volume.geometry, volume.array.shape)


def restore_label(labels: np.ndarray, plan_geometry: Geometry, original: Geometry, original_shape) -> np.ndarray:
    """A prediction on the plan grid mapped back onto the original grid (exact spacing, origin, direction,
    size) by one-hot linear resampling; the result is in the original array's axis order."""
    shape = tuple(original_shape[:3]) + (1,) * (3 - len(original_shape))
    out = resample_label(_as3d(labels), plan_geometry, original, shape, "linear")
    return out.reshape(tuple(original_shape))


# ------------------------------------------------------------------------------------ cache
class Preprocessor:
    """Preprocess cases under one plan, with an on-disk cache (see the module docstring)."""

    def __init__(self, plan, cache_dir: str | Path | None = None):
        self.plan = _plan(plan)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.plan_key = self.plan.preprocessing_key()
        self.hits = self.misses = 0
        self.seconds = 0.0

    def _source_key(self, ref: CaseRef, role: str, loaded: Volume | None) -> str:
        sources = ref.sources
        parts = [self.plan_key, role, ref.name]
        if role == "label":
            parts.append(ref.label_key)  # the class matching (class_map) changes the loaded label
        files = [s for s in sources if s]
        if files:
            for s in files:
                st = os.stat(s)
                parts.append(f"{os.path.abspath(s)}:{st.st_size}:{st.st_mtime_ns}")
        else:
            v = loaded
            h = hashlib.sha256(np.ascontiguousarray(v.array).tobytes())
            h.update(json.dumps(v.geometry.to_dict()).encode())
            parts.append(h.hexdigest())
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.cache_dir / self.plan_key / f"{key}.npz"

    def get(self, ref: CaseRef, role: str) -> Volume:
        """The preprocessed image (``role="image"``) or label (``"label"``) of a case."""
        import time
        loader = ref.image_loader if role == "image" else ref.label_loader
        has_files = bool([s for s in ref.sources if s])
        raw = None if has_files else loader()
        path = self._path(self._source_key(ref, role, raw))
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    vol = Volume(z["array"], Geometry.from_dict(meta["geometry"]), ref.name, meta["spacing_known"])
                self.hits += 1
                return vol
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
                pass
        t0 = time.perf_counter()
        raw = raw if raw is not None else loader()
        vol = preprocess_image(raw, self.plan) if role == "image" else preprocess_label(raw, self.plan)
        self.seconds += time.perf_counter() - t0
        self.misses += 1
        meta = json.dumps({"geometry": vol.geometry.to_dict(), "spacing_known": vol.spacing_known,
                           "case": ref.name, "role": role})
        with atomic_path(path) as tmp:
            np.savez(tmp, array=vol.array, meta=np.array(meta))
        return vol

    def wrap(self, ref: CaseRef) -> CaseRef:
        return CaseRef(ref.name, lambda: self.get(ref, "image"),
                       (lambda: self.get(ref, "label")) if ref.label_loader is not None else None, ref.sources,
                       ref.label_key, original=ref, scan=ref.scan)

    def cache_size_bytes(self) -> int:
        folder = self.cache_dir / self.plan_key
        return sum(p.stat().st_size for p in folder.glob("*.npz")) if folder.is_dir() else 0


def apply_plan(splits: DataSplits, plan, cache_dir: str | Path | None = None) -> tuple[DataSplits, Preprocessor]:
    """The splits with every case preprocessed under the plan (normalisation done: ``none`` for the loop)."""
    pre = Preprocessor(plan, cache_dir)
    p = pre.plan
    out = replace(splits, dim=p.dim, labeled=[pre.wrap(r) for r in splits.labeled],
                  unlabeled=[pre.wrap(r) for r in splits.unlabeled], val=[pre.wrap(r) for r in splits.val],
                  test=[pre.wrap(r) for r in splits.test], normalization="none",
                  description=splits.description + f" | planned: {p.dim}D, target spacing "
                  + "(" + ", ".join("keep" if t is None else f"{t:g}" for t in p.target_spacing) + ")")
    out.plan = p.to_dict()
    return out, pre


def preprocess_all(splits: DataSplits, plan, cache_dir=None) -> dict:
    """Preprocess every case now (labeled, unlabeled, val, test); returns timing and cache figures."""
    import time
    data, pre = apply_plan(splits, plan, cache_dir)
    t0 = time.perf_counter()
    n = 0
    for ref in data.labeled + data.unlabeled + data.val + data.test:
        ref.image()
        n += 1
        if ref.has_label:
            ref.label()
    return {"cases": n, "seconds": round(time.perf_counter() - t0, 3), "hits": pre.hits, "misses": pre.misses,
            "cache_bytes": pre.cache_size_bytes(), "cache_dir": str(pre.cache_dir / pre.plan_key)}
