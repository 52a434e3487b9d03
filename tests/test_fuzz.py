"""Every reader a user's file reaches, fuzzed with Hypothesis (issue 21 part 9; docs/fuzzing.md).

The invariant, for every generated case: a valid result, or a D2VError with a documented exit code
whose one-line message names the input; no other exception escapes the library call; nothing is
left in an output folder; nothing outside the given paths is opened (an audit hook watches every
Python-level `open`, and symbolic links / `../` paths / absolute paths pointing outside are planted).

CI runs a small derandomized slice (profile "ci"); `scripts/fuzz.py` runs the same targets with
D2V_FUZZ_PROFILE=long and D2V_FUZZ_EXAMPLES=N and prints `COUNTS`, the cases each target ran.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from d2v_export.spec import D2VError, Dim, ExitCode, Modality, ShapeProfile  # noqa: E402

PROFILE = os.environ.get("D2V_FUZZ_PROFILE", "ci")
LONG = PROFILE == "long"
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.large_base_example]


def fuzz(ci_examples: int) -> settings:
    """CI: derandomized, a fixed small count; long: D2V_FUZZ_EXAMPLES cases (scripts/fuzz.py)."""
    if LONG:
        n = int(os.environ.get("D2V_FUZZ_EXAMPLES", "10000"))
        return settings(max_examples=n, deadline=None, database=None, suppress_health_check=_QUIET, derandomize=False)
    return settings(
        max_examples=ci_examples,
        deadline=None,
        database=None,
        suppress_health_check=_QUIET,
        derandomize=True,
        print_blob=True,
    )


COUNTS: Counter[str] = Counter()  # target -> cases run (scripts/fuzz.py prints it)
OUTCOMES: Counter[str] = Counter()  # "target:ok" / "target:exit3" ...

VISION = ShapeProfile(dims=(Dim("batch", 1, 1, 8),), static={"image_size": 32})
AUDIO = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("samples", 8000, 16000, 32000)))
TEXT = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("sequence", 8, 16, 64)))
PROFILES = {Modality.VISION: VISION, Modality.AUDIO: AUDIO, Modality.TEXT: TEXT}


@functools.cache
def model(modality: Modality, task: str | None = None) -> Any:
    from d2v_export.models import load, parse_source

    return load(parse_source("preset:tiny", modality, task))


# --------------------------------------------------------------------------------------- the invariant


class _Opens:
    """An audit hook that records every path Python opens while armed (Pillow, numpy, json, csv, text)."""

    def __init__(self) -> None:
        self.armed: list[Path] | None = None
        self.seen: list[str] = []
        self.thread = threading.get_ident()
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if (
            event == "open"
            and self.armed is not None
            and threading.get_ident() == self.thread
            and isinstance(args[0], (str, bytes, os.PathLike))
        ):
            self.seen.append(os.fsdecode(args[0]))

    @contextmanager
    def only_inside(self, *roots: Path) -> Iterator[None]:
        self.armed, self.seen = [Path(r).resolve() for r in roots], []
        try:
            yield
        finally:
            seen, self.armed = self.seen, None
            outside = [s for s in seen if _data_file(s) and not _within(Path(s), roots)]
            assert not outside, f"opened outside the given paths: {outside[:3]}"


def _data_file(path: str) -> bool:
    """Files the readers may open that are not the user's: Python modules, installed packages, /proc, /dev."""
    p = os.path.realpath(path)
    import d2v_export

    skip = (
        str(Path(d2v_export.__file__).parent),
        sys.prefix,
        sys.base_prefix,
        "/proc/",
        "/sys/",
        "/dev/",
        "/usr/",
        "/etc/ld.so",
        str(Path.home() / ".cache"),
    )
    return not p.startswith(skip) and not p.endswith((".py", ".pyc", ".so", ".json.lock"))


def _within(path: Path, roots: tuple[Path, ...]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == Path(r).resolve() or Path(r).resolve() in real.parents for r in roots)


_OPENS: _Opens | None = None


def opens() -> _Opens:
    global _OPENS
    if _OPENS is None:
        _OPENS = _Opens()
    return _OPENS


DOCUMENTED = {int(c) for c in ExitCode} - {int(ExitCode.INTERNAL)}


def check(
    target: str,
    call: Callable[[], Any],
    *,
    names: tuple[str, ...],
    inside: tuple[Path, ...],
    output: Path | None = None,
) -> Any:
    """Run one case: a result, or a one-line D2VError with a documented code naming one of `names`."""
    COUNTS[target] += 1
    try:
        with opens().only_inside(*inside):
            result = call()
    except D2VError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg and "Traceback" not in msg, msg
        assert int(exc.code) in DOCUMENTED, (exc.code, msg)
        assert any(n and n in msg for n in names), f"the error does not name the input {names}: {msg}"
        if output is not None:
            assert not output.exists() or not any(output.iterdir()), (
                f"left behind in {output}: {sorted(output.iterdir())}"
            )
        OUTCOMES[f"{target}:exit{int(exc.code)}"] += 1
        return exc
    OUTCOMES[f"{target}:ok"] += 1
    return result


@contextmanager
def case_dir() -> Iterator[Path]:
    """A fresh folder per case (Hypothesis reuses a test's fixtures across its cases) with a secret beside it."""
    with tempfile.TemporaryDirectory(prefix="d2v-fuzz-") as tmp:
        root = Path(tmp)
        (root / "outside").mkdir()
        (root / "given").mkdir()
        yield root


def plant_outside(root: Path, name: str, data: bytes) -> Path:
    secret = root / "outside" / name
    secret.write_bytes(data)
    return secret


# --------------------------------------------------------------------------------------- generators: bytes


