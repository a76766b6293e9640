"""Segment image files with a trained checkpoint: labelmap NRRD + Slicer ``.seg.nrrd`` (segment names
and colours) on the input's exact geometry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, network_from_checkpoint
from .data.datasets import IMAGE_SUFFIXES, _stem
from .data.io import read_volume, write_labelmap
from .data.segfile import write_segmentation
from .data.volume import ClassInfo, Volume
from .errors import SemiSegError
from .inference import predict_volume


class Segmenter:
    def __init__(self, model: str | Path, device: torch.device | str = "cpu", lcc: bool | None = None,
                 stride: tuple[int, ...] | None = None):
        self.ckpt = load_checkpoint(model, map_location="cpu")
        self.device = torch.device(device)
        self.net = network_from_checkpoint(self.ckpt, self.device)
        self.meta = self.ckpt["meta"]
        self.classes = [ClassInfo.from_dict(c) for c in self.meta["classes"]]
        self.lcc, self.stride = lcc, stride

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

    def segment_file(self, path: str | Path, out_dir: str | Path) -> dict:
        path, out_dir = Path(path), Path(out_dir)
        vol = read_volume(path)
        image = vol.array
        if self.meta["dim"] == 3 and image.ndim == 3 and any(s < 16 for s in image.shape) and not self.meta.get("plan"):
            raise SemiSegError(f"{path}: size {image.shape} is too small for the 3D model")
        try:
            pred = self.predict_on_grid(vol)
        except SemiSegError as e:
            raise SemiSegError(f"{path}: {e}") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = _stem(path)
        label_path, seg_path = out_dir / f"{stem}.label.nrrd", out_dir / f"{stem}.seg.nrrd"
        write_labelmap(label_path, pred, vol.geometry)
        write_segmentation(seg_path, pred, vol.geometry, self.classes)
        return {"input": str(path), "labelmap": str(label_path), "segmentation": str(seg_path),
                "voxels": {c.name: int((pred == c.value).sum()) for c in self.classes}}


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
