"""The TensorRT INT8 graph: TensorRT's Q/DQ placement rules, the fix-ups of onnxruntime's QDQ output, the
fp16 remainder, and the check of what TensorRT's explicit quantization accepts."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...int8.quantize import MATMUL_OPS
from ...spec import D2VError, ExitCode, ExportedGraph, QuantRecipe
from .recipe import FP32_OPS, input_profiles


def qdq_problems(path: Path) -> list[str]:
    """What TensorRT would refuse in a Q/DQ graph: non-zero or non-int8 zero points, a Q not feeding a DQ, a scale
    that is not a positive constant (or, in fp16, not a normal number: ``MIN_HALF_SCALE``)."""
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
        problems += _scale_problems(node, inits.get(node.input[1]))
        data = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type != onnx.TensorProto.INT8:
            problems.append(
                f"{node.name}: dequantizes {onnx.TensorProto.DataType.Name(data.data_type)}, TensorRT dequantizes int8"
            )
        if node.op_type == "QuantizeLinear" and any(r != "DequantizeLinear" for r in readers.get(node.output[0], [])):
            problems.append(f"{node.name}: QuantizeLinear output feeds something other than DequantizeLinear")
    return problems


def _scale_problems(node: Any, scale: Any) -> list[str]:
    """A Q/DQ scale TensorRT's parser refuses: not a constant, not finite and > 0, or an fp16 scale below 2^-14."""
    import onnx
    from onnx import numpy_helper

    if scale is None:
        return [f"{node.name}: scale is not a constant"]
    values = numpy_helper.to_array(scale).astype(np.float64)
    if not np.all(np.isfinite(values)) or not np.all(values > 0):
        return [f"{node.name}: scale is not positive and finite (TensorRT requires every scale > 0)"]
    if scale.data_type == onnx.TensorProto.FLOAT16 and np.any(values < MIN_HALF_SCALE):
        return [f"{node.name}: fp16 scale below 2^-14 (subnormal; clamp_half_scales raises it)"]
    return []


