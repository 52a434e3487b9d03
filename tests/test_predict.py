"""`predict` (d2v-export run) on real bundles of every modality, with the real bundled inputs."""

from __future__ import annotations

import json
import shutil
from math import gcd
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from d2v_export.deploy import bundle, predict
from d2v_export.calibration import bundled_path
from d2v_export.spec import Artifact, D2VError, ExitCode, Modality, Precision

from .test_bundle import _graph_of, bundles, vision_bundles  # noqa: F401 - session fixtures shared with test_bundle

CAT = bundled_path(Modality.VISION, "evaluation") / "chelsea.jpg"
AUDIO = bundled_path(Modality.AUDIO, "evaluation")
TEXT = bundled_path(Modality.TEXT, "evaluation").parent

Bundles = Callable[..., dict[str, Path]]


def id2label(folder: Path) -> set[str]:
    labels = bundle.verify(folder).labels
    assert labels is not None
    return set(labels.values())


def test_the_cat_photo_gets_a_label_of_the_checkpoint(vision_bundles: dict[str, Path]) -> None:
    assert CAT.is_file()
    results = {}
    for name, folder in vision_bundles.items():
        (r,) = predict.predict(folder, [str(CAT)], top_k=3, threads=1)
        assert r["input"] == str(CAT) and r["task"] == "image-classification"
        assert len(r["labels"]) == 3
        labels = id2label(folder)
        assert len(labels) > 990 and "tabby, tabby cat" in labels  # the 1000 ImageNet names (two are the same)
        assert all(x["label"] in labels for x in r["labels"])
        scores = [x["score"] for x in r["labels"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
        assert any("RANDOM WEIGHTS" in n for n in r["notes"])
        results[name] = r
    if "openvino-fp32" in results:  # the same model in two runtimes agrees on the top label
        assert results["openvino-fp32"]["labels"][0]["label"] == results["onnxruntime-fp32"]["labels"][0]["label"]
    text = predict.format_text(list(results.values()))
    assert results["onnxruntime-fp32"]["labels"][0]["label"] in text and "chelsea.jpg" in text
    json.dumps(list(results.values()))  # JSON-able


def test_several_images_of_any_mode(vision_bundles: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    gray = tmp_path / "gray16.png"
    Image.open(CAT).convert("L").resize((50, 40)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.open(CAT).convert("RGBA").save(rgba)
    folder = vision_bundles["onnxruntime-fp32"]
    results = predict.predict(folder, [str(CAT), str(gray), str(rgba)], top_k=1)
    assert [len(r["labels"]) for r in results] == [1, 1, 1]
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    with pytest.raises(D2VError, match="not-an-image.jpg"):
        predict.predict(folder, [str(bad)])
    with pytest.raises(D2VError, match="is not a file"):
        predict.predict(folder, [str(tmp_path / "nope.jpg")])
    with pytest.raises(D2VError, match="no inputs"):
        predict.predict(folder, [])


def test_speech_gives_a_transcript_at_any_rate_and_channel_count(bundles: Bundles, tmp_path: Path) -> None:
    import soundfile as sf
    from scipy.signal import resample_poly

    folder = bundles("audio", "automatic-speech-recognition")["onnxruntime-fp32"]
    wavs = sorted(AUDIO.glob("*.wav"))[:2]
    wave, rate = sf.read(str(wavs[0]), dtype="float32")
    g = gcd(44100, rate)
    stereo = np.stack([resample_poly(wave, 44100 // g, rate // g)] * 2, axis=1).astype(np.float32)
    other = tmp_path / "stereo44k.wav"
    sf.write(str(other), stereo, 44100)
    long = tmp_path / "long.flac"
    sf.write(str(long), np.tile(wave, 4), rate)  # longer than the bundle's 2 s maximum
    results = predict.predict(folder, [*map(str, wavs), str(other), str(long)])
    assert len(results) == 4
    for r in results:
        assert r["task"] == "automatic-speech-recognition"
        assert isinstance(r["transcript"], str)
        assert set(r["transcript"]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    # the same speech at 44.1 kHz stereo reads like the 16 kHz mono original (random weights: not identical)
    assert results[2]["frames"] == results[0]["frames"]
    # longer than the bundle's 2 s maximum: run in windows, every frame of the whole clip decoded (tests/test_long_audio.py)
    assert any("windows of 2 s" in n for n in results[3]["notes"]) and not any(
        "cut to" in n for n in results[3]["notes"]
    )
    assert results[3]["frames"] == (len(np.tile(wave, 4)) - 400) // 320 + 1
    assert "transcript:" in predict.format_text(results)


def test_text_classification_labels_from_text_and_files(bundles: Bundles) -> None:
    built = bundles("text", "text-classification", int8="dynamic")
    for name in ("onnxruntime-fp32", "onnxruntime-int8-dynamic"):
        folder = built[name]
        results = predict.predict(
            folder, ["What a lovely day.", "first ||| second part", str(TEXT / "evaluation.txt")], top_k=2
        )
        lines = [line for line in (TEXT / "evaluation.txt").read_text().splitlines() if line.strip()]
        assert len(results) == 2 + len(lines)
        assert results[2]["input"].endswith("evaluation.txt:1")
        for r in results:
            assert [x["label"] for x in r["labels"]] in (["LABEL_0", "LABEL_1"], ["LABEL_1", "LABEL_0"])
            assert abs(sum(x["score"] for x in r["labels"]) - 1) < 1e-4
        assert all(x["label"] in id2label(folder) for r in results for x in r["labels"])


def test_question_answering_returns_a_span_of_the_context(bundles: Bundles) -> None:
    folder = bundles("text", "question-answering")["onnxruntime-fp32"]
    context = "The cat slept on the warm windowsill all afternoon."
    results = predict.predict(folder, [f"Where did the cat sleep? ||| {context}", str(TEXT / "qa_evaluation.jsonl")])
    assert results[0]["answer"] and results[0]["answer"] in context
    records = [json.loads(line) for line in (TEXT / "qa_evaluation.jsonl").read_text().splitlines() if line.strip()]
    for r, record in zip(results[1:], records):
        assert r["answer"] in record["context"]
    with pytest.raises(D2VError, match=r"question \|\|\| context"):
        predict.predict(folder, ["no separator here"])


def test_token_classification_tags_every_word_piece(bundles: Bundles) -> None:
    folder = bundles("text", "token-classification")["onnxruntime-fp32"]
    (r,) = predict.predict(folder, ["Ada Lovelace lived in London."])
    tokens = [t["token"] for t in r["tags"]]
    assert "".join(tokens) == "AdaLovelacelivedinLondon."
    assert {t["tag"] for t in r["tags"]} <= id2label(folder)


def test_fill_mask_ranks_tokens_for_each_mask(bundles: Bundles) -> None:
    folder = bundles("text", "fill-mask")["onnxruntime-fp32"]
    (r,) = predict.predict(folder, ["Paris is the <mask> of <mask>."], top_k=4)
    assert [m["position"] for m in r["masks"]] == [4, 6]
    assert all(len(m["tokens"]) == 4 and all(isinstance(t["token"], str) for t in m["tokens"]) for m in r["masks"])
    with pytest.raises(D2VError, match="<mask>"):
        predict.predict(folder, ["no mask token"])


def test_segmentation_summarizes_the_mask(bundles: Bundles) -> None:
    folder = bundles("vision", "semantic-segmentation")["onnxruntime-fp32"]
    (r,) = predict.predict(folder, [str(CAT)], top_k=3)
    assert len(r["classes"]) in (1, 2, 3) and sum(c["fraction"] for c in r["classes"]) <= 1 + 1e-6
    assert {c["label"] for c in r["classes"]} <= id2label(folder)  # ADE20k names
    assert "mask" in predict.format_text([r])


def test_xvector_gives_an_embedding(bundles: Bundles) -> None:
    folder = bundles("audio", "audio-xvector")["onnxruntime-fp32"]
    (r,) = predict.predict(folder, [str(sorted(AUDIO.glob("*.wav"))[0])])
    assert r["embedding_shape"] == [16] and r["embedding_norm"] > 0


def test_a_tensorrt_bundle_without_engine_runs_its_onnx_on_onnxruntime(
    vision_bundles: dict[str, Path], tmp_path: Path
) -> None:
    source = vision_bundles["onnxruntime-fp32"]
    folder = tmp_path / "tensorrt-fp32"
    folder.mkdir()
    for name in ("model.onnx", "config.json", "preprocessor_config.json"):
        shutil.copy2(source / name, folder / name)
    from d2v_export.models import load, parse_source

    spec = parse_source("preset:tiny", Modality.VISION, "image-classification")
    artifact = Artifact("tensorrt", Precision.FP16, folder, folder / "model.onnx", (), notes=("engine not built here",))
    bundle.write_manifest(
        folder, artifact=artifact, model=load(spec), graph=_graph_of(source), variant_verdict=None, environment={}
    )
    (r,) = predict.predict(folder, [str(CAT)], top_k=1)
    (expected,) = predict.predict(source, [str(CAT)], top_k=1)
    assert r["labels"][0]["label"] == expected["labels"][0]["label"]
    assert r["runtime"].startswith("onnxruntime")
    assert any("no TensorRT engine" in n and "ONNX Runtime" in n for n in r["notes"])


def test_run_verifies_first(vision_bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "b"
    shutil.copytree(vision_bundles["onnxruntime-fp32"], folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(D2VError) as info:
        predict.predict(folder, [str(CAT)])
    assert info.value.code is ExitCode.BAD_INPUT and "model.onnx" in str(info.value)
    with pytest.raises(D2VError, match="no manifest.json"):
        predict.predict(folder.parent, [str(CAT)])


def test_format_text_covers_every_result_kind() -> None:
    results: list[dict[str, Any]] = [
        {"input": "a", "task": "t", "runtime": "r", "answer": "x", "score": 0.5, "notes": ["n"]},
        {
            "input": "b",
            "task": "t",
            "runtime": "r",
            "tags": [{"token": "Ada", "tag": "B-PER", "score": 1.0}],
            "notes": [],
        },
        {
            "input": "c",
            "task": "t",
            "runtime": "r",
            "next_tokens": [{"token": "the", "id": 1, "score": 0.2}],
            "notes": [],
        },
        {
            "input": "d",
            "task": "t",
            "runtime": "r",
            "classes": [{"label": "wall", "id": 0, "fraction": 0.25}],
            "frames": 9,
            "notes": [],
        },
        {
            "input": "e",
            "task": "t",
            "runtime": "r",
            "choices": [{"choice": "blue", "index": 0, "score": 0.7}],
            "notes": [],
        },
    ]
    text = predict.format_text(results)
    for piece in ("answer: 'x'", "Ada/B-PER", "next token: 'the'", "9 frames: wall 25.0%", "'blue'", "note: n"):
        assert piece in text
