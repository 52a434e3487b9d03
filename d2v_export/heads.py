"""Every Data2Vec head d2v-export supports, as one table of plain data.

A head is a (modality, Hugging Face task) pair. It names the transformers class, the ONNX inputs
and outputs, the tolerance of the export check and the kind of drift metric that judges it.
Adding a head is adding a row; tests are parametrized over this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .spec import D2VError, Modality, ShapeProfile, TensorSpec


@dataclass(frozen=True)
class Head:
    modality: Modality
    task: str  # Hugging Face / optimum task name
    class_name: str  # transformers class
    outputs: tuple[str, ...]  # ONNX output names, taken from the model's output object
    metric: str  # how drift is judged: see validate.py
    tolerance: float = 1e-4  # export check: max |onnx - torch| <= tolerance * max(1, max |torch|)
    init_kwargs: tuple[tuple[str, object], ...] = ()  # extra constructor arguments of the class
    result: str = "embedding"  # what `d2v-export run` answers, and how it reads text: see predict.RESULTS

    @property
    def multiple_choice(self) -> bool:
        return self.task == "multiple-choice"

    @property
    def key(self) -> str:
        return f"{self.modality.value}/{self.task}"


HEADS: tuple[Head, ...] = (
    # vision: BEiT-style 224x224 input
    Head(
        Modality.VISION,
        "feature-extraction",
        "Data2VecVisionModel",
        ("last_hidden_state", "pooler_output"),
        "embedding",
        init_kwargs=(("add_pooling_layer", True),),
    ),
    Head(
        Modality.VISION,
        "image-classification",
        "Data2VecVisionForImageClassification",
        ("logits",),
        "classification",
        result="labels",
    ),
    Head(
        Modality.VISION,
        "semantic-segmentation",
        "Data2VecVisionForSemanticSegmentation",
        ("logits",),
        "segmentation",
        result="mask_classes",
    ),
    # text: RoBERTa-style BPE input
    Head(Modality.TEXT, "feature-extraction", "Data2VecTextModel", ("last_hidden_state", "pooler_output"), "embedding"),
    Head(Modality.TEXT, "fill-mask", "Data2VecTextForMaskedLM", ("logits",), "language-model", result="masks"),
    Head(
        Modality.TEXT, "text-generation", "Data2VecTextForCausalLM", ("logits",), "language-model", result="next_tokens"
    ),
    Head(
        Modality.TEXT,
        "text-classification",
        "Data2VecTextForSequenceClassification",
        ("logits",),
        "classification",
        result="labels",
    ),
    Head(
        Modality.TEXT,
        "multiple-choice",
        "Data2VecTextForMultipleChoice",
        ("logits",),
        "classification",
        result="choices",
    ),
    Head(
        Modality.TEXT,
        "token-classification",
        "Data2VecTextForTokenClassification",
        ("logits",),
        "token-classification",
        result="tags",
    ),
    Head(
        Modality.TEXT,
        "question-answering",
        "Data2VecTextForQuestionAnswering",
        ("start_logits", "end_logits"),
        "question-answering",
        result="answer",
    ),
    # audio: wav2vec2-style 16 kHz input
    Head(Modality.AUDIO, "feature-extraction", "Data2VecAudioModel", ("last_hidden_state",), "embedding"),
    Head(
        Modality.AUDIO, "automatic-speech-recognition", "Data2VecAudioForCTC", ("logits",), "ctc", result="transcript"
    ),
    Head(
        Modality.AUDIO,
        "audio-classification",
        "Data2VecAudioForSequenceClassification",
        ("logits",),
        "classification",
        result="labels",
    ),
    Head(
        Modality.AUDIO,
        "audio-frame-classification",
        "Data2VecAudioForAudioFrameClassification",
        ("logits",),
        "token-classification",
        result="frame_classes",
    ),
    Head(
        Modality.AUDIO,
        "audio-xvector",
        "Data2VecAudioForXVector",
        ("logits", "embeddings"),
        "embedding",
        result="xvector",
    ),
)

# The head a preset builds when no --task is given: the head of the real checkpoint it copies.
DEFAULT_TASK: dict[Modality, str] = {
    Modality.VISION: "image-classification",
    Modality.TEXT: "text-classification",
    Modality.AUDIO: "automatic-speech-recognition",
}

SAMPLING_RATE = 16_000


def tasks(modality: Modality) -> tuple[str, ...]:
    return tuple(h.task for h in HEADS if h.modality is modality)


def head_for(modality: Modality, task: str) -> Head:
    for h in HEADS:
        if h.modality is modality and h.task == task:
            return h
    raise D2VError(f"task '{task}' does not exist for {modality.value}; choose one of: {', '.join(tasks(modality))}")


def head_for_class(class_name: str) -> Head | None:
    for h in HEADS:
        if h.class_name == class_name:
            return h
    return None


def input_specs(head: Head) -> tuple[TensorSpec, ...]:
    """ONNX inputs, with named dynamic axes."""
    if head.modality is Modality.VISION:
        return (TensorSpec("pixel_values", "float32", ("batch", 3, "height", "width")),)
    if head.modality is Modality.AUDIO:
        return (
            TensorSpec("input_values", "float32", ("batch", "samples")),
            TensorSpec("attention_mask", "int64", ("batch", "samples")),
        )
    axes: tuple[int | str, ...] = ("batch", "choices", "sequence") if head.multiple_choice else ("batch", "sequence")
    return (TensorSpec("input_ids", "int64", axes), TensorSpec("attention_mask", "int64", axes))


def dynamic_axes(head: Head) -> dict[str, tuple[str, ...]]:
    """For each input, the axes that vary at run time (vision keeps its image size fixed)."""
    static = {"height", "width"}
    return {t.name: tuple(a for a in t.shape if isinstance(a, str) and a not in static) for t in input_specs(head)}


def concrete_shape(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(a if isinstance(a, int) else sizes[a] for a in spec.shape)


def shape_points(profile: ShapeProfile) -> list[dict[str, int]]:
    """The shapes the export check runs at: min, opt, an odd size in between, the largest batch at the
    optimal length and the longest input at the smallest batch (cheaper than max everything).

    The trace uses ``trace_point`` (batch 2), which differs from the min and opt points.
    """
    lo, opt, hi = profile.point("min"), profile.point("opt"), profile.point("max")
    mid = {k: (opt[k] + hi[k] + 1) // 2 if opt[k] < hi[k] else opt[k] for k in opt}
    mid = {k: v - 1 if k != "batch" and v - 1 >= lo[k] and v % 2 == 0 else v for k, v in mid.items()}
    widest = dict(opt, batch=hi["batch"]) if "batch" in hi else dict(hi)
    longest = dict(hi, batch=lo["batch"]) if "batch" in hi else dict(hi)
    points: list[dict[str, int]] = []
    for p in (lo, opt, mid, widest, longest):
        if p not in points:
            points.append(p)
    return points


def trace_point(profile: ShapeProfile) -> dict[str, int]:
    """A shape for tracing with no axis at 1 (an axis of size 1 gets specialized by exporters)."""
    opt = profile.point("opt")
    out = {}
    for d in profile.dims:
        out[d.name] = min(max(2, d.opt), d.max) if d.max >= 2 else d.opt
    return opt | out


def dummy_inputs(head: Head, config: Any, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given sizes, shaped like real ones (text rows padded to varied lengths)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in input_specs(head):
        shape = concrete_shape(
            spec, sizes | {"height": sizes.get("image_size", 0), "width": sizes.get("image_size", 0)}
        )
        if spec.name == "pixel_values":
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
        elif spec.name == "input_values":
            feeds[spec.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            feeds["attention_mask"] = _padded_audio(feeds[spec.name], rng)
        elif spec.name == "attention_mask" and head.modality is Modality.AUDIO:
            continue  # made with the values (``_padded_audio``)
        elif spec.name == "input_ids":
            cfg = config
            ids = rng.integers(3, cfg.vocab_size, size=shape, dtype=np.int64)
            ids[..., 0] = cfg.bos_token_id if cfg.bos_token_id is not None else 0
            mask = np.ones(shape, dtype=np.int64)
            seq = shape[-1]
            flat_ids, flat_mask = ids.reshape(-1, seq), mask.reshape(-1, seq)
            for row in range(1, flat_ids.shape[0]):  # every row after the first is padded a little
                keep = max(2, seq - int(rng.integers(0, max(1, seq // 2))))
                flat_ids[row, keep:] = cfg.pad_token_id if cfg.pad_token_id is not None else 1
                flat_mask[row, keep:] = 0
            feeds["input_ids"], feeds["attention_mask"] = flat_ids.reshape(shape), flat_mask.reshape(shape)
    return feeds


def _padded_audio(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask of random audio rows, every row after the first padded a little at its end (zero values, mask 0:
    what the feature extractor does with ``padding=True``); ``values`` is zeroed where the mask is 0."""
    mask = np.ones(values.shape, dtype=np.int64)
    samples = values.shape[-1]
    for row in range(1, values.shape[0]):
        keep = samples - int(rng.integers(0, max(1, samples // 4)))
        values[row, keep:] = 0.0
        mask[row, keep:] = 0
    return mask


def with_audio_mask(feed: dict[str, np.ndarray], lengths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``feed`` with the ``attention_mask`` an audio graph takes beside ``input_values``: 1 for each row's first
    ``lengths[row]`` samples (real samples), 0 for the padding after them; all ones without ``lengths``. A feed that
    has a mask already, or no ``input_values``, is returned as it is."""
    if "input_values" not in feed or "attention_mask" in feed:
        return feed
    values = np.asarray(feed["input_values"])
    mask = np.ones(values.shape, dtype=np.int64)
    for row, n in enumerate(lengths or ()):
        mask[row, n:] = 0
    return dict(feed, attention_mask=mask)


def audio_mask_note(config: Any, processor: Any | None) -> str | None:
    """A one-line warning where an audio checkpoint says its inputs come without a mask, else None.

    Data2Vec audio's feature encoder is layer-norm in every transformers version (its config may carry
    ``feat_extract_norm="group"``, copied from wav2vec2, but the model never reads it) and every head applies
    ``attention_mask``: the audio graphs always take it. A checkpoint whose feature extractor has
    ``return_attention_mask=False`` (or whose config says ``feat_extract_norm="group"``) was prepared the wav2vec2-base
    way: zero-padded, no mask. Its graph still takes the mask, and a mask of ones gives what the checkpoint gives
    without one; a padded batch needs the mask made by the caller, since the extractor will not return it.
    """
    group = getattr(config, "feat_extract_norm", None) == "group"
    no_mask = processor is not None and getattr(processor, "return_attention_mask", True) is False
    if not (group or no_mask):
        return None
    why = (
        "its config says feat_extract_norm='group'"
        if group
        else "its feature extractor has return_attention_mask=False"
    )
    return (
        f"warning: this checkpoint is prepared without an attention mask ({why}); the graph takes `attention_mask` "
        "all the same (Data2Vec audio's feature encoder is layer-norm): pass ones for a single clip, and make the mask "
        "yourself for a padded batch (return_attention_mask=True)"
    )