def tensorrt_fixups(path: Path) -> dict[str, int]:
    """Make onnxruntime's QDQ graph what TensorRT's explicit quantization expects (in place).

    Three things the exported graph and onnxruntime.quantization do that TensorRT does not want; counts returned:

    - ``float_outputs``: it also quantizes the *output* of a Gemm; when that Gemm is the classifier, the
      model's logits come out rounded to 256 levels. The pair is dropped: the Gemm writes the output.
    - ``float_biases``: it stores Conv biases as int32 with a DequantizeLinear; TensorRT dequantizes
      int8 (and fp8/int4) only and adds biases in float. The bias is dequantized once, exactly, back
      into a float constant.
    - ``attention_scale``: the exported attention scales the scores after the first batched MatMul; TensorRT's
      fused attention wants the scale on Q before it (``move_attention_scale``).
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
    counts = {"float_outputs": 0, "float_biases": 0, "attention_scale": 0}
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
        zero = (
            numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
        )
        if scale.ndim == 1 and values.ndim > 1:  # per-axis: broadcast along the DQ's axis
            shape = [1] * values.ndim
            shape[_axis(dq, values.ndim)] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        graph.initializer.append(numpy_helper.from_array(((values - zero) * scale).astype(np.float32), dq.output[0]))
        graph.node.remove(dq)
        counts["float_biases"] += 1
    counts["attention_scale"] = move_attention_scale(model)
    if any(counts.values()):
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name not in used]:
            graph.initializer.remove(init)
        external = path.with_name(path.name + ".data")
        if external.exists():  # a model over 2 GB keeps its weights beside it
            external.unlink()
            onnx.save_model(
                model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external.name
            )
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
            onnx.save_model(model, str(path))
    return counts


# Inputs the ONNX schema types on their own (must not follow the data to fp16): Resize's roi and scales.
_TYPED_INPUTS = {"Resize": (1, 2)}


# Ops the INT8 graph's fp16 remainder computes between fp32 casts, decided on a simulation with TensorRT's semantics
# (docs/tensorrt.md, "INT8 graph for TensorRT's fusions"). Softmax reads and writes fp16 (no Cast between it and its
# QuantizeLinear): ONNX Runtime and TensorRT compute it in fp32 inside, bit for bit the fp32 island's result.
# LayerNormalization stays an fp32 island: with fp16 I/O TensorRT also computes it in fp32 (the parser sets the
# layer's compute precision from stash_type=1), but its gamma/beta must then be fp16 too, and that cost the trained
# text example 5 of 240 answers' agreement (top-1 0.992 -> 0.971, under the 0.98 budget).
INT8_FP32_OPS: tuple[str, ...] = ("LayerNormalization",)


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
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    types |= {i.name: i.data_type for i in graph.initializer}
    fixed = {
        n.input[i] for n in graph.node for i in _TYPED_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]
    }
    counts = {"initializers": 0, "casts": 0, "fp32_nodes": 0}
    clamped = clamp_half_scales(graph)
    if clamped:
        counts["clamped_scales"] = clamped
    fp32_copies = _half_constants(graph, fp32_ops, fixed, counts)
    nodes = _rewire(graph, fp32_ops, types, fp32_copies, counts)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return counts


# The smallest normal fp16 number: a Q/DQ scale below it becomes subnormal in an fp16 graph, and below ~6e-8 zero,
# which TensorRT's ONNX parser refuses ("Scale coefficients must all be positive", onnx-tensorrt's Q/DQ importer).
MIN_HALF_SCALE = 2.0**-14


def clamp_half_scales(graph: Any) -> int:
    """Raise every Q/DQ scale below ``MIN_HALF_SCALE`` to it, before the graph goes fp16 (in place; returns how many
    scale values changed). An int8 weight behind such a scale is re-rounded to the coarser step (its channel's largest
    value is below 127 * 2^-14 = 0.0078 in magnitude); an activation pair keeps its int8 grid, coarser. Either way
    the values it represents move by less than 2^-15."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    changed = 0
    done: set[str] = set()
    for node in graph.node:
        if (
            node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or node.input[1] not in inits
            or node.input[1] in done
        ):
            continue
        done.add(node.input[1])
        scale = inits[node.input[1]]
        if scale.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(scale)
        low = values < MIN_HALF_SCALE
        if not np.any(low):
            continue
        new = np.where(low, np.float32(MIN_HALF_SCALE), values).astype(np.float32)
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is not None and weight.data_type == TensorProto.INT8:
            ratio = values / new
            if ratio.ndim == 1 and len(weight.dims) > 1:
                shape = [1] * len(weight.dims)
                shape[_axis(node, len(weight.dims))] = -1
                ratio = ratio.reshape(shape)
            ints = np.clip(np.round(numpy_helper.to_array(weight).astype(np.float32) * ratio), -127, 127).astype(
                np.int8
            )
            weight.CopyFrom(numpy_helper.from_array(ints, weight.name))
        scale.CopyFrom(numpy_helper.from_array(new, scale.name))
        changed += int(np.count_nonzero(low))
    return changed


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
        if any(
            n.op_type in fp32_ops and init.name in n.input for n in graph.node
        ):  # e.g. LayerNorm gamma/beta: keep fp32 copies
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


def _rewire(
    graph: Any, fp32_ops: tuple[str, ...], types: dict[str, int], fp32_copies: dict[str, str], counts: dict[str, int]
) -> list[Any]:
    """The new node list: float inputs cast to fp16 once, ``fp32_ops`` between casts, float outputs cast back."""
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    nodes: list[Any] = []
    renamed: dict[str, str] = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == FLOAT:
            renamed[inp.name] = f"{inp.name}_fp16"
            nodes.append(
                helper.make_node("Cast", [inp.name], [renamed[inp.name]], to=HALF, name=f"{inp.name}_d2v_to_fp16")
            )
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
                    nodes.append(
                        helper.make_node("Cast", [node.output[i]], [name], to=HALF, name=f"{node.name}_out{i}_fp16")
                    )
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


# ------------------------------------------------------------------------------------ attention

