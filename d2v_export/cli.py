"""The `d2v-export` command line: parse options, build a spec, call the pipeline. The only Click module."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__, backends
from .heads import DEFAULT_TASK, tasks
from .spec import REFERENCE, D2VError, ExitCode, Modality, Precision

EXIT_CODES_HELP = """\b
Exit codes:
  0  success                          4  ONNX does not match PyTorch
  1  internal error (a bug)           5  accuracy drift over budget
  2  bad option (usage)               6  target or device not available here; a matrix in which no cell ran
  3  bad input (model, task, paths)   7  regression against a baseline
                                      8  over the --target-profile's latency budget
  128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM); nothing written"""


def _range(kind: type) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """Parse MIN:OPT:MAX, or N for a fixed size."""

    def parse(_ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        parts = value.split(":")
        try:
            nums = [kind(p) for p in parts]
        except ValueError:
            raise click.BadParameter(f"'{value}' is not MIN:OPT:MAX or a single number") from None
        if len(nums) == 1:
            nums = nums * 3
        if len(nums) != 3 or not (0 < nums[0] <= nums[1] <= nums[2]):
            raise click.BadParameter(f"'{value}': give MIN:OPT:MAX with 0 < MIN <= OPT <= MAX, or a single number")
        return tuple(nums)

    return parse


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except D2VError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(int(exc.code))
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (pipeline.Interrupted): exit 128 + the signal
            signum = int(getattr(exc, "signum", signal.SIGINT))
            click.echo(
                f"error: interrupted ({signal.Signals(signum).name}); nothing was written to the output folder",
                err=True,
            )
            sys.exit(128 + signum)
        except Exception as exc:  # a bug: one line, the traceback with D2V_DEBUG=1
            if os.environ.get("D2V_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(
                f"error: internal error {exc.__class__.__name__}: {first} (rerun with D2V_DEBUG=1 for the traceback)",
                err=True,
            )
            sys.exit(int(ExitCode.INTERNAL))

    return wrapper


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="""\b
Examples:
  d2v-export vision --model preset:base --target onnxruntime --output out/vision
  d2v-export text --model ./my-checkpoint --task question-answering
  d2v-export audio --model facebook/data2vec-audio-base-960h --json > report.json
  d2v-export vision --model preset:base --target onnxruntime --int8
  d2v-export vision --target tensorrt --int8 --defer-build     # Q/DQ graph + trtexec recipe; engine built on the device
  d2v-export audio --target onnxruntime --target openvino --pick  # build the candidates, ship the fastest within budget
  d2v-export text --model ./ckpt --int8 --quant dynamic --max-drift top1_agreement=0.99
  d2v-export vision --int8 --baseline last/report.json            # exit 7 when slower or less accurate
  d2v-export compare last/report.json out/report.json --latency-tolerance 10%
  d2v-export matrix --model preset:base --modality vision --target onnxruntime --target openvino --precision fp32 --precision int8

