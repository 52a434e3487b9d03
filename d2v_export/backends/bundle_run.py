"""Run an ONNX Runtime or OpenVINO bundle without torch, transformers or d2v-export: ``bundle_run.py``.

Self-contained on purpose: standard library + numpy at import; the runtime (``onnxruntime`` or
``openvino``) and what the modality's preprocessing needs (Pillow for images; soundfile, plus scipy only
when a file's rate is not the bundle's, for audio; ``tokenizers`` for text) are imported when needed.
d2v-export copies this file into every ONNX Runtime and OpenVINO bundle as ``bundle_run.py``:

    python3 bundle_run.py INPUT... [--top-k 5] [--threads 0]      # prints the results as JSON

It reads only the bundle's own files (manifest.json, config.json, preprocessor_config.json,
tokenizer.json / vocab.json + tokenizer_config.json, openvino_config.json) and prepares inputs the way
``d2v-export run`` does (d2v_export/deploy/predict.py): images resized / rescaled / normalized as the processor
config says; audio averaged to mono, resampled to the extractor's rate, normalized per clip, padded to
the 0.1 s bucket; text tokenized with ``tokenizers`` (truncated to the bundle's longest sequence, padded
to a multiple of 8). Results carry the same keys as ``d2v-export run --json`` for heads whose result is
"labels" (image, text and audio classification) and "transcript" (speech recognition, CTC greedy
decoding). A recording longer than the bundle's longest input is transcribed whole in windows, as ``run``
does, with d2v_export/deploy/chunking.py (shipped beside this file as ``bundle_chunking.py``: stdlib + numpy); an
audio classifier sees it cut. The bundle's checksums are not verified here (``d2v-export run`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

SCRIPT = "bundle_run.py"
TASKS = {  # task -> result kind (the subset of d2v_export.heads this runner answers)
    "image-classification": "labels",
    "text-classification": "labels",
    "audio-classification": "labels",
    "automatic-speech-recognition": "transcript",
}
STEP = 1600  # 0.1 s at 16 kHz: the audio length bucket (d2v_export.calibration.audio.STEP)
MULTIPLE = 8  # text rows are padded to a multiple of this (d2v_export.calibration.text.MULTIPLE)
PAIR_SEPARATOR = "|||"
CHUNKING_SCRIPT = "bundle_chunking.py"  # d2v_export/deploy/chunking.py, shipped beside bundle_run.py in audio bundles
MAX_SECONDS = 3600  # the longest recording read (held in memory), as d2v-export run


class BundleError(Exception):
    """A bundle or an input this runner cannot use: one line, printed as ``error: ...`` (exit code 3, d2v-export's BAD_INPUT)."""


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read '{path}' ({exc.__class__.__name__}); copy the whole bundle folder") from None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------- runtimes


def open_session(
    folder: Path, manifest: Mapping[str, Any], threads: int = 0
) -> tuple[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], str]:
    """(feed -> outputs, runtime description) for the bundle's target, loaded as d2v-export measured it."""
    target, model = str(manifest.get("target")), folder / str(manifest.get("model_file"))
    if target == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError(f"onnxruntime does not import ({exc}): pip install onnxruntime numpy") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return (lambda feed: dict(zip(names, session.run(names, feed)))), f"onnxruntime {ort.__version__}"
    if target == "openvino":
        return _openvino(folder, model, threads)
    raise BundleError(f"this runner runs ONNX Runtime and OpenVINO bundles; '{folder}' is a {target} bundle")


