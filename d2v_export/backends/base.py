"""What every target answers: the ``Backend`` protocol, and ``BackendBase`` with the usual answers.

A target is one module (or package) in this folder, or a plug-in module (docs/DESIGN.md, "Adding a
target"), that defines ``BACKEND: Backend``. It imports its optional runtime package inside its
functions, so that a missing package is a clear "not available" rather than an ImportError at start-up.
backends/__init__.py discovers the modules. The rest of d2v-export never names a target: it asks the
backend (which precisions and INT8 modes it builds, which devices it takes, whether it can defer a build,
how it recovers, how to install it, what its bundle README shows, what doctor checks, which packages'
versions the report records).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision, QuantConfig, QuantRecipe

if TYPE_CHECKING:
    from ..int8.quantize import RecipeTemplate
    from ..int8.recipe_choice import Choice


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, and how to fix it: "pip install 'd2v-export[openvino]'"
    version: str = ""
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildRequest:
    """What a backend's plan (``Backend.plan``) asks its ``compile`` to build. A target that needs more subclasses it."""

    precision: Precision = Precision.FP32
    quant: QuantRecipe | None = None  # the recipe for INT8, None for float precisions
    calibration: tuple[Mapping[str, np.ndarray], ...] = ()  # calibration feeds for static INT8
    threads: int = 1
    device: str = "CPU"


@dataclass(frozen=True)
class Lever:
    """One INT8 candidate a backend offers ``--pick``: a change to the run's ``QuantConfig``, the graph clean-up, and the
    target's own settings (``Backend.int8_options``, by name).

    ``None`` fields keep the run's own choice. ``suffix`` names the variant folder (``NAME-int8-static`` + suffix); the
    default recipe of a mode has suffix "".
    """

    mode: str  # "static" | "dynamic"
    suffix: str = ""
    # graph clean-up (d2v_export.int8.rewrite) names; None: the backend's default
    rewrites: tuple[str, ...] | None = None
    preset: str | None = None  # spec.PRESETS ("performance": symmetric activations, "mixed"); None: the target's choice
    op_types: tuple[str, ...] | None = None  # ops whose inputs are quantized; None: the template's
    settings: Mapping[str, str] = field(default_factory=dict)  # the target's own INT8 settings for this candidate
    description: str = ""


@dataclass(frozen=True)
class TargetOption:
    """A setting one target owns (``Backend.int8_options``): the CLI makes a flag of it and ``QuantOptions.target_options``
    carries its value by ``name``; the backend reads it in its plan. Its text and its choices are the target's."""

    name: str  # the key in QuantOptions.target_options and Lever.settings
    flag: str  # the command line's flag: "--reduce-range"
    choices: tuple[str, ...]
    default: str
    help: str

    def check(self, value: str) -> None:
        """D2VError (exit 2) for a value not among ``choices``."""
        if value not in self.choices:
            raise D2VError(f"{self.flag} '{value}': choose one of {', '.join(self.choices)}", ExitCode.USAGE)


@dataclass(frozen=True)
class PlanContext:
    """What a backend plans its variants from (``Backend.plan``): the run's options as they concern one target."""

    # the run's INT8 (mode, method, samples = the calibration samples); None: float only
    int8: QuantConfig | None = None
    # the targets' own INT8 settings (TargetOption name -> value)
    settings: Mapping[str, str] = field(default_factory=dict)
    calibration: tuple[Mapping[str, np.ndarray], ...] = ()  # calibration feeds (static INT8)
    half: tuple[Precision, ...] = ()  # extra float precisions asked for
    pick: bool = False  # --pick: every candidate (``Backend.pick_levers``), not only the run's recipe
    rewrite: bool = True  # --no-rewrite: no graph clean-up anywhere
    defer_build: bool = False  # --defer-build: a target that can defer (``can_defer``) writes its portable half
    device: str = "CPU"  # the device this target builds for
    threads: int = 1
    modality: str = ""  # "vision", "text", "audio": the recipe choice per modality
    profile: Any = None  # the device profile the artifacts are for (profiles.DeviceProfile), or None: this machine


@dataclass(frozen=True)
class Planned:
    """One variant a backend plans: its folder name, what to build, the graph clean-up it builds from, and what it is."""

    name: str  # the variant folder: NAME-PRECISION[-MODE[SUFFIX]]
    request: BuildRequest
    rewrites: tuple[str, ...] = ()
    what: str = ""  # how --pick's table describes the candidate


