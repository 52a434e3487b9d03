"""TensorRT target, in two halves (see docs/tensorrt.md).

The portable half is written everywhere, with or without TensorRT and a GPU:

    folder/model.onnx          fp32 graph (fp32, fp16) or the explicit Q/DQ INT8 graph (int8)
    folder/build_recipe.json   shapes min/opt/max per input, precision, typing, workspace, timing cache
    folder/build_engine.sh     the same recipe as a `trtexec` command line

The engine half needs TensorRT 10.x or 11.x and an NVIDIA GPU (``device.py``, also shipped in every bundle as
``trt_device.py``):

    folder/model.plan            the serialized engine (tied to GPU, TensorRT and CUDA versions)
    folder/engine_manifest.json  TensorRT, CUDA, GPU name and compute capability, build settings
                                 (+ GPU benchmark and a check against ONNX Runtime after build_engine)
    folder/timing.cache          TensorRT's timing cache, reused by later builds on the same device

Precisions and how each is built: every one **strongly typed with no precision flag** (``--stronglyTyped``,
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so one bundle builds on TensorRT 10.x and 11.x (11 removed
weak typing, ``BuilderFlag.FP16/INT8`` and trtexec ``--fp16/--int8/--best``; its migration guide):

- fp32: fp32 graph, TF32 cleared (``--noTF32``): a true fp32 engine, comparable with the fp32 ONNX export check.
- fp16: the fp32 export rewritten to fp16 (``fp16_remainder``: fp16 weights and compute, fp32 graph inputs and
  outputs with casts at the boundaries, LayerNormalization and Softmax in fp32), as Model Optimizer's AutoCast
  does for TensorRT 11 (``keep_io_types``). Checked here on ONNX Runtime against PyTorch with the half-precision
  tolerance (``validate.HALF_TOLERANCE_FACTOR``), like every half artifact.
- int8: Q/DQ graph (``int8_recipes["static"]``: symmetric int8, per-channel
  weights, Q/DQ only on the inputs of MatMul/Gemm/Conv) whose float remainder is rewritten to fp16
  (``fp16_remainder``: fp32 graph inputs/outputs with casts at the boundaries, fp16 Q/DQ scales,
  LayerNormalization and Softmax computed in fp32), built **strongly typed** (``--stronglyTyped``, no
  precision flags; TensorRT >= 10.0): int8 where the Q/DQ pairs are, fp16 elsewhere, fp32 exactly
  where the graph says. Its accuracy is simulated on ONNX Runtime with graph optimisations off, so the
  Q/DQ pairs stay float fake-quantization (``SimulationRunner``), never ORT's integer kernels.

Without TensorRT or a GPU: ``compile`` raises D2VError(TARGET_UNAVAILABLE) naming ``--defer-build``;
with ``TensorRTRequest.defer_build`` (``--defer-build``) it writes the portable half only, and ``runner`` runs ``model.onnx`` on
ONNX Runtime, named and noted as a simulation (never engine accuracy or latency).

The modules: ``recipe`` (build_recipe.json, trtexec script, file names), ``graph`` (Q/DQ placement,
fix-ups, fp16 remainder, checks), ``build`` (writing the bundle, fallback), ``engine`` (runners,
``build-engine``, running a bundle), ``device`` (the engine half itself: numpy-only at import).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...int8.quantize import MATMUL_OPS, TOOL, RecipeTemplate
from ...int8.recipe_choice import Choice
from ...spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision
from ..base import (
    Availability,
    Backend,
    BackendBase,
    BuildRequest,
    Devices,
    Lever,
    Opened,
    PlanContext,
    Recovery,
    Runner,
    ServingLayout,
    Snippet,
    onnx_snippet,
)
from ..onnxruntime import OrtRunner
from . import device as trt_device
from .build import TensorRTRequest, compile_bundle, recover
from .engine import (
    EngineRunnerAdapter,
    SimulationRunner,
    _engine_device,
    build_engine,
    build_engines,
    find_bundles,
    open_bundle,
)
from .graph import (
    MIN_GEMM_DIM,
    RESIDUAL_OP,
    _check_recipe,
    _fix_and_check,
    _fixups,
    _fp16_and_check,
    _with_placement_rules,
    fp16_remainder,
    gemv_nodes,
    qdq_problems,
    residual_adds,
    residual_qdq,
    tensorrt_fixups,
)
from .recipe import (
    BUILDS,
    DEFAULT_WORKSPACE_GB,
    FP16_REMAINDER_NOTE,
    FP32_OPS,
    DEFER_HINT,
    DEVICE_SCRIPT,
    ENGINE_MANIFEST,
    NAME,
    NOT_BUILT,
    ONNX_FILE,
    PLAN_FILE,
    RECIPE_FILE,
    RECIPE_FORMAT,
    RECIPE_VERSION,
    SCRIPT_FILE,
    SIMULATED_FLOAT,
    SIMULATED_INT8,
    SIMULATED_LATENCY,
    TIMING_CACHE,
    Build,
    build_script,
    input_profiles,
    make_build_recipe,
    read_recipe,
    settings_from,
    trtexec_command,
)


# Measured on the trained example models (docs/quantization.md, "Default recipe per modality").
FFN_OUT_STAYS_FLOAT = Choice(
    ("input", "ffn_out"),
    "TensorRT text: the FFN output projections stay float; symmetric int8 on the one-sided GELU output wastes half "
    "the range (trained text example: logit cosine 0.989 -> 0.997, top-1 agreement 0.975 -> 0.983)",
)


# What --pick tries besides fp32 (each judged on the evaluation split). Residual-Add Q/DQ is an option, not the default:
# measured on the trained examples it was no better (docs/tensorrt.md, "Residual-Add Q/DQ").
PICK_LEVERS = (
    Lever(
        "static", description="explicit Q/DQ on MatMul/Gemm/Conv inputs (TensorRT's placement rules), fp16 remainder"
    ),
    Lever(
        "static",
        "-residual",
        op_types=(*MATMUL_OPS, RESIDUAL_OP),
        description="the same plus Q/DQ on both inputs of the residual Adds that feed a LayerNorm (Model Optimizer's placement)",
    ),
)


class TensorRTBackend(BackendBase):
    name = NAME
    display_name = "TensorRT"  # how messages and docs write it
    extra = "tensorrt"
    install_hint = (
        "pip install 'd2v-export[tensorrt]' --extra-index-url https://pypi.nvidia.com on a machine with an NVIDIA GPU"
    )
    packages = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "cuda-python")
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    int8_recipes = {
        "static": RecipeTemplate(
            "explicit quantization: symmetric int8 Q/DQ (zero point 0) on MatMul/Gemm/Conv inputs only, int8 weights per channel",
            "static",
            MATMUL_OPS,
            symmetric_activations=True,
            tool=TOOL,
        ),
    }
    recipe_choices = {"text": FFN_OUT_STAYS_FLOAT}  # layers its INT8 keeps float by rule (recipe_choice)
    pick_levers = PICK_LEVERS
    devices = Devices("cuda:0", r"(cuda|gpu)(:\d+)?", "cuda or cuda:N")
    can_defer = True  # with TensorRTRequest.defer_build the portable half is written without TensorRT or a GPU
    # Triton's TensorRT backend: 1/model.plan, the engine build_engine.sh builds on the device (engines are tied to GPU and version)
    serving = ServingLayout(
        ("platform", "tensorrt_plan"), deferred=("model.plan", "model.plan"), instance_kind="KIND_GPU"
    )

    def available(self) -> Availability:
        p = trt_device.probe()
        if not p.ok:
            return Availability(False, f"{p.reason} — {DEFER_HINT}", version=p.version)
        return Availability(True, version=p.version, devices=(p.device,))

    def resolve_device(self, device: str, *, defer_build: bool = False) -> str:
        """``cuda:N``; unless the build is deferred, a GPU that TensorRT finds at that index (exit 6 when not)."""
        if not self.devices.accepts(device.strip()):
            raise self.devices.refuse(self.name, device)
        index = trt_device.device_index(device.strip())
        probe = None if defer_build else trt_device.probe(index)
        if probe is not None and not probe.ok:
            raise D2VError(
                f"target {self.name} cannot use cuda:{index} here: {probe.reason} — {DEFER_HINT}",
                ExitCode.TARGET_UNAVAILABLE,
            )
        return f"cuda:{index}"

    def measured_on(self, artifact: Artifact, device: str) -> str:
        """The GPU whose engine ran here; else ONNX Runtime on the CPU stood in for it (a simulation, engine not built)."""
        index = _engine_device(artifact.path)
        if (artifact.path / PLAN_FILE).is_file() and trt_device.probe(index).ok:
            return trt_device.probe(index).device or device
        return f"CPU (ONNX Runtime simulation; the engine for {device} is not built yet)"

    def request(self, ctx: PlanContext, **fields: Any) -> TensorRTRequest:
        """With ``--defer-build`` the portable half only (``TensorRTRequest.defer_build``)."""
        return TensorRTRequest(**fields, defer_build=ctx.defer_build)

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact:
        return compile_bundle(graph, folder, request)

    def recover(
        self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery
    ) -> tuple[Artifact, Drift, tuple[str, ...]]:
        return recover(graph, folder, request, recovery)

    def runner(self, artifact: Artifact, *, threads: int) -> Runner:
        plan = artifact.path / PLAN_FILE
        label = f"{self.name}-{artifact.precision.value}"
        device = _engine_device(artifact.path)
        if plan.is_file() and trt_device.probe(device).ok:
            return EngineRunnerAdapter(trt_device.EngineRunner(plan, name=label, device=device))
        if artifact.precision is Precision.INT8:
            return SimulationRunner(
                artifact.path / ONNX_FILE,
                threads,
                name=f"{label} (Q/DQ graph, fp16 remainder, simulated on ONNX Runtime)",
            )
        if artifact.precision is Precision.FP16:
            return SimulationRunner(
                artifact.path / ONNX_FILE, threads, name=f"{label} (fp16 graph, simulated on ONNX Runtime)"
            )
        return OrtRunner(
            artifact.path / ONNX_FILE, threads, name=f"{label} (engine not built: fp32 graph on ONNX Runtime)"
        )

    def diagnose(self) -> dict[str, str | int | None]:
        """``doctor``: what to install here for TensorRT and CUDA (by Jetson L4T release or driver branch)."""
        return trt_device.diagnosis()

    def diagnosis_lines(self, details: Mapping[str, Any]) -> list[str]:
        return _diagnosis_lines(details)

    def commands(self) -> Sequence[Any]:
        """``d2v-export build-engine`` (backends/tensorrt/commands.py): build a deferred bundle's engine on the device."""
        from .commands import build_engine

        return (build_engine,)

    def open_bundle(self, folder: Path, model_file: str, files: Sequence[str]) -> Opened:
        """Its engine where one was built and TensorRT runs here, else its ONNX file on ONNX Runtime (the
        same graph the engine was or will be built from), said in the notes."""
        return open_bundle(self, folder, files)

    def readme_snippet(self, bundle: str, model_file: str, folder: Path | None) -> Snippet:
        return Snippet(
            onnx_snippet(bundle, model_file if model_file.endswith(".onnx") else ONNX_FILE),
            (
                "",
                "A TensorRT engine (`model.plan`) runs only on the GPU model and TensorRT version it was built with; "
                "without one, `d2v-export run` runs `model.onnx` with ONNX Runtime and says so.",
            ),
        )


