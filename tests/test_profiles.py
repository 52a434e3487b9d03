"""Device profiles: the bundled targets/*.toml load, validate, and turn into pipeline options."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2v_export import backends, profiles
from d2v_export.pipeline import ShapeRequest, resolve_profile
from d2v_export.spec import D2VError, ExitCode, LatencyStats, Modality, Precision

REQUIRED = ("generic-avx2", "jetson-orin", "nvidia-t4", "xeon-vnni")
GOOD = """
name = "mine"
backend = "onnxruntime"
precision = "int8"
quantize = "dynamic"
device = "CPU"
threads = 2

[shapes]
batch = [1, 2, 4]
sequence = [8, 64, 128]
audio_seconds = 1.5

[latency_budget_ms]
text = 12.5
"""


def test_the_bundled_profiles_load() -> None:
    names = profiles.list_profiles()
    assert set(REQUIRED) <= set(names)
    for name in names:
        p = profiles.load_profile(name)
        assert p.name == name and p.backend in backends.names()
        assert p.batch is not None and p.sequence is not None and p.audio_seconds is not None
        assert set(p.latency_budget_ms) == {"vision", "text", "audio"}
        assert p.path is not None and p.path.name == f"{name}.toml" and p.notes and p.description
    xeon = profiles.load_profile("xeon-vnni")
    assert (xeon.backend, xeon.precision, xeon.quantize, xeon.device) == ("openvino", Precision.INT8, "static", "CPU")
    assert xeon.targets == ("openvino",) and xeon.int8 and "avx512_vnni" in xeon.requires_cpu_flags
    t4 = profiles.load_profile("nvidia-t4")
    assert (t4.backend, t4.precision, t4.device) == ("tensorrt", Precision.FP16, "cuda:0") and t4.quantize is None
    avx2 = profiles.load_profile("generic-avx2")
    assert (avx2.backend, avx2.quantize, avx2.threads) == ("onnxruntime", "dynamic", 4)


def test_an_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(D2VError) as info:
        profiles.load_profile("raspberry-pi-9")
    message = str(info.value)
    assert info.value.code is ExitCode.BAD_INPUT and "\n" not in message
    assert "raspberry-pi-9" in message and all(name in message for name in REQUIRED)
    with pytest.raises(D2VError, match="does not exist"):
        profiles.load_profile("missing/profile.toml")


def test_a_profile_file_by_path_and_its_shapes(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    p = profiles.load_profile(str(path))
    assert p.batch == (1, 2, 4) and p.sequence == (8, 64, 128) and p.audio_seconds == (1.5, 1.5, 1.5)
    shapes = p.shape_request(ShapeRequest(sequence=(8, 16, 32)))  # what the user gave wins
    assert shapes == ShapeRequest(batch=(1, 2, 4), sequence=(8, 16, 32), choices=None, audio_seconds=(1.5, 1.5, 1.5))
    from d2v_export.models import load, parse_source

    model = load(parse_source("preset:tiny", Modality.TEXT, None))
    profile = resolve_profile(model, p.shape_request())
    assert profile.point("opt") == {"batch": 2, "sequence": 64}


def test_the_latency_budget_becomes_a_verdict(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    p = profiles.load_profile(path)
    fast = LatencyStats(p50=5, p90=10, p99=20, mean=6, stdev=1, n=30, batch=1)
    slow = {"p50": 11, "p90": 13.0, "p99": 30}
    ok = p.latency_verdict(Modality.TEXT, fast)
    assert ok["passed"] is True and ok["budget_ms"] == 12.5 and ok["measured_ms"] == 10 and ok["percentile"] == "p90"
    bad = p.latency_verdict("text", slow)
    assert bad["passed"] is False and "over the 12.5 ms budget of mine" in bad["detail"]
    assert p.latency_verdict(Modality.VISION, fast)["passed"] is None  # no budget for vision
    assert p.latency_verdict(Modality.TEXT, None)["passed"] is None


@pytest.mark.parametrize(
    "change, words",
    [
        (("threads = 2", "threads = 2\ncolour = 'red'"), "unknown field 'colour'"),
        (('backend = "onnxruntime"', 'backend = "coreml"'), "backend 'coreml'"),
        (('precision = "int8"', 'precision = "fp16"'), "onnxruntime does not build fp16"),
        (('precision = "int8"', 'precision = "int4"'), "precision 'int4'"),
        (('quantize = "dynamic"', 'quantize = "smart"'), "quantize 'smart'"),
        (('device = "CPU"', 'device = "cuda:0"'), "device 'cuda:0'"),
        (("threads = 2", "threads = -1"), "threads"),
        (("batch = [1, 2, 4]", "batch = [4, 2, 1]"), "[shapes] batch"),
        (("batch = [1, 2, 4]", "batch = [1, 2.5, 4]"), "whole numbers"),
        (("audio_seconds = 1.5", "audio_seconds = [0.01, 1, 2]"), "0.05 s"),
        (("sequence = [8, 64, 128]", "sequence = [8, 64, 128]\nimage = [1, 2, 3]"), "unknown shape 'image'"),
        (("text = 12.5", "text = -3"), "positive number"),
        (("text = 12.5", "speech = 3"), "unknown modality 'speech'"),
        (("threads = 2", "threads = 2\n[oops"), "not valid TOML"),
    ],
)
def test_bad_fields_are_one_line_errors(tmp_path: Path, change: tuple[str, str], words: str) -> None:
    path = tmp_path / "bad.toml"
    assert change[0] in GOOD
    path.write_text(GOOD.replace(change[0], change[1], 1))
    with pytest.raises(D2VError) as info:
        profiles.load_profile(path)
    assert words in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("name", backends.names())
def test_profiles_accept_what_the_backend_builds_and_nothing_else(tmp_path: Path, name: str) -> None:
    """A profile is checked against the backend's own declarations (issue 13: a profile once accepted TensorRT
    bf16, which the TensorRT backend refuses to build): every precision it builds loads, every other is refused."""
    backend = backends.get(name)
    for precision in Precision:
        path = tmp_path / f"{name}-{precision.value}.toml"
        path.write_text(f'backend = "{name}"\nprecision = "{precision.value}"\n')
        if precision in backend.precisions:
            p = profiles.load_profile(path)
            assert p.device == backend.devices.default and backend.devices.accepts(p.device)
            assert p.quantize == ("static" if precision is Precision.INT8 else None)
        else:
            with pytest.raises(D2VError, match=f"{name} does not build {precision.value}"):
                profiles.load_profile(path)
    for mode in ("static", "dynamic"):
        path = tmp_path / f"{name}-int8-{mode}.toml"
        path.write_text(f'backend = "{name}"\nprecision = "int8"\nquantize = "{mode}"\n')
        if Precision.INT8 in backend.precisions and mode in backend.int8_recipes:
            assert profiles.load_profile(path).quantize == mode
        else:
            with pytest.raises(D2VError):
                profiles.load_profile(path)


def test_tensorrt_bf16_profile_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trt.toml"
    path.write_text('backend = "tensorrt"\nprecision = "bf16"\n')
    with pytest.raises(D2VError, match="tensorrt does not build bf16"):
        profiles.load_profile(path)


def test_missing_cpu_flags_are_reported_not_enforced() -> None:
    from d2v_export.doctor import cpu_flags

    p = profiles.load_profile("xeon-vnni")
    missing = profiles.missing_cpu_flags(p)
    assert set(missing) <= set(p.requires_cpu_flags)
    if cpu_flags():
        assert ("avx512_vnni" in missing) == ("avx512_vnni" not in cpu_flags())
