"""Run the reference and a candidate on the same inputs and measure how far apart they are.

Returns data (``Drift``); never raises because of drift. Two kinds of check:

- ``shape_check``: random inputs at every shape point of the profile, max error scaled by the
  output's magnitude, against the head's tolerance. This is the export check of fp32 artifacts.
  It ends with ``padding_check``: a batch of inputs of different lengths, padded to the longest
  with the mask (text and audio), against each input run alone at its own length, on the same runtime.
- ``task_drift``: task-aware metrics (top-1 agreement, CER/WER, span match, ...) on real
  evaluation samples, against a budget. This judges quantized artifacts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..backends.torch_ref import torch_forward
from ..heads import dummy_inputs, shape_points, with_audio_mask
from ..models import LoadedModel
from ..spec import REFERENCE, Drift, ExportedGraph, LengthDrift, Modality, ShapeProfile

# The export check's tolerance for half-precision artifacts, as a multiple of the head's fp32 one
# (fp16 keeps 11 significant bits, bf16 8: rounding alone moves outputs by ~5e-4 and ~4e-3 relative
# per operation; measured on tiny presets through OpenVINO: 4e-3 scaled for both).
HALF_TOLERANCE_FACTOR: dict[str, float] = {"fp16": 200.0, "bf16": 500.0}

Infer = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

PADDED_ROWS = 3  # rows of the padding check's batch (fewer where the profile's batch is smaller)


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
    metrics, budget = {"max_abs_error": worst_abs, "max_scaled_error": worst_rel}, {"max_scaled_error": tolerance}
    detail = f"random inputs at {len(points)} shapes ({'; '.join(fmt_sizes(p) for p in points)}); worst: {worst_where}"
    if padding_lengths(model, profile) is not None:  # text and audio whose batch range holds several rows
        progress("checking a padded batch against each input alone")
    padding = padding_check(model, infer, profile)
    if padding is not None:
        metrics["padding_scaled_error"], budget["padding_scaled_error"] = padding.error, tolerance
        detail = f"{padding.describe()}; {detail}"  # "worst: ..." stays last: the export error quotes what follows it
    failed = tuple(m for m in budget if not metrics[m] <= budget[m])
    return Drift(REFERENCE, len(points), metrics, budget, passed=not failed, failed=failed, detail=detail)


@dataclasses.dataclass(frozen=True)
class PaddingResult:
    """A padded batch against each of its rows run alone: the worst scaled difference, and where."""

    error: float  # max |padded row (valid positions) - alone| / max(1, max |alone|); inf when not finite
    lengths: tuple[int, ...]  # each row's own length (tokens or samples)
    worst: str  # "output 'logits' of row 2 (length 5)"
    frames: tuple[int, ...] = ()  # audio: each row's valid frames (the frame-level mask); empty for text

    def describe(self) -> str:
        what = "padded to the longest with the mask" if len(set(self.lengths)) > 1 else "equal lengths, no padding"
        lengths = ", ".join(map(str, self.lengths))
        if self.frames:
            lengths = f"{lengths} samples = {', '.join(map(str, self.frames))} frames"
        return (
            f"padded batch of {len(self.lengths)} (lengths {lengths}; {what}) against each row alone: "
            f"largest difference {self.error:.3g} scaled, {self.worst}"
        )


def padding_lengths(model: LoadedModel, profile: ShapeProfile) -> tuple[int, ...] | None:
    """Each row's length for the padding check, longest first; None where the profile's batch cannot hold the rows and 1.

    The optimal length, two thirds and one third of it (never under the profile's shortest): tokens for text, samples
    for audio (the audio graphs take an ``attention_mask`` of samples, reduced to frames inside the model).
    """
    opt = profile.point("opt")
    if "batch" not in opt or profile.dim("batch").min > 1 or profile.dim("batch").max < 2:
        return None
    rows = min(PADDED_ROWS, profile.dim("batch").max)
    axis = "samples" if model.head.modality is Modality.AUDIO else "sequence"
    if axis not in opt:
        return None
    lo = profile.dim(axis).min
    return tuple(max(lo, opt[axis] * (rows - i) // rows) for i in range(rows))


def padded_batch(
    model: LoadedModel, profile: ShapeProfile, lengths: Sequence[int], seed: int = 7
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """(the batch padded to the longest, each row alone at its own length): random inputs shaped like real ones.

    Rows are padded on the right with a 0 in ``attention_mask``, as a Hugging Face tokenizer or feature extractor does
    with ``padding=True``: text with the tokenizer's pad id, audio with the feature extractor's padding value (0.0).
    """
    longest = max(lengths)
    audio = model.head.modality is Modality.AUDIO
    axis = "samples" if audio else "sequence"
    sizes = dict(profile.point("opt"), batch=len(lengths), **{axis: longest})
    batch = dummy_inputs(model.head, model.config, sizes, seed=seed)
    rng = np.random.default_rng(seed)
    pad: float | int
    if audio:
        key, pad = "input_values", float(getattr(model.processor, "padding_value", 0.0) or 0.0)
        batch[key][...] = (0.1 * rng.standard_normal(batch[key].shape)).astype(np.float32)
    else:
        key, pad = "input_ids", model.config.pad_token_id if model.config.pad_token_id is not None else 1
        batch[key][..., 1:] = rng.integers(3, model.config.vocab_size, size=batch[key][..., 1:].shape)
    batch["attention_mask"][...] = 1
    for row, n in enumerate(lengths):
        batch[key][row, ..., n:] = pad
        batch["attention_mask"][row, ..., n:] = 0
    alone = [
        {k: np.ascontiguousarray(v[row : row + 1, ..., :n]) for k, v in batch.items()} for row, n in enumerate(lengths)
    ]
    return batch, alone


def frames_of(config: Any, samples: int) -> int:
    """Frames the audio feature encoder gives for ``samples`` input samples (transformers'
    ``_get_feat_extract_output_lengths``): the frames whose receptive field lies within the real samples."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - kernel) // stride + 1
    return int(samples)


def padding_check(model: LoadedModel, infer: Infer, profile: ShapeProfile) -> PaddingResult | None:
    """Run a padded batch and each of its rows alone through ``infer``; compare each row on its valid positions.

    Outputs per position (hidden states, token or frame logits) are compared on the row's own length only: its tokens,
    or for audio the frames the feature encoder gives for its samples (``frames_of``, the frame-level mask the model
    reduces the sample mask to); pooled outputs (sequence classification, x-vectors) whole. None where the profile
    cannot hold such a batch (``padding_lengths``). Never raises for a difference.
    """
    lengths = padding_lengths(model, profile)
    if lengths is None:
        return None
    batch, alone = padded_batch(model, profile, lengths)
    audio = model.head.modality is Modality.AUDIO
    got = infer(batch)
    worst, where = 0.0, "none"
    for row, (feed, n) in enumerate(zip(alone, lengths)):
        single = infer(feed)
        valid = frames_of(model.config, n) if audio else n
        for name in model.head.outputs:
            ref, cand = np.asarray(single[name])[0], np.asarray(got[name])[row]
            if cand.ndim and ref.ndim and cand.shape[0] != ref.shape[0] and cand.shape[1:] == ref.shape[1:]:
                cand = cand[:valid]  # per position: the valid ones (the padded batch is longer)
            rel = float("inf") if cand.shape != ref.shape else scaled_error(ref, cand)[1]
            if rel >= worst:
                worst, where = rel, f"output '{name}' of row {row + 1} (length {n})"
    frames = tuple(frames_of(model.config, n) for n in lengths) if audio else ()
    return PaddingResult(worst, lengths, where, frames)


def check_export(
    model: LoadedModel,
    graph: ExportedGraph,
    wrapper: Any,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
    reference_outputs: dict[Any, dict[str, np.ndarray]] | None = None,
) -> ExportedGraph:
    """``graph`` with its ``check``: the reference runtime (``backends.reference()``) against the PyTorch ``wrapper``
    at every shape point of its profile."""
    from .. import backends

    with backends.reference().onnx_runner(graph.path, threads=0, name="export-check") as runner:
        check = shape_check(
            model, wrapper, runner.infer, graph.profile, progress=progress, reference_outputs=reference_outputs
        )
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
    from ..measure import metrics

    head = model.head
    cands = [dict(candidate(f)) for f in feeds]
    id2char = None
    if head.metric == "ctc" and model.tokenizer is not None:
        id2char = {i: t for t, i in model.tokenizer.get_vocab().items()}
    text_masks = head.modality is Modality.TEXT and "attention_mask" in feeds[0] and not head.multiple_choice
    # audio masks are of samples, not frames
    masks = [np.asarray(f["attention_mask"]) for f in feeds] if text_masks else None
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
    return Drift(
        REFERENCE,
        len(feeds),
        values,
        dict(budget),
        verdict.passed,
        verdict.failed,
        detail=f"{len(feeds)} real samples from {source}",
        informational=info,
        bounds=verdict.bounds,
        confidence=verdict.confidence,
        unresolved=verdict.unresolved,
    )


# what ``drift_by_length`` keeps of the task's metrics: the outputs' agreement, meaningful on random weights too
LENGTH_METRICS = ("logit_cosine", "frame_agreement", "top1_agreement", "token_agreement", "embedding_cosine")


def length_feeds(feeds: Sequence[Mapping[str, np.ndarray]], lengths: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """One audio input (batch 1) per length in ``lengths``: the waves of ``feeds`` (the evaluation samples, their trailing
    zero padding dropped) joined end to end, repeated up to the longest length and cut to each."""
    waves = [
        np.trim_zeros(np.asarray(row, dtype=np.float32), "b")
        for f in feeds
        for row in np.asarray(f["input_values"]).reshape(-1, np.shape(f["input_values"])[-1])
    ]
    wave = np.concatenate(waves) if waves else np.zeros(0, np.float32)
    if not wave.size:  # silence only: a quiet noise instead, so that the lengths still differ in content
        wave = (0.01 * np.random.default_rng(7).standard_normal(max(lengths))).astype(np.float32)
    long = np.tile(wave, -(-max(lengths) // wave.size))
    return [with_audio_mask({"input_values": np.ascontiguousarray(long[None, :n])}) for n in lengths]


def drift_by_length(
    model: LoadedModel,
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Infer,
    feeds: Sequence[Mapping[str, np.ndarray]],
    rate: int,
) -> tuple[LengthDrift, ...]:
    """The candidate against the reference outputs on each of ``feeds`` (``length_feeds``), one entry per length:
    the task's output-agreement metrics (``LENGTH_METRICS``) at that length. Information, never a gate."""
    from ..measure import metrics

    out = []
    for ref, feed in zip(reference, feeds):
        values = metrics.compute(
            model.head.metric, [dict(ref)], [dict(candidate(feed))], output_names=model.head.outputs
        )
        samples = int(np.shape(feed["input_values"])[-1])
        out.append(
            LengthDrift(round(samples / rate, 4), samples, {k: values[k] for k in LENGTH_METRICS if k in values})
        )
    return tuple(out)


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
    return Drift(
        REFERENCE,
        samples,
        {"max_scaled_error": float("inf")},
        {"max_scaled_error": tolerance},
        False,
        ("max_scaled_error",),
        why,
    )


def fmt_sizes(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())
