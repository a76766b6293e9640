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


def keep_freed_memory(enabled: bool = True) -> str:
    """Ask glibc to keep freed memory in the process: no ``mmap`` for large blocks (``M_MMAP_MAX`` 0; they
    come from the heap and are reused) and no trimming of the heap top (``M_TRIM_THRESHOLD`` -1, "never").
    Returns what happened: ``applied``, ``off`` (``enabled`` False: glibc's defaults are left),
    ``not glibc`` (macOS, Windows, musl: nothing to do, nothing done) or ``failed``. Process-wide and
    idempotent; later calls with ``enabled`` True after an ``applied`` do nothing."""
    if not enabled:
        if _allocator_state["status"] != "applied":
            _allocator_state["status"] = "off"
        return _allocator_state["status"]
    if _allocator_state["status"] == "applied":
        return "applied"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _allocator_state["status"] = "not glibc"
        return "not glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        ok = False
    _allocator_state["status"] = "applied" if ok else "failed"
    return _allocator_state["status"]


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
