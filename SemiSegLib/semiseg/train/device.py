"""Device, precision and memory layout of a training run: which device, which autocast dtype, seeding,
peak memory, channels-last batches (the training loop's helpers, also used by ``semiseg bench`` and the CLI)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..errors import SemiSegError
from ..machine import native_bf16


def select_device(name: str) -> torch.device:
    """``auto``: a CUDA GPU, else Apple's MPS (Apple-silicon Macs), else the CPU."""
    from ..devices import mps_available
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if name == "mps":
        if not mps_available():
            raise SemiSegError("device 'mps' requested but Apple's MPS backend is not available (it needs an "
                               "Apple-silicon Mac and a torch build with MPS; use --device cpu)")
    elif name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SemiSegError(f"device '{name}' requested but CUDA is not available "
                               f"(torch {torch.__version__}; use --device cpu or install a CUDA build of torch)")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise SemiSegError(f"device '{name}' requested but only {torch.cuda.device_count()} GPU(s) are visible")
    elif name != "cpu":
        raise SemiSegError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N, mps)")
    return torch.device(name)


def check_compiler(device: torch.device) -> None:
    """``--compile`` on a CPU: torch.compile's code generator (inductor) builds C++ with the machine's compiler,
    which Slicer's machines and most laptops lack; without one the first forward fails deep inside PyTorch.
    Said in one line before training starts instead."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: inductor reports for itself
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - InvalidCxxCompiler, or MSVC's checks on Windows
        raise SemiSegError("--compile on the CPU needs a C++ compiler for torch.compile and none was found "
                           "(install g++ or clang, or MSVC on Windows, or name one in CXX); or train without "
                           "--compile") from e


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only (not on Windows Slicer)
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def resolve_precision(precision: str, amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32). ``auto``: bf16 on a CUDA GPU that supports it, fp16 (with loss
    scaling) on other GPUs, bf16 on a CPU with native bf16 arithmetic (:func:`semiseg.machine.native_bf16`),
    fp32 on other CPUs; ``amp=False`` makes ``auto`` fp32 (older configs)."""
    if precision in ("", "auto"):
        if not amp:
            return None
        if device.type != "cuda":
            return torch.bfloat16 if device.type == "cpu" and native_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SemiSegError("--precision bf16: this GPU does not support bfloat16 (use fp16 or auto)")
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise SemiSegError("--precision fp16 needs a CUDA device (on the CPU use bf16 or fp32)")
        return torch.float16
    raise SemiSegError(f"unknown precision '{precision}' (auto, fp32, bf16, fp16)")


def _channels_last(batch, cl: torch.memory_format):
    batch.labeled_image = batch.labeled_image.contiguous(memory_format=cl)
    if batch.unlabeled_image is not None:
        batch.unlabeled_image = batch.unlabeled_image.contiguous(memory_format=cl)
    batch.extra_unlabeled = [t.contiguous(memory_format=cl) for t in batch.extra_unlabeled]
    return batch