def mutate(data: bytes, draw: Any) -> bytes:
    """Truncate, flip, splice or duplicate bytes of a valid file (or leave it valid)."""
    # Positions are drawn independently of len(data): an .npz's bytes may differ between a case and its replay
    # (zip timestamps), and Hypothesis needs the same draws both times.
    how = draw(st.sampled_from(("keep", "truncate", "flip", "splice", "zero_tail", "repeat")))
    at = draw(st.integers(0, 1 << 20)) % max(1, len(data))
    flips = (
        [(draw(st.integers(0, 1 << 20)), draw(st.integers(0, 255))) for _ in range(draw(st.integers(1, 8)))]
        if how == "flip"
        else []
    )
    inserted = draw(st.binary(max_size=64)) if how == "splice" else b""
    if not data or how == "keep":
        return data
    if how == "truncate":
        return data[:at]
    if how == "flip":
        b = bytearray(data)
        for i, value in flips:
            b[i % len(b)] = value
        return bytes(b)
    if how == "splice":
        return data[:at] + inserted + data[at:]
    if how == "zero_tail":
        return data[:at] + bytes(len(data) - at)
    return data[:at] + data[at:][:256] * 3


IMAGE_FORMATS = (
    "PNG",
    "JPEG",
    "GIF",
    "BMP",
    "TIFF",
    "WEBP",
    "ICO",
    "PPM",
    "TGA",
    "PCX",
    "SGI",
    "IM",
    "DIB",
    "QOI",
    "JPEG2000",
    "EPS",
    "PDF",
)
IMAGE_MODES = (
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "F",
    "I;16",
    "I;16B",
    "LA",
    "PA",
    "RGBX",
    "La",
)
EXT = {"JPEG": ".jpg", "JPEG2000": ".jp2", "TIFF": ".tif"}


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the body is a few bytes): huge images without the memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@st.composite
def image_files(draw: Any) -> tuple[str, bytes]:
    """(extension, bytes): any Pillow format and mode, animated, truncated, corrupt, huge, or not an image."""
    from PIL import Image

    kind = draw(st.sampled_from(("encoded", "encoded", "encoded", "huge", "random")))
    if kind == "huge":
        return ".png", _png_with_size(draw(st.integers(1, 1 << 31)), draw(st.integers(1, 1 << 31)))
    if kind == "random":
        magic = draw(
            st.sampled_from((b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"RIFF"))
        )
        return draw(st.sampled_from((".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"))), magic + draw(
            st.binary(max_size=512)
        )
    fmt = draw(st.sampled_from(IMAGE_FORMATS))
    mode = draw(st.sampled_from(IMAGE_MODES))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    frames = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    try:
        ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode) for _ in range(frames)]
        buf = io.BytesIO()
        extra: dict[str, Any] = (
            {"save_all": True, "append_images": ims[1:]}
            if frames > 1 and fmt in ("GIF", "PNG", "WEBP", "TIFF", "PDF")
            else {}
        )
        ims[0].save(buf, format=fmt, **extra)
        data = buf.getvalue()
    except Exception:  # noqa: BLE001 - a mode this format cannot store: an arbitrary blob instead
        data = draw(st.binary(max_size=128))
    return EXT.get(fmt, "." + fmt.lower()), mutate(data, draw)


AUDIO_FORMATS = {
    "WAV": ("PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE", "ULAW", "ALAW"),
    "FLAC": ("PCM_16", "PCM_24", "PCM_S8"),
    "OGG": ("VORBIS",),
    "AIFF": ("PCM_16", "FLOAT"),
    "AU": ("PCM_16", "FLOAT"),
}
RATES = (1, 7, 8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000, 384000, 655350)


