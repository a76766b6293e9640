"""Training batches: cases loaded once into memory (on the training device when they fit),
two-stream sampling (labeled first, then unlabeled: SSL4MIS ``TwoStreamBatchSampler``) and the literature's
augmentations applied to whole batches in tensor operations. All randomness comes from one CPU
``torch.Generator`` (same draws, same order as the per-sample reference transforms in
transforms.py) whose state, with the samplers', is saved in checkpoints."""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SemiSegError
from .datasets import CaseRef
from .transforms import (BatchedRandomGenerator2D, normalize, rot_flip_source_map, ua_mt_crop_pads,
                         zoom_nearest)


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


_AUG_CACHE: dict = {}


def _aug_2d(size: tuple[int, int], device: torch.device) -> BatchedRandomGenerator2D:
    key = (tuple(size), str(device))
    if key not in _AUG_CACHE:
        _AUG_CACHE[key] = BatchedRandomGenerator2D(size, device)
    return _AUG_CACHE[key]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not block the host (pinned staging) when going to a GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class SliceStore:
    """2D training data: every slice resized once to the training size (nearest, as SSL4MIS), kept as one
    (N, 1 + X·Y) tensor on the data device; a batch is one row copy plus one gather (batched RandomGenerator)."""

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

    def nbytes(self) -> int:
        return self._flat_images.nbytes + (self._flat_labels.nbytes if self._flat_labels is not None else 0)

    def to(self, device: torch.device) -> "SliceStore":
        self.device = device
        self._flat_images = self._flat_images.to(device)
        self._flat_labels = self._flat_labels.to(device) if self._flat_labels is not None else None
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
        return self.aug.apply_indexed(self._flat_images, self._flat_labels, _to(idx, self.device),
                                      _to(params, self.device), self.aspect)

    def sample(self, idx: torch.Tensor, gen: torch.Generator):
        return self.apply(idx, self.draw(idx, gen))


class VolumeStore:
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

    def nbytes(self) -> int:
        return self.images.nbytes + (self.labels.nbytes if self.labels is not None else 0)

    def to(self, device: torch.device) -> "VolumeStore":
        self.device = device
        self.images = self.images.to(device)
        self.labels = self.labels.to(device) if self.labels is not None else None
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
        params = _to(params, self.device)
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


