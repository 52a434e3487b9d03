"""The library API: a model spec, shapes and targets in; artifacts and a report out.

    from d2v_export.pipeline import RunOptions, ShapeRequest, run
    from d2v_export.models import parse_source
    from d2v_export.spec import Modality
    report = run(parse_source("preset:tiny", Modality.VISION, None), ShapeRequest(), RunOptions(output=Path("out")))
    sys.exit(report.exit_code)                   # 0, or 5 / 8 / 7 (drift, latency budget, baseline)

``run`` calls named stages in order, each a function below (docs/DESIGN.md lists them): load the model, read the
samples, export and check against PyTorch, build every target's variants, judge them (with the
fallback), measure latency, assemble the report, compare with a baseline, write manifests and the
report. The options and the rules about them (validation, a device profile merged in) are
``d2v_export.options``; what a finished report means for a gate is ``Report.exit_code`` and
``gate.failure``. The CLI (``d2v-export vision|text|audio``) is a thin layer over these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from . import __version__, backends
from .measure import bench
from .reports import report as report_mod
from .backends.base import BuildRequest, PlanContext, RunnerKey
from .backends.torch_ref import NAME as REFERENCE_NAME, TorchRunner, make_wrapper
from .cpu import cores_available
from .convert.export import write_onnx
from .measure.memory import release_memory
from .heads import SAMPLING_RATE, dummy_inputs
from .models import LoadedModel, load
from .calibration.samples import Samples
from .options import QuantOptions, Range, RunOptions, ShapeRequest, apply_profile, require_int8
from .staging import Interrupted, staging
from .spec import (
    Artifact,
    ColdStart,
    D2VError,
    Drift,
    ExportedGraph,
    Dim,
    ExitCode,
    LatencyStats,
    LengthDrift,
    Modality,
    ModelInfo,
    ModelSpec,
    Precision,
    Report,
    ShapeProfile,
    Variant,
)
from .convert.validate import HALF_TOLERANCE_FACTOR, check_export, shape_check, task_drift

__all__ = [
    "QuantOptions",
    "RunOptions",
    "ShapeRequest",
    "apply_profile",
    "require_int8",
    "run",
    "resolve_profile",
    "check_targets",
    "staging",
    "default_threads",
    "plan_context",
    "budget_for",
    "Interrupted",
]

DEFAULT_BATCH: Range = (1, 1, 8)
DEFAULT_SEQUENCE: Range = (8, 128, 512)
DEFAULT_CHOICES: Range = (2, 4, 4)
DEFAULT_AUDIO_SECONDS: Range = (0.5, 1.0, 10.0)


Progress = Callable[[str], None]
BenchProgress = Callable[[int, int], None]


def resolve_profile(model: LoadedModel, req: ShapeRequest) -> ShapeProfile:
    """Turn the shape options into min/opt/max axes, checked against what the checkpoint accepts."""
    cfg = model.config
    batch = _dim("batch", req.batch or DEFAULT_BATCH)
    modality = model.head.modality
    if modality is Modality.VISION:
        size = int(cfg.image_size) if not isinstance(cfg.image_size, (list, tuple)) else int(cfg.image_size[0])
        if req.image_size is not None and req.image_size != size:
            raise D2VError(
                f"--image-size {req.image_size}: this checkpoint was trained at {size}x{size} and its position bias is fixed; use --image-size {size}"
            )
        return ShapeProfile((batch,), {"image_size": size})
    if modality is Modality.AUDIO:
        lo, opt, hi = req.audio_seconds or DEFAULT_AUDIO_SECONDS
        if lo < 0.05:
            raise D2VError(
                f"--audio-seconds {lo}: the convolutional front end needs at least 0.05 s; use a larger minimum"
            )
        samples = Dim("samples", int(lo * SAMPLING_RATE), int(opt * SAMPLING_RATE), int(hi * SAMPLING_RATE))
        return ShapeProfile((batch, samples))
    longest = int(cfg.max_position_embeddings) - 2  # RoBERTa-style position ids start after the padding index
    lo, opt, hi = req.sequence or (
        DEFAULT_SEQUENCE[0],
        min(DEFAULT_SEQUENCE[1], longest),
        min(DEFAULT_SEQUENCE[2], longest),
    )
    if hi > longest:
        raise D2VError(
            f"--sequence-length max {int(hi)} is longer than this checkpoint accepts ({longest} tokens); lower it"
        )
    dims = [batch]
    if model.head.multiple_choice:
        dims.append(_dim("choices", req.choices or DEFAULT_CHOICES))
    dims.append(_dim("sequence", (lo, opt, hi)))
    return ShapeProfile(tuple(dims))


def _dim(name: str, r: Range) -> Dim:
    return Dim(name, int(r[0]), int(r[1]), int(r[2]))


def default_threads() -> int:
    return cores_available()


def check_targets(targets: tuple[str, ...], *, defer_build: bool = False, half: tuple[Precision, ...] = ()) -> None:
    """Fail fast, before any export, when a target cannot run here (or cannot build what was asked)."""
    for name in targets:
        backends.require(name, defer_build=defer_build)
    for precision in half:
        if not any(precision in backends.get(name).precisions for name in targets):
            raise D2VError(
                f"no requested target builds {precision.value} ({', '.join(targets)}); add "
                + " or ".join(f"--target {name}" for name in backends.building(precision)),
                ExitCode.TARGET_UNAVAILABLE,
            )


def check_devices(options: RunOptions) -> RunOptions:
    """``options`` with every target's device as its backend names it (``Backend.resolve_device``), before any export.

    D2VError(USAGE) for a device the target does not take; D2VError(TARGET_UNAVAILABLE) for one that is not
    here (not asked of a deferred build), or that cannot build an extra float precision the target declares
    (OpenVINO bf16 on a CPU without BF16)."""
    devices = {}
    for name in options.targets:
        backend = backends.get(name)
        device = devices[name] = backend.resolve_device(options.device_for(name), defer_build=options.defer_build)
        for precision in (p for p in options.half if p in backend.precisions):
            problem = backend.precision_problem(precision, device)
            if problem is not None:
                raise D2VError(
                    f"target {name} cannot build {precision.value} on {device}: {problem}; drop --{precision.value} or "
                    "choose another --device",
                    ExitCode.TARGET_UNAVAILABLE,
                )
    return dataclasses.replace(options, devices=devices)


class Built(NamedTuple):
    """One variant a target built, with its verdict: what the later stages carry."""

    backend: Any
    artifact: Artifact
    drift: Drift
    notes: tuple[str, ...]
    what: str  # what the candidate is (--pick's table)
    device: str = ""  # the device it was built for (BuildRequest.device)


@dataclass
class _Work:
    """What the build and judge stages share: the model, its checked graph, the reference and the samples."""

    model: LoadedModel
    profile: ShapeProfile
    graph: ExportedGraph
    reference: Any  # the PyTorch wrapper (backends.torch_ref.make_wrapper)
    ref_outputs: list[dict[str, Any]]
    calib: Samples | None
    evaluation: Samples | None
    options: RunOptions
    threads: int
    folder: Path  # scratch space inside the staging folder, removed before the rename
    progress: Progress
    # PyTorch's outputs at the export check's shapes (validate.shape_check)
    checked: dict[Any, Any] = field(default_factory=dict)
    rewritten: dict[tuple[str, ...], tuple[ExportedGraph, dict[str, int]]] = field(default_factory=dict)
    # what ran the export check (runner, options, file): graph.check stands for it
    export_check: RunnerKey | None = None

    def graph_for(self, names: tuple[str, ...]) -> tuple[ExportedGraph, dict[str, int]]:
        """The export with the named clean-up rewrites applied (made once per set of names), and what they changed."""
        if not names:
            return self.graph, {}
        if names not in self.rewritten:
            from .int8.rewrite import for_model

            self.progress(f"graph clean-up: {', '.join(names)}")
            path = self.folder / f"clean-{len(self.rewritten) + 1}" / "model.onnx"
            self.rewritten[names] = for_model(self.graph, names, self.model, self.profile, path)
            release_memory()  # the rewritten protobuf's heap (1.2x the weights at vision large) stayed under the build and check
        return self.rewritten[names]


def run(
    spec: ModelSpec,
    shapes: ShapeRequest,
    options: RunOptions,
    *,
    progress: Progress = lambda _msg: None,
    bench_progress: BenchProgress = lambda _done, _total: None,
) -> Report:
    """Export, check, compile for every target, validate, benchmark and write the report.

    Raises D2VError for bad input or an export mismatch (nothing is written then). Drift over budget
    does not raise: the report says which metric failed, ``Report.passed`` is False and
    ``Report.exit_code`` is 5 (``gate.failure`` words it). A device profile in ``options`` (see
    ``options.apply_profile``) turns its latency budget into a verdict (exit code 8).
    """
    _warn_about_profile(options, progress)
    check_targets(options.targets, defer_build=options.defer_build, half=options.half)
    options = check_devices(options)
    threads = options.threads or default_threads()
    baseline = _load_baseline(options)
    with staging(options.output, options.force, progress) as root:
        model, profile, warnings = _load_model(spec, shapes, progress)
        calib, evaluation = _samples(model, profile, options.int8, root, progress, warnings)
        checked: dict[Any, Any] = {}
        graph, reference = _export_checked(model, profile, root / ".work", progress, checked)
        release_memory()
        ref_outputs = _reference_outputs(model, reference, evaluation, threads, progress)
        _offload_reference(model, reference, root / ".work", progress)
        work = _Work(
            model,
            profile,
            graph,
            reference,
            ref_outputs,
            calib,
            evaluation,
            options,
            threads,
            root / ".work",
            progress,
            checked,
        )
        work.export_check = _export_check_key(graph)
        built = _build_all(work, root)
        measured = _measure(work, built, bench_progress)
        extras = _Extras(_cold_starts(work, built, warnings), _drift_by_length(work, built))
        variants = _variants(built, measured, options, spec.modality, extras)
        built, variants, picked = _pick(work, built, variants)
        result = _assemble(spec, model, graph, threads, measured, variants, warnings, picked)
        shutil.rmtree(work.folder)
        result = _compare_with_baseline(result, baseline, options, root, progress)
        _write_bundles_and_report(result, built, model, graph, root)
    return result


# ----------------------------------------------------------------------------------- the stages, in order


def _warn_about_profile(options: RunOptions, progress: Progress) -> None:
    """A device profile that expects CPU flags this machine lacks: latency measured here does not predict the device."""
    if options.profile is None:
        return
    from .profiles import missing_cpu_flags

    for flag in missing_cpu_flags(options.profile):
        progress(
            f"WARNING: profile {options.profile.name} expects the CPU flag {flag}, which this machine lacks: latency here does not predict the device"
        )


def _load_baseline(options: RunOptions) -> dict[str, Any] | None:
    """The baseline report, read before minutes of work so that a bad one fails first."""
    if options.baseline is None:
        return None
    from .reports.compare import load_report

    return load_report(options.baseline)


def _load_model(
    spec: ModelSpec, shapes: ShapeRequest, progress: Progress
) -> tuple[LoadedModel, ShapeProfile, list[str]]:
    """Stage "load": the model, its shape profile and the warnings the report carries."""
    progress(f"loading {spec.source}")
    model = load(spec)
    for w in model.warnings:
        progress(f"WARNING: {w}")
    return model, resolve_profile(model, shapes), list(model.warnings)


def _export_checked(
    model: LoadedModel, profile: ShapeProfile, work: Path, progress: Progress, checked: dict[Any, Any]
) -> tuple[ExportedGraph, Any]:
    """Stage "export + check": ONNX, checked against the PyTorch reference in the reference runtime (exit 4 when it does not match).

    ``checked`` keeps PyTorch's outputs at the check's shapes, reused by every fp32 artifact's check.
    """
    reference = make_wrapper(model)
    graph = write_onnx(model, profile, work / "model.onnx", progress=progress)
    release_memory()  # the exporter's program and protobufs
    graph = check_export(model, graph, reference, progress=progress, reference_outputs=checked)
    runtime = backends.reference().display_name
    if "padding_scaled_error" in graph.check.failed and "max_scaled_error" not in graph.check.failed:
        raise D2VError(
            f"{runtime} answers a padded batch differently from each input alone: {graph.check.detail.split('; random')[0]} "
            f"(tolerance {model.head.tolerance:g}); a bug of the export: report it",
            ExitCode.EXPORT_MISMATCH,
        )
    if not graph.check.passed:
        raise D2VError(
            f"{runtime} does not match PyTorch for {model.head.class_name}: {graph.check.detail.split('worst: ')[-1]} "
            f"is off by {graph.check.metrics['max_scaled_error']:.3g} (scaled), over the tolerance {model.head.tolerance:g}",
            ExitCode.EXPORT_MISMATCH,
        )
    return graph, reference


def _export_check_key(graph: ExportedGraph) -> RunnerKey:
    """What ran the export check: ``validate.check_export`` runs the reference runtime's ``onnx_runner`` on the file."""
    return backends.reference().onnx_runner_key(graph.path)