def _wav_header_patch(data: bytes, draw: Any) -> bytes:
    """Rewrite one field of a RIFF/WAVE header: channels, rate, byte rate, block align, bits, data size."""
    if len(data) < 44 or not data.startswith(b"RIFF"):
        return data
    offset, fmt = draw(
        st.sampled_from(((22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"), (34, "<H"), (40, "<I"), (4, "<I")))
    )
    value = draw(st.integers(0, 0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@st.composite
def audio_files(draw: Any) -> tuple[str, bytes]:
    """(extension, bytes): WAV/FLAC/OGG/AIFF/AU of any channels, rate, length and sample type, then mutated."""
    import soundfile as sf

    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from((".wav", ".flac", ".ogg", ".mp3", ".opus"))), draw(st.binary(max_size=512))
    fmt = draw(st.sampled_from(sorted(AUDIO_FORMATS)))
    subtype = draw(st.sampled_from(AUDIO_FORMATS[fmt]))
    channels = draw(st.integers(1, 6))
    rate = draw(st.sampled_from(RATES))
    frames = draw(st.sampled_from((0, 1, 2, 100, 1600, 8000, 20000)))
    special = draw(st.sampled_from((None, None, np.nan, np.inf, 0.0, 1e30)))
    wave = np.random.default_rng(draw(st.integers(0, 2**16))).uniform(-1, 1, (frames, channels))
    if (
        fmt == "OGG"
    ):  # libvorbis's encoder itself crashes (SIGSEGV) on odd rates and non-finite samples: only the reader is fuzzed
        rate, special = min((8000, 16000, 22050, 44100, 48000), key=lambda r: abs(r - rate)), None
    if subtype in ("ULAW", "ALAW") and special not in (
        None,
        0.0,
    ):  # libsndfile's u-law/A-law encoder crashes on 1e30, inf, NaN
        special = None
    if special is not None and frames:
        wave[: max(1, frames // 3)] = special
    buf = io.BytesIO()
    try:
        sf.write(buf, wave, rate, format=fmt, subtype=subtype)
        data = buf.getvalue()
    except Exception:  # noqa: BLE001 - a rate or channel count this format rejects
        data = draw(st.binary(max_size=256))
    data = _wav_header_patch(data, draw) if draw(st.booleans()) else data
    return {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "AIFF": ".aiff", "AU": ".au"}[fmt], mutate(data, draw)


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40))
JSON = st.recursive(
    JSON_LEAF,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)),
    max_leaves=12,
)
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
DIGITS = st.sampled_from(("0", "1", "-1", "²", "٣", "¹²", "1" * 5000, "-" + "9" * 4400, "0x10", "1.5", "", " 7 "))


@st.composite
def text_lines(draw: Any) -> bytes:
    """A .txt/.jsonl body: good records, wrong types, bad UTF-8, huge lines, deep nesting, NULs."""
    keys = ("text", "text_pair", "question", "context", "prompt", "choices", "label")
    out = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(("record", "record", "json", "raw", "bad_utf8", "huge", "deep", "digits")))
        if kind == "record":
            rec = {
                k: draw(st.one_of(WORDS, JSON, st.lists(WORDS, max_size=6), DIGITS))
                for k in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
            }
            out.append(json.dumps(rec).encode())
        elif kind == "json":
            out.append(json.dumps(draw(JSON)).encode())
        elif kind == "raw":
            out.append(draw(WORDS).encode("utf-8", "surrogatepass"))
        elif kind == "bad_utf8":
            out.append(draw(st.binary(max_size=40)) + b"\xff\xfe\xc3")
        elif kind == "huge":
            out.append(("word " * draw(st.integers(1000, 40000))).encode())
        elif kind == "deep":
            n = draw(st.integers(50, 200000))
            out.append(draw(st.sampled_from((b"[" * n, b'{"text": ' + b"[" * n + b"]" * n + b"}", b'{"a":' * n))))
        else:
            out.append(json.dumps({"text": "a b", "label": draw(DIGITS)}).encode())
    return draw(st.sampled_from((b"\n", b"\r\n", b"\r"))).join(out)


# ------------------------------------------------------------------------------------------ calibration readers


def _samples(path: Path, modality: Modality, task: str | None = None) -> Callable[[], Any]:
    """The call under test (the model is loaded first: a preset writes its vocabulary to a temporary folder)."""
    from d2v_export.calibration import load_samples

    loaded = model(modality, task)
    return lambda: load_samples(path, loaded, PROFILES[modality], count=None)


def _valid(samples: Any) -> None:
    """A result is model-ready: finite feeds with batch axis 1, names and labels that line up."""
    assert len(samples) >= 1 and len(samples.names) == len(samples)
    for feed in samples.feeds:
        for value in feed.values():
            assert value.shape[0] == 1 and (value.dtype.kind != "f" or np.isfinite(value).all())
    assert samples.labels is None or len(samples.labels) == len(samples)
    assert not any("outside" in n for n in samples.names)


def _symlink_out(root: Path, secret: Path, name: str) -> None:
    try:
        (root / "given" / name).symlink_to(secret)
    except OSError:
        pass


def run_folder(target: str, root: Path, modality: Modality, task: str | None = None) -> None:
    given = root / "given"
    result = check(target, _samples(given, modality, task), names=(str(given),), inside=(given,))
    if not isinstance(result, D2VError):
        _valid(result)


@fuzz(60)
@given(st.lists(image_files(), min_size=1, max_size=3), st.booleans())
@example([(".png", _png_with_size(20000, 20000))], False)  # 400 megapixels claimed: refused before decoding
@example([(".png", _png_with_size(12000, 12000))], False)  # 144 megapixels: under Pillow's bomb limit, still refused
def test_image_folders(files: list[tuple[str, bytes]], link: bool) -> None:
    from PIL import Image

    with case_dir() as root:
        for i, (ext, data) in enumerate(files):
            (root / "given" / f"{i}{ext}").write_bytes(data)
        if link:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, "PNG")
            _symlink_out(root, plant_outside(root, "secret.png", buf.getvalue()), "link.png")
        run_folder("images", root, Modality.VISION, "image-classification")


@fuzz(40)
@given(st.lists(audio_files(), min_size=1, max_size=3), st.booleans())
def test_audio_folders(files: list[tuple[str, bytes]], link: bool) -> None:
    with case_dir() as root:
        for i, (ext, data) in enumerate(files):
            (root / "given" / f"{i}{ext}").write_bytes(data)
        if link:
            import soundfile as sf

            buf = io.BytesIO()
            sf.write(buf, np.zeros(1600), 16000, format="WAV")
            _symlink_out(root, plant_outside(root, "secret.wav", buf.getvalue()), "link.wav")
        run_folder("audio", root, Modality.AUDIO, "audio-classification")


TEXT_TASKS = ("text-classification", "question-answering", "multiple-choice", "fill-mask")


@fuzz(60)
@given(
    st.lists(st.tuples(st.sampled_from((".txt", ".jsonl")), text_lines()), min_size=1, max_size=3),
    st.sampled_from(TEXT_TASKS),
    st.booleans(),
)
@example([(".jsonl", b"[" * 100000)], "text-classification", False)  # nesting past the recursion limit
@example([(".jsonl", b'{"text": "a", "label": "\xc2\xb2"}')], "text-classification", False)  # a superscript digit label
def test_text_files(files: list[tuple[str, bytes]], task: str, link: bool) -> None:
    with case_dir() as root:
        for i, (ext, data) in enumerate(files):
            (root / "given" / f"{i}{ext}").write_bytes(data)
        if link:
            _symlink_out(root, plant_outside(root, "secret.txt", b"the secret\n"), "link.txt")
        run_folder("text", root, Modality.TEXT, task)


