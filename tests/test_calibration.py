"""Calibration readers on real files: the bundled sets and files written in tmp_path. No mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from d2v_export import assets
from d2v_export.calibration import Samples, bundled_path, load_cache, load_samples, save_cache
from d2v_export.calibration.audio import read_mono
from d2v_export.calibration.images import open_rgb
from d2v_export.models import load, parse_source
from d2v_export.spec import D2VError, Dim, Modality, ShapeProfile

VISION = ShapeProfile(dims=(Dim("batch", 1, 1, 8),), static={"image_size": 32})
TEXT = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("sequence", 8, 128, 512)))
AUDIO = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("samples", 8000, 16000, 160000)))
CHOICES = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("choices", 2, 4, 4), Dim("sequence", 8, 128, 512)))


@pytest.fixture(scope="module")
def vision():
    return load(parse_source("preset:tiny", Modality.VISION, "feature-extraction"))


@pytest.fixture(scope="module")
def audio():
    return load(parse_source("preset:tiny", Modality.AUDIO, None))  # CTC head


@pytest.fixture(scope="module")
def text():
    return load(parse_source("preset:tiny", Modality.TEXT, None))


@pytest.fixture(scope="module")
def qa():
    return load(parse_source("preset:tiny", Modality.TEXT, "question-answering"))


@pytest.fixture(scope="module")
def mc():
    return load(parse_source("preset:tiny", Modality.TEXT, "multiple-choice"))


def _forward(model, feed):
    import torch

    with torch.no_grad():
        return model.module(**{k: torch.from_numpy(v) for k, v in feed.items()})


# --------------------------------------------------------------------------- bundled data


def test_bundled_vision(vision):
    cal = load_samples(None, vision, VISION)
    ev = load_samples(None, vision, VISION, split="evaluation")
    assert len(cal) >= 8 and len(ev) >= 4
    assert not set(cal.names) & set(ev.names)
    assert "chelsea.jpg" in ev.names
    for feed in cal.feeds + ev.feeds:
        assert set(feed) == {"pixel_values"}
        assert feed["pixel_values"].dtype == np.float32 and feed["pixel_values"].shape == (1, 3, 32, 32)
        assert -1.001 <= feed["pixel_values"].min() and feed["pixel_values"].max() <= 1.001
    assert cal.labels is None and cal.skipped == () and "vision" in cal.source
    _forward(vision, cal.feeds[0])


def test_bundled_audio(audio):
    cal = load_samples(None, audio, AUDIO)
    ev = load_samples(None, audio, AUDIO, split="evaluation")
    assert len(cal) >= 12 and len(ev) >= 6
    assert not set(cal.names) & set(ev.names)
    for feed in cal.feeds + ev.feeds:
        x = feed["input_values"]
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[0] == 1
        assert 16000 <= x.shape[1] <= 48000 and x.shape[1] % 1600 == 0
    assert cal.labels is not None and all(isinstance(t, str) and t == t.upper() and t for t in cal.labels)
    vocab = set(assets.ctc_tokenizer(("<pad>", "|", "A")).get_vocab()) | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    assert all(set(t) <= vocab for t in cal.labels + ev.labels)
    assert len(cal.shapes) < len(cal)  # bucketing shares shapes
    _forward(audio, cal.feeds[0])


def test_bundled_text(text):
    cal = load_samples(None, text, TEXT)
    ev = load_samples(None, text, TEXT, split="evaluation")
    assert len(cal) >= 32 and len(ev) >= 32
    assert cal.names[0] == "calibration.txt:1"
    for feed in cal.feeds:
        assert set(feed) == {"input_ids", "attention_mask"}
        ids, mask = feed["input_ids"], feed["attention_mask"]
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape and ids.shape[0] == 1
        assert ids.shape[1] % 8 == 0 and 8 <= ids.shape[1] <= 512
        assert ids[0, 0] == text.tokenizer.bos_token_id and ids.max() < text.config.vocab_size
        assert (ids[mask == 0] == text.config.pad_token_id).all()
    lines_cal = Path(cal.source).read_text().splitlines()
    lines_ev = Path(ev.source).read_text().splitlines()
    assert not set(lines_cal) & set(lines_ev)
    _forward(text, cal.feeds[0])


def test_bundled_question_answering(qa):
    s = load_samples(None, qa, TEXT, split="evaluation")
    assert s.source.endswith("qa_evaluation.jsonl") and len(s) >= 16
    ids = s.feeds[0]["input_ids"][0]
    assert (ids == qa.tokenizer.eos_token_id).sum() >= 2  # question </s></s> context
    _forward(qa, s.feeds[0])


def test_bundled_multiple_choice(mc):
    s = load_samples(None, mc, CHOICES)
    assert s.source.endswith("choices_calibration.jsonl") and len(s) >= 16
    assert s.feeds[0]["input_ids"].shape[:2] == (1, 4) and s.feeds[0]["input_ids"].dtype == np.int64
    assert s.labels is not None and all(label in range(4) for label in s.labels)
    out = _forward(mc, s.feeds[0])
    assert tuple(out.logits.shape) == (1, 4)


def test_bundled_path():
    assert bundled_path(Modality.VISION, "evaluation").is_dir()
    assert bundled_path(Modality.TEXT, "calibration").name == "calibration.txt"
    assert bundled_path(Modality.TEXT, "evaluation", "multiple-choice").name == "choices_evaluation.jsonl"
    with pytest.raises(D2VError, match="unknown split"):
        bundled_path(Modality.AUDIO, "train")


# --------------------------------------------------------------------------- seeded sampling


def test_seeded_sampling(audio, text):
    a = load_samples(None, audio, AUDIO, count=5, seed=3)
    b = load_samples(None, audio, AUDIO, count=5, seed=3)
    c = load_samples(None, audio, AUDIO, count=5, seed=4)
    assert len(a) == 5 and a.names == b.names and a.names != c.names
    assert list(a.names) == sorted(a.names)  # the bundled file names are sorted, and so is a pick
    assert all(np.array_equal(x["input_values"], y["input_values"]) for x, y in zip(a.feeds, b.feeds))
    full = load_samples(None, text, TEXT)
    assert load_samples(None, text, TEXT, count=len(full) + 10).names == full.names
    pick = load_samples(None, text, TEXT, count=7, seed=1)
    assert [full.names.index(n) for n in pick.names] == sorted(full.names.index(n) for n in pick.names)
    with pytest.raises(D2VError, match="positive"):
        load_samples(None, text, TEXT, count=0)


# --------------------------------------------------------------------------- images


def _halves(path: Path, **save) -> None:
    """A 40x20 image: left half red, right half blue."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    Image.fromarray(arr).save(path, **save)


