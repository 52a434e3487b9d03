"""INT8 through onnxruntime.quantization, for real: tiny presets, bundled calibration samples.

One head per modality is exported once per module; every test quantizes it and runs the result in
ONNX Runtime. The outlier test plants the failure mode that breaks static INT8 on real models
(a few huge channels in a LayerNorm output) and checks that the fallback finds and fixes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from d2v_export.backends.onnxruntime import OrtRunner
from d2v_export.convert.export import export
from d2v_export.int8.fallback import FallbackResult, fallback, rank_nodes
from d2v_export.heads import dummy_inputs, head_for
from d2v_export.measure.metrics import DEFAULT_BUDGETS
from d2v_export import backends
from d2v_export.int8.quantize import FLOAT_OPS, QuantSession, make_recipe, quantize_onnx
from d2v_export.spec import D2VError, ExitCode, ExportedGraph, Modality
from d2v_export.convert.validate import task_drift

from .conftest import tiny

CASES = {
    Modality.VISION: "image-classification",
    Modality.TEXT: "text-classification",
    Modality.AUDIO: "automatic-speech-recognition",
}


@dataclasses.dataclass
class Case:
    model: Any
    graph: ExportedGraph
    calibration: tuple[dict[str, np.ndarray], ...]
    evaluation: tuple[dict[str, np.ndarray], ...]


def _feeds(model: Any, profile: Any, split: str, count: int, seed: int) -> tuple[dict[str, np.ndarray], ...]:
    """The bundled real samples when the calibration package has them, else random inputs of the right kind."""
    try:
        from d2v_export.calibration import load_samples

        return tuple(load_samples(None, model, profile, split=split, count=count, seed=0).feeds)
    except (ImportError, D2VError):
        sizes = profile.point("opt") | {"batch": 1}
        return tuple(dummy_inputs(model.head, model.config, sizes, seed=seed + i) for i in range(count))


class Cases(dict):  # type: ignore[type-arg]
    """Exports a modality's head on first use: under pytest-xdist a worker only pays for what it runs."""

    def __init__(self, root: pytest.TempPathFactory) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, modality: Modality) -> Case:
        model, profile = tiny(head_for(modality, CASES[modality]))
        graph = export(model, profile, self.root.mktemp(modality.value) / "model.onnx")
        case = Case(
            model, graph, _feeds(model, profile, "calibration", 6, 0), _feeds(model, profile, "evaluation", 12, 100)
        )
        self[modality] = case
        return case


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[Modality, Case]:
    return Cases(tmp_path_factory)


def _run(path: Path, feeds: tuple[dict[str, np.ndarray], ...]) -> list[dict[str, np.ndarray]]:
    with OrtRunner(path, threads=1) as runner:
        return [runner.infer(f) for f in feeds]


def _check_runs(case: Case, path: Path) -> None:
    """Finite outputs with the fp32 graph's names and shapes."""
    want = _run(case.graph.path, case.evaluation[:3])
    got = _run(path, case.evaluation[:3])
    for w, g in zip(want, got):
        assert set(g) == set(w)
        for name in w:
            assert g[name].shape == w[name].shape, name
            assert np.all(np.isfinite(g[name])), name


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _dq_readers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that read the output of a DequantizeLinear."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n for n in model.graph.node if any(i in dq for i in n.input)]


# ------------------------------------------------------------------------------------ recipes


