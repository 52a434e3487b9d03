"""The TensorRT INT8 graph against what TensorRT's fusions take (issue 22, items 5, 6, 8 and the fp16 scales).

Real exports of the tiny presets, real onnxruntime quantization, outputs compared on ONNX Runtime with graph
optimisations off (the simulation the TensorRT target uses). No TensorRT here: the rules checked are the ones
NVIDIA documents (docs/tensorrt.md, "INT8 graph for TensorRT's fusions").
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export import backends
from d2v_export.backends.tensorrt import BACKEND, TensorRTRequest
from d2v_export.backends.tensorrt import graph as trt_graph
from d2v_export.calibration import load_samples
from d2v_export.convert.export import export
from d2v_export.heads import Head, head_for
from d2v_export.pipeline import ShapeRequest, resolve_profile
from d2v_export.int8.quantize import make_recipe, quantize_onnx
from d2v_export.spec import Artifact, ExportedGraph, Modality, Precision

from .conftest import TINY_SHAPES, tiny

VISION = head_for(Modality.VISION, "image-classification")
TEXT = head_for(Modality.TEXT, "text-classification")
AUDIO = head_for(Modality.AUDIO, "automatic-speech-recognition")
LONG_AUDIO = ShapeRequest(batch=(1, 1, 2), audio_seconds=(0.5, 1.0, 11.0))  # ~550 frames at max: past 512


class Graphs:
    """Tiny exports, calibration feeds and deferred INT8 bundles, made once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, str], Any] = {}

    def export(
        self, head: Head, shapes: ShapeRequest = TINY_SHAPES
    ) -> tuple[ExportedGraph, list[dict[str, np.ndarray]]]:
        key = (head.key, repr(shapes))
        if key not in self.made:
            model, _ = tiny(head)
            profile = resolve_profile(model, shapes)
            folder = self.root / f"{head.key.replace('/', '-')}-{len(self.made)}"
            graph = export(model, profile, folder / "fp32" / "model.onnx")
            feeds = list(load_samples(None, model, profile, split="calibration", count=6).feeds)
            self.made[key] = (graph, feeds)
        return self.made[key]

    def int8(self, head: Head, shapes: ShapeRequest = TINY_SHAPES) -> Artifact:
        key = ("int8", head.key + repr(shapes))
        if key not in self.made:
            graph, feeds = self.export(head, shapes)
            recipe = make_recipe(backends.get("tensorrt"), "static", samples=len(feeds))
            request = TensorRTRequest(
                precision=Precision.INT8, quant=recipe, calibration=tuple(feeds), threads=2, defer_build=True
            )
            self.made[key] = BACKEND.compile(graph, graph.path.parent.parent / "tensorrt-int8", request)
        return self.made[key]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Graphs:
    return Graphs(tmp_path_factory.mktemp("trt-graph"))


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _simulate(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


# ------------------------------------------------------------------------------------ item 5: attention


@pytest.mark.parametrize("head", [VISION, TEXT, AUDIO], ids=lambda h: h.key)
def test_int8_graph_scales_the_query_before_the_first_attention_matmul(head: Head, graphs: Graphs) -> None:
    graph, _ = graphs.export(head)
    exported = _load(graph.path)
    blocks = trt_graph.attention_blocks(exported)
    assert blocks and len(trt_graph.scale_after_first_matmul(exported)) == len(blocks)  # the export scales the scores
    model = _load(graphs.int8(head).path / "model.onnx")
    assert len(trt_graph.attention_blocks(model)) == len(blocks)
    assert trt_graph.scale_after_first_matmul(model) == []
    producers = {o: n for n in model.graph.node for o in n.output}
    for first, _, _ in trt_graph.attention_blocks(model):  # Q reaches the MatMul through the Mul (and its Q/DQ pair)
        node, seen = producers[first.input[0]], []
        while node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            seen.append(node.op_type)
            node = producers[node.input[0]]
        assert node.op_type == "Mul" and node.name.endswith("_d2v_scaled"), (first.name, seen, node.op_type)


def test_moving_the_attention_scale_keeps_the_qdq_graph_outputs(graphs: Graphs, tmp_path: Path) -> None:
    """The move is exact up to float rounding, on the quantized graph (where it runs) and on the float one: the scaled
    scores (the removed Mul's output before, the first MatMul's after) and the model's outputs."""
    import onnx

    graph, feeds = graphs.export(TEXT)
    recipe = make_recipe(backends.get("tensorrt"), "static", samples=len(feeds))
    raw = tmp_path / "raw.onnx"
    quantize_onnx(graph, raw, recipe, feeds)
    for source in (graph.path, raw):
        model = onnx.load(str(source))
        scaled = trt_graph.scale_after_first_matmul(model)
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(node.output[0]) for _, node, _ in scaled)
        before = tmp_path / f"before-{source.stem}.onnx"
        onnx.save(model, str(before))
        assert trt_graph.move_attention_scale(model) == len(scaled) == len(trt_graph.attention_blocks(model)) > 0
        for (first, _node, _), out in zip(scaled, model.graph.output[-len(scaled) :]):
            assert out.name == first.output[0]  # the scores output is the first MatMul's own now
        moved = tmp_path / f"moved-{source.stem}.onnx"
        onnx.save(model, str(moved))
        for a_all, b_all in zip(_simulate(before, feeds), _simulate(moved, feeds)):
            for a, b in zip(a_all, b_all):
                assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(a)))), (
                    source.name
                )


