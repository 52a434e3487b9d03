"""The OpenVINO target, for real: every head converted to IR and checked against PyTorch, NNCF INT8
(static and weight-only), bf16/fp16, the runner's settings and the error paths. No mocks.

Each tiny head is exported once per module (the export is most of the time) and shared by the tests.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino target needs pip install 'd2v-export[openvino]'")
pytest.importorskip("nncf", reason="the openvino target needs pip install 'd2v-export[openvino]'")

from d2v_export import backends
from d2v_export.backends.base import BuildRequest
from d2v_export.backends.openvino import (
    BACKEND,
    CONFIG_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    fake_quantize_count,
    quantize_with_accuracy_control,
)
from d2v_export.backends import _openvino_smooth as smoothing
from d2v_export.calibration import load_samples
from d2v_export.convert.export import export, make_wrapper, torch_forward
from d2v_export.heads import HEADS, Head, dummy_inputs, head_for
from d2v_export.measure.metrics import DEFAULT_BUDGETS
from d2v_export.models import LoadedModel
from d2v_export.spec import (
    Artifact,
    D2VError,
    ExitCode,
    ExportedGraph,
    Modality,
    Precision,
    QuantRecipe,
    ShapeProfile,
)
from d2v_export.convert.validate import shape_check, task_drift

from .conftest import tiny

THREADS = 2
# One head per modality for INT8: the default head of each preset (what a user gets without --task).
INT8_HEADS = [
    head_for(Modality.VISION, "image-classification"),
    head_for(Modality.TEXT, "text-classification"),
    head_for(Modality.AUDIO, "automatic-speech-recognition"),
]


class Exported:
    """A tiny head, its profile and its fp32 ONNX graph, built once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[LoadedModel, ShapeProfile, ExportedGraph]] = {}

        self._fp32: dict[str, Artifact] = {}

    def __call__(self, head: Head) -> tuple[LoadedModel, ShapeProfile, ExportedGraph]:
        if head.key not in self._cache:
            model, profile = tiny(head)
            path = self.root / head.key.replace("/", "-") / "model.onnx"
            self._cache[head.key] = (model, profile, export(model, profile, path))
        return self._cache[head.key]

    def fp32(self, head: Head) -> Artifact:
        """The fp32 IR of a head, compiled once (test_fp32_matches_pytorch checks it for every head)."""
        if head.key not in self._fp32:
            graph = self(head)[2]
            folder = graph.path.parent / "openvino-fp32"
            self._fp32[head.key] = BACKEND.compile(graph, folder, BuildRequest(Precision.FP32, threads=THREADS))
        return self._fp32[head.key]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(tmp_path_factory.mktemp("onnx"))


def calibration_feeds(
    model: LoadedModel, profile: ShapeProfile, split: str, count: int = 8
) -> tuple[tuple[dict[str, np.ndarray], ...], Any, str]:
    """(feeds, labels, source) from the small real sets bundled with d2v-export."""
    samples = load_samples(None, model, profile, split=split, count=count, seed=0)
    return tuple(samples.feeds), samples.labels, samples.source


def scaled_error(model: LoadedModel, profile: ShapeProfile, infer: Any) -> float:
    """max |candidate - PyTorch| / max(1, max |PyTorch|) over the head's outputs, at the profile's opt shape."""
    feed = dummy_inputs(model.head, model.config, profile.point("opt"), seed=5)
    ref = torch_forward(make_wrapper(model), feed, model.head.outputs)
    got = infer(feed)
    return max(
        float(np.max(np.abs(got[n] - ref[n]))) / max(1.0, float(np.max(np.abs(ref[n])))) for n in model.head.outputs
    )


# ------------------------------------------------------------------------------------ availability


def test_registry_finds_openvino() -> None:
    assert backends.get("openvino") is BACKEND
    assert BACKEND.extra == "openvino"
    avail = BACKEND.available()
    assert avail.ok, avail.reason
    assert avail.version == ov.__version__
    assert "CPU" in avail.devices


