"""The heads table is complete and every head exports, passes onnx.checker and matches PyTorch."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import transformers

from d2v_export.convert.export import export, make_wrapper
from d2v_export.heads import HEADS, Head, head_for, shape_points, trace_point
from d2v_export.spec import D2VError, Modality
from d2v_export.convert.validate import shape_check

from .conftest import tiny


def test_every_transformers_data2vec_class_has_a_head() -> None:
    """Fails when transformers ships a Data2Vec PyTorch class that the table lacks (or vice versa)."""
    shipped = {
        name
        for name in dir(transformers)
        if name.startswith("Data2Vec")
        and not name.startswith(("TF", "Flax"))
        and not name.endswith(("PreTrainedModel", "Config", "Layer"))
        and inspect.isclass(getattr(transformers, name))
        and issubclass(getattr(transformers, name), transformers.PreTrainedModel)
    }
    assert shipped == {h.class_name for h in HEADS}
    assert len(HEADS) == 15
    assert len({h.key for h in HEADS}) == 15


def test_export_test_covers_every_head() -> None:
    """What pytest really collects for the export test below: one item per row of the table, none marked to skip.

    Asked of pytest itself (a collection in a child process), not of the list the parametrization is built
    from, so a head left out of the test, filtered or skipped fails here.
    """
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            f"{Path(__file__).name}::test_export_matches_pytorch",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=300,
    )
    collected = re.findall(r"::test_export_matches_pytorch\[([^\]]+)\]$", done.stdout, re.M)
    assert sorted(collected) == sorted(h.key for h in HEADS), done.stdout[-3000:] + done.stderr[-2000:]
    marks = {m.name for m in getattr(test_export_matches_pytorch, "pytestmark", [])}
    assert marks == {"parametrize"}, f"the export test carries marks that can skip heads: {marks}"


def test_unknown_task_names_the_choices() -> None:
    with pytest.raises(D2VError, match="semantic-segmentation"):
        head_for(Modality.TEXT, "semantic-segmentation")


@pytest.mark.parametrize("head", [pytest.param(h, id=h.key) for h in HEADS])
def test_export_matches_pytorch(head: Head, tmp_path: Path) -> None:
    model, profile = tiny(head)
    graph = export(model, profile, tmp_path / "model.onnx")

    onnx.checker.check_model(str(graph.path), full_check=True)
    proto = onnx.load(str(graph.path))
    assert [i.name for i in proto.graph.input] == [t.name for t in graph.inputs]
    assert [o.name for o in proto.graph.output] == list(head.outputs)
    first = proto.graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param == "batch", "batch must be a named dynamic axis"
    if head.modality is not Modality.VISION:
        assert first[-1].dim_param in {"sequence", "samples"}, "sequence/time must be a named dynamic axis"

    points = shape_points(profile)
    assert len(points) >= 3 and trace_point(profile) not in points[:2]
    assert graph.check.passed, graph.check.detail
    assert graph.check.samples == len(points)
    assert graph.check.metrics["max_scaled_error"] <= head.tolerance


def test_mismatch_is_reported_with_the_worst_output(tmp_path: Path) -> None:
    """An artifact from other weights fails the check and the detail names the output and shape."""
    head = head_for(Modality.TEXT, "question-answering")
    model, profile = tiny(head)
    graph = export(model, profile, tmp_path / "model.onnx")
    import torch

    other = make_wrapper(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from d2v_export.backends.onnxruntime import OrtRunner

    with OrtRunner(graph.path, threads=1) as runner:
        drift = shape_check(model, other, runner.infer, profile)
    assert not drift.passed
    assert drift.failed == ("max_scaled_error",)
    assert "worst: output 'start_logits'" in drift.detail or "worst: output 'end_logits'" in drift.detail
    assert np.isfinite(drift.metrics["max_abs_error"]) and drift.metrics["max_abs_error"] > 1e-3
