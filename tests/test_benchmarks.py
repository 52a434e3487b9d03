"""benchmarks/peers.py --quick: one smoke run on a tiny preset writes the tables and keeps hand-written text."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peers() -> object:
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_performance_tables(tmp_path: Path) -> None:
    peers = _peers()
    out = tmp_path / "PERFORMANCE.md"
    out.write_text(
        "# Perf\n\nhand-written intro\n\n"
        + peers.BEGIN
        + "\nold\n"
        + peers.END
        + "\n\n## Levers\n\nhand-written levers\n"
    )  # type: ignore[attr-defined]
    raw = tmp_path / "r.json"
    assert peers.main(["--quick", "--modalities", "text", "--out", str(out), "--json", str(raw)]) == 0  # type: ignore[attr-defined]
    text = out.read_text()
    assert "hand-written intro" in text and "hand-written levers" in text and "\nold\n" not in text
    for needle in (
        "pytorch-fp32",
        "peer: ORT fp32 (TorchScript export)",
        "peer: ORT INT8 dynamic avx512_vnni",
        "peer: OpenVINO + NNCF INT8",
        "d2v: onnxruntime-int8-static",
        "d2v: openvino-int8-static",
        "d2v: openvino-int8-static-raw",
        "× fastest peer",
        "× int8 floor",
        "Random weights",
        "Load average",
        "GOP/s",
        "Summary: `--pick` against the fastest peer",
        "where the time goes",
        "int8 GEMM (MatMul/FC, Conv)",
        "fixed shapes",
    ):
        assert needle in text, needle
    doc = json.loads(raw.read_text())
    assert doc["ceiling"]["int8"] > 0 and doc["ceiling"]["fp32"] > 0
    (result,) = doc["results"]
    paths = {p["name"]: p for p in result["paths"]}
    assert paths["d2v: onnxruntime-int8-dynamic"]["drift"] and paths["peer: OpenVINO + NNCF INT8"]["drift"]
    # the per-op breakdown: every profiled path has time in its GEMM groups
    breakdown = result["breakdown"]["paths"]
    assert {"d2v: openvino-int8-static", "d2v: onnxruntime-int8-static", "peer: OpenVINO + NNCF INT8"} <= set(breakdown)
    assert all(sum(groups.values()) > 0 for groups in breakdown.values())
    for point in result["points"]:
        assert point["gflops"] > 0
        assert all(v > 0 for v in point["p50_ms"].values())
