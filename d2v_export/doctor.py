"""`d2v-export doctor`: what this machine can build and run, and why not where it cannot.

    d = diagnose()          # a JSON-able dict
    print(format_text(d))

Nothing here imports torch or transformers (versions come from package metadata), so the command
is quick; each runtime is imported only by its backend's ``available()`` and ``diagnose()``, which
also say what is specific to a target (OpenVINO's devices), and plug-ins that did not load are listed.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .cpu import cpu_flags, cpu_name, cpuinfo as _cpuinfo  # one reader of /proc/cpuinfo (cpu.py)

CORE_PACKAGES = ("d2v-export", "torch", "transformers", "onnx", "onnxscript")
PEER_PACKAGES = ("optimum", "optimum-intel", "numpy")  # listed after every target's own (Backend.packages)

CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "asimddp",
)
_CORE_KEYS = ("versions", "platform", "cpu", "gpu", "targets")  # a target's diagnose() never replaces these


def packages() -> tuple[str, ...]:
    """The distributions whose versions doctor lists: the core, every target's, then the peers."""
    from . import backends

    return tuple(dict.fromkeys((*CORE_PACKAGES, *backends.packages(), *PEER_PACKAGES)))


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cores() -> dict[str, int | None]:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = None
    ids = set()
    phys = core = None
    for line in _cpuinfo() + [""]:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core is not None:
                ids.add((phys, core))
            phys = core = None
    if ids:
        physical = len(ids)
    return {"logical": os.cpu_count(), "physical": physical, "available": available}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__


def _targets() -> list[dict[str, Any]]:
    from . import backends

    out = []
    for name in backends.names():
        backend = backends.get(name)
        try:
            avail = backend.available()
            row = {
                "name": name,
                "available": bool(avail.ok),
                "version": avail.version or _version(name),
                "devices": list(avail.devices),
                "reason": avail.reason or None,
            }
        except Exception as exc:  # noqa: BLE001 - doctor reports every failure, it never crashes on one
            row = {
                "name": name,
                "available": False,
                "version": None,
                "devices": [],
                "reason": f"available() failed: {_one_line(exc)}",
            }
        row["precisions"] = [p.value for p in backend.precisions]
        row["extra"] = backend.extra or None
        out.append(row)
    for label, reason in backends.broken().items():  # plug-ins that did not load
        out.append(
            {
                "name": label,
                "available": False,
                "version": None,
                "devices": [],
                "reason": reason,
                "precisions": [],
                "extra": None,
            }
        )
    return sorted(out, key=lambda r: r["name"])


def _details() -> dict[str, Any]:
    """What each target's ``diagnose()`` adds (OpenVINO: its devices), under the target's name."""
    from . import backends

    out: dict[str, Any] = {}
    for name in backends.names():
        try:
            details = backends.get(name).diagnose()
        except Exception as exc:  # noqa: BLE001
            details = {"available": False, "reason": f"diagnose() failed: {_one_line(exc)}"}
        if details is not None:
            out[name] = dict(details)
    return out


def _nvidia_gpus() -> list[str]:
    """GPU names from nvidia-smi (or the driver's /proc entries); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if done.returncode == 0:
                return [line.strip() for line in done.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    gpus = []
    root = Path("/proc/driver/nvidia/gpus")
    if root.is_dir():
        for info in sorted(root.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    gpus.append(line.split(":", 1)[1].strip())
    return gpus


def _gpu() -> dict[str, Any]:
    nvidia = _nvidia_gpus()
    providers: list[str] = []
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        pass
    return {
        "nvidia": nvidia,
        "present": bool(nvidia),
        "onnxruntime_providers": providers,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def diagnose() -> dict[str, Any]:
    """Versions, CPU, GPU and every target's availability (with the reason when it is not)."""
    flags = cpu_flags()
    versions = {"python": platform.python_version()} | {pkg: _version(pkg) for pkg in packages()}
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpu": {
            "model": cpu_name(),
            "machine": platform.machine(),
            "cores": _cores(),
            "flags": {f: f in flags for f in _relevant_flags()} if flags else {},
            "int8_acceleration": _int8_hint(flags),
        },
        "gpu": _gpu(),
        "targets": _targets(),
    } | {name: details for name, details in _details().items() if name not in _CORE_KEYS}


def _relevant_flags() -> tuple[str, ...]:
    arm = platform.machine().lower() in ("aarch64", "arm64") or platform.machine().lower().startswith("arm")
    return tuple(f for f in CPU_FLAGS if f.startswith(("neon", "asimd")) == arm)


def _int8_hint(flags: frozenset[str]) -> str:
    if {"amx_int8", "amx_tile"} <= flags:
        return "AMX (fastest INT8 on CPU)"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "VNNI (INT8 dot products)"
    if "asimddp" in flags:
        return "Arm dot product (SDOT/UDOT)"
    if "avx2" in flags:
        return "AVX2 only (INT8 helps less than with VNNI)"
    return "unknown" if not flags else "none found"


def format_text(d: dict[str, Any]) -> str:
    """The report for a console."""
    v = d["versions"]
    lines = ["d2v-export doctor", ""]
    lines.append("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".")
    missing = [k for k, val in v.items() if not val]
    if missing:
        lines.append("not installed: " + ", ".join(missing) + ".")
    cpu = d["cpu"]
    cores = cpu["cores"]
    have = [f for f, ok in cpu["flags"].items() if ok]
    lines += [
        "",
        f"CPU: {cpu['model']} ({cpu['machine']}), {cores['available']} of {cores['logical']} logical cores available"
        + (f", {cores['physical']} physical" if cores.get("physical") else ""),
        f"  flags: {', '.join(have) or 'none of interest'}; INT8: {cpu['int8_acceleration']}",
    ]
    gpu = d["gpu"]
    lines.append("GPU: " + ("; ".join(gpu["nvidia"]) if gpu["present"] else "no NVIDIA GPU found"))
    lines += ["", "targets:"]
    for t in d["targets"]:
        mark = "ok " if t["available"] else "no "
        ver = f" {t['version']}" if t.get("version") else ""
        devices = f" (devices: {', '.join(t['devices'])})" if t.get("devices") else ""
        line = f"  [{mark}] {t['name']}{ver}{devices}"
        if not t["available"]:
            line += f": {t['reason']}"
        lines.append(line)
    from . import backends

    for t in d["targets"]:
        if isinstance(d.get(t["name"]), dict) and t["name"] in backends.names():
            lines += backends.get(t["name"]).diagnosis_lines(d[t["name"]])
    return "\n".join(lines) + "\n"
