"""Segment image files with a trained checkpoint: labelmap NRRD + Slicer ``.seg.nrrd`` (segment names
and colours) on the input's exact geometry, and optionally a voxel uncertainty map (``NAME.uncertainty.nrrd``,
float32, same grid; :mod:`semiseg.active`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .active import MC_PASSES, map_name, uncertainty_map, volume_score
from .checkpoint import load_checkpoint, network_from_checkpoint
from .data.datasets import IMAGE_SUFFIXES, _stem
from .data.io import read_volume, write_labelmap, write_volume
from .data.segfile import write_segmentation
from .data.volume import ClassInfo, Volume
from .errors import SemiSegError
from .inference import check_tta, predict_volume


class Segmenter:
    def __init__(self, model: str | Path, device: torch.device | str = "cpu", lcc: bool | None = None,
                 stride: tuple[int, ...] | None = None, tta: str | None = None):
        """``lcc``, ``stride``, ``tta``: None = as the model was trained (its checkpoint's settings)."""
        self.ckpt = load_checkpoint(model, map_location="cpu")
        self.device = torch.device(device)
        self.net = network_from_checkpoint(self.ckpt, self.device)
        self.meta = self.ckpt["meta"] if tta is None else {**self.ckpt["meta"], "tta": check_tta(tta)}
        self.classes = [ClassInfo.from_dict(c) for c in self.meta["classes"]]
        self.lcc, self.stride = lcc, stride
        self.teacher: torch.nn.Module | None = None

    def load_teacher(self) -> None:
        """The EMA teacher of the model (``teacher-disagreement``): saved with the checkpoint by runs of
        methods that have one, else taken from the resumable ``last.pt`` beside it."""
        state = teacher_state(self.ckpt)
        if state is None:
            method = self.ckpt.get("config", {}).get("method", "?")
            raise SemiSegError(f"model {self.ckpt['path']} (method '{method}') has no EMA teacher: "
                               "teacher-disagreement needs a method with one (mean_teacher, ua_mt, lcc)")
        self.teacher = network_from_checkpoint({**self.ckpt, "model": state}, self.device)

    def predict_array(self, image: np.ndarray) -> np.ndarray:
        if not np.isfinite(image).all():
            raise SemiSegError("input image contains NaN or infinite values")
        return predict_volume(self.net, image, self.meta, lcc=self.lcc, stride=self.stride,
                              half=self.device.type == "cuda")

    def predict_on_grid(self, vol: Volume) -> np.ndarray:
        """Labels on the volume's own grid. With a plan in the checkpoint (semiseg.planning) the image is
        normalised, re-indexed and resampled as in training, predicted there, and the labels are
        resampled back (one-hot linear) onto the input's exact spacing, origin, direction and size."""
        plan = self.meta.get("plan")
        if not plan:
            return self.predict_array(vol.array)
        from .planning import predict_on_original_grid
        if not np.isfinite(vol.array).all():
            raise SemiSegError("input image contains NaN or infinite values")
        return predict_on_original_grid(vol, plan, self.predict_array)

    def _probs(self, net: torch.nn.Module, image: np.ndarray):
        return predict_volume(net, image, self.meta, lcc=self.lcc, stride=self.stride,
                              half=self.device.type == "cuda", return_probs=True)

    def _dropout_passes(self, image: np.ndarray, passes: int = MC_PASSES, seed: int = 0) -> list[np.ndarray]:
        """Softmax maps of ``passes`` forward passes with the network's dropout layers active (BatchNorm stays
        in inference mode), from a fixed seed: the same volume gets the same map every time."""
        dropouts = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in dropouts:
                m.train()
            try:
                return [self._probs(self.net, image)[1] for _ in range(passes)]
            finally:
                for m in dropouts:
                    m.eval()

    def uncertainty_on_grid(self, vol: Volume, strategy: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
        """(labels, voxel uncertainty) on the volume's own grid. A planned model's map is computed on the plan
        grid and resampled back linearly (as the labels are resampled back); ``strategy`` names the map
        (:func:`semiseg.active.uncertainty_map`; ``teacher-disagreement`` needs :meth:`load_teacher`). The
        labels are always the model's own (dropout off)."""
        if not np.isfinite(vol.array).all():
            raise SemiSegError("input image contains NaN or infinite values")
        strategy = map_name(strategy)
        if strategy == "teacher-disagreement" and self.teacher is None:
            self.load_teacher()

        def on_array(image):
            labels, probs = self._probs(self.net, image)
            teacher = self._probs(self.teacher, image)[1] if strategy == "teacher-disagreement" else None
            passes = self._dropout_passes(image) if strategy == "mc-dropout" else None
            return labels, uncertainty_map(strategy, probs, teacher, passes)

        plan = self.meta.get("plan")
        if not plan:
            return on_array(vol.array)
        from .planning import preprocess_image, restore_label
        from .planning.resample import resample_image
        pre = preprocess_image(vol, plan)
        labels, umap = on_array(pre.array)
        shape = tuple(vol.array.shape)
        grid3 = tuple(shape[:3]) + (1,) * (3 - len(shape))
        umap3 = umap if umap.ndim == 3 else umap.reshape(umap.shape + (1,) * (3 - umap.ndim))
        back = resample_image(umap3, pre.geometry, vol.geometry, grid3, "linear").reshape(shape)
        return restore_label(labels, pre.geometry, vol.geometry, shape), np.clip(back, 0, 1).astype(np.float32)

    def segment_file(self, path: str | Path, out_dir: str | Path, uncertainty: bool | str = False) -> dict:
        """Write NAME.label.nrrd and NAME.seg.nrrd (and with ``uncertainty`` NAME.uncertainty.nrrd: float32
        on the input's grid, the map ``uncertainty`` names, ``True`` = ``entropy``) into ``out_dir``."""
        path, out_dir = Path(path), Path(out_dir)
        vol = read_volume(path)
        image = vol.array
        if self.meta["dim"] == 3 and image.ndim == 3 and any(s < 16 for s in image.shape) and not self.meta.get("plan"):
            raise SemiSegError(f"{path}: size {image.shape} is too small for the 3D model")
        try:
            strategy = map_name(uncertainty)
            pred, umap = self.uncertainty_on_grid(vol, strategy) if strategy else (self.predict_on_grid(vol), None)
        except SemiSegError as e:
            raise SemiSegError(f"{path}: {e}") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = _stem(path)
        label_path, seg_path = out_dir / f"{stem}.label.nrrd", out_dir / f"{stem}.seg.nrrd"
        write_labelmap(label_path, pred, vol.geometry)
        write_segmentation(seg_path, pred, vol.geometry, self.classes)
        result = {"input": str(path), "labelmap": str(label_path), "segmentation": str(seg_path),
                  "voxels": {c.name: int((pred == c.value).sum()) for c in self.classes}}
        if umap is not None:
            u_path = out_dir / f"{stem}.uncertainty.nrrd"
            write_volume(u_path, Volume(umap.astype(np.float32), vol.geometry, stem))
            result.update(uncertainty=str(u_path), uncertainty_score=round(volume_score(umap, pred), 6))
        return result


def teacher_state(ckpt: dict) -> dict | None:
    """The EMA teacher's weights of a checkpoint: its own ``teacher`` entry, the training state of a
    ``last.pt``, or the ``last.pt`` beside it (runs saved before best.pt carried the teacher)."""
    if ckpt.get("teacher"):
        return ckpt["teacher"]
    method_state = (ckpt.get("training") or {}).get("method") or {}
    state = {k[len("teacher."):]: v for k, v in method_state.items() if k.startswith("teacher.")}
    if state:
        return state
    last = Path(ckpt.get("path", "")).parent / "last.pt"
    if ckpt.get("path") and last.is_file() and Path(ckpt["path"]).name != "last.pt":
        return teacher_state(load_checkpoint(last, map_location="cpu"))
    return None


def write_uncertainty_csv(path: str | Path, results: list[dict]) -> None:
    """``input,score`` per segmented volume (the ``predicted`` events' uncertainty scores), atomically."""
    import csv
    import io
    from .atomic import atomic_write
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["input", "score"])
    w.writerows([r["input"], r["uncertainty_score"]] for r in results if "uncertainty_score" in r)
    atomic_write(Path(path), buf.getvalue())


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to the images they hold (label files skipped)."""
    from .data.datasets import LABEL_MARKERS
    out = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) and not f.name.lower().endswith(".seg.nrrd") \
                        and not any(_stem(f).lower().endswith(m) for m in LABEL_MARKERS):
                    out.append(f)
        elif p.exists():
            out.append(p)
        else:
            raise SemiSegError(f"input not found: {p}")
    if not out:
        raise SemiSegError(f"no image found in {', '.join(inputs)}")
    return out
