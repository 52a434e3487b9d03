"""--pick: candidates judged, timed interleaved, the fastest within budget shipped, every other one explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2v_export.int8.pick import choose, kept
from d2v_export.spec import Drift, LatencyStats, Precision, Variant

from .conftest import cli


def _variant(
    name: str, target: str, precision: Precision, p50: float, passed: bool = True, p90: float | None = None
) -> Variant:
    agreement = 1.0 if precision is Precision.FP32 else 0.99 if passed else 0.5
    drift = Drift(
        "pytorch-fp32",
        16,
        {"top1_agreement": agreement},
        {"top1_agreement": 0.98},
        passed,
        () if passed else ("top1_agreement",),
    )
    lat = LatencyStats(
        p50=p50, p90=p90 if p90 is not None else p50 * 1.1, p99=p50 * 1.2, mean=p50, stdev=0.1, n=10, batch=1
    )
    return Variant(target, precision, name, drift, lat, 1.0)


def test_choose_takes_the_fastest_within_budget_and_says_why_the_others_lost() -> None:
    variants = [
        _variant("onnxruntime-fp32", "onnxruntime", Precision.FP32, 10.0),
        # fastest but over budget
        _variant("onnxruntime-int8-static", "onnxruntime", Precision.INT8, 4.0, passed=False),
        _variant("onnxruntime-int8-dynamic", "onnxruntime", Precision.INT8, 6.0),
        _variant("tensorrt-int8-static", "tensorrt", Precision.INT8, 1.0),  # deferred: simulated on ORT here
        _variant("openvino-int8-static", "openvino", Precision.INT8, 5.0),
    ]
    pick = choose(variants, {"openvino-int8-static": "NNCF mixed"}, "classification", deferred={"tensorrt"})
    assert pick["artifact"] == "openvino-int8-static" and pick["candidate"] == "NNCF mixed"
    assert "1.20x faster than the next (onnxruntime-int8-dynamic" in pick["why"]
    outcome = {c["name"]: c["outcome"] for c in pick["candidates"]}
    assert outcome["openvino-int8-static"] == "picked"
    assert outcome["onnxruntime-int8-static"].startswith("over the drift budget (top1_agreement")
    assert outcome["tensorrt-int8-static"].startswith("not measured on its own runtime")
    assert outcome["onnxruntime-int8-dynamic"].startswith("slower: 6.00 ms vs 5.00 ms (1.20x")
    assert pick["candidates"][0]["name"] == "openvino-int8-static"
    # the front: nothing on it is both slower and further from the reference than another candidate
    assert {"onnxruntime-fp32", "openvino-int8-static"} <= set(pick["front"])
    assert "onnxruntime-int8-dynamic" not in pick["front"] and "tensorrt-int8-static" not in pick["front"]
    assert sorted(kept(variants, pick)) == ["onnxruntime-fp32", "openvino-int8-static"]


def test_choose_uses_the_profile_percentile_and_lets_fp32_win() -> None:
    class Profile:
        latency_percentile = "p90"

    variants = [
        _variant("openvino-fp32", "openvino", Precision.FP32, 10.0, p90=10.5),
        _variant("openvino-int8-static", "openvino", Precision.INT8, 9.0, p90=14.0),  # faster median, worse tail
    ]
    pick = choose(variants, {}, "classification", Profile())
    assert pick["artifact"] == "openvino-fp32" and pick["statistic"] == "p90"


def test_pick_from_the_cli_ships_the_fastest_candidate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli(
        "text",
        "--model",
        "preset:tiny",
        "--target",
        "onnxruntime",
        "--target",
        "openvino",
        "--pick",
        "--sequence-length",
        "8:16:32",
        "--bench-seconds",
        "0.5",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "report.json").read_text())
    pick = doc["pick"]
    names = {c["name"] for c in pick["candidates"]}
    # both targets' levers were candidates, the clean-up on and off, and fp32
    assert {
        "onnxruntime-fp32",
        "onnxruntime-int8-static",
        "onnxruntime-int8-dynamic",
        "onnxruntime-int8-static-clean",
        "openvino-fp32",
        "openvino-int8-static",
        "openvino-int8-static-raw",
        "openvino-int8-dynamic",
    } <= names
    eligible = [c for c in pick["candidates"] if c["drift_passed"]]
    assert pick["name"] == min(eligible, key=lambda c: c["compared_ms"])["name"]
    # shipped: the pick and each target's fp32; the losers' folders are gone, their records kept
    shipped = sorted(v["name"] for v in doc["variants"])
    assert shipped == sorted({pick["name"], "onnxruntime-fp32", "openvino-fp32"})
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == shipped
    assert (out / pick["name"] / "manifest.json").is_file()
    assert doc["passed"] is True
    assert f"picked: {pick['name']}" in r.stdout


@pytest.mark.parametrize("flag", ["--no-rewrite"])
def test_the_clean_up_has_an_off_switch(tmp_path: Path, flag: str) -> None:
    out = tmp_path / "o"
    r = cli(
        "text",
        "--model",
        "preset:tiny",
        "--target",
        "openvino",
        "--bench-seconds",
        "0",
        "--sequence-length",
        "8:16:32",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    notes = json.loads((out / "report.json").read_text())["variants"][0]["notes"]
    assert any(n.startswith("graph clean-up before compiling (exact): fold_query_scale") for n in notes)
    r = cli(
        "text",
        "--model",
        "preset:tiny",
        "--target",
        "openvino",
        "--bench-seconds",
        "0",
        "--sequence-length",
        "8:16:32",
        flag,
        "--output",
        str(out),
        "--force",
    )
    assert r.returncode == 0, r.stderr
    notes = json.loads((out / "report.json").read_text())["variants"][0]["notes"]
    assert not any(n.startswith("graph clean-up") for n in notes)
