"""Cold start per artifact in report.json/md (issue 24, part 3): each artifact opened and run once in a child
process of its own, with the time to import the runtime, open the artifact and run it once, and its peak RSS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2v_export import backends
from d2v_export.measure.bench import BenchSettings
from d2v_export.measure.cold_start import measure
from d2v_export.models import parse_source
from d2v_export.pipeline import RunOptions, run
from d2v_export.spec import Artifact, Modality, Precision

from .conftest import TINY_SHAPES

TARGETS = tuple(t for t in ("onnxruntime", "openvino") if backends.get(t).available().ok)
QUICK = dict(warmup=1, min_iterations=3, max_warmup=3, seconds=0.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cold") / "out"
    spec = parse_source("preset:tiny", Modality.TEXT, "text-classification")
    run(
        spec,
        TINY_SHAPES,
        RunOptions(output=out, targets=TARGETS, threads=1, bench=BenchSettings(**QUICK, cold_start=True)),
    )
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_every_variant_has_its_cold_start_from_a_child_process(report: tuple[Path, dict]) -> None:
    out, doc = report
    assert [v["target"] for v in doc["variants"]] == list(TARGETS)
    for v in doc["variants"]:
        c = v["cold_start"]
        assert c["measured_in"] == "child process"
        assert c["import_ms"] > 0 and c["open_ms"] > 0 and c["first_inference_ms"] > 0, c
        # the artifact's share is what opening and running it added above the runtime's baseline
        assert c["peak_rss_mb"] > c["baseline_rss_mb"] > 20, c
        assert c["artifact_rss_mb"] == pytest.approx(c["peak_rss_mb"] - c["baseline_rss_mb"], abs=0.11)
        assert c["artifact_rss_mb"] > 0.5, c
        # a clean child: neither PyTorch (300 MB and more) nor the run's other artifacts are in its baseline
        assert c["baseline_rss_mb"] < 250, c
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Cold start" in md
    for v in doc["variants"]:
        assert f"| {v['name']} | {v['cold_start']['import_ms']:.0f} | {v['cold_start']['open_ms']:.0f} |" in md


def test_bench_seconds_0_skips_it_unless_asked() -> None:
    assert not BenchSettings(seconds=0).measures_cold_start  # --bench-seconds 0: the quickest run
    assert BenchSettings(seconds=0.5).measures_cold_start and BenchSettings().measures_cold_start
    assert BenchSettings(seconds=0, cold_start=True).measures_cold_start
    assert not BenchSettings(seconds=8, cold_start=False).measures_cold_start


def test_a_run_with_bench_seconds_0_writes_null(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = parse_source("preset:tiny", Modality.TEXT, "text-classification")
    result = run(spec, TINY_SHAPES, RunOptions(output=out, threads=1, bench=BenchSettings(**QUICK)))
    assert [v.cold_start for v in result.variants] == [None]
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert doc["variants"][0]["cold_start"] is None and "## Cold start" not in (out / "report.md").read_text(
        encoding="utf-8"
    )


def test_a_child_that_fails_gives_no_numbers_and_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "onnxruntime-fp32"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    np.savez(tmp_path / "feed.npz", input_ids=np.ones((1, 8), np.int64))
    artifact = Artifact("onnxruntime", Precision.FP32, folder, folder / "model.onnx", (folder / "model.onnx",))
    result, why = measure(artifact, tmp_path / "feed.npz", threads=1)
    assert result is None
    assert why.startswith("the child process exited with 1:") and "onnx" in why.lower(), why
