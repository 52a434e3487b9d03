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
  weights, Q/DQ only on the inputs of MatMul/Gemm/Conv) whose float remainder is rewritten to fp16
  (``fp16_remainder``: fp32 graph inputs/outputs with casts at the boundaries, fp16 Q/DQ scales,
  LayerNormalization and Softmax computed in fp32), built **strongly typed** (``--stronglyTyped``, no
  precision flags; TensorRT >= 10.12): int8 where the Q/DQ pairs are, fp16 elsewhere, fp32 exactly
  where the graph says. Its accuracy is simulated on ONNX Runtime with graph optimisations off, so the
  Q/DQ pairs stay float fake-quantization (``SimulationRunner``), never ORT's integer kernels.

Without TensorRT or a GPU: ``compile`` raises D2VError(TARGET_UNAVAILABLE) naming ``--defer-build``;
with ``BuildRequest.defer_build`` it writes the portable half only, and ``runner`` runs ``model.onnx`` on
ONNX Runtime, named and noted as a simulation (never engine accuracy or latency).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import trt_device, trt_engine
from ..heads import concrete_shape
from ..spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision, QuantRecipe
from .base import Availability, BuildRequest, Recovery, RunnerBase
from .onnxruntime import OrtRunner, _copy_onnx

NAME = "tensorrt"
ONNX_FILE = "model.onnx"
PLAN_FILE = trt_device.PLAN_FILE
RECIPE_FILE = trt_device.RECIPE_FILE
SCRIPT_FILE = "build_engine.sh"
DEVICE_SCRIPT = trt_device.DEVICE_SCRIPT
ENGINE_MANIFEST = trt_device.ENGINE_MANIFEST
TIMING_CACHE = trt_device.TIMING_CACHE
RECIPE_FORMAT = trt_device.RECIPE_FORMAT
RECIPE_VERSION = trt_device.RECIPE_VERSION
DEFAULT_WORKSPACE_GB = 4.0

