"""The matrix: deterministic plan and shards, a real run with skipped and failed cells, the front; unknown targets
(exit 2), a matrix that measured nothing (exit 6), fp16/bf16 cells built."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from d2v_export import backends
from d2v_export.measure import bench
from d2v_export.matrix import Cell, exit_code, merge, nothing_measured, pareto, parse_shard, plan, run_matrix
from d2v_export.pipeline import ShapeRequest
from d2v_export.spec import D2VError, ExitCode, Precision

from .conftest import TINY_SHAPES, cli

QUICK = bench.BenchSettings(warmup=2, min_iterations=10, max_iterations=100, seconds=0.3, max_warmup_seconds=5.0)


def test_plan_is_deterministic_whatever_the_option_order() -> None:
    a = plan(["text", "vision"], ["openvino", "onnxruntime"], ["int8", "fp32"])
    b = plan(["vision", "text", "vision"], ["onnxruntime", "openvino"], ["fp32", "int8"])
    assert a == b
    assert a[0] == Cell("vision", "onnxruntime", "fp32") and a[1] == Cell("vision", "onnxruntime", "int8")
    assert [c.modality for c in a] == ["vision"] * 4 + ["text"] * 4


def test_shards_cover_the_plan_exactly_once() -> None:
    full = plan(["vision", "text", "audio"], ["onnxruntime", "openvino", "tensorrt"], ["fp32", "int8"])
    for n in (1, 2, 3, 5, 7, 40):
        shards = [
            plan(["vision", "text", "audio"], ["onnxruntime", "openvino", "tensorrt"], ["fp32", "int8"], shard=(i, n))
            for i in range(1, n + 1)
        ]
        seen = [c for s in shards for c in s]
        assert sorted(seen, key=full.index) == full and len(seen) == len(full)
    first = plan(["vision", "text", "audio"], ["onnxruntime", "openvino", "tensorrt"], ["fp32", "int8"], shard=(1, 4))
    assert first == [full[0], full[4], full[8], full[12], full[16]]  # 1-based i: cells i-1, i-1+n, ... (0-based)


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None and parse_shard("") is None
    for bad in ("0/4", "5/4", "1", "a/b", "1/0"):
        with pytest.raises(D2VError):
            parse_shard(bad)
    with pytest.raises(D2VError, match="unknown modality"):
        plan(["video"], ["onnxruntime"], ["fp32"])


def test_pareto_front() -> None:
    vs: list[dict[str, Any]] = [
        {"name": "fast-noisy", "p50_ms": 1.0, "drift_score": 0.8},
        {"name": "slow-exact", "p50_ms": 5.0, "drift_score": 0.001},
        {"name": "dominated", "p50_ms": 6.0, "drift_score": 0.5},
        {"name": "middle", "p50_ms": 2.0, "drift_score": 0.1},
        {"name": "no-latency", "p50_ms": None, "drift_score": 0.0},
    ]
    assert pareto(vs) == ["fast-noisy", "middle", "slow-exact"]


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """vision on onnxruntime (runs fp32; fp16 it does not build) and tensorrt (not available here); fp32 and fp16;
    text with a sequence range its checkpoint rejects (fails), so one failure does not stop the rest."""
    out = tmp_path_factory.mktemp("matrix") / "m"
    shapes = ShapeRequest(batch=TINY_SHAPES.batch, sequence=(8, 16, 100_000), audio_seconds=TINY_SHAPES.audio_seconds)
    messages: list[str] = []
    doc = run_matrix(
        "preset:tiny",
        ["vision", "text"],
        ["onnxruntime", "tensorrt"],
        ["fp32", "fp16"],
        out,
        shapes=shapes,
        bench=QUICK,
        threads=1,
        progress=messages.append,
    )
    return doc, out


def test_matrix_reports_every_cell_with_a_status(matrix_run: tuple[dict[str, Any], Path]) -> None:
    doc, out = matrix_run
    cells = {(c["modality"], c["target"], c["precision"]): c for c in doc["cells"]}
    assert len(cells) == 2 * 2 * 2
    assert cells[("vision", "onnxruntime", "fp32")]["status"] == "ran"
    ort_fp16 = cells[("vision", "onnxruntime", "fp16")]
    # the backend's own reason
    assert ort_fp16["status"] == "skipped" and ort_fp16["reason"] == "onnxruntime builds fp32 and int8, not fp16"
    assert ort_fp16["reason"] == backends.get("onnxruntime").precision_problem(Precision.FP16, "CPU")
    trt = cells[("vision", "tensorrt", "fp32")]
    if "tensorrt" in backends.names() and not backends.get("tensorrt").available().ok:
        assert trt["status"] == "skipped" and trt["reason"].startswith("target not available here")
        assert backends.get("tensorrt").available().reason in trt["reason"]
    text = cells[("text", "onnxruntime", "fp32")]
    assert text["status"] == "failed" and "sequence" in text["reason"] and "\n" not in text["reason"]
    assert exit_code(doc) == text["exit_code"] == int(ExitCode.BAD_INPUT)
    # files
    on_disk = json.loads((out / "matrix.json").read_text())
    assert on_disk["schema_version"] == "1.2" and on_disk["kind"] == "matrix"
    assert (
        (out / "matrix.md").read_text().count("| skipped |") == sum(c["status"] == "skipped" for c in doc["cells"]) >= 2
    )
    page = (out / "matrix.html").read_text()
    assert 'data-plot="pareto"' in page and "<script" not in page
    assert (out / cells[("vision", "onnxruntime", "fp32")]["report"]).exists()  # the cell's own report


def test_matrix_names_the_front(matrix_run: tuple[dict[str, Any], Path]) -> None:
    doc, _out = matrix_run
    vision = doc["modalities_detail"]["vision"]
    names = [v["name"] for v in vision["variants"]]
    assert names == ["onnxruntime-fp32"]
    assert vision["pareto"] == ["onnxruntime-fp32"]
    v = vision["variants"][0]
    assert v["p50_ms"] > 0 and v["drift_passed"] is True and 0 <= v["drift_score"] < 1
    assert v["device"] == "CPU"  # what it was measured on, from the cell's report
    assert v["key_metric"] == "max_scaled_error"
    assert "text" not in doc["modalities_detail"]
    assert re.search(r"front: onnxruntime-fp32", (_out / "matrix.md").read_text())


def test_merge_of_shards_equals_the_whole(matrix_run: tuple[dict[str, Any], Path]) -> None:
    doc, _out = matrix_run
    cells = doc["cells"]
    shard_docs = [dict(doc, cells=cells[i::3], shard=f"{i + 1}/3") for i in range(3)]
    merged = merge(shard_docs)
    assert merged["cells"] == cells
    assert merged["modalities_detail"]["vision"]["pareto"] == ["onnxruntime-fp32"]
    partial = merge(shard_docs[:2])
    assert any("in no shard" in w for w in partial["warnings"])


def test_existing_matrix_needs_force(matrix_run: tuple[dict[str, Any], Path]) -> None:
    _doc, out = matrix_run
    with pytest.raises(D2VError, match="--force"):
        run_matrix("preset:tiny", ["vision"], ["onnxruntime"], ["fp16"], out)


def test_a_matrix_that_measured_nothing_is_not_green(tmp_path: Path) -> None:
    """Every cell skipped: the document is written and says so, passed is false, and the exit code is 6 with the reason."""
    doc = run_matrix("preset:tiny", ["vision"], ["onnxruntime"], ["fp16"], tmp_path / "lib")
    assert [c["status"] for c in doc["cells"]] == ["skipped"] and doc["passed"] is False
    assert exit_code(doc) == int(ExitCode.TARGET_UNAVAILABLE)
    problem = nothing_measured(doc)
    assert (
        problem is not None
        and "measured nothing" in problem
        and "onnxruntime builds fp32 and int8, not fp16" in problem
    )
    out = tmp_path / "cli"
    res = cli(
        "matrix",
        "--model",
        "preset:tiny",
        "--modality",
        "vision",
        "--target",
        "onnxruntime",
        "--precision",
        "fp16",
        "--output",
        str(out),
    )
    assert res.returncode == int(ExitCode.TARGET_UNAVAILABLE), res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "measured nothing" in errors[0] and "d2v-export doctor" in errors[0], res.stderr
    assert json.loads((out / "matrix.json").read_text())["passed"] is False  # the record is kept: it says why
    # merging only skipped shards: the same verdict
    merged = cli("matrix-merge", str(out), "--output", str(tmp_path / "merged"))
    assert merged.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "measured nothing" in merged.stderr


def test_an_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    """A misspelt --target: exit 2 before anything runs, one line naming the registry's targets, nothing written."""
    out = tmp_path / "m"
    res = cli(
        "matrix", "--model", "preset:tiny", "--modality", "vision", "--target", "onnxruntim", "--output", str(out)
    )
    assert res.returncode == int(ExitCode.USAGE), res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "'onnxruntim'" in line and f"choose from: {', '.join(backends.names())}" in line
    assert not out.exists()
    with pytest.raises(D2VError, match="unknown target 'nope'") as err:
        run_matrix("preset:tiny", ["vision"], ["onnxruntime", "nope"], ["fp32"], out)
    assert err.value.code is ExitCode.USAGE and not out.exists()


