"""ONNX Runtime target: the ONNX file itself, run by the CPU execution provider."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision, QuantConfig, QuantRecipe
from ..int8.quantize import MATMUL_OPS, TOOL, RecipeTemplate
from ..int8.rewrite import DEFAULT as CLEAN_UP
from .base import (
    Availability,
    Backend,
    BackendBase,
    BuildRequest,
    Devices,
    Lever,
    PlanContext,
    Recovery,
    RunnerBase,
    RunnerKey,
    ServingLayout,
    TargetOption,
    copy_onnx,
    file_identity,
    files_in,
)

MODEL_FILE = "model.onnx"
SPINNING = "session.intra_op.allow_spinning"

# ONNX Runtime's own INT8 setting: 7-bit weights. Its u8 x s8 kernel saturates on x86 CPUs without VNNI (quantize.saturates).
REDUCE_RANGE = TargetOption(
    "reduce_range",
    "--reduce-range",
    ("auto", "on", "off"),
    "auto",
    "ONNX Runtime INT8 with 7-bit weights, exact on x86 CPUs without VNNI (their u8 x s8 kernel saturates with 8-bit "
    "weights). auto: on when the --target-profile's CPU, else this one, lacks VNNI.",
)


def session_options(threads: int, *, optimize: bool = True) -> Any:
    """The ONNX Runtime session settings d2v-export runs every graph with (``optimize=False``: no graph
    optimisations, e.g. for a faithful float simulation of a Q/DQ graph)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    # No busy-waiting workers after a run (ORT's default spins them). Measured on a 2-core Zen 3: alone,
    # 0-3 % slower on the base models; but a spinning session stole 35-60 % from whatever ran next in the
    # same process (another ORT session in an interleaved benchmark; the application's own code on an
    # edge device that shares its cores). docs/PERFORMANCE.md has the numbers.
    opts.add_session_config_entry(SPINNING, "0")
    return opts


def open_session(model: Path | bytes, options: Any) -> Any:
    """An ONNX Runtime session of ``model`` (a file, or the serialized graph) on the CPU execution provider."""
    import onnxruntime as ort

    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )


