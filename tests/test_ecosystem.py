"""Every bundle kind d2v-export writes loads in optimum's ORTModelFor* / optimum-intel's OVModelFor* and agrees with `d2v-export run`.

For each of the 15 heads (tiny presets): the bundles of two real runs (ONNX Runtime and OpenVINO;
fp32, static INT8 and OpenVINO fp16, then dynamic INT8) are loaded with the optimum class of the head
and fed the input `d2v-export run` prepares from a real photo, clip or text. Their raw outputs must
match the bundle's own runtime (`predict`, the code behind `d2v-export run`), and the task result
(labels, transcript, answer, ...) read from optimum's outputs must equal what `d2v-export run` prints.
Heads optimum has no class for are listed in `UNSUPPORTED` with the reason (docs/bundles.md).

optimum-onnx pins transformers<4.58, so this runs in the second environment (scripts/setup_optimum.sh,
.ci/run). Elsewhere it skips; with D2V_REQUIRE_OPTIMUM=1 (set by CI) a missing optimum fails instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from d2v_export.measure.bench import BenchSettings
from d2v_export.calibration import bundled_path
from d2v_export.heads import HEADS, Head
from d2v_export.models import parse_source
from d2v_export.pipeline import QuantOptions, RunOptions, run
from d2v_export.spec import Modality, Precision

from .conftest import TINY_SHAPES

REQUIRED = os.environ.get("D2V_REQUIRE_OPTIMUM") == "1"

# head key -> optimum class suffix (ORTModelFor<X> / OVModelFor<X>)
CLASSES = {
    "vision/feature-extraction": "FeatureExtraction",
    "vision/image-classification": "ImageClassification",
    "vision/semantic-segmentation": "SemanticSegmentation",
    "text/feature-extraction": "FeatureExtraction",
    "text/fill-mask": "MaskedLM",
    "text/text-generation": "CausalLM",
    "text/text-classification": "SequenceClassification",
    "text/multiple-choice": "MultipleChoice",
    "text/token-classification": "TokenClassification",
    "text/question-answering": "QuestionAnswering",
    "audio/feature-extraction": "FeatureExtraction",
    "audio/automatic-speech-recognition": "CTC",
    "audio/audio-classification": "AudioClassification",
    "audio/audio-frame-classification": "AudioFrameClassification",
    "audio/audio-xvector": "AudioXVector",
}
# (runtime, head key) -> why optimum cannot load that bundle; documented in docs/bundles.md
UNSUPPORTED = {
    ("openvino", "vision/semantic-segmentation"): "optimum-intel 1.27 has no OVModelForSemanticSegmentation",
    ("openvino", "text/multiple-choice"): "optimum-intel 1.27 has no OVModelForMultipleChoice",
    (
        "openvino",
        "vision/feature-extraction",
    ): "OVModelForFeatureExtraction.forward takes input_ids and attention_mask only (text)",
    (
        "openvino",
        "audio/feature-extraction",
    ): "OVModelForFeatureExtraction.forward takes input_ids and attention_mask only (text)",
    # the audio graphs take attention_mask (docs/bundles.md "Padding and masks"); these three feed input_values alone
    (
        "onnxruntime",
        "audio/automatic-speech-recognition",
    ): "optimum-onnx 0.1.0's ORTModelForCTC.forward feeds input_values only",
    (
        "onnxruntime",
        "audio/audio-frame-classification",
    ): "optimum-onnx 0.1.0's ORTModelForAudioFrameClassification.forward feeds input_values only",
    (
        "onnxruntime",
        "audio/audio-xvector",
    ): "optimum-onnx 0.1.0's ORTModelForAudioXVector.forward feeds input_values only",
}
# optimum class -> outputs of the bundle it does not return (ORT/OVModelForFeatureExtraction: last_hidden_state only)
DROPPED = {"FeatureExtraction": {"pooler_output"}}
TEXT_INPUT = {
    "text/question-answering": "Who wrote the first program? ||| Ada Lovelace wrote the first program in 1843.",
    "text/multiple-choice": "The cat sat on the ||| mat ||| moon ||| idea",
    "text/fill-mask": "The cat sat on the <mask>.",
}


def _optimum(runtime: str) -> Any:
    name = "optimum.onnxruntime" if runtime == "onnxruntime" else "optimum.intel"
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"D2V_REQUIRE_OPTIMUM=1 but {name} does not import ({exc}); run scripts/setup_optimum.sh")
        pytest.skip(
            f"{name} is not installed (optimum-onnx pins transformers<4.58: scripts/setup_optimum.sh makes that environment)"
        )


def _input(head: Head) -> str:
    if head.modality is Modality.VISION:
        return str(bundled_path(Modality.VISION, "evaluation") / "chelsea.jpg")
    if head.modality is Modality.AUDIO:
        return str(sorted(bundled_path(Modality.AUDIO, "evaluation").glob("*.wav"))[0])
    return TEXT_INPUT.get(head.key, "What a lovely day at the seaside.")


def _bundles(head: Head, root: Path) -> list[Path]:
    """The bundle folders of two real runs: fp32 + static INT8 (+ OpenVINO fp16), then dynamic INT8."""
    spec = parse_source("preset:tiny", head.modality, head.task)
    quick = BenchSettings(seconds=0, min_iterations=1, warmup=1)
    targets = tuple(t for t in ("onnxruntime", "openvino") if (t, head.key) not in UNSUPPORTED)
    folders: list[Path] = []
    for mode, half in (("static", (Precision.FP16,) if "openvino" in targets else ()), ("dynamic", ())):
        out = root / mode
        run(
            spec,
            TINY_SHAPES,
            RunOptions(
                output=out,
                targets=targets,
                half=half,
                bench=quick,
                int8=QuantOptions(mode=mode, samples=4, eval_samples=2),
            ),
        )
        folders += [
            p
            for p in sorted(out.iterdir())
            if (p / "manifest.json").is_file() and (mode == "static" or "int8" in p.name)
        ]
    return folders


def _ov_config(folder: Path) -> dict[str, str]:
    """The runtime settings the bundle runs with (openvino_config.json), as optimum-intel's ov_config."""
    cfg = json.loads((folder / "openvino_config.json").read_text())
    out = {"PERFORMANCE_HINT": str(cfg["performance_hint"]), "NUM_STREAMS": str(cfg["num_streams"])}
    if cfg.get("inference_precision_hint"):
        out["INFERENCE_PRECISION_HINT"] = str(cfg["inference_precision_hint"])
    return out


