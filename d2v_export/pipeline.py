"""The library API: a model spec, shapes and targets in; artifacts and a report out.

    from d2v_export.pipeline import RunOptions, ShapeRequest, run
    from d2v_export.models import parse_source
    from d2v_export.spec import Modality
    report = run(parse_source("preset:tiny", Modality.VISION, None), ShapeRequest(), RunOptions(output=Path("out")))

The CLI is a thin layer over ``run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import __version__, backends, bench, report as report_mod
from .backends.base import BuildRequest
from .backends.torch_ref import NAME as REFERENCE_NAME, TorchRunner
from .export import export, make_wrapper
from .heads import SAMPLING_RATE, dummy_inputs
from .models import LoadedModel, load
from .calibration.samples import Samples
from .spec import (
    Artifact,
    D2VError,
    Drift,
    ExportedGraph,
    Dim,
    ExitCode,
    LatencyStats,
    Modality,
    ModelInfo,
    ModelSpec,
    Precision,
    Report,
    ShapeProfile,
    Variant,
)
from .validate import HALF_TOLERANCE_FACTOR, shape_check, task_drift

Range = tuple[float, float, float]


@dataclass(frozen=True)
class ShapeRequest:
    """Shape options as the user gave them; None means the default for the model."""

    batch: Range | None = None
    sequence: Range | None = None  # tokens (text)
    choices: Range | None = None  # answers per question (multiple choice)
    audio_seconds: Range | None = None
    image_size: int | None = None


DEFAULT_BATCH: Range = (1, 1, 8)
DEFAULT_SEQUENCE: Range = (8, 128, 512)
DEFAULT_CHOICES: Range = (2, 4, 4)
DEFAULT_AUDIO_SECONDS: Range = (0.5, 1.0, 10.0)


@dataclass(frozen=True)
class QuantOptions:
    """INT8 as the user asked for it. The target turns it into its own recipe (quantize.make_recipe)."""

    mode: str = "static"  # "static" (calibrated activations) | "dynamic" (ORT: runtime activation ranges; OpenVINO: weight-only)
    method: str = "minmax"  # static calibration: minmax | entropy | percentile
    calibration: Path | None = None  # None: the bundled real samples
    samples: int = 32  # calibration samples
    evaluation: Path | None = None  # held-out samples; None: the bundled evaluation split
    eval_samples: int = 16
    columns: Mapping[str, str] = field(default_factory=dict)  # {role: column} for metadata files and datasets (calibration.hf)
    budget: Mapping[str, float] = field(default_factory=dict)  # overrides of metrics.DEFAULT_BUDGETS
    fallback: bool = False  # return the most sensitive nodes to float until the budget holds
    seed: int = 0
    reduce_range: str = "auto"  # ONNX Runtime 7-bit weights: "auto" (when the deployment CPU lacks VNNI), "on", "off"


@dataclass(frozen=True)
class RunOptions:
    output: Path
    targets: tuple[str, ...] = ("onnxruntime",)
    force: bool = False
    threads: int = 0  # 0: every core this process may use
    bench: bench.BenchSettings = field(default_factory=bench.BenchSettings)
    int8: QuantOptions | None = None  # None: float variants only
    baseline: Path | None = None  # a report.json (or its folder) to compare against
    latency_tolerance: float = 0.10
    drift_tolerance: float = 0.005
    relative_to_reference: bool = False
    device: str = "CPU"  # the backend's device (OpenVINO: CPU/GPU/AUTO; TensorRT: cuda:0)
    profile: Any = None  # a profiles.DeviceProfile whose latency budget becomes a verdict
    half: tuple[Precision, ...] = ()  # extra float precisions (fp16, bf16) for the targets that support them
    defer_build: bool = False  # TensorRT without TensorRT or a GPU here: write the portable half only
    rewrite: bool = True  # the exact graph clean-up (d2v_export.rewrite) for the targets that ask for it
    pick: bool = False  # build every target's candidate recipes, ship the fastest within the drift budget (d2v_export.pick)


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
            raise D2VError(f"--image-size {req.image_size}: this checkpoint was trained at {size}x{size} and its position bias is fixed; use --image-size {size}")
        return ShapeProfile((batch,), {"image_size": size})
    if modality is Modality.AUDIO:
        lo, opt, hi = req.audio_seconds or DEFAULT_AUDIO_SECONDS
        if lo < 0.05:
            raise D2VError(f"--audio-seconds {lo}: the convolutional front end needs at least 0.05 s; use a larger minimum")
        samples = Dim("samples", int(lo * SAMPLING_RATE), int(opt * SAMPLING_RATE), int(hi * SAMPLING_RATE))
        return ShapeProfile((batch, samples))
    longest = int(cfg.max_position_embeddings) - 2  # RoBERTa-style position ids start after the padding index
    lo, opt, hi = req.sequence or (DEFAULT_SEQUENCE[0], min(DEFAULT_SEQUENCE[1], longest), min(DEFAULT_SEQUENCE[2], longest))
    if hi > longest:
        raise D2VError(f"--sequence-length max {int(hi)} is longer than this checkpoint accepts ({longest} tokens); lower it")
    dims = [batch]
    if model.head.multiple_choice:
        dims.append(_dim("choices", req.choices or DEFAULT_CHOICES))
    dims.append(_dim("sequence", (lo, opt, hi)))
    return ShapeProfile(tuple(dims))


def _dim(name: str, r: Range) -> Dim:
    return Dim(name, int(r[0]), int(r[1]), int(r[2]))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_targets(targets: tuple[str, ...], *, defer_build: bool = False, half: tuple[Precision, ...] = ()) -> None:
    """Fail fast, before any export, when a target cannot run here (or cannot build what was asked)."""
    for name in targets:
        backend = backends.get(name)
        avail = backend.available()
        if not avail.ok and not (defer_build and getattr(backend, "can_defer", False)):
            raise D2VError(f"target '{name}' is not available here: {avail.reason}", ExitCode.TARGET_UNAVAILABLE)
    for precision in half:
        if not any(precision in backends.get(name).precisions for name in targets):
            raise D2VError(
                f"no requested target builds {precision.value} ({', '.join(targets)}); add --target openvino or --target tensorrt",
                ExitCode.TARGET_UNAVAILABLE,
            )


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a run: it unwinds like Ctrl-C, so the staging folder is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_OWNER = ".d2v-owner.json"  # in a staging folder: which process writes it, so a later run can tell a stale one


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Interrupted`` (once) while inside; the previous handlers come back after.

    A signal the process ignores (SIGHUP under nohup) stays ignored. Outside the main thread Python
    cannot install handlers, and nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if fired:  # already unwinding: let the cleanup finish
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _clear_stale(output: Path, progress: Progress) -> None:
    """Remove staging folders of ``output`` whose run is dead (killed with SIGKILL, power loss); name the unknown ones."""
    import glob
    import json
    import socket

    for folder in sorted(output.parent.glob(f".{glob.escape(output.name)}.*.partial")):
        if not folder.is_dir():
            continue
        try:
            owner = json.loads((folder / _OWNER).read_text(encoding="utf-8"))
            host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            progress(f"WARNING: '{folder}' looks like the staging folder of an interrupted run; delete it if no run is writing to '{output}'")
            continue
        if host == socket.gethostname() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            progress(f"removed '{folder}', left by a run that was killed (pid {pid})")


@contextlib.contextmanager
def staging(output: Path, force: bool, progress: Progress = lambda _msg: None) -> Iterator[Path]:
    """A temporary folder beside ``output`` that replaces it only when everything succeeded.

    Any exception, Ctrl-C, SIGTERM or SIGHUP removes it; one left by a killed run (its owner process
    dead) is removed by the next run into the same output. Without ``force``, a folder that another
    run filled meanwhile is never replaced: the rename into place is atomic and fails on it.
    """
    import json
    import socket

    if output.exists() and not output.is_dir():
        raise D2VError(f"--output '{output}' is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise D2VError(f"output folder '{output}' is not empty; pass --force to replace it or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(output, progress)
    with _interruptible():
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        try:
            (tmp / _OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")
            yield tmp
            (tmp / _OWNER).unlink()
            old = None
            if force and output.exists():
                old = output.parent / f".{output.name}.old-{os.getpid()}"
                output.rename(old)
            try:
                os.rename(tmp, output)  # atomic; replaces an empty folder, fails on a non-empty one
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise D2VError(
                    f"output folder '{output}' was written by another run while this one worked; this run's results were discarded: "
                    "pass --force to replace it or choose another --output"
                ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    does not raise: the report says which metric failed and ``Report.passed`` is False.
    """
    check_targets(options.targets, defer_build=options.defer_build, half=options.half)
    threads = options.threads or default_threads()
    baseline = None
    if options.baseline is not None:
        from .compare import load_report

        baseline = load_report(options.baseline)  # a bad baseline fails before minutes of work
    with staging(options.output, options.force, progress) as root:
        progress(f"loading {spec.source}")
        model = load(spec)
        for w in model.warnings:
            progress(f"WARNING: {w}")
        profile = resolve_profile(model, shapes)
        warnings = list(model.warnings)
        calib, evaluation = _samples(model, profile, options.int8, root, progress, warnings)
        work = root / ".work"
        graph = export(model, profile, work / "model.onnx", progress=progress)
        if not graph.check.passed:
            raise D2VError(
                f"ONNX Runtime does not match PyTorch for {model.head.class_name}: {graph.check.detail.split('worst: ')[-1]} "
                f"is off by {graph.check.metrics['max_scaled_error']:.3g} (scaled), over the tolerance {model.head.tolerance:g}",
                ExitCode.EXPORT_MISMATCH,
            )
        reference = make_wrapper(model)
        ref_outputs: list[dict[str, Any]] = []
        if evaluation is not None:
            progress(f"running the PyTorch reference on {len(evaluation)} evaluation samples")
            with TorchRunner(reference, model.head.outputs, threads) as ref_runner:
                ref_outputs = [ref_runner.infer(f) for f in evaluation.feeds]

        rewritten: dict[tuple[str, ...], tuple[ExportedGraph, dict[str, int]]] = {(): (graph, {})}

        def graph_for(names: tuple[str, ...]) -> tuple[ExportedGraph, dict[str, int]]:
            if names not in rewritten:
                from .rewrite import for_model

                progress(f"graph clean-up: {', '.join(names)}")
                rewritten[names] = for_model(graph, names, model, profile, work / f"clean-{len(rewritten)}" / "model.onnx")
            return rewritten[names]

        built: list[tuple[Any, Artifact, Drift, tuple[str, ...]]] = []
        described: dict[str, str] = {}  # --pick: variant name -> what the candidate is
        for target in options.targets:
            backend = backends.get(target)
            for name, request, names, what in _plan(backend, options, calib, threads, model.head.modality.value):
                folder = root / name
                described[name] = what
                progress(f"building {name}")
                graph_used, done = graph_for(names)
                artifact = backend.compile(graph_used, folder, request)
                model.save_pretrained_files(folder)
                with backend.runner(artifact, threads=threads) as runner:
                    if request.quant is None:
                        factor = HALF_TOLERANCE_FACTOR.get(request.precision.value, 1.0)
                        drift = (
                            graph.check
                            if _same_file(artifact.model_file, graph.path)
                            else shape_check(model, reference, runner.infer, profile, tolerance=model.head.tolerance * factor)
                        )
                    else:
                        drift = _judge(model, ref_outputs, runner.infer, evaluation, options.int8)
                notes: tuple[str, ...] = ()
                if request.quant is not None and not drift.passed and options.int8 and options.int8.fallback:
                    plain = drift
                    artifact, drift, notes = _fall_back(
                        backend, graph_used, folder, request, model, ref_outputs, evaluation, calib, options.int8, threads, progress
                    )
                    if not drift.passed and _worse(model.head.metric, drift, plain):
                        # never ship a fallback that made things worse (seen: NNCF accuracy control on audio)
                        from .fallback import summarize

                        progress(f"{name}: the fallback scored worse than plain INT8; rebuilding the plain artifact")
                        why = f"--fallback auto did not reach the budget and scored worse ({summarize(drift)}); the plain INT8 artifact is kept"
                        artifact, drift, notes = backend.compile(graph_used, folder, request), plain, (why, *notes)
                elif request.quant is not None and not drift.passed:
                    notes = (f"drift over budget ({', '.join(drift.failed)}); --fallback auto returns the most sensitive nodes to float",)
                if done:  # what the graph clean-up changed (the same for a fallback or a rebuilt artifact)
                    from .rewrite import describe

                    notes = (*notes, describe(done))
                built.append((backend, artifact, drift, notes))

        opt = profile.point("opt")
        feed = dummy_inputs(model.head, model.config, opt, seed=7)
        with contextlib.ExitStack() as stack:
            runners = {REFERENCE_NAME: stack.enter_context(TorchRunner(reference, model.head.outputs, threads))}
            for backend, artifact, _drift, _notes in built:
                runners[artifact.name] = stack.enter_context(backend.runner(artifact, threads=threads))
            progress(f"measuring latency at {opt} with {threads} threads (interleaved, {options.bench.seconds:g} s budget)")
            measured = bench.measure_full(runners, feed, batch=opt["batch"], shape=opt, settings=options.bench, progress=bench_progress)
        latency = measured.stats
        ref_latency = latency[REFERENCE_NAME]
        variants: tuple[Variant, ...] = tuple(
            Variant(
                target=artifact.target,
                precision=artifact.precision,
                artifact=artifact.name,
                drift=drift,
                latency=latency[artifact.name],
                speedup_vs_reference=_speedup(ref_latency, latency[artifact.name]),
                quantization=artifact.quantization,
                notes=artifact.notes + notes,
                latency_budget=options.profile.latency_verdict(spec.modality, latency[artifact.name]) if options.profile else None,
            )
            for _backend, artifact, drift, notes in built
        )
        picked: dict[str, Any] | None = None
        if options.pick:
            from . import pick as pick_mod

            picked = pick_mod.choose(variants, described, model.head.metric, options.profile, deferred=_deferred(options))
            progress(f"picked {picked['artifact']}: {picked['why']}")
            kept = set(pick_mod.kept(variants, picked))
            for _backend, artifact, _drift, _notes in built:
                if artifact.name not in kept:
                    shutil.rmtree(artifact.path, ignore_errors=True)
            built = [b for b in built if b[1].name in kept]
            variants = tuple(v for v in variants if v.artifact in kept)
        result = Report(
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
            reference_latency=ref_latency,
            variants=variants,
            warnings=tuple(warnings),
            bench=measured.to_dict(),
            pick=picked,
        )
        shutil.rmtree(work)
        if baseline is not None:
            from . import compare

            progress(f"comparing with the baseline {options.baseline}")
            c = compare.compare(
                baseline,
                report_mod.to_dict(result, root),
                latency_tolerance=options.latency_tolerance,
                drift_tolerance=options.drift_tolerance,
                relative_to_reference=options.relative_to_reference,
            )
            compare.write(c, root)
            result = dataclasses.replace(result, comparison=compare.to_dict(c))
        from .bundle import write_manifest

        doc = report_mod.to_dict(result, root)
        for (_backend, artifact, _drift, _notes), entry in zip(built, doc["variants"]):
            write_manifest(artifact.path, artifact=artifact, model=model, graph=graph, variant_verdict=entry, environment=doc["environment"])
        report_mod.write(result, root)
    return result


