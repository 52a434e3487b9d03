"""TensorRT target, in two halves (see docs/tensorrt.md).

The portable half is written everywhere, with or without TensorRT and a GPU:

    folder/model.onnx          fp32 graph (fp32, fp16) or the explicit Q/DQ INT8 graph (int8)
    folder/build_recipe.json   shapes min/opt/max per input, precision, typing, workspace, timing cache
    folder/build_engine.sh     the same recipe as a `trtexec` command line

The engine half needs TensorRT >= 10 and an NVIDIA GPU (``d2v_export.trt_engine``):

    folder/model.plan            the serialized engine (tied to GPU, TensorRT and CUDA versions)
    folder/engine_manifest.json  TensorRT, CUDA, GPU name and compute capability, build settings
                                 (+ GPU benchmark and a check against ONNX Runtime after build_engine)
    folder/timing.cache          TensorRT's timing cache, reused by later builds on the same device

Precisions and how each is built (TensorRT 10 docs: explicit quantization is used with strong typing,
precision builder flags are deprecated since 10.12 and removed in 11):

- fp32: fp32 graph, weakly typed, TF32 cleared (``--noTF32``): a true fp32 engine, comparable with the
  fp32 ONNX export check.
- fp16: fp32 graph, weakly typed with ``BuilderFlag.FP16`` (``--fp16``): TensorRT picks fp16 kernels
  where faster; LayerNormalization (opset 17+) maps to INormalizationLayer, which computes in fp32 by
  default whatever the builder flags (TensorRT API docs: to avoid overflow).
  Needs TensorRT 10.x (TensorRT 11 removed the flag: convert the graph to mixed precision first).
- int8: Q/DQ graph (``quantize.make_recipe("tensorrt", "static")``: symmetric int8, per-channel
  weights, Q/DQ only on the inputs of MatMul/Gemm/Conv), built **strongly typed** (``--stronglyTyped``,
  no precision flags): int8 exactly where the Q/DQ pairs are, fp32 elsewhere, which is also what
  ONNX Runtime runs when it simulates the graph here.

Without TensorRT or a GPU: ``compile`` raises D2VError(TARGET_UNAVAILABLE) naming ``--defer-build``;
with ``BuildRequest.defer_build`` it writes the portable half only, and ``runner`` runs ``model.onnx`` on
ONNX Runtime, named and noted as a simulation (never engine accuracy or latency).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import trt_engine
from ..heads import concrete_shape
from ..spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision, QuantRecipe
from .base import Availability, BuildRequest, Recovery, RunnerBase
from .onnxruntime import OrtRunner, _copy_onnx

NAME = "tensorrt"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
RECIPE_FILE = "build_recipe.json"
SCRIPT_FILE = "build_engine.sh"
ENGINE_MANIFEST = "engine_manifest.json"
TIMING_CACHE = "timing.cache"
RECIPE_FORMAT = "d2v-export/tensorrt-build-recipe"
RECIPE_VERSION = 1
DEFAULT_WORKSPACE_GB = 4.0

DEFER_HINT = "use --defer-build to write the portable half here"
NOT_BUILT = "engine not built here: run `d2v-export build-engine <bundle>` (or build_engine.sh) on the target device"
SIMULATED_INT8 = "accuracy: Q/DQ graph, simulated on ONNX Runtime — not engine accuracy"
SIMULATED_FLOAT = "accuracy: the fp32 ONNX graph on ONNX Runtime — {p} engine accuracy is measured by build-engine on the device"
SIMULATED_LATENCY = "latency: ONNX Runtime on this CPU — not engine latency"


@dataclass(frozen=True)
class Build:
    """How one precision becomes an engine: builder settings and the matching trtexec flags."""

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    cleared_flags: tuple[str, ...]
    trtexec_flags: tuple[str, ...]
    why: str


BUILDS: dict[Precision, Build] = {
    Precision.FP32: Build(False, (), ("TF32",), ("--noTF32",), "fp32 graph, weakly typed, TF32 off: a true fp32 engine"),
    Precision.FP16: Build(
        False, ("FP16",), (), ("--fp16",),
        "fp32 graph, weakly typed with the FP16 flag (TensorRT 10.x; removed in 11: convert the graph to mixed precision there)",
    ),
    Precision.INT8: Build(
        True, (), (), ("--stronglyTyped",),
        "explicit Q/DQ graph, strongly typed: int8 where the Q/DQ pairs are, fp32 elsewhere (TensorRT 10 docs: no precision flags with Q/DQ)",
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------ the recipe


def input_profiles(graph: ExportedGraph) -> tuple[trt_engine.InputProfile, ...]:
    """Concrete min/opt/max shapes of every graph input, from the graph's shape profile."""
    out = []
    for spec in graph.inputs:
        shapes = []
        for which in ("min", "opt", "max"):
            sizes = graph.profile.point(which)
            if "image_size" in sizes:
                sizes = sizes | {"height": sizes["image_size"], "width": sizes["image_size"]}
            shapes.append(concrete_shape(spec, sizes))
        out.append(trt_engine.InputProfile(spec.name, shapes[0], shapes[1], shapes[2]))
    return tuple(out)


