"""TensorRT on the device: build and run a d2v-export TensorRT bundle with TensorRT, CUDA Python and numpy.

Self-contained on purpose: standard library + numpy at import, ``tensorrt`` and ``cuda-python``
(``cuda.bindings.runtime``; a CUDA build of torch is used only if cuda-python is missing and torch is
there) imported when needed, Python 3.10+ (JetPack 6 ships 3.10). No torch, transformers, onnx or
onnxruntime. d2v-export imports it as ``d2v_export.backends.tensorrt.device`` and copies this file into every
TensorRT bundle as ``trt_device.py``, so that on a device with only TensorRT:

    python3 trt_device.py build  [--no-verify] [--device N] [--workspace-gb G] [--timing-cache F] [--iterations N]
    python3 trt_device.py run    INPUTS.npz [--output OUT.npz] [--device N]
    python3 trt_device.py probe
    python3 trt_device.py record [--tensorrt VERSION]   # after build_engine.sh: engine_manifest.json, manifest.json

``build`` verifies the bundle against its manifest.json (sha256 of every file; refused without one unless
``--no-verify``), reads build_recipe.json (its ``onnx``/``engine``/``timing_cache`` paths confined to the
bundle by the manifest's rule), builds ``model.plan``, benchmarks it with CUDA events and writes
``engine_manifest.json``; every file it writes goes to a temporary name first and is renamed into place.

Version gate (``tensorrt`` in the recipe): 10.0 for every precision. Every bundle is built strongly typed
with no precision flag (fp16 and the INT8 remainder are typed in the graph), which TensorRT 10.x and 11.x
both build; strongly typed networks and Q/DQ with fp16 scales parse from 10.0 (onnx-tensorrt 10.0 GA).
TensorRT 8.x (JetPack 6.0) is refused in one line; a version not in ``VERIFIED_VERSIONS`` builds with the
note "not verified on this version". Where the Python bindings cannot serve, the message names
``build_engine.sh`` (trtexec, the same recipe).

CUDA: cuda-python when it imports and works, else the CUDA runtime the device already has (``libcudart``
through ctypes: TensorRT links it; JetPack ships it), else a CUDA build of torch. ``install_hint`` names
what to install on this machine (x86/SBSA by driver version, Jetson by L4T release).

``record`` needs only the standard library (numpy is imported when present): build_engine.sh runs it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import enum
import functools
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

try:
    import numpy as np
except ImportError:  # `record` (run by build_engine.sh) needs only the standard library
    if not TYPE_CHECKING:
        np = None

if TYPE_CHECKING:  # checked by mypy against tensorrt-stubs; never imported at module load
    import tensorrt

if TYPE_CHECKING or __package__:
    from d2v_export.spec import D2VError, ExitCode
else:  # run as a file inside a bundle: the same one-line errors and exit codes, without the package

    class ExitCode(enum.IntEnum):
        OK = 0
        INTERNAL = 1
        USAGE = 2
        BAD_INPUT = 3
        TARGET_UNAVAILABLE = 6

    class D2VError(Exception):
        code: ExitCode = ExitCode.BAD_INPUT

        def __init__(self, message: str, code: ExitCode | None = None) -> None:
            super().__init__(message)
            if code is not None:
                self.code = code


MIN_VERSION = (10, 0)  # explicit quantization, strongly typed networks, INT64 I/O and execute_async_v3
# Strongly typed networks and Q/DQ with fp16 scales parse from 10.0 (onnx-tensorrt 10.0 GA; Model Optimizer's
# ONNX PTQ asks for >= 10.0); 10.12 only deprecated weak typing. JetPack 6.1/6.2 ship 10.3.
INT8_MIN_VERSION = (10, 0)
MIN_MAJOR = MIN_VERSION[0]
# TensorRT versions (major.minor) on which d2v-export's device check (scripts/tensorrt_device_check.sh) has run
# and its engines matched the ONNX Runtime simulation; every other version builds with a "not verified" note.
VERIFIED_VERSIONS: tuple[str, ...] = ()
INSTALL_HINT = "pip install 'd2v-export[tensorrt]' (TensorRT 10, CUDA 12) on a machine with an NVIDIA GPU"
TRTEXEC_HINT = "or build with trtexec: bash build_engine.sh in the bundle"
JETPACK_TOO_OLD = "JetPack 6.0 ships TensorRT 8.6: upgrade to JetPack 6.1 or 6.2 (TensorRT 10.3)"

RECIPE_FILE = "build_recipe.json"
MANIFEST_FILE = "manifest.json"
ENGINE_MANIFEST = "engine_manifest.json"
PLAN_FILE = "model.plan"
TIMING_CACHE = "timing.cache"
DEVICE_SCRIPT = "trt_device.py"
RECIPE_FORMAT = "d2v-export/tensorrt-build-recipe"
RECIPE_VERSION = 1
LAYER_INFO = "layers.json"  # trtexec --exportLayerInfo / the engine inspector: each layer's precision and fusion
# Files build-engine and build_engine.sh write into a bundle (and add to its manifest.json).
ENGINE_FILES = (PLAN_FILE, ENGINE_MANIFEST, TIMING_CACHE, LAYER_INFO)


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str = ""
    version: str = ""
    device: str = ""


@dataclass(frozen=True)
class InputProfile:
    """One input of the optimization profile: concrete min/opt/max shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildSettings:
    """Everything the builder needs besides the ONNX file (read from build_recipe.json)."""

    precision: str  # "fp32" | "fp16" | "int8"
    inputs: tuple[InputProfile, ...]
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()  # names of trt.BuilderFlag to set, e.g. ("FP16",)
    cleared_flags: tuple[str, ...] = ()  # names of trt.BuilderFlag to clear, e.g. ("TF32",)
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    min_version: str = "10.0"
    device: int = 0  # CUDA device index (--device cuda:N)


# ------------------------------------------------------------------------------------ availability


