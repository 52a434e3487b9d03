"""`d2v-export deploy`: Triton model repositories and OpenVINO Model Server layouts of real bundles.

Every config.pbtxt is parsed with Triton's own model-config protobuf (tritonclient ships model_config_pb2) and
compared with the graph the server would load (onnx / OpenVINO's read_model): names, element types, ranks and
which dims are dynamic; max_batch_size with the export's shape profile.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export.deploy import serving
from d2v_export.measure.bench import BenchSettings
from d2v_export.deploy.bundle import verify
from d2v_export.models import parse_source
from d2v_export.options import RunOptions, ShapeRequest
from d2v_export.pipeline import run
from d2v_export.spec import D2VError, ExitCode, Modality

from .conftest import cli

tritonclient = pytest.importorskip("tritonclient", reason="pip install 'd2v-export[test]' (tritonclient)")
from google.protobuf import text_format  # noqa: E402  (protobuf comes with onnx and tritonclient)

TARGETS = ("onnxruntime", "openvino", "tensorrt")


def model_config_pb2() -> Any:
    """Triton's ModelConfig protobuf module, loaded from its file: ``tritonclient.grpc``'s package import needs grpcio,
    which the [http] extra does not bring (and whose protobuf pin would downgrade the one onnx uses)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PB2 = model_config_pb2()
TRITON_DTYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_FP16": "float16", "TYPE_INT32": "int32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny text (dynamic sequence) and audio (dynamic samples, CTC frames) runs on the three targets, TensorRT deferred."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for modality in (Modality.TEXT, Modality.AUDIO):
        options = RunOptions(
            output=root / modality.value, targets=TARGETS, defer_build=True, bench=BenchSettings(seconds=0.0), threads=1
        )
        run(parse_source("preset:tiny", modality, None), ShapeRequest(), options)
        out[modality.value] = root / modality.value
    return out


def parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="utf-8"), PB2.ModelConfig())