@pytest.mark.parametrize("head", [VISION, TEXT], ids=lambda h: h.key)
def test_softmax_feeds_its_quantize_without_a_cast(head: Head, graphs: Graphs) -> None:
    """Softmax reads and writes fp16: no Cast between it and its QuantizeLinear. LayerNormalization is the one fp32
    island left (``INT8_FP32_OPS``), computed in fp32 (stash_type=1) with fp32 gamma/beta."""
    from onnx import TensorProto

    assert trt_graph.INT8_FP32_OPS == ("LayerNormalization",)
    model = _load(graphs.int8(head).path / "model.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for node in softmaxes:
        assert producers[node.input[0]].op_type != "Cast", node.name
        assert [r.op_type for r in readers[node.output[0]]] in (["QuantizeLinear"], ["MatMul"]), node.name
    for node in (n for n in model.graph.node if n.op_type == "LayerNormalization"):
        assert next((a.i for a in node.attribute if a.name == "stash_type"), 1) == TensorProto.FLOAT, node.name
        assert producers[node.input[0]].op_type == "Cast" and node.input[1].endswith("_fp32"), node.name


def test_attention_matmuls_stay_float_past_512_tokens(graphs: Graphs) -> None:
    graph, _ = graphs.export(AUDIO, LONG_AUDIO)
    blocks = trt_graph.attention_blocks(_load(graph.path))
    long = set(trt_graph.long_attention_nodes(graph))
    assert long == {n.name for first, _, second in blocks for n in (first, second)}
    assert trt_graph.run_shapes(graph, "max", [blocks[0][0].output[0]], batch="min")[blocks[0][0].output[0]][-1] > 512
    model = _load(graphs.int8(AUDIO, LONG_AUDIO).path / "model.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    for first, _, second in trt_graph.attention_blocks(model):
        for node in (first, second):
            assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers), node.name
    # at the default tiny shapes (2 s at most: ~100 frames) the same MatMuls are quantized
    short, _ = graphs.export(AUDIO)
    assert trt_graph.long_attention_nodes(short) == ()
    quantized = _load(graphs.int8(AUDIO).path / "model.onnx")
    producers = {o: n for n in quantized.graph.node for o in n.output}
    first = trt_graph.attention_blocks(quantized)[0][0]
    assert producers[first.input[1]].op_type == "DequantizeLinear"


# ------------------------------------------------------------------------------------ item 8: GEMV from a real run


def test_gemv_rule_covers_the_text_classification_dense_layer(graphs: Graphs) -> None:
    """The head's dense layer (the Gemm feeding Tanh) reads the first token only: [batch, hidden], a GEMV at batch 1.
    Static shape inference left its batch symbolic, so the rule missed it; ONNX Runtime's run at the opt shapes sees it."""
    graph, _ = graphs.export(TEXT)
    exported = _load(graph.path)
    readers = {i: n for n in exported.graph.node for i in n.input}
    dense = next(
        n
        for n in exported.graph.node
        if n.op_type in ("Gemm", "MatMul")
        and readers.get(n.output[0]) is not None
        and readers[n.output[0]].op_type == "Tanh"
    )
    assert dense.name in trt_graph.gemv_nodes(graph)
    artifact = graphs.int8(TEXT)
    assert artifact.quantization is not None and dense.name in artifact.quantization.excluded_nodes
    model = _load(artifact.path / "model.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == dense.name)
    assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers)


# ------------------------------------------------------------------------------------ fp16 Q/DQ scales


def test_every_scale_of_the_int8_graphs_is_a_normal_positive_fp16(graphs: Graphs) -> None:
    from onnx import TensorProto, numpy_helper

    for head in (VISION, TEXT, AUDIO):
        path = graphs.int8(head).path / "model.onnx"
        model = _load(path)
        inits = {i.name: i for i in model.graph.initializer}
        for node in (n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")):
            scale = inits[node.input[1]]
            assert scale.data_type == TensorProto.FLOAT16, node.name
            assert np.all(numpy_helper.to_array(scale).astype(np.float32) >= trt_graph.MIN_HALF_SCALE), node.name
        assert trt_graph.qdq_problems(path) == []


def test_tiny_scales_are_raised_to_a_normal_fp16_and_the_check_refuses_the_rest(graphs: Graphs, tmp_path: Path) -> None:
    """A weight channel and an activation whose scales are below 2^-14 (subnormal in fp16; under 6e-8 they would be
    0, which TensorRT's parser refuses): the fp16 remainder raises them and keeps what they represent."""
    import onnx
    from onnx import numpy_helper

    graph, feeds = graphs.export(TEXT)
    recipe = make_recipe(backends.get("tensorrt"), "static", samples=len(feeds))
    raw = tmp_path / "raw.onnx"
    quantize_onnx(graph, raw, recipe, feeds)
    model = onnx.load(str(raw))
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    )
    act_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    w_scale = numpy_helper.to_array(inits[weight_dq.input[1]]).copy()
    w_scale[0] = 1e-8  # channel 0 of this weight: values up to 127e-8
    inits[weight_dq.input[1]].CopyFrom(numpy_helper.from_array(w_scale, weight_dq.input[1]))
    inits[act_q.input[1]].CopyFrom(numpy_helper.from_array(np.array(3e-6, np.float32), act_q.input[1]))
    tiny_scales = tmp_path / "tiny.onnx"
    onnx.save(model, str(tiny_scales))
    half = tmp_path / "half.onnx"
    shutil.copyfile(tiny_scales, half)
    assert trt_graph.fp16_remainder(half, ())["clamped_scales"] == 2
    assert trt_graph.qdq_problems(half) == []
    fixed = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(half)).graph.initializer}
    assert (
        float(fixed[weight_dq.input[1]][0]) == trt_graph.MIN_HALF_SCALE
        and float(fixed[act_q.input[1]]) == trt_graph.MIN_HALF_SCALE
    )
    for a, b in zip(_simulate(tiny_scales, feeds[:2]), _simulate(half, feeds[:2])):
        assert np.all(np.isfinite(b[0])) and np.max(np.abs(a[0] - b[0])) < 0.05 * max(1.0, float(np.max(np.abs(a[0]))))
    # the check: a zero, a negative and a subnormal fp16 scale are each named
    for bad, dtype in ((0.0, np.float32), (-0.5, np.float32), (1e-6, np.float16)):
        broken = onnx.load(str(half))
        scale = next(i for i in broken.graph.initializer if i.name == act_q.input[1])
        scale.CopyFrom(numpy_helper.from_array(np.array(bad, dtype), scale.name))
        path = tmp_path / "broken.onnx"
        onnx.save(broken, str(path))
        assert any(act_q.name in p and "scale" in p for p in trt_graph.qdq_problems(path)), bad