def _plan(
    backend: Any, options: RunOptions, calib: Samples | None, threads: int, modality: str = ""
) -> list[tuple[str, BuildRequest, tuple[str, ...], str]]:
    """(variant name, request, graph rewrites, description) for every variant of one target.

    Without --pick: fp32, the extra float precisions and the INT8 recipe the user asked for. With it: fp32,
    the float precisions and every INT8 lever the backend offers (``pick_levers``), less those that cannot
    be exact on the deployment CPU (8-bit ONNX Runtime weights where the u8 x s8 kernel saturates) and
    duplicates of one another.
    """
    default_rewrites = tuple(getattr(backend, "rewrites", ())) if options.rewrite else ()
    plan = []
    for request in _requests(backend, options, calib, threads, modality):
        if options.pick and request.quant is not None and getattr(backend, "pick_levers", ()):
            continue  # replaced by the backend's candidates below
        name = f"{backend.name}-{request.precision.value}" + (f"-{request.quant.mode}" if request.quant else "")
        what = f"{request.precision.value}" + (f" {request.quant.mode}" if request.quant else "")
        plan.append((name, request, default_rewrites, what))
    if not options.pick or options.int8 is None:
        return plan
    from .quantize import make_recipe, saturates

    int8 = options.int8
    run_rr = wants_reduce_range(int8, options.profile)
    exact_8bit = not saturates(getattr(options.profile, "requires_cpu_flags", ()) or None)
    seen = set()
    for lever in getattr(backend, "pick_levers", ()):
        if lever.mode == "static" and calib is None:
            continue
        rr = run_rr if lever.reduce_range is None else lever.reduce_range
        if rr is False and lever.reduce_range is False and not exact_8bit:
            continue  # 8-bit weights saturate on this CPU (quantize.saturates)
        if lever.rewrite and not options.rewrite:
            continue  # --no-rewrite: no clean-up anywhere
        names = default_rewrites if lever.rewrite is None else (_ALL_REWRITES() if lever.rewrite else ())
        samples = len(calib) if calib is not None and lever.mode == "static" else 0
        recipe = make_recipe(backend.name, lever.mode, method=int8.method, samples=samples, reduce_range=rr, modality=modality)
        if lever.symmetric_activations is not None:
            recipe = dataclasses.replace(recipe, symmetric_activations=lever.symmetric_activations)
        key = (recipe, names)
        if key in seen:
            continue
        seen.add(key)
        feeds = tuple(calib.feeds) if calib is not None and lever.mode == "static" else ()
        request = BuildRequest(precision=Precision.INT8, quant=recipe, calibration=feeds, threads=threads, defer_build=options.defer_build, device=options.device)
        plan.append((f"{backend.name}-int8-{lever.mode}{lever.suffix}", request, names, lever.description or lever.mode))
    return plan