def _reference_outputs(
    model: LoadedModel, reference: Any, evaluation: Samples | None, threads: int, progress: Progress
) -> list[dict[str, Any]]:
    """The PyTorch reference's outputs on the evaluation samples (what INT8 drift is judged against)."""
    if evaluation is None:
        return []
    progress(f"running the PyTorch reference on {len(evaluation)} evaluation samples")
    with TorchRunner(reference, model.head.outputs, threads) as ref_runner:
        return [ref_runner.infer(f) for f in evaluation.feeds]


def large(model: LoadedModel) -> bool:
    """fp32 weights over ``export.EXTERNAL_DATA_BYTES`` (the large presets): the run trades a little time for memory.

    PyTorch's weights are offloaded between the evaluation reference and the latency stage, and latency is
    measured in pairs with the reference (``bench.measure_pairs``). Base-size runs do neither.
    """
    from .convert.export import EXTERNAL_DATA_BYTES

    return model.parameters * 4 > EXTERNAL_DATA_BYTES


def _offload_reference(model: LoadedModel, reference: Any, work: Path, progress: Progress) -> None:
    """Stage "offload" (large models only): PyTorch's weights to a file in the work folder until the latency stage.

    Nothing runs PyTorch meanwhile (the checks reuse its outputs; a forward would read them back first), and
    at vision large they were 1.2 GB resident under every build's peak (benchmarks/scale.py).
    """
    if not large(model):
        return
    from .backends.torch_ref import offload

    progress("offloading the PyTorch weights until the latency stage")
    work.mkdir(parents=True, exist_ok=True)
    offload(reference, work / "reference-weights.pt")
    release_memory()


