"""Regression comparison on real measurements: identical runs compare clean, a real slowdown flags.

The latency documents are real: a tiny Data2Vec vision model is exported and run through the
pipeline once, then its ONNX Runtime artifact is timed again with bench.measure_full. Drift changes
are simulated by editing a copy of that real report's drift metrics (a model change we cannot make
happen on purpose).
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from d2v_export.measure import bench
from d2v_export.reports import compare as cmp
from d2v_export.backends.base import RunnerBase
from d2v_export.backends.onnxruntime import OrtRunner
from d2v_export.spec import D2VError, ExitCode

from .conftest import TINY_SHAPES

QUICK = bench.BenchSettings(warmup=2, min_iterations=20, max_iterations=400, seconds=0.8, max_warmup_seconds=5.0)


@functools.lru_cache(maxsize=None)
def tiny_vision_report() -> tuple[str, str]:
    """Run the real pipeline once per process on preset:tiny (vision); (report.json text, folder)."""
    from d2v_export.models import parse_source
    from d2v_export.pipeline import RunOptions, run
    from d2v_export.spec import Modality

    root = Path(tempfile.mkdtemp(prefix="d2v-compare-"))
    atexit.register(shutil.rmtree, root, True)  # cached for the process: removed when it ends
    out = root / "run"
    run(parse_source("preset:tiny", Modality.VISION, None), TINY_SHAPES, RunOptions(output=out, bench=QUICK, threads=1))
    return (out / "report.json").read_text(encoding="utf-8"), str(out)


def real_doc() -> dict[str, Any]:
    text, _folder = tiny_vision_report()
    return json.loads(text)


@pytest.fixture(scope="module")
def report_doc() -> dict[str, Any]:
    return real_doc()


@pytest.fixture(scope="module")
def onnx_path(report_doc: dict[str, Any]) -> Path:
    _text, folder = tiny_vision_report()
    return Path(folder) / "onnxruntime-fp32" / "model.onnx"


@pytest.fixture(scope="module")
def feed(report_doc: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    size = report_doc["export"]["static"]["image_size"]
    return {"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)}


class Twice(RunnerBase):
    """A runner that really does the work twice: a real, measurable slowdown."""

    def __init__(self, runner: OrtRunner) -> None:
        self.runner = runner
        self.name = "twice"

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runner.infer(feed)
        return self.runner.infer(feed)


def with_latency(doc: Mapping[str, Any], stats: Any) -> dict[str, Any]:
    """A copy of a real report whose onnxruntime-fp32 latency is replaced by a real measurement."""
    out = copy.deepcopy(dict(doc))
    from d2v_export.reports.report import latency_dict

    out["variants"][0]["latency_ms"] = latency_dict(stats)
    return out


# ---------------------------------------------------------------------------------- bench


def test_warm_up_continues_until_timings_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock, like the cap test below: real sleeps on a loaded machine blur slow calls into steady ones.
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Slow(RunnerBase):
        """Slow for its first calls (like PyTorch), then steady."""

        name = "slow-start"

        def __init__(self) -> None:
            self.calls = 0

        def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.calls += 1
            clock[0] += 0.05 if self.calls <= 6 else 0.005
            return {}

    runner = Slow()
    settings = bench.BenchSettings(
        warmup=2, min_iterations=10, max_iterations=10, seconds=0.0, max_warmup_seconds=10.0, settle_tolerance=0.2
    )
    result = bench.measure_full({"slow": runner}, {}, batch=1, shape={}, settings=settings)
    # the medians of two windows of 5 agree once the earlier window holds at most 2 of the 6 slow calls: round 14
    assert result.warmup_rounds == 6 + settings.settle_window + 3
    assert result.settled == {"slow": True}
    stats = result.stats["slow"]
    # no slow start in the timed runs
    assert stats.n == 10 and stats.samples_ms == pytest.approx((5.0,) * 10), stats.samples_ms
    assert result.to_dict()["timed_rounds"] == 10


def test_warm_up_is_capped_when_timings_never_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: with real sleeps a loaded machine stretched the 1 ms blocks until they "settled".
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Alternating(RunnerBase):
        name = "alternating"
        calls = 0

        def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.calls += 1
            clock[0] += 0.001 * (1 + (self.calls // 5) % 2 * 4)  # 1 ms and 5 ms in blocks of five
            return {}

    settings = bench.BenchSettings(warmup=1, min_iterations=3, max_iterations=3, seconds=0.0, max_warmup=12)
    result = bench.measure_full({"a": Alternating()}, {}, batch=1, shape={}, settings=settings)
    assert result.warmup_rounds == 12
    assert result.stats["a"].n == 3


def test_is_settled() -> None:
    assert not bench.is_settled([1.0] * 9, 5, 0.05)
    assert bench.is_settled([1.0] * 10, 5, 0.05)
    assert not bench.is_settled([2.0] * 5 + [1.0] * 5, 5, 0.05)
    assert bench.is_settled([9.0, 1.0, 1.0, 1.0, 1.0, 1.02, 1.0, 1.0, 1.0, 1.0], 5, 0.05)  # medians ignore one outlier


def test_measure_keeps_the_signature(onnx_path: Path, feed: dict[str, np.ndarray]) -> None:
    with OrtRunner(onnx_path, 1) as r:
        stats = bench.measure(
            {"ort": r}, feed, batch=1, shape={"batch": 1}, settings=bench.BenchSettings(seconds=0.1, min_iterations=5)
        )
    assert stats["ort"].n >= 5 and len(stats["ort"].samples_ms) == stats["ort"].n


# ---------------------------------------------------------------------------------- latency


def test_identical_runs_compare_clean(report_doc: dict[str, Any], onnx_path: Path, feed: dict[str, np.ndarray]) -> None:
    """Two sessions of the same model, timed interleaved: two identical runs under the same load."""
    with OrtRunner(onnx_path, 1) as a, OrtRunner(onnx_path, 1) as b:
        result = bench.measure_full({"a": a, "b": b}, feed, batch=1, shape={"batch": 1}, settings=QUICK)
    run_a, run_b = with_latency(report_doc, result.stats["a"]), with_latency(report_doc, result.stats["b"])
    for base, cur in ((run_a, run_b), (run_b, run_a)):
        c = cmp.compare(base, cur)
        row = next(v for v in c.variants if v.name == "onnxruntime-fp32")
        assert row.verdict == cmp.UNCHANGED, cmp.markdown(c)
        assert cmp.exit_code(c) == 0 and c.passed
        assert row.latency is not None and row.latency.n_baseline >= 20


def test_a_real_slowdown_is_flagged(report_doc: dict[str, Any], onnx_path: Path, feed: dict[str, np.ndarray]) -> None:
    """The same model, but the current run does the work twice per call: measured, not made up."""
    with OrtRunner(onnx_path, 1) as a, OrtRunner(onnx_path, 1) as b:
        result = bench.measure_full({"base": a, "slow": Twice(b)}, feed, batch=1, shape={"batch": 1}, settings=QUICK)
    base, slow = with_latency(report_doc, result.stats["base"]), with_latency(report_doc, result.stats["slow"])
    c = cmp.compare(base, slow, latency_tolerance=cmp.parse_tolerance("10%"))
    row = next(v for v in c.variants if v.name == "onnxruntime-fp32")
    assert row.verdict == cmp.REGRESSION, cmp.markdown(c)
    assert row.latency is not None and row.latency.ratio is not None and row.latency.ratio > 1.3
    assert row.latency.p_value is not None and row.latency.p_value < 0.01
    assert row.latency.p10_ratio is not None and row.latency.p10_ratio > 1.3  # the whole distribution moved
    assert cmp.exit_code(c) == int(ExitCode.REGRESSION) == 7
    assert "regression" in cmp.markdown(c).lower()
    # and the other way round it is an improvement, which passes
    back = cmp.compare(slow, base)
    assert next(v for v in back.variants if v.name == "onnxruntime-fp32").verdict == cmp.IMPROVEMENT
    assert cmp.exit_code(back) == 0
    # a tolerance above the slowdown does not flag it
    loose = cmp.compare(base, slow, latency_tolerance=5.0)
    assert next(v for v in loose.variants if v.name == "onnxruntime-fp32").verdict == cmp.UNCHANGED


def test_relative_to_reference_cancels_a_uniformly_slower_machine(report_doc: dict[str, Any]) -> None:
    """Arithmetic of the normalization: every timing of a run scaled alike (a data edit) is no regression."""
    base = copy.deepcopy(report_doc)
    # steady timings (a loaded test machine can leave the measured ones too spread for a 1.6x shift to be
    # significant on a handful of runs): the test is about the normalization, not about this machine
    for lat in [base["reference"]["latency_ms"]] + [v["latency_ms"] for v in base["variants"]]:
        lat["samples"] = [lat["p50"] * (1 + 0.002 * i) for i in range(20)]
    report_doc = base
    slower = copy.deepcopy(report_doc)
    for lat in [slower["reference"]["latency_ms"]] + [v["latency_ms"] for v in slower["variants"]]:
        lat["samples"] = [s * 1.6 for s in lat["samples"]]
        for k in ("p50", "p90", "p99", "mean"):
            lat[k] *= 1.6
    absolute = cmp.compare(report_doc, slower)
    relative = cmp.compare(report_doc, slower, relative_to_reference=True)
    assert next(v for v in absolute.variants if v.name == "onnxruntime-fp32").verdict == cmp.REGRESSION
    row = next(v for v in relative.variants if v.name == "onnxruntime-fp32")
    assert row.verdict == cmp.UNCHANGED and row.latency is not None and row.latency.ratio == pytest.approx(1.0)
    ref = next(v for v in absolute.variants if v.name == cmp.REFERENCE)
    assert ref.verdict == cmp.REGRESSION and not ref.gating  # shown, never gating


# ---------------------------------------------------------------------------------- drift


def test_a_drift_change_is_flagged(report_doc: dict[str, Any]) -> None:
    worse = copy.deepcopy(report_doc)
    drift = worse["variants"][0]["drift"]
    drift["metrics"]["max_scaled_error"] = 0.02  # the model changed: far over 1e-4
    drift["passed"], drift["failed"] = False, ["max_scaled_error"]
    c = cmp.compare(report_doc, worse)
    row = next(v for v in c.variants if v.name == "onnxruntime-fp32")
    assert row.verdict == cmp.REGRESSION and cmp.exit_code(c) == 7
    assert row.passed_before is True and row.passed_now is False
    change = next(m for m in row.drift if m.metric == "max_scaled_error")
    assert change.flagged and change.worse_by == pytest.approx(0.02, rel=1e-3)


def test_agreement_metrics_use_their_direction(report_doc: dict[str, Any]) -> None:
    def with_top1(value: float) -> dict[str, Any]:
        doc = copy.deepcopy(report_doc)
        d = doc["variants"][0]["drift"]
        d["metrics"]["top1_agreement"] = value
        d["budget"]["top1_agreement"] = 0.9
        return doc

    base = with_top1(1.0)
    assert (
        next(v for v in cmp.compare(base, with_top1(0.99)).variants if v.name == "onnxruntime-fp32").verdict
        == cmp.REGRESSION
    )
    assert (
        next(v for v in cmp.compare(base, with_top1(0.998)).variants if v.name == "onnxruntime-fp32").verdict
        == cmp.UNCHANGED
    )  # within 0.005
    better = cmp.compare(with_top1(0.95), with_top1(1.0))
    assert next(v for v in better.variants if v.name == "onnxruntime-fp32").verdict != cmp.REGRESSION


def test_a_counted_metric_is_a_regression_only_beyond_its_noise(report_doc: dict[str, Any]) -> None:
    """Two answers of 240 (0.0083) are worse than the 0.005 tolerance, but not beyond the noise of 240 items."""
    from d2v_export.measure.confidence import Count, bounds

    def with_agreement(k: int, n: int) -> dict[str, Any]:
        doc = copy.deepcopy(report_doc)
        d = doc["variants"][0]["drift"]
        d["metrics"]["top1_agreement"], d["budget"]["top1_agreement"] = k / n, 0.9
        d["bounds"], d["confidence"] = {"top1_agreement": list(bounds(Count(k, n), 0.95))}, {"top1_agreement": 0.95}
        return doc

    def row(c: Any) -> Any:
        return next(v for v in c.variants if v.name == "onnxruntime-fp32")

    noisy = row(cmp.compare(with_agreement(240, 240), with_agreement(238, 240)))
    change = next(m for m in noisy.drift if m.metric == "top1_agreement")
    assert noisy.verdict == cmp.UNCHANGED and not change.flagged and "within its noise" in change.reason
    # the same share, 10x the items
    assert row(cmp.compare(with_agreement(2400, 2400), with_agreement(2380, 2400))).verdict == cmp.REGRESSION
    # 20 answers: real
    assert row(cmp.compare(with_agreement(240, 240), with_agreement(220, 240))).verdict == cmp.REGRESSION


def test_new_and_missing_variants(report_doc: dict[str, Any]) -> None:
    renamed = copy.deepcopy(report_doc)
    renamed["variants"][0]["name"] = "openvino-fp32"
    c = cmp.compare(report_doc, renamed)
    verdicts = {v.name: v.verdict for v in c.variants}
    assert verdicts["openvino-fp32"] == cmp.NEW and verdicts["onnxruntime-fp32"] == cmp.MISSING
    assert cmp.exit_code(c) == 0
    json.dumps(cmp.to_dict(c))  # serializable


def test_identical_documents_compare_clean_and_write(report_doc: dict[str, Any], tmp_path: Path) -> None:
    c = cmp.compare(report_doc, report_doc)
    assert c.passed and not c.warnings
    assert all(v.verdict == cmp.UNCHANGED for v in c.variants)
    j, m = cmp.write(c, tmp_path)
    assert json.loads(j.read_text())["exit_code"] == 0
    assert "| variant | verdict |" in m.read_text()


# ---------------------------------------------------------------------------------- input


def test_parse_tolerance() -> None:
    assert cmp.parse_tolerance("10%") == pytest.approx(0.1)
    assert cmp.parse_tolerance("0.1") == pytest.approx(0.1)
    assert cmp.parse_tolerance(" 2.5 % ") == pytest.approx(0.025)
    assert cmp.parse_tolerance(0.2) == pytest.approx(0.2)
    for bad in ("ten", "-5%", "nan", ""):
        with pytest.raises(D2VError):
            cmp.parse_tolerance(bad)


def test_load_report_errors(tmp_path: Path, report_doc: dict[str, Any]) -> None:
    with pytest.raises(D2VError, match="does not exist"):
        cmp.load_report(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(D2VError, match="not valid JSON"):
        cmp.load_report(bad)
    future = tmp_path / "future.json"
    future.write_text(json.dumps(dict(report_doc, schema_version="2.0")))
    with pytest.raises(D2VError, match="schema_version 2.0"):
        cmp.load_report(future)
    good = tmp_path / "good"
    good.mkdir()
    (good / "report.json").write_text(json.dumps(report_doc))
    assert cmp.load_report(good)["schema_version"].startswith("1.")
    for exc in (pytest.raises(D2VError),):
        with exc as info:
            cmp.load_report(bad)
        assert "\n" not in str(info.value)


def test_drift_score() -> None:
    assert cmp.drift_score(
        {"metrics": {"max_scaled_error": 1e-5}, "budget": {"max_scaled_error": 1e-4}}
    ) == pytest.approx(0.1)
    assert cmp.drift_score({"metrics": {"top1_agreement": 0.99}, "budget": {"top1_agreement": 0.98}}) == pytest.approx(
        0.5
    )
    # the worst metric decides; a budget metric that was not measured is ignored like metrics.judge does
    d = {
        "metrics": {"top1_agreement": 0.97, "logit_cosine": 0.999},
        "budget": {"top1_agreement": 0.98, "logit_cosine": 0.99, "accuracy_drop": 0.005},
    }
    assert cmp.drift_score(d) == pytest.approx(1.5)
    assert cmp.drift_score(None) is None
