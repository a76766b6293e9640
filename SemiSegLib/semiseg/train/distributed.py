"""Data-parallel training over several processes (torch.distributed), one process per device.

Started by ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). Every rank builds the same network from the same seed, draws the
same *global* batch indices and augmentations and trains on its contiguous slice of each stream;
DistributedDataParallel averages the gradients, so with a per-sample mean loss and no batch-coupled
statistics one step equals a one-process step on the concatenated global batch (tested in
``Testing/test_distributed.py``). Batch normalisation couples samples: ``sync_bn`` (CUDA only)
computes the statistics over the global batch; without it (always on CPU/gloo) each rank normalises
with its own slice's statistics.

Rank 0 alone writes the run folder and validates; the other ranks wait at barriers.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SemiSegError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this module created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup(device_name: str, timeout_s: float = 1800.0) -> tuple[DistInfo, str]:
    """Join the process group when launched with ``WORLD_SIZE > 1``. Returns the rank information and
    the device this rank trains on (``cuda:LOCAL_RANK`` on GPUs, ``cpu`` otherwise)."""
    world = env_world_size()
    if world <= 1:
        return DistInfo(), device_name
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SemiSegError(f"device '{device_name}' requested but CUDA is not available on rank {rank}")
        if local >= torch.cuda.device_count():
            raise SemiSegError(f"rank {rank} has LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) "
                               "are visible (use --nproc_per_node <= the GPU count)")
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    else:
        device_name = "cpu"
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    if dist.get_world_size() != world:
        raise SemiSegError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DistInfo(rank, world, local, created), device_name


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def check_divisible(info: DistInfo, labeled_batch: int, unlabeled_batch: int) -> None:
    """Batch sizes are global: every stream must split evenly over the ranks."""
    if not info.enabled:
        return
    for name, b in (("labeled_batch", labeled_batch), ("unlabeled_batch", unlabeled_batch)):
        if b % info.world_size:
            raise SemiSegError(f"--{name.replace('_', '-')} {b} is the global batch and must divide by the "
                               f"{info.world_size} processes (e.g. {max(info.world_size, b - b % info.world_size)})")


def convert_sync_bn(module: torch.nn.Module, info: DistInfo, device: torch.device, enabled: bool) -> torch.nn.Module:
    """BatchNorm → SyncBatchNorm (global-batch statistics) when several CUDA ranks train; SyncBatchNorm has
    no CPU kernel, so on CPU each rank keeps its own statistics."""
    if info.enabled and enabled and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device, find_unused_parameters: bool = False):
    """DistributedDataParallel over ``module`` (the Method: its ``forward(batch, step)`` returns the loss
    terms). Parameters that do not require grad (the EMA teacher) are not reduced. Construction
    broadcasts rank 0's parameters and buffers, so every rank starts from identical weights."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = {"device_ids": [device.index if device.index is not None else 0]} if device.type == "cuda" else {}
    return DDP(module, find_unused_parameters=find_unused_parameters, **kw)


def all_reduce_mean(values: dict[str, torch.Tensor], info: DistInfo, extra: float = 0.0) -> tuple[dict[str, float], float]:
    """One collective for a log window: the mean of every logged term over the ranks, and the SUM over the
    ranks of ``extra`` (used for the stop flag, so cancellation reaches every rank at the same step).
    Reads the values to the host once."""
    keys = list(values)  # the method's order (the same on every rank; consumers show the terms in this order)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys] +
                       [torch.tensor(float(extra), device=values[keys[0]].device if keys else "cpu")])
    if info.enabled:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat[:-1] /= info.world_size
    host = flat.cpu().tolist()
    return dict(zip(keys, host[:-1])), host[-1]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (a small picklable object), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
