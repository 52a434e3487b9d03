"""Hugging Face layouts for --calibration / --eval, on real files written here from the bundled photos and clips.

imagefolder / audiofolder with metadata.csv / metadata.jsonl, a real `save_to_disk` folder (Dataset and
DatasetDict), real parquet files (written by `datasets` and by plain pyarrow), the --columns override,
and the labelled accuracy reaching report.json through the real command.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from d2v_export.calibration import bundled_path, load_samples, parse_columns
from d2v_export.models import load, parse_source
from d2v_export.spec import D2VError, Dim, Modality, ShapeProfile
from d2v_export.convert.validate import usable_labels_for

from .conftest import cli

datasets = pytest.importorskip(
    "datasets", reason="the [datasets] extra is not installed (CI installs it: scripts/setup.sh)"
)

VISION = ShapeProfile(dims=(Dim("batch", 1, 1, 8),), static={"image_size": 32})
TEXT = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("sequence", 8, 16, 64)))
AUDIO = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("samples", 8000, 16000, 48000)))

PHOTOS = sorted(bundled_path(Modality.VISION, "evaluation").glob("*.jpg"))[:4]
CLIPS = sorted(bundled_path(Modality.AUDIO, "evaluation").glob("*.wav"))[:4]
# ImageNet names the tiny vision preset's label2id knows (commas inside: the CSV must quote them)
NAMES = ["tabby, tabby cat", "espresso", "space shuttle", "goldfish, Carassius auratus"]


@pytest.fixture(scope="module")
def vision():
    return load(parse_source("preset:tiny", Modality.VISION, "image-classification"))


@pytest.fixture(scope="module")
def ctc():
    return load(parse_source("preset:tiny", Modality.AUDIO, "automatic-speech-recognition"))


@pytest.fixture(scope="module")
def audio_cls():
    return load(parse_source("preset:tiny", Modality.AUDIO, "audio-classification"))


@pytest.fixture(scope="module")
def text_cls():
    return load(parse_source("preset:tiny", Modality.TEXT, "text-classification"))


@pytest.fixture(scope="module")
def qa():
    return load(parse_source("preset:tiny", Modality.TEXT, "question-answering"))


def _copy(files: list[Path], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return [f.name for f in files]


def _transcripts() -> dict[str, str]:
    rows = (bundled_path(Modality.AUDIO, "evaluation") / "labels.tsv").read_text().splitlines()[1:]
    return dict(line.split("\t", 1) for line in rows)


def _image_dataset(names: list[str] | None = None):
    feats = datasets.Features({"img": datasets.Image(), "species": datasets.ClassLabel(names=names or NAMES)})
    return datasets.Dataset.from_dict(
        {"img": [str(p) for p in PHOTOS], "species": list(range(len(PHOTOS)))}, features=feats
    )


def _audio_dataset():
    """The layout of an Audio column as the hub stores it ({bytes, path}); cast, since encoding needs torchcodec."""
    text = _transcripts()
    rows = {
        "audio": [{"bytes": p.read_bytes(), "path": p.name} for p in CLIPS],
        "transcription": [text[p.name] for p in CLIPS],
    }
    return datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())


# --------------------------------------------------------------------------- imagefolder / audiofolder


def test_imagefolder_metadata_csv(vision, tmp_path: Path) -> None:
    root = tmp_path / "imagefolder"
    files = _copy(PHOTOS, root / "train")
    with (root / "train" / "metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "label", "caption"])
        writer.writerows([f, n, "a photo"] for f, n in zip(files, NAMES))
    s = load_samples(root, vision, VISION, split="evaluation")
    assert s.names == tuple(f"train/{f}" for f in files)
    assert s.labels == tuple(NAMES)
    assert usable_labels_for(vision, s.labels) == [vision.config.label2id[n] for n in NAMES]
    assert s.feeds[0]["pixel_values"].shape == (1, 3, 32, 32)


def test_imagefolder_metadata_jsonl_in_a_subfolder_with_columns(vision, tmp_path: Path) -> None:
    """file_name is relative to the metadata file; an odd label column is named with --columns; ints stay ids."""
    root = tmp_path / "imagefolder"
    files = _copy(PHOTOS[:2], root / "a" / "b")
    _copy(PHOTOS[2:], root / "dog")  # no metadata here: the class folder gives the label
    rows = [{"file_name": f"b/{f}", "species_id": i + 5} for i, f in enumerate(files)]
    (root / "a" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = load_samples(root, vision, VISION, columns=parse_columns("label=species_id"))
    assert dict(zip(s.names, s.labels)) == {
        f"a/b/{files[0]}": 5,
        f"a/b/{files[1]}": 6,
        **{f"dog/{p.name}": "dog" for p in PHOTOS[2:]},
    }
    with pytest.raises(D2VError, match="no such column"):
        load_samples(root, vision, VISION, columns={"label": "nope"})


def test_metadata_without_file_name_is_one_line_error(vision, tmp_path: Path) -> None:
    _copy(PHOTOS[:1], tmp_path)
    (tmp_path / "metadata.csv").write_text("path,label\nx.jpg,espresso\n")
    with pytest.raises(D2VError, match="no file_name column") as err:
        load_samples(tmp_path, vision, VISION)
    assert "\n" not in str(err.value)


def test_audiofolder_metadata_transcription(ctc, tmp_path: Path) -> None:
    text = _transcripts()
    files = _copy(CLIPS, tmp_path / "clips")
    with (tmp_path / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["file_name", "transcription", "speaker"])
        writer.writeheader()
        writer.writerows({"file_name": f"clips/{f}", "transcription": text[f].lower(), "speaker": "x"} for f in files)
    s = load_samples(tmp_path, ctc, AUDIO, split="evaluation")
    assert s.labels == tuple(text[f].lower() for f in files)
    assert usable_labels_for(ctc, s.labels) == list(s.labels)
    assert all(f["input_values"].shape[1] % 1600 == 0 for f in s.feeds)


def test_audiofolder_labels_for_a_classifier(audio_cls, tmp_path: Path) -> None:
    """metadata.jsonl labels by name; without metadata, class folders (as Hugging Face's audiofolder)."""
    files = _copy(CLIPS, tmp_path / "meta")
    (tmp_path / "meta" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f, "label": f"LABEL_{i % 2}"}) + "\n" for i, f in enumerate(files))
    )
    s = load_samples(tmp_path / "meta", audio_cls, AUDIO)
    assert usable_labels_for(audio_cls, s.labels) == [0, 1, 0, 1]
    _copy(CLIPS[:2], tmp_path / "folders" / "LABEL_1")
    s = load_samples(tmp_path / "folders", audio_cls, AUDIO)
    assert s.labels == ("LABEL_1", "LABEL_1")