"""
    + EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="d2v-export")
def main() -> None:
    """Export Data2Vec models to ONNX, check them against PyTorch, compile them for a target and report
    accuracy drift and latency."""


def _int8_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """The INT8 knobs, shared by the single run and `matrix` (one definition, one meaning)."""
    return [
        click.option(
            "--quant",
            type=click.Choice(["static", "dynamic"]),
            default="static",
            show_default=True,
            help="INT8 mode: static (calibrated activations) or dynamic (no calibration: each target's own, e.g. activation "
            "ranges at run time or weights only; docs/quantization.md).",
        ),
        click.option(
            "--calibration",
            type=click.Path(path_type=Path, exists=True),
            default=None,
            help="Calibration samples: a folder of images/audio (labels from Hugging Face metadata.csv/.jsonl or class folders), "
            "a .txt/.jsonl text file, a datasets save_to_disk folder, a .parquet file, .npz feeds, or a calibration-cache.npz.",
        ),
        click.option(
            "--calib-samples",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Calibration samples to use (seeded pick).",
        ),
        click.option(
            "--calib-method",
            type=click.Choice(["minmax", "entropy", "percentile"]),
            default="minmax",
            show_default=True,
        ),
        click.option(
            "--eval",
            "eval_path",
            type=click.Path(path_type=Path, exists=True),
            default=None,
            help="Held-out samples for the drift check, in any --calibration layout; labels give accuracy (CER/WER for speech). "
            "Default: the bundled evaluation split.",
        ),
        click.option("--eval-samples", type=click.IntRange(min=1), default=16, show_default=True),
        click.option(
            "--columns",
            default=None,
            metavar="ROLE=COLUMN,...",
            help="Dataset/metadata columns where the usual names do not fit, e.g. image=img,label=fine_label. "
            "Roles: image, audio, text, text_pair, question, context, label, transcription.",
        ),
        click.option(
            "--max-drift",
            multiple=True,
            metavar="METRIC=VALUE[@CONFIDENCE]",
            help="Override a drift budget, e.g. top1_agreement=0.99 or wer=0.02; repeatable. A metric that counts answers "
            "(top1_agreement, accuracy_drop, span_exact_match) fails only when over budget with 95 % confidence; "
            "@C asks for another confidence (accuracy_drop=0.005@0.8), @0 judges the measured value alone.",
        ),
        *_target_int8_options(),
        click.option(
            "--fallback",
            type=click.Choice(["auto", "off"]),
            default="off",
            show_default=True,
            help="auto: when INT8 breaks the budget, return the most sensitive nodes to float until it holds.",
        ),
    ]


def _target_int8_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Each target's own INT8 settings (``Backend.int8_options``) as flags: their names, choices and help are the target's."""
    return [
        click.option(o.flag, o.name, type=click.Choice(o.choices), default=o.default, show_default=True, help=o.help)
        for o in backends.int8_options().values()
    ]


def _targets_that(has: Callable[[Any], bool]) -> str:
    """The targets whose backend ``has`` something, for help text: "a, b" (or "none")."""
    return ", ".join(name for name in backends.names() if has(backends.get(name))) or "none"


def _int8_options_decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_int8_options()):
        fn = opt(fn)
    return fn


def _defer_build_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    deferring = _targets_that(lambda b: b.can_defer)
    return click.option(
        "--defer-build",
        is_flag=True,
        help=f"Targets that can defer their build ({deferring}) where their runtime or device is not here: write the "
        "portable half (graph, build recipe, simulated drift) and build on the device later.",
    )


def _int8_settings(kw: dict[str, Any]) -> Any:
    """options.QuantOptions from the shared INT8 flags (parsed here, validated by the library)."""
    from .calibration.hf import parse_columns
    from .measure.metrics import parse_drift
    from .options import QuantOptions

    budget, confidence = parse_drift(list(kw["max_drift"]))
    return QuantOptions(
        mode=kw["quant"],
        method=kw["calib_method"],
        calibration=kw["calibration"],
        samples=kw["calib_samples"],
        evaluation=kw["eval_path"],
        eval_samples=kw["eval_samples"],
        columns=parse_columns(kw["columns"]),
        budget=budget,
        confidence=confidence,
        fallback=kw["fallback"] == "auto",
        target_options={name: kw[name] for name in backends.int8_options() if name in kw},
    )