# Ops that may sit between the first batched MatMul and its Softmax (scale, mask, bias) or between the Softmax and
# the second MatMul (the fp16 remainder's casts, Q/DQ): the attention pattern is found through them.
_SCORE_OPS = ("Add", "Mul", "Div", "Where", "Cast", "Reshape")
_PROB_OPS = ("Cast", "Reshape", "QuantizeLinear", "DequantizeLinear")
# Model Optimizer's INT8 rule (modelopt/onnx/quantization/graph_utils.py, find_nodes_from_mha_to_exclude): past this
# many tokens the attention MatMuls get no Q/DQ (TensorRT's fused int8 attention does not take longer sequences,
# and unfused int8 MatMuls write the whole S x S score matrix).
MAX_INT8_ATTENTION = 512


def attention_blocks(model: Any) -> list[tuple[Any, Any, Any]]:
    """(first MatMul, Softmax, second MatMul) of every attention in ``model``: a MatMul of two activations reaching
    a Softmax through ``_SCORE_OPS`` only, whose output reaches a MatMul's first input through ``_PROB_OPS`` only."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {i.name for i in graph.initializer}

    def constant(name: str) -> bool:
        node = producers.get(name)
        return name in inits or (
            node is not None
            and (node.op_type == "Constant" or (node.op_type == "DequantizeLinear" and node.input[0] in inits))
        )

    def bmm1(name: str, depth: int = 0) -> Any:
        node = producers.get(name)
        if node is None or depth > 6:
            return None
        if node.op_type == "MatMul":
            return node if not any(constant(i) for i in node.input) else None
        if node.op_type not in _SCORE_OPS:
            return None
        return next(
            (m for m in (bmm1(i, depth + 1) for i in node.input if i and not constant(i)) if m is not None), None
        )

    def bmm2(name: str, depth: int = 0) -> Any:
        for node in readers.get(name, []):
            if node.op_type == "MatMul" and node.input[0] == name:
                return node
            if node.op_type in _PROB_OPS and depth < 4:
                found = bmm2(node.output[0], depth + 1)
                if found is not None:
                    return found
        return None

    blocks = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        first, second = bmm1(softmax.input[0]), bmm2(softmax.output[0])
        if first is not None and second is not None:
            blocks.append((first, softmax, second))
    return blocks


def _scalar(graph: Any, name: str) -> float | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            return float(value.reshape(())) if value.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
            return float(value.reshape(())) if value.size == 1 else None
    return None


def scale_after_first_matmul(model: Any) -> list[tuple[Any, Any, float]]:
    """(first MatMul, the Mul/Div reading only its output, factor) for each attention that scales its scores after the
    first batched MatMul — what TensorRT's fused attention does not take."""
    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for first, _, _ in attention_blocks(model):
        users = readers.get(first.output[0], [])
        if len(users) != 1 or users[0].op_type not in ("Mul", "Div"):
            continue
        node = users[0]
        other = node.input[1] if node.input[0] == first.output[0] else node.input[0]
        value = _scalar(graph, other)
        if value is None or (node.op_type == "Div" and node.input[1] != other) or value == 0:
            continue
        found.append((first, node, value if node.op_type == "Mul" else 1.0 / value))
    return found


