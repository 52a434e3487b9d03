"""The half of the TensorRT target that needs TensorRT and an NVIDIA GPU: engine build and engine runner.

The code lives in ``trt_device.py``, which is self-contained (standard library + numpy; TensorRT and
cuda-python imported when used; Python 3.10+) so that the same file can be copied into every TensorRT
bundle and run on a device that has only TensorRT, cuda-python and numpy (JetPack). This module keeps
the package's name for it: ``backends/tensorrt.py`` and the tests import ``trt_engine``.
"""

from __future__ import annotations

from .trt_device import (
    ENGINE_FILES,
    INSTALL_HINT,
    INT8_MIN_VERSION,
    MIN_MAJOR,
    MIN_VERSION,
    BuildSettings,
    CudaApi,
    EngineRunner,
    InputProfile,
    Probe,
    atomic_write,
    atomic_write_json,
    build,
    build_bundle,
    confined,
    cuda_api,
    device_index,
    import_tensorrt,
    parse_version,
    probe,
    require,
    run_bundle,
    synthetic_feed,
    verify_files,
)

__all__ = [
    "ENGINE_FILES", "INSTALL_HINT", "INT8_MIN_VERSION", "MIN_MAJOR", "MIN_VERSION", "BuildSettings", "CudaApi",
    "EngineRunner", "InputProfile", "Probe", "atomic_write", "atomic_write_json", "build", "build_bundle", "confined",
    "cuda_api", "device_index", "import_tensorrt", "parse_version", "probe", "require", "run_bundle", "synthetic_feed",
    "verify_files",
]  # fmt: skip
