"""d2v_export.int8.optimize: transformer fusions before quantization keep the function and quantize cleanly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from d2v_export.int8 import optimize
from d2v_export.convert.export import export
from d2v_export.heads import dummy_inputs, head_for, shape_points
from d2v_export import backends
from d2v_export.int8.quantize import make_recipe, quantize_onnx, saturates
from d2v_export.spec import Modality

from .conftest import tiny


@pytest.fixture(scope="module")
def text_graph(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, object]:
    model, profile = tiny(head_for(Modality.TEXT, "text-classification"))
    graph = export(model, profile, tmp_path_factory.mktemp("opt") / "model.onnx")
    return model, profile, graph


def _feeds(model: object, profile: object) -> list[dict[str, np.ndarray]]:
    return [dummy_inputs(model.head, model.config, sizes, seed=3 + i) for i, sizes in enumerate(shape_points(profile))]  # type: ignore[attr-defined]


def test_fusions_keep_the_function(text_graph: tuple[object, object, object], tmp_path: Path) -> None:
    model, profile, graph = text_graph
    fused, result = optimize.fuse_graph(graph, tmp_path / "fused.onnx", model)  # type: ignore[arg-type]
    assert result.fused.get("SkipLayerNormalization", 0) > 0, result.fused
    assert result.nodes_after < result.nodes_before
    assert optimize.max_difference(graph.path, fused.path, _feeds(model, profile)) < 1e-4  # type: ignore[attr-defined]
    assert fused.inputs == graph.inputs and fused.profile == graph.profile  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fused_graph_quantizes(text_graph: tuple[object, object, object], tmp_path: Path, mode: str) -> None:
    from d2v_export.backends.onnxruntime import OrtRunner

    model, profile, graph = text_graph
    fused, _ = optimize.fuse_graph(graph, tmp_path / "fused.onnx", model)  # type: ignore[arg-type]
    feeds = _feeds(model, profile)
    # the weight range d2v-export picks on this CPU: 8-bit weights saturate ORT's u8 x s8 kernel on CPUs
    # without VNNI, which broke this check (cosine < 0.98) on an AVX2-only Zen 3
    recipe = dataclasses.replace(
        make_recipe(backends.get("onnxruntime"), mode, samples=len(feeds) if mode == "static" else 0),
        reduce_range=saturates(),
    )
    q = quantize_onnx(fused, tmp_path / "int8.onnx", recipe, feeds if mode == "static" else ())
    ops = optimize.op_histogram(q.path)
    assert ops.get("SkipLayerNormalization", 0) > 0
    assert ops.get("MatMulInteger" if mode == "dynamic" else "DequantizeLinear", 0) > 0
    with OrtRunner(graph.path, 1) as ref, OrtRunner(q.path, 1) as got:  # type: ignore[attr-defined]
        for feed in feeds:
            a, b = ref.infer(feed), got.infer(feed)
            for name in a:
                cos = float(
                    np.dot(a[name].ravel(), b[name].ravel())
                    / (np.linalg.norm(a[name]) * np.linalg.norm(b[name]) + 1e-12)
                )
                assert cos > 0.98, (name, cos)


def test_lever_builds_name_their_levers(text_graph: tuple[object, object, object], tmp_path: Path) -> None:
    model, profile, graph = text_graph
    builds = optimize.lever_builds(model, graph, _feeds(model, profile)[:2], tmp_path)  # type: ignore[arg-type]
    assert [b[0] for b in builds] == [
        "d2v lever: ORT fp32 + fusions",
        "d2v lever: ORT INT8 static + fusions",
        "d2v lever: ORT INT8 dynamic + fusions",
    ]
    path = builds[0][3]()
    assert Path(path).is_file()