@dataclass(frozen=True)
class RunnerKey:
    """What a check of a file depends on: the runner that ran it, that runner's options, and the file itself (device and
    inode: a hard link is the same file, a copy is not). A check is reused only for an equal key (``Backend.check_key``)."""

    runner: str
    options: tuple[tuple[str, str], ...]
    file: tuple[int, int]


def file_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of ``path``: the same for every hard link of one file."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class Recovery:
    """What the pipeline hands a backend whose INT8 artifact broke its drift budget (``--fallback auto``)."""

    evaluate: Callable[[Artifact], Drift]  # task-aware drift of a built artifact against the reference
    feeds: tuple[Mapping[str, np.ndarray], ...]  # the evaluation samples
    reference: tuple[Mapping[str, np.ndarray], ...]  # PyTorch fp32 outputs on them
    score: Callable[
        [Sequence[int], Sequence[Mapping[str, np.ndarray]]], float
    ]  # primary metric on a subset, higher is better
    max_drop: float  # how far the score may fall below the reference's (which scores 1.0 against itself)
    calibration: tuple[Mapping[str, np.ndarray], ...] = ()  # calibration samples (also for dynamic mode)
    progress: Callable[[str], None] = lambda _msg: None


@dataclass(frozen=True)
class Devices:
    """The ``--device`` values (and device profile ``device`` fields) a target takes."""

    default: str  # what a device profile without ``device`` gets
    pattern: str  # a regular expression, matched in full and case-insensitively
    choices: str  # the same for a person: "CPU, GPU, GPU.1, NPU or AUTO"

    def accepts(self, device: str) -> bool:
        return re.fullmatch(self.pattern, device, re.IGNORECASE) is not None

    def refuse(self, target: str, device: str) -> D2VError:
        """The usage error (exit 2) for a ``--device`` this target does not take."""
        return D2VError(
            f"--device '{device}' is not a device of target {target} (it takes {self.choices}); "
            f"use --device {target}={self.default}, or give each target its own with --device TARGET=DEVICE",
            ExitCode.USAGE,
        )


@dataclass(frozen=True)
class Snippet:
    """What a bundle's README shows for running the artifact without d2v-export.

    ``code``: Python lines run after the README's preprocessing lines built ``feed`` (a dict of numpy
    arrays) and that leave the outputs in ``outputs``; ``after``: lines of text after the code block.
    """

    code: tuple[str, ...]
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServingLayout:
    """How model servers load this target's bundle; ``d2v_export.deploy.serving`` writes the layouts (``d2v-export deploy``).

    ``triton``: the config.pbtxt field and value that pick Triton's backend (("platform", "onnxruntime_onnx"),
    ("backend", "openvino")); ``files``: (bundle file, name in Triton's version folder), where ``{name}`` is the
    bundle's model file and ``{stem}`` its name without the suffix (the first is required, the others copied when
    present); ``deferred``: a file built later on the device (a TensorRT engine) and its name in the version folder,
    copied in by a script the writer leaves beside the repository; ``instance_kind``: Triton's instance_group kind;
    ``ovms``: OpenVINO Model Server loads the bundle's model files as they are.
    """

    triton: tuple[str, str]
    files: tuple[tuple[str, str], ...] = ()
    deferred: tuple[str, str] | None = None
    instance_kind: str = "KIND_CPU"
    ovms: bool = False