def test_a_shard_with_no_cell_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(D2VError, match="holds no cell: the matrix has 1; use at most 1 shards") as err:
        run_matrix("preset:tiny", ["vision"], ["onnxruntime"], ["fp32"], tmp_path / "m", shard=(2, 3))
    assert err.value.code is ExitCode.USAGE and not (tmp_path / "m").exists()


def test_a_device_the_target_does_not_take_is_a_usage_error(tmp_path: Path) -> None:
    res = cli(
        "matrix",
        "--model",
        "preset:tiny",
        "--modality",
        "vision",
        "--target",
        "onnxruntime",
        "--precision",
        "fp32",
        "--device",
        "GPU",
        "--output",
        str(tmp_path / "m"),
    )
    assert res.returncode == int(ExitCode.USAGE) and "not a device of target onnxruntime" in res.stderr, res.stderr
    assert not (tmp_path / "m").exists()


def test_half_precision_cells_are_built(tmp_path: Path) -> None:
    """fp16 and bf16 cells run through the pipeline as --fp16/--bf16 do; bf16 is skipped, with the backend's
    reason, exactly where the backend says this CPU cannot build it."""
    ov = backends.get("openvino")
    if not ov.available().ok:
        pytest.skip(ov.available().reason)
    doc = run_matrix(
        "preset:tiny",
        ["vision"],
        ["openvino"],
        ["fp32", "fp16", "bf16"],
        tmp_path / "m",
        shapes=TINY_SHAPES,
        bench=QUICK,
        threads=1,
    )
    cells = {c["precision"]: c for c in doc["cells"]}
    assert cells["fp16"]["status"] == "ran" and [v["name"] for v in cells["fp16"]["variants"]] == ["openvino-fp16"]
    assert cells["fp16"]["variants"][0]["drift_passed"] is True and cells["fp16"]["variants"][0]["device"] == "CPU"
    bf16_problem = ov.precision_problem(Precision.BF16, "CPU")
    if bf16_problem is None:
        assert cells["bf16"]["status"] == "ran" and [v["precision"] for v in cells["bf16"]["variants"]] == ["bf16"]
    else:
        assert cells["bf16"]["status"] == "skipped" and cells["bf16"]["reason"] == bf16_problem
    assert exit_code(doc) == 0 and doc["passed"] is True
    report = json.loads((tmp_path / "m" / "cells" / "vision-openvino" / "report.json").read_text())
    assert {v["precision"] for v in report["variants"]} == {"fp32", "fp16"} | (
        {"bf16"} if bf16_problem is None else set()
    )


