"""What this machine can train on: torch and CUDA versions, GPUs with their memory, Apple's MPS, the CPU.

``semiseg devices`` prints it (``--json`` for programs); the Slicer module reads it from that command in a
short child process, so that Slicer's own process never imports torch or initialises a GPU.
"""
from __future__ import annotations

import os
import platform


def mps_available() -> bool:
    import torch
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe() -> dict:
    """torch/CUDA versions, GPUs, MPS, CPU, and the device choices a user can pick:
    ``choices = [[value, label], ...]`` with ``auto`` first and the CPU last (what `--device` accepts)."""
    info: dict = {"torch": None, "cuda": None, "gpus": [], "mps": False,
                  "cpu": {"name": platform.processor() or platform.machine(), "cores": os.cpu_count() or 1},
                  "choices": [], "error": ""}
    try:
        import torch

        from . import machine
    except Exception as e:  # noqa: BLE001 - a missing or broken torch is a fact to report, not a crash
        info["error"] = f"PyTorch cannot be imported ({type(e).__name__}: {e})"
        info["choices"] = [["cpu", "CPU"]]
        return info
    m = machine.describe()
    info["cpu"] = {"name": m["cpu"], "cores": m["cores"], "native_bf16": m["native_bf16"]}
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    info["mps"] = mps_available()
    gpus = info["gpus"]
    if gpus:
        auto = f"Auto (GPU {gpus[0]['index']}: {gpus[0]['name']})"
    elif info["mps"]:
        auto = "Auto (Apple GPU, MPS)"
    else:
        auto = "Auto (CPU: no GPU found)"
    info["choices"] = [["auto", auto]]
    info["choices"] += [[f"cuda:{g['index']}", f"GPU {g['index']}: {g['name']}, {g['memory_gb']:g} GB"] for g in gpus]
    if info["mps"]:
        info["choices"].append(["mps", "Apple GPU (MPS)"])
    info["choices"].append(["cpu", f"CPU ({info['cpu']['cores']} cores)"])
    return info


def summary(info: dict) -> str:
    """One line: ``torch 2.13.0 (CUDA 12.4); GPU 0 NVIDIA ... (80 GB)`` or why torch is unusable."""
    if info.get("error"):
        return info["error"]
    build = f"CUDA {info['cuda']}" if info.get("cuda") else "CPU-only build"
    parts = [f"GPU {g['index']} {g['name']} ({g['memory_gb']:g} GB)" for g in info.get("gpus", [])]
    if info.get("mps"):
        parts.append("Apple GPU (MPS)")
    bf16 = ", native bf16" if info["cpu"].get("native_bf16") else ""
    return f"torch {info['torch']} ({build}); " + ("; ".join(parts) or "no GPU visible") + \
        f"; CPU {info['cpu']['name']} ({info['cpu']['cores']} cores{bf16})"
