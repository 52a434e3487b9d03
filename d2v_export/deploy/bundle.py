"""Self-contained variant folders ("bundles"): manifest.json, checksums, verification, a README.

    write_manifest(folder, artifact=..., model=..., graph=..., variant_verdict=..., environment=...)
    manifest = verify(folder)       # raises D2VError (BAD_INPUT) on anything it does not trust

A bundle is one variant folder of a run (`<output>/<target>-<precision>[-<mode>]`): the model files a
runtime loads, `config.json` and the processor / tokenizer files, `README.md` and `manifest.json`.
The manifest lists every other file with its size and sha256 and says how inputs are prepared, what
the outputs mean and how the variant fared in the report. See docs/bundles.md for the schema.

`verify` trusts nothing in the folder: it refuses manifest paths that are absolute or leave the
folder, symbolic links that point outside it, files that are missing, changed or not listed, and any
file that holds a Python pickle (found by content, not by name: OpenVINO's `openvino_model.bin` is
raw weights and passes; a torch checkpoint named `.bin` does not).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickletools
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .. import backends
from ..spec import jsonable
from ..spec import D2VError, Modality

SCHEMA_VERSION = "1.1"  # 1.1: device and deploy_device (what it was measured on, what it was built for)
MANIFEST = "manifest.json"
README = "README.md"
PAIR_SEPARATOR = "|||"  # "question ||| context", "text ||| text pair", "prompt ||| choice ||| choice"

# Files a Hugging Face tokenizer may write with save_pretrained.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spm.model",
    "tokenizer.model",
)
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A verified manifest.json. ``data`` is the whole document; the fields are its most used parts."""

    folder: Path
    schema_version: str
    modality: Modality
    task: str
    class_name: str
    target: str
    precision: str
    model_file: str  # relative path of the file the runtime loads
    files: tuple[FileEntry, ...]
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]
    preprocessing: Mapping[str, Any]
    labels: Mapping[int, str] | None
    quantization: Mapping[str, Any] | None
    verdict: Mapping[str, Any] | None
    data: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def dims(self) -> dict[str, tuple[int, int, int]]:
        """{axis: (min, opt, max)} of every dynamic input axis."""
        out: dict[str, tuple[int, int, int]] = {}
        for spec in self.inputs:
            for axis, r in (spec.get("dynamic") or {}).items():
                out[axis] = (int(r["min"]), int(r["opt"]), int(r["max"]))
        return out

    def static(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.data.get("static") or {}).items()}


# --------------------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every regular file under folder (sorted by relative POSIX path), manifest.json left out.

    Symbolic links are refused: a bundle is copied to devices, and a link would not travel with it.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                raise D2VError(
                    f"'{path.relative_to(folder).as_posix()}' in bundle '{folder}' is a symbolic link"
                    f"{' pointing outside the bundle' if not _inside(folder, path) else ''}; bundles hold plain files only"
                )
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _tensor_doc(spec: Any, dims: Mapping[str, Any], static: Mapping[str, int]) -> dict[str, Any]:
    shape = list(spec.shape)
    dynamic = {
        a: {"min": dims[a].min, "opt": dims[a].opt, "max": dims[a].max}
        for a in shape
        if isinstance(a, str) and a in dims
    }
    fixed = {a: static["image_size"] for a in shape if a in ("height", "width") and "image_size" in static}
    return {"name": spec.name, "dtype": spec.dtype, "shape": shape, "dynamic": dynamic, "fixed": fixed}


def _processor_dict(proc: Any) -> dict[str, Any]:
    try:
        data = proc.to_dict()
    except Exception:  # noqa: BLE001 - a processor without to_dict: fall back to its public attributes
        data = {k: v for k, v in vars(proc).items() if not k.startswith("_")}
    return json.loads(json.dumps(data, default=str))