def make_build_recipe(graph: ExportedGraph, precision: Precision, quant: QuantRecipe | None, *, workspace_gb: float = DEFAULT_WORKSPACE_GB) -> dict[str, Any]:
    """The build recipe as plain JSON data (build_recipe.json)."""
    from .. import __version__

    build = BUILDS[precision]
    profiles = input_profiles(graph)
    doc: dict[str, Any] = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "created_by": f"d2v-export {__version__}",
        "onnx": ONNX_FILE,
        "engine": PLAN_FILE,
        "precision": precision.value,
        "tensorrt": {"min_version": f"{trt_engine.MIN_MAJOR}.0", "max_version_exclusive": "11" if build.builder_flags else None},
        "strongly_typed": build.strongly_typed,
        "builder_flags": list(build.builder_flags),
        "cleared_flags": list(build.cleared_flags),
        "why": build.why,
        "workspace_bytes": int(workspace_gb * (1 << 30)),
        "timing_cache": TIMING_CACHE,
        "inputs": [
            {
                "name": p.name,
                "dtype": spec.dtype,
                "axes": [a if isinstance(a, int) else str(a) for a in spec.shape],
                "min": list(p.min),
                "opt": list(p.opt),
                "max": list(p.max),
            }
            for p, spec in zip(profiles, graph.inputs)
        ],
        "outputs": [t.name for t in graph.outputs],
        "quantization": dataclasses.asdict(quant) if quant is not None else None,
    }
    doc["trtexec"] = shlex.join(trtexec_command(doc))
    return doc


