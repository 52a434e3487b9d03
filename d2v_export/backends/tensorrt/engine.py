"""Running a TensorRT bundle here: the engine (with TensorRT and a GPU) or its ONNX graph on ONNX Runtime,
and ``build_engine`` for a deferred bundle on the device."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...spec import D2VError, ExitCode
from ..base import Backend, Opened, RunnerBase
from ..onnxruntime import OrtRunner
from . import device as trt_device
from .recipe import DEFAULT_WORKSPACE_GB, ENGINE_MANIFEST, NAME, ONNX_FILE, RECIPE_FILE, read_recipe

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _engine_device(folder: Path) -> int:
    """The CUDA device the bundle's engine was built on (engine_manifest.json), 0 when unknown."""
    try:
        return int(json.loads((folder / ENGINE_MANIFEST).read_text(encoding="utf-8")).get("device_index", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class SimulationRunner(OrtRunner):
    """ONNX Runtime on the TensorRT graph with graph optimisations off: a faithful float simulation.

    With ORT's default (ORT_ENABLE_ALL) the Q/DQ pairs become integer CPU kernels (QLinearMatMul,
    MatMulInteger), which accumulate and saturate like this CPU does, not like TensorRT. With
    ORT_DISABLE_ALL every QuantizeLinear/DequantizeLinear runs as its own float op (round, clip, scale:
    fake-quantization) and the GEMMs run in float on the dequantized values. fp16 tensors of the graph are
    rounded to fp16 as the graph says; ORT computes an fp16 op without a CPU fp16 kernel in fp32 between
    casts it inserts, so what is simulated is fp16 *storage* of every fp16 tensor, not fp16 arithmetic."""

    def __init__(self, path: Path, threads: int, name: str) -> None:
        super().__init__(path, threads, name, optimize=False)


class EngineRunnerAdapter(RunnerBase):
    """trt_device.EngineRunner behind the backends' Runner protocol."""

    def __init__(self, engine: trt_device.EngineRunner) -> None:
        self.engine = engine
        self.name = engine.name

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.infer(feed)

    def close(self) -> None:
        self.engine.close()


# ------------------------------------------------------------------------------------ on the device


def find_bundles(root: Path) -> tuple[Path, ...]:
    """``root`` itself when it holds a build recipe, else its direct sub-folders that do (a run's output)."""
    root = Path(root)
    if (root / RECIPE_FILE).is_file():
        return (root,)
    return tuple(sorted(p for p in root.iterdir() if (p / RECIPE_FILE).is_file())) if root.is_dir() else ()


def build_engines(root: Path, **settings: Any) -> Iterator[Path]:
    """``d2v-export build-engine``: build every deferred bundle under ``root`` (``find_bundles``), yielding each
    engine as it is built; ``settings`` are ``build_engine``'s keywords."""
    found = find_bundles(root)
    if not found:
        raise D2VError(
            f"'{root}' holds no TensorRT bundle ({RECIPE_FILE}); pass a folder written with --target {NAME} --defer-build"
        )
    for folder in found:
        yield build_engine(folder, **settings)


def build_engine(
    bundle_dir: Path,
    *,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: Path | None = None,
    iterations: int = 200,
    device: str | int | None = None,
    verify: bool = True,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Build the engine of a deferred bundle on this device, benchmark it and check it; returns model.plan.

    First verifies the bundle against its manifest.json (every file's sha256; no pickles): a bundle is
    copied between machines, and one without a manifest is refused unless ``verify`` is False
    (``--no-verify``). The recipe's ``onnx``/``engine``/``timing_cache`` paths must stay inside the bundle
    (the manifest's rule). Writes model.plan, the timing cache and engine_manifest.json atomically
    (versions, GPU, build settings, GPU latency with CUDA events, and the largest difference between the
    engine and ONNX Runtime running the same model.onnx at min/opt/max shapes). The build itself is
    ``trt_device.build_bundle``, the same code the bundle's own ``trt_device.py`` runs on a device without
    d2v-export. Raises D2VError(TARGET_UNAVAILABLE) without TensorRT (at the recipe's version) or a GPU.
    """
    bundle = Path(bundle_dir)
    read_recipe(bundle)
    if verify:
        if not (bundle / "manifest.json").is_file():
            raise D2VError(
                f"bundle '{bundle}' has no manifest.json, so what would be built cannot be checked; "
                "pass a bundle written by d2v-export, or --no-verify to build it unchecked"
            )
        from ...deploy import bundle as bundle_mod

        bundle_mod.verify(bundle)
    try:
        plan, _manifest = trt_device.build_bundle(
            bundle,
            verify=False,  # checked above, with the package's full rules
            workspace_bytes=int(workspace_gb * (1 << 30)),
            timing_cache=Path(timing_cache) if timing_cache is not None else None,
            iterations=iterations,
            device=trt_device.device_index(device),
            check=_compare_with_ort,
            progress=progress,
        )
    except D2VError as exc:
        if exc.code == ExitCode.TARGET_UNAVAILABLE:
            raise D2VError(f"build-engine runs on the target device: {exc}", exc.code) from None
        raise
    return plan


def _compare_with_ort(
    onnx_path: Path, feeds: Mapping[str, Mapping[str, np.ndarray]], engine_out: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, Any]:
    """Largest |engine - ONNX Runtime| per shape point, absolute and scaled by max(1, max |ORT|)."""
    result: dict[str, Any] = {}
    with SimulationRunner(onnx_path, threads=0, name="onnxruntime") as ort_runner:
        for which, feed in feeds.items():
            ref = ort_runner.infer(feed)
            worst_abs = worst_scaled = 0.0
            for name, expected in ref.items():
                got = np.asarray(engine_out[which].get(name), dtype=np.float64)
                if got.shape != expected.shape:
                    worst_abs = worst_scaled = float("inf")
                    continue
                err = float(np.max(np.abs(got - expected))) if expected.size else 0.0
                worst_abs = max(worst_abs, err)
                worst_scaled = max(
                    worst_scaled, err / max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
                )
            result[which] = {"max_abs_error": worst_abs, "max_scaled_error": worst_scaled}
    return result


def open_bundle(backend: Backend, folder: Path, files: Sequence[str]) -> Opened:
    """A TensorRT bundle: its engine where one was built and TensorRT runs here, else its ONNX file on
    ONNX Runtime (the same graph the engine was or will be built from), said in the notes."""
    from ..onnxruntime import BACKEND as ONNX_RUNTIME

    engine = next((f for f in sorted(files) if f.endswith(ENGINE_SUFFIXES)), None)
    onnx_files = [f for f in files if f.endswith(".onnx")]
    onnx = ONNX_FILE if ONNX_FILE in onnx_files else (onnx_files[0] if onnx_files else None)
    avail = backend.available()
    if engine is not None and avail.ok:
        return Opened(backend, NAME, engine)
    if onnx is None:
        raise D2VError(
            f"bundle '{folder}' has "
            + ("an engine, but TensorRT cannot run here" if engine else "no TensorRT engine")
            + f" and no ONNX file to run instead ({avail.reason or 'no engine'})",
            ExitCode.TARGET_UNAVAILABLE,
        )
    reason = (
        "the bundle has no TensorRT engine"
        if engine is None
        else f"TensorRT cannot run its engine here ({avail.reason})"
    )
    note = f"{reason}: ran its ONNX file '{onnx}' with ONNX Runtime on the CPU instead (not engine accuracy or latency)"
    return Opened(ONNX_RUNTIME, ONNX_RUNTIME.name, onnx, (note,))
