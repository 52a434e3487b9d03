"""A stand-in for TensorRT's Python API (the calls trt_device.py makes). Version from $FAKE_TRT_VERSION.

10.x: weak typing still there (BuilderFlag.FP16/INT8), strong typing opt-in; a strongly typed network with a
precision flag fails to build, as TensorRT refuses it. 11.x: no BuilderFlag.FP16/INT8 (removed), every network
strongly typed (the STRONGLY_TYPED creation flag accepted and ignored). 8.x: only the version, to be refused.
$FAKE_TRT_FAIL_BUILD=1 makes the build fail without a message; a timing cache holding b"bad" is refused with
an error logged, as a cache from another GPU is."""

import ctypes
import json
import os

import numpy as np

try:
    from cuda.bindings import runtime as _cuda

    MEMORY = _cuda.MEMORY
except ImportError:  # the libcudart path: device pointers are real host addresses (tests/fake_trt/libcudart.c)
    MEMORY = {}

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.3.0")
MAJOR = int(__version__.split(".")[0])
BUILT: list = []


def _read(ptr, n):
    return bytes(MEMORY[ptr][:n]) if ptr in MEMORY else ctypes.string_at(ptr, n)


def _write(ptr, data):
    if ptr in MEMORY:
        MEMORY[ptr][: len(data)] = data
    else:
        ctypes.memmove(ptr, data, len(data))


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 5


class MemoryPoolType:
    WORKSPACE = 0


class BuilderFlag:
    TF32 = 7


if MAJOR < 11:  # weak typing: removed in TensorRT 11
    BuilderFlag.FP16 = 0
    BuilderFlag.INT8 = 1


class TensorIOMode:
    INPUT = "input"
    OUTPUT = "output"


class DataType:
    FLOAT = "DataType.FLOAT"
    INT64 = "DataType.INT64"


class ILogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    def __init__(self):
        pass


def Dims(values):
    return tuple(values)


class _Network:
    def __init__(self, flags):
        self.flags = flags


class OnnxParser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path):
        self.network.source = path
        return os.path.isfile(path)


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _Cache:
    def __init__(self, data):
        self.data = bytes(data) or b"fresh-cache"

    def serialize(self):
        return memoryview(self.data)


class _Config:
    def __init__(self):
        self.flags, self.cleared, self.profiles, self.cache = set(), set(), [], None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.add(flag)

    def add_optimization_profile(self, profile):
        for lo, opt, hi in profile.shapes.values():
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return _Cache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data == b"bad":
            self.logger.log(ILogger.Severity.ERROR, "timing cache was created on another device (fake refusal)")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network(flags)

    def create_builder_config(self):
        config = _Config()
        config.logger = self.logger
        return config

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        strong = MAJOR >= 11 or bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        if os.environ.get("FAKE_TRT_FAIL_BUILD") or (strong and config.flags):
            if config.flags:
                self.logger.log(
                    ILogger.Severity.ERROR, "precision flags are not allowed with a strongly typed network (fake)"
                )
            return None
        doc = {
            "shapes": config.profiles[0].shapes,
            "strongly_typed": strong,
            "flags": sorted(config.flags),
            "cleared": sorted(config.cleared),
            "version": __version__,
        }
        BUILT.append(doc)
        return memoryview(b"FAKEPLAN" + json.dumps(doc).encode())


class _Engine:
    def __init__(self, doc):
        self.doc = doc
        self.names = [*doc["shapes"], "logits"]
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.OUTPUT if name == "logits" else TensorIOMode.INPUT

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def get_tensor_profile_shape(self, name, index):
        return self.doc["shapes"][name]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _opt, hi = self.engine.doc["shapes"][name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        first = next(iter(self.engine.doc["shapes"]))
        return self.shapes[first][:-1]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        first = next(iter(self.engine.doc["shapes"]))
        shape = self.shapes[first]
        n = int(np.prod(shape))
        x = np.frombuffer(_read(self.addresses[first], 4 * n), dtype=np.float32).reshape(shape)
        y = x.sum(axis=-1).astype(np.float32)
        _write(self.addresses["logits"], y.tobytes())
        return True


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data):
        if not bytes(data).startswith(b"FAKEPLAN"):
            return None
        return _Engine(json.loads(bytes(data)[8:]))


def nptype(dtype):
    return {DataType.FLOAT: np.float32, DataType.INT64: np.int64}[dtype]