def onnx_ports(path: Path) -> dict[str, dict[str, tuple[str, list[int | None]]]]:
    """{inputs|outputs: {name: (numpy dtype name, dims: None where dynamic)}} of an ONNX graph."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph

    def port(v: Any) -> tuple[str, list[int | None]]:
        t = v.type.tensor_type
        return np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name, [
            d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
        ]

    return {"inputs": {v.name: port(v) for v in graph.input}, "outputs": {v.name: port(v) for v in graph.output}}


def ir_ports(path: Path) -> dict[str, dict[str, tuple[str, list[int | None]]]]:
    import openvino as ov

    model = ov.Core().read_model(str(path))

    def port(p: Any) -> tuple[str, list[int | None]]:
        return np.dtype(p.get_element_type().to_dtype()).name, [
            None if d.is_dynamic else d.get_length() for d in p.get_partial_shape()
        ]

    return {
        "inputs": {p.get_any_name(): port(p) for p in model.inputs},
        "outputs": {p.get_any_name(): port(p) for p in model.outputs},
    }


def assert_matches_graph(
    config: Any, ports: dict[str, dict[str, tuple[str, list[int | None]]]], batch_max: int
) -> None:
    assert config.max_batch_size == batch_max and config.HasField("dynamic_batching")
    for kind, tensors in (("inputs", config.input), ("outputs", config.output)):
        assert {t.name for t in tensors} == set(ports[kind]), kind
        for t in tensors:
            dtype, dims = ports[kind][t.name]
            assert TRITON_DTYPES[PB2.DataType.Name(t.data_type)] == dtype, t.name
            assert dims[0] is None  # the batch axis Triton leaves out of dims
            assert list(t.dims) == [-1 if d is None else d for d in dims[1:]], (t.name, list(t.dims), dims)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_triton_repository_of_each_target_parses_and_matches_the_graph(
    runs: dict[str, Path], modality: str, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    for target in TARGETS:
        bundle = runs[modality] / f"{target}-fp32"
        manifest = verify(bundle)
        folder = serving.write_triton(bundle, repo, name=f"{modality}-{target}")
        config = parse(folder / "config.pbtxt")
        assert config.name == folder.name == f"{modality}-{target}"
        batch_max = manifest.dims()["batch"][2]
        assert batch_max == 8  # ShapeRequest's default batch range 1:1:8
        version = sorted(p.name for p in (folder / "1").iterdir())
        if target == "onnxruntime":
            assert config.platform == "onnxruntime_onnx" and version == ["model.onnx"]
            assert_matches_graph(config, onnx_ports(folder / "1" / "model.onnx"), batch_max)
        elif target == "openvino":
            assert (
                config.backend == "openvino"
                and config.default_model_filename == "model.xml"
                and version == ["model.bin", "model.xml"]
            )
            assert_matches_graph(config, ir_ports(folder / "1" / "model.xml"), batch_max)
        else:  # the engine is built on the device from the bundle's ONNX graph, with the same names and dynamic axes
            assert config.platform == "tensorrt_plan" and version == []
            assert config.instance_group[0].kind == PB2.ModelInstanceGroup.Kind.Value("KIND_GPU")
            assert_matches_graph(config, onnx_ports(bundle / manifest.model_file), batch_max)
    if modality == "audio":  # CTC logits (batch, frames, vocabulary): frames follow the input length
        logits = next(o for o in parse(repo / "audio-onnxruntime" / "config.pbtxt").output if o.name == "logits")
        assert list(logits.dims)[0] == -1 and list(logits.dims)[1] > 0


def test_tensorrt_install_script_copies_the_engine_built_on_the_device(runs: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "trt"
    shutil.copytree(runs["text"] / "tensorrt-fp32", bundle)
    repo = tmp_path / "models"
    serving.write_triton(bundle, repo, name="text")
    script = repo / "install_plan_text.sh"
    missing = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert (
        missing.returncode == 3
        and "build_engine.sh" in missing.stderr
        and not (repo / "text" / "1" / "model.plan").exists()
    )
    (bundle / "model.plan").write_bytes(b"engine bytes")  # what build_engine.sh leaves in the bundle
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (repo / "text" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert sorted(p.name for p in (repo / "text" / "1").iterdir()) == ["model.plan"]


def test_ovms_layout_and_multi_model_config(runs: dict[str, Path], tmp_path: Path) -> None:
    import openvino as ov

    root = tmp_path / "ovms"
    for modality in ("text", "audio"):
        folder = serving.write_ovms(runs[modality] / "openvino-fp32", root, name=modality)
        assert sorted(p.name for p in (folder / "1").iterdir()) == ["openvino_model.bin", "openvino_model.xml"]
        ports = ir_ports(folder / "1" / "openvino_model.xml")
        assert set(ports["inputs"]) == {t["name"] for t in verify(runs[modality] / "openvino-fp32").inputs}
    doc = json.loads((root / "config.json").read_text())
    assert doc == {
        "model_config_list": [
            {"config": {"name": "text", "base_path": "text"}},
            {"config": {"name": "audio", "base_path": "audio"}},
        ]
    }
    serving.write_ovms(runs["text"] / "openvino-fp32", root, name="text", force=True)  # replaced, listed once
    assert [e["config"]["name"] for e in json.loads((root / "config.json").read_text())["model_config_list"]] == [
        "audio",
        "text",
    ]
    assert ov.Core().read_model(str(root / "text" / "1" / "openvino_model.xml")).inputs


def test_fixed_batch_has_no_batching(tmp_path: Path) -> None:
    """--batch-size 2: the batch axis is static, so max_batch_size is 0 and dims are the full shapes."""
    out = tmp_path / "run"
    run(
        parse_source("preset:tiny", Modality.TEXT, None),
        ShapeRequest(batch=(2, 2, 2)),
        RunOptions(output=out, targets=("onnxruntime",), bench=BenchSettings(seconds=0.0), threads=1),
    )
    folder = serving.write_triton(out / "onnxruntime-fp32", tmp_path / "models")
    config = parse(folder / "config.pbtxt")
    ports = onnx_ports(folder / "1" / "model.onnx")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    for t in config.input:
        assert list(t.dims) == [-1 if d is None else d for d in ports["inputs"][t.name][1]] and t.dims[0] == 2


def test_cli_refusals_write_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    repo, ovms = tmp_path / "models", tmp_path / "ovms"
    ort = runs["text"] / "onnxruntime-fp32"
    r = cli("deploy", str(ort), "--triton", str(repo), "--ovms", str(ovms))  # OVMS serves the OpenVINO IR only
    assert (
        r.returncode == int(ExitCode.BAD_INPUT)
        and "no OpenVINO Model Server layout" in r.stderr
        and len(r.stderr.splitlines()) == 1
    )
    assert not repo.exists() and not ovms.exists()
    r = cli("deploy", str(runs["text"]), "--triton", str(repo))  # the run's folder, not a bundle
    assert r.returncode == int(ExitCode.BAD_INPUT) and "no manifest.json" in r.stderr and not repo.exists()
    assert cli("deploy", str(ort)).returncode == int(ExitCode.USAGE)
    assert (
        cli("deploy", str(ort), "--triton", str(repo), "--name", "../x").returncode == int(ExitCode.USAGE)
        and not repo.exists()
    )
    ok = cli("deploy", str(ort), "--triton", str(repo), "--name", "t")
    assert ok.returncode == 0 and parse(repo / "t" / "config.pbtxt").platform == "onnxruntime_onnx"
    again = cli("deploy", str(ort), "--triton", str(repo), "--name", "t")
    assert again.returncode == int(ExitCode.BAD_INPUT) and "--force" in again.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["t"]  # no staging folder left behind


def test_a_changed_bundle_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(runs["text"] / "onnxruntime-fp32", bundle)
    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(D2VError, match="sha256|bytes"):
        serving.write_triton(bundle, tmp_path / "models")
    assert not (tmp_path / "models").exists()