# --------------------------------------------------------------------------- issue 12


def test_speedup_compares_variants_on_one_footing() -> None:
    """Two runs with different reference timings: the faster variant must show the larger speedup."""
    from d2v_export.matrix import markdown, summarize

    def cell(target: str, ref: float, p50: float) -> dict[str, Any]:
        v = {
            "name": f"{target}-fp32",
            "p50_ms": p50,
            "drift_score": 0.1,
            "drift_passed": True,
            "speedup_vs_reference": round(ref / p50, 3),
        }
        return {
            "modality": "vision",
            "target": target,
            "precision": "fp32",
            "status": "ran",
            "task": "image-classification",
            "reference_p50_ms": ref,
            "variants": [v],
            "report": None,
        }

    cells = [cell("fast", 10.0, 5.0), cell("slow", 20.0, 6.0)]  # own-run speedups: 2.0 (faster) < 3.33 (slower)
    info = summarize(cells)["vision"]
    by = {v["name"]: v for v in info["variants"]}
    assert info["reference_p50_ms"] == 15.0
    assert (
        by["fast-fp32"]["speedup_vs_common_reference"] == 3.0 and by["slow-fp32"]["speedup_vs_common_reference"] == 2.5
    )
    # the own-run ratio is kept as it was
    assert by["slow-fp32"]["speedup_vs_reference"] > by["fast-fp32"]["speedup_vs_reference"]
    md = markdown({"model": "m", "cells": cells, "modalities_detail": summarize(cells)})
    assert "speedup vs common ref" in md and "one footing" in md
    assert "| fast-fp32 | 5.000 | 3.00× |" in md and "| slow-fp32 | 6.000 | 2.50× |" in md