# --------------------------------------------------------------------------- save_to_disk and parquet


def test_saved_dataset_with_image_and_class_label(vision, tmp_path: Path) -> None:
    _image_dataset().save_to_disk(str(tmp_path / "ds"))
    s = load_samples(tmp_path / "ds", vision, VISION, columns={"label": "species"})
    assert s.names == tuple(f"ds[{i}]" for i in range(4))
    assert s.labels == tuple(NAMES)  # ClassLabel ids become names the model knows
    assert s.feeds[0]["pixel_values"].shape == (1, 3, 32, 32)
    # the same pixels as the file itself
    direct = load_samples(PHOTOS[0], vision, VISION)
    np.testing.assert_array_equal(s.feeds[0]["pixel_values"], direct.feeds[0]["pixel_values"])
    # names the model does not know: the class index stays
    _image_dataset(["a", "b", "c", "d"]).save_to_disk(str(tmp_path / "ds2"))
    assert load_samples(tmp_path / "ds2", vision, VISION, columns={"label": "species"}).labels == (0, 1, 2, 3)


def test_saved_dataset_dict_picks_the_split(vision, tmp_path: Path) -> None:
    ds = _image_dataset()
    datasets.DatasetDict({"train": ds.select([0, 1]), "validation": ds.select([2, 3])}).save_to_disk(
        str(tmp_path / "dd")
    )
    cal = load_samples(tmp_path / "dd", vision, VISION, split="calibration", columns={"label": "species"})
    ev = load_samples(tmp_path / "dd", vision, VISION, split="evaluation", columns={"label": "species"})
    assert cal.labels == tuple(NAMES[:2]) and ev.labels == tuple(NAMES[2:])
    assert cal.source.endswith("[train]") and ev.source.endswith("[validation]")
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(D2VError, match="splits a, b"):
        load_samples(tmp_path / "odd", vision, VISION)


