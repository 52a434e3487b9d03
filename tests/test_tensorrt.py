"""The TensorRT target, for real, in both halves. No mocks.

Here (no TensorRT, no GPU): the explicit-Q/DQ INT8 graph's structure, its drift simulated on ONNX
Runtime against PyTorch on the bundled evaluation samples, the deferred bundle (recipe, trtexec script,
executed against a stand-in `trtexec` that records its arguments), the error paths, and a mypy run of
the TensorRT code against `tensorrt-stubs`.

On a machine with TensorRT >= 10 and an NVIDIA GPU the engine tests run too: build tiny engines in
every precision, run them, compare with PyTorch, and `build_engine` on a deferred bundle.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export import backends
from d2v_export.backends.tensorrt import device as trt_engine
from d2v_export.backends.base import BuildRequest
from d2v_export.backends.tensorrt import (
    TensorRTRequest,
    BACKEND,
    ENGINE_MANIFEST,
    NOT_BUILT,
    PLAN_FILE,
    RECIPE_FILE,
    SCRIPT_FILE,
    SIMULATED_INT8,
    SIMULATED_LATENCY,
    build_engine,
    find_bundles,
    qdq_problems,
    read_recipe,
)
from d2v_export.backends.torch_ref import TorchRunner
from d2v_export.calibration import load_samples
from d2v_export.calibration.samples import Samples
from d2v_export.convert.export import export, make_wrapper
from d2v_export.heads import Head, head_for
from d2v_export.measure.metrics import DEFAULT_BUDGETS
from d2v_export.models import LoadedModel
from d2v_export.int8.quantize import make_recipe
from d2v_export.spec import (
    Artifact,
    D2VError,
    ExitCode,
    ExportedGraph,
    Modality,
    Precision,
    ShapeProfile,
)
from d2v_export.convert.validate import shape_check, task_drift

from .conftest import tiny

THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
# One head per modality: the default head of each preset (what a user gets without --task).
HEADS = [
    head_for(Modality.VISION, "image-classification"),
    head_for(Modality.TEXT, "text-classification"),
    head_for(Modality.AUDIO, "automatic-speech-recognition"),
]
FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf")
FAKE_TRTEXEC = ROOT / "tests" / "fake_trt" / "bin" / "trtexec"  # what NVIDIA's BERT/ViT placement keeps in float
GPU = trt_engine.probe()
needs_gpu = pytest.mark.skipif(not GPU.ok, reason="needs TensorRT and an NVIDIA GPU")


class Built:
    """Per tiny head, built once per module: the model, its fp32 graph, samples and deferred bundles."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._graphs: dict[str, tuple[LoadedModel, ShapeProfile, ExportedGraph]] = {}
        self._samples: dict[tuple[str, str], Samples] = {}
        self._bundles: dict[tuple[str, Precision], Artifact] = {}

    def graph(self, head: Head) -> tuple[LoadedModel, ShapeProfile, ExportedGraph]:
        if head.key not in self._graphs:
            model, profile = tiny(head)
            path = self.root / head.key.replace("/", "-") / "fp32" / "model.onnx"
            self._graphs[head.key] = (model, profile, export(model, profile, path))
        return self._graphs[head.key]

    def samples(self, head: Head, split: str) -> Samples:
        if (head.key, split) not in self._samples:
            model, profile, _ = self.graph(head)
            self._samples[head.key, split] = load_samples(None, model, profile, split=split, count=8)
        return self._samples[head.key, split]

    def request(self, head: Head, precision: Precision, *, defer: bool = True) -> BuildRequest:
        if precision is not Precision.INT8:
            return TensorRTRequest(precision=precision, threads=THREADS, defer_build=defer)
        calib = self.samples(head, "calibration")
        recipe = make_recipe(backends.get("tensorrt"), "static", samples=len(calib))
        return TensorRTRequest(
            precision=precision, quant=recipe, calibration=tuple(calib.feeds), threads=THREADS, defer_build=defer
        )

    def deferred(self, head: Head, precision: Precision) -> Artifact:
        if (head.key, precision) not in self._bundles:
            _, _, graph = self.graph(head)
            folder = self.root / head.key.replace("/", "-") / f"tensorrt-{precision.value}"
            self._bundles[head.key, precision] = BACKEND.compile(graph, folder, self.request(head, precision))
        return self._bundles[head.key, precision]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("tensorrt"))


