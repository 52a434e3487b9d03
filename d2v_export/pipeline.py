"""The library API: a model spec, shapes and targets in; artifacts and a report out.

    from d2v_export.pipeline import RunOptions, ShapeRequest, run
    from d2v_export.models import parse_source
    from d2v_export.spec import Modality
    report = run(parse_source("preset:tiny", Modality.VISION, None), ShapeRequest(), RunOptions(output=Path("out")))

The CLI is a thin layer over ``run``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import __version__, backends, bench, report as report_mod
from .backends.base import BuildRequest
from .backends.torch_ref import NAME as REFERENCE_NAME, TorchRunner
from .export import export, make_wrapper
from .heads import SAMPLING_RATE, dummy_inputs
from .models import LoadedModel, load
from .spec import (
    D2VError,
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
from .validate import shape_check

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
class RunOptions:
    output: Path
    targets: tuple[str, ...] = ("onnxruntime",)
    force: bool = False
    threads: int = 0  # 0: every core this process may use
    bench: bench.BenchSettings = field(default_factory=bench.BenchSettings)


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


def check_targets(targets: tuple[str, ...]) -> None:
    """Fail fast, before any export, when a target cannot run here."""
    for name in targets:
        backend = backends.get(name)
        avail = backend.available()
        if not avail.ok:
            raise D2VError(f"target '{name}' is not available here: {avail.reason}", ExitCode.TARGET_UNAVAILABLE)


@contextlib.contextmanager
def staging(output: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``output`` that replaces it only when everything succeeded."""
    if output.exists() and not output.is_dir():
        raise D2VError(f"--output '{output}' is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise D2VError(f"output folder '{output}' is not empty; pass --force to replace it or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
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
    """Export, check, compile for every target, validate, benchmark and write the report."""
    check_targets(options.targets)
    threads = options.threads or default_threads()
    with staging(options.output, options.force) as root:
        progress(f"loading {spec.source}")
        model = load(spec)
        for w in model.warnings:
            progress(f"WARNING: {w}")
        profile = resolve_profile(model, shapes)
        work = root / ".work"
        graph = export(model, profile, work / "model.onnx", progress=progress)
        if not graph.check.passed:
            raise D2VError(
                f"ONNX Runtime does not match PyTorch for {model.head.class_name}: {graph.check.detail.split('worst: ')[-1]} "
                f"is off by {graph.check.metrics['max_scaled_error']:.3g} (scaled), over the tolerance {model.head.tolerance:g}",
                ExitCode.EXPORT_MISMATCH,
            )
        reference = make_wrapper(model)
        artifacts = []
        for target in options.targets:
            backend = backends.get(target)
            request = BuildRequest(precision=Precision.FP32, threads=threads)
            folder = root / f"{target}-{request.precision.value}"
            progress(f"building {folder.name}")
            artifact = backend.compile(graph, folder, request)
            model.save_pretrained_files(folder)
            artifacts.append((backend, artifact))

        opt = profile.point("opt")
        feed = dummy_inputs(model.head, model.config, opt, seed=7)
        drifts = {}
        with contextlib.ExitStack() as stack:
            runners = {REFERENCE_NAME: stack.enter_context(TorchRunner(reference, model.head.outputs, threads))}
            for backend, artifact in artifacts:
                runner = stack.enter_context(backend.runner(artifact, threads=threads))
                runners[artifact.name] = runner
                if _same_file(artifact.model_file, graph.path):
                    drifts[artifact.name] = graph.check  # this very file passed the export check
                else:
                    progress(f"checking {artifact.name} against PyTorch")
                    drifts[artifact.name] = shape_check(model, reference, runner.infer, profile)
            progress(f"measuring latency at {opt} with {threads} threads (interleaved, {options.bench.seconds:g} s budget)")
            latency = bench.measure(runners, feed, batch=opt["batch"], shape=opt, settings=options.bench, progress=bench_progress)
        ref_latency = latency[REFERENCE_NAME]
        variants = tuple(
            Variant(
                target=artifact.target,
                precision=artifact.precision,
                artifact=artifact.name,
                drift=drifts[artifact.name],
                latency=latency[artifact.name],
                speedup_vs_reference=_speedup(ref_latency, latency[artifact.name]),
                quantization=artifact.quantization,
                notes=artifact.notes,
            )
            for _backend, artifact in artifacts
        )
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
            warnings=model.warnings,
        )
        shutil.rmtree(work)
        report_mod.write(result, root)
    return result


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _speedup(reference: LatencyStats, candidate: LatencyStats) -> float | None:
    return round(reference.p50 / candidate.p50, 3) if candidate.p50 > 0 else None
