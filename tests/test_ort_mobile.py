"""The fourth target, one plug-in file (d2v_export/backends/ort_mobile.py, docs/ort-mobile.md), end to end.

Through the installed ``d2v-export`` command: the ORT-format model for Arm and its reduced-operator config,
fp32 and INT8, each judged against PyTorch through the target's own runner, timed, reported, bundled and run;
the README's code, run as written, answers what the runner answers. Then what it must refuse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export import backends
from d2v_export.backends.base import BuildRequest
from d2v_export.deploy.bundle import verify
from d2v_export.deploy.predict import open_runtime
from d2v_export.spec import D2VError, ExitCode, ExportedGraph, Precision

from .conftest import cli

TARGET = "ort-mobile"
ROOT = Path(__file__).resolve().parents[1]
BENCH = ("--threads", "1", "--bench-seconds", "0.3")


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def variants(out: Path) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}


def operators(config: Path) -> set[str]:
    """``domain;opset;Op,Op`` lines of a required-operators config as the operator names."""
    lines = [line.split(";") for line in config.read_text().splitlines() if not line.startswith("#")]
    return {op for parts in lines for op in parts[2].split(",")}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "-s", "150", "the quick brown fox"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Speech recognition, static INT8, beside the ONNX Runtime target in the same run (one interleaved benchmark)."""
    out = tmp_path_factory.mktemp("ort-mobile") / "audio"
    targets = ("--target", "onnxruntime", "--target", TARGET)
    ok(
        cli(
            "audio",
            "--model",
            "preset:tiny",
            "--int8",
            *targets,
            "--output",
            str(out),
            *BENCH,
            "--audio-seconds",
            "0.5:1:2",
        )
    )
    return out


def test_audio_fp32_and_int8_are_built_judged_timed_and_bundled(audio_run: Path) -> None:
    doc = json.loads((audio_run / "report.json").read_text())
    found = variants(audio_run)
    assert {f"{TARGET}-fp32", f"{TARGET}-int8-static"} <= set(found), found.keys()
    fp32, int8 = found[f"{TARGET}-fp32"], found[f"{TARGET}-int8-static"]
    for v in (fp32, int8):
        assert v["target"] == TARGET and v["drift"]["passed"] is True
        assert v["latency_ms"]["p50"] > 0 and v["latency_ms"]["n"] >= 10  # timed beside the reference
        assert any("required_operators.config lists its" in note for note in v["notes"]), v["notes"]
    # fp32: the shape check ran on the .ort file at every shape of the export check
    assert fp32["drift"]["samples"] == doc["export"]["check"]["samples"]
    assert fp32["drift"]["metrics"]["max_abs_error"] < 1e-4
    # INT8: task drift on the evaluation split, the shared quantizer's recipe
    assert int8["quantization"]["mode"] == "static" and "cer" in int8["drift"]["metrics"]
    assert int8["quantization"]["reduce_range"] is False  # 8-bit weights: made for Arm

    for name, quantized in ((f"{TARGET}-fp32", False), (f"{TARGET}-int8-static", True)):
        bundle = audio_run / name
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["target"] == TARGET and manifest["model_file"] == "model.ort"
        listed = {f["path"] for f in manifest["files"]}
        assert {"model.ort", "required_operators.config", "config.json", "vocab.json"} <= listed
        # the device gets the .ort only
        assert not any(p.endswith(".onnx") or p.endswith(".data") for p in listed), listed
        assert verify(bundle).target == TARGET
        config = (bundle / "required_operators.config").read_text()
        assert (
            config.startswith("# model.ort: onnxruntime.tools.convert_onnx_models_to_ort")
            and str(audio_run.parent) not in config
        )
        ops = operators(bundle / "required_operators.config")
        assert "Conv" in ops and ("QuantizeLinear" in ops) is quantized, ops
        readme = (bundle / "README.md").read_text()
        assert (
            f'ort.InferenceSession("{name}/model.ort"' in readme
            and f"--include_ops_by_config required_operators.config` ({len(ops)} operators)" in readme
        )