def _onnx(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _readers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _output_channel_axis(consumer: Any, weight_rank: int) -> int:
    """The axis of a weight that indexes output channels: MatMul B is (.., K, N); Gemm B is (K, N) or, transposed, (N, K); Conv W is (O, I, ...)."""
    if consumer.op_type == "MatMul":
        return weight_rank - 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    return 0


# ------------------------------------------------------------------------------------ registry


def test_registry_and_availability_here() -> None:
    assert "tensorrt" in backends.names()
    be = backends.get("tensorrt")
    assert be is BACKEND and isinstance(be, backends.Backend)
    assert be.extra == "tensorrt" and set(be.precisions) == {Precision.FP32, Precision.FP16, Precision.INT8}
    avail = be.available()
    assert avail.ok is GPU.ok
    if not avail.ok:
        assert "\n" not in avail.reason and "--defer-build" in avail.reason
        assert "pip install 'd2v-export[tensorrt]'" in avail.reason or "TensorRT" in avail.reason


def test_type_stubs_alone_are_not_tensorrt() -> None:
    """With only tensorrt-stubs installed, `import tensorrt` succeeds as an empty namespace package."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("neither tensorrt nor tensorrt-stubs is installed")
    import tensorrt

    if hasattr(tensorrt, "Builder"):
        assert trt_engine.import_tensorrt() is tensorrt
    else:
        assert trt_engine.import_tensorrt() is None
        assert not trt_engine.probe().ok and "not installed" in trt_engine.probe().reason


# ------------------------------------------------------------------------------------ (a) Q/DQ structure


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.key)
def test_int8_graph_is_explicit_symmetric_qdq_on_matmul_inputs(head: Head, built: Built) -> None:
    from onnx import TensorProto, numpy_helper

    _, _, graph = built.graph(head)
    artifact = built.deferred(head, Precision.INT8)
    model = _onnx(artifact.path / "model.onnx")
    fp32 = _onnx(graph.path)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = _readers(model)
    allowed = set(artifact.quantization.op_types if artifact.quantization else ())
    assert allowed == {"MatMul", "Gemm", "Conv"}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and dqs

    # Q feeds only DQ; DQ reads a Q (activation) or an int8 constant (weight) and feeds only MatMul/Gemm/Conv.
    for q in qs:
        assert {r.op_type for r in readers[q.output[0]]} == {"DequantizeLinear"}, q.name
    weight_dqs = []
    for dq in dqs:
        consumers = readers.get(dq.output[0], [])
        assert consumers and {c.op_type for c in consumers} <= allowed, (dq.name, [c.op_type for c in consumers])
        if dq.input[0] in inits:
            weight_dqs.append(dq)
        else:
            assert producers[dq.input[0]].op_type == "QuantizeLinear", dq.name

    # Nothing numerically fragile reads a dequantized tensor, and none of it was removed.
    for node in model.graph.node:
        if node.op_type in FLOAT_OPS:
            for name in node.input:
                assert name not in producers or producers[name].op_type != "DequantizeLinear", (node.op_type, node.name)
    for op in FLOAT_OPS:
        assert sum(n.op_type == op for n in model.graph.node) == sum(n.op_type == op for n in fp32.graph.node), op

    # Symmetric: every zero point is an int8 zero. Activations: one scale per tensor.
    for node in qs + dqs:
        assert len(node.input) == 3 and node.input[2] in inits, node.name
        zp = inits[node.input[2]]
        assert zp.data_type == TensorProto.INT8 and not np.any(numpy_helper.to_array(zp)), node.name
        if node.input[0] not in inits:
            assert numpy_helper.to_array(inits[node.input[1]]).size == 1, node.name

    # Weights: int8 constants, one positive scale per output channel on the right axis.
    for dq in weight_dqs:
        weight = inits[dq.input[0]]
        consumer = readers[dq.output[0]][0]
        assert list(consumer.input).index(dq.output[0]) == 1, consumer.name  # the weight input, not the activation
        assert weight.data_type == TensorProto.INT8
        axis = _attr(dq, "axis", 1) % len(weight.dims)
        assert axis == _output_channel_axis(consumer, len(weight.dims)), (consumer.op_type, consumer.name, axis)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert scale.shape == (weight.dims[axis],) and np.all(scale > 0), consumer.name

    # Every MatMul/Gemm/Conv with a constant weight gets it through Q/DQ, except the nodes the recipe
    # lists as kept float (which then read no dequantized tensor at all).
    excluded = set(artifact.quantization.excluded_nodes if artifact.quantization else ())
    fp32_weighted = {
        n.name
        for n in fp32.graph.node
        if n.op_type in allowed and len(n.input) > 1 and n.input[1] in {i.name for i in fp32.graph.initializer}
    }
    gemms = [n for n in model.graph.node if n.op_type in allowed]
    assert {n.name for n in gemms} >= fp32_weighted - excluded
    for node in gemms:
        dequantized = [
            name for name in node.input if name in producers and producers[name].op_type == "DequantizeLinear"
        ]
        if node.name in excluded:
            assert not dequantized, node.name
        elif node.name in fp32_weighted:
            assert node.input[1] in dequantized and producers[node.input[1]].input[0] in inits, node.name
    assert len(weight_dqs) == len(fp32_weighted - excluded)
    assert qdq_problems(artifact.path / "model.onnx") == []


def test_qdq_guard_catches_asymmetric_zero_points(built: Built, tmp_path: Path) -> None:
    """The guard compile() runs after quantizing: a uint8 (asymmetric) zero point is what TensorRT refuses."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = _onnx(built.deferred(HEADS[1], Precision.INT8).path / "model.onnx")
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in model.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    problems = qdq_problems(bad)
    assert any(q.name in p and "zero point" in p for p in problems)
    assert zp.data_type == TensorProto.INT8


# ------------------------------------------------------------------------------------ (b) simulated drift


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.key)
def test_simulated_drift_of_the_qdq_graph(head: Head, built: Built) -> None:
    model, _, _ = built.graph(head)
    artifact = built.deferred(head, Precision.INT8)
    evaluation = built.samples(head, "evaluation")
    assert NOT_BUILT in artifact.notes and SIMULATED_INT8 in artifact.notes and SIMULATED_LATENCY in artifact.notes
    with TorchRunner(make_wrapper(model), head.outputs, THREADS) as ref:
        reference = [ref.infer(f) for f in evaluation.feeds]
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        assert runner.name == "tensorrt-int8 (Q/DQ graph, fp16 remainder, simulated on ONNX Runtime)"
        drift = task_drift(
            model,
            reference,
            runner.infer,
            evaluation.feeds,
            DEFAULT_BUDGETS[head.metric],
            labels=evaluation.labels,
            source=evaluation.source,
        )
    assert drift.samples == len(evaluation) > 0
    assert drift.metrics and all(math.isfinite(v) for v in drift.metrics.values()), drift.metrics
    assert set(DEFAULT_BUDGETS[head.metric]) & set(drift.metrics)
    # random weights: answers against labels mean nothing, but the outputs must still agree (measured: logit cosine
    # 0.9976-1.0 on the tiny presets); a wrong Q/DQ scale or a saturated int8 path gives far less
    assert drift.metrics["logit_cosine"] >= 0.95, drift.metrics