def _build_all(work: _Work, root: Path) -> list[Built]:
    """Stage "build": every variant each target plans (``Backend.plan``), each judged as soon as it is built."""
    built = []
    for target in work.options.targets:
        backend = backends.get(target)
        for v in backend.plan(
            plan_context(backend, work.options, work.calib, work.threads, work.model.head.modality.value)
        ):
            built.append(_build_one(work, backend, root / v.name, v.request, v.rewrites, v.what))
            release_memory()  # the build's protobufs, NNCF's copies and the check's session are gone
    return built


def _build_one(
    work: _Work, backend: Any, folder: Path, request: BuildRequest, rewrites: tuple[str, ...], what: str
) -> Built:
    work.progress(f"building {folder.name}")
    graph, changed = work.graph_for(rewrites)
    artifact = backend.compile(graph, folder, request)
    work.model.save_pretrained_files(folder)
    release_memory()  # what the build freed, before the check compiles the artifact again
    drift = _check(work, backend, artifact, request)
    artifact, drift, notes = _judge(work, backend, graph, folder, request, artifact, drift)
    if changed:  # what the graph clean-up changed (the same for a fallback or a rebuilt artifact)
        from .int8.rewrite import describe

        notes = (*notes, describe(changed))
    return Built(backend, artifact, drift, notes, what, request.device)