def _device_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--device, shared by the single run and `matrix`; what each target takes comes from its backend."""
    takes = "; ".join(
        f"{name}: {b.devices.choices} (default {b.devices.default})"
        for name, b in ((n, backends.get(n)) for n in backends.names())
    )
    return click.option(
        "--device",
        "device",
        multiple=True,
        metavar="[TARGET=]DEVICE",
        help="Device to build for and measure on. TARGET=DEVICE sets one target's (repeatable); a plain DEVICE "
        f"sets every other target's, and must be one each of them takes. Default: each target's own. {takes}. "
        "A device the target does not take: exit 2; one that is not here: exit 6 (both before any work).",
    )


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _source_options(modality: Modality) -> list[Decorator]:
    """What to export, where to write it, and how to time it."""
    return [
        click.option(
            "--model",
            "-m",
            "model",
            default="preset:base",
            show_default=True,
            metavar="SOURCE",
            help="A Hugging Face hub id, a local checkpoint folder, or preset:tiny|base|large (offline, random weights).",
        ),
        click.option(
            "--task",
            "-t",
            type=click.Choice(tasks(modality)),
            default=None,
            help=f"Hugging Face task name. Default: the checkpoint's own head ({DEFAULT_TASK[modality]} for presets).",
        ),
        click.option(
            "--target",
            "targets",
            multiple=True,
            default=(backends.DEFAULT,),
            show_default=True,
            type=click.Choice(backends.names()),
            help="Runtime to build for; repeat for several.",
        ),
        click.option(
            "--output",
            "-o",
            type=click.Path(path_type=Path, file_okay=False),
            default=None,
            help=f"Folder for artifacts and report.json/report.md. Default: out/{modality.value}.",
        ),
        click.option("--force", is_flag=True, help="Replace a non-empty output folder."),
        click.option(
            "--batch-size",
            callback=_range(int),
            default=None,
            metavar="MIN:OPT:MAX",
            help="Dynamic batch range (default 1:1:8); a single N fixes the batch at N. Latency is measured at OPT.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Threads for every runtime and the PyTorch reference; 0 = all cores available.",
        ),
        click.option(
            "--bench-seconds",
            type=click.FloatRange(min=0),
            default=8.0,
            show_default=True,
            help="Time budget for the interleaved latency measurement (at least 10 runs each).",
        ),
    ]


def _variant_options() -> list[Decorator]:
    """Which variants to build: INT8 and its settings, a device profile and device, half precisions, --pick."""
    fp16, bf16 = ", ".join(backends.building(Precision.FP16)), ", ".join(backends.building(Precision.BF16))
    rewriting = _targets_that(lambda b: bool(getattr(b, "rewrites", ())))
    return [
        click.option(
            "--int8",
            is_flag=True,
            help="Also build INT8 variants (static, calibrated on the bundled real samples unless --calibration).",
        ),
        *_int8_options(),
        click.option(
            "--target-profile",
            default=None,
            metavar="NAME|FILE",
            help="A device profile from targets/ (xeon-vnni, generic-avx2, nvidia-t4, jetson-orin) or a TOML file: "
            "target, precision, threads, shapes and a latency budget that becomes a verdict (exit 8 when over it). "
            "Options given explicitly win over the profile's.",
        ),
        _device_option(),
        click.option("--fp16", is_flag=True, help=f"Also build fp16 variants on targets that build them ({fp16})."),
        click.option(
            "--bf16",
            is_flag=True,
            help=f"Also build bf16 variants on targets that build them ({bf16}; on devices with bf16).",
        ),
        click.option(
            "--pick",
            is_flag=True,
            help="Build every target's candidate recipes (INT8 static/dynamic, graph clean-up on/off, weight widths, "
            "NNCF presets, and fp32), drop those over the drift budget, time the rest interleaved and ship the fastest "
            "(report.json 'pick'). Implies --int8.",
        ),
        click.option(
            "--rewrite/--no-rewrite",
            default=True,
            show_default=True,
            help=f"Exact Data2Vec graph clean-up before compiling, for the targets that gain from it ({rewriting}): "
            "constant folding, layer-scale and query-scale folding, channel LayerNorm without transposes; "
            "--pick tries it on the others.",
        ),
        _defer_build_option(),
    ]


def _gate_options() -> list[Decorator]:
    """The baseline comparison and what is printed."""
    return [
        click.option(
            "--baseline",
            type=click.Path(path_type=Path, exists=True),
            default=None,
            help="A previous report.json (or its folder): compare latency and drift; exit 7 on a regression.",
        ),
        click.option(
            "--latency-tolerance",
            default="10%",
            show_default=True,
            help="Slowdown allowed before --baseline flags it (10% or 0.1).",
        ),
        click.option(
            "--drift-tolerance",
            type=float,
            default=0.005,
            show_default=True,
            help="Worsening of a drift metric allowed against --baseline.",
        ),
        click.option(
            "--relative-to-reference", is_flag=True, help="Compare latency as a ratio to each run's PyTorch reference."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout (progress goes to stderr)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress on stderr."),
    ]


def _common(modality: Modality) -> Decorator:
    """The options every export command (vision, text, audio) takes, in --help's order."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(_source_options(modality) + _variant_options() + _gate_options()):
            fn = opt(fn)
        return fn

    return decorate


# The flags whose "given on the command line" the library's profile merge asks about (options.apply_profile).
_EXPLICIT = {"targets": "targets", "device": "device", "int8": "int8", "int8.mode": "quant"}