def test_run_and_the_readme_answer_what_the_runner_answers(
    audio_run: Path, speech: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = {}
    for name in ("onnxruntime-fp32", f"{TARGET}-fp32", f"{TARGET}-int8-static"):
        [result] = json.loads(ok(cli("run", str(audio_run / name), str(speech), "--json")).stdout)
        ran[name] = result
    assert (
        ran[f"{TARGET}-fp32"]["runtime"].startswith(f"{TARGET} ")
        and "(fp32, model.ort)" in ran[f"{TARGET}-fp32"]["runtime"]
    )
    assert "(int8, model.ort)" in ran[f"{TARGET}-int8-static"]["runtime"]
    # the same export, run from the .ort file: the same transcript as the ONNX file on ONNX Runtime
    assert ran[f"{TARGET}-fp32"]["transcript"] == ran["onnxruntime-fp32"]["transcript"]
    assert ran[f"{TARGET}-fp32"]["frames"] == ran["onnxruntime-fp32"]["frames"]

    # the README's code, run as written (with this recording), gives the runner's outputs on its feed
    bundle = audio_run / f"{TARGET}-int8-static"
    code = re.search(r"```python\n(.*?)```", (bundle / "README.md").read_text(), re.S)
    assert code is not None
    monkeypatch.chdir(audio_run)
    scope: dict[str, Any] = {}
    exec(code.group(1).replace('"speech.wav"', repr(str(speech))), scope)  # noqa: S102 - the README's own code
    backend, artifact, _notes = open_runtime(verify(bundle))
    with backend.runner(artifact, threads=1) as runner:
        expected = runner.infer(scope["feed"])
    assert set(scope["outputs"]) == set(expected) == {"logits"}
    np.testing.assert_array_equal(scope["outputs"]["logits"], expected["logits"])


def test_text_with_dynamic_int8(tmp_path: Path) -> None:
    out = tmp_path / "text"
    ok(
        cli(
            "text",
            "--model",
            "preset:tiny",
            "--task",
            "text-classification",
            "--int8",
            "--quant",
            "dynamic",
            "--target",
            TARGET,
            "--output",
            str(out),
            *BENCH,
            "--sequence-length",
            "8:16:32",
        )
    )
    found = variants(out)
    assert set(found) == {f"{TARGET}-fp32", f"{TARGET}-int8-dynamic"}, found.keys()
    for v in found.values():
        assert v["drift"]["passed"] is True and v["latency_ms"]["p50"] > 0
    ops = operators(out / f"{TARGET}-int8-dynamic" / "required_operators.config")
    assert "DynamicQuantizeLinear" in ops or "MatMulIntegerToFloat" in ops, ops
    [result] = json.loads(
        ok(cli("run", str(out / f"{TARGET}-int8-dynamic"), "A sentence to classify.", "--json")).stdout
    )
    assert result["runtime"].startswith(f"{TARGET} ") and result["labels"]


def test_doctor_and_the_extra() -> None:
    doctor = json.loads(ok(cli("doctor", "--json")).stdout)
    row = next(t for t in doctor["targets"] if t["name"] == TARGET)
    assert row["available"] is True and row["precisions"] == ["fp32", "int8"]
    assert "converter onnxruntime.tools.convert_onnx_models_to_ort (optimisations for arm)" in ok(cli("doctor")).stdout
    backend = backends.get(TARGET)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {re.split(r"[<>=\[]", r)[0] for r in extras[backend.extra]}
    assert set(backend.packages) <= wanted and backend.extra in backend.install_hint


# ------------------------------------------------------------------------------------ what it refuses


def graph_at(path: Path) -> ExportedGraph:
    """An export record naming ``path``: compile reads the file only (a real export costs a model)."""
    return ExportedGraph(path=path, inputs=(), outputs=(), profile=None, opset=17, exporter="test", check=None)  # type: ignore[arg-type]


def test_a_file_the_converter_cannot_read_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    folder = tmp_path / "variant"
    with pytest.raises(D2VError) as info:
        backends.get(TARGET).compile(graph_at(bad), folder, BuildRequest())
    assert info.value.code is ExitCode.TARGET_UNAVAILABLE and "ORT-format converter failed on model.onnx" in str(
        info.value
    )
    assert "\n" not in str(info.value) and list(folder.iterdir()) == []  # no .ort, no temporary folder


def test_a_model_over_the_flatbuffers_limit_is_refused_before_converting(tmp_path: Path, audio_run: Path) -> None:
    graph = tmp_path / "model.onnx"
    shutil.copy(audio_run / "onnxruntime-fp32" / "model.onnx", graph)
    with open(tmp_path / "model.onnx.data", "wb") as data:  # sparse: 2 GiB on the file system's word, no blocks
        data.truncate(2**31)
    folder = tmp_path / "variant"
    with pytest.raises(D2VError, match=r"holds at most 2 GiB .* use --int8") as info:
        backends.get(TARGET).compile(graph_at(graph), folder, BuildRequest())
    assert info.value.code is ExitCode.TARGET_UNAVAILABLE and list(folder.iterdir()) == []


def test_bf16_and_an_int8_request_without_a_recipe_are_refused(tmp_path: Path, audio_run: Path) -> None:
    graph = graph_at(audio_run / "onnxruntime-fp32" / "model.onnx")
    for request in (BuildRequest(precision=Precision.BF16), BuildRequest(precision=Precision.INT8)):
        with pytest.raises(D2VError, match=f"{TARGET} builds fp32 or int8"):
            backends.get(TARGET).compile(graph, tmp_path / "v", request)
    half = cli("text", "--model", "preset:tiny", "--target", TARGET, "--bf16", "--output", str(tmp_path / "half"))
    assert half.returncode == 6 and f"no requested target builds bf16 ({TARGET})" in half.stderr, half.stderr[-2000:]


def test_the_runner_opens_the_ort_format_only_and_feeds_what_the_graph_declares(audio_run: Path) -> None:
    backend = backends.get(TARGET)
    bundle = verify(audio_run / f"{TARGET}-fp32")
    _backend, artifact, _notes = open_runtime(bundle)
    onnx = dataclasses.replace(artifact, model_file=audio_run / "onnxruntime-fp32" / "model.onnx")
    with pytest.raises(Exception, match="ORT model verification failed"):  # an ONNX file is not what a device loads
        backend.runner(onnx, threads=1)
    wave, mask = np.zeros((1, 16000), np.float32), np.ones((1, 16000), np.int64)
    with backend.runner(artifact, threads=1) as runner:
        with pytest.raises(D2VError, match="needs input\\(s\\) input_values, which the feed lacks"):
            runner.infer({"attention_mask": mask})
        feed = {"input_values": wave, "attention_mask": mask}
        extra = runner.infer(feed | {"not_an_input": np.ones((1, 3), np.int64)})  # only declared inputs go in
        assert np.array_equal(extra["logits"], runner.infer(feed)["logits"])


def test_nothing_outside_its_file_names_the_target() -> None:
    """The plug-in is one file: no module of the package, but its own, names it or imports it."""
    hits = []
    for path in (ROOT / "d2v_export").rglob("*.py"):
        if path.name != "ort_mobile.py" and (TARGET in path.read_text() or "ort_mobile" in path.read_text()):
            hits.append(str(path.relative_to(ROOT)))
    assert hits == [], hits
    assert os.path.isfile(ROOT / "d2v_export" / "backends" / "ort_mobile.py")
