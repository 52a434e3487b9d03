"""The data that flows through d2v-export: frozen dataclasses and enums.

    ModelSpec --export--> ExportedGraph --quantize--> QuantizedGraph --compile--> Artifact
                                                                                   |
    fp32 PyTorch reference ------------------ validate + bench <-------------------+
                                                   |
                                                 Report

Nothing in here imports torch, onnx or a runtime: these types are plain data.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping


REFERENCE = "pytorch-fp32"  # the name of the fp32 PyTorch reference in reports, drift and latency tables


class Modality(str, enum.Enum):
    VISION = "vision"
    TEXT = "text"
    AUDIO = "audio"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class SourceKind(str, enum.Enum):
    PRESET = "preset"  # built offline from a known architecture, random weights
    LOCAL = "local"  # a Hugging Face checkpoint folder on disk
    HUB = "hub"  # a Hugging Face hub id


class ExitCode(enum.IntEnum):
    """Documented exit codes of the command line (README.md, "Exit codes", and `d2v-export --help`; tests/test_docs.py checks both)."""

    OK = 0
    INTERNAL = 1  # a bug: please report it
    USAGE = 2  # Click's own code for a bad option
    BAD_INPUT = 3  # model path, checkpoint, task, calibration data or output folder is wrong
    EXPORT_MISMATCH = 4  # ONNX does not match PyTorch within the head's tolerance
    DRIFT_BUDGET = 5  # a variant's accuracy drift is over its budget
    TARGET_UNAVAILABLE = 6  # a requested target cannot run here (package or device missing)
    REGRESSION = 7  # slower or less accurate than the baseline
    LATENCY_BUDGET = 8  # slower than the device profile's (--target-profile) latency budget


def verdict_code(*, drift_passed: bool, latency_passed: bool = True, regression_passed: bool = True) -> ExitCode:
    """The one gating order of a run, a matrix and the CLI: drift (5) first, then the latency budget (8), then the baseline (7)."""
    if not drift_passed:
        return ExitCode.DRIFT_BUDGET
    if not latency_passed:
        return ExitCode.LATENCY_BUDGET
    if not regression_passed:
        return ExitCode.REGRESSION
    return ExitCode.OK


class D2VError(Exception):
    """An error the user can fix. The message is one line that names the problem and the fix."""

    code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str, code: ExitCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


@dataclass(frozen=True)
class ModelSpec:
    """Where a checkpoint comes from and what to build from it."""

    source: str  # as the user gave it: "preset:base", a folder, or a hub id
    kind: SourceKind
    modality: Modality
    task: str | None = None  # Hugging Face task name; None means the checkpoint's own head

    @property
    def preset(self) -> str | None:
        return self.source.split(":", 1)[1] if self.kind is SourceKind.PRESET else None


@dataclass(frozen=True)
class Dim:
    """One dynamic axis with the range a deployed model must accept."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise D2VError(
                f"{self.name}: need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}; "
                "pass MIN:OPT:MAX in increasing order"
            )


@dataclass(frozen=True)
class ShapeProfile:
    """Dynamic axes (min/opt/max) plus the static sizes a modality needs (image size, choices)."""

    dims: tuple[Dim, ...]
    static: Mapping[str, int] = field(default_factory=dict)

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    def point(self, which: str) -> dict[str, int]:
        """Sizes of every axis at "min", "opt" or "max"."""
        return {d.name: getattr(d, which) for d in self.dims} | dict(self.static)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | str, ...]  # an int is static, a str names a dynamic axis


@dataclass(frozen=True)
class Drift:
    """How far a candidate is from the fp32 PyTorch reference. Data, never an exception."""

    reference: str  # e.g. "pytorch-fp32"
    samples: int  # inputs compared
    metrics: Mapping[str, float]  # metric name -> measured value
    budget: Mapping[str, float]  # metric name -> limit ("max_abs_error" is an upper bound, agreement a lower one)
    passed: bool
    failed: tuple[str, ...] = ()  # metrics over budget
    detail: str = ""  # one line: the worst output, the shapes compared, where the inputs came from
    informational: Mapping[str, str] = field(default_factory=dict)  # metric -> why it is reported but does not gate
    # metrics that count answers (d2v_export.measure.confidence): metric -> (lower, upper) bound, each one-sided at the
    # metric's confidence; a metric fails only when over budget with that confidence
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    confidence: Mapping[str, float] = field(default_factory=dict)  # metric -> the confidence of its bounds
    unresolved: tuple[str, ...] = ()  # within budget as far as the items show, but too few of them to prove it