def test_parquet_audio_with_transcription(ctc, tmp_path: Path) -> None:
    ds = _audio_dataset()
    ds.to_parquet(str(tmp_path / "speech.parquet"))
    s = load_samples(tmp_path / "speech.parquet", ctc, AUDIO, split="evaluation")
    assert s.labels == tuple(ds["transcription"])
    direct = load_samples(CLIPS[0], ctc, AUDIO)
    np.testing.assert_array_equal(s.feeds[0]["input_values"], direct.feeds[0]["input_values"])
    # the hub layout: a folder of {split}-NNNNN-of-NNNNN.parquet
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.select([0, 1]).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    ds.select([2, 3]).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    ev = load_samples(tmp_path / "hub", ctc, AUDIO, split="evaluation")
    assert ev.labels == tuple(ds["transcription"][2:]) and ev.source.endswith("[test]")


def test_parquet_text_from_plain_pyarrow(text_cls, qa, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"sentence": ["a fine day", "rain again", "so so"], "label": [1, 0, 1]}), tmp_path / "sst.parquet"
    )
    s = load_samples(tmp_path / "sst.parquet", text_cls, TEXT)
    assert s.labels == (1, 0, 1) and usable_labels_for(text_cls, s.labels) == [1, 0, 1]
    assert s.feeds[0]["input_ids"][0, 0] == text_cls.tokenizer.bos_token_id
    pq.write_table(pa.table({"review": ["good", "bad"], "stars": [1, 0]}), tmp_path / "odd.parquet")
    with pytest.raises(D2VError, match="--columns"):
        load_samples(tmp_path / "odd.parquet", text_cls, TEXT)
    assert load_samples(
        tmp_path / "odd.parquet", text_cls, TEXT, columns=parse_columns("text=review,label=stars")
    ).labels == (1, 0)
    pq.write_table(pa.table({"question": ["who?"], "context": ["Ada wrote it."], "id": ["x"]}), tmp_path / "qa.parquet")
    s = load_samples(tmp_path / "qa.parquet", qa, TEXT)
    assert (s.feeds[0]["input_ids"][0] == qa.tokenizer.eos_token_id).sum() >= 2  # a question/context pair


def test_without_datasets_the_error_names_the_extra(vision, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image_dataset().save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets where it is not installed
    with pytest.raises(D2VError, match=r"d2v-export\[datasets\]") as err:
        load_samples(tmp_path / "ds", vision, VISION)
    assert "\n" not in str(err.value)


def test_parse_columns() -> None:
    assert parse_columns("image=img, label=fine_label") == {"image": "img", "label": "fine_label"}
    assert parse_columns(None) == {}
    with pytest.raises(D2VError, match="unknown --columns role 'pixels'"):
        parse_columns("pixels=img")
    with pytest.raises(D2VError, match="ROLE=COLUMN"):
        parse_columns("image")


# --------------------------------------------------------------------------- to the report


NO_GATE = "top1_agreement=0,logit_cosine=-1"  # a budget no build can miss: the random model's drift is not under test


def test_labelled_accuracy_reaches_the_report(tmp_path: Path) -> None:
    """The real command: calibrate on a saved dataset, evaluate on an imagefolder with metadata.csv."""
    _image_dataset().save_to_disk(str(tmp_path / "calib"))
    files = _copy(PHOTOS, tmp_path / "eval")
    with (tmp_path / "eval" / "metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["file_name", "label"], *([f, n] for f, n in zip(files, NAMES))])
    out = tmp_path / "out"
    res = cli(
        "vision",
        "--model",
        "preset:tiny",
        "--task",
        "image-classification",
        "--int8",
        "--calibration",
        str(tmp_path / "calib"),
        "--columns",
        "label=species",
        "--eval",
        str(tmp_path / "eval"),
        "--output",
        str(out),
        "--bench-seconds",
        "0",
        "--quiet",
        "--max-drift",
        NO_GATE,
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    # the labels' path is under test here, not the drift of a random model: no gate
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "report.json").read_text())
    (int8,) = [v for v in doc["variants"] if v["precision"] == "int8"]
    metrics = int8["drift"]["metrics"]
    assert 0 <= metrics["reference_accuracy"] <= 1 and 0 <= metrics["candidate_accuracy"] <= 1
    assert str(tmp_path / "eval") in int8["drift"]["detail"]
    assert "candidate_accuracy" in (out / "report.md").read_text()