def test_recipes_are_data() -> None:
    assert set(backends.get("onnxruntime").int8_recipes) == {"static", "dynamic"} and set(
        backends.get("tensorrt").int8_recipes
    ) == {"static"}
    trt = make_recipe(backends.get("tensorrt"), "static", method="entropy", samples=8, excluded=("node_x",))
    assert trt.symmetric_activations and trt.per_channel
    assert set(trt.op_types) == {"MatMul", "Gemm", "Conv"}
    assert (trt.method, trt.samples, trt.excluded_nodes) == ("entropy", 8, ("node_x",))
    dyn = make_recipe(backends.get("onnxruntime"), "dynamic", samples=8)
    assert (dyn.mode, dyn.samples) == ("dynamic", 0)
    # the recipe's tool is the target's (its template), not one tool stamped on every target's
    assert (dyn.tool, make_recipe(backends.get("openvino"), "static").tool) == ("onnxruntime.quantization", "nncf")
    with pytest.raises(D2VError, match="tensorrt"):
        make_recipe(backends.get("nosuchtarget"), "static")
    with pytest.raises(D2VError, match="static"):
        make_recipe(backends.get("tensorrt"), "dynamic")
    with pytest.raises(D2VError, match="minmax"):
        make_recipe(backends.get("onnxruntime"), "static", method="kl")


# ------------------------------------------------------------------------------- per modality


