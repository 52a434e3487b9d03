"""Graph-level speed levers for the ONNX Runtime target, applied to an exported graph before quantization.

    fused = fuse_graph(graph, Path("out/fused.onnx"), model)      # an ExportedGraph over the fused file
    qgraph = quantize_onnx(fused, Path("out/model.onnx"), recipe, feeds)

``fuse`` runs onnxruntime.transformers' optimizer (Python pattern fusions only, ``opt_level=0``, so the
file stays portable and ONNX Runtime's own session optimizations still run at load time). What it fuses
on Data2Vec graphs (measured, onnxruntime 1.32, dynamo export): LayerNorm + residual Add ->
SkipLayerNormalization, bias + GELU -> BiasGelu. Attention does **not** fuse for vision (BEiT-style
relative position bias is added to the scores before Softmax, a pattern the fusion does not know);
see docs/PERFORMANCE.md for what each lever gave.

``lever_builds`` lists the lever variants benchmarks/peers.py times beside the default artifacts.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..console import quiet
from ..spec import D2VError, ExitCode, ExportedGraph, Modality

# onnxruntime.transformers' model_type per modality: the fusion patterns it tries.
MODEL_TYPE = {Modality.VISION: "vit", Modality.TEXT: "bert", Modality.AUDIO: "bert"}


@dataclasses.dataclass(frozen=True)
class Fused:
    path: Path
    fused: dict[str, int]  # fused operator -> count (zeros left out)
    nodes_before: int
    nodes_after: int


def fuse(source: Path, target: Path, *, model_type: str, num_heads: int, hidden_size: int) -> Fused:
    """onnxruntime.transformers.optimizer.optimize_model(opt_level=0) from ``source`` into ``target``."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    before = len(onnx.load(str(source), load_external_data=False).graph.node)
    with quiet():  # onnxruntime.transformers logs advice at WARNING
        try:
            optimized = optimize_model(
                str(source), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0
            )
        except Exception as exc:  # the optimizer raises many types; one line is what the user needs
            raise D2VError(
                f"transformer fusion of '{source.name}' failed: {str(exc).splitlines()[0][:200]}", ExitCode.INTERNAL
            ) from exc
        stats = {k: int(v) for k, v in (optimized.get_fused_operator_statistics() or {}).items() if v}
        target.parent.mkdir(parents=True, exist_ok=True)
        optimized.save_model_to_file(str(target))
    after = len(optimized.model.graph.node)
    return Fused(target, stats, before, after)


def fuse_graph(graph: ExportedGraph, target: Path, model: Any) -> tuple[ExportedGraph, Fused]:
    """The exported graph with transformer fusions, as an ExportedGraph (same inputs, outputs, profile)."""
    cfg = model.config
    result = fuse(
        graph.path,
        target,
        model_type=MODEL_TYPE[model.head.modality],
        num_heads=int(getattr(cfg, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
    )
    return dataclasses.replace(graph, path=target), result


def max_difference(a: Path, b: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Largest absolute output difference between two ONNX files on ``feeds`` (the reference runtime, 1 thread)."""
    from .. import backends

    reference = backends.reference()
    worst = 0.0
    with reference.onnx_runner(a, threads=1) as ra, reference.onnx_runner(b, threads=1) as rb:
        for feed in feeds:
            x, y = ra.infer(feed), rb.infer(feed)
            for name in x:
                worst = max(
                    worst,
                    float(np.max(np.abs(np.asarray(x[name], np.float64) - np.asarray(y[name], np.float64))))
                    if x[name].size
                    else 0.0,
                )
    return worst


def lever_builds(
    model: Any, graph: ExportedGraph, calib: Sequence[Mapping[str, np.ndarray]], work: Path
) -> list[tuple[str, str, str, Callable[[], Path]]]:
    """(name, precision, how, build) for each ORT lever variant; ``build()`` writes the file and returns its path."""
    from .. import backends  # these levers are the reference runtime's own fusions (onnxruntime.transformers)
    from .quantize import make_recipe, quantize_onnx, saturates

    cache: dict[str, Any] = {}

    def fused() -> ExportedGraph:
        if "graph" not in cache:
            g, result = fuse_graph(graph, work / "fused.onnx", model)
            diff = max_difference(graph.path, g.path, list(calib)[:2])
            if diff > 1e-3:
                raise D2VError(f"fused graph differs from the export by {diff:.3g}")
            cache["graph"], cache["how"] = g, ", ".join(f"{k}×{v}" for k, v in result.fused.items()) or "nothing fused"
        return cache["graph"]

    def fp32() -> Path:
        return fused().path

    def int8(mode: str) -> Callable[[], Path]:
        def build() -> Path:
            recipe = make_recipe(backends.reference(), mode, samples=len(calib) if mode == "static" else 0)
            # 7-bit weights where the u8 x s8 kernel saturates
            recipe = dataclasses.replace(recipe, reduce_range=saturates())
            target = work / f"fused-int8-{mode}.onnx"
            quantize_onnx(fused(), target, recipe, list(calib) if mode == "static" else ())
            return target

        return build

    how = "onnxruntime.transformers optimize_model(opt_level=0) before quantization (SkipLayerNorm, BiasGelu; attention where it fuses)"
    return [
        ("d2v lever: ORT fp32 + fusions", "fp32", how, fp32),
        ("d2v lever: ORT INT8 static + fusions", "int8", how, int8("static")),
        ("d2v lever: ORT INT8 dynamic + fusions", "int8", how, int8("dynamic")),
    ]


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    return dict(
        collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).most_common()
    )