def _ALL_REWRITES() -> tuple[str, ...]:
    from .rewrite import DEFAULT

    return DEFAULT


def _deferred(options: RunOptions) -> set[str]:
    """Targets whose artifacts are not run on their own runtime here (a deferred TensorRT build)."""
    return {t for t in options.targets if options.defer_build and getattr(backends.get(t), "can_defer", False)}


def _requests(backend: Any, options: RunOptions, calib: Samples | None, threads: int, modality: str = "") -> list[BuildRequest]:
    """fp32 always (it is the baseline of every comparison), plus fp16/bf16 where supported, plus INT8 when asked for."""
    common = dict(threads=threads, defer_build=options.defer_build, device=options.device)
    requests = [BuildRequest(precision=Precision.FP32, **common)]  # type: ignore[arg-type]
    requests += [BuildRequest(precision=p, **common) for p in options.half if p in backend.precisions]  # type: ignore[arg-type]
    int8 = options.int8
    if int8 is not None:
        from .quantize import make_recipe

        samples = len(calib) if calib is not None and int8.mode == "static" else 0
        recipe = make_recipe(
            backend.name, int8.mode, method=int8.method, samples=samples, reduce_range=wants_reduce_range(int8, options.profile), modality=modality
        )
        feeds = tuple(calib.feeds) if calib is not None and int8.mode == "static" else ()
        requests.append(BuildRequest(precision=Precision.INT8, quant=recipe, calibration=feeds, **common))  # type: ignore[arg-type]
    return requests