def preprocessing(model: Any, graph: Any, folder: Path) -> dict[str, Any]:
    """How raw inputs become the model's inputs, as recorded in the manifest."""
    modality = model.head.modality
    static = dict(graph.profile.static)
    out: dict[str, Any] = {"modality": modality.value}
    if modality is Modality.VISION and model.processor is not None:
        p = _processor_dict(model.processor)
        keys: tuple[str, ...] = (
            "do_resize",
            "size",
            "resample",
            "do_center_crop",
            "crop_size",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
            "do_reduce_labels",
        )
        out |= {
            "processor": type(model.processor).__name__,
            "config_file": "preprocessor_config.json",
            "image_size": static.get("image_size"),
            "decode": "Pillow; EXIF orientation applied; converted to RGB",
            "layout": "NCHW float32",
        } | {k: p[k] for k in keys if k in p}
    elif modality is Modality.AUDIO and model.processor is not None:
        p = _processor_dict(model.processor)
        keys = ("sampling_rate", "do_normalize", "padding_value", "feature_size", "return_attention_mask")
        out |= {
            "processor": type(model.processor).__name__,
            "config_file": "preprocessor_config.json",
            "decode": "soundfile; channels averaged to mono; resampled with scipy.signal.resample_poly",
            "layout": "(batch, samples) float32",
        } | {k: p[k] for k in keys if k in p}
    tok = model.tokenizer
    if tok is not None:
        seq = next((d for d in graph.profile.dims if d.name == "sequence"), None)
        out["tokenizer"] = {
            "class": type(tok).__name__,
            "files": sorted(name for name in TOKENIZER_FILES if (folder / name).is_file()),
            "max_length": seq.max if seq is not None else None,
            "model_max_length": int(getattr(tok, "model_max_length", 0) or 0) or None,
            "padding_side": getattr(tok, "padding_side", "right"),
            "special_tokens": {k: str(v) for k, v in (getattr(tok, "special_tokens_map", {}) or {}).items()},
        }
        if modality is Modality.TEXT:
            out["pair_separator"] = PAIR_SEPARATOR
    return out


def _labels(config: Any) -> dict[str, str] | None:
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    return {str(int(k)): str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}


