"""Automatic fallback: when INT8 breaks the drift budget, return the most sensitive nodes to float.

    result = fallback(graph, recipe, calibration_feeds, evaluate, target=Path("out/model.onnx"))
    result.drift.passed, result.kept_float  # (("node_MatMul_12", 0.41), ...)

1. Pre-process and calibrate once (``quantize.QuantSession``); quantize with the recipe as given
   and ``evaluate`` it (step 0).
2. Rank the quantized MatMul/Gemm/Conv nodes by the error their own quantization adds: every node
   is run twice inside the fp32 graph on a few calibration feeds, once on its float inputs and once
   on the quantize-dequantized inputs and weights the INT8 graph uses, and the relative error of
   its output (noise power / signal power) is its score. Upstream error does not leak into a
   node's score, so one pass ranks every node.
3. Keep the top 1, 2, 4, 8, ... nodes float until ``evaluate`` passes, then bisect back towards
   the smallest count that passes while steps remain. Each step only re-runs the quantizer.

``evaluate`` is the caller's: it gets the path of a candidate ONNX file and returns a Drift (the
pipeline builds a runner on it and computes task-aware drift). Nothing here knows the pipeline.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .quantize import TOOL, QuantSession
from ..spec import D2VError, Drift, ExportedGraph, QuantizedGraph, QuantRecipe

RANKING_FEEDS = 4  # calibration feeds the per-node error is measured on
_PROBE = "_d2v_probe"


@dataclass(frozen=True)
class FallbackStep:
    """One quantize-and-evaluate round."""

    excluded: tuple[str, ...]  # every node kept float in this round (the recipe's own included)
    passed: bool
    summary: str  # e.g. "top1_agreement=0.9375 logit_cosine=0.9912: over budget (top1_agreement)"


@dataclass(frozen=True)
class FallbackResult:
    quantized: QuantizedGraph  # the model written to the target, with the recipe that made it
    drift: Drift  # its drift, as ``evaluate`` measured it
    kept_float: tuple[tuple[str, float], ...]  # (node, relative output error its quantization adds), worst first
    steps: tuple[FallbackStep, ...]  # every round, in order; steps[0] is the recipe as given
    ranking: tuple[tuple[str, float], ...] = ()  # every candidate node with its error, worst first

    @property
    def passed(self) -> bool:
        return self.drift.passed


def summarize(drift: Drift) -> str:
    shown = [k for k in drift.budget if k in drift.metrics] or [
        k for k in drift.metrics if k not in ("max_abs_error", "mean_abs_error")
    ]
    values = " ".join(f"{k}={drift.metrics[k]:.4g}" for k in shown)
    return f"{values}: " + ("within budget" if drift.passed else f"over budget ({', '.join(drift.failed)})")


def fallback(
    graph: ExportedGraph,
    recipe: QuantRecipe,
    calibration: Sequence[Mapping[str, np.ndarray]],
    evaluate: Callable[[Path], Drift],
    *,
    target: Path | None = None,
    max_steps: int = 8,
    progress: Callable[[str], None] = lambda _msg: None,
    postprocess: Callable[[Path], None] | None = None,
) -> FallbackResult:
    """Quantize ``graph`` with ``recipe``; while ``evaluate`` fails, keep more of the worst nodes float.

    ``target`` (default: ``<graph stem>.int8.onnx`` beside the fp32 graph) receives the last model
    that passed, or the last one tried when none did. ``max_steps`` bounds the evaluations after
    the first. Calibration feeds are needed in both modes: static calibrates on them and both rank
    nodes on them. ``postprocess`` rewrites each candidate in place before it is evaluated (a target's
    own fix-ups, e.g. TensorRT's), so what is judged is what ships.
    """
    if not calibration:
        raise D2VError("the INT8 fallback needs calibration samples to rank nodes and got none; pass --calibration DIR")
    target = Path(target) if target is not None else graph.path.with_name(graph.path.stem + ".int8.onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="d2v-fallback-") as tmp:
        work = Path(tmp)
        session = QuantSession(graph.path, work, recipe)
        if recipe.mode == "static":
            progress(f"calibrating on {len(calibration)} samples ({recipe.method})")
            session.calibrate(calibration)
        tried: dict[int, tuple[Path, Drift, tuple[str, ...]]] = {}
        steps: list[FallbackStep] = []

        def attempt(ranked: Sequence[tuple[str, float]], count: int) -> Drift:
            path = work / f"candidate-{count}.onnx"
            excluded = session.write(path, [*recipe.excluded_nodes, *(n for n, _ in ranked[:count])])
            if postprocess is not None:
                postprocess(path)
            drift = evaluate(path)
            tried[count] = (path, drift, excluded)
            steps.append(FallbackStep(excluded, drift.passed, summarize(drift)))
            progress(f"fallback: {count} node(s) float: {summarize(drift)}")
            return drift

        first = attempt((), 0)
        ranking: list[tuple[str, float]] = []
        chosen = 0
        if not first.passed:
            progress("ranking quantized nodes by the error they add")
            ranking = rank_nodes(session, tried[0][0], calibration[:RANKING_FEEDS])
            chosen = _search(ranking, attempt, max_steps)
            if ranking and chosen == len(ranking):
                progress("fallback: every quantized node is float now; INT8 gives nothing on this model")
        path, drift, excluded = tried[chosen]
        copy_model(path, target)
    kept = tuple(ranking[:chosen])
    quantized = QuantizedGraph(path=target, graph=graph, recipe=replace(recipe, excluded_nodes=excluded, tool=TOOL))
    return FallbackResult(quantized, drift, kept, tuple(steps), tuple(ranking))


def describe(result: FallbackResult) -> tuple[str, ...]:
    """The report notes of a fallback: what stayed float, and each step's verdict."""
    kept = ", ".join(f"{name} ({err:.3g})" for name, err in result.kept_float[:12])
    more = f" and {len(result.kept_float) - 12} more" if len(result.kept_float) > 12 else ""
    return (
        f"fallback: {len(result.steps)} step(s); kept {len(result.kept_float)} of {len(result.ranking)} quantizable nodes in float"
        + (f": {kept}{more} (node, relative output error its INT8 adds)" if kept else ""),
        *(f"fallback step {i}: {len(step.excluded)} float — {step.summary}" for i, step in enumerate(result.steps)),
    )


def _search(
    ranking: Sequence[tuple[str, float]], attempt: Callable[[Sequence[tuple[str, float]], int], Drift], max_steps: int
) -> int:
    """Doubling, then bisection between the last failing and the first passing count. Returns the count to keep."""
    total = len(ranking)
    low, high, used = 0, None, 0  # low: largest count known to fail; high: smallest known to pass
    count = 1
    while total and used < max_steps:
        count = min(count, total)
        used += 1
        if attempt(ranking, count).passed:
            high = count
            break
        low = count
        if count == total:
            break
        count *= 2
    if high is None:
        return low
    while high - low > 1 and used < max_steps:
        mid = (low + high) // 2
        used += 1
        if attempt(ranking, mid).passed:
            high = mid
        else:
            low = mid
    return high


def copy_model(source: Path, target: Path) -> None:
    """Copy a candidate to the target (re-saved when its weights live in an external-data file)."""
    for old in [target, *target.parent.glob(target.name + ".data")]:
        old.unlink(missing_ok=True)
    if not source.with_name(source.name + ".data").is_file():
        shutil.copyfile(source, target)
        return
    import onnx

    model = onnx.load(str(source))
    onnx.save_model(
        model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + ".data"
    )


# ---------------------------------------------------------------------------------- ranking


def rank_nodes(
    session: QuantSession, quantized: Path, feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[tuple[str, float]]:
    """Quantized nodes with the relative output error their own quantization adds, worst first."""
    import onnx

    fp32 = onnx.load(str(session.prepared))
    qmodel = onnx.load(str(quantized))
    if session.recipe.mode == "static":
        probes = _qdq_probes(fp32, qmodel)
    else:
        probes = _dynamic_probes(fp32, qmodel, session.recipe)
    if not probes:
        return []
    errors = _run_probes(fp32, probes, feeds)
    return sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass(frozen=True)
class _Probe:
    node: str
    output: str  # the node's float output in the fp32 graph
    quantized_output: str | None  # the twin's output (static), or None (dynamic: computed in numpy)
    inputs: tuple[str, ...] = ()  # dynamic: the node's activation and weight names
    transposed: bool = False  # dynamic: a Gemm with transB=1 (weight stored as (N, K))


def _qdq_probes(fp32: Any, qmodel: Any) -> list[_Probe]:
    """Add to ``fp32`` a twin of every quantized node that reads the INT8 graph's Q/DQ'd inputs."""
    import onnx

    graph = fp32.graph
    q_nodes = {n.output[0]: n for n in qmodel.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    q_inits = {i.name: i for i in qmodel.graph.initializer}
    have_inits = {i.name for i in graph.initializer}
    fp32_tensors = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | have_inits
    fp32_nodes = {n.name: n for n in graph.node}
    added: set[str] = set()
    probes = []

    def bring(tensor: str) -> str:
        """Copy the Q/DQ chain (and its initializers) that produces ``tensor`` into the fp32 graph."""
        if tensor in added:
            return tensor + _PROBE
        if tensor in fp32_tensors:
            return tensor
        if tensor in q_inits:
            if tensor not in have_inits:
                graph.initializer.append(q_inits[tensor])
                have_inits.add(tensor)
            return tensor
        node = q_nodes.get(tensor)
        if node is None:
            stripped = tensor.removesuffix("_QuantizeLinear_Input")
            if stripped in fp32_tensors:
                return stripped
            raise KeyError(tensor)
        copy = onnx.helper.make_node(
            node.op_type,
            [bring(i) if i else "" for i in node.input],
            [o + _PROBE for o in node.output],
            name=node.name + _PROBE,
            domain=node.domain,
        )
        copy.attribute.extend(node.attribute)
        graph.node.append(copy)
        added.add(tensor)
        return tensor + _PROBE

    for node in qmodel.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name not in fp32_nodes:
            continue
        if not any(i in q_nodes and q_nodes[i].op_type == "DequantizeLinear" for i in node.input):
            continue
        try:
            inputs = [(bring(i) if i in q_nodes else i) if i else "" for i in node.input]
        except KeyError:
            continue
        twin_out = node.output[0] + _PROBE + "_twin"
        twin = onnx.helper.make_node(
            node.op_type, inputs, [twin_out], name=node.name + _PROBE + "_twin", domain=node.domain
        )
        twin.attribute.extend(node.attribute)
        graph.node.append(twin)
        probes.append(_Probe(node.name, fp32_nodes[node.name].output[0], twin_out))
    return probes


def _dynamic_probes(fp32: Any, qmodel: Any, recipe: QuantRecipe) -> list[_Probe]:
    """Dynamic INT8: the MatMul/Gemm nodes the quantizer replaced, with their activation and weight names."""
    remaining = {n.name for n in qmodel.graph.node}
    inits = {i.name for i in fp32.graph.initializer}
    probes = []
    for node in fp32.graph.node:
        if node.op_type not in recipe.op_types or node.op_type not in ("MatMul", "Gemm") or node.name in remaining:
            continue
        if len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
            continue
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        probes.append(_Probe(node.name, node.output[0], None, (node.input[0], node.input[1]), trans_b))
    return probes


def _run_probes(fp32: Any, probes: Sequence[_Probe], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    import onnx
    import onnxruntime as ort

    graph = fp32.graph
    outputs = {o.name for o in graph.output}
    wanted: list[str] = []
    for p in probes:
        for name in (p.output, p.quantized_output, *p.inputs):
            if name and name not in outputs and name not in wanted:
                wanted.append(name)
    inits = {i.name: i for i in graph.initializer}
    for name in wanted:
        if name not in inits:
            graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the twins apart
    opts.log_severity_level = 3
    sess = ort.InferenceSession(fp32.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    weights = {p.inputs[1]: _as_kn(onnx.numpy_helper.to_array(inits[p.inputs[1]]), p) for p in probes if p.inputs}
    noise = {p.node: 0.0 for p in probes}
    signal = {p.node: 0.0 for p in probes}
    for feed in feeds:
        got = dict(zip(names, sess.run(names, dict(feed))))
        for p in probes:
            ref = got[p.output].astype(np.float64)
            if p.quantized_output is not None:
                cand = got[p.quantized_output].astype(np.float64)
            else:
                cand = _dynamic_matmul(
                    got[p.inputs[0]], weights[p.inputs[1]], ref, got[p.inputs[0]] @ weights[p.inputs[1]]
                )
            noise[p.node] += float(np.sum((cand - ref) ** 2))
            signal[p.node] += float(np.sum(ref**2))
    return {n: noise[n] / signal[n] if signal[n] > 0 else (0.0 if noise[n] == 0 else float("inf")) for n in noise}


def _as_kn(w: np.ndarray, probe: _Probe) -> np.ndarray:
    return w.T if probe.transposed else w


def _dynamic_matmul(x: np.ndarray, w: np.ndarray, ref: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """ORT's dynamic MatMul in numpy: uint8 activations over the tensor's range (with 0), int8 weights per column.

    ``ref - plain`` is what the node adds after the product (a Gemm's bias); it is added back.
    """
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    xq = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
    w2 = w.reshape(w.shape[0], -1)
    ws = np.abs(w2).max(axis=0) / 127.0
    ws[ws == 0] = 1.0
    wq = (np.clip(np.round(w2 / ws), -127, 127) * ws).reshape(w.shape)
    return (xq.astype(np.float64) @ wq) + (ref - plain)