def import_tensorrt() -> Any | None:
    """The real TensorRT module, or None (missing, or only the type-stubs namespace package)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


def parse_version(version: str) -> tuple[int, int]:
    parts = (str(version).split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def _major(version: str) -> int:
    return parse_version(version)[0]


def device_index(device: str | int | None) -> int:
    """``cuda:N`` / ``N`` / None -> N (0 by default); D2VError for anything else."""
    if device is None or device == "" or (isinstance(device, str) and device.upper() in ("CPU", "CUDA", "GPU")):
        return 0
    text = str(device).lower().removeprefix("cuda:").removeprefix("gpu:")
    if not text.isdigit():
        raise D2VError(
            f"TensorRT device '{device}' is not cuda:N; pass --device cuda:0 (or another GPU index)", ExitCode.USAGE
        )
    return int(text)


@functools.lru_cache(maxsize=4)
def probe(device: int = 0) -> Probe:
    """Real TensorRT >= 10 and a CUDA device, or one line saying precisely what is missing.

    Cached for the process: the answer does not change while it runs, and asking initializes CUDA."""
    trt = import_tensorrt()
    if trt is None:
        stub = _stub_only()
        what = "TensorRT is not installed (only its type stubs are)" if stub else "TensorRT is not installed"
        return Probe(False, f"{what} ({install_hint()}; {TRTEXEC_HINT})")
    version = str(getattr(trt, "__version__", "0"))
    if parse_version(version) < MIN_VERSION:
        return Probe(False, too_old(version, "{}.{}".format(*MIN_VERSION)), version)
    try:
        cuda = cuda_api(device)
    except D2VError as exc:
        return Probe(False, f"TensorRT {version} is installed but {exc}", version)
    info = cuda.device_info()
    return Probe(True, version=version, device=f"{info['gpu']} (cuda:{device}, compute {info['compute_capability']})")


def too_old(version: str, needed: str) -> str:
    """The one line refusing a TensorRT older than ``needed`` (8.x: JetPack 6.0)."""
    jetpack = f"; {JETPACK_TOO_OLD}" if parse_version(version) < (10, 0) else ""
    return f"TensorRT {version} is older than {needed}, which this bundle needs{jetpack}; or install {INSTALL_HINT.split(' (')[0]}"


def verified(version: str) -> bool:
    """Whether d2v-export's device check has run on this TensorRT (major.minor)."""
    return "{}.{}".format(*parse_version(version)) in VERIFIED_VERSIONS


def _note_if_unverified(version: str) -> None:
    if not verified(version):
        print(
            f"[trt_device] note: TensorRT {version or '(version unknown)'}: not verified on this version (d2v-export's device "
            "check has not run on it); engine_manifest.json's check against ONNX Runtime is the evidence",
            file=sys.stderr,
        )


def diagnosis() -> dict[str, str | int | None]:
    """``doctor``'s TensorRT details: the Jetson L4T release or driver branch, and what to install for it."""
    l4t, driver = l4t_release(), driver_major()
    return {
        "jetson_l4t": "R{}.{}".format(*l4t) if l4t else None,
        "driver_branch": driver,
        "install": install_hint(l4t, driver, detect=False),
        "cuda_via": "cuda-python, else libcudart (ctypes), else torch.cuda",
    }


def _stub_only() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return not hasattr(tensorrt, "Builder")


def require(device: int = 0, min_version: str = "") -> Probe:
    """The probe when TensorRT (at least ``min_version``) and a GPU are usable; else D2VError(TARGET_UNAVAILABLE).

    The version gate comes first: TensorRT 8.x (JetPack 6.0) is refused for its version, whatever else is
    missing; an old bundle whose recipe asks for more (10.12) is held to that."""
    trt = import_tensorrt()
    needs = f"this bundle needs TensorRT {min_version} or newer" if min_version else ""
    if trt is not None:
        version = str(getattr(trt, "__version__", "0"))
        needed = max(parse_version(min_version or "0"), MIN_VERSION)
        if parse_version(version) < needed:
            raise D2VError(too_old(version, "{}.{}".format(*needed)), ExitCode.TARGET_UNAVAILABLE)
    p = probe(device)
    if not p.ok:
        raise D2VError(f"{p.reason}; {needs}" if needs else p.reason, ExitCode.TARGET_UNAVAILABLE)
    return p


# ------------------------------------------------------------------------------------ what to install here

CUDA12_DRIVER = 525  # the oldest Linux driver branch that runs CUDA 12.x (minor version compatibility)
CUDA13_DRIVER = 580  # cuda-python 13 / TensorRT 11 (CUDA 13) need R580+


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def l4t_release(text: str | None = None) -> tuple[int, int] | None:
    """Jetson's L4T release from /etc/nv_tegra_release ("# R36 (release), REVISION: 4.0, ..."): (36, 4); None elsewhere."""
    m = re.search(
        r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)", _read("/etc/nv_tegra_release") if text is None else text
    )
    return (int(m.group(1)), int(m.group(2))) if m else None


def driver_major(text: str | None = None) -> int | None:
    """The NVIDIA driver branch from /proc/driver/nvidia/version ("... Kernel Module  550.54.14 ..."): 550."""
    m = re.search(
        r"Kernel Module(?: for \w+)?\s+(\d+)\.\d+", _read("/proc/driver/nvidia/version") if text is None else text
    )
    return int(m.group(1)) if m else None


def install_hint(l4t: tuple[int, int] | None = None, driver: int | None = None, *, detect: bool = True) -> str:
    """Exactly what to install for TensorRT and CUDA on this machine: on a Jetson by its L4T release, elsewhere by
    the driver branch (``detect``: read both from this machine where not given)."""
    if detect:
        l4t = l4t or l4t_release()
        driver = driver or driver_major()
    if l4t is not None:
        if l4t < (36, 4):
            return f"L4T R{l4t[0]}.{l4t[1]}: {JETPACK_TOO_OLD}"
        return (
            "Jetson (JetPack 6.1/6.2): use JetPack's TensorRT 10.3 with its python3 (sudo apt install nvidia-jetpack, "
            "or python3-libnvinfer), not pip's tensorrt or cuda-python (PyPI's aarch64 wheels are server builds and "
            "cuda-python 13 needs an R580 driver); CUDA is reached through JetPack's libcudart"
        )
    if driver is not None and driver < CUDA12_DRIVER:
        return f"the NVIDIA driver R{driver} is too old for CUDA 12: install R{CUDA12_DRIVER} or newer, then {INSTALL_HINT.split(' (')[0]}"
    extra = "pip install 'd2v-export[tensorrt]' --extra-index-url https://pypi.nvidia.com (TensorRT 10.x, cuda-python 12: CUDA 12, driver R525+)"
    if driver is not None and driver >= CUDA13_DRIVER:
        return f"{extra}, or [tensorrt-cu13] for TensorRT 11 and CUDA 13 (this R{driver} driver runs both)"
    return f"{extra}; [tensorrt-cu13] (TensorRT 11, CUDA 13) needs an R{CUDA13_DRIVER}+ driver"


# ------------------------------------------------------------------------------------ CUDA helpers

# CUDA runtime error codes (cudaError_t) that mean "this machine cannot run it", not a bug: exit 6.
_CUDA_UNAVAILABLE = {
    2: "out of GPU memory: free GPU memory or use smaller shapes",
    3: "CUDA could not be initialised",
    35: "the NVIDIA driver is older than this CUDA runtime",
    46: "the GPU is busy or unavailable",
    100: "no CUDA-capable device",
    101: "invalid device",
    999: "unknown CUDA error",
}