def _devices(
    variant_verdict: Mapping[str, Any] | None, environment: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({device: what the variant was measured on, deploy_device: what it was built for}, from its report entry, null
    without one; the environment with the variant's device in place of the PyTorch reference's)."""
    devices = {k: (variant_verdict or {}).get(k) for k in ("device", "deploy_device")}
    env = {k: v for k, v in environment.items() if k != "device"} | (
        {"device": devices["device"]} if devices["device"] else {}
    )
    return devices, env


def _runtime(target: str) -> dict[str, Any]:
    """The target's runtime and its version here (None where it is not installed)."""
    from .. import backends

    try:
        version = backends.get(target).available().version or None
    except D2VError:
        version = None
    return {"name": target, "version": version}


def _verdict(variant_verdict: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's copy of the variant's verdict in report.json (None without a report)."""
    if variant_verdict is None:
        return None
    v = dict(variant_verdict)
    drift = v.get("drift") or {}
    latency = v.get("latency_ms")
    verdict = {
        "passed": drift.get("passed"),
        "drift": drift,
        "latency_ms": {k: latency.get(k) for k in ("p50", "p90", "p99", "batch", "shape")} if latency else None,
        "speedup_vs_reference": v.get("speedup_vs_reference"),
        "notes": list(v.get("notes") or ()),
    }
    return verdict | {k: v[k] for k in ("budget", "latency_budget") if k in v}


def _output_doc(t: Any) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": [a if isinstance(a, int) else str(a) for a in t.shape]}


def write_manifest(
    folder: Path,
    *,
    artifact: Any,
    model: Any,
    graph: Any,
    variant_verdict: Mapping[str, Any] | None,
    environment: Mapping[str, Any],
) -> Path:
    """Write README.md and manifest.json into a finished variant folder; returns the manifest's path.

    Call it last, once every file of the variant is in place (the manifest lists and hashes them),
    inside the staging folder, before it is renamed into place.

    ``artifact`` is the backend's Artifact, ``model`` the LoadedModel, ``graph`` the ExportedGraph,
    ``variant_verdict`` this variant's entry of report.json (``report.to_dict(...)["variants"][i]``,
    or None when there is no report), ``environment`` ``report.environment(threads)``; devices: ``_devices``.
    """
    from .. import __version__

    folder = Path(folder)
    head = model.head
    dims = {d.name: d for d in graph.profile.dims}
    static = dict(graph.profile.static)
    model_file = Path(artifact.model_file)
    inside = model_file.is_absolute() and _inside(folder, model_file)
    rel_model = model_file.relative_to(folder).as_posix() if inside else model_file.name
    devices, env = _devices(variant_verdict, environment)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": folder.name,
        "tool": {"name": "d2v-export", "version": __version__},
        "model": {
            "modality": head.modality.value,
            "task": head.task,
            "class": head.class_name,
            "description": model.description,
            "random_weights": bool(model.random_weights),
            "parameters": int(model.parameters),
        },
        "target": artifact.target,
        "precision": artifact.precision.value,
        "model_file": rel_model,
        "runtime": _runtime(artifact.target),
        **devices,
        "quantization": jsonable(artifact.quantization),
        "notes": list(artifact.notes),
        "inputs": [_tensor_doc(t, dims, static) for t in graph.inputs],
        "outputs": [_output_doc(t) for t in graph.outputs],
        "static": static,
        "export": {"exporter": graph.exporter, "opset": graph.opset},
        "preprocessing": preprocessing(model, graph, folder),
        "labels": _labels(model.config),
        "environment": jsonable(env),
        "verdict": _verdict(variant_verdict),
    }
    _write_readme_and_runner(folder, doc)
    doc["files"] = [
        {"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(folder)
    ]
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_readme_and_runner(folder: Path, doc: Mapping[str, Any]) -> None:
    """README.md, and for the targets whose backend runs without torch (``Backend.standalone_runner``: ONNX Runtime,
    OpenVINO) ``bundle_run.py`` (d2v_export/backends/bundle_run.py)."""
    if _runs_without_torch(doc["target"]):
        from . import chunking
        from ..backends import bundle_run

        shutil.copyfile(Path(bundle_run.__file__), folder / bundle_run.SCRIPT)
        if doc["model"]["modality"] == "audio":  # long recordings in windows, as `run` does
            shutil.copyfile(Path(chunking.__file__), folder / bundle_run.CHUNKING_SCRIPT)
    (folder / README).write_text(readme(doc, folder=folder), encoding="utf-8")


def readme(doc: Mapping[str, Any], *, folder: Path | None = None) -> str:
    """The bundle's README.md: what it is and how to run it with and without d2v-export.

    The code that runs the artifact is its backend's (``readme_snippet``), from the files in ``folder``
    (e.g. the settings the variant was measured with) when given."""
    snippet = backends.get(doc["target"]).readme_snippet(doc["name"], doc["model_file"], folder)
    m = doc["model"]
    name, target = doc["name"], doc["target"]
    modality, task = m["modality"], m["task"]
    example = {"vision": "cat.jpg", "audio": "speech.wav", "text": '"A sentence to classify."'}[modality]
    if task == "question-answering":
        example = f'"Who wrote it? {PAIR_SEPARATOR} It was written by Ada."'
    elif task == "fill-mask":
        example = '"Paris is the <mask> of France."'
    elif task == "multiple-choice":
        example = f'"The sky is {PAIR_SEPARATOR} blue {PAIR_SEPARATOR} green"'
    lines = [
        f"# {name}: data2vec-{modality} {task} for {target} ({doc['precision']})",
        "",
        f"Model `{m['class']}` ({m['description']}), exported by d2v-export {doc['tool']['version']}.",
    ]
    if m["random_weights"]:
        lines += [
            "",
            "**RANDOM WEIGHTS**: a preset with the real architecture and untrained weights; its outputs mean nothing.",
        ]
    lines += [
        "",
        "`manifest.json` lists every file with its size and sha256, the inputs and outputs, the preprocessing, "
        "the labels and the verdict of the report this bundle came from.",
        "",
        "## Run it with d2v-export",
        "",
        "```sh",
        f"d2v-export run {name}/ {example}",
        f"d2v-export run {name}/ {example} --json",
        "```",
        "",
        "`run` checks every checksum first and refuses a changed bundle. Text pairs are written "
        f"`A {PAIR_SEPARATOR} B` (question {PAIR_SEPARATOR} context for question answering).",
        "",
        "## Run it with the runtime alone",
        "",
        "Accepted input sizes:",
        "",
    ]
    for t in doc["inputs"]:
        ranges = ", ".join(f"{axis} {r['min']}..{r['max']} (best at {r['opt']})" for axis, r in t["dynamic"].items())
        fixed = ", ".join(f"{axis} {n}" for axis, n in t["fixed"].items())
        lines.append(
            f"- `{t['name']}` {t['dtype']} {tuple(t['shape'])}"
            + (f": {ranges}" if ranges else "")
            + (f"; {fixed}" if fixed else "")
        )
    lines += ["", "```python", "import numpy as np"]
    lines += _feed_lines(name, modality, task, doc["preprocessing"])
    lines.append("")
    lines += snippet.code
    outs = ", ".join(f"`{o['name']}` {tuple(o['shape'])}" for o in doc["outputs"])
    lines += ["```", "", f"Outputs: {outs}."]
    if doc.get("labels"):
        lines.append("Class ids map to names through `labels` in manifest.json (also `id2label` in config.json).")
    lines += snippet.after
    lines += _long_recording_lines(doc, snippet.code[-1])
    lines += _torchfree_lines(doc)
    lines += _padding_lines(doc)
    return "\n".join(lines) + "\n"


def _runs_without_torch(target: str) -> bool:
    return target in backends.names() and bool(getattr(backends.get(target), "standalone_runner", False))


def _torchfree_lines(doc: Mapping[str, Any]) -> list[str]:
    """README lines on ``bundle_run.py``: running the bundle with its runtime and preprocessing libraries only."""
    from ..backends.bundle_run import CHUNKING_SCRIPT, SCRIPT, TASKS

    target, m = doc["target"], doc["model"]
    if not _runs_without_torch(target):
        return []
    needs = {
        "vision": "pillow",
        "audio": "soundfile (and scipy for files not at the bundle's sampling rate)",
        "text": "tokenizers",
    }
    lines = ["", "## Run it without torch", ""]
    if m["task"] not in TASKS:
        return lines + [
            f"`{SCRIPT}` answers {', '.join(TASKS)}; for {m['task']} use the runtime code above or `d2v-export run`."
        ]
    example = {"vision": "cat.jpg", "audio": "speech.wav", "text": '"A sentence to classify."'}[m["modality"]]
    return lines + [
        f"`{SCRIPT}` runs this bundle with no torch, transformers or d2v-export: Python 3.10+, numpy, {target}, "
        f"and for {m['modality']} inputs {needs[m['modality']]}:",
        "",
        "```sh",
        f"pip install numpy {target} {needs[m['modality']].split(' ')[0]}",
        f"python3 {doc['name']}/{SCRIPT} {example} --top-k 5",
        "```",
        "",
        "It prepares inputs as `d2v-export run` does and prints the same JSON (labels and scores, or the transcript). "
        "It does not check the checksums (`d2v-export run` does). A recording longer than the bundle's longest input is "
        f"transcribed whole in windows as `run` does (with `{CHUNKING_SCRIPT}`, shipped beside it) or, for a head that pools the clip, cut.",
    ]


def _padding_lines(doc: Mapping[str, Any]) -> list[str]:
    """README lines on batching inputs of different lengths: which inputs take a mask and what padding means."""
    lines = ["", "## Batches and padding", ""]
    if doc["model"]["modality"] == "vision":
        return lines + ["Images are resized to one size by the processor: a batch needs no padding and no mask."]
    dynamic = "dynamic" in doc["name"]
    if doc["model"]["modality"] == "audio":
        return lines + _audio_padding_lines(doc, dynamic)
    return lines + [
        "`input_ids` and `attention_mask` take a batch of texts of different lengths: pad each row on the right to "
        "the longest with the tokenizer's pad id and put 0 in `attention_mask` there (what the tokenizer does with "
        "`padding=True`). Each row answers as it would alone, on its own positions; outputs per token are "
        "meaningful only where the mask is 1. d2v-export checks this in every export check.",
        "This variant computes its INT8 scales over the whole batch (dynamic INT8): a row's answer moves a little "
        'with the other rows (see docs/bundles.md, "Padding and masks").'
        if dynamic
        else "Each row's answer equals its answer alone within the export check's tolerance.",
    ]


def _audio_padding_lines(doc: Mapping[str, Any], dynamic: bool) -> list[str]:
    """Audio: the sample mask the graph takes and the frame-level mask it reduces it to (or, for a graph exported before
    audio graphs took a mask, that there is none)."""
    if not any(t.get("name") == "attention_mask" for t in doc.get("inputs") or ()):
        return [
            "The graph takes `input_values` only: **no attention mask**. Batch clips of the same length; a clip padded "
            "with zeros to a longer one gives a different answer. Run clips of different lengths one at a time."
        ]
    return [
        "`input_values` and `attention_mask` take a batch of clips of different lengths: pad each clip on the right to "
        "the longest with `padding_value` 0.0 and put 0 in `attention_mask` there (what the feature extractor does with "
        "`padding=True, return_attention_mask=True`). The model reduces the sample mask to a **frame-level mask**: a clip "
        "of n samples has the frames whose receptive field lies within its n samples "
        "(`_get_feat_extract_output_lengths(n)`, (n - 400) // 320 + 1 with the usual feature encoder), 20 ms each. "
        "Outputs per frame (CTC logits, frame classes, hidden states) are meaningful on those frames only; pooled "
        "outputs (sequence classification, x-vectors) pool those frames only. A single clip takes a mask of ones.",
        "The graph re-zeroes the padded frames before each layer of the positional convolution stack, so a padded row "
        "equals its run alone; transformers' own batched forward does not (its positional convolutions carry the "
        'padding into the last real frames; see docs/bundles.md, "Padding and masks"). d2v-export checks this in '
        "every export check.",
        "This variant computes its INT8 scales over the whole batch (dynamic INT8): a row's answer moves a little "
        'with the other rows (see docs/bundles.md, "Padding and masks").'
        if dynamic
        else "Each row's answer equals its answer alone within the export check's tolerance.",
    ]


def _long_recording_lines(doc: Mapping[str, Any], run_line: str) -> list[str]:
    """Speech recognition / frame classification: README lines that run a recording of any length in windows
    (``d2v_export.deploy.chunking``, which ``d2v-export run`` uses). ``run_line`` is the snippet's last line: feed -> outputs."""
    from . import chunking

    if doc["model"]["modality"] != "audio" or doc["model"]["task"] not in (
        "automatic-speech-recognition",
        "audio-frame-classification",
    ):
        return []
    samples = next((t["dynamic"]["samples"] for t in doc["inputs"] if "samples" in t.get("dynamic", {})), None)
    if samples is None:
        return []
    try:
        window, stride = chunking.sizes(int(samples["max"]))
    except ValueError:
        return []
    rate = int(doc["preprocessing"].get("sampling_rate") or 16000)
    decode = (
        [
            'vocab = {i: t for t, i in json.load(open("'
            + doc["name"]
            + '/vocab.json")).items()}  # greedy CTC, once over the whole',
            "ids = [i for j, i in enumerate(logits.argmax(-1)) if i != 0 and (j == 0 or i != logits.argmax(-1)[j - 1])]",
            'print(" ".join("".join(vocab[i] for i in ids if vocab[i] not in ("<s>", "</s>", "<unk>")).replace("|", " ").split()))',
        ]
        if doc["model"]["task"] == "automatic-speech-recognition"
        else ["print(logits.argmax(-1))  # one class per 20 ms frame"]
    )
    return [
        "",
        "## Long recordings",
        "",
        f"A recording longer than the longest input ({samples['max'] / rate:g} s) runs in overlapping windows of {window / rate:g} s: "
        f"each window's outer {stride / rate:g} s of frames are dropped (none at the recording's ends), the kept frames tile the "
        "recording once and are decoded once, as `d2v-export run` does. Continuing the code above:",
        "",
        "```python",
        "import json",
        "",
        'values = feed["input_values"]  # the whole recording, normalized once',
        f"window, stride, hop, n = {window}, {stride}, {chunking.HOP}, values.shape[1]  # samples; hop: the feature encoder's stride",
        "kept, done, start = [], 0, 0",
        "while True:",
        "    last = start + window >= n",
        "    if last and n > window:",
        "        start = -(-(n - window) // hop) * hop  # the last window ends with the recording, on a frame boundary",
        "    part = values[:, start : start + window]",
        '    feed = {"input_values": part, "attention_mask": np.ones(part.shape, dtype=np.int64)}  # a window has no padding',
        f"    {run_line}",
        "    frames = list(outputs.values())[0][0]  # (frames, classes): frame j is frame start // hop + j of the recording",
        "    keep_to = len(frames) if last else (window - stride) // hop",
        "    kept.append(frames[done - start // hop : keep_to])",
        "    done = start // hop + keep_to",
        "    if last:",
        "        break",
        "    start += window - 2 * stride",
        "logits = np.concatenate(kept)  # as many frames as the whole recording run at once",
        *decode,
        "```",
    ]


def _feed_lines(name: str, modality: str, task: str, pre: Mapping[str, Any]) -> list[str]:
    """README lines that turn a raw input into ``feed`` with the bundle's own processor."""
    lines: list[str] = []
    if modality == "vision":
        lines += [
            "from PIL import Image, ImageOps",
            "from transformers import AutoImageProcessor",
            "",
            f'processor = AutoImageProcessor.from_pretrained("{name}")',
            'image = ImageOps.exif_transpose(Image.open("cat.jpg")).convert("RGB")',
            'feed = {"pixel_values": processor(images=image, return_tensors="np")["pixel_values"].astype(np.float32)}',
        ]
    elif modality == "audio":
        rate = int(pre.get("sampling_rate") or 16000)
        lines += [
            "import soundfile as sf",
            "from scipy.signal import resample_poly",
            "from transformers import AutoFeatureExtractor",
            "",
            f'extractor = AutoFeatureExtractor.from_pretrained("{name}")',
            'wave, rate = sf.read("speech.wav", dtype="float32", always_2d=True)',
            f"wave = resample_poly(wave.mean(axis=1), {rate}, rate) if rate != {rate} else wave.mean(axis=1)  # mono, {rate} Hz",
            f'inputs = extractor(wave, sampling_rate={rate}, return_attention_mask=True, return_tensors="np")',
            'feed = {"input_values": inputs["input_values"].astype(np.float32), "attention_mask": inputs["attention_mask"].astype(np.int64)}',
        ]
    else:
        lines += [
            "from transformers import AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            'enc = tokenizer("A sentence.", return_tensors="np")'
            + ("  # for QA: tokenizer(question, context, ...)" if task == "question-answering" else ""),
            'feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}',
        ]
        if task == "multiple-choice":
            lines.append(
                "feed = {k: v[:, None] for k, v in feed.items()}  # (batch, choices, sequence): one row per choice"
            )
    return lines


# --------------------------------------------------------------------------------------- checking


def _fail(folder: Path, what: str) -> D2VError:
    return D2VError(f"bundle '{folder}' {what}")


def _safe_rel(folder: Path, raw: object) -> str:
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise _fail(folder, f"lists a bad path {raw!r} in {MANIFEST}; rebuild it with d2v-export")
    pure = PurePosixPath(raw)
    if pure.is_absolute() or raw.startswith(("/", "\\")) or "\\" in raw or (len(raw) > 1 and raw[1] == ":"):
        raise _fail(
            folder,
            f"lists an absolute or non-POSIX path '{raw}' in {MANIFEST}; refusing it (paths are relative, '/'-separated, inside the bundle)",
        )
    if any(part in ("..", "") for part in raw.split("/")) or pure.parts[0] == ".":
        raise _fail(folder, f"lists the path '{raw}' that escapes the bundle in {MANIFEST}; refusing it")
    if not _inside(folder, folder / raw):
        raise _fail(folder, f"has '{raw}' resolving outside the bundle (a symbolic link?); refusing it")
    return raw


def _npy_has_objects(head: bytes) -> bool:
    # An .npy header is a Python literal dict; object arrays ("|O") are stored as pickles.
    return b"'descr': '|O'" in head or b"'descr': 'O'" in head or b"|O" in head[:256]


def pickle_reason(path: Path) -> str | None:
    """Why a file is (or holds) a Python pickle, or None. Decided by content, not by extension."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return f"has a pickle file extension ({path.suffix})"
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if _looks_like_pickle(head):
        return "is a Python pickle (torch.save / pickle.dump format)"
    if head.startswith(b"\x93NUMPY") and _npy_has_objects(head[:512]):
        return "is a numpy array of Python objects (stored as a pickle)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    low = info.filename.lower()
                    if low.endswith((".pkl", ".pickle")):
                        return f"is a zip holding the pickle '{info.filename}' (a torch checkpoint?)"
                    if low.endswith(".npy"):
                        with zf.open(info) as member:
                            if member.read(6) == b"\x93NUMPY" and _npy_has_objects(member.read(506)):
                                return f"holds '{info.filename}', a numpy array of Python objects (a pickle)"
                    elif info.file_size and not info.is_dir():
                        with zf.open(info) as member:
                            if _looks_like_pickle(member.read(4096)):
                                return f"is a zip holding the pickle '{info.filename}'"
        except (zipfile.BadZipFile, OSError, RuntimeError):
            return None
    return None


def _looks_like_pickle(head: bytes) -> bool:
    """A pickle of protocol 2+ starts with PROTO (0x80, 2..5); check that the next opcodes parse too,
    so that raw weights which happen to begin with those two bytes are not mistaken for one."""
    if len(head) < 3 or head[0] != 0x80 or head[1] not in (2, 3, 4, 5):
        return False
    ops = 0
    try:
        for op, _arg, _pos in pickletools.genops(io.BytesIO(head)):
            ops += 1
            if op.name == "STOP" or ops >= 4:
                return True
    except Exception:  # noqa: BLE001 - genops raises ValueError or others on bytes that are not a pickle
        return ops >= 4
    return ops >= 2


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise D2VError(
            f"bundle '{folder}' is not a folder; pass a variant folder such as out/vision/{backends.DEFAULT}-fp32"
        )
    if path.is_symlink() or not path.is_file():
        raise _fail(
            folder, f"has no {MANIFEST}; pass a variant folder written by d2v-export (not the run's top folder)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise _fail(folder, f"has an unreadable {MANIFEST} ({exc.__class__.__name__}); rebuild it") from None
    if not isinstance(doc, dict):
        raise _fail(folder, f"has a {MANIFEST} that is not a JSON object; rebuild it")
    version = str(doc.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise _fail(
            folder,
            f"has manifest schema {version or 'none'}, this d2v-export reads {SCHEMA_VERSION}; rebuild or upgrade",
        )
    return doc


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field_problem(doc: Mapping[str, Any]) -> str | None:
    """What in the manifest's reading fields has the wrong shape (found by fuzzing: each once crashed `run`), or None."""
    for key in ("model", "preprocessing", "static", "labels", "quantization", "verdict"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            return f"'{key}' is not an object"
    for key in ("inputs", "outputs"):
        value = doc.get(key)
        if value is not None and (
            not isinstance(value, list)
            or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in value)
        ):
            return f"'{key}' is not a list of named tensors"
    for t in doc.get("inputs") or ():
        dynamic = t.get("dynamic") or {}
        ranges = dynamic.values() if isinstance(dynamic, dict) else [None]
        if not all(
            isinstance(r, dict)
            and all(_is_int(r.get(k)) for k in ("min", "opt", "max"))
            and 0 < r["min"] <= r["opt"] <= r["max"]
            for r in ranges
        ):
            return f"input '{t['name']}' has a dynamic axis without 0 < min <= opt <= max"
    if not all(_is_int(v) and v > 0 for v in (doc.get("static") or {}).values()):
        return "'static' holds a size that is not a positive integer"
    if not all(
        str(k).lstrip("-").isdecimal() and str(k).isascii() and isinstance(v, str)
        for k, v in (doc.get("labels") or {}).items()
    ):
        return "'labels' maps something other than class ids to names"
    return None


def _check_fields(folder: Path, doc: Mapping[str, Any]) -> None:
    problem = _field_problem(doc)
    if problem:
        raise _fail(folder, f"has a malformed {MANIFEST}: {problem}; rebuild it with d2v-export")
    for key in ("task", "class"):
        if not isinstance((doc.get("model") or {}).get(key, ""), str):
            raise _fail(
                folder, f"has a malformed {MANIFEST}: model '{key}' is not a string; rebuild it with d2v-export"
            )
    for key in ("target", "precision"):
        if not isinstance(doc.get(key, ""), str):
            raise _fail(folder, f"has a malformed {MANIFEST}: '{key}' is not a string; rebuild it with d2v-export")


def _listed(folder: Path, doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's file list by path; malformed, duplicate or self-listing entries refused."""
    entries = doc.get("files")
    if not isinstance(entries, list) or not entries:
        raise _fail(folder, f"has no file list in {MANIFEST}; rebuild it")
    listed: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise _fail(folder, f"has a malformed file entry in {MANIFEST}; rebuild it")
        rel = _safe_rel(folder, entry.get("path"))
        if rel == MANIFEST or rel in listed:
            raise _fail(folder, f"lists '{rel}' twice or lists the manifest itself; rebuild it")
        listed[rel] = entry
    return listed


def _check_files(folder: Path, listed: Mapping[str, Mapping[str, Any]]) -> None:
    """The folder holds exactly the listed files (no pickles, no links), each with its size and sha256."""
    present = _files(folder)  # refuses symbolic links
    for path in present:
        why = pickle_reason(path)
        if why:
            rel = path.relative_to(folder).as_posix()
            raise _fail(folder, f"holds '{rel}', which {why}; bundles must not contain pickles")
    names = {p.relative_to(folder).as_posix() for p in present}
    extra = sorted(names - set(listed))
    if extra:
        raise _fail(
            folder,
            f"holds {len(extra)} file(s) not in {MANIFEST} (e.g. '{extra[0]}'); remove them or rebuild the bundle",
        )
    missing = sorted(set(listed) - names)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _fail(folder, f"is missing '{missing[0]}'{more}; copy the whole folder again")
    for rel, entry in listed.items():
        path = folder / rel
        size = path.stat().st_size
        if size != entry.get("size"):
            raise _fail(
                folder,
                f"file '{rel}' has {size} bytes, the manifest says {entry.get('size')}: it was changed; refusing it",
            )
        if sha256_file(path) != str(entry.get("sha256", "")).lower():
            raise _fail(folder, f"file '{rel}' does not match its sha256 in {MANIFEST}: it was changed; refusing it")


def _modality(folder: Path, doc: Mapping[str, Any]) -> Modality:
    """The manifest's modality, and its task known to that modality's heads."""
    from ..heads import head_for

    m = doc.get("model") or {}
    try:
        modality = Modality(m.get("modality"))
    except ValueError:
        raise _fail(folder, f"has an unknown modality {m.get('modality')!r} in {MANIFEST}; rebuild it") from None
    try:
        head_for(modality, str(m.get("task", "")))
    except D2VError:  # found by fuzzing: heads' own message named no bundle
        raise _fail(
            folder, f"names the task {m.get('task')!r}, which {modality.value} has not, in {MANIFEST}; rebuild it"
        ) from None
    return modality


def verify(folder: Path) -> Manifest:
    """Check a bundle against its manifest; return the manifest or raise a one-line D2VError (BAD_INPUT)."""
    folder = Path(folder)
    doc = _read_manifest(folder)
    listed = _listed(folder, doc)
    _check_files(folder, listed)
    model_file = _safe_rel(folder, doc.get("model_file"))
    if model_file not in listed:
        raise _fail(folder, f"names the model file '{model_file}', which it does not list; rebuild it")
    _check_fields(folder, doc)
    modality = _modality(folder, doc)
    m = doc.get("model") or {}
    labels = doc.get("labels")
    return Manifest(
        folder=folder,
        schema_version=str(doc["schema_version"]),
        modality=modality,
        task=str(m.get("task", "")),
        class_name=str(m.get("class", "")),
        target=str(doc.get("target", "")),
        precision=str(doc.get("precision", "")),
        model_file=model_file,
        files=tuple(FileEntry(rel, int(e["size"]), str(e["sha256"])) for rel, e in listed.items()),
        inputs=tuple(doc.get("inputs") or ()),
        outputs=tuple(doc.get("outputs") or ()),
        preprocessing=dict(doc.get("preprocessing") or {}),
        labels={int(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None,
        quantization=doc.get("quantization"),
        verdict=doc.get("verdict"),
        data=doc,
    )