NPZ_NAMES = ("input_ids", "attention_mask", "pixel_values", "input_values", "label", "labels", "other")
DTYPES = (
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "longdouble",
    "complex64",
    "bool",
    "U3",
    "S2",
    "datetime64[s]",
    "O",
    "V4",
    "f4,i2",
)


@st.composite
def npz_files(draw: Any) -> bytes:
    """An .npz of arrays with any name, dtype and shape; object arrays (pickled), raw pickles, corrupt zips."""
    kind = draw(st.sampled_from(("arrays", "arrays", "arrays", "pickle", "random")))
    if kind == "pickle":
        return pickle.dumps(draw(JSON)) if draw(st.booleans()) else b"PK\x03\x04" + pickle.dumps({"input_ids": [1, 2]})
    if kind == "random":
        return b"PK\x03\x04" + draw(st.binary(max_size=256))
    arrays = {}
    for name in draw(st.lists(st.sampled_from(NPZ_NAMES), min_size=1, max_size=4, unique=True)):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        if dtype.kind == "O":
            arrays[name] = np.array([draw(JSON) for _ in range(2)] + [None], dtype=object)
        else:
            arrays[name] = (
                np.zeros(shape, dtype=dtype)
                if dtype.kind in "UVSM" or dtype.names
                else np.asarray(
                    np.random.default_rng(0).standard_normal(shape) * draw(st.sampled_from((1, 1e6, np.inf, np.nan)))
                ).astype(dtype)
            )
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    return mutate(buf.getvalue(), draw)


@fuzz(60)
@given(
    st.lists(npz_files(), min_size=1, max_size=3),
    st.sampled_from((Modality.TEXT, Modality.VISION, Modality.AUDIO)),
    st.booleans(),
)
@example([b"PK\x03\x04\x14\x00"], Modality.TEXT, False)  # a truncated zip: BadZipFile
def test_npz_feeds(files: list[bytes], modality: Modality, link: bool) -> None:
    with case_dir() as root:
        for i, data in enumerate(files):
            (root / "given" / f"{i}.npz").write_bytes(data)
        if link:
            buf = io.BytesIO()
            np.savez(buf, input_ids=np.ones((1, 8), np.int64), attention_mask=np.ones((1, 8), np.int64))
            _symlink_out(root, plant_outside(root, "secret.npz", buf.getvalue()), "link.npz")
        task = {Modality.TEXT: None, Modality.VISION: "image-classification", Modality.AUDIO: "audio-classification"}[
            modality
        ]
        run_folder("npz", root, modality, task)


FILE_NAMES = st.one_of(
    st.sampled_from(
        ("0.png", "./0.png", "../outside/secret.png", "/etc/passwd", "sub/../0.png", "0.png\x00x", "", "0.PNG")
    ),
    WORDS,
)


@st.composite
def metadata_files(draw: Any) -> tuple[str, bytes]:
    """metadata.csv / metadata.jsonl: rows of any columns and values, traversal paths, NULs, huge fields, bad bytes."""
    name = draw(st.sampled_from(("metadata.csv", "metadata.jsonl")))
    columns = draw(
        st.lists(
            st.sampled_from(("file_name", "label", "labels", "class", "target", "text", "transcription", "x")),
            max_size=4,
            unique=True,
        )
    )
    rows = [
        {c: draw(FILE_NAMES) if c == "file_name" else draw(st.one_of(DIGITS, WORDS, JSON)) for c in columns}
        for _ in range(draw(st.integers(0, 4)))
    ]
    if name.endswith(".jsonl"):
        body = "\n".join(json.dumps(r) if draw(st.integers(0, 5)) else draw(WORDS) for r in rows).encode(
            "utf-8", "surrogatepass"
        )
    else:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([r[c] if isinstance(r[c], str) else json.dumps(r[c]) for c in columns])
        body = out.getvalue().encode("utf-8", "surrogatepass")
    extra = draw(st.sampled_from((b"", b"", b"\x00", b"\xff", b"x" * 200000, b'"unclosed')))
    return name, body + extra


@fuzz(60)
@given(
    metadata_files(),
    st.sampled_from(("image-classification", "audio-classification", "automatic-speech-recognition")),
    st.booleans(),
)
# int('²') raised ValueError
@example(("metadata.csv", b"file_name,label\n0.png,\xc2\xb2\n"), "image-classification", False)
# past int()'s digit limit
@example(("metadata.csv", b"file_name,label\n0.png," + b"1" * 5000 + b"\n"), "image-classification", False)
@example(("metadata.csv", b"file_name,label\n0.png\x00x,a\n"), "image-classification", False)  # NUL in a file name
@example(("metadata.csv", b"file_name,label\n0.png,a\x00b\n"), "image-classification", False)  # NUL in a field
@example(("metadata.jsonl", b"[" * 100000), "image-classification", False)
def test_hf_metadata(meta: tuple[str, bytes], task: str, link: bool) -> None:
    from PIL import Image
    import soundfile as sf

    with case_dir() as root:
        given_ = root / "given"
        if task == "image-classification":
            Image.new("RGB", (16, 16), (10, 20, 30)).save(given_ / "0.png")
        else:
            sf.write(given_ / "0.wav", np.zeros(1600), 16000)
        sub = given_ / "sub"
        sub.mkdir()
        (sub / meta[0]).write_bytes(meta[1])
        (given_ / meta[0]).write_bytes(meta[1])
        if link:
            secret = plant_outside(root, "metadata.csv", b"file_name,label\n0.png,secret\n")
            (given_ / "sub" / "metadata.csv").unlink(missing_ok=True)
            _symlink_out(root, secret, "sub/metadata.csv")
        modality = Modality.VISION if task == "image-classification" else Modality.AUDIO
        result = check("hf_metadata", _samples(given_, modality, task), names=(str(given_),), inside=(given_,))
        if not isinstance(result, D2VError):
            _valid(result)
            assert "secret" not in [str(x) for x in (result.labels or ())]