def _openvino(
    folder: Path, model: Path, threads: int
) -> tuple[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], str]:
    try:
        import openvino as ov
    except ImportError as exc:
        raise BundleError(f"openvino does not import ({exc}): pip install openvino numpy") from None
    settings = _json(folder / "openvino_config.json") if (folder / "openvino_config.json").is_file() else {}
    device = str(settings.get("device") or "CPU")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if device.startswith("CPU") and threads > 0:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if settings.get("inference_precision_hint"):
        config["INFERENCE_PRECISION_HINT"] = str(settings["inference_precision_hint"])
    compiled = ov.Core().compile_model(str(model), device, config)
    request = compiled.create_infer_request()
    inputs = [(p.get_any_name(), p.get_element_type().to_dtype()) for p in compiled.inputs]
    wanted = [str(n) for n in settings.get("outputs") or ()]
    ports = [
        (next((n for n in wanted if n in p.get_names()), p.get_any_name()), i) for i, p in enumerate(compiled.outputs)
    ]

    def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = request.infer({n: np.ascontiguousarray(feed[n], dtype=t) for n, t in inputs})
        return {name: np.array(result[i], copy=True) for name, i in ports}

    return infer, f"openvino {ov.__version__}"


# --------------------------------------------------------------------------------------- inputs


def _dims(manifest: Mapping[str, Any], name: str) -> tuple[int, int] | None:
    for spec in manifest.get("inputs") or ():
        r = (spec.get("dynamic") or {}).get(name)
        if r:
            return int(r["min"]), int(r["max"])
    return None