def _check(work: _Work, backend: Any, artifact: Artifact, request: BuildRequest) -> Drift:
    """Float variants: the shape check against PyTorch (the fp32 ONNX itself: the export's check); INT8: task drift."""
    model = work.model
    if request.quant is None and work.export_check is not None and backend.check_key(artifact) == work.export_check:
        # the export check ran this very file with this very runner and its options (a hard link of the export, the
        # reference runtime's own session): no session to open, at large size one held the weights again for nothing.
        # Any other runner, options or file (a plug-in serving the same file differently) is checked with its own runner.
        return work.graph.check
    with backend.runner(artifact, threads=work.threads) as runner:
        if request.quant is not None:
            return _task_drift(work, runner.infer)
        tolerance = model.head.tolerance * HALF_TOLERANCE_FACTOR.get(request.precision.value, 1.0)
        return shape_check(
            model, work.reference, runner.infer, work.profile, tolerance=tolerance, reference_outputs=work.checked
        )


def _judge(
    work: _Work,
    backend: Any,
    graph: ExportedGraph,
    folder: Path,
    request: BuildRequest,
    artifact: Artifact,
    drift: Drift,
) -> tuple[Artifact, Drift, tuple[str, ...]]:
    """Stage "judge / fallback": an INT8 variant over budget is handed to ``--fallback auto`` or gets a note saying so.

    A fallback that ends over budget *and* worse than plain INT8 is not shipped: the plain artifact is rebuilt and kept.
    """
    int8 = work.options.int8
    if request.quant is None or drift.passed:
        return artifact, drift, ()
    if int8 is None or not int8.fallback:
        return (
            artifact,
            drift,
            (
                f"drift over budget ({', '.join(drift.failed)}); --fallback auto returns the most sensitive nodes to float",
            ),
        )
    plain = drift
    artifact, drift, notes = _fall_back(work, backend, graph, folder, request)
    if drift.passed or not _worse(work.model.head.metric, drift, plain):
        return artifact, drift, notes
    # never ship a fallback that made things worse (seen: NNCF accuracy control on audio)
    from .int8.fallback import summarize

    work.progress(f"{folder.name}: the fallback scored worse than plain INT8; rebuilding the plain artifact")
    why = f"--fallback auto did not reach the budget and scored worse ({summarize(drift)}); the plain INT8 artifact is kept"
    return backend.compile(graph, folder, request), plain, (why, *notes)


