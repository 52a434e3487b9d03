"""What keeps a whole run's memory within a few times the fp32 weights (benchmarks/scale.py, docs/PERFORMANCE.md):
external data for large weights, no weight copies in the clean-up, PyTorch's check outputs computed once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from d2v_export.convert import export as export_mod
from d2v_export.int8 import rewrite
from d2v_export.backends import get
from d2v_export.backends.base import BuildRequest
from d2v_export.convert.export import export, make_wrapper
from d2v_export.heads import head_for
from d2v_export.spec import Modality
from d2v_export.convert.validate import shape_check

from .conftest import tiny


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    model, profile = tiny(head_for(Modality.VISION, "image-classification"))
    return model, profile, export(model, profile, tmp_path_factory.mktemp("mem") / "model.onnx")


def test_weights_over_the_threshold_are_exported_as_external_data(
    vision: tuple[Any, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, profile, inline = vision
    assert not inline.path.with_name("model.onnx.data").exists()  # tiny weights: one file, as before
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)
    graph = export(model, profile, tmp_path / "x" / "model.onnx")
    data = graph.path.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > 0 and graph.path.stat().st_size < inline.path.stat().st_size
    assert graph.check.passed and graph.check.metrics["max_scaled_error"] <= model.head.tolerance
    # the ONNX Runtime fp32 artifact carries the weights file along and runs
    artifact = get("onnxruntime").compile(graph, tmp_path / "ort", BuildRequest())
    assert {p.name for p in artifact.files} >= {"model.onnx", "model.onnx.data"}
    with get("onnxruntime").runner(artifact, threads=1) as runner:
        assert shape_check(model, make_wrapper(model), runner.infer, profile).passed


def test_shape_check_reuses_pytorch_outputs(vision: tuple[Any, Any, Any]) -> None:
    model, profile, graph = vision
    from d2v_export.backends.onnxruntime import OrtRunner

    kept: dict[Any, Any] = {}
    with OrtRunner(graph.path, threads=1) as runner:
        first = shape_check(model, make_wrapper(model), runner.infer, profile, reference_outputs=kept)
        assert kept and first.passed

        class NoTorch:  # a reference that must not run again
            def __call__(self, **_kw: Any) -> Any:
                raise AssertionError("PyTorch ran again for a shape it had already run")

        again = shape_check(model, NoTorch(), runner.infer, profile, reference_outputs=kept)
    assert again.metrics == first.metrics and again.passed

    # a wrong candidate is still caught against the kept outputs
    def off(feed: Any) -> dict[str, np.ndarray]:
        return {k: v + 1.0 for k, v in runner_out(graph, feed).items()}

    bad = shape_check(model, NoTorch(), off, profile, reference_outputs=kept)
    assert not bad.passed


def runner_out(graph: Any, feed: Any) -> dict[str, np.ndarray]:
    from d2v_export.backends.onnxruntime import OrtRunner

    with OrtRunner(graph.path, threads=1) as r:
        return r.infer(feed)


def test_clean_up_types_without_weights_match_full_shape_inference(vision: tuple[Any, Any, Any]) -> None:
    _model, _profile, graph = vision
    m = onnx.load(str(graph.path))
    light = rewrite._without_weights(m, limit=0)
    assert not light.graph.initializer or all(len(t.raw_data) == 0 for t in light.graph.initializer)
    full = onnx.shape_inference.infer_shapes(m, strict_mode=False).graph
    want = {v.name: v.type.tensor_type.elem_type for v in [*full.value_info, *full.output]}
    assert rewrite._value_types(m).items() >= {k: t for k, t in want.items() if t}.items()


def test_prune_drops_only_what_nobody_reads(vision: tuple[Any, Any, Any]) -> None:
    _model, _profile, graph = vision
    m = onnx.load(str(graph.path))
    used = {i for n in m.graph.node for i in n.input}
    m.graph.initializer.add().CopyFrom(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused_d2v"))
    kept = [t.name for t in m.graph.initializer if t.name in used]
    before = m.ByteSize()
    rewrite._prune(m)
    assert [t.name for t in m.graph.initializer] == kept
    assert m.ByteSize() < before


def test_offloaded_reference_frees_its_weights_and_reads_them_back(tmp_path: Path) -> None:
    from d2v_export.backends.torch_ref import offload, offloaded, restore, torch_forward
    from d2v_export.heads import dummy_inputs

    model, profile = tiny(head_for(Modality.TEXT, "fill-mask"))  # tied embeddings: they must stay tied
    wrapper = make_wrapper(model)
    feed = dummy_inputs(model.head, model.config, profile.point("opt"), seed=1)
    before = torch_forward(wrapper, feed, model.head.outputs)
    params = dict(wrapper.named_parameters(remove_duplicate=False))
    tied = {n for n, p in params.items() if sum(q is p for q in params.values()) > 1}
    offload(wrapper, tmp_path / "weights.pt")
    assert offloaded(wrapper) and (tmp_path / "weights.pt").stat().st_size > 0
    assert all(p.numel() == 0 and p.untyped_storage().nbytes() == 0 for p in wrapper.parameters())
    # any forward reads them back first (nothing that needs PyTorch can run on an empty model)
    after = torch_forward(wrapper, feed, model.head.outputs)
    assert not offloaded(wrapper) and not restore(wrapper)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    again = dict(wrapper.named_parameters(remove_duplicate=False))
    assert all(again[n] is params[n] for n in params)  # same Parameter objects: the module sees no change
    assert {n for n, p in again.items() if sum(q is p for q in again.values()) > 1} == tied


def test_latency_in_pairs_opens_one_variant_at_a_time(vision: tuple[Any, Any, Any], tmp_path: Path) -> None:
    import contextlib

    from d2v_export.measure import bench
    from d2v_export.backends.torch_ref import TorchRunner
    from d2v_export.heads import dummy_inputs

    model, profile, graph = vision
    backend = get("onnxruntime")
    artifacts = {name: backend.compile(graph, tmp_path / name, BuildRequest()) for name in ("a", "b")}
    open_now: list[str] = []
    most = []

    @contextlib.contextmanager
    def opener(name: str) -> Any:
        with backend.runner(artifacts[name], threads=1) as runner:
            open_now.append(name)
            most.append(len(open_now))
            yield runner
            open_now.remove(name)

    settings = bench.BenchSettings(warmup=1, min_iterations=5, max_iterations=50, seconds=0.3, max_warmup_seconds=1.0)
    feed = dummy_inputs(model.head, model.config, profile.point("opt"), seed=7)
    with TorchRunner(make_wrapper(model), model.head.outputs, 1) as ref:
        result = bench.measure_pairs(
            ("pytorch", ref),
            {n: (lambda n=n: opener(n)) for n in artifacts},
            feed,
            batch=1,
            shape={},
            settings=settings,
        )
    assert max(most) == 1 and not open_now
    assert set(result.stats) == {"pytorch", "a", "b"} and set(result.pair_reference) == {"a", "b"}
    pooled = result.stats["pytorch"].samples_ms
    assert pooled == result.pair_reference["a"].samples_ms + result.pair_reference["b"].samples_ms
    assert all(result.stats[n].n >= 5 for n in "ab") and result.timed_rounds == result.stats["pytorch"].n
    assert result.to_dict()["interleaved"] == "in pairs with the reference"


def test_a_large_run_offloads_pytorch_and_times_in_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model passed off as large (the threshold at 0): the whole run, offload and pairs included."""
    from d2v_export.measure.bench import BenchSettings
    from d2v_export.models import parse_source
    from d2v_export.options import QuantOptions, RunOptions, ShapeRequest
    from d2v_export.pipeline import run

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)
    messages: list[str] = []
    settings = BenchSettings(warmup=1, min_iterations=3, max_iterations=20, seconds=0.2, max_warmup_seconds=1.0)
    options = RunOptions(output=tmp_path / "out", int8=QuantOptions(mode="dynamic"), bench=settings)
    report = run(
        parse_source("preset:tiny", Modality.TEXT, None),
        ShapeRequest(batch=(1, 1, 2), sequence=(8, 16, 32)),
        options,
        progress=messages.append,
    )
    assert any("offloading the PyTorch weights" in m for m in messages)
    assert report.bench["interleaved"] == "in pairs with the reference"
    assert {v.artifact for v in report.variants} == set(report.bench["pair_reference_p50_ms"])
    for v in report.variants:
        own = report.bench["pair_reference_p50_ms"][v.artifact]
        assert v.speedup_vs_reference == pytest.approx(own / v.latency.p50, abs=1e-3)
    # (the tiny preset's dynamic INT8 misses its top-1 budget on random weights with or without the offload)
    assert next(v for v in report.variants if v.quantization is None).drift.passed
    assert not (tmp_path / "out" / ".work").exists()
    assert "each variant timed in a pair with the reference" in (tmp_path / "out" / "report.md").read_text(
        encoding="utf-8"
    )
    assert "each variant in a pair with the reference" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_the_export_keeps_no_reference_to_the_parameters(tmp_path: Path) -> None:
    """Once exported, the parameters are the model's alone (onnxscript's rewrite rules kept the last graph, and with it
    every parameter, for the life of the process): dropping the model frees them, and so does the offload."""
    import gc
    import weakref

    from d2v_export.convert.export import write_onnx

    model, profile = tiny(head_for(Modality.VISION, "image-classification"))
    alive = [weakref.ref(p) for p in model.module.parameters()]
    write_onnx(model, profile, tmp_path / "model.onnx")
    del model
    gc.collect()
    assert alive and not [r for r in alive if r() is not None]