def cuda_failure(code: int, text: str, call: str = "") -> D2VError:
    """A CUDA runtime error as the tool's one-line error: TARGET_UNAVAILABLE (6) for memory, driver and device
    errors, INTERNAL (1) for the rest (a bug in how the runtime was called)."""
    where = f" in {call}" if call else ""
    if code in _CUDA_UNAVAILABLE:
        return D2VError(f"CUDA error {code}{where}: {text} ({_CUDA_UNAVAILABLE[code]})", ExitCode.TARGET_UNAVAILABLE)
    return D2VError(f"CUDA error {code}{where}: {text}", ExitCode.INTERNAL)


class CudaApi(Protocol):
    """The few CUDA runtime calls the runner needs; pointers and streams are plain ints."""

    name: str

    def device_info(self) -> dict[str, str]: ...
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def host_buffer(self, nbytes: int) -> np.ndarray: ...
    def stream(self) -> int: ...
    def destroy_stream(self, stream: int) -> None: ...
    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None: ...
    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None: ...
    def synchronize(self, stream: int) -> None: ...
    def event(self) -> Any: ...
    def destroy_event(self, event: Any) -> None: ...
    def record(self, event: Any, stream: int) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...


def cuda_api(device: int = 0) -> CudaApi:
    """cuda-python when installed, else the CUDA runtime library already here (libcudart, which TensorRT links),
    else a CUDA build of torch; D2VError naming what is missing and what to install otherwise."""
    reasons = []
    try:
        return _CudaPython(device)
    except ImportError:
        reasons.append("cuda-python is not installed")
    except Exception as exc:  # noqa: BLE001 -- any CUDA error such as "no CUDA-capable device"
        reasons.append(f"cuda-python: {_first_line(exc)}")
    try:
        return _CudaRuntime(device)
    except OSError as exc:
        reasons.append(f"no CUDA runtime library ({_first_line(exc)})")
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"libcudart: {_first_line(exc)}")
    try:
        return _TorchCuda(device)
    except ImportError:
        pass  # torch is optional: cuda-python is what the tensorrt extra installs
    except Exception as exc:  # noqa: BLE001 -- torch's own CUDA errors
        reasons.append(f"torch: {_first_line(exc)}")
    raise D2VError(
        f"no NVIDIA GPU is usable here ({'; '.join(reasons)}); {install_hint()}", ExitCode.TARGET_UNAVAILABLE
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def _info(api: Any, gpu: str, compute: str, runtime: str, driver: str, memory: int) -> dict[str, str]:
    return {
        "gpu": gpu,
        "device_index": str(api.device),
        "compute_capability": compute,
        "cuda_runtime": runtime,
        "cuda_driver": driver,
        "memory_gb": f"{memory / 2**30:.1f}",
        "via": api.name,
    }


def _cuda_python_info(api: _CudaPython) -> dict[str, str]:
    prop = api._check(api.rt.cudaGetDeviceProperties(api.device))
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    runtime = int(api._check(api.rt.cudaRuntimeGetVersion()))
    driver = int(api._check(api.rt.cudaDriverGetVersion()))
    return _info(
        api,
        name,
        f"{prop.major}.{prop.minor}",
        f"{runtime // 1000}.{runtime % 1000 // 10}",
        f"{driver // 1000}.{driver % 1000 // 10}",
        prop.totalGlobalMem,
    )


class _CudaPython:
    """cuda-python's runtime bindings: every call returns (error, *values)."""

    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt: Any = cudart
        count = int(self._check(cudart.cudaGetDeviceCount()))
        if count < 1:
            raise RuntimeError("no CUDA device")
        if device >= count:
            raise RuntimeError(f"cuda:{device} does not exist ({count} device(s): cuda:0..cuda:{count - 1})")
        self._check(cudart.cudaSetDevice(device))
        self.device = device
        self._host: dict[int, int] = {}  # numpy buffer address -> pinned allocation

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.rt.cudaGetErrorString(err)
            raise cuda_failure(int(err), text.decode() if isinstance(text, bytes) else str(text))
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_info(self) -> dict[str, str]:
        return _cuda_python_info(self)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(1, nbytes))))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array (asynchronous copies need pinned memory to overlap)."""
        return _pinned_array(self._host, int(self._check(self.rt.cudaMallocHost(max(1, nbytes)))), nbytes)

    def free_host(self, array: np.ndarray) -> None:
        ptr = self._host.pop(array.ctypes.data, 0)
        if ptr:
            self._check(self.rt.cudaFreeHost(ptr))

    def stream(self) -> int:
        return int(self._check(self.rt.cudaStreamCreate()))

    def destroy_stream(self, stream: int) -> None:
        self._check(self.rt.cudaStreamDestroy(stream))

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))

    def synchronize(self, stream: int) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def event(self) -> Any:
        return self._check(self.rt.cudaEventCreate())

    def destroy_event(self, event: Any) -> None:
        self._check(self.rt.cudaEventDestroy(event))

    def record(self, event: Any, stream: int) -> None:
        self._check(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._check(self.rt.cudaEventSynchronize(end))
        return float(self._check(self.rt.cudaEventElapsedTime(start, end)))


def _cudart_candidates() -> list[str]:
    """Where the CUDA runtime library may be: $D2V_CUDART, the loader's search path, the CUDA toolkit folders
    (JetPack: /usr/local/cuda), and the nvidia-cuda-runtime wheel that pip's TensorRT depends on."""
    found = [os.environ["D2V_CUDART"]] if os.environ.get("D2V_CUDART") else []
    found += [n for n in (ctypes.util.find_library("cudart"),) if n]
    found += ["libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"]
    roots = ["/usr/local/cuda/lib64", f"/usr/local/cuda/targets/{platform.machine()}-linux/lib"]
    roots += [str(Path(p) / "nvidia" / "cuda_runtime" / "lib") for p in sys.path if p]
    for root in roots:
        found += sorted(str(f) for f in Path(root).glob("libcudart.so*")) if Path(root).is_dir() else []
    return list(dict.fromkeys(found))


def _load_cudart() -> ctypes.CDLL:
    errors = []
    for name in _cudart_candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError(f"libcudart not found ({errors[-1] if errors else 'no candidate'}); set D2V_CUDART to its path")


_VOIDP = ctypes.c_void_p


