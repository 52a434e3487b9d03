"""A stand-in for cuda-python's runtime bindings: device memory is bytearrays keyed by fake pointers."""

import ctypes
import enum
import itertools
import os
import time

MEMORY: dict = {}  # device pointer -> bytearray
_ids = itertools.count(1 << 40, 1 << 32)
_pinned: dict = {}
CALLS: list = []


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class _Prop:
    name = b"Fake GPU\x00"
    major, minor = 8, 7
    totalGlobalMem = 8 << 30


def cudaGetDeviceCount():
    return cudaError_t.cudaSuccess, 1


def cudaSetDevice(device):
    CALLS.append(("cudaSetDevice", device))
    return (cudaError_t.cudaSuccess,) if device == 0 else (cudaError_t.cudaErrorInvalidDevice,)


def cudaGetErrorString(err):
    return cudaError_t.cudaSuccess, b"out of memory" if err == 2 else b"fake error"


def cudaGetDeviceProperties(device):
    return cudaError_t.cudaSuccess, _Prop()


def cudaRuntimeGetVersion():
    return cudaError_t.cudaSuccess, 12060


def cudaDriverGetVersion():
    return cudaError_t.cudaSuccess, 12080


def cudaMalloc(n):
    if os.environ.get("FAKE_CUDA_OOM"):
        return cudaError_t.cudaErrorMemoryAllocation, 0
    ptr = next(_ids)
    MEMORY[ptr] = bytearray(n)
    return cudaError_t.cudaSuccess, ptr


def cudaFree(ptr):
    MEMORY.pop(ptr)
    return (cudaError_t.cudaSuccess,)


def cudaMallocHost(n):
    buf = (ctypes.c_uint8 * n)()
    _pinned[ctypes.addressof(buf)] = buf
    CALLS.append(("cudaMallocHost", n))
    return cudaError_t.cudaSuccess, ctypes.addressof(buf)


def cudaFreeHost(ptr):
    _pinned.pop(ptr)
    return (cudaError_t.cudaSuccess,)


def cudaStreamCreate():
    return cudaError_t.cudaSuccess, 7


def cudaStreamDestroy(stream):
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream):
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst, src, n, kind, stream):
    if (
        src not in _pinned
        and not any(p <= src < p + ctypes.sizeof(b) for p, b in _pinned.items())
        and kind == cudaMemcpyKind.cudaMemcpyHostToDevice
    ):
        CALLS.append(("pageable copy", n))
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        MEMORY[dst][:n] = ctypes.string_at(src, n)
    else:
        ctypes.memmove(dst, bytes(MEMORY[src][:n]), n)
    return (cudaError_t.cudaSuccess,)


class _Event:
    t = 0.0


def cudaEventCreate():
    return cudaError_t.cudaSuccess, _Event()


def cudaEventDestroy(event):
    CALLS.append(("cudaEventDestroy",))
    return (cudaError_t.cudaSuccess,)


def cudaEventRecord(event, stream):
    CALLS.append(("cudaEventRecord",))
    event.t = time.perf_counter()
    return (cudaError_t.cudaSuccess,)


def cudaEventSynchronize(event):
    return (cudaError_t.cudaSuccess,)


def cudaEventElapsedTime(start, end):
    return cudaError_t.cudaSuccess, max(1e-3, (end.t - start.t) * 1000.0)
