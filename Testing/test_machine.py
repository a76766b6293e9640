"""semiseg.machine: the CPU's bf16 capability decides the automatic precision, and the glibc allocator setting
keeps freed large buffers in the process (checked in a fresh subprocess, where it is applied or left off)."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semiseg import machine
from semiseg.train import device
from semiseg.train.loop import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("features,native", [
    ({"avx512_bf16": True, "amx": False}, True), ({"avx512_bf16": False, "amx": True}, True),
    ({"avx512_bf16": False, "amx": False, "avx512": True, "avx2": True}, False), ({}, False)])
def test_native_bf16_needs_avx512_bf16_or_amx(features, native):
    assert machine.native_bf16(features) is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_the_cpu_is_bf16_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(device, "native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", True, cpu) is (torch.bfloat16 if native else None)
    assert resolve_precision("auto", False, cpu) is None  # --no-amp: fp32
    assert resolve_precision("fp32", True, cpu) is None  # --precision fp32 on request
    assert resolve_precision("bf16", True, cpu) is torch.bfloat16


def test_describe_names_the_bf16_instruction_sets():
    m = machine.describe()
    assert m["native_bf16"] == (m["avx512_bf16"] or m["amx"])
    assert m["cores"] >= 1 and m["threads"] == torch.get_num_threads()
    line = machine.format_machine(m)
    assert line.startswith("machine: ") and (("avx512_bf16" in line) == m["avx512_bf16"])


_PROBE = """
import ctypes, sys
from semiseg.machine import keep_freed_memory
setting = sys.argv[1]
status = keep_freed_memory(setting != "off")
if setting == "on-then-off":                 # applied, then turned off in the same process
    status = keep_freed_memory(False)
if setting == "large-parameters":            # applied, then a run with a 1 GB parameter tensor
    status = keep_freed_memory(True, largest_parameter_bytes=1 << 30)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
n = 256 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)  # touch every page: resident
held = rss_mb()
libc.free(p)
print(status, round(held - rss_mb()))
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator setting exists on glibc only")
@pytest.mark.parametrize("setting", ["on", "off", "on-then-off", "large-parameters"])
def test_keep_freed_memory_keeps_a_freed_256_mb_block_resident(setting):
    """glibc's default returns a freed 256 MB block to the kernel at once (mmap'ed: RSS drops by 256 MB, and the
    next iteration faults it in again); with the setting applied the block stays in the process for reuse.
    Turned off after being applied, or asked for by a run with a parameter tensor over 64 MB, glibc's defaults
    are back: the block is returned again."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "SemiSegLib"), os.environ.get("PYTHONPATH", "")]))
    env.pop("MALLOC_MMAP_MAX_", None), env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, setting], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.rsplit(None, 1)
    status, released_mb = out[0], int(out[1])
    if setting == "on":
        assert status == "applied" and released_mb < 16
    else:
        assert released_mb > 240
        assert status == ("skipped: parameter tensors of 1,024 MB" if setting == "large-parameters" else "off")


def test_keep_freed_memory_is_skipped_where_there_is_no_glibc(monkeypatch):
    monkeypatch.setitem(machine._allocator_state, "status", "default")
    monkeypatch.setattr(machine.platform, "libc_ver", lambda: ("", ""))
    def no_libc(*a, **k):
        raise AssertionError("libc must not be loaded")
    monkeypatch.setattr(machine.ctypes, "CDLL", no_libc)
    assert machine.keep_freed_memory(True) == "not glibc"
    assert machine.allocator_status() == "not glibc"
