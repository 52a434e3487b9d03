"""d2v_export.int8.rewrite: each Data2Vec clean-up changes the graph where it should and never what it computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from d2v_export.int8 import rewrite
from d2v_export.convert.export import export
from d2v_export.heads import dummy_inputs, head_for, shape_points
from d2v_export.spec import Modality

from .conftest import tiny

# (modality, task) -> the rewrites that must find something on that architecture
EXPECTED = {
    # fold_constants: the exporter already folds the tiny preset's small position-bias tables (base: ~570 nodes folded);
    # test_fold_constants_computes_constant_subgraphs covers it
    (Modality.VISION, "image-classification"): {"fold_layer_scale", "fold_query_scale", "merge_qkv"},
    (Modality.TEXT, "text-classification"): {"fold_query_scale", "merge_qkv"},
    (Modality.AUDIO, "automatic-speech-recognition"): {"fold_query_scale", "channel_layernorm", "merge_qkv"},
}


@pytest.fixture(scope="module", params=list(EXPECTED), ids=lambda k: f"{k[0].value}-{k[1]}")
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[object, object, object, tuple[Modality, str]]:
    key = request.param
    model, profile = tiny(head_for(*key))
    graph = export(model, profile, tmp_path_factory.mktemp("rw") / "model.onnx")
    return model, profile, graph, key


def _feeds(model: object, profile: object) -> list[dict[str, np.ndarray]]:
    return [dummy_inputs(model.head, model.config, sizes, seed=5 + i) for i, sizes in enumerate(shape_points(profile))]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(rewrite.REWRITES))
def test_each_rewrite_keeps_the_function(
    exported: tuple[object, object, object, tuple[Modality, str]], name: str, tmp_path: Path
) -> None:
    model, profile, graph, key = exported
    m = onnx.load(str(graph.path))  # type: ignore[attr-defined]
    before = len(m.graph.node)
    done = rewrite.clean_up(m, [name])
    target = tmp_path / "model.onnx"
    onnx.save(m, str(target))
    onnx.checker.check_model(str(target), full_check=True)
    if name in EXPECTED[key]:
        assert done[name] > 0, f"{name} found nothing to do on {key}"
        assert len(m.graph.node) != before
    # at every shape the export check uses, not only the traced one
    assert rewrite.scaled_difference(graph.path, target, _feeds(model, profile)) < 1e-5  # type: ignore[attr-defined]


def test_layer_scale_and_query_scale_leave_no_multiply_behind(
    exported: tuple[object, object, object, tuple[Modality, str]],
) -> None:
    model, _profile, graph, key = exported
    if key[0] is not Modality.VISION:
        pytest.skip("layer scale is a vision (BEiT) feature")
    m = onnx.load(str(graph.path))  # type: ignore[attr-defined]
    muls = sum(n.op_type == "Mul" for n in m.graph.node)
    done = rewrite.clean_up(m, ["fold_layer_scale"])
    layers = model.config.num_hidden_layers  # type: ignore[attr-defined]
    assert done["fold_layer_scale"] == 2 * layers  # lambda_1 and lambda_2 of every layer
    assert sum(n.op_type == "Mul" for n in m.graph.node) == muls - 2 * layers


def test_channel_layernorm_removes_the_transposes(
    exported: tuple[object, object, object, tuple[Modality, str]],
) -> None:
    _model, _profile, graph, key = exported
    if key[0] is not Modality.AUDIO:
        pytest.skip("the channel LayerNorm is in the audio feature encoder")
    m = onnx.load(str(graph.path))  # type: ignore[attr-defined]
    transposes = sum(n.op_type == "Transpose" for n in m.graph.node)
    done = rewrite.clean_up(m, ["channel_layernorm"])
    assert sum(n.op_type == "Transpose" for n in m.graph.node) == transposes - 2 * done["channel_layernorm"]


def test_a_rewrite_that_changes_the_function_is_refused(
    exported: tuple[object, object, object, tuple[Modality, str]], tmp_path: Path
) -> None:
    model, profile, graph, _key = exported
    # a tolerance nothing can meet stands in for a rewrite that is not exact: the export comes back untouched
    same, done = rewrite.rewrite_graph(
        graph, rewrite.DEFAULT + ("merge_qkv",), tmp_path / "x.onnx", _feeds(model, profile), -1.0
    )
    assert same is graph and done == {}
    kept, done = rewrite.for_model(
        graph, rewrite.DEFAULT + ("merge_qkv",), model, profile, tmp_path / "y" / "model.onnx"
    )
    assert kept.path == tmp_path / "y" / "model.onnx" and any(done.values())  # type: ignore[attr-defined]


def test_fold_constants_computes_constant_subgraphs(tmp_path: Path) -> None:
    """A relative-position-bias-like gather of a constant table by constant indices becomes one initializer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 3)).astype(np.float32)
    index = np.array([[0, 6, 2], [3, 3, 1]], np.int64)
    nodes = [
        helper.make_node("Gather", ["table", "index"], ["bias"], axis=0),  # [2, 3, 3]
        helper.make_node("Transpose", ["bias"], ["bias_t"], perm=[2, 0, 1]),  # [3, 2, 3]
        helper.make_node("Add", ["x", "bias_t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(index, "index")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    src = tmp_path / "src.onnx"
    onnx.save(model, str(src))
    assert rewrite.fold_constants(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Add"]
    assert {t.name for t in model.graph.initializer} == {"bias_t"}
    dst = tmp_path / "dst.onnx"
    onnx.save(model, str(dst))
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    assert rewrite.scaled_difference(src, dst, [{"x": x}]) == 0.0


def test_the_audio_feature_encoder_is_exported_time_major(
    exported: tuple[object, object, object, tuple[Modality, str]],
) -> None:
    """d2v_export.int8.layouts: every feature-encoder convolution, the raw-waveform one included, is a MatMul in the graph,
    the export check (against the original module) held, and the model the user loaded is left as it was."""
    model, _profile, graph, key = exported
    if key[0] is not Modality.AUDIO:
        pytest.skip("the time-major layout is for the audio feature encoder")
    m = onnx.load(str(graph.path))  # type: ignore[attr-defined]
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    grouped = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(convs) == len(grouped)  # only the positional convolutions (grouped) remain convolutions
    assert "time-major" in graph.exporter and graph.check.passed  # type: ignore[attr-defined]
    encoder = model.module.data2vec_audio.feature_extractor  # type: ignore[attr-defined]
    assert type(encoder).__name__ == "Data2VecAudioFeatureEncoder"
    assert len(encoder.conv_layers) == model.config.num_feat_extract_layers > 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "task", ["text-classification", "multiple-choice", "token-classification", "fill-mask", "question-answering"]
)
def test_the_first_token_layout_only_where_the_head_reads_only_the_first_token(task: str) -> None:
    """d2v_export.int8.layouts: the last text layer runs for the first token only under sequence classification and multiple
    choice (same outputs as the full layer, padded inputs included), never under heads that read every token."""
    import torch

    from d2v_export.convert.export import make_wrapper, torch_forward
    from d2v_export.int8.layouts import FIRST_TOKEN, export_layouts

    model, profile = tiny(head_for(Modality.TEXT, task))
    wrapper = make_wrapper(model)
    last = model.module.base_model.encoder.layer[-1]  # type: ignore[attr-defined]
    with torch.no_grad():  # attention neither uniform (random init) nor one-hot: a wrong scale or mask shows
        last.attention.self.query.weight.mul_(10.0)
        last.attention.self.key.weight.mul_(10.0)
    feeds = _feeds(model, profile)
    assert any((f["attention_mask"] == 0).any() for f in feeds)  # padding is part of what is compared
    before = [torch_forward(wrapper, f, model.head.outputs) for f in feeds]  # type: ignore[attr-defined]
    with export_layouts(model.module) as applied:  # type: ignore[attr-defined]
        swapped = model.module.base_model.encoder.layer[-1] is not last  # type: ignore[attr-defined]
        after = [torch_forward(wrapper, f, model.head.outputs) for f in feeds]  # type: ignore[attr-defined]
    assert (FIRST_TOKEN in applied) == swapped == (task in ("text-classification", "multiple-choice"))
    assert model.module.base_model.encoder.layer[-1] is last  # type: ignore[attr-defined]
    for a, b in zip(before, after):
        for name in a:
            assert np.abs(a[name] - b[name]).max() <= 1e-5 * max(1.0, float(np.abs(a[name]).max()))


@pytest.mark.parametrize("task", ["image-classification", "semantic-segmentation", "feature-extraction"])
def test_the_mean_pooled_layout_only_where_the_head_reads_only_the_patch_mean(task: str) -> None:
    """d2v_export.int8.layouts: under image classification with mean pooling (the real checkpoints' head) the last layer's
    feed-forward output projection runs once on the patch-token mean; same logits as the full layer; never under heads
    that read every token (segmentation, the bare model's hidden states)."""
    import torch

    from d2v_export.convert.export import make_wrapper, torch_forward
    from d2v_export.int8.layouts import MEAN_POOLED, export_layouts

    model, profile = tiny(head_for(Modality.VISION, task))
    wrapper = make_wrapper(model)
    last = model.module.base_model.encoder.layer[-1]  # type: ignore[attr-defined]
    output = last.output
    with torch.no_grad():  # a projection far from zero, so skipping or mis-scaling it shows in the logits
        output.dense.weight.mul_(10.0)
        output.dense.bias.add_(1.0)
    feeds = _feeds(model, profile)
    before = [torch_forward(wrapper, f, model.head.outputs) for f in feeds]  # type: ignore[attr-defined]
    with export_layouts(model.module) as applied:  # type: ignore[attr-defined]
        swapped = last.output is not output
        after = [torch_forward(wrapper, f, model.head.outputs) for f in feeds]  # type: ignore[attr-defined]
    assert (MEAN_POOLED in applied) == swapped == (task == "image-classification")
    assert last.output is output
    for a, b in zip(before, after):
        for name in a:
            assert np.abs(a[name] - b[name]).max() <= 1e-5 * max(1.0, float(np.abs(a[name]).max()))
