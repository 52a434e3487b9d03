"""`doctor`: versions, CPU, GPU and every target's availability with the reason when it is not."""

from __future__ import annotations

import json

from d2v_export import backends, doctor


def test_diagnose_reports_targets_and_reasons() -> None:
    d = doctor.diagnose()
    json.dumps(d)  # JSON-able for --json
    assert d["versions"]["python"] and d["versions"]["onnxruntime"] and d["versions"]["torch"]
    targets = {t["name"]: t for t in d["targets"]}
    assert set(backends.names()) | {"tensorrt"} <= set(targets)
    ort = targets["onnxruntime"]
    assert ort["available"] is True and ort["version"] and "CPUExecutionProvider" in ort["devices"]
    trt = targets["tensorrt"]
    if d["gpu"]["present"] and trt["available"]:
        assert trt["devices"]  # a machine with a GPU and TensorRT
    else:
        assert trt["available"] is False and trt["reason"] and "\n" not in trt["reason"]
    ov = targets["openvino"]
    assert ov["available"] == d["openvino"]["available"]
    if ov["available"]:
        cpu = next(dev for dev in d["openvino"]["devices"] if dev["name"] == "CPU")
        assert "FP32" in cpu["capabilities"]
    else:
        assert ov["reason"]
    assert d["cpu"]["cores"]["available"] >= 1 and d["cpu"]["model"]


def test_format_text_says_what_works_and_why_not() -> None:
    d = doctor.diagnose()
    text = doctor.format_text(d)
    assert "[ok ] onnxruntime" in text
    trt = next(t for t in d["targets"] if t["name"] == "tensorrt")
    if not trt["available"]:
        line = next(line for line in text.splitlines() if "] tensorrt" in line)
        assert line.startswith("  [no ] tensorrt") and trt["reason"] in line
    assert "CPU:" in text and "versions:" in text