def test_deferred_fp32_runs_the_fp32_graph(built: Built) -> None:
    head = HEADS[1]
    model, profile, graph = built.graph(head)
    artifact = built.deferred(head, Precision.FP32)
    assert artifact.model_file == artifact.path / "model.onnx"
    assert (
        os.path.samefile(artifact.model_file, graph.path) or artifact.model_file.read_bytes() == graph.path.read_bytes()
    )
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        assert runner.name == "tensorrt-fp32 (engine not built: fp32 graph on ONNX Runtime)"
        drift = shape_check(model, make_wrapper(model), runner.infer, profile)
    assert drift.passed, drift.detail


# ------------------------------------------------------------------------------------ (c) the deferred bundle


def _shape_arg(script_args: list[str], flag: str) -> dict[str, tuple[int, ...]]:
    value = next(a.split("=", 1)[1] for a in script_args if a.startswith(flag + "="))
    out = {}
    for item in value.split(","):
        name, dims = item.rsplit(":", 1)
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


# INT8 on every modality; the float bundles differ only in their flags, so the text head shows them.
BUNDLE_CASES = [(h, Precision.INT8) for h in HEADS] + [(HEADS[1], Precision.FP32), (HEADS[1], Precision.FP16)]


@pytest.mark.parametrize(("head", "precision"), BUNDLE_CASES, ids=lambda x: x.key if isinstance(x, Head) else x.value)
def test_deferred_bundle_recipe_and_script(head: Head, precision: Precision, built: Built, tmp_path: Path) -> None:
    _, profile, graph = built.graph(head)
    artifact = built.deferred(head, precision)
    folder = artifact.path
    names = {p.name for p in artifact.files}
    assert {"model.onnx", RECIPE_FILE, SCRIPT_FILE} <= names and PLAN_FILE not in names and ENGINE_MANIFEST not in names
    assert artifact.model_file == folder / "model.onnx" and NOT_BUILT in artifact.notes

    recipe = read_recipe(folder)
    assert recipe["precision"] == precision.value and recipe["onnx"] == "model.onnx" and recipe["engine"] == PLAN_FILE
    assert int(recipe["tensorrt"]["min_version"].split(".")[0]) >= 10
    assert recipe["workspace_bytes"] > 0 and recipe["timing_cache"]
    assert recipe["outputs"] == list(head.outputs)
    expected: dict[str, dict[str, tuple[int, ...]]] = {}
    for which in ("min", "opt", "max"):
        sizes = profile.point(which)
        expected[which] = {}
        for spec in graph.inputs:
            dims = {"height": sizes.get("image_size", 0), "width": sizes.get("image_size", 0)} | sizes
            expected[which][spec.name] = tuple(a if isinstance(a, int) else dims[a] for a in spec.shape)
    assert [i["name"] for i in recipe["inputs"]] == [t.name for t in graph.inputs]
    for entry in recipe["inputs"]:
        for which in ("min", "opt", "max"):
            assert tuple(entry[which]) == expected[which][entry["name"]], (entry["name"], which)
    batch = profile.dim("batch")
    assert [i["min"][0] for i in recipe["inputs"]] == [batch.min] * len(graph.inputs)
    assert [i["max"][0] for i in recipe["inputs"]] == [batch.max] * len(graph.inputs)
    # every precision strongly typed, no precision flag: the same bundle builds on TensorRT 10.x and 11.x
    flags = {
        Precision.FP32: {"--stronglyTyped", "--noTF32"},
        Precision.FP16: {"--stronglyTyped"},
        Precision.INT8: {"--stronglyTyped"},
    }
    assert recipe["strongly_typed"] is True and recipe["builder_flags"] == []
    assert recipe["tensorrt"]["min_version"] == "10.0" and recipe["tensorrt"]["max_version_exclusive"] is None
    assert (recipe["quantization"] is not None) is (precision is Precision.INT8)

    # The script, run for real against the stand-in trtexec of TensorRT 11 (rejects --fp16/--int8/--best, writes the plan).
    work = tmp_path / "bundle"
    shutil.copytree(folder, work)
    script = work / SCRIPT_FILE
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    log = tmp_path / "args.json"
    env = dict(
        os.environ,
        TRTEXEC=str(FAKE_TRTEXEC),
        FAKE_TRTEXEC_LOG=str(log),
        FAKE_TRT_VERSION="11.4.0",
        PYTHON=sys.executable,
    )
    done = subprocess.run([str(script), "--verbose"], env=env, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    cwd, *args = json.loads(log.read_text())
    assert Path(cwd).resolve() == work.resolve()
    assert "--onnx=model.onnx" in args and f"--saveEngine=.{PLAN_FILE}.partial" in args and args[-1] == "--verbose"
    for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        assert _shape_arg(args, flag) == expected[which], flag
    assert flags[precision] <= set(args) and not {"--int8", "--fp16", "--best", "--noTF32"} - flags[precision] & set(
        args
    )
    assert (
        "--timingCacheFile=timing.cache" in args
        and "--profilingVerbosity=detailed" in args
        and "--exportLayerInfo=layers.json" in args
    )
    assert any(re.fullmatch(r"--memPoolSize=workspace:\d+M", a) for a in args)
    assert [a.replace(f".{PLAN_FILE}.partial", PLAN_FILE) for a in recipe["trtexec"].split()[1:]] == [
        a.replace(f".{PLAN_FILE}.partial", PLAN_FILE) for a in args[:-1]
    ]
    assert (
        json.loads((work / PLAN_FILE).read_bytes()[len(b"FAKEPLAN") :])["built_with"] == "trtexec"
        and not (work / f".{PLAN_FILE}.partial").exists()
    )
    engine = json.loads((work / ENGINE_MANIFEST).read_text())  # recorded by trt_device.py record
    assert (
        engine["built_with"] == "trtexec" and engine["tensorrt"] == "11.4.0" and engine["layer_info"] == "layers.json"
    )
    assert engine["verified_on_this_version"] is False and "not verified on this version" in done.stderr

    assert find_bundles(folder) == (folder,)
    assert folder in find_bundles(folder.parent)


def test_int8_bundle_graph_is_the_qdq_graph_fp16_the_fp16_graph_and_fp32_the_export(built: Built) -> None:
    from onnx import TensorProto

    head = HEADS[1]
    _, _, graph = built.graph(head)
    export_bytes = graph.path.read_bytes()
    assert (built.deferred(head, Precision.FP32).path / "model.onnx").read_bytes() == export_bytes
    half = _onnx(built.deferred(head, Precision.FP16).path / "model.onnx")
    assert graph.path.read_bytes() == export_bytes  # the export itself (hard-linked into the fp32 bundle) is untouched
    # typed fp16 in the graph: fp16 weights, fp32 inputs/outputs with casts at the boundaries, fp32 islands only as FP32_OPS
    floats = [i for i in half.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(i.data_type == TensorProto.FLOAT16 or i.name.endswith("_fp32") for i in floats)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in half.graph.output)
    assert {n.op_type for n in half.graph.node if n.name.endswith("_d2v_to_fp32")} == {"Cast"}
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in half.graph.node}
    ops = {n.op_type for n in _onnx(built.deferred(head, Precision.INT8).path / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.key)
def test_fp16_bundle_matches_pytorch_within_the_half_tolerance(head: Head, built: Built) -> None:
    """The fp16 graph on ONNX Runtime (CPU, graph optimisations off) against PyTorch, as every half artifact is checked."""
    from d2v_export.convert.validate import HALF_TOLERANCE_FACTOR

    model, profile, _ = built.graph(head)
    artifact = built.deferred(head, Precision.FP16)
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        assert runner.name == "tensorrt-fp16 (fp16 graph, simulated on ONNX Runtime)"
        drift = shape_check(
            model, make_wrapper(model), runner.infer, profile, tolerance=head.tolerance * HALF_TOLERANCE_FACTOR["fp16"]
        )
    assert drift.passed, drift.detail
    assert drift.metrics["max_scaled_error"] > 1e-5  # really fp16 (the fp32 graph stays near 1e-7)


# ------------------------------------------------------------------------------------ (d) error paths


@pytest.mark.skipif(GPU.ok, reason="TensorRT and a GPU are here: the engine is built instead")
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16, Precision.INT8], ids=lambda p: p.value)
def test_without_tensorrt_build_fails_fast_naming_defer_build(
    precision: Precision, built: Built, tmp_path: Path
) -> None:
    head = HEADS[1]
    _, _, graph = built.graph(head)
    folder = tmp_path / "out"
    with pytest.raises(D2VError) as info:
        BACKEND.compile(graph, folder, built.request(head, precision, defer=False))
    assert info.value.code == ExitCode.TARGET_UNAVAILABLE
    message = str(info.value)
    assert "--defer-build" in message and "\n" not in message and "TensorRT" in message
    assert not folder.exists() or not any(folder.iterdir())  # nothing half-written