class OrtRunner(RunnerBase):
    def __init__(self, path: Path | bytes, threads: int, name: str = "onnxruntime", *, optimize: bool = True) -> None:
        self.name = name
        self.session = open_session(path, session_options(threads, optimize=optimize))
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, dict(feed))))

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend(BackendBase):
    name = "onnxruntime"
    display_name = "ONNX Runtime"  # how messages and docs write it
    extra = ""
    install_hint = "pip install onnxruntime"
    packages = ("onnxruntime", "onnxruntime-gpu")
    precisions = (Precision.FP32, Precision.INT8)
    int8_recipes = {
        "static": RecipeTemplate(
            "QDQ: uint8 activations calibrated per tensor, int8 weights per channel, on MatMul/Gemm/Conv inputs only",
            "static",
            MATMUL_OPS,
            tool=TOOL,
        ),
        "dynamic": RecipeTemplate(
            "MatMulInteger: uint8 activation ranges measured at run time, int8 weights per channel, MatMul/Gemm only "
            "(ConvInteger is slow on CPU)",
            "dynamic",
            ("MatMul", "Gemm"),
            tool=TOOL,
        ),
    }
    devices = Devices("CPU", "CPU", "CPU")
    standalone_runner = True  # bundle_run.py runs its bundles with onnxruntime + numpy (backends/bundle_run.py)
    # Triton's ONNX Runtime backend: 1/model.onnx (external weights keep their name: the graph refers to it)
    serving = ServingLayout(
        ("platform", "onnxruntime_onnx"), (("{name}", "model.onnx"), ("{name}.data", "{name}.data"))
    )
    # The graph clean-up (d2v_export.int8.rewrite) is off by default here: ONNX Runtime folds constants itself at
    # load time and the other rewrites measured within noise on its kernels; --pick tries it.
    rewrites: tuple[str, ...] = ()
    int8_options = (REDUCE_RANGE,)
    pick_levers = (
        Lever("static", description="QDQ, uint8 activations, per-channel int8 weights"),
        Lever("dynamic", description="MatMulInteger, activation ranges at run time"),
        Lever("static", "-7bit", settings={"reduce_range": "on"}, description="QDQ with 7-bit weights"),
        Lever("dynamic", "-7bit", settings={"reduce_range": "on"}, description="MatMulInteger with 7-bit weights"),
        Lever(
            "static",
            "-8bit",
            settings={"reduce_range": "off"},
            description="QDQ with 8-bit weights (CPUs with VNNI/AMX only)",
        ),
        Lever(
            "dynamic",
            "-8bit",
            settings={"reduce_range": "off"},
            description="MatMulInteger with 8-bit weights (CPUs with VNNI/AMX only)",
        ),
        Lever("static", "-clean", rewrites=CLEAN_UP, description="QDQ after the graph clean-up"),
    )

    def candidates(self, ctx: PlanContext) -> tuple[Lever, ...]:
        """``pick_levers`` less the 8-bit ones where the CPU the artifact is for saturates them (``quantize.saturates``)."""
        from ..int8.quantize import saturates

        if not saturates(_deployment_flags(ctx.profile)):
            return self.pick_levers
        return tuple(lv for lv in self.pick_levers if lv.settings.get(REDUCE_RANGE.name) != "off")

    def recipe(self, config: QuantConfig, settings: Mapping[str, str], ctx: PlanContext) -> QuantRecipe:
        """The shared recipe with the weight width ``--reduce-range`` (or the candidate) asks for."""
        recipe = super().recipe(config, settings, ctx)
        return dataclasses.replace(
            recipe, reduce_range=wants_reduce_range(settings.get(REDUCE_RANGE.name, REDUCE_RANGE.default), ctx.profile)
        )

    def available(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime does not import ({exc}); {self.install_hint}")
        return Availability(True, version=ort.__version__, devices=tuple(ort.get_available_providers()))

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / MODEL_FILE
        recipe = request.quant
        notes: tuple[str, ...] = ()
        if request.precision is Precision.FP32:
            copy_onnx(graph.path, target)
        elif request.precision is Precision.INT8 and request.quant is not None:
            from ..int8.quantize import quantize_onnx

            recipe = quantize_onnx(graph, target, request.quant, request.calibration).recipe  # what really stayed float
            notes = _range_notes(recipe)
        else:
            raise D2VError(
                f"onnxruntime builds fp32 or int8 on CPU, not {request.precision.value}; use --target openvino or tensorrt for it",
                ExitCode.TARGET_UNAVAILABLE,
            )
        return Artifact(
            self.name, request.precision, folder, target, files_in(folder), quantization=recipe, notes=notes
        )

    def recover(
        self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery
    ) -> tuple[Artifact, Drift, tuple[str, ...]]:
        """Rank nodes by the error their quantization adds; keep the worst in float until the budget holds."""
        from ..int8.fallback import describe, fallback

        assert request.quant is not None
        target = folder / MODEL_FILE

        def evaluate(path: Path) -> Drift:
            return recovery.evaluate(
                Artifact(self.name, request.precision, folder, path, files_in(folder), quantization=request.quant)
            )

        result = fallback(
            graph, request.quant, recovery.calibration, evaluate, target=target, progress=recovery.progress
        )
        artifact = Artifact(
            self.name,
            request.precision,
            folder,
            target,
            files_in(folder),
            quantization=result.quantized.recipe,
            notes=_range_notes(result.quantized.recipe),
        )
        return artifact, result.drift, describe(result)

    def runner(self, artifact: Artifact, *, threads: int) -> OrtRunner:
        return OrtRunner(artifact.model_file, threads, name=f"{self.name}-{artifact.precision.value}")

    def check_key(self, artifact: Artifact) -> RunnerKey:
        """``runner``'s session on ``artifact``'s file; the reference's (``onnx_runner_key``) when the file is the same."""
        return self.onnx_runner_key(artifact.model_file)

    def onnx_runner_key(self, model: Path, *, optimize: bool = True) -> RunnerKey:
        # the class, so that a subclass with another runner never shares a key; threads are left out: the CPU
        # execution provider's results do not depend on them
        runner = f"{type(self).__module__}.{type(self).__qualname__}: InferenceSession, CPUExecutionProvider"
        options = (("graph_optimization_level", "all" if optimize else "none"), (SPINNING, "0"))
        return RunnerKey(runner, options, file_identity(Path(model)))

    # The reference runtime (backends.reference()): d2v-export's own checks run plain ONNX graphs with these.
    def onnx_runner(
        self, model: Path | bytes, *, threads: int, name: str = "reference", optimize: bool = True
    ) -> OrtRunner:
        return OrtRunner(model, threads, name=name, optimize=optimize)

    def session_options(self, threads: int, *, optimize: bool = True) -> Any:
        return session_options(threads, optimize=optimize)

    def open_session(self, model: Path | bytes, options: Any) -> Any:
        return open_session(model, options)


def wants_reduce_range(setting: str, profile: Any = None) -> bool:
    """7-bit weights? ``--reduce-range`` "on"/"off"; "auto": when the CPU the artifact is for has no VNNI/AMX
    (``quantize.saturates``): the device profile's (its requires_cpu_flags), else this machine, where the drift is measured."""
    REDUCE_RANGE.check(setting)
    if setting in ("on", "off"):
        return setting == "on"
    from ..int8.quantize import saturates

    return saturates(_deployment_flags(profile))


def _deployment_flags(profile: Any) -> tuple[str, ...] | None:
    """The CPU flags a device profile requires, or None: this machine's."""
    return tuple(getattr(profile, "requires_cpu_flags", ()) or ()) or None


def _range_notes(recipe: Any) -> tuple[str, ...]:
    """Say which weight range the INT8 graph has, and when 8-bit weights may saturate on this CPU."""
    from ..int8.quantize import saturates

    if recipe.reduce_range:
        return (
            "7-bit weights (reduce_range): u8 x s8 products stay exact on x86 CPUs without VNNI; "
            "--reduce-range off gives 8-bit weights for VNNI/AMX CPUs",
        )
    if saturates():
        return (
            "8-bit weights on a CPU without VNNI: ONNX Runtime's u8 x s8 kernel here can saturate 16-bit sums; "
            "the drift above was measured with it. --reduce-range on (7-bit weights) makes it exact",
        )
    return ()


BACKEND: Backend = OnnxRuntimeBackend()
