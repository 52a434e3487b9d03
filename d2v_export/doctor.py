"""`d2v-export doctor`: what this machine can build and run, and why not where it cannot.

    d = diagnose()          # a JSON-able dict
    print(format_text(d))

Nothing here imports torch or transformers (versions come from package metadata), so the command
is quick; each runtime is imported only by its backend's ``available()``.
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

PACKAGES = ("d2v-export", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "openvino", "nncf", "tensorrt", "cuda-python", "optimum", "optimum-intel", "numpy")  # fmt: skip
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp")  # fmt: skip
# Targets d2v-export knows even when their backend module is not installed in this build.
KNOWN_TARGETS = {
    "tensorrt": "pip install 'd2v-export[tensorrt]' --extra-index-url https://pypi.nvidia.com on a machine with an NVIDIA GPU",
}


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
            row = {"name": name, "available": bool(avail.ok), "version": avail.version or _version(name),
                   "devices": list(avail.devices), "reason": avail.reason or None}  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - doctor reports every failure, it never crashes on one
            row = {"name": name, "available": False, "version": None, "devices": [], "reason": f"available() failed: {_one_line(exc)}"}
        row["precisions"] = [p.value for p in getattr(backend, "precisions", ())]
        row["extra"] = getattr(backend, "extra", "") or None
        out.append(row)
    for name, install in KNOWN_TARGETS.items():
        if name not in backends.names():
            out.append({"name": name, "available": False, "version": _real_tensorrt_version() if name == "tensorrt" else None,
                        "devices": [], "reason": _tensorrt_reason(install) if name == "tensorrt" else install,
                        "precisions": [], "extra": name})  # fmt: skip
    return sorted(out, key=lambda r: r["name"])


def _real_tensorrt_version() -> str | None:
    try:
        import tensorrt

        return str(getattr(tensorrt, "__version__", "")) or None
    except Exception:  # noqa: BLE001
        return None


def _tensorrt_reason(install: str) -> str:
    """Why TensorRT cannot run here, when this build of d2v-export has no tensorrt backend module."""
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        if isinstance(exc, ModuleNotFoundError):
            return f"the tensorrt package is not installed; {install}"
        return f"tensorrt does not import ({_one_line(exc)}); {install}"
    if not hasattr(tensorrt, "Builder"):
        return f"only a stub 'tensorrt' package is installed (no runtime library); {install}"
    if not _nvidia_gpus():
        return "tensorrt imports but there is no NVIDIA GPU here (nvidia-smi finds none)"
    return "this build of d2v-export has no tensorrt backend module; upgrade d2v-export"


def _nvidia_gpus() -> list[str]:
    """GPU names from nvidia-smi (or the driver's /proc entries); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
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


def _openvino() -> dict[str, Any]:
    try:
        import openvino as ov
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "reason": f"openvino does not import ({_one_line(exc)}); pip install 'd2v-export[openvino]'", "devices": []}
    try:
        core = ov.Core()
        names = list(core.available_devices)
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "reason": f"OpenVINO finds no device ({_one_line(exc)})", "devices": []}
    devices = []
    for name in names:
        row: dict[str, Any] = {"name": name}
        for key, prop in (("full_name", "FULL_DEVICE_NAME"), ("capabilities", "OPTIMIZATION_CAPABILITIES"), ("precision_hint", "INFERENCE_PRECISION_HINT")):
            try:
                value = core.get_property(name, prop)
                row[key] = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(getattr(value, "type_name", None) or value)
            except Exception:  # noqa: BLE001 - not every device has every property
                row[key] = None
        devices.append(row)
    return {"available": True, "version": ov.__version__, "devices": devices}


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
    versions = {"python": platform.python_version()} | {pkg: _version(pkg) for pkg in PACKAGES}
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
        "openvino": _openvino(),
    }


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
    ov = d["openvino"]
    if ov["available"]:
        lines += ["", "OpenVINO devices:"]
        for dev in ov["devices"]:
            caps = ", ".join(dev.get("capabilities") or []) or "unknown"
            lines.append(f"  {dev['name']}: {dev.get('full_name') or '?'}; capabilities {caps}; default precision {dev.get('precision_hint') or '?'}")
    return "\n".join(lines) + "\n"
