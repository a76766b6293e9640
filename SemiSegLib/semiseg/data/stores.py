"""Training data held in memory for batched augmentation: :class:`SliceStore` (2D: every slice resized once
to the training size) and :class:`VolumeStore` (3D: whole volumes in one zero-padded flat buffer). Each
store turns a batch's indices into the reference transforms' random draws (:meth:`draw`, on the CPU
generator) and applies them to the whole batch on the data device (:meth:`apply`);
:class:`~semiseg.data.pipeline.BatchSource` decides which samples, and where the data live."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SemiSegError
from .datasets import CaseRef
from .transforms import (BatchedRandomGenerator2D, normalize, rot_flip_source_map, ua_mt_crop_pads,
                         zoom_nearest)


def _check_finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        raise SemiSegError(f"image '{name}' contains NaN or infinite values")


_AUG_CACHE: dict = {}


def _aug_2d(size: tuple[int, int], device: torch.device) -> BatchedRandomGenerator2D:
    key = (tuple(size), str(device))
    if key not in _AUG_CACHE:
        _AUG_CACHE[key] = BatchedRandomGenerator2D(size, device)
    return _AUG_CACHE[key]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not block the host (pinned staging) when going to a GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Store:
    """What both stores share: an image buffer and an optional label buffer (attributes ``IMAGES`` and
    ``LABELS``) on the data device."""
    IMAGES, LABELS = "images", "labels"

    def nbytes(self) -> int:
        labels = getattr(self, self.LABELS)
        return getattr(self, self.IMAGES).nbytes + (labels.nbytes if labels is not None else 0)

    def _move(self, device: torch.device) -> None:
        self.device = device
        for name in (self.IMAGES, self.LABELS):
            buffer = getattr(self, name)
            setattr(self, name, buffer.to(device) if buffer is not None else None)


class SliceStore(_Store):
    """2D training data: every slice resized once to the training size (nearest, as SSL4MIS), kept as one
    (N, 1 + X·Y) tensor on the data device; a batch is one row copy plus one gather (batched RandomGenerator)."""
    IMAGES, LABELS = "_flat_images", "_flat_labels"

    def __init__(self, refs: list[CaseRef], size: tuple[int, int], normalization: str, with_labels: bool):
        images, labels, aspects = [], [], []
        for ref in refs:
            img = ref.image()
            _check_finite(img.array, ref.name)
            arr = normalize(img.array, normalization)
            lab = ref.label().array if with_labels else None
            if with_labels and lab.shape != arr.shape:
                raise SemiSegError(f"label of '{ref.name}' has shape {lab.shape}, image {arr.shape}")
            if arr.ndim == 2:
                arr, lab = arr[..., None], (lab[..., None] if lab is not None else None)
            h, w = arr.shape[:2]
            aspects += [(h - 1) / (w - 1) if h > 1 and w > 1 else 1.0] * arr.shape[2]
            for z in range(arr.shape[2]):
                images.append(zoom_nearest(torch.from_numpy(np.ascontiguousarray(arr[:, :, z])), size))
                if lab is not None:
                    labels.append(zoom_nearest(torch.from_numpy(np.ascontiguousarray(lab[:, :, z]).astype(np.uint8)), size))
        if not images:
            raise SemiSegError("no training slices")
        self.size = tuple(size)
        # each slice's native (H-1)/(W-1): its ±20° rotations are made in its own pixel geometry
        aspect = torch.tensor(aspects, dtype=torch.float32)
        self.aspect = aspect if bool((aspect != 1).any()) else None
        # stored as (N, 1 + X·Y) with a zero first column (the rotation's fill value); .images and
        # .labels are (N, 1, X, Y) / (N, X, Y) views of it
        self._flat_images = self._with_zero(torch.stack(images))
        self._flat_labels = self._with_zero(torch.stack(labels)) if labels else None
        self._views()
        self._class_slices: list[torch.Tensor] | None = None  # built on first foreground-aware draw
        self.device = torch.device("cpu")
        try:
            self.aug = _aug_2d(self.size, self.device)
        except ValueError as e:
            raise SemiSegError(str(e)) from None

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def _with_zero(stack: torch.Tensor) -> torch.Tensor:
        flat = stack.new_zeros(stack.shape[0], 1 + stack[0].numel())
        flat[:, 1:] = stack.reshape(stack.shape[0], -1)
        return flat

    def _views(self) -> None:
        n = self._flat_images.shape[0]
        self.images = self._flat_images[:, 1:].view(n, 1, *self.size)  # (N, 1, X, Y) float32
        self.labels = self._flat_labels[:, 1:].view(n, *self.size) if self._flat_labels is not None else None

    def to(self, device: torch.device) -> "SliceStore":
        self._move(device)
        self._views()
        self.aug = _aug_2d(self.size, device)
        self.aspect = self.aspect.to(device) if self.aspect is not None else None
        return self

    @property
    def class_slices(self) -> list[torch.Tensor]:
        """Per present foreground class, the indices (CPU) of the slices that contain it. Built when first
        needed, so runs without foreground-aware sampling (the literature presets) do not pay for it."""
        if self._class_slices is None:
            self._class_slices = []
            if self.labels is not None:
                present = torch.stack([torch.bincount(s.reshape(-1).long(), minlength=256) > 0
                                       for s in self.labels]).cpu()
                self._class_slices = [present[:, c].nonzero()[:, 0] for c in range(1, 256) if present[:, c].any()]
        return self._class_slices

    def foreground_slices(self, idx: torch.Tensor, forced: list[bool], gen: torch.Generator) -> torch.Tensor:
        """``idx`` with each ``forced`` sample replaced by a slice containing a random present foreground class
        (the class drawn uniformly, then one of its slices): the 2D form of foreground-aware sampling, since a
        slice is resized whole rather than cropped."""
        if not self.class_slices:
            return idx
        idx = idx.clone()
        for s in (i for i, f in enumerate(forced) if f):
            slices = self.class_slices[int(torch.randint(0, len(self.class_slices), (1,), generator=gen))]
            idx[s] = slices[int(torch.randint(0, len(slices), (1,), generator=gen))]
        return idx

    def draw(self, idx: torch.Tensor, gen: torch.Generator, forced=None) -> torch.Tensor:
        """The reference's random draws for these samples (CPU): one transform code each."""
        return self.aug.draw(len(idx), gen)

    def apply(self, idx: torch.Tensor, params: torch.Tensor):
        """Gather the slices and transform them on the data device."""
        return self.aug.apply_indexed(self._flat_images, self._flat_labels, to_device(idx, self.device),
                                      to_device(params, self.device), self.aspect)

    def sample(self, idx: torch.Tensor, gen: torch.Generator):
        return self.apply(idx, self.draw(idx, gen))