@dataclass(frozen=True)
class LatencyStats:
    p50: float
    p90: float
    p99: float
    mean: float
    stdev: float
    n: int
    batch: int
    shape: Mapping[str, int] = field(default_factory=dict)
    samples_ms: tuple[float, ...] = ()  # raw timings, kept for statistical comparison

    @property
    def throughput(self) -> float:
        """Items per second at the median."""
        return 1000.0 * self.batch / self.p50 if self.p50 > 0 else 0.0


@dataclass(frozen=True)
class ExportedGraph:
    path: Path  # the fp32 ONNX file
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: ShapeProfile
    opset: int
    exporter: str
    check: Drift  # ONNX Runtime against PyTorch at several shapes
    seconds: float = 0.0


QUANT_MODES = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
PRESETS = ("performance", "mixed")  # NNCF's: symmetric int8 activations (performance) or asymmetric ones (mixed)


@dataclass(frozen=True)
class IgnoredScope:
    """What INT8 leaves float, as NNCF's ignored scope: by structural rule, by node name, by op type."""

    rules: tuple[str, ...] = ()  # recipe_choice.RULES ("input", "head", "ffn_out"): found by their place in the graph
    names: tuple[str, ...] = ()  # node names of the exported graph
    types: tuple[str, ...] = ()  # op types that are never quantized


@dataclass(frozen=True)
class QuantConfig:
    """The INT8 asked of a target, in no target's terms (NNCF's ``quantize(preset=, ignored_scope=, subset_size=)``).

    The run's ``--quant``/``--calib-method``, or one ``--pick`` candidate (``backends.base.Lever``); the backend turns
    it into what it builds (``Backend.plan``, ``quantize.make_recipe``), and ``QuantRecipe`` records what was made.
    What one target alone understands is not here: it is that target's own setting (``Backend.int8_options``).
    """

    mode: str = "static"  # "static": calibrated activations | "dynamic": the target's activation-free INT8
    method: str = "minmax"  # static calibration: minmax | entropy | percentile
    samples: int = 0  # calibration samples used (static)
    preset: str | None = None  # PRESETS; None: the target's own choice for the modality (recipe_choice)
    ignored: IgnoredScope = IgnoredScope()
    op_types: tuple[str, ...] | None = None  # ops whose inputs are quantized; None: the target's template's

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, QUANT_MODES), ("method", self.method, CALIBRATION_METHODS)):
            if value not in allowed:
                raise D2VError(f"INT8 {name} '{value}': choose one of {', '.join(allowed)}", ExitCode.USAGE)
        if self.preset is not None and self.preset not in PRESETS:
            raise D2VError(f"INT8 preset '{self.preset}': choose one of {', '.join(PRESETS)}", ExitCode.USAGE)


@dataclass(frozen=True)
class QuantRecipe:
    """How an INT8 graph was made (a ``QuantConfig`` as one target applied it). Plain data so that reports can show it."""

    mode: str  # "static" | "dynamic"
    method: str = "minmax"  # calibration method for static
    samples: int = 0
    per_channel: bool = True
    symmetric_activations: bool = False
    op_types: tuple[str, ...] = ()
    excluded_nodes: tuple[str, ...] = ()
    tool: str = ""  # what quantized it: the quantizer that ran stamps itself (the target's template says what it plans)
    # 7-bit weights (onnxruntime.quantization's reduce_range, read by the shared quantizer): u8 x s8 products stay exact
    # on x86 CPUs without VNNI, whose AVX2 kernel saturates 16-bit pair sums with 8-bit weights (docs/quantization.md).
    reduce_range: bool = False
    # Structural rules for the nodes that stay float (recipe_choice.RULES: "input", "head", "ffn_out"),
    # chosen per target and modality by recipe_choice.choose; ``choice`` says why, for the report.
    float_rules: tuple[str, ...] = ("input",)
    choice: str = ""


