"""Run the reference and a candidate on the same inputs and measure how far apart they are.

Returns data (``Drift``); never raises because of drift. Two kinds of check:

- ``shape_check``: random inputs at every shape point of the profile, max error scaled by the
  output's magnitude, against the head's tolerance. This is the export check of fp32 artifacts.
- ``task_drift``: task-aware metrics (top-1 agreement, CER/WER, span match, ...) on real
  evaluation samples, against a budget. This judges quantized artifacts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backends.torch_ref import torch_forward
from .heads import dummy_inputs, shape_points
from .models import LoadedModel
from .spec import REFERENCE, Drift, ExportedGraph, ShapeProfile

# The export check's tolerance for half-precision artifacts, as a multiple of the head's fp32 one
# (fp16 keeps 11 significant bits, bf16 8: rounding alone moves outputs by ~5e-4 and ~4e-3 relative
# per operation; measured on tiny presets through OpenVINO: 4e-3 scaled for both).
HALF_TOLERANCE_FACTOR: dict[str, float] = {"fp16": 200.0, "bf16": 500.0}

Infer = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def scaled_error(reference: Any, candidate: Any) -> tuple[float, float]:
    """(max |candidate - reference|, that / max(1, max |reference|)); inf when the candidate is not finite."""
    cand = np.asarray(candidate, dtype=np.float64)
    if not np.all(np.isfinite(cand)):
        return float("inf"), float("inf")
    if not np.size(reference):
        return 0.0, 0.0
    ref = np.asarray(reference, dtype=np.float64)
    err = float(np.max(np.abs(cand - ref)))
    return err, err / max(1.0, float(np.max(np.abs(ref))))


def shape_check(
    model: LoadedModel,
    reference: Any,
    infer: Infer,
    profile: ShapeProfile,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
    tolerance: float | None = None,
    reference_outputs: dict[Any, dict[str, np.ndarray]] | None = None,
) -> Drift:
    """Compare ``infer`` with the PyTorch ``reference`` wrapper at each shape point; name the worst output.

    ``tolerance``: the scaled error allowed (default: the head's, for fp32 artifacts).
    ``reference_outputs``: a dict the caller keeps for one reference model; PyTorch's outputs at each
    shape point are stored there and reused by the next check (the inputs are the same at each point,
    so every fp32 artifact of a run is compared with the same outputs, computed once).
    """
    head = model.head
    tolerance = head.tolerance if tolerance is None else tolerance
    worst_rel, worst_abs, worst_where = 0.0, 0.0, ""
    points = shape_points(profile)
    for i, sizes in enumerate(points):
        progress(f"checking against PyTorch at {fmt_sizes(sizes)}")
        feeds = dummy_inputs(head, model.config, sizes, seed=100 + i)
        key = (100 + i, tuple(sorted(sizes.items())))
        if reference_outputs is not None and key in reference_outputs:
            ref = reference_outputs[key]
        else:
            ref = torch_forward(reference, feeds, head.outputs)
            if reference_outputs is not None:
                reference_outputs[key] = ref
        got = infer(feeds)
        for name in head.outputs:
            if name not in got or got[name].shape != ref[name].shape:
                shape = got[name].shape if name in got else "nothing"
                why = f"output '{name}' has shape {shape} but PyTorch gives {ref[name].shape} at {fmt_sizes(sizes)}"
                return _failed(tolerance, why, len(points))
            err, rel = scaled_error(ref[name], got[name])
            if rel >= worst_rel:
                worst_rel, worst_abs, worst_where = rel, err, f"output '{name}' at {fmt_sizes(sizes)}"
    passed = worst_rel <= tolerance
    return Drift(
        reference=REFERENCE,
        samples=len(points),
        metrics={"max_abs_error": worst_abs, "max_scaled_error": worst_rel},
        budget={"max_scaled_error": tolerance},
        passed=passed,
        failed=() if passed else ("max_scaled_error",),
        detail=f"random inputs at {len(points)} shapes ({'; '.join(fmt_sizes(p) for p in points)}); worst: {worst_where}",
    )


def check_export(
    model: LoadedModel,
    graph: ExportedGraph,
    wrapper: Any,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
    reference_outputs: dict[Any, dict[str, np.ndarray]] | None = None,
) -> ExportedGraph:
    """``graph`` with its ``check``: ONNX Runtime against the PyTorch ``wrapper`` at every shape point of its profile."""
    from .backends.onnxruntime import OrtRunner

    with OrtRunner(graph.path, threads=0, name="export-check") as runner:
        check = shape_check(model, wrapper, runner.infer, graph.profile, progress=progress, reference_outputs=reference_outputs)
        return dataclasses.replace(graph, check=check)


def task_drift(
    model: LoadedModel,
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Infer,
    feeds: Sequence[Mapping[str, np.ndarray]],
    budget: Mapping[str, float],
    *,
    labels: Sequence[object] | None = None,
    source: str = "",
    informational: Mapping[str, str] | None = None,
    confidence: Mapping[str, float] | None = None,
) -> Drift:
    """Task-aware metrics of a candidate against the reference outputs on the same real samples.

    ``informational``: metrics reported but not judged, with the reason (``metrics.budgets``). ``confidence``:
    metric -> the confidence a metric that counts answers must be over budget with to fail (``metrics.judge``).
    """
    from . import metrics

    head = model.head
    cands = [dict(candidate(f)) for f in feeds]
    id2char = None
    if head.metric == "ctc" and model.tokenizer is not None:
        id2char = {i: t for t, i in model.tokenizer.get_vocab().items()}
    masks = [np.asarray(f["attention_mask"]) for f in feeds] if "attention_mask" in feeds[0] and not head.multiple_choice else None
    usable_labels = usable_labels_for(model, labels)
    values, evidence = metrics.compute_with_evidence(
        head.metric,
        [dict(r) for r in reference],
        cands,
        output_names=head.outputs,
        labels=usable_labels,
        id2char=id2char,
        attention_masks=masks,
    )
    verdict = metrics.judge(values, budget, evidence, confidence)
    info = {m: why for m, why in (informational or {}).items() if m in values}
    return Drift(REFERENCE, len(feeds), values, dict(budget), verdict.passed, verdict.failed, detail=f"{len(feeds)} real samples from {source}",
                 informational=info, bounds=verdict.bounds, confidence=verdict.confidence, unresolved=verdict.unresolved)


def usable_labels_for(model: LoadedModel, labels: Sequence[object] | None) -> list[object] | None:
    """Labels the task's metrics can use: transcripts for CTC, class ids (or names in id2label) for classifiers."""
    if not labels or any(x is None for x in labels):
        return None
    if model.head.metric == "ctc" and all(isinstance(x, str) for x in labels):
        return list(labels)
    if model.head.metric == "classification":
        label2id = {str(k): int(v) for k, v in (getattr(model.config, "label2id", None) or {}).items()}
        ids = [x if isinstance(x, int) else label2id.get(str(x)) for x in labels]
        if all(isinstance(i, int) for i in ids):
            return list(ids)
    return None


def _failed(tolerance: float, why: str, samples: int) -> Drift:
    return Drift(REFERENCE, samples, {"max_scaled_error": float("inf")}, {"max_scaled_error": tolerance}, False, ("max_scaled_error",), why)


def fmt_sizes(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())