def _measure(work: _Work, built: list[Built], bench_progress: BenchProgress) -> bench.BenchResult:
    """Stage "measure": the reference and every variant, interleaved, at the profile's opt shape.

    Large models (``large``): PyTorch's weights are read back, and each variant is opened alone and timed
    in a pair with the reference (``bench.measure_pairs``), so that one artifact is resident at a time.
    """
    from .backends.torch_ref import restore

    opt = work.profile.point("opt")
    feed = dummy_inputs(work.model.head, work.model.config, opt, seed=7)
    settings, threads = work.options.bench, work.threads
    restore(work.reference)
    with TorchRunner(work.reference, work.model.head.outputs, threads) as reference:
        if large(work.model):
            work.progress(
                f"measuring latency at {opt} with {threads} threads (each variant in a pair with the reference, {settings.seconds:g} s budget)"
            )
            openers = {b.artifact.name: functools.partial(b.backend.runner, b.artifact, threads=threads) for b in built}
            return bench.measure_pairs(
                (REFERENCE_NAME, reference),
                openers,
                feed,
                batch=opt["batch"],
                shape=opt,
                settings=settings,
                progress=bench_progress,
                between=release_memory,
            )
        with contextlib.ExitStack() as stack:
            runners = {REFERENCE_NAME: reference}
            for b in built:
                runners[b.artifact.name] = stack.enter_context(b.backend.runner(b.artifact, threads=threads))
            work.progress(
                f"measuring latency at {opt} with {threads} threads (interleaved, {settings.seconds:g} s budget)"
            )
            return bench.measure_full(
                runners, feed, batch=opt["batch"], shape=opt, settings=settings, progress=bench_progress
            )


class _Extras(NamedTuple):
    """What the stages after latency measured per variant name: cold start, INT8 audio drift against length."""

    cold_start: dict[str, ColdStart]
    by_length: dict[str, tuple[LengthDrift, ...]]


def _cold_starts(work: _Work, built: list[Built], warnings: list[str]) -> dict[str, ColdStart]:
    """Stage "cold start": each artifact opened and run once in a child process of its own (``d2v_export.measure.cold_start``).

    Skipped with ``--bench-seconds 0`` (``BenchSettings.measures_cold_start``) and for deferred builds (nothing
    here runs what the device will); a child that fails leaves a warning instead of numbers."""
    if not work.options.bench.measures_cold_start:
        return {}
    import numpy as np

    from .measure.cold_start import measure

    feed_path = work.folder / "cold-start-feed.npz"
    feed_path.parent.mkdir(parents=True, exist_ok=True)
    # the latency stage's
    feed: dict[str, Any] = dummy_inputs(work.model.head, work.model.config, work.profile.point("opt"), seed=7)
    np.savez(feed_path, **feed)
    deferred = _deferred(work.options)
    found: dict[str, ColdStart] = {}
    for b in (b for b in built if b.artifact.target not in deferred):
        work.progress(f"cold start of {b.artifact.name} (a child process)")
        result, why = measure(b.artifact, feed_path, threads=work.threads)
        if result is None:
            warnings.append(f"cold start of {b.artifact.name} not measured: {why}")
            work.progress(f"WARNING: {warnings[-1]}")
        else:
            found[b.artifact.name] = result
    return found