def test_exif_rotation(tmp_path, vision):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _halves(tmp_path / "rotated.jpg", exif=exif, quality=95)
    img = open_rgb(tmp_path / "rotated.jpg")
    assert img.size == (20, 40)  # upright: portrait
    px = load_samples(tmp_path, vision, VISION).feeds[0]["pixel_values"][0]
    assert px[0, :12].mean() > 0.8 and px[0, -12:].mean() < -0.8  # red on top after rotation
    assert px[2, :12].mean() < -0.8 and px[2, -12:].mean() > 0.8


def test_modes_become_rgb(tmp_path, vision):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((24, 30), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit gray
    s = load_samples(tmp_path, vision, VISION)
    assert s.names == ("deep.png", "gray.png", "palette.gif", "rgba.png") and s.skipped == ()
    for feed in s.feeds:
        assert feed["pixel_values"].shape == (1, 3, 32, 32)
    gray = s.feeds[1]["pixel_values"][0]
    assert np.allclose(gray[0], gray[1]) and np.allclose(gray[1], gray[2])
    assert open_rgb(tmp_path / "deep.png").getpixel((3, 2))[0] == int(rgb[2, 3, 1])


def test_image_size_override(tmp_path, vision):
    _halves(tmp_path / "a.png")
    profile = ShapeProfile(dims=(Dim("batch", 1, 1, 8),), static={"image_size": 48})
    assert load_samples(tmp_path, vision, profile).feeds[0]["pixel_values"].shape == (1, 3, 48, 48)


def test_corrupt_image_skipped_and_labels(tmp_path, vision):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        _halves(tmp_path / label / "one.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    s = load_samples(tmp_path, vision, VISION)
    assert s.names == ("cat/one.png", "dog/one.png")
    assert s.labels == ("cat", "dog")
    assert [name for name, _ in s.skipped] == ["dog/broken.jpg"] and "image" in s.skipped[0][1]


def test_nothing_readable(tmp_path, vision, audio, text):
    with pytest.raises(D2VError, match="no images"):
        load_samples(tmp_path, vision, VISION)
    with pytest.raises(D2VError, match="no audio"):
        load_samples(tmp_path, audio, AUDIO)
    with pytest.raises(D2VError, match="does not exist"):
        load_samples(tmp_path / "missing", text, TEXT)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(D2VError, match=r"no readable images .*bad\.png") as err:
        load_samples(tmp_path, vision, VISION)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- audio


def test_stereo_44k_to_mono_16k(tmp_path, audio):
    t = np.arange(int(1.5 * 44100)) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.wav", np.stack([tone, np.zeros_like(tone)], axis=1), 44100)
    wave = read_mono(tmp_path / "stereo.wav")
    assert wave.ndim == 1 and wave.dtype == np.float32 and len(wave) == 24000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 2
    assert abs(np.abs(wave[1000:-1000]).max() - 0.25) < 0.01  # the mean of the two channels
    s = load_samples(tmp_path, audio, AUDIO)
    assert s.feeds[0]["input_values"].shape == (1, 24000) and s.labels is None


def test_audio_buckets_and_transcripts(tmp_path, audio):
    rng = np.random.default_rng(0)
    for name, seconds, rate in (("short.flac", 0.3, 16000), ("odd.wav", 1.23, 22050), ("long.ogg", 12.0, 16000)):
        sf.write(tmp_path / name, 0.1 * rng.standard_normal(int(seconds * rate)), rate)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    (tmp_path / "labels.tsv").write_text("file\ttranscript\nshort.flac\tHELLO\nodd.wav\tTHERE\n")
    s = load_samples(tmp_path, audio, AUDIO)
    shapes = {n: f["input_values"].shape[1] for n, f in zip(s.names, s.feeds)}
    assert shapes == {"long.ogg": 160000, "odd.wav": 20800, "short.flac": 8000}
    assert dict(zip(s.names, s.labels)) == {"long.ogg": None, "odd.wav": "THERE", "short.flac": "HELLO"}
    assert s.skipped[0][0] == "broken.wav"
    short = s.feeds[s.names.index("short.flac")]["input_values"][0]
    assert np.all(short[4800:] == 0) and abs(short[:4800].std() - 1) < 0.05  # normalized, then zero-padded


# --------------------------------------------------------------------------- text


def test_text_jsonl_pairs_and_qa(tmp_path, text, qa):
    rows = [
        {"question": "Who wrote it?", "context": "It was written by a cat in 1999.", "label": "cat"},
        {"text": "first sentence", "text_pair": "second sentence"},
        {"text": "just one"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n\n")
    s = load_samples(tmp_path / "data.jsonl", text, TEXT)
    assert s.names == ("data.jsonl:1", "data.jsonl:2", "data.jsonl:3")
    assert s.labels == ("cat", None, None)
    assert s.skipped == (("data.jsonl:4", s.skipped[0][1]),) and "JSON" in s.skipped[0][1]
    sep = text.tokenizer.eos_token_id
    assert (s.feeds[1]["input_ids"] == sep).sum() == 3  # a </s></s> b </s>
    q = load_samples(tmp_path / "data.jsonl", qa, TEXT)
    assert len(q) == 2 and [n for n, _ in q.skipped] == ["data.jsonl:3", "data.jsonl:4"]
    tok = qa.tokenizer
    decoded = tok.decode(q.feeds[0]["input_ids"][0], skip_special_tokens=True)
    assert "Who wrote it?" in decoded and "written by a cat" in decoded


def test_text_truncation_and_folder(tmp_path, text):
    (tmp_path / "a.txt").write_text("word " * 900 + "\n\nshort line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "from a folder"}) + "\n")
    profile = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("sequence", 16, 64, 100)))
    s = load_samples(tmp_path, text, profile)
    assert s.names == ("a.txt:1", "a.txt:3", "sub/b.jsonl:1")
    assert [f["input_ids"].shape[1] for f in s.feeds] == [100, 16, 16]
    assert s.feeds[0]["input_ids"][0, -1] == text.tokenizer.eos_token_id


def test_multiple_choice(tmp_path, mc):
    rows = [
        {"prompt": "The sky is", "choices": ["blue", "a fish", "loud", "seven", "wet"], "label": 4},
        {"prompt": "Two plus two", "choices": ["is four", "is five"], "label": 0},
        {"prompt": "Only one", "choices": ["lonely"], "label": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = load_samples(tmp_path / "mc.jsonl", mc, CHOICES)
    assert [f["input_ids"].shape[:2] for f in s.feeds] == [(1, 4), (1, 2)]
    assert s.labels == (3, 0)  # five choices cut to four, the right one kept
    kept = [mc.tokenizer.decode(row, skip_special_tokens=True) for row in s.feeds[0]["input_ids"][0]]
    assert kept[3].endswith("wet") and kept[0].endswith("blue")
    assert [n for n, _ in s.skipped] == ["mc.jsonl:3"]
    (tmp_path / "plain.txt").write_text("no choices here\n")
    with pytest.raises(D2VError, match="multiple-choice needs"):
        load_samples(tmp_path / "plain.txt", mc, CHOICES)


# --------------------------------------------------------------------------- npz and cache


def test_npz_feeds(tmp_path, vision, text):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "one.npz", pixel_values=rng.standard_normal((3, 32, 32)))  # no batch axis, float64
    np.savez(
        tmp_path / "three.npz", pixel_values=rng.standard_normal((3, 3, 32, 32)).astype(np.float32), labels=np.arange(3)
    )
    np.savez(tmp_path / "wrong.npz", images=np.zeros((1, 3, 32, 32)))
    s = load_samples(tmp_path, vision, VISION)
    assert s.names == ("one.npz", "three.npz[0]", "three.npz[1]", "three.npz[2]")
    assert all(f["pixel_values"].shape == (1, 3, 32, 32) and f["pixel_values"].dtype == np.float32 for f in s.feeds)
    assert s.labels == (None, 0, 1, 2)
    assert s.skipped[0][0] == "wrong.npz" and "pixel_values" in s.skipped[0][1]
    ids = np.array([[0, 5, 6, 2]], dtype=np.int32)
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    t = load_samples(tmp_path / "tokens.npz", text, TEXT)
    assert t.feeds[0]["input_ids"].dtype == np.int64 and t.feeds[0]["input_ids"].tolist() == ids.tolist()
    with pytest.raises(D2VError, match="no readable .npz"):
        load_samples(tmp_path / "wrong.npz", vision, VISION)


def test_cache_round_trip(tmp_path, audio):
    s = load_samples(None, audio, AUDIO, count=4, seed=2)
    s = Samples(s.feeds, s.names, s.labels, (("x.wav", "broken"),), s.source)
    path = save_cache(s, tmp_path / "out" / "calibration.npz")
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert len(data.files) == 1 + 4 * 2  # the metadata, then input_values and attention_mask per sample
    back = load_cache(path)
    assert back.names == s.names and back.labels == s.labels and back.skipped == s.skipped and back.source == s.source
    for a, b in zip(s.feeds, back.feeds):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    again = load_samples(path, audio, AUDIO, count=2, seed=0)
    assert len(again) == 2 and set(again.names) <= set(s.names)
    assert not list((tmp_path / "out").glob(".cache-*"))
    with pytest.raises(D2VError, match="does not exist"):
        load_cache(tmp_path / "none.npz")


def test_an_audio_cache_without_masks_loads_with_masks_of_ones(tmp_path, audio):
    """Caches written before the audio graphs took ``attention_mask`` hold ``input_values`` only: they load with ones."""
    s = load_samples(None, audio, AUDIO, count=2, seed=2)
    old = Samples(tuple({"input_values": f["input_values"]} for f in s.feeds), s.names, s.labels, (), s.source)
    back = load_cache(save_cache(old, tmp_path / "old.npz"))
    for feed in back.feeds:
        assert feed["attention_mask"].dtype == np.int64 and feed["attention_mask"].shape == feed["input_values"].shape
        assert feed["attention_mask"].all()


# --------------------------------------------------------------------------- package assets


def test_assets():
    assert len(assets.imagenet_labels()) == 1000 and "tabby" in assets.imagenet_labels()[281]
    assert assets.ade20k_labels()[:3] == ("wall", "building", "sky") and len(assets.ade20k_labels()) == 150
    tok = assets.text_tokenizer()
    assert tok is not None and len(tok) == 50265
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 50264}
    assert tok.model_max_length == 512
    assert tok.decode(tok("Hello world, it's me.")["input_ids"], skip_special_tokens=True) == "Hello world, it's me."


# --------------------------------------------------------------------------- bad lines and bad values (issue 12)


def test_invalid_utf8_lines_are_skipped_and_numbered(tmp_path, text):
    from d2v_export.calibration.samples import describe_skipped

    (tmp_path / "calib.txt").write_bytes(
        b"a good line\nbad \xff\xfe bytes\nanother good line\n\xc3\x28\n\nlast good line\n"
    )
    s = load_samples(tmp_path / "calib.txt", text, TEXT)
    assert s.names == ("calib.txt:1", "calib.txt:3", "calib.txt:6")
    assert [n for n, _ in s.skipped] == ["calib.txt:2", "calib.txt:4"]
    assert describe_skipped(s.skipped) == "calib.txt lines 2, 4 (not valid UTF-8)"
    (tmp_path / "rows.jsonl").write_bytes(json.dumps({"text": "fine"}).encode() + b'\n{"text": "caf\xe9"}\n')
    j = load_samples(tmp_path / "rows.jsonl", text, TEXT)
    assert j.names == ("rows.jsonl:1",) and j.skipped == (("rows.jsonl:2", "not valid UTF-8"),)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\nna\xefve\n")
    with pytest.raises(D2VError, match=r"no readable text samples .*latin1\.txt:1: not valid UTF-8"):
        load_samples(tmp_path / "latin1.txt", text, TEXT)


def test_samples_with_nan_or_inf_are_named_and_skipped(tmp_path, vision):
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    batch[1, 0, 5, 5] = np.nan
    np.savez(tmp_path / "three.npz", pixel_values=batch)
    np.savez(tmp_path / "inf.npz", pixel_values=np.full((3, 32, 32), np.inf, dtype=np.float32))
    np.savez(tmp_path / "clean.npz", pixel_values=rng.standard_normal((3, 32, 32)))
    s = load_samples(tmp_path, vision, VISION)
    assert s.names == ("clean.npz", "three.npz[0]", "three.npz[2]")
    assert sorted(n for n, _ in s.skipped) == ["inf.npz", "three.npz[1]"]
    assert all("non-finite" in why and "pixel_values" in why for _, why in s.skipped)
    # a cache is checked too, and nothing usable is refused with the sample names
    cache = save_cache(
        Samples(tuple(dict(pixel_values=batch[i : i + 1]) for i in range(3)), ("a", "b", "c"), None, (), "x"),
        tmp_path / "c" / "cache.npz",
    )
    back = load_cache(cache)
    assert back.names == ("a", "c") and back.skipped == (("b", "holds non-finite values (NaN or inf) in pixel_values"),)
    (tmp_path / "c" / "cache.npz").unlink()
    (tmp_path / "only").mkdir()
    np.savez(tmp_path / "only" / "nan.npz", pixel_values=np.full((3, 32, 32), np.nan))
    with pytest.raises(D2VError, match=r"no readable .npz feeds .*nan\.npz: holds non-finite values"):
        load_samples(tmp_path / "only", vision, VISION)


def test_a_calibration_cache_passed_as_calibration_is_reused(tmp_path, text):
    """--calibration calibration-cache.npz (as the option's help offers) reads the cache as it is."""
    from d2v_export.calibration.samples import is_cache
    from d2v_export.pipeline import _cached

    s = load_samples(None, text, TEXT, count=3)
    cache = save_cache(s, tmp_path / "calibration-cache.npz")
    np.savez(tmp_path / "plain.npz", input_ids=np.ones((1, 8), dtype=np.int64))
    assert is_cache(cache) and not is_cache(tmp_path / "plain.npz")
    again = _cached(text, TEXT, cache, "calibration", 32, 0, lambda _m: None)
    assert again.names == s.names and len(again) == 3