@pytest.mark.skipif(GPU.ok, reason="TensorRT and a GPU are here")
def test_build_engine_needs_the_device(built: Built, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(built.deferred(HEADS[1], Precision.FP32).path, folder)
    with pytest.raises(D2VError, match="--no-verify"):  # compile() alone writes no manifest.json: refused unless told
        build_engine(folder)
    with pytest.raises(D2VError) as info:
        build_engine(folder, verify=False)
    assert info.value.code == ExitCode.TARGET_UNAVAILABLE and "target device" in str(info.value)
    assert not (folder / PLAN_FILE).exists()


def test_build_engine_refuses_a_folder_without_recipe(tmp_path: Path) -> None:
    with pytest.raises(D2VError) as info:
        build_engine(tmp_path)
    assert info.value.code == ExitCode.BAD_INPUT and RECIPE_FILE in str(info.value)
    (tmp_path / RECIPE_FILE).write_text('{"format": "something else"}')
    with pytest.raises(D2VError, match="recipe"):
        read_recipe(tmp_path)


def test_int8_needs_static_symmetric_qdq(built: Built, tmp_path: Path) -> None:
    head = HEADS[1]
    _, _, graph = built.graph(head)
    dynamic = make_recipe(backends.get("onnxruntime"), "dynamic")
    request = TensorRTRequest(precision=Precision.INT8, quant=dynamic, defer_build=True)
    with pytest.raises(D2VError, match="static"):
        BACKEND.compile(graph, tmp_path / "x", request)
    with pytest.raises(D2VError):
        BACKEND.compile(graph, tmp_path / "y", TensorRTRequest(precision=Precision.BF16, defer_build=True))


# ------------------------------------------------------------------------------------ (e) on a GPU


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16], ids=lambda p: p.value)
def test_engine_float_matches_pytorch(precision: Precision, built: Built, tmp_path: Path) -> None:
    head = HEADS[1]
    model, profile, graph = built.graph(head)
    artifact = BACKEND.compile(graph, tmp_path / precision.value, built.request(head, precision, defer=False))
    assert artifact.model_file.name == PLAN_FILE and artifact.model_file.stat().st_size > 0
    manifest = json.loads((artifact.path / ENGINE_MANIFEST).read_text())
    assert (
        int(manifest["tensorrt"].split(".")[0]) >= 10
        and manifest["gpu"]
        and re.fullmatch(r"\d+\.\d+", manifest["compute_capability"])
    )
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        assert runner.name == f"tensorrt-{precision.value}"  # the engine, not the ONNX Runtime stand-in
        drift = shape_check(model, make_wrapper(model), runner.infer, profile)
    limit = 1e-3 if precision is Precision.FP32 else 5e-2
    assert drift.metrics["max_scaled_error"] <= limit, drift.detail


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.key)
def test_engine_int8_against_pytorch_and_the_simulation(head: Head, built: Built, tmp_path: Path) -> None:
    model, _, graph = built.graph(head)
    artifact = BACKEND.compile(graph, tmp_path / "int8", built.request(head, Precision.INT8, defer=False))
    assert artifact.model_file.name == PLAN_FILE
    evaluation = built.samples(head, "evaluation")
    with TorchRunner(make_wrapper(model), head.outputs, THREADS) as ref:
        reference = [ref.infer(f) for f in evaluation.feeds]
    with BACKEND.runner(artifact, threads=THREADS) as engine:
        outputs = [engine.infer(f) for f in evaluation.feeds]
        drift = task_drift(
            model, reference, engine.infer, evaluation.feeds, DEFAULT_BUDGETS[head.metric], source=evaluation.source
        )
    # as the simulation (test_simulated_drift_of_the_qdq_graph)
    assert drift.metrics["logit_cosine"] >= 0.95, drift.metrics
    simulated = built.deferred(head, Precision.INT8)
    with BACKEND.runner(simulated, threads=THREADS) as ort_runner:
        for feed, got in zip(evaluation.feeds, outputs):
            want = ort_runner.infer(feed)
            for name in head.outputs:
                scale = max(1.0, float(np.max(np.abs(want[name]))))
                assert float(np.max(np.abs(got[name] - want[name]))) / scale < 0.1, name


