"""The half of the TensorRT target that needs TensorRT and an NVIDIA GPU: engine build and engine runner.

Written against the real TensorRT 10 Python API and type-checked with ``tensorrt-stubs`` (mypy); nothing
here runs on a machine without both. ``backends/tensorrt.py`` holds the portable half (Q/DQ graph, build
recipe, trtexec script) and calls into this module only when ``probe().ok``.

- ``probe()``: is a usable TensorRT (>= 10, with ``Builder``) and a CUDA device here? One line why not.
  With only ``tensorrt-stubs`` installed, ``import tensorrt`` *succeeds* as an empty namespace package,
  so the check is ``hasattr(tensorrt, "Builder")``, never an ImportError.
- ``build(onnx, plan, settings)``: ONNX parser -> builder config (precision, workspace, one optimization
  profile, persistent timing cache) -> ``build_serialized_network`` -> ``model.plan``; returns the
  manifest (TensorRT, CUDA, GPU name and compute capability, build time).
- ``EngineRunner``: deserializes a plan, sets input shapes per call, keeps grow-only device buffers,
  runs ``execute_async_v3`` on its own stream and returns numpy outputs; ``gpu_times_ms`` times the
  engine alone with CUDA events after a warm-up.

Device memory, streams and events come from ``cuda-python`` (``cuda.bindings.runtime``, as NVIDIA's own
TensorRT samples use) when it is installed, otherwise from a CUDA build of ``torch``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np

if TYPE_CHECKING:  # checked by mypy against tensorrt-stubs; never imported at module load
    import tensorrt

from .spec import D2VError, ExitCode

MIN_MAJOR = 10  # explicit quantization, strongly typed networks, INT64 I/O and execute_async_v3 need 10+
INSTALL_HINT = "pip install 'd2v-export[tensorrt]' on a machine with an NVIDIA GPU"


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
    cleared_flags: tuple[str, ...] = ()  # names of trt.BuilderFlag to clear, e.g. ("TF32",) for a true fp32 engine
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None


# ------------------------------------------------------------------------------------ availability


def import_tensorrt() -> Any | None:
    """The real TensorRT module, or None (missing, or only the type-stubs namespace package)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


@functools.lru_cache(maxsize=1)
def probe() -> Probe:
    """Real TensorRT >= 10 and a CUDA device, or one line saying what is missing (callers add what to do).

    Cached for the process: the answer does not change while it runs, and asking initializes CUDA."""
    trt = import_tensorrt()
    if trt is None:
        return Probe(False, f"TensorRT is not installed ({INSTALL_HINT})")
    version = str(getattr(trt, "__version__", "0"))
    if _major(version) < MIN_MAJOR:
        return Probe(False, f"TensorRT {version} is too old (d2v-export needs {MIN_MAJOR}.0 or newer; {INSTALL_HINT})", version)
    try:
        cuda = cuda_api()
    except D2VError as exc:
        return Probe(False, f"TensorRT {version} is installed but {exc}", version)
    info = cuda.device_info()
    return Probe(True, version=version, device=f"{info['gpu']} (compute {info['compute_capability']})")


def require() -> None:
    """Return when TensorRT and a GPU are usable; else D2VError(TARGET_UNAVAILABLE) with the one-line reason."""
    p = probe()
    if not p.ok:
        raise D2VError(p.reason, ExitCode.TARGET_UNAVAILABLE)


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


# ------------------------------------------------------------------------------------ CUDA helpers


class CudaApi(Protocol):
    """The few CUDA runtime calls the runner needs; pointers and streams are plain ints."""

    name: str

    def device_info(self) -> dict[str, str]: ...
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def stream(self) -> int: ...
    def destroy_stream(self, stream: int) -> None: ...
    def to_device(self, ptr: int, array: np.ndarray, stream: int) -> None: ...
    def to_host(self, array: np.ndarray, ptr: int, stream: int) -> None: ...
    def synchronize(self, stream: int) -> None: ...
    def event(self) -> Any: ...
    def record(self, event: Any, stream: int) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...