def wants_reduce_range(int8: QuantOptions, profile: Any = None) -> bool:
    """7-bit ONNX Runtime weights? "auto": when the CPU the artifact is for has no VNNI/AMX (quantize.saturates).

    That CPU is the device profile's (its requires_cpu_flags), else this machine, where the drift is measured.
    """
    if int8.reduce_range in ("on", "off"):
        return int8.reduce_range == "on"
    from .quantize import saturates

    return saturates(getattr(profile, "requires_cpu_flags", ()) or None)


def _worse(kind: str, candidate: Drift, plain: Drift) -> bool:
    """Whether ``candidate`` is worse than ``plain`` on accuracy against labels (when known) or the task's primary metric."""
    from .metrics import METRICS, PRIMARY

    a, b = candidate.metrics, plain.metrics
    if a.get("accuracy_drop") is not None and b.get("accuracy_drop") is not None and a["accuracy_drop"] != b["accuracy_drop"]:
        return a["accuracy_drop"] > b["accuracy_drop"]
    name = PRIMARY[kind]
    if a.get(name) is None or b.get(name) is None:
        return False
    return a[name] < b[name] if METRICS[name].higher_is_better else a[name] > b[name]


def budget_for(model: LoadedModel, int8: QuantOptions) -> dict[str, float]:
    """The budget that gates this model's INT8 drift (metrics.budgets: random weights gate on output agreement)."""
    return budgets_for(model, int8)[0]