def _diagnosis_lines(details: Mapping[str, Any]) -> list[str]:
    l4t, driver = details.get("jetson_l4t"), details.get("driver_branch")
    where = f"Jetson L4T {l4t}" if l4t else (f"driver R{driver}" if driver else "no NVIDIA driver found")
    return ["", f"tensorrt ({where}): {details.get('install')}"]


BACKEND: Backend = TensorRTBackend()

__all__ = [
    "BACKEND",
    "BUILDS",
    "DEFAULT_WORKSPACE_GB",
    "DEVICE_SCRIPT",
    "ENGINE_MANIFEST",
    "FP16_REMAINDER_NOTE",
    "FP32_OPS",
    "MIN_GEMM_DIM",
    "NAME",
    "ONNX_FILE",
    "PICK_LEVERS",
    "RESIDUAL_OP",
    "PLAN_FILE",
    "RECIPE_FILE",
    "RECIPE_FORMAT",
    "RECIPE_VERSION",
    "SCRIPT_FILE",
    "TIMING_CACHE",
    "Build",
    "EngineRunnerAdapter",
    "TensorRTRequest",
    "SimulationRunner",
    "TensorRTBackend",
    "build_engine",
    "build_engines",
    "build_script",
    "find_bundles",
    "fp16_remainder",
    "gemv_nodes",
    "input_profiles",
    "make_build_recipe",
    "qdq_problems",
    "read_recipe",
    "residual_adds",
    "residual_qdq",
    "settings_from",
    "tensorrt_fixups",
    "trtexec_command",
]
