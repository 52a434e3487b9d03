"""`d2v-export run BUNDLE INPUT...`: verify a bundle, load it with its runtime, run raw inputs through it.

    results = predict(Path("out/vision/onnxruntime-fp32"), ["cat.jpg"], top_k=5)
    print(format_text(results))

Inputs, per modality (see docs/bundles.md):

- vision: image files (any format Pillow reads; EXIF orientation applied, converted to RGB), prepared
  by the bundle's own image processor (`preprocessor_config.json`).
- audio: audio files of any sampling rate and channel count (averaged to mono, resampled to the
  processor's rate with scipy's polyphase resampler), prepared by the bundle's feature extractor.
  Speech recognition and frame classification take a recording of any length (up to ``MAX_SECONDS``):
  longer than the bundle's longest input, it is run in overlapping windows whose frame-level outputs
  are stitched (``d2v_export.deploy.chunking``) and decoded once. Heads that pool the whole clip (audio
  classification, x-vector, feature extraction) see its first window: clips longer than the bundle's
  largest shape are cut (said in the result's notes).
- text: each argument is one text. ``A ||| B`` is a text pair: question ||| context for
  question-answering, prompt ||| choice ||| choice ... for multiple-choice, text ||| text pair for
  classification. Fill-mask needs the tokenizer's mask token (``<mask>``) in the text. An argument
  that names an existing ``.txt`` file gives one text per non-blank line; a ``.jsonl`` file takes the
  calibration formats ({"text", "text_pair"}, {"question", "context"}, {"prompt", "choices"}).

The same reading steps as the calibration readers are used (d2v_export.calibration), so a bundle sees
inputs prepared exactly as during calibration and validation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .bundle import PAIR_SEPARATOR, Manifest, verify
from ..heads import with_audio_mask
from ..spec import Artifact, D2VError, Dim, Modality, Precision, ShapeProfile

MAX_ANSWER_TOKENS = 30
# the longest recording run reads (its samples are held in memory): see docs/bundles.md "Long recordings"
MAX_SECONDS = 3600
CHUNKED = ("transcript", "frame_classes")  # heads.Head.result of the audio heads whose outputs are per frame: chunked


@dataclass
class _Prepared:
    feed: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    valid: float = 1.0  # audio: the fraction of samples that is signal, not padding
    text: str = ""
    ids: list[int] = field(default_factory=list)  # text: the token ids of the row, unpadded
    start: int = 0  # text: where the row starts in the padded sequence (left padding)
    offsets: list[tuple[int, int]] | None = None  # text: character span of each token
    segment: list[int | None] | None = None  # text: sequence id of each token (QA context is 1)
    context: str = ""  # QA: the context text
    choices: list[str] = field(default_factory=list)  # multiple-choice
    # audio longer than the longest input: chunking.Window spans of feed
    windows: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------------------- loading


def _artifact(manifest: Manifest, target: str, model_file: str) -> Artifact:
    folder = manifest.folder
    try:
        precision = Precision(manifest.precision)
    except ValueError:
        raise D2VError(f"bundle '{folder}' has an unknown precision '{manifest.precision}'; rebuild it") from None
    return Artifact(
        target=target,
        precision=precision,
        path=folder,
        model_file=folder / model_file,
        files=tuple(folder / f.path for f in manifest.files),
    )


def open_runtime(manifest: Manifest) -> tuple[Any, Artifact, list[str]]:
    """The backend and artifact that run this bundle, and notes (e.g. a TensorRT bundle run by ONNX Runtime)."""
    from .. import backends

    opened = backends.get(manifest.target).open_bundle(
        manifest.folder, manifest.model_file, [f.path for f in manifest.files]
    )
    return opened.backend, _artifact(manifest, opened.target, opened.model_file), list(opened.notes)


def _load_parts(manifest: Manifest) -> tuple[Any | None, Any | None]:
    """The bundle's processor and tokenizer, read from its own files (never from the network)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    folder = str(manifest.folder)
    pre = manifest.preprocessing
    processor = tokenizer = None
    try:
        if manifest.modality is Modality.VISION:
            processor = transformers.AutoImageProcessor.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        elif manifest.modality is Modality.AUDIO:
            processor = transformers.AutoFeatureExtractor.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        if pre.get("tokenizer"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise D2VError(
            f"bundle '{folder}': cannot load its processor or tokenizer ({first[:200]}); rebuild the bundle"
        ) from None
    return processor, tokenizer


def _profile(manifest: Manifest) -> ShapeProfile:
    dims = tuple(Dim(name, *r) for name, r in manifest.dims().items())
    return ShapeProfile(dims, manifest.static())


# --------------------------------------------------------------------------------------- inputs


def expand_inputs(manifest: Manifest, inputs: list[str]) -> list[tuple[str, Any]]:
    """(display name, raw input) pairs: paths for images and audio; text, or records from .txt/.jsonl."""
    if not inputs:
        what = {"vision": "image files", "audio": "audio files", "text": "texts"}[manifest.modality.value]
        raise D2VError(f"no inputs: pass one or more {what} after the bundle folder")
    out: list[tuple[str, Any]] = []
    for raw in inputs:
        if manifest.modality is not Modality.TEXT:
            path = _user_path(raw)
            if not path.is_file():
                raise D2VError(
                    f"input '{raw}' is not a file; pass {'image' if manifest.modality is Modality.VISION else 'audio'} files"
                )
            out.append((raw, path))
            continue
        path = _user_path(raw)
        if path.suffix.lower() in (".txt", ".jsonl") and path.is_file():
            from ..calibration.text import line_record

            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise D2VError(f"input '{raw}' is not a readable UTF-8 text file ({exc.__class__.__name__})") from None
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        out.append((f"{raw}:{number}", line_record(path, line.strip())))
                    except Exception as exc:  # noqa: BLE001 - Unreadable, one line
                        raise D2VError(f"input '{raw}' line {number}: {exc}") from None
        else:
            out.append((raw, {"text": raw}))
    return out


def _user_path(raw: str) -> Path:
    """``~/x`` expanded; ``~name`` for no such user (or a text like "~0") stays as typed (found by fuzzing: RuntimeError)."""
    try:
        return Path(raw).expanduser()
    except RuntimeError:
        return Path(raw)


def _segments(record: Mapping[str, Any]) -> list[str]:
    """A text record as its parts: 'A ||| B' -> [A, B]; JSONL fields in the same order."""
    if "question" in record and "context" in record:
        return [str(record["question"]), str(record["context"])]
    if "prompt" in record and "choices" in record:
        return [str(record["prompt"]), *[str(c) for c in record["choices"]]]
    if "text_pair" in record and record.get("text_pair") is not None:
        return [str(record.get("text", "")), str(record["text_pair"])]
    text = str(record.get("text", ""))
    return [part.strip() for part in text.split(PAIR_SEPARATOR)] if PAIR_SEPARATOR in text else [text]


def _shown(text: Any) -> str:
    """An input as an error message quotes it: one line (found by fuzzing: a text with a newline split the message), 60 characters."""
    return " ".join(str(text).split())[:60]


class Preparer:
    """Raw input -> feed, with the bundle's processor / tokenizer and the calibration readers' steps.

    The modality picks the reader (``_READERS``); for text, the head's ``result`` (heads.py) picks how
    the text is encoded (``_TextReader``)."""

    def __init__(self, manifest: Manifest, processor: Any | None, tokenizer: Any | None) -> None:
        self.manifest = manifest
        self.processor = processor
        self.tokenizer = tokenizer
        self.profile = _profile(manifest)
        self.batch = manifest.dims().get("batch", (1, 1, 1))[0]
        self.read = _READERS[manifest.modality](manifest, self.profile, processor, tokenizer)
        # the graph's inputs: an audio bundle exported before audio graphs took a mask gets none
        self.inputs = {str(t.get("name")) for t in manifest.inputs} or None

    def _graph_inputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feed if self.inputs is None else {k: v for k, v in feed.items() if k in self.inputs}

    def __call__(self, raw: Any) -> _Prepared:
        prepared = self.read(raw)
        if not prepared.windows:
            prepared.feed = self._graph_inputs(prepared.feed)
        if (
            self.batch > 1 and not prepared.windows
        ):  # a profile whose smallest batch is above 1: repeat the input, read the first row
            prepared.feed = {k: np.repeat(v, self.batch, axis=0) for k, v in prepared.feed.items()}
        return prepared

    def infer(self, runner: Any, prepared: _Prepared, names: list[str]) -> Mapping[str, np.ndarray]:
        """The outputs of one input; a chunked recording's first output is its windows' kept frames, stitched."""
        if not prepared.windows:
            return runner.infer(prepared.feed)
        from .chunking import stitch

        values, parts, name = prepared.feed["input_values"], [], None
        for w in prepared.windows:
            feed = self._graph_inputs(self.read.window(values, w))  # type: ignore[attr-defined]
            out = runner.infer(
                {k: np.repeat(v, self.batch, axis=0) for k, v in feed.items()} if self.batch > 1 else feed
            )
            name = names[0] if names and names[0] in out else next(iter(out))
            parts.append(np.asarray(out[name])[0, w.keep_from : w.keep_to])
        return {str(name): stitch(parts)[None]}


class _ImageReader:
    def __init__(
        self, manifest: Manifest, profile: ShapeProfile, processor: Any | None, _tokenizer: Any | None
    ) -> None:
        from ..calibration.images import ImagePixels

        if processor is None:
            raise D2VError(f"bundle '{manifest.folder}' has no image processor (preprocessor_config.json); rebuild it")
        size = profile.static.get("image_size")
        self.pixels = ImagePixels(processor, int(size) if size else None)

    def __call__(self, path: Path) -> _Prepared:
        from ..calibration.images import open_rgb
        from ..calibration.samples import Unreadable

        try:
            value = self.pixels(open_rgb(path))
        except Unreadable as exc:
            raise D2VError(f"input '{path}': {exc}; pass an image file") from None
        if value.ndim == 3:
            value = value[None]
        return _Prepared({"pixel_values": np.ascontiguousarray(value, dtype=np.float32)})


class _AudioReader:
    def __init__(
        self, manifest: Manifest, profile: ShapeProfile, processor: Any | None, _tokenizer: Any | None
    ) -> None:
        from . import chunking
        from ..heads import SAMPLING_RATE, head_for

        if processor is None:
            raise D2VError(
                f"bundle '{manifest.folder}' has no feature extractor (preprocessor_config.json); rebuild it"
            )
        self.processor = processor
        self.profile = profile
        self.rate = int(getattr(processor, "sampling_rate", None) or SAMPLING_RATE)
        self.pad = float(getattr(processor, "padding_value", 0.0) or 0.0)
        try:
            self.longest: int | None = profile.dim("samples").max
        except KeyError:
            self.longest = None
        self.encoder = chunking.encoder_of(manifest.folder)
        self.sizes: tuple[int, int] | None = None
        if self.longest is not None and head_for(manifest.modality, manifest.task).result in CHUNKED:
            try:
                self.sizes = chunking.sizes(self.longest, self.encoder)
            except ValueError:
                self.sizes = None  # a longest input too short to chunk: cut instead

    def __call__(self, path: Path) -> _Prepared:
        from . import chunking
        from ..calibration.audio import bucket, read_mono
        from ..calibration.samples import Unreadable

        proc, rate, longest = self.processor, self.rate, self.longest
        # read one sample past what is used, to know whether it was cut, not the whole (maybe hours-long) clip
        limit = None if longest is None else (MAX_SECONDS * rate if self.sizes else longest) + 1
        try:
            wave = read_mono(path, rate, limit)
            whole = self.sizes is not None and longest is not None and len(wave) > longest
            keep, target = (min(len(wave), MAX_SECONDS * rate), 0) if whole else bucket(len(wave), self.profile)
            values = proc(wave[:keep], sampling_rate=rate, return_tensors="np")["input_values"]
        except (Unreadable, ValueError, TypeError) as exc:
            raise D2VError(f"input '{path}': {exc}; pass an audio file (wav, flac, ogg, ...)") from None
        length = len(wave)
        del wave
        values = np.asarray(values, dtype=np.float32).reshape(1, -1)
        notes = (
            [f"cut to {keep / rate:g} s: " + ("run reads at most this much" if whole else "the bundle's longest input")]
            if keep < length
            else []
        )
        if whole:
            assert self.sizes is not None
            window, stride = self.sizes
            plan = chunking.windows(keep, window, stride, self.encoder)
            notes.append(
                f"{keep / rate:g} s in {len(plan)} windows of {window / rate:g} s, {stride / rate:g} s of context dropped on each inner side"
            )
            # each window gets its mask (``window``)
            return _Prepared({"input_values": values}, notes=notes, windows=plan)
        real = values.shape[1]
        if values.shape[1] < target:
            values = np.pad(values, ((0, 0), (0, target - values.shape[1])), constant_values=self.pad)
        feed = with_audio_mask({"input_values": values}, [real])  # the bucket's padding is masked
        return _Prepared(feed, notes=notes, valid=min(1.0, keep / max(1, values.shape[1])))

    def window(self, values: np.ndarray, w: Any) -> dict[str, np.ndarray]:
        """One window of the recording: its values, padded at the end up to the profile's shortest input, and its mask
        (ones on the window's samples, zeros on that padding)."""
        part = values[:, w.start : w.stop]
        real = part.shape[1]
        short = self.profile.dim("samples").min - real
        part = np.pad(part, ((0, 0), (0, short)), constant_values=self.pad) if short > 0 else part
        return with_audio_mask({"input_values": part}, [real])


class _TextReader:
    """Text -> token ids. The head's ``result`` decides the encoding: "choices" (prompt ||| choice ...), "answer"
    (question ||| context, with character offsets), "tags" (offsets), "masks" (a mask token required),
    "next_tokens" (no end-of-text marker); every other head encodes the text (or pair) as is."""

    def __init__(
        self, manifest: Manifest, profile: ShapeProfile, _processor: Any | None, tokenizer: Any | None
    ) -> None:
        from ..calibration.text import TokenEncoder
        from ..heads import head_for

        if tokenizer is None:
            raise D2VError(f"bundle '{manifest.folder}' has no tokenizer files; rebuild it")
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.encoder = TokenEncoder(tokenizer, profile)
        self.result = head_for(manifest.modality, manifest.task).result

    def __call__(self, record: Mapping[str, Any]) -> _Prepared:
        enc, tok, task = self.encoder, self.tokenizer, self.manifest.task
        parts = _segments(record)
        if any(not p.strip() for p in parts):
            raise D2VError(
                f"empty text in '{_shown(record.get('text', record))}'; pass non-empty text (pairs as 'A {PAIR_SEPARATOR} B')"
            )
        if self.result == "choices":
            return self._choices(parts)
        if len(parts) > 2:
            raise D2VError(f"'{PAIR_SEPARATOR}' splits a text into at most two parts for {task}; got {len(parts)}")
        qa = self.result == "answer"
        if qa and len(parts) != 2:
            raise D2VError(
                f"question-answering needs 'question {PAIR_SEPARATOR} context'; got no '{PAIR_SEPARATOR}' in '{_shown(parts[0])}'"
            )
        pair = parts[1] if len(parts) > 1 else None
        offsets = segment = None
        if self.result in ("answer", "tags"):
            row, offsets, segment = self._encode_with_offsets(parts[0], pair, only_second=qa)
        else:
            row = enc.ids(parts[0], pair)
        if self.result == "next_tokens" and len(row) > 1 and row[-1] == tok.eos_token_id:
            row = row[:-1]  # predict the token after the text, not after the end-of-text marker
        if self.result == "masks" and tok.mask_token_id not in row:
            raise D2VError(
                f"fill-mask needs {tok.mask_token} in the text: '{_shown(parts[0])}'; write e.g. 'Paris is the {tok.mask_token} of France.'"
            )
        notes = [f"truncated to {enc.hi} tokens: the bundle's longest sequence"] if self._too_long(parts) else []
        ids, mask = enc.pad([row])
        start = ids.shape[1] - min(len(row), ids.shape[1]) if enc.left else 0
        return _Prepared(
            {"input_ids": ids, "attention_mask": mask},
            notes=notes,
            text=parts[-1] if qa else parts[0],
            ids=row[: ids.shape[1]],
            start=start,
            offsets=offsets,
            segment=segment,
            context=parts[1] if qa else "",
        )

    def _too_long(self, parts: list[str]) -> bool:
        try:
            full = self.tokenizer(parts[0], parts[1] if len(parts) > 1 else None, truncation=False)["input_ids"]
        except Exception:  # noqa: BLE001 - only for the note
            return False
        return len(full) > self.encoder.hi

    def _encode_with_offsets(
        self, text: str, pair: str | None, *, only_second: bool = False
    ) -> tuple[list[int], list[tuple[int, int]] | None, list[int | None] | None]:
        enc, tok = self.encoder, self.tokenizer
        if not getattr(tok, "is_fast", False):
            return enc.ids(text, pair, only_second=only_second), None, None
        truncation: Any = "only_second" if only_second else True
        try:
            out = tok(text, pair, truncation=truncation, max_length=enc.hi, return_offsets_mapping=True)
        except Exception:  # noqa: BLE001 - "only_second" fails when the question alone is too long
            out = tok(text, pair, truncation=True, max_length=enc.hi, return_offsets_mapping=True)
        ids = list(out["input_ids"])
        offsets = [tuple(o) for o in out["offset_mapping"]]
        segment = list(out.sequence_ids(0)) if hasattr(out, "sequence_ids") else None
        return ids, offsets, segment  # type: ignore[return-value]

    def _choices(self, parts: list[str]) -> _Prepared:
        enc = self.encoder
        prompt, choices = parts[0], parts[1:]
        lo, _opt, hi = self.manifest.dims().get("choices", (len(choices),) * 3)
        if not lo <= len(choices) <= hi:
            raise D2VError(
                f"multiple-choice: {len(choices)} choice(s) given, this bundle takes {lo} to {hi}; "
                f"write 'prompt {PAIR_SEPARATOR} choice {PAIR_SEPARATOR} choice ...'"
            )
        ids, mask = enc.pad([enc.ids(prompt, c) for c in choices])
        return _Prepared({"input_ids": ids[None], "attention_mask": mask[None]}, text=prompt, choices=choices)


_READERS: dict[Modality, Callable[..., Callable[[Any], _Prepared]]] = {
    Modality.VISION: _ImageReader,
    Modality.AUDIO: _AudioReader,
    Modality.TEXT: _TextReader,
}


# --------------------------------------------------------------------------------------- outputs


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _label(labels: Mapping[int, str] | None, i: int) -> str:
    return labels.get(int(i), f"LABEL_{int(i)}") if labels else f"LABEL_{int(i)}"


def _topk(probs: np.ndarray, k: int, labels: Mapping[int, str] | None) -> list[dict[str, Any]]:
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    return [{"label": _label(labels, i), "id": int(i), "score": round(float(probs[i]), 6)} for i in order]


def _fractions(classes: np.ndarray, k: int, labels: Mapping[int, str] | None) -> list[dict[str, Any]]:
    ids, counts = np.unique(classes.reshape(-1), return_counts=True)
    order = np.argsort(-counts, kind="stable")[: max(1, k)]
    total = int(classes.size)
    return [
        {"label": _label(labels, ids[i]), "id": int(ids[i]), "fraction": round(float(counts[i]) / total, 6)}
        for i in order
    ]


def _token_text(tok: Any, token_id: int) -> str:
    return str(tok.decode([int(token_id)])).strip() or str(tok.convert_ids_to_tokens(int(token_id)))


class Interpreter:
    """Outputs of one input -> a JSON-able, task-appropriate result: ``RESULTS[head.result]`` (heads.py)."""

    def __init__(self, manifest: Manifest, tokenizer: Any | None, top_k: int) -> None:
        from ..heads import head_for

        self.manifest = manifest
        self.tokenizer = tokenizer
        self.k = top_k
        self.labels = manifest.labels
        self.names = [str(o["name"]) for o in manifest.outputs]
        self.answer = RESULTS[head_for(manifest.modality, manifest.task).result]

    def __call__(self, out: Mapping[str, np.ndarray], p: _Prepared) -> dict[str, Any]:
        first = np.asarray(out[self.names[0]] if self.names and self.names[0] in out else next(iter(out.values())))
        return self.answer(self, out, first, p)


Outputs = Mapping[str, np.ndarray]


def _labels(it: Interpreter, _out: Outputs, first: np.ndarray, _p: _Prepared) -> dict[str, Any]:
    return {"labels": _topk(_softmax(first[0]), it.k, it.labels)}


def _choices(it: Interpreter, _out: Outputs, first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    probs = _softmax(first[0])
    order = np.argsort(-probs, kind="stable")
    return {"choices": [{"choice": p.choices[i], "index": int(i), "score": round(float(probs[i]), 6)} for i in order]}


def _mask_classes(it: Interpreter, _out: Outputs, first: np.ndarray, _p: _Prepared) -> dict[str, Any]:
    classes = first[0].argmax(0)
    return {"mask_shape": list(classes.shape), "classes": _fractions(classes, it.k, it.labels)}


def _frame_classes(it: Interpreter, _out: Outputs, first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    frames = max(1, math.ceil(first.shape[1] * p.valid))
    classes = first[0, :frames].argmax(-1)
    return {"frames": frames, "classes": _fractions(classes, it.k, it.labels)}


def _next_tokens(it: Interpreter, _out: Outputs, first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    return {"next_tokens": _top_tokens(it, _softmax(first[0, p.start + len(p.ids) - 1]))}


def _xvector(it: Interpreter, out: Outputs, first: np.ndarray, _p: _Prepared) -> dict[str, Any]:
    emb = np.asarray(out.get("embeddings", first))[0]
    return {"embedding_shape": list(emb.shape), "embedding_norm": round(float(np.linalg.norm(emb)), 6)}


def _top_tokens(it: Interpreter, probs: np.ndarray) -> list[dict[str, Any]]:
    assert it.tokenizer is not None
    order = np.argsort(-probs, kind="stable")[: max(1, it.k)]
    return [{"token": _token_text(it.tokenizer, i), "id": int(i), "score": round(float(probs[i]), 6)} for i in order]


def _transcript(it: Interpreter, _out: Outputs, first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    from ..measure.metrics import ctc_greedy_decode

    logits = first[0]
    tok = it.tokenizer
    if tok is None:
        raise D2VError(f"bundle '{it.manifest.folder}' has no CTC vocabulary (vocab.json); rebuild it")
    frames = max(1, math.ceil(logits.shape[0] * p.valid))
    id2char = {int(i): str(t) for t, i in tok.get_vocab().items()}
    blank = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    delimiter = str(getattr(tok, "word_delimiter_token", None) or "|")
    for special in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id):
        if special is not None and special != blank:
            id2char[int(special)] = ""  # special tokens are not characters
    return {
        "transcript": ctc_greedy_decode(logits[:frames], id2char, blank=blank, delimiter=delimiter),
        "frames": frames,
    }


def _answer(it: Interpreter, out: Outputs, _first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    start, end = np.asarray(out["start_logits"])[0], np.asarray(out["end_logits"])[0]
    seq = start.shape[-1]
    n = len(p.ids)
    allowed = np.zeros(seq, dtype=bool)
    if p.segment is not None:
        for i, s in enumerate(p.segment[:n]):
            allowed[p.start + i] = s == 1
    else:  # no sequence ids (a slow tokenizer): anywhere but the first and last token
        allowed[p.start + 1 : p.start + n - 1] = True
    if not allowed.any():
        return {"answer": "", "score": 0.0, "start_token": None, "end_token": None}
    first, last = np.arange(seq)[:, None], np.arange(seq)[None, :]
    valid = (last >= first) & (last - first < MAX_ANSWER_TOKENS) & allowed[:, None] & allowed[None, :]
    ls, le = start - np.logaddexp.reduce(start), end - np.logaddexp.reduce(end)
    score = np.where(valid, ls[:, None].astype(np.float64) + le[None, :], -np.inf)
    s, e = divmod(int(score.argmax()), seq)
    a, b = s - p.start, e - p.start
    if p.offsets is not None:
        answer = p.context[p.offsets[a][0] : p.offsets[b][1]]
    else:
        assert it.tokenizer is not None
        answer = str(it.tokenizer.decode(p.ids[a : b + 1])).strip()
    return {"answer": answer, "score": round(float(math.exp(score[s, e])), 6), "start_token": a, "end_token": b}


def _tags(it: Interpreter, _out: Outputs, first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    tok = it.tokenizer
    assert tok is not None
    probs = _softmax(first[0])
    special = set(getattr(tok, "all_special_ids", ()) or ())
    tags = []
    for i, token_id in enumerate(p.ids):
        if token_id in special:
            continue
        row = probs[p.start + i]
        best = int(row.argmax())
        if p.offsets is not None and p.offsets[i][1] > p.offsets[i][0]:
            text = p.text[p.offsets[i][0] : p.offsets[i][1]]
        else:
            text = _token_text(tok, token_id)
        tags.append({"token": text, "tag": _label(it.labels, best), "score": round(float(row[best]), 6)})
    return {"tags": tags}


def _masks(it: Interpreter, _out: Outputs, first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    tok = it.tokenizer
    assert tok is not None
    logits = first[0]
    found = [
        {"position": i, "tokens": _top_tokens(it, _softmax(logits[p.start + i]))}
        for i, t in enumerate(p.ids)
        if t == tok.mask_token_id
    ]
    return {"masks": found}


def _embedding(it: Interpreter, out: Outputs, _first: np.ndarray, p: _Prepared) -> dict[str, Any]:
    hidden = np.asarray(out.get("last_hidden_state", next(iter(out.values()))))
    if "pooler_output" in out:
        emb, how = np.asarray(out["pooler_output"])[0], "pooler_output"
    elif "input_ids" in p.feed:
        mask = p.feed["attention_mask"][0].astype(bool)
        emb, how = hidden[0][mask].mean(0), "mean of last_hidden_state over the tokens"
    else:
        frames = max(1, math.ceil(hidden.shape[1] * p.valid))
        emb, how = hidden[0, :frames].mean(0), "mean of last_hidden_state over the frames"
    return {
        "hidden_shape": list(hidden.shape[1:]),
        "embedding_shape": list(emb.shape),
        "embedding_norm": round(float(np.linalg.norm(emb)), 6),
        "pooling": how,
    }


# heads.Head.result -> how an output becomes the result of `d2v-export run` (a completeness test checks every head has one).
RESULTS: dict[str, Callable[[Interpreter, Outputs, np.ndarray, _Prepared], dict[str, Any]]] = {
    "labels": _labels,
    "choices": _choices,
    "transcript": _transcript,
    "mask_classes": _mask_classes,
    "frame_classes": _frame_classes,
    "answer": _answer,
    "tags": _tags,
    "masks": _masks,
    "next_tokens": _next_tokens,
    "xvector": _xvector,
    "embedding": _embedding,
}


# --------------------------------------------------------------------------------------- API


def predict(bundle: Path, inputs: list[str], *, threads: int = 0, top_k: int = 5) -> list[dict[str, Any]]:
    """Verify the bundle, run every input through it, return one JSON-able result per input.

    Each result has "input", "task", "runtime", "notes" and the task's own keys: "labels" (top-k
    label/id/score), "transcript", "answer", "tags", "masks", "next_tokens", "classes" (mask or frame
    summary), "choices", or "embedding_shape"/"embedding_norm".
    Raises D2VError: a changed or unsafe bundle, a missing runtime, an unreadable input.
    """
    if top_k < 1:
        raise D2VError(f"--top-k {top_k}: give 1 or more")
    manifest = verify(Path(bundle))
    items = expand_inputs(manifest, list(inputs))
    backend, artifact, notes = open_runtime(manifest)
    processor, tokenizer = _load_parts(manifest)
    prepare = Preparer(manifest, processor, tokenizer)
    interpret = Interpreter(manifest, tokenizer, top_k)
    version = backend.available().version
    runtime = f"{artifact.target} {version}".strip() + f" ({manifest.precision}, {artifact.model_file.name})"
    results = []
    with backend.runner(artifact, threads=threads) as runner:
        for name, raw in items:
            prepared = prepare(raw)
            out = prepare.infer(runner, prepared, interpret.names)
            result: dict[str, Any] = {"input": name, "task": manifest.task, "runtime": runtime}
            result |= interpret(out, prepared)
            result["notes"] = notes + prepared.notes
            results.append(result)
    if manifest.data.get("model", {}).get("random_weights"):
        for r in results:
            r["notes"].append("RANDOM WEIGHTS: this bundle's outputs mean nothing")
    return results


def to_json(results: list[dict[str, Any]]) -> str:
    return json.dumps(results, indent=2, ensure_ascii=False) + "\n"


def format_text(results: list[dict[str, Any]]) -> str:
    """Results for the console: one block per input."""
    lines: list[str] = []
    for r in results:
        lines.append(f"{r['input']}  [{r['task']}, {r['runtime']}]")
        if "labels" in r:
            lines += [f"  {i}. {x['label']:<40s} {x['score']:.4f}" for i, x in enumerate(r["labels"], 1)]
        if "transcript" in r:
            lines.append(f"  transcript: {r['transcript']!r}")
        if "answer" in r:
            lines.append(f"  answer: {r['answer']!r} (score {r['score']:.4f})")
        if "choices" in r:
            lines += [f"  {i}. {x['choice']!r:<40s} {x['score']:.4f}" for i, x in enumerate(r["choices"], 1)]
        if "tags" in r:
            lines.append("  " + " ".join(f"{t['token']}/{t['tag']}" for t in r["tags"]))
        if "masks" in r:
            for m in r["masks"]:
                lines.append(
                    f"  mask at token {m['position']}: "
                    + ", ".join(f"{t['token']!r} {t['score']:.3f}" for t in m["tokens"])
                )
        if "next_tokens" in r:
            lines.append("  next token: " + ", ".join(f"{t['token']!r} {t['score']:.3f}" for t in r["next_tokens"]))
        if "classes" in r:
            where = (
                f"{r['mask_shape'][0]}x{r['mask_shape'][1]} mask" if "mask_shape" in r else f"{r.get('frames')} frames"
            )
            lines.append(f"  {where}: " + ", ".join(f"{c['label']} {100 * c['fraction']:.1f}%" for c in r["classes"]))
        if "embedding_norm" in r:
            lines.append(f"  embedding {tuple(r['embedding_shape'])}, L2 norm {r['embedding_norm']:.4f}")
        for note in r.get("notes", ()):
            lines.append(f"  note: {note}")
    return "\n".join(lines) + ("\n" if lines else "")