def move_attention_scale(model: Any) -> int:
    """Put each attention's score scale on Q, before the first batched MatMul (in place; returns how many moved).

    TensorRT's fused attention requires "Q or K to be multiplied with attention scale ... before going into the first
    Batched Matrix Multiply" (TensorRT developer guide, *Fused Attention*); the export scales the scores after it.
    ``(q @ k) * s`` becomes ``(q * s) @ k``, the same up to float rounding. Where Q is quantized (``Q -> DQ ->
    MatMul``), the Mul goes before the QuantizeLinear and the pair's scale is multiplied by ``s`` too: the same int8
    values, dequantized to ``s`` times the old ones."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    moved = 0
    for first, scale_node, factor in scale_after_first_matmul(model):
        s = numpy_helper.from_array(np.array(factor, dtype=np.float32), f"{first.name}_d2v_qscale")
        graph.initializer.append(s)
        dq = producers.get(first.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        readers = [n for n in graph.node if q is not None and q.output[0] in n.input] + [
            n for n in graph.node if dq is not None and dq.output[0] in n.input
        ]
        if (
            q is not None
            and dq is not None
            and q.op_type == "QuantizeLinear"
            and q.input[1] in inits
            and readers == [dq, first]
        ):
            pair_scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32) * np.float32(factor)
            graph.initializer.append(numpy_helper.from_array(pair_scale, f"{q.name}_d2v_scale"))
            q.input[1] = dq.input[1] = f"{q.name}_d2v_scale"
            target, index = q, 0
        else:
            target, index = first, 0
        scaled = f"{target.input[index]}_d2v_scaled"
        graph.node.insert(
            list(graph.node).index(target),
            helper.make_node("Mul", [target.input[index], s.name], [scaled], name=scaled),
        )
        target.input[index] = scaled
        for node in graph.node:  # readers of the scaled scores read the MatMul's output now
            for i, name in enumerate(node.input):
                if name == scale_node.output[0]:
                    node.input[i] = first.output[0]
        for out in graph.output:
            if out.name == scale_node.output[0]:
                out.name = first.output[0]
        graph.node.remove(scale_node)
        moved += 1
    return moved


# ------------------------------------------------------------------------------------ residual Adds

# The op type a TensorRT recipe lists among its ``op_types`` to ask for residual-Add Q/DQ (``residual_qdq``), as Model
# Optimizer lists "Add" among its quantized op types and places Q/DQ only on the residual ones; onnxruntime's quantizer
# never sees it (``split_residual``).
RESIDUAL_OP = "Add"
# Ops between a GEMM and the residual Add it feeds (bias Add, layer-scale Mul, head reshapes); each may have one
# activation input only.
_BRANCH_OPS = ("Add", "Mul", "Reshape", "Transpose")


def residual_adds(model: Any) -> list[Any]:
    """The residual Adds: two activations summed, the sum read by a LayerNormalization, one of the two coming from a
    MatMul/Gemm/Conv through ``_BRANCH_OPS`` only (within three ops). The text embedding sum (no GEMM behind it) and
    bias Adds (a constant input) are not."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)

    def activation(name: str) -> bool:
        node = producers.get(name)
        return (
            bool(name)
            and name not in inits
            and not (node is not None and node.op_type == "Constant")
            and not (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits)
        )

    def from_gemm(name: str, depth: int = 0) -> bool:
        node = producers.get(name)
        if node is None or depth > 3:
            return False
        if node.op_type in MATMUL_OPS:
            return True
        moving = [i for i in node.input if activation(i)]
        return node.op_type in _BRANCH_OPS and len(moving) == 1 and from_gemm(moving[0], depth + 1)

    return [
        n
        for n in graph.node
        if n.op_type == "Add"
        and len(n.input) == 2
        and all(activation(i) for i in n.input)
        and "LayerNormalization" in readers.get(n.output[0], [])
        and any(from_gemm(i) for i in n.input)
    ]


def split_residual(recipe: QuantRecipe) -> tuple[QuantRecipe, bool]:
    """(the recipe onnxruntime's quantizer gets, whether residual-Add Q/DQ was asked for): ``RESIDUAL_OP`` in
    ``op_types`` means residual Adds only, which ``residual_qdq`` places after quantization."""
    if RESIDUAL_OP not in recipe.op_types:
        return recipe, False
    return dataclasses.replace(recipe, op_types=tuple(o for o in recipe.op_types if o != RESIDUAL_OP)), True