@pytest.mark.parametrize("head", [VISION, TEXT, AUDIO], ids=["vision", "text", "audio"])
def test_residual_option_quantizes_the_residual_add_inputs_and_the_graph_still_runs(
    head: Head, graphs: Graphs, tmp_path: Path
) -> None:
    import onnx

    graph, feeds = graphs.export(head)
    residual = trt_graph.residual_adds(onnx.load(str(graph.path)))
    assert residual  # post-LN text/audio: 2 per layer; pre-LN vision: both Adds of a layer feed a LayerNorm
    lever = next(lv for lv in BACKEND.pick_levers if lv.suffix == "-residual")  # what --pick builds
    assert lever.op_types is not None and trt_graph.RESIDUAL_OP in lever.op_types
    recipe = dataclasses.replace(
        make_recipe(backends.get("tensorrt"), "static", samples=len(feeds)), op_types=lever.op_types
    )
    request = TensorRTRequest(
        precision=Precision.INT8, quant=recipe, calibration=tuple(feeds), threads=2, defer_build=True
    )
    artifact = BACKEND.compile(graph, tmp_path / "tensorrt-int8-static-residual", request)
    # the report says so
    assert artifact.quantization is not None and trt_graph.RESIDUAL_OP in artifact.quantization.op_types
    path = artifact.path / "model.onnx"
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}

    def quantized_sum(node: Any) -> bool:
        return node.op_type == "Add" and all(
            i in producers and producers[i].op_type == "DequantizeLinear" for i in node.input
        )

    assert sum(quantized_sum(n) for n in model.graph.node) == len(residual)
    assert trt_graph.qdq_problems(path) == []  # positive fp16 scales, int8 zero points, Q feeding DQ only
    default = graphs.int8(head)  # without the option no Add reads an int8 tensor
    assert not any(quantized_sum(n) for n in _load(default.path / "model.onnx").graph.node)
    for fp32, sim in zip(_simulate(graph.path, feeds[:3]), _simulate(path, feeds[:3])):  # the simulated graph runs
        scale = max(1.0, float(np.max(np.abs(fp32[0]))))
        assert np.all(np.isfinite(sim[0])) and np.max(np.abs(sim[0] - fp32[0])) < 0.25 * scale
