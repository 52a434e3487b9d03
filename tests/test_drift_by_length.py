"""INT8 audio drift against input length in report.json/md (issue 24, part 1): each INT8 audio variant against
PyTorch on one input at the profile's min, opt and max length, so that drift growing with length shows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from d2v_export.measure.bench import BenchSettings
from d2v_export.heads import HEADS, SAMPLING_RATE
from d2v_export.models import parse_source
from d2v_export.options import QuantOptions
from d2v_export.pipeline import RunOptions, run
from d2v_export.spec import Modality
from d2v_export.convert.validate import drift_by_length, length_feeds

from .conftest import TINY_SHAPES

CTC = next(h for h in HEADS if h.modality is Modality.AUDIO and h.metric == "ctc")


def test_length_feeds_join_the_samples_and_cut_them_to_each_length() -> None:
    a = np.concatenate([np.arange(1, 6, dtype=np.float32), np.zeros(3, np.float32)])[
        None
    ]  # 5 samples, zero-padded to 8
    b = np.full((1, 4), 9.0, np.float32)
    feeds = length_feeds([{"input_values": a}, {"input_values": b}], [3, 9, 20])
    assert [f["input_values"].shape for f in feeds] == [(1, 3), (1, 9), (1, 20)]
    joined = [1, 2, 3, 4, 5, 9, 9, 9, 9]  # the padding dropped
    assert feeds[1]["input_values"][0].tolist() == joined
    assert feeds[2]["input_values"][0].tolist() == (joined * 3)[:20]  # repeated up to the longest


def test_drift_by_length_shows_drift_that_grows_with_length() -> None:
    model = SimpleNamespace(head=CTC)
    rng = np.random.default_rng(0)
    feeds = [{"input_values": np.zeros((1, n), np.float32)} for n in (1600, 3200, 6400)]
    ref = [{"logits": rng.standard_normal((1, n // 320, 12)).astype(np.float32)} for n in (1600, 3200, 6400)]
    by_samples = {n: r for n, r in zip((1600, 3200, 6400), ref)}

    def same(feed: dict) -> dict:
        return by_samples[feed["input_values"].shape[-1]]

    def worse_when_longer(feed: dict) -> dict:
        n = feed["input_values"].shape[-1]
        logits = by_samples[n]["logits"]
        return {"logits": logits + (n / 3200) * rng.standard_normal(logits.shape).astype(np.float32)}

    exact = drift_by_length(model, ref, same, feeds, 16000)  # type: ignore[arg-type]
    assert [(d.seconds, d.samples) for d in exact] == [(0.1, 1600), (0.2, 3200), (0.4, 6400)]
    assert all(d.metrics == {"logit_cosine": pytest.approx(1.0), "frame_agreement": 1.0} for d in exact)
    growing = drift_by_length(model, ref, worse_when_longer, feeds, 16000)  # type: ignore[arg-type]
    cosines = [d.metrics["logit_cosine"] for d in growing]
    assert cosines[0] > cosines[1] > cosines[2], cosines


def test_an_int8_audio_report_carries_drift_by_length(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = parse_source("preset:tiny", Modality.AUDIO, None)
    bench = BenchSettings(warmup=1, min_iterations=3, max_warmup=3, seconds=0.0)
    int8 = QuantOptions(mode="dynamic", eval_samples=4)
    run(spec, TINY_SHAPES, RunOptions(output=out, targets=("onnxruntime",), threads=1, bench=bench, int8=int8))
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    fp32, q = doc["variants"]
    assert fp32["precision"] == "fp32" and fp32["drift_by_length"] == []
    lo, opt, hi = TINY_SHAPES.audio_seconds or ()
    assert [(d["seconds"], d["samples"]) for d in q["drift_by_length"]] == [
        (s, int(s * SAMPLING_RATE)) for s in (lo, opt, hi)
    ]
    for d in q["drift_by_length"]:
        assert set(d["metrics"]) == {"logit_cosine", "frame_agreement"}
        assert 0.5 < d["metrics"]["logit_cosine"] < 1.0, d  # INT8 against PyTorch: close, never identical
        assert 0.0 <= d["metrics"]["frame_agreement"] <= 1.0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## INT8 drift against input length" in md
    assert f"| {q['name']} | {hi:g} | {q['drift_by_length'][-1]['metrics']['logit_cosine']:.4f} |" in md