def budgets_for(model: LoadedModel, int8: QuantOptions) -> tuple[dict[str, float], dict[str, str]]:
    from .metrics import budgets

    return budgets(model.head.metric, random_weights=model.random_weights, overrides=int8.budget)


def _judge(model: LoadedModel, ref_outputs: list[dict[str, Any]], infer: Callable[..., Any], evaluation: Samples | None, int8: QuantOptions | None) -> Drift:
    assert evaluation is not None and int8 is not None
    gate, info = budgets_for(model, int8)
    return task_drift(model, ref_outputs, infer, evaluation.feeds, gate, labels=evaluation.labels, source=evaluation.source, informational=info)


def _fall_back(
    backend: Any,
    graph: ExportedGraph,
    folder: Path,
    request: BuildRequest,
    model: LoadedModel,
    ref_outputs: list[dict[str, Any]],
    evaluation: Samples | None,
    calibration: Samples | None,
    int8: QuantOptions,
    threads: int,
    progress: Progress,
) -> tuple[Artifact, Drift, tuple[str, ...]]:
    """Ask the backend to return the most sensitive parts to float until the budget holds."""
    from .backends.base import Recovers, Recovery
    from .metrics import allowed_drop, primary_score

    assert evaluation is not None
    if not isinstance(backend, Recovers):
        raise D2VError(f"--fallback auto is not supported by target '{backend.name}'; use --fallback off", ExitCode.TARGET_UNAVAILABLE)

    def evaluate(artifact: Artifact) -> Drift:
        with backend.runner(artifact, threads=threads) as runner:
            return _judge(model, ref_outputs, runner.infer, evaluation, int8)

    id2char = {i: t for t, i in model.tokenizer.get_vocab().items()} if model.head.metric == "ctc" and model.tokenizer else None

    def score(indices: Any, outputs: Any) -> float:
        refs = [ref_outputs[i] for i in indices]
        return primary_score(model.head.metric, refs, [dict(o) for o in outputs], output_names=model.head.outputs, id2char=id2char)

    recovery = Recovery(
        evaluate=evaluate,
        feeds=tuple(evaluation.feeds),
        reference=tuple(ref_outputs),
        score=score,
        max_drop=allowed_drop(model.head.metric, budget_for(model, int8)),
        calibration=tuple(calibration.feeds) if calibration is not None else (),
        progress=progress,
    )
    progress(f"{folder.name}: drift over budget, returning the most sensitive parts to float")
    return backend.recover(graph, folder, request, recovery)