@needs_gpu
@pytest.mark.gpu
def test_build_engine_on_a_deferred_bundle(built: Built, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(built.deferred(HEADS[0], Precision.FP32).path, folder)
    cache = tmp_path / "shared.cache"
    # compile() writes no manifest.json
    plan = build_engine(folder, workspace_gb=1.0, timing_cache=cache, iterations=50, verify=False)
    assert plan == folder / PLAN_FILE and plan.stat().st_size > 0 and cache.stat().st_size > 0
    manifest = json.loads((folder / ENGINE_MANIFEST).read_text())
    assert manifest["precision"] == "fp32" and manifest["workspace_bytes"] == 1 << 30
    # 5 rounds of 10 between one event pair
    assert manifest["benchmark"]["p50_ms"] > 0 and manifest["benchmark"]["runs"] == 50
    assert all(v["max_scaled_error"] < 1e-3 for v in manifest["check_vs_onnxruntime"].values()), manifest[
        "check_vs_onnxruntime"
    ]
    # the timing cache is reused
    again = build_engine(folder, workspace_gb=1.0, timing_cache=cache, iterations=10, verify=False)
    assert again == plan and json.loads((folder / ENGINE_MANIFEST).read_text())["timing_cache_reused"] is True


# ------------------------------------------------------------------------------------ (f) types


def patched_stubs(target: Path) -> Path | None:
    """A copy of tensorrt-stubs that mypy can read, or None when the stubs are not installed.

    tensorrt-stubs 10.x installs `tensorrt/__init__.pyi` without a py.typed marker (mypy then ignores
    it and every TensorRT call is Any), names parameters `in` (a syntax error) and puts required
    parameters after defaulted ones. The copy renames such parameters, gives late ones a default and
    drops the import of the runtime-only `tensorrt_libs`; mypy reads it through MYPYPATH.
    """
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or not spec.submodule_search_locations:
        return None
    src_trt = Path(next(iter(spec.submodule_search_locations)))
    src_bind = src_trt.parent / "tensorrt_bindings"
    if not (src_trt / "__init__.pyi").is_file() or not src_bind.is_dir():
        return None
    keywords = "in|from|lambda|def|class|is|not|and|or|global|import|pass|return|with|yield"

    def fix(line: str) -> str:
        m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$", line)
        if not m:
            return line
        head, params, tail = m.groups()
        params = re.sub(rf"(^|, )({keywords}):", r"\1\2_:", params)
        parts, depth, cur = [], 0, ""
        for ch in params:
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur.strip():
            parts.append(cur)
        seen_default, fixed = False, []
        for p in (p.strip() for p in parts):
            if "=" in p:
                seen_default = True
            elif seen_default and not p.startswith("*"):
                p += " = ..."
            fixed.append(p)
        return head + ", ".join(fixed) + tail

    for src, name in ((src_trt, "tensorrt"), (src_bind, "tensorrt_bindings")):
        (target / name).mkdir(parents=True)
        for f in src.glob("*.pyi"):
            lines = [fix(line) for line in f.read_text().splitlines() if not line.startswith("import tensorrt_libs")]
            text = "\n".join(lines) + "\n"
            ast.parse(text)
            (target / name / f.name).write_text(text)
    return target


def test_tensorrt_code_type_checks_against_the_stubs(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'd2v-export[test]')")
    stubs = patched_stubs(tmp_path / "stubs")
    if stubs is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nwarn_unused_ignores = False\n"
        "disallow_untyped_defs = True\ncheck_untyped_defs = True\nwarn_redundant_casts = True\n"
        "[mypy-tensorrt.*,tensorrt_bindings.*]\nignore_errors = True\n"
        "[mypy-torch.*,transformers.*,onnx.*,onnxruntime.*,onnxscript.*,openvino.*,nncf.*,scipy.*]\nfollow_imports = skip\n"
        "[mypy-d2v_export.*]\ndisallow_untyped_defs = False\n[mypy-d2v_export.backends.tensorrt.*,d2v_export.backends.tensorrt]\ndisallow_untyped_defs = True\n"
    )
    probe = tmp_path / "probe_types.py"  # proves that the stubs are really read (not Any)
    probe.write_text("import tensorrt as trt\nreveal_type(trt.Builder.create_network)\n")
    files = [str(p) for p in sorted((ROOT / "d2v_export" / "backends" / "tensorrt").glob("*.py"))]
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(config),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-incremental",
    ]
    seen = subprocess.run(
        [*cmd, str(probe)], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert "INetworkDefinition" in seen.stdout, seen.stdout[-2000:]
    result = subprocess.run([*cmd, *files], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# ------------------------------------------------------------------------------------ fallback


def test_fallback_keeps_nodes_float_in_the_qdq_bundle(built: Built, tmp_path: Path) -> None:
    """--fallback auto for TensorRT: candidates judged as shipped (fix-ups applied), the chosen graph bundled."""
    from d2v_export.backends.base import Recovery
    from d2v_export.spec import Drift

    head = HEADS[0]
    model, _, graph = built.graph(head)
    calib, evaluation = built.samples(head, "calibration"), built.samples(head, "evaluation")
    with TorchRunner(make_wrapper(model), head.outputs, THREADS) as ref:
        reference = [ref.infer(f) for f in evaluation.feeds]
    floats: list[int] = []

    def evaluate(artifact: Artifact) -> Drift:
        assert not qdq_problems(artifact.model_file)  # every candidate is a graph TensorRT accepts
        floats.append(len(onnx_float_matmuls(artifact.model_file)))
        with BACKEND.runner(artifact, threads=THREADS) as runner:
            drift = task_drift(model, reference, runner.infer, evaluation.feeds, DEFAULT_BUDGETS[head.metric])
        # a budget that holds only once two more nodes than the plain recipe's are float: the search must
        # move, and the bundle must hold the graph it stopped at
        ok = floats[-1] >= floats[0] + 2
        return dataclasses.replace(drift, passed=ok, failed=() if ok else ("planted",))

    recovery = Recovery(
        evaluate=evaluate,
        feeds=tuple(evaluation.feeds),
        reference=tuple(reference),
        score=lambda *_: 0.0,
        max_drop=0.0,
        calibration=tuple(calib.feeds),
    )
    folder = tmp_path / "tensorrt-int8"
    artifact, drift, notes = BACKEND.recover(graph, folder, built.request(head, Precision.INT8), recovery)
    assert drift.passed and len(floats) >= 2 and floats[0] < floats[-1]
    assert artifact.quantization is not None and len(artifact.quantization.excluded_nodes) >= 2
    recipe = json.loads((folder / "build_recipe.json").read_text())
    assert recipe["quantization"]["excluded_nodes"] == list(artifact.quantization.excluded_nodes)
    assert (folder / "build_engine.sh").is_file() and not qdq_problems(folder / "model.onnx")
    assert set(artifact.quantization.excluded_nodes) <= onnx_float_matmuls(folder / "model.onnx")
    assert notes and notes[0].startswith("fallback:")


def onnx_float_matmuls(path: Path) -> set[str]:
    """Names of the MatMul/Gemm/Conv nodes that no DequantizeLinear feeds (left float)."""
    model = _onnx(path)
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and not any(i in dq for i in n.input)
    }


def test_tensorrt_extras_stay_on_one_cuda_major_each() -> None:
    """[tensorrt] resolves below TensorRT 11 and CUDA Python 13 (CUDA 12 machines, JetPack's major); [tensorrt-cu13]
    is TensorRT 11 with CUDA Python 13. PyPI serves tensorrt-cu12 11.4 and cuda-python 13.x: without the upper
    bounds the default install needs an R580 driver and has no weak typing."""
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, allowed, refused in (
        (
            "tensorrt",
            {"tensorrt-cu12": "10.3.0", "cuda-python": "12.9.0"},
            {"tensorrt-cu12": "11.4.0", "cuda-python": "13.4.4"},
        ),
        (
            "tensorrt-cu13",
            {"tensorrt-cu13": "11.4.0", "cuda-python": "13.4.4"},
            {"tensorrt-cu13": "10.13.0", "cuda-python": "12.9.0"},
        ),
    ):
        reqs = {(r := Requirement(line)).name: r.specifier for line in extras[extra]}
        assert set(reqs) == set(allowed), (extra, reqs)
        assert all(reqs[name].contains(v) for name, v in allowed.items()), (extra, reqs)
        assert not any(reqs[name].contains(v) for name, v in refused.items()), (extra, reqs)
