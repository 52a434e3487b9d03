"""--device: checked per target against what its backend declares (exit 2) and has here (exit 6) before any work,
one device per target (``--device TARGET=DEVICE`` beside a plain default), and recorded truthfully per variant in
report.json and in each bundle's manifest.json. Real runtimes throughout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from d2v_export import backends
from d2v_export.options import RunOptions, ShapeRequest, apply_profile, parse_devices
from d2v_export.spec import D2VError, ExitCode, Precision

from .conftest import cli

FAST = ("--model", "preset:tiny", "--bench-seconds", "0", "--threads", "1", "--quiet")


def _one_error(res, code: ExitCode, *needles: str) -> str:  # type: ignore[no-untyped-def]
    assert res.returncode == int(code), (res.returncode, res.stderr)
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    for needle in needles:
        assert needle in line, line
    return line


def test_parse_devices() -> None:
    assert parse_devices([]) == (None, {})
    assert parse_devices(["CPU", "openvino=GPU", "tensorrt=cuda:1"]) == (
        "CPU",
        {"openvino": "GPU", "tensorrt": "cuda:1"},
    )
    assert parse_devices(["openvino=AUTO", "openvino=AUTO"]) == (None, {"openvino": "AUTO"})  # the same twice is one
    for bad, needle in (
        (["CPU", "GPU"], "one plain device"),
        (["nope=GPU"], "'nope' is not a target"),
        (["openvino=GPU", "openvino=CPU"], "give openvino one device"),
        (["openvino="], "give openvino one device"),
    ):
        with pytest.raises(D2VError, match=needle) as err:
            parse_devices(bad)
        assert err.value.code is ExitCode.USAGE


def test_each_target_gets_its_own_device() -> None:
    opts = RunOptions(output=Path("o"), targets=("onnxruntime", "openvino", "tensorrt"), devices={"openvino": "GPU"})
    assert [opts.device_for(t) for t in opts.targets] == [
        "CPU",
        "GPU",
        "cuda:0",
    ]  # the backends' own defaults where silent
    opts = RunOptions(output=Path("o"), targets=("onnxruntime", "openvino"), device="CPU", devices={"openvino": "AUTO"})
    assert (opts.device_for("onnxruntime"), opts.device_for("openvino")) == ("CPU", "AUTO")
    with pytest.raises(D2VError, match="not a device of target onnxruntime") as err:  # one plain device, every target
        RunOptions(output=Path("o"), targets=("onnxruntime", "openvino"), device="GPU")
    assert err.value.code is ExitCode.USAGE and "--device TARGET=DEVICE" in str(err.value)
    with pytest.raises(D2VError, match="openvino is not a target of this run") as err:
        RunOptions(output=Path("o"), targets=("onnxruntime",), devices={"openvino": "GPU"})
    assert err.value.code is ExitCode.USAGE


def test_a_profile_device_goes_to_its_own_backend_only() -> None:
    from d2v_export.profiles import load_profile

    t4 = load_profile("nvidia-t4")  # tensorrt on cuda:0
    opts, _ = apply_profile(
        RunOptions(output=Path("o"), targets=("onnxruntime",)), ShapeRequest(), t4, explicit={"targets"}
    )
    assert opts.targets == ("onnxruntime",) and opts.devices == {} and opts.device_for("onnxruntime") == "CPU"
    opts, _ = apply_profile(RunOptions(output=Path("o")), ShapeRequest(), t4, explicit=set())
    assert opts.targets == ("tensorrt",) and opts.device_for("tensorrt") == "cuda:0"


def test_every_backend_resolves_its_default_device_and_refuses_a_foreign_one() -> None:
    for name in backends.names():
        backend = backends.get(name)
        if backend.available().ok or backend.can_defer:
            assert backend.devices.accepts(backend.resolve_device(backend.devices.default, defer_build=True))
        with pytest.raises(D2VError) as err:
            backend.resolve_device("TPU:9", defer_build=True)
        assert err.value.code is ExitCode.USAGE and name in str(err.value)
    assert backends.get("onnxruntime").resolve_device("cpu") == "CPU"
    assert backends.get("tensorrt").resolve_device("cuda", defer_build=True) == "cuda:0"


def test_onnxruntime_on_a_gpu_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    """The issue's case: it used to run on the CPU and exit 0."""
    out = tmp_path / "out"
    start = time.monotonic()
    res = cli("vision", *FAST, "--target", "onnxruntime", "--device", "GPU", "--output", str(out))
    _one_error(res, ExitCode.USAGE, "'GPU'", "onnxruntime", "CPU", "--device onnxruntime=CPU")
    assert time.monotonic() - start < 60 and not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture()