def _resize_size(size: Mapping[str, Any], width: int, height: int) -> tuple[int, int]:
    """(width, height) an image is resized to by the processor's ``size``."""
    if "height" in size and "width" in size:
        return int(size["width"]), int(size["height"])
    short = int(size["shortest_edge"])
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def prepare_image(path: Path, pre: Mapping[str, Any], image_size: int | None) -> dict[str, np.ndarray]:
    """An image file -> {"pixel_values": (1, 3, H, W) float32}: EXIF-upright RGB, resized, cropped, rescaled, normalized."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            img = (ImageOps.exif_transpose(im) or im).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a corrupt file can raise almost anything from a decoder plugin
        raise BundleError(
            f"input '{path}': not a readable image ({exc.__class__.__name__}); pass an image file"
        ) from None
    size, crop = dict(pre.get("size") or {}), bool(pre.get("do_center_crop"))
    crop_size = pre.get("crop_size") or {}
    final = (int(crop_size.get("height", 0)), int(crop_size.get("width", 0))) if crop else None
    if image_size and (final or _resize_size(size, *img.size)[::-1]) != (image_size, image_size):
        # what d2v-export's calibration.images.ImagePixels does
        size, crop = {"height": image_size, "width": image_size}, False
    if pre.get("do_resize", True):
        img = img.resize(_resize_size(size, *img.size), resample=int(pre.get("resample", 2)))
    x: np.ndarray = np.asarray(img, dtype=np.float32)
    if crop:
        h, w = int(crop_size["height"]), int(crop_size["width"])
        top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
        x = x[top : top + h, left : left + w]
    if pre.get("do_rescale", True):
        x = x * np.float32(pre.get("rescale_factor", 1 / 255))
    if pre.get("do_normalize", True):
        x = (x - np.asarray(pre.get("image_mean"), np.float32)) / np.asarray(pre.get("image_std"), np.float32)
    return {"pixel_values": np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)}


def read_mono(path: Path, rate: int) -> np.ndarray:
    """An audio file -> float32 mono samples at ``rate`` (channels averaged; scipy's polyphase resampler if needed)."""
    try:
        import soundfile as sf
    except ImportError as exc:
        raise BundleError(f"soundfile does not import ({exc}): pip install soundfile") from None
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile reports corrupt files in several exception types
        raise BundleError(
            f"input '{path}': not a readable audio file ({exc.__class__.__name__}); pass wav, flac, ogg, ..."
        ) from None
    if data.shape[0] == 0:
        raise BundleError(f"input '{path}': the audio file holds no samples")
    wave = data.mean(axis=1, dtype=np.float64)
    if int(file_rate) != rate:
        try:
            from scipy.signal import resample_poly  # only for files not at the bundle's rate
        except ImportError:
            raise BundleError(
                f"input '{path}' is at {int(file_rate)} Hz, the bundle takes {rate} Hz: pip install scipy to resample it"
            ) from None

        g = math.gcd(rate, int(file_rate))
        wave = resample_poly(wave, rate // g, int(file_rate) // g)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _chunking(folder: Path) -> Any | None:
    """d2v_export.deploy.chunking: the package's, or the copy beside this file in a bundle (``bundle_chunking.py``); None without one."""
    if __package__:
        from ..deploy import chunking

        return chunking
    path = folder / CHUNKING_SCRIPT
    if not path.is_file():
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundle_chunking", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bundle_chunking"] = module  # dataclasses look their module up
    keep, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the bundle: `run` would refuse it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = keep
    return module


class AudioPrep:
    """An audio file -> ({"input_values": (1, n), "attention_mask": (1, n)}, fraction of n that is signal, notes, windows), as the feature extractor
    does; a recording longer than the longest input goes whole (up to MAX_SECONDS) in windows where the head is per frame."""

    def __init__(self, folder: Path, pre: Mapping[str, Any], samples: tuple[int, int] | None, chunked: bool) -> None:
        self.pre, self.rate = pre, int(pre.get("sampling_rate") or 16000)
        self.lo: int = samples[0] if samples else 1
        self.hi: int | None = samples[1] if samples else None
        self.pad = float(pre.get("padding_value") or 0.0)
        self.chunking = _chunking(folder) if chunked and self.hi is not None else None
        self.sizes: tuple[int, int] | None = None
        if self.chunking is not None:
            self.encoder = self.chunking.encoder_of(folder)
            try:
                self.sizes = self.chunking.sizes(self.hi, self.encoder)
            except ValueError:
                self.sizes = None  # a longest input too short to chunk: cut instead

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        return (x - x.mean()) / np.sqrt(x.var() + 1e-7) if self.pre.get("do_normalize", True) else x

    def __call__(self, path: Path) -> tuple[dict[str, np.ndarray], float, list[str], list[Any]]:
        rate, hi = self.rate, self.hi
        wave = read_mono(path, rate)
        whole = self.sizes is not None and hi is not None and len(wave) > hi
        keep = min(len(wave), MAX_SECONDS * rate) if whole else (len(wave) if hi is None else min(len(wave), hi))
        notes = (
            [f"cut to {keep / rate:g} s: " + ("run reads at most this much" if whole else "the bundle's longest input")]
            if keep < len(wave)
            else []
        )
        x = self._normalize(wave[:keep].astype(np.float32)).astype(np.float32)
        if whole:
            assert self.sizes is not None and self.chunking is not None
            window, stride = self.sizes
            plan = self.chunking.windows(keep, window, stride, self.encoder)
            notes.append(
                f"{keep / rate:g} s in {len(plan)} windows of {window / rate:g} s, {stride / rate:g} s of context dropped on each inner side"
            )
            return {"input_values": x[None]}, 1.0, notes, plan  # each window gets its mask (``window``)
        target = max(-(-keep // STEP) * STEP, self.lo)
        target = target if hi is None else min(target, hi)
        x = np.pad(x, (0, max(0, target - keep)), constant_values=self.pad)
        return audio_feed(x[None].astype(np.float32), keep), min(1.0, keep / max(1, target)), notes, []

    def window(self, values: np.ndarray, w: Any) -> dict[str, np.ndarray]:
        """One window of the recording, padded at its end up to the profile's shortest input, with its mask."""
        part = values[:, w.start : w.stop]
        real = part.shape[1]
        short = self.lo - real
        return audio_feed(np.pad(part, ((0, 0), (0, short)), constant_values=self.pad) if short > 0 else part, real)


def audio_feed(values: np.ndarray, real: int) -> dict[str, np.ndarray]:
    """{"input_values", "attention_mask"}: the mask is 1 on the first ``real`` samples, 0 on the padding after them
    (the audio graph reduces it to frames; the runner drops it for a graph that takes none)."""
    mask = np.zeros(values.shape, dtype=np.int64)
    mask[:, :real] = 1
    return {"input_values": values, "attention_mask": mask}


class TextPrep:
    """Text (``A ||| B`` for a pair) -> {"input_ids", "attention_mask"} with tokenizer.json and the bundle's limits."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BundleError(f"tokenizers does not import ({exc}): pip install tokenizers") from None
        info = (manifest.get("preprocessing") or {}).get("tokenizer") or {}
        if not (folder / "tokenizer.json").is_file():
            raise BundleError(f"bundle '{folder}' has no tokenizer.json; run it with d2v-export run")
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.lo, self.hi = _dims(manifest, "sequence") or (1, int(min(info.get("model_max_length") or 512, 512)))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=self.hi)
        pad = (info.get("special_tokens") or {}).get("pad_token")
        self.pad_id = self.tok.token_to_id(pad) if pad else None
        if self.pad_id is None:
            raise BundleError(f"bundle '{folder}': the tokenizer has no padding token")
        self.left = info.get("padding_side") == "left"

    def __call__(self, text: str) -> tuple[dict[str, np.ndarray], list[str]]:
        parts = [p.strip() for p in text.split(PAIR_SEPARATOR)] if PAIR_SEPARATOR in text else [text]
        if len(parts) > 2 or not all(parts):
            raise BundleError(f"'{text[:60]}': pass a non-empty text, or a pair as 'A {PAIR_SEPARATOR} B'")
        pair = parts[1] if len(parts) > 1 else None
        self.tok.no_truncation()
        full = len(self.tok.encode(parts[0], pair).ids)
        self.tok.enable_truncation(max_length=self.hi)
        notes = [f"truncated to {self.hi} tokens: the bundle's longest sequence"] if full > self.hi else []
        row = self.tok.encode(parts[0], pair).ids
        target = min(max(-(-len(row) // MULTIPLE) * MULTIPLE, self.lo), self.hi)
        row = row[:target]
        ids, mask = np.full((1, target), self.pad_id, np.int64), np.zeros((1, target), np.int64)
        where = slice(target - len(row), target) if self.left else slice(0, len(row))
        ids[0, where], mask[0, where] = row, 1
        return {"input_ids": ids, "attention_mask": mask}, notes


# --------------------------------------------------------------------------------------- outputs


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_labels(logits: np.ndarray, k: int, labels: Mapping[str, str] | None) -> list[dict[str, Any]]:
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    return [
        {"label": (labels or {}).get(str(int(i)), f"LABEL_{int(i)}"), "id": int(i), "score": round(float(probs[i]), 6)}
        for i in order
    ]


def ctc_vocabulary(folder: Path) -> tuple[dict[int, str], int, str]:
    """(id -> character, blank id, word delimiter) from vocab.json and tokenizer_config.json."""
    vocab = _json(folder / "vocab.json")
    if vocab and all(isinstance(v, dict) for v in vocab.values()):  # {language: vocab}: the first language
        vocab = next(iter(vocab.values()))
    conf = _json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    id2char = {int(i): str(t) for t, i in vocab.items()}

    def token(name: str, default: str | None) -> str | None:
        value = conf.get(name, default)
        return str(value["content"] if isinstance(value, dict) else value) if value is not None else None

    pad = token("pad_token", "<pad>")
    blank = int(vocab.get(pad, 0)) if pad else 0
    for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
        special = token(name, default)
        if special in vocab and vocab[special] != blank:
            id2char[int(vocab[special])] = ""  # special tokens are not characters
    return id2char, blank, token("word_delimiter_token", "|") or "|"


def ctc_greedy_decode(logits: np.ndarray, id2char: Mapping[int, str], blank: int = 0, delimiter: str = "|") -> str:
    """Best path of (frames, vocab) logits: argmax, collapse repeats, drop blanks, delimiter -> space."""
    ids = np.asarray(logits).argmax(-1).reshape(-1)
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    text = "".join(id2char.get(int(i), "") for i in ids[keep] if i != blank)
    return " ".join(text.replace(delimiter, " ").split())


# --------------------------------------------------------------------------------------- API


class BundleRunner:
    """One loaded bundle: ``runner(raw)`` -> the result ``d2v-export run --json`` gives for that input."""

    def __init__(self, folder: Path, *, threads: int = 0, top_k: int = 5) -> None:
        self.folder = Path(folder)
        self.manifest = _json(self.folder / "manifest.json")
        model, pre = self.manifest.get("model") or {}, self.manifest.get("preprocessing") or {}
        self.task, self.modality = str(model.get("task")), str(model.get("modality"))
        if self.task not in TASKS:
            raise BundleError(
                f"{SCRIPT} answers {', '.join(TASKS)}; this bundle is {self.task}: run it with d2v-export run"
            )
        self.pre = _json(self.folder / "preprocessor_config.json") if self.modality != "text" else {}
        self.pre = {**self.pre, **{k: v for k, v in pre.items() if k not in ("tokenizer", "modality")}}
        self.text = TextPrep(self.folder, self.manifest) if self.modality == "text" else None
        self.ctc = ctc_vocabulary(self.folder) if TASKS[self.task] == "transcript" else None
        self.audio = (
            AudioPrep(self.folder, self.pre, _dims(self.manifest, "samples"), self.ctc is not None)
            if self.modality == "audio"
            else None
        )
        self.k, self.labels = top_k, self.manifest.get("labels")
        self.infer, version = open_session(self.folder, self.manifest, threads)
        batch = _dims(self.manifest, "batch")
        self.batch = batch[0] if batch else 1
        self.runtime = f"{version} ({self.manifest.get('precision')}, {self.manifest.get('model_file')})"
        self.names = [str(o["name"]) for o in self.manifest.get("outputs") or ()]
        self.inputs = {
            str(i.get("name")) for i in self.manifest.get("inputs") or ()
        }  # an older audio graph takes no mask

    def _feed(self, raw: str) -> tuple[dict[str, np.ndarray], float, list[str], list[Any]]:
        if self.text is not None:
            feed, notes = self.text(raw)
            return feed, 1.0, notes, []
        path = Path(raw).expanduser()
        if not path.is_file():
            raise BundleError(
                f"input '{raw}' is not a file; pass {'image' if self.modality == 'vision' else 'audio'} files"
            )
        if self.audio is None:
            return prepare_image(path, self.pre, (self.manifest.get("static") or {}).get("image_size")), 1.0, [], []
        return self.audio(path)

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        if self.inputs:
            feed = {k: v for k, v in feed.items() if k in self.inputs}
        if self.batch > 1:  # a profile whose smallest batch is above 1: repeat the input, read the first row
            feed = {k: np.repeat(v, self.batch, axis=0) for k, v in feed.items()}
        out = self.infer(feed)
        return np.asarray(out[self.names[0]] if self.names and self.names[0] in out else next(iter(out.values())))

    def __call__(self, raw: str) -> dict[str, Any]:
        feed, valid, notes, plan = self._feed(raw)
        if plan:  # a long recording: each window's kept frames, stitched, decoded once
            assert self.audio is not None and self.audio.chunking is not None
            values = feed["input_values"]
            parts = [self._run(self.audio.window(values, w))[0, w.keep_from : w.keep_to] for w in plan]
            first = self.audio.chunking.stitch(parts)[None]
        else:
            first = self._run(feed)
        result: dict[str, Any] = {"input": raw, "task": self.task, "runtime": self.runtime}
        if self.ctc is not None:
            frames = max(1, math.ceil(first.shape[1] * valid))
            id2char, blank, delimiter = self.ctc
            result |= {"transcript": ctc_greedy_decode(first[0, :frames], id2char, blank, delimiter), "frames": frames}
        else:
            result["labels"] = top_labels(first[0], self.k, self.labels)
        if (self.manifest.get("model") or {}).get("random_weights"):
            notes.append("RANDOM WEIGHTS: this bundle's outputs mean nothing")
        result["notes"] = notes
        return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=SCRIPT, description="Run this d2v-export bundle with its runtime only (no torch)."
    )
    parser.add_argument("inputs", nargs="+", help="image or audio files, or texts ('A ||| B' for a pair)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the runtime's default)")
    parser.add_argument(
        "--bundle", default=str(Path(__file__).resolve().parent), help="the bundle folder (default: this file's)"
    )
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1:
            raise BundleError(f"--top-k {args.top_k}: give 1 or more")
        runner = BundleRunner(Path(args.bundle), threads=args.threads, top_k=args.top_k)
        results = [runner(raw) for raw in args.inputs]
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
