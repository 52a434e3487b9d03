"""Whole recordings: `d2v-export run` and the bundle README transcribe speech longer than the export's range in windows.

Long speech is synthesized offline with espeak-ng (16 sentences, about 67 s) and run through a tiny-preset
speech-recognition bundle exported at 0.5:1:10 s. The reference is the same model in PyTorch on the WHOLE
recording at once: random weights make the transcript noise (a new letter every few frames), which makes
the CER between the two a sharp test of the stitching.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export.deploy import chunking, predict
from d2v_export.measure import metrics
from d2v_export.measure.bench import BenchSettings
from d2v_export.models import load, parse_source
from d2v_export.options import ShapeRequest
from d2v_export.pipeline import RunOptions, run
from d2v_export.spec import Modality

from .test_bundle import bundles  # noqa: F401 - the session fixture

SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "She sells sea shells by the sea shore every summer morning.",
    "A journey of a thousand miles begins with a single step forward.",
    "Speech recognition turns long recordings into written words for everyone.",
    "The weather today is cloudy with a chance of rain in the afternoon.",
    "Please remember to bring your umbrella and a warm coat tomorrow.",
    "Numbers like seven, twelve and forty two are spoken slowly here.",
    "Every chunk of audio overlaps its neighbours by a little bit.",
)
SECONDS = (0.5, 1.0, 10.0)
CER_BOUND = 0.01  # measured 0.0011 (67 s, tiny preset); no stride dropping gives more than 10x the bound
AGREEMENT = 0.99  # argmax agreement of the frames 10 or more frames (0.2 s) from every seam between windows


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import soundfile as sf

    from d2v_export.calibration.audio import read_mono

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("speech")
    waves = []
    for i, text in enumerate(SENTENCES * 2):
        subprocess.run(["espeak-ng", "-w", str(root / f"{i}.wav"), "-s", "150", text], check=True, capture_output=True)
        waves.append(read_mono(root / f"{i}.wav", 16000))  # 22.05 kHz -> 16 kHz, the project's reader
    path = root / "long.wav"
    sf.write(str(path), np.concatenate(waves), 16000)
    return path


@pytest.fixture(scope="module")
def asr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = parse_source("preset:tiny", Modality.AUDIO, "automatic-speech-recognition")
    root = tmp_path_factory.mktemp("asr") / "out"
    run(
        spec,
        ShapeRequest(audio_seconds=SECONDS),
        RunOptions(output=root, targets=("onnxruntime",), bench=BenchSettings(seconds=0), threads=1),
    )
    return root / "onnxruntime-fp32"


def _whole(path: Path) -> tuple[np.ndarray, Any]:
    """The PyTorch model's logits on the whole recording at once, and the model."""
    import torch

    from d2v_export.calibration.audio import read_mono

    model = load(parse_source("preset:tiny", Modality.AUDIO, "automatic-speech-recognition"))  # same seed, same weights
    values = model.processor(read_mono(path, 16000), sampling_rate=16000, return_tensors="np")["input_values"]
    with torch.no_grad():
        return model.module(input_values=torch.tensor(values)).logits[0].numpy(), model


def _decode(logits: np.ndarray, tokenizer: Any) -> str:
    id2char = {int(i): str(t) for t, i in tokenizer.get_vocab().items()}
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        id2char[int(special)] = ""
    return metrics.ctc_greedy_decode(logits, id2char, blank=int(tokenizer.pad_token_id))


def _chunked(folder: Path, path: Path, plan_change: Any = None) -> tuple[np.ndarray, list[chunking.Window]]:
    """The stitched ONNX Runtime logits `run` decodes; `plan_change` breaks the plan on purpose."""
    manifest = predict.verify(folder)
    backend, artifact, _notes = predict.open_runtime(manifest)
    processor, tokenizer = predict._load_parts(manifest)
    prepare = predict.Preparer(manifest, processor, tokenizer)
    prepared = prepare(path)
    if plan_change is not None:
        prepared.windows = plan_change(prepared.windows)
    with backend.runner(artifact, threads=1) as runner:
        out = prepare.infer(runner, prepared, ["logits"])
    return np.asarray(out["logits"])[0], prepared.windows


def _inner(plan: list[chunking.Window], frames: int, margin: int = 10) -> np.ndarray:
    """Frames at least `margin` frames from every seam between two windows' kept frames."""
    ok = np.ones(frames, dtype=bool)
    for w in plan[1:]:
        seam = w.start // chunking.HOP + w.keep_from
        ok[max(0, seam - margin) : seam + margin] = False
    return ok