class _CudaRuntime:
    """The CUDA runtime library already on the device (libcudart: TensorRT links it, JetPack ships it), through
    ctypes: no cuda-python needed. Pointers, streams and events are plain ints."""

    name = "libcudart"

    def __init__(self, device: int = 0) -> None:
        self.lib = _load_cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        count = ctypes.c_int(0)
        self._call("cudaGetDeviceCount", ctypes.byref(count))
        if count.value < 1:
            raise RuntimeError("no CUDA device")
        if device >= count.value:
            raise RuntimeError(
                f"cuda:{device} does not exist ({count.value} device(s): cuda:0..cuda:{count.value - 1})"
            )
        self._call("cudaSetDevice", ctypes.c_int(device))
        self.device = device
        self._host: dict[int, int] = {}

    def _call(self, fn: str, *args: Any) -> None:
        err = int(getattr(self.lib, fn)(*args))
        if err != 0:
            text = self.lib.cudaGetErrorString(err)
            raise cuda_failure(err, text.decode(errors="replace") if text else "?", fn)

    def _out(self, fn: str, ctype: Any, *args: Any) -> Any:
        value = ctype()
        self._call(fn, ctypes.byref(value), *args)
        return value.value

    def device_info(self) -> dict[str, str]:
        return _cudart_info(self)

    def malloc(self, nbytes: int) -> int:
        return int(self._out("cudaMalloc", _VOIDP, ctypes.c_size_t(max(1, nbytes))) or 0)

    def free(self, ptr: int) -> None:
        self._call("cudaFree", _VOIDP(ptr))

    def host_buffer(self, nbytes: int) -> np.ndarray:
        return _pinned_array(
            self._host, int(self._out("cudaMallocHost", _VOIDP, ctypes.c_size_t(max(1, nbytes))) or 0), nbytes
        )

    def free_host(self, array: np.ndarray) -> None:
        ptr = self._host.pop(array.ctypes.data, 0)
        if ptr:
            self._call("cudaFreeHost", _VOIDP(ptr))

    def stream(self) -> int:
        return int(self._out("cudaStreamCreate", _VOIDP) or 0)

    def destroy_stream(self, stream: int) -> None:
        self._call("cudaStreamDestroy", _VOIDP(stream))

    def _copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._call(
            "cudaMemcpyAsync", _VOIDP(dst), _VOIDP(src), ctypes.c_size_t(nbytes), ctypes.c_int(kind), _VOIDP(stream)
        )

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        self._copy(ptr, host.ctypes.data, host.nbytes, 1, stream)  # cudaMemcpyHostToDevice

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        self._copy(host.ctypes.data, ptr, host.nbytes, 2, stream)  # cudaMemcpyDeviceToHost

    def synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", _VOIDP(stream))

    def event(self) -> Any:
        return int(self._out("cudaEventCreate", _VOIDP) or 0)

    def destroy_event(self, event: Any) -> None:
        self._call("cudaEventDestroy", _VOIDP(event))

    def record(self, event: Any, stream: int) -> None:
        self._call("cudaEventRecord", _VOIDP(event), _VOIDP(stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._call("cudaEventSynchronize", _VOIDP(end))
        ms = ctypes.c_float()
        self._call("cudaEventElapsedTime", ctypes.byref(ms), _VOIDP(start), _VOIDP(end))
        return float(ms.value)


def _pinned_array(owned: dict[int, int], ptr: int, nbytes: int) -> np.ndarray:
    """A uint8 array over ``nbytes`` of page-locked memory at ``ptr``, remembered in ``owned`` (array address -> pointer)."""
    array = np.frombuffer(memoryview((ctypes.c_uint8 * max(1, nbytes)).from_address(ptr)).cast("B"), dtype=np.uint8)
    owned[array.ctypes.data] = ptr
    return array


def _cudart_info(api: _CudaRuntime) -> dict[str, str]:
    major = api._out("cudaDeviceGetAttribute", ctypes.c_int, 75, api.device)  # cudaDevAttrComputeCapabilityMajor
    minor = api._out("cudaDeviceGetAttribute", ctypes.c_int, 76, api.device)
    runtime, driver = api._out("cudaRuntimeGetVersion", ctypes.c_int), api._out("cudaDriverGetVersion", ctypes.c_int)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    api._call("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
    return _info(
        api,
        _gpu_name(api.device),
        f"{major}.{minor}",
        f"{runtime // 1000}.{runtime % 1000 // 10}",
        f"{driver // 1000}.{driver % 1000 // 10}",
        int(total.value),
    )


def _gpu_name(device: int) -> str:
    """The GPU's name from the driver library (libcuda, present wherever a driver is); a placeholder without it."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        handle, name = ctypes.c_int(), ctypes.create_string_buffer(256)
        if (
            cuda.cuInit(0) == 0
            and cuda.cuDeviceGet(ctypes.byref(handle), device) == 0
            and cuda.cuDeviceGetName(name, 256, handle) == 0
        ):
            return name.value.decode(errors="replace")
    except (OSError, AttributeError):
        pass
    return f"CUDA device {device}"


class _TorchCuda:
    """A CUDA build of torch as the allocator (when cuda-python is missing): byte tensors, torch streams and events."""

    name = "torch.cuda"

    def __init__(self, device: int = 0) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        if device >= torch.cuda.device_count():
            raise RuntimeError(f"cuda:{device} does not exist ({torch.cuda.device_count()} device(s))")
        torch.cuda.set_device(device)
        self.torch: Any = torch
        self.device = device
        self._buffers: dict[int, Any] = {}
        self._host: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}

    def device_info(self) -> dict[str, str]:
        prop = self.torch.cuda.get_device_properties(self.device)
        return _info(
            self, str(prop.name), f"{prop.major}.{prop.minor}", str(self.torch.version.cuda), "", prop.total_memory
        )

    def malloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device=f"cuda:{self.device}")
        ptr = int(t.data_ptr())
        self._buffers[ptr] = t
        return ptr

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def host_buffer(self, nbytes: int) -> np.ndarray:
        t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, pin_memory=True)
        array: np.ndarray = t.numpy()
        self._host[array.ctypes.data] = t
        return array

    def free_host(self, array: np.ndarray) -> None:
        self._host.pop(array.ctypes.data, None)

    def stream(self) -> int:
        s = self.torch.cuda.Stream(device=self.device)
        handle = int(s.cuda_stream)
        self._streams[handle] = s
        return handle

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream, None)

    def _view(self, ptr: int, nbytes: int) -> Any:
        base = next(p for p, t in self._buffers.items() if p <= ptr < p + t.numel())
        return self._buffers[base][ptr - base : ptr - base + nbytes]

    def _host_tensor(self, host: np.ndarray) -> Any:
        pinned = self._host.get(host.ctypes.data)
        return pinned[: host.nbytes] if pinned is not None else self.torch.from_numpy(host.reshape(-1).view(np.uint8))

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        with self.torch.cuda.stream(self._streams[stream]):
            self._view(ptr, host.nbytes).copy_(self._host_tensor(host), non_blocking=True)

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        with self.torch.cuda.stream(self._streams[stream]):
            self._host_tensor(host).copy_(self._view(ptr, host.nbytes), non_blocking=True)

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def event(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    destroy_event = staticmethod(lambda _event: None)  # torch destroys an event when it is garbage-collected

    def record(self, event: Any, stream: int) -> None:
        event.record(self._streams[stream])

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))


# ------------------------------------------------------------------------------------ files


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` through a temporary file in the same folder and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: a service user must read a copied bundle
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    m = re.search(r"^Umask:\s*([0-7]+)", _read("/proc/self/status"), re.MULTILINE)
    if m:
        return int(m.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, doc: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(doc, indent=2, default=str) + "\n").encode("utf-8"))


def confined(folder: Path, raw: object, what: str) -> Path:
    """``folder / raw`` for a relative, '/'-separated path inside ``folder``; D2VError otherwise.

    The same rule as the bundle manifest's paths (``bundle._safe_rel``): no absolute or drive paths,
    no backslashes, no '..' or empty parts, nothing resolving outside the folder (a symbolic link)."""
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise D2VError(
            f"bundle '{folder}' has a bad {what} path {raw!r} in {RECIPE_FILE}; rebuild the bundle with d2v-export"
        )
    pure = PurePosixPath(raw)
    if pure.is_absolute() or raw.startswith(("/", "\\")) or "\\" in raw or (len(raw) > 1 and raw[1] == ":"):
        raise D2VError(
            f"bundle '{folder}' names the absolute or non-POSIX {what} path '{raw}' in {RECIPE_FILE}; refusing it (paths stay inside the bundle)"
        )
    if any(part in ("..", "") for part in raw.split("/")) or pure.parts[0] == ".":
        raise D2VError(
            f"bundle '{folder}' names the {what} path '{raw}' that escapes the bundle in {RECIPE_FILE}; refusing it"
        )
    path = Path(folder) / raw
    try:
        path.resolve().relative_to(Path(folder).resolve())
    except ValueError:
        raise D2VError(
            f"bundle '{folder}' has the {what} path '{raw}' resolving outside the bundle (a symbolic link?); refusing it"
        ) from None
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(bundle: Path) -> dict[str, Any]:
    """Check every file of the bundle against manifest.json (paths, sizes, sha256, nothing extra); returns it.

    The device-side subset of ``d2v-export``'s bundle check (which also refuses pickles), enough to know
    that the graph about to be built is the one that was exported and judged."""
    path = Path(bundle) / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        raise D2VError(
            f"bundle '{bundle}' has no {MANIFEST_FILE}, so what would be built cannot be checked; "
            "pass a bundle written by d2v-export, or --no-verify to build it unchecked"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["files"]
        listed = {str(e["path"]): e for e in entries}
    except (ValueError, KeyError, TypeError):
        raise D2VError(f"bundle '{bundle}' has an unreadable {MANIFEST_FILE}; rebuild the bundle") from None
    for rel, entry in listed.items():
        file = confined(bundle, rel, "manifest")
        if not file.is_file():
            raise D2VError(f"bundle '{bundle}' is missing '{rel}'; copy the whole folder again")
        if file.stat().st_size != entry.get("size") or sha256_file(file) != str(entry.get("sha256", "")).lower():
            raise D2VError(
                f"bundle '{bundle}' file '{rel}' does not match its sha256 in {MANIFEST_FILE}: it was changed; refusing it"
            )
    present = {
        p.relative_to(bundle).as_posix() for p in Path(bundle).rglob("*") if p.is_file() and not p.name.startswith(".")
    }
    extra = sorted(present - set(listed) - {MANIFEST_FILE})
    if extra:
        raise D2VError(
            f"bundle '{bundle}' holds {len(extra)} file(s) not in {MANIFEST_FILE} (e.g. '{extra[0]}'); remove them or rebuild the bundle"
        )
    return dict(doc)


def relist(bundle: Path, names: Sequence[str] = ENGINE_FILES) -> None:
    """Add (or refresh) ``names`` in the bundle's manifest.json, so that the bundle still verifies."""
    path = Path(bundle) / MANIFEST_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    entries = {e["path"]: e for e in doc.get("files", []) if isinstance(e, dict) and "path" in e}
    for name in names:
        p = Path(bundle) / name
        if p.is_file():
            entries[name] = {"path": name, "size": p.stat().st_size, "sha256": sha256_file(p)}
    doc["files"] = sorted(entries.values(), key=lambda e: str(e["path"]))
    atomic_write_json(path, doc)


def read_recipe(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / RECIPE_FILE
    if not path.is_file():
        raise D2VError(
            f"'{bundle}' has no {RECIPE_FILE}; pass a tensorrt variant folder written by d2v-export (e.g. OUTPUT/tensorrt-int8-static)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise D2VError(f"{path} is not readable JSON ({exc}); rebuild the bundle") from None
    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT or doc.get("version") != RECIPE_VERSION:
        raise D2VError(
            f"{path} is not a version-{RECIPE_VERSION} d2v-export TensorRT recipe; rebuild the bundle with this d2v-export"
        )
    problem = _recipe_problem(doc)
    if problem:
        raise D2VError(f"{path} is malformed ({problem}); rebuild the bundle with this d2v-export")
    return doc


def _recipe_problem(doc: Mapping[str, Any]) -> str | None:
    """What a recipe's build fields get wrong (found by fuzzing: each once crashed settings_from / trtexec_command), or None."""

    def strings(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(v, str) for v in x)

    def dims(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)

    if doc.get("precision") not in ("fp32", "fp16", "bf16", "int8"):
        return f"precision {doc.get('precision')!r}"
    if (
        not isinstance(doc.get("strongly_typed"), bool)
        or not strings(doc.get("builder_flags"))
        or not strings(doc.get("cleared_flags"))
    ):
        return "strongly_typed, builder_flags or cleared_flags"
    if (
        not isinstance(doc.get("workspace_bytes"), int)
        or isinstance(doc["workspace_bytes"], bool)
        or doc["workspace_bytes"] < 1
    ):
        return f"workspace_bytes {doc.get('workspace_bytes')!r}"
    inputs = doc.get("inputs")
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(
            isinstance(i, dict)
            and isinstance(i.get("name"), str)
            and isinstance(i.get("dtype"), str)
            and all(dims(i.get(w)) for w in ("min", "opt", "max"))
            for i in inputs
        )
    ):
        return "inputs: each needs a name, a dtype and min/opt/max shapes"
    if not isinstance(doc.get("tensorrt") or {}, dict) or not all(
        isinstance(doc.get(k), str) for k in ("onnx", "engine", "timing_cache", "why")
    ):
        return "tensorrt, onnx, engine, timing_cache or why"
    return None


def settings_from(
    recipe: Mapping[str, Any], *, workspace_bytes: int | None = None, timing_cache: Path | None = None, device: int = 0
) -> BuildSettings:
    trt_req = recipe.get("tensorrt") or {}
    return BuildSettings(
        precision=str(recipe["precision"]),
        inputs=tuple(
            InputProfile(str(i["name"]), tuple(i["min"]), tuple(i["opt"]), tuple(i["max"])) for i in recipe["inputs"]
        ),
        strongly_typed=bool(recipe["strongly_typed"]),
        builder_flags=tuple(recipe["builder_flags"]),
        cleared_flags=tuple(recipe["cleared_flags"]),
        workspace_bytes=int(workspace_bytes if workspace_bytes is not None else recipe["workspace_bytes"]),
        timing_cache=timing_cache,
        min_version=str(trt_req.get("min_version") or "10.0"),
        device=device,
    )


# ------------------------------------------------------------------------------------ build


def _builder_config(
    trt: Any, builder: Any, settings: BuildSettings, onnx_path: Path, errors: Any
) -> tuple[Any, list[str]]:
    """The builder config: workspace, the recipe's flags (set and cleared) and one optimization profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    for flag in settings.builder_flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise D2VError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (weak typing was removed in TensorRT 11); "
                "build the int8 bundle (strongly typed, fp16 remainder) or use TensorRT 10.x for this fp16 bundle",
                ExitCode.TARGET_UNAVAILABLE,
            )
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cleared = []
    for flag in settings.cleared_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
            cleared.append(flag)
    profile = builder.create_optimization_profile()
    for inp in settings.inputs:
        profile.set_shape(inp.name, trt.Dims(list(inp.min)), trt.Dims(list(inp.opt)), trt.Dims(list(inp.max)))
    if config.add_optimization_profile(profile) < 0:
        why = errors.last or "min <= opt <= max per input?"
        raise D2VError(
            f"TensorRT refused the optimization profile of {onnx_path.name} ({why}); fix the shape ranges and re-export"
        )
    return config, cleared


def _timing_cache(config: Any, cache_path: Path | None, errors: Any) -> tuple[bool, str]:
    """Load the timing cache into ``config``: (loaded, TensorRT's refusal if it refused the file)."""
    if cache_path is None:
        return False, ""
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused (then replaced by a
    # fresh one, written back after the build), never silently mixed in.
    if data and _use_timing_cache(config, data):
        return True, ""
    refused, errors.last = errors.last, ""  # TensorRT's refusal must not explain a later, unrelated failure
    _use_timing_cache(config, b"")
    return False, refused


def build(onnx_path: Path, plan_path: Path, settings: BuildSettings) -> dict[str, object]:
    """Parse ``onnx_path``, build a serialized engine at ``plan_path`` (atomically) and return its manifest.

    Raises D2VError(TARGET_UNAVAILABLE) without TensorRT (at the recipe's version) or a GPU, D2VError(BAD_INPUT)
    when the parser rejects the graph or the builder fails (with TensorRT's first error message).
    """
    require(settings.device, settings.min_version)
    import tensorrt as trt

    _note_if_unverified(str(trt.__version__))
    logger, errors = _logger()
    started = time.perf_counter()
    builder = trt.Builder(logger)
    # TensorRT 11 types every network strongly and may drop the creation flag: 0 is the same thing there.
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strong) if settings.strongly_typed and strong is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that external-data weights beside the file are found.
    if not parser.parse_from_file(str(onnx_path)):
        messages = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise D2VError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(messages[:3]) or errors.last}")
    config, cleared = _builder_config(trt, builder, settings, onnx_path, errors)
    cache_path = settings.timing_cache
    cache_loaded, refused = _timing_cache(config, cache_path, errors)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise D2VError(
            f"TensorRT could not build an engine from {onnx_path.name}: {errors.last or 'see the log above'}"
        )
    atomic_write(plan_path, memoryview(serialized))
    if cache_path is not None:
        atomic_write(cache_path, memoryview(config.get_timing_cache().serialize()))
    info = cuda_api(settings.device).device_info()
    return {
        "tensorrt": str(trt.__version__),
        "gpu": info["gpu"],
        "device_index": settings.device,
        "compute_capability": info["compute_capability"],
        "cuda_runtime": info["cuda_runtime"],
        "cuda_driver": info["cuda_driver"],
        "cuda_via": info["via"],
        "precision": settings.precision,
        "strongly_typed": settings.strongly_typed,
        "builder_flags": list(settings.builder_flags),
        "cleared_flags": cleared,
        "workspace_bytes": settings.workspace_bytes,
        "timing_cache": str(cache_path) if cache_path is not None else None,
        "timing_cache_reused": cache_loaded,
        "timing_cache_refused": refused or None,
        "verified_on_this_version": verified(str(trt.__version__)),
        "profile": [dataclasses.asdict(i) for i in settings.inputs],
        "build_seconds": round(time.perf_counter() - started, 3),
        "plan_bytes": plan_path.stat().st_size,
    }


@dataclass
class _Errors:
    last: str = ""


def _use_timing_cache(config: tensorrt.IBuilderConfig, data: bytes) -> bool:
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 -- a corrupt cache file: TensorRT raises (type unspecified) rather than returning None
        return False
    return cache is not None and bool(config.set_timing_cache(cache, False))


def _logger() -> tuple[tensorrt.ILogger, _Errors]:
    """A TensorRT logger that prints warnings and errors, and the holder of its last error (for a one-line D2VError)."""
    import tensorrt as trt

    errors = _Errors()

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                errors.last = msg.strip().splitlines()[0] if msg.strip() else msg
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return Logger(), errors


# ------------------------------------------------------------------------------------ runner

_NUMPY_TYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def _nptype(dtype: Any) -> np.dtype[Any]:
    name = str(getattr(dtype, "name", dtype)).split(".")[-1]
    if name in _NUMPY_TYPES:
        return np.dtype(_NUMPY_TYPES[name])
    import tensorrt as trt

    return np.dtype(trt.nptype(dtype))


def _load_engine(runtime: Any, plan: Path, errors: _Errors) -> tuple[Any, Any]:
    """(engine, execution context) of a serialized engine; D2VError(TARGET_UNAVAILABLE) saying why not."""
    import tensorrt as trt

    engine: tensorrt.ICudaEngine | None = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise D2VError(
            f"TensorRT {trt.__version__} cannot load {plan} ({errors.last or 'built with another TensorRT or GPU'}); "
            "rebuild it here with `d2v-export build-engine` (or python3 trt_device.py build)",
            ExitCode.TARGET_UNAVAILABLE,
        )
    context = engine.create_execution_context()
    if context is None:
        raise D2VError(
            f"TensorRT could not create an execution context for {plan} ({errors.last or 'out of GPU memory?'}); free GPU memory and retry",
            ExitCode.TARGET_UNAVAILABLE,
        )
    return engine, context


class _Buffers:
    """Device buffers and page-locked host staging buffers by tensor name: grown as needed, reused between calls."""

    def __init__(self, cuda: CudaApi) -> None:
        self.cuda = cuda
        self.device: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self.host: dict[str, np.ndarray] = {}  # name -> pinned uint8 staging buffer

    def on_device(self, name: str, nbytes: int) -> int:
        ptr, capacity = self.device.get(name, (0, 0))
        if nbytes > capacity:
            if ptr:
                self.cuda.free(ptr)
            ptr, capacity = self.cuda.malloc(nbytes), nbytes
            self.device[name] = (ptr, capacity)
        return ptr

    def staging(self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self.host.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                getattr(self.cuda, "free_host", lambda _b: None)(buf)
            buf = self.cuda.host_buffer(max(nbytes, 1))
            self.host[name] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    def free(self) -> None:
        for ptr, _capacity in self.device.values():
            self.cuda.free(ptr)
        self.device.clear()
        for buf in self.host.values():
            getattr(self.cuda, "free_host", lambda _b: None)(buf)
        self.host.clear()


class EngineRunner:
    """Runs a serialized engine; ``infer`` takes and returns numpy arrays (the pipeline's Runner protocol)."""

    def __init__(self, plan: Path, name: str = "tensorrt", device: int = 0) -> None:
        require(device)
        import tensorrt as trt

        self.name = name
        self.cuda = cuda_api(device)
        self._logger, self._errors = _logger()
        self.runtime: Any = trt.Runtime(self._logger)
        self.engine, self.context = _load_engine(self.runtime, plan, self._errors)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes: dict[str, np.dtype[Any]] = {n: _nptype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = self.cuda.stream()
        self._memory = _Buffers(self.cuda)

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set the input shapes, copy the inputs to the device and bind every tensor; returns pinned output views."""
        for name in self.inputs:
            if name not in feed:
                raise D2VError(f"the engine needs the input '{name}' (inputs: {', '.join(self.inputs)}); pass it")
            array = np.asarray(feed[name])
            if not self.context.set_input_shape(name, tuple(array.shape)):
                lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise D2VError(
                    f"input '{name}' of shape {array.shape} is outside the engine's profile ({lo} .. {hi}); rebuild with a wider range"
                )
            host = self._memory.staging(name, self.dtypes[name], tuple(array.shape))
            host[...] = array
            ptr = self._memory.on_device(name, host.nbytes)
            self.cuda.to_device(ptr, host, self.stream)
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            out = self._memory.staging(name, self.dtypes[name], shape)
            self.context.set_tensor_address(name, self._memory.on_device(name, out.nbytes))
            outputs[name] = out
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise D2VError(
                f"TensorRT failed to run the engine: {self._errors.last or 'execute_async_v3 returned False'}",
                ExitCode.INTERNAL,
            )

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._prepare(feed)
        self._execute()
        for name, out in outputs.items():
            self.cuda.to_host(out, self._memory.device[name][0], self.stream)
        self.cuda.synchronize(self.stream)
        return {
            name: out.astype(np.float32) if out.dtype == np.float16 else out.copy() for name, out in outputs.items()
        }

    def gpu_times_ms(
        self, feed: Mapping[str, np.ndarray], *, warmup: int = 10, iterations: int = 100, per_round: int = 10
    ) -> list[float]:
        """Engine time alone (no host copies), per run: ``gpu_times_ms``."""
        return gpu_times_ms(self, feed, warmup=warmup, iterations=iterations, per_round=per_round)

    def close(self) -> None:
        """Device buffers, the stream, then the execution context, engine and runtime (in that order)."""
        self._memory.free()
        if self.stream:
            self.cuda.destroy_stream(self.stream)
            self.stream = 0
        self.context = self.engine = self.runtime = None


def gpu_times_ms(
    runner: EngineRunner,
    feed: Mapping[str, np.ndarray],
    *,
    warmup: int = 10,
    iterations: int = 100,
    per_round: int = 10,
) -> list[float]:
    """Engine time alone (no host copies): rounds of ``per_round`` back-to-back execute_async_v3 between one
    pair of CUDA events, no synchronisation inside a round; returns the mean time per run of each round."""
    runner._prepare(feed)
    for _ in range(warmup):
        runner._execute()
    runner.cuda.synchronize(runner.stream)
    per_round = max(1, min(per_round, iterations))
    start, end = runner.cuda.event(), runner.cuda.event()
    times = []
    try:
        for _ in range(max(1, iterations // per_round)):
            runner.cuda.record(start, runner.stream)
            for _ in range(per_round):
                runner._execute()
            runner.cuda.record(end, runner.stream)
            times.append(runner.cuda.elapsed_ms(start, end) / per_round)
    finally:  # each call's events are its own
        runner.cuda.destroy_event(start)
        runner.cuda.destroy_event(end)
    return times


def synthetic_feed(inputs: Sequence[tuple[str, str, tuple[int, ...]]], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the given (name, dtype, shape) for benchmarking: small normal floats; token ids that exist
    in every RoBERTa-style vocabulary (0 = <s>, 2 = </s>); masks of ones."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for name, dtype, shape in inputs:
        if np.issubdtype(np.dtype(dtype), np.floating):
            feed[name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
        elif "mask" in name:
            feed[name] = np.ones(shape, dtype=dtype)
        else:
            ids = np.full(shape, 2, dtype=dtype)
            ids[..., 0] = 0
            feed[name] = ids
    return feed


def percentiles(times: Sequence[float]) -> dict[str, float]:
    data = np.sort(np.asarray(times, dtype=np.float64))
    return {
        "p50_ms": float(np.percentile(data, 50)),
        "p90_ms": float(np.percentile(data, 90)),
        "p99_ms": float(np.percentile(data, 99)),
        "mean_ms": float(data.mean()),
        "n": int(data.size),
    }


# ------------------------------------------------------------------------------------ a bundle on the device

Check = Callable[
    [Path, Mapping[str, Mapping[str, "np.ndarray"]], Mapping[str, Mapping[str, "np.ndarray"]]], Mapping[str, Any]
]


def build_bundle(
    bundle: Path,
    *,
    verify: bool = True,
    workspace_bytes: int | None = None,
    timing_cache: Path | None = None,
    iterations: int = 200,
    device: int = 0,
    check: Check | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[Path, dict[str, Any]]:
    """Build the engine of a bundle on this device, benchmark it and write engine_manifest.json; (plan, manifest).

    Order: manifest check (unless ``verify`` is False), recipe paths confined to the bundle, TensorRT version
    gate, build, GPU benchmark, optional ``check(onnx, feeds, engine_outputs)`` (d2v-export passes its ONNX
    Runtime comparison), engine manifest, manifest.json relisted."""
    bundle = Path(bundle)
    has_manifest = (bundle / MANIFEST_FILE).is_file()
    if verify:
        verify_files(bundle)
    recipe = read_recipe(bundle)
    onnx_path = confined(bundle, recipe.get("onnx"), "onnx")
    plan = confined(bundle, recipe.get("engine"), "engine")
    cache = (
        Path(timing_cache)
        if timing_cache is not None
        else confined(bundle, recipe.get("timing_cache") or TIMING_CACHE, "timing_cache")
    )
    settings = settings_from(recipe, workspace_bytes=workspace_bytes, timing_cache=cache, device=device)
    p = require(device, settings.min_version)
    progress(f"building {plan.name} ({recipe['precision']}) with TensorRT {p.version} on {p.device}")
    manifest: dict[str, Any] = dict(build(onnx_path, plan, settings))

    specs = [(str(i["name"]), str(i["dtype"])) for i in recipe["inputs"]]
    feeds = {
        w: synthetic_feed([(n, d, tuple(i[w])) for (n, d), i in zip(specs, recipe["inputs"])], seed=k)
        for k, w in enumerate(("min", "opt", "max"))
    }
    progress(f"benchmarking at the opt shapes ({iterations} runs after warm-up, CUDA events around rounds of 10)")
    with EngineRunner(plan, name=f"tensorrt-{recipe['precision']}", device=device) as engine:
        times = engine.gpu_times_ms(feeds["opt"], warmup=max(10, iterations // 10), iterations=iterations)
        engine_out = {w: engine.infer(f) for w, f in feeds.items()}
    batch = int(recipe["inputs"][0]["opt"][0])
    stats = percentiles(times)
    manifest["benchmark"] = {
        "what": "engine only (execute_async_v3), rounds of 10 back-to-back runs between one pair of CUDA events, after warm-up; host copies excluded",
        "input_shapes": {i["name"]: list(i["opt"]) for i in recipe["inputs"]},
        **stats,
        "runs": stats["n"] * min(10, iterations),
        "throughput_items_per_s": 1000.0 * batch / stats["p50_ms"] if stats["p50_ms"] > 0 else 0.0,
    }
    if check is not None:
        progress("checking the engine against ONNX Runtime on the same model.onnx")
        manifest["check_vs_onnxruntime"] = dict(check(onnx_path, feeds, engine_out))
    write_engine_manifest(bundle, manifest, onnx_path)
    if has_manifest:
        relist(bundle)
    return plan, manifest


def write_engine_manifest(folder: Path, manifest: Mapping[str, Any], onnx_path: Path) -> None:
    doc = dict(manifest) | {"onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path), "engine": PLAN_FILE}
    atomic_write_json(Path(folder) / ENGINE_MANIFEST, doc)


def record(bundle: Path, *, built_with: str = "trtexec", tensorrt_version: str = "") -> dict[str, Any]:
    """After ``build_engine.sh`` (trtexec): write engine_manifest.json for the plan trtexec saved and add the
    engine files to manifest.json, so that the bundle verifies as after the Python build. Standard library only.

    The plan is recorded as built on this machine; nothing is benchmarked here (trtexec printed its timings)."""
    bundle = Path(bundle)
    recipe = read_recipe(bundle)
    onnx_path = confined(bundle, recipe.get("onnx"), "onnx")
    plan = confined(bundle, recipe.get("engine"), "engine")
    if not plan.is_file():
        raise D2VError(f"bundle '{bundle}' has no {plan.name}: run build_engine.sh (trtexec) first, then record it")
    doc: dict[str, Any] = {
        "built_with": built_with,
        "tensorrt": tensorrt_version or None,
        "verified_on_this_version": verified(tensorrt_version) if tensorrt_version else False,
        "precision": recipe.get("precision"),
        "strongly_typed": recipe.get("strongly_typed"),
        "trtexec": recipe.get("trtexec"),
        "plan_bytes": plan.stat().st_size,
        "layer_info": LAYER_INFO if (bundle / LAYER_INFO).is_file() else None,
        "device_index": 0,
    }
    write_engine_manifest(bundle, doc, onnx_path)
    if (bundle / MANIFEST_FILE).is_file():
        relist(bundle)
    return doc


def run_bundle(
    bundle: Path, feed: Mapping[str, np.ndarray], *, verify: bool = True, device: int = 0
) -> dict[str, np.ndarray]:
    """Run the bundle's engine on model-ready inputs (names as in build_recipe.json)."""
    bundle = Path(bundle)
    if verify:
        verify_files(bundle)
    recipe = read_recipe(bundle)
    plan = confined(bundle, recipe.get("engine"), "engine")
    require(device)
    if not plan.is_file():
        raise D2VError(
            f"bundle '{bundle}' has no engine yet; build it first: python3 {DEVICE_SCRIPT} build (or d2v-export build-engine)"
        )
    with EngineRunner(plan, name=f"tensorrt-{recipe['precision']}", device=device) as engine:
        return engine.infer(feed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 trt_device.py build|run|probe`` inside a bundle (or with --bundle DIR)."""
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(
        prog=DEVICE_SCRIPT,
        description="Build and run this TensorRT bundle on the device (TensorRT, cuda-python, numpy).",
    )
    ap.add_argument("command", choices=("build", "run", "probe", "record"))
    ap.add_argument("inputs", nargs="?", help="run: an .npz of model inputs named as in build_recipe.json")
    ap.add_argument("--bundle", type=Path, default=here, help="the bundle folder (default: this file's folder)")
    ap.add_argument("--device", default="cuda:0", help="CUDA device, cuda:N")
    ap.add_argument(
        "--no-verify", action="store_true", help="build or run without checking the bundle against manifest.json"
    )
    ap.add_argument("--workspace-gb", type=float, default=None)
    ap.add_argument("--timing-cache", type=Path, default=None)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--output", type=Path, default=None, help="run: write the outputs to this .npz")
    ap.add_argument("--tensorrt", default="", help="record: the TensorRT version trtexec reported")
    args = ap.parse_args(argv)
    try:
        if args.command == "record":
            record(args.bundle, tensorrt_version=args.tensorrt)
            _note_if_unverified(args.tensorrt)
            print(json.dumps({"recorded": [n for n in ENGINE_FILES if (args.bundle / n).is_file()]}))
            return 0
        if np is None:
            raise D2VError(
                f"{args.command} needs numpy (pip install numpy, or apt install python3-numpy)",
                ExitCode.TARGET_UNAVAILABLE,
            )
        index = device_index(args.device)
        if args.command == "probe":
            p = probe(index)
            print(json.dumps(dataclasses.asdict(p)))
            return 0 if p.ok else int(ExitCode.TARGET_UNAVAILABLE)
        if args.command == "build":
            workspace = int(args.workspace_gb * (1 << 30)) if args.workspace_gb else None
            plan, manifest = build_bundle(
                args.bundle,
                verify=not args.no_verify,
                workspace_bytes=workspace,
                timing_cache=args.timing_cache,
                iterations=args.iterations,
                device=index,
                progress=lambda m: print(f"[trt_device] {m}", file=sys.stderr),
            )
            print(json.dumps({"engine": str(plan), "benchmark": manifest.get("benchmark")}, default=str))
            return 0
        if not args.inputs:
            raise D2VError("run needs an .npz of model inputs: python3 trt_device.py run inputs.npz", ExitCode.USAGE)
        with np.load(args.inputs, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
        outputs = run_bundle(args.bundle, feed, verify=not args.no_verify, device=index)
        if args.output:
            tmp = args.output.with_name(f".{args.output.name}.tmp.npz")
            np.savez(tmp, **outputs)  # type: ignore[arg-type]
            os.replace(tmp, args.output)
        print(json.dumps({k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()}))
        return 0
    except D2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.code)


if __name__ == "__main__":
    sys.exit(main())