def _export_command(modality: Modality, shape_kwargs: dict[str, Any], **kw: Any) -> None:
    """`d2v-export vision|text|audio`: flags -> options (the library decides), pipeline.run, then speak the verdict."""
    from . import pipeline
    from .measure.bench import BenchSettings
    from .reports.compare import parse_tolerance
    from .reports.gate import failure
    from .models import parse_source
    from .options import RunOptions, ShapeRequest, apply_profile, parse_devices, require_int8

    progress, bench_progress, close_bar = _progress_printers(kw["quiet"])
    spec = parse_source(kw["model"], modality, kw["task"])
    settings = _int8_settings(kw)
    device, devices = parse_devices(kw["device"])
    options = RunOptions(
        output=kw["output"] or Path("out") / modality.value,
        targets=kw["targets"],
        force=kw["force"],
        threads=kw["threads"],
        bench=BenchSettings(seconds=kw["bench_seconds"]),
        int8=settings if kw["int8"] or kw["pick"] else None,
        half=tuple(p for p, on in ((Precision.FP16, kw["fp16"]), (Precision.BF16, kw["bf16"])) if on),
        defer_build=kw["defer_build"],
        baseline=kw["baseline"],
        latency_tolerance=parse_tolerance(kw["latency_tolerance"]),
        drift_tolerance=kw["drift_tolerance"],
        relative_to_reference=kw["relative_to_reference"],
        rewrite=kw["rewrite"],
        pick=kw["pick"],
    )
    shapes = ShapeRequest(batch=kw["batch_size"], **shape_kwargs)
    if kw["target_profile"]:
        from .profiles import load_profile

        ctx = click.get_current_context()
        explicit = {
            name
            for name, param in _EXPLICIT.items()
            if ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT
        }
        if device is None:  # only a plain --device overrides the profile's device; TARGET=DEVICE applies on top of it
            explicit.discard("device")
        options, shapes = apply_profile(
            options, shapes, load_profile(kw["target_profile"]), explicit=explicit, int8=settings
        )
    # checked against the final targets
    options = dataclasses.replace(options, device=device, devices={**options.devices, **devices})
    require_int8(options.int8, settings, enable="--int8")
    report = pipeline.run(spec, shapes, options, progress=progress, bench_progress=bench_progress)
    close_bar()
    if kw["as_json"]:
        click.echo((options.output / "report.json").read_text(encoding="utf-8"), nl=False)
    else:
        _summary(report, options.output)
    if report.comparison is not None and report.exit_code in (ExitCode.OK, ExitCode.REGRESSION):
        verdict = "no regression" if report.exit_code is ExitCode.OK else "REGRESSION"
        click.echo(f"against the baseline: {verdict} (see {options.output / 'comparison.md'})", err=True)
    problem = failure(report, options)
    if problem is not None:
        raise problem


def _progress_printers(quiet: bool) -> tuple[Callable[[str], None], Callable[[int, int], None], Callable[[], None]]:
    """(progress lines on stderr, a latency-rounds bar where stderr is a terminal, closing the bar)."""
    bar: dict[str, Any] = {}

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[d2v-export] {msg}", err=True)

    def bench_progress(done: int, total: int) -> None:
        if quiet or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="latency rounds", unit="round", file=sys.stderr, leave=False)
        b = bar["bar"]
        b.total = max(total, done)
        b.update(done - b.n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return progress, bench_progress, close


def _summary(report: Any, output: Path) -> None:
    if report.model.random_weights:
        click.secho(
            "RANDOM WEIGHTS: latency is real; accuracy numbers only measure conversion drift.", fg="yellow", bold=True
        )
    ref = report.reference_latency
    click.echo(
        f"{report.model.modality.value}/{report.model.task} ({report.model.class_name}), report: {output / 'report.md'}"
    )
    click.echo(f"  {REFERENCE + ' (reference)':28s} p50 {ref.p50:9.2f} ms")
    for v in report.variants:
        lat = v.latency
        speed = f"{v.speedup_vs_reference:.2f}x" if v.speedup_vs_reference else "-"
        verdict = "ok" if v.drift.passed else f"DRIFT over budget: {', '.join(v.drift.failed)}"
        if v.drift.passed and v.drift.unresolved:
            verdict += f" (not proven within budget on {v.drift.samples} samples: {', '.join(v.drift.unresolved)}; more --eval-samples resolve it)"
        p50 = f"{lat.p50:9.2f} ms" if lat else "not measured"
        click.echo(f"  {v.artifact:28s} p50 {p50}  {speed:>7s} vs PyTorch  drift {verdict}")
        for note in v.notes:
            click.echo(f"      - {note}")
    if report.pick:
        pick = report.pick
        click.secho(f"picked: {pick['name']} ({pick['candidate']}): {pick['why']}", bold=True)
        for c in pick["candidates"]:
            if c["outcome"] != "picked":
                click.echo(f"  {c['name']:34s} p50 {c['p50_ms']:9.2f} ms  {c['outcome']}")


@main.command(
    epilog="""\b
Examples:
  d2v-export vision                                   # preset:base (data2vec-vision-base-ft1k shape) to ONNX Runtime
  d2v-export vision --model ./ckpt --task semantic-segmentation --batch-size 1:2:4
  d2v-export vision --model preset:tiny --output out/tiny --force --json
"""
)
@_common(Modality.VISION)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    default=None,
    help="Input resolution; must be the checkpoint's (fixed by its position bias).",
)
@_handle_errors
def vision(image_size: int | None, **kw: Any) -> None:
    """Data2VecVision (BEiT-style 224x224 images)."""
    _export_command(Modality.VISION, {"image_size": image_size}, **kw)


