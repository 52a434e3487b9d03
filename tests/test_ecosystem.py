"""Bundles load in optimum's ORTModelFor* / optimum-intel's OVModelFor* where those import.

optimum-onnx pins transformers<4.58 and cannot be installed beside transformers 5 (docs/DESIGN.md), so
on the project's machines these tests skip with that reason; they run wherever optimum is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from d2v_export.bench import BenchSettings
from d2v_export.models import parse_source
from d2v_export.pipeline import RunOptions, run
from d2v_export.spec import Modality

from .conftest import TINY_SHAPES


def _bundle(tmp_path: Path, target: str) -> Path:
    spec = parse_source("preset:tiny", Modality.TEXT, "text-classification")
    run(spec, TINY_SHAPES, RunOptions(output=tmp_path / "out", targets=(target,), bench=BenchSettings(seconds=0, min_iterations=1, warmup=1)))
    return tmp_path / "out" / f"{target}-fp32"


def test_onnxruntime_bundle_loads_in_optimum(tmp_path: Path) -> None:
    optimum_ort = pytest.importorskip("optimum.onnxruntime", reason="optimum is not installed (it pins transformers<4.58; see docs/DESIGN.md)")
    folder = _bundle(tmp_path, "onnxruntime")
    model = optimum_ort.ORTModelForSequenceClassification.from_pretrained(folder)
    out = model(input_ids=np.array([[0, 100, 2]]), attention_mask=np.ones((1, 3), dtype=np.int64))
    assert out.logits.shape == (1, 2)


def test_openvino_bundle_loads_in_optimum_intel(tmp_path: Path) -> None:
    optimum_ov = pytest.importorskip("optimum.intel", reason="optimum-intel is not installed (it pins transformers<4.58; see docs/DESIGN.md)")
    folder = _bundle(tmp_path, "openvino")
    model = optimum_ov.OVModelForSequenceClassification.from_pretrained(folder)
    out = model(input_ids=np.array([[0, 100, 2]]), attention_mask=np.ones((1, 3), dtype=np.int64))
    assert out.logits.shape == (1, 2)