def _load(folder: Path, runtime: str, head: Head) -> Any:
    module = _optimum(runtime)
    cls = getattr(module, ("ORTModelFor" if runtime == "onnxruntime" else "OVModelFor") + CLASSES[head.key])
    kwargs: dict[str, Any] = {}
    if head.task == "text-generation":
        kwargs["use_cache"] = False  # the bundle has no past-key-values inputs
    if runtime == "openvino":
        kwargs |= {"ov_config": _ov_config(folder), "compile": True}
    return cls.from_pretrained(folder, **kwargs)


def _outputs(result: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        value = result[name] if name in result else None
        if value is not None:
            out[name] = np.asarray(value.detach().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
    return out


def _same(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between two `d2v-export run` results (numbers to 1e-3, scores keyed by their label)."""
    if isinstance(a, float) or isinstance(b, float):
        ok = (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
        )
        return [] if ok else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _same(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and a and isinstance(a[0], dict) and "score" in a[0]:
        key = next(k for k in ("label", "token", "choice") if k in a[0])
        sa, sb = {x[key]: x["score"] for x in a}, {x[key]: x["score"] for x in b}
        # near-tied scores may swap places at the top-k edge; every shared entry must agree
        return [d for k in sorted(set(sa) & set(sb)) for d in _same(sa[k], sb[k], f"{where}[{k}]")] + (
            [] if len(set(sa) & set(sb)) >= len(sa) - 1 else [f"{where}: {sorted(sa)} vs {sorted(sb)}"]
        )
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.mark.parametrize("head", [pytest.param(h, id=h.key) for h in HEADS])
def test_bundles_load_in_optimum_and_match_d2v_export_run(head: Head, tmp_path: Path) -> None:
    from d2v_export.deploy.bundle import verify
    from d2v_export.deploy.predict import Interpreter, Preparer, _load_parts, expand_inputs, open_runtime, predict

    for runtime in ("onnxruntime", "openvino"):
        _optimum(runtime)  # skip (or, in CI, fail) before the minutes of building
    raw = _input(head)
    checked = []
    for folder in _bundles(head, tmp_path):
        runtime = "onnxruntime" if folder.name.startswith("onnxruntime") else "openvino"
        [expected] = predict(folder, [raw], threads=2)  # what `d2v-export run FOLDER INPUT --json` prints
        manifest = verify(folder)
        processor, tokenizer = _load_parts(manifest)
        [(_, item)] = expand_inputs(manifest, [raw])
        prepared = Preparer(manifest, processor, tokenizer)(item)
        backend, artifact, _ = open_runtime(manifest)
        with backend.runner(artifact, threads=2) as runner:
            own = {k: np.asarray(v, dtype=np.float32) for k, v in runner.infer(prepared.feed).items()}

        model = _load(folder, runtime, head)
        theirs = _outputs(model(**{k: torch.from_numpy(np.asarray(v)) for k, v in prepared.feed.items()}), head.outputs)
        dropped = set(head.outputs) - set(theirs)
        assert dropped <= DROPPED.get(CLASSES[head.key], set()), (
            f"{folder.name}: optimum returned {sorted(theirs)}, the bundle has {head.outputs}"
        )
        for name in theirs:
            scale = max(1.0, float(np.abs(own[name]).max()))
            err = float(np.abs(theirs[name] - own[name]).max()) / scale
            assert theirs[name].shape == own[name].shape and err <= 1e-3, (
                f"{folder.name} {name}: scaled error {err:.2e} against d2v-export run"
            )
        got = Interpreter(manifest, tokenizer, 5)(theirs, prepared)
        if dropped:  # the embedding `d2v-export run` prints is the dropped pooler_output: compare what optimum has
            got = {k: v for k, v in got.items() if k == "hidden_shape"}
        diffs = _same({k: expected[k] for k in got}, got, folder.name)
        assert not diffs, "; ".join(diffs[:5])
        checked.append(folder.name)
    kinds = {"fp32", "int8-static", "int8-dynamic"} | ({"fp16"} if ("openvino", head.key) not in UNSUPPORTED else set())
    assert {n.split("-", 1)[1] for n in checked} == kinds, checked