class VolumeStore(_Store):
    """3D training data: whole volumes (sizes may differ) in one flat buffer on the data device, each
    zero-padded by the largest margin the UA-MT crop can need, so that RandomRotFlip + RandomCrop of a
    whole batch is one index computation and one ``take``: the crop box is mapped back through the
    rotation/flip, which is then never applied to the whole volume.

    ``foreground`` (labeled stores): per volume, the flat voxel indices of every class present, for
    foreground-aware sampling (nnU-Net style; SemiSeg's option, off by default)."""

    def __init__(self, refs: list[CaseRef], patch: tuple[int, int, int], normalization: str, with_labels: bool,
                 rot_flip: bool = True):
        self.patch, self.rot_flip = tuple(patch), rot_flip
        self.shapes, self.margins, self.offsets, self.foreground = [], [], [], []
        arrays, offset = [], 0
        for ref in refs:
            img = ref.image()
            _check_finite(img.array, ref.name)
            arr = normalize(img.array, normalization)
            if arr.ndim != 3:
                raise SemiSegError(f"'{ref.name}' is not a 3D volume (shape {arr.shape})")
            lab = None
            if with_labels:
                lab = ref.label().array
                if lab.shape != img.array.shape:
                    raise SemiSegError(f"label of '{ref.name}' has shape {lab.shape}, image {img.array.shape}")
                lab = lab.astype(np.uint8, copy=False)
                flat = lab.reshape(-1)
                counts = np.bincount(flat, minlength=1)
                self.foreground.append([torch.from_numpy(np.flatnonzero(flat == c))
                                        for c in range(1, len(counts)) if counts[c] > 0])
            x, y, z = arr.shape
            m = max(ua_mt_crop_pads((x, y, z), self.patch) + ua_mt_crop_pads((y, x, z), self.patch))
            self.shapes.append((x, y, z))
            self.margins.append(m)
            self.offsets.append(offset)
            offset += (x + 2 * m) * (y + 2 * m) * (z + 2 * m)
            arrays.append((arr, lab))
        if not arrays:
            raise SemiSegError("no training volumes")
        # one flat buffer per kind, each volume written once into its zero-padded slot
        self.images = torch.zeros(offset, dtype=torch.float32)
        self.labels = torch.zeros(offset, dtype=torch.uint8) if with_labels else None
        for (arr, lab), (x, y, z), m, o in zip(arrays, self.shapes, self.margins, self.offsets):
            n = (x + 2 * m) * (y + 2 * m) * (z + 2 * m)
            inner = (slice(m, m + x), slice(m, m + y), slice(m, m + z))
            self.images[o:o + n].view(x + 2 * m, y + 2 * m, z + 2 * m)[inner] = torch.from_numpy(arr)
            if lab is not None:
                self.labels[o:o + n].view(x + 2 * m, y + 2 * m, z + 2 * m)[inner] = torch.from_numpy(lab)
        del arrays
        self.device = torch.device("cpu")
        self._aranges = None

    def __len__(self) -> int:
        return len(self.shapes)

    def to(self, device: torch.device) -> "VolumeStore":
        self._move(device)
        self._aranges = None
        return self

    def draw(self, idx: torch.Tensor, gen: torch.Generator, forced: list[bool] | None = None) -> torch.Tensor:
        """Per sample, the reference's draws (rot90 k, flip axis, then the three crop offsets; or, for a
        ``forced`` sample of a volume with foreground, a class then a voxel of it), turned into the
        crop's flat-index arithmetic: (B, 3) = (start, step along patch x, step along patch y)."""
        px, py, pz = self.patch
        out = []
        for s, v in enumerate(idx.tolist()):
            x, y, z = self.shapes[v]
            if self.rot_flip:
                k = int(torch.randint(0, 4, (1,), generator=gen))
                axis = int(torch.randint(0, 2, (1,), generator=gen))
                (ox, xi, xj), (oy, yi, yj) = rot_flip_source_map(k, axis, x, y)
            else:
                k, (ox, xi, xj), (oy, yi, yj) = 0, (0, 1, 0), (0, 0, 1)
            rs = (x, y, z) if k % 2 == 0 else (y, x, z)
            pads = ua_mt_crop_pads(rs, self.patch)
            padded = [r + 2 * p for r, p in zip(rs, pads)]
            fg = self.foreground[v] if (forced is not None and forced[s] and self.foreground) else []
            if fg:
                cls = fg[int(torch.randint(0, len(fg), (1,), generator=gen))]
                vox = int(cls[int(torch.randint(0, len(cls), (1,), generator=gen))])
                sx_, sy_, sz_ = vox // (y * z), (vox // z) % y, vox % z
                if xi != 0:  # invert the signed permutation: rotated-frame coordinates of the voxel
                    ri, rj = (sx_ - ox) * xi, (sy_ - oy) * yj
                else:
                    ri, rj = (sy_ - oy) * yi, (sx_ - ox) * xj
                centre = (ri, rj, sz_)
                starts = [min(max(c + p - q // 2, 0), n - q) for c, p, q, n in zip(centre, pads, self.patch, padded)]
            else:
                starts = [int(torch.randint(0, n - q + 1, (1,), generator=gen)) for n, q in zip(padded, self.patch)]
            a0, a1, a2 = (st - p for st, p in zip(starts, pads))  # patch origin in the unpadded rotated frame
            m = self.margins[v]
            sy = z + 2 * m
            sx = (y + 2 * m) * sy
            start = (self.offsets[v] + m * (sx + sy + 1) + (ox + xi * a0 + xj * a1) * sx
                     + (oy + yi * a0 + yj * a1) * sy + a2)
            out.append((start, xi * sx + yi * sy, xj * sx + yj * sy))
        return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)

    def apply(self, idx: torch.Tensor, params: torch.Tensor):
        params = to_device(params, self.device)
        if self._aranges is None:
            self._aranges = [torch.arange(p, device=self.device) for p in self.patch]
        ai, aj = self._aranges[:2]
        plane = (params[:, 0, None, None] + ai[None, :, None] * params[:, 1, None, None]
                 + aj[None, None, :] * params[:, 2, None, None]).reshape(-1)  # (B·X·Y,) start of each z run
        shape = (params.shape[0],) + self.patch
        # z runs are contiguous in the buffer: gather whole rows of an overlapping (L - Z + 1, Z) view
        img = self._rows(self.images).index_select(0, plane).reshape(shape).unsqueeze(1)
        lab = self._rows(self.labels).index_select(0, plane).reshape(shape) if self.labels is not None else None
        return img, lab

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        z = self.patch[2]
        return flat.as_strided((flat.numel() - z + 1, z), (1, 1))

    def sample(self, idx: torch.Tensor, gen: torch.Generator, forced: list[bool] | None = None):
        return self.apply(idx, self.draw(idx, gen, forced))