def cuda_api() -> CudaApi:
    """cuda-python when installed, else a CUDA build of torch; D2VError when neither sees a GPU."""
    reasons = []
    try:
        return _CudaPython()
    except Exception as exc:  # noqa: BLE001 -- ImportError, or any CUDA error such as "no CUDA-capable device"
        reasons.append(f"cuda-python: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
    try:
        return _TorchCuda()
    except Exception as exc:  # noqa: BLE001 -- ImportError, or torch's own CUDA errors
        reasons.append(f"torch: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
    raise D2VError("no NVIDIA GPU is usable here (" + "; ".join(reasons) + ")", ExitCode.TARGET_UNAVAILABLE)


class _CudaPython:
    """cuda-python's runtime bindings: every call returns (error, *values)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        count = self._check(cudart.cudaGetDeviceCount())
        if int(count) < 1:
            raise RuntimeError("no CUDA device")

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.rt.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values)

    def device_info(self) -> dict[str, str]:
        device = self._check(self.rt.cudaGetDevice())
        prop = self._check(self.rt.cudaGetDeviceProperties(device))
        name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
        runtime = int(self._check(self.rt.cudaRuntimeGetVersion()))
        driver = int(self._check(self.rt.cudaDriverGetVersion()))
        return {
            "gpu": name,
            "compute_capability": f"{prop.major}.{prop.minor}",
            "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "cuda_driver": f"{driver // 1000}.{driver % 1000 // 10}",
            "memory_gb": f"{prop.totalGlobalMem / 2**30:.1f}",
            "via": self.name,
        }

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(1, nbytes))))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def stream(self) -> int:
        return int(self._check(self.rt.cudaStreamCreate()))

    def destroy_stream(self, stream: int) -> None:
        self._check(self.rt.cudaStreamDestroy(stream))

    def to_device(self, ptr: int, array: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream))

    def to_host(self, array: np.ndarray, ptr: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream))

    def synchronize(self, stream: int) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def event(self) -> Any:
        return self._check(self.rt.cudaEventCreate())

    def record(self, event: Any, stream: int) -> None:
        self._check(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._check(self.rt.cudaEventSynchronize(end))
        return float(self._check(self.rt.cudaEventElapsedTime(start, end)))


class _TorchCuda:
    """A CUDA build of torch as the allocator: byte tensors are the buffers, torch streams and events."""

    name = "torch.cuda"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        self.torch = torch
        self._buffers: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}

    def device_info(self) -> dict[str, str]:
        torch = self.torch
        prop = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "gpu": str(prop.name),
            "compute_capability": f"{prop.major}.{prop.minor}",
            "cuda_runtime": str(torch.version.cuda),
            "cuda_driver": "",
            "memory_gb": f"{prop.total_memory / 2**30:.1f}",
            "via": self.name,
        }

    def malloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device="cuda")
        ptr = int(t.data_ptr())
        self._buffers[ptr] = t
        return ptr

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def stream(self) -> int:
        s = self.torch.cuda.Stream()
        handle = int(s.cuda_stream)
        self._streams[handle] = s
        return handle

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream, None)

    def _view(self, ptr: int, nbytes: int) -> Any:
        base = next(p for p, t in self._buffers.items() if p <= ptr < p + t.numel())
        return self._buffers[base][ptr - base : ptr - base + nbytes]

    def to_device(self, ptr: int, array: np.ndarray, stream: int) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self._streams[stream]):
            self._view(ptr, array.nbytes).copy_(src)  # pageable host memory: returns when copied

    def to_host(self, array: np.ndarray, ptr: int, stream: int) -> None:
        with self.torch.cuda.stream(self._streams[stream]):
            data = self._view(ptr, array.nbytes).cpu().numpy()
        array.reshape(-1).view(np.uint8)[:] = data

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def event(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event: Any, stream: int) -> None:
        event.record(self._streams[stream])

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))


# ------------------------------------------------------------------------------------ build


def build(onnx_path: Path, plan_path: Path, settings: BuildSettings) -> dict[str, object]:
    """Parse ``onnx_path``, build a serialized engine at ``plan_path`` and return its manifest.

    Raises D2VError(TARGET_UNAVAILABLE) without TensorRT or a GPU, D2VError(BAD_INPUT) when the parser
    rejects the graph or the builder fails (with TensorRT's first error message).
    """
    require()
    import tensorrt as trt

    logger, errors = _logger()
    started = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that external-data weights beside the file are found.
    if not parser.parse_from_file(str(onnx_path)):
        messages = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise D2VError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(messages[:3]) or errors.last}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    for flag in settings.builder_flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise D2VError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (weak typing was removed in TensorRT 11); "
                "convert the graph to mixed precision (e.g. ModelOpt AutoCast) and build it strongly typed",
                ExitCode.TARGET_UNAVAILABLE,
            )
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in settings.cleared_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for inp in settings.inputs:
        profile.set_shape(inp.name, trt.Dims(list(inp.min)), trt.Dims(list(inp.opt)), trt.Dims(list(inp.max)))
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache
    cache_loaded = False
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused (then replaced by a
        # fresh one, written back after the build), never silently mixed in.
        cache_loaded = bool(data) and _use_timing_cache(config, data)
        if not cache_loaded:
            _use_timing_cache(config, b"")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise D2VError(f"TensorRT could not build an engine from {onnx_path.name}: {errors.last or 'see the log above'}")
    plan_path.write_bytes(memoryview(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    info = cuda_api().device_info()
    return {
        "tensorrt": str(trt.__version__),
        "gpu": info["gpu"],
        "compute_capability": info["compute_capability"],
        "cuda_runtime": info["cuda_runtime"],
        "cuda_driver": info["cuda_driver"],
        "precision": settings.precision,
        "strongly_typed": settings.strongly_typed,
        "builder_flags": list(settings.builder_flags),
        "cleared_flags": list(settings.cleared_flags),
        "workspace_bytes": settings.workspace_bytes,
        "timing_cache": str(cache_path) if cache_path is not None else None,
        "timing_cache_reused": cache_loaded,
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
                print(f"[TensorRT] {msg}")

    return Logger(), errors


# ------------------------------------------------------------------------------------ runner


class EngineRunner:
    """Runs a serialized engine; ``infer`` takes and returns numpy arrays (the pipeline's Runner protocol)."""

    def __init__(self, plan: Path, name: str = "tensorrt") -> None:
        require()
        import tensorrt as trt

        self.name = name
        self.cuda = cuda_api()
        self._logger, self._errors = _logger()
        self.runtime = trt.Runtime(self._logger)
        engine: tensorrt.ICudaEngine | None = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise D2VError(
                f"TensorRT {trt.__version__} cannot load {plan} ({self._errors.last or 'built with another TensorRT or GPU'}); "
                "rebuild it here with `d2v-export build-engine`",
                ExitCode.TARGET_UNAVAILABLE,
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes: dict[str, np.dtype[Any]] = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = self.cuda.stream()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if ptr:
                self.cuda.free(ptr)
            ptr, capacity = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, capacity)
        return ptr

    def _prepare(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set the input shapes, copy the inputs to the device and bind every tensor; returns empty outputs."""
        for name in self.inputs:
            array = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, tuple(array.shape)):
                lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise D2VError(f"input '{name}' of shape {array.shape} is outside the engine's profile ({lo} .. {hi})")
            ptr = self._buffer(name, array.nbytes)
            self.cuda.to_device(ptr, array, self.stream)
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            out = np.empty(tuple(int(dims[i]) for i in range(len(dims))), dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
            outputs[name] = out
        return outputs

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._prepare(feed)
        if not self.context.execute_async_v3(self.stream):
            raise D2VError(f"TensorRT failed to run the engine: {self._errors.last}")
        for name, out in outputs.items():
            self.cuda.to_host(out, self._buffers[name][0], self.stream)
        self.cuda.synchronize(self.stream)
        return {name: out.astype(np.float32, copy=False) if out.dtype == np.float16 else out for name, out in outputs.items()}

    def gpu_times_ms(self, feed: Mapping[str, np.ndarray], *, warmup: int = 10, iterations: int = 100) -> list[float]:
        """Engine time alone (no host copies), measured with CUDA events around each execute_async_v3."""
        self._prepare(feed)
        for _ in range(warmup):
            self.context.execute_async_v3(self.stream)
        self.cuda.synchronize(self.stream)
        start, end = self.cuda.event(), self.cuda.event()
        times = []
        for _ in range(iterations):
            self.cuda.record(start, self.stream)
            self.context.execute_async_v3(self.stream)
            self.cuda.record(end, self.stream)
            times.append(self.cuda.elapsed_ms(start, end))
        return times

    def close(self) -> None:
        for ptr, _capacity in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        if self.stream:
            self.cuda.destroy_stream(self.stream)
            self.stream = 0


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