class BatchSource:
    """Two-stream batches: ``labeled_batch`` labeled then ``unlabeled_batch`` unlabeled samples each step.

    ``data_on_device``: auto (on a GPU when the data take at most ``DEVICE_FRACTION`` of its free memory),
    on, off (data and augmentation stay on the CPU; use ``prefetch`` to prepare batches in a background
    thread). ``foreground_share``: share of each labeled batch (its last round(b·share) samples) that shows a
    random present foreground class (nnU-Net style; 0 = the literature's uniform draws): a 3D patch centred on
    a voxel of it, a 2D slice that contains it.
    ``rank``/``world_size``: batch sizes are global; every rank draws the whole global batch from the
    same generator and returns its contiguous slice [rank·b/w, (rank+1)·b/w)."""

    DEVICE_FRACTION = 0.25

    def __init__(self, labeled: list[CaseRef], unlabeled: list[CaseRef], dim: int, patch: tuple[int, ...],
                 normalization: str, labeled_batch: int, unlabeled_batch: int, seed: int, device: torch.device,
                 extra_unlabeled_streams: int = 0, *, data_on_device: str = "auto", foreground_share: float = 0.0,
                 prefetch: int = 0, rank: int = 0, world_size: int = 1):
        if not labeled:
            raise SemiSegError("no labeled case: at least one labeled image is needed to train")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SemiSegError(f"rank {rank} is not in [0, world_size={world_size})")
        uses_unl = bool(unlabeled) and unlabeled_batch > 0
        for name, b in (("labeled", labeled_batch), ("unlabeled", unlabeled_batch if uses_unl else 0)):
            if b % world_size:
                raise SemiSegError(f"global {name} batch {b} is not divisible by world size {world_size}")
        if not 0.0 <= foreground_share <= 1.0:
            raise SemiSegError(f"foreground_share must be in [0, 1], not {foreground_share}")
        if data_on_device not in ("auto", "on", "off"):
            raise SemiSegError(f"data_on_device must be auto, on or off, not '{data_on_device}'")
        store = SliceStore if dim == 2 else VolumeStore
        self.labeled = store(labeled, tuple(patch), normalization, with_labels=True)
        self.unlabeled = store(unlabeled, tuple(patch), normalization, with_labels=False) if uses_unl else None
        self.labeled_batch, self.unlabeled_batch = labeled_batch, unlabeled_batch
        self.extra_streams = extra_unlabeled_streams if self.unlabeled is not None else 0
        self.device = torch.device(device)
        self.dim, self.foreground_share = dim, foreground_share
        self.rank, self.world_size = rank, world_size
        self.data_device = self._placement(data_on_device)
        for s in (self.labeled, self.unlabeled):
            if s is not None and self.data_device != s.device:
                s.to(self.data_device)
        self.gen = torch.Generator().manual_seed(seed)
        self.lab_stream = IndexStream(len(self.labeled), self.gen)
        self.unl_stream = IndexStream(len(self.unlabeled), self.gen) if self.unlabeled is not None else None
        self.prefetch = int(prefetch)
        self._thread, self._queue, self._stop, self._consumed = None, None, None, None

    def _placement(self, mode: str) -> torch.device:
        if self.device.type == "cpu" or mode == "off":
            return torch.device("cpu")
        if mode == "on":
            return self.device
        need = sum(s.nbytes() for s in (self.labeled, self.unlabeled) if s is not None)
        try:
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        except Exception:  # pragma: no cover - no query possible: stay on the host
            free = 0
        return self.device if need <= self.DEVICE_FRACTION * free else torch.device("cpu")

    def _forced(self, b: int) -> list[bool] | None:
        if self.foreground_share <= 0:
            return None
        n = int(math.floor(b * self.foreground_share + 0.5))
        return [i >= b - n for i in range(b)]

    def _shard(self, b: int) -> slice:
        per = b // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def _produce(self):
        """Draw the global batch (CPU generator, reference order), then build this rank's slice."""
        lidx = self.lab_stream.take(self.labeled_batch)
        forced = self._forced(self.labeled_batch)
        if forced is not None and self.dim == 2:
            lidx = self.labeled.foreground_slices(lidx, forced, self.gen)
        lp = self.labeled.draw(lidx, self.gen, forced)
        uidx, up, extra = None, None, []
        if self.unl_stream is not None:
            uidx = self.unl_stream.take(self.unlabeled_batch)
            up = self.unlabeled.draw(uidx, self.gen)
            for _ in range(self.extra_streams):  # e.g. UniMatch's mix batch: its own random draw of the pool
                xidx = torch.randint(0, len(self.unlabeled), (self.unlabeled_batch,), generator=self.gen)
                extra.append((xidx, self.unlabeled.draw(xidx, self.gen)))
        sl = self._shard(self.labeled_batch)
        li, ll = self.labeled.apply(lidx[sl], lp[sl])
        ui = None
        if uidx is not None:
            su = self._shard(self.unlabeled_batch)
            uidx = uidx[su]
            ui = self.unlabeled.apply(uidx, up[su])[0]
            extra = [self.unlabeled.apply(xi[su], xp[su])[0] for xi, xp in extra]
        return li, ll, ui, lidx[sl], uidx, extra

    def _finish(self, raw) -> Batch:
        li, ll, ui, lidx, uidx, extra = raw
        d = self.device
        return Batch(_to(li, d), _to(ll, d).long(), _to(ui, d) if ui is not None else None, _to(lidx, d),
                     _to(uidx, d) if uidx is not None else None, [_to(x, d) for x in extra])

    def next(self) -> Batch:
        if self.prefetch <= 0:
            return self._finish(self._produce())
        if self._thread is None:
            self._start()
        item, snap = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        self._consumed = snap
        return self._finish(item)

    # ---------------------------------------------------------------- background prefetch
    def _start(self) -> None:
        self._consumed = self._state()
        self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._worker, args=(self._queue, self._stop), daemon=True,
                                        name="semiseg-prefetch")
        self._thread.start()

    def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
        """Consumes the generator in exactly the order ``next`` would; records the sampler state after
        each batch so that ``state_dict`` describes the batches handed out, not those prepared."""
        try:
            while not stop.is_set():
                raw = self._produce()
                if self.device.type == "cuda":
                    raw = tuple(r.pin_memory() if isinstance(r, torch.Tensor) and r.device.type == "cpu" else r
                                for r in raw[:5]) + ([x.pin_memory() if x.device.type == "cpu" else x
                                                      for x in raw[5]],)
                item = (raw, self._state())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            q.put((e, None))

    def close(self) -> None:
        """Stop the prefetch thread (the sampler state stays that of the batches handed out)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        consumed = self._consumed
        self._thread, self._queue, self._stop, self._consumed = None, None, None, None
        self._restore(consumed)

    # ---------------------------------------------------------------- state
    def _state(self) -> dict:
        return {"gen": self.gen.get_state(), "lab": self.lab_stream.state_dict(),
                "unl": self.unl_stream.state_dict() if self.unl_stream else None}

    def _restore(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.lab_stream.load_state_dict(s["lab"])
        if self.unl_stream is not None and s.get("unl") is not None:
            self.unl_stream.load_state_dict(s["unl"])

    def state_dict(self) -> dict:
        return self._consumed if self._thread is not None else self._state()

    def load_state_dict(self, s: dict) -> None:
        self.close()
        self._restore(s)