@dataclass(frozen=True)
class QuantizedGraph:
    path: Path
    graph: ExportedGraph  # the fp32 graph it came from
    recipe: QuantRecipe


@dataclass(frozen=True)
class Artifact:
    """What a target built: a folder with the model file and what is needed to load it."""

    target: str
    precision: Precision
    path: Path  # the variant folder
    model_file: Path  # the file a runtime loads
    files: tuple[Path, ...]
    quantization: QuantRecipe | None = None
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ColdStart:
    """What opening an artifact costs, measured in a fresh child process (``d2v_export.measure.cold_start``)."""

    import_ms: float  # importing the runtime (``Backend.available()``)
    open_ms: float  # the runner: session creation / compile_model
    first_inference_ms: float  # the first ``infer`` at the latency shape
    peak_rss_mb: float  # the child's peak resident memory, all of it
    baseline_rss_mb: float  # the child's peak with the interpreter and the runtime imported, before opening
    artifact_rss_mb: float  # peak_rss_mb - baseline_rss_mb: what opening and running this artifact added
    measured_in: str = "child process"


@dataclass(frozen=True)
class LengthDrift:
    """An INT8 audio variant against the PyTorch reference on one input of one length (``validate.drift_by_length``)."""

    seconds: float
    samples: int
    metrics: Mapping[str, float]  # the task's output-agreement metrics (logit_cosine, frame_agreement for CTC, ...)


@dataclass(frozen=True)
class Variant:
    target: str
    precision: Precision
    artifact: str  # path relative to the report
    drift: Drift
    latency: LatencyStats | None
    speedup_vs_reference: float | None
    quantization: QuantRecipe | None = None
    notes: tuple[str, ...] = ()
    latency_budget: Mapping[str, object] | None = None  # a device profile's verdict (profiles.latency_verdict)
    device: str = ""  # what its drift and latency were measured on (Backend.measured_on)
    deploy_device: str = ""  # the device it was built for (the target's --device)
    cold_start: ColdStart | None = None  # None: not measured (--bench-seconds 0, a deferred build, the child failed)
    drift_by_length: tuple[LengthDrift, ...] = ()  # INT8 audio variants: at the profile's min, opt and max length


@dataclass(frozen=True)
class ModelInfo:
    source: str
    modality: Modality
    task: str
    class_name: str
    random_weights: bool
    parameters: int
    preset: str | None = None


@dataclass(frozen=True)
class Report:
    schema_version: str
    tool_version: str
    created: str  # ISO 8601, UTC
    model: ModelInfo
    environment: Mapping[str, object]
    export: ExportedGraph
    reference_latency: LatencyStats | None
    variants: tuple[Variant, ...]
    warnings: tuple[str, ...] = ()
    bench: Mapping[str, object] = field(default_factory=dict)  # how latency was taken (warm-up, rounds)
    comparison: Mapping[str, object] | None = None  # against --baseline (compare.to_dict)
    # --pick: the chosen variant, why, every candidate and the front (pick.choose)
    pick: Mapping[str, object] | None = None

    @property
    def passed(self) -> bool:
        """Every variant within its drift budget (latency budgets are judged by ``within_latency_budget``)."""
        return all(v.drift.passed for v in self.variants)

    @property
    def within_latency_budget(self) -> bool:
        return all(not v.latency_budget or v.latency_budget.get("passed") is not False for v in self.variants)

    @property
    def no_regression(self) -> bool:
        """No regression against the baseline (True without one)."""
        return self.comparison is None or bool(self.comparison.get("passed"))

    @property
    def exit_code(self) -> ExitCode:
        """What this report means for a gate (``verdict_code``): 0, 5, 8 or 7."""
        return verdict_code(
            drift_passed=self.passed, latency_passed=self.within_latency_budget, regression_passed=self.no_regression
        )


def jsonable(value: Any) -> Any:
    """Plain JSON data: enums by value, paths as strings, dataclasses as dicts, non-finite floats as null."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
