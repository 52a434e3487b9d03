"""Text files -> `input_ids` and `attention_mask` through the checkpoint's own tokenizer.

A `.txt` file gives one sample per non-blank line. A line that is not valid UTF-8 is skipped and
reported (as `file.txt:LINE` in `Samples.skipped`); the rest of the file is read. A `.jsonl` file gives one per line, as
  {"text": ...} or {"text": ..., "text_pair": ...}   any task
  {"question": ..., "context": ...}                   question-answering (a text pair elsewhere)
  {"prompt": ..., "choices": [...], "label": i}       multiple-choice (prompt + right choice elsewhere)
with an optional "label" for any of them. A folder means every .txt and .jsonl in it.

Sequences are truncated to the profile's "sequence" max and padded to a multiple of 8 tokens (at
least its min), so a set has few distinct shapes. Multiple-choice gives (1, choices, sequence).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import D2VError, ShapeProfile
from .samples import Candidate, Samples, Unreadable, collect, confined, one_line, rel_name, visible_files

WHAT = "text samples"
FIX = "pass a .txt file (one sample a line), a .jsonl file, or a folder of them"
EXTENSIONS = frozenset({".txt", ".jsonl"})
MULTIPLE = 8
NOT_UTF8 = "not valid UTF-8"


def find(root: Path) -> list[Path]:
    return visible_files(root, lambda p: p.suffix.lower() in EXTENSIONS)


def _limits(profile: ShapeProfile, tokenizer: Any) -> tuple[int, int]:
    try:
        dim = profile.dim("sequence")
        return dim.min, dim.max
    except KeyError:
        cap = getattr(tokenizer, "model_max_length", 512) or 512
        return 1, int(min(cap, 512))


def _choice_limits(profile: ShapeProfile) -> tuple[int, int | None]:
    try:
        dim = profile.dim("choices")
        return dim.min, dim.max
    except KeyError:
        fixed = profile.static.get("choices")
        return (int(fixed), int(fixed)) if fixed else (1, None)


def _target(length: int, lo: int, hi: int) -> int:
    return min(max(-(-length // MULTIPLE) * MULTIPLE, lo), hi)


class TokenEncoder:
    """Texts -> token ids within the profile's lengths, and rows padded to one bucketed length with their mask.
    Shared by the calibration reader and ``d2v-export run`` (predict.py)."""

    def __init__(self, tokenizer: Any, profile: ShapeProfile) -> None:
        self.tok = tokenizer
        self.lo, self.hi = _limits(profile, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise D2VError("the tokenizer has no padding token; pass a checkpoint whose tokenizer defines pad_token")
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def ids(self, text: str, pair: str | None = None, *, only_second: bool = False) -> list[int]:
        try:
            enc = self.tok(text, pair, truncation="only_second" if only_second else True, max_length=self.hi)
        except Exception as exc:  # noqa: BLE001 - "only_second" fails when the first text alone is too long
            if only_second:
                return self.ids(text, pair)
            raise Unreadable(f"the tokenizer rejected it ({one_line(exc)})") from None
        return list(enc["input_ids"])

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        target = _target(max(len(r) for r in rows), self.lo, self.hi)
        ids = np.full((len(rows), target), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), target), dtype=np.int64)
        for i, row in enumerate(rows):
            row = row[:target]
            where = slice(target - len(row), target) if self.left else slice(0, len(row))
            ids[i, where] = row
            mask[i, where] = 1
        return ids, mask


def line_record(path: Path, line: str) -> dict[str, Any]:
    """One line of a .txt file (its text) or a .jsonl file (its object) as a record; Unreadable when it is not one."""
    if path.suffix.lower() != ".jsonl":
        return {"text": line}
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise Unreadable(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise Unreadable("JSON nested too deeply to read") from None
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, dict):
        raise Unreadable(f"a JSONL line must be an object, got {type(value).__name__}")
    return value


def _str(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Unreadable(f"'{key}' must be a non-empty string")
    return value


def _choices(record: dict[str, Any], lo: int, hi: int | None) -> tuple[str, list[str], int | None]:
    prompt = record["prompt"] if isinstance(record.get("prompt"), str) else _str(record, "question")
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise Unreadable("'choices' must be a list of strings")
    label = record.get("label")
    if label is not None and (not isinstance(label, int) or not 0 <= label < len(choices)):
        raise Unreadable(f"'label' must index 'choices' (0..{len(choices) - 1}), got {label!r}")
    if hi is not None and len(choices) > hi:
        # keep the right answer and the first others, so the label stays meaningful
        others = [i for i in range(len(choices)) if i != label]
        keep = sorted(([label] if label is not None else []) + others[: hi - (label is not None)])
        label = keep.index(label) if label is not None else None
        choices = [choices[i] for i in keep]
    if len(choices) < lo:
        raise Unreadable(f"{len(choices)} choices, the shape profile needs at least {lo}")
    return prompt, choices, label


def encoder(model: Any, profile: ShapeProfile) -> Callable[[dict[str, Any]], tuple[dict[str, np.ndarray], object]]:
    """A record ({"text": ...}, {"question", "context"}, {"prompt", "choices"}, optional "label") -> (feed, label)."""
    if model.tokenizer is None:
        raise D2VError("the model has no tokenizer; pass a checkpoint folder with tokenizer files, or .npz feeds")
    enc = TokenEncoder(model.tokenizer, profile)
    task = model.head.task
    multiple_choice = model.head.multiple_choice
    c_lo, c_hi = _choice_limits(profile)

    def encode(record: dict[str, Any]) -> tuple[dict[str, np.ndarray], object]:
        label = record.get("label")
        if multiple_choice:
            if "choices" not in record:
                raise Unreadable("multiple-choice needs JSONL lines with 'prompt' and 'choices'")
            prompt, choices, label = _choices(record, c_lo, c_hi)
            ids, mask = enc.pad([enc.ids(prompt, c) for c in choices])
            return {"input_ids": ids[None], "attention_mask": mask[None]}, label
        if "question" in record and "context" in record:
            row = enc.ids(_str(record, "question"), _str(record, "context"), only_second=True)
        elif task == "question-answering" and "text_pair" in record:
            row = enc.ids(_str(record, "text"), _str(record, "text_pair"), only_second=True)
        elif task == "question-answering":
            raise Unreadable("question-answering needs JSONL lines with 'question' and 'context'")
        elif "choices" in record:
            prompt, choices, right = _choices(record, 1, None)
            row = enc.ids(prompt, choices[right or 0])
        elif "text" in record:
            pair = record.get("text_pair")
            row = enc.ids(_str(record, "text"), _str(record, "text_pair") if pair is not None else None)
        else:
            raise Unreadable("a JSONL line needs 'text', 'question'+'context' or 'prompt'+'choices'")
        ids, mask = enc.pad([row])
        return {"input_ids": ids, "attention_mask": mask}, label

    return encode


def read(
    root: Path, files: list[Path], model: Any, profile: ShapeProfile, *, count: int | None, seed: int, **_unused: Any
) -> Samples:
    encode = encoder(model, profile)

    def reader(path: Path, line: str) -> Any:
        return lambda: encode(line_record(path, line))

    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for path in files:
        name = rel_name(path, root)
        try:
            raw = confined(path, root).read_bytes()
        except OSError as exc:
            skipped.append((name, f"not a readable file ({one_line(exc)})"))
            continue
        except Unreadable as exc:
            skipped.append((name, str(exc)))
            continue
        for number, data in enumerate(raw.splitlines(), start=1):  # one bad line costs that line, not the file
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append((f"{name}:{number}", NOT_UTF8))
                continue
            if line.strip():
                candidates.append(Candidate(f"{name}:{number}", reader(path, line.strip())))
    return collect(candidates, count=count, seed=seed, source=str(root), what=WHAT, fix=FIX, skipped=skipped)
