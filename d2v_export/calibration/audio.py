"""Audio folders -> `input_values` through the checkpoint's own feature extractor.

wav/flac/ogg/... read with soundfile; channels averaged to mono; any rate brought to the extractor's
rate (16 kHz) with scipy's polyphase resampler. Lengths are bucketed to the shape profile's
"samples" axis: cut to its max, zero-padded up to its min, otherwise up to the next multiple of
0.1 s, so that a set of clips has few distinct shapes. Labels (transcripts for speech recognition,
classes otherwise) come, as in Hugging Face's audiofolder, from a `metadata.csv` / `metadata.jsonl`
with a `file_name` column (hf.py); else from `labels.tsv` (`file<TAB>transcript`, an optional header
row) in the clip's folder or any folder above it; else, for classifiers, from a class folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from ..heads import SAMPLING_RATE, with_audio_mask
from ..spec import D2VError, ShapeProfile
from . import hf
from .samples import Candidate, Samples, Unreadable, collect, confined, one_line, rel_name, visible_files

WHAT = "audio files"
FIX = "pass a folder of .wav/.flac/.ogg clips (or .npz feeds named after the model inputs)"
EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au"})
STEP = 1600  # 0.1 s at 16 kHz: the length bucket
MAX_RATE = 768_000  # Hz: above any converter's rate; a header claiming more is corrupt (and its resampling filter would not fit in memory)
LABELS_FILE = "labels.tsv"


def find(root: Path) -> list[Path]:
    return visible_files(root, lambda p: p.suffix.lower() in EXTENSIONS)


def read_mono(path: Any, rate: int = SAMPLING_RATE, limit: int | None = None) -> np.ndarray:
    """Decode a path or binary file object, average channels, resample to `rate`. float32, 1-D. Raises Unreadable.

    With `limit`, at most that many samples (at `rate`) are returned and the file is read only that far,
    so an hours-long clip costs what its first seconds cost."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path) if isinstance(path, Path) else path) as fh:
            file_rate = _check_rate(fh.samplerate)
            frames = -1 if limit is None else -(-int(limit) * file_rate // int(rate)) + 1
            data = fh.read(frames, dtype="float32", always_2d=True)
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile reports corrupt files in several exception types
        raise Unreadable(f"not a readable audio file ({one_line(exc)})") from None
    if data.shape[0] == 0:
        raise Unreadable("the audio file holds no samples")
    return resample(data.mean(axis=1, dtype=np.float64), file_rate, rate, limit)


def _check_rate(value: Any) -> int:
    try:
        file_rate = int(value)
    except (TypeError, ValueError, OverflowError):
        raise Unreadable(f"its sampling rate {value!r} is not a number") from None
    if not 1 <= file_rate <= MAX_RATE:
        raise Unreadable(
            f"its sampling rate {file_rate} Hz is outside 1 Hz..{MAX_RATE // 1000} kHz (a corrupt header?)"
        )
    return file_rate


def resample(wave: np.ndarray, file_rate: Any, rate: int = SAMPLING_RATE, limit: int | None = None) -> np.ndarray:
    """A mono wave at `file_rate` brought to `rate` (polyphase), at most `limit` samples of it. float32, 1-D."""
    from scipy.signal import resample_poly

    file_rate = _check_rate(file_rate)
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if limit is not None:
        wave = wave[: -(-int(limit) * file_rate // int(rate)) + 1]
    if wave.size == 0:
        raise Unreadable("the audio holds no samples")
    if file_rate != rate:
        g = gcd(int(rate), int(file_rate))
        wave = resample_poly(wave, int(rate) // g, int(file_rate) // g)
    return np.ascontiguousarray(wave if limit is None else wave[:limit], dtype=np.float32)


def bucket(length: int, profile: ShapeProfile) -> tuple[int, int]:
    """(samples kept, padded length) for a clip of `length` samples."""
    try:
        dim = profile.dim("samples")
        lo, hi = dim.min, dim.max
    except KeyError:
        lo, hi = 1, None
    keep = length if hi is None else min(length, hi)
    target = max(-(-keep // STEP) * STEP, lo)
    if hi is not None:
        target = min(target, hi)
    return keep, target


def transcripts(root: Path) -> dict[str, str]:
    """{path relative to root: transcript} from every labels.tsv under root (or beside a single file)."""
    base = root.parent if root.is_file() else root
    tables = [base / LABELS_FILE] if root.is_file() else sorted(root.rglob(LABELS_FILE))
    out: dict[str, str] = {}
    for table in tables:
        if not table.is_file():
            continue
        try:
            confined(table, root)
        except Unreadable:
            continue  # a labels.tsv linked from outside the folder is not read
        for i, line in enumerate(table.read_text(encoding="utf-8", errors="replace").splitlines()):
            parts = line.rstrip("\r\n").split("\t", 1)
            if len(parts) != 2 or not parts[0].strip():
                continue
            if i == 0 and parts[0].strip().lower() in {"file", "filename", "path", "name"}:
                continue  # header row
            rel = (table.parent / parts[0].strip()).relative_to(base).as_posix()
            out[rel] = parts[1].strip()
    return out


class _Prepare:
    """A mono wave at `rate` -> {"input_values": (1, samples), "attention_mask": (1, samples)}, bucketed, with the model's
    feature extractor; the mask is 1 on the real samples, 0 on the bucket's padding."""

    def __init__(self, model: Any, profile: ShapeProfile) -> None:
        proc = model.processor
        if proc is None:
            raise D2VError(
                "the model has no feature extractor; pass a checkpoint folder with preprocessor_config.json, or .npz feeds"
            )
        self.proc, self.profile = proc, profile
        self.rate = int(getattr(proc, "sampling_rate", None) or SAMPLING_RATE)
        self.pad_value = float(getattr(proc, "padding_value", 0.0) or 0.0)
        try:
            self.limit: int | None = profile.dim("samples").max
        except KeyError:
            self.limit = None

    def __call__(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        keep, target = bucket(len(wave), self.profile)
        try:
            values = self.proc(wave[:keep], sampling_rate=self.rate, return_tensors="np")["input_values"]
        except (ValueError, TypeError) as exc:
            raise Unreadable(f"the feature extractor rejected it ({one_line(exc)})") from None
        values = np.asarray(values, dtype=np.float32).reshape(1, -1)
        real = values.shape[1]
        if values.shape[1] < target:
            values = np.pad(values, ((0, 0), (0, target - values.shape[1])), constant_values=self.pad_value)
        return with_audio_mask({"input_values": values}, [real])  # the padding after the real samples is masked


def preparer(model: Any, profile: ShapeProfile) -> _Prepare:
    return _Prepare(model, profile)


def read(
    root: Path,
    files: list[Path],
    model: Any,
    profile: ShapeProfile,
    *,
    count: int | None,
    seed: int,
    columns: Mapping[str, str] | None = None,
) -> Samples:
    prepare = preparer(model, profile)
    meta = hf.metadata(root)
    labels = transcripts(root)
    base = root.parent if root.is_file() else root
    classes = model.head.metric != "ctc"

    def reader(path: Path) -> Callable[[], tuple[dict[str, np.ndarray], object]]:
        def run() -> tuple[dict[str, np.ndarray], object]:
            feed = prepare(read_mono(confined(path, root), prepare.rate, prepare.limit))
            rel = path.relative_to(base).as_posix()
            label = hf.metadata_label(meta.get(rel), model, columns or {})
            if label is None:
                label = labels.get(rel)
            if label is None and classes and root.is_dir() and len(path.relative_to(root).parts) >= 2:
                label = path.relative_to(root).parts[0]
            return feed, label

        return run

    candidates = [Candidate(rel_name(p, root), reader(p)) for p in files]
    return collect(candidates, count=count, seed=seed, source=str(root), what=WHAT, fix=FIX)
