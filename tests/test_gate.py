"""The library decides, the CLI speaks: options, the device profile merge and the exit code live in the
library, so ``pipeline.run``, ``matrix.run_matrix`` and the command line gate alike (issue 13).

The runs are real (tiny text preset, ONNX Runtime, the real console script); a latency budget of a
microsecond is the gated scenario: no machine meets it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2v_export.reports import gate
from d2v_export import matrix
from d2v_export.measure.bench import BenchSettings
from d2v_export.models import parse_source
from d2v_export.options import QuantOptions, RunOptions, ShapeRequest, apply_profile, require_int8
from d2v_export.pipeline import run
from d2v_export.profiles import load_profile
from d2v_export.spec import D2VError, ExitCode, Modality, Precision, verdict_code

from .conftest import cli

STRICT = (
    'name = "strict"\nbackend = "onnxruntime"\nprecision = "fp32"\ndevice = "CPU"\nthreads = 1\nlatency_percentile = "p50"\n'
    "[shapes]\nbatch = [1, 1, 2]\nsequence = [8, 16, 32]\n[latency_budget_ms]\ntext = 0.001\n"
)
INT8_PROFILE = (
    'name = "edge"\nbackend = "openvino"\nprecision = "int8"\nquantize = "dynamic"\ndevice = "CPU"\nthreads = 1\n'
    "[shapes]\nbatch = [1, 2, 4]\n[latency_budget_ms]\ntext = 100\n"
)


def _profile(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_gating_order_is_drift_then_latency_then_baseline() -> None:
    assert verdict_code(drift_passed=True) is ExitCode.OK
    assert verdict_code(drift_passed=False, latency_passed=False, regression_passed=False) is ExitCode.DRIFT_BUDGET
    assert verdict_code(drift_passed=True, latency_passed=False, regression_passed=False) is ExitCode.LATENCY_BUDGET
    assert verdict_code(drift_passed=True, latency_passed=True, regression_passed=False) is ExitCode.REGRESSION


def test_a_profile_fills_what_the_caller_left_unsaid_and_explicit_wins(tmp_path: Path) -> None:
    profile = load_profile(_profile(tmp_path, INT8_PROFILE, "edge"))
    # library default: a setting is given when it differs from RunOptions' default
    options, shapes = apply_profile(RunOptions(output=tmp_path / "o"), ShapeRequest(), profile)
    assert options.targets == ("openvino",) and options.threads == 1 and options.profile is profile
    assert options.int8 == QuantOptions(mode="dynamic") and shapes.batch == (1, 2, 4)
    given = RunOptions(output=tmp_path / "o", targets=("onnxruntime",), threads=2, int8=QuantOptions(mode="static"))
    options, shapes = apply_profile(given, ShapeRequest(batch=(1, 1, 2)), profile, explicit={"targets", "int8"})
    assert options.targets == ("onnxruntime",) and options.threads == 2 and options.int8 == QuantOptions(mode="static")
    assert shapes.batch == (1, 1, 2)
    # the CLI's way: --target onnxruntime typed out is explicit even though it is the default value
    options, _ = apply_profile(RunOptions(output=tmp_path / "o"), ShapeRequest(), profile, explicit={"targets"})
    assert options.targets == ("onnxruntime",) and options.int8 is not None and options.int8.mode == "dynamic"


def test_options_are_validated_by_the_library(tmp_path: Path) -> None:
    with pytest.raises(D2VError, match="INT8 mode 'fast'") as bad:
        QuantOptions(mode="fast")
    assert bad.value.code is ExitCode.USAGE
    with pytest.raises(D2VError, match="unknown metric"):
        QuantOptions(budget={"top5": 0.9})
    with pytest.raises(D2VError, match="half precisions"):
        RunOptions(output=tmp_path, half=(Precision.INT8,))
    assert RunOptions(output=tmp_path, targets=("onnxruntime", "onnxruntime")).targets == ("onnxruntime",)
    assert RunOptions(output=tmp_path, pick=True).int8 == QuantOptions()  # --pick implies INT8
    with pytest.raises(D2VError, match="apply to INT8; add --int8"):
        require_int8(None, QuantOptions(fallback=True))
    require_int8(QuantOptions(fallback=True), QuantOptions(fallback=True))


def test_library_cli_and_matrix_agree_on_a_latency_budget_breach(tmp_path: Path) -> None:
    """The same profile, the same tiny model: pipeline.run's Report.exit_code, the command's exit status and
    the matrix's exit code are all 8, and the library words it as the CLI prints it."""
    path = _profile(tmp_path, STRICT, "strict")
    options, shapes = apply_profile(
        RunOptions(output=tmp_path / "lib", bench=BenchSettings(seconds=0)), ShapeRequest(), load_profile(path)
    )
    report = run(parse_source("preset:tiny", Modality.TEXT, None), shapes, options)
    assert report.passed and not report.within_latency_budget
    assert report.exit_code is ExitCode.LATENCY_BUDGET
    problem = gate.failure(report, options)
    assert problem is not None and problem.code is ExitCode.LATENCY_BUDGET and "onnxruntime-fp32 p50" in str(problem)

    res = cli(
        "text",
        "--model",
        "preset:tiny",
        "--target-profile",
        str(path),
        "--output",
        str(tmp_path / "cli"),
        "--bench-seconds",
        "0",
        "--quiet",
    )
    assert res.returncode == int(ExitCode.LATENCY_BUDGET), res.stderr[-2000:]
    assert f"error: {problem}".split(" p50 ")[0] in res.stderr
    doc = json.loads((tmp_path / "cli" / "report.json").read_text(encoding="utf-8"))
    assert [v["latency_budget"]["passed"] for v in doc["variants"]] == [False]

    mdoc = matrix.run_matrix(
        "preset:tiny",
        ["text"],
        ["onnxruntime"],
        ["fp32"],
        tmp_path / "matrix",
        shapes=ShapeRequest(sequence=(8, 16, 32)),
        bench=BenchSettings(seconds=0),
        profile=load_profile(path),
    )
    assert [v["latency_budget_passed"] for c in mdoc["cells"] for v in c["variants"]] == [False]
    assert matrix.exit_code(mdoc) == int(ExitCode.LATENCY_BUDGET)

    # the same run without a budget passes every gate, in the library and in the matrix
    relaxed = run(
        parse_source("preset:tiny", Modality.TEXT, None),
        shapes,
        RunOptions(output=tmp_path / "free", bench=BenchSettings(seconds=0)),
    )
    assert relaxed.exit_code is ExitCode.OK and gate.failure(relaxed, options) is None
