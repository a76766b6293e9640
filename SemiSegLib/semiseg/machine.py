"""The computer a run trains on, and the process-wide settings that make training fast on it.

- :func:`describe`: CPU model, cores, the instruction sets that decide the precision (AVX512-BF16, AMX),
  torch's threads; printed by ``semiseg bench`` and the plan.
- :func:`native_bf16`: the CPU computes bfloat16 natively, so bf16 autocast is the fast precision there
  (oneDNN convolutions and matrix products at about 2.8x the fp32 rate on an AVX512-BF16 CPU; without the
  instructions bf16 is emulated and slower than fp32).
- :func:`keep_freed_memory`: glibc's ``mallopt`` so the large tensor buffers of one iteration are reused by
  the next instead of being returned to the kernel and faulted in again (a third of the CPU time of an
  fp32 ACDC iteration was kernel page-fault time before). Same effect as the environment variables
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`` (glibc manual, "Memory Allocation Tunables").
"""
from __future__ import annotations

import ctypes
import os
import platform
from functools import lru_cache

import torch

# glibc <malloc.h> parameter numbers (stable ABI)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
GLIBC_MMAP_MAX = 65536              # glibc's defaults (mallopt(3))
GLIBC_TRIM_THRESHOLD = 128 * 1024
LARGE_PARAMETER_BYTES = 64 << 20    # keep_freed_memory is skipped for runs with a parameter tensor larger than this

_allocator_state = {"status": "default"}  # what keep_freed_memory did in this process


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", set()) where there is none (macOS, Windows)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def _torch_cpu_check(name: str) -> bool | None:
    """torch's own CPU feature probes (cpuinfo library, every OS); None where this torch lacks them."""
    fn = getattr(torch.cpu, name, None)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a probe that fails means "unknown", not an error of the run
        return None


@lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool]:
    """The instruction sets that decide the CPU precision: from torch's probes, else /proc/cpuinfo flags."""
    _, flags = _cpuinfo()
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported",
              "avx512": "_is_avx512_supported", "avx2": "_is_avx2_supported"}
    flag_names = {"avx512_bf16": ("avx512_bf16",), "amx": ("amx_bf16", "amx_tile"), "avx512": ("avx512f",),
                  "avx2": ("avx2",)}
    out = {}
    for key, probe in probes.items():
        found = _torch_cpu_check(probe)
        out[key] = found if found is not None else any(f in flags for f in flag_names[key])
    return out


def native_bf16(features: dict[str, bool] | None = None) -> bool:
    """The CPU has bfloat16 arithmetic (AVX512-BF16 or AMX): bf16 autocast is faster than fp32 there."""
    f = cpu_features() if features is None else features
    return bool(f.get("avx512_bf16") or f.get("amx"))


def keep_freed_memory(enabled: bool = True, largest_parameter_bytes: int = 0) -> str:
    """Ask glibc to keep freed memory in the process: no ``mmap`` for large blocks (``M_MMAP_MAX`` 0; they
    come from the heap and are reused) and no trimming of the heap top (``M_TRIM_THRESHOLD`` -1, "never").
    Returns what happened: ``applied``, ``off`` (``enabled`` False: glibc's defaults), ``skipped: ...``
    (a parameter tensor larger than ``LARGE_PARAMETER_BYTES``: glibc's defaults), ``not glibc`` (macOS,
    Windows, musl: nothing to do, nothing done) or ``failed``. Process-wide; turning it off after it was
    applied restores glibc's defaults for the allocations that follow.

    Why the size limit: the setting pays off for activation buffers freed and re-allocated every iteration.
    With parameter tensors of a gigabyte (ICL's exact token MLPs at 256x256), their gradients, momentum and
    autocast copies are allocated at different points of an iteration and leave holes in a heap that is
    never returned: a 2-iteration ICL run on ACDC peaked at 18.4 GB with glibc's defaults and was killed
    for memory above 24 GB with the setting."""
    if enabled and largest_parameter_bytes > LARGE_PARAMETER_BYTES:
        _glibc_defaults()
        _allocator_state["status"] = f"skipped: parameter tensors of {largest_parameter_bytes / 2 ** 20:,.0f} MB"
        return _allocator_state["status"]
    if not enabled:
        _glibc_defaults()
        if _allocator_state["status"] != "not glibc":
            _allocator_state["status"] = "off"
        return _allocator_state["status"]
    if _allocator_state["status"] == "applied":
        return "applied"
    if not _glibc():
        _allocator_state["status"] = "not glibc"
        return "not glibc"
    _allocator_state["status"] = "applied" if _mallopt(mmap_max=0, trim_threshold=-1) else "failed"
    return _allocator_state["status"]


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _mallopt(mmap_max: int, trim_threshold: int) -> bool:
    """Set glibc's ``M_MMAP_MAX`` and ``M_TRIM_THRESHOLD``; True when both were accepted."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):
        return False


def _glibc_defaults() -> None:
    """Undo :func:`keep_freed_memory` where it was applied (glibc's documented defaults)."""
    if _allocator_state["status"] == "applied":
        _mallopt(GLIBC_MMAP_MAX, GLIBC_TRIM_THRESHOLD)


def allocator_status() -> str:
    return _allocator_state["status"]


def describe() -> dict:
    """The machine in a few JSON-ready fields (for ``semiseg bench`` and the budget planner)."""
    model, _ = _cpuinfo()
    features = cpu_features()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count() or 1,
        "avx512_bf16": features["avx512_bf16"], "amx": features["amx"], "native_bf16": native_bf16(features),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "allocator": allocator_status(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }


def format_machine(m: dict) -> str:
    flags = ", ".join(k for k in ("avx512_bf16", "amx") if m.get(k)) or "no native bf16"
    gpu = f"; GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"machine: {m['cpu']} ({m['cores']} logical cores; {flags}; torch {m['cpu_capability']}; "
            f"{m['threads']} threads, {m['interop_threads']} inter-op; allocator {m['allocator']}){gpu}")
