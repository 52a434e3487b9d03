"""The TensorRT INT8 graph: TensorRT's Q/DQ placement rules, the fix-ups of onnxruntime's QDQ output, the
fp16 remainder, and the check of what TensorRT's explicit quantization accepts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ...spec import D2VError, ExitCode, ExportedGraph, QuantRecipe
from .recipe import FP32_OPS, input_profiles

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


# Inputs the ONNX schema types on their own (must not follow the data to fp16): Resize's roi and scales.
_TYPED_INPUTS = {"Resize": (1, 2)}


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
    from onnx import TensorProto

    HALF = TensorProto.FLOAT16
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
    fp32_copies = _half_constants(graph, fp32_ops, fixed, counts)
    nodes = _rewire(graph, fp32_ops, types, fp32_copies, counts)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return counts


def _half_constants(graph: Any, fp32_ops: tuple[str, ...], fixed: set[str], counts: dict[str, int]) -> dict[str, str]:
    """Float initializers, Casts to float and float Constants become fp16; the initializers that ``fp32_ops``
    read keep an fp32 copy (returned: name -> copy's name)."""
    from onnx import TensorProto, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
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
    return fp32_copies


def _rewire(graph: Any, fp32_ops: tuple[str, ...], types: dict[str, int], fp32_copies: dict[str, str], counts: dict[str, int]) -> list[Any]:
    """The new node list: float inputs cast to fp16 once, ``fp32_ops`` between casts, float outputs cast back."""
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
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
    return nodes


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