def test_clean_up_sizes_its_weights_without_serialising_them(vision: tuple[Any, Any, Any]) -> None:
    """The external-data decision of the clean-up: the initializers' size from shapes and types (``ByteSize`` serialises
    the whole model under protobuf's upb backend: a transient copy of every weight)."""
    _model, _profile, graph = vision
    m = onnx.load(str(graph.path))
    raw = sum(len(t.raw_data) for t in m.graph.initializer)
    assert 0 < raw <= rewrite._initializer_bytes(m) <= m.ByteSize()


# Run in a child process so that its resident memory (RSS) is its own. The clean-up and the build each leave
# GARBAGE_MB of freed heap behind (small malloc chunks under a live one, as the clean-up's protobuf and the
# build's converted model leave: glibc keeps such pages resident), and the child records its RSS when the
# garbage was freed and when the next step starts. The pipeline's release in between must hand them back.
MEMORY_CHILD = """
import json, os, sys
from pathlib import Path
from d2v_export import pipeline
from d2v_export.int8 import rewrite
from d2v_export.backends import get
from d2v_export.convert.export import export, make_wrapper
from d2v_export.heads import head_for
from d2v_export.models import load, parse_source
from d2v_export.options import RunOptions
from d2v_export.pipeline import ShapeRequest, resolve_profile
from d2v_export.spec import Modality

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def leave_garbage(mb):
    garbage = [bytes(2048) for _ in range(mb * 512)]  # small chunks: heap, not mmap
    pins.append(bytes(2048))  # a live chunk above them: free() alone cannot give the pages back
    del garbage
    return rss_mb()

root, mb = Path(sys.argv[1]), int(sys.argv[2])
model = load(parse_source("preset:tiny", Modality.VISION, "image-classification"))
profile = resolve_profile(model, ShapeRequest(batch=(1, 1, 4)))
graph = export(model, profile, root / "model.onnx")
backend, pins, seen = get("openvino"), [], {}
real_for_model, real_runner, real_compile = rewrite.for_model, backend.runner, type(backend).compile

def for_model(*args):
    out = real_for_model(*args)
    seen["clean-up garbage freed"] = leave_garbage(mb)
    return out

def compile_(*args, **kwargs):
    seen.setdefault("build starts", rss_mb())
    out = real_compile(backend, *args, **kwargs)
    seen["build garbage freed"] = leave_garbage(mb)
    return out

def runner(*args, **kwargs):
    seen.setdefault("check starts", rss_mb())
    return real_runner(*args, **kwargs)

options = RunOptions(output=root / "out", targets=(backend.name,))
planned = backend.plan(pipeline.plan_context(backend, options, None, 1, "vision"))[0]
name, request, rewrites, what = planned.name, planned.request, planned.rewrites, planned.what
def work(folder):
    return pipeline._Work(model, profile, graph, make_wrapper(model), [], None, None, options, 1, root / folder, lambda _m: None)
pipeline._build_one(work("warm-up"), backend, root / "warm-up" / name, request, rewrites, what)  # libraries loaded
rewrite.for_model, backend.runner, backend.compile = for_model, runner, compile_
built = pipeline._build_one(work("work"), backend, root / name, request, rewrites, what)
print(json.dumps(dict(seen, passed=built.drift.passed, rewrites=list(rewrites))))
"""
GARBAGE_MB = 300


def test_memory_is_handed_back_after_the_clean_up_and_between_a_build_and_its_check(tmp_path: Path) -> None:
    """Measured: the child's RSS falls by most of the freed heap between the clean-up and the build, and
    between the build and its check (without the pipeline's release_memory calls it stays)."""
    pytest.importorskip("openvino")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path), str(GARBAGE_MB)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["passed"] and seen["rewrites"]
    for freed, next_step in (("clean-up garbage freed", "build starts"), ("build garbage freed", "check starts")):
        handed_back = seen[freed] - seen[next_step]
        assert handed_back > 0.8 * GARBAGE_MB, (
            f"{freed}: {seen[freed]:.0f} MB resident, {next_step}: {seen[next_step]:.0f} MB ({seen})"
        )