def openvino_here() -> list[str]:
    ov = backends.get("openvino")
    if not ov.available().ok:
        pytest.skip(ov.available().reason)
    import openvino

    return list(openvino.Core().available_devices)


def test_an_openvino_device_that_is_not_here_is_exit_6_before_any_work(
    openvino_here: list[str], tmp_path: Path
) -> None:
    if any(d.startswith("GPU") for d in openvino_here):
        pytest.skip("this machine has an OpenVINO GPU")
    out = tmp_path / "out"
    res = cli(
        "vision",
        *FAST,
        "--target",
        "onnxruntime",
        "--target",
        "openvino",
        "--device",
        "openvino=GPU",
        "--output",
        str(out),
    )
    _one_error(
        res,
        ExitCode.TARGET_UNAVAILABLE,
        "'GPU' is not available here",
        f"found: {', '.join(openvino_here)}",
        "--device openvino=CPU",
    )
    assert not out.exists()


def test_bf16_on_a_device_without_bf16_is_refused_before_any_work(openvino_here: list[str], tmp_path: Path) -> None:
    """The backend says bf16 is buildable exactly where the device lists BF16 (AVX512-BF16/AMX CPUs); where it does
    not, --bf16 is exit 6 with that reason before any export (on an AVX2-only or Ice Lake CPU)."""
    import openvino

    caps = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    reason = backends.get("openvino").precision_problem(Precision.BF16, "CPU")
    assert (reason is None) == ("BF16" in caps)
    assert backends.get("openvino").precision_problem(Precision.FP16, "CPU") is None
    if reason is None:
        pytest.skip(f"this CPU builds bf16 (OPTIMIZATION_CAPABILITIES: {', '.join(caps)})")
    assert "CPU has no native bf16" in reason
    out = tmp_path / "out"
    res = cli("vision", *FAST, "--target", "openvino", "--bf16", "--output", str(out))
    _one_error(res, ExitCode.TARGET_UNAVAILABLE, "cannot build bf16 on CPU", reason)
    assert not out.exists()


def test_the_device_of_every_number_is_recorded(openvino_here: list[str], tmp_path: Path) -> None:
    """onnxruntime on its default (CPU), openvino on AUTO, tensorrt deferred for cuda:1: report.json and each manifest
    say where each variant was measured and what it was built for; the reference's device stays in environment."""
    trt = backends.get("tensorrt")
    if trt.available().ok:
        pytest.skip("TensorRT runs here: the deferred case is for machines without it")
    out = tmp_path / "out"
    res = cli(
        "vision",
        *FAST,
        "--target",
        "onnxruntime",
        "--target",
        "openvino",
        "--target",
        "tensorrt",
        "--defer-build",
        "--device",
        "openvino=AUTO",
        "--device",
        "tensorrt=cuda:1",
        "--output",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "report.json").read_text())
    assert doc["environment"]["device"] == "CPU"  # the PyTorch reference's
    seen = {v["name"]: (v["device"], v["deploy_device"]) for v in doc["variants"]}
    assert seen["onnxruntime-fp32"] == ("CPU", "CPU")
    assert seen["openvino-fp32"] == ("AUTO", "AUTO")
    measured, deploy = seen["tensorrt-fp32"]
    assert deploy == "cuda:1" and measured == "CPU (ONNX Runtime simulation; the engine for cuda:1 is not built yet)"
    # the device reached the build
    assert json.loads((out / "openvino-fp32" / "openvino_config.json").read_text())["device"] == "AUTO"
    for name, (measured, deploy) in seen.items():
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert (manifest["device"], manifest["deploy_device"], manifest["environment"]["device"]) == (
            measured,
            deploy,
            measured,
        )
        assert manifest["schema_version"] == "1.1"