PARQUET_COLUMNS = (
    "image",
    "img",
    "audio",
    "text",
    "question",
    "context",
    "label",
    "fine_label",
    "transcription",
    "choices",
    "x",
)


def _cell(draw: Any, root: Path) -> Any:
    secret = str(root / "outside" / "secret.png")
    return draw(
        st.one_of(
            JSON_LEAF,
            st.binary(max_size=64),
            DIGITS,
            st.builds(
                lambda b, p: {"bytes": b, "path": p},
                st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=8)),
                st.one_of(st.none(), st.sampled_from((secret, "../outside/secret.png", "/etc/hostname", "0.png", ""))),
            ),
            st.builds(
                lambda a, r: {"array": a, "sampling_rate": r},
                st.lists(st.floats(width=32), max_size=50),
                st.one_of(st.none(), st.sampled_from((0, -16000, 1, 16000, 10**12)), st.text(max_size=4), st.floats()),
            ),
            st.lists(WORDS, max_size=4),
        )
    )


@fuzz(40)
@given(
    st.data(),
    st.sampled_from((Modality.VISION, Modality.AUDIO, Modality.TEXT)),
    st.sampled_from(("file", "folder", "saved")),
)
def test_datasets_and_parquet(data: Any, modality: Modality, layout: str) -> None:
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    with case_dir() as root:
        Image.new("RGB", (8, 8)).save(root / "outside" / "secret.png")
        given_ = root / "given"
        cols = data.draw(st.lists(st.sampled_from(PARQUET_COLUMNS), min_size=1, max_size=3, unique=True))
        n = data.draw(st.integers(0, 3))
        table: dict[str, list[Any]] = {c: [_cell(data.draw, root) for _ in range(n)] for c in cols}
        try:
            tbl = pa.table({c: pa.array(v) for c, v in table.items()})
        except (
            pa.ArrowException,
            TypeError,
            ValueError,
            OverflowError,
        ):  # mixed types arrow cannot store: one type per column
            tbl = pa.table(
                {c: pa.array([json.dumps(x, default=repr) for x in v], pa.string()) for c, v in table.items()}
            )
        if layout == "saved":
            import datasets

            target = given_ / "ds"
            datasets.Dataset(tbl).save_to_disk(str(target))
            victim = data.draw(st.sampled_from(sorted(p.name for p in target.iterdir())))
            (target / victim).write_bytes(mutate((target / victim).read_bytes(), data.draw))
        else:
            target = given_ / "data.parquet" if layout == "file" else given_
            buf = io.BytesIO()
            pq.write_table(tbl, buf)
            (given_ / ("data.parquet" if layout == "file" else "train-00000-of-00001.parquet")).write_bytes(
                mutate(buf.getvalue(), data.draw)
            )
        task = {Modality.TEXT: None, Modality.VISION: "image-classification", Modality.AUDIO: "audio-classification"}[
            modality
        ]
        result = check("datasets", _samples(target, modality, task), names=(str(target),), inside=(given_,))
        if not isinstance(result, D2VError):
            _valid(result)


# ------------------------------------------------------------------------------------------ bundles and `run`'s inputs

BUNDLE_HEADS = {
    Modality.VISION: (
        "image-classification",
        [
            {
                "name": "pixel_values",
                "dtype": "float32",
                "shape": ["batch", 3, "height", "width"],
                "dynamic": {"batch": {"min": 1, "opt": 1, "max": 4}},
                "fixed": {"height": 32, "width": 32},
            }
        ],
    ),
    Modality.AUDIO: (
        "audio-classification",
        [
            {
                "name": "input_values",
                "dtype": "float32",
                "shape": ["batch", "samples"],
                "dynamic": {
                    "batch": {"min": 1, "opt": 1, "max": 4},
                    "samples": {"min": 8000, "opt": 16000, "max": 32000},
                },
            }
        ],
    ),
    Modality.TEXT: (
        "question-answering",
        [
            {
                "name": n,
                "dtype": "int64",
                "shape": ["batch", "sequence"],
                "dynamic": {"batch": {"min": 1, "opt": 1, "max": 4}, "sequence": {"min": 8, "opt": 16, "max": 64}},
            }
            for n in ("input_ids", "attention_mask")
        ],
    ),
}


def make_bundle(folder: Path, modality: Modality, doc_edit: Callable[[dict[str, Any]], None] = lambda d: None) -> Path:
    """A bundle folder as d2v-export writes one (processor / tokenizer files, a model file, manifest.json with checksums)."""
    task, inputs = BUNDLE_HEADS[modality]
    loaded = model(modality, task)
    folder.mkdir(parents=True, exist_ok=True)
    for part in (loaded.processor, loaded.tokenizer):
        if part is not None:
            part.save_pretrained(str(folder))
    loaded.config.to_json_file(str(folder / "config.json"))
    (folder / "model.onnx").write_bytes(b"not run here")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    doc: dict[str, Any] = {
        "schema_version": "1.0",
        "name": folder.name,
        "target": "onnxruntime",
        "precision": "fp32",
        "model_file": "model.onnx",
        "model": {"modality": modality.value, "task": task, "class": loaded.head.class_name, "random_weights": True},
        "inputs": inputs,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}],
        "static": {"image_size": 32} if modality is Modality.VISION else {},
        "preprocessing": {"modality": modality.value}
        | ({"tokenizer": {"class": "x"}} if loaded.tokenizer is not None else {}),
        "labels": {"0": "no", "1": "yes"},
        "files": [
            {
                "path": p.relative_to(folder).as_posix(),
                "size": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
            for p in files
        ],
    }
    doc_edit(doc)
    (folder / "manifest.json").write_text(json.dumps(doc), encoding="utf-8")
    return folder