def test_missing_openvino_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` sees when it is not installed
    avail = BACKEND.available()
    assert not avail.ok
    assert avail.reason == "pip install 'd2v-export[openvino]'"


# ------------------------------------------------------------------------------------ fp32, every head


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.key)
def test_fp32_matches_pytorch(head: Head, exported: Exported) -> None:
    model, profile, _graph = exported(head)
    artifact = exported.fp32(head)
    assert artifact.model_file == artifact.path / MODEL_FILE
    assert artifact.target == "openvino" and artifact.precision is Precision.FP32
    assert {p.name for p in artifact.files} >= {MODEL_FILE, WEIGHTS_FILE, CONFIG_FILE}
    settings = json.loads((artifact.path / CONFIG_FILE).read_text())
    assert settings["inference_precision_hint"] == "f32"
    assert settings["outputs"] == list(head.outputs)
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        drift = shape_check(model, make_wrapper(model), runner.infer, profile)
        out = runner.infer(dummy_inputs(head, model.config, profile.point("opt")))
    assert tuple(out) == head.outputs  # ONNX output names, in order
    assert drift.passed, f"{head.key}: {drift.metrics} {drift.detail}"


def test_runner_pins_f32_and_threads(exported: Exported) -> None:
    """The bf16 pitfall: without the hint this CPU would run the 'fp32' IR in bf16."""
    artifact = exported.fp32(INT8_HEADS[1])
    with BACKEND.runner(artifact, threads=1) as runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert int(runner.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        assert int(runner.compiled.get_property("NUM_STREAMS")) == 1


# ------------------------------------------------------------------------------------ bf16 and fp16


def test_bf16_where_the_cpu_has_it(exported: Exported, tmp_path: Path) -> None:
    model, profile, graph = exported(INT8_HEADS[1])
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    request = BuildRequest(Precision.BF16, threads=THREADS)
    if "BF16" not in caps:
        with pytest.raises(D2VError) as err:
            BACKEND.compile(graph, tmp_path / "bf16", request)
        assert err.value.code is ExitCode.TARGET_UNAVAILABLE
        return
    artifact = BACKEND.compile(graph, tmp_path / "bf16", request)
    assert any("bf16" in n for n in artifact.notes)
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        assert scaled_error(model, profile, runner.infer) < 0.05


def test_fp16_halves_the_weights(exported: Exported, tmp_path: Path) -> None:
    model, profile, graph = exported(INT8_HEADS[1])
    fp32 = exported.fp32(INT8_HEADS[1])
    fp16 = BACKEND.compile(graph, tmp_path / "fp16", BuildRequest(Precision.FP16))
    size32, size16 = ((a.path / WEIGHTS_FILE).stat().st_size for a in (fp32, fp16))
    assert size16 < 0.6 * size32
    if "FP16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert any("no native f16" in n for n in fp16.notes)
    with BACKEND.runner(fp16, threads=THREADS) as runner:
        assert scaled_error(model, profile, runner.infer) < 0.05


# ------------------------------------------------------------------------------------ int8


@pytest.mark.parametrize("head", INT8_HEADS, ids=lambda h: h.key)
def test_int8_static_nncf(head: Head, exported: Exported, tmp_path: Path) -> None:
    model, profile, graph = exported(head)
    calib, _labels, _source = calibration_feeds(model, profile, "calibration")
    request = BuildRequest(Precision.INT8, QuantRecipe(mode="static"), calibration=calib, threads=THREADS)
    artifact = BACKEND.compile(graph, tmp_path / "openvino-int8", request)
    assert fake_quantize_count(artifact.model_file) > 0
    assert artifact.quantization is not None and artifact.quantization.tool.startswith("nncf")
    assert artifact.quantization.samples == len(calib)
    assert any("model_type=TRANSFORMER" in n for n in artifact.notes)
    # the MIXED preset's float remainder runs f32 on every CPU (bf16, the default on AMX Xeons, drifted the trained text
    # example alone); the PERFORMANCE preset keeps the device default (f32 cost vision base 23 % on AMX)
    hint = json.loads((artifact.path / CONFIG_FILE).read_text())["inference_precision_hint"]
    assert hint == (None if artifact.quantization.symmetric_activations else "f32"), (hint, artifact.quantization)
    assert any("runtime precision hint" in n for n in artifact.notes)
    # SmoothQuant ran in place before NNCF (its own step off): our Multiply nodes, none of NNCF's
    names = [
        op.get_friendly_name() for op in ov_model(artifact.model_file).get_ops() if op.get_type_name() == "Multiply"
    ]
    assert any(n.endswith(smoothing.SUFFIX) for n in names) and not any("nncf_smooth_quant" in n for n in names)
    assert any("SmoothQuant" in n and "by d2v-export" in n for n in artifact.notes)

    feeds, labels, source = calibration_feeds(model, profile, "evaluation")
    wrapper = make_wrapper(model)
    reference = [torch_forward(wrapper, dict(f), head.outputs) for f in feeds]
    with BACKEND.runner(artifact, threads=THREADS) as runner:
        drift = task_drift(
            model, reference, runner.infer, feeds, DEFAULT_BUDGETS[head.metric], labels=labels, source=source
        )
    # random weights: answers against labels mean nothing, but the outputs must still agree (measured: logit cosine
    # 0.989-0.9986 on the tiny presets); a wrong scale or a saturated int8 path gives far less
    assert drift.metrics["logit_cosine"] >= 0.95, drift.metrics


def ov_model(xml: Path) -> Any:
    import openvino as ov

    return ov.Core().read_model(str(xml))


def test_smoothquant_in_place_keeps_the_float_model(exported: Exported) -> None:
    """smooth() changes no float result (f32), adds one Multiply per group and replaces weights in place."""
    import openvino as ov

    head = head_for(Modality.TEXT, "text-classification")
    model, profile, _graph = exported(head)
    feeds = list(calibration_feeds(model, profile, "calibration", count=4)[0])
    xml = exported.fp32(head).model_file
    before = ov.Core().compile_model(ov_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    smoothed = ov_model(xml)
    groups = smoothing.find_groups(smoothed)
    count = smoothing.smooth(smoothed, feeds)
    assert count == sum(len(g.matmuls) for g in groups) > 0
    assert sum(op.get_friendly_name().endswith(smoothing.SUFFIX) for op in smoothed.get_ops()) == len(groups)
    after = ov.Core().compile_model(smoothed, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for feed in feeds:
        a, b = before(feed)[0], after(feed)[0]
        assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(a)))), np.max(np.abs(a - b))


def test_smoothquant_scales_move_outliers_into_the_weights() -> None:
    amax = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 80.0], np.float32)  # one outlier channel
    even = np.ones((10, 6), np.float32)  # [K, N]: a MatMul without transpose_b
    skewed = even.copy()
    skewed[9] = 50.0  # its weights already large where the activation is
    s = smoothing.scales(amax, [even], [-2], smoothing.ALPHA)
    assert int(np.argmax(s)) == 9 and np.allclose(s[:9], s[0])
    spread = lambda x: float(x.max() / np.median(x))  # noqa: E731
    assert spread(amax / s) < spread(amax) / 10  # the int8 activation range no longer spans the outlier
    # a group (query, key, value) takes the most even of its members' scales
    both = smoothing.scales(amax, [skewed, even], [-2, -2], smoothing.ALPHA)
    alone = [smoothing.scales(amax, [w], [-2], smoothing.ALPHA) for w in (skewed, even)]
    best = max(alone, key=lambda x: float(x.min() / x.max()))
    assert np.array_equal(both, best)


def test_int8_weight_only_compression(exported: Exported, tmp_path: Path) -> None:
    head = head_for(Modality.TEXT, "fill-mask")  # a 50265-token output layer: weights dominate
    model, profile, graph = exported(head)
    fp32 = exported.fp32(head)
    int8 = BACKEND.compile(graph, tmp_path / "int8", BuildRequest(Precision.INT8, QuantRecipe(mode="dynamic")))
    size32, size8 = ((a.path / WEIGHTS_FILE).stat().st_size for a in (fp32, int8))
    assert size8 < 0.5 * size32, (size8, size32)
    assert any("weight-only" in n for n in int8.notes)
    assert int8.quantization is not None and int8.quantization.method == "weight-only"
    assert fake_quantize_count(int8.model_file) == 0
    with BACKEND.runner(int8, threads=THREADS) as runner:
        assert scaled_error(model, profile, runner.infer) < 0.1


def test_accuracy_control_reverts_layers(exported: Exported) -> None:
    """NNCF's accuracy control on a tiny model: a zero drop budget forces it to revert something."""
    head = INT8_HEADS[1]
    model, profile, graph = exported(head)
    calib, _labels, _source = calibration_feeds(model, profile, "calibration")
    feeds, _labels, _source = calibration_feeds(model, profile, "evaluation")
    ref = [torch_forward(make_wrapper(model), dict(f), head.outputs)["logits"] for f in feeds]

    def cosine(indices: Sequence[int], outputs: Sequence[dict[str, np.ndarray]]) -> float:
        sims = []
        for i, out in zip(indices, outputs):
            a, b = ref[i].ravel(), out["logits"].ravel()
            sims.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
        return float(np.mean(sims))

    started = time.perf_counter()
    quantized, reverted = quantize_with_accuracy_control(
        ov.Core().read_model(str(graph.path)), calib, feeds, cosine, max_drop=0.0, max_iterations=2
    )
    seconds = time.perf_counter() - started
    assert isinstance(quantized, ov.Model)
    assert reverted, "a zero drop budget should make NNCF revert at least one operation"
    assert all(isinstance(n, str) and n for n in reverted)
    print(f"accuracy control: {len(reverted)} reverted in {seconds:.1f} s: {reverted}")


# ------------------------------------------------------------------------------------ errors


def test_unknown_device_is_target_unavailable(exported: Exported, tmp_path: Path) -> None:
    _model, _profile, graph = exported(INT8_HEADS[1])
    with pytest.raises(D2VError) as err:
        BACKEND.compile(graph, tmp_path / "x", BuildRequest(Precision.FP32, device="NPU.7"))
    assert err.value.code is ExitCode.TARGET_UNAVAILABLE
    assert "NPU.7" in str(err.value) and "\n" not in str(err.value)
    if "GPU" not in ov.Core().available_devices:
        with pytest.raises(D2VError):
            BACKEND.compile(graph, tmp_path / "y", BuildRequest(Precision.FP16, device="GPU"))


def test_static_int8_without_calibration_names_the_fix(exported: Exported, tmp_path: Path) -> None:
    _model, _profile, graph = exported(INT8_HEADS[1])
    with pytest.raises(D2VError) as err:
        BACKEND.compile(graph, tmp_path / "x", BuildRequest(Precision.INT8, QuantRecipe(mode="static")))
    assert "calibration" in str(err.value) and err.value.code is ExitCode.BAD_INPUT