DEFER_HINT = "use --defer-build to write the portable half here"
NOT_BUILT = "engine not built here: run `d2v-export build-engine <bundle>` (or build_engine.sh) on the target device"
SIMULATED_INT8 = (
    "accuracy: Q/DQ graph with its fp16 remainder, simulated on ONNX Runtime with graph optimisations off "
    "(Q/DQ kept as float fake-quantization, fp16 tensors rounded as in the graph) — not engine accuracy"
)
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
    # TF32 is cleared in the Python build (harmless: no GEMM of this graph stays fp32); trtexec keeps its
    # default, so an fp32 GEMM left by hand in the graph may run in TF32 there.
    Precision.INT8: Build(
        True, (), ("TF32",), ("--stronglyTyped",),
        "explicit Q/DQ graph with an fp16 remainder (fp32 I/O, LayerNorm/Softmax in fp32), strongly typed: "
        "int8 where the Q/DQ pairs are, fp16 elsewhere (TensorRT docs: no precision flags with Q/DQ)",
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
        "tensorrt": {
            # strongly typed INT8 Q/DQ is complete from 10.12; weak typing (the FP16 flag) is gone in 11
            "min_version": "{}.{}".format(*(trt_engine.INT8_MIN_VERSION if precision is Precision.INT8 else trt_engine.MIN_VERSION)),
            "max_version_exclusive": "11" if build.builder_flags else None,
        },
        "device_script": DEVICE_SCRIPT,
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
        "float_remainder": FP16_REMAINDER_NOTE if precision is Precision.INT8 else None,
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
# The same build from Python: python3 {DEVICE_SCRIPT} build  (TensorRT + cuda-python + numpy, Python 3.10+),
# or d2v-export build-engine <this folder>; both also write {ENGINE_MANIFEST}.
# Precision {recipe['precision']}: {recipe['why']}.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
"$TRTEXEC" \\
    {args} \\
    "$@"
"""


read_recipe = trt_device.read_recipe
settings_from = trt_device.settings_from


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


# Ops computed in fp32 inside the fp16 remainder (casts around them). LayerNormalization: its mean/variance
# over hundreds of channels is where fp16 loses most (TensorRT's INormalizationLayer also prefers fp32
# accumulation); Softmax: exp() of the attention scores. Measured on ONNX Runtime's simulation
# (docs/tensorrt.md): a few casts, no drift cost, and the rest of the network still fp16.
FP32_OPS = ("LayerNormalization", "Softmax")
# Inputs the ONNX schema types on their own (must not follow the data to fp16): Resize's roi and scales.
_TYPED_INPUTS = {"Resize": (1, 2)}
FP16_REMAINDER_NOTE = (
    "int8 at the Q/DQ pairs; everything else fp16 (weights, activations, Q/DQ scales), graph inputs and outputs "
    f"fp32 with casts at the boundaries, {' and '.join(FP32_OPS)} computed in fp32"
)


def fp16_remainder(path: Path, fp32_ops: tuple[str, ...] = FP32_OPS) -> dict[str, int]:
    """Rewrite a Q/DQ graph (in place) so that its float remainder is fp16, for a strongly typed build.

    A strongly typed TensorRT build runs every tensor in the type the graph gives it: an fp32 Q/DQ graph
    would run everything outside the int8 GEMMs in fp32. Here: float initializers (weights, biases, Q/DQ
    scales) become fp16, ``Cast(to=float)`` and float ``Constant``s inside the graph become fp16, float graph
    inputs are cast to fp16 once, graph outputs are cast back to fp32, and ``fp32_ops`` run in fp32 between
    casts. Q/DQ with fp16 scales needs opset 19, to which the graph is raised (18 -> 19 changes no op used
    here). Returns counts; idempotent (a graph already rewritten is left alone).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    model = onnx.load(str(path))
    graph = model.graph
    if any(n.name.endswith("_d2v_to_fp16") for n in graph.node) or any(i.data_type == HALF for i in graph.initializer):
        return {"initializers": 0, "casts": 0, "fp32_nodes": 0}
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 19:
            op.version = 19
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types |= {i.name: i.data_type for i in graph.initializer}
    fixed = {n.input[i] for n in graph.node for i in _TYPED_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]}
    counts = {"initializers": 0, "casts": 0, "fp32_nodes": 0}
    fp32_copies: dict[str, str] = {}
    for init in list(graph.initializer):
        if init.data_type != FLOAT or init.name in fixed:
            continue
        values = numpy_helper.to_array(init)
        if any(n.op_type in fp32_ops and init.name in n.input for n in graph.node):  # e.g. LayerNorm gamma/beta: keep fp32 copies
            fp32_copies[init.name] = f"{init.name}_fp32"
            graph.initializer.append(numpy_helper.from_array(values, fp32_copies[init.name]))
        init.CopyFrom(numpy_helper.from_array(_to_half(values), init.name))
        counts["initializers"] += 1
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
            elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
                if not any(o in fixed for o in node.output):
                    attr.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attr.t)), attr.t.name))
    nodes: list[Any] = []
    renamed: dict[str, str] = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == FLOAT:
            renamed[inp.name] = f"{inp.name}_fp16"
            nodes.append(helper.make_node("Cast", [inp.name], [renamed[inp.name]], to=HALF, name=f"{inp.name}_d2v_to_fp16"))
            counts["casts"] += 1
    float_outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == FLOAT}
    done_outputs: set[str] = set()
    for node in list(graph.node):
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        keep = node.op_type in fp32_ops
        if keep:
            counts["fp32_nodes"] += 1
            for i, name in enumerate(node.input):
                if name in fp32_copies:
                    node.input[i] = fp32_copies[name]
                elif name and types.get(name) == FLOAT or name in renamed.values():
                    cast = f"{node.name}_in{i}_fp32"
                    nodes.append(helper.make_node("Cast", [name], [cast], to=FLOAT, name=cast))
                    node.input[i] = cast
                    counts["casts"] += 1
        nodes.append(node)
        if keep:
            for i, name in enumerate(node.output):
                if not name or types.get(name) != FLOAT:
                    continue
                node.output[i] = f"{name}_fp32"
                if name in float_outputs:
                    nodes.append(helper.make_node("Identity", [node.output[i]], [name], name=f"{node.name}_out{i}"))
                    done_outputs.add(name)
                else:
                    nodes.append(helper.make_node("Cast", [node.output[i]], [name], to=HALF, name=f"{node.name}_out{i}_fp16"))
                    counts["casts"] += 1
    for out in graph.output:
        if out.name not in float_outputs or out.name in done_outputs:
            continue
        half = f"{out.name}_fp16"
        for node in nodes:
            for i, name in enumerate(node.output):
                if name == out.name:
                    node.output[i] = half
            for i, name in enumerate(node.input):
                if name == out.name:
                    node.input[i] = half
        nodes.append(helper.make_node("Cast", [half], [out.name], to=FLOAT, name=f"{out.name}_d2v_to_fp32"))
        counts["casts"] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return counts


