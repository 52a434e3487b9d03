"""What keeps a whole run's memory within a few times the fp32 weights (benchmarks/scale.py, docs/PERFORMANCE.md):
external data for large weights, no weight copies in the clean-up, PyTorch's check outputs computed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from d2v_export import export as export_mod, rewrite
from d2v_export.backends import get
from d2v_export.backends.base import BuildRequest
from d2v_export.export import export, make_wrapper
from d2v_export.heads import head_for
from d2v_export.spec import Modality
from d2v_export.validate import shape_check

from .conftest import tiny


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    model, profile = tiny(head_for(Modality.VISION, "image-classification"))
    return model, profile, export(model, profile, tmp_path_factory.mktemp("mem") / "model.onnx")


def test_weights_over_the_threshold_are_exported_as_external_data(vision: tuple[Any, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, profile, inline = vision
    assert not inline.path.with_name("model.onnx.data").exists()  # tiny weights: one file, as before
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)
    graph = export(model, profile, tmp_path / "x" / "model.onnx")
    data = graph.path.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > 0 and graph.path.stat().st_size < inline.path.stat().st_size
    assert graph.check.passed and graph.check.metrics["max_scaled_error"] <= model.head.tolerance
    # the ONNX Runtime fp32 artifact carries the weights file along and runs
    artifact = get("onnxruntime").compile(graph, tmp_path / "ort", BuildRequest())
    assert {p.name for p in artifact.files} >= {"model.onnx", "model.onnx.data"}
    with get("onnxruntime").runner(artifact, threads=1) as runner:
        assert shape_check(model, make_wrapper(model), runner.infer, profile).passed


def test_shape_check_reuses_pytorch_outputs(vision: tuple[Any, Any, Any]) -> None:
    model, profile, graph = vision
    from d2v_export.backends.onnxruntime import OrtRunner

    kept: dict[Any, Any] = {}
    with OrtRunner(graph.path, threads=1) as runner:
        first = shape_check(model, make_wrapper(model), runner.infer, profile, reference_outputs=kept)
        assert kept and first.passed

        class NoTorch:  # a reference that must not run again
            def __call__(self, **_kw: Any) -> Any:
                raise AssertionError("PyTorch ran again for a shape it had already run")

        again = shape_check(model, NoTorch(), runner.infer, profile, reference_outputs=kept)
    assert again.metrics == first.metrics and again.passed
    # a wrong candidate is still caught against the kept outputs
    def off(feed: Any) -> dict[str, np.ndarray]:
        return {k: v + 1.0 for k, v in runner_out(graph, feed).items()}

    bad = shape_check(model, NoTorch(), off, profile, reference_outputs=kept)
    assert not bad.passed


def runner_out(graph: Any, feed: Any) -> dict[str, np.ndarray]:
    from d2v_export.backends.onnxruntime import OrtRunner

    with OrtRunner(graph.path, threads=1) as r:
        return r.infer(feed)


def test_clean_up_types_without_weights_match_full_shape_inference(vision: tuple[Any, Any, Any]) -> None:
    _model, _profile, graph = vision
    m = onnx.load(str(graph.path))
    light = rewrite._without_weights(m, limit=0)
    assert not light.graph.initializer or all(len(t.raw_data) == 0 for t in light.graph.initializer)
    full = onnx.shape_inference.infer_shapes(m, strict_mode=False).graph
    want = {v.name: v.type.tensor_type.elem_type for v in [*full.value_info, *full.output]}
    assert rewrite._value_types(m).items() >= {k: t for k, t in want.items() if t}.items()


def test_prune_drops_only_what_nobody_reads(vision: tuple[Any, Any, Any]) -> None:
    _model, _profile, graph = vision
    m = onnx.load(str(graph.path))
    used = {i for n in m.graph.node for i in n.input}
    m.graph.initializer.add().CopyFrom(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused_d2v"))
    kept = [t.name for t in m.graph.initializer if t.name in used]
    before = m.ByteSize()
    rewrite._prune(m)
    assert [t.name for t in m.graph.initializer] == kept
    assert m.ByteSize() < before