@runtime_checkable
class Runner(Protocol):
    """Executes an artifact. Used as a context manager; ``infer`` is what the benchmark times."""

    name: str

    def __enter__(self) -> "Runner": ...

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Backend(Protocol):
    """What the rest of d2v-export asks a target. ``BackendBase`` answers the optional parts the usual way.

    Data (class attributes):

    - ``name``: the ``--target`` value, and the first part of its variant folders (``NAME-fp32``).
    - ``extra``: the pip extra that provides the runtime ("" if a core dependency); ``install_hint``:
      the command that installs it, shown where the target is not available.
    - ``packages``: distributions whose versions report.json and ``doctor`` record (when installed).
    - ``precisions``: what ``compile`` builds; device profiles and ``matrix`` are checked against it.
    - ``int8_recipes``: INT8 mode ("static", "dynamic") -> what it quantizes (``quantize.RecipeTemplate``);
      the modes ``--quant`` may ask of this target. Empty when ``precisions`` has no INT8.
    - ``recipe_choices``: modality ("vision", "text", "audio"; "*" for all) -> the layers its INT8 keeps
      float by rule and why (``recipe_choice.Choice``, chosen by measurement); unlisted: ``recipe_choice.BASE``.
    - ``devices``: the ``--device`` values it takes (``Devices``).
    - ``can_defer``: with ``BuildRequest.defer_build`` it writes a portable half without its runtime
      (TensorRT: the engine is built later on the device), so an unavailable runtime does not stop a run.
    - ``int8_options``: settings only this target understands (``TargetOption``): the CLI makes flags of them, and
      their values reach ``plan`` in ``PlanContext.settings``.

    Methods: ``plan`` (the variants it builds in a run, ``--pick`` candidates included: ``BackendBase`` plans them from
    ``precisions``, ``int8_recipes``, ``rewrites`` and ``pick_levers``); ``available``, ``compile`` and ``runner`` (the
    core); ``check_key`` (when a check another runner made of the same file may stand for its own: None, never);
    ``resolve_device``, ``precision_problem``, ``measured_on`` (BackendBase's docs); ``recover`` (``--fallback auto``:
    raises D2VError(TARGET_UNAVAILABLE) when the target cannot); ``open_bundle`` (which backend and
    model file run a bundle here, with notes); ``readme_snippet``; ``diagnose`` and ``diagnosis_lines``
    (what ``doctor`` shows beyond ``available``).
    """

    name: str
    extra: str
    install_hint: str
    devices: Devices
    can_defer: bool

    # Read-only, so that a backend may declare them as plain class attributes of a narrower type.
    @property
    def packages(self) -> tuple[str, ...]: ...

    @property
    def precisions(self) -> tuple[Precision, ...]: ...

    @property
    def int8_recipes(self) -> Mapping[str, RecipeTemplate]: ...

    @property
    def recipe_choices(self) -> Mapping[str, Choice]: ...

    @property
    def int8_options(self) -> tuple[TargetOption, ...]: ...

    def plan(self, ctx: PlanContext) -> Sequence[Planned]:
        """The variants this target builds in a run: fp32 first (the baseline of every comparison), then the rest."""
        ...

    def available(self) -> Availability: ...

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact: ...

    def runner(self, artifact: Artifact, *, threads: int) -> Runner: ...

    def check_key(self, artifact: Artifact) -> RunnerKey | None:
        """What ``runner`` would run ``artifact`` with (runner, options, file); None: nothing stands for its own check."""
        ...

    def resolve_device(self, device: str, *, defer_build: bool = False) -> str: ...
    def precision_problem(self, precision: Precision, device: str) -> str | None: ...
    def measured_on(self, artifact: Artifact, device: str) -> str: ...

    def recover(
        self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery
    ) -> tuple[Artifact, Drift, tuple[str, ...]]:
        """``--fallback auto``: the INT8 artifact with its most sensitive parts back in float; (artifact, drift, what stayed float)."""
        ...

    def open_bundle(self, folder: Path, model_file: str, files: Sequence[str]) -> Opened:
        """What runs a bundle of this target here (``d2v-export run``); D2VError(TARGET_UNAVAILABLE) when nothing can."""
        ...

    def readme_snippet(self, bundle: str, model_file: str, folder: Path | None) -> Snippet:
        """The README's code for this artifact (``bundle``: the folder's name; ``folder``: where its files are, None when unknown)."""
        ...

    def diagnose(self) -> Mapping[str, Any] | None:
        """``doctor``: details beyond ``available()`` (JSON-able, under the target's name), or None."""
        ...

    def diagnosis_lines(self, details: Mapping[str, Any]) -> list[str]:
        """``doctor``'s console lines for what ``diagnose`` returned."""
        ...

    def commands(self) -> Sequence[Any]:
        """The target's own Click commands, added to ``d2v-export`` (TensorRT's ``build-engine``); most have none."""
        ...


@dataclass(frozen=True)
class Opened:
    """What runs a bundle here: the backend, the target and model file it runs, and notes for the user."""

    backend: Backend
    target: str
    model_file: str
    notes: tuple[str, ...] = ()


def unavailable(backend: Backend, *, defer_build: bool = False) -> str | None:
    """Why ``backend`` cannot serve a run here, or None: it is available, or it can defer and the run defers."""
    avail = backend.available()
    if avail.ok or (defer_build and backend.can_defer):
        return None
    return avail.reason or "not available"