def residual_qdq(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    """Q/DQ on both inputs of every residual Add of the fp32 Q/DQ graph at ``path`` (in place; returns how many inputs).

    NVIDIA's Q/DQ placement recommendations and Model Optimizer quantize the residual Add's inputs, so that TensorRT can
    fuse it with the layers around it. An input that is already quantized (a LayerNorm output that Q, K and V read)
    reuses that pair: one int8 tensor, one scale. The others get a symmetric per-tensor pair whose scale is the
    largest magnitude the tensor reached on ``feeds`` (max calibration, run on this graph in ONNX Runtime) / 127."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    adds = residual_adds(model)
    if not adds:
        return 0
    quantized = {
        q.input[0]: dq.output[0]
        for q in graph.node
        if q.op_type == "QuantizeLinear"
        for dq in graph.node
        if dq.op_type == "DequantizeLinear" and dq.input[0] == q.output[0]
    }
    wanted = [i for n in adds for i in n.input if i not in quantized]
    amax = _amax(model, path, list(dict.fromkeys(wanted)), feeds)
    zero = numpy_helper.from_array(np.zeros((), dtype=np.int8), "d2v_residual_zero_point")
    graph.initializer.append(zero)
    count = 0
    for add in adds:
        for i, name in enumerate(add.input):
            if name not in quantized:
                if not amax.get(name, 0.0) > 0:
                    continue  # never non-zero on the samples: no scale to give it
                scale = numpy_helper.from_array(
                    np.array(amax[name] / 127.0, dtype=np.float32), f"{name}_d2v_residual_scale"
                )
                graph.initializer.append(scale)
                q = helper.make_node(
                    "QuantizeLinear",
                    [name, scale.name, zero.name],
                    [f"{name}_d2v_residual_q"],
                    name=f"{name}_d2v_residual_q",
                )
                dq = helper.make_node(
                    "DequantizeLinear",
                    [q.output[0], scale.name, zero.name],
                    [f"{name}_d2v_residual_dq"],
                    name=f"{name}_d2v_residual_dq",
                )
                at = list(graph.node).index(add)
                graph.node.insert(at, dq)
                graph.node.insert(at, q)
                quantized[name] = dq.output[0]
            add.input[i] = quantized[name]
            count += 1
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return count


def _amax(model: Any, path: Path, names: list[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The largest magnitude each tensor of ``names`` reaches over ``feeds`` (ONNX Runtime, graph optimisations off:
    the Q/DQ pairs already in the graph stay fake-quantization, as in the simulation)."""
    import onnx
    import onnxruntime as ort

    if not names:
        return {}
    if not feeds:
        raise D2VError("residual-Add Q/DQ needs calibration samples and got none; pass --calibration DIR")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    amax = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, session.run(names, {k: v for k, v in feed.items() if k in inputs})):
            amax[name] = max(amax[name], float(np.max(np.abs(value))) if np.size(value) else 0.0)
    return amax


# NVIDIA's int8 Tensor Core GEMMs need K and N of at least 16 (TensorRT Model Optimizer's rule).
MIN_GEMM_DIM = 16


def gemv_nodes(graph: ExportedGraph) -> tuple[str, ...]:
    """MatMul/Gemm nodes that are GEMV-shaped at the opt shapes (an output row or column of 1, e.g. a
    classifier on the pooled vector at batch 1) or have K or N below 16: no Q/DQ for them.

    The rule is TensorRT Model Optimizer's (measured there: Q/DQ on such GEMMs makes TensorRT slower, as they
    cannot use int8 Tensor Cores); adopted after comparing placements (docs/tensorrt.md). They run in the
    fp16 remainder instead. Output shapes come from one ONNX Runtime run at the opt shapes, as Model Optimizer
    takes them: static shape inference left text classification's first-token dense layer with a symbolic batch."""
    import onnx

    model = onnx.load(str(graph.path), load_external_data=False)
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2]
    shapes = run_shapes(graph, "opt", [n.output[0] for n in gemms])
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    found = []
    for node in gemms:
        w = weights.get(node.input[1])
        small = False
        if w is not None and len(w) == 2:
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            k, n = (w[1], w[0]) if trans_b else (w[0], w[1])
            small = k < MIN_GEMM_DIM or n < MIN_GEMM_DIM
        y = shapes.get(node.output[0], ())
        gemv = len(y) < 2 or y[-1] == 1 or y[-2] == 1
        if small or gemv:
            found.append(node.name)
    return tuple(found)