# NVIDIA's int8 Tensor Core GEMMs need K and N of at least 16 (TensorRT Model Optimizer's rule).
MIN_GEMM_DIM = 16


def gemv_nodes(graph: ExportedGraph) -> tuple[str, ...]:
    """MatMul/Gemm nodes that are GEMV-shaped at the opt shapes (an output row or column of 1, e.g. a
    classifier on the pooled vector at batch 1) or have K or N below 16: no Q/DQ for them.

    The rule is TensorRT Model Optimizer's (measured there: Q/DQ on such GEMMs makes TensorRT slower, as they
    cannot use int8 Tensor Cores); adopted after comparing placements (docs/tensorrt.md). They run in the
    fp16 remainder instead. Shapes come from ONNX shape inference with the inputs fixed to the opt shapes."""
    import onnx

    model = onnx.load(str(graph.path), load_external_data=False)
    opt = {p.name: p.opt for p in input_profiles(graph)}
    for inp in model.graph.input:
        if inp.name in opt:
            for dim, size in zip(inp.type.tensor_type.shape.dim, opt[inp.name]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 -- shape inference is best effort here; without shapes only the weight rule applies
        inferred = model
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.graph.value_info, *inferred.graph.output)
    }
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        small = False
        if w is not None and len(w) == 2:
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            k, n = (w[1], w[0]) if trans_b else (w[0], w[1])
            small = k < MIN_GEMM_DIM or n < MIN_GEMM_DIM
        y = shapes.get(node.output[0], [])
        gemv = len(y) >= 2 and (y[-1] == 1 or y[-2] == 1)
        if small or gemv:
            found.append(node.name)
    return tuple(found)


def _with_placement_rules(graph: ExportedGraph, recipe: QuantRecipe) -> QuantRecipe:
    """The TensorRT recipe plus the GEMV / small-GEMM nodes left unquantized."""
    extra = [n for n in gemv_nodes(graph) if n not in recipe.excluded_nodes]
    return dataclasses.replace(recipe, excluded_nodes=(*recipe.excluded_nodes, *extra)) if extra else recipe