def _drift_by_length(work: _Work, built: list[Built]) -> dict[str, tuple[LengthDrift, ...]]:
    """Stage "drift by length" (INT8 audio variants): each against PyTorch on one input at the profile's min, opt and
    max length (``validate.length_feeds``: the evaluation samples joined and repeated), so that drift growing
    with length shows."""
    from .backends.torch_ref import restore
    from .convert.validate import drift_by_length, length_feeds

    int8 = [b for b in built if b.artifact.precision is Precision.INT8]
    if work.model.head.modality is not Modality.AUDIO or not int8 or work.evaluation is None:
        return {}
    dim = work.profile.dim("samples")
    feeds = length_feeds(work.evaluation.feeds, sorted({dim.min, dim.opt, dim.max}))
    seconds = [f["input_values"].shape[-1] / SAMPLING_RATE for f in feeds]
    work.progress("INT8 drift against input length: " + ", ".join(f"{s:g} s" for s in seconds))
    restore(work.reference)
    with TorchRunner(work.reference, work.model.head.outputs, work.threads) as ref:
        reference = [ref.infer(f) for f in feeds]
    found = {}
    for b in int8:
        with b.backend.runner(b.artifact, threads=work.threads) as runner:
            found[b.artifact.name] = drift_by_length(work.model, reference, runner.infer, feeds, SAMPLING_RATE)
    return found


def _variants(
    built: list[Built],
    measured: bench.BenchResult,
    options: RunOptions,
    modality: Modality,
    extras: _Extras | None = None,
) -> tuple[Variant, ...]:
    """The report's variants: verdict, latency, speedup (against the reference of its own pair, when timed in pairs),
    the device profile's latency verdict, cold start and INT8 audio drift against length (``extras``)."""
    extras = extras or _Extras({}, {})
    latency = measured.stats
    pooled = latency[REFERENCE_NAME]
    return tuple(
        Variant(
            target=b.artifact.target,
            precision=b.artifact.precision,
            artifact=b.artifact.name,
            drift=b.drift,
            latency=latency[b.artifact.name],
            speedup_vs_reference=_speedup(
                measured.pair_reference.get(b.artifact.name, pooled), latency[b.artifact.name]
            ),
            quantization=b.artifact.quantization,
            notes=b.artifact.notes + b.notes,
            latency_budget=options.profile.latency_verdict(modality, latency[b.artifact.name])
            if options.profile
            else None,
            device=b.backend.measured_on(b.artifact, b.device),
            deploy_device=b.device,
            cold_start=extras.cold_start.get(b.artifact.name),
            drift_by_length=extras.by_length.get(b.artifact.name, ()),
        )
        for b in built
    )


def _pick(
    work: _Work, built: list[Built], variants: tuple[Variant, ...]
) -> tuple[list[Built], tuple[Variant, ...], dict[str, Any] | None]:
    """Stage "pick" (--pick only): choose the variant to ship; the other candidates' folders are removed."""
    if not work.options.pick:
        return built, variants, None
    from .int8 import pick as pick_mod

    described = {b.artifact.name: b.what for b in built}
    picked = pick_mod.choose(
        variants, described, work.model.head.metric, work.options.profile, deferred=_deferred(work.options)
    )
    work.progress(f"picked {picked['artifact']}: {picked['why']}")
    kept = set(pick_mod.kept(variants, picked))
    for b in built:
        if b.artifact.name not in kept:
            shutil.rmtree(b.artifact.path, ignore_errors=True)
    return [b for b in built if b.artifact.name in kept], tuple(v for v in variants if v.artifact in kept), picked


def _assemble(
    spec: ModelSpec,
    model: LoadedModel,
    graph: ExportedGraph,
    threads: int,
    measured: bench.BenchResult,
    variants: tuple[Variant, ...],
    warnings: list[str],
    picked: dict[str, Any] | None,
) -> Report:
    """Stage "report": the Report of this run."""
    return Report(
        schema_version=report_mod.SCHEMA_VERSION,
        tool_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            source=spec.source,
            modality=spec.modality,
            task=model.head.task,
            class_name=model.head.class_name,
            random_weights=model.random_weights,
            parameters=model.parameters,
            preset=spec.preset,
        ),
        environment=report_mod.environment(threads),
        export=graph,
        reference_latency=measured.stats[REFERENCE_NAME],
        variants=variants,
        warnings=tuple(warnings),
        bench=measured.to_dict(),
        pick=picked,
    )