def test_matrix_merge_needs_force_like_every_writing_command(
    matrix_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    import shutil

    shard = tmp_path / "shard"
    shutil.copytree(matrix_run[1], shard)
    doc = json.loads((shard / "matrix.json").read_text())
    doc["cells"] = [c for c in doc["cells"] if c["status"] != "failed"]  # a shard that ran and passed: exit 0
    (shard / "matrix.json").write_text(json.dumps(doc))
    out = tmp_path / "merged"
    assert cli("matrix-merge", str(shard), "--output", str(out)).returncode == 0
    before = (out / "matrix.json").read_text()
    res = cli("matrix-merge", str(shard), "--output", str(out))
    assert (
        res.returncode == int(ExitCode.BAD_INPUT)
        and "--force" in res.stderr
        and "already holds a matrix.json" in res.stderr
    )
    assert (out / "matrix.json").read_text() == before
    res = cli("matrix-merge", str(shard), "--output", str(out), "--force")
    assert res.returncode == 0, res.stderr


def test_matrix_int8_knobs_need_an_int8_cell(tmp_path: Path) -> None:
    res = cli(
        "matrix",
        "--model",
        "preset:tiny",
        "--modality",
        "vision",
        "--target",
        "onnxruntime",
        "--precision",
        "fp32",
        "--max-drift",
        "top1_agreement=0.5",
        "--output",
        str(tmp_path / "m"),
    )
    assert res.returncode == int(ExitCode.BAD_INPUT) and "--precision int8" in res.stderr


def test_matrix_defer_build_and_int8_knobs_reach_the_runs(tmp_path: Path) -> None:
    """`matrix` names --defer-build when TensorRT is missing, and now has it; the INT8 knobs reach each run."""
    trt = backends.get("tensorrt")
    if trt.available().ok:
        pytest.skip("TensorRT builds here: nothing is deferred")
    out = tmp_path / "m"
    common = (
        "matrix",
        "--model",
        "preset:tiny",
        "--modality",
        "vision",
        "--target",
        "tensorrt",
        "--precision",
        "fp32",
        "--precision",
        "int8",
        "--bench-seconds",
        "0",
        "--quiet",
        "--threads",
        "1",
    )
    plain = cli(*common, "--output", str(out / "plain"))
    # every cell skipped: not green
    assert plain.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "measured nothing" in plain.stderr
    skipped = json.loads((out / "plain" / "matrix.json").read_text())
    assert all(c["status"] == "skipped" and "--defer-build" in c["reason"] for c in skipped["cells"])
    # budgets no INT8 graph can miss (agreement >= 0, cosine >= -1): the verdict is exactly "passed", exit 0
    res = cli(
        *common,
        "--defer-build",
        "--calib-samples",
        "4",
        "--eval-samples",
        "4",
        "--max-drift",
        "top1_agreement=0,logit_cosine=-1",
        "--output",
        str(out / "deferred"),
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "deferred" / "matrix.json").read_text())
    assert [c["status"] for c in doc["cells"]] == ["ran", "ran"]
    assert all("deferred build" in c["reason"] and all(v["simulated"] for v in c["variants"]) for c in doc["cells"])
    assert all(c["variants"][0]["device"] in c["reason"] for c in doc["cells"])  # the reason names the stand-in
    assert doc["modalities_detail"]["vision"]["pareto"] == []  # simulated latency is not the target's: off the front
    report = json.loads((out / "deferred" / "cells" / "vision-tensorrt" / "report.json").read_text())
    (int8,) = [v for v in report["variants"] if v["precision"] == "int8"]
    assert int8["drift"]["budget"]["top1_agreement"] == 0 and int8["quantization"]["samples"] == 4
    assert int8["deploy_device"] == "cuda:0" and "simulation" in int8["device"] and "not built yet" in int8["device"]