def require_available(backend: Backend, *, defer_build: bool = False) -> None:
    """D2VError(TARGET_UNAVAILABLE) saying why, when ``backend`` cannot serve a run here."""
    reason = unavailable(backend, defer_build=defer_build)
    if reason is not None:
        raise D2VError(f"target '{backend.name}' is not available here: {reason}", ExitCode.TARGET_UNAVAILABLE)


def files_in(folder: Path) -> tuple[Path, ...]:
    """An artifact's file list: the files directly in its folder, sorted."""
    return tuple(sorted(p for p in folder.iterdir() if p.is_file()))


def copy_onnx(source: Path, target: Path) -> None:
    """Copy an ONNX file and its external-data file (``<name>.data``) under ``target``'s name, loadable there.

    The ONNX file is a hard link when the disk allows and the name is kept. Under another name the graph is
    rewritten to name its data file ``<target name>.data`` (it names the file it was saved with; a renamed data
    file it did not name could not be loaded). The external-data file is always copied: onnx refuses to load
    external data from a file with more than one hard link ("it has multiple hard links").
    """
    data = source.with_name(source.name + ".data")
    renamed = data.is_file() and target.name != source.name
    if renamed:
        _point_at_data(source, target, target.name + ".data")
    else:
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    if data.is_file():
        shutil.copy2(data, target.with_name(target.name + ".data"))


