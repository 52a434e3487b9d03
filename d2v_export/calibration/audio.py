"""Audio folders -> `input_values` through the checkpoint's own feature extractor.

wav/flac/ogg/... read with soundfile; channels averaged to mono; any rate brought to the extractor's
rate (16 kHz) with scipy's polyphase resampler. Lengths are bucketed to the shape profile's
"samples" axis: cut to its max, zero-padded up to its min, otherwise up to the next multiple of
0.1 s, so that a set of clips has few distinct shapes. Transcripts come from `labels.tsv`
(`file<TAB>transcript`, an optional header row) in the clip's folder or any folder above it.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from ..heads import SAMPLING_RATE
from ..spec import D2VError, ShapeProfile
from .samples import Candidate, Samples, Unreadable, collect, one_line, rel_name, visible_files

WHAT = "audio files"
FIX = "pass a folder of .wav/.flac/.ogg clips (or .npz feeds named after the model inputs)"
EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au"})
STEP = 1600  # 0.1 s at 16 kHz: the length bucket
LABELS_FILE = "labels.tsv"


def find(root: Path) -> list[Path]:
    return visible_files(root, lambda p: p.suffix.lower() in EXTENSIONS)


def read_mono(path: Path, rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode, average channels, resample to `rate`. float32, 1-D. Raises Unreadable."""
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile reports corrupt files in several exception types
        raise Unreadable(f"not a readable audio file ({one_line(exc)})") from None
    if data.shape[0] == 0:
        raise Unreadable("the audio file holds no samples")
    wave = data.mean(axis=1, dtype=np.float64)
    if file_rate != rate:
        g = gcd(int(rate), int(file_rate))
        wave = resample_poly(wave, int(rate) // g, int(file_rate) // g)
    return np.ascontiguousarray(wave, dtype=np.float32)


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
        for i, line in enumerate(table.read_text(encoding="utf-8", errors="replace").splitlines()):
            parts = line.rstrip("\r\n").split("\t", 1)
            if len(parts) != 2 or not parts[0].strip():
                continue
            if i == 0 and parts[0].strip().lower() in {"file", "filename", "path", "name"}:
                continue  # header row
            rel = (table.parent / parts[0].strip()).relative_to(base).as_posix()
            out[rel] = parts[1].strip()
    return out


def read(root: Path, files: list[Path], model: Any, profile: ShapeProfile, *, count: int | None, seed: int) -> Samples:
    proc = model.processor
    if proc is None:
        raise D2VError(
            "the model has no feature extractor; pass a checkpoint folder with preprocessor_config.json, or .npz feeds"
        )
    rate = int(getattr(proc, "sampling_rate", None) or SAMPLING_RATE)
    pad_value = float(getattr(proc, "padding_value", 0.0) or 0.0)
    labels = transcripts(root)
    base = root.parent if root.is_file() else root

    def reader(path: Path) -> Any:
        def run() -> tuple[dict[str, np.ndarray], object]:
            wave = read_mono(path, rate)
            keep, target = bucket(len(wave), profile)
            try:
                values = proc(wave[:keep], sampling_rate=rate, return_tensors="np")["input_values"]
            except (ValueError, TypeError) as exc:
                raise Unreadable(f"the feature extractor rejected it ({one_line(exc)})") from None
            values = np.asarray(values, dtype=np.float32).reshape(1, -1)
            if values.shape[1] < target:
                values = np.pad(values, ((0, 0), (0, target - values.shape[1])), constant_values=pad_value)
            return {"input_values": values}, labels.get(path.relative_to(base).as_posix())

        return run

    candidates = [Candidate(rel_name(p, root), reader(p)) for p in files]
    return collect(candidates, count=count, seed=seed, source=str(root), what=WHAT, fix=FIX)