@main.command(
    epilog="""\b
Examples:
  d2v-export text                                     # preset:base (data2vec-text-base shape), text-classification
  d2v-export text --model ./my-checkpoint --task question-answering --sequence-length 16:384:512
  d2v-export text --task multiple-choice --num-choices 4
"""
)
@_common(Modality.TEXT)
@click.option(
    "--sequence-length",
    callback=_range(int),
    default=None,
    metavar="MIN:OPT:MAX",
    help="Token range (default 8:128:512).",
)
@click.option(
    "--num-choices",
    callback=_range(int),
    default=None,
    metavar="MIN:OPT:MAX",
    help="Choices per question for multiple-choice (default 2:4:4).",
)
@_handle_errors
def text(sequence_length: Any, num_choices: Any, **kw: Any) -> None:
    """Data2VecText (RoBERTa-style BPE tokens)."""
    _export_command(Modality.TEXT, {"sequence": sequence_length, "choices": num_choices}, **kw)


@main.command(
    epilog="""\b
Examples:
  d2v-export audio                                    # preset:base (data2vec-audio-base-960h shape), CTC
  d2v-export audio --model ./ckpt --task audio-classification --audio-seconds 1:2:10
"""
)
@_common(Modality.AUDIO)
@click.option(
    "--audio-seconds",
    callback=_range(float),
    default=None,
    metavar="MIN:OPT:MAX",
    help="Clip length range in seconds at 16 kHz (default 0.5:1:10).",
)
@_handle_errors
def audio(audio_seconds: Any, **kw: Any) -> None:
    """Data2VecAudio (wav2vec2-style 16 kHz waveforms)."""
    _export_command(Modality.AUDIO, {"audio_seconds": audio_seconds}, **kw)