def _compare_with_baseline(
    result: Report, baseline: dict[str, Any] | None, options: RunOptions, root: Path, progress: Progress
) -> Report:
    """Stage "compare" (--baseline only): the verdicts against the baseline, in the report and comparison.json/.md."""
    if baseline is None:
        return result
    from .reports import compare

    progress(f"comparing with the baseline {options.baseline}")
    c = compare.compare(
        baseline,
        report_mod.to_dict(result, root),
        latency_tolerance=options.latency_tolerance,
        drift_tolerance=options.drift_tolerance,
        relative_to_reference=options.relative_to_reference,
    )
    compare.write(c, root)
    return dataclasses.replace(result, comparison=compare.to_dict(c))


def _write_bundles_and_report(
    result: Report, built: list[Built], model: LoadedModel, graph: ExportedGraph, root: Path
) -> None:
    """Stage "manifest": every variant folder's manifest.json (checksums, verdict), then report.json/.md/.html."""
    from .deploy.bundle import write_manifest

    doc = report_mod.to_dict(result, root)
    for b, entry in zip(built, doc["variants"]):
        write_manifest(
            b.artifact.path,
            artifact=b.artifact,
            model=model,
            graph=graph,
            variant_verdict=entry,
            environment=doc["environment"],
        )
    report_mod.write(result, root)


# ----------------------------------------------------------------------------------- what the stages use


def plan_context(
    backend: Any, options: RunOptions, calib: Samples | None, threads: int, modality: str = ""
) -> PlanContext:
    """What ``backend`` plans its variants from (``Backend.plan``): the run's options as they concern it."""
    int8 = options.int8
    return PlanContext(
        int8=int8.config if int8 is not None else None,
        settings=dict(int8.target_options) if int8 is not None else {},
        calibration=tuple(calib.feeds) if calib is not None else (),
        half=options.half,
        pick=options.pick,
        rewrite=options.rewrite,
        defer_build=options.defer_build,
        device=options.device_for(backend.name),
        threads=threads,
        modality=modality,
        profile=options.profile,
    )


def _deferred(options: RunOptions) -> set[str]:
    """Targets whose artifacts are not run on their own runtime here (a deferred TensorRT build)."""
    return {t for t in options.targets if options.defer_build and backends.get(t).can_defer}


def _worse(kind: str, candidate: Drift, plain: Drift) -> bool:
    """Whether ``candidate`` is worse than ``plain`` on accuracy against labels (when known) or the task's primary metric."""
    from .measure.metrics import METRICS, PRIMARY

    a, b = candidate.metrics, plain.metrics
    if (
        a.get("accuracy_drop") is not None
        and b.get("accuracy_drop") is not None
        and a["accuracy_drop"] != b["accuracy_drop"]
    ):
        return a["accuracy_drop"] > b["accuracy_drop"]
    name = PRIMARY[kind]
    if a.get(name) is None or b.get(name) is None:
        return False
    return a[name] < b[name] if METRICS[name].higher_is_better else a[name] > b[name]


def budget_for(model: LoadedModel, int8: QuantOptions) -> dict[str, float]:
    """The budget that gates this model's INT8 drift (metrics.budgets: random weights gate on output agreement)."""
    return budgets_for(model, int8)[0]


def budgets_for(model: LoadedModel, int8: QuantOptions) -> tuple[dict[str, float], dict[str, str]]:
    from .measure.metrics import budgets

    return budgets(model.head.metric, random_weights=model.random_weights, overrides=int8.budget)


def _task_drift(work: _Work, infer: Callable[..., Any]) -> Drift:
    """An INT8 variant's task metrics on the evaluation samples, against the budget (random weights: output agreement)."""
    int8, evaluation = work.options.int8, work.evaluation
    assert evaluation is not None and int8 is not None
    gate, info = budgets_for(work.model, int8)
    return task_drift(
        work.model,
        work.ref_outputs,
        infer,
        evaluation.feeds,
        gate,
        labels=evaluation.labels,
        source=evaluation.source,
        informational=info,
        confidence=int8.confidence,
    )