def _to_half(values: np.ndarray) -> np.ndarray:
    """fp32 -> fp16, saturating at +-65504: an attention mask's "minus infinity" (float32 min) must stay finite,
    or ``mask * min`` gives 0 * inf = NaN."""
    half_max = float(np.finfo(np.float16).max)
    return np.clip(values, -half_max, half_max).astype(np.float16)


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
        device = trt_engine.device_index(request.device)
        probe = trt_engine.probe(device)
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
        return self._bundle(graph, folder, precision, quant, build_here, device)

    def recover(self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery) -> tuple[Artifact, Drift, tuple[str, ...]]:
        """``--fallback auto``: the Q/DQ graph with the most sensitive nodes left float until the budget holds.

        Candidates are judged as ``compile`` ships them (TensorRT fix-ups and fp16 remainder applied) on the
        ONNX Runtime simulation (an engine build per candidate would take minutes). With TensorRT here the
        engine is then built once from the chosen graph and the returned drift is judged *on that engine*,
        the same footing as the plain INT8 variant, whose drift the pipeline measured on its engine.
        """
        from ..fallback import copy_model, describe, fallback

        device = trt_engine.device_index(request.device)
        probe = trt_engine.probe(device)
        if not probe.ok and not request.defer_build:
            raise D2VError(f"tensorrt cannot build an engine here: {probe.reason} — {DEFER_HINT}", ExitCode.TARGET_UNAVAILABLE)
        recipe = _with_placement_rules(graph, _check_recipe(request.quant))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PLAN_FILE).unlink(missing_ok=True)  # an engine of the first build must not answer for the candidates
        onnx_path = folder / ONNX_FILE

        def evaluate(candidate: Path) -> Drift:
            copy_model(candidate, onnx_path)  # the runner reads the bundle's model.onnx
            _fp16_and_check(onnx_path)  # judged as shipped; the candidate itself stays fp32 for the node ranking
            files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
            return recovery.evaluate(Artifact(self.name, Precision.INT8, folder, onnx_path, files, quantization=recipe))

        result = fallback(graph, recipe, recovery.calibration, evaluate, target=onnx_path, progress=recovery.progress, postprocess=_fixups)
        _fp16_and_check(onnx_path)  # the chosen candidate, copied to the bundle by fallback(), gets its fp16 remainder
        build_here = probe.ok and not request.defer_build
        artifact = self._bundle(graph, folder, Precision.INT8, result.quantized.recipe, build_here, device)
        drift = result.drift
        if build_here:
            recovery.progress(f"{folder.name}: judging the engine built from the chosen graph")
            drift = recovery.evaluate(artifact)  # the runner is the engine now
        return artifact, drift, describe(result)

    def _bundle(self, graph: ExportedGraph, folder: Path, precision: Precision, quant: QuantRecipe | None, build_here: bool, device: int = 0) -> Artifact:
        """Recipe, script, device module and (with TensorRT here) the engine, around the bundle's model.onnx."""
        onnx_path = folder / ONNX_FILE
        recipe = make_build_recipe(graph, precision, quant)
        trt_engine.atomic_write_json(folder / RECIPE_FILE, recipe)
        script = folder / SCRIPT_FILE
        trt_engine.atomic_write(script, build_script(recipe).encode("utf-8"))
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        shutil.copyfile(Path(trt_device.__file__), folder / DEVICE_SCRIPT)

        if build_here:
            cache = folder / TIMING_CACHE
            manifest = trt_engine.build(onnx_path, folder / PLAN_FILE, settings_from(recipe, timing_cache=cache, device=device))
            trt_device.write_engine_manifest(folder, manifest, onnx_path)
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

        recipe = _with_placement_rules(graph, _check_recipe(request.quant))
        qgraph = quantize_onnx(graph, target, recipe, request.calibration)
        _fix_and_check(target)
        return qgraph.recipe

    def runner(self, artifact: Artifact, *, threads: int) -> Any:
        plan = artifact.path / PLAN_FILE
        label = f"{self.name}-{artifact.precision.value}"
        device = _engine_device(artifact.path)
        if plan.is_file() and trt_engine.probe(device).ok:
            return EngineRunnerAdapter(trt_engine.EngineRunner(plan, name=label, device=device))
        if artifact.precision is Precision.INT8:
            return SimulationRunner(artifact.path / ONNX_FILE, threads, name=f"{label} (Q/DQ graph, fp16 remainder, simulated on ONNX Runtime)")
        return OrtRunner(artifact.path / ONNX_FILE, threads, name=f"{label} (engine not built: fp32 graph on ONNX Runtime)")


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
    """TensorRT's fix-ups on a freshly quantized graph, its fp16 remainder, then the check of what TensorRT accepts."""
    _fixups(path)
    _fp16_and_check(path)


def _fixups(path: Path) -> None:
    """The fix-ups alone (the fallback's candidates: its node ranking compares them with the fp32 graph)."""
    tensorrt_fixups(path)
    _check(path)


def _fp16_and_check(path: Path) -> None:
    fp16_remainder(path)  # idempotent
    _check(path)


def _check(path: Path) -> None:
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
        from .. import bundle as bundle_mod

        bundle_mod.verify(bundle)
    try:
        plan, _manifest = trt_device.build_bundle(
            bundle,
            verify=False,  # checked above, with the package's full rules
            workspace_bytes=int(workspace_gb * (1 << 30)),
            timing_cache=Path(timing_cache) if timing_cache is not None else None,
            iterations=iterations,
            device=trt_engine.device_index(device),
            check=_compare_with_ort,
            progress=progress,
        )
    except D2VError as exc:
        if exc.code == ExitCode.TARGET_UNAVAILABLE:
            raise D2VError(f"build-engine runs on the target device: {exc}", exc.code) from None
        raise
    return plan


def _compare_with_ort(onnx_path: Path, feeds: Mapping[str, Mapping[str, np.ndarray]], engine_out: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
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
                worst_scaled = max(worst_scaled, err / max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0))
            result[which] = {"max_abs_error": worst_abs, "max_scaled_error": worst_scaled}
    return result


BACKEND: Any = TensorRTBackend()
