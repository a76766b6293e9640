"""Training batches: cases loaded once into memory (the stores of :mod:`semiseg.data.stores`, on the
training device when they fit), two-stream sampling (labeled first, then unlabeled: SSL4MIS
``TwoStreamBatchSampler``) and the literature's augmentations applied to whole batches in tensor operations. All randomness comes from one CPU
``torch.Generator`` (same draws, same order as the per-sample reference transforms in
transforms.py) whose state, with the samplers', is saved in checkpoints."""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..errors import SemiSegError
from .datasets import CaseRef
from .stores import SliceStore, VolumeStore, to_device  # noqa: F401 (SliceStore, VolumeStore: re-exported)


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
        return Batch(to_device(li, d), to_device(ll, d).long(), to_device(ui, d) if ui is not None else None,
                     to_device(lidx, d), to_device(uidx, d) if uidx is not None else None,
                     [to_device(x, d) for x in extra])

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