def _fall_back(
    work: _Work, backend: Any, graph: ExportedGraph, folder: Path, request: BuildRequest
) -> tuple[Artifact, Drift, tuple[str, ...]]:
    """Ask the backend to return the most sensitive parts to float until the budget holds."""
    from .backends.base import Recovery
    from .measure.metrics import allowed_drop, primary_score

    model, int8, evaluation, calibration = work.model, work.options.int8, work.evaluation, work.calib
    assert evaluation is not None and int8 is not None
    runner_for = backend.runner

    def evaluate(artifact: Artifact) -> Drift:
        with runner_for(artifact, threads=work.threads) as runner:
            return _task_drift(work, runner.infer)

    id2char = (
        {i: t for t, i in model.tokenizer.get_vocab().items()}
        if model.head.metric == "ctc" and model.tokenizer
        else None
    )

    def score(indices: Any, outputs: Any) -> float:
        refs = [work.ref_outputs[i] for i in indices]
        return primary_score(
            model.head.metric, refs, [dict(o) for o in outputs], output_names=model.head.outputs, id2char=id2char
        )

    recovery = Recovery(
        evaluate=evaluate,
        feeds=tuple(evaluation.feeds),
        reference=tuple(work.ref_outputs),
        score=score,
        max_drop=allowed_drop(model.head.metric, budget_for(model, int8)),
        calibration=tuple(calibration.feeds) if calibration is not None else (),
        progress=work.progress,
    )
    work.progress(f"{folder.name}: drift over budget, returning the most sensitive parts to float")
    return backend.recover(graph, folder, request, recovery)


def _samples(
    model: LoadedModel,
    profile: ShapeProfile,
    int8: QuantOptions | None,
    root: Path,
    progress: Progress,
    warnings: list[str],
) -> tuple[Samples | None, Samples | None]:
    """Calibration and evaluation samples (only when INT8 is asked for), with a reusable cache."""
    if int8 is None:
        return None, None
    from .calibration import load_samples

    calib = None
    if int8.mode == "static" or int8.fallback:  # fallback ranks nodes on calibration samples in both modes
        calib = _cached(
            model, profile, int8.calibration, "calibration", int8.samples, int8.seed, progress, int8.columns
        )
        progress(f"calibration: {len(calib)} samples from {calib.source}")
    evaluation = load_samples(
        int8.evaluation,
        model,
        profile,
        split="evaluation",
        count=int8.eval_samples,
        seed=int8.seed,
        columns=int8.columns,
    )
    progress(f"evaluation: {len(evaluation)} samples from {evaluation.source}")
    from .calibration.samples import describe_skipped

    for s in (calib, evaluation):
        if s is not None and s.skipped:
            warnings.append(
                f"skipped {len(s.skipped)} unreadable sample(s) in {s.source}: {describe_skipped(s.skipped)}"
            )
            progress(f"WARNING: {warnings[-1]}")
    if calib is not None and evaluation is not None and int8.calibration is None and int8.evaluation is None:
        overlap = set(calib.names) & set(evaluation.names)
        if overlap:
            raise D2VError(
                f"calibration and evaluation samples overlap ({sorted(overlap)[:3]}); pass a separate --eval set"
            )
    if calib is not None:
        from .calibration import save_cache

        save_cache(calib, root / "calibration-cache.npz")
    return calib, evaluation


def _cached(
    model: LoadedModel,
    profile: ShapeProfile,
    path: Path | None,
    split: str,
    count: int,
    seed: int,
    progress: Progress,
    columns: Mapping[str, str] | None = None,
) -> Samples:
    """load_samples through a cache keyed by the source (paths, sizes, mtimes), the processor, the shapes and
    what reads them (the tool's version and the readers' source: `calibration.samples.cache_key`)."""
    from .calibration import bundled_path, load_cache, load_samples, save_cache
    from .calibration.samples import cache_key

    source = path if path is not None else bundled_path(model.head.modality, split, model.head.task)
    if source.is_file() and source.suffix == ".npz":
        from .calibration.samples import is_cache

        if is_cache(source):
            return load_cache(source)
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    proc = (
        model.processor.to_json_string()
        if model.processor is not None and hasattr(model.processor, "to_json_string")
        else ""
    )
    tok = type(model.tokenizer).__name__ + str(len(model.tokenizer)) if model.tokenizer is not None else ""
    key = cache_key([stamp, proc, tok, model.head.key, str(profile), count, seed, split, dict(columns or {})])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "d2v-export" / f"{split}-{key}.npz"
    if cache.is_file():
        progress(f"reusing the {split} cache {cache}")
        return load_cache(cache)
    samples = load_samples(path, model, profile, split=split, count=count, seed=seed, columns=columns)
    try:
        save_cache(samples, cache)
    except OSError:
        pass  # a read-only home is no reason to fail
    return samples


def _speedup(reference: LatencyStats, candidate: LatencyStats) -> float | None:
    return round(reference.p50 / candidate.p50, 3) if candidate.p50 > 0 else None