def test_windows_tile_every_frame_exactly_once() -> None:
    enc = chunking.Encoder()
    window, stride = chunking.sizes(160_000)
    assert (window, stride) == (160_000, 26_560) and window % 320 == 0 and stride % 320 == 0
    for length in [400, 5_000, 159_999, 160_000, 160_001, 213_120, 1_000_000, 1_000_321, 9_600_000]:
        plan = chunking.windows(length, window, stride)
        kept = [w.start // enc.hop + j for w in plan for j in range(w.keep_from, w.keep_to)]
        assert kept == list(range(enc.frames(length))), length  # every frame of the whole recording, once, in order
        for i, w in enumerate(plan):
            assert w.start % enc.hop == 0 and 0 <= w.start < w.stop <= length and w.stop - w.start <= window
            assert 0 <= w.keep_from <= w.keep_to <= enc.frames(w.stop - w.start)
            if i:  # an inner edge keeps a stride of context
                assert w.keep_from >= stride // enc.hop
            if i < len(plan) - 1:
                assert enc.frames(w.stop - w.start) - w.keep_to >= stride // enc.hop - 1
    assert len(chunking.windows(1_000_000, window, stride)) == 9  # step 106,880 samples: 2/3 of every window is kept
    with pytest.raises(ValueError, match="whole frames"):
        chunking.windows(1_000_000, 160_001, stride)


def test_chunked_transcript_matches_the_whole_recording_in_pytorch(asr: Path, speech: Path) -> None:
    (result,) = predict.predict(asr, [str(speech)], threads=1)
    reference, model = _whole(speech)
    assert result["frames"] == len(reference)  # the same frames as the whole recording
    assert any("windows of 10 s" in n for n in result["notes"]) and not any("cut to" in n for n in result["notes"])
    whole = _decode(reference, model.tokenizer)
    assert len(whole) > 500  # noise: a letter every few frames, so the CER below is sensitive
    cer = metrics.cer(whole, result["transcript"])
    assert cer <= CER_BOUND, cer

    logits, plan = _chunked(asr, speech)
    assert len(plan) > 5 and logits.shape == reference.shape
    assert _decode(logits, model.tokenizer) == result["transcript"]
    inner = _inner(plan, len(reference))
    agreement = float((logits.argmax(-1) == reference.argmax(-1))[inner].mean())
    assert inner.sum() > len(reference) // 2 and agreement >= AGREEMENT, agreement


def test_broken_stitching_fails_the_bounds(asr: Path, speech: Path) -> None:
    """No stride dropping, or every window one frame off: the same bounds refuse both."""
    reference, model = _whole(speech)
    whole = _decode(reference, model.tokenizer)

    def every_frame(plan: list[chunking.Window]) -> list[chunking.Window]:
        return [dataclasses.replace(w, keep_from=0, keep_to=chunking.Encoder().frames(w.stop - w.start)) for w in plan]

    logits, _ = _chunked(asr, speech, every_frame)
    assert len(logits) > len(reference) and metrics.cer(whole, _decode(logits, model.tokenizer)) > 10 * CER_BOUND

    def shifted(
        plan: list[chunking.Window],
    ) -> list[chunking.Window]:  # every inner window read one frame (320 samples) late
        late = [dataclasses.replace(w, start=w.start + chunking.HOP, stop=w.stop + chunking.HOP) for w in plan[1:-1]]
        return [plan[0], *late, plan[-1]]

    logits, plan = _chunked(asr, speech, shifted)
    assert logits.shape == reference.shape  # as many frames, the inner windows' one frame off
    # a CTC transcript barely sees a one-frame shift (repeats collapse); the frame agreement does
    agreement = float((logits.argmax(-1) == reference.argmax(-1))[_inner(plan, len(reference))].mean())
    assert agreement < AGREEMENT - 0.1, agreement


def test_the_readme_runs_a_long_recording_with_the_runtime_alone(asr: Path, speech: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(asr, tmp_path / asr.name)
    shutil.copy(speech, tmp_path / "speech.wav")
    readme = (folder / "README.md").read_text()
    assert "## Long recordings" in readme
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    res = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (result,) = predict.predict(asr, [str(speech)], threads=1)
    assert res.stdout.strip().splitlines()[-1] == result["transcript"]


def test_a_clip_longer_than_run_reads_is_cut_and_says_so(
    asr: Path, speech: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predict, "MAX_SECONDS", 30)
    (result,) = predict.predict(asr, [str(speech)], threads=1)
    assert any(n.startswith("cut to 30 s: run reads at most") for n in result["notes"])
    assert result["frames"] == chunking.Encoder().frames(30 * 16000)


def test_audio_classification_sees_the_first_window_and_says_so(bundles: Any, speech: Path, tmp_path: Path) -> None:
    """A head that pools the whole clip is not chunked: it gets the longest input's worth, the same as that cut alone."""
    import soundfile as sf

    from d2v_export.calibration.audio import read_mono

    folder = bundles("audio", "audio-classification")["onnxruntime-fp32"]
    first = tmp_path / "first2s.wav"
    sf.write(str(first), read_mono(speech, 16000)[: 2 * 16000], 16000)
    long, cut = predict.predict(folder, [str(speech), str(first)], threads=1)
    assert any(n.startswith("cut to 2 s: the bundle's longest input") for n in long["notes"])
    assert not any("windows" in n for n in long["notes"])
    assert long["labels"] == cut["labels"]