def trtexec_command(recipe: Mapping[str, Any], *, workspace_bytes: int | None = None, timing_cache: str | None = None) -> list[str]:
    """``trtexec`` arguments equivalent to the Python build of ``recipe`` (it also benchmarks the engine)."""

    def shapes(which: str) -> str:
        return ",".join(f"{i['name']}:{'x'.join(str(d) for d in i[which])}" for i in recipe["inputs"])

    build = BUILDS[Precision(recipe["precision"])]
    mib = max(1, int((workspace_bytes or int(recipe["workspace_bytes"])) // (1 << 20)))
    return [
        "trtexec",
        f"--onnx={recipe['onnx']}",
        f"--saveEngine={recipe['engine']}",
        f"--minShapes={shapes('min')}",
        f"--optShapes={shapes('opt')}",
        f"--maxShapes={shapes('max')}",
        *build.trtexec_flags,
        f"--memPoolSize=workspace:{mib}M",
        f"--timingCacheFile={timing_cache or recipe['timing_cache']}",
    ]


def build_script(recipe: Mapping[str, Any]) -> str:
    cmd = trtexec_command(recipe)
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    return f"""#!/usr/bin/env bash
# Build (and benchmark) the TensorRT engine of this bundle on the device that will run it:
# engines are tied to the GPU, the TensorRT and the CUDA version they were built with.
# Needs TensorRT {recipe['tensorrt']['min_version']} or newer; trtexec from $TRTEXEC, PATH or /usr/src/tensorrt/bin (JetPack).
# The same build from Python: d2v-export build-engine <this folder>  (also writes {ENGINE_MANIFEST}).
# Precision {recipe['precision']}: {recipe['why']}.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
"$TRTEXEC" \\
    {args} \\
    "$@"
"""


def read_recipe(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / RECIPE_FILE
    if not path.is_file():
        raise D2VError(f"'{bundle}' has no {RECIPE_FILE}; pass a tensorrt variant folder written by d2v-export (e.g. OUTPUT/tensorrt-int8-static)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise D2VError(f"{path} is not readable JSON ({exc}); rebuild the bundle") from None
    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT or doc.get("version") != RECIPE_VERSION:
        raise D2VError(f"{path} is not a version-{RECIPE_VERSION} d2v-export TensorRT recipe; rebuild the bundle with this d2v-export")
    return doc


def settings_from(recipe: Mapping[str, Any], *, workspace_bytes: int | None = None, timing_cache: Path | None = None) -> trt_engine.BuildSettings:
    return trt_engine.BuildSettings(
        precision=str(recipe["precision"]),
        inputs=tuple(
            trt_engine.InputProfile(str(i["name"]), tuple(i["min"]), tuple(i["opt"]), tuple(i["max"])) for i in recipe["inputs"]
        ),
        strongly_typed=bool(recipe["strongly_typed"]),
        builder_flags=tuple(recipe["builder_flags"]),
        cleared_flags=tuple(recipe["cleared_flags"]),
        workspace_bytes=int(workspace_bytes if workspace_bytes is not None else recipe["workspace_bytes"]),
        timing_cache=timing_cache,
    )


# ------------------------------------------------------------------------------------ Q/DQ guard


def qdq_problems(path: Path) -> list[str]:
    """What TensorRT would refuse in a Q/DQ graph: non-zero or non-int8 zero points, a Q not feeding a DQ."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    producers = {o: n for n in model.graph.node for o in n.output}
    problems = [
        f"graph output '{o.name}' is dequantized int8 (outputs must stay float)"
        for o in model.graph.output
        if o.name in producers and producers[o.name].op_type == "DequantizeLinear"
    ]
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None:
                problems.append(f"{node.name}: zero point is not a constant")
            elif zp.data_type != onnx.TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{node.name}: zero point is not int8 zero (TensorRT quantization is symmetric)")
        data = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type != onnx.TensorProto.INT8:
            problems.append(f"{node.name}: dequantizes {onnx.TensorProto.DataType.Name(data.data_type)}, TensorRT dequantizes int8")
        if node.op_type == "QuantizeLinear" and any(r != "DequantizeLinear" for r in readers.get(node.output[0], [])):
            problems.append(f"{node.name}: QuantizeLinear output feeds something other than DequantizeLinear")
    return problems


def tensorrt_fixups(path: Path) -> dict[str, int]:
    """Make onnxruntime's QDQ graph what TensorRT's explicit quantization expects (in place).

    Two things onnxruntime.quantization does that TensorRT's placement does not want; counts returned:

    - ``float_outputs``: it also quantizes the *output* of a Gemm; when that Gemm is the classifier, the
      model's logits come out rounded to 256 levels. The pair is dropped: the Gemm writes the output.
    - ``float_biases``: it stores Conv biases as int32 with a DequantizeLinear; TensorRT dequantizes
      int8 (and fp8/int4) only and adds biases in float. The bias is dequantized once, exactly, back
      into a float constant.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    counts = {"float_outputs": 0, "float_biases": 0}
    for out in graph.output:
        dq = producers.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or readers.get(q.output[0], 0) != 1:
            continue
        source = q.input[0]
        maker = producers.get(source)
        if maker is not None and readers.get(source, 0) == 1 and source not in outputs:
            maker.output[list(maker.output).index(source)] = out.name  # the producer writes the output itself
            graph.node.remove(q)
            graph.node.remove(dq)
        else:
            graph.node.remove(q)
            dq.CopyFrom(onnx.helper.make_node("Identity", [source], [out.name], name=f"{dq.name}_float"))
        counts["float_outputs"] += 1
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        data = inits.get(dq.input[0])
        if data is None or data.data_type != onnx.TensorProto.INT32:
            continue
        values = numpy_helper.to_array(data).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
        if scale.ndim == 1 and values.ndim > 1:  # per-axis: broadcast along the DQ's axis
            shape = [1] * values.ndim
            shape[_axis(dq, values.ndim)] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        graph.initializer.append(numpy_helper.from_array(((values - zero) * scale).astype(np.float32), dq.output[0]))
        graph.node.remove(dq)
        counts["float_biases"] += 1
    if any(counts.values()):
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name not in used]:
            graph.initializer.remove(init)
        external = path.with_name(path.name + ".data")
        if external.exists():  # a model over 2 GB keeps its weights beside it
            external.unlink()
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external.name)
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
            onnx.save_model(model, str(path))
    return counts


def _axis(node: Any, rank: int) -> int:
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
    return axis % rank


# ------------------------------------------------------------------------------------ backend


class TensorRTBackend:
    name = NAME
    extra = "tensorrt"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    can_defer = True  # with BuildRequest.defer_build the portable half is written without TensorRT or a GPU

    def available(self) -> Availability:
        p = trt_engine.probe()
        if not p.ok:
            return Availability(False, f"{p.reason} — {DEFER_HINT}", version=p.version)
        return Availability(True, version=p.version, devices=(p.device,))

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact:
        precision = request.precision
        if precision not in BUILDS:
            raise D2VError(f"tensorrt builds {', '.join(p.value for p in BUILDS)}, not {precision.value}", ExitCode.TARGET_UNAVAILABLE)
        probe = trt_engine.probe()
        build_here = probe.ok and not request.defer_build
        if not probe.ok and not request.defer_build:  # fail before the (slow) quantization
            raise D2VError(f"tensorrt cannot build an engine here: {probe.reason} — {DEFER_HINT}", ExitCode.TARGET_UNAVAILABLE)
        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = folder / ONNX_FILE
        quant = None
        if precision is Precision.INT8:
            quant = self._quantize(graph, onnx_path, request)
        else:
            _copy_onnx(graph.path, onnx_path)
        return self._bundle(graph, folder, precision, quant, build_here)

    def recover(self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery) -> tuple[Artifact, Drift, tuple[str, ...]]:
        """``--fallback auto``: the Q/DQ graph with the most sensitive nodes left float until the budget holds.

        Candidates are judged as ``compile`` ships them (TensorRT fix-ups applied) on ONNX Runtime, the Q/DQ
        simulation; with TensorRT here the engine is built once, from the chosen graph.
        """
        from ..fallback import copy_model, describe, fallback

        probe = trt_engine.probe()
        if not probe.ok and not request.defer_build:
            raise D2VError(f"tensorrt cannot build an engine here: {probe.reason} — {DEFER_HINT}", ExitCode.TARGET_UNAVAILABLE)
        recipe = _check_recipe(request.quant)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PLAN_FILE).unlink(missing_ok=True)  # an engine of the first build must not answer for the candidates
        onnx_path = folder / ONNX_FILE

        def evaluate(candidate: Path) -> Drift:
            copy_model(candidate, onnx_path)  # the runner reads the bundle's model.onnx
            files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
            return recovery.evaluate(Artifact(self.name, Precision.INT8, folder, onnx_path, files, quantization=recipe))

        result = fallback(graph, recipe, recovery.calibration, evaluate, target=onnx_path, progress=recovery.progress, postprocess=_fix_and_check)
        artifact = self._bundle(graph, folder, Precision.INT8, result.quantized.recipe, probe.ok and not request.defer_build)
        return artifact, result.drift, describe(result)

    def _bundle(self, graph: ExportedGraph, folder: Path, precision: Precision, quant: QuantRecipe | None, build_here: bool) -> Artifact:
        """Recipe, script and (with TensorRT here) the engine, around the bundle's model.onnx."""
        onnx_path = folder / ONNX_FILE
        recipe = make_build_recipe(graph, precision, quant)
        (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
        script = folder / SCRIPT_FILE
        script.write_text(build_script(recipe), encoding="utf-8")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

        if build_here:
            cache = folder / TIMING_CACHE
            manifest = trt_engine.build(onnx_path, folder / PLAN_FILE, settings_from(recipe, timing_cache=cache))
            _write_engine_manifest(folder, manifest, onnx_path)
            model_file = folder / PLAN_FILE
            notes: tuple[str, ...] = (
                (
                    f"engine built with TensorRT {manifest['tensorrt']} on {manifest['gpu']} (compute {manifest['compute_capability']}); "
                    "it runs only on that GPU model and TensorRT version"
                ),
                "latency: end to end, including host/device copies (engine-only GPU time: `d2v-export build-engine`)",
            )
        else:
            model_file = onnx_path
            accuracy = SIMULATED_INT8 if precision is Precision.INT8 else SIMULATED_FLOAT.format(p=precision.value.upper())
            notes = (NOT_BUILT, accuracy, SIMULATED_LATENCY)
        files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
        return Artifact(self.name, precision, folder, model_file, files, quantization=quant, notes=notes)

    def _quantize(self, graph: ExportedGraph, target: Path, request: BuildRequest) -> QuantRecipe:
        from ..quantize import quantize_onnx

        recipe = _check_recipe(request.quant)
        qgraph = quantize_onnx(graph, target, recipe, request.calibration)
        _fix_and_check(target)
        return qgraph.recipe

    def runner(self, artifact: Artifact, *, threads: int) -> Any:
        plan = artifact.path / PLAN_FILE
        label = f"{self.name}-{artifact.precision.value}"
        if plan.is_file() and trt_engine.probe().ok:
            return EngineRunnerAdapter(trt_engine.EngineRunner(plan, name=label))
        what = "Q/DQ graph simulated on ONNX Runtime" if artifact.precision is Precision.INT8 else "engine not built: fp32 graph on ONNX Runtime"
        return OrtRunner(artifact.path / ONNX_FILE, threads, name=f"{label} ({what})")


def _check_recipe(recipe: QuantRecipe | None) -> QuantRecipe:
    if recipe is None:
        raise D2VError("tensorrt int8 needs a quantization recipe; build it with quantize.make_recipe('tensorrt', 'static')", ExitCode.INTERNAL)
    if recipe.mode != "static" or not recipe.symmetric_activations:
        raise D2VError(
            "TensorRT INT8 is explicit quantization: static, symmetric Q/DQ from calibration samples; use --quant static",
            ExitCode.TARGET_UNAVAILABLE,
        )
    return recipe


def _fix_and_check(path: Path) -> None:
    """TensorRT's fix-ups on a freshly quantized graph, then the structural check of what it accepts."""
    tensorrt_fixups(path)
    problems = qdq_problems(path)
    if problems:
        raise D2VError(f"the Q/DQ graph is not what TensorRT accepts: {problems[0]} (and {len(problems) - 1} more)", ExitCode.INTERNAL)


class EngineRunnerAdapter(RunnerBase):
    """trt_engine.EngineRunner behind the backends' Runner protocol."""

    def __init__(self, engine: trt_engine.EngineRunner) -> None:
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


def build_engine(
    bundle_dir: Path,
    *,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: Path | None = None,
    iterations: int = 200,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Build the engine of a deferred bundle on this device, benchmark it and check it; returns model.plan.

    Reads build_recipe.json (and, when present, verifies the bundle's manifest.json first: a bundle is
    copied between machines). Writes model.plan, the timing cache and engine_manifest.json (versions,
    GPU, build settings, GPU latency measured with CUDA events after a warm-up, and the largest
    difference between the engine and ONNX Runtime running the same model.onnx at min/opt/max shapes).
    Raises D2VError(TARGET_UNAVAILABLE) without TensorRT >= 10 or a GPU.
    """
    from .. import bench

    bundle = Path(bundle_dir)
    recipe = read_recipe(bundle)
    has_manifest = (bundle / "manifest.json").is_file()
    if has_manifest:
        from .. import bundle as bundle_mod

        bundle_mod.verify(bundle)
    probe = trt_engine.probe()
    if not probe.ok:
        raise D2VError(f"build-engine runs on the target device: {probe.reason}", ExitCode.TARGET_UNAVAILABLE)
    onnx_path = bundle / str(recipe["onnx"])
    plan = bundle / str(recipe["engine"])
    cache = Path(timing_cache) if timing_cache is not None else bundle / str(recipe.get("timing_cache") or TIMING_CACHE)
    progress(f"building {plan.name} ({recipe['precision']}) with TensorRT {probe.version} on {probe.device}")
    settings = settings_from(recipe, workspace_bytes=int(workspace_gb * (1 << 30)), timing_cache=cache)
    manifest = trt_engine.build(onnx_path, plan, settings)

    specs = [(str(i["name"]), str(i["dtype"])) for i in recipe["inputs"]]
    feeds = {w: trt_engine.synthetic_feed([(n, d, tuple(i[w])) for (n, d), i in zip(specs, recipe["inputs"])], seed=k) for k, w in enumerate(("min", "opt", "max"))}
    progress(f"benchmarking at the opt shapes ({iterations} runs after warm-up, CUDA events)")
    with trt_engine.EngineRunner(plan, name=f"tensorrt-{recipe['precision']}") as engine:
        times = engine.gpu_times_ms(feeds["opt"], warmup=max(10, iterations // 10), iterations=iterations)
        engine_out = {w: engine.infer(f) for w, f in feeds.items()}
    opt_shape = {i["name"]: list(i["opt"]) for i in recipe["inputs"]}
    batch = int(recipe["inputs"][0]["opt"][0])
    stats = bench.stats(times, batch=batch, shape={})
    manifest["benchmark"] = {
        "what": "engine only (execute_async_v3), CUDA events, after warm-up; host copies excluded",
        "input_shapes": opt_shape,
        "p50_ms": stats.p50, "p90_ms": stats.p90, "p99_ms": stats.p99, "mean_ms": stats.mean, "n": stats.n,
        "throughput_items_per_s": stats.throughput,
    }  # fmt: skip
    progress("checking the engine against ONNX Runtime on the same model.onnx")
    manifest["check_vs_onnxruntime"] = _compare_with_ort(onnx_path, feeds, engine_out)
    _write_engine_manifest(bundle, manifest, onnx_path)
    if has_manifest:
        _relist(bundle)
    return plan


def _compare_with_ort(onnx_path: Path, feeds: Mapping[str, Mapping[str, np.ndarray]], engine_out: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Largest |engine - ONNX Runtime| per shape point, absolute and scaled by max(1, max |ORT|)."""
    result: dict[str, Any] = {}
    with OrtRunner(onnx_path, threads=0, name="onnxruntime") as ort_runner:
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
                worst_scaled = max(worst_scaled, err / max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0))
            result[which] = {"max_abs_error": worst_abs, "max_scaled_error": worst_scaled}
    return result


def _write_engine_manifest(folder: Path, manifest: Mapping[str, Any], onnx_path: Path) -> None:
    doc = dict(manifest) | {"onnx": onnx_path.name, "onnx_sha256": _sha256(onnx_path), "engine": PLAN_FILE}
    (folder / ENGINE_MANIFEST).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def _relist(folder: Path) -> None:
    """Add the files build-engine wrote to the bundle's manifest.json, so that the bundle still verifies."""
    path = folder / "manifest.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    entries = {e["path"]: e for e in doc.get("files", []) if isinstance(e, dict) and "path" in e}
    for name in (PLAN_FILE, ENGINE_MANIFEST, TIMING_CACHE):
        p = folder / name
        if p.is_file():
            entries[name] = {"path": name, "size": p.stat().st_size, "sha256": _sha256(p)}
    doc["files"] = sorted(entries.values(), key=lambda e: str(e["path"]))
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


BACKEND: Any = TensorRTBackend()
