"""Where the time goes: a per-operation breakdown from the runtimes' own profilers.

    groups = openvino_breakdown(Path("out/openvino-int8-static/openvino_model.xml"), feed, threads=2)
    groups = onnxruntime_breakdown(Path("out/onnxruntime-int8-static/model.onnx"), feed, threads=2)
    # {"int8 GEMM (MatMul/FC, Conv)": 41.2, "attention (scores, softmax, context)": 5.1, ...} in ms per run

OpenVINO: the CPU plugin's performance counters (``PERF_COUNT``) on the compiled (runtime) model, by
node type and execution type. ONNX Runtime: its session profiler (``enable_profiling``), the "Node"
events of the JSON trace, by operator. Both are averaged over ``runs`` timed runs after a warm-up.
The groups are the same for both runtimes (``GROUPS``); an operator that fits none goes to "rest".
Used by benchmarks/peers.py to write docs/PERFORMANCE.md.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

GEMM8 = "int8 GEMM (MatMul/FC, Conv)"
GEMM32 = "float GEMM (MatMul/FC, Conv)"
ATTENTION = "attention (scores, softmax, context)"
NORMS = "norms, activations, elementwise"
QDQ = "quantize/dequantize, reorders, layout"
REST = "rest"
GROUPS = (GEMM8, GEMM32, ATTENTION, NORMS, QDQ, REST)

_ORT_INT8 = {
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearConv",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "QAttention",
}
_ORT_FLOAT = {"Gemm", "Conv", "FusedConv", "FusedGemm"}
_ORT_ATTN = {"Softmax", "Attention", "MultiHeadAttention", "FusedMatMul"}
_ORT_NORMS = {
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "Gelu",
    "BiasGelu",
    "FastGelu",
    "Erf",
    "Add",
    "Mul",
    "Div",
    "Sub",
    "Sqrt",
    "Pow",
    "ReduceMean",
    "Tanh",
    "Where",
    "BiasAdd",
}
_ORT_QDQ = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "Transpose",
    "Reshape",
    "Cast",
    "Concat",
    "Split",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Expand",
    "Gather",
    "Identity",
}


def _ort_group(op: str, weight_matmul: bool) -> str:
    if op in _ORT_INT8:
        return GEMM8
    if op == "MatMul":
        return GEMM32 if weight_matmul else ATTENTION
    if op in _ORT_FLOAT:
        return GEMM32
    if op in _ORT_ATTN:
        return ATTENTION
    if op in _ORT_NORMS:
        return NORMS
    if op in _ORT_QDQ:
        return QDQ
    return REST


def onnxruntime_breakdown(
    path: Path, feed: Mapping[str, np.ndarray], *, threads: int, runs: int = 10
) -> dict[str, float]:
    """ms per run in each group, from the reference runtime's profiler (the session its runner builds, plus profiling)."""
    from .. import backends

    reference = backends.reference()
    with tempfile.TemporaryDirectory(prefix="d2v-prof-") as tmp:
        opts = reference.session_options(threads)
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "trace")
        session = reference.open_session(path, opts)
        weights = _weight_matmuls(Path(opts.optimized_model_filepath))
        names = [i.name for i in session.get_inputs()]
        inputs = {n: feed[n] for n in names}
        for _ in range(3):
            session.run(None, inputs)
        # the warm-up runs are in the trace too: keep only the last ``runs`` runs' node events
        for _ in range(runs):
            session.run(None, inputs)
        trace = session.end_profiling()
        events = json.loads(Path(trace).read_text(encoding="utf-8"))
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first = model_runs[-runs]["ts"] if len(model_runs) >= runs else 0
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or e.get("ts", 0) < first or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args") or {}
        op = str(args.get("op_name", ""))
        node = str(e["name"]).removesuffix("_kernel_time")
        totals[_ort_group(op, node in weights)] += float(e.get("dur", 0)) / 1000.0 / runs
    return {g: round(totals.get(g, 0.0), 3) for g in GROUPS}


def _weight_matmuls(optimized: Path) -> set[str]:
    """Names of the MatMul nodes whose second input is a constant (a weight GEMM, not attention)."""
    import onnx

    try:
        model = onnx.load(str(optimized), load_external_data=False)
    except Exception:  # noqa: BLE001 - no optimized file: every float MatMul counts as attention
        return set()
    consts = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in consts}


def _ov_group(node_type: str, exec_type: str, name: str) -> str:
    t, e = node_type.lower(), exec_type.lower()
    int8 = "i8" in e or "u8" in e
    if t.startswith("fullyconnected") or t in ("convolution", "groupconvolution", "deconvolution"):
        return GEMM8 if int8 else GEMM32
    if t in ("matmul", "softmax", "scaleddotproductattention") or (t == "subgraph" and "matmul" in name.lower()):
        return ATTENTION
    if t in (
        "mvn",
        "eltwise",
        "multiply",
        "add",
        "subtract",
        "divide",
        "powerstatic",
        "gelu",
        "subgraph",
        "sqrt",
        "reduce",
        "reducemean",
        "erf",
        "normalizel2",
        "rmsnorm",
    ):
        return NORMS
    if t in (
        "fakequantize",
        "reorder",
        "transpose",
        "reshape",
        "convert",
        "concatenation",
        "concat",
        "split",
        "gather",
        "stridedslice",
        "broadcast",
        "interpolate",
        "slice",
        "squeeze",
        "unsqueeze",
    ):
        return QDQ
    return REST


def openvino_breakdown(
    model: Any, feed: Mapping[str, np.ndarray], *, threads: int, runs: int = 10, config: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """ms per run in each group, from the CPU plugin's performance counters. ``model``: an IR path or an ov.Model."""
    import openvino as ov

    core = ov.Core()
    m = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    cfg = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": int(threads),
        "PERF_COUNT": True,
        **dict(config or {}),
    }
    compiled = core.compile_model(m, "CPU", cfg)
    request = compiled.create_infer_request()
    inputs = {p.get_any_name(): feed[p.get_any_name()] for p in compiled.inputs if p.get_any_name() in feed}
    if len(inputs) != len(compiled.inputs):  # IR ports named differently from the ONNX inputs: go by position
        inputs = dict(zip([p.get_any_name() for p in compiled.inputs], feed.values()))
    for _ in range(3):
        request.infer(inputs)
    totals: dict[str, float] = collections.defaultdict(float)
    for _ in range(runs):
        request.infer(inputs)
        for info in request.profiling_info:
            totals[_ov_group(info.node_type, info.exec_type, info.node_name)] += (
                info.real_time.total_seconds() * 1000.0 / runs
            )
    return {g: round(totals.get(g, 0.0), 3) for g in GROUPS}


def runtime_attention_ops(model: Any, threads: int = 1) -> dict[str, int]:
    """OpenVINO: how attention runs in the compiled model (counts of ScaledDotProductAttention, MHA subgraphs, MatMul, Softmax).

    Answers "does OpenVINO's attention fusion fire on this IR?" from the runtime model itself.
    """
    import openvino as ov

    core = ov.Core()
    m = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    compiled = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": int(threads)})
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        name = op.get_friendly_name().lower()
        if kind in ("ScaledDotProductAttention", "MatMul", "Softmax"):
            counts[kind] += 1
        elif kind == "Subgraph" and "matmul" in name:
            counts["MHA subgraph (snippets)"] += 1
    return dict(counts)