@pytest.mark.parametrize("modality", list(CASES), ids=lambda m: m.value)
def test_dynamic(cases: dict[Modality, Case], modality: Modality, tmp_path: Path) -> None:
    case = cases[modality]
    q = quantize_onnx(case.graph, tmp_path / "model.onnx", make_recipe(backends.get("onnxruntime"), "dynamic"))
    ops = _ops(q.path)
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0, ops
    assert ops.get("DynamicQuantizeLinear", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0, ops
    assert "QuantizeLinear" not in ops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # intermediates stay in a temp dir
    _check_runs(case, q.path)


@pytest.mark.parametrize("modality", list(CASES), ids=lambda m: m.value)
def test_static(cases: dict[Modality, Case], modality: Modality, tmp_path: Path) -> None:
    case = cases[modality]
    recipe = make_recipe(backends.get("onnxruntime"), "static", samples=len(case.calibration))
    q = quantize_onnx(case.graph, tmp_path / "model.onnx", recipe, case.calibration)
    model = onnx.load(str(q.path))
    ops = _ops(q.path)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0, ops
    readers = _dq_readers(model)
    assert readers
    assert {"LayerNormalization", "Softmax"} <= set(ops)  # the float ops are there, and read float values
    # Only the recipe's ops read quantized values; LayerNorm, Softmax, GELU, Gather, residual Adds stay float.
    assert {n.op_type for n in readers} <= set(recipe.op_types), {n.op_type for n in readers}
    assert not [n.name for n in readers if n.op_type in FLOAT_OPS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # The node that reads the raw input (the patch convolution; the waveform layer, a MatMul over the time-major
    # windows) stays float; text reads it through Gathers.
    first = (
        [n for n in model.graph.node if n.op_type in ("Conv", "MatMul")][:1] if modality is not Modality.TEXT else []
    )
    assert bool(q.recipe.excluded_nodes) == (modality is not Modality.TEXT), q.recipe
    assert [n.name for n in first] == list(q.recipe.excluded_nodes)
    assert not [i for n in first for i in n.input if i.endswith("_DequantizeLinear_Output")]
    _check_runs(case, q.path)


def test_tensorrt_recipe_is_symmetric_per_channel_on_matmul_inputs(cases: dict[Modality, Case], tmp_path: Path) -> None:
    case = cases[Modality.VISION]
    recipe = make_recipe(backends.get("tensorrt"), "static", samples=len(case.calibration))
    q = quantize_onnx(case.graph, tmp_path / "model.onnx", recipe, case.calibration)
    model = onnx.load(str(q.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits[node.input[2]]
            assert zp.dtype in (np.int8, np.int32) and not zp.any(), f"{node.name}: zero point {zp}"  # int32: a bias
    readers = _dq_readers(model)
    assert readers and {n.op_type for n in readers} <= {"MatMul", "Gemm", "Conv"}
    checked = 0
    for node in readers:
        for slot, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            weight, scale = inits[dq.input[0]], inits[dq.input[1]]
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            if node.op_type == "MatMul":
                want = weight.ndim - 1  # (in, out): one scale per output column
            elif node.op_type == "Gemm":
                want = 0 if trans_b else 1
            else:
                want = 0  # Conv (out, in, k...)
            if slot != 1:
                continue  # a Gemm / Conv bias
            assert axis == want and scale.shape == (weight.shape[want],), (
                f"{node.name}: axis {axis}, scale {scale.shape}, weight {weight.shape}"
            )
            checked += 1
    assert checked >= 8
    drift = _drift(case, q.path)
    assert drift.metrics["logit_cosine"] > 0.99, drift


# --------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_methods(cases: dict[Modality, Case], method: str, tmp_path: Path) -> None:
    case = cases[Modality.TEXT]  # varied sequence lengths: entropy/percentile used to fail with "Too many bins"
    recipe = make_recipe(backends.get("onnxruntime"), "static", method=method, samples=len(case.calibration))
    q = quantize_onnx(case.graph, tmp_path / "model.onnx", recipe, case.calibration)
    assert q.recipe.method == method
    _check_runs(case, q.path)


def test_static_without_calibration_names_the_fix(cases: dict[Modality, Case], tmp_path: Path) -> None:
    case = cases[Modality.TEXT]
    with pytest.raises(D2VError, match="--calibration"):
        quantize_onnx(case.graph, tmp_path / "model.onnx", make_recipe(backends.get("onnxruntime"), "static"), ())
    assert not (tmp_path / "model.onnx").exists()


def test_unknown_excluded_node_is_a_clear_error(cases: dict[Modality, Case], tmp_path: Path) -> None:
    case = cases[Modality.VISION]
    with pytest.raises(D2VError, match="no_such_node"):
        quantize_onnx(
            case.graph,
            tmp_path / "m.onnx",
            make_recipe(backends.get("onnxruntime"), "dynamic", excluded=("no_such_node",)),
        )


# ------------------------------------------------------------------------------------ fallback


def _drift(case: Case, path: Path, reference_path: Path | None = None) -> Any:
    reference = _run(reference_path or case.graph.path, case.evaluation)
    with OrtRunner(path, threads=1) as runner:
        return task_drift(case.model, reference, runner.infer, case.evaluation, DEFAULT_BUDGETS[case.model.head.metric])


def _plant_outliers(graph: ExportedGraph, path: Path, factor: float = 100.0) -> tuple[ExportedGraph, str]:
    """Make a few channels of the classifier's input LayerNorm huge and shrink the classifier's weights on them.

    The fp32 function is unchanged (up to rounding); a per-tensor INT8 scale on the classifier input is
    ruined by the outlier channels, as happens with trained transformers. Returns the graph and the
    classifier node's name.
    """
    model = onnx.load(str(graph.path))
    nodes = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    gemm = next(n for n in reversed(model.graph.node) if n.op_type == "Gemm")
    norm = nodes[gemm.input[0]]
    assert norm.op_type == "LayerNormalization"
    channels = [3, 17]

    def update(node: onnx.NodeProto, slot: int, fn: Any) -> None:
        """A changed private copy: exporters share identical initializers (every LayerNorm's ones)."""
        arr = numpy_helper.to_array(inits[node.input[slot]]).copy()
        fn(arr)
        name = f"{node.input[slot]}_planted_{node.name}"
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
        node.input[slot] = name

    def grow(a: np.ndarray) -> None:
        a[channels] *= factor

    def shrink(a: np.ndarray) -> None:
        trans_b = any(x.name == "transB" and x.i for x in gemm.attribute)
        if trans_b:
            a[:, channels] /= factor
        else:
            a[channels] /= factor

    update(norm, 1, grow)
    update(norm, 2, grow)
    update(gemm, 1, shrink)
    onnx.save(model, str(path))
    return dataclasses.replace(graph, path=path), gemm.name


def test_fallback_fixes_planted_outliers(cases: dict[Modality, Case], tmp_path: Path) -> None:
    case = cases[Modality.VISION]
    graph, classifier = _plant_outliers(case.graph, tmp_path / "outliers.onnx")
    same = _drift(case, graph.path)  # the planted graph computes the same function in fp32
    assert same.metrics["logit_cosine"] > 0.99999 and same.metrics["top1_agreement"] == 1.0

    def evaluate(path: Path) -> Any:
        return _drift(case, path)

    recipe = make_recipe(backends.get("onnxruntime"), "static", samples=len(case.calibration))
    plain = quantize_onnx(graph, tmp_path / "plain.onnx", recipe, case.calibration)
    assert not evaluate(plain.path).passed  # static INT8 as is breaks the budget

    result = fallback(graph, recipe, case.calibration, evaluate, target=tmp_path / "model.onnx", max_steps=6)
    assert isinstance(result, FallbackResult)
    assert not result.steps[0].passed  # the recipe as given failed
    assert result.drift.passed and result.steps[-1].passed
    assert result.kept_float, result.steps
    assert result.kept_float[0][0] == classifier  # the ranking found the planted node
    assert classifier in result.quantized.recipe.excluded_nodes
    assert result.quantized.path == tmp_path / "model.onnx" and evaluate(result.quantized.path).passed
    assert len(result.steps) <= 7


def test_fallback_passes_through_a_good_recipe(cases: dict[Modality, Case], tmp_path: Path) -> None:
    case = cases[Modality.VISION]
    recipe = make_recipe(backends.get("onnxruntime"), "static", samples=len(case.calibration))
    calls: list[Path] = []

    def evaluate(path: Path) -> Any:
        calls.append(path)
        return _drift(case, path)

    result = fallback(case.graph, recipe, case.calibration, evaluate, target=tmp_path / "model.onnx")
    assert result.drift.passed and result.kept_float == () and len(result.steps) == len(calls) == 1


def test_dynamic_ranking_finds_planted_outliers(cases: dict[Modality, Case], tmp_path: Path) -> None:
    case = cases[Modality.VISION]
    graph, classifier = _plant_outliers(case.graph, tmp_path / "outliers.onnx", factor=1000.0)
    session = QuantSession(graph.path, tmp_path, make_recipe(backends.get("onnxruntime"), "dynamic"))
    session.write(tmp_path / "dynamic.onnx")
    ranking = rank_nodes(session, tmp_path / "dynamic.onnx", case.calibration[:2])
    assert ranking and ranking[0][0] == classifier, ranking[:3]


def test_static_int8_never_rounds_a_graph_output(tmp_path: Path) -> None:
    """Logits must not come out of a DequantizeLinear: that clamps them to the calibration range."""
    from d2v_export.int8.quantize import make_recipe, quantize_onnx

    model, profile = tiny(head_for(Modality.TEXT, "text-classification"))
    graph = export(model, profile, tmp_path / "model.onnx")
    feeds = [dummy_inputs(model.head, model.config, profile.point("opt"), seed=i) for i in range(4)]
    quantize_onnx(graph, tmp_path / "int8.onnx", make_recipe(backends.get("onnxruntime"), "static", samples=4), feeds)
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    outputs = {o.name for o in proto.graph.output}
    producers = [n.op_type for n in proto.graph.node if outputs & set(n.output)]
    assert producers and "DequantizeLinear" not in producers


# ------------------------------------------------------------------------------- weight range


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 weight tensors of a quantized graph (static Q/DQ or dynamic MatMulInteger)."""
    model = onnx.load(str(path))
    return [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 16
    ]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_reduce_range_writes_7bit_weights(cases: dict[Modality, Case], mode: str, tmp_path: Path) -> None:
    case = cases[Modality.TEXT]
    calib = case.calibration if mode == "static" else ()
    full = quantize_onnx(
        case.graph, tmp_path / "full.onnx", make_recipe(backends.get("onnxruntime"), mode, samples=len(calib)), calib
    )
    seven_bit = dataclasses.replace(
        make_recipe(backends.get("onnxruntime"), mode, samples=len(calib)), reduce_range=True
    )
    reduced = quantize_onnx(case.graph, tmp_path / "reduced.onnx", seven_bit, calib)
    assert reduced.recipe.reduce_range and not full.recipe.reduce_range
    full_w, reduced_w = _int8_weights(full.path), _int8_weights(reduced.path)
    assert full_w and len(full_w) == len(reduced_w)
    # per-channel symmetric: the max maps to 127
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in full_w) == 127
    # 2 x 255 x 64 < 32767: no int16 saturation
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in reduced_w) <= 64
    _check_runs(case, reduced.path)


def test_reduce_range_only_where_the_kernel_saturates() -> None:
    from d2v_export.int8.quantize import saturates

    # Skylake-SP: AVX-512 without VNNI
    assert saturates(["avx2", "fma"], "x86_64") and saturates(["avx512f", "avx2"], "x86_64")
    assert not saturates(["avx2", "avx512_vnni"], "x86_64") and not saturates(["avx2", "avx_vnni"], "x86_64")
    assert not saturates([], "aarch64")


def _int8_recipes(target: str, settings: dict[str, str], *, pick: bool = False, profile: Any = None) -> dict[str, Any]:
    """The INT8 recipes ``target``'s plan makes, by variant name (no build)."""
    from d2v_export.backends.base import PlanContext
    from d2v_export.spec import QuantConfig

    backend = backends.get(target)
    ctx = PlanContext(
        int8=QuantConfig("static"), settings=settings, calibration=({},), pick=pick, profile=profile, modality="text"
    )
    return {v.name: v.request.quant for v in backend.plan(ctx) if v.request.quant is not None}


def test_only_the_target_that_owns_reduce_range_applies_it() -> None:
    """--reduce-range is ONNX Runtime's own setting (its backend declares, validates and plans it); other targets ignore it."""
    assert backends.int8_options()["reduce_range"] in backends.get("onnxruntime").int8_options
    assert _int8_recipes("onnxruntime", {"reduce_range": "on"})["onnxruntime-int8-static"].reduce_range
    assert not _int8_recipes("onnxruntime", {"reduce_range": "off"})["onnxruntime-int8-static"].reduce_range
    assert not _int8_recipes("tensorrt", {"reduce_range": "on"})[
        "tensorrt-int8-static"
    ].reduce_range  # GPU: symmetric int8, no such kernel
    assert not _int8_recipes("openvino", {"reduce_range": "on"})[
        "openvino-int8-static"
    ].reduce_range  # NNCF has its own overflow fix
    from d2v_export.options import QuantOptions

    with pytest.raises(D2VError, match="--reduce-range 'sometimes': choose one of auto, on, off") as bad:
        QuantOptions(target_options={"reduce_range": "sometimes"})
    assert bad.value.code == ExitCode.USAGE
    with pytest.raises(D2VError, match="no target's") as unknown:
        QuantOptions(target_options={"weight_bits": "7"})
    assert unknown.value.code == ExitCode.USAGE


def test_pick_drops_8bit_weights_where_the_deployment_cpu_saturates() -> None:
    from d2v_export.profiles import load_profile

    avx2 = _int8_recipes("onnxruntime", {}, pick=True, profile=load_profile("generic-avx2"))
    vnni = _int8_recipes("onnxruntime", {}, pick=True, profile=load_profile("xeon-vnni"))
    # no VNNI: auto gives 7-bit weights (so -7bit is a duplicate), and 8-bit weights would saturate: not a candidate
    assert avx2["onnxruntime-int8-static"].reduce_range and "onnxruntime-int8-static-7bit" not in avx2
    assert "onnxruntime-int8-static-8bit" not in avx2 and "onnxruntime-int8-dynamic-8bit" not in avx2
    # VNNI: auto gives 8-bit weights (so -8bit is a duplicate); 7-bit weights are a candidate
    assert not vnni["onnxruntime-int8-static"].reduce_range and vnni["onnxruntime-int8-static-7bit"].reduce_range
    assert "onnxruntime-int8-static-8bit" not in vnni and "onnxruntime-int8-static-clean" in vnni


def test_reduce_range_auto_follows_the_profile_cpu() -> None:
    from d2v_export.doctor import cpu_flags
    from d2v_export.backends.onnxruntime import wants_reduce_range
    from d2v_export.profiles import load_profile
    from d2v_export.int8.quantize import saturates

    assert wants_reduce_range("auto", load_profile("generic-avx2")) is True
    assert wants_reduce_range("auto", load_profile("xeon-vnni")) is False
    assert wants_reduce_range("auto") is saturates(cpu_flags())  # no profile: this machine, where drift is measured
    assert wants_reduce_range("on", load_profile("xeon-vnni")) is True
    assert wants_reduce_range("off", load_profile("generic-avx2")) is False


def test_the_saturation_rule_matches_this_cpu(tmp_path: Path) -> None:
    """ONNX Runtime's u8 x s8 MatMulInteger, full-range operands: exact exactly where ``saturates`` says so."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from d2v_export.doctor import cpu_flags
    from d2v_export.int8.quantize import saturates

    rng = np.random.default_rng(0)
    m, k, n = 32, 256, 64
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    results = {}
    for bound in (127, 64):
        b = rng.integers(-bound, bound + 1, (k, n)).astype(np.int8)
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
            "mm",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
            initializer=[numpy_helper.from_array(b, "B")],
        )
        session = ort.InferenceSession(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        got = session.run(None, {"A": a})[0]
        results[bound] = bool(np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64)))
    assert results[64], "7-bit weights must be exact on every CPU"
    assert results[127] is not saturates(cpu_flags()), (
        f"full-range u8 x s8 exact={results[127]} on a CPU with {sorted(cpu_flags())}"
    )


def test_a_fallback_that_scores_worse_is_not_shipped() -> None:
    """The pipeline keeps the plain INT8 artifact when --fallback auto ends over budget *and* worse."""
    from d2v_export.pipeline import _worse
    from d2v_export.spec import Drift

    def drift(**m: float) -> Drift:
        return Drift("pytorch-fp32", 160, m, {}, passed=False)

    # measured on the trained audio example: NNCF accuracy control reverted 7 ops and lost 3.1 points, plain lost 1.9
    assert _worse(
        "classification",
        drift(accuracy_drop=0.031, top1_agreement=0.95),
        drift(accuracy_drop=0.019, top1_agreement=0.956),
    )
    assert not _worse(
        "classification",
        drift(accuracy_drop=0.01, top1_agreement=0.95),
        drift(accuracy_drop=0.019, top1_agreement=0.99),
    )
    # no labels: the primary metric
    assert _worse("classification", drift(top1_agreement=0.95), drift(top1_agreement=0.96))
    assert _worse("ctc", drift(cer=0.05), drift(cer=0.03)) and not _worse("ctc", drift(cer=0.02), drift(cer=0.03))
    # nothing comparable: keep the fallback
    assert not _worse("classification", drift(logit_cosine=0.9), drift(logit_cosine=0.99))


def test_the_ort_runner_does_not_spin(cases: dict[Modality, Case]) -> None:
    """d2v-export's ONNX Runtime sessions run without busy-waiting workers (docs/PERFORMANCE.md, "spinning")."""
    from d2v_export.backends.onnxruntime import SPINNING

    with OrtRunner(cases[Modality.VISION].graph.path, threads=2) as runner:
        assert runner.session.get_session_options().get_session_config_entry(SPINNING) == "0"