def _point_at_data(source: Path, target: Path, location: str) -> None:
    """``source``'s graph saved as ``target`` with every external tensor's location set to ``location``."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    tensors = [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(target))


def onnx_snippet(bundle: str, onnx_file: str) -> tuple[str, ...]:
    """README lines running an ONNX file with ONNX Runtime the way d2v-export measures it."""
    return (
        "import onnxruntime as ort",
        "",
        "opts = ort.SessionOptions()",
        'opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as d2v-export measured it',
        f'session = ort.InferenceSession("{bundle}/{onnx_file}", opts, providers=["CPUExecutionProvider"])',
        "outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))",
    )


class BackendBase:
    """The usual answers to the optional parts of ``Backend``: subclass it, set the data, write
    ``available``, ``compile`` and ``runner``."""

    name = "backend"
    extra = ""
    install_hint = ""
    packages: tuple[str, ...] = ()
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    int8_recipes: Mapping[str, RecipeTemplate] = {}
    recipe_choices: Mapping[str, Choice] = {}
    devices = Devices("CPU", "CPU", "CPU")
    can_defer = False
    standalone_runner = False  # its bundles ship backends/bundle_run.py as bundle_run.py: they run without torch
    rewrites: tuple[str, ...] = ()  # the exact graph clean-ups (d2v_export.int8.rewrite) it compiles from by default
    pick_levers: tuple[Lever, ...] = ()  # the INT8 candidates it offers --pick
    int8_options: tuple[TargetOption, ...] = ()
    serving: ServingLayout | None = None  # model-server layouts (d2v-export deploy); None: none

    def available(self) -> Availability:
        raise NotImplementedError

    def plan(self, ctx: PlanContext) -> list[Planned]:
        """fp32, the extra float precisions it builds, and INT8: the run's recipe, or with ``--pick`` every candidate
        ``candidates`` keeps (less duplicates). A target changes one step by overriding ``request``, ``recipe`` or
        ``candidates``."""
        return plan_variants(self, ctx)

    def request(self, ctx: PlanContext, **fields: Any) -> BuildRequest:
        """The build request of one planned variant (a target that needs more returns its own subclass)."""
        return BuildRequest(**fields)

    def recipe(self, config: QuantConfig, settings: Mapping[str, str], ctx: PlanContext) -> QuantRecipe:
        """The QuantRecipe for ``config`` (``settings``: this target's own INT8 settings, the run's with a candidate's)."""
        from ..int8.quantize import make_recipe

        return make_recipe(self, config, modality=ctx.modality)

    def candidates(self, ctx: PlanContext) -> tuple[Lever, ...]:
        """The ``--pick`` candidates worth building for this run (all of ``pick_levers``)."""
        return tuple(self.pick_levers)

    def check_key(self, artifact: Artifact) -> RunnerKey | None:
        return None

    def resolve_device(self, device: str, *, defer_build: bool = False) -> str:
        """``device`` as this target names it; D2VError(USAGE) when ``devices`` does not take it, D2VError(TARGET_UNAVAILABLE)
        when it is not here (a backend that can tell; not asked when the run defers the build)."""
        if not self.devices.accepts(device):
            raise self.devices.refuse(self.name, device)
        return self.devices.default if device.upper() == self.devices.default.upper() else device

    def precision_problem(self, precision: Precision, device: str) -> str | None:
        """Why this target cannot build ``precision`` for ``device`` here (one line, for the user), or None."""
        if precision in self.precisions:
            return None
        built = [p.value for p in self.precisions]
        return f"{self.name} builds {', '.join(built[:-1]) + ' and ' if len(built) > 1 else ''}{built[-1]}, not {precision.value}"

    def measured_on(self, artifact: Artifact, device: str) -> str:
        """The device this run measured ``artifact`` (built for ``device``) on: ``device``, or what stood in for it."""
        return device

    def recover(
        self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery
    ) -> tuple[Artifact, Drift, tuple[str, ...]]:
        raise D2VError(
            f"--fallback auto is not supported by target '{self.name}'; use --fallback off", ExitCode.TARGET_UNAVAILABLE
        )

    def open_bundle(self, folder: Path, model_file: str, files: Sequence[str]) -> Opened:
        avail = self.available()
        if not avail.ok:
            raise D2VError(
                f"bundle '{folder}' needs {self.name}, which is not available here: {avail.reason}",
                ExitCode.TARGET_UNAVAILABLE,
            )
        return Opened(self, self.name, model_file)  # type: ignore[arg-type]

    def readme_snippet(self, bundle: str, model_file: str, folder: Path | None) -> Snippet:
        return Snippet(onnx_snippet(bundle, model_file if model_file.endswith(".onnx") else "model.onnx"))

    def diagnose(self) -> Mapping[str, Any] | None:
        return None

    def diagnosis_lines(self, details: Mapping[str, Any]) -> list[str]:
        return []

    def commands(self) -> Sequence[Any]:
        return ()


def plan_variants(backend: Any, ctx: PlanContext) -> list[Planned]:
    """``BackendBase.plan``: fp32, ``ctx.half`` where ``backend.precisions`` has it, then the INT8 variants."""
    default = tuple(backend.rewrites) if ctx.rewrite else ()
    planned = []
    for precision in (Precision.FP32, *(p for p in ctx.half if p in backend.precisions)):
        request = backend.request(ctx, precision=precision, threads=ctx.threads, device=ctx.device)
        planned.append(Planned(f"{backend.name}-{precision.value}", request, default, precision.value))
    if ctx.int8 is None:
        return planned
    levers = tuple(lv for lv in backend.candidates(ctx) if lv.mode != "static" or ctx.calibration) if ctx.pick else ()
    seen = set()
    for lever in levers or (Lever(ctx.int8.mode),):
        one = _int8_variant(backend, ctx, lever, default)
        if one is None or (one.request.quant, one.rewrites) in seen:
            continue  # --no-rewrite for a clean-up candidate, or a duplicate of another candidate
        seen.add((one.request.quant, one.rewrites))
        planned.append(one)
    return planned


def _int8_variant(backend: Any, ctx: PlanContext, lever: Lever, default: tuple[str, ...]) -> Planned | None:
    """The INT8 variant of one lever (the run's own recipe: ``Lever(mode)``); None when --no-rewrite rules it out."""
    assert ctx.int8 is not None
    if lever.rewrites and not ctx.rewrite:
        return None
    static = lever.mode == "static"
    config = dataclasses.replace(
        ctx.int8,
        mode=lever.mode,
        samples=len(ctx.calibration) if static else 0,
        preset=ctx.int8.preset if lever.preset is None else lever.preset,
        op_types=ctx.int8.op_types if lever.op_types is None else lever.op_types,
    )
    recipe = backend.recipe(config, {**ctx.settings, **lever.settings}, ctx)
    feeds = ctx.calibration if static else ()
    request = backend.request(
        ctx, precision=Precision.INT8, quant=recipe, calibration=feeds, threads=ctx.threads, device=ctx.device
    )
    rewrites = default if lever.rewrites is None else lever.rewrites
    return Planned(
        f"{backend.name}-int8-{lever.mode}{lever.suffix}", request, rewrites, lever.description or f"int8 {lever.mode}"
    )


class RunnerBase:
    """Context-manager plumbing shared by runners; subclasses implement ``infer`` and ``close``."""

    name = "runner"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        pass