def test_merge_gates_on_the_last_baseline(matrix_run: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    """matrix-merge --baseline: the same runs pass; a run 3x slower fails with exit 7 and comparison.md names it."""
    import shutil

    from d2v_export.matrix import compare_to_baseline, merge_files

    from .conftest import cli

    _doc, out = matrix_run

    def shard(where: Path) -> Path:
        shutil.copytree(out, where)
        doc = json.loads((where / "matrix.json").read_text())
        doc["cells"] = [c for c in doc["cells"] if c["status"] != "failed"]  # the gate alone decides the exit code
        (where / "matrix.json").write_text(json.dumps(doc))
        return where

    merge_files([shard(tmp_path / "last" / "shard-1")], tmp_path / "last" / "merged")
    cur = shard(tmp_path / "now" / "shard-1")
    same = compare_to_baseline(
        merge_files([cur], tmp_path / "now" / "merged"), tmp_path / "now" / "merged", tmp_path / "last" / "merged"
    )
    assert same["passed"] and [r["run"] for r in same["runs"]] == ["vision/onnxruntime"]

    report = next(cur.rglob("report.json"))
    doc = json.loads(report.read_text())
    for v in doc["variants"]:
        lat = v["latency_ms"]
        for k, value in list(lat.items()):
            if k in ("samples",):
                lat[k] = [3 * x for x in value]
            elif isinstance(value, float):
                lat[k] = 3 * value
    report.write_text(json.dumps(doc))
    res = cli(
        "matrix-merge",
        str(cur),
        "--output",
        str(tmp_path / "now" / "gated"),
        "--baseline",
        str(tmp_path / "last" / "merged"),
    )
    assert res.returncode == int(ExitCode.REGRESSION), res.stderr
    gate = json.loads((tmp_path / "now" / "gated" / "comparison.json").read_text())
    assert not gate["passed"] and gate["runs"][0]["regressions"] == ["onnxruntime-fp32"]
    assert "Regression" in (tmp_path / "now" / "gated" / "comparison.md").read_text()
