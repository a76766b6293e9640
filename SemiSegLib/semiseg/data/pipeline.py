"""Training batches: cases loaded once into memory, two-stream sampling (labeled first, then
unlabeled, METHODS.md §0.3) and the literature's augmentations. All randomness comes from one
``torch.Generator`` whose state, with the samplers', is saved in checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SemiSegError
from .datasets import CaseRef
from .transforms import normalize, random_crop_3d, random_generator_2d, random_rot_flip_3d, zoom_nearest


@dataclass
class Batch:
    """One training step's data on the training device. Images are (B, 1, *patch)."""
    labeled_image: torch.Tensor
    labeled_label: torch.Tensor          # (B_l, *patch) int64
    unlabeled_image: torch.Tensor | None  # (B_u, 1, *patch) or None for supervised-only
    labeled_index: torch.Tensor | None = None    # (B_l,) index of each labeled sample's case/slice
    unlabeled_index: torch.Tensor | None = None  # (B_u,)
    extra_unlabeled: list[torch.Tensor] = field(default_factory=list)  # further independent unlabeled batches

    @property
    def image(self) -> torch.Tensor:
        """Labeled then unlabeled, as the lineage's single two-stream batch."""
        if self.unlabeled_image is None:
            return self.labeled_image
        return torch.cat([self.labeled_image, self.unlabeled_image], 0)

    @property
    def n_labeled(self) -> int:
        return self.labeled_image.shape[0]


class IndexStream:
    """Endless passes over random permutations of ``range(n)`` (SSL4MIS ``iterate_once``/``iterate_eternally``)."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen = n, gen
        self.perm = torch.randperm(n, generator=gen)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            m = min(k, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + m])
            self.pos, k = self.pos + m, k - m
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.perm, self.pos = s["perm"].clone(), int(s["pos"])


def _check_finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        raise SemiSegError(f"image '{name}' contains NaN or infinite values")


class SliceStore:
    """2D training data: every slice resized once to the training size (nearest, as SSL4MIS)."""

    def __init__(self, refs: list[CaseRef], size: tuple[int, int], normalization: str, with_labels: bool):
        images, labels = [], []
        for ref in refs:
            img = ref.image()
            _check_finite(img.array, ref.name)
            arr = normalize(img.array, normalization)
            lab = ref.label().array if with_labels else None
            if with_labels and lab.shape != arr.shape:
                raise SemiSegError(f"label of '{ref.name}' has shape {lab.shape}, image {arr.shape}")
            if arr.ndim == 2:
                arr, lab = arr[..., None], (lab[..., None] if lab is not None else None)
            for z in range(arr.shape[2]):
                images.append(zoom_nearest(torch.from_numpy(np.ascontiguousarray(arr[:, :, z])), size))
                if lab is not None:
                    labels.append(zoom_nearest(torch.from_numpy(np.ascontiguousarray(lab[:, :, z]).astype(np.uint8)), size))
        if not images:
            raise SemiSegError("no training slices")
        self.images = torch.stack(images).unsqueeze(1)  # (N, 1, X, Y) float32
        self.labels = torch.stack(labels) if labels else None  # (N, X, Y) uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, idx: torch.Tensor, gen: torch.Generator):
        lab = self.labels[idx] if self.labels is not None else None
        return random_generator_2d(self.images[idx], lab, gen)


class VolumeStore:
    """3D training data: whole volumes kept in memory, cropped per sample (UA-MT RandomRotFlip + RandomCrop)."""

    def __init__(self, refs: list[CaseRef], patch: tuple[int, int, int], normalization: str, with_labels: bool,
                 rot_flip: bool = True):
        self.patch, self.rot_flip = patch, rot_flip
        self.images, self.labels = [], []
        for ref in refs:
            img = ref.image()
            _check_finite(img.array, ref.name)
            self.images.append(torch.from_numpy(normalize(img.array, normalization).copy()))
            if with_labels:
                lab = ref.label().array
                if lab.shape != img.array.shape:
                    raise SemiSegError(f"label of '{ref.name}' has shape {lab.shape}, image {img.array.shape}")
                self.labels.append(torch.from_numpy(lab.astype(np.uint8)))
        if not self.images:
            raise SemiSegError("no training volumes")

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, idx: torch.Tensor, gen: torch.Generator):
        imgs, labs = [], []
        for i in idx.tolist():
            img, lab = self.images[i], (self.labels[i] if self.labels else None)
            if self.rot_flip:
                img, lab = random_rot_flip_3d(img, lab, gen)
            img, lab = random_crop_3d(img, lab, self.patch, gen)
            imgs.append(img)
            if lab is not None:
                labs.append(lab)
        return torch.stack(imgs).unsqueeze(1), (torch.stack(labs) if labs else None)


class BatchSource:
    """Two-stream batches: ``labeled_batch`` labeled then ``unlabeled_batch`` unlabeled samples each step."""

    def __init__(self, labeled: list[CaseRef], unlabeled: list[CaseRef], dim: int, patch: tuple[int, ...],
                 normalization: str, labeled_batch: int, unlabeled_batch: int, seed: int, device: torch.device,
                 extra_unlabeled_streams: int = 0):
        if not labeled:
            raise SemiSegError("no labeled case: at least one labeled image is needed to train")
        store = SliceStore if dim == 2 else VolumeStore
        self.labeled = store(labeled, tuple(patch), normalization, with_labels=True)
        self.unlabeled = store(unlabeled, tuple(patch), normalization, with_labels=False) \
            if unlabeled and unlabeled_batch > 0 else None
        self.labeled_batch, self.unlabeled_batch = labeled_batch, unlabeled_batch
        self.extra_streams = extra_unlabeled_streams if self.unlabeled is not None else 0
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.lab_stream = IndexStream(len(self.labeled), self.gen)
        self.unl_stream = IndexStream(len(self.unlabeled), self.gen) if self.unlabeled is not None else None

    def next(self) -> Batch:
        lidx = self.lab_stream.take(self.labeled_batch)
        li, ll = self.labeled.sample(lidx, self.gen)
        ui, uidx, extra = None, None, []
        if self.unl_stream is not None:
            uidx = self.unl_stream.take(self.unlabeled_batch)
            ui, _ = self.unlabeled.sample(uidx, self.gen)
            ui = ui.to(self.device, non_blocking=True)
            for _ in range(self.extra_streams):  # e.g. UniMatch's mix batch: its own random draw of the pool
                xi, _ = self.unlabeled.sample(torch.randint(0, len(self.unlabeled), (self.unlabeled_batch,),
                                                            generator=self.gen), self.gen)
                extra.append(xi.to(self.device, non_blocking=True))
        return Batch(li.to(self.device, non_blocking=True), ll.long().to(self.device, non_blocking=True), ui,
                     lidx.to(self.device), uidx.to(self.device) if uidx is not None else None, extra)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "lab": self.lab_stream.state_dict(),
                "unl": self.unl_stream.state_dict() if self.unl_stream else None}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.lab_stream.load_state_dict(s["lab"])
        if self.unl_stream is not None and s.get("unl") is not None:
            self.unl_stream.load_state_dict(s["unl"])