@main.command(
    epilog="""\b
Examples:
  d2v-export compare last/report.json out/report.json --latency-tolerance 10%
  d2v-export compare last/ out/ --json > comparison.json
"""
)
@click.argument("baseline", type=click.Path(path_type=Path, exists=True))
@click.argument("current", type=click.Path(path_type=Path, exists=True))
@click.option("--latency-tolerance", default="10%", show_default=True, help="Slowdown allowed (10% or 0.1).")
@click.option(
    "--drift-tolerance", type=float, default=0.005, show_default=True, help="Worsening of a drift metric allowed."
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="Significance level of the latency test.",
)
@click.option(
    "--relative-to-reference", is_flag=True, help="Compare latency as a ratio to each run's PyTorch reference."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also write comparison.json and comparison.md here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@_handle_errors
def compare(
    baseline: Path,
    current: Path,
    latency_tolerance: str,
    drift_tolerance: float,
    alpha: float,
    relative_to_reference: bool,
    output: Path | None,
    as_json: bool,
) -> None:
    """Compare two reports: per variant, latency (statistical test on the raw timings) and drift. Exit 7 on a regression."""
    import json

    from .reports import compare as cmp

    c = cmp.compare(
        cmp.load_report(baseline),
        cmp.load_report(current),
        latency_tolerance=cmp.parse_tolerance(latency_tolerance),
        drift_tolerance=drift_tolerance,
        alpha=alpha,
        relative_to_reference=relative_to_reference,
    )
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        cmp.write(c, output)
    click.echo(json.dumps(cmp.to_dict(c), indent=2) if as_json else cmp.markdown(c))
    sys.exit(cmp.exit_code(c))


@main.command(
    epilog="""\b
Examples:
  d2v-export matrix --model preset:base --modality vision --target onnxruntime --target openvino --precision fp32 --precision int8
  d2v-export matrix --model preset:tiny --modality vision --modality text --modality audio --shard 1/3 --output out/m1
  d2v-export matrix --modality vision --target tensorrt --defer-build --calib-samples 64 --max-drift top1_agreement=0.99
  d2v-export matrix-merge out/m1 out/m2 out/m3 --output out/matrix [--force]
"""
)
@click.option(
    "--model",
    "-m",
    default="preset:base",
    show_default=True,
    help="preset:NAME (per modality), or a checkpoint for one modality.",
)
@click.option(
    "--modality",
    "modalities",
    multiple=True,
    type=click.Choice([m.value for m in Modality]),
    default=("vision", "text", "audio"),
    show_default=True,
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    default=backends.names(),
    show_default=True,
    help="Target; repeat for several (an unknown one: exit 2).",
)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice([p.value for p in Precision]),
    default=("fp32", "int8"),
    show_default=True,
    help="Precision; repeat for several. A target that cannot build one here skips its cell with the reason.",
)
@_device_option()
@click.option("--task", default=None, help="Task for every modality (default: the model's own head).")
@click.option("--shard", default=None, metavar="I/N", help="Run only shard I of N (1-based); merge with matrix-merge.")
@click.option(
    "--output", "-o", type=click.Path(path_type=Path, file_okay=False), default=Path("out/matrix"), show_default=True
)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--bench-seconds", type=click.FloatRange(min=0), default=8.0, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@_defer_build_option()
@_int8_options_decorator
@_handle_errors
def matrix(
    model: str,
    modalities: tuple[str, ...],
    targets: tuple[str, ...],
    precisions: tuple[str, ...],
    task: str | None,
    shard: str | None,
    output: Path,
    force: bool,
    threads: int,
    bench_seconds: float,
    quiet: bool,
    defer_build: bool,
    device: tuple[str, ...],
    **int8: Any,
) -> None:
    """Run modalities x targets x precisions into one report (matrix.json/.md/.html) naming the latency-vs-drift front.

    The INT8 options apply to the int8 cells, as --int8 does in a single run. A matrix in which no cell ran
    exits 6 with the reason."""
    from . import matrix as mx
    from .measure.bench import BenchSettings

    from .options import parse_devices, require_int8

    settings = _int8_settings(int8)
    quant = settings if "int8" in precisions else None
    require_int8(quant, settings, enable="--precision int8")
    plain, per_target = parse_devices(device)
    doc = mx.run_matrix(
        model,
        modalities,
        targets,
        precisions,
        output,
        shard=mx.parse_shard(shard),
        bench=BenchSettings(seconds=bench_seconds),
        quant=quant,
        threads=threads,
        task=task,
        force=force,
        defer_build=defer_build,
        device=plain,
        devices=per_target,
        progress=(lambda _m: None) if quiet else (lambda m: click.echo(f"[d2v-export] {m}", err=True)),
    )
    click.echo(mx.markdown(doc))
    _exit_matrix(doc)


def _exit_matrix(doc: dict[str, Any], code: int | None = None) -> None:
    """Exit with the matrix's code (or ``code``); a matrix that measured nothing says why on one line first."""
    from . import matrix as mx

    problem = mx.nothing_measured(doc)
    code = mx.exit_code(doc) if code is None else code
    if problem is not None and code == int(ExitCode.TARGET_UNAVAILABLE):
        click.echo(f"error: {problem}", err=True)
    sys.exit(code)