@functools.cache
def _bundle_parts(modality: Modality) -> tuple[Path, Any, Any]:
    """One verified bundle per modality for the input targets, with its processor and tokenizer loaded once."""
    from d2v_export.deploy import bundle, predict

    import atexit
    import shutil

    top = Path(tempfile.mkdtemp(prefix="d2v-fuzz-bundle-"))
    atexit.register(shutil.rmtree, top, True)
    folder = make_bundle(top / "b", modality)
    manifest = bundle.verify(folder)
    return folder, manifest, predict._load_parts(manifest)


def _run_inputs(manifest: Any, parts: tuple[Any, Any], inputs: list[str]) -> list[Any]:
    """`d2v-export run`'s input side: what predict() does with the arguments before the runtime sees them."""
    from d2v_export.deploy import predict

    prepare = predict.Preparer(manifest, *parts)
    return [prepare(raw) for _name, raw in predict.expand_inputs(manifest, inputs)]


@fuzz(60)
@given(st.sampled_from((Modality.VISION, Modality.AUDIO, Modality.TEXT)), st.data())
@example(Modality.TEXT, None)  # marker: see the explicit inputs below
def test_run_inputs(modality: Modality, data: Any) -> None:
    folder, manifest, parts = _bundle_parts(modality)
    with case_dir() as root:
        given_ = root / "given"
        if data is None:  # a .jsonl argument nested past the recursion limit, and a text pair without a question
            (given_ / "deep.jsonl").write_bytes(b"[" * 100000)
            args = [str(given_ / "deep.jsonl"), "no separator here"]
        elif modality is Modality.TEXT:
            args = data.draw(
                st.lists(st.one_of(WORDS, st.builds(lambda a, b: f"{a} ||| {b}", WORDS, WORDS)), min_size=1, max_size=3)
            )
            if data.draw(st.booleans()):
                (given_ / "in.jsonl").write_bytes(data.draw(text_lines()))
                args.append(str(given_ / "in.jsonl"))
        else:
            files = data.draw(
                st.lists(image_files() if modality is Modality.VISION else audio_files(), min_size=1, max_size=2)
            )
            args = []
            for i, (ext, blob) in enumerate(files):
                (given_ / f"{i}{ext}").write_bytes(blob)
                args.append(str(given_ / f"{i}{ext}"))
        names = tuple(args) + ("empty text", "question-answering", "|||", "truncated")
        result = check("run_inputs", lambda: _run_inputs(manifest, parts, args), names=names, inside=(given_, folder))
        if not isinstance(result, D2VError):
            assert len(result) >= len([a for a in args if not a.endswith(".jsonl")])
            for prepared in result:
                assert all(v.shape[0] == 1 for v in prepared.feed.values())


def _mutate_doc(doc: Any, draw: Any, depth: int = 0) -> Any:
    """Replace, drop or retype one value somewhere in a JSON document."""
    if isinstance(doc, dict) and doc and depth < 6 and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(doc)))
        out = dict(doc)
        how = draw(st.sampled_from(("descend", "descend", "drop", "replace")))
        if how == "drop":
            del out[key]
        elif how == "replace":
            out[key] = draw(JSON)
        else:
            out[key] = _mutate_doc(doc[key], draw, depth + 1)
        return out
    if isinstance(doc, list) and doc and depth < 6 and draw(st.integers(0, 3)):
        i = draw(st.integers(0, len(doc) - 1))
        return doc[:i] + [_mutate_doc(doc[i], draw, depth + 1)] + doc[i + 1 :]
    return draw(
        st.one_of(
            JSON, DIGITS, st.sampled_from(("../../etc/passwd", "/etc/passwd", "a/../../x", "C:\\\\x", "model.onnx"))
        )
    )


@fuzz(60)
@given(st.sampled_from((Modality.VISION, Modality.AUDIO, Modality.TEXT)), st.data())
@example(Modality.VISION, "labels")  # {"x": "y"}: int() of a label id crashed `run`
@example(Modality.VISION, "model")  # a list: .get() of it crashed
@example(Modality.TEXT, "task")  # "": heads' error named no bundle
@example(Modality.AUDIO, "inputs")  # a dynamic axis without min/opt/max
def test_bundle_manifests(modality: Modality, data: Any) -> None:
    from d2v_export.deploy import bundle, predict

    base, _manifest, parts = _bundle_parts(modality)
    doc = json.loads((base / "manifest.json").read_text())
    if isinstance(data, str):
        if data == "task":
            doc["model"] = dict(doc["model"], task="")
        else:
            doc[data] = {
                "labels": {"x": "y"},
                "model": ["vision"],
                "inputs": [{"name": "input_values", "dynamic": {"samples": {}}}],
            }[data]
    else:
        doc = _mutate_doc(doc, data.draw)
    with case_dir() as root:
        folder = root / "given" / "bundle"
        shutil_copy(base, folder)
        if data is not None and not isinstance(data, str) and data.draw(st.booleans()):
            (folder / "preprocessor_config.json").unlink(missing_ok=True)
            (folder / "preprocessor_config.json").symlink_to(plant_outside(root, "p.json", b"{}"))
        (folder / "manifest.json").write_text(json.dumps(doc), encoding="utf-8")

        def read() -> Any:
            m = bundle.verify(folder)
            predict.Preparer(m, *parts)
            predict.Interpreter(m, parts[1], 3)
            return m.dims(), m.static(), m.labels

        check("bundle_manifest", read, names=(str(folder),), inside=(folder,))


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