def long_attention_nodes(graph: ExportedGraph) -> tuple[str, ...]:
    """Both MatMuls of every attention when the longest sequence the profile allows exceeds ``MAX_INT8_ATTENTION``
    tokens (Model Optimizer's INT8 rule): they stay in the fp16 remainder. The length is the first MatMul's key length
    in one ONNX Runtime run at the max shapes with the smallest batch (audio: frames after the feature encoder)."""
    import onnx

    blocks = attention_blocks(onnx.load(str(graph.path), load_external_data=False))
    if not blocks:
        return ()
    first = blocks[0][0]
    shapes = run_shapes(graph, "max", list(first.input), batch="min")
    length = max((shape[-1] for shape in shapes.values() if shape), default=0)  # K^T: (.., d, S); Q: (.., S, d) below
    length = max([length, *(shape[-2] for shape in shapes.values() if len(shape) >= 2)])
    if length <= MAX_INT8_ATTENTION:
        return ()
    return tuple(name for first, _, second in blocks for name in (first.name, second.name))


def run_shapes(
    graph: ExportedGraph, which: str, names: list[str], *, batch: str | None = None
) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors ``names`` in one ONNX Runtime run of the fp32 graph at the profile's ``which`` shapes
    (``batch``: the batch axis at another point), on inputs of ones (only shapes are read)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(graph.path), load_external_data=False)
    wanted = list(dict.fromkeys(names))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in known)
    feeds = {}
    for profile, spec in zip(input_profiles(graph), graph.inputs):
        shape = list(getattr(profile, which))
        if batch is not None and "batch" in spec.shape:
            shape[spec.shape.index("batch")] = getattr(profile, batch)[spec.shape.index("batch")]
        feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own node outputs
    options.intra_op_num_threads = 1
    # beside the export, so that external weights are found by their relative name
    fd, tmp = tempfile.mkstemp(prefix=f".{graph.path.stem}-shapes-", suffix=".onnx", dir=graph.path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        values = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"]).run(wanted, feeds)
    finally:
        os.unlink(tmp)
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(wanted, values)}


def _with_placement_rules(graph: ExportedGraph, recipe: QuantRecipe) -> QuantRecipe:
    """The TensorRT recipe plus the GEMV / small-GEMM nodes and (past 512 tokens) the attention MatMuls left unquantized."""
    extra = [
        n for n in dict.fromkeys([*gemv_nodes(graph), *long_attention_nodes(graph)]) if n not in recipe.excluded_nodes
    ]
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
        raise D2VError(
            "tensorrt int8 needs a quantization recipe; build it with quantize.make_recipe('tensorrt', 'static')",
            ExitCode.INTERNAL,
        )
    if recipe.mode != "static" or not recipe.symmetric_activations:
        raise D2VError(
            "TensorRT INT8 is explicit quantization: static, symmetric Q/DQ from calibration samples; use --quant static",
            ExitCode.TARGET_UNAVAILABLE,
        )
    return recipe


def _fix_and_check(path: Path, feeds: Sequence[Mapping[str, np.ndarray]] = (), residual: bool = False) -> None:
    """TensorRT's fix-ups on a freshly quantized graph (with ``residual``: residual-Add Q/DQ, its scales measured on
    ``feeds``), its fp16 remainder, then the check of what TensorRT accepts."""
    _fixups(path, feeds, residual)
    _fp16_and_check(path)


def _fixups(path: Path, feeds: Sequence[Mapping[str, np.ndarray]] = (), residual: bool = False) -> None:
    """The fix-ups alone (the fallback's candidates: its node ranking compares them with the fp32 graph)."""
    tensorrt_fixups(path)
    if residual:
        residual_qdq(path, feeds)
    _check(path)


def _fp16_and_check(path: Path) -> None:
    fp16_remainder(path, INT8_FP32_OPS)  # idempotent
    _check(path)


def _check(path: Path) -> None:
    problems = qdq_problems(path)
    if problems:
        raise D2VError(
            f"the Q/DQ graph is not what TensorRT accepts: {problems[0]} (and {len(problems) - 1} more)",
            ExitCode.INTERNAL,
        )
