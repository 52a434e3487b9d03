"""The per-target, per-modality float-by-rule choices (d2v_export.int8.recipe_choice) on real exported graphs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest

from d2v_export.calibration import load_samples
from d2v_export.convert.export import export
from d2v_export.heads import head_for
from d2v_export.int8.quantize import MATMUL_OPS, make_recipe, quantize_onnx
from d2v_export import backends
from d2v_export.int8.recipe_choice import BASE, RULES, choose, float_nodes
from d2v_export.spec import Modality

from .conftest import tiny


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:  # type: ignore[type-arg]
    out = {}
    for key, modality, task in [
        ("text-cls", Modality.TEXT, "text-classification"),
        ("audio-features", Modality.AUDIO, "feature-extraction"),
        ("audio-cls", Modality.AUDIO, "audio-classification"),
    ]:
        model, profile = tiny(head_for(modality, task))
        out[key] = (model, profile, export(model, profile, tmp_path_factory.mktemp(key) / "model.onnx"))
    return out


def _gelu_readers(path: Path) -> list[str]:
    """MatMul nodes whose activation input is computed from an Erf (the exporter's GELU): the FFN output projections."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}

    def from_erf(t: str, depth: int = 3) -> bool:
        n = producer.get(t)
        return n is not None and (
            n.op_type == "Erf"
            or (depth > 0 and n.op_type in ("Mul", "Add", "Div") and any(from_erf(i, depth - 1) for i in n.input))
        )

    return [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and from_erf(n.input[0])]


def test_the_table_is_data_and_make_recipe_records_the_choice() -> None:
    declared = [c for name in backends.names() for c in backends.get(name).recipe_choices.values()]
    assert declared and all(
        set(c.float_rules) <= set(RULES) and "input" in c.float_rules and c.why for c in (*declared, BASE)
    )
    assert choose(backends.get("onnxruntime"), "audio") is BASE
    assert (
        "head" in choose(backends.get("openvino"), "vision").float_rules
        and "head" in choose(backends.get("openvino"), "audio").float_rules
    )
    assert (
        "ffn_out" in choose(backends.get("tensorrt"), "text").float_rules
        and choose(backends.get("tensorrt"), "audio") is BASE
    )
    r = make_recipe(backends.get("tensorrt"), "static", samples=4, modality="text")
    assert (
        r.float_rules == choose(backends.get("tensorrt"), "text").float_rules
        and r.choice == choose(backends.get("tensorrt"), "text").why
    )
    assert make_recipe(backends.get("onnxruntime"), "static", samples=4).float_rules == (
        "input",
    )  # no modality: the base rule
    assert make_recipe(backends.get("openvino"), "static", samples=4, modality="text").float_rules == ("input", "head")
    # OpenVINO's preset per modality: symmetric activations (PERFORMANCE) for vision and audio, MIXED for text
    ov_static = {
        m: make_recipe(backends.get("openvino"), "static", samples=4, modality=m) for m in ("vision", "text", "audio")
    }
    assert {m: r.symmetric_activations for m, r in ov_static.items()} == {"vision": True, "text": False, "audio": True}
    assert (
        "symmetric" in ov_static["audio"].choice
        and make_recipe(backends.get("tensorrt"), "static", samples=4, modality="audio").symmetric_activations
    )
    assert {lv.preset for lv in backends.get("openvino").pick_levers} >= {
        "performance",
        "mixed",
    }  # --pick tries the other preset


def test_rules_find_the_head_and_the_ffn_output_projections(graphs: dict[str, tuple]) -> None:  # type: ignore[type-arg]
    _model, _profile, cls = graphs["text-cls"]
    ffn = _gelu_readers(cls.path)
    assert len(ffn) >= 2  # one per layer
    assert float_nodes(cls.path, ("ffn_out",), MATMUL_OPS) == tuple(ffn)
    nodes = {n.name: n for n in onnx.load(str(cls.path)).graph.node}
    (head,) = float_nodes(cls.path, ("head",), MATMUL_OPS)
    assert nodes[head].op_type in ("Gemm", "MatMul") and head not in ffn
    # the head is the classifier's last GEMM: its output reaches the logits through no other GEMM
    assert head == [n.name for n in nodes.values() if n.op_type in ("Gemm", "MatMul")][-1]
    # audio feature extraction ends in the encoder (a LayerNorm after its last GEMM): no head to keep float
    _m, _p, feats = graphs["audio-features"]
    assert float_nodes(feats.path, ("head",), MATMUL_OPS) == ()
    _m, _p, audio = graphs["audio-cls"]
    assert (
        float_nodes(audio.path, ("input", "head"), MATMUL_OPS)[0] == float_nodes(audio.path, ("input",), MATMUL_OPS)[0]
    )  # the waveform conv
    with pytest.raises(ValueError, match="unknown float rule"):
        float_nodes(audio.path, ("classifier",), MATMUL_OPS)


def test_tensorrt_text_recipe_leaves_the_ffn_output_projections_unquantized(
    graphs: dict[str, tuple], tmp_path: Path
) -> None:  # type: ignore[type-arg]
    model, profile, graph = graphs["text-cls"]
    calib = load_samples(None, model, profile, split="calibration", count=6).feeds
    q = quantize_onnx(
        graph,
        tmp_path / "int8.onnx",
        make_recipe(backends.get("tensorrt"), "static", samples=6, modality="text"),
        calib,
    )
    ffn = _gelu_readers(graph.path)
    assert set(ffn) <= set(q.recipe.excluded_nodes)
    qg = onnx.load(str(q.path)).graph
    dq = {n.output[0] for n in qg.node if n.op_type == "DequantizeLinear"}
    by_name = {n.name: n for n in qg.node}
    assert all(not any(i in dq for i in by_name[n].input) for n in ffn)  # they read float, weights included
    others = [n for n in qg.node if n.op_type == "MatMul" and n.name not in q.recipe.excluded_nodes]
    assert others and all(any(i in dq for i in n.input) for n in others)  # the rest is still INT8
    plain = quantize_onnx(
        graph,
        tmp_path / "plain.onnx",
        make_recipe(backends.get("tensorrt"), "static", samples=6, modality="vision"),
        calib,
    )
    assert not set(ffn) & set(plain.recipe.excluded_nodes)  # the rule is the text entry's, not every modality's


@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="pip install 'd2v-export[openvino]'")
def test_openvino_keeps_the_task_head_float(graphs: dict[str, tuple], tmp_path: Path) -> None:  # type: ignore[type-arg]
    import openvino as ov

    from d2v_export.backends.base import BuildRequest
    from d2v_export.backends.openvino import BACKEND, _onnx_outputs, _ov_names
    from d2v_export.spec import Precision

    model, profile, graph = graphs["audio-cls"]
    calib = tuple(load_samples(None, model, profile, split="calibration", count=6).feeds)
    recipe = make_recipe(backends.get("openvino"), "static", samples=len(calib), modality="audio")
    art = BACKEND.compile(graph, tmp_path / "ov", BuildRequest(Precision.INT8, recipe, calibration=calib, threads=1))
    (head,) = float_nodes(graph.path, ("head",), MATMUL_OPS)
    # its OpenVINO operation
    names = _ov_names(ov.convert_model(str(graph.path)), [head], _onnx_outputs(graph.path, [head]))
    assert names and set(names) <= set(art.quantization.excluded_nodes), (names, art.quantization.excluded_nodes)
    ir = ov.Core().read_model(str(art.model_file))
    op = next(o for o in ir.get_ops() if o.get_friendly_name() in names and o.get_type_name() == "MatMul")
    feeding = [op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())]
    assert "FakeQuantize" not in feeding, feeding
    assert sum(o.get_type_name() == "FakeQuantize" for o in ir.get_ops()) > 0  # the rest is quantized
    # audio's preset
    assert art.quantization.symmetric_activations and any("preset=PERFORMANCE" in n for n in art.notes)