# ------------------------------------------------------------------------------------------ TensorRT build recipes


@functools.cache
def _recipe() -> dict[str, Any]:
    from d2v_export.backends.tensorrt import device as trt_device
    from d2v_export.backends.tensorrt.recipe import make_build_recipe
    from d2v_export.spec import Drift, ExportedGraph, Precision, TensorSpec

    graph = ExportedGraph(
        path=Path("model.onnx"),
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("logits", "float32", ("batch", 2)),),
        profile=ShapeProfile((Dim("batch", 1, 1, 4), Dim("sequence", 8, 16, 64)), {}),
        opset=18,
        exporter="test",
        check=Drift("pytorch-fp32", 0, {}, {}, True),
    )
    assert trt_device.RECIPE_FILE
    return make_build_recipe(graph, Precision.INT8, None)


@fuzz(80)
@given(st.data())
def test_build_recipes(data: Any) -> None:
    from d2v_export.backends.tensorrt import device as trt_device
    from d2v_export.backends.tensorrt.recipe import read_recipe, settings_from, trtexec_command

    doc = _mutate_doc(_recipe(), data.draw)
    with case_dir() as root:
        folder = root / "given"
        (folder / trt_device.RECIPE_FILE).write_text(json.dumps(doc), encoding="utf-8")

        def read() -> Any:
            recipe = read_recipe(folder)
            for key in ("onnx", "engine", "timing_cache"):
                trt_device.confined(folder, recipe.get(key) or "x", key)
            # build_script writes a recipe it made, never a read one
            return settings_from(recipe), trtexec_command(recipe)

        check("build_recipe", read, names=(str(folder), trt_device.RECIPE_FILE), inside=(folder,))


# ------------------------------------------------------------------------------------------ reports: compare, matrix-merge

REPORT = {
    "schema_version": "1.0",
    "created": "2026-12-01T00:00:00+00:00",
    "model": {"source": "preset:tiny", "modality": "vision", "task": "image-classification"},
    "environment": {"cpu": "x", "threads": 2, "cores_available": 2, "versions": {"onnxruntime": "1.32.0"}},
    "reference": {
        "name": "pytorch-fp32",
        "latency_ms": {"p50": 10.0, "batch": 1, "shape": "1x3x32x32", "samples": [10.0, 10.5, 9.8, 10.1]},
    },
    "variants": [
        {
            "name": "onnxruntime-int8-static",
            "latency_ms": {"p50": 5.0, "samples": [5.0, 5.1, 4.9, 5.2]},
            "drift": {
                "passed": True,
                "budget": {"top1_agreement": 0.99},
                "metrics": {"top1_agreement": 1.0},
                "bounds": {"top1_agreement": [0.97, 1.0]},
                "confidence": {"top1_agreement": 0.95},
                "failed": [],
            },
        }
    ],
}
MATRIX = {
    "schema_version": "1.0",
    "kind": "matrix",
    "model": "preset:tiny",
    "random_weights": True,
    "modalities": ["vision"],
    "targets": ["onnxruntime"],
    "precisions": ["fp32", "int8"],
    "shard": "1/2",
    "warnings": [],
    "cells": [
        {
            "modality": "vision",
            "target": "onnxruntime",
            "precision": "int8",
            "status": "ran",
            "task": "image-classification",
            "report": "vision-onnxruntime/report.json",
            "reference_p50_ms": 10.0,
            "variants": [
                {
                    "name": "onnxruntime-int8-static",
                    "p50_ms": 5.0,
                    "drift_score": 0.01,
                    "key_metric": "top1_agreement",
                    "key_metric_value": 1.0,
                    "drift_passed": True,
                }
            ],
        },
        {"modality": "vision", "target": "onnxruntime", "precision": "fp32", "status": "skipped", "reason": "shard 2"},
    ],
}


@fuzz(80)
@given(st.data(), st.booleans())
@example(None, False)  # a report nested past the recursion limit
def test_compare_reports(data: Any, raw: bool) -> None:
    from d2v_export.reports import compare

    with case_dir() as root:
        base, cur = root / "given" / "base.json", root / "given" / "cur.json"
        base.write_text(json.dumps(REPORT))
        if data is None:
            cur.write_bytes(b"[" * 100000)
        else:
            cur.write_bytes(
                data.draw(st.binary(max_size=300)) if raw else json.dumps(_mutate_doc(REPORT, data.draw)).encode()
            )

        def run() -> Any:
            comparison = compare.compare(
                compare.load_report(base), compare.load_report(cur), relative_to_reference=True
            )
            return compare.to_dict(comparison), compare.markdown(comparison)

        check("compare_report", run, names=(str(cur),), inside=(root / "given",))


@fuzz(60)
@given(st.data())
def test_matrix_merge(data: Any) -> None:
    from d2v_export import matrix

    with case_dir() as root:
        shards = []
        for i in range(data.draw(st.integers(1, 2))):
            shard = root / "given" / f"shard{i}" / "matrix.json"
            shard.parent.mkdir()
            shard.write_text(json.dumps(_mutate_doc(MATRIX, data.draw) if data.draw(st.booleans()) else MATRIX))
            shards.append(shard)
        output = root / "merged"
        check(
            "matrix_merge",
            lambda: matrix.merge_files(shards, output),
            names=tuple(map(str, shards)) + ("nothing to merge", "matrix"),
            inside=(root / "given", output),
            output=output,
        )