def _samples(
    model: LoadedModel, profile: ShapeProfile, int8: QuantOptions | None, root: Path, progress: Progress, warnings: list[str]
) -> tuple[Samples | None, Samples | None]:
    """Calibration and evaluation samples (only when INT8 is asked for), with a reusable cache."""
    if int8 is None:
        return None, None
    from .calibration import load_samples

    calib = None
    if int8.mode == "static" or int8.fallback:  # fallback ranks nodes on calibration samples in both modes
        calib = _cached(model, profile, int8.calibration, "calibration", int8.samples, int8.seed, progress, int8.columns)
        progress(f"calibration: {len(calib)} samples from {calib.source}")
    evaluation = load_samples(int8.evaluation, model, profile, split="evaluation", count=int8.eval_samples, seed=int8.seed, columns=int8.columns)
    progress(f"evaluation: {len(evaluation)} samples from {evaluation.source}")
    from .calibration.samples import describe_skipped

    for s in (calib, evaluation):
        if s is not None and s.skipped:
            warnings.append(f"skipped {len(s.skipped)} unreadable sample(s) in {s.source}: {describe_skipped(s.skipped)}")
            progress(f"WARNING: {warnings[-1]}")
    if calib is not None and evaluation is not None and int8.calibration is None and int8.evaluation is None:
        overlap = set(calib.names) & set(evaluation.names)
        if overlap:
            raise D2VError(f"calibration and evaluation samples overlap ({sorted(overlap)[:3]}); pass a separate --eval set")
    if calib is not None:
        from .calibration import save_cache

        save_cache(calib, root / "calibration-cache.npz")
    return calib, evaluation


def _cached(
    model: LoadedModel, profile: ShapeProfile, path: Path | None, split: str, count: int, seed: int, progress: Progress,
    columns: Mapping[str, str] | None = None,
) -> Samples:
    """load_samples through a cache keyed by the source (paths, sizes, mtimes), the processor and the shapes."""
    import hashlib
    import json

    from .calibration import bundled_path, load_cache, load_samples, save_cache

    source = path if path is not None else bundled_path(model.head.modality, split, model.head.task)
    if source.is_file() and source.suffix == ".npz":
        from .calibration.samples import is_cache

        if is_cache(source):
            return load_cache(source)
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    proc = model.processor.to_json_string() if model.processor is not None and hasattr(model.processor, "to_json_string") else ""
    tok = type(model.tokenizer).__name__ + str(len(model.tokenizer)) if model.tokenizer is not None else ""
    key_src = json.dumps([stamp, proc, tok, model.head.key, str(profile), count, seed, split, dict(columns or {})], sort_keys=True, default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _speedup(reference: LatencyStats, candidate: LatencyStats) -> float | None:
    return round(reference.p50 / candidate.p50, 3) if candidate.p50 > 0 else None