@main.command("matrix-merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--force", is_flag=True, help="Replace the matrix report already in the output folder.")
@click.option(
    "--baseline",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="The last merged matrix.json (or its folder, shard folders kept beside it): exit 7 on a regression.",
)
@click.option(
    "--latency-tolerance", default="10%", show_default=True, help="Slowdown allowed before --baseline flags it."
)
@click.option(
    "--drift-tolerance",
    type=float,
    default=0.005,
    show_default=True,
    help="Worsening of a drift metric allowed against --baseline.",
)
@_handle_errors
def matrix_merge(
    shards: tuple[Path, ...],
    output: Path,
    force: bool,
    baseline: Path | None,
    latency_tolerance: str,
    drift_tolerance: float,
) -> None:
    """Merge the matrix.json of several shards into one matrix report; with --baseline, gate on regressions."""
    from . import matrix as mx
    from .reports.compare import parse_tolerance

    doc = mx.merge_files(list(shards), output, force=force)
    click.echo(mx.markdown(doc))
    code = mx.exit_code(doc)
    if baseline is not None:
        gate = mx.compare_to_baseline(
            doc, output, baseline, latency_tolerance=parse_tolerance(latency_tolerance), drift_tolerance=drift_tolerance
        )
        click.echo((output / "comparison.md").read_text(encoding="utf-8"))
        if code == 0 and not gate["passed"]:
            code = int(ExitCode.REGRESSION)
    _exit_matrix(doc, code)


@main.command(
    "run",
    epilog="""\b
Examples:
  d2v-export run out/vision/onnxruntime-int8-static cat.jpg dog.png     # top-5 labels
  d2v-export run out/audio/openvino-fp32 speech.wav --json             # transcript
  d2v-export run out/text/onnxruntime-fp32 "Who wrote it? ||| It was written by Ada."
""",
)
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@_handle_errors
def predict_command(bundle: Path, inputs: tuple[str, ...], top_k: int, threads: int, as_json: bool) -> None:
    """Run a bundle on raw inputs (image/audio files, text; pairs as "A ||| B"): checksums verified first."""
    from .deploy.predict import format_text, predict, to_json

    results = predict(bundle, list(inputs), threads=threads, top_k=top_k)
    click.echo(to_json(results) if as_json else format_text(results), nl=False)


@main.command(
    epilog="""\b
Examples:
  d2v-export deploy out/text/onnxruntime-fp32 --triton models/           # tritonserver --model-repository=models/
  d2v-export deploy out/audio/openvino-int8-static --triton models/ --ovms ovms/ --name asr
  d2v-export deploy out/vision/tensorrt-fp16 --triton models/             # then, on the device: sh models/install_plan_tensorrt-fp16.sh
"""
)
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--triton",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="REPOSITORY",
    help="Write a Triton Inference Server model repository entry: REPOSITORY/NAME/config.pbtxt and REPOSITORY/NAME/1/.",
)
@click.option(
    "--ovms",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="FOLDER",
    help="Write a model-server layout for the targets whose bundles that server loads as they are "
    f"({_targets_that(lambda b: getattr(getattr(b, 'serving', None), 'ovms', False))}; docs/deployment.md): "
    "FOLDER/NAME/1/ with the model files, and NAME added to FOLDER/config.json.",
)
@click.option("--name", default=None, help="Model name on the server (default: the bundle folder's name).")
@click.option("--force", is_flag=True, help="Replace a model of the same name already there.")
@_handle_errors
def deploy(bundle: Path, triton: Path | None, ovms: Path | None, name: str | None, force: bool) -> None:
    """Lay out a bundle for a model server (checksums verified first): a Triton model repository, an OVMS folder."""
    from .deploy import serving

    for folder in serving.deploy(bundle, triton=triton, ovms=ovms, name=name, force=force):
        click.echo(f"wrote {folder}")


@main.command(
    epilog="""\b
Examples:
  d2v-export serve out/text/onnxruntime-fp32 --port 8000 --name text     # then: curl localhost:8000/v2/models/text
"""
)
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--name", default=None, help="Model name in the v2 routes (default: the bundle folder's name).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True)
@_handle_errors
def serve(bundle: Path, host: str, port: int, name: str | None, threads: int) -> None:
    """Serve a bundle over the KServe v2 REST protocol (the [serve] extra): health, metadata, inference on tensors."""
    from .deploy import serve as server

    server.serve(bundle, host=host, port=port, name=name, threads=threads)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON.")
@_handle_errors
def doctor(as_json: bool) -> None:
    """Versions, CPU features, and which targets and devices work here (and why not)."""
    import json

    from . import doctor as doc

    d = doc.diagnose()
    click.echo(json.dumps(d, indent=2) if as_json else doc.format_text(d))


def _add_backend_commands() -> None:
    """Each target's own commands (``Backend.commands``), with the CLI's error handling."""
    for name in backends.names():
        for command in backends.get(name).commands():
            if command.callback is not None:
                command.callback = _handle_errors(command.callback)
            main.add_command(command)


_add_backend_commands()