# ------------------------------------------------------------------------------------------ the command line


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The same inputs through the installed `d2v-export`: a documented exit code, one `error:` line, no traceback."""
    from .conftest import cli

    folder = make_bundle(tmp_path / "bundle", Modality.VISION)
    (tmp_path / "bad.png").write_bytes(_png_with_size(20000, 20000))
    (tmp_path / "deep.json").write_bytes(b"[" * 100000)
    (tmp_path / "shard.json").write_text(json.dumps(dict(MATRIX, cells=[{"modality": 1}])))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(manifest, labels={"x": "y"})))
    runs = [
        ("run", str(folder), str(tmp_path / "bad.png")),
        ("compare", str(tmp_path / "deep.json"), str(tmp_path / "deep.json")),
        ("matrix-merge", str(tmp_path / "shard.json"), "--output", str(tmp_path / "merged")),
    ]
    for args in runs:
        r = cli(*args)
        assert r.returncode == int(ExitCode.BAD_INPUT), (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, r.stderr
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "shard",
    [dict(MATRIX, modalities=["0"]), dict(MATRIX, precisions=["0"]), dict(MATRIX, cells=[None])],
    ids=["unknown-modality", "unknown-precision", "null-cell"],
)
def test_matrix_merge_names_the_shard_that_fuzzing_broke_it_with(tmp_path: Path, shard: dict[str, Any]) -> None:
    """Found by the fuzzer: plan()'s error named no file, and a null cell raised TypeError."""
    from d2v_export import matrix

    path = tmp_path / "matrix.json"
    path.write_text(json.dumps(shard))
    with pytest.raises(D2VError, match="matrix.json"):
        matrix.merge_files([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "cell", [{"bytes": "abc", "path": None}, {"bytes": None, "path": "OUTSIDE"}], ids=["bytes-as-text", "path-outside"]
)
def test_dataset_images_that_crashed_or_escaped(tmp_path: Path, cell: dict[str, Any]) -> None:
    """Found while fuzzing: a string in `bytes` raised TypeError; a path outside the dataset's folder was read."""
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (tmp_path / "ds").mkdir()
    cell = {k: str(tmp_path / "secret.png") if v == "OUTSIDE" else v for k, v in cell.items()}
    pq.write_table(pa.table({"image": [cell]}), tmp_path / "ds" / "x.parquet")
    with pytest.raises(D2VError, match="x.parquet.*(stored as str|outside)"):
        _samples(tmp_path / "ds" / "x.parquet", Modality.VISION, "image-classification")()


@pytest.mark.parametrize("rate", [-16000, "x", 10**12])
def test_dataset_audio_rates_that_crashed_or_would_not_fit(tmp_path: Path, rate: Any) -> None:
    """Found while fuzzing: a negative or text rate raised ValueError; 10^12 Hz built a resampling filter no memory holds."""
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"audio": [{"array": [0.1] * 100, "sampling_rate": rate}]}), tmp_path / "a.parquet")
    with pytest.raises(D2VError, match="sampling rate"):
        _samples(tmp_path / "a.parquet", Modality.AUDIO, "audio-classification")()


def test_a_csv_field_over_the_csv_limit_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,label\na.png," + "x" * 200000 + "\n")
    with pytest.raises(D2VError, match="metadata.csv' is not a readable CSV"):
        _samples(tmp_path, Modality.VISION, "image-classification")()


def test_an_hours_long_clip_is_read_only_as_far_as_the_longest_input(tmp_path: Path) -> None:
    """A WAV header at 1 Hz with 200,000 frames: 16,000x upsampling of the whole file would be 3.2e9 samples."""
    import soundfile as sf

    sf.write(tmp_path / "slow.wav", np.random.default_rng(0).uniform(-1, 1, 200_000), 1, subtype="PCM_16")
    samples = _samples(tmp_path, Modality.AUDIO, "audio-classification")()
    assert samples.feeds[0]["input_values"].shape == (1, AUDIO.dim("samples").max)


def test_run_quotes_a_text_on_one_line() -> None:
    """Found by the long run: a question-answering text with a newline and no '|||' split the error over two lines."""
    _folder, manifest, parts = _bundle_parts(Modality.TEXT)
    with pytest.raises(D2VError, match="~0"):  # found by the long run: Path("~0").expanduser() raised RuntimeError
        _run_inputs(manifest, parts, ["~0"])
    for text in ("first line\nsecond line", " \n "):
        with pytest.raises(D2VError) as err:
            _run_inputs(manifest, parts, [text])
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["not-utf8-cell", "not-utf8-column", "long-path"])
def test_parquet_that_the_long_run_broke(tmp_path: Path, how: str) -> None:
    """Found by the long run: a string cell or column name that is not UTF-8 (UnicodeDecodeError), a stored path of
    5,000 characters (OSError ENAMETOOLONG)."""
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    if how == "long-path":
        pq.write_table(pa.table({"image": [{"bytes": None, "path": "1" * 5000}]}), path)
    else:
        column, text = ("text", "QQQQQQQQ") if how == "not-utf8-cell" else ("QQQQQQQQ", "a short text")
        pq.write_table(pa.table({column: [text]}), path, compression="none", write_statistics=False)
        path.write_bytes(path.read_bytes().replace(b"QQQQQQQQ", b"Q\xff\xfeQQQQQ"))
    modality, task = (Modality.VISION, "image-classification") if how == "long-path" else (Modality.TEXT, None)
    check("regression", _samples(path, modality, task), names=(str(path),), inside=(tmp_path,))
