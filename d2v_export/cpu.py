"""Facts about the CPU this process runs on, read once from /proc/cpuinfo (empty where it does not exist).

Used by the report (where the numbers came from), doctor, device profiles and the INT8 weight-range rule.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags a report records: the ones that change which INT8 / bf16 kernels run.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni")


def cpuinfo() -> list[str]:
    """The lines of /proc/cpuinfo."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo lists (x86 "flags", Arm "Features"); empty where it does not exist."""
    for line in cpuinfo():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name() -> str:
    for line in cpuinfo():
        if line.startswith(("model name", "Hardware", "Model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cores_available() -> int:
    """The cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
